//! The fast bzip2 decoder against libbz2 on arbitrary bytes: never a panic, and whatever it
//! accepts, libbz2 accepts and decodes to the same bytes.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use opq_update::archive::bunzip::{Decoder, Error};

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let ours = Decoder::new().decode_stream(data, &mut out, 16 << 20);
    let mut theirs = Vec::new();
    let lib = bzip2::bufread::BzDecoder::new(data).take(16 << 20).read_to_end(&mut theirs);
    if let Ok(used) = ours {
        assert!(lib.is_ok(), "we read what libbz2 refuses");
        assert!(out == theirs, "we read other bytes than libbz2");
        assert!(used <= data.len());
    } else if let Err(Error::Corrupt(_)) = ours {
        // A stream libbz2 reads whole (not cut by our output bound) must be ours too.
        assert!(lib.is_err() || theirs.len() >= 16 << 20, "we refuse what libbz2 reads");
    }
});
