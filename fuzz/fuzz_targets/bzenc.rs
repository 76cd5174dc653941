//! Our bzip2 encoder on arbitrary bytes: never a panic, one `BZh9` stream, and our decoder (and,
//! for short inputs, libbz2) reads back exactly the input. Inputs are also repeated, to reach
//! periodic blocks and long runs.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use opq_update::archive::bunzip::Decoder;
use opq_update::archive::bzenc::compress_block;

fuzz_target!(|data: &[u8]| {
    // The first byte says how many times the rest is repeated (1 to 256).
    let Some((&times, rest)) = data.split_first() else {
        return;
    };
    let input = rest.repeat(usize::from(times) + 1);
    let stream = compress_block(&input);
    assert_eq!(&stream[..4], b"BZh9");
    let mut out = Vec::new();
    let used = Decoder::new()
        .decode_stream(&stream, &mut out, input.len())
        .expect("our decoder refuses our stream");
    assert_eq!(used, stream.len(), "the stream has trailing bytes");
    assert!(out == input, "our decoder reads other bytes than we wrote");
    if input.len() <= 1 << 16 {
        let mut theirs = Vec::new();
        bzip2::bufread::BzDecoder::new(&stream[..])
            .read_to_end(&mut theirs)
            .expect("libbz2 refuses our stream");
        assert!(theirs == input, "libbz2 reads other bytes than we wrote");
    }
});
