//! The updater's persisted status: the current or last update's state and progress, the release
//! awaiting confirmation after a switch, and a short history. One JSON file, written atomically.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::fsutil::{unix_now, write_atomic};
use crate::image::Version;

pub const HISTORY_LEN: usize = 20;

/// The step an update is at, as the page and `box-updater status` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    #[default]
    Idle,
    Checking,
    Downloading,
    Verifying,
    Unpacking,
    Installing,
    Switching,
    Rebooting,
    Confirming,
    RollingBack,
    UpToDate,
    Committed,
    RolledBack,
    Failed,
}

impl Step {
    pub const ALL: [Step; 14] = [
        Step::Idle,
        Step::Checking,
        Step::Downloading,
        Step::Verifying,
        Step::Unpacking,
        Step::Installing,
        Step::Switching,
        Step::Rebooting,
        Step::Confirming,
        Step::RollingBack,
        Step::UpToDate,
        Step::Committed,
        Step::RolledBack,
        Step::Failed,
    ];

    /// The step's name as the status JSON spells it (`rolling_back`).
    pub fn name(self) -> &'static str {
        match self {
            Step::Idle => "idle",
            Step::Checking => "checking",
            Step::Downloading => "downloading",
            Step::Verifying => "verifying",
            Step::Unpacking => "unpacking",
            Step::Installing => "installing",
            Step::Switching => "switching",
            Step::Rebooting => "rebooting",
            Step::Confirming => "confirming",
            Step::RollingBack => "rolling_back",
            Step::UpToDate => "up_to_date",
            Step::Committed => "committed",
            Step::RolledBack => "rolled_back",
            Step::Failed => "failed",
        }
    }

    /// The name as words, for messages (`rolling back`).
    pub fn words(self) -> String {
        self.name().replace('_', " ")
    }

    /// Whether an update is under way (the lock is what really says so).
    pub fn is_running(self) -> bool {
        !matches!(
            self,
            Step::Idle | Step::UpToDate | Step::Committed | Step::RolledBack | Step::Failed
        )
    }
}

/// A switched release that has not yet been confirmed healthy after the reboot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub new: Version,
    pub previous: Option<Version>,
    /// Confirm attempts so far; too many means the new release does not come up.
    pub boots: u32,
    pub switched_at: u64,
}

/// A rollback under way: written before `current` goes back and cleared once the dropped
/// release's units are undone and the previous release's install script has run again, so that
/// a power cut in between is finished at the next boot instead of leaving the dropped release's
/// units on the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackRecord {
    pub from: Option<Version>,
    pub to: Version,
    pub reason: String,
}

/// One finished update, for the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub at: u64,
    pub from: Option<Version>,
    pub to: Option<Version>,
    pub result: Step,
    pub message: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: Step,
    pub message: String,
    pub target_version: Option<Version>,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    pub started_at: Option<u64>,
    pub updated_at: u64,
    #[serde(default)]
    pub pending: Option<Pending>,
    /// A rollback that has begun and not yet ended (see `RollbackRecord`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling_back: Option<RollbackRecord>,
    /// The last release confirmed healthy (the one a rollback returns to).
    #[serde(default)]
    pub confirmed: Option<Version>,
    #[serde(default)]
    pub last_result: Option<Outcome>,
    #[serde(default)]
    pub history: Vec<Outcome>,
    /// Milliseconds the current or last update spent in each step, by step name; kept across
    /// the reboot, for its report to the update server.
    #[serde(default)]
    pub step_ms: BTreeMap<String, u64>,
}

impl Status {
    pub fn record(&mut self, outcome: Outcome) {
        self.last_result = Some(outcome.clone());
        self.history.push(outcome);
        let extra = self.history.len().saturating_sub(HISTORY_LEN);
        self.history.drain(..extra);
    }
}

/// The status shared between the engine and its readers, persisted on every step change and at
/// most once a second for progress. Another process may change the file (the guard confirms a
/// release while `serve` shows the page): a read picks up the file when it changed on disk.
#[derive(Clone)]
pub struct StatusStore {
    inner: Arc<Mutex<Inner>>,
    path: PathBuf,
}

struct Inner {
    status: Status,
    last_write: Instant,
    /// The file as this store last read or wrote it: (inode, length, mtime in ns).
    seen: Option<(u64, u64, i128)>,
}

fn stamp(path: &std::path::Path) -> Option<(u64, u64, i128)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.len(),
        m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
    ))
}

impl StatusStore {
    /// Loads the status file; a missing or unreadable one starts fresh (and says so in the log).
    pub fn load(path: PathBuf) -> Self {
        let seen = stamp(&path);
        let status = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!(
                    "status file {} unreadable ({e}); starting fresh",
                    path.display()
                );
                Status::default()
            }),
            Err(_) => Status::default(),
        };
        StatusStore {
            inner: Arc::new(Mutex::new(Inner {
                status,
                last_write: Instant::now(),
                seen,
            })),
            path,
        }
    }

    pub fn get(&self) -> Status {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.reload_if_changed(&mut guard);
        guard.status.clone()
    }

    /// Takes the file's status when another process wrote it since this store last did.
    fn reload_if_changed(&self, inner: &mut Inner) {
        let now = stamp(&self.path);
        if now.is_none() || now == inner.seen {
            return;
        }
        if let Ok(bytes) = std::fs::read(&self.path)
            && let Ok(status) = serde_json::from_slice::<Status>(&bytes)
        {
            inner.status = status;
            inner.seen = now;
        }
    }

    /// Changes the status and persists it durably.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        self.change(f, true);
    }

    /// Changes the status; persists it if a second has passed since the last write.
    pub fn update_progress(&self, f: impl FnOnce(&mut Status)) {
        self.change(f, false);
    }

    fn change(&self, f: impl FnOnce(&mut Status), force: bool) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.reload_if_changed(&mut guard);
        f(&mut guard.status);
        guard.status.updated_at = unix_now();
        if force || guard.last_write.elapsed() >= Duration::from_secs(1) {
            guard.last_write = Instant::now();
            let json = serde_json::to_vec_pretty(&guard.status).expect("status serializes");
            if let Err(e) = write_atomic(&self.path, &json, 0o644) {
                log::error!("cannot write status {}: {e}", self.path.display());
            }
            guard.seen = stamp(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Step;

    #[test]
    fn a_read_picks_up_what_another_process_wrote() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("state.json");
        let serve = super::StatusStore::load(path.clone());
        let guard = super::StatusStore::load(path);
        guard.update(|s| s.confirmed = crate::image::Version::new(5).ok());
        assert_eq!(serve.get().confirmed, crate::image::Version::new(5).ok());
    }

    #[test]
    fn step_names_are_the_json_names() {
        for step in Step::ALL {
            assert_eq!(serde_json::to_value(step).unwrap(), step.name());
        }
    }
}
