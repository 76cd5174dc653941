//! The fleet as this server knows it, in memory: one record per box, changed by every request
//! and report in a few hundred nanoseconds under one of several locks, and marked for the store's
//! next batch. Requests never wait on the database; the database only ever catches up.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use serde::{Deserialize, Serialize};

use super::protocol::{Outcome, Report};
use super::rollout::{Rollout, Rollouts};
use crate::updater::status::Step;

const SHARDS: usize = 16;
/// A box seen again with nothing else new is written at most this often: `last_seen` in the
/// database is that coarse (in memory it is exact).
pub const SEEN_WRITE_SECS: u64 = 60;
/// Attempts kept per box, newest last: enough for every release a rollout could still be
/// counting.
const ATTEMPTS_KEPT: usize = 8;
/// The longest user agent kept.
const MAX_USER_AGENT: usize = 200;
/// Reports per box: a burst of this many (a box's queue after an outage), then one per
/// `REPORT_REFILL_SECS`.
pub const REPORT_BURST: f64 = 20.0;
pub const REPORT_REFILL_SECS: f64 = 10.0;

/// One update attempt of a box on one release.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub version: u64,
    pub outcome: Outcome,
    /// When this server heard of it (the box's clock is not trusted for ordering).
    pub at: u64,
}

/// What is known of one box. Fields come in groups, each with the time it was last set, so that
/// two servers' views of a box merge field group by field group (see [`BoxRecord::merge`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BoxRecord {
    /// The box's own id; `None` for an old box, known by its address.
    pub id: Option<String>,
    pub address: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub version: Option<u64>,
    pub state: Option<Step>,
    pub first_seen: u64,
    pub last_seen: u64,
    /// The last version `/version` or `/latest` offered it.
    pub offered: Option<u64>,
    pub offered_at: u64,
    /// The last image it downloaded.
    pub downloaded: Option<u64>,
    pub downloaded_at: u64,
    pub report: Option<Report>,
    pub reported_at: u64,
    pub attempts: Vec<Attempt>,
    pub last_success: Option<u64>,
    pub last_success_at: u64,
}

impl BoxRecord {
    /// Takes from `other` each field group it has newer, or as new; the database's upsert does
    /// the same.
    pub fn merge(&mut self, other: &BoxRecord) {
        self.merge_with(other, true);
    }

    /// The same; on a tie, `other` wins only if `ties` (memory changed since the row was
    /// written keeps what it has: the change goes to the database next).
    fn merge_with(&mut self, other: &BoxRecord, ties: bool) {
        let newer = |theirs: u64, ours: u64| theirs > ours || (ties && theirs == ours);
        if newer(other.last_seen, self.last_seen) {
            self.id.clone_from(&other.id);
            self.address = other.address;
            self.user_agent.clone_from(&other.user_agent);
            self.version = other.version;
            self.state = other.state;
            self.last_seen = other.last_seen;
        }
        if self.first_seen == 0 || (other.first_seen != 0 && other.first_seen < self.first_seen) {
            self.first_seen = other.first_seen;
        }
        if newer(other.offered_at, self.offered_at) {
            self.offered = other.offered;
            self.offered_at = other.offered_at;
        }
        if newer(other.downloaded_at, self.downloaded_at) {
            self.downloaded = other.downloaded;
            self.downloaded_at = other.downloaded_at;
        }
        if newer(other.reported_at, self.reported_at) {
            self.report.clone_from(&other.report);
            self.attempts.clone_from(&other.attempts);
            self.reported_at = other.reported_at;
        }
        if newer(other.last_success_at, self.last_success_at) {
            self.last_success = other.last_success;
            self.last_success_at = other.last_success_at;
        }
    }

    /// The last outcome on `version`, if it is known.
    pub fn attempt(&self, version: u64) -> Option<&Attempt> {
        self.attempts.iter().rev().find(|a| a.version == version)
    }
}

/// Who sent a request, as far as it says.
#[derive(Debug, Clone, Copy, Default)]
pub struct Client<'a> {
    pub id: Option<&'a str>,
    pub address: Option<IpAddr>,
    pub user_agent: Option<&'a str>,
    pub version: Option<u64>,
    pub state: Option<Step>,
}

impl Client<'_> {
    /// The box's key: its id, else its address (an old box); `None` when neither is known.
    pub fn key(&self) -> Option<String> {
        match (self.id, self.address) {
            (Some(id), _) => Some(format!("id:{id}")),
            (None, Some(a)) => Some(format!("addr:{a}")),
            (None, None) => None,
        }
    }
}

/// What a request did besides being seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    Seen,
    Offered(u64),
    Downloaded(u64),
}

/// Why a report was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The box sent too many; retry after this many seconds.
    RateLimited(u64),
    /// The fleet holds as many boxes as it may.
    Full,
}

struct Entry {
    rec: BoxRecord,
    dirty: bool,
    written_seen: u64,
    tokens: f64,
    tokens_at: u64,
}

#[derive(Default)]
struct Shard {
    boxes: HashMap<String, Entry>,
    dirty: Vec<String>,
}

/// How the store is doing, for the operator's view.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreHealth {
    pub kind: &'static str,
    pub location: String,
    /// The last error, while the database can't be written; cleared by the next success.
    pub error: Option<String>,
    pub error_since: Option<u64>,
    pub last_write: Option<u64>,
}

pub struct Fleet {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    count: AtomicUsize,
    max_boxes: usize,
    full_warned: AtomicBool,
    rollouts: RwLock<Arc<Rollouts>>,
    health: Mutex<StoreHealth>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_str(slot: &mut Option<String>, value: &str, max: usize) -> bool {
    let value = if value.len() > max {
        // Cut on a character boundary.
        let mut end = max;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        &value[..end]
    } else {
        value
    };
    if slot.as_deref() == Some(value) {
        return false;
    }
    *slot = Some(value.to_string());
    true
}

impl Fleet {
    pub fn new(max_boxes: usize) -> Fleet {
        Fleet {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: Default::default(),
            count: AtomicUsize::new(0),
            max_boxes,
            full_warned: AtomicBool::new(false),
            rollouts: RwLock::new(Arc::new(Rollouts::default())),
            health: Mutex::new(StoreHealth::default()),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let mut h = self.hasher.build_hasher();
        h.write(key.as_bytes());
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The entry for `key`, created when there is room.
    fn entry<'s>(
        &self,
        boxes: &'s mut HashMap<String, Entry>,
        key: &str,
        now: u64,
    ) -> Option<&'s mut Entry> {
        if !boxes.contains_key(key) {
            if self.count.load(Ordering::Relaxed) >= self.max_boxes {
                if !self.full_warned.swap(true, Ordering::Relaxed) {
                    log::warn!(
                        "the fleet holds {} boxes, its limit (max_boxes): new boxes are served but not recorded",
                        self.max_boxes
                    );
                }
                return None;
            }
            self.count.fetch_add(1, Ordering::Relaxed);
            boxes.insert(
                key.to_string(),
                Entry {
                    rec: BoxRecord {
                        first_seen: now,
                        ..BoxRecord::default()
                    },
                    dirty: false,
                    written_seen: 0,
                    tokens: REPORT_BURST,
                    tokens_at: now,
                },
            );
        }
        boxes.get_mut(key)
    }

    fn mark(shard_dirty: &mut Vec<String>, e: &mut Entry, key: &str, changed: bool, now: u64) {
        if !e.dirty && (changed || now.saturating_sub(e.written_seen) >= SEEN_WRITE_SECS) {
            e.dirty = true;
            shard_dirty.push(key.to_string());
        }
    }

    /// Applies what a request says about the box `client` (known by `key`) to its record.
    fn apply_client(rec: &mut BoxRecord, client: &Client<'_>, now: u64) -> bool {
        let mut changed = false;
        if let Some(id) = client.id {
            changed |= set_str(&mut rec.id, id, usize::MAX);
        }
        if client.address.is_some() && client.address != rec.address {
            rec.address = client.address;
            changed = true;
        }
        if let Some(ua) = client.user_agent {
            changed |= set_str(&mut rec.user_agent, ua, MAX_USER_AGENT);
        }
        if client.version.is_some() && client.version != rec.version {
            rec.version = client.version;
            changed = true;
        }
        if client.state.is_some() && client.state != rec.state {
            rec.state = client.state;
            changed = true;
        }
        rec.last_seen = rec.last_seen.max(now);
        changed
    }

    /// Records a request from `client` (a box, or an old box by its address).
    pub fn touch(&self, key: &str, client: &Client<'_>, touch: Touch, now: u64) {
        let mut shard = lock(self.shard(key));
        let shard = &mut *shard;
        let Some(e) = self.entry(&mut shard.boxes, key, now) else {
            return;
        };
        let mut changed = Self::apply_client(&mut e.rec, client, now);
        match touch {
            Touch::Seen => {}
            Touch::Offered(v) => {
                changed |= e.rec.offered != Some(v);
                e.rec.offered = Some(v);
                e.rec.offered_at = now;
            }
            Touch::Downloaded(v) => {
                changed |= e.rec.downloaded != Some(v);
                e.rec.downloaded = Some(v);
                e.rec.downloaded_at = now;
            }
        }
        Self::mark(&mut shard.dirty, e, key, changed, now);
    }

    /// Records a box's report, unless the box sent too many lately.
    pub fn report(
        &self,
        key: &str,
        client: &Client<'_>,
        report: Report,
        now: u64,
    ) -> Result<(), Refusal> {
        let mut shard = lock(self.shard(key));
        let shard = &mut *shard;
        let Some(e) = self.entry(&mut shard.boxes, key, now) else {
            return Err(Refusal::Full);
        };
        let refill = now.saturating_sub(e.tokens_at) as f64 / REPORT_REFILL_SECS;
        e.tokens = (e.tokens + refill).min(REPORT_BURST);
        e.tokens_at = now;
        if e.tokens < 1.0 {
            return Err(Refusal::RateLimited(
                ((1.0 - e.tokens) * REPORT_REFILL_SECS).ceil() as u64,
            ));
        }
        e.tokens -= 1.0;
        let rec = &mut e.rec;
        Self::apply_client(rec, client, now);
        if client.version.is_none() && report.running_version.is_some() {
            rec.version = report.running_version;
        }
        if client.state.is_none() {
            rec.state = Some(match report.outcome {
                Outcome::Committed => Step::Committed,
                Outcome::Failed => Step::Failed,
                Outcome::RolledBack => Step::RolledBack,
            });
        }
        if let Some(v) = report.target_version {
            rec.attempts.retain(|a| a.version != v);
            rec.attempts.push(Attempt {
                version: v,
                outcome: report.outcome,
                at: now,
            });
            let extra = rec.attempts.len().saturating_sub(ATTEMPTS_KEPT);
            rec.attempts.drain(..extra);
            if report.outcome == Outcome::Committed {
                rec.last_success = Some(v);
                rec.last_success_at = now;
            }
        }
        rec.report = Some(report);
        rec.reported_at = now;
        Self::mark(&mut shard.dirty, e, key, true, now);
        Ok(())
    }

    /// Up to `max` records changed since they were last taken, for the store; they count as
    /// written from now.
    pub fn take_dirty(&self, max: usize) -> Vec<(String, BoxRecord)> {
        let mut out = Vec::new();
        for s in &self.shards {
            let room = max - out.len();
            if room == 0 {
                break;
            }
            let mut shard = lock(s);
            let shard = &mut *shard;
            let n = shard.dirty.len().min(room);
            let keys: Vec<String> = shard.dirty.drain(..n).collect();
            for key in keys {
                if let Some(e) = shard.boxes.get_mut(&key) {
                    e.dirty = false;
                    e.written_seen = e.rec.last_seen;
                    out.push((key, e.rec.clone()));
                }
            }
        }
        out
    }

    /// Marks records for the next batch again, after a write failed.
    pub fn requeue(&self, keys: impl IntoIterator<Item = String>) {
        for key in keys {
            let mut shard = lock(self.shard(&key));
            let shard = &mut *shard;
            if let Some(e) = shard.boxes.get_mut(&key)
                && !e.dirty
            {
                e.dirty = true;
                shard.dirty.push(key);
            }
        }
    }

    /// Merges records read from the store (written by this or another server) into memory.
    pub fn absorb(&self, rows: Vec<(String, BoxRecord)>, now: u64) {
        for (key, row) in rows {
            let mut shard = lock(self.shard(&key));
            let shard = &mut *shard;
            match shard.boxes.get_mut(&key) {
                Some(e) => {
                    e.rec.merge_with(&row, !e.dirty);
                    e.written_seen = e.written_seen.max(row.last_seen);
                }
                None => {
                    if self.count.load(Ordering::Relaxed) >= self.max_boxes {
                        continue;
                    }
                    self.count.fetch_add(1, Ordering::Relaxed);
                    let seen = row.last_seen;
                    shard.boxes.insert(
                        key,
                        Entry {
                            rec: row,
                            dirty: false,
                            written_seen: seen,
                            tokens: REPORT_BURST,
                            tokens_at: now,
                        },
                    );
                }
            }
        }
    }

    /// Boxes known.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records waiting for the store.
    pub fn pending(&self) -> usize {
        self.shards.iter().map(|s| lock(s).dirty.len()).sum()
    }

    /// Calls `f` with every box, shard by shard (each shard locked only while it is read).
    pub fn for_each(&self, mut f: impl FnMut(&str, &BoxRecord)) {
        for s in &self.shards {
            let shard = lock(s);
            for (k, e) in &shard.boxes {
                f(k, &e.rec);
            }
        }
    }

    /// Calls `f` with the record of `key`, if it is there, under its shard's lock.
    pub fn with(&self, key: &str, f: impl FnOnce(&BoxRecord)) {
        if let Some(e) = lock(self.shard(key)).boxes.get(key) {
            f(&e.rec);
        }
    }

    /// One box's record.
    pub fn get(&self, key: &str) -> Option<BoxRecord> {
        lock(self.shard(key)).boxes.get(key).map(|e| e.rec.clone())
    }

    pub fn rollouts(&self) -> Arc<Rollouts> {
        self.rollouts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_rollouts(&self, r: Rollouts) {
        let mut cur = self.rollouts.write().unwrap_or_else(|e| e.into_inner());
        if **cur != r {
            *cur = Arc::new(r);
        }
    }

    /// Boxes of `rollout`'s share that reported on its version since it last (re)started
    /// counting: (failed or rolled back, all).
    pub fn rollout_outcomes(&self, rollout: &Rollout, now: u64) -> (u32, u32) {
        let (mut bad, mut all) = (0u32, 0u32);
        self.for_each(|key, rec| {
            if let Some(a) = rec.attempt(rollout.version)
                && a.at >= rollout.counted_from
                && rollout.includes(key, now)
            {
                all += 1;
                if a.outcome.is_bad() {
                    bad += 1;
                }
            }
        });
        (bad, all)
    }

    pub fn health(&self) -> StoreHealth {
        lock(&self.health).clone()
    }

    pub fn set_health(&self, f: impl FnOnce(&mut StoreHealth)) {
        f(&mut lock(&self.health));
    }
}

/// Counts of boxes on one release.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub running: u32,
    pub offered: u32,
    pub downloaded: u32,
    pub committed: u32,
    pub failed: u32,
    pub rolled_back: u32,
}

impl Progress {
    pub fn add(&mut self, version: u64, rec: &BoxRecord) {
        self.running += u32::from(rec.version == Some(version));
        self.offered += u32::from(rec.offered == Some(version));
        self.downloaded += u32::from(rec.downloaded == Some(version));
        if let Some(a) = rec.attempt(version) {
            match a.outcome {
                Outcome::Committed => self.committed += 1,
                Outcome::Failed => self.failed += 1,
                Outcome::RolledBack => self.rolled_back += 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str) -> Client<'_> {
        Client {
            id: Some(id),
            address: Some("10.0.0.9".parse().unwrap()),
            user_agent: Some("box-updater/0.1.0"),
            version: Some(100),
            state: Some(Step::Idle),
        }
    }

    fn report(outcome: Outcome, target: u64) -> Report {
        Report {
            v: 1,
            box_id: "b1".into(),
            outcome,
            target_version: Some(target),
            running_version: Some(100),
            previous_version: Some(100),
            step: None,
            message: "m".into(),
            started_at: None,
            finished_at: None,
            durations_ms: Default::default(),
        }
    }

    #[test]
    fn requests_mark_a_box_for_writing_only_when_something_changed() {
        let f = Fleet::new(10);
        let c = client("b1");
        f.touch("id:b1", &c, Touch::Seen, 1000);
        assert_eq!(f.take_dirty(usize::MAX).len(), 1);
        f.touch("id:b1", &c, Touch::Seen, 1001);
        assert!(
            f.take_dirty(usize::MAX).is_empty(),
            "only last_seen changed"
        );
        f.touch("id:b1", &c, Touch::Offered(200), 1002);
        let batch = f.take_dirty(usize::MAX);
        assert_eq!(batch[0].1.offered, Some(200));
        f.touch("id:b1", &c, Touch::Seen, 1001 + SEEN_WRITE_SECS);
        assert!(
            f.take_dirty(usize::MAX).is_empty(),
            "not yet a minute after the last write"
        );
        f.touch("id:b1", &c, Touch::Seen, 1002 + SEEN_WRITE_SECS);
        assert_eq!(f.take_dirty(usize::MAX).len(), 1, "seen a minute later");
        assert_eq!(f.get("id:b1").unwrap().last_seen, 1002 + SEEN_WRITE_SECS);
    }

    #[test]
    fn reports_are_rate_limited_per_box() {
        let f = Fleet::new(10);
        let c = client("b1");
        for i in 0..REPORT_BURST as u64 {
            f.report("id:b1", &c, report(Outcome::Failed, 200 + i), 1000)
                .unwrap();
        }
        assert_eq!(
            f.report("id:b1", &c, report(Outcome::Failed, 300), 1000),
            Err(Refusal::RateLimited(10))
        );
        assert!(
            f.report("id:b2", &client("b2"), report(Outcome::Failed, 300), 1000)
                .is_ok(),
            "another box is not held up"
        );
        assert!(
            f.report("id:b1", &c, report(Outcome::Committed, 300), 1010)
                .is_ok()
        );
        let rec = f.get("id:b1").unwrap();
        assert_eq!(rec.attempts.len(), ATTEMPTS_KEPT);
        assert_eq!(rec.attempt(300).unwrap().outcome, Outcome::Committed);
        assert_eq!((rec.last_success, rec.last_success_at), (Some(300), 1010));
    }

    #[test]
    fn the_fleet_is_bounded() {
        let f = Fleet::new(2);
        for i in 0..5 {
            let id = format!("b{i}");
            f.touch(&format!("id:{id}"), &client(&id), Touch::Seen, 1);
        }
        assert_eq!(f.len(), 2);
        assert_eq!(
            f.report("id:b9", &client("b9"), report(Outcome::Failed, 1), 1),
            Err(Refusal::Full)
        );
    }

    #[test]
    fn records_merge_group_by_group() {
        let mut a = BoxRecord {
            version: Some(1),
            last_seen: 10,
            first_seen: 5,
            offered: Some(2),
            offered_at: 10,
            ..Default::default()
        };
        let b = BoxRecord {
            version: Some(2),
            last_seen: 20,
            first_seen: 7,
            offered: Some(3),
            offered_at: 5,
            report: Some(report(Outcome::Committed, 2)),
            reported_at: 19,
            ..Default::default()
        };
        a.merge(&b);
        assert_eq!(
            (a.version, a.last_seen, a.first_seen, a.offered),
            (Some(2), 20, 5, Some(2))
        );
        assert!(a.report.is_some());
        let before = a.clone();
        a.merge(&before);
        assert_eq!(a, before, "merging is idempotent");

        // A box changed again within the same second as the row that comes back from the
        // database keeps its change.
        let f = Fleet::new(10);
        let mut c = client("b1");
        f.touch("id:b1", &c, Touch::Seen, 50);
        let written = f.take_dirty(usize::MAX);
        c.state = Some(Step::Downloading);
        f.touch("id:b1", &c, Touch::Seen, 50);
        f.absorb(written, 50);
        assert_eq!(f.get("id:b1").unwrap().state, Some(Step::Downloading));
    }
}
