//! One request off a connection's buffer: the head found and checked against its limits, the
//! body handed to the handler (already read, or read from the socket as the handler asks), and
//! the answer made ready to go out, with what becomes of the connection after it.
//!
//! Nothing here allocates by a size the client gives: the head is at most `MAX_HEAD` bytes, and a
//! body goes to the handler through a reader limited to its `Content-Length`. A body the handler
//! does not read to its end is never drained; the connection closes after the answer.

use std::borrow::Cow;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::Config;
use super::request::{Framing, HeadError, MAX_HEAD, Method, Request, normalize_target, parse_head};
use super::response::{Delivery, Outgoing, Response};

/// What answers requests: the head, and the body (empty unless the server takes bodies).
pub type Handler = dyn Fn(&Request<'_>, &mut RequestBody<'_>) -> Response + Send + Sync;

/// The largest body an event loop may read whole before its handler runs (`Handlers::Inline`;
/// `Config::inline_body` may set less); a larger one is refused (413) unread.
pub const INLINE_BODY: usize = 64 * 1024;

/// Where a request's body comes from beyond the bytes that arrived with its head.
#[derive(Clone, Copy)]
pub(crate) enum BodySource<'a> {
    /// Nowhere: the event loop read it whole before the handler ran.
    Buffered,
    /// The socket, as the handler reads; each read waits at most `timeout` (worker threads).
    Socket {
        stream: &'a mio::net::TcpStream,
        timeout: Duration,
    },
}

/// A request's body as it arrives: the bytes that came with the head first, then the socket, never
/// past `Content-Length`. Each read from the socket waits at most the connection's timeout.
pub struct RequestBody<'a> {
    source: BodySource<'a>,
    buffered: &'a [u8],
    /// How much of `buffered` has been handed out.
    taken: usize,
    announced: u64,
    remaining: u64,
    /// A `100 Continue` is owed before the first read from the socket.
    continue_due: bool,
    /// The most an event loop reads whole (`Buffered`): a longer body was left unread.
    inline_limit: u64,
}

/// Why a body could not be had.
#[derive(Debug)]
pub enum BodyError {
    /// Announced larger than the handler (or the server) takes; nothing was read.
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
    fn new(
        source: BodySource<'a>,
        after_head: &'a [u8],
        length: u64,
        expect: bool,
        inline_limit: u64,
    ) -> Self {
        let buffered = &after_head[..after_head
            .len()
            .min(usize::try_from(length).unwrap_or(usize::MAX))];
        RequestBody {
            source,
            buffered,
            taken: 0,
            announced: length,
            remaining: length,
            continue_due: expect && buffered.is_empty() && length > 0,
            inline_limit,
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
        if matches!(self.source, BodySource::Buffered)
            && self.announced > self.buffered.len() as u64
        {
            return Err(BodyError::TooLarge {
                limit: self.inline_limit,
            });
        }
        let mut out = Vec::with_capacity(self.announced as usize);
        self.read_to_end(&mut out).map_err(BodyError::Broken)?;
        Ok(out)
    }

    /// How much of what came with the head the handler took.
    fn consumed(&self) -> usize {
        self.taken
    }
}

/// Waits until `fd` is ready for `flags`, at most `timeout`; `TimedOut` (with `what`) if not.
fn wait_for(fd: &impl AsFd, flags: PollFlags, timeout: Duration, what: &str) -> io::Result<()> {
    let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
    loop {
        match poll(&mut [PollFd::new(fd.as_fd(), flags)], t) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::TimedOut, what.to_string())),
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
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
        let BodySource::Socket { stream, timeout } = self.source else {
            return Err(io::Error::other(
                "this server reads no request body that large",
            ));
        };
        if self.continue_due {
            self.continue_due = false;
            let mut go = &b"HTTP/1.1 100 Continue\r\n\r\n"[..];
            while !go.is_empty() {
                match (&mut &*stream).write(go) {
                    Ok(n) => go = &go[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_for(
                        stream,
                        PollFlags::POLLOUT,
                        timeout,
                        "the client reads nothing",
                    )?,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        loop {
            match (&mut &*stream).read(&mut out[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the client closed the connection {} bytes short",
                            self.remaining
                        ),
                    ));
                }
                Ok(n) => {
                    self.remaining -= n as u64;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_for(
                    stream,
                    PollFlags::POLLIN,
                    timeout,
                    "the client stopped sending its body",
                )?,
                Err(e) => return Err(e),
            }
        }
    }
}

/// What the connection serving a request knows of its surroundings.
pub(crate) struct Ctx<'a> {
    pub config: &'a Config,
    pub handler: &'a Handler,
    pub peer: SocketAddr,
    /// Set when the server stops: no connection is kept alive past its answer.
    pub stop: &'a std::sync::atomic::AtomicBool,
}

/// What to do after an answer has gone out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum After {
    KeepAlive,
    /// Close; `drain` when the client may still be sending (a body, the rest of a refused head),
    /// so that the close does not turn into a reset that destroys the answer in flight.
    Close {
        drain: bool,
    },
}

/// The access-log line of a request, written when its answer is out.
pub(crate) struct LogLine {
    method: String,
    target: String,
    status: u16,
    t0: Instant,
}

impl LogLine {
    pub fn write(&self, peer: SocketAddr, result: Result<u64, &io::Error>) {
        let ms = self.t0.elapsed().as_millis();
        let LogLine {
            method,
            target,
            status,
            ..
        } = self;
        match result {
            Ok(bytes) => log::info!("{peer} {method} {target} {status} {bytes} {ms}ms"),
            Err(e) => log::info!("{peer} {method} {target} {status} aborted {ms}ms: {e}"),
        }
    }
}

/// An answer ready to go out.
pub(crate) struct Answer {
    pub out: Outgoing,
    pub after: After,
    pub log: Option<LogLine>,
}

/// What became of the bytes at the start of a connection's buffer.
pub(crate) enum Step {
    /// No whole request yet: read more, letting the buffer grow to `limit` bytes; `go_ahead`
    /// when the client waits for a `100 Continue` before it sends the body.
    NeedMore {
        limit: usize,
        go_ahead: bool,
    },
    Answer(Answer),
}

/// Takes the request at the start of `buf` (leading blank lines are dropped, as RFC 9112 2.2
/// allows), answers it, and removes what it consumed from `buf`.
pub(crate) fn take_request(buf: &mut Vec<u8>, ctx: &Ctx<'_>, source: BodySource<'_>) -> Step {
    let blank = buf
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    if blank > 0 {
        buf.drain(..blank);
    }
    let Some(mut head_len) = head_end(buf) else {
        if buf.len() < MAX_HEAD {
            return Step::NeedMore {
                limit: MAX_HEAD,
                go_ahead: false,
            };
        }
        // An over-long request line can only carry an over-long path: nothing routes it.
        return Step::Answer(if !buf.contains(&b'\n') {
            refuse(ctx, 404, "not found\n")
        } else {
            refuse(ctx, 431, "request head too large\n")
        });
    };
    let t0 = Instant::now();
    head_len -= normalize_target(buf, head_len);
    let (head, after_head) = buf.split_at(head_len);
    let mut req = match parse_head(head) {
        Ok(r) => r,
        Err(HeadError::Version) => {
            return Step::Answer(refuse(
                ctx,
                505,
                "only HTTP/1.0 and HTTP/1.1 are spoken here\n",
            ));
        }
        Err(HeadError::Malformed(why)) => {
            log::debug!("{} sent a malformed request: {why}", ctx.peer);
            return Step::Answer(refuse(ctx, 400, "bad request\n"));
        }
    };
    req.peer = Some(ctx.peer);
    let bodies = ctx.config.bodies;
    let length = match req.framing {
        Framing::Length(n) if bodies => n,
        Framing::Encoded { chunked } if bodies => {
            log::debug!(
                "{} {} {} sent a transfer-coded body",
                ctx.peer,
                req.method_text,
                shorten(req.target)
            );
            return Step::Answer(if chunked {
                refuse(
                    ctx,
                    411,
                    "request bodies must come with Content-Length, not chunked\n",
                )
            } else {
                refuse(ctx, 501, "this transfer coding is not understood\n")
            });
        }
        _ => 0,
    };
    let inline_limit = ctx.config.inline_body.min(INLINE_BODY) as u64;
    if matches!(source, BodySource::Buffered)
        && length > 0
        && length <= inline_limit
        && (after_head.len() as u64) < length
    {
        // The whole body first: a handler on the event loop never waits for the client.
        return Step::NeedMore {
            limit: head_len + length as usize,
            go_ahead: req.expect_continue,
        };
    }
    let mut body = RequestBody::new(
        source,
        after_head,
        length,
        req.expect_continue,
        inline_limit,
    );
    let mut panicked = false;
    let resp = match catch_unwind(AssertUnwindSafe(|| (ctx.handler)(&req, &mut body))) {
        Ok(r) => r,
        Err(_) => {
            panicked = true;
            // A bug in a handler costs one request, never the loop or the worker.
            log::error!(
                "answering {} {} {} panicked",
                ctx.peer,
                req.method_text,
                shorten(req.target)
            );
            Response::text(500, "internal error\n")
        }
    };
    let status = resp.status;
    let taken = body.consumed();
    let unread = body.remaining;
    let keep_alive = req.keep_alive
        && unread == 0
        && (bodies || !req.has_body())
        && !panicked
        && !ctx.stop.load(std::sync::atomic::Ordering::SeqCst);
    let out = Outgoing::new(
        resp,
        Delivery {
            head_only: req.method() == Method::Head,
            keep_alive,
            http10: req.http10,
            server: ctx.config.name,
        },
    );
    let log = log::log_enabled!(log::Level::Info).then(|| LogLine {
        method: req.method_text.to_string(),
        target: shorten(req.target).into_owned(),
        status,
        t0,
    });
    // Without bodies, one the client sent is still on its way; with them, only the part the
    // handler left.
    let on_its_way = if bodies { unread > 0 } else { req.has_body() };
    let after = if keep_alive {
        After::KeepAlive
    } else {
        After::Close { drain: on_its_way }
    };
    if after == After::KeepAlive {
        buf.drain(..head_len + taken);
    } else {
        buf.clear();
    }
    Step::Answer(Answer { out, after, log })
}

/// The length of the head in `buf` (through its blank line), if it is all there.
pub fn head_end(buf: &[u8]) -> Option<usize> {
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

/// The answer to a request that can't be taken; the connection closes after it.
pub(crate) fn refuse(ctx: &Ctx<'_>, status: u16, body: &'static str) -> Answer {
    log::info!("{} - - {status} {} 0ms", ctx.peer, body.len());
    let how = Delivery {
        head_only: false,
        keep_alive: false,
        http10: false,
        server: ctx.config.name,
    };
    Answer {
        out: Outgoing::new(Response::text(status, body), how),
        after: After::Close { drain: true },
        log: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.0\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.0\r\nHost: x\r\n"), None);
    }
}
