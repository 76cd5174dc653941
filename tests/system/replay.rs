//! Every flush point of one update: the box's data disk goes through dm-log-writes in the guest
//! (tests/system/rootfs/usr/local/sbin/opq-vm-logw, the log on a disk of its own), one whole
//! update is recorded (the guard's confirm of the running release at the first boot, the update,
//! its reboot, the confirm at the next boot, each boot on its own log disk), then the disk is
//! rebuilt on the host from its first image, entry by entry, and at every flush, FUA and mark
//! the same checks as after a power cut are made on a copy of it: e2fsck after the journal's
//! replay, `current` a complete release, the state file box-updater's status, the guard a whole
//! box-updater, and the real `box-updater status --root` over the state as it was.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, mpsc};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::bed::{Bed, BoxSpec, Inputs, Release};
use crate::logwrites::Log;
use crate::util;
use crate::{disk, powercut};

const V0: u64 = 1_950_000_000;
const V1: u64 = 1_950_000_100;

/// One point of the log where the disk's contents are defined.
#[derive(Debug, Clone)]
pub struct Point {
    /// `log1` (first boot: confirm, update, reboot) or `log2` (the next boot's confirm).
    pub log: &'static str,
    pub entry: u64,
    pub kind: &'static str,
    /// The last mark before it (box-updater's step as the guest saw its state file change).
    pub mark: String,
    /// What the state file on the rebuilt disk says (the step as persisted), `-` when none.
    pub state: String,
    pub current: u64,
    pub error: Option<String>,
    /// Same contents as the point before (no write in between): counted, not checked again.
    pub same_as_before: bool,
}

pub struct Report {
    pub entries: usize,
    pub points: Vec<Point>,
    pub notes: Vec<String>,
}

/// Records the update in the virtual box and replays it; the report lists every point.
pub fn run(inputs: Inputs) -> Result<Report> {
    let t = Instant::now();
    let mut bed = Bed::new_with(
        inputs,
        BoxSpec {
            data_mib: 256,
            extra_disks: vec![("log1", 1024), ("log2", 512)],
            extra_cmdline: "systemd.mask=box-config-daemon.service opq.data=none opq.logw=/dev/vdc"
                .into(),
        },
    )?;
    bed.install_from_host(V0, &Release::light())?;
    let base = bed.dir.join("base.img");
    disk::copy_image(&bed.data_disk(), &base)?;
    let mut notes = Vec::new();

    // The first boot, logged on vdc: the guard confirms V0, then the update to V1 and its reboot.
    bed.power_on()?;
    bed.boot()
        .wait_for(
            "opq-vm: logw on /dev/vdc",
            std::time::Duration::from_secs(5),
        )
        .or_else(|_| {
            if bed.boot().console().contains("opq-vm: logw on /dev/vdc") {
                Ok(String::new())
            } else {
                Err(anyhow::anyhow!(
                    "the data disk is not on dm-log-writes:\n{}",
                    bed.console_tail(30)
                ))
            }
        })?;
    let s = powercut::settle(&mut bed)?;
    ensure!(
        s["confirmed"] == V0,
        "the first boot did not confirm {V0}: {s}"
    );
    bed.publish(V1, &Release::light())?;
    let (code, body) = bed.page_post("/box_update", "{}")?;
    ensure!(code == 202, "Update Box: {code} {body}");
    bed.wait_reboot(std::time::Duration::from_secs(300))?;
    let after1 = bed.dir.join("after-boot-1.img");
    disk::copy_image(&bed.data_disk(), &after1)?;

    // The next boot, logged on vdd: the guard confirms V1.
    bed.machine.spec.extra_cmdline = bed
        .machine
        .spec
        .extra_cmdline
        .replace("opq.logw=/dev/vdc", "opq.logw=/dev/vdd");
    bed.power_on()?;
    let s = powercut::settle(&mut bed)?;
    ensure!(
        s["confirmed"] == V1 && s["version"] == V1,
        "the next boot did not confirm {V1}: {s}"
    );
    // Settled: the confirm is on the disk (it was synced); the cut ends the log.
    std::thread::sleep(std::time::Duration::from_secs(6));
    bed.power_cut();
    notes.push(format!(
        "recorded in {:.0} s: confirm of {V0}, update to {V1}, reboot, confirm of {V1}",
        t.elapsed().as_secs_f64()
    ));

    let logs = [
        ("log1", bed.dir.join("log1.img")),
        ("log2", bed.dir.join("log2.img")),
    ];
    let replayed = replay(&bed, &base, &logs, &after1, &mut notes)?;
    Ok(Report {
        entries: replayed.0,
        points: replayed.1,
        notes,
    })
}

struct Job {
    point: Point,
    image: PathBuf,
}

/// Rebuilds the disk from `base` through the logs, checking it at every point (two checkers in
/// parallel). The first log's end must be the disk as the first boot left it.
fn replay(
    bed: &Bed,
    base: &Path,
    logs: &[(&'static str, PathBuf)],
    after1: &Path,
    notes: &mut Vec<String>,
) -> Result<(usize, Vec<Point>)> {
    let t = Instant::now();
    let work_path = bed.dir.join("replay.img");
    disk::copy_image(base, &work_path)?;
    let work = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&work_path)?;
    let snaps = bed.dir.mkdir("points");
    let (tx, rx) = mpsc::sync_channel::<Job>(2);
    let rx = Mutex::new(rx);
    let results = Mutex::new(Vec::new());
    let updater = std::fs::read(&bed.inputs.guest_updater)?;
    let mut entries = 0;
    let mut outcome = Ok(());
    std::thread::scope(|s| {
        for w in 0..2 {
            let (rx, results, updater) = (&rx, &results, &updater);
            let scratch = bed.dir.mkdir(&format!("checker-{w}"));
            s.spawn(move || {
                loop {
                    let job = { rx.lock().unwrap().recv() };
                    let Ok(mut job) = job else { break };
                    match check_point(&job.image, &scratch, updater) {
                        Ok((state, current)) => {
                            job.point.state = state;
                            job.point.current = current;
                        }
                        Err(e) => job.point.error = Some(format!("{e:#}")),
                    }
                    let _ = std::fs::remove_file(&job.image);
                    results.lock().unwrap().push(job.point);
                }
            });
        }
        outcome = (|| -> Result<()> {
            let mut mark = String::from("(start)");
            let mut dirty = true;
            for (name, path) in logs {
                let sectors = std::fs::metadata(&work_path)?.len() / 512;
                let log = Log::open(path, sectors)?;
                entries += log.entries.len();
                notes.push(format!(
                    "{name}: {} entries ({} counted by its super block), {} flushes, {} FUA writes, {} marks",
                    log.entries.len(),
                    log.counted,
                    log.entries.iter().filter(|e| e.flags & crate::logwrites::FLUSH != 0).count(),
                    log.entries.iter().filter(|e| e.flags & crate::logwrites::FUA != 0).count(),
                    log.entries.iter().filter(|e| e.mark.is_some()).count(),
                ));
                for e in &log.entries {
                    log.apply(e, &work)?;
                    dirty |= e.writes() || e.flags & crate::logwrites::DISCARD != 0;
                    if let Some(m) = &e.mark {
                        mark = m.clone();
                    }
                    if !(e.is_flush_point() || e.mark.is_some()) {
                        continue;
                    }
                    let kind = if e.mark.is_some() {
                        "mark"
                    } else if e.flags & crate::logwrites::FUA != 0 {
                        "FUA"
                    } else {
                        "flush"
                    };
                    let point = Point {
                        log: name,
                        entry: e.index,
                        kind,
                        mark: mark.clone(),
                        state: String::new(),
                        current: 0,
                        error: None,
                        same_as_before: !dirty,
                    };
                    if !dirty {
                        results.lock().unwrap().push(point);
                        continue;
                    }
                    dirty = false;
                    work.sync_data()?;
                    let image = snaps.join(format!("{name}-{}.img", e.index));
                    disk::copy_image(&work_path, &image)?;
                    tx.send(Job { point, image })
                        .map_err(|_| anyhow::anyhow!("the checkers stopped"))?;
                }
                if *name == "log1" {
                    work.sync_data()?;
                    ensure!(
                        same_file(&work_path, after1)?,
                        "the replay of log1 is not the disk the first boot left: the replayer or the log is wrong"
                    );
                    notes.push(
                        "log1 replayed to its end is byte for byte the data disk as the first boot left it".into(),
                    );
                }
            }
            Ok(())
        })();
        drop(tx);
    });
    outcome?;
    let mut points = results.into_inner().unwrap();
    points.sort_by_key(|p| (p.log, p.entry));
    // Points not checked again take the state of the one before.
    for i in 1..points.len() {
        if points[i].same_as_before {
            let prev = points[i - 1].clone();
            points[i].state = prev.state;
            points[i].current = prev.current;
            points[i].error = prev.error;
        }
    }
    notes.push(format!(
        "replayed and checked in {:.0} s",
        t.elapsed().as_secs_f64()
    ));
    Ok((entries, points))
}

fn same_file(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// The checks at one point, on its own image: returns the state file's step and the version
/// `current` points at.
fn check_point(image: &Path, scratch: &Path, updater: &[u8]) -> Result<(String, u64)> {
    let _ = std::fs::remove_dir_all(scratch);
    std::fs::create_dir_all(scratch)?;
    let (fsck, copy) = disk::check(image, scratch)?;
    ensure!(fsck.clean, "e2fsck:\n{}", fsck.report);
    let current = disk::current_release(&copy, scratch).context("/opt/opq/current")?;
    ensure!(
        current == V0 || current == V1,
        "current -> {current}, neither {V0} nor {V1}"
    );
    powercut::check_state(&copy).context("/var/lib/box-updater/state.json")?;
    let guard = disk::cat(&copy, "/box-updater/guard/box-updater")?;
    ensure!(
        guard == updater,
        "/var/lib/box-updater/guard/box-updater is {} bytes, not the whole updater",
        guard.len()
    );
    // The real program over the state as it was: the box's view after a cut here.
    let tree = scratch.join("tree");
    std::fs::create_dir_all(tree.join("opt/opq/releases"))?;
    std::fs::create_dir_all(tree.join("var/lib"))?;
    std::os::unix::fs::symlink(
        format!("releases/opq-box-update-{current}"),
        tree.join("opt/opq/current"),
    )?;
    disk::dump(&copy, "/box-updater", &tree.join("var/lib/box-updater"))?;
    let out = Command::new(util::BOX_UPDATER)
        .args(["status", "--root"])
        .arg(&tree)
        .env("RUST_LOG", "warn")
        .output()
        .context("running box-updater status")?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && !err.contains("unreadable"),
        "box-updater status --root: {} {err}",
        out.status
    );
    let status: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "box-updater status printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    ensure!(
        status["version"] == current,
        "box-updater status says version {}, current is {current}",
        status["version"]
    );
    // The step as the state file has it (the page turns a step no process runs any more into
    // "failed: interrupted while ..."; that view is checked here too).
    let state = match std::fs::read(tree.join("var/lib/box-updater/state.json")) {
        Ok(bytes) => {
            let raw: Value = serde_json::from_slice(&bytes)?;
            let step = raw["state"].as_str().unwrap_or("?").to_string();
            let running = !matches!(
                step.as_str(),
                "idle" | "up_to_date" | "committed" | "rolled_back" | "failed" | "rebooting"
            );
            if running {
                ensure!(
                    status["state"] == "failed"
                        && status["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("interrupted while")),
                    "state.json says {step}, but box-updater status does not report the update interrupted: {status}"
                );
            }
            step
        }
        Err(_) => "-".into(),
    };
    let _ = std::fs::remove_dir_all(scratch);
    Ok((state, current))
}

/// The table of the points, by the step the state file names: checked, failed.
pub fn summary(report: &Report) -> String {
    // Grouped by log and step, in the order the steps first appear.
    // (log, step) -> (points, checked, failed)
    type Row = ((&'static str, String), (usize, usize, usize));
    let mut rows: Vec<Row> = Vec::new();
    for p in &report.points {
        let key = (p.log, p.state.clone());
        let i = match rows.iter().position(|(k, _)| *k == key) {
            Some(i) => i,
            None => {
                rows.push((key, (0, 0, 0)));
                rows.len() - 1
            }
        };
        let e = &mut rows[i].1;
        e.0 += 1;
        if !p.same_as_before {
            e.1 += 1;
        }
        if p.error.is_some() {
            e.2 += 1;
        }
    }
    let mut out = String::from(
        "| log | step in state.json | points | distinct disk states checked | failed |\n|---|---|---|---|---|\n",
    );
    for ((log, state), (n, checked, failed)) in rows {
        out.push_str(&format!(
            "| {log} | {state} | {n} | {checked} | {failed} |\n"
        ));
    }
    out
}

pub fn failures(report: &Report) -> Vec<String> {
    report
        .points
        .iter()
        .filter(|p| p.error.is_some() && !p.same_as_before)
        .map(|p| {
            format!(
                "{} entry {} ({}, after mark {}, state {}): {}",
                p.log,
                p.entry,
                p.kind,
                p.mark,
                p.state,
                p.error.as_deref().unwrap_or("")
            )
        })
        .collect()
}
