//! The fleet's side of update-server's HTTP: who a request comes from, which version a box is
//! offered, `POST /report`, and the operator's `GET /fleet` page and `GET /fleet.json`. Every
//! answer here comes from memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::model::{Client, Fleet, Progress, Refusal, StoreHealth, Touch};
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
        json(200, &build_view(fleet, versions, unix_now()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Serialize)]
pub struct SuccessView {
    pub version: u64,
    pub at: u64,
}

#[derive(Serialize)]
pub struct ReportView {
    #[serde(flatten)]
    pub report: Report,
    pub received_at: u64,
}

#[derive(Serialize)]
pub struct BoxView {
    pub key: String,
    pub id: Option<String>,
    pub address: Option<String>,
    pub user_agent: Option<String>,
    pub version: Option<u64>,
    pub state: Option<&'static str>,
    pub message: Option<String>,
    pub first_seen: u64,
    pub last_seen: u64,
    pub offered: Option<u64>,
    pub downloaded: Option<u64>,
    pub last_success: Option<SuccessView>,
    pub last_report: Option<ReportView>,
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

#[derive(Serialize)]
pub struct View {
    pub generated_at: u64,
    pub newest: Option<u64>,
    pub boxes: Vec<BoxView>,
    pub versions: Vec<VersionCount>,
    pub releases: Vec<ReleaseView>,
    pub store: StoreView,
}

/// The whole fleet, newest seen first, with counts per version and each release's progress
/// (every published one, and every one with a rollout).
pub fn build_view(fleet: &Fleet, versions: &[u64], now: u64) -> View {
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
    let mut boxes = Vec::with_capacity(fleet.len());
    fleet.for_each(|key, rec| {
        for (&v, p) in progress.iter_mut() {
            p.add(v, rec);
        }
        *counts.entry(rec.version).or_insert(0) += 1;
        boxes.push(BoxView {
            key: key.to_string(),
            id: rec.id.clone(),
            address: rec.address.map(|a| a.to_string()),
            user_agent: rec.user_agent.clone(),
            version: rec.version,
            state: rec.state.map(|s| s.name()),
            message: rec.report.as_ref().map(|r| r.message.clone()),
            first_seen: rec.first_seen,
            last_seen: rec.last_seen,
            offered: rec.offered,
            downloaded: rec.downloaded,
            last_success: rec.last_success.map(|version| SuccessView {
                version,
                at: rec.last_success_at,
            }),
            last_report: rec.report.clone().map(|report| ReportView {
                report,
                received_at: rec.reported_at,
            }),
        });
    });
    boxes.sort_unstable_by(|a, b| b.last_seen.cmp(&a.last_seen).then(a.key.cmp(&b.key)));
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
    View {
        generated_at: now,
        newest,
        boxes,
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
    }
}
