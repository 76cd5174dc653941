//! The box's HTTP client: small text requests, `/latest` resolution, and resumable image downloads
//! that hash as they go. Proxies come from the environment; HTTPS trusts the bundled roots or a
//! configured CA file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use ureq::Agent;
use ureq::http::Response;

use crate::image::ImageName;

#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub user_agent: String,
}

/// A failure worth retrying (the network), or not (the server's answer is final).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
}

/// The headers a box adds to every request (the fleet protocol's), computed per request since
/// the box's state changes as it goes.
pub type HeaderSource = Arc<dyn Fn() -> Vec<(&'static str, String)> + Send + Sync>;

/// How long a report may take: it never holds up an update for long.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a failure to reach a server begins (see `FetchError::is_unreachable`).
const UNREACHABLE: &str = "cannot reach ";

impl FetchError {
    /// Whether the server could not be reached at all (refused, no such host, no answer), as
    /// opposed to an answer that was wrong.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, FetchError::Transient(m) if m.starts_with(UNREACHABLE))
    }
}

pub struct Http {
    agent: Agent,
    no_redirect: Agent,
    reports: Agent,
    headers: Option<HeaderSource>,
}

/// What became of a posted report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Posted {
    /// The server took it (2xx).
    Taken,
    /// The server does not take reports (404, 405, 501: an old server, nginx, a CDN).
    NotSpoken(u16),
    /// The server refused this report for good (another 4xx), with its reason.
    Refused(u16, String),
    /// Try again later: the network, a 5xx, or 429 (too many).
    Later(String),
}

impl Http {
    pub fn new(opts: &HttpOptions) -> Result<Self> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(ca) = &opts.ca_file {
            let pem = std::fs::read(ca)
                .with_context(|| format!("cannot read CA file {}", ca.display()))?;
            let certs: Vec<_> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                bail!("CA file {} holds no PEM certificate", ca.display());
            }
            tls = tls.root_certs(ureq::tls::RootCerts::from(certs));
        }
        let tls = tls.build();
        let build = |redirects: u32, timeout: Option<Duration>| -> Agent {
            Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .max_redirects_will_error(false)
                .timeout_connect(Some(timeout.unwrap_or(opts.connect_timeout)))
                .timeout_per_read(Some(timeout.unwrap_or(opts.read_timeout)))
                .timeout_recv_response(Some(timeout.unwrap_or(opts.read_timeout)))
                .timeout_global(timeout)
                .user_agent(opts.user_agent.as_str())
                .tls_config(tls.clone())
                .build()
                .into()
        };
        Ok(Http {
            agent: build(5, None),
            no_redirect: build(0, None),
            reports: build(0, Some(REPORT_TIMEOUT.min(opts.connect_timeout))),
            headers: None,
        })
    }

    /// Sends the fleet protocol's headers from `source` on every request from now on.
    pub fn set_headers(&mut self, source: HeaderSource) {
        self.headers = Some(source);
    }

    /// Posts one fleet report (JSON) to `url`.
    pub fn post_report(&self, url: &str, body: &[u8]) -> Posted {
        let mut req = self
            .reports
            .post(url)
            .header("Content-Type", "application/json");
        for (name, value) in self.headers.as_ref().map(|h| h()).unwrap_or_default() {
            req = req.header(name, value);
        }
        let mut resp = match req.send(body) {
            Ok(r) => r,
            Err(e) => return Posted::Later(classify(url, e).to_string()),
        };
        let status = resp.status().as_u16();
        let mut text = String::new();
        let _ = resp
            .body_mut()
            .with_config()
            .limit(4096)
            .reader()
            .read_to_string(&mut text);
        let reason = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| text.trim().chars().take(200).collect());
        match status {
            200..=299 => Posted::Taken,
            404 | 405 | 501 => Posted::NotSpoken(status),
            429 | 408 | 500..=599 => Posted::Later(format!("{url} answered {status}: {reason}")),
            _ => Posted::Refused(status, reason),
        }
    }

    fn get(
        &self,
        agent: &Agent,
        url: &str,
        range_from: Option<u64>,
    ) -> Result<Response<ureq::Body>, FetchError> {
        let mut req = agent.get(url);
        for (name, value) in self.headers.as_ref().map(|h| h()).unwrap_or_default() {
            req = req.header(name, value);
        }
        if let Some(off) = range_from {
            req = req.header("Range", format!("bytes={off}-"));
        }
        req.call().map_err(|e| classify(url, e))
    }

    /// A small text resource; `Ok(None)` when the server says 404.
    pub fn get_text(&self, url: &str, limit: u64) -> Result<Option<String>, FetchError> {
        let mut resp = self.get(&self.agent, url, None)?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            s => return Err(status_error(url, s)),
        }
        let mut body = Vec::new();
        resp.body_mut()
            .with_config()
            .limit(limit)
            .reader()
            .read_to_end(&mut body)
            .map_err(|e| FetchError::Transient(format!("reading {url}: {e}")))?;
        String::from_utf8(body)
            .map(Some)
            .map_err(|_| FetchError::Permanent(format!("{url} did not answer with text")))
    }

    /// Asks `/latest` where the newest image is: its name and absolute URL.
    pub fn resolve_latest(&self, base: &str) -> Result<(ImageName, String), FetchError> {
        let url = format!("{base}/latest");
        let resp = self.get(&self.no_redirect, &url, None)?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Err(FetchError::Permanent(format!(
                "the update server at {base} has no image"
            )));
        }
        if !(300..400).contains(&status) {
            return Err(status_error(&url, status));
        }
        let location = resp
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| FetchError::Permanent(format!("{url} redirected without a Location")))?;
        let target = resolve_url(base, location).ok_or_else(|| {
            FetchError::Permanent(format!(
                "{url} redirected to an unusable location {location:?}"
            ))
        })?;
        let name = target
            .rsplit('/')
            .next()
            .and_then(ImageName::parse_file_name)
            .ok_or_else(|| {
                FetchError::Permanent(format!(
                    "{url} points to {location:?}, which is not an update image"
                ))
            })?;
        Ok((name, target))
    }

    /// Downloads `url` into `part`, resuming what is there when the server and file allow it.
    /// `on_progress` hears (bytes done, total if known); `tap` hears the file's bytes, from the
    /// first. Returns the sha256 and size of the file.
    pub fn download(
        &self,
        url: &str,
        part: &Path,
        max_size: u64,
        on_progress: &mut dyn FnMut(u64, Option<u64>),
        tap: &mut (dyn Tap + Send),
        log: &dyn Fn(&str),
    ) -> Result<(String, u64), FetchError> {
        let meta_path = meta_path(part);
        let meta: Option<PartMeta> = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut offset = match (&meta, std::fs::metadata(part)) {
            // The part is named after the image, so it is the same image wherever it came from;
            // ETag and Content-Range decide whether its bytes can be continued.
            (Some(_), Ok(st)) if st.len() > 0 => st.len(),
            _ => 0,
        };
        let mut hasher = Sha256::new();
        tap.restart();
        if offset > 0 {
            // Resume: the hash must cover what is already on disk.
            let f = File::open(part)
                .map_err(|e| FetchError::Transient(format!("reading {}: {e}", part.display())))?;
            let mut r = f.take(offset);
            io::copy(&mut r, &mut HashSink(&mut hasher, &mut *tap))
                .map_err(|e| FetchError::Transient(format!("reading {}: {e}", part.display())))?;
        }
        let mut resp = self.get(&self.agent, url, (offset > 0).then_some(offset))?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let total = match status {
            200 => {
                if offset > 0 {
                    log("server sent the whole image instead of the rest; starting over");
                }
                offset = 0;
                hasher = Sha256::new();
                tap.restart();
                resp.body().content_length()
            }
            206 => {
                let cr = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let same_file = match (&meta, &etag) {
                    (Some(PartMeta { etag: Some(a), .. }), Some(b)) => a == b,
                    _ => true,
                };
                match parse_content_range(cr) {
                    Some((start, t))
                        if start == offset
                            && same_file
                            && meta
                                .as_ref()
                                .and_then(|m| m.total)
                                .is_none_or(|mt| Some(mt) == t) =>
                    {
                        log(&format!("resuming at {offset} bytes"));
                        t
                    }
                    _ => {
                        log(
                            "the image changed on the server or the range did not fit; starting over",
                        );
                        let _ = std::fs::remove_file(part);
                        let _ = std::fs::remove_file(&meta_path);
                        return Err(FetchError::Transient(
                            "restarting the download from zero".into(),
                        ));
                    }
                }
            }
            416 if meta.as_ref().and_then(|m| m.total) == Some(offset) => {
                let digest = hex::encode(hasher.finalize());
                return Ok((digest, offset));
            }
            416 => {
                let _ = std::fs::remove_file(part);
                let _ = std::fs::remove_file(&meta_path);
                return Err(FetchError::Transient(
                    "the server refused the resume range; starting over".into(),
                ));
            }
            s => return Err(status_error(url, s)),
        };
        if let Some(t) = total
            && t > max_size
        {
            // What was downloaded so far only takes the space the box lacks.
            let _ = std::fs::remove_file(part);
            let _ = std::fs::remove_file(&meta_path);
            return Err(FetchError::Permanent(format!(
                "not enough free space: the image is {:.1} MiB and, with its unpacked copy, needs about {:.1} MiB; free up space on the box",
                t as f64 / 1048576.0,
                t as f64 * 3.0 / 1048576.0
            )));
        }
        let new_meta = PartMeta { etag, total };
        let _ = std::fs::write(
            &meta_path,
            serde_json::to_vec(&new_meta).unwrap_or_default(),
        );
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(offset == 0)
            .append(offset > 0)
            .open(part)
            .map_err(|e| FetchError::Permanent(format!("cannot write {}: {e}", part.display())))?;
        let mut reader = resp
            .body_mut()
            .with_config()
            .limit(max_size.saturating_sub(offset))
            .reader();
        let mut done = offset;
        on_progress(done, total);
        // The tap (the signature's BLAKE2b, the slowest of the checks) hears the bytes on a second
        // core while this one receives, writes and takes the sha256: the download's time is then
        // about that of its slowest step, not of all of them one after the other.
        std::thread::scope(|scope| {
            // Each buffer goes over with the length of what it holds: it keeps its full size, so
            // it is never zeroed again on its way back.
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Vec<u8>, usize)>(TAP_BUFFERS);
            let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<u8>>();
            scope.spawn(move || {
                for (b, n) in full_rx {
                    tap.update(&b[..n]);
                    let _ = free_tx.send(b);
                }
            });
            let mut made = 0;
            loop {
                let mut buf = match free_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) if made < TAP_BUFFERS => {
                        made += 1;
                        vec![0u8; 128 * 1024]
                    }
                    Err(_) => free_rx
                        .recv()
                        .map_err(|_| FetchError::Permanent("the signature check stopped".into()))?,
                };
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let _ = out.sync_data();
                        return Err(FetchError::Transient(format!(
                            "download interrupted at {done} bytes: {e}"
                        )));
                    }
                };
                if let Err(e) = out.write_all(&buf[..n]) {
                    // A full disk: nothing half-written is kept.
                    let _ = std::fs::remove_file(part);
                    let _ = std::fs::remove_file(&meta_path);
                    return Err(FetchError::Permanent(format!(
                        "cannot write the download {}: {e}",
                        part.display()
                    )));
                }
                hasher.update(&buf[..n]);
                full_tx
                    .send((buf, n))
                    .map_err(|_| FetchError::Permanent("the signature check stopped".into()))?;
                done += n as u64;
                crate::updater::fault::point_at("download", done);
                on_progress(done, total);
            }
            Ok(())
        })?;
        out.sync_all()
            .map_err(|e| FetchError::Permanent(format!("cannot write {}: {e}", part.display())))?;
        if let Some(t) = total
            && done != t
        {
            return Err(FetchError::Transient(format!(
                "download ended at {done} of {t} bytes"
            )));
        }
        Ok((hex::encode(hasher.finalize()), done))
    }
}

/// Hears every byte of a downloaded file in order from the first, to check it on the way: a resumed
/// download's bytes already on disk come first; `restart` says the bytes start over.
pub trait Tap {
    fn restart(&mut self);
    fn update(&mut self, bytes: &[u8]);
}

/// No tap.
impl Tap for () {
    fn restart(&mut self) {}
    fn update(&mut self, _: &[u8]) {}
}

/// Buffers of the download in flight between the receiving thread and the tap's.
const TAP_BUFFERS: usize = 4;

struct HashSink<'a>(&'a mut Sha256, &'a mut (dyn Tap + Send));
impl Write for HashSink<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0.update(b);
        self.1.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What we know of a `.part` file: which version of the file it was (ETag) and its full length.
#[derive(Debug, Serialize, Deserialize)]
struct PartMeta {
    etag: Option<String>,
    total: Option<u64>,
}

pub fn meta_path(part: &Path) -> PathBuf {
    let mut s = part.as_os_str().to_os_string();
    s.push(".json");
    PathBuf::from(s)
}

fn classify(url: &str, e: ureq::Error) -> FetchError {
    let text = e.to_string();
    if text.contains("certificate") || text.contains("UnknownIssuer") {
        // Retrying won't change the certificate.
        return FetchError::Permanent(format!(
            "{url}: the server's TLS certificate is not trusted ({text}); for a private CA pass --ca-file"
        ));
    }
    match e {
        ureq::Error::Io(io) if io.kind() == io::ErrorKind::ConnectionRefused => {
            FetchError::Transient(format!("{UNREACHABLE}{url}: connection refused"))
        }
        ureq::Error::HostNotFound => {
            FetchError::Transient(format!("{UNREACHABLE}{url}: its host name is not known"))
        }
        ureq::Error::Io(_) | ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed => {
            FetchError::Transient(format!("{UNREACHABLE}{url}: {text}"))
        }
        _ => FetchError::Permanent(format!("request to {url} failed: {text}")),
    }
}

fn status_error(url: &str, status: u16) -> FetchError {
    match status {
        404 => FetchError::Permanent(format!("{url} was not found on the update server (404)")),
        500..=599 | 408 | 429 => FetchError::Transient(format!("{url} answered {status}")),
        _ => FetchError::Permanent(format!("{url} answered {status}")),
    }
}

/// `bytes START-END/TOTAL` → (START, TOTAL if known).
pub fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    if end < start {
        return None;
    }
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    if let Some(t) = total
        && end >= t
    {
        return None;
    }
    Some((start, total))
}

/// Resolves a redirect's Location against the server's base URL.
pub fn resolve_url(base: &str, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_string());
    }
    let scheme_end = base.find("://")? + 3;
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    if location.starts_with("//") {
        return Some(format!("{}{}", &base[..scheme_end - 2], location));
    }
    if location.starts_with('/') {
        return Some(format!("{}{}", &base[..authority_end], location));
    }
    let dir = match base[authority_end..].rfind('/') {
        Some(i) => &base[..authority_end + i + 1],
        None => return Some(format!("{}/{}", &base[..authority_end], location)),
    };
    Some(format!("{dir}{location}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parses_strictly() {
        assert_eq!(
            parse_content_range("bytes 100-199/200"),
            Some((100, Some(200)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("bytes 100-99/200"), None);
        assert_eq!(parse_content_range("bytes 100-200/200"), None);
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn redirects_resolve_against_the_base() {
        let b = "http://srv:8151";
        assert_eq!(
            resolve_url(b, "/update/x.tar.bz2").unwrap(),
            "http://srv:8151/update/x.tar.bz2"
        );
        assert_eq!(resolve_url(b, "https://cdn/x").unwrap(), "https://cdn/x");
        assert_eq!(resolve_url(b, "//cdn/x").unwrap(), "http://cdn/x");
        assert_eq!(
            resolve_url("http://srv/a/latest", "update/x").unwrap(),
            "http://srv/a/update/x"
        );
    }
}
