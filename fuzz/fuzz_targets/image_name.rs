//! Image names, versions and VERSION files: never a panic; whatever parses formats back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opq_update::image::{FileKind, ImageName, Version, classify};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some((image, kind)) = classify(text) {
            let back = match kind {
                FileKind::Image => image.file_name(),
                FileKind::Sha256 => image.sha256_name(),
                FileKind::Minisig => image.minisig_name(),
            };
            assert_eq!(back, text);
        }
        if let Ok(v) = text.parse::<Version>() {
            assert_eq!(v.to_string(), text);
            assert!(v.get() > 0);
        }
        if let Some(i) = ImageName::parse_top_dir(text) {
            assert_eq!(i.top_dir(), text);
        }
    }
    if let Ok(v) = Version::parse_file(data) {
        assert_eq!(Version::parse_file(v.file_contents().as_bytes()), Ok(v));
    }
});
