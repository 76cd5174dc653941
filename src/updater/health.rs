//! Whether a release really came up after a boot, as Fedora's greenboot asks it: every unit the
//! release enables is active and stays up (when systemd runs the box), then the image's own
//! `health_check.sh` (beside `install_update.sh`, optional) and any `--health-check` command
//! pass, all within one time limit from the start of the check.

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::image::ImageName;
use crate::updater::engine::Engine;
use crate::updater::systemd;

/// The image's optional health check, run in the release's directory.
pub const HEALTH_SCRIPT: &str = "health_check.sh";
/// A unit that restarted this often during the check keeps failing: no need to wait longer.
const MAX_RESTARTS: u32 = 3;

/// Checks the release `current` points at; the reason it is not healthy otherwise.
pub fn check(engine: &Engine, image: ImageName) -> Result<(), String> {
    let settings = &engine.settings;
    let started = Instant::now();
    let deadline = started + settings.health_timeout;
    let release = engine.layout().release_dir(image);
    let managed = systemd::manages(&engine.layout().root);
    let units = if managed {
        systemd::release_units(&release)
    } else {
        Vec::new()
    };
    let mut restarts = Vec::new();
    if managed {
        engine.log.info(&format!(
            "waiting up to {} s for {} to be up",
            settings.health_timeout.as_secs(),
            if units.is_empty() {
                "no units".to_string()
            } else {
                units.join(", ")
            }
        ));
        restarts = wait_units(&units, deadline, settings.settle)?;
    }
    // While the scripts run, a unit that came up and then fails (a service that takes a while
    // to crash) ends the check at once, as the reason: the scripts would only wait for it.
    let mut watch = || {
        if managed {
            stayed_up(&units, &restarts).err()
        } else {
            None
        }
    };
    run_scripts(engine, image, &release, deadline, &mut watch)?;
    if managed {
        stayed_up(&units, &restarts)?;
    }
    engine.log.info(&format!(
        "version {} is healthy after {:.1} s",
        image.version(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Every unit is still active and has not restarted since it was seen up (`restarts`, per unit).
fn stayed_up(units: &[String], restarts: &[u32]) -> Result<(), String> {
    let states = systemd::unit_states(units).map_err(|e| e.to_string())?;
    for ((unit, s), before) in units.iter().zip(&states).zip(restarts) {
        let up = if s.oneshot {
            s.active == "active" || (s.active == "inactive" && s.result == "success")
        } else {
            s.active == "active" && s.restarts == *before
        };
        if !up {
            return Err(format!("{unit} did not stay up: {}", s.describe()));
        }
    }
    Ok(())
}

/// The image's health_check.sh, then --health-check, within what is left of the time limit.
fn run_scripts(
    engine: &Engine,
    image: ImageName,
    release: &std::path::Path,
    deadline: Instant,
    watch: &mut dyn FnMut() -> Option<String>,
) -> Result<(), String> {
    let settings = &engine.settings;
    let remaining = |min: u64| {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(min))
    };
    let script = release.join(HEALTH_SCRIPT);
    if script.is_file() {
        let mut cmd = Command::new(&script);
        cmd.current_dir(release)
            .env("BOX_ROOT", &engine.layout().root)
            .env("BOX_UPDATE_VERSION", image.version().to_string())
            .env("BOX_UPDATE_RELEASE_DIR", release);
        engine
            .run_logged_watched(HEALTH_SCRIPT, cmd, remaining(5), watch)
            .map_err(|e| format!("{e:#}"))?;
    }
    if let Some(check) = &settings.health_check {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(check).current_dir(release);
        engine
            .run_logged_watched("the health check", cmd, remaining(5), watch)
            .map_err(|e| format!("{e:#}"))?;
    }
    Ok(())
}

/// Waits until every unit is up: active without a restart for `settle` (a oneshot: finished
/// successfully). A unit that failed or keeps restarting ends the wait at once.
/// Returns each unit's restart count once all are up.
fn wait_units(units: &[String], deadline: Instant, settle: Duration) -> Result<Vec<u32>, String> {
    // Per unit: the invocation and restart count it was first seen active with, and when.
    let mut up_since: HashMap<&str, (String, u32, Instant)> = HashMap::new();
    loop {
        let states = systemd::unit_states(units).map_err(|e| e.to_string())?;
        let now = Instant::now();
        let mut waiting = Vec::new();
        for (unit, s) in units.iter().zip(&states) {
            if s.active == "failed" {
                return Err(format!("{unit} failed: {}", s.describe()));
            }
            if s.restarts >= MAX_RESTARTS {
                return Err(format!("{unit} keeps failing: {}", s.describe()));
            }
            let up = if s.oneshot {
                s.active == "active"
                    || (s.active == "inactive" && s.exited && s.result == "success")
            } else if s.active == "active" {
                let seen = up_since
                    .entry(unit)
                    .or_insert_with(|| (s.invocation.clone(), s.restarts, now));
                if seen.0 != s.invocation || seen.1 != s.restarts {
                    *seen = (s.invocation.clone(), s.restarts, now);
                }
                now.duration_since(seen.2) >= settle
            } else {
                up_since.remove(unit.as_str());
                false
            };
            if !up {
                waiting.push(format!("{unit} is {}", s.describe()));
            }
        }
        if waiting.is_empty() {
            return Ok(states.iter().map(|s| s.restarts).collect());
        }
        if now >= deadline {
            return Err(format!("not up in time: {}", waiting.join("; ")));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
