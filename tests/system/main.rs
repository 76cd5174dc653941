//! The system test: the OPQ Box's story on a virtual box (Debian bookworm with systemd under
//! qemu), run by `scripts/system-test.sh`, which builds the test bed first. Each step prints its
//! time; the run ends with `N passed, N failed`.
//!
//! ```text
//! system --vm-dir DIR --guest-updater FILE [--arch x86_64|aarch64] [--artifacts DIR]
//! ```
//! (`--relay HOST PORT` is how qemu runs this program for each guest connection to the server.)

#[path = "../integration/util.rs"]
mod util;

mod bed;
mod disk;
mod story;
mod vm;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};

struct Args {
    inputs: bed::Inputs,
}

fn parse() -> Result<Args> {
    let mut arch = vm::Arch::X86_64;
    let mut vm_dir = None;
    let mut updater = None;
    let mut artifacts = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/artifacts/system"));
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--arch" => arch = vm::Arch::parse(&value()?)?,
            "--vm-dir" => vm_dir = Some(PathBuf::from(value()?)),
            "--guest-updater" => updater = Some(PathBuf::from(value()?)),
            "--artifacts" => artifacts = PathBuf::from(value()?),
            // What cargo's test runner passes along; nothing to do with it here.
            "--nocapture" | "--quiet" | "-q" => {}
            other => bail!("unknown argument {other:?}; see tests/system/main.rs"),
        }
    }
    Ok(Args {
        inputs: bed::Inputs {
            arch,
            vm_dir: vm_dir.context("--vm-dir (from tests/system/build-rootfs.sh) is required")?,
            guest_updater: updater.context("--guest-updater is required")?,
            artifacts: artifacts.join(arch.debian()),
        },
    })
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--relay") {
        let port = argv.get(3).and_then(|p| p.parse().ok()).unwrap_or(0);
        std::process::exit(if vm::relay(port).is_ok() { 0 } else { 1 });
    }
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("system: error: {e:#}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let artifacts = args.inputs.artifacts.clone();
    let mut bed = match bed::Bed::new(args.inputs) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("system: cannot set up the test bed: {e:#}");
            println!("0 passed, {} failed", story::STEPS.len() + 1);
            std::process::exit(1);
        }
    };
    let (mut passed, mut failed) = (0, 0);
    let mut broken = false;
    let total = story::STEPS.len() + 1;
    let steps = story::STEPS.iter().copied().chain(std::iter::once((
        "the data disk, checked from the host after a power cut",
        story::check_disk as fn(&mut bed::Bed) -> Result<String>,
    )));
    for (i, (title, step)) in steps.enumerate() {
        let t = Instant::now();
        if broken {
            println!(
                "[{}/{total}] {title}: not run (an earlier step failed)",
                i + 1
            );
            failed += 1;
            continue;
        }
        match step(&mut bed) {
            Ok(note) => {
                passed += 1;
                println!(
                    "[{}/{total}] {title}: passed in {:.1} s ({note})",
                    i + 1,
                    t.elapsed().as_secs_f64()
                );
            }
            Err(e) => {
                failed += 1;
                broken = true;
                println!(
                    "[{}/{total}] {title}: FAILED after {:.1} s: {e:#}",
                    i + 1,
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    bed.power_cut();
    let boots = &bed.boot_times;
    if !boots.is_empty() {
        let mean = boots.iter().sum::<f64>() / boots.len() as f64;
        let min = boots.iter().cloned().fold(f64::MAX, f64::min);
        println!(
            "{} boots: power-on to the ready line {min:.1} s at best, {mean:.1} s on average; whole story {:.1} s; console logs in {}",
            boots.len(),
            started.elapsed().as_secs_f64(),
            artifacts.display()
        );
    }
    println!("{passed} passed, {failed} failed");
    drop(bed);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
