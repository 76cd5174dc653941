//! The fleet's side of update-server's HTTP: who a request comes from, which version a box is
//! offered, `POST /report`, and the operator's `GET /fleet` page and `GET /fleet.json`. Every
//! answer here comes from memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::model::{BoxRecord, Client, Fleet, Progress, Refusal, StoreHealth, Touch};
use super::protocol::{BoxHeaders, MAX_REPORT_BYTES, Report};
use super::rollout::{Rollout, percent};
use crate::fsutil::unix_now;
use crate::http::{Request, RequestBody, Response};

/// The operator's page: one self-contained file (HTML, CSS, JS inline), built into the binary.
pub const PAGE: &str = include_str!("../../update-server/fleet.html");
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                   connect-src 'self'; img-src 'self' data:; form-action 'none'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// What the routes hold: the fleet if there is one, why not if there isn't, and the token.
#[derive(Clone, Default)]
pub struct Service {
    pub fleet: Option<Arc<Fleet>>,
    /// Why the fleet is off (its database could not be opened).
    pub unavailable: Option<String>,
    /// `Authorization: Bearer <token>` opens the fleet view; without a token it stays closed.
    pub token: Option<String>,
}

/// Who sent `req`, from its fleet headers, address and user agent.
pub fn client<'a>(req: &Request<'a>) -> Client<'a> {
    let h = BoxHeaders::parse(|name| req.header(name));
    Client {
        id: h.id,
        address: req.peer.map(|p| p.ip()),
        user_agent: req.header("user-agent"),
        version: h.version,
        state: h.state,
    }
}

fn json(status: u16, v: &impl Serialize) -> Response {
    let body = serde_json::to_vec(v).expect("plain data serializes");
    Response::new(status, "application/json", body).with_header("Cache-Control", "no-store")
}

fn error(status: u16, message: impl Into<String>) -> Response {
    json(
        status,
        &serde_json::json!({"ok": false, "error": message.into()}),
    )
}

impl Service {
    /// The version of `versions` (published, oldest first) offered to the sender of `req`,
    /// recorded as offered to it. Without rollouts, the newest, as ever. A client without an id
    /// is recorded only when `anonymous` says its request is an old box's (`/latest`): a monitor
    /// polling `/version` is not a box.
    pub fn offer(
        &self,
        req: &Request<'_>,
        versions: impl DoubleEndedIterator<Item = u64> + Clone,
        anonymous: bool,
    ) -> Option<u64> {
        let newest = versions.clone().next_back();
        let Some(fleet) = &self.fleet else {
            return newest;
        };
        let c = client(req);
        let rollouts = fleet.rollouts();
        let key = c.key();
        let now = unix_now();
        let offered = match &key {
            Some(k) if !rollouts.is_empty() => rollouts.offer(versions, k, now),
            _ => newest,
        };
        if let (Some(k), Some(v)) = (&key, offered)
            && (c.id.is_some() || anonymous)
        {
            fleet.touch(k, &c, Touch::Offered(v), now);
        }
        offered
    }

    /// Whether a rollout may make `/version` and `/latest` answer differently per box.
    pub fn staged(&self) -> bool {
        self.fleet
            .as_ref()
            .is_some_and(|f| !f.rollouts().is_empty())
    }

    /// Records a request that is neither an offer nor a report: a box's sidecar fetch, or the
    /// download of image `version` by any client (old boxes are known from these).
    pub fn seen(&self, req: &Request<'_>, download: Option<u64>) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        let c = client(req);
        if c.id.is_none() && download.is_none() {
            return;
        }
        if let Some(k) = c.key() {
            let touch = download.map_or(Touch::Seen, Touch::Downloaded);
            fleet.touch(&k, &c, touch, unix_now());
        }
    }

    /// `POST /report`.
    pub fn report(&self, req: &Request<'_>, body: &mut RequestBody<'_>) -> Response {
        let Some(fleet) = &self.fleet else {
            return error(
                503,
                format!(
                    "reports are not taken: {}",
                    self.unavailable.as_deref().unwrap_or("the fleet is off")
                ),
            );
        };
        let json_type = req.header("content-type").is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
        if !json_type {
            return error(415, "a report is sent as Content-Type: application/json");
        }
        let bytes = match body.read_to_vec(MAX_REPORT_BYTES) {
            Ok(b) => b,
            Err(e) => return error(e.status(), e.to_string()),
        };
        let report = match Report::parse(&bytes) {
            Ok(r) => r,
            Err(e) => return error(400, e.to_string()),
        };
        let c = client(req);
        if c.id.is_some_and(|id| id != report.box_id) {
            return error(
                400,
                "the report's box_id differs from the request's X-OPQ-Box-Id",
            );
        }
        // The report is moved into the fleet: the id the record needs is a copy.
        let id = report.box_id.clone();
        let c = Client { id: Some(&id), ..c };
        let key = c.key().expect("the client has an id");
        match fleet.report(&key, &c, report, unix_now()) {
            Ok(()) => json(202, &serde_json::json!({"ok": true})),
            Err(Refusal::RateLimited(secs)) => error(
                429,
                format!("too many reports from box {id}; retry in {secs} s"),
            )
            .with_header("Retry-After", secs.to_string()),
            Err(Refusal::Full) => error(
                503,
                "the fleet holds as many boxes as it may (max_boxes); the report was not kept",
            ),
        }
    }

    /// Whether `req` carries the operator's token; the refusal otherwise.
    fn authorize(&self, req: &Request<'_>) -> Result<(), Response> {
        let Some(token) = &self.token else {
            return Err(error(
                403,
                "the fleet view is off: start update-server with --fleet-token TOKEN \
                 (or \"fleet_token\" in BOX_UPDATE_SERVER_SETTINGS)",
            ));
        };
        let given = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        if constant_time_eq(given.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(error(
                401,
                "the fleet view needs the operator's token: Authorization: Bearer TOKEN",
            )
            .with_header("WWW-Authenticate", "Bearer realm=\"fleet\""))
        }
    }

    /// `GET /fleet`: the page. It holds no data; it asks for the token and loads `/fleet.json`.
    pub fn page(&self) -> Response {
        Response::new(200, "text/html; charset=utf-8", PAGE.as_bytes())
            .with_header("Content-Security-Policy", CSP)
            .with_header("Cache-Control", "no-cache")
            .with_header("X-Content-Type-Options", "nosniff")
            .with_header("Referrer-Policy", "no-referrer")
    }

    /// `GET /fleet.json`; `versions` are the published ones, oldest first.
    pub fn view(&self, req: &Request<'_>, versions: &[u64]) -> Response {
        if let Err(refused) = self.authorize(req) {
            return refused;
        }
        let Some(fleet) = &self.fleet else {
            return error(
                503,
                format!(
                    "the fleet is not available: {}",
                    self.unavailable.as_deref().unwrap_or("it is off")
                ),
            );
        };
        Response::new(
            200,
            "application/json",
            view_json(fleet, versions, unix_now()),
        )
        .with_header("Cache-Control", "no-store")
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One box as `/fleet.json` shows it, serialized straight from its record.
struct BoxJson<'a> {
    key: &'a str,
    rec: &'a BoxRecord,
}

impl Serialize for BoxJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct Success {
            version: u64,
            at: u64,
        }
        #[derive(Serialize)]
        struct LastReport<'a> {
            #[serde(flatten)]
            report: &'a Report,
            received_at: u64,
        }
        let r = self.rec;
        let mut m = s.serialize_map(Some(13))?;
        m.serialize_entry("key", self.key)?;
        m.serialize_entry("id", &r.id)?;
        m.serialize_entry("address", &r.address)?;
        m.serialize_entry("user_agent", &r.user_agent)?;
        m.serialize_entry("version", &r.version)?;
        m.serialize_entry("state", &r.state.map(|s| s.name()))?;
        m.serialize_entry("message", &r.report.as_ref().map(|x| x.message.as_str()))?;
        m.serialize_entry("first_seen", &r.first_seen)?;
        m.serialize_entry("last_seen", &r.last_seen)?;
        m.serialize_entry("offered", &r.offered)?;
        m.serialize_entry("downloaded", &r.downloaded)?;
        m.serialize_entry(
            "last_success",
            &r.last_success.map(|version| Success {
                version,
                at: r.last_success_at,
            }),
        )?;
        m.serialize_entry(
            "last_report",
            &r.report.as_ref().map(|report| LastReport {
                report,
                received_at: r.reported_at,
            }),
        )?;
        m.end()
    }
}

#[derive(Serialize)]
pub struct RolloutView {
    #[serde(flatten)]
    pub rollout: Rollout,
    /// The share offered now, for people ("10 %").
    pub share_now: String,
    pub share_now_bp: u32,
    /// What counts towards a halt now: boxes of the share that failed or rolled back, of those
    /// that reported.
    pub counted_bad: u32,
    pub counted_reported: u32,
}

#[derive(Serialize)]
pub struct ReleaseView {
    pub version: u64,
    pub published: bool,
    pub newest: bool,
    pub rollout: Option<RolloutView>,
    #[serde(flatten)]
    pub progress: Progress,
}

#[derive(Serialize)]
pub struct VersionCount {
    pub version: Option<u64>,
    pub boxes: u32,
}

#[derive(Serialize)]
pub struct StoreView {
    #[serde(flatten)]
    pub health: StoreHealth,
    /// Box records changed in memory and not yet written.
    pub pending: usize,
}

/// Everything in `/fleet.json` but the boxes.
#[derive(Serialize)]
struct Summary {
    generated_at: u64,
    newest: Option<u64>,
    versions: Vec<VersionCount>,
    releases: Vec<ReleaseView>,
    store: StoreView,
}

/// `/fleet.json`: the whole fleet, last seen first, with counts per version and each release's
/// progress (every published one, and every one with a rollout). Boxes are written straight from
/// their records, one shard lock at a time, so that 10 000 of them take milliseconds and no
/// copy of the fleet.
pub fn view_json(fleet: &Fleet, versions: &[u64], now: u64) -> Vec<u8> {
    let newest = versions.last().copied();
    let rollouts = fleet.rollouts();
    let mut release_versions: Vec<u64> = rollouts.by_version.keys().copied().collect();
    release_versions.extend_from_slice(versions);
    release_versions.sort_unstable();
    release_versions.dedup();
    let mut progress: BTreeMap<u64, Progress> = release_versions
        .iter()
        .map(|&v| (v, Progress::default()))
        .collect();
    let mut counts: BTreeMap<Option<u64>, u32> = BTreeMap::new();
    let mut order: Vec<(u64, String)> = Vec::with_capacity(fleet.len());
    fleet.for_each(|key, rec| {
        for (&v, p) in progress.iter_mut() {
            p.add(v, rec);
        }
        *counts.entry(rec.version).or_insert(0) += 1;
        order.push((rec.last_seen, key.to_string()));
    });
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let releases = release_versions
        .iter()
        .rev()
        .map(|&v| {
            let rollout = rollouts.by_version.get(&v).map(|r| {
                let (bad, all) = fleet.rollout_outcomes(r, now);
                let share = r.share_at(now);
                RolloutView {
                    rollout: r.clone(),
                    share_now: percent(share),
                    share_now_bp: share,
                    counted_bad: bad,
                    counted_reported: all,
                }
            });
            ReleaseView {
                version: v,
                published: versions.binary_search(&v).is_ok(),
                newest: Some(v) == newest,
                rollout,
                progress: progress.get(&v).copied().unwrap_or_default(),
            }
        })
        .collect();
    let summary = Summary {
        generated_at: now,
        newest,
        versions: counts
            .into_iter()
            .rev()
            .map(|(version, boxes)| VersionCount { version, boxes })
            .collect(),
        releases,
        store: StoreView {
            health: fleet.health(),
            pending: fleet.pending(),
        },
    };
    let rest = serde_json::to_vec(&summary).expect("plain data serializes");
    // `{"boxes":[...],` and the summary's members after its `{`.
    let mut out = Vec::with_capacity(rest.len() + order.len() * 320);
    out.extend_from_slice(b"{\"boxes\":[");
    let mut first = true;
    for (_, key) in &order {
        fleet.with(key, |rec| {
            if !std::mem::take(&mut first) {
                out.push(b',');
            }
            serde_json::to_writer(&mut out, &BoxJson { key, rec }).expect("plain data serializes");
        });
    }
    out.extend_from_slice(b"],");
    out.extend_from_slice(&rest[1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::protocol::Outcome;

    #[test]
    fn the_view_is_json_with_every_box_last_seen_first() {
        let f = Fleet::new(100);
        let client = |id| Client {
            id: Some(id),
            address: Some("10.0.0.2".parse().unwrap()),
            user_agent: Some("box-updater/0.1.0"),
            version: Some(5),
            state: None,
        };
        f.touch("id:a", &client("a"), Touch::Offered(6), 100);
        f.touch("id:b", &client("b"), Touch::Seen, 300);
        let old = Client {
            address: Some("10.0.0.9".parse().unwrap()),
            user_agent: Some("Wget/1.21 \"quoted\""),
            ..Client::default()
        };
        f.touch("addr:10.0.0.9", &old, Touch::Downloaded(6), 200);
        let report = Report {
            v: 1,
            box_id: "a".into(),
            outcome: Outcome::RolledBack,
            target_version: Some(6),
            running_version: Some(5),
            previous_version: Some(5),
            step: None,
            message: "not healthy \"at all\"".into(),
            started_at: None,
            finished_at: None,
            durations_ms: [("rebooting".to_string(), 40_000)].into(),
        };
        f.report("id:a", &client("a"), report, 400).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&view_json(&f, &[5, 6], 500)).unwrap();
        let keys: Vec<&str> = v["boxes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["key"].as_str().unwrap())
            .collect();
        assert_eq!(keys, ["id:a", "id:b", "addr:10.0.0.9"]);
        let a = &v["boxes"][0];
        assert_eq!(a["state"], "rolled_back");
        assert_eq!(a["message"], "not healthy \"at all\"");
        assert_eq!(a["last_report"]["durations_ms"]["rebooting"], 40_000);
        assert_eq!(a["last_report"]["received_at"], 400);
        assert_eq!(v["boxes"][2]["user_agent"], "Wget/1.21 \"quoted\"");
        assert_eq!(v["newest"], 6);
        assert_eq!(v["releases"][0]["version"], 6);
        assert_eq!(v["releases"][0]["rolled_back"], 1);
        assert_eq!(v["releases"][0]["downloaded"], 1);
        assert_eq!(v["releases"][1]["running"], 2);
        assert_eq!(
            v["versions"],
            serde_json::json!([{"version": 5, "boxes": 2}, {"version": null, "boxes": 1}])
        );
        assert_eq!(v["store"]["pending"], 3);
    }
}
