//! Switching: records the pending release, then points `current` at it with one atomic rename,
//! made durable. A power cut on either side of the rename leaves a complete release running.

use anyhow::{Context, Result};

use super::{Rebooting, State};
use crate::fsutil::unix_now;
use crate::image::ImageName;
use crate::updater::engine::Engine;
use crate::updater::status::Pending;

#[derive(Debug)]
pub struct Switching {
    pub image: ImageName,
}

impl Switching {
    pub fn handle(self, engine: &Engine) -> Result<State> {
        let layout = engine.layout();
        let previous = layout.installed_version();
        // The pending record goes first: after a crash, `confirming` compares it with `current`
        // to learn whether the switch happened.
        let pending = Pending {
            new: self.image.version(),
            previous,
            boots: 0,
            switched_at: unix_now(),
        };
        engine.status.update(|s| s.pending = Some(pending));
        engine.sync_disk(&layout.releases_dir());
        // The units the install script wrote are on the system's file system, which is often
        // not the releases' (the virtual box keeps them apart): durable too before the switch,
        // or a power cut right after it could boot the new release with an empty unit file,
        // which systemd takes as masked.
        engine.sync_disk(&layout.units_dir());
        crate::updater::fault::point("switch:before-rename");
        layout
            .switch_current(self.image)
            .context("switching opt/opq/current")?;
        crate::updater::fault::point("switch:after-rename");
        engine.log.info(&format!(
            "current -> {} (previous {})",
            self.image.top_dir(),
            previous
                .map(|v| v.to_string())
                .unwrap_or_else(|| "none".into())
        ));
        engine.record(
            crate::updater::status::Step::Rebooting,
            previous,
            Some(self.image.version()),
            &format!(
                "installed version {}; rebooting to confirm it",
                self.image.version()
            ),
        );
        Ok(State::Rebooting(Rebooting { image: self.image }))
    }
}
