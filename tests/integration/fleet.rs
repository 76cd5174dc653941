//! The fleet with the real programs: boxes identify themselves and report their updates, old
//! boxes are listed from their downloads, the operator's view, staged rollouts and their halt,
//! SQLite by default and PostgreSQL shared by two servers.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use opq_update::fleet::rollout::bucket;
use serde_json::{Value, json};

use crate::util::*;

const V1: u64 = 1_700_000_301;
const V2: u64 = 1_700_000_302;
const V3: u64 = 1_700_000_303;
const TOKEN: &str = "operator-secret-1";

/// An update directory with images `versions` (sample payload, default install script).
fn images(d: &Dir, versions: &[u64]) -> PathBuf {
    let updates = d.mkdir("updates");
    sample_payload(d, "fleet");
    for &v in versions {
        let out = d.mkdir(&format!("build-{v}"));
        build_image(d, &out, v, &["payload/box-config-daemon"], &[]);
        publish_dir(&out, &updates);
    }
    updates
}

fn server(d: &Dir, updates: &Path, extra: &[&str]) -> Running {
    let mut args = vec!["--fleet-token", TOKEN];
    args.extend_from_slice(extra);
    start_update_server_logged(updates, &args, &[], &d.join("server.log"))
}

/// `/fleet.json` with the operator's token.
fn fleet(port: u16) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let (status, _, body) = http_send(port, "GET", "/fleet.json", &[("Authorization", &auth)], b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn box_by_id<'a>(view: &'a Value, id: &str) -> &'a Value {
    view["boxes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("box {id} is not in the fleet view: {view:#}"))
}

fn release(view: &Value, version: u64) -> &Value {
    view["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["version"] == version)
        .unwrap_or_else(|| panic!("release {version} is not in the fleet view: {view:#}"))
}

/// Waits until `f` holds of the fleet view; returns that view.
fn eventually(port: u16, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = fleet(port);
        if f(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "never: {what}: {v:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `update-server rollout ...` (or `rollouts`) against `updates` and its database.
fn rollout(updates: &Path, args: &[&str]) -> std::process::Output {
    let mut c = cmd(UPDATE_SERVER);
    c.args(args)
        .arg("--dir")
        .arg(updates)
        .env_remove("BOX_UPDATE_SERVER_SETTINGS");
    run(&mut c)
}

fn rollout_ok(updates: &Path, args: &[&str]) -> String {
    let o = rollout(updates, args);
    assert!(o.status.success(), "rollout {args:?}: {}", stderr(&o));
    stdout(&o)
}

/// A keep-alive client: many requests on one connection, for a thousand simulated boxes.
struct Client {
    s: TcpStream,
}

impl Client {
    fn new(port: u16) -> Client {
        Client {
            s: TcpStream::connect(("127.0.0.1", port)).unwrap(),
        }
    }

    /// (status, headers, body) of one request.
    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> (u16, String, String) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        self.s.write_all(req.as_bytes()).unwrap();
        self.s.write_all(body).unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                self.s.read(&mut b).unwrap(),
                1,
                "the server closed the connection"
            );
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .map(|n| n.trim().parse().unwrap())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.s.read_exact(&mut body).unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head, String::from_utf8(body).unwrap())
    }

    /// The version `/version` offers the box `id`.
    fn offered(&mut self, id: &str) -> u64 {
        let (status, _, body) = self.request("GET", "/version", &[("X-OPQ-Box-Id", id)], b"");
        assert_eq!(status, 200, "{body}");
        body.trim().parse().unwrap()
    }
}

/// The ids of `n` simulated boxes that `/version` offers `version`.
fn offered_to(port: u16, n: usize, version: u64) -> BTreeSet<String> {
    let mut c = Client::new(port);
    (0..n)
        .map(|i| format!("sim-{i}"))
        .filter(|id| c.offered(id) == version)
        .collect()
}

/// Asserts two sets of ids are equal, showing only how they differ.
#[track_caller]
fn assert_same(got: &BTreeSet<String>, want: &BTreeSet<String>, what: &str) {
    let extra: Vec<_> = got.difference(want).take(5).collect();
    let missing: Vec<_> = want.difference(got).take(5).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "{what}: {} offered, {} expected; extra {extra:?}, missing {missing:?}",
        got.len(),
        want.len()
    );
}

/// The ids of `n` simulated boxes within `share` basis points of `version`'s rollout.
fn in_share(n: usize, version: u64, share: u32) -> BTreeSet<String> {
    (0..n)
        .map(|i| format!("sim-{i}"))
        .filter(|id| bucket(&format!("id:{id}"), version) < share)
        .collect()
}

/// Waits until the server on `port` holds the rollout of `version` in `state` (it reads the
/// database each second).
fn wait_rollout(port: u16, version: u64, state: &str) {
    eventually(port, &format!("rollout of {version} {state}"), |v| {
        v["releases"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["version"] == version && r["rollout"]["state"] == state)
    });
}

/// Waits until the server applies a rollout the command set (it reads the database each second).
fn wait_offered(port: u16, id: &str, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut c = Client::new(port);
    while c.offered(id) != version {
        assert!(Instant::now() < deadline, "{id} is never offered {version}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A report as a box posts it.
fn report(id: &str, outcome: &str, target: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "v": 1, "box_id": id, "outcome": outcome, "target_version": target,
        "running_version": if outcome == "committed" { target } else { V1 },
        "previous_version": V1, "message": format!("{outcome} on {target}"),
        "durations_ms": {"downloading": 1500, "installing": 800},
    }))
    .unwrap()
}

fn post_report(c: &mut Client, id: &str, outcome: &str, target: u64) -> u16 {
    let body = report(id, outcome, target);
    c.request(
        "POST",
        "/report",
        &[("Content-Type", "application/json"), ("X-OPQ-Box-Id", id)],
        &body,
    )
    .0
}

#[test]
fn boxes_reporting_success_failure_and_rollback_appear_in_the_fleet_view() {
    let d = Dir::new();
    let updates = images(&d, &[V1]);
    let srv = server(&d, &updates, &[]);
    let url = format!("http://127.0.0.1:{}", srv.port);

    // Box 7 (its config's id) updates to V1 and confirms after the "reboot".
    let ok = BoxUnderTest::new(&d, "ok", &url);
    for step in ["update", "confirm"] {
        let o = ok.run(&[step]);
        assert!(o.status.success(), "{step}: {}", stderr(&o));
    }
    // A box with the template's box_id 0 takes an id of its own; it runs V1, then rolls V2
    // back: V2's health check fails after the reboot.
    let back = BoxUnderTest::new(&d, "back", &url);
    std::fs::write(
        &back.config,
        format!("{{\"updates_ep\": \"{url}\", \"box_id\": 0}}"),
    )
    .unwrap();
    for step in ["update", "confirm"] {
        let o = back.run(&[step]);
        assert!(o.status.success(), "{step}: {}", stderr(&o));
    }
    let out = d.mkdir("build-v2");
    build_image(&d, &out, V2, &["payload/box-config-daemon"], &[]);
    publish_dir(&out, &updates);
    wait_listed(srv.port, V2);
    let o = back.run(&["update"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = back.run(&[
        "confirm",
        "--health-check",
        "echo 'sensor missing' >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(1), "a rollback ends confirm with 1");
    assert!(
        stderr(&o).contains("rolled back to version"),
        "{}",
        stderr(&o)
    );
    assert_eq!(back.current_version(), Some(V1), "rolled back");
    let back_id = back.status()["box_id"].as_str().unwrap().to_string();
    assert!(back_id.starts_with("auto-"), "{back_id}");
    assert_eq!(back.status()["box_id"], back_id.as_str(), "the id is kept");

    // Box pq-9 fails: V3's install script breaks.
    let failing = d.write("failing.sh", "#!/bin/sh\necho broken >&2\nexit 7\n");
    let out = d.mkdir("build-bad");
    build_image(
        &d,
        &out,
        V3,
        &["payload/box-config-daemon"],
        &["--install-script", failing.to_str().unwrap()],
    );
    publish_dir(&out, &updates);
    wait_listed(srv.port, V3);
    let bad = BoxUnderTest::new(&d, "bad", &url);
    std::fs::write(
        &bad.config,
        format!("{{\"updates_ep\": \"{url}\", \"box_id\": \"pq-9\"}}"),
    )
    .unwrap();
    let o = bad.run(&["update"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(bad.status()["reports_pending"], 0, "the report was sent");

    let v = fleet(srv.port);
    let b7 = box_by_id(&v, "7");
    assert_eq!(b7["version"], V1);
    assert_eq!(b7["state"], "committed");
    assert_eq!(b7["last_success"]["version"], V1);
    assert_eq!(b7["last_report"]["outcome"], "committed");
    assert_eq!(b7["last_report"]["target_version"], V1);
    assert_eq!(b7["address"], "127.0.0.1");
    assert!(
        b7["user_agent"]
            .as_str()
            .unwrap()
            .starts_with("box-updater/")
    );
    let d7 = &b7["last_report"]["durations_ms"];
    for step in ["downloading", "installing", "rebooting", "checking"] {
        assert!(d7[step].is_u64(), "{step} in {d7}");
    }
    assert_eq!(b7["message"], format!("version {V1} is confirmed"));

    let bb = box_by_id(&v, &back_id);
    assert_eq!(bb["state"], "rolled_back");
    assert_eq!(bb["version"], V1);
    assert_eq!(bb["last_report"]["outcome"], "rolled_back");
    assert_eq!(bb["last_report"]["target_version"], V2);
    assert_eq!(bb["last_report"]["running_version"], V1);
    assert!(
        bb["message"].as_str().unwrap().contains("is not healthy"),
        "{bb}"
    );
    assert_eq!(bb["last_success"]["version"], V1);

    let b9 = box_by_id(&v, "pq-9");
    assert_eq!(b9["state"], "failed");
    assert_eq!(b9["version"], Value::Null);
    assert_eq!(b9["last_report"]["outcome"], "failed");
    assert_eq!(b9["last_report"]["step"], "installing");
    assert_eq!(b9["last_report"]["target_version"], V3);
    assert!(
        b9["message"].as_str().unwrap().contains("exit code 7"),
        "{b9}"
    );

    let r1 = release(&v, V1);
    assert_eq!(
        (r1["committed"].as_u64(), r1["running"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(release(&v, V2)["rolled_back"], 1);
    let r3 = release(&v, V3);
    assert_eq!(
        (
            r3["failed"].as_u64(),
            r3["offered"].as_u64(),
            r3["newest"].as_bool()
        ),
        (Some(1), Some(1), Some(true))
    );
    assert_eq!(r3["rollout"], Value::Null);
    let counts: Vec<(Value, u64)> = v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["version"].clone(), c["boxes"].as_u64().unwrap()))
        .collect();
    assert_eq!(counts, [(json!(V1), 2), (Value::Null, 1)]);

    // The fleet is kept in the SQLite file beside the update directory, across a restart.
    stop_gracefully(srv);
    assert!(d.join("updates.fleet.sqlite").is_file());
    assert!(
        !tree(&updates).iter().any(|f| f.contains("sqlite")),
        "nothing in the served directory"
    );
    let srv = server(&d, &updates, &[]);
    let again = fleet(srv.port);
    assert_eq!(
        box_by_id(&again, "pq-9")["last_report"]["step"],
        "installing"
    );
    assert_eq!(box_by_id(&again, "7")["last_success"]["version"], V1);
    assert_eq!(again["boxes"].as_array().unwrap().len(), 3);
}

#[test]
fn the_fleet_view_needs_the_operators_token() {
    let d = Dir::new();
    let updates = images(&d, &[V1]);
    let closed = start_update_server_logged(&updates, &[], &[], &d.join("closed.log"));
    let (status, _, body) = http_send(closed.port, "GET", "/fleet.json", &[], b"");
    assert_eq!(status, 403);
    assert!(body.contains("--fleet-token"), "{body}");
    drop(closed);

    // The token may come from the settings, as in the docker deployment.
    let env = format!("{{\"fleet_token\": \"{TOKEN}\"}}");
    let srv = start_update_server_logged(
        &updates,
        &[],
        &[("BOX_UPDATE_SERVER_SETTINGS", &env)],
        &d.join("s.log"),
    );
    for auth in [
        "",
        "Bearer wrong",
        "Basic b3A6b3A=",
        "Bearer operator-secret-12",
    ] {
        let (status, head, _) = http_send(
            srv.port,
            "GET",
            "/fleet.json",
            &[("Authorization", auth)],
            b"",
        );
        assert_eq!(status, 401, "{auth}");
        assert!(head.contains("WWW-Authenticate: Bearer"), "{head}");
    }
    assert_eq!(fleet(srv.port)["boxes"], json!([]));
    // The page itself holds no data and loads without the token, under a strict policy.
    let (status, head, body) = http_get(srv.port, "/fleet");
    assert_eq!(status, 200);
    assert!(
        head.contains("Content-Security-Policy: default-src 'none'"),
        "{head}"
    );
    assert!(
        body.contains("/fleet.json") && !body.contains("src=\"http"),
        "self-contained"
    );
}

#[test]
fn an_old_box_is_listed_from_its_download() {
    let d = Dir::new();
    let updates = images(&d, &[V1]);
    let srv = server(&d, &updates, &[]);
    // The old shell updater: wget /latest (which follows the redirect).
    sh(
        d.path(),
        &format!(
            "wget -q -U 'Wget/1.21 <old-box>' -O old.tar.bz2 http://127.0.0.1:{}/latest",
            srv.port
        ),
    );
    assert!(d.join("old.tar.bz2").metadata().unwrap().len() > 0);
    // A monitor asking /version without an id is not a box.
    let (status, _, _) = http_get(srv.port, "/version");
    assert_eq!(status, 200);
    let v = fleet(srv.port);
    let boxes = v["boxes"].as_array().unwrap();
    assert_eq!(boxes.len(), 1, "{v:#}");
    let old = &boxes[0];
    assert_eq!(old["id"], Value::Null);
    assert_eq!(old["key"], "addr:127.0.0.1");
    assert_eq!(old["address"], "127.0.0.1");
    assert_eq!(old["user_agent"], "Wget/1.21 <old-box>");
    assert_eq!(old["downloaded"], V1);
    assert_eq!(old["offered"], V1);
    assert_eq!(release(&v, V1)["downloaded"], 1);
}

#[test]
fn bad_reports_are_refused_and_change_nothing() {
    let d = Dir::new();
    let updates = images(&d, &[V1]);
    let srv = server(&d, &updates, &[]);
    let good = report("b-1", "failed", V1);
    let good_text = String::from_utf8(good.clone()).unwrap();
    let json_type = ("Content-Type", "application/json");
    let big = format!(
        "{{\"v\": 1, \"box_id\": \"b-1\", \"pad\": \"{}\"}}",
        "x".repeat(5000)
    );
    // Headers, body, the status it gets, and what the answer says.
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![("Content-Type", "text/plain")],
            good.clone(),
            415,
            "application/json",
        ),
        (vec![json_type], big.into_bytes(), 413, "larger than 4096"),
        (
            vec![json_type],
            b"{not json".to_vec(),
            400,
            "not valid JSON",
        ),
        (
            vec![json_type],
            good_text.replace("\"v\":1", "\"v\":7").into_bytes(),
            400,
            "version 7",
        ),
        (
            vec![json_type],
            good_text.replace("b-1", "b 1").into_bytes(),
            400,
            "box_id",
        ),
        (
            vec![json_type],
            good_text.replace("\"failed\"", "\"exploded\"").into_bytes(),
            400,
            "unknown variant",
        ),
        (
            vec![json_type, ("X-OPQ-Box-Id", "b-2")],
            good.clone(),
            400,
            "differs",
        ),
        (vec![json_type], Vec::new(), 400, "not valid JSON"),
    ];
    for (headers, body, want, says) in cases {
        let (status, _, text) = http_send(srv.port, "POST", "/report", &headers, &body);
        assert_eq!(status, want, "{headers:?}: {text}");
        assert!(text.contains(says), "{says}: {text}");
    }
    let (status, head, _) = http_send(srv.port, "GET", "/report", &[], b"");
    assert_eq!(status, 405);
    assert!(head.contains("Allow: POST"));
    let (status, _, _) = http_send(
        srv.port,
        "POST",
        "/report",
        &[json_type, ("Transfer-Encoding", "chunked")],
        b"",
    );
    assert_eq!(status, 411);
    assert_eq!(fleet(srv.port)["boxes"], json!([]), "nothing was recorded");

    // One box may send a burst (its outbox after an outage), then it is slowed down.
    let mut c = Client::new(srv.port);
    for i in 0..20 {
        assert_eq!(post_report(&mut c, "b-1", "failed", V1 - i), 202);
    }
    let (status, head, body) = c.request("POST", "/report", &[json_type], &good);
    assert_eq!(status, 429, "{body}");
    assert!(head.contains("Retry-After: "), "{head}");
    assert_eq!(
        post_report(&mut c, "b-2", "committed", V1),
        202,
        "other boxes are not held up"
    );
    let v = fleet(srv.port);
    assert_eq!(v["boxes"].as_array().unwrap().len(), 2);
    assert_eq!(
        box_by_id(&v, "b-1")["last_report"]["target_version"],
        V1 - 19
    );
    // Old boxes and plain requests still get what they always got.
    assert_eq!(http_get(srv.port, "/version").2, V1.to_string());
}

#[test]
fn a_ten_percent_rollout_offers_the_release_to_the_same_tenth_of_a_thousand_boxes() {
    let d = Dir::new();
    let updates = images(&d, &[V1]);
    let srv = server(&d, &updates, &[]);
    // The rollout first, then the image: no box is offered it before the rollout holds.
    let said = rollout_ok(&updates, &["rollout", &V2.to_string(), "--percent", "10"]);
    assert!(
        said.contains("offered to 10 % of the boxes") && said.contains("not published yet"),
        "{said}"
    );
    let out = d.mkdir("build-v2");
    build_image(&d, &out, V2, &["payload/box-config-daemon"], &[]);
    let want = in_share(1000, V2, 1000);
    assert!((70..=130).contains(&want.len()), "{} of 1000", want.len());
    // Before publishing, every box is offered V1.
    wait_rollout(srv.port, V2, "active");
    assert!(offered_to(srv.port, 1000, V2).is_empty());
    publish_dir(&out, &updates);
    wait_offered(srv.port, want.iter().next().unwrap(), V2);

    let first = offered_to(srv.port, 1000, V2);
    assert_same(
        &first,
        &want,
        "exactly the boxes whose bucket is under 10 %",
    );
    assert_same(
        &offered_to(srv.port, 1000, V2),
        &first,
        "and the same ones every time",
    );
    // /latest agrees with /version, and an old box (no id) is bucketed by its address.
    let mut c = Client::new(srv.port);
    for id in ["sim-1", "sim-2", first.iter().next().unwrap().as_str()] {
        let offered = c.offered(id);
        let (_, head, _) = c.request("GET", "/latest", &[("X-OPQ-Box-Id", id)], b"");
        assert!(
            head.contains(&format!("opq-box-update-{offered}.tar.bz2")),
            "{id}: {head}"
        );
        assert!(head.contains("Cache-Control: no-cache, private"), "{head}");
    }
    let by_address = if bucket("addr:127.0.0.1", V2) < 1000 {
        V2
    } else {
        V1
    };
    assert_eq!(http_get(srv.port, "/version").2, by_address.to_string());
    let v = fleet(srv.port);
    let r = &release(&v, V2)["rollout"];
    assert_eq!(
        (r["state"].as_str(), r["share_now"].as_str()),
        (Some("active"), Some("10 %"))
    );
    assert_eq!(release(&v, V2)["offered"], first.len());

    // Widening keeps the first tenth in.
    rollout_ok(&updates, &["rollout", &V2.to_string(), "--percent", "50"]);
    let half = in_share(1000, V2, 5000);
    wait_offered(srv.port, half.difference(&first).next().unwrap(), V2);
    let wider = offered_to(srv.port, 1000, V2);
    assert_same(&wider, &half, "a half");
    assert!(wider.is_superset(&first));
    // Released: everyone, as without a rollout.
    let said = rollout_ok(&updates, &["rollout", &V2.to_string(), "--release"]);
    assert!(said.contains("offered to every box"), "{said}");
    let all: BTreeSet<String> = (0..1000).map(|i| format!("sim-{i}")).collect();
    wait_offered(srv.port, all.difference(&wider).next().unwrap(), V2);
    assert_same(&offered_to(srv.port, 1000, V2), &all, "everyone");
    assert!(rollout_ok(&updates, &["rollouts"]).contains("no rollouts"));
}

#[test]
fn failures_past_the_threshold_halt_a_rollout_which_resumes_or_is_withdrawn() {
    let d = Dir::new();
    let updates = images(&d, &[V1, V2]);
    let srv = server(&d, &updates, &[]);
    let v2 = V2.to_string();
    // 30 %, widening by 5 % every 2 s: it would reach everyone within half a minute.
    rollout_ok(
        &updates,
        &[
            "rollout",
            &v2,
            "--percent",
            "30",
            "--widen-by",
            "5",
            "--every",
            "2s",
            "--halt-after",
            "3",
            "--halt-share",
            "50",
        ],
    );
    let share = in_share(400, V2, 3000);
    let ids: Vec<&String> = share.iter().take(6).collect();
    wait_rollout(srv.port, V2, "active");
    let mut c = Client::new(srv.port);
    // Two successes and two failures: under the count.
    for (id, outcome) in [
        (ids[0], "committed"),
        (ids[1], "committed"),
        (ids[2], "failed"),
        (ids[3], "rolled_back"),
    ] {
        assert_eq!(post_report(&mut c, id, outcome, V2), 202);
    }
    // A failure outside the share (a box that imported the image by hand) does not count.
    let outsider = (0..400)
        .map(|i| format!("sim-{i}"))
        .find(|id| bucket(&format!("id:{id}"), V2) >= 9000)
        .unwrap();
    assert_eq!(post_report(&mut c, &outsider, "failed", V2), 202);
    std::thread::sleep(Duration::from_millis(1500));
    let v = fleet(srv.port);
    assert_eq!(
        release(&v, V2)["rollout"]["state"],
        "active",
        "2 of 4 is under 3 boxes"
    );
    // The third failure: 3 of 5 = 60 %.
    assert_eq!(post_report(&mut c, ids[4], "failed", V2), 202);
    let v = eventually(srv.port, "halted", |v| {
        release(v, V2)["rollout"]["state"] == "halted"
    });
    let r = &release(&v, V2)["rollout"];
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("3 of 5 boxes") && reason.contains("(60 %)"),
        "{reason}"
    );
    let frozen = r["share_now_bp"].as_u64().unwrap();
    assert!(
        frozen < 10_000,
        "halted before it reached everyone: {frozen}"
    );
    std::thread::sleep(Duration::from_millis(2500));
    let later = fleet(srv.port);
    assert_eq!(
        release(&later, V2)["rollout"]["share_now_bp"].as_u64(),
        Some(frozen),
        "it stopped widening"
    );
    let o = rollout(&updates, &["rollout", &v2, "--percent", "100"]);
    assert!(
        !o.status.success() && stderr(&o).contains("is halted"),
        "{}",
        stderr(&o)
    );
    let listed = rollout_ok(&updates, &["rollouts"]);
    assert!(
        listed.contains("halted at") && listed.contains("3 of 5 boxes"),
        "{listed}"
    );

    // Resumed: it widens again, and the failures before no longer count.
    std::thread::sleep(Duration::from_millis(1100));
    let said = rollout_ok(&updates, &["rollout", &v2, "--resume"]);
    assert!(said.contains("active"), "{said}");
    let v = eventually(srv.port, "widening again", |v| {
        release(v, V2)["rollout"]["share_now_bp"].as_u64() > Some(frozen)
    });
    assert_eq!(release(&v, V2)["rollout"]["counted_bad"], 0);

    // Withdrawn: nobody is offered it, not even the boxes that had it.
    rollout_ok(&updates, &["rollout", &v2, "--withdraw"]);
    wait_offered(srv.port, ids[0], V1);
    assert!(offered_to(srv.port, 400, V2).is_empty());
    let (_, _, body) = c.request("GET", "/version", &[], b"");
    assert_eq!(body, V1.to_string(), "nor an old box");
    assert_eq!(
        release(&fleet(srv.port), V2)["rollout"]["state"],
        "withdrawn"
    );
}

#[test]
fn a_box_that_cannot_report_still_updates_and_reports_later() {
    let d = Dir::new();
    let updates = images(&d, &[V1]);
    let srv = server(&d, &updates, &[]);
    let url = format!("http://127.0.0.1:{}", srv.port);
    let b = BoxUnderTest::new(&d, "box", &url);
    let o = b.run(&["update"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The server is away while the box reboots and confirms.
    let port = srv.port;
    stop_gracefully(srv);
    let o = b.run(&["confirm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.current_version(), Some(V1));
    assert_eq!(b.status()["reports_pending"], 1);
    // Back on the same port: the next contact sends the report.
    let srv = start_update_server_logged(
        &updates,
        &["--fleet-token", TOKEN, "--port", &port.to_string()],
        &[],
        &d.join("server2.log"),
    );
    let o = b.run(&["check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.status()["reports_pending"], 0);
    let v = fleet(srv.port);
    assert_eq!(box_by_id(&v, "7")["last_report"]["outcome"], "committed");
    assert_eq!(box_by_id(&v, "7")["state"], "committed");
}

#[test]
fn two_servers_on_one_postgres_agree_on_a_rollout_and_its_halt() {
    let pg = Postgres::start();
    let d = Dir::new();
    let updates = images(&d, &[V1, V2]);
    let db = pg.url();
    let a = server(&d, &updates, &["--database", &db]);
    let b = start_update_server_logged(
        &updates,
        &["--fleet-token", TOKEN, "--database", &db],
        &[],
        &d.join("b.log"),
    );
    let v2 = V2.to_string();
    let o = rollout(
        &updates,
        &[
            "rollout",
            &v2,
            "--percent",
            "20",
            "--halt-after",
            "3",
            "--halt-share",
            "10",
            "--database",
            &db,
        ],
    );
    assert!(o.status.success(), "{}{}", stderr(&o), pg.log());
    let want = in_share(500, V2, 2000);
    let first = want.iter().next().unwrap();
    wait_rollout(a.port, V2, "active");
    wait_rollout(b.port, V2, "active");
    assert_same(&offered_to(a.port, 500, V2), &want, "a fifth");
    assert_same(
        &offered_to(b.port, 500, V2),
        &want,
        "both servers offer the same boxes",
    );

    // Failures split over the two servers: neither alone passes the threshold of 3.
    let ids: Vec<&String> = want.iter().take(4).collect();
    let (mut ca, mut cb) = (Client::new(a.port), Client::new(b.port));
    assert_eq!(post_report(&mut ca, ids[0], "failed", V2), 202);
    assert_eq!(post_report(&mut cb, ids[1], "rolled_back", V2), 202);
    assert_eq!(post_report(&mut ca, ids[2], "committed", V2), 202);
    assert_eq!(post_report(&mut cb, ids[3], "failed", V2), 202);
    for port in [a.port, b.port] {
        // Each server sees the halt, and the boxes the other heard from (read each second,
        // the rollouts a moment before the boxes).
        let v =
            eventually(port, "halted, with every box, on both servers", |v| {
                release(v, V2)["rollout"]["state"] == "halted"
                    && ids.iter().all(|id| {
                        v["boxes"].as_array().unwrap().iter().any(|b| {
                            b["id"] == id.as_str() && b["last_report"]["target_version"] == V2
                        })
                    })
            });
        let reason = release(&v, V2)["rollout"]["reason"]
            .as_str()
            .unwrap()
            .to_string();
        // Who halts first may not yet have read the other's success: 3 of 3, or 3 of 4.
        assert!(reason.contains("halted automatically: 3 of "), "{reason}");
    }
    let o = rollout(&updates, &["rollouts", "--database", &db]);
    assert!(stdout(&o).contains("halted"), "{}", stdout(&o));
    // Withdrawn through the database: both follow.
    let o = rollout(&updates, &["rollout", &v2, "--withdraw", "--database", &db]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_offered(a.port, first, V1);
    wait_offered(b.port, first, V1);
    stop_gracefully(a);
    stop_gracefully(b);
    // A restarted server reads it all back from PostgreSQL.
    let c = server(&d, &updates, &["--database", &db]);
    let v = fleet(c.port);
    assert!(
        v["boxes"].as_array().unwrap().len() >= 500,
        "every box is kept"
    );
    assert_eq!(release(&v, V2)["rollout"]["state"], "withdrawn");
    assert_eq!(v["store"]["kind"], "postgres");
}
