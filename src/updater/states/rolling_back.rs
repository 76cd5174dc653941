//! Rolling back: `current` goes back to the previous release (after checking it is whole), the
//! units of the dropped release are undone, the previous release's install script runs again to
//! restore its own, and the box reboots. The rollback is recorded before it starts and cleared
//! once the units are done: a power cut in the middle is finished at the next boot (see
//! `Engine::confirm`).

use anyhow::{Context, Result};

use super::{RolledBack, State, Transition};
use crate::image::{ImageName, SUMS_FILE};
use crate::sums::Sha256Sums;
use crate::updater::engine::Engine;
use crate::updater::status::{RollbackRecord, Step};

#[derive(Debug)]
pub struct RollingBack {
    pub to: ImageName,
    pub from: Option<ImageName>,
    pub reason: String,
}

/// The release a rollback by hand goes back to: the pending update's previous release, else the
/// newest release older than the running one; `None` when the box has none.
pub fn target_by_hand(engine: &Engine) -> Option<ImageName> {
    let layout = engine.layout();
    let current = layout.current();
    let pending_prev = engine
        .status
        .get()
        .pending
        .and_then(|p| p.previous)
        .map(ImageName);
    pending_prev.or_else(|| {
        layout
            .releases()
            .into_iter()
            .rev()
            .find(|r| current.is_none_or(|c| r.version() < c.version()))
    })
}

/// A rollback asked for by hand, to `to` (see `target_by_hand`).
pub fn by_hand(engine: &Engine, to: ImageName, reason: &str) -> State {
    State::RollingBack(RollingBack {
        to,
        from: engine.layout().current(),
        reason: reason.to_string(),
    })
}

impl RollingBack {
    /// The record that lets the next boot finish this rollback.
    pub fn record(&self) -> RollbackRecord {
        RollbackRecord {
            from: self.from.map(ImageName::version),
            to: self.to.version(),
            reason: self.reason.clone(),
        }
    }

    /// A rollback a power cut interrupted, to be finished.
    pub fn resume(r: RollbackRecord) -> RollingBack {
        RollingBack {
            to: ImageName(r.to),
            from: r.from.map(ImageName),
            reason: r.reason,
        }
    }

    pub fn handle(self, engine: &Engine) -> (State, Transition) {
        let record = self.record();
        engine.status.update(|s| s.rolling_back = Some(record));
        match self.switch_back(engine) {
            Ok(()) => {}
            Err(e) => {
                // Not resumable (the previous release is damaged): not retried at every boot.
                engine.status.update(|s| s.rolling_back = None);
                return (
                    State::failed(Step::RollingBack, format!("{e:#}")),
                    Transition::Continue,
                );
            }
        }
        let msg = format!(
            "rolled back to version {}: {}",
            self.to.version(),
            self.reason
        );
        engine.record(
            Step::RolledBack,
            self.from.map(ImageName::version),
            Some(self.to.version()),
            &msg,
        );
        engine.status.update(|s| {
            s.state = Step::RolledBack;
            s.message = msg.clone();
            s.rolling_back = None;
        });
        engine.log.info("rebooting");
        if let Err(e) = engine.reboot() {
            engine
                .log
                .error(&format!("reboot failed: {e:#}; reboot the box by hand"));
        }
        (
            State::RolledBack(RolledBack {
                to: self.to.version(),
                reason: self.reason,
            }),
            Transition::Stop,
        )
    }

    fn switch_back(&self, engine: &Engine) -> Result<()> {
        let layout = engine.layout();
        let dir = layout.release_dir(self.to);
        let sums = std::fs::read_to_string(dir.join(SUMS_FILE)).with_context(|| {
            format!(
                "the previous release {} is missing or incomplete",
                self.to.top_dir()
            )
        })?;
        Sha256Sums::parse(&sums)
            .and_then(|s| s.verify_dir(&dir))
            .with_context(|| {
                format!(
                    "the previous release {} is damaged; not rolling back to it",
                    self.to.top_dir()
                )
            })?;
        layout
            .switch_current(self.to)
            .context("switching opt/opq/current back")?;
        crate::updater::fault::point("rollback:after-switch");
        // The release rolled back to ran well before (it was confirmed, or it was what ran).
        engine.status.update(|s| {
            s.pending = None;
            s.confirmed = Some(self.to.version());
        });
        engine
            .log
            .info(&format!("current -> {}", self.to.top_dir()));
        // The units the dropped release added go, the ones it changed come back as they were;
        // then the previous release's own install script puts its units in place as before.
        if let Some(dropped) = self.from {
            super::installing::undo_units(engine, dropped, Some(self.to));
        }
        crate::updater::fault::point("rollback:after-units");
        let from = self.from.map(ImageName::version);
        if let Err(e) = super::installing::run_install_script(engine, self.to, from) {
            engine.log.warn(&format!(
                "reinstalling the units of version {} failed: {e:#}",
                self.to.version()
            ));
        }
        Ok(())
    }
}
