//! Installing: runs the new release's `install_update.sh`; if it fails, the units it may have
//! installed are undone, the new release is dropped and the box keeps running the old one, with
//! no reboot.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use super::{State, Switching};
use crate::image::{INSTALL_SCRIPT, ImageName, Version};
use crate::updater::engine::Engine;
use crate::updater::{systemd, units};

#[derive(Debug)]
pub struct Installing {
    pub image: ImageName,
    /// The downloaded image, removed once the release is in place.
    pub download: PathBuf,
}

/// Runs a release's install script as SPEC.md says: cwd the release, the `BOX_*` variables set.
pub fn run_install_script(
    engine: &Engine,
    image: ImageName,
    previous: Option<Version>,
) -> Result<()> {
    let layout = engine.layout();
    let release = layout.release_dir(image);
    let release = std::fs::canonicalize(&release)
        .with_context(|| format!("resolving {}", release.display()))?;
    let root = std::fs::canonicalize(&layout.root).unwrap_or_else(|_| layout.root.clone());
    let mut cmd = Command::new(release.join(INSTALL_SCRIPT));
    cmd.current_dir(&release)
        .env("BOX_ROOT", &root)
        .env("BOX_UPDATE_VERSION", image.version().to_string())
        .env("BOX_UPDATE_RELEASE_DIR", &release)
        .env(
            "BOX_UPDATE_PREVIOUS_VERSION",
            previous.map(|v| v.to_string()).unwrap_or_default(),
        );
    engine.run_logged(INSTALL_SCRIPT, cmd, engine.settings.install_timeout)
}

/// Undoes what the `dropped` release's install script did to the box's units, as the release
/// the box keeps (`running`) has them (see `units::undo`), and tells systemd.
pub fn undo_units(engine: &Engine, dropped: ImageName, running: Option<ImageName>) {
    let layout = engine.layout();
    let running = running.map(|r| layout.release_dir(r));
    let done = units::undo(layout, &layout.release_dir(dropped), running.as_deref());
    if done.is_empty() {
        return;
    }
    engine.log.info(&format!(
        "units of version {}: {}",
        dropped.version(),
        done.join(", ")
    ));
    if let Err(e) = systemd::daemon_reload(&layout.root) {
        engine.log.warn(&format!("{e}"));
    }
}

impl Installing {
    pub fn handle(self, engine: &Engine) -> Result<State> {
        let _ = std::fs::remove_file(&self.download);
        let _ = std::fs::remove_file(crate::updater::http::meta_path(&self.download));
        let layout = engine.layout();
        let previous = layout.installed_version();
        let result = run_install_script(engine, self.image, previous);
        crate::updater::fault::point("install:after-script");
        if let Err(e) = result {
            // The script may have installed some of its units before it failed.
            undo_units(engine, self.image, layout.current());
            let _ = std::fs::remove_dir_all(layout.release_dir(self.image));
            let running = previous
                .map(|v| format!("version {v}"))
                .unwrap_or_else(|| "its old software".into());
            return Err(e.context(format!(
                "the new release was removed and the box keeps running {running}"
            )));
        }
        Ok(State::Switching(Switching { image: self.image }))
    }
}
