//! Staged rollouts: which boxes a release is offered to, how a share widens over time, and when
//! failures halt it. Everything here is a pure function of a rollout's record, a box's key and
//! the time, so that every server sharing one database offers the same box the same version.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Shares are kept in basis points (1/100 of a percent): `--percent 0.5` is 50.
pub const FULL: u32 = 10_000;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Offered to its share, widening on schedule if it has one.
    Active,
    /// Stopped widening after too many failures (or by hand); the share it had stays.
    Halted,
    /// Offered to nobody.
    Withdrawn,
}

impl RolloutState {
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Halted => "halted",
            RolloutState::Withdrawn => "withdrawn",
        }
    }

    pub fn parse(s: &str) -> Option<RolloutState> {
        [
            RolloutState::Active,
            RolloutState::Halted,
            RolloutState::Withdrawn,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

/// One release's rollout, as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rollout {
    pub version: u64,
    pub state: RolloutState,
    /// The share set by the operator, in basis points, as of `changed_at`.
    pub share: u32,
    /// Widening: `step` basis points more every `every_secs` seconds after `changed_at`.
    pub step: u32,
    pub every_secs: u64,
    /// The share a halt froze.
    pub halted_share: u32,
    /// Why it halted or was withdrawn.
    pub reason: String,
    /// The threshold: halt once at least `halt_failures` boxes of the share failed or rolled
    /// back and they are at least `halt_share` basis points of the boxes that reported on it.
    pub halt_failures: u32,
    pub halt_share: u32,
    pub started_at: u64,
    pub changed_at: u64,
    /// Outcomes before this moment (the last resume) no longer count towards a halt.
    pub counted_from: u64,
}

/// A box's place in a release's rollout: `0..FULL`, the same on every server and every run.
pub fn bucket(key: &str, version: u64) -> u32 {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update(b"\n");
    h.update(version.to_string().as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (n % u64::from(FULL)) as u32
}

impl Rollout {
    /// The share offered at `now`, in basis points.
    pub fn share_at(&self, now: u64) -> u32 {
        match self.state {
            RolloutState::Withdrawn => 0,
            RolloutState::Halted => self.halted_share,
            RolloutState::Active => {
                let steps = if self.step > 0 && self.every_secs > 0 {
                    now.saturating_sub(self.changed_at) / self.every_secs
                } else {
                    0
                };
                let widened = u64::from(self.share) + steps.saturating_mul(u64::from(self.step));
                widened.min(u64::from(FULL)) as u32
            }
        }
    }

    /// Whether the box with `key` is offered this release at `now`.
    pub fn includes(&self, key: &str, now: u64) -> bool {
        let share = self.share_at(now);
        share >= FULL || (share > 0 && bucket(key, self.version) < share)
    }

    /// Whether failures should halt it: `failed` boxes of `reported` (both within the share,
    /// counted since `counted_from`). Gives the reason when they should.
    pub fn halt_reason(&self, failed: u32, reported: u32) -> Option<String> {
        if self.state != RolloutState::Active || failed == 0 || failed < self.halt_failures {
            return None;
        }
        let share = u64::from(failed) * u64::from(FULL) / u64::from(reported.max(failed));
        if share < u64::from(self.halt_share) {
            return None;
        }
        Some(format!(
            "halted automatically: {failed} of {reported} boxes that reported on version {} \
             failed or rolled back ({}); the threshold is {} {} and {}",
            self.version,
            percent(share as u32),
            self.halt_failures,
            if self.halt_failures == 1 {
                "box"
            } else {
                "boxes"
            },
            percent(self.halt_share)
        ))
    }
}

/// Basis points as a percentage for people: "12.5 %".
pub fn percent(bp: u32) -> String {
    let whole = bp / 100;
    match bp % 100 {
        0 => format!("{whole} %"),
        f if f % 10 == 0 => format!("{whole}.{} %", f / 10),
        f => format!("{whole}.{f:02} %"),
    }
}

/// A percentage as given by an operator ("10", "0.5", "12.25") in basis points.
pub fn parse_percent(text: &str) -> Result<u32, String> {
    let bad = || format!("{text:?} is not a percentage from 0 to 100 (at most two decimals)");
    let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty()
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let frac: u64 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    let bp = whole.saturating_mul(100).saturating_add(frac);
    if bp > u64::from(FULL) {
        return Err(bad());
    }
    Ok(bp as u32)
}

/// Every rollout the operators have set, by version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rollouts {
    pub by_version: BTreeMap<u64, Rollout>,
}

impl Rollouts {
    pub fn is_empty(&self) -> bool {
        self.by_version.is_empty()
    }

    /// The version offered to the box with `key`, from `versions` (the published ones, oldest
    /// first): the newest that is fully released or whose rollout includes the box. A version
    /// without a rollout is fully released.
    pub fn offer(
        &self,
        versions: impl DoubleEndedIterator<Item = u64>,
        key: &str,
        now: u64,
    ) -> Option<u64> {
        versions
            .rev()
            .find(|v| self.by_version.get(v).is_none_or(|r| r.includes(key, now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn rollout(version: u64, share: u32) -> Rollout {
        Rollout {
            version,
            state: RolloutState::Active,
            share,
            step: 0,
            every_secs: 0,
            halted_share: 0,
            reason: String::new(),
            halt_failures: 3,
            halt_share: 1000,
            started_at: 0,
            changed_at: 1000,
            counted_from: 0,
        }
    }

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("id:7", 1_700_000_100), bucket("id:7", 1_700_000_100));
        // Pinned: a change of the hash would reshuffle every fleet's rollouts.
        assert_eq!(bucket("id:7", 1_700_000_100), 4482);
        let r = rollout(1_700_000_100, 1000);
        let inside = (0..10_000)
            .filter(|i| r.includes(&format!("id:box-{i}"), 0))
            .count();
        assert!((900..1100).contains(&inside), "{inside} of 10000 at 10 %");
        // Another version draws other boxes first.
        let other = rollout(1_700_000_200, 1000);
        let both = (0..10_000)
            .filter(|i| {
                let k = format!("id:box-{i}");
                r.includes(&k, 0) && other.includes(&k, 0)
            })
            .count();
        assert!(both < 200, "{both}");
    }

    #[test]
    fn shares_widen_on_schedule_and_stop_when_halted_or_withdrawn() {
        let mut r = rollout(5, 1000);
        r.step = 2000;
        r.every_secs = 60;
        assert_eq!(r.share_at(1000), 1000);
        assert_eq!(r.share_at(1059), 1000);
        assert_eq!(r.share_at(1060), 3000);
        assert_eq!(r.share_at(1000 + 60 * 100), FULL);
        assert!(r.includes("anything", 1000 + 60 * 5));
        r.state = RolloutState::Halted;
        r.halted_share = 3000;
        assert_eq!(r.share_at(1000 + 60 * 100), 3000);
        r.state = RolloutState::Withdrawn;
        assert_eq!(r.share_at(1000), 0);
        assert!(!r.includes("anything", 1000));
    }

    #[test]
    fn offers_fall_back_to_the_newest_released_version() {
        let mut rs = Rollouts::default();
        let versions = || [1u64, 2, 3].into_iter();
        assert_eq!(rs.offer(versions(), "k", 0), Some(3));
        rs.by_version.insert(3, rollout(3, 0));
        assert_eq!(rs.offer(versions(), "k", 0), Some(2));
        rs.by_version.insert(2, rollout(2, FULL));
        assert_eq!(rs.offer(versions(), "k", 0), Some(2));
        rs.by_version.get_mut(&2).unwrap().state = RolloutState::Withdrawn;
        assert_eq!(rs.offer(versions(), "k", 0), Some(1));
        rs.by_version.insert(1, rollout(1, 0));
        assert_eq!(rs.offer(versions(), "k", 0), None);
        assert_eq!(rs.offer([].into_iter(), "k", 0), None);
    }

    #[test]
    fn halts_need_the_count_and_the_share() {
        let r = rollout(9, 1000); // 3 boxes and 10 %
        assert_eq!(r.halt_reason(2, 2), None);
        assert_eq!(r.halt_reason(3, 100), None, "3 %");
        let why = r.halt_reason(3, 30).unwrap();
        assert!(
            why.contains("3 of 30 boxes")
                && why.contains("(10 %)")
                && why.contains("3 boxes and 10 %"),
            "{why}"
        );
        let mut halted = r.clone();
        halted.state = RolloutState::Halted;
        assert_eq!(halted.halt_reason(30, 30), None);
    }

    #[test]
    fn percentages_parse_and_print() {
        assert_eq!(parse_percent("10"), Ok(1000));
        assert_eq!(parse_percent("0.5"), Ok(50));
        assert_eq!(parse_percent("12.25"), Ok(1225));
        assert_eq!(parse_percent("100"), Ok(FULL));
        for bad in ["", "-1", "100.01", "1.234", "ten", "1e2", ".5"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
        assert_eq!(percent(1000), "10 %");
        assert_eq!(percent(1250), "12.5 %");
        assert_eq!(percent(5), "0.05 %");
    }
}
