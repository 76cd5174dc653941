//! Rebooting: the new release is current; the box restarts into it and confirms it at boot.

use super::{State, Transition};
use crate::image::ImageName;
use crate::updater::engine::Engine;

#[derive(Debug)]
pub struct Rebooting {
    pub image: ImageName,
}

impl Rebooting {
    pub fn handle(self, engine: &Engine) -> (State, Transition) {
        engine.log.info("rebooting");
        if let Err(e) = engine.reboot() {
            // The switch stands: the next boot, whenever it comes, confirms the new release.
            engine.log.error(&format!(
                "reboot failed: {e:#}; reboot the box by hand to finish the update"
            ));
        }
        (State::Rebooting(self), Transition::Stop)
    }
}
