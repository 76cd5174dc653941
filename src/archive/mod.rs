//! Image archives: reproducible tar writing, parallel bzip2, and safe unpacking.

pub mod pbzip;
pub mod write;
