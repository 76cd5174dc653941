//! The fleet: what every box runs and how its updates went (from its requests and reports), the
//! operator's view of it, and staged rollouts that decide which version a box is offered.
//!
//! Requests only touch memory (`model`); a background thread (`sync`) writes batches to the
//! database (`store`), reads what other servers wrote, and halts rollouts whose boxes fail.

pub mod admin;
pub mod model;
pub mod protocol;
pub mod rollout;
pub mod store;
pub mod sync;
pub mod web;

use std::sync::Arc;

use anyhow::Result;

use store::Database;

/// A fresh random hex string of `bytes` bytes, from the kernel.
pub fn random_hex(bytes: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(hex::encode(buf))
}

/// How the fleet is set up: the database, and what it may hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    pub database: Database,
    /// Given by the operator (an error to open is fatal), or the default beside the update
    /// directory (an error to open turns the fleet off, and the server serves as before).
    pub explicit: bool,
    pub token: Option<String>,
    pub max_boxes: usize,
}

/// Opens the database, loads the fleet into memory and starts the thread that keeps them in
/// step. The service it gives the routes works without a fleet too, as the server did before.
pub fn start(s: &FleetSettings) -> Result<(web::Service, Option<sync::Syncer>)> {
    let off = |why: String| web::Service {
        fleet: None,
        unavailable: Some(why),
        token: s.token.clone(),
    };
    let mut store = match store::open(&s.database) {
        Ok(st) => st,
        Err(e) if !s.explicit => {
            log::warn!(
                "fleet: off, images are served as before: {e:#}; pass --database PATH on a writable disk to keep the fleet"
            );
            return Ok((off(format!("{e:#}")), None));
        }
        Err(e) => return Err(e),
    };
    let fleet = Arc::new(model::Fleet::new(s.max_boxes));
    sync::load(&fleet, store.as_mut())?;
    fleet.set_health(|h| {
        h.kind = store.kind();
        h.location = s.database.to_string();
    });
    log::info!(
        "fleet: {} boxes and {} rollouts from {}",
        fleet.len(),
        fleet.rollouts().by_version.len(),
        s.database
    );
    let origin = random_hex(8)?;
    let syncer = sync::Syncer::start(fleet.clone(), store, origin)?;
    Ok((
        web::Service {
            fleet: Some(fleet),
            unavailable: None,
            token: s.token.clone(),
        },
        Some(syncer),
    ))
}
