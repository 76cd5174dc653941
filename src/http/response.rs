//! Responses: what a handler returns (any status, its own headers, a body from memory or a span
//! of a file) and how it goes on the wire, files from the page cache by `sendfile`.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Write};
use std::net::TcpStream;
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

/// Writes `resp`; returns the body bytes sent.
pub fn send(stream: &mut TcpStream, resp: Response, how: Delivery) -> io::Result<u64> {
    let no_body = how.head_only || resp.status == 304;
    let mut out = Vec::with_capacity(
        320 + match &resp.body {
            Body::Bytes(b) if !no_body => b.len(),
            _ => 0,
        },
    );
    write!(out, "HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status))?;
    write!(
        out,
        "Date: {}\r\nServer: {}\r\n",
        http_date(SystemTime::now()),
        how.server
    )?;
    if resp.status != 304 {
        write!(out, "Content-Length: {}\r\n", resp.body.len())?;
    }
    for (name, value) in &resp.headers {
        write!(out, "{name}: {value}\r\n")?;
    }
    if !how.keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if how.http10 {
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
        // sendfile64: the 64-bit offset also on 32-bit ARM, where images may pass 2 GiB.
        match nix::sys::sendfile::sendfile64(stream, file, Some(&mut off), chunk) {
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
