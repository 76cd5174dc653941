//! The operator's rollout commands (`update-server rollout ...`), acting on the database that
//! every server of the fleet reads: each takes effect everywhere within a second or so.

use anyhow::{Result, bail};

use super::rollout::{FULL, Rollout, RolloutState, Rollouts, percent};
use super::store::Store;

/// What the operator asks of one release's rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Offer it to this share (basis points), widening by `step` every `every_secs` if set.
    Share {
        share: u32,
        step: u32,
        every_secs: u64,
        halt_failures: Option<u32>,
        halt_share: Option<u32>,
    },
    /// Widen a halted (or withdrawn) rollout again; failures before now no longer count.
    Resume,
    /// Offer it to nobody.
    Withdraw,
    /// Drop the rollout: the release is offered like any other, to every box.
    Release,
}

/// The threshold a new rollout gets unless told otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub halt_failures: u32,
    pub halt_share: u32,
}

/// Applies `change` to the rollout of `version`; returns the sentence that says what it is now.
pub fn apply(
    store: &mut dyn Store,
    version: u64,
    change: &Change,
    defaults: Defaults,
    now: u64,
) -> Result<String> {
    let next = store.change_rollout(version, &mut |cur| {
        decide(version, cur, change, defaults, now)
    })?;
    Ok(match next {
        Some(r) => describe(&r, now),
        None => format!("version {version}: no rollout; it is offered to every box"),
    })
}

fn decide(
    version: u64,
    cur: Option<Rollout>,
    change: &Change,
    defaults: Defaults,
    now: u64,
) -> Result<Option<Rollout>> {
    Ok(match (change, cur) {
        (Change::Release, _) => None,
        (
            Change::Share {
                share,
                step,
                every_secs,
                halt_failures,
                halt_share,
            },
            cur,
        ) => {
            if let Some(c) = &cur
                && c.state == RolloutState::Halted
            {
                bail!(
                    "the rollout of version {version} is halted ({}); --resume it or --withdraw it first",
                    c.reason
                );
            }
            let restart = cur
                .as_ref()
                .is_none_or(|c| c.state == RolloutState::Withdrawn);
            Some(Rollout {
                version,
                state: RolloutState::Active,
                share: *share,
                step: *step,
                every_secs: *every_secs,
                halted_share: 0,
                reason: String::new(),
                halt_failures: halt_failures
                    .or(cur.as_ref().map(|c| c.halt_failures))
                    .unwrap_or(defaults.halt_failures),
                halt_share: halt_share
                    .or(cur.as_ref().map(|c| c.halt_share))
                    .unwrap_or(defaults.halt_share),
                started_at: cur.as_ref().map_or(now, |c| c.started_at),
                changed_at: now,
                counted_from: if restart {
                    now
                } else {
                    cur.as_ref().map_or(now, |c| c.counted_from)
                },
            })
        }
        (Change::Resume, None) => bail!("version {version} has no rollout to resume"),
        (Change::Resume, Some(c)) if c.state == RolloutState::Active => {
            bail!("the rollout of version {version} is not halted; nothing to resume")
        }
        (Change::Resume, Some(mut c)) => {
            if c.state == RolloutState::Halted {
                c.share = c.halted_share;
            }
            c.state = RolloutState::Active;
            c.reason.clear();
            c.halted_share = 0;
            c.changed_at = now;
            c.counted_from = now;
            Some(c)
        }
        (Change::Withdraw, cur) => {
            let mut c = cur.unwrap_or(Rollout {
                version,
                state: RolloutState::Withdrawn,
                share: 0,
                step: 0,
                every_secs: 0,
                halted_share: 0,
                reason: String::new(),
                halt_failures: defaults.halt_failures,
                halt_share: defaults.halt_share,
                started_at: now,
                changed_at: now,
                counted_from: now,
            });
            if c.state == RolloutState::Halted {
                c.share = c.halted_share;
            }
            c.state = RolloutState::Withdrawn;
            c.reason = "withdrawn by the operator".into();
            c.changed_at = now;
            Some(c)
        }
    })
}

/// Seconds as the shortest exact unit: "90s", "15m", "2h", "1d".
pub fn duration_text(secs: u64) -> String {
    for (unit, n) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs >= n && secs.is_multiple_of(n) {
            return format!("{}{unit}", secs / n);
        }
    }
    format!("{secs}s")
}

/// "90", "90s", "15m", "2h", "1d" as seconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    match digits.parse::<u64>() {
        Ok(n) if n > 0 && !digits.starts_with('+') => Ok(n.saturating_mul(mult)),
        _ => Err(format!(
            "{text:?} is not a duration such as 90s, 30m, 6h or 1d"
        )),
    }
}

/// One rollout in a sentence.
pub fn describe(r: &Rollout, now: u64) -> String {
    let share = percent(r.share_at(now));
    let threshold = format!(
        "halts when {} boxes and {} of those reporting fail",
        r.halt_failures,
        percent(r.halt_share)
    );
    match r.state {
        RolloutState::Active if r.share_at(now) >= FULL => {
            format!("version {}: active, offered to every box", r.version)
        }
        RolloutState::Active if r.step > 0 && r.every_secs > 0 => format!(
            "version {}: active, offered to {share} of the boxes, widening by {} every {}; {threshold}",
            r.version,
            percent(r.step),
            duration_text(r.every_secs)
        ),
        RolloutState::Active => format!(
            "version {}: active, offered to {share} of the boxes; {threshold}",
            r.version
        ),
        RolloutState::Halted => format!(
            "version {}: halted at {share}: {}; `update-server rollout {} --resume` or `--withdraw`",
            r.version, r.reason, r.version
        ),
        RolloutState::Withdrawn => format!("version {}: withdrawn, offered to no box", r.version),
    }
}

/// Every rollout, one a line, newest version first.
pub fn list(rollouts: &Rollouts, now: u64) -> String {
    if rollouts.is_empty() {
        return "no rollouts: every box is offered the newest image".into();
    }
    rollouts
        .by_version
        .values()
        .rev()
        .map(|r| describe(r, now))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Defaults = Defaults {
        halt_failures: 3,
        halt_share: 1000,
    };

    fn share(bp: u32) -> Change {
        Change::Share {
            share: bp,
            step: 0,
            every_secs: 0,
            halt_failures: None,
            halt_share: None,
        }
    }

    #[test]
    fn a_rollout_goes_through_its_states() {
        let r = decide(9, None, &share(1000), D, 100).unwrap().unwrap();
        assert_eq!(
            (r.state, r.share, r.counted_from),
            (RolloutState::Active, 1000, 100)
        );
        assert!(describe(&r, 100).contains("offered to 10 % of the boxes"));
        let mut halted = r.clone();
        halted.state = RolloutState::Halted;
        halted.halted_share = 1000;
        halted.reason = "halted automatically: 3 of 4".into();
        let err = decide(9, Some(halted.clone()), &share(5000), D, 200).unwrap_err();
        assert!(err.to_string().contains("--resume"), "{err}");
        let resumed = decide(9, Some(halted.clone()), &Change::Resume, D, 300)
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                resumed.state,
                resumed.share,
                resumed.counted_from,
                resumed.reason.as_str()
            ),
            (RolloutState::Active, 1000, 300, "")
        );
        assert!(decide(9, Some(resumed.clone()), &Change::Resume, D, 301).is_err());
        let gone = decide(9, Some(halted), &Change::Withdraw, D, 400)
            .unwrap()
            .unwrap();
        assert_eq!(
            (gone.state, gone.share_at(400)),
            (RolloutState::Withdrawn, 0)
        );
        assert!(decide(9, None, &Change::Resume, D, 1).is_err());
        assert_eq!(decide(9, Some(gone), &Change::Release, D, 1).unwrap(), None);
        let w = decide(9, None, &Change::Withdraw, D, 5).unwrap().unwrap();
        assert!(describe(&w, 5).contains("withdrawn, offered to no box"));
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("6h"), Ok(21_600));
        assert_eq!(parse_duration("1d"), Ok(86_400));
        for bad in ["", "0", "-1h", "1w", "h", "+5m"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(duration_text(3600), "1h");
        assert_eq!(duration_text(90), "90s");
    }
}
