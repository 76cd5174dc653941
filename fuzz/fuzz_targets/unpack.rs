//! The safe unpacker fed arbitrary bytes as an image: never a panic, and never a write outside
//! the release directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opq_update::archive::unpack::{Limits, unpack_image};
use opq_update::image::{ImageName, Version};

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.tar.bz2");
    std::fs::write(&image, data).unwrap();
    let dest = dir.path().join("release");
    let name = ImageName(Version::new(1).unwrap());
    let limits = Limits { max_bytes: 8 << 20, max_entries: 1000 };
    let _ = unpack_image(&image, name, &dest, limits, 2, &mut |_| {});
    // Only the image and the release directory may exist beside each other.
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert!(names.len() <= 2, "{names:?}");
    for n in names {
        assert!(n == "image.tar.bz2" || n == "release", "{n:?}");
    }
});
