//! The minimal server of ../hyper on the project's own HTTP core (src/http, included as it is),
//! so that the two binaries differ only by the HTTP layer.
//!
//!   core-option ADDR DIR

#[path = "../../../../../src/http/mod.rs"]
#[allow(dead_code, unused_imports)]
mod http;

use std::borrow::Cow;
use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(&args[2]);
    let version = std::fs::read_to_string(dir.join("version")).unwrap_or_else(|_| "1".into());
    let config = http::Config {
        timeout: Duration::from_secs(30),
        max_connections: 100_000,
        name: "core-option",
        bodies: false,
        inline_body: 0,
        handlers: http::Handlers::Inline,
    };
    let listener = TcpListener::bind(&args[1]).unwrap();
    eprintln!("listening on {}", listener.local_addr().unwrap());
    let server = http::Server::new(listener, config, Arc::new(AtomicBool::new(false)), move |req, _| {
        let Some(path) = http::route_path(req.target) else {
            return http::Response::text(404, "not found\n");
        };
        if path == "/version" {
            return http::Response::text(200, version.clone()).with_header("Cache-Control", "no-cache");
        }
        let Some(name) = path.strip_prefix("/update/") else {
            return http::Response::text(404, "not found\n");
        };
        let Ok(file) = File::open(dir.join(name)) else {
            return http::Response::text(404, "not found\n");
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        http::Response {
            status: 200,
            headers: vec![("Content-Type", Cow::Borrowed("application/x-bzip2"))],
            body: http::Body::File { file, offset: 0, len },
        }
    })
    .unwrap();
    server.run();
}
