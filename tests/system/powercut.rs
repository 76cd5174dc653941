//! Power cuts on the virtual box: qemu is killed (SIGKILL, the guest's page cache is lost) at
//! moments spread over every step of an update, the disks are checked from the host, the box is
//! powered on again, and it must come back on a complete release, its updater up, and take the
//! next update. Runs in lanes (one virtual box each, in parallel: a boot under emulation uses
//! about one host core), each a chain of cycles: update, cut, check, boot, check, and the next
//! update starts from there.
//!
//! A cut is aimed at a step: the harness waits for the line box-updater logs when that step
//! begins (journald forwards it to the serial console), then for a random delay within the
//! step's usual length, and kills qemu. Where the cut really landed is the last step line seen
//! on the console before the kill (a step may end before its delay does).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::bed::{Bed, BoxSpec, EXTRA_UNIT_NAME, Inputs, Release};
use crate::disk;

/// The steps a cut is aimed at, in the order an update meets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Step {
    Download,
    Verify,
    Unpack,
    Install,
    Switch,
    Reboot,
    Confirm,
    Rollback,
}

impl Step {
    pub const ALL: [Step; 8] = [
        Step::Download,
        Step::Verify,
        Step::Unpack,
        Step::Install,
        Step::Switch,
        Step::Reboot,
        Step::Confirm,
        Step::Rollback,
    ];

    /// A step by its name or the first word of it (`install`, `confirm`).
    pub fn parse(s: &str) -> Result<Step> {
        Step::ALL
            .into_iter()
            .find(|st| st.name() == s || st.name().split(' ').next() == Some(s))
            .with_context(|| {
                let names: Vec<_> = Step::ALL.iter().map(|st| st.name()).collect();
                format!("no step {s:?}; the steps are {}", names.join(", "))
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Step::Download => "download",
            Step::Verify => "verify",
            Step::Unpack => "unpack",
            Step::Install => "install script",
            Step::Switch => "switch",
            Step::Reboot => "reboot",
            Step::Confirm => "confirm at boot",
            Step::Rollback => "rollback",
        }
    }

    /// The console line that says the update begins this step: box-updater's fault point
    /// before the step, written straight to the console (`OPQ_FAULT_TRACE`, see
    /// src/updater/fault.rs). The reboot begins where the update's last step hands over to
    /// `systemctl reboot` (also the guard's retry of a release that is not healthy yet).
    fn marker(self) -> &'static str {
        match self {
            Step::Download => "opq-fault-point: before:downloading",
            Step::Verify => "opq-fault-point: before:verifying",
            Step::Unpack => "opq-fault-point: before:unpacking",
            Step::Install => "opq-fault-point: before:installing",
            Step::Switch => "opq-fault-point: before:switching",
            Step::Reboot => "opq-fault-point: before:rebooting",
            Step::Confirm => "opq-fault-point: before:confirming",
            Step::Rollback => "opq-fault-point: before:rolling_back",
        }
    }

    /// The longest delay after the marker: about the step's length on the virtual box (the
    /// reboot: the shutdown, and the next boot up to the guard's start), measured on a loaded
    /// host; a longer one lands in the next step more often (the table says where each landed).
    fn max_delay(self) -> Duration {
        Duration::from_millis(match self {
            Step::Download => 1500,
            Step::Verify => 200,
            Step::Unpack => 3500,
            Step::Install => 1500,
            Step::Switch => 80,
            Step::Reboot => 20000,
            Step::Confirm => 8000,
            Step::Rollback => 4000,
        })
    }
}

/// Cuts per step in every 40, interleaved so that both lanes get every kind: the cheap ones
/// (before the reboot: the next boot is the only cost) more often than those that need a
/// reboot, or two boots on a bad release, first.
const PATTERN: [Step; 40] = {
    use Step::*;
    [
        Download, Unpack, Reboot, Install, Switch, Confirm, Verify, Rollback, Download, Unpack,
        Install, Reboot, Switch, Download, Confirm, Unpack, Verify, Install, Reboot, Switch,
        Rollback, Download, Unpack, Install, Confirm, Verify, Switch, Reboot, Download, Unpack,
        Install, Rollback, Verify, Switch, Reboot, Download, Unpack, Confirm, Install, Switch,
    ]
};

/// What happened at one cut and after it.
#[derive(Debug, Clone)]
pub struct Cut {
    pub n: usize,
    pub lane: usize,
    pub planned: Step,
    /// Where the cut landed: the last step line on the console before the kill.
    pub landed: Step,
    pub delay_ms: u64,
    pub from: u64,
    pub to: u64,
    /// The box after it: `old release, update reported interrupted`, `new release, confirmed`,
    /// `old release, rolled back`.
    pub outcome: String,
    pub error: Option<String>,
    /// What the next update in this lane did: ran to its reboot and was confirmed (or rolled
    /// back, for a bad release), or was cut in turn.
    pub next: String,
    pub seconds: f64,
}

pub struct Options {
    pub cuts: usize,
    pub lanes: usize,
    pub seed: u64,
    /// Only these steps (`--steps`, to chase one kind of cut), in PATTERN's order; all if empty.
    pub steps: Vec<Step>,
}

/// A small deterministic random source (xorshift64*), seeded per lane: a run can be repeated
/// with `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

const V0: u64 = 1_900_000_000;
/// A box that settles (boots, confirms or rolls back, its page answering) within this.
const SETTLE: Duration = Duration::from_secs(300);
const MARKER: Duration = Duration::from_secs(240);

/// Runs the power cuts: `make_inputs(lane)` gives each lane its inputs. Prints each cut as it
/// is checked, then the tables; returns the cuts (each passed or not) and the lanes' own
/// failures (set-up, the final update).
pub fn run(opts: &Options, make_inputs: &dyn Fn(usize) -> Inputs) -> (Vec<Cut>, Vec<String>) {
    let pattern: Vec<Step> = PATTERN
        .into_iter()
        .filter(|st| opts.steps.is_empty() || opts.steps.contains(st))
        .collect();
    let plans: Vec<(usize, Step)> = (0..opts.cuts)
        .map(|i| (i + 1, pattern[i % pattern.len()]))
        .collect();
    let cuts = Mutex::new(Vec::new());
    let failures = Mutex::new(Vec::new());
    let boots = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|s| {
        for lane in 0..opts.lanes {
            let mine: Vec<(usize, Step)> = plans
                .iter()
                .copied()
                .filter(|(n, _)| (n - 1) % opts.lanes == lane)
                .collect();
            let inputs = make_inputs(lane);
            let (cuts, failures, boots) = (&cuts, &failures, &boots);
            let seed = opts.seed ^ (lane as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            s.spawn(move || {
                if let Err(e) = Lane::run(lane + 1, inputs, &mine, seed, cuts, boots, started) {
                    let msg = format!("lane {}: {e:#}", lane + 1);
                    println!("powercut: {msg}");
                    failures.lock().unwrap().push(msg);
                }
            });
        }
    });
    let mut cuts = cuts.into_inner().unwrap();
    cuts.sort_by_key(|c| c.n);
    let boots = boots.into_inner().unwrap();
    if !boots.is_empty() {
        let mean = boots.iter().sum::<f64>() / boots.len() as f64;
        let min = boots.iter().cloned().fold(f64::MAX, f64::min);
        println!(
            "{} boots reached their ready line: power-on to ready {min:.1} s at best, {mean:.1} s on average",
            boots.len()
        );
    }
    (cuts, failures.into_inner().unwrap())
}

struct Lane<'a> {
    id: usize,
    bed: Bed,
    rng: Rng,
    /// The release the box runs, confirmed.
    running: u64,
    next_version: u64,
    cuts: &'a Mutex<Vec<Cut>>,
    started: Instant,
    /// The previous cut of this lane, waiting to hear what the next update did.
    last: Option<Cut>,
}

impl<'a> Lane<'a> {
    fn run(
        id: usize,
        inputs: Inputs,
        plans: &[(usize, Step)],
        seed: u64,
        cuts: &'a Mutex<Vec<Cut>>,
        boots: &Mutex<Vec<f64>>,
        started: Instant,
    ) -> Result<()> {
        let mut bed = Bed::new_with(
            inputs,
            BoxSpec {
                data_mib: 256,
                extra_disks: Vec::new(),
                // The old page (python) has no part in an update; its start costs seconds of
                // emulated CPU at every boot.
                extra_cmdline: "systemd.mask=box-config-daemon.service".into(),
            },
        )?;
        bed.install_from_host(V0, &Release::light())
            .context("installing the first release from the host")?;
        let mut lane = Lane {
            id,
            bed,
            rng: Rng(seed | 1),
            running: V0,
            next_version: V0 + 100,
            cuts,
            started,
            last: None,
        };
        let result = lane.chain(plans);
        boots
            .lock()
            .unwrap()
            .extend(lane.bed.boot_times.iter().copied());
        result
    }

    fn chain(&mut self, plans: &[(usize, Step)]) -> Result<()> {
        let lane = self;
        lane.bed.power_on()?;
        let s = lane.settle().context("the first boot")?;
        ensure!(
            s["confirmed"] == V0 && s["version"] == V0,
            "the first boot did not confirm {V0}: {s}"
        );
        for &(n, step) in plans {
            let t = Instant::now();
            let mut cut = lane.cycle(n, step);
            cut.seconds = t.elapsed().as_secs_f64();
            let failed = cut.error.is_some();
            lane.report_next(&cut);
            lane.last = Some(cut);
            if failed {
                // The box is in an unknown state: this lane stops here.
                lane.flush();
                bail!("stopped after cut {n} failed");
            }
        }
        // The last word: one update from where the last cut left the box, not cut, confirmed.
        let result = lane.full_update();
        if let Some(last) = lane.last.as_mut() {
            last.next = match &result {
                Ok(()) => "completed: confirmed (the lane's final update)".into(),
                Err(e) => format!("FAILED: {e:#}"),
            };
        }
        lane.flush();
        result.context("the final update, after the last cut")?;
        lane.bed.power_cut();
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(c) = self.last.take() {
            print_cut(&c, self.started);
            self.cuts.lock().unwrap().push(c);
        }
    }

    /// The previous cut learns what this cycle's update did, and is printed.
    fn report_next(&mut self, this: &Cut) {
        if let Some(mut prev) = self.last.take() {
            prev.next = if this.error.is_some() && this.landed == this.planned {
                format!("FAILED at cut {}", this.n)
            } else if this.landed >= Step::Reboot {
                format!(
                    "completed: ran to its reboot, then {} (cut {} came after)",
                    this.outcome, this.n
                )
            } else {
                format!("cut in turn while {} (cut {})", this.landed.name(), this.n)
            };
            print_cut(&prev, self.started);
            self.cuts.lock().unwrap().push(prev);
        }
    }

    /// One cycle: an update to a new release (a bad one for a rollback), cut at `step`, then the
    /// checks: the cut, with its error if it failed.
    fn cycle(&mut self, n: usize, step: Step) -> Cut {
        let to = self.next_version;
        self.next_version += 100;
        let mut cut = Cut {
            n,
            lane: self.id,
            planned: step,
            landed: step,
            delay_ms: 0,
            from: self.running,
            to,
            outcome: String::new(),
            error: None,
            next: String::new(),
            seconds: 0.0,
        };
        let bad = step == Step::Rollback;
        if let Err(e) = self.cut(&mut cut, bad) {
            cut.error = Some(format!("{:#}", e.context("before the cut")));
            return cut;
        }
        match self.after_cut(&cut, bad) {
            Ok(outcome) => cut.outcome = outcome,
            Err(e) => cut.error = Some(format!("{e:#}")),
        }
        cut
    }

    fn release(bad: bool) -> Release {
        if bad {
            // Its service exits at once: not healthy at two boots, then rolled back. Its own
            // unit must be gone after (checked on the system disk at the next cut).
            Release {
                failing_service: true,
                extra_unit: true,
                ..Release::light()
            }
        } else {
            Release::light()
        }
    }

    /// Starts the update to `cut.to`, follows it to the planned step, waits the random delay
    /// and cuts the power.
    fn cut(&mut self, cut: &mut Cut, bad: bool) -> Result<()> {
        self.bed.publish(cut.to, &Self::release(bad))?;
        let mut watch = Watch::new(&mut self.bed);
        let (code, body) = self.bed.page_post("/box_update", "{}")?;
        ensure!(code == 202, "Update Box: {code} {body}");
        watch.follow(&mut self.bed, cut.planned)?;
        let delay = Duration::from_millis(
            self.rng
                .below(cut.planned.max_delay().as_millis() as u64 + 1),
        );
        cut.delay_ms = delay.as_millis() as u64;
        watch.sleep(&mut self.bed, delay)?;
        self.bed.power_cut();
        cut.landed = watch.step;
        Ok(())
    }

    /// The checks after a cut: the disks from the host, then the box powered on until it
    /// settles, its page, its state, the release it runs. Returns the outcome.
    fn after_cut(&mut self, cut: &Cut, bad: bool) -> Result<String> {
        // The disks are checked on copies taken before the power comes back, while the box
        // boots: the same checks, without waiting for them.
        let disks = Disks::copy(&self.bed, cut.n)?;
        let allowed = [cut.from, cut.to];
        let checks = std::thread::spawn(move || {
            let r = host_checks(&disks, &allowed, !bad);
            disks.remove();
            r
        });
        let booted = self.bed.power_on().context("powering on after the cut");
        let on_disk = checks
            .join()
            .map_err(|_| anyhow::anyhow!("the disk checks panicked"))?
            .context("the disks after the cut")?;
        booted?;
        let s = self.settle()?;
        let version = s["version"].as_u64().context("the page names no version")?;
        ensure!(
            version == cut.from || version == cut.to,
            "the box runs {version}, neither {} nor {}",
            cut.from,
            cut.to
        );
        let last = &s["last_result"];
        let (result, last_to) = (
            last["result"].as_str().unwrap_or(""),
            last["to"].as_u64().unwrap_or(0),
        );
        let state = s["state"].as_str().unwrap_or("");
        let message = s["message"].as_str().unwrap_or("");
        let outcome = if version == cut.to {
            ensure!(
                s["confirmed"] == cut.to && result == "committed" && last_to == cut.to && !bad,
                "on the new release {}, but not confirmed: {s}",
                cut.to
            );
            "new release, confirmed"
        } else if (state == "failed" && message.starts_with("interrupted while"))
            || (result == "failed"
                && last_to == cut.to
                && last["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("did not complete"))
        {
            "old release, update reported interrupted"
        } else if result == "rolled_back" && last_to == cut.from && last["from"] == cut.to {
            "old release, rolled back"
        } else {
            bail!(
                "on the old release {}, but the page does not say why: {s}",
                cut.from
            );
        };
        ensure!(
            s["confirmed"] == version,
            "runs {version} but {} is the confirmed release: {s}",
            s["confirmed"]
        );
        let (sample, _) = self.bed.sample(Duration::from_secs(60))?;
        ensure!(
            sample == version.to_string(),
            "the page says {version}, the release's service says {sample}"
        );
        if bad && version == cut.to {
            bail!("the bad release {} was confirmed", cut.to);
        }
        self.running = version;
        Ok(format!("{outcome} (current on disk at the cut: {on_disk})"))
    }

    fn settle(&mut self) -> Result<Value> {
        settle(&mut self.bed)
    }

    /// One update that is not cut: installed, rebooted, confirmed.
    fn full_update(&mut self) -> Result<()> {
        let to = self.next_version;
        self.next_version += 100;
        self.bed.publish(to, &Release::light())?;
        let (code, body) = self.bed.page_post("/box_update", "{}")?;
        ensure!(code == 202, "Update Box: {code} {body}");
        self.bed.wait_reboot(Duration::from_secs(300))?;
        self.bed.power_on()?;
        let s = self.settle()?;
        ensure!(
            s["version"] == to && s["confirmed"] == to && s["last_result"]["result"] == "committed",
            "the final update to {to}: {s}"
        );
        self.bed.power_cut();
        let disks = Disks::copy(&self.bed, 0)?;
        let v = host_checks(&disks, &[to], true);
        disks.remove();
        let v = v?;
        ensure!(v == to, "current is {v} on the disk after the final update");
        self.running = to;
        Ok(())
    }
}

/// What systemd prints first when a shutdown or reboot begins.
const SHUTDOWN: &str = "Stopped target multi-user.target";
/// How long a settled status must hold; the guard's reboot stops the page within about a second.
const STEADY: Duration = Duration::from_millis(1500);

/// Waits until the box has settled: its page answers, no update runs, nothing waits for a
/// confirmation (the guard is done), powering it on again when it reboots by itself (the
/// guard's retry or rollback). Returns the page's status.
pub fn settle(bed: &mut Bed) -> Result<Value> {
    let deadline = Instant::now() + SETTLE;
    let mut boots = 0;
    let mut last = Value::Null;
    // The guard that finishes an interrupted rollback writes its final state, then reboots: a
    // status read in between looks settled. Settled means the same on two reads STEADY apart
    // with no shutdown begun on the console in this boot.
    let mut since: Option<Instant> = None;
    loop {
        if !bed.boot().running() {
            since = None;
            boots += 1;
            ensure!(
                boots <= 4,
                "the box rebooted {boots} times on its own: {last}"
            );
            bed.power_on()?;
            continue;
        }
        if let Ok(s) = bed.status() {
            // A rollback a cut interrupted is still recorded until the guard has finished it
            // (and rebooted): not settled before that.
            if s["running"] == false
                && s["pending"].is_null()
                && s["rolling_back"].is_null()
                && s["state"] != "confirming"
                && !bed.boot().console().contains(SHUTDOWN)
            {
                match since {
                    Some(t) if t.elapsed() >= STEADY => return Ok(s),
                    Some(_) => {}
                    None => since = Some(Instant::now()),
                }
            } else {
                since = None;
            }
            last = s;
        } else {
            since = None;
        }
        if Instant::now() >= deadline {
            bail!(
                "the box did not settle within {} s; last status {last}\n{}",
                SETTLE.as_secs(),
                bed.console_tail(30)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Follows the console of the box through an update: the step it is at, by the step lines seen
/// so far, across the reboots.
struct Watch {
    step: Step,
}

impl Watch {
    /// Lines already on the console (the last update's confirm) are no part of this one.
    fn new(bed: &mut Bed) -> Watch {
        bed.boot().new_lines();
        Watch {
            step: Step::Download,
        }
    }

    fn see(&mut self, line: &str) -> bool {
        for s in Step::ALL {
            if line.contains(s.marker()) {
                self.step = s;
                return true;
            }
        }
        false
    }

    /// Powers the box on again after it went down by itself (a reboot of the update): the cut
    /// then lands in the boot, before the guard (the reboot step) unless a later line says so.
    fn next_boot(&mut self, bed: &mut Bed) -> Result<()> {
        ensure!(
            self.step >= Step::Reboot,
            "the box went down while {} (before the reboot):\n{}",
            self.step.name(),
            bed.console_tail(20)
        );
        if self.step < Step::Reboot {
            self.step = Step::Reboot;
        }
        let boot = bed.machine.boot()?;
        bed.boot = Some(boot);
        Ok(())
    }

    /// Waits for the line that begins `target`.
    fn follow(&mut self, bed: &mut Bed, target: Step) -> Result<()> {
        let deadline = Instant::now() + MARKER;
        loop {
            let down = !bed.boot().running();
            for line in bed.boot().new_lines() {
                self.see(&line);
                if line.contains(target.marker()) {
                    return Ok(());
                }
            }
            if down {
                self.next_boot(bed)?;
            }
            ensure!(
                Instant::now() < deadline,
                "no console line {:?} within {} s (at {}):\n{}",
                target.marker(),
                MARKER.as_secs(),
                self.step.name(),
                bed.console_tail(20)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sleeps `d` watching the console; a reboot on the way powers the box on again.
    fn sleep(&mut self, bed: &mut Bed, d: Duration) -> Result<()> {
        let end = Instant::now() + d;
        while Instant::now() < end {
            let down = !bed.boot().running();
            for line in bed.boot().new_lines() {
                self.see(&line);
            }
            if down {
                self.next_boot(bed)?;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for line in bed.boot().new_lines() {
            self.see(&line);
        }
        Ok(())
    }
}

/// The disks of a box that is down, from the host: both file systems clean after their journals
/// replay; on the data disk `current` a complete release (one of `allowed`), `state.json` a
/// status box-updater reads, the guard a complete copy of the box's updater; on the system disk
/// the units of the box non-empty, and (when `no_extra`) no unit of a rolled-back release.
/// Returns the version `current` points at.
pub fn host_checks(disks: &Disks, allowed: &[u64], no_extra: bool) -> Result<u64> {
    let scratch = disks.dir.join("work");
    std::fs::create_dir_all(&scratch)?;
    let (fsck, copy) = disk::check(&disks.data, &scratch)?;
    ensure!(fsck.clean, "e2fsck of the data disk:\n{}", fsck.report);
    let version = disk::current_release(&copy, &scratch)?;
    ensure!(
        allowed.contains(&version),
        "current -> {version}, not one of {allowed:?}"
    );
    check_state(&copy)?;
    let guard = disk::cat(&copy, "/box-updater/guard/box-updater")?;
    let good = std::fs::read(&disks.updater)?;
    ensure!(
        guard == good,
        "the guard is not a complete box-updater ({} of {} bytes)",
        guard.len(),
        good.len()
    );
    let (sys_fsck, sys) = disk::check(&disks.system, &scratch)?;
    ensure!(
        sys_fsck.clean,
        "e2fsck of the system disk:\n{}",
        sys_fsck.report
    );
    for unit in [
        "box-updater.service",
        "box-updater-guard.service",
        "opq-sample.service",
    ] {
        let text = disk::cat(&sys, &format!("/etc/systemd/system/{unit}"))?;
        ensure!(
            text.starts_with(b"#") || text.starts_with(b"[Unit]"),
            "/etc/systemd/system/{unit} on the system disk is {} bytes, not a unit: {:?}",
            text.len(),
            String::from_utf8_lossy(&text[..text.len().min(80)])
        );
    }
    if no_extra {
        let units = disk::ls(&sys, "/etc/systemd/system")?;
        let wants = disk::ls(&sys, "/etc/systemd/system/multi-user.target.wants")?;
        ensure!(
            !units.iter().chain(&wants).any(|u| u == EXTRA_UNIT_NAME),
            "{EXTRA_UNIT_NAME} of a rolled-back release is still installed"
        );
    }
    Ok(version)
}

/// Copies of a powered-off box's disks, for `host_checks`.
pub struct Disks {
    dir: PathBuf,
    data: PathBuf,
    system: PathBuf,
    /// The box-updater every release of the run carries (the guard must be it).
    updater: PathBuf,
}

impl Disks {
    pub fn copy(bed: &Bed, n: usize) -> Result<Disks> {
        let dir = bed.dir.join(format!("check-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let (data, system) = (dir.join("data.img"), dir.join("root.img"));
        disk::copy_image(&bed.data_disk(), &data)?;
        disk::copy_image(&bed.system_disk(), &system)?;
        Ok(Disks {
            dir,
            data,
            system,
            updater: bed.inputs.guest_updater.clone(),
        })
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `state.json` on a data disk image, if there is one, parses as box-updater's status.
pub fn check_state(image: &std::path::Path) -> Result<()> {
    let names = disk::ls(image, "/box-updater")?;
    if !names.iter().any(|n| n == "state.json") {
        return Ok(());
    }
    let bytes = disk::cat(image, "/box-updater/state.json")?;
    serde_json::from_slice::<opq_update::updater::status::Status>(&bytes).with_context(|| {
        format!(
            "state.json ({} bytes) is not box-updater's status: {:?}",
            bytes.len(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })?;
    Ok(())
}

fn print_cut(c: &Cut, started: Instant) {
    let verdict = match &c.error {
        None => "passed".to_string(),
        Some(e) => format!("FAILED: {e}"),
    };
    println!(
        "cut {:>3} (lane {}, {:>6.0} s): aimed at {}, landed in {} ({} ms after its line), {} -> {}: {}; {}; next update: {} [{:.0} s]",
        c.n,
        c.lane,
        started.elapsed().as_secs_f64(),
        c.planned.name(),
        c.landed.name(),
        c.delay_ms,
        c.from,
        c.to,
        if c.outcome.is_empty() {
            "-"
        } else {
            &c.outcome
        },
        verdict,
        if c.next.is_empty() { "-" } else { &c.next },
        c.seconds
    );
}

/// The tables: cuts per step (where they landed) with their outcomes.
pub fn summary(cuts: &[Cut]) -> String {
    let mut by_step: BTreeMap<Step, BTreeMap<String, usize>> = BTreeMap::new();
    for c in cuts {
        let outcome = match &c.error {
            Some(_) => "FAILED".to_string(),
            None => c.outcome.split(" (").next().unwrap_or("").to_string(),
        };
        *by_step
            .entry(c.landed)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }
    let mut out = String::from("| step at the cut | cuts | outcomes |\n|---|---|---|\n");
    for step in Step::ALL {
        let Some(o) = by_step.get(&step) else {
            out.push_str(&format!("| {} | 0 | |\n", step.name()));
            continue;
        };
        let total: usize = o.values().sum();
        let list: Vec<String> = o.iter().map(|(k, v)| format!("{v} {k}")).collect();
        out.push_str(&format!(
            "| {} | {total} | {} |\n",
            step.name(),
            list.join("; ")
        ));
    }
    out
}

/// Where the lanes keep their console logs.
pub fn lane_artifacts(base: &std::path::Path, lane: usize) -> PathBuf {
    base.join(format!("powercut-{}", lane + 1))
}
