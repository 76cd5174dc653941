//! One connection, start to end: bounded request heads read against a deadline, request bodies
//! read only as far as the handler wants them, keep-alive and pipelining, and the close.
//!
//! Nothing here allocates by a size the client gives: the head has a fixed buffer, and a body
//! goes to the handler through a reader limited to its `Content-Length`. A body the handler does
//! not read to its end is never drained; the connection closes after the answer.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::Config;
use super::request::{Framing, HeadError, MAX_HEAD, Method, Request, parse_head};
use super::response::{Delivery, Response, send};

/// What answers requests: the head, and the body (empty unless the server takes bodies).
pub type Handler = dyn Fn(&Request<'_>, &mut RequestBody<'_>) -> Response + Send + Sync;

/// A request's body as it arrives: the bytes that came with the head first, then the socket, never
/// past `Content-Length`. Each read waits at most the connection's timeout.
pub struct RequestBody<'a> {
    stream: &'a TcpStream,
    buffered: &'a [u8],
    /// How much of `buffered` has been handed out.
    taken: usize,
    announced: u64,
    remaining: u64,
    /// A `100 Continue` is owed before the first read from the socket.
    continue_due: bool,
}

/// Why a body could not be had.
#[derive(Debug)]
pub enum BodyError {
    /// Announced larger than the handler takes; nothing was read.
    TooLarge { limit: u64 },
    /// The client stopped sending (timeout) or went away mid-body.
    Broken(io::Error),
}

impl BodyError {
    /// The status that answers it.
    pub fn status(&self) -> u16 {
        match self {
            BodyError::TooLarge { .. } => 413,
            BodyError::Broken(e) if e.kind() == io::ErrorKind::TimedOut => 408,
            BodyError::Broken(_) => 400,
        }
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge { limit } => {
                write!(f, "the request body is larger than {limit} bytes")
            }
            BodyError::Broken(e) => write!(f, "the request body broke off: {e}"),
        }
    }
}

impl std::error::Error for BodyError {}

impl<'a> RequestBody<'a> {
    fn new(stream: &'a TcpStream, after_head: &'a [u8], length: u64, expect: bool) -> Self {
        let buffered = &after_head[..after_head
            .len()
            .min(usize::try_from(length).unwrap_or(usize::MAX))];
        RequestBody {
            stream,
            buffered,
            taken: 0,
            announced: length,
            remaining: length,
            continue_due: expect && buffered.is_empty() && length > 0,
        }
    }

    /// The `Content-Length` the client announced: a claim, to be checked, never allocated.
    pub fn announced(&self) -> u64 {
        self.announced
    }

    /// Reads the whole body when it is announced at most `limit` bytes; refuses a larger one
    /// without reading it.
    pub fn read_to_vec(&mut self, limit: u64) -> Result<Vec<u8>, BodyError> {
        if self.announced > limit {
            return Err(BodyError::TooLarge { limit });
        }
        let mut out = Vec::with_capacity(self.announced as usize);
        self.read_to_end(&mut out).map_err(BodyError::Broken)?;
        Ok(out)
    }
}

impl Read for RequestBody<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || out.is_empty() {
            return Ok(0);
        }
        let want = out
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if self.taken < self.buffered.len() {
            let src = &self.buffered[self.taken..];
            let n = want.min(src.len());
            out[..n].copy_from_slice(&src[..n]);
            self.taken += n;
            self.remaining -= n as u64;
            return Ok(n);
        }
        if self.continue_due {
            self.continue_due = false;
            let mut stream = self.stream;
            stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut stream = self.stream;
        loop {
            return match stream.read(&mut out[..want]) {
                Ok(0) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the client closed the connection {} bytes short",
                        self.remaining
                    ),
                )),
                Ok(n) => {
                    self.remaining -= n as u64;
                    Ok(n)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped sending its body",
                    ))
                }
                Err(e) => Err(e),
            };
        }
    }
}

/// Serves one connection until the client closes it, it times out, or `stop()` says so.
/// `handle` answers each request; `busy` hears when a request starts and ends being answered.
pub fn serve_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &Config,
    handle: &Handler,
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
            if started.is_some_and(|t| t.elapsed() > config.timeout) {
                refuse(stream, peer, config, 408, "request head too slow\n");
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
                        refuse(stream, peer, config, 408, "request head too slow\n");
                    }
                    return;
                }
                Err(_) => return,
            }
        };
        let Some(head_len) = head_len else {
            // An over-long request line can only carry an over-long path: nothing routes it.
            if !buf.contains(&b'\n') {
                refuse(stream, peer, config, 404, "not found\n");
            } else {
                refuse(stream, peer, config, 431, "request head too large\n");
            }
            return;
        };
        let t0 = Instant::now();
        let (head, after) = buf[..filled].split_at(head_len);
        let req = match parse_head(head) {
            Ok(mut r) => {
                r.peer = Some(peer);
                r
            }
            Err(HeadError::Version) => {
                refuse(
                    stream,
                    peer,
                    config,
                    505,
                    "only HTTP/1.0 and HTTP/1.1 are spoken here\n",
                );
                return;
            }
            Err(HeadError::Malformed(why)) => {
                log::debug!("{peer} sent a malformed request: {why}");
                refuse(stream, peer, config, 400, "bad request\n");
                return;
            }
        };
        let length = match req.framing {
            Framing::Length(n) if config.bodies => n,
            Framing::Encoded { chunked } if config.bodies => {
                log::debug!(
                    "{peer} {} {} sent a transfer-coded body",
                    req.method_text,
                    shorten(req.target)
                );
                if chunked {
                    refuse(
                        stream,
                        peer,
                        config,
                        411,
                        "chunked request bodies are not accepted: send Content-Length\n",
                    );
                } else {
                    refuse(
                        stream,
                        peer,
                        config,
                        501,
                        "transfer codings are not supported: send Content-Length\n",
                    );
                }
                return;
            }
            _ => 0,
        };

        busy(true);
        let mut body = RequestBody::new(&stream, after, length, req.expect_continue && !req.http10);
        let resp = handle(&req, &mut body);
        let (unread, taken) = (body.remaining, body.taken);
        let status = resp.status;
        // A body left unread is not waited for: the connection ends after the answer.
        let keep_alive =
            req.keep_alive && unread == 0 && (config.bodies || !req.has_body()) && !stop();
        let result = send(
            &mut stream,
            resp,
            Delivery {
                head_only: req.method() == Method::Head,
                keep_alive,
                http10: req.http10,
                server: config.name,
            },
        );
        busy(false);
        let ms = t0.elapsed().as_millis();
        let shown = shorten(req.target);
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
            // Without bodies, one the client sent is still on its way; with them, only the
            // part the handler left.
            let on_its_way = if config.bodies {
                unread > 0
            } else {
                req.has_body()
            };
            linger_close(stream, on_its_way);
            return;
        }
        let used = head_len + taken;
        buf.copy_within(used..filled, 0);
        filled -= used;
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
fn refuse(
    mut stream: TcpStream,
    peer: SocketAddr,
    config: &Config,
    status: u16,
    body: &'static str,
) {
    log::info!("{peer} - - {status} {} 0ms", body.len());
    let how = Delivery {
        head_only: false,
        keep_alive: false,
        http10: false,
        server: config.name,
    };
    if send(&mut stream, Response::text(status, body), how).is_ok() {
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
    use std::net::TcpListener;
    use std::sync::Arc;

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost: x\r\n"), None);
    }

    /// Serves one connection on a loopback socket with `handle`; returns the client's end.
    fn connection(
        bodies: bool,
        handle: impl Fn(&Request<'_>, &mut RequestBody<'_>) -> Response + Send + Sync + 'static,
    ) -> (TcpStream, std::thread::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let (server, peer) = l.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let config = Config {
            timeout: Duration::from_millis(500),
            max_connections: 1,
            name: "test",
            bodies,
        };
        let handle: Arc<Handler> = Arc::new(handle);
        let t = std::thread::spawn(move || {
            serve_connection(server, peer, &config, &*handle, &|| false, &|_| {});
        });
        (client, t)
    }

    /// Everything the server sends until it closes.
    fn all(mut c: TcpStream) -> String {
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn echo(req: &Request<'_>, body: &mut RequestBody<'_>) -> Response {
        match body.read_to_vec(16) {
            Ok(b) => Response::text(
                200,
                format!("{} {}\n", req.target, String::from_utf8_lossy(&b)),
            ),
            Err(e) => Response::text(e.status(), e.to_string()),
        }
    }

    #[test]
    fn bodies_are_read_by_length_and_the_next_request_follows() {
        let (mut c, t) = connection(true, echo);
        c.write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\n\
              Host: x\r\nContent-Length: 3\r\n\r\nbye\
              GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let got = all(c);
        t.join().unwrap();
        let bodies: Vec<&str> = got
            .split("\r\n\r\n")
            .skip(1)
            .map(|b| b.split("HTTP/1.1").next().unwrap())
            .collect();
        assert_eq!(bodies, ["/a hello\n", "/b bye\n", "/c \n"], "{got}");
        assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 3, "{got}");
    }

    #[test]
    fn a_body_refused_unread_ends_the_connection_and_allocates_nothing() {
        let (mut c, t) = connection(true, echo);
        c.write_all(
            b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999999\r\n\r\nsome",
        )
        .unwrap();
        let got = all(c);
        t.join().unwrap();
        assert!(
            got.starts_with("HTTP/1.1 413 Content Too Large\r\n"),
            "{got}"
        );
        assert!(got.contains("\r\nConnection: close\r\n"), "{got}");
    }

    #[test]
    fn a_body_that_never_comes_times_out() {
        let (mut c, t) = connection(true, echo);
        c.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        let t0 = Instant::now();
        let got = all(c);
        t.join().unwrap();
        assert!(got.starts_with("HTTP/1.1 408 "), "{got}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn transfer_codings_are_refused_clearly() {
        for (te, want) in [("chunked", "HTTP/1.1 411 "), ("gzip", "HTTP/1.1 501 ")] {
            let (mut c, t) = connection(true, echo);
            c.write_all(
                format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            let got = all(c);
            t.join().unwrap();
            assert!(got.starts_with(want), "{te}: {got}");
            assert!(got.contains("Content-Length"), "{te}: {got}");
        }
    }

    #[test]
    fn without_bodies_the_handler_sees_none_and_the_connection_closes() {
        let (mut c, t) = connection(false, echo);
        c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap();
        let got = all(c);
        t.join().unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(
            got.contains("Connection: close\r\n") && got.ends_with("/a \n"),
            "{got}"
        );
    }

    #[test]
    fn the_go_ahead_comes_only_when_the_body_is_wanted() {
        let (mut c, t) = connection(true, echo);
        c.write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        )
        .unwrap();
        let mut first = [0u8; 25];
        c.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"ok").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let got = all(c);
        t.join().unwrap();
        assert!(
            got.starts_with("HTTP/1.1 200 OK") && got.ends_with("/a ok\n"),
            "{got}"
        );

        let (mut c, t) = connection(true, echo);
        c.write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 99\r\n\r\n",
        )
        .unwrap();
        let got = all(c);
        t.join().unwrap();
        assert!(
            got.starts_with("HTTP/1.1 413 "),
            "refused without a go-ahead: {got}"
        );
    }
}
