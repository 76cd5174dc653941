//! Confirming, at the first boots after a switch (run by the guard, or by `serve` on a box
//! without one): the boot is counted, then the new release must come up healthy (its units up,
//! its health check passing, in time). Healthy: committed, and its updater becomes the guard. Not
//! healthy: the box reboots to try again while it has boots left, then rolls back; more boots
//! than allowed (the box hung or was reset each time) roll back at once.

use anyhow::Result;

use super::{Committed, Retrying, RollingBack, State};
use crate::image::ImageName;
use crate::updater::engine::Engine;
use crate::updater::status::{Pending, Step};
use crate::updater::{guard, health};

#[derive(Debug)]
pub struct Confirming {
    pub pending: Pending,
}

impl Confirming {
    pub fn handle(self, engine: &Engine) -> Result<State> {
        let layout = engine.layout();
        let p = self.pending;
        let new = ImageName(p.new);
        if layout.current() != Some(new) {
            // The switch never happened (a crash before the rename) or was undone by hand.
            engine.status.update(|s| s.pending = None);
            let running = layout.installed_version();
            let msg = format!(
                "the update to version {} did not complete; the box runs version {}",
                p.new,
                running
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "none".into())
            );
            engine.record(Step::Failed, p.previous, Some(p.new), &msg);
            return Ok(State::failed(Step::Confirming, msg));
        }
        let boots = p.boots + 1;
        engine.status.update(|s| {
            if let Some(pp) = &mut s.pending {
                pp.boots = boots;
            }
        });
        let max = engine.settings.max_boots;
        let rollback = |reason: String| -> Result<State> {
            match p.previous {
                Some(prev) => Ok(State::RollingBack(RollingBack {
                    to: ImageName(prev),
                    from: Some(new),
                    reason,
                })),
                None => {
                    engine.status.update(|s| s.pending = None);
                    let msg = format!("{reason}; there is no previous release to roll back to");
                    engine.record(Step::Failed, None, Some(p.new), &msg);
                    Ok(State::failed(Step::Confirming, msg))
                }
            }
        };
        if boots > max {
            return rollback(format!(
                "version {} was not confirmed after {} boots",
                p.new,
                boots - 1
            ));
        }
        if let Err(why) = health::check(engine, new) {
            let reason = format!("version {} is not healthy: {why}", p.new);
            if p.previous.is_some() && boots < max {
                return Ok(State::Retrying(Retrying {
                    version: p.new,
                    boot: boots,
                    max_boots: max,
                    reason,
                }));
            }
            return rollback(reason);
        }
        engine.status.update(|s| {
            s.pending = None;
            s.confirmed = Some(p.new);
        });
        prune(engine, new, p.previous.map(ImageName));
        match guard::refresh(layout, &layout.release_dir(new)) {
            Ok(true) => engine.log.info(&format!(
                "the guard now runs the updater of version {}",
                p.new
            )),
            Ok(false) => {}
            Err(e) => engine.log.warn(&format!(
                "cannot refresh the guard: {e:#}; it keeps the last one"
            )),
        }
        let msg = if p.previous.is_none() && p.switched_at == 0 {
            format!(
                "version {} (installed without box-updater) is confirmed",
                p.new
            )
        } else {
            format!("version {} is confirmed", p.new)
        };
        engine.record(Step::Committed, p.previous, Some(p.new), &msg);
        Ok(State::Committed(Committed { version: p.new }))
    }
}

/// After a commit only the running and previous releases are kept.
fn prune(engine: &Engine, current: ImageName, previous: Option<ImageName>) {
    for release in engine.layout().releases() {
        if release != current && Some(release) != previous {
            engine
                .log
                .info(&format!("removing old release {}", release.top_dir()));
            if let Err(e) = std::fs::remove_dir_all(engine.layout().release_dir(release)) {
                engine
                    .log
                    .warn(&format!("cannot remove {}: {e}", release.top_dir()));
            }
        }
    }
}
