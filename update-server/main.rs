//! `update-server`: serves a watched directory of OPQ Box update images to the fleet, and sets
//! the staged rollouts of its releases.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use opq_update::cli::{exit_with_error, init_logging, parse_ip};
use opq_update::fleet::admin::{self, Change, Defaults};
use opq_update::fleet::rollout::parse_percent;
use opq_update::fleet::store;
use opq_update::fsutil::unix_now;
use opq_update::server::{self, Flags, Settings};

/// Serves the update images in a directory (/version, /latest, /ls, /update/<name>), following
/// the directory as images are added and removed, and keeps the fleet's view (/fleet) and
/// rollouts. Settings may also come from the environment variable BOX_UPDATE_SERVER_SETTINGS,
/// e.g. {"port": 8151, "updates_dir": "/var/opq/box-updates"}; flags win.
#[derive(Parser)]
#[command(name = "update-server", disable_version_flag = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand)]
enum Command {
    /// Offers a release to a share of the fleet, widens it, resumes it after a halt, withdraws
    /// it, or releases it to every box. Acts on the fleet's database: every update-server using
    /// it follows within a second or two. Set the rollout before publishing the image, so that
    /// no box is offered it at once.
    Rollout(RolloutArgs),
    /// Lists the rollouts and where each stands.
    Rollouts,
    /// Asks the running server for GET / on its own address and port (from the same flags and
    /// BOX_UPDATE_SERVER_SETTINGS): exit 0 when it answers healthy, 1 otherwise. For a
    /// container's HEALTHCHECK.
    Healthcheck,
}

#[derive(Args)]
#[command(group(ArgGroup::new("change").required(true).args(["percent", "resume", "withdraw", "release"])))]
struct RolloutArgs {
    /// The release's version (the number in opq-box-update-<VERSION>.tar.bz2).
    #[arg(value_name = "VERSION", value_parser = clap::value_parser!(u64).range(1..))]
    version: u64,
    /// Offer it to this share of the boxes (0 to 100, up to two decimals; 100 is everyone).
    #[arg(long, value_name = "N", value_parser = parse_percent)]
    percent: Option<u32>,
    /// Widen the share by this many percent every --every.
    #[arg(long, value_name = "N", value_parser = parse_percent, requires_all = ["percent", "every"])]
    widen_by: Option<u32>,
    /// How often the share widens: 90s, 30m, 6h, 1d.
    #[arg(long, value_name = "DURATION", value_parser = admin::parse_duration, requires = "widen_by")]
    every: Option<u64>,
    /// Halt once this many boxes of the share failed or rolled back... [default: 3, or the
    /// setting halt_failures]
    #[arg(long, value_name = "N", requires = "percent")]
    halt_after: Option<u32>,
    /// ...and they are at least this percentage of the boxes that reported on it [default: 10,
    /// or the setting halt_share].
    #[arg(long, value_name = "N", value_parser = parse_percent, requires = "percent")]
    halt_share: Option<u32>,
    /// Widen a halted rollout again from where it stopped; earlier failures no longer count.
    #[arg(long)]
    resume: bool,
    /// Offer the release to no box (those that run it keep it).
    #[arg(long)]
    withdraw: bool,
    /// Drop the rollout: the release is offered to every box, like any other.
    #[arg(long)]
    release: bool,
}

#[derive(Args)]
#[command(next_help_heading = "Server and database")]
struct Opts {
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
    /// The fleet's database: a SQLite file (PATH or sqlite:PATH), or postgres://USER:PASS@HOST/DB
    /// shared by several servers [default: DIR.fleet.sqlite beside the update directory].
    #[arg(long, global = true, value_name = "URL|PATH")]
    database: Option<String>,
    /// The operator's token for /fleet and /fleet.json (sent as Authorization: Bearer TOKEN);
    /// without one the fleet view stays closed.
    #[arg(long, global = true, value_name = "TOKEN")]
    fleet_token: Option<String>,
}

fn rollout(settings: &Settings, command: Command) -> anyhow::Result<String> {
    let mut store = store::open(&settings.fleet.database)?;
    let now = unix_now();
    let args = match command {
        Command::Rollouts => return Ok(admin::list(&store.load_rollouts()?, now)),
        Command::Rollout(args) => args,
        Command::Healthcheck => unreachable!("not a rollout command"),
    };
    let change = if args.resume {
        Change::Resume
    } else if args.withdraw {
        Change::Withdraw
    } else if args.release {
        Change::Release
    } else {
        Change::Share {
            share: args.percent.unwrap_or(0),
            step: args.widen_by.unwrap_or(0),
            every_secs: args.every.unwrap_or(0),
            halt_failures: args.halt_after,
            halt_share: args.halt_share,
        }
    };
    let defaults = Defaults {
        halt_failures: settings.halt_failures,
        halt_share: settings.halt_share,
    };
    let mut line = admin::apply(store.as_mut(), args.version, &change, defaults, now)?;
    let image = settings
        .dir
        .join(format!("opq-box-update-{}.tar.bz2", args.version));
    if !image.exists() {
        line.push_str(&format!(
            "\nnote: {} is not published yet; the rollout applies once it is",
            image.display()
        ));
    }
    Ok(line)
}

/// glibc gives each thread that allocates its own arena: with a connection thread per client,
/// the fleet's records and batches end up spread over many half-empty arenas (peak RSS 92 MiB
/// instead of 37 for 10 000 boxes in scripts/bench/fleet.sh). Two arenas are plenty for a
/// server whose threads mostly wait on sockets.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator tunable; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() {
    limit_malloc_arenas();
    init_logging();
    let cli = Cli::parse();
    let o = cli.opts;
    let flags = Flags {
        dir: o.dir,
        port: o.port,
        bind: o.bind,
        timeout_secs: o.timeout,
        public_base_url: o.public_base_url,
        database: o.database,
        fleet_token: o.fleet_token,
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
        Some(command) => rollout(&settings, command).map(|line| println!("{line}")),
    };
    if let Err(e) = result {
        exit_with_error("update-server", &e, 1);
    }
}
