//! The update engine: settings, the loop that drives the state machine, and what the states
//! share (the box layout, the status, the update log, the HTTP client, running commands).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::archive::unpack::Limits;
use crate::fleet::protocol::{Outcome as ReportOutcome, PROTOCOL_VERSION, Report};
use crate::fsutil::unix_now;
use crate::image::Version;
use crate::updater::http::{FetchError, Http, HttpOptions};
use crate::updater::layout::Layout;
use crate::updater::lock::{LockError, UpdateLock};
use crate::updater::log::UpdateLog;
use crate::updater::report::{self, Outbox};
use crate::updater::states::{State, Transition};
use crate::updater::status::{Outcome, Pending, Status, StatusStore, Step};

#[derive(Clone)]
pub struct Settings {
    pub layout: Layout,
    pub box_config: PathBuf,
    pub public_key: Option<Arc<minisign::PublicKey>>,
    pub allow_unverified: bool,
    pub reboot_command: Option<String>,
    pub health_check: Option<String>,
    pub install_timeout: Duration,
    /// The time a new release has after a boot to come up healthy.
    pub health_timeout: Duration,
    /// How long a release's unit must stay up, without a restart, to count as up.
    pub settle: Duration,
    /// Boots without a confirmation after which the new release is rolled back.
    pub max_boots: u32,
    /// The most an image may expand to, whatever the free space.
    pub max_expanded: u64,
    /// Space always left free on the box's disk.
    pub reserve: u64,
    pub retries: u32,
    pub retry_delay: Duration,
    pub http: HttpOptions,
    pub threads: usize,
}

impl Settings {
    pub fn new(root: PathBuf) -> Self {
        let layout = Layout::new(root);
        Settings {
            box_config: layout.default_box_config(),
            layout,
            public_key: None,
            allow_unverified: false,
            reboot_command: None,
            health_check: None,
            install_timeout: Duration::from_secs(600),
            health_timeout: Duration::from_secs(120),
            settle: Duration::from_secs(5),
            max_boots: 3,
            max_expanded: 4 << 30,
            reserve: 32 << 20,
            retries: 5,
            retry_delay: Duration::from_secs(1),
            http: HttpOptions {
                ca_file: None,
                connect_timeout: Duration::from_secs(15),
                read_timeout: Duration::from_secs(30),
                user_agent: String::new(),
            },
            threads: crate::archive::pbzip::default_threads(),
        }
    }
}

/// Where an update's image comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The newest image on the box config's update server.
    Server { force: bool },
    /// An image file already on the box (an upload), with its signature if it came with one.
    Local {
        image: PathBuf,
        file_name: String,
        signature: Option<String>,
        force: bool,
    },
}

pub struct Engine {
    pub settings: Settings,
    pub status: StatusStore,
    pub log: UpdateLog,
    pub http: Http,
    /// How the box names itself to the update server.
    pub box_id: String,
    /// Reports of update attempts not yet sent.
    pub outbox: Outbox,
    /// Set when the daemon is asked to stop: an update in this process starts no further step
    /// before the switch (see `request_stop`).
    stopping: std::sync::Mutex<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Busy(#[from] LockError),
    #[error("nothing to roll back to: {0}")]
    NothingToRollBack(String),
}

impl Engine {
    pub fn new(mut settings: Settings) -> Result<Self> {
        let layout = &settings.layout;
        if !layout.root.is_dir() {
            bail!(
                "the box root {} does not exist or is not a directory (--root names where the box's file system starts; create it first for a sandbox)",
                layout.root.display()
            );
        }
        layout.create_dirs().with_context(|| {
            format!(
                "cannot create the box layout under {}; check --root",
                layout.root.display()
            )
        })?;
        if settings.http.user_agent.is_empty() {
            let installed = layout
                .installed_version()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "none".into());
            settings.http.user_agent = format!(
                "box-updater/{} (opq-box; installed {installed})",
                env!("CARGO_PKG_VERSION")
            );
        }
        let mut http = Http::new(&settings.http)?;
        let status = StatusStore::load(layout.state_file());
        let box_id = report::box_id(layout, &settings.box_config);
        http.set_headers(report::header_source(
            box_id.clone(),
            layout.clone(),
            status.clone(),
        ));
        Ok(Engine {
            outbox: Outbox::new(&layout.state_dir()),
            status,
            log: UpdateLog::new(layout.log_file()),
            http,
            box_id,
            settings,
            stopping: std::sync::Mutex::new(false),
        })
    }

    /// Sends the reports that wait, if the server can be reached; never fails. Callers send
    /// after an update, a confirm or a rollback ends, where waiting on the network holds up
    /// nothing else.
    pub fn send_reports(&self) {
        let sent = self.outbox.flush(&self.http, &self.settings.box_config);
        if sent > 0 {
            log::info!("sent {sent} update reports to the update server");
        }
    }

    /// Asks an update running in this process to stop at its next step, if that step comes
    /// before the switch (the update then fails with that reason, and the box runs what it ran);
    /// installing, switching, rebooting, confirming and rolling back go on to their end. Returns
    /// the step the update is at now, as it was when the request was taken.
    pub fn request_stop(&self) -> Step {
        let mut stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
        *stopping = true;
        self.status.get().state
    }

    pub fn layout(&self) -> &Layout {
        &self.settings.layout
    }

    /// The update server's base URL from the box config; an error says how to fix the config.
    pub fn updates_ep(&self) -> Result<String> {
        let path = &self.settings.box_config;
        crate::updater::config::updates_ep(path).map_err(|e| {
            if path.exists() {
                e
            } else if *path == self.layout().default_box_config() {
                anyhow::anyhow!(
                    "{e:#}; pass --box-config FILE if this box keeps its config elsewhere"
                )
            } else {
                anyhow::anyhow!("{e:#} (given with --box-config)")
            }
        })
    }

    /// A failure to reach the update server, with where its address comes from.
    pub fn unreachable_hint(&self, e: FetchError, server: &str) -> anyhow::Error {
        if e.is_unreachable() {
            anyhow::anyhow!(
                "{e}; is update-server running at {server}? The box finds it by \"updates_ep\" in {}",
                self.settings.box_config.display()
            )
        } else {
            e.into()
        }
    }

    /// Takes the lock at once or says who holds it: for asking whether an update runs.
    pub fn lock(&self) -> Result<UpdateLock, LockError> {
        UpdateLock::try_acquire(&self.layout().lock_file())
    }

    /// Whether an update runs, in this process or another. Probes here take turns, since two at
    /// once would each take the other's brief hold for a running update.
    pub fn update_running(&self) -> bool {
        static PROBE: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = PROBE.lock().unwrap_or_else(|e| e.into_inner());
        self.lock().is_err()
    }

    /// The lock for a run of the state machine, waiting out readers that probe it (see
    /// `UpdateLock::acquire_within`).
    fn lock_for_run(&self) -> Result<UpdateLock, LockError> {
        UpdateLock::acquire_within(&self.layout().lock_file(), Duration::from_millis(500))
    }

    /// Runs one update from `source` to its end under the lock; returns the final status.
    pub fn update(&self, source: Source) -> Result<Status, RunError> {
        let _lock = self.lock_for_run()?;
        self.clean_leftovers();
        self.status.update(|s| {
            s.started_at = Some(unix_now());
            s.bytes_done = 0;
            s.bytes_total = None;
            s.target_version = None;
            s.step_ms.clear();
        });
        let first = match source {
            Source::Server { force } => State::checking(force),
            Source::Local {
                image,
                file_name,
                signature,
                force,
            } => State::local(image, file_name, signature, force),
        };
        Ok(self.drive(first))
    }

    /// After a boot: confirms a switched release, or rolls it back. A release that was never
    /// confirmed (installed by the old shell updater, or before confirmations were recorded) is
    /// checked the same way, with nothing to roll back to. Otherwise: no-op.
    pub fn confirm(&self) -> Result<Status, RunError> {
        let _lock = self.lock_for_run()?;
        self.clean_leftovers();
        let status = self.status.get();
        // A rollback a power cut interrupted: finished first (its units, the previous release's
        // install script, the reboot), whatever the pending record says.
        if let Some(r) = status.rolling_back {
            self.log.info(&format!(
                "finishing the rollback to version {} that was interrupted",
                r.to
            ));
            let state = crate::updater::states::RollingBack::resume(r);
            return Ok(self.drive(State::RollingBack(state)));
        }
        let end = match (status.pending, self.layout().current()) {
            (Some(p), _) => {
                // The time from the switch to this start: the reboot, as the report tells it.
                let rebooting = unix_now().saturating_sub(p.switched_at) * 1000;
                self.status.update(|s| {
                    s.step_ms.insert(Step::Rebooting.name().into(), rebooting);
                });
                self.drive(State::confirming(p))
            }
            // Installed without box-updater (the old shell updater): checked the same way, with
            // nothing to roll back to.
            (None, Some(current)) if status.confirmed != Some(current.version()) => {
                self.drive(State::confirming(Pending {
                    new: current.version(),
                    previous: None,
                    boots: 0,
                    switched_at: 0,
                }))
            }
            (None, _) => status,
        };
        Ok(end)
    }

    /// Switches back to the previous release by hand. A box without one is an error of its own,
    /// not a failed update: nothing was tried, so nothing is recorded.
    pub fn rollback(&self, reason: &str) -> Result<Status, RunError> {
        let _lock = self.lock_for_run()?;
        let to = crate::updater::states::rolling_back::target_by_hand(self).ok_or_else(|| {
            RunError::NothingToRollBack(
                self.layout()
                    .installed_version()
                    .map(|v| format!("version {v} is the only release on this box"))
                    .unwrap_or_else(|| "no release is installed on this box yet".into()),
            )
        })?;
        self.status.update(|s| {
            s.started_at = Some(unix_now());
            s.step_ms.clear();
        });
        Ok(self.drive(State::rolling_back(self, to, reason)))
    }

    fn drive(&self, mut state: State) -> Status {
        // The step just handled and when it began, to add its time to `step_ms`.
        let mut timing: Option<(Step, Instant)> = None;
        let spent = |timing: &Option<(Step, Instant)>, s: &mut Status| {
            if let Some((step, t0)) = timing {
                *s.step_ms.entry(step.name().to_string()).or_insert(0) +=
                    t0.elapsed().as_millis() as u64;
            }
        };
        loop {
            // Under the stop lock, so that `request_stop` sees either this step or the refusal.
            let stopping = self.stopping.lock().unwrap_or_else(|e| e.into_inner());
            if *stopping && state.may_be_abandoned() {
                state = state.abandon(self);
            }
            let step = state.step();
            let message = state.describe();
            let target = state.target();
            self.status.update(|s| {
                spent(&timing, s);
                s.state = step;
                s.message = message.clone();
                if target.is_some() {
                    s.target_version = target;
                }
                // Byte counts belong to the step that made them: the installing step does not
                // show what unpacking counted.
                if !matches!(step, Step::Downloading | Step::Unpacking) {
                    s.bytes_done = 0;
                    s.bytes_total = None;
                }
            });
            drop(stopping);
            timing = Some((step, Instant::now()));
            // A failure logs itself, once, as an error.
            if !message.is_empty() && step != Step::Failed {
                self.log.info(&message);
            }
            crate::updater::fault::point(&format!("before:{}", step.name()));
            let (next, transition) = state.handle(self);
            state = next;
            if transition == Transition::Stop {
                let (step, message) = (state.step(), state.describe());
                self.status.update(|s| {
                    spent(&timing, s);
                    s.state = step;
                    s.message = message;
                });
                return self.status.get();
            }
        }
    }

    /// Adds a finished update to the history.
    pub fn record(&self, result: Step, from: Option<Version>, to: Option<Version>, message: &str) {
        self.record_step(result, from, to, message, None);
    }

    /// The same, naming the step a failure happened at. An outcome the update server should hear
    /// of (committed, failed, rolled back) also goes to the report outbox, durably, before
    /// anything else happens (such as the reboot after a rollback).
    pub fn record_step(
        &self,
        result: Step,
        from: Option<Version>,
        to: Option<Version>,
        message: &str,
        failed_at: Option<Step>,
    ) {
        self.status.update(|s| {
            s.record(Outcome {
                at: unix_now(),
                from,
                to,
                result,
                message: message.to_string(),
            })
        });
        let outcome = match result {
            Step::Committed => ReportOutcome::Committed,
            Step::Failed => ReportOutcome::Failed,
            Step::RolledBack => ReportOutcome::RolledBack,
            _ => return,
        };
        let status = self.status.get();
        let (target, previous) = match outcome {
            // A rollback goes from the release it gives up to the one before.
            ReportOutcome::RolledBack => (from, to),
            _ => (to, from),
        };
        self.outbox.queue(Report {
            v: PROTOCOL_VERSION,
            box_id: self.box_id.clone(),
            outcome,
            target_version: target.map(Version::get),
            running_version: self.layout().installed_version().map(Version::get),
            previous_version: previous.map(Version::get),
            step: failed_at,
            message: message.to_string(),
            started_at: status.started_at,
            finished_at: Some(unix_now()),
            durations_ms: status.step_ms,
        });
    }

    /// Half-unpacked releases and link temp files from an interrupted run.
    fn clean_leftovers(&self) {
        let layout = self.layout();
        let _ = std::fs::remove_file(layout.opq_dir().join(".current.new"));
        if let Ok(rd) = std::fs::read_dir(layout.releases_dir()) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().ends_with(".partial") {
                    self.log.info(&format!(
                        "removing unfinished {}",
                        e.file_name().to_string_lossy()
                    ));
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Runs `f`, retrying transient failures (the network) with exponential backoff, at most
    /// `--retries` times; `what` names the thing fetched in the log.
    pub fn with_retries<T>(
        &self,
        what: &str,
        mut f: impl FnMut() -> Result<T, FetchError>,
    ) -> Result<T, FetchError> {
        let s = &self.settings;
        let mut delay = s.retry_delay;
        for attempt in 0..=s.retries {
            match f() {
                Ok(v) => return Ok(v),
                Err(e @ FetchError::Permanent(_)) => return Err(e),
                Err(FetchError::Transient(m)) if attempt < s.retries => {
                    self.log.warn(&format!(
                        "fetching {what}: {m}; retry {} of {} in {:?}",
                        attempt + 1,
                        s.retries,
                        delay
                    ));
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(60));
                }
                Err(FetchError::Transient(m)) => {
                    return Err(FetchError::Transient(format!(
                        "{m} (gave up after {} retries)",
                        s.retries
                    )));
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Runs a command with a time limit, its output into the update log.
    pub fn run_logged(&self, what: &str, cmd: Command, timeout: Duration) -> Result<()> {
        self.run_logged_watched(what, cmd, timeout, &mut || None)
    }

    /// The same, asking `watch` about once a second whether to give up on it: `Some(reason)`
    /// stops the command (its whole process group) and fails with that reason.
    pub fn run_logged_watched(
        &self,
        what: &str,
        mut cmd: Command,
        timeout: Duration,
        watch: &mut dyn FnMut() -> Option<String>,
    ) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let out = self.log.for_child().context("opening the update log")?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let exited = ExitWatch::new(&child);
        let started = Instant::now();
        let deadline = started + timeout;
        let mut next_watch = started + Duration::from_secs(1);
        let stop = |child: &mut std::process::Child| {
            let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        };
        loop {
            if let Some(status) = child.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                match status.code() {
                    Some(code) => bail!("{what} failed with exit code {code}"),
                    None => bail!("{what} was killed by a signal"),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                stop(&mut child);
                bail!(
                    "{what} did not finish within {} s and was stopped",
                    timeout.as_secs()
                );
            }
            if now >= next_watch {
                next_watch = now + Duration::from_secs(1);
                if let Some(reason) = watch() {
                    stop(&mut child);
                    bail!("{reason} ({what} was stopped)");
                }
            }
            exited.wait(deadline.min(next_watch).saturating_duration_since(now));
        }
    }

    /// Makes everything written to the box's disk durable before a switch.
    pub fn sync_disk(&self, path: &Path) {
        if let Ok(f) = std::fs::File::open(path) {
            use std::os::fd::AsRawFd;
            // SAFETY: syncfs only reads the descriptor, which `f` keeps open for the call.
            unsafe { libc::syncfs(f.as_raw_fd()) };
        }
    }

    /// Free bytes for this box's updates on the file system holding `path`, less the reserve.
    // The casts are needed on 32-bit ARM, where statvfs counts are 32-bit.
    #[allow(clippy::unnecessary_cast)]
    pub fn usable_space(&self, path: &Path) -> u64 {
        match nix::sys::statvfs::statvfs(path) {
            Ok(s) => (s.blocks_available() as u64)
                .saturating_mul(s.fragment_size() as u64)
                .saturating_sub(self.settings.reserve),
            Err(_) => u64::MAX,
        }
    }

    pub fn unpack_limits(&self) -> Limits {
        let free = self.usable_space(&self.layout().releases_dir());
        Limits {
            max_bytes: free.min(self.settings.max_expanded),
            ..Limits::default()
        }
    }

    /// Reboots the box: the configured command, else systemd, else the kernel after a sync.
    pub fn reboot(&self) -> Result<()> {
        if let Some(cmd) = &self.settings.reboot_command {
            let mut c = Command::new("sh");
            c.arg("-c").arg(cmd);
            return self.run_logged("the reboot command", c, Duration::from_secs(60));
        }
        let mut c = Command::new("systemctl");
        c.arg("reboot");
        if self
            .run_logged("systemctl reboot", c, Duration::from_secs(60))
            .is_ok()
        {
            return Ok(());
        }
        self.log
            .warn("systemctl reboot failed; rebooting through the kernel");
        nix::unistd::sync();
        nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).context("reboot")?;
        Ok(())
    }
}

/// Wakes a waiter as soon as a child exits: a pidfd turns readable then, so an install script's
/// end is seen at once rather than at the next tick of a polling loop (up to 50 ms per update).
/// Kernels before 5.3 have no pidfd: there it sleeps in short steps.
struct ExitWatch(Option<std::os::fd::OwnedFd>);

impl ExitWatch {
    fn new(child: &std::process::Child) -> Self {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        // SAFETY: a non-negative result is a descriptor this process now owns.
        ExitWatch((fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Returns when the child has exited or after `most`, whichever is first.
    fn wait(&self, most: Duration) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        match &self.0 {
            Some(fd) => {
                let t = PollTimeout::try_from(most).unwrap_or(PollTimeout::MAX);
                let _ = poll(&mut [PollFd::new(fd.as_fd(), PollFlags::POLLIN)], t);
            }
            None => std::thread::sleep(most.min(Duration::from_millis(10))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watched_command_is_stopped_with_the_watchers_reason() {
        let d = tempfile::tempdir().unwrap();
        let engine = Engine::new(Settings::new(d.path().to_path_buf())).unwrap();
        let mut calls = 0;
        let started = Instant::now();
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg("sleep 30 & sleep 30");
        let err = engine
            .run_logged_watched("the check", cmd, Duration::from_secs(60), &mut || {
                calls += 1;
                (calls == 2).then(|| "a.service failed".to_string())
            })
            .unwrap_err();
        assert_eq!(
            format!("{err:#}"),
            "a.service failed (the check was stopped)"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        // Unwatched, a command that passes passes.
        let mut ok = Command::new("sh");
        ok.arg("-c").arg("exit 0");
        engine
            .run_logged("the check", ok, Duration::from_secs(10))
            .unwrap();
    }
}
