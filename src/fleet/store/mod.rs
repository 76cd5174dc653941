//! Where the fleet is kept: an embedded SQLite file by default, or PostgreSQL shared by several
//! update-servers. Both hold the same two tables and merge a box's record the same way as
//! memory does (`BoxRecord::merge`), in the upsert itself, so that servers writing one box at
//! once lose nothing.

mod postgres;
mod sqlite;

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::model::{Attempt, BoxRecord};
use super::protocol::{Report, parse_step};
use super::rollout::{Rollout, RolloutState, Rollouts};

pub const SCHEMA_VERSION: &str = "1";
/// Rows per upsert statement: well under both databases' limits on parameters.
const CHUNK: usize = 400;

/// Which database, as the settings name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Database {
    /// `postgres://…` / `postgresql://…`, `sqlite:PATH`, or a plain path of a SQLite file.
    pub fn parse(text: &str) -> Result<Database> {
        let text = text.trim();
        if text.is_empty() {
            bail!("the database setting is empty");
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Database::Postgres(text.to_string()));
        }
        if text.contains("://") {
            bail!(
                "database {text:?} is neither postgres://… nor a SQLite file path (sqlite:PATH or PATH)"
            );
        }
        let path = text.strip_prefix("sqlite:").unwrap_or(text);
        Ok(Database::Sqlite(PathBuf::from(path)))
    }

    /// The default: a SQLite file beside the update directory, never inside it (the watcher
    /// serves that directory, and the database holds the boxes' addresses).
    pub fn beside(dir: &Path) -> Database {
        let mut name = dir
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".fleet.sqlite");
        let parent = dir.parent().unwrap_or(Path::new("/"));
        Database::Sqlite(parent.join(name))
    }
}

impl fmt::Display for Database {
    /// Without a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "SQLite {}", p.display()),
            Database::Postgres(url) => write!(f, "PostgreSQL {}", redact(url)),
        }
    }
}

/// A connection URL with its password hidden.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (a, h),
        None => return url.to_string(),
    };
    let user = auth.split(':').next().unwrap_or("");
    format!("{scheme}://{user}:***@{host}")
}

/// The operations the fleet needs from a database.
pub trait Store: Send {
    fn kind(&self) -> &'static str;
    /// Every box, or those another server (`origin` other than `except`) changed since
    /// `since_ms`.
    fn load_boxes(&mut self, since: Option<(u64, &str)>) -> Result<Vec<(String, BoxRecord)>>;
    /// Writes a batch in one transaction, merging with what is stored; returns the merged rows.
    fn upsert_boxes(
        &mut self,
        rows: &[(String, BoxRecord)],
        origin: &str,
        now_ms: u64,
    ) -> Result<Vec<(String, BoxRecord)>>;
    fn load_rollouts(&mut self) -> Result<Rollouts>;
    /// Reads the rollout of `version`, lets `f` decide its new value (`None`: no rollout), and
    /// writes that, all in one transaction with the row locked.
    fn change_rollout(
        &mut self,
        version: u64,
        f: &mut dyn FnMut(Option<Rollout>) -> Result<Option<Rollout>>,
    ) -> Result<Option<Rollout>>;
    /// Gets a broken connection back, if the database has one.
    fn reconnect(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Opens (and creates, or checks the schema of) the database.
pub fn open(db: &Database) -> Result<Box<dyn Store>> {
    match db {
        Database::Sqlite(path) => {
            Ok(Box::new(sqlite::Sqlite::open(path).with_context(|| {
                format!("cannot open the fleet database {}", path.display())
            })?))
        }
        Database::Postgres(url) => Ok(Box::new(
            postgres::Postgres::open(url)
                .with_context(|| format!("cannot open the fleet database {}", redact(url)))?,
        )),
    }
}

/// A parameter of either database.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    Int(Option<i64>),
    Text(Option<String>),
}

fn int(v: u64) -> Val {
    Val::Int(Some(i64::try_from(v).unwrap_or(i64::MAX)))
}

fn opt_int(v: Option<u64>) -> Val {
    Val::Int(v.map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
}

/// The columns of `boxes`, in the order rows are bound and read.
pub(crate) const BOX_COLUMNS: [&str; 19] = [
    "key",
    "id",
    "address",
    "user_agent",
    "version",
    "state",
    "first_seen",
    "last_seen",
    "offered",
    "offered_at",
    "downloaded",
    "downloaded_at",
    "report",
    "reported_at",
    "attempts",
    "last_success",
    "last_success_at",
    "origin",
    "changed_ms",
];
/// Read back: all but the last two.
pub(crate) const READ_COLUMNS: usize = 17;

pub(crate) fn schema(text_pk: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS fleet_meta (name {text_pk} PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS boxes (
             key {text_pk} PRIMARY KEY, id TEXT, address TEXT, user_agent TEXT, version BIGINT,
             state TEXT, first_seen BIGINT NOT NULL, last_seen BIGINT NOT NULL, offered BIGINT,
             offered_at BIGINT NOT NULL, downloaded BIGINT, downloaded_at BIGINT NOT NULL,
             report TEXT, reported_at BIGINT NOT NULL, attempts TEXT NOT NULL,
             last_success BIGINT, last_success_at BIGINT NOT NULL, origin TEXT NOT NULL,
             changed_ms BIGINT NOT NULL);
         CREATE INDEX IF NOT EXISTS boxes_changed ON boxes (changed_ms);
         CREATE TABLE IF NOT EXISTS rollouts (
             version BIGINT PRIMARY KEY, state TEXT NOT NULL, share INTEGER NOT NULL,
             step INTEGER NOT NULL, every_secs BIGINT NOT NULL, halted_share INTEGER NOT NULL,
             reason TEXT NOT NULL, halt_failures INTEGER NOT NULL, halt_share INTEGER NOT NULL,
             started_at BIGINT NOT NULL, changed_at BIGINT NOT NULL, counted_from BIGINT NOT NULL);"
    )
}

pub(crate) const ROLLOUT_COLUMNS: &str = "version, state, share, step, every_secs, halted_share, \
     reason, halt_failures, halt_share, started_at, changed_at, counted_from";

/// The upsert of `rows` rows, merging field group by field group (see `BoxRecord::merge`).
/// `pg` picks PostgreSQL's placeholders and functions.
pub(crate) fn upsert_sql(rows: usize, pg: bool) -> String {
    let n = BOX_COLUMNS.len();
    let mut sql = format!("INSERT INTO boxes ({}) VALUES ", BOX_COLUMNS.join(", "));
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..n {
            let i = r * n + c + 1;
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&if pg { format!("${i}") } else { format!("?{i}") });
        }
        sql.push(')');
    }
    let (max, min) = if pg {
        ("GREATEST", "LEAST")
    } else {
        ("max", "min")
    };
    let newer = |ts: &str, col: &str| {
        format!(
            "{col} = CASE WHEN excluded.{ts} >= boxes.{ts} THEN excluded.{col} ELSE boxes.{col} END"
        )
    };
    let mut set: Vec<String> = ["id", "address", "user_agent", "version", "state"]
        .iter()
        .map(|c| newer("last_seen", c))
        .collect();
    set.push(format!(
        "last_seen = {max}(excluded.last_seen, boxes.last_seen)"
    ));
    set.push(format!(
        "first_seen = {min}(excluded.first_seen, boxes.first_seen)"
    ));
    for (ts, cols) in [
        ("offered_at", &["offered"][..]),
        ("downloaded_at", &["downloaded"][..]),
        ("reported_at", &["report", "attempts"][..]),
        ("last_success_at", &["last_success"][..]),
    ] {
        for c in cols {
            set.push(newer(ts, c));
        }
        set.push(format!("{ts} = {max}(excluded.{ts}, boxes.{ts})"));
    }
    set.push("origin = excluded.origin".into());
    set.push("changed_ms = excluded.changed_ms".into());
    sql.push_str(" ON CONFLICT (key) DO UPDATE SET ");
    sql.push_str(&set.join(", "));
    sql.push_str(" RETURNING ");
    sql.push_str(&BOX_COLUMNS[..READ_COLUMNS].join(", "));
    sql
}

pub(crate) fn box_params(key: &str, r: &BoxRecord, origin: &str, now_ms: u64) -> Vec<Val> {
    let text = |s: &Option<String>| Val::Text(s.clone());
    vec![
        Val::Text(Some(key.to_string())),
        text(&r.id),
        Val::Text(r.address.map(|a| a.to_string())),
        text(&r.user_agent),
        opt_int(r.version),
        Val::Text(r.state.map(|s| s.name().to_string())),
        int(r.first_seen),
        int(r.last_seen),
        opt_int(r.offered),
        int(r.offered_at),
        opt_int(r.downloaded),
        int(r.downloaded_at),
        Val::Text(
            r.report
                .as_ref()
                .map(|rep| serde_json::to_string(rep).expect("reports serialize")),
        ),
        int(r.reported_at),
        Val::Text(Some(
            serde_json::to_string(&r.attempts).expect("attempts serialize"),
        )),
        opt_int(r.last_success),
        int(r.last_success_at),
        Val::Text(Some(origin.to_string())),
        int(now_ms),
    ]
}

/// Which of the read columns hold text: key, id, address, user_agent, state, report, attempts.
pub(crate) fn is_text(col: usize) -> bool {
    matches!(col, 0..=3 | 5 | 12 | 14)
}

/// Builds a record from the read columns, by index: the one decoding both databases share.
pub(crate) fn record_from(cols: Vec<Val>) -> (String, BoxRecord) {
    let mut it = cols.into_iter();
    let mut text = || match it.next() {
        Some(Val::Text(t)) => t,
        _ => None,
    };
    let key = text();
    let id = text();
    let address = text();
    let user_agent = text();
    let mut ints = Vec::new();
    let mut texts = Vec::new();
    for (i, v) in it.enumerate() {
        let col = i + 4;
        match v {
            Val::Int(n) => ints.push((col, n)),
            Val::Text(t) => texts.push((col, t)),
        }
    }
    let int_at = |col: usize| -> Option<u64> {
        ints.iter()
            .find(|(c, _)| *c == col)
            .and_then(|(_, n)| *n)
            .and_then(|n| u64::try_from(n).ok())
    };
    let text_at = |col: usize| -> Option<String> {
        texts
            .iter()
            .find(|(c, _)| *c == col)
            .and_then(|(_, t)| t.clone())
    };
    let rec = BoxRecord {
        id,
        address: address.and_then(|a| a.parse().ok()),
        user_agent,
        version: int_at(4),
        state: text_at(5).as_deref().and_then(parse_step),
        first_seen: int_at(6).unwrap_or(0),
        last_seen: int_at(7).unwrap_or(0),
        offered: int_at(8),
        offered_at: int_at(9).unwrap_or(0),
        downloaded: int_at(10),
        downloaded_at: int_at(11).unwrap_or(0),
        report: text_at(12).and_then(|r| serde_json::from_str::<Report>(&r).ok()),
        reported_at: int_at(13).unwrap_or(0),
        attempts: text_at(14)
            .and_then(|a| serde_json::from_str::<Vec<Attempt>>(&a).ok())
            .unwrap_or_default(),
        last_success: int_at(15),
        last_success_at: int_at(16).unwrap_or(0),
    };
    (key.unwrap_or_default(), rec)
}

pub(crate) fn rollout_params(r: &Rollout) -> Vec<Val> {
    vec![
        int(r.version),
        Val::Text(Some(r.state.name().to_string())),
        int(u64::from(r.share)),
        int(u64::from(r.step)),
        int(r.every_secs),
        int(u64::from(r.halted_share)),
        Val::Text(Some(r.reason.clone())),
        int(u64::from(r.halt_failures)),
        int(u64::from(r.halt_share)),
        int(r.started_at),
        int(r.changed_at),
        int(r.counted_from),
    ]
}

/// A rollout from its columns (`ROLLOUT_COLUMNS` order): the state as text, the rest numbers.
pub(crate) fn rollout_from(state: &str, reason: String, n: [i64; 10]) -> Result<Rollout> {
    let state = RolloutState::parse(state)
        .with_context(|| format!("a rollout in the database has an unknown state {state:?}"))?;
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let bp = |v: i64| u32::try_from(v).unwrap_or(0);
    Ok(Rollout {
        version: u(n[0]),
        state,
        share: bp(n[1]),
        step: bp(n[2]),
        every_secs: u(n[3]),
        halted_share: bp(n[4]),
        reason,
        halt_failures: bp(n[5]),
        halt_share: bp(n[6]),
        started_at: u(n[7]),
        changed_at: u(n[8]),
        counted_from: u(n[9]),
    })
}

pub(crate) fn collect_rollouts(list: Vec<Rollout>) -> Rollouts {
    Rollouts {
        by_version: list.into_iter().map(|r| (r.version, r)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_settings_parse() {
        assert_eq!(
            Database::parse("postgres://u:p@h/db").unwrap(),
            Database::Postgres("postgres://u:p@h/db".into())
        );
        assert_eq!(
            Database::parse("sqlite:/x/f.db").unwrap(),
            Database::Sqlite("/x/f.db".into())
        );
        assert_eq!(
            Database::parse("f.db").unwrap(),
            Database::Sqlite("f.db".into())
        );
        assert!(Database::parse("mysql://h/db").is_err());
        assert!(Database::parse(" ").is_err());
        assert_eq!(
            Database::beside(Path::new("/var/opq/box-updates")),
            Database::Sqlite("/var/opq/box-updates.fleet.sqlite".into())
        );
        assert_eq!(
            redact("postgres://fleet:s3cret@db:5432/fleet"),
            "postgres://fleet:***@db:5432/fleet"
        );
        assert_eq!(redact("postgres://db/fleet"), "postgres://db/fleet");
    }

    #[test]
    fn the_upsert_merges_every_group() {
        let sql = upsert_sql(2, true);
        assert!(sql.contains("($20, $21"), "{sql}");
        assert!(sql.contains("GREATEST(excluded.reported_at, boxes.reported_at)"));
        assert!(sql.contains(
            "attempts = CASE WHEN excluded.reported_at >= boxes.reported_at THEN excluded.attempts"
        ));
        assert!(upsert_sql(1, false).contains("?19)"));
    }
}
