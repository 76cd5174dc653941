//! Responses: what a handler returns (any status, its own headers, a body from memory or a span
//! of a file) and how it goes on the wire, files from the page cache by `sendfile`.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::time::SystemTime;

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
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

thread_local! {
    /// `Date` for the current second: formatted once a second per thread, not once a request.
    static NOW: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

fn date_now() -> String {
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    NOW.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.0 != secs || c.1.is_empty() {
            *c = (secs, http_date(now));
        }
        c.1.clone()
    })
}

/// How a response goes out on one connection.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    /// The answer to HEAD: the headers of the full answer, and no body.
    pub head_only: bool,
    pub keep_alive: bool,
    pub http10: bool,
    /// The `Server` header.
    pub server: &'static str,
}

/// A response on its way out: the head and a body from memory by `writev`, then a span of a file
/// by `sendfile`, each as far as the socket takes it now. Nothing here blocks: the event loop
/// calls `advance` again when the socket is writable.
pub struct Outgoing {
    head: Vec<u8>,
    bytes: Cow<'static, [u8]>,
    /// How much of `head` and then `bytes` has been written.
    pos: usize,
    file: Option<File>,
    offset: u64,
    file_left: u64,
    body_sent: u64,
    /// Whether the last `advance` wrote anything.
    moved: bool,
}

impl Outgoing {
    pub fn new(resp: Response, how: Delivery) -> Outgoing {
        let no_body = how.head_only || resp.status == 304;
        let mut head = Vec::with_capacity(256);
        // Writes into a Vec can't fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nDate: {}\r\nServer: {}\r\n",
            resp.status,
            reason(resp.status),
            date_now(),
            how.server
        );
        if resp.status != 304 {
            let _ = write!(head, "Content-Length: {}\r\n", resp.body.len());
        }
        for (name, value) in &resp.headers {
            let _ = write!(head, "{name}: {value}\r\n");
        }
        if !how.keep_alive {
            head.extend_from_slice(b"Connection: close\r\n");
        } else if how.http10 {
            head.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let mut out = Outgoing {
            head,
            bytes: Cow::Borrowed(b""),
            pos: 0,
            file: None,
            offset: 0,
            file_left: 0,
            body_sent: 0,
            moved: false,
        };
        if !no_body {
            match resp.body {
                Body::Bytes(b) => out.bytes = b,
                Body::File { file, offset, len } => {
                    out.file = Some(file);
                    out.offset = offset;
                    out.file_left = len;
                }
            }
        }
        out
    }

    /// Body bytes written so far.
    pub fn body_sent(&self) -> u64 {
        self.body_sent
    }

    /// Whether the last `advance` got anything out: a slow client that keeps taking its
    /// download is not a stalled one.
    pub fn progressed(&self) -> bool {
        self.moved
    }

    /// Writes what the socket takes now, but at most one `SENDFILE_TURN` of a file, so that one
    /// fast download does not keep a loop from its other connections (nginx's
    /// `sendfile_max_chunk`).
    pub fn advance<S>(&mut self, socket: &S) -> io::Result<Progress>
    where
        S: AsFd,
        for<'s> &'s S: Write,
    {
        let mut w = socket;
        self.moved = false;
        let total = self.head.len() + self.bytes.len();
        while self.pos < total {
            let (h, b) = if self.pos < self.head.len() {
                (&self.head[self.pos..], &self.bytes[..])
            } else {
                (&[][..], &self.bytes[self.pos - self.head.len()..])
            };
            match w.write_vectored(&[io::IoSlice::new(h), io::IoSlice::new(b)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.moved = true;
                    let body_before = self.pos.saturating_sub(self.head.len());
                    self.pos += n;
                    let body_now = self.pos.saturating_sub(self.head.len());
                    self.body_sent += (body_now - body_before) as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Progress::Full),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let Some(file) = &self.file else {
            return Ok(Progress::Done);
        };
        let mut turn = SENDFILE_TURN;
        while self.file_left > 0 {
            if turn == 0 {
                return Ok(Progress::Turn);
            }
            let mut off = i64::try_from(self.offset).map_err(|_| io::ErrorKind::InvalidInput)?;
            // A bounded step, so that one download on a fast client can't keep the loop from
            // its other connections for long.
            let chunk = self.file_left.min(turn) as usize;
            // sendfile64: the 64-bit offset also on 32-bit ARM, where images may pass 2 GiB.
            match nix::sys::sendfile::sendfile64(socket, file, Some(&mut off), chunk) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the file ended {} bytes early (changed while it was sent)",
                            self.file_left
                        ),
                    ));
                }
                Ok(n) => {
                    self.moved = true;
                    self.offset += n as u64;
                    self.file_left -= n as u64;
                    self.body_sent += n as u64;
                    turn -= n as u64;
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(Progress::Full),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(Progress::Done)
    }
}

/// How far `Outgoing::advance` got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// All of it is out.
    Done,
    /// The socket is full: wait until it is writable.
    Full,
    /// This turn's share is out: others first, then more.
    Turn,
}

/// The most of a file one connection sends before the loop turns to others.
const SENDFILE_TURN: u64 = 2 << 20;
