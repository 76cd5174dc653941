//! The `box-updater` subcommands on top of the engine: what each prints and its exit code.

use anyhow::Result;
use serde_json::json;

use crate::updater::engine::{Engine, RunError, Source};
use crate::updater::status::{Status, Step};

/// Exit codes: distinct for failure, busy and usage (clap's 2).
pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_BUSY: i32 = 3;

/// `box-updater status`: one JSON object with the installed version, the state and its message.
pub fn status_json(engine: &Engine) -> serde_json::Value {
    let s = engine.status.get();
    let mut v = serde_json::to_value(&s).expect("status serializes");
    let running = engine.update_running();
    let obj = v.as_object_mut().expect("status is an object");
    obj.insert("version".into(), json!(engine.layout().installed_version()));
    obj.insert("running".into(), json!(running));
    obj.insert("log_tail".into(), json!(engine.log.tail(20)));
    obj.insert("box_id".into(), json!(engine.box_id));
    obj.insert(
        "reports_pending".into(),
        json!(engine.outbox.pending().len()),
    );
    // An update that reached `rebooting` has finished its work and waits for the restart, so
    // only the other steps, found without the lock, mean an interrupted update.
    if !running && s.state.is_running() && s.state != Step::Rebooting {
        // The process that was updating is gone (killed or power cut): say so instead of
        // claiming it still runs.
        obj.insert("state".into(), json!(Step::Failed));
        obj.insert(
            "message".into(),
            json!(format!(
                "interrupted while {}: {}",
                s.state.words(),
                s.message
            )),
        );
    }
    v
}

/// The exit code and the one line to print for an update's final status.
pub fn outcome(status: &Status) -> (i32, String) {
    let code = match status.state {
        Step::UpToDate | Step::Rebooting | Step::Committed | Step::Idle => EXIT_OK,
        _ => EXIT_FAILED,
    };
    (code, status.message.clone())
}

/// An update that could not start: another one holds the lock (busy), or there is nothing to do.
pub fn busy(e: RunError) -> (i32, String) {
    let code = match e {
        RunError::Busy(_) => EXIT_BUSY,
        RunError::NothingToRollBack(_) => EXIT_FAILED,
    };
    (code, e.to_string())
}

pub fn update(engine: &Engine, force: bool) -> (i32, String) {
    let result = engine.update(Source::Server { force });
    engine.send_reports();
    match result {
        Ok(s) => outcome(&s),
        Err(e) => busy(e),
    }
}

/// Confirms a pending update. With nothing pending it says so and succeeds: it is what every
/// boot after a confirmed one finds, and an earlier failure is no business of this boot.
pub fn confirm(engine: &Engine) -> (i32, String) {
    let before = engine.status.get();
    let result = engine.confirm();
    engine.send_reports();
    match result {
        // A confirm that ran recorded an outcome (committed, rolled back or failed).
        Ok(s) if before.pending.is_none() && s.last_result == before.last_result => {
            let running = engine
                .layout()
                .installed_version()
                .map(|v| format!("version {v} runs"))
                .unwrap_or_else(|| "no release is installed yet".into());
            (
                EXIT_OK,
                format!("nothing to confirm: no update is waiting for confirmation; {running}"),
            )
        }
        // Not healthy at this boot: the box reboots to confirm again.
        Ok(s) if s.state == Step::Rebooting => (EXIT_FAILED, s.message),
        Ok(s) => outcome(&s),
        Err(e) => busy(e),
    }
}

pub fn rollback(engine: &Engine) -> (i32, String) {
    let result = engine.rollback("asked for by hand");
    engine.send_reports();
    match result {
        Ok(s) => (
            if s.state == Step::RolledBack {
                EXIT_OK
            } else {
                EXIT_FAILED
            },
            s.message,
        ),
        Err(e) => busy(e),
    }
}

pub fn check(engine: &Engine) -> Result<serde_json::Value> {
    let offer = crate::updater::states::checking::check(engine)?;
    // The server answered: a moment to send what waits.
    engine.send_reports();
    Ok(serde_json::to_value(offer)?)
}
