//! Confirming, at the first start after a switch: the new release is committed if its health check
//! passes; a failing check, or too many boots without a confirmation, rolls it back.

use std::process::Command;

use anyhow::Result;

use super::{Committed, RollingBack, State};
use crate::image::ImageName;
use crate::updater::engine::Engine;
use crate::updater::status::{Pending, Step};

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
        if boots > engine.settings.max_boots {
            return rollback(format!(
                "version {} was not confirmed after {} boots",
                p.new,
                boots - 1
            ));
        }
        if let Some(check) = &engine.settings.health_check {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(check).current_dir(layout.current_link());
            if let Err(e) =
                engine.run_logged("the health check", cmd, engine.settings.health_timeout)
            {
                return rollback(format!("version {} is not healthy: {e:#}", p.new));
            }
        }
        engine.status.update(|s| s.pending = None);
        prune(engine, new, p.previous.map(ImageName));
        engine.record(
            Step::Committed,
            p.previous,
            Some(p.new),
            &format!("version {} is confirmed", p.new),
        );
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
