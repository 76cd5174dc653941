//! SHA256SUMS and `.sha256` sidecar parsing: never a panic; parsed sums render and parse back
//! the same, and never name a path that could leave the release.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opq_update::sums::{Sha256Sums, is_plain_relative_path, parse_sidecar};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(sums) = Sha256Sums::parse(text) {
        for path in sums.entries.keys() {
            assert!(is_plain_relative_path(path), "{path:?}");
        }
        assert_eq!(Sha256Sums::parse(&sums.render()).unwrap(), sums);
    }
    if let Ok(digest) = parse_sidecar(text, "opq-box-update-1.tar.bz2") {
        assert_eq!(digest.len(), 64);
    }
});
