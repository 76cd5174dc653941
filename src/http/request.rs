//! Request heads: the strict parser, the request a handler sees (borrowed from the connection's
//! buffer, so taking a request allocates nothing), and the paths a handler may route.

/// The largest request head (request line and headers) read; a larger one is refused.
pub const MAX_HEAD: usize = 8 * 1024;
/// The longest path that is looked at; a longer one names nothing any handler serves.
pub const MAX_PATH: usize = 512;
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

/// How a request says its body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither `Content-Length` nor `Transfer-Encoding`: no body.
    None,
    Length(u64),
    /// A `Transfer-Encoding`, which wins over any `Content-Length` (RFC 9112, 6.3). This server
    /// reads no such body; `chunked` says whether the last coding is chunked.
    Encoded {
        chunked: bool,
    },
}

/// A request head as parsed: every string points into the connection's buffer.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub method_text: &'a str,
    pub target: &'a str,
    pub http10: bool,
    /// What the client asked for; the server may still close.
    pub keep_alive: bool,
    pub framing: Framing,
    /// `Expect: 100-continue`: the client waits for a go-ahead before it sends the body.
    pub expect_continue: bool,
    /// The client's address, set by the connection that read the request (none when a head is
    /// parsed on its own).
    pub peer: Option<std::net::SocketAddr>,
    headers: [(&'a str, &'a str); MAX_HEADERS],
    count: usize,
}

impl<'a> Request<'a> {
    pub fn method(&self) -> Method {
        match self.method_text {
            "GET" => Method::Get,
            "HEAD" => Method::Head,
            "POST" => Method::Post,
            _ => Method::Other,
        }
    }

    /// The first value of header `name` (any case), trimmed.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.header_values(name).next()
    }

    /// Every value of header `name`, in order: for list headers that may be split over fields.
    pub fn header_values(&self, name: &str) -> impl Iterator<Item = &'a str> {
        self.headers[..self.count]
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, v)| v)
    }

    /// Whether a body follows the head.
    pub fn has_body(&self) -> bool {
        !matches!(self.framing, Framing::None | Framing::Length(0))
    }

    /// The query of the target, without its `?`; empty when there is none.
    pub fn query(&self) -> &'a str {
        self.target.split_once('?').map_or("", |(_, q)| q)
    }

    /// Whether the client prefers JSON to plain text (`Accept`, RFC 9110 12.5.1): plain text
    /// stays the answer when both are as welcome, or when the client accepts neither.
    pub fn wants_json(&self) -> bool {
        self.negotiate(&["text/plain", "application/json"]) == Some("application/json")
    }

    /// The media type among `offers` (in the server's order of preference) that `Accept` welcomes
    /// most: each offer gets the quality of the most specific range that matches it
    /// (`type/subtype` over `type/*` over `*/*`), `q=0` refuses it. Without `Accept`, the first
    /// offer; `None` when the client accepts none of them.
    pub fn negotiate<'o>(&self, offers: &[&'o str]) -> Option<&'o str> {
        if self.header("accept").is_none() {
            return offers.first().copied();
        }
        let mut best: Option<(&'o str, f32)> = None;
        for &offer in offers {
            let (otype, osub) = offer.split_once('/').unwrap_or((offer, ""));
            // (specificity, quality) of the best-matching range so far.
            let mut found: Option<(u8, f32)> = None;
            for range in self.header_values("accept").flat_map(|a| a.split(',')) {
                let mut parts = range.split(';');
                let media = parts.next().unwrap_or("").trim();
                let (rtype, rsub) = media.split_once('/').unwrap_or((media, ""));
                let specificity = match (rtype.trim(), rsub.trim()) {
                    ("*", "*") => 1,
                    (t, "*") if t.eq_ignore_ascii_case(otype) => 2,
                    (t, s) if t.eq_ignore_ascii_case(otype) && s.eq_ignore_ascii_case(osub) => 3,
                    _ => continue,
                };
                let q = parts
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                    .map_or(1.0, |(_, v)| v.trim().parse::<f32>().unwrap_or(1.0))
                    .clamp(0.0, 1.0);
                if found.is_none_or(|(sp, _)| specificity > sp) {
                    found = Some((specificity, q));
                }
            }
            if let Some((_, q)) = found
                && q > 0.0
                && best.is_none_or(|(_, bq)| q > bq)
            {
                best = Some((offer, q));
            }
        }
        best.map(|(o, _)| o)
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

fn has_token(list: &str, token: &str) -> bool {
    list.split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Headers that carry one value: a second one is refused rather than guessed between.
const SINGLE: [&str; 5] = [
    "range",
    "if-range",
    "if-modified-since",
    "if-unmodified-since",
    "content-type",
];

/// Whether the request line's third word is an `HTTP/<digit>.<digit>` (then an unknown version
/// is 505, not a malformed request).
fn looks_like_version(head: &[u8]) -> bool {
    let line = head
        .split(|&b| b == b'\n')
        .find(|l| !l.is_empty() && *l != b"\r")
        .unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut words = line.split(|&b| b == b' ');
    let v = match (words.next(), words.next(), words.next(), words.next()) {
        (Some(_), Some(_), Some(v), None) => v,
        _ => return false,
    };
    v.len() == 8
        && v.starts_with(b"HTTP/")
        && v[5].is_ascii_digit()
        && v[6] == b'.'
        && v[7].is_ascii_digit()
}

/// Parses a request head through its blank line. The
/// request line and header fields are tokenized by `httparse`; what HTTP/1.1 asks of a server
/// beyond that (one Host, one Content-Length, Transfer-Encoding over it, ASCII targets) is
/// checked here.
pub fn parse_head(head: &[u8]) -> Result<Request<'_>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => (),
        Ok(httparse::Status::Partial) => {
            return Err(HeadError::Malformed("the request head does not end"));
        }
        Err(httparse::Error::Version) => {
            return Err(if looks_like_version(head) {
                HeadError::Version
            } else {
                HeadError::Malformed("the request line has no HTTP version")
            });
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Malformed("too many header fields"));
        }
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            return Err(HeadError::Malformed("a header field is malformed"));
        }
        Err(_) => {
            return Err(HeadError::Malformed(
                "the request line is not `METHOD TARGET HTTP/1.x`",
            ));
        }
    }
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HeadError::Malformed(
            "the request line is not `METHOD TARGET HTTP/1.x`",
        ));
    };
    if !target.is_ascii() {
        return Err(HeadError::Malformed(
            "the request line is not printable ASCII",
        ));
    }
    let http10 = version == 0;
    let mut req = Request {
        method_text: method,
        target,
        http10,
        keep_alive: false,
        framing: Framing::None,
        expect_continue: false,
        peer: None,
        headers: [("", ""); MAX_HEADERS],
        count: 0,
    };
    let mut hosts = 0;
    let mut content_length: Option<u64> = None;
    let mut encoded: Option<bool> = None;
    for field in parsed.headers.iter() {
        let name = field.name;
        // Bytes past ASCII are legal in a value but nothing here reads them: such a value
        // becomes one that matches no token, date, range or origin.
        let value = std::str::from_utf8(field.value).map_or("\u{fffd}", str::trim);
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse::<u64>().ok())
                .flatten()
                .ok_or(HeadError::Malformed("Content-Length is not a number"))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(HeadError::Malformed("Content-Length is given twice"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value.rsplit(',').next().unwrap_or("").trim();
            encoded = Some(last.eq_ignore_ascii_case("chunked"));
        } else if name.eq_ignore_ascii_case("expect") {
            req.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if SINGLE.iter().any(|s| name.eq_ignore_ascii_case(s)) && req.header(name).is_some()
        {
            return Err(HeadError::Malformed("a header field is given twice"));
        }
        req.headers[req.count] = (name, value);
        req.count += 1;
    }
    if !http10 && hosts != 1 {
        return Err(HeadError::Malformed(
            "an HTTP/1.1 request needs exactly one Host",
        ));
    }
    req.framing = match (encoded, content_length) {
        (Some(chunked), _) => Framing::Encoded { chunked },
        (None, Some(n)) => Framing::Length(n),
        (None, None) => Framing::None,
    };
    req.keep_alive = if http10 {
        req.header_values("connection")
            .any(|c| has_token(c, "keep-alive"))
    } else {
        !req.header_values("connection")
            .any(|c| has_token(c, "close"))
    };
    Ok(req)
}
/// The path a request target names, when it is one a handler could ever answer: plain
/// unreserved characters, no empty, `.` or `..` segment, no percent-encoding left, no backslash,
/// not over-long. The query is dropped. Anything else is `None`, which is answered 404 unread.
///
/// The connection has already decoded percent-encoded unreserved characters in the target
/// (`normalize_target`), so `/update/%6fpq-…` routes as `/update/opq-…`; what such a decoding
/// makes of a path (`%2e%2e` is `..`) is checked here like anything else, and every other escape
/// (`%2F`, `%5C`, `%00`, ...) still names nothing.
pub fn route_path(target: &str) -> Option<&str> {
    let mut path = target;
    // absolute-form, as sent to proxies: `http://host/path`.
    for scheme in ["http://", "https://"] {
        // Compared as bytes: a multi-byte character may straddle the scheme's length.
        let head = &path.as_bytes()[..scheme.len().min(path.len())];
        if head.eq_ignore_ascii_case(scheme.as_bytes()) {
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

/// Decodes, in place, the percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) in the
/// path of the request target of the head at the start of `buf`: RFC 3986 (6.2.2.2) makes them
/// the same URI as the characters themselves. Returns how many bytes the head shrank by. Other
/// escapes, and the query, are left as they are.
pub fn normalize_target(buf: &mut Vec<u8>, head_len: usize) -> usize {
    let head = &buf[..head_len];
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head_len);
    let Some(start) = head[..line_end]
        .iter()
        .position(|&b| b == b' ')
        .map(|i| i + 1)
    else {
        return 0;
    };
    let len = head[start..line_end]
        .iter()
        .position(|&b| b == b' ' || b == b'?' || b == b'\r')
        .unwrap_or(line_end - start);
    let path = &head[start..start + len];
    if !path.contains(&b'%') {
        return 0;
    }
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%'
            && let (Some(h), Some(l)) = (
                path.get(i + 1).copied().and_then(hex),
                path.get(i + 2).copied().and_then(hex),
            )
        {
            let c = h << 4 | l;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                out.push(c);
                i += 3;
                continue;
            }
        }
        out.push(path[i]);
        i += 1;
    }
    let shrunk = path.len() - out.len();
    buf.splice(start..start + len, out);
    shrunk
}

#[cfg(test)]
mod tests {
    /// Found by the `http_request` fuzz target: a target with a multi-byte character where
    /// the scheme check cut the string panicked.
    #[test]
    fn route_path_survives_multibyte_targets() {
        for t in [
            "OETGe[\u{5}\u{412} /",
            "http\u{412}\u{412}",
            "https:/\u{412}x",
            "\u{412}",
        ] {
            assert_eq!(route_path(t), None, "{t:?}");
        }
        assert_eq!(route_path("HTTP://host/version"), Some("/version"));
    }

    use super::*;

    fn parse(s: &str) -> Result<Request<'_>, HeadError> {
        parse_head(s.as_bytes())
    }

    #[test]
    fn heads_parse_strictly() {
        let r = parse("GET /version HTTP/1.1\r\nHost: x\r\nRange: bytes=1-\r\n\r\n").unwrap();
        assert_eq!(
            (r.method(), r.target, r.keep_alive, r.http10),
            (Method::Get, "/version", true, false)
        );
        assert_eq!(r.header("range"), Some("bytes=1-"));
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
                .has_body()
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
    fn bodies_are_framed_by_length_or_refused_encodings() {
        let framing = |h: &str| {
            parse(&format!("POST /x HTTP/1.1\r\nHost: x\r\n{h}\r\n"))
                .unwrap()
                .framing
        };
        assert_eq!(framing(""), Framing::None);
        assert_eq!(
            framing("Content-Length: 999999999999999\r\n"),
            Framing::Length(999_999_999_999_999)
        );
        assert_eq!(
            framing("Content-Length: 3\r\nContent-Length: 3\r\n"),
            Framing::Length(3)
        );
        assert_eq!(
            framing("Transfer-Encoding: gzip, Chunked\r\nContent-Length: 3\r\n"),
            Framing::Encoded { chunked: true }
        );
        assert_eq!(
            framing("Transfer-Encoding: gzip\r\n"),
            Framing::Encoded { chunked: false }
        );
        assert!(
            matches!(
                parse("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n"),
                Err(HeadError::Malformed(_))
            ),
            "a length past u64 is malformed, not wrapped"
        );
        let r = parse("POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-Continue\r\n\r\n").unwrap();
        assert!(r.expect_continue && r.method() == Method::Post);
    }

    #[test]
    fn headers_are_found_in_any_case_and_lists_in_every_field() {
        let r = parse_head(
            b"POST /u?name=a&force=1 HTTP/1.1\r\nHost: box:8080\r\nX-Box-Token:  s3cret \r\n\
              Accept: text/html\r\naccept: application/json\r\nX-Odd: \xff\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.header("x-box-token"), Some("s3cret"));
        assert_eq!(r.header("HOST"), Some("box:8080"));
        assert_eq!(r.header("origin"), None);
        assert_eq!(r.query(), "name=a&force=1");
        assert!(r.wants_json());
        assert_eq!(r.header("x-odd"), Some("\u{fffd}"));
        assert_eq!(parse("GET / HTTP/1.0\r\n\r\n").unwrap().query(), "");
    }

    #[test]
    fn encoded_unreserved_characters_decode_and_nothing_else_does() {
        for (target, want) in [
            (
                "/update/%6fpq-box-update-1.tar.bz2",
                Some("/update/opq-box-update-1.tar.bz2"),
            ),
            ("/%76%65%72%73%69%6F%6E?x=%41", Some("/version")),
            ("/update/%7E%2D%5F%2e", Some("/update/~-_.")),
            ("/update/%2e%2e/%2e%2e/etc/passwd", None),
            ("/update/%2E%2E%2fsecret.txt", None),
            ("/update/..%2fsecret.txt", None),
            ("/update/..%5csecret.txt", None),
            ("/update/x%00", None),
            ("/update/x%2", None),
            ("/update/x%", None),
            ("/update/%%36%66", None),
            ("/update/%2F%2e%2e", None),
            ("/%2e", None),
            ("/update/%C3%A9", None),
        ] {
            let raw = format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\nnext");
            let mut buf = raw.clone().into_bytes();
            let head_len = raw.len() - 4;
            let shrunk = normalize_target(&mut buf, head_len);
            assert!(
                buf.ends_with(b"\r\n\r\nnext"),
                "{target}: the rest moves along"
            );
            let req = parse_head(&buf[..head_len - shrunk]).unwrap();
            assert_eq!(
                route_path(req.target),
                want,
                "{target} became {}",
                req.target
            );
        }
        let mut buf = b"GET /a%41?q=%41 HTTP/1.1\r\n\r\n".to_vec();
        assert_eq!(normalize_target(&mut buf, 27), 2);
        assert!(
            buf.starts_with(b"GET /aA?q=%41 HTTP/1.1"),
            "the query is left alone"
        );
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

    fn accepts(a: &str) -> bool {
        parse(&format!("GET / HTTP/1.1\r\nHost: x\r\nAccept: {a}\r\n\r\n"))
            .unwrap()
            .wants_json()
    }

    #[test]
    fn accept_json() {
        assert!(accepts("application/json"));
        assert!(accepts("text/html, Application/JSON;q=0.5"));
        assert!(!accepts("application/json;q=0"));
        assert!(!accepts("text/plain"));
        // q-values, wildcards and specificity (RFC 9110 12.5.1).
        assert!(accepts("text/plain;q=0.5, application/json"));
        assert!(!accepts("text/plain, application/json;q=0.9"));
        assert!(accepts("application/*"));
        assert!(accepts("*/*;q=0.1, application/json;q=0.2"));
        assert!(!accepts("*/*"), "equal: plain text, the default");
        assert!(!accepts(
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
        ));
        assert!(accepts("text/*;q=0.3, application/json;q=0.7"));
        assert!(
            !accepts("*/*, application/json;q=0"),
            "the specific range wins over */*"
        );
        assert!(accepts("*/*;q=0.5, text/plain;q=0"));
        assert!(
            !accepts("application/json;q=0, text/plain;q=0"),
            "neither: plain text"
        );
        assert!(accepts("application/json; charset=utf-8; q=1"));
        assert!(accepts("text/plain;q=0.001, application/json;q=0.002"));
        assert!(
            !parse("GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap()
                .wants_json()
        );
    }
}
