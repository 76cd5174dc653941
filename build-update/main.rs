//! `build-update`: packages, signs and publishes an OPQ Box update image.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use opq_update::build::{BuildOptions, build};
use opq_update::cli::{StderrProgress, exit_with_error, init_logging};
use opq_update::image::Version;

/// Packages payload directories and files into a signed, timestamp-versioned
/// opq-box-update-<VERSION>.tar.bz2 and publishes it atomically into --out.
#[derive(Parser)]
#[command(
    name = "build-update",
    disable_version_flag = true,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Directory the image and its sidecars are published into.
    #[arg(long, value_name = "DIR", default_value = ".")]
    out: PathBuf,
    /// Image version (seconds since the Unix epoch); default SOURCE_DATE_EPOCH, else now.
    #[arg(long, value_name = "N", value_parser = parse_version)]
    version: Option<Version>,
    /// Minisign secret key to sign the image with (see `build-update keygen`).
    #[arg(long, value_name = "FILE")]
    sign_key: Option<PathBuf>,
    /// install_update.sh to ship instead of the project's template.
    #[arg(long, value_name = "FILE")]
    install_script: Option<PathBuf>,
    /// Compression threads (default: every core).
    #[arg(long, value_name = "N", hide = true)]
    threads: Option<usize>,
    /// Directories or files placed in the image under their base names.
    #[arg(value_name = "PAYLOAD", required = true)]
    payloads: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Writes a new minisign key pair for signing images.
    Keygen {
        #[arg(long, value_name = "FILE")]
        secret_key: PathBuf,
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
    },
}

fn parse_version(s: &str) -> Result<Version, String> {
    s.parse()
        .map_err(|e: opq_update::image::VersionError| e.to_string())
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Keygen {
            secret_key,
            public_key,
        }) => opq_update::signing::generate_keypair(&secret_key, &public_key).map(|()| {
            eprintln!("secret key: {} (keep it private)", secret_key.display());
            eprintln!(
                "public key: {} (give it to the boxes)",
                public_key.display()
            );
        }),
        None => {
            let opts = BuildOptions {
                out: cli.out,
                version: cli.version,
                sign_key: cli.sign_key,
                install_script: cli.install_script,
                payloads: cli.payloads,
                threads: cli.threads,
            };
            build(&opts, &mut StderrProgress::new("compressing")).map(|built| {
                eprintln!(
                    "built {} ({} bytes, sha256 {}, {})",
                    built.name,
                    built.size,
                    built.sha256,
                    if built.signed { "signed" } else { "unsigned" }
                );
                println!("{}", built.image.display());
            })
        }
    };
    if let Err(e) = result {
        exit_with_error("build-update", &e, 1);
    }
}
