//! The fleet's one background thread between memory and the database: it writes the records that
//! changed in batches, reads the rollouts and what other servers wrote, and halts a rollout whose
//! boxes fail past its threshold. While the database is away it keeps trying, with backoff, and
//! requests go on being answered from memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::model::Fleet;
use super::rollout::RolloutState;
use super::store::Store;
use crate::fsutil::unix_now;

/// How often changed records are written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How often rollouts and other servers' writes are read, and halts decided.
pub const PULL_EVERY: Duration = Duration::from_secs(1);
/// Records per write: bounds the copies a write holds, whatever the number of boxes.
const BATCH_MAX: usize = 2000;
/// Other servers' rows are read again this far back, for transactions that committed late.
const PULL_OVERLAP_MS: u64 = 5_000;
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Loads the whole fleet and the rollouts into memory, before the server answers anything.
pub fn load(fleet: &Fleet, store: &mut dyn Store) -> Result<()> {
    let rows = store.load_boxes(None).context("reading the boxes")?;
    fleet.absorb(rows, unix_now());
    fleet.set_rollouts(store.load_rollouts().context("reading the rollouts")?);
    Ok(())
}

/// The running thread; `stop` writes what is left and ends it.
pub struct Syncer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Syncer {
    pub fn start(fleet: Arc<Fleet>, store: Box<dyn Store>, origin: String) -> Result<Syncer> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("fleet-sync".into())
                .spawn(move || Worker::new(fleet, store, origin).run(&stop))
                .context("cannot start the fleet's database thread")?
        };
        Ok(Syncer { stop, handle })
    }

    /// Writes what is still in memory and ends the thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.thread().unpark();
        let _ = self.handle.join();
    }
}

struct Worker {
    fleet: Arc<Fleet>,
    store: Box<dyn Store>,
    origin: String,
    pulled_from: u64,
    failures: u32,
    retry_at: Instant,
}

impl Worker {
    fn new(fleet: Arc<Fleet>, store: Box<dyn Store>, origin: String) -> Worker {
        Worker {
            fleet,
            store,
            origin,
            pulled_from: now_ms().saturating_sub(PULL_OVERLAP_MS),
            failures: 0,
            retry_at: Instant::now(),
        }
    }

    fn run(mut self, stop: &AtomicBool) {
        let mut last_pull = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            std::thread::park_timeout(FLUSH_EVERY);
            if Instant::now() < self.retry_at {
                continue;
            }
            let mut result = self.flush();
            if result.is_ok() && last_pull.elapsed() >= PULL_EVERY {
                last_pull = Instant::now();
                result = self.pull().and_then(|()| self.halts());
            }
            self.outcome(result);
        }
        // The last batch; a database that is away now loses what only memory held.
        if let Err(e) = self.flush() {
            log::warn!(
                "fleet: {} box records not written at the stop: {e:#}",
                self.fleet.pending()
            );
        }
    }

    fn outcome(&mut self, result: Result<()>) {
        match result {
            Ok(()) => {
                if self.failures > 0 {
                    log::info!("fleet: the database is back");
                    self.fleet.set_health(|h| {
                        h.error = None;
                        h.error_since = None;
                    });
                }
                self.failures = 0;
            }
            Err(e) => {
                self.failures += 1;
                let wait =
                    (FLUSH_EVERY * 2u32.saturating_pow(self.failures.min(8))).min(MAX_BACKOFF);
                self.retry_at = Instant::now() + wait;
                let text = format!("{e:#}");
                if self.failures == 1 {
                    log::warn!(
                        "fleet: the database failed: {text}; answering from memory, retrying"
                    );
                } else {
                    log::debug!("fleet: the database still fails: {text}");
                }
                self.fleet.set_health(|h| {
                    h.error = Some(text);
                    h.error_since.get_or_insert(unix_now());
                });
                if let Err(e) = self.store.reconnect() {
                    log::debug!("fleet: reconnecting failed: {e:#}");
                }
            }
        }
    }

    /// Writes every changed record, a bounded batch at a time.
    fn flush(&mut self) -> Result<()> {
        loop {
            let batch = self.fleet.take_dirty(BATCH_MAX);
            if batch.is_empty() {
                return Ok(());
            }
            let full = batch.len() == BATCH_MAX;
            match self.store.upsert_boxes(&batch, &self.origin, now_ms()) {
                Ok(merged) => {
                    log::debug!("fleet: wrote {} box records", batch.len());
                    drop(batch);
                    self.fleet.absorb(merged, unix_now());
                    self.fleet.set_health(|h| h.last_write = Some(unix_now()));
                }
                Err(e) => {
                    self.fleet.requeue(batch.into_iter().map(|(k, _)| k));
                    return Err(e.context("writing box records"));
                }
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn pull(&mut self) -> Result<()> {
        let started = now_ms();
        self.fleet.set_rollouts(self.store.load_rollouts()?);
        let rows = self
            .store
            .load_boxes(Some((self.pulled_from, &self.origin)))?;
        if !rows.is_empty() {
            log::debug!("fleet: read {} box records from other servers", rows.len());
            self.fleet.absorb(rows, unix_now());
        }
        self.pulled_from = started.saturating_sub(PULL_OVERLAP_MS);
        Ok(())
    }

    /// Halts each active rollout whose share's failures passed its threshold.
    fn halts(&mut self) -> Result<()> {
        let now = unix_now();
        let rollouts = self.fleet.rollouts();
        let mut changed = false;
        for r in rollouts.by_version.values() {
            if r.state != RolloutState::Active {
                continue;
            }
            let (bad, all) = self.fleet.rollout_outcomes(r, now);
            let Some(reason) = r.halt_reason(bad, all) else {
                continue;
            };
            let mut halted = false;
            self.store.change_rollout(r.version, &mut |cur| {
                Ok(cur.map(|mut c| {
                    if c.state == RolloutState::Active {
                        c.halted_share = c.share_at(now);
                        c.state = RolloutState::Halted;
                        c.reason = reason.clone();
                        c.changed_at = now;
                        halted = true;
                    }
                    c
                }))
            })?;
            if halted {
                log::warn!("fleet: rollout of version {} {reason}", r.version);
            }
            changed = true;
        }
        if changed {
            self.fleet.set_rollouts(self.store.load_rollouts()?);
        }
        Ok(())
    }
}
