//! The bzip2 encoder (the `opq-bzenc` crate in crates/bzenc), checked here against Debian's
//! bzip2 and lbzip2, libbz2 and our own decoder.

pub use opq_bzenc::{BLOCK_MAX, compress_block};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::testdata::noise;
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    /// `stream` through a stock decoder's standard input (`bzip2 -d`, `lbzip2 -d`).
    fn stock_decode(program: &str, stream: &[u8]) -> Vec<u8> {
        let mut child = Command::new(program)
            .args(["-d", "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        let mut stdin = child.stdin.take().unwrap();
        let input = stream.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input));
        let mut out = Vec::new();
        child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
        feeder.join().unwrap().unwrap();
        assert!(
            child.wait().unwrap().success(),
            "{program} -d refused our stream"
        );
        out
    }

    fn libbz2_decode(stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        bzip2::read::MultiBzDecoder::new(stream)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    fn bunzip_decode(stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let used = opq_bunzip::Decoder::new()
            .decode_stream(stream, &mut out, usize::MAX)
            .unwrap();
        assert_eq!(used, stream.len(), "the stream has trailing bytes");
        out
    }

    /// Our stream of `data`, decoded by libbz2 and our decoder (and, with `stock`, by Debian's
    /// bzip2 and lbzip2) back to `data`. Returns the stream.
    fn round_trip(name: &str, data: &[u8], stock: bool) -> Vec<u8> {
        let z = compress_block(data);
        assert_eq!(&z[..4], b"BZh9", "{name}");
        assert!(
            libbz2_decode(&z) == data,
            "{name}: libbz2 decodes other bytes"
        );
        assert!(
            bunzip_decode(&z) == data,
            "{name}: opq-bunzip decodes other bytes"
        );
        if stock {
            assert!(stock_decode("bzip2", &z) == data, "{name}: bzip2 -d");
            assert!(stock_decode("lbzip2", &z) == data, "{name}: lbzip2 -d");
        }
        z
    }

    /// Block headers in a stream, found at any bit offset (blocks are not byte-aligned).
    fn blocks(stream: &[u8]) -> usize {
        let mut acc = 0u64;
        let mut found = 0;
        for (i, &b) in stream.iter().enumerate() {
            for bit in (0..8).rev() {
                acc = (acc << 1 | u64::from(b >> bit & 1)) & 0xffff_ffff_ffff;
                if i >= 5 && acc == 0x3141_5926_5359 {
                    found += 1;
                }
            }
        }
        found
    }

    fn text(len: usize) -> Vec<u8> {
        let words = [
            "voltage ",
            "frequency ",
            "sag ",
            "swell ",
            "thd ",
            "box\n",
            "rms ",
        ];
        let r = noise(len, 7);
        let mut out = Vec::with_capacity(len + 16);
        let mut i = 0;
        while out.len() < len {
            out.extend_from_slice(words[r[i % len] as usize % words.len()].as_bytes());
            i += 1;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn empty_input_is_a_stream_without_blocks() {
        let z = round_trip("empty", b"", true);
        // Header, end-of-stream magic and a zero CRC: what libbz2 writes for nothing.
        let mut lib = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        lib.write_all(b"").unwrap();
        assert_eq!(z, lib.finish().unwrap());
    }

    #[test]
    fn edge_inputs_round_trip_through_every_decoder() {
        let mut cases: Vec<(String, Vec<u8>)> = vec![
            ("one byte".into(), b"x".to_vec()),
            ("zero byte".into(), vec![0]),
            ("two bytes".into(), b"ba".to_vec()),
            ("all byte values".into(), (0..=255u8).collect()),
            ("all byte values, down".into(), (0..=255u8).rev().collect()),
            ("text".into(), text(200_000)),
            ("noise".into(), noise(300_000, 3)),
            ("abab".into(), b"ab".repeat(50_000)),
            ("abcabc".into(), b"abc".repeat(33_333)),
            ("aab period".into(), b"aab".repeat(1000)),
            ("periodic noise".into(), noise(997, 5).repeat(300)),
            (
                "period of runs".into(),
                [vec![1u8; 300], vec![2u8; 7]].concat().repeat(200),
            ),
        ];
        for run in [1, 2, 3, 4, 5, 6, 254, 255, 256, 259, 260, 1000] {
            cases.push((format!("run of {run}"), vec![b'q'; run]));
            let mut framed = b"head".to_vec();
            framed.extend(std::iter::repeat_n(0u8, run));
            framed.extend_from_slice(b"tail");
            cases.push((format!("framed run of {run}"), framed));
        }
        for (name, data) in &cases {
            round_trip(name, data, true);
        }
    }

    #[test]
    fn whole_chunks_of_one_byte_and_of_runs_of_four() {
        // One byte: RLE1 leaves 5 bytes of every 255, a periodic block of one rotation class.
        let z = round_trip("one byte repeated", &vec![0xa5; 899_000], true);
        assert!(z.len() < 100, "{} bytes", z.len());
        // Runs of exactly four grow by a quarter under RLE1: the chunk needs a second block.
        let fours: Vec<u8> = (0..899_000).map(|i| (i / 4 % 7) as u8).collect();
        let z = round_trip("runs of four", &fours, true);
        assert_eq!(blocks(&z), 2);
    }

    #[test]
    fn block_boundary_sizes_split_into_blocks() {
        for len in [BLOCK_MAX - 1, BLOCK_MAX, BLOCK_MAX + 1, 2 * BLOCK_MAX + 17] {
            let data = noise(len, len as u32);
            let z = round_trip(&format!("{len} bytes of noise"), &data, true);
            assert_eq!(blocks(&z), len.div_ceil(BLOCK_MAX), "{len} bytes");
        }
    }

    #[test]
    fn size_matches_libbz2_level_9() {
        let mut data = text(600_000);
        data.extend(noise(100_000, 9));
        data.extend(b"0123456789".repeat(20_000));
        let ours = round_trip("mixed", &data, false).len();
        let mut lib = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        lib.write_all(&data).unwrap();
        let theirs = lib.finish().unwrap().len();
        assert!(
            (ours as f64) <= theirs as f64 * 1.001,
            "ours {ours} B, libbz2 {theirs} B"
        );
    }
}
