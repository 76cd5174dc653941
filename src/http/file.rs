//! Answers for a file: the conditional requests of RFC 9110 (13.2.2: `If-Match`,
//! `If-Unmodified-Since`, `If-None-Match`, `If-Modified-Since`, in that order), ranges and
//! `If-Range`, so that an interrupted download resumes where it stopped and a client that holds
//! a copy learns whether it is still the one served.

use std::borrow::Cow;
use std::fs::File;
use std::time::SystemTime;

use super::request::Request;
use super::response::{Body, Response, http_date};

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

/// Whether an `If-Match` list matches `etag` (strong comparison, RFC 9110 13.1.1: a weak tag
/// never matches).
pub fn strong_match(list: &str, etag: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|t| t == "*" || (!t.starts_with("W/") && t == etag.trim()))
}

/// Seconds since the epoch: HTTP dates have whole seconds.
fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The file a response is about: its size and its validators.
pub struct FileMeta {
    pub size: u64,
    pub mtime: SystemTime,
    /// A strong entity tag, quoted.
    pub etag: String,
}

/// Answers a request for a file: 304 when the client's copy is current, 206 or 416 for a range,
/// else 200. `headers` are added to every one of them.
pub fn file_response(
    req: &Request<'_>,
    file: File,
    meta: FileMeta,
    headers: Vec<(&'static str, Cow<'static, str>)>,
) -> Response {
    let FileMeta { size, mtime, etag } = meta;
    let last_modified = http_date(mtime);
    let mut resp = Response {
        status: 200,
        headers,
        body: Body::Bytes(Cow::Borrowed(b"")),
    };
    resp.headers.push(("ETag", etag.clone().into()));
    resp.headers
        .push(("Last-Modified", last_modified.clone().into()));
    resp.headers.push(("Accept-Ranges", "bytes".into()));

    // RFC 9110 13.2.2: If-Match, else If-Unmodified-Since; then If-None-Match, else
    // If-Modified-Since. An unparsable date makes its header count as absent.
    let failed = if req.header("if-match").is_some() {
        !req.header_values("if-match")
            .any(|list| strong_match(list, &etag))
    } else {
        match req
            .header("if-unmodified-since")
            .map(httpdate::parse_http_date)
        {
            Some(Ok(since)) => secs(mtime) > secs(since),
            _ => false,
        }
    };
    if failed {
        resp.status = 412;
        resp.headers.retain(|(n, _)| {
            !n.eq_ignore_ascii_case("Content-Type")
                && !n.eq_ignore_ascii_case("Content-Disposition")
        });
        resp.headers
            .push(("Content-Type", "text/plain; charset=utf-8".into()));
        resp.body = Body::Bytes(Cow::Borrowed(
            b"precondition failed: the file is not the one you named (it changed)\n",
        ));
        return resp;
    }
    let not_modified = if req.header("if-none-match").is_some() {
        req.header_values("if-none-match")
            .any(|list| none_match(list, &etag))
    } else {
        match req
            .header("if-modified-since")
            .map(httpdate::parse_http_date)
        {
            Some(Ok(since)) => secs(mtime) <= secs(since),
            _ => false,
        }
    };
    if not_modified {
        resp.status = 304;
        return resp;
    }

    // If-Range: the range only holds for the very representation the client has.
    let range_applies = match req.header("if-range") {
        None => true,
        Some(v) if v.trim_start().starts_with('"') => v.trim() == etag,
        Some(v) => v.trim() == last_modified,
    };
    let ask = match req.header("range") {
        Some(r) if range_applies => parse_range(r, size),
        _ => RangeAsk::Whole,
    };
    match ask {
        RangeAsk::Whole => {
            resp.body = Body::File {
                file,
                offset: 0,
                len: size,
            };
        }
        RangeAsk::Part { start, len } => {
            resp.status = 206;
            resp.headers.push((
                "Content-Range",
                format!("bytes {}-{}/{}", start, start + len - 1, size).into(),
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
                .push(("Content-Range", format!("bytes */{size}").into()));
            resp.headers
                .push(("Content-Type", "text/plain; charset=utf-8".into()));
            resp.body = Body::Bytes(Cow::Borrowed(b"range not satisfiable\n"));
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::request::parse_head;

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

    /// A ten-byte file with ETag `"e"`, and the answer to a GET of it with `headers`.
    struct TenBytes {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        mtime: SystemTime,
    }

    impl TenBytes {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            std::fs::write(&path, b"0123456789").unwrap();
            let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
            TenBytes {
                _dir: dir,
                path,
                mtime,
            }
        }

        fn answer(&self, headers: &str) -> Response {
            let head = format!("GET /f HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
            let req = parse_head(head.as_bytes()).unwrap();
            let meta = FileMeta {
                size: 10,
                mtime: self.mtime,
                etag: "\"e\"".into(),
            };
            let headers = vec![
                ("Content-Type", "application/x-bzip2".into()),
                ("Content-Disposition", "attachment; filename=\"f\"".into()),
            ];
            file_response(&req, File::open(&self.path).unwrap(), meta, headers)
        }
    }

    #[test]
    fn file_answers_carry_one_content_type_each() {
        let f = TenBytes::new();
        let mtime = f.mtime;
        let answer = |headers: &str| f.answer(headers);
        let types = |r: &Response| -> Vec<String> {
            r.headers
                .iter()
                .filter(|(n, _)| *n == "Content-Type")
                .map(|(_, v)| v.to_string())
                .collect()
        };
        let r = answer("Range: bytes=20-\r\n");
        assert_eq!(r.status, 416);
        assert_eq!(types(&r), ["text/plain; charset=utf-8"]);
        let r = answer("Range: bytes=2-3\r\n");
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
        let since = http_date(mtime);
        let r = answer(&format!("If-Modified-Since: {since}\r\n"));
        assert_eq!(r.status, 304);
        let r = answer(&format!(
            "If-None-Match: \"other\"\r\nIf-Modified-Since: {since}\r\n"
        ));
        assert_eq!(
            r.status, 200,
            "If-None-Match decides over If-Modified-Since"
        );
        let r = answer("If-None-Match: \"a\"\r\nIf-None-Match: W/\"e\"\r\n");
        assert_eq!(r.status, 304, "a list split over two fields");
        let r = answer("Range: bytes=2-3\r\nIf-Range: \"old\"\r\n");
        assert_eq!(r.status, 200, "a range of another representation");
    }

    #[test]
    fn preconditions_fail_with_412_in_the_order_of_rfc_9110() {
        let f = TenBytes::new();
        let mtime = f.mtime;
        let answer = |headers: &str| f.answer(headers).status;
        let now = http_date(mtime);
        let before = http_date(mtime - std::time::Duration::from_secs(60));
        for (headers, want) in [
            ("If-Match: \"e\"\r\n", 200),
            ("If-Match: \"x\", \"e\"\r\n", 200),
            ("If-Match: *\r\n", 200),
            ("If-Match: \"x\"\r\n", 412),
            ("If-Match: W/\"e\"\r\n", 412),
            ("If-Match: \"x\"\r\nIf-Match: \"e\"\r\n", 200),
            (&format!("If-Unmodified-Since: {now}\r\n"), 200),
            (&format!("If-Unmodified-Since: {before}\r\n"), 412),
            ("If-Unmodified-Since: yesterday\r\n", 200),
            // If-Match decides over If-Unmodified-Since.
            (
                &format!("If-Match: \"e\"\r\nIf-Unmodified-Since: {before}\r\n"),
                200,
            ),
            // A failed precondition comes before If-None-Match and ranges.
            ("If-Match: \"x\"\r\nIf-None-Match: \"e\"\r\n", 412),
            ("If-Match: \"x\"\r\nRange: bytes=0-1\r\n", 412),
            ("If-Match: \"e\"\r\nIf-None-Match: \"e\"\r\n", 304),
            ("If-Match: \"e\"\r\nRange: bytes=0-1\r\n", 206),
        ] {
            assert_eq!(answer(headers), want, "{headers:?}");
        }
    }

    #[test]
    fn etag_lists() {
        assert!(strong_match("\"a\", \"b\"", "\"b\""));
        assert!(!strong_match("W/\"b\"", "\"b\""));
        assert!(strong_match("*", "\"b\""));
        assert!(none_match("\"a\", \"b\"", "\"b\""));
        assert!(none_match("W/\"b\"", "\"b\""));
        assert!(none_match("*", "\"b\""));
        assert!(!none_match("\"a\"", "\"b\""));
    }
}
