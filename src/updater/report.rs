//! The box's side of the fleet protocol (`crate::fleet::protocol`): its id, the headers it sends
//! on every request, and the reports of its update attempts, kept in an outbox under
//! `var/lib/box-updater/` until the server has them. Reporting never fails an update: a report
//! that can't be sent waits for the next chance, and one the server can't take is dropped.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::Value;

use crate::fleet::protocol::{
    self, HEADER_ID, HEADER_STATE, HEADER_VERSION, PROTOCOL_VERSION, REPORT_PATH, Report,
};
use crate::fsutil::{TempPath, fsync_dir, rename_noreplace, temp_sibling, write_atomic};
use crate::updater::config;
use crate::updater::http::{HeaderSource, Http, Posted};
use crate::updater::layout::Layout;
use crate::updater::status::StatusStore;

/// Reports kept while the server can't be reached; the oldest go first.
pub const OUTBOX_MAX: usize = 16;

/// The box's id: `box_id` from the box config when it names this box (a positive number, or a
/// string of the protocol's alphabet), else an id of its own, created once and kept in
/// `var/lib/box-updater/box_id` (many boxes still carry the template's `box_id: 0`).
pub fn box_id(layout: &Layout, box_config: &Path) -> String {
    let from_config = config::read(box_config)
        .ok()
        .and_then(|m| m.get("box_id").cloned());
    match from_config {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n > 0) => return n.to_string(),
        Some(Value::String(s)) if protocol::valid_id(&s) && s != "0" => return s,
        Some(Value::Number(_)) | Some(Value::Null) | None => {}
        Some(Value::String(s)) if s.is_empty() || s == "0" => {}
        Some(other) => log::warn!(
            "box_id {other} in the box config can't name the box to the update server (1 to 64 \
             of A-Z a-z 0-9 . _ : -); using an id of its own"
        ),
    }
    own_id(&layout.state_dir())
}

fn id_file(state_dir: &Path) -> PathBuf {
    state_dir.join("box_id")
}

fn read_own_id(state_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(id_file(state_dir)).ok()?;
    let id = text.trim();
    protocol::valid_id(id).then(|| id.to_string())
}

/// The box's own random id, created on first use: written to a temp file, synced, and renamed
/// into place unless another process got there first (then that one's id is the id).
fn own_id(state_dir: &Path) -> String {
    if let Some(id) = read_own_id(state_dir) {
        return id;
    }
    let id = match crate::fleet::random_hex(16) {
        Ok(hex) => format!("auto-{hex}"),
        Err(e) => {
            log::warn!("cannot read random bytes for the box's id: {e}");
            format!(
                "auto-{:x}{:x}",
                std::process::id(),
                crate::fsutil::unix_now()
            )
        }
    };
    let path = id_file(state_dir);
    let written = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(state_dir)?;
        let tmp = TempPath::new(temp_sibling(&path, "new"));
        write_atomic(tmp.path(), format!("{id}\n").as_bytes(), 0o644)?;
        rename_noreplace(tmp.path(), &path)?;
        tmp.disarm();
        fsync_dir(state_dir)
    })();
    match written {
        Ok(()) => id,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            read_own_id(state_dir).unwrap_or(id)
        }
        Err(e) => {
            log::warn!(
                "cannot keep the box's id in {}: {e}; it will differ after a restart",
                path.display()
            );
            id
        }
    }
}

/// The fleet headers of every request: id, installed version, update step.
pub fn header_source(id: String, layout: Layout, status: StatusStore) -> HeaderSource {
    std::sync::Arc::new(move || {
        let version = layout
            .installed_version()
            .map(|v| v.to_string())
            .unwrap_or_else(|| "none".into());
        vec![
            (HEADER_ID, id.clone()),
            (HEADER_VERSION, version),
            (HEADER_STATE, status.get().state.name().to_string()),
        ]
    })
}

/// Reports waiting to be sent, in `var/lib/box-updater/reports.json`.
pub struct Outbox {
    path: PathBuf,
    /// One flush or change at a time in this process.
    turn: Mutex<()>,
}

impl Outbox {
    pub fn new(state_dir: &Path) -> Outbox {
        Outbox {
            path: state_dir.join("reports.json"),
            turn: Mutex::new(()),
        }
    }

    fn read(&self) -> Vec<Report> {
        let Ok(bytes) = std::fs::read(&self.path) else {
            return Vec::new();
        };
        serde_json::from_slice::<Vec<Report>>(&bytes).unwrap_or_else(|e| {
            log::warn!(
                "dropping the unreadable report outbox {}: {e}",
                self.path.display()
            );
            Vec::new()
        })
    }

    fn write(&self, reports: &[Report]) {
        let result = if reports.is_empty() {
            match std::fs::remove_file(&self.path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let json = serde_json::to_vec_pretty(reports).expect("reports serialize");
            write_atomic(&self.path, &json, 0o644)
        };
        if let Err(e) = result {
            log::warn!(
                "cannot write the report outbox {}: {e}",
                self.path.display()
            );
        }
    }

    /// Reports not yet sent.
    pub fn pending(&self) -> Vec<Report> {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        self.read()
    }

    /// Keeps `report` for sending, durably (before a reboot can cut the process off).
    pub fn queue(&self, mut report: Report) {
        report.v = PROTOCOL_VERSION;
        report.message = protocol::bounded_message(&report.message);
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.read();
        all.push(report);
        let extra = all.len().saturating_sub(OUTBOX_MAX);
        all.drain(..extra);
        self.write(&all);
    }

    /// Sends what waits to the update server named in `box_config`, oldest first, until one
    /// has to wait for later. Returns how many the server took.
    pub fn flush(&self, http: &Http, box_config: &Path) -> usize {
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.read();
        if all.is_empty() {
            return 0;
        }
        let Ok(server) = config::updates_ep(box_config) else {
            return 0;
        };
        let url = format!("{server}{REPORT_PATH}");
        let mut taken = 0;
        while let Some(report) = all.first() {
            let body = serde_json::to_vec(report).expect("reports serialize");
            match http.post_report(&url, &body) {
                Posted::Taken => {
                    taken += 1;
                    all.remove(0);
                }
                Posted::NotSpoken(status) => {
                    log::info!(
                        "the update server does not take reports ({url} answered {status}); dropping {}",
                        all.len()
                    );
                    all.clear();
                }
                Posted::Refused(status, why) => {
                    log::warn!("the update server refused a report ({status}): {why}");
                    all.remove(0);
                }
                Posted::Later(why) => {
                    log::info!("report not sent, kept for later: {why}");
                    break;
                }
            }
        }
        self.write(&all);
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_comes_from_the_config_or_is_made_once() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path());
        let cfg = d.path().join("box.json");
        for (config, want) in [
            (r#"{"box_id": 7}"#, Some("7")),
            (r#"{"box_id": "pq-box-12"}"#, Some("pq-box-12")),
            (r#"{"box_id": 0}"#, None),
            (r#"{"box_id": "0"}"#, None),
            (r#"{"box_id": "no spaces allowed"}"#, None),
            (r#"{"box_id": -3}"#, None),
            (r#"{}"#, None),
        ] {
            std::fs::write(&cfg, config).unwrap();
            let id = box_id(&layout, &cfg);
            match want {
                Some(w) => assert_eq!(id, w, "{config}"),
                None => {
                    assert!(id.starts_with("auto-") && id.len() == 37, "{config}: {id}");
                    assert!(protocol::valid_id(&id));
                }
            }
        }
        std::fs::write(&cfg, "{}").unwrap();
        let first = box_id(&layout, &cfg);
        assert_eq!(box_id(&layout, &cfg), first, "kept");
        assert_eq!(
            std::fs::read_to_string(layout.state_dir().join("box_id")).unwrap(),
            format!("{first}\n")
        );
        let leftovers: Vec<_> = std::fs::read_dir(layout.state_dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }
}
