//! Image archives: reproducible tar writing, parallel bzip2, and safe unpacking.

pub mod bunzip;
pub mod bzenc;
pub mod pbunzip;
pub mod pbzip;
pub mod unpack;
pub mod write;
