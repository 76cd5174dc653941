//! The endpoints of SPEC.md, answered from the index: `/`, `/ls`, `/version`, `/latest` and
//! `/update/<name>`; and the fleet's (`/report`, `/fleet`, `/fleet.json`), which `crate::fleet`
//! answers. A rollout decides which version `/version` and `/latest` offer a box.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Serialize;

use super::index::{Image, Index, Snapshot};
use crate::fleet::protocol::REPORT_PATH;
use crate::fleet::web::Service;
use crate::fsutil::unix_now;
use crate::http::{self, FileMeta, Method, Request, RequestBody, Response};
use crate::image::{FileKind, Version};

const NO_CACHE: &str = "no-cache";
/// An image's name is its version and the builder never overwrites one, so what a name serves
/// never changes.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const NO_IMAGE: &str = "no update image available\n";

pub struct App {
    pub index: Arc<Index>,
    /// Images are served from `<URL>/<name>` elsewhere; this server keeps the index endpoints.
    pub public_base_url: Option<String>,
    pub fleet: Service,
}

impl App {
    /// Every request: the one endpoint that takes a body, then the others.
    pub fn handle(&self, req: &Request<'_>, body: &mut RequestBody<'_>) -> Response {
        if http::route_path(req.target) == Some(REPORT_PATH) {
            if req.method() != Method::Post {
                return Response::text(405, "reports are sent with POST\n")
                    .with_header("Allow", "POST");
            }
            return self.fleet.report(req, body);
        }
        self.respond(req)
    }

    /// Requests without a body.
    pub fn respond(&self, req: &Request<'_>) -> Response {
        if !matches!(req.method(), Method::Get | Method::Head) {
            return Response::text(405, "only GET and HEAD are allowed\n")
                .with_header("Allow", "GET, HEAD");
        }
        let Some(path) = http::route_path(req.target) else {
            return not_found();
        };
        match path {
            "/" => health(),
            "/ls" => self.ls(req),
            "/version" => self.version(req),
            "/latest" => self.latest(req),
            "/fleet" => self.fleet.page(),
            "/fleet.json" => {
                let snap = self.index.snapshot();
                let versions: Vec<u64> = snap.images.keys().map(|v| v.get()).collect();
                self.fleet.view(req, &versions)
            }
            _ => match path.strip_prefix("/update/") {
                Some(name) => self.update(req, name),
                None => not_found(),
            },
        }
    }

    /// The image offered to the sender of `req`: the newest, unless a rollout says otherwise.
    fn offered(&self, req: &Request<'_>, snap: &Snapshot, latest: bool) -> Option<Arc<Image>> {
        let v = self
            .fleet
            .offer(req, snap.images.keys().map(|v| v.get()), latest)?;
        snap.images.get(&Version::new(v).ok()?).cloned()
    }

    /// The cache headers of an offer: per box while a rollout is set.
    fn offer_headers(&self, resp: Response) -> Response {
        if self.fleet.staged() {
            resp.with_header("Cache-Control", "no-cache, private")
                .with_header("Vary", "X-OPQ-Box-Id")
        } else {
            resp.with_header("Cache-Control", NO_CACHE)
        }
    }

    fn version(&self, req: &Request<'_>) -> Response {
        let snap = self.index.snapshot();
        self.offer_headers(match self.offered(req, &snap, false) {
            Some(img) => Response::text(200, img.name.version().to_string()),
            None => Response::text(404, NO_IMAGE),
        })
    }

    fn latest(&self, req: &Request<'_>) -> Response {
        let snap = self.index.snapshot();
        self.offer_headers(match self.offered(req, &snap, true) {
            Some(img) => {
                let location = match &self.public_base_url {
                    Some(base) => format!("{base}/{}", img.name.file_name()),
                    None => format!("/update/{}", img.name.file_name()),
                };
                Response::text(303, format!("see {location}\n")).with_header("Location", location)
            }
            None => Response::text(404, NO_IMAGE),
        })
    }

    fn ls(&self, req: &Request<'_>) -> Response {
        let snap = self.index.snapshot();
        let resp = if req.wants_json() {
            #[derive(Serialize)]
            struct Entry {
                name: String,
                version: u64,
                size: u64,
                sha256: Option<String>,
                signed: bool,
            }
            let entries: Vec<Entry> = snap
                .images
                .values()
                .map(|img| Entry {
                    name: img.name.file_name(),
                    version: img.name.version().get(),
                    size: img.file.size,
                    sha256: img.digest(self.index.dir()),
                    signed: img.signed(),
                })
                .collect();
            let body = serde_json::to_vec(&entries).expect("plain data serializes");
            Response::new(200, "application/json", body)
        } else {
            let body: String = snap
                .images
                .values()
                .map(|img| format!("{}\n", img.name.file_name()))
                .collect();
            Response::text(200, body)
        };
        resp.with_header("Cache-Control", NO_CACHE)
            .with_header("Vary", "Accept")
    }

    fn update(&self, req: &Request<'_>, name: &str) -> Response {
        let snap = self.index.snapshot();
        let Some((image, kind, info)) = snap.lookup(name) else {
            return not_found();
        };
        let download = kind == FileKind::Image && req.method() == Method::Get;
        self.fleet
            .seen(req, download.then(|| image.name.version().get()));
        if let Some(base) = &self.public_base_url {
            // Only names in the index are redirected, so this never points anywhere else.
            let location = format!("{base}/{name}");
            return Response::text(302, format!("see {location}\n"))
                .with_header("Location", location)
                .with_header("Cache-Control", IMMUTABLE);
        }
        let file = match self.index.open(name, info) {
            Ok(f) => f,
            Err(e) => {
                // Changed or removed since it was indexed; the watcher will catch up.
                log::debug!("not serving {name}: {e}");
                return not_found();
            }
        };
        let content_type = match kind {
            FileKind::Image => "application/x-bzip2",
            FileKind::Sha256 => "text/plain; charset=utf-8",
            FileKind::Minisig => "application/octet-stream",
        };
        let headers: Vec<(&'static str, Cow<'static, str>)> = vec![
            ("Content-Type", content_type.into()),
            (
                "Content-Disposition",
                format!("attachment; filename=\"{name}\"").into(),
            ),
            ("Cache-Control", IMMUTABLE.into()),
        ];
        let meta = FileMeta {
            size: info.size,
            mtime: info.mtime,
            etag: info.etag(),
        };
        http::file_response(req, file, meta, headers)
    }
}

fn health() -> Response {
    // Written out to keep the field order and spacing of the original Python server's answer.
    let body = format!(
        "{{\"name\": \"Box Update Server\", \"ok\": true, \"timestamp\": {}, \"subcomponents\": []}}",
        unix_now()
    );
    Response::new(200, "application/json", body.into_bytes()).with_header("Cache-Control", NO_CACHE)
}

/// The one answer for everything that is not there, whatever the reason: it reveals nothing.
fn not_found() -> Response {
    Response::text(404, "not found\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::Body;
    use crate::http::request::parse_head;
    use crate::server::index::{Snapshot, scan};
    use std::collections::HashSet;

    fn app(dir: &std::path::Path) -> App {
        let index = Arc::new(Index::new(dir.to_path_buf()));
        index.publish(Snapshot::build(
            &scan(dir, &HashSet::new()).unwrap(),
            &Snapshot::default(),
        ));
        App {
            index,
            public_base_url: None,
            fleet: Service::default(),
        }
    }

    fn get(app: &App, target: &str) -> Response {
        app_method(app, "GET", target)
    }

    fn body(r: &Response) -> String {
        match &r.body {
            Body::Bytes(b) => String::from_utf8(b.to_vec()).unwrap(),
            Body::File { .. } => "<file>".into(),
        }
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }

    #[test]
    fn empty_directory_answers() {
        let d = tempfile::tempdir().unwrap();
        let a = app(d.path());
        let r = get(&a, "/version");
        assert_eq!((r.status, body(&r).as_str()), (404, NO_IMAGE));
        assert_eq!(get(&a, "/latest").status, 404);
        let r = get(&a, "/ls");
        assert_eq!((r.status, body(&r).as_str()), (200, ""));
        let r = get(&a, "/");
        let v: serde_json::Value = serde_json::from_str(&body(&r)).unwrap();
        assert_eq!(v["name"], "Box Update Server");
        assert_eq!(v["ok"], true);
        assert_eq!(v["subcomponents"], serde_json::json!([]));
        assert!(v["timestamp"].as_u64().unwrap() >= unix_now() - 5);
    }

    #[test]
    fn newest_is_the_highest_number() {
        let d = tempfile::tempdir().unwrap();
        for v in [999, 1000, 20] {
            std::fs::write(d.path().join(format!("opq-box-update-{v}.tar.bz2")), b"x").unwrap();
        }
        std::fs::write(d.path().join("opq-box-update-1001.tar.bz2.part"), b"x").unwrap();
        let a = app(d.path());
        assert_eq!(body(&get(&a, "/version")), "1000");
        let r = get(&a, "/latest");
        assert_eq!(r.status, 303);
        assert_eq!(
            header(&r, "Location"),
            Some("/update/opq-box-update-1000.tar.bz2")
        );
        assert_eq!(header(&r, "Cache-Control"), Some("no-cache"));
        assert_eq!(
            body(&get(&a, "/ls")),
            "opq-box-update-20.tar.bz2\nopq-box-update-999.tar.bz2\nopq-box-update-1000.tar.bz2\n"
        );
        let r = get(&a, "/update/opq-box-update-20.tar.bz2");
        assert_eq!((r.status, body(&r).as_str()), (200, "<file>"));
        assert_eq!(header(&r, "Cache-Control"), Some(IMMUTABLE));
        assert_eq!(
            get(&a, "/update/opq-box-update-1001.tar.bz2.part").status,
            404
        );
        let r = app_method(&a, "DELETE", "/version");
        assert_eq!((r.status, header(&r, "Allow")), (405, Some("GET, HEAD")));
    }

    fn app_method(app: &App, method: &str, target: &str) -> Response {
        let head = format!("{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n");
        app.respond(&parse_head(head.as_bytes()).unwrap())
    }
}
