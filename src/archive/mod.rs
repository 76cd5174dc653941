//! Image archives: reproducible tar writing, parallel bzip2, and safe unpacking.

pub mod bunzip;
pub mod bzenc;
pub mod pbunzip;
pub mod pbzip;
pub mod unpack;
pub mod write;

/// Inputs the codec tests share.
#[cfg(test)]
pub(crate) mod testdata {
    /// Incompressible bytes, the same for the same seed (xorshift).
    pub fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }
}
