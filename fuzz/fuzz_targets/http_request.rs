//! The servers' request parsing: request heads, the request-path check and `Range`: never a
//! panic; a routed path never names anything outside the served directory; a satisfiable range
//! always lies inside the file.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opq_update::http::file::{RangeAsk, parse_range};
use opq_update::http::request::{parse_head, route_path};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_head(data) {
        if let Some(path) = route_path(req.target) {
            assert!(path.starts_with('/'));
            assert!(!path.contains("..") || path.split('/').all(|s| s != ".."));
            assert!(!path.contains('\\') && !path.contains('%') && !path.contains("//"));
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
