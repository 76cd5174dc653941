//! Retrying: the new release did not come up healthy at this boot but has boots left, so the box
//! reboots to try again (greenboot's boot counter); the boot that uses the last one rolls back.

use super::{State, Transition};
use crate::image::Version;
use crate::updater::engine::Engine;

#[derive(Debug)]
pub struct Retrying {
    pub version: Version,
    pub boot: u32,
    pub max_boots: u32,
    pub reason: String,
}

impl Retrying {
    pub fn handle(self, engine: &Engine) -> (State, Transition) {
        engine.log.warn(&format!(
            "{} (boot {} of {}); rebooting to try again",
            self.reason, self.boot, self.max_boots
        ));
        if let Err(e) = engine.reboot() {
            engine.log.error(&format!(
                "reboot failed: {e:#}; the next boot confirms or rolls back"
            ));
        }
        (State::Retrying(self), Transition::Stop)
    }
}
