//! The fast bzip2 stream decoder (the `opq-bunzip` crate in crates/bunzip), checked here against
//! libbz2.

pub use opq_bunzip::{Decoder, Error};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::testdata::noise;

    type Result<T> = std::result::Result<T, Error>;
    use std::io::{Read, Write};

    fn libbz2(data: &[u8], level: u32) -> Vec<u8> {
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(level));
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn ours(stream: &[u8]) -> Result<(Vec<u8>, usize)> {
        let mut out = Vec::new();
        let used = Decoder::new().decode_stream(stream, &mut out, usize::MAX)?;
        Ok((out, used))
    }

    /// Text, runs of every length around the run-length thresholds, noise and a few symbols.
    fn mixed(len: usize, seed: u32) -> Vec<u8> {
        let r = noise(len, seed);
        let mut out = Vec::with_capacity(len);
        let mut i = 0;
        while out.len() < len {
            match r[i % r.len()] % 4 {
                0 => out.extend(std::iter::repeat_n(
                    r[(i + 1) % r.len()],
                    (r[(i + 2) % r.len()] as usize) % 300,
                )),
                1 => out.extend_from_slice(b"voltage sag swell harmonic 60.0 Hz\n"),
                2 => out.extend_from_slice(&r[i % r.len()..(i % r.len() + 40).min(r.len())]),
                _ => out.extend(std::iter::repeat_n(b'a' + (i % 3) as u8, 4 + i % 3)),
            }
            i += 7;
        }
        out.truncate(len);
        out
    }

    #[test]
    fn decodes_what_libbz2_encodes() {
        let cases: Vec<(Vec<u8>, u32)> = vec![
            (Vec::new(), 9),
            (b"a".to_vec(), 9),
            (b"aaaa".to_vec(), 9),
            (b"aaaaa".to_vec(), 1),
            (vec![7u8; 1_000_000], 9),
            (noise(300_000, 7), 1),
            (mixed(250_000, 3), 1),
            (mixed(899_000, 5), 9),
            (noise(899_000, 11), 9),
            ((0..=255u8).cycle().take(100_001).collect(), 2),
            // Periodic blocks (their rows from the origin form a short cycle), short blocks
            // (fewer rows than the walk's start rows) and a periodic one cut mid-period.
            (b"abc".repeat(50_000), 9),
            (b"xy".repeat(7), 9),
            (b"hello world".to_vec(), 9),
            (noise(37, 5), 9),
            (noise(4_000, 9).repeat(100), 9),
            (b"power quality ".repeat(20_000)[..279_999].to_vec(), 3),
        ];
        for (data, level) in cases {
            let z = libbz2(&data, level);
            let (out, used) = ours(&z).unwrap();
            assert_eq!(used, z.len());
            assert!(out == data, "level {level}, {} bytes", data.len());
        }
    }

    #[test]
    fn stops_at_the_end_of_the_first_stream() {
        let mut z = libbz2(b"first", 9);
        let first = z.len();
        z.extend_from_slice(&libbz2(b"second", 9));
        let (out, used) = ours(&z).unwrap();
        assert_eq!((out.as_slice(), used), (&b"first"[..], first));
    }

    #[test]
    fn bounds_the_output() {
        let z = libbz2(&vec![0u8; 5 << 20], 9);
        let mut out = Vec::new();
        let err = Decoder::new()
            .decode_stream(&z, &mut out, 1 << 20)
            .unwrap_err();
        assert_eq!(err, Error::TooLarge);
    }

    #[test]
    fn damage_is_an_error_and_never_a_panic() {
        // Two blocks (level 1 cuts at 100 kB), so damage in the first leaves a second to read.
        let data = mixed(120_000, 9);
        let z = libbz2(&data, 1);
        let mut dec = Decoder::new();
        let r = noise(4000, 99);
        for k in 0..900 {
            let mut bad = z.clone();
            match k % 3 {
                0 => {
                    let at = (r[k] as usize * 131 + k * 977) % bad.len();
                    bad[at] ^= 1 << (r[k + 1] % 8);
                }
                1 => bad.truncate((r[k] as usize * 7919 + k * 31) % z.len()),
                _ => {
                    let at = 4 + (k * 37) % 60;
                    bad[at] = r[k + 2];
                }
            }
            let mut out = Vec::new();
            let ours = dec.decode_stream(&bad, &mut out, 4 << 20);
            let mut theirs = Vec::new();
            let lib = bzip2::bufread::BzDecoder::new(&bad[..]).read_to_end(&mut theirs);
            match ours {
                // A change that still decodes must decode as libbz2 decodes it.
                Ok(_) => assert!(lib.is_ok() && out == theirs, "case {k}"),
                Err(Error::Unsupported) => {}
                Err(_) => assert!(
                    lib.is_err() || theirs != data || bad == z,
                    "case {k}: we refused what libbz2 reads"
                ),
            }
        }
    }

    #[test]
    fn garbage_is_refused() {
        assert!(ours(b"").is_err());
        assert!(ours(b"BZh").is_err());
        assert!(ours(b"BZh9").is_err());
        assert!(ours(b"BZh91AY&SY").is_err());
        assert!(ours(&noise(10_000, 5)).is_err());
        let mut fake = b"BZh9".to_vec();
        fake.extend_from_slice(&noise(10_000, 6));
        assert!(ours(&fake).is_err());
    }
}
