//! HTTP/1.1 as this server speaks it: bounded request heads, strict request targets, keep-alive,
//! timeouts, conditional and range requests, and files sent from the page cache (sendfile).
//!
//! Only GET and HEAD exist here and no request has a body, which keeps the parser small enough to
//! check by eye; a request that does not fit is answered and the connection closed.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use super::index::FileInfo;

/// The largest request head (request line and headers) read; a larger one is refused.
pub const MAX_HEAD: usize = 8 * 1024;
/// The longest path that is looked at; a longer one is not in the index by construction.
pub const MAX_PATH: usize = 512;
const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Other,
}

/// The parts of a request this server uses.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method_text: String,
    pub target: String,
    pub http10: bool,
    pub keep_alive: bool,
    pub has_body: bool,
    pub range: Option<String>,
    pub if_range: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub accept: Option<String>,
}

impl Request {
    pub fn method(&self) -> Method {
        match self.method_text.as_str() {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            _ => Method::Other,
        }
    }

    /// Whether the client asked for JSON (`Accept: application/json`).
    pub fn wants_json(&self) -> bool {
        self.accept.as_deref().is_some_and(|a| {
            a.split(',').any(|range| {
                let mut parts = range.split(';');
                let media = parts.next().unwrap_or("").trim();
                let refused = parts.any(|p| {
                    let p = p.trim();
                    p.starts_with("q=") && p[2..].trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/json") && !refused
            })
        })
    }
}

/// Why a request head could not be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// 400: the request line or a header is malformed.
    Malformed(&'static str),
    /// 505: an HTTP version other than 1.0 and 1.1.
    Version,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn has_token(list: &str, token: &str) -> bool {
    list.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses a request head (everything before the blank line, line ends included or not).
pub fn parse_head(head: &[u8]) -> Result<Request, HeadError> {
    let mut lines = head.split(|&b| b == b'\n').map(|l| match l {
        [rest @ .., b'\r'] => rest,
        l => l,
    });
    let line = lines.next().unwrap_or_default();
    if !line.iter().all(|&b| b.is_ascii_graphic() || b == b' ') {
        return Err(HeadError::Malformed(
            "the request line is not printable ASCII",
        ));
    }
    let line = std::str::from_utf8(line).map_err(|_| HeadError::Malformed("not ASCII"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed(
            "the request line is not `METHOD TARGET HTTP/1.x`",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) || target.is_empty() {
        return Err(HeadError::Malformed(
            "the request line is not `METHOD TARGET HTTP/1.x`",
        ));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        v if v.len() == 8
            && v.starts_with("HTTP/")
            && v.as_bytes()[5].is_ascii_digit()
            && v.as_bytes()[6] == b'.'
            && v.as_bytes()[7].is_ascii_digit() =>
        {
            return Err(HeadError::Version);
        }
        _ => return Err(HeadError::Malformed("the request line has no HTTP version")),
    };

    let mut req = Request {
        method_text: method.to_string(),
        target: target.to_string(),
        http10,
        ..Request::default()
    };
    let mut connection = String::new();
    let mut hosts = 0;
    let mut content_length: Option<u64> = None;
    let mut count = 0;
    for line in lines {
        if line.is_empty() {
            break;
        }
        count += 1;
        if count > MAX_HEADERS {
            return Err(HeadError::Malformed("too many header fields"));
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HeadError::Malformed("a header field has no colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        // Also refuses obsolete line folding and whitespace before the colon (RFC 9112, 5.1-5.2).
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(HeadError::Malformed("a header field name is malformed"));
        }
        if value.iter().any(|&b| b == 0 || b == b'\r') {
            return Err(HeadError::Malformed(
                "a header field value holds a control byte",
            ));
        }
        let name = std::str::from_utf8(name).expect("tchars are ASCII");
        let value = String::from_utf8_lossy(value).trim().to_string();
        let slot = match name.to_ascii_lowercase().as_str() {
            "host" => {
                hosts += 1;
                continue;
            }
            "connection" => {
                if !connection.is_empty() {
                    connection.push(',');
                }
                connection.push_str(&value);
                continue;
            }
            "content-length" => {
                let n = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| value.parse::<u64>().ok())
                    .flatten()
                    .ok_or(HeadError::Malformed("Content-Length is not a number"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(HeadError::Malformed("Content-Length is given twice"));
                }
                content_length = Some(n);
                continue;
            }
            "transfer-encoding" => {
                req.has_body = true;
                continue;
            }
            "range" => &mut req.range,
            "if-range" => &mut req.if_range,
            "if-none-match" => &mut req.if_none_match,
            "if-modified-since" => &mut req.if_modified_since,
            "accept" => &mut req.accept,
            _ => continue,
        };
        match slot {
            // Lists may be split over several fields; Range and dates may not.
            Some(old) if name.eq_ignore_ascii_case("if-none-match") => {
                old.push_str(", ");
                old.push_str(&value);
            }
            Some(old) if name.eq_ignore_ascii_case("accept") => {
                old.push_str(", ");
                old.push_str(&value);
            }
            Some(_) => return Err(HeadError::Malformed("a header field is given twice")),
            None => *slot = Some(value),
        }
    }
    if !http10 && hosts != 1 {
        return Err(HeadError::Malformed(
            "an HTTP/1.1 request needs exactly one Host",
        ));
    }
    req.has_body |= content_length.is_some_and(|n| n > 0);
    req.keep_alive = if http10 {
        has_token(&connection, "keep-alive")
    } else {
        !has_token(&connection, "close")
    };
    Ok(req)
}

/// The path a request target names, when it is one this server could ever answer: plain
/// unreserved characters, no empty, `.` or `..` segment, no percent-encoding, no backslash, not
/// over-long. The query is dropped. Anything else is `None`, which is answered 404 unread.
pub fn route_path(target: &str) -> Option<&str> {
    let mut path = target;
    // absolute-form, as sent to proxies: `http://host/path`.
    for scheme in ["http://", "https://"] {
        if path.len() >= scheme.len() && path[..scheme.len()].eq_ignore_ascii_case(scheme) {
            let rest = &path[scheme.len()..];
            path = rest.find('/').map_or("/", |i| &rest[i..]);
            break;
        }
    }
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if !path.starts_with('/') || path.len() > MAX_PATH {
        return None;
    }
    let plain = |b: u8| b.is_ascii_alphanumeric() || b"-._~/".contains(&b);
    if !path.bytes().all(plain) {
        return None;
    }
    if path != "/"
        && path[1..]
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return None;
    }
    Some(path)
}

/// A response body: bytes in memory, or a span of an open file.
pub enum Body {
    Bytes(Cow<'static, [u8]>),
    File { file: File, offset: u64, len: u64 },
}

impl Body {
    fn len(&self) -> u64 {
        match self {
            Body::Bytes(b) => b.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    pub body: Body,
}

impl Response {
    pub fn new(
        status: u16,
        content_type: &'static str,
        body: impl Into<Cow<'static, [u8]>>,
    ) -> Self {
        Response {
            status,
            headers: vec![("Content-Type", Cow::Borrowed(content_type))],
            body: Body::Bytes(body.into()),
        }
    }

    pub fn text(status: u16, body: impl Into<Cow<'static, str>>) -> Self {
        let body: Cow<'static, [u8]> = match body.into() {
            Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        };
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<Cow<'static, str>>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        303 => "See Other",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// What a `Range` header asks of a file of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range: send it all. Malformed and multi-range requests land here, as
    /// RFC 9110 (14.2) lets a server ignore them.
    Whole,
    /// `len` bytes from `start`.
    Part {
        start: u64,
        len: u64,
    },
    Unsatisfiable,
}

pub fn parse_range(header: &str, size: u64) -> RangeAsk {
    let Some((unit, spec)) = header.trim().split_once('=') else {
        return RangeAsk::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeAsk::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // The last `n` bytes.
        return match num(last) {
            None => RangeAsk::Whole,
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => {
                let len = n.min(size);
                RangeAsk::Part {
                    start: size - len,
                    len,
                }
            }
        };
    }
    let Some(start) = num(first) else {
        return RangeAsk::Whole;
    };
    let end = if last.is_empty() {
        None
    } else {
        match num(last) {
            Some(e) if e >= start => Some(e),
            _ => return RangeAsk::Whole,
        }
    };
    if start >= size {
        return RangeAsk::Unsatisfiable;
    }
    let end = end.map_or(size - 1, |e| e.min(size - 1));
    RangeAsk::Part {
        start,
        len: end - start + 1,
    }
}

/// Whether an `If-None-Match` list matches `etag` (weak comparison, RFC 9110 13.1.2).
pub fn none_match(list: &str, etag: &str) -> bool {
    let strip = |t: &str| t.trim().trim_start_matches("W/").to_string();
    let etag = strip(etag);
    list.split(',').any(|t| t.trim() == "*" || strip(t) == etag)
}

pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// Answers a request for a file: 304 when the client's copy is current, 206 or 416 for a range,
/// else 200. `headers` are added to every one of them.
pub fn file_response(
    req: &Request,
    file: File,
    info: &FileInfo,
    headers: Vec<(&'static str, Cow<'static, str>)>,
) -> Response {
    let etag = info.etag();
    let last_modified = http_date(info.mtime);
    let mut resp = Response {
        status: 200,
        headers,
        body: Body::Bytes(Cow::Borrowed(b"")),
    };
    resp.headers.push(("ETag", etag.clone().into()));
    resp.headers
        .push(("Last-Modified", last_modified.clone().into()));
    resp.headers.push(("Accept-Ranges", "bytes".into()));

    let not_modified = match (&req.if_none_match, &req.if_modified_since) {
        (Some(list), _) => none_match(list, &etag),
        (None, Some(since)) => match httpdate::parse_http_date(since) {
            Ok(since) => {
                // HTTP dates have whole seconds.
                let secs = |t: SystemTime| {
                    t.duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                };
                secs(info.mtime) <= secs(since)
            }
            Err(_) => false,
        },
        (None, None) => false,
    };
    if not_modified {
        resp.status = 304;
        return resp;
    }

    // If-Range: the range only holds for the very representation the client has.
    let range_applies = match &req.if_range {
        None => true,
        Some(v) if v.trim_start().starts_with('"') => v.trim() == etag,
        Some(v) => v.trim() == last_modified,
    };
    let ask = match &req.range {
        Some(r) if range_applies => parse_range(r, info.size),
        _ => RangeAsk::Whole,
    };
    match ask {
        RangeAsk::Whole => {
            resp.body = Body::File {
                file,
                offset: 0,
                len: info.size,
            };
        }
        RangeAsk::Part { start, len } => {
            resp.status = 206;
            resp.headers.push((
                "Content-Range",
                format!("bytes {}-{}/{}", start, start + len - 1, info.size).into(),
            ));
            resp.body = Body::File {
                file,
                offset: start,
                len,
            };
        }
        RangeAsk::Unsatisfiable => {
            resp.status = 416;
            // The body is a message now, not the file.
            resp.headers.retain(|(n, _)| {
                !n.eq_ignore_ascii_case("Content-Type")
                    && !n.eq_ignore_ascii_case("Content-Disposition")
            });
            resp.headers
                .push(("Content-Range", format!("bytes */{}", info.size).into()));
            resp.headers
                .push(("Content-Type", "text/plain; charset=utf-8".into()));
            resp.body = Body::Bytes(Cow::Borrowed(b"range not satisfiable\n"));
        }
    }
    resp
}

/// Writes `resp`; returns the body bytes sent. With `head_only`, the headers are those of the
/// full answer and no body follows.
pub fn send(
    stream: &mut TcpStream,
    resp: Response,
    head_only: bool,
    keep_alive: bool,
    http10: bool,
) -> io::Result<u64> {
    let no_body = head_only || resp.status == 304;
    let mut out = Vec::with_capacity(
        320 + match &resp.body {
            Body::Bytes(b) if !no_body => b.len(),
            _ => 0,
        },
    );
    write!(out, "HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status))?;
    write!(
        out,
        "Date: {}\r\nServer: update-server\r\n",
        http_date(SystemTime::now())
    )?;
    if resp.status != 304 {
        write!(out, "Content-Length: {}\r\n", resp.body.len())?;
    }
    for (name, value) in &resp.headers {
        write!(out, "{name}: {value}\r\n")?;
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    match resp.body {
        Body::Bytes(b) => {
            if !no_body {
                out.extend_from_slice(&b);
            }
            stream.write_all(&out)?;
            Ok(if no_body { 0 } else { b.len() as u64 })
        }
        Body::File { file, offset, len } => {
            stream.write_all(&out)?;
            if no_body {
                return Ok(0);
            }
            send_file(stream, &file, offset, len)
        }
    }
}

/// Sends `len` bytes of `file` from `offset`: page cache to socket, no copy through this process,
/// so memory stays flat whatever the file size and the number of downloads. The socket's send
/// timeout bounds a stalled client.
fn send_file(stream: &TcpStream, file: &File, offset: u64, len: u64) -> io::Result<u64> {
    let mut off = i64::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut sent = 0u64;
    while sent < len {
        let chunk = (len - sent).min(1 << 30) as usize;
        match nix::sys::sendfile::sendfile(stream, file, Some(&mut off), chunk) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file ended after {sent} of {len} bytes"),
                ));
            }
            Ok(n) => sent += n as u64,
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client stopped reading after {sent} of {len} bytes"),
                ));
            }
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    Ok(sent)
}

/// How one connection is served.
pub struct ConnLimits {
    /// Silence allowed from the client, and time allowed for a whole request head.
    pub timeout: Duration,
}

/// Serves one connection until the client closes it, it times out, or `stop()` says so.
/// `handle` answers each request; `busy` hears when a request starts and ends being answered.
pub fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    limits: &ConnLimits,
    handle: &dyn Fn(&Request) -> Response,
    stop: &dyn Fn() -> bool,
    busy: &dyn Fn(bool),
) {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0usize;
    loop {
        // Read until a whole head is in, or it can't be.
        let mut started = (filled > 0).then(Instant::now);
        let head_len = loop {
            // Blank lines before a request line are to be ignored (RFC 9112, 2.2).
            let blank = buf[..filled]
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            if blank > 0 {
                buf.copy_within(blank..filled, 0);
                filled -= blank;
            }
            if let Some(n) = head_end(&buf[..filled]) {
                break Some(n);
            }
            if filled == buf.len() {
                break None;
            }
            if started.is_some_and(|t| t.elapsed() > limits.timeout) {
                refuse(stream, peer, 408, "request head too slow\n");
                return;
            }
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return,
                Ok(n) => {
                    started.get_or_insert_with(Instant::now);
                    filled += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if filled > 0 {
                        refuse(stream, peer, 408, "request head too slow\n");
                    }
                    return;
                }
                Err(_) => return,
            }
        };
        let Some(head_len) = head_len else {
            // An over-long request line can only carry an over-long path: not in the index.
            if !buf.contains(&b'\n') {
                refuse(stream, peer, 404, "not found\n");
            } else {
                refuse(stream, peer, 431, "request head too large\n");
            }
            return;
        };
        let t0 = Instant::now();
        let req = match parse_head(&buf[..head_len]) {
            Ok(r) => r,
            Err(HeadError::Version) => {
                refuse(
                    stream,
                    peer,
                    505,
                    "only HTTP/1.0 and HTTP/1.1 are spoken here\n",
                );
                return;
            }
            Err(HeadError::Malformed(why)) => {
                log::debug!("{peer} sent a malformed request: {why}");
                refuse(stream, peer, 400, "bad request\n");
                return;
            }
        };
        buf.copy_within(head_len..filled, 0);
        filled -= head_len;

        busy(true);
        let resp = handle(&req);
        let status = resp.status;
        let keep_alive = req.keep_alive && !req.has_body && !stop();
        let result = send(
            &mut stream,
            resp,
            req.method() == Method::Head,
            keep_alive,
            req.http10,
        );
        busy(false);
        let ms = t0.elapsed().as_millis();
        let shown = shorten(&req.target);
        match result {
            Ok(bytes) => log::info!("{peer} {} {shown} {status} {bytes} {ms}ms", req.method_text),
            Err(e) => {
                log::info!(
                    "{peer} {} {shown} {status} aborted {ms}ms: {e}",
                    req.method_text
                );
                return;
            }
        }
        if !keep_alive {
            linger_close(stream, req.has_body);
            return;
        }
    }
}

/// The length of the head in `buf` (through its blank line), if it is all there.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(p) = buf[i..].iter().position(|&b| b == b'\n') {
        let at = i + p;
        let rest = &buf[at + 1..];
        if rest.starts_with(b"\n") {
            return Some(at + 2);
        }
        if rest.starts_with(b"\r\n") {
            return Some(at + 3);
        }
        i = at + 1;
    }
    None
}

fn shorten(s: &str) -> Cow<'_, str> {
    const MAX: usize = 200;
    if s.len() <= MAX {
        Cow::Borrowed(s)
    } else {
        // Targets are checked to be ASCII, so any byte index is a char boundary.
        Cow::Owned(format!("{}...({} bytes)", &s[..MAX], s.len()))
    }
}

/// Answers a request that can't be taken, and closes.
fn refuse(mut stream: TcpStream, peer: SocketAddr, status: u16, body: &'static str) {
    log::info!("{peer} - - {status} {} 0ms", body.len());
    if send(
        &mut stream,
        Response::text(status, body),
        false,
        false,
        false,
    )
    .is_ok()
    {
        linger_close(stream, true);
    }
}

/// Closes after the answer has left: when the client may still be sending (a body, the rest of
/// a refused head), what it sends is read and dropped for a moment, so that the close does not
/// turn into a reset that destroys the answer in flight.
fn linger_close(mut stream: TcpStream, drain: bool) {
    let _ = stream.shutdown(Shutdown::Write);
    if !drain {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut sink = [0u8; 4096];
    let mut drained = 0usize;
    while Instant::now() < deadline && drained < 256 * 1024 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Request, HeadError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn heads_parse_strictly() {
        let r = parse("GET /version HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\n\r\n").unwrap();
        assert_eq!(
            (r.method(), r.target.as_str(), r.keep_alive, r.http10),
            (Method::Get, "/version", true, false)
        );
        assert_eq!(r.range.as_deref(), Some("bytes=1-"));
        let r = parse("HEAD / HTTP/1.0\n\n").unwrap();
        assert!(r.http10 && !r.keep_alive && r.method() == Method::Head);
        assert!(
            parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(
            !parse("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap()
                .keep_alive
        );
        assert!(
            parse("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
                .unwrap()
                .has_body
        );
        assert_eq!(
            parse("BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap()
                .method(),
            Method::Other
        );
        assert_eq!(
            parse("GET / HTTP/2.0\r\n\r\n").unwrap_err(),
            HeadError::Version
        );
        for bad in [
            "GET /\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1 x\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\nRange: bytes=2-\r\n\r\n",
            "G\u{e9}T / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
            "",
        ] {
            assert!(
                matches!(parse(bad), Err(HeadError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost: x\r\n"), None);
    }

    #[test]
    fn only_plain_paths_route() {
        for (target, want) in [
            ("/", Some("/")),
            ("/version", Some("/version")),
            ("/version?x=1", Some("/version")),
            ("http://example.org/ls", Some("/ls")),
            ("HTTP://example.org", Some("/")),
            (
                "/update/opq-box-update-1.tar.bz2",
                Some("/update/opq-box-update-1.tar.bz2"),
            ),
            ("/update/../../etc/passwd", None),
            ("/update/%2e%2e/%2e%2e/etc/passwd", None),
            ("/update/..%2fsecret.txt", None),
            ("/update/..%5csecret.txt", None),
            ("/update/..\\secret.txt", None),
            ("/update//etc/passwd", None),
            ("//update/x", None),
            ("/update/./x", None),
            ("/update/x/", None),
            ("/update/x%00", None),
            ("etc/passwd", None),
            ("*", None),
            ("/a#b", None),
        ] {
            assert_eq!(route_path(target), want, "{target}");
        }
        let long = format!("/update/{}", "a".repeat(MAX_PATH));
        assert_eq!(route_path(&long), None);
    }

    #[test]
    fn ranges() {
        use RangeAsk::*;
        for (h, size, want) in [
            ("bytes=0-9", 100, Part { start: 0, len: 10 }),
            ("bytes=90-", 100, Part { start: 90, len: 10 }),
            ("bytes=90-1000", 100, Part { start: 90, len: 10 }),
            ("bytes=-10", 100, Part { start: 90, len: 10 }),
            ("bytes=-1000", 100, Part { start: 0, len: 100 }),
            (" bytes = 5 - 5 ", 100, Part { start: 5, len: 1 }),
            ("bytes=100-", 100, Unsatisfiable),
            ("bytes=-0", 100, Unsatisfiable),
            ("bytes=0-", 0, Unsatisfiable),
            ("bytes=5-4", 100, Whole),
            ("bytes=0-1,5-6", 100, Whole),
            ("items=0-1", 100, Whole),
            ("bytes=a-b", 100, Whole),
            ("bytes=99999999999999999999999-", 100, Whole),
            ("bytes", 100, Whole),
        ] {
            assert_eq!(parse_range(h, size), want, "{h}");
        }
    }

    #[test]
    fn file_answers_carry_one_content_type_each() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        let info = FileInfo::from_metadata(&std::fs::metadata(&p).unwrap());
        let answer = |req: &Request| {
            let headers = vec![
                ("Content-Type", "application/x-bzip2".into()),
                ("Content-Disposition", "attachment; filename=\"f\"".into()),
            ];
            file_response(req, File::open(&p).unwrap(), &info, headers)
        };
        let types = |r: &Response| -> Vec<String> {
            r.headers
                .iter()
                .filter(|(n, _)| *n == "Content-Type")
                .map(|(_, v)| v.to_string())
                .collect()
        };
        let r = answer(&Request {
            range: Some("bytes=20-".into()),
            ..Request::default()
        });
        assert_eq!(r.status, 416);
        assert_eq!(types(&r), ["text/plain; charset=utf-8"]);
        let r = answer(&Request {
            range: Some("bytes=2-3".into()),
            ..Request::default()
        });
        assert_eq!(r.status, 206);
        assert_eq!(types(&r), ["application/x-bzip2"]);
        assert!(matches!(
            r.body,
            Body::File {
                offset: 2,
                len: 2,
                ..
            }
        ));
        let r = answer(&Request {
            if_modified_since: Some(http_date(info.mtime)),
            ..Request::default()
        });
        assert_eq!(r.status, 304);
        let r = answer(&Request {
            if_none_match: Some("\"other\"".into()),
            if_modified_since: Some(http_date(info.mtime)),
            ..Request::default()
        });
        assert_eq!(
            r.status, 200,
            "If-None-Match decides over If-Modified-Since"
        );
    }

    #[test]
    fn etag_lists() {
        assert!(none_match("\"a\", \"b\"", "\"b\""));
        assert!(none_match("W/\"b\"", "\"b\""));
        assert!(none_match("*", "\"b\""));
        assert!(!none_match("\"a\"", "\"b\""));
    }

    #[test]
    fn accept_json() {
        let r = |a: &str| Request {
            accept: Some(a.into()),
            ..Request::default()
        };
        assert!(r("application/json").wants_json());
        assert!(r("text/html, Application/JSON;q=0.5").wants_json());
        assert!(!r("application/json;q=0").wants_json());
        assert!(!r("text/plain").wants_json());
        assert!(!Request::default().wants_json());
    }
}
