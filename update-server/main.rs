//! `update-server`: serves a watched directory of OPQ Box update images to the fleet.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use opq_update::cli::{exit_with_error, init_logging, parse_ip};
use opq_update::server::{self, Flags, Settings};

/// Serves the update images in a directory (/version, /latest, /ls, /update/<name>), following
/// the directory as images are added and removed. Settings may also come from the environment
/// variable BOX_UPDATE_SERVER_SETTINGS, e.g. {"port": 8151, "updates_dir": "/var/opq/box-updates"};
/// flags win.
#[derive(Parser)]
#[command(name = "update-server", disable_version_flag = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory of opq-box-update-<VERSION>.tar.bz2 images and their sidecars
    /// [default: /var/opq/box-updates].
    #[arg(long, global = true, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// TCP port to listen on; 0 picks a free one [default: 8151].
    #[arg(long, global = true, value_name = "N")]
    port: Option<u16>,
    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, global = true, value_name = "ADDR", value_parser = parse_ip)]
    bind: Option<IpAddr>,
    /// Seconds a client may stay silent, or leave a download unread, before it is dropped
    /// [default: 30].
    #[arg(long, global = true, value_name = "SECS")]
    timeout: Option<u64>,
    /// Serve images from elsewhere: /latest and /update/<name> redirect to URL/<name> (a CDN, an
    /// S3-compatible store or nginx holding the same files); this server keeps the index.
    #[arg(long, global = true, value_name = "URL")]
    public_base_url: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Asks the running server for GET / on its own address and port (from the same flags and
    /// BOX_UPDATE_SERVER_SETTINGS): exit 0 when it answers healthy, 1 otherwise. For a
    /// container's HEALTHCHECK.
    Healthcheck,
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let flags = Flags {
        dir: cli.dir,
        port: cli.port,
        bind: cli.bind,
        timeout_secs: cli.timeout,
        public_base_url: cli.public_base_url,
    };
    let settings = match Settings::from_env(flags) {
        Ok(s) => s,
        Err(e) => exit_with_error("update-server", &e, 2),
    };
    let result = match cli.command {
        None => server::run(settings),
        Some(Command::Healthcheck) => {
            server::health::check(&settings, Duration::from_secs(4)).map(|line| println!("{line}"))
        }
    };
    if let Err(e) = result {
        exit_with_error("update-server", &e, 1);
    }
}
