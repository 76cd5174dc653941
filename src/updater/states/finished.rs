//! The ends of an update: up to date, committed, rolled back, or failed with a reason.

use crate::image::Version;
use crate::updater::engine::Engine;
use crate::updater::status::Step;

#[derive(Debug)]
pub struct UpToDate {
    pub installed: Option<Version>,
    pub newest: Version,
}

impl UpToDate {
    pub fn message(&self) -> String {
        match self.installed {
            Some(i) if i == self.newest => format!("already up to date: version {i} is the newest"),
            Some(i) => format!(
                "already up to date: version {i} is newer than the server's {}",
                self.newest
            ),
            None => format!("the server's newest is version {}", self.newest),
        }
    }
}

#[derive(Debug)]
pub struct Committed {
    pub version: Version,
}

#[derive(Debug)]
pub struct RolledBack {
    pub to: Version,
    pub reason: String,
}

#[derive(Debug)]
pub struct Failed {
    pub step: Step,
    pub reason: String,
}

impl Failed {
    /// The step that failed, as words for the message.
    pub fn step_name(&self) -> String {
        if self.step.is_running() {
            self.step.words()
        } else {
            "updating".into()
        }
    }

    /// Records the failure once in the history and the log; the box runs what it ran before.
    pub fn handle(self, engine: &Engine) -> Failed {
        let installed = engine.layout().installed_version();
        let target = engine.status.get().target_version;
        let msg = format!("update failed while {}: {}", self.step_name(), self.reason);
        // The command line prints it, the daemon logs it: once each.
        engine.log.file_only(log::Level::Error, &msg);
        let already = engine
            .status
            .get()
            .last_result
            .is_some_and(|o| o.result == Step::Failed && o.message.contains(&self.reason));
        if !already {
            let at = self.step.is_running().then_some(self.step);
            engine.record_step(Step::Failed, installed, target, &msg, at);
        }
        self
    }
}
