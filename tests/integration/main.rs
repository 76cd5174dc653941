//! Integration tests: the real programs, on 127.0.0.1, in temp directories.

mod util;

mod box_updater;
mod browser;
mod build_update;
mod docker;
mod faults;
mod first_use;
mod fleet;
mod hostile_images;
mod network_faults;
mod pi;
mod scale_out;
mod server_load;
mod update_server;
mod web_api;
