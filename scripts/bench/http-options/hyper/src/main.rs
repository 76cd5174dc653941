//! Option (a) of issue 12, measured in docs/benchmarks.md and the README: the same `/version`
//! and `/update/<name>` as update-server, on hyper 1.x and tokio, the way tower-http serves files
//! (a 64 KiB ReaderStream over tokio::fs). `--threads 1` is a current-thread runtime, as on the box.
//!
//!   hyper-option ADDR DIR [--threads N]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: u16, text: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(text.as_bytes())).map_err(|e| match e {}).boxed())
        .unwrap()
}

async fn answer(dir: Arc<PathBuf>, version: Arc<String>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    if path == "/version" {
        let body = Full::new(Bytes::from(version.as_bytes().to_vec())).map_err(|e| match e {}).boxed();
        return Ok(Response::builder()
            .header("Content-Type", "text/plain; charset=utf-8")
            .header("Cache-Control", "no-cache")
            .body(body)
            .unwrap());
    }
    let Some(name) = path.strip_prefix("/update/").filter(|n| !n.contains('/') && !n.starts_with('.')) else {
        return Ok(full(404, "not found\n"));
    };
    let Ok(file) = tokio::fs::File::open(dir.join(name)).await else {
        return Ok(full(404, "not found\n"));
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024).map_ok(Frame::data);
    Ok(Response::builder()
        .header("Content-Type", "application/x-bzip2")
        .header("Content-Length", len)
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr: SocketAddr = args[1].parse().unwrap();
    let dir = Arc::new(PathBuf::from(&args[2]));
    let threads: usize = args.iter().position(|a| a == "--threads").map_or(2, |i| args[i + 1].parse().unwrap());
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().unwrap()
    };
    let version = Arc::new(std::fs::read_to_string(dir.join("version")).unwrap_or_else(|_| "1".into()));
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await.unwrap();
        eprintln!("listening on {}", listener.local_addr().unwrap());
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let _ = stream.set_nodelay(true);
            let (dir, version) = (dir.clone(), version.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(dir.clone(), version.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}
