//! The servers' request parsing: request heads, the target's normalization, the request-path
//! check, `Accept` negotiation and `Range`: never a panic; a routed path never names anything
//! outside the served directory, before or after percent-decoding; a satisfiable range always
//! lies inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opq_update::http::conn::head_end;
use opq_update::http::file::{RangeAsk, parse_range};
use opq_update::http::request::{normalize_target, parse_head, route_path};

fn check_path(path: &str) {
    assert!(path.starts_with('/'));
    assert!(path.split('/').all(|s| s != ".." && s != "."), "{path:?}");
    assert!(!path.contains('\\') && !path.contains('%') && !path.contains("//"), "{path:?}");
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_head(data) {
        if let Some(path) = route_path(req.target) {
            check_path(path);
        }
        let _ = req.wants_json();
    }
    // As a connection does it: the head found, its target normalized in place, then parsed.
    if let Some(len) = head_end(data) {
        let mut buf = data.to_vec();
        let shrunk = normalize_target(&mut buf, len);
        assert!(shrunk <= len && buf.len() == data.len() - shrunk);
        assert_eq!(&buf[len - shrunk..], &data[len..], "what follows the head is kept");
        if let Ok(req) = parse_head(&buf[..len - shrunk]) {
            if let Some(path) = route_path(req.target) {
                check_path(path);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let size = (data.len() as u64).wrapping_mul(7919);
        if let RangeAsk::Part { start, len } = parse_range(text, size) {
            assert!(len > 0 && start.checked_add(len).is_some_and(|end| end <= size), "{text:?} {size}");
        }
        let _ = route_path(text);
    }
});
