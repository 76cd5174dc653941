//! `box-updater serve`: the box's page and HTTP API. Handlers are thin: they read the engine's
//! status (the single source of truth) and send commands to the one engine thread. The HTTP
//! layer is the shared core (`crate::http`): a client can hold a connection only as long as it
//! keeps talking, and no request makes the daemon allocate by a size the client names.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{Value, json};

use crate::http::{self, Method, Request, RequestBody, Response};
use crate::updater::commands::status_json;
use crate::updater::config;
use crate::updater::engine::{Engine, Source};
use crate::updater::status::Step;

/// The page: one self-contained file (HTML, CSS, JS inline), built into the binary.
pub const PAGE: &str = include_str!("../../box-updater/page.html");

const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'";
const MAX_JSON_BODY: u64 = 64 * 1024;
/// Connections served at once: a few browsers polling the page and an upload or two fit many
/// times over; past it, a flood gets 503 instead of the box's memory.
pub const MAX_CONNECTIONS: usize = 64;
/// How often reports the update server could not take are tried again.
const REPORT_RETRY: Duration = Duration::from_secs(600);

/// How long answers in flight may take to finish once the daemon is asked to stop.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct WebOptions {
    pub listen: SocketAddr,
    /// Required on every API request when set (`Authorization: Bearer …` or `X-Box-Token`).
    pub token: Option<String>,
    /// Silence allowed from a client: idle between requests, or within a request's head or body.
    /// It bounds each read, not a whole request, so that an upload over a slow link may take
    /// minutes while a stalled one is dropped.
    pub timeout: Duration,
}

enum Job {
    Update {
        force: bool,
    },
    Upload {
        image: PathBuf,
        file_name: String,
        signature: Option<String>,
        force: bool,
    },
}

struct Web {
    engine: Arc<Engine>,
    jobs: Sender<Job>,
    busy: Arc<AtomicBool>,
    token: Option<String>,
}

/// Runs the confirm step of a pending update (unless the guard does it at boot), then serves
/// until SIGTERM or SIGINT; then answers in flight get `STOP_GRACE` to finish, and an update this
/// daemon runs is stopped where that loses nothing (see `stop_update`).
pub fn serve(engine: Engine, opts: WebOptions) -> Result<()> {
    // Blocked here, before any thread starts, so that every thread inherits the mask and the
    // signals are taken by `sigwait` in one thread. Child processes (install_update.sh) start
    // with a clean mask: std resets it.
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGTERM);
    waited.add(Signal::SIGINT);
    waited.thread_block().context("cannot block signals")?;
    if engine.status.get().pending.is_some() && crate::updater::guard::installed(engine.layout()) {
        log::info!(
            "the pending update is confirmed by {}, not here",
            crate::updater::guard::UNIT
        );
    } else if engine.status.get().pending.is_some() {
        match engine.confirm() {
            Ok(s) => log::info!("confirm at start: {}", s.message),
            Err(e) => log::warn!("confirm at start skipped: {e}"),
        }
    }
    let listener = crate::cli::listen(opts.listen, "--listen ADDR:PORT")?;
    let token = opts.token.or_else(|| {
        config::read(&engine.settings.box_config)
            .ok()
            .and_then(|m| {
                m.get("updater_token")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .filter(|t| !t.is_empty())
    });
    log::info!(
        "serving the update page on http://{} (installed {}, {})",
        listener.local_addr()?,
        engine
            .layout()
            .installed_version()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "none".into()),
        if token.is_some() {
            "token required"
        } else {
            "no token"
        }
    );
    let engine = Arc::new(engine);
    let busy = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    {
        let (stop, engine) = (stop.clone(), Arc::clone(&engine));
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(sig) = waited.wait() {
                    log::info!("got {sig}, stopping");
                    // At once, so that a running update starts no further step meanwhile.
                    engine.request_stop();
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .context("cannot start the signal thread")?;
    }
    let (tx, rx) = channel::<Job>();
    {
        let engine = Arc::clone(&engine);
        let busy = Arc::clone(&busy);
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                for job in rx {
                    let result = match job {
                        Job::Update { force } => engine.update(Source::Server { force }),
                        Job::Upload {
                            image,
                            file_name,
                            signature,
                            force,
                        } => {
                            let r = engine.update(Source::Local {
                                image: image.clone(),
                                file_name,
                                signature,
                                force,
                            });
                            let _ = std::fs::remove_file(image);
                            r
                        }
                    };
                    match result {
                        Ok(s) if s.state == Step::Failed => log::error!("{}", s.message),
                        Ok(s) => log::info!("update finished: {}", s.message),
                        Err(e) => log::warn!("update not started: {e}"),
                    }
                    busy.store(false, Ordering::SeqCst);
                    engine.send_reports();
                }
            })?;
    }
    {
        // Reports of the confirm at start, and any the server could not take before: retried
        // now and then, off the request threads.
        let engine = Arc::clone(&engine);
        std::thread::Builder::new()
            .name("reports".into())
            .spawn(move || {
                loop {
                    engine.send_reports();
                    std::thread::sleep(REPORT_RETRY);
                }
            })?;
    }
    let web = Web {
        engine: Arc::clone(&engine),
        jobs: tx,
        busy: Arc::clone(&busy),
        token,
    };
    let config = http::Config {
        timeout: opts.timeout,
        max_connections: MAX_CONNECTIONS,
        name: "box-updater",
        bodies: true,
    };
    let server = http::Server::new(listener, config, stop, move |req, body| {
        web.respond(req, body)
    })?;
    crate::updater::systemd::notify_ready();
    server.run();
    let left = server.finish(STOP_GRACE);
    if left > 0 {
        log::warn!("{left} answers cut short by the stop");
    }
    stop_update(&engine, &busy);
    log::info!("stopped");
    Ok(())
}

/// On a stop, an update this daemon runs is stopped where that loses nothing. The steps up to
/// the box's install script are left at once: a download resumes at the next update, a
/// half-unpacked release is removed at the next start, and the engine starts no further step.
/// Once the install script runs, the update goes on through the switch and the reboot command
/// (or the install script's failure): a stop never leaves a release half-installed, whatever
/// the state file would survive.
fn stop_update(engine: &Engine, busy: &AtomicBool) {
    if !busy.load(Ordering::SeqCst) {
        return;
    }
    // Taken again now: where the update stands after the answers in flight were finished.
    let step = engine.request_stop();
    let critical = |s: Step| {
        matches!(
            s,
            Step::Installing
                | Step::Switching
                | Step::Rebooting
                | Step::Confirming
                | Step::RollingBack
        )
    };
    if !critical(step) {
        engine.log.warn(&format!(
            "box-updater stopped while {}; the update is left there, and the next one starts over (a download resumes)",
            step.words()
        ));
        return;
    }
    engine.log.info(&format!(
        "box-updater is stopping: letting the update finish {} first",
        step.words()
    ));
    while busy.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn json_reply(status: u16, body: &Value) -> Response {
    let mut bytes = serde_json::to_vec(body).expect("json serializes");
    bytes.push(b'\n');
    Response::new(status, "application/json", bytes).with_header("Cache-Control", "no-store")
}

fn error(status: u16, msg: &str) -> Response {
    json_reply(status, &json!({"ok": false, "error": msg}))
}

fn page() -> Response {
    Response::new(200, "text/html; charset=utf-8", PAGE.as_bytes())
        .with_header("Cache-Control", "no-store")
        .with_header("Content-Security-Policy", CSP)
}

impl Web {
    fn respond(&self, req: &Request<'_>, body: &mut RequestBody<'_>) -> Response {
        let Some(path) = http::route_path(req.target) else {
            return error(404, "no such page");
        };
        match (req.method(), path) {
            (Method::Get, "/" | "/index.html") => page(),
            (method, _) => self
                .api(req, body, method, path)
                .unwrap_or_else(|reply| reply),
        }
    }

    /// Same-origin and token checks for the API; state changes also need a JSON content type
    /// (or, for the upload, a custom header), which a cross-site form can't send.
    fn guard(&self, req: &Request<'_>, changes_state: bool, upload: bool) -> Result<(), Response> {
        if let Some(token) = &self.token {
            let given = req.header("X-Box-Token").or_else(|| {
                req.header("Authorization")
                    .and_then(|v| v.strip_prefix("Bearer "))
            });
            if given != Some(token.as_str()) {
                return Err(error(401, "this box requires its access token"));
            }
        }
        if !changes_state {
            return Ok(());
        }
        if let Some(site) = req.header("Sec-Fetch-Site")
            && !matches!(site, "same-origin" | "none")
        {
            return Err(error(403, "cross-site requests may not change this box"));
        }
        if let Some(origin) = req.header("Origin") {
            let host = req.header("Host").unwrap_or("");
            let same = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host);
            if !same {
                return Err(error(
                    403,
                    "requests from another origin may not change this box",
                ));
            }
        }
        let ctype = req.header("Content-Type").unwrap_or("");
        if upload {
            if req.header("X-Requested-With") != Some("box-updater") {
                return Err(error(
                    400,
                    "uploads must come from the box's page (X-Requested-With: box-updater)",
                ));
            }
        } else if !ctype.to_ascii_lowercase().starts_with("application/json") {
            return Err(error(415, "send JSON (Content-Type: application/json)"));
        }
        Ok(())
    }

    fn api(
        &self,
        req: &Request<'_>,
        body: &mut RequestBody<'_>,
        method: Method,
        path: &str,
    ) -> Result<Response, Response> {
        let engine = &self.engine;
        match (method, path) {
            (Method::Get, "/version") => {
                self.guard(req, false, false)?;
                Ok(json_reply(
                    200,
                    &json!({"version": engine.layout().installed_version()}),
                ))
            }
            (Method::Get, "/box_config") => {
                self.guard(req, false, false)?;
                match config::read(&engine.settings.box_config) {
                    Ok(map) => Ok(json_reply(200, &json!({"box_config": map}))),
                    Err(e) => Err(error(500, &format!("{e:#}"))),
                }
            }
            (Method::Post, "/box_config") => {
                self.guard(req, true, false)?;
                let body = read_json_body(body)?;
                let map = config::parse_edit(&body).map_err(|e| error(400, &e))?;
                config::write(&engine.settings.box_config, &map)
                    .map_err(|e| error(500, &format!("{e:#}")))?;
                engine.log.info("box config changed from the web page");
                Ok(json_reply(200, &json!({"ok": true, "box_config": map})))
            }
            (Method::Post, "/box_update") => {
                self.guard(req, true, false)?;
                let body = read_json_body(body)?;
                let force = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("force").and_then(Value::as_bool))
                    .unwrap_or(false);
                self.start(Job::Update { force })
            }
            (Method::Get, "/box_update/status") => {
                self.guard(req, false, false)?;
                let mut s = status_json(engine);
                if self.busy.load(Ordering::SeqCst) {
                    s["running"] = json!(true);
                }
                Ok(json_reply(200, &s))
            }
            (Method::Get, "/box_update/check") => {
                self.guard(req, false, false)?;
                match crate::updater::commands::check(engine) {
                    Ok(v) => Ok(json_reply(200, &v)),
                    Err(e) => Err(error(502, &format!("{e:#}"))),
                }
            }
            (Method::Post, "/box_update/upload") => {
                self.guard(req, true, true)?;
                self.upload(req, body)
            }
            (
                _,
                "/version" | "/box_config" | "/box_update" | "/box_update/status"
                | "/box_update/check" | "/box_update/upload",
            ) => Err(error(405, "method not allowed")),
            _ => Err(error(404, "no such page")),
        }
    }

    /// Reserves the engine, or says it is busy (an update from the page or the command line).
    fn reserve(&self) -> Result<(), Response> {
        if self
            .busy
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(error(409, "an update is already running"));
        }
        if self.engine.update_running() {
            self.busy.store(false, Ordering::SeqCst);
            return Err(error(409, "an update is already running"));
        }
        Ok(())
    }

    fn start(&self, job: Job) -> Result<Response, Response> {
        self.reserve()?;
        self.send(job)
    }

    fn send(&self, job: Job) -> Result<Response, Response> {
        if self.jobs.send(job).is_err() {
            self.busy.store(false, Ordering::SeqCst);
            return Err(error(500, "the update engine stopped; restart box-updater"));
        }
        Ok(json_reply(202, &json!({"ok": true, "started": true})))
    }

    fn upload(&self, req: &Request<'_>, body: &mut RequestBody<'_>) -> Result<Response, Response> {
        let params: Vec<(String, String)> = req
            .query()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect();
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let file_name = get("name").ok_or_else(|| {
            error(
                400,
                "name the image file (?name=opq-box-update-<VERSION>.tar.bz2)",
            )
        })?;
        if crate::image::ImageName::parse_file_name(&file_name).is_none() {
            return Err(error(
                400,
                &format!(
                    "{file_name:?} is not an update image name (opq-box-update-<VERSION>.tar.bz2)"
                ),
            ));
        }
        let force = get("force").is_some_and(|v| v == "1" || v == "true");
        let signature = match req.header("X-Minisig") {
            None => None,
            Some(b64) => Some(
                decode_base64(b64)
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| error(400, "X-Minisig must be the .minisig file in base64"))?,
            ),
        };
        let limit = self.engine.settings.max_expanded.min(
            self.engine
                .usable_space(&self.engine.layout().downloads_dir())
                / 3,
        );
        if body.announced() > limit {
            return Err(too_large(limit));
        }
        self.reserve()?;
        let dest = self
            .engine
            .layout()
            .downloads_dir()
            .join(format!("upload-{file_name}"));
        match save_upload(body, &dest, limit) {
            Ok(_) => self.send(Job::Upload {
                image: dest,
                file_name,
                signature,
                force,
            }),
            Err(reply) => {
                let _ = std::fs::remove_file(&dest);
                self.busy.store(false, Ordering::SeqCst);
                Err(reply)
            }
        }
    }
}

fn too_large(limit: u64) -> Response {
    error(
        413,
        &format!(
            "the image is larger than this box accepts ({} MiB)",
            limit >> 20
        ),
    )
}

/// Streams the body to `dest`: memory stays at one buffer whatever the image size.
fn save_upload(
    body: &mut RequestBody<'_>,
    dest: &std::path::Path,
    limit: u64,
) -> Result<u64, Response> {
    let mut file = std::fs::File::create(dest)
        .map_err(|e| error(500, &format!("cannot store the upload: {e}")))?;
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = body.read(&mut buf).map_err(|e| {
            let e = http::BodyError::Broken(e);
            error(e.status(), &format!("the upload broke off: {e}"))
        })?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(too_large(limit));
        }
        file.write_all(&buf[..n])
            .map_err(|e| error(507, &format!("cannot store the upload: {e}")))?;
    }
    file.sync_all()
        .map_err(|e| error(507, &format!("cannot store the upload: {e}")))?;
    if total == 0 {
        return Err(error(400, "the upload is empty"));
    }
    Ok(total)
}

fn read_json_body(body: &mut RequestBody<'_>) -> Result<Vec<u8>, Response> {
    body.read_to_vec(MAX_JSON_BODY).map_err(|e| match e {
        http::BodyError::TooLarge { .. } => error(413, "the request body is too large"),
        e => error(e.status(), &format!("cannot read the request: {e}")),
    })
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        } as u32)
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_percent_decoding() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8gd29ybGQ").unwrap(), b"hello world");
        assert!(decode_base64("***").is_none());
        assert_eq!(
            percent_decode("opq-box-update-1.tar.bz2"),
            "opq-box-update-1.tar.bz2"
        );
        assert_eq!(percent_decode("a%2Fb%"), "a/b%");
    }
}
