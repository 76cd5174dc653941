//! The fleet in an embedded SQLite file (WAL mode): the default, for one update-server and the
//! `update-server rollout` command beside it.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params_from_iter};

use super::{
    BOX_COLUMNS, CHUNK, READ_COLUMNS, ROLLOUT_COLUMNS, SCHEMA_VERSION, Store, Val,
    collect_rollouts, is_text, record_from, rollout_from, rollout_params, schema, upsert_sql,
};
use crate::fleet::model::BoxRecord;
use crate::fleet::rollout::{Rollout, Rollouts};

pub struct Sqlite {
    conn: Connection,
}

fn value(v: Val) -> Value {
    match v {
        Val::Int(Some(n)) => Value::Integer(n),
        Val::Text(Some(t)) => Value::Text(t),
        Val::Int(None) | Val::Text(None) => Value::Null,
    }
}

fn read_box(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, BoxRecord)> {
    let mut cols = Vec::with_capacity(READ_COLUMNS);
    for i in 0..READ_COLUMNS {
        cols.push(if is_text(i) {
            Val::Text(row.get(i)?)
        } else {
            Val::Int(row.get(i)?)
        });
    }
    Ok(record_from(cols))
}

fn read_rollout(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, [i64; 10])> {
    let mut n = [0i64; 10];
    n[0] = row.get(0)?;
    for (i, slot) in n.iter_mut().enumerate().skip(1) {
        // Columns 1 (state) and 6 (reason) are text.
        let col = if i < 5 { i + 1 } else { i + 2 };
        *slot = row.get(col)?;
    }
    Ok((row.get(1)?, row.get(6)?, n))
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Sqlite> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
        {
            bail!("its directory {} does not exist", dir.display());
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        // WAL: the rollout command writes while the server reads and writes; NORMAL sync is
        // durable across a crash of the process, and across power loss up to the last moments.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(&schema("TEXT"))
            .context("creating the tables")?;
        let found: Option<String> = conn
            .query_row(
                "SELECT value FROM fleet_meta WHERE name = 'schema'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        match found.as_deref() {
            None => {
                conn.execute(
                    "INSERT INTO fleet_meta (name, value) VALUES ('schema', ?1)",
                    [SCHEMA_VERSION],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => bail!(
                "it has schema version {other}, and this update-server knows {SCHEMA_VERSION}"
            ),
        }
        Ok(Sqlite { conn })
    }
}

impl Store for Sqlite {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn load_boxes(&mut self, since: Option<(u64, &str)>) -> Result<Vec<(String, BoxRecord)>> {
        let cols = BOX_COLUMNS[..READ_COLUMNS].join(", ");
        let rows = match since {
            None => {
                let mut st = self.conn.prepare(&format!("SELECT {cols} FROM boxes"))?;
                st.query_map([], read_box)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            }
            Some((ms, except)) => {
                let mut st = self.conn.prepare(&format!(
                    "SELECT {cols} FROM boxes WHERE changed_ms >= ?1 AND origin <> ?2"
                ))?;
                st.query_map(
                    rusqlite::params![i64::try_from(ms).unwrap_or(i64::MAX), except],
                    read_box,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?
            }
        };
        Ok(rows)
    }

    fn upsert_boxes(
        &mut self,
        rows: &[(String, BoxRecord)],
        origin: &str,
        now_ms: u64,
    ) -> Result<Vec<(String, BoxRecord)>> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut merged = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(CHUNK) {
            let sql = upsert_sql(chunk.len(), false);
            let mut st = tx.prepare_cached(&sql)?;
            let params = chunk
                .iter()
                .flat_map(|(k, r)| super::box_params(k, r, origin, now_ms))
                .map(value);
            let mut q = st.query(params_from_iter(params))?;
            while let Some(row) = q.next()? {
                merged.push(read_box(row)?);
            }
        }
        tx.commit()?;
        Ok(merged)
    }

    fn load_rollouts(&mut self) -> Result<Rollouts> {
        let mut st = self
            .conn
            .prepare_cached(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts"))?;
        let raw = st
            .query_map([], read_rollout)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let list = raw
            .into_iter()
            .map(|(state, reason, n)| rollout_from(&state, reason, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(collect_rollouts(list))
    }

    fn change_rollout(
        &mut self,
        version: u64,
        f: &mut dyn FnMut(Option<Rollout>) -> Result<Option<Rollout>>,
    ) -> Result<Option<Rollout>> {
        let v = i64::try_from(version).context("version out of range")?;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = tx
            .query_row(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE version = ?1"),
                [v],
                read_rollout,
            )
            .optional()?
            .map(|(state, reason, n)| rollout_from(&state, reason, n))
            .transpose()?;
        let next = f(current)?;
        match &next {
            Some(r) => {
                let placeholders: Vec<String> = (1..=12).map(|i| format!("?{i}")).collect();
                tx.execute(
                    &format!(
                        "INSERT OR REPLACE INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ({})",
                        placeholders.join(", ")
                    ),
                    params_from_iter(rollout_params(r).into_iter().map(value)),
                )?;
            }
            None => {
                tx.execute("DELETE FROM rollouts WHERE version = ?1", [v])?;
            }
        }
        tx.commit()?;
        Ok(next)
    }
}
