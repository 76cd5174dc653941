//! Integration tests: the real programs, on 127.0.0.1, in temp directories.

mod util;

mod build_update;
mod update_server;
