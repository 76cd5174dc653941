//! The fleet in PostgreSQL, shared by several update-servers (behind a load balancer): each
//! writes its batches, and reads what the others wrote.

use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use postgres::types::ToSql;
use postgres::{Client, NoTls};

use super::{
    BOX_COLUMNS, CHUNK, READ_COLUMNS, ROLLOUT_COLUMNS, SCHEMA_VERSION, Store, Val,
    collect_rollouts, is_text, record_from, rollout_from, rollout_params, schema, upsert_sql,
};
use crate::fleet::model::BoxRecord;
use crate::fleet::rollout::{Rollout, Rollouts};

/// Serialises schema creation between servers starting at once.
const SCHEMA_LOCK: i64 = 0x4f50_5166_6c74; // "OPQflt"

pub struct Postgres {
    config: postgres::Config,
    client: Client,
}

fn params(vals: &[Val]) -> Vec<Box<dyn ToSql + Sync>> {
    vals.iter()
        .map(|v| -> Box<dyn ToSql + Sync> {
            match v {
                Val::Int(n) => Box::new(*n),
                Val::Text(t) => Box::new(t.clone()),
            }
        })
        .collect()
}

fn read_box(row: &postgres::Row) -> Result<(String, BoxRecord)> {
    let mut cols = Vec::with_capacity(READ_COLUMNS);
    for i in 0..READ_COLUMNS {
        cols.push(if is_text(i) {
            Val::Text(row.try_get(i)?)
        } else {
            Val::Int(row.try_get(i)?)
        });
    }
    Ok(record_from(cols))
}

fn read_rollout(row: &postgres::Row) -> Result<Rollout> {
    let mut n = [0i64; 10];
    n[0] = row.try_get(0)?;
    for (i, slot) in n.iter_mut().enumerate().skip(1) {
        let col = if i < 5 { i + 1 } else { i + 2 };
        // INTEGER columns come back as i32, BIGINT ones as i64.
        *slot = match row.try_get::<_, i64>(col) {
            Ok(v) => v,
            Err(_) => i64::from(row.try_get::<_, i32>(col)?),
        };
    }
    let state: String = row.try_get(1)?;
    rollout_from(&state, row.try_get(6)?, n)
}

fn connect(config: &postgres::Config) -> Result<Client> {
    config.connect(NoTls).map_err(|e| {
        // The driver's Display of a server error is "db error"; the detail is in its source.
        let detail = match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => {
                let mut text = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    text.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                text
            }
        };
        anyhow::anyhow!("{detail}")
    })
}

impl Postgres {
    pub fn open(url: &str) -> Result<Postgres> {
        let mut config = postgres::Config::from_str(url).context("the URL does not parse")?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        config.application_name("update-server");
        let mut client = connect(&config)?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
        tx.batch_execute(&schema("TEXT"))
            .context("creating the tables")?;
        let found: Option<String> = tx
            .query_opt("SELECT value FROM fleet_meta WHERE name = 'schema'", &[])?
            .map(|r| r.get(0));
        match found.as_deref() {
            None => {
                tx.execute(
                    "INSERT INTO fleet_meta (name, value) VALUES ('schema', $1)",
                    &[&SCHEMA_VERSION],
                )?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => bail!(
                "it has schema version {other}, and this update-server knows {SCHEMA_VERSION}"
            ),
        }
        tx.commit()?;
        Ok(Postgres { config, client })
    }
}

impl Store for Postgres {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn load_boxes(&mut self, since: Option<(u64, &str)>) -> Result<Vec<(String, BoxRecord)>> {
        let cols = BOX_COLUMNS[..READ_COLUMNS].join(", ");
        let rows = match since {
            None => self
                .client
                .query(&format!("SELECT {cols} FROM boxes"), &[])?,
            Some((ms, except)) => self.client.query(
                &format!("SELECT {cols} FROM boxes WHERE changed_ms >= $1 AND origin <> $2"),
                &[&i64::try_from(ms).unwrap_or(i64::MAX), &except],
            )?,
        };
        rows.iter().map(read_box).collect()
    }

    fn upsert_boxes(
        &mut self,
        rows: &[(String, BoxRecord)],
        origin: &str,
        now_ms: u64,
    ) -> Result<Vec<(String, BoxRecord)>> {
        let mut tx = self.client.transaction()?;
        let mut merged = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(CHUNK) {
            let sql = upsert_sql(chunk.len(), true);
            let vals: Vec<Val> = chunk
                .iter()
                .flat_map(|(k, r)| super::box_params(k, r, origin, now_ms))
                .collect();
            let boxed = params(&vals);
            let refs: Vec<&(dyn ToSql + Sync)> = boxed.iter().map(|b| &**b).collect();
            for row in tx.query(&sql, &refs)? {
                merged.push(read_box(&row)?);
            }
        }
        tx.commit()?;
        Ok(merged)
    }

    fn load_rollouts(&mut self) -> Result<Rollouts> {
        let rows = self
            .client
            .query(&format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts"), &[])?;
        let list = rows.iter().map(read_rollout).collect::<Result<Vec<_>>>()?;
        Ok(collect_rollouts(list))
    }

    fn change_rollout(
        &mut self,
        version: u64,
        f: &mut dyn FnMut(Option<Rollout>) -> Result<Option<Rollout>>,
    ) -> Result<Option<Rollout>> {
        let v = i64::try_from(version).context("version out of range")?;
        let mut tx = self.client.transaction()?;
        // Two servers halting one rollout at once: the second waits here, then sees it halted.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&v])?;
        let current = tx
            .query_opt(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE version = $1 FOR UPDATE"),
                &[&v],
            )?
            .map(|row| read_rollout(&row))
            .transpose()?;
        let next = f(current)?;
        match &next {
            Some(r) => {
                let placeholders: Vec<String> = (1..=12).map(|i| format!("${i}")).collect();
                let mut vals = rollout_params(r);
                // INTEGER columns take i32.
                let boxed: Vec<Box<dyn ToSql + Sync>> = vals
                    .drain(..)
                    .enumerate()
                    .map(|(i, v)| -> Box<dyn ToSql + Sync> {
                        match v {
                            Val::Int(n) if [2, 3, 5, 7, 8].contains(&i) => {
                                Box::new(n.map(|n| i32::try_from(n).unwrap_or(i32::MAX)))
                            }
                            Val::Int(n) => Box::new(n),
                            Val::Text(t) => Box::new(t),
                        }
                    })
                    .collect();
                let refs: Vec<&(dyn ToSql + Sync)> = boxed.iter().map(|b| &**b).collect();
                let set: Vec<String> = ROLLOUT_COLUMNS
                    .split(", ")
                    .skip(1)
                    .map(|c| format!("{c} = excluded.{c}"))
                    .collect();
                tx.execute(
                    &format!(
                        "INSERT INTO rollouts ({ROLLOUT_COLUMNS}) VALUES ({}) \
                         ON CONFLICT (version) DO UPDATE SET {}",
                        placeholders.join(", "),
                        set.join(", ")
                    ),
                    &refs,
                )?;
            }
            None => {
                tx.execute("DELETE FROM rollouts WHERE version = $1", &[&v])?;
            }
        }
        tx.commit()?;
        Ok(next)
    }

    fn reconnect(&mut self) -> Result<()> {
        if self.client.is_closed() {
            self.client = connect(&self.config)?;
        }
        Ok(())
    }
}
