//! `box-updater`: the OPQ Box's update daemon and its command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use opq_update::cli::{exit_with_error, init_logging, parse_listen};
use opq_update::updater::commands::{self, EXIT_FAILED};
use opq_update::updater::engine::{Engine, Settings};
use opq_update::updater::web::WebOptions;

/// Updates this OPQ Box safely: download, verify, install beside the running release, switch
/// atomically, reboot, and confirm or roll back after the reboot.
#[derive(Parser)]
#[command(name = "box-updater", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the box's update page and API (the default).
    Serve,
    /// Asks the update server for its newest version; installs nothing.
    Check,
    /// Updates to the newest image on the server.
    Update {
        /// Install even if the server's image is not newer than the installed one.
        #[arg(long)]
        force: bool,
    },
    /// Prints the updater's state as JSON.
    Status,
    /// Switches back to the previous release and reboots.
    Rollback,
    /// At boot (the guard): confirms a newly switched release, or rolls it back.
    Confirm,
}

#[derive(Args)]
struct Opts {
    /// The OPQ box's JSON config; its "updates_ep" names the update server.
    #[arg(long, global = true, value_name = "FILE")]
    box_config: Option<PathBuf>,
    /// Where the box's file system starts (a sandbox for tests and demos).
    #[arg(long, global = true, value_name = "DIR", default_value = "/")]
    root: PathBuf,
    /// Address of the web page and API.
    #[arg(
        long,
        global = true,
        value_name = "ADDR:PORT",
        default_value = "0.0.0.0:8080",
        value_parser = parse_listen
    )]
    listen: SocketAddr,
    /// Command that reboots the box (default: systemctl reboot, else the kernel's reboot).
    #[arg(long, global = true, value_name = "CMD")]
    reboot_command: Option<String>,
    /// Only install images signed by this minisign public key (the key, or a .pub file).
    #[arg(long, global = true, value_name = "KEY|FILE")]
    public_key: Option<String>,
    /// Install images that come without a .sha256 sidecar (old servers), with a warning.
    #[arg(long, global = true)]
    allow_unverified: bool,
    /// Command run after the reboot in the new release's directory; failing it rolls back.
    #[arg(long, global = true, value_name = "CMD")]
    health_check: Option<String>,
    /// Seconds a new release has after a boot to come up healthy (its units, its health check).
    #[arg(long, global = true, value_name = "SECS", default_value_t = 120)]
    health_timeout: u64,
    /// PEM file of CA certificates to trust for an https update server.
    #[arg(long, global = true, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Seconds install_update.sh may run.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 600)]
    install_timeout: u64,
    /// Boots without a confirmation before the new release is rolled back.
    #[arg(long, global = true, value_name = "N", default_value_t = 3)]
    max_boots: u32,
    /// Largest size, in MiB, an image may expand to.
    #[arg(long, global = true, value_name = "MIB", default_value_t = 4096)]
    max_expanded_mib: u64,
    /// Space, in MiB, always left free on the box's disk.
    #[arg(long, global = true, value_name = "MIB", default_value_t = 32)]
    reserve_mib: u64,
    /// Retries of a failed download before giving up.
    #[arg(long, global = true, value_name = "N", default_value_t = 5)]
    retries: u32,
    /// First delay between retries, in milliseconds (doubles each time).
    #[arg(
        long,
        global = true,
        value_name = "MS",
        default_value_t = 1000,
        hide = true
    )]
    retry_delay_ms: u64,
    /// Seconds to wait for a connection, and for each read, from the server.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    network_timeout: u64,
    /// Access token the web API requires (else the box config's "updater_token", if set).
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Seconds a web client may stay silent (idle, or within a request) before it is dropped.
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 30,
        hide = true
    )]
    web_timeout: u64,
}

fn settings(opts: &Opts) -> anyhow::Result<Settings> {
    let mut s = Settings::new(opts.root.clone());
    if let Some(c) = &opts.box_config {
        s.box_config = c.clone();
    }
    if let Some(k) = &opts.public_key {
        s.public_key = Some(Arc::new(opq_update::signing::load_public_key(k)?));
    }
    s.allow_unverified = opts.allow_unverified;
    s.reboot_command = opts.reboot_command.clone();
    s.health_check = opts.health_check.clone();
    s.health_timeout = Duration::from_secs(opts.health_timeout.max(1));
    s.http.ca_file = opts.ca_file.clone();
    s.http.connect_timeout = Duration::from_secs(opts.network_timeout.clamp(1, 3600));
    s.http.read_timeout = Duration::from_secs(opts.network_timeout.clamp(1, 3600));
    s.install_timeout = Duration::from_secs(opts.install_timeout);
    s.max_boots = opts.max_boots;
    s.max_expanded = opts.max_expanded_mib << 20;
    s.reserve = opts.reserve_mib << 20;
    s.retries = opts.retries;
    s.retry_delay = Duration::from_millis(opts.retry_delay_ms);
    Ok(s)
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let engine = match settings(&cli.opts).and_then(Engine::new) {
        Ok(e) => e,
        Err(e) => exit_with_error("box-updater", &e, commands::EXIT_USAGE),
    };
    let (code, line) = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let opts = WebOptions {
                listen: cli.opts.listen,
                token: cli.opts.token.clone(),
                timeout: Duration::from_secs(cli.opts.web_timeout.clamp(1, 3600)),
            };
            match opq_update::updater::web::serve(engine, opts) {
                Ok(()) => std::process::exit(0),
                Err(e) => exit_with_error("box-updater", &e, EXIT_FAILED),
            }
        }
        Command::Check => match commands::check(&engine) {
            Ok(v) => (0, v.to_string()),
            Err(e) => exit_with_error("box-updater", &e, EXIT_FAILED),
        },
        Command::Update { force } => commands::update(&engine, force),
        Command::Status => (0, commands::status_json(&engine).to_string()),
        Command::Rollback => commands::rollback(&engine),
        Command::Confirm => commands::confirm(&engine),
    };
    if code == 0 {
        println!("{line}");
    } else {
        eprintln!("box-updater: {line}");
    }
    std::process::exit(code);
}
