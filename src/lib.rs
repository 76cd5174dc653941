//! OPQ Box self-updater: the image format, the builder, the update server and the on-box updater.

pub mod archive;
pub mod build;
pub mod cli;
pub mod fleet;
pub mod fsutil;
pub mod http;
pub mod image;
pub mod server;
pub mod signing;
pub mod sums;
pub mod updater;
