//! The system test: the OPQ Box's story on a virtual box (Debian bookworm with systemd under
//! qemu), run by `scripts/system-test.sh`, which builds the test bed first. Each step prints its
//! time; the run ends with `N passed, N failed`.
//!
//! ```text
//! system --vm-dir DIR --guest-updater FILE [--arch x86_64|aarch64] [--smp N] [--artifacts DIR] [--boot-only]
//! ```
//! `--boot-only` powers a fresh box on once and prints how long it took to boot. Without
//! `--vm-dir` it does nothing (it is built with the other tests, and nextest asks it for its
//! tests with `--list`: it has none). `--relay 127.0.0.1 PORT` is how qemu runs this program for
//! each guest connection to the update server.
//!
//! Modules: `vm` (a machine and its boots: qemu, console, power), `disk` (the disks from the
//! host: e2fsck, debugfs, a release's checksums), `bed` (the update server, keys, images, the
//! box's pages), `story` (the steps). See tests/system/README.md for building on them.

#[path = "../integration/util.rs"]
mod util;

mod bed;
mod disk;
mod logwrites;
mod powercut;
mod replay;
mod story;
mod vm;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};

struct Args {
    inputs: bed::Inputs,
    boot_only: bool,
    /// `--powercut N`: N power cuts instead of the story.
    powercut: Option<usize>,
    lanes: usize,
    seed: Option<u64>,
    smp_given: bool,
    /// `--replay`: one update through dm-log-writes, checked at every flush point.
    replay: bool,
    /// `--steps a,b`: power cuts aimed at these steps only.
    steps: Vec<powercut::Step>,
}

/// `None`: nothing to do here (no `--vm-dir`: a test runner's call).
fn parse() -> Result<Option<Args>> {
    let mut arch = vm::Arch::X86_64;
    let mut vm_dir = None;
    let mut updater = None;
    let mut smp = 2;
    let mut boot_only = false;
    let mut powercut = None;
    let mut lanes = 2;
    let mut seed = None;
    let mut smp_given = false;
    let mut replay = false;
    let mut steps = Vec::new();
    let mut artifacts = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/artifacts/system"));
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--arch" => arch = vm::Arch::parse(&value()?)?,
            "--vm-dir" => vm_dir = Some(PathBuf::from(value()?)),
            "--guest-updater" => updater = Some(PathBuf::from(value()?)),
            "--artifacts" => artifacts = PathBuf::from(value()?),
            "--smp" => {
                smp = value()?.parse().context("--smp needs a number")?;
                smp_given = true;
            }
            "--boot-only" => boot_only = true,
            "--powercut" => {
                powercut = Some(
                    value()?
                        .parse()
                        .context("--powercut needs a number of cuts")?,
                )
            }
            "--replay" => replay = true,
            "--steps" => {
                steps = value()?
                    .split(',')
                    .map(powercut::Step::parse)
                    .collect::<Result<_>>()?
            }
            "--lanes" => lanes = value()?.parse().context("--lanes needs a number")?,
            "--seed" => seed = Some(value()?.parse().context("--seed needs a number")?),
            // What a test runner passes (nextest's --list, cargo test's filters): no story.
            _ if vm_dir.is_none() => return Ok(None),
            other => bail!("unknown argument {other:?}; see tests/system/main.rs"),
        }
    }
    let Some(vm_dir) = vm_dir else {
        return Ok(None);
    };
    Ok(Some(Args {
        inputs: bed::Inputs {
            arch,
            vm_dir,
            guest_updater: updater.context("--guest-updater is required")?,
            artifacts: artifacts.join(arch.debian()),
            smp,
        },
        boot_only,
        powercut,
        lanes,
        seed,
        smp_given,
        replay,
        steps,
    }))
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--relay") {
        let port = argv.get(3).and_then(|p| p.parse().ok()).unwrap_or(0);
        if let Err(e) = vm::relay(port) {
            vm::relay_log(&format!("relay to 127.0.0.1:{port}: {e:#}"));
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    let args = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => {
            if !std::env::args().any(|a| a == "--list") {
                eprintln!(
                    "system: nothing to do without --vm-dir; scripts/system-test.sh runs the story"
                );
            }
            return;
        }
        Err(e) => {
            eprintln!("system: error: {e:#}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let artifacts = args.inputs.artifacts.clone();
    if args.replay {
        run_replay(&args, started);
    }
    if let Some(cuts) = args.powercut {
        run_powercut(&args, cuts, started);
    }
    let mut bed = match bed::Bed::new(args.inputs) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("system: cannot set up the test bed: {e:#}");
            println!("0 passed, {} failed", story::STEPS.len() + 1);
            std::process::exit(1);
        }
    };
    if args.boot_only {
        let current = bed.power_on();
        bed.power_cut();
        match (current, bed.boot_times.first()) {
            (Ok(_), Some(t)) => println!(
                "one boot: power-on to the ready line in {t:.1} s (load average {})",
                load_average()
            ),
            (Err(e), _) => {
                println!("the box did not boot: {e:#}");
                std::process::exit(1);
            }
            (Ok(_), None) => println!("the boot ended before the ready line"),
        }
        return;
    }
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
            "{} boots: power-on to the ready line {min:.1} s at best, {mean:.1} s on average; whole story {:.1} s (load average {}); console logs in {}",
            boots.len(),
            started.elapsed().as_secs_f64(),
            load_average(),
            artifacts.display()
        );
    }
    println!("{passed} passed, {failed} failed");
    drop(bed);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// The host's load averages (1, 5, 15 min), for the figures: emulation slows down with them.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// `--powercut N`: the cuts in lanes, their tables, `N passed, N failed`; exits.
fn run_powercut(args: &Args, cuts: usize, started: Instant) -> ! {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let lanes = args.lanes.clamp(1, cuts.max(1));
    // One virtual CPU per box unless told: a boot uses about one host core, and the lanes
    // share the host's.
    let smp = if args.smp_given { args.inputs.smp } else { 1 };
    println!(
        "powercut: {cuts} cuts in {lanes} lanes (one virtual box each, -smp {smp}), seed {seed} (--seed repeats the choices)"
    );
    let opts = powercut::Options {
        cuts,
        lanes,
        seed,
        steps: args.steps.clone(),
    };
    let i = &args.inputs;
    let make = |lane: usize| bed::Inputs {
        arch: i.arch,
        vm_dir: i.vm_dir.clone(),
        guest_updater: i.guest_updater.clone(),
        artifacts: powercut::lane_artifacts(&i.artifacts, lane),
        smp,
    };
    let (done, failures) = powercut::run(&opts, &make);
    println!("\n{}", powercut::summary(&done));
    let passed = done
        .iter()
        .filter(|c| c.error.is_none() && !c.next.starts_with("FAILED"))
        .count();
    let next_done = done
        .iter()
        .filter(|c| c.next.starts_with("completed"))
        .count();
    println!(
        "{} cuts made of {cuts}; after {next_done} of them the next update ran to its reboot and was confirmed or rolled back as it should, the others' next update was cut in turn",
        done.len()
    );
    for f in &failures {
        println!("lane failure: {f}");
    }
    println!(
        "whole run {:.1} s (load average {}); console logs in {}",
        started.elapsed().as_secs_f64(),
        load_average(),
        args.inputs.artifacts.display()
    );
    let failed = cuts.saturating_sub(passed).max(failures.len());
    println!("{passed} passed, {failed} failed");
    std::process::exit(if failed == 0 { 0 } else { 1 });
}

/// `--replay`: one update recorded through dm-log-writes, the box checked at every point.
fn run_replay(args: &Args, started: Instant) -> ! {
    let i = &args.inputs;
    let inputs = bed::Inputs {
        arch: i.arch,
        vm_dir: i.vm_dir.clone(),
        guest_updater: i.guest_updater.clone(),
        artifacts: i.artifacts.join("replay"),
        smp: if args.smp_given { i.smp } else { 1 },
    };
    let report = match replay::run(inputs) {
        Ok(r) => r,
        Err(e) => {
            println!("replay: {e:#}");
            println!("0 passed, 1 failed");
            std::process::exit(1);
        }
    };
    for n in &report.notes {
        println!("replay: {n}");
    }
    println!("\n{}", replay::summary(&report));
    let failures = replay::failures(&report);
    for f in &failures {
        println!("FAILED at {f}");
    }
    let points = report.points.len();
    let distinct = report.points.iter().filter(|p| !p.same_as_before).count();
    let failed = report.points.iter().filter(|p| p.error.is_some()).count();
    println!(
        "{points} points (flush, FUA, mark) in {} log entries; {distinct} distinct disk states checked; whole run {:.1} s (load average {})",
        report.entries,
        started.elapsed().as_secs_f64(),
        load_average()
    );
    println!("{} passed, {failed} failed", points - failed);
    std::process::exit(if failed == 0 { 0 } else { 1 });
}
