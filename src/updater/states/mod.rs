//! The update flow as a state machine: each state holds only its data and `handle` moves it on.
//! Any error becomes `Failed` with its reason; the caller (CLI or daemon) lives on.
//!
//! checking → downloading → verifying → unpacking → installing → switching → rebooting;
//! after the reboot, confirming → committed, or retrying (reboot, confirm again), or rolling back
//! → rolled back.

pub mod checking;
mod confirming;
mod downloading;
mod finished;
mod installing;
mod rebooting;
mod retrying;
pub mod rolling_back;
mod switching;
mod unpacking;
mod verifying;

use std::path::PathBuf;

pub use checking::Checking;
pub use confirming::Confirming;
pub use downloading::Downloading;
pub use finished::{Committed, Failed, RolledBack, UpToDate};
pub use installing::Installing;
pub use rebooting::Rebooting;
pub use retrying::Retrying;
pub use rolling_back::RollingBack;
pub use switching::Switching;
pub use unpacking::Unpacking;
pub use verifying::Verifying;

use crate::image::Version;
use crate::updater::engine::Engine;
use crate::updater::status::{Pending, Step};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Continue,
    Stop,
}

#[derive(Debug)]
pub enum State {
    Checking(Checking),
    Downloading(Downloading),
    Verifying(Verifying),
    Unpacking(Unpacking),
    Installing(Installing),
    Switching(Switching),
    Rebooting(Rebooting),
    Confirming(Confirming),
    Retrying(Retrying),
    RollingBack(RollingBack),
    UpToDate(UpToDate),
    Committed(Committed),
    RolledBack(RolledBack),
    Failed(Failed),
}

impl State {
    pub fn checking(force: bool) -> State {
        State::Checking(Checking { force })
    }

    /// An update from an image file already on the box: it starts at verification.
    pub fn local(
        image: PathBuf,
        file_name: String,
        signature: Option<String>,
        force: bool,
    ) -> State {
        verifying::from_local(image, file_name, signature, force)
    }

    pub fn confirming(pending: Pending) -> State {
        State::Confirming(Confirming { pending })
    }

    pub fn rolling_back(engine: &Engine, to: crate::image::ImageName, reason: &str) -> State {
        rolling_back::by_hand(engine, to, reason)
    }

    pub fn failed(step: Step, reason: impl Into<String>) -> State {
        State::Failed(Failed {
            step,
            reason: reason.into(),
        })
    }

    pub fn step(&self) -> Step {
        match self {
            State::Checking(_) => Step::Checking,
            State::Downloading(_) => Step::Downloading,
            State::Verifying(_) => Step::Verifying,
            State::Unpacking(_) => Step::Unpacking,
            State::Installing(_) => Step::Installing,
            State::Switching(_) => Step::Switching,
            State::Rebooting(_) => Step::Rebooting,
            State::Confirming(_) => Step::Confirming,
            // The box reboots to confirm again.
            State::Retrying(_) => Step::Rebooting,
            State::RollingBack(_) => Step::RollingBack,
            State::UpToDate(_) => Step::UpToDate,
            State::Committed(_) => Step::Committed,
            State::RolledBack(_) => Step::RolledBack,
            State::Failed(_) => Step::Failed,
        }
    }

    /// Whether an update may end here on a stop request, losing nothing: the steps before the
    /// box's own install script runs (a download resumes, a half-unpacked release is removed).
    pub fn may_be_abandoned(&self) -> bool {
        matches!(
            self,
            State::Checking(_)
                | State::Downloading(_)
                | State::Verifying(_)
                | State::Unpacking(_)
                | State::Installing(_)
        )
    }

    /// Ends the update here on a stop request: a release unpacked for installing is removed,
    /// and the update fails with the reason.
    pub fn abandon(self, engine: &Engine) -> State {
        if let State::Installing(s) = &self {
            let _ = std::fs::remove_dir_all(engine.layout().release_dir(s.image));
            let _ = std::fs::remove_file(&s.download);
            let _ = std::fs::remove_file(crate::updater::http::meta_path(&s.download));
        }
        let running = engine
            .layout()
            .installed_version()
            .map(|v| format!("version {v}"))
            .unwrap_or_else(|| "its old software".into());
        State::failed(
            self.step(),
            format!(
                "box-updater was stopped before this step; nothing was switched, the box keeps running {running}"
            ),
        )
    }

    /// The version this state is moving the box to, where it knows one.
    pub fn target(&self) -> Option<Version> {
        match self {
            State::Downloading(s) => Some(s.image.version()),
            State::Verifying(s) => Some(s.image.version()),
            State::Unpacking(s) => Some(s.image.version()),
            State::Installing(s) => Some(s.image.version()),
            State::Switching(s) => Some(s.image.version()),
            State::Rebooting(s) => Some(s.image.version()),
            State::Confirming(s) => Some(s.pending.new),
            State::Retrying(s) => Some(s.version),
            State::RollingBack(s) => Some(s.to.version()),
            _ => None,
        }
    }

    /// A short sentence for the page, the status and the log.
    pub fn describe(&self) -> String {
        match self {
            State::Checking(_) => "checking the update server for a newer image".into(),
            State::Downloading(s) => format!("downloading {}", s.image),
            State::Verifying(s) => format!("verifying {}", s.image),
            State::Unpacking(s) => format!("unpacking {}", s.image),
            State::Installing(s) => {
                format!("running install_update.sh of version {}", s.image.version())
            }
            State::Switching(s) => format!("switching to version {}", s.image.version()),
            State::Rebooting(s) => format!("version {} installed; rebooting", s.image.version()),
            State::Confirming(s) => {
                format!("confirming version {} after the reboot", s.pending.new)
            }
            State::Retrying(s) => format!(
                "{} (boot {} of {}); rebooting to try again",
                s.reason, s.boot, s.max_boots
            ),
            State::RollingBack(s) => {
                format!("rolling back to version {}: {}", s.to.version(), s.reason)
            }
            State::UpToDate(s) => s.message(),
            State::Committed(s) => format!("version {} confirmed and committed", s.version),
            State::RolledBack(s) => format!("rolled back to version {}: {}", s.to, s.reason),
            State::Failed(s) => format!("update failed while {}: {}", s.step_name(), s.reason),
        }
    }

    pub fn handle(self, engine: &Engine) -> (State, Transition) {
        let step = self.step();
        let next = match self {
            State::Checking(s) => s.handle(engine),
            State::Downloading(s) => s.handle(engine),
            State::Verifying(s) => s.handle(engine),
            State::Unpacking(s) => s.handle(engine),
            State::Installing(s) => s.handle(engine),
            State::Switching(s) => s.handle(engine),
            State::Rebooting(s) => return s.handle(engine),
            State::Confirming(s) => s.handle(engine),
            State::Retrying(s) => return s.handle(engine),
            State::RollingBack(s) => return s.handle(engine),
            State::Failed(s) => return (State::Failed(s.handle(engine)), Transition::Stop),
            done @ (State::UpToDate(_) | State::Committed(_) | State::RolledBack(_)) => {
                return (done, Transition::Stop);
            }
        };
        match next {
            Ok(next) => (next, Transition::Continue),
            Err(e) => (State::failed(step, format!("{e:#}")), Transition::Continue),
        }
    }
}
