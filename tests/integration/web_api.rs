//! `box-updater serve`'s HTTP API with the real binary on 127.0.0.1: every endpoint, one update at
//! a time, config edits, same-origin and token guards, uploads, the confirm step at start, and
//! hostile clients (absurd bodies, stalled requests, chunked bodies, a flood of connections).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::*;

const V1: u64 = 1_700_000_101;
const V2: u64 = 1_700_000_102;

/// One HTTP answer.
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.text()))
    }
}

/// A minimal HTTP/1.1 exchange over loopback; `Host` is the address the box listens on, as a
/// browser on the box's page would send it.
pub fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to box-updater");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (and close) before reading a refused body; that is its right.
    let _ = s.write_all(body);
    parse_answer(&read_answer(&mut s))
}

/// Sends `bytes` as they are (a head, perhaps part of a body) and reads the one answer.
pub fn raw_request(port: u16, bytes: &[u8]) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to box-updater");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    parse_answer(&read_answer(&mut s))
}

fn parse_answer(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// Reads one answer: up to its Content-Length or last chunk, so that a server keeping the
/// connection open despite `Connection: close` can't stall a test; else to the end.
fn read_answer(s: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        // A reset after a complete answer (a refused body left unread) ends it as well.
        let n = s.read(&mut buf).unwrap_or_default();
        if n == 0 {
            return raw;
        }
        raw.extend_from_slice(&buf[..n]);
        let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
        let body = &raw[split + 4..];
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        if length.is_some_and(|len| body.len() >= len)
            || (head.contains("transfer-encoding: chunked") && body.ends_with(b"0\r\n\r\n"))
        {
            return raw;
        }
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..eol])
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .expect("chunk size");
        if size == 0 {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
    out
}

pub fn get(port: u16, path: &str) -> Reply {
    request(port, "GET", path, &[], b"")
}

/// A POST as the box's own page sends it: same origin, JSON.
pub fn post_json(port: u16, path: &str, body: &Value) -> Reply {
    let origin = format!("http://127.0.0.1:{port}");
    request(
        port,
        "POST",
        path,
        &[
            ("Origin", &origin),
            ("Sec-Fetch-Site", "same-origin"),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
}

/// An upload as the page's Import form sends it.
pub fn upload(port: u16, name: &str, bytes: &[u8], extra: &[(&str, &str)]) -> Reply {
    let origin = format!("http://127.0.0.1:{port}");
    let mut headers = vec![
        ("Origin", origin.as_str()),
        ("Sec-Fetch-Site", "same-origin"),
        ("X-Requested-With", "box-updater"),
        ("Content-Type", "application/octet-stream"),
    ];
    headers.extend_from_slice(extra);
    request(
        port,
        "POST",
        &format!("/box_update/upload?name={name}&force=0"),
        &headers,
        bytes,
    )
}

/// Starts `box-updater serve` for `b` on `port`; its log goes to `<box>/serve.log`.
pub fn start_serve(b: &BoxUnderTest, port: u16, extra: &[&str]) -> Running {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(b.root.parent().unwrap().join("serve.log"))
        .unwrap();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["serve", "--listen", &listen];
    args.extend_from_slice(extra);
    let mut child = b
        .cmd(&args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting box-updater serve");
    wait_for_port(port, &mut child);
    Running { child, port }
}

/// Polls the status until no update runs (or `deadline_s` passes); returns the last status.
pub fn wait_idle(port: u16, deadline_s: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(deadline_s);
    loop {
        let s = get(port, "/box_update/status").json();
        if s["running"] == false {
            return s;
        }
        assert!(Instant::now() < deadline, "the update never ended: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A copy of `image` (of `version`) as `dest` whose payload was changed after it was built: its
/// SHA256SUMS no longer matches, as with an image altered on its way to the box.
pub fn tamper_image(dir: &Dir, image: &Path, version: u64, dest: &Path) {
    let work = dir.mkdir(&format!("tamper-{version}"));
    sh(&work, &format!("tar xjf '{}'", image.display()));
    let top = format!("opq-box-update-{version}");
    sh(
        &work,
        &format!("echo 'echo tampered' >> {top}/box-config-daemon/run.sh"),
    );
    sh(
        &work,
        &format!("tar cjf '{}' --owner=0 --group=0 {top}", dest.display()),
    );
}

/// Builds the sample payload at `version` into `<dir>/<name>/`; returns the image's path.
fn image(dir: &Dir, name: &str, version: u64, extra: &[&str]) -> PathBuf {
    sample_payload(dir, &format!("v{version}"));
    let out = dir.mkdir(name);
    build_image(dir, &out, version, &["payload/box-config-daemon"], extra)
}

/// Moves an image and its sidecars into the server's directory, sidecars first.
fn publish(image: &Path, updates: &Path) {
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    for ext in [".sha256", ".minisig", ""] {
        let from = image.with_file_name(format!("{name}{ext}"));
        if from.exists() {
            std::fs::rename(&from, updates.join(format!("{name}{ext}"))).unwrap();
        }
    }
}

/// A box whose config names a server on a port where nothing listens: for tests that must not
/// reach any update server.
fn offline_box(d: &Dir) -> BoxUnderTest {
    BoxUnderTest::new(d, "box", &format!("http://127.0.0.1:{}", free_port()))
}

#[test]
fn every_endpoint_answers() {
    let d = Dir::new();
    let updates = d.mkdir("updates");
    let server = start_update_server(&updates);
    publish(&image(&d, "s1", V1, &[]), &updates);
    wait_listed(server.port, V1);
    let b = BoxUnderTest::new(&d, "box", &server.url(""));
    let web = start_serve(&b, free_port(), &[]);
    let port = web.port;

    let page = get(port, "/");
    assert_eq!(page.status, 200);
    assert!(
        page.header("Content-Type")
            .unwrap()
            .starts_with("text/html")
    );
    let csp = page.header("Content-Security-Policy").unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    let html = page.text();
    assert!(html.contains("Update Box") && html.contains("Import update"));
    // Self-contained: every src/href stays on the page or the box, no imports or fonts.
    for attr in ["src=\"", "href=\""] {
        for (i, _) in html.match_indices(attr) {
            let value = &html[i + attr.len()..];
            assert!(
                value.starts_with("data:") || value.starts_with('#') || value.starts_with('/'),
                "the page loads something from elsewhere: {}",
                &value[..value.len().min(60)]
            );
        }
    }
    assert!(!html.contains("@import") && !html.contains("url("));
    assert_eq!(get(port, "/index.html").status, 200);

    assert_eq!(get(port, "/version").json(), json!({"version": null}));
    let cfg = get(port, "/box_config").json();
    assert_eq!(cfg["box_config"]["updates_ep"], server.url(""));
    assert_eq!(cfg["box_config"]["calibration"]["gain"], 1.5);

    let st = get(port, "/box_update/status");
    assert_eq!(st.header("Cache-Control"), Some("no-store"));
    let st = st.json();
    assert_eq!(st["state"], "idle");
    assert_eq!(st["running"], false);
    assert_eq!(st["version"], Value::Null);
    assert!(st["history"].as_array().unwrap().is_empty());
    assert!(st["log_tail"].is_array());

    let check = get(port, "/box_update/check");
    assert_eq!(check.status, 200, "{}", check.text());
    assert_eq!(
        check.json(),
        json!({"installed": null, "newest": V1, "update_available": true})
    );

    let missing = get(port, "/no/such/thing");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["ok"], false);
    assert_eq!(request(port, "DELETE", "/version", &[], b"").status, 405);
    assert_eq!(get(port, "/box_update").status, 405);
    // Checking installs nothing.
    assert!(b.releases().is_empty());
    assert_eq!(b.reboot_count(), 0);
}

#[test]
fn check_says_502_with_the_reason_when_the_server_is_unreachable() {
    let d = Dir::new();
    let b = offline_box(&d);
    let web = start_serve(&b, free_port(), &[]);
    let r = get(web.port, "/box_update/check");
    assert_eq!(r.status, 502);
    let j = r.json();
    assert_eq!(j["ok"], false);
    assert!(j["error"].as_str().unwrap().contains("cannot reach"), "{j}");
}

#[test]
fn an_update_gives_202_then_409_while_it_runs_and_is_confirmed_when_serve_restarts() {
    let d = Dir::new();
    let updates = d.mkdir("updates");
    let server = start_update_server(&updates);
    let script = d.write(
        "slow_install.sh",
        "#!/bin/sh\nsleep 2\necho slow install done\n",
    );
    publish(
        &image(
            &d,
            "s1",
            V1,
            &["--install-script", script.to_str().unwrap()],
        ),
        &updates,
    );
    wait_listed(server.port, V1);
    let b = BoxUnderTest::new(&d, "box", &server.url(""));
    let port = free_port();
    let web = start_serve(&b, port, &[]);

    let first = post_json(port, "/box_update", &json!({}));
    assert_eq!(first.status, 202, "{}", first.text());
    assert_eq!(first.json()["ok"], true);
    let second = post_json(port, "/box_update", &json!({"force": true}));
    assert_eq!(second.status, 409, "{}", second.text());
    assert!(
        second.json()["error"]
            .as_str()
            .unwrap()
            .contains("already running")
    );
    let up = upload(port, &format!("opq-box-update-{V2}.tar.bz2"), b"x", &[]);
    assert_eq!(
        up.status,
        409,
        "an upload waits its turn too: {}",
        up.text()
    );

    // While it runs, the status says so, with the step and the version it goes to.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = get(port, "/box_update/status").json();
        assert_eq!(
            s["running"], true,
            "the update ended before installing: {s}"
        );
        if s["state"] == "installing" {
            assert_eq!(s["target_version"], V1);
            break;
        }
        assert!(Instant::now() < deadline, "never reached installing: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(post_json(port, "/box_update", &json!({})).status, 409);

    let s = wait_idle(port, 20);
    assert_eq!(s["state"], "rebooting", "{s}");
    assert_eq!(s["version"], V1);
    assert_eq!(s["pending"]["new"], V1);
    assert_eq!(s["last_result"]["result"], "rebooting");
    assert!(s["log_tail"].to_string().contains("slow install done"));
    assert_eq!(b.reboot_count(), 1);
    assert_eq!(get(port, "/version").json()["version"], V1);

    // The reboot: a new serve confirms the pending release before it answers.
    drop(web);
    let web = start_serve(&b, port, &[]);
    let s = get(web.port, "/box_update/status").json();
    assert_eq!(s["state"], "committed", "{s}");
    assert_eq!(s["pending"], Value::Null);
    assert_eq!(s["last_result"]["result"], "committed");
    assert_eq!(s["version"], V1);
    assert_eq!(b.reboot_count(), 1);
    b.assert_current_complete();
}

#[test]
fn config_edits_take_the_original_body_and_refusals_leave_the_file_as_it_was() {
    let d = Dir::new();
    let b = offline_box(&d);
    let web = start_serve(&b, free_port(), &[]);
    let port = web.port;
    let before = std::fs::read(&b.config).unwrap();

    // The original page sent the config as JSON text inside a string.
    let text = r#"{"updates_ep": "http://emilia.ics.hawaii.edu:8151", "box_id": 7, "calibration": {"gain": 1.5}, "new_key": [1, 2]}"#;
    let r = post_json(port, "/box_config", &json!({ "box_config": text }));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ok"], true);
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&b.config).unwrap()).unwrap();
    assert_eq!(on_disk["updates_ep"], "http://emilia.ics.hawaii.edu:8151");
    assert_eq!(on_disk["new_key"], json!([1, 2]));
    assert_eq!(on_disk["calibration"]["gain"], 1.5);
    let mut backup = b.config.clone().into_os_string();
    backup.push(".bak");
    assert_eq!(
        std::fs::read(&backup).unwrap(),
        before,
        "the previous file is kept"
    );
    assert_eq!(get(port, "/box_config").json()["box_config"], on_disk);

    // A plain object, wrapped or not.
    let r = post_json(
        port,
        "/box_config",
        &json!({"box_config": {"updates_ep": "https://updates.example/box", "box_id": 8}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        port,
        "/box_config",
        &json!({"updates_ep": "http://10.0.0.1:8151", "box_id": 9}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(port, "/box_config").json()["box_config"]["box_id"], 9);

    let kept = std::fs::read(&b.config).unwrap();
    let bad: [(&str, &[u8]); 6] = [
        (
            "broken JSON text",
            br#"{"box_config": "{\"updates_ep\": oops"}"#,
        ),
        ("not an object", br#"{"box_config": "[1, 2]"}"#),
        (
            "ftp URL",
            br#"{"box_config": {"updates_ep": "ftp://x.example"}}"#,
        ),
        ("number URL", br#"{"box_config": {"updates_ep": 8151}}"#),
        ("no host", br#"{"box_config": {"updates_ep": "http://"}}"#),
        ("not JSON at all", b"box_config=1"),
    ];
    let origin = format!("http://127.0.0.1:{port}");
    for (what, body) in bad {
        let r = request(
            port,
            "POST",
            "/box_config",
            &[("Origin", &origin), ("Content-Type", "application/json")],
            body,
        );
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        let j = r.json();
        assert_eq!(j["ok"], false, "{what}");
        assert!(!j["error"].as_str().unwrap().is_empty(), "{what}");
        assert_eq!(
            std::fs::read(&b.config).unwrap(),
            kept,
            "{what}: the file changed"
        );
    }

    // Bodies are size-limited.
    let big =
        json!({"box_config": {"updates_ep": "http://a.example", "pad": "x".repeat(70 * 1024)}});
    let r = post_json(port, "/box_config", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(std::fs::read(&b.config).unwrap(), kept);
}

#[test]
fn cross_origin_and_non_json_requests_are_refused_and_start_nothing() {
    let d = Dir::new();
    let b = offline_box(&d);
    let web = start_serve(&b, free_port(), &[]);
    let port = web.port;
    let config_before = std::fs::read(&b.config).unwrap();
    let same = format!("http://127.0.0.1:{port}");
    let lookalike = format!("http://127.0.0.1:{port}.evil.example");
    let json_ct = ("Content-Type", "application/json");

    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let refused: Vec<(&str, Headers, u16)> = vec![
        (
            "foreign Origin",
            vec![("Origin", "http://evil.example"), json_ct],
            403,
        ),
        (
            "look-alike Origin",
            vec![("Origin", lookalike.as_str()), json_ct],
            403,
        ),
        (
            "cross-site fetch",
            vec![("Sec-Fetch-Site", "cross-site"), json_ct],
            403,
        ),
        (
            "same-site fetch from another host",
            vec![("Sec-Fetch-Site", "same-site"), json_ct],
            403,
        ),
        (
            "form content type",
            vec![
                ("Origin", same.as_str()),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            415,
        ),
        (
            "text/plain",
            vec![("Origin", same.as_str()), ("Content-Type", "text/plain")],
            415,
        ),
        ("no content type", vec![("Origin", same.as_str())], 415),
    ];
    for (what, headers, code) in &refused {
        let r = request(port, "POST", "/box_update", headers, b"{}");
        assert_eq!(r.status, *code, "POST /box_update, {what}: {}", r.text());
        assert_eq!(r.json()["ok"], false);
        let r = request(
            port,
            "POST",
            "/box_config",
            headers,
            br#"{"box_config": {"updates_ep": "http://evil.example"}}"#,
        );
        assert_eq!(r.status, *code, "POST /box_config, {what}: {}", r.text());
    }
    let name = format!("opq-box-update-{V1}.tar.bz2");
    let path = format!("/box_update/upload?name={name}");
    let r = request(
        port,
        "POST",
        &path,
        &[
            ("Origin", "http://evil.example"),
            ("X-Requested-With", "box-updater"),
        ],
        b"image bytes",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let r = request(
        port,
        "POST",
        &path,
        &[("Content-Type", "application/octet-stream")],
        b"image bytes",
    );
    assert_eq!(
        r.status,
        400,
        "an upload without the page's header: {}",
        r.text()
    );

    // Nothing started, nothing written.
    let s = get(port, "/box_update/status").json();
    assert_eq!(s["state"], "idle", "{s}");
    assert_eq!(s["running"], false);
    assert!(s["history"].as_array().unwrap().is_empty());
    assert_eq!(std::fs::read(&b.config).unwrap(), config_before);
    assert_eq!(b.reboot_count(), 0);
    assert!(b.releases().is_empty());
    assert!(tree(&b.root.join("var/lib/box-updater/downloads")).is_empty());

    // The guard is not simply closed: the page's own request passes.
    let r = post_json(
        port,
        "/box_config",
        &json!({"box_config": {"updates_ep": "http://10.1.1.1:8151"}}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The box's own host name, as its page must answer to it.
fn own_host_name() -> String {
    nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .to_ascii_lowercase()
}

/// Issue 12: a page on a name rebound to the box's address sends its requests as same-origin
/// (`Origin` equals `Host`), so only the name itself gives it away.
#[test]
fn a_rebound_name_reaches_nothing_and_the_box_answers_to_its_own_names() {
    let d = Dir::new();
    let b = offline_box(&d);
    let port = free_port();
    let web = start_serve(&b, port, &["--allowed-host", "opq-7.campus.example"]);
    let config_before = std::fs::read(&b.config).unwrap();
    let evil = format!("evil.example:{port}");

    // The very request of the issue, then the same against every endpoint.
    let body = r#"{"box_config": {"updates_ep": "http://evil.example:18080"}}"#;
    let attack = |method: &str, path: &str, host: &str, body: &str| {
        raw_request(
            port,
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {host}\r\nOrigin: http://{host}\r\n\
                 Sec-Fetch-Site: same-origin\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    let r = attack("POST", "/box_config", &evil, body);
    assert_eq!(r.status, 421, "{}", r.text());
    assert_eq!(r.json()["ok"], false);
    let why = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        why.contains("evil.example") && why.contains("--allowed-host"),
        "{why}"
    );
    for (method, path, body) in [
        ("POST", "/box_update", r#"{"force": true}"#),
        ("POST", "/box_config", body),
        ("GET", "/box_config", ""),
        ("GET", "/box_update/status", ""),
        ("GET", "/version", ""),
        ("GET", "/", ""),
        (
            "POST",
            "/box_update/upload?name=opq-box-update-1.tar.bz2",
            "BZh9",
        ),
        ("GET", "/no-such-page", ""),
    ] {
        for host in [
            evil.as_str(),
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io:80",
        ] {
            let r = attack(method, path, host, body);
            assert_eq!(r.status, 421, "{method} {path} as {host}: {}", r.text());
        }
    }
    // An absolute-form target names the host, whatever Host says (RFC 9112 3.2.2).
    let r = raw_request(
        port,
        format!(
            "POST http://{evil}/box_config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 421, "{}", r.text());
    assert_eq!(std::fs::read(&b.config).unwrap(), config_before);
    let s = get(port, "/box_update/status").json();
    assert_eq!(
        (s["state"].as_str(), s["running"].as_bool()),
        (Some("idle"), Some(false))
    );

    // Its own names: loopback addresses, localhost (an SSH tunnel), its host name, each of its
    // interface addresses, and the operator's extra name; any port.
    let mut own = vec![
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LocalHost.".to_string(),
        format!("[::1]:{port}"),
        format!("{}:{port}", own_host_name()),
        "opq-7.campus.example".to_string(),
    ];
    for ifa in nix::ifaddrs::getifaddrs().unwrap() {
        let Some(addr) = ifa.address else { continue };
        if let Some(v4) = addr.as_sockaddr_in() {
            own.push(format!("{}:{port}", v4.ip()));
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            own.push(format!("[{}]:{port}", v6.ip()));
        }
    }
    for host in &own {
        let r = raw_request(
            port,
            format!("GET /version HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(r.status, 200, "as {host}: {}", r.text());
        let origin = format!("http://{host}");
        let r = attack("POST", "/box_config", host, &{
            let mut v: Value = serde_json::from_slice(&config_before).unwrap();
            v["note"] = json!(origin);
            json!({ "box_config": v }).to_string()
        });
        assert_eq!(r.status, 200, "POST as {host}: {}", r.text());
    }
    // HTTP/1.0 without any Host comes from no browser.
    let r = raw_request(port, b"GET /version HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    drop(web);

    // `*` lets every name in, as before the guard; the log says so at start.
    let web = start_serve(&b, port, &["--allowed-host", "*"]);
    let r = attack("GET", "/version", &evil, "");
    assert_eq!(r.status, 200, "{}", r.text());
    drop(web);
    let log = std::fs::read_to_string(b.root.parent().unwrap().join("serve.log")).unwrap();
    assert!(
        log.contains("refused a request for host \"evil.example\""),
        "{log}"
    );
    assert!(log.contains("any host name (--allowed-host '*')"), "{log}");
}

/// Without a configured token the box makes one, kept 0600 in its state, asked of other
/// machines; this machine (and so an SSH tunnel) needs none. `--no-token` opens the box.
#[test]
fn a_box_without_a_configured_token_makes_one_for_other_machines() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    let b = offline_box(&d);
    let port = free_port();
    let web = start_serve(&b, port, &[]);
    let file = b.root.join("var/lib/box-updater/web-token");
    let token = std::fs::read_to_string(&file).unwrap();
    assert_eq!(token.trim().len(), 32, "{token:?}");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // From loopback: no token needed.
    assert_eq!(get(port, "/version").status, 200);
    let r = post_json(
        port,
        "/box_config",
        &serde_json::from_slice::<Value>(&std::fs::read(&b.config).unwrap()).unwrap(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    drop(web);
    // The same token after a restart.
    let web = start_serve(&b, port, &[]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), token);
    drop(web);
    let log = std::fs::read_to_string(b.root.parent().unwrap().join("serve.log")).unwrap();
    assert!(
        log.contains(&format!(
            "token in {} required from other machines",
            file.display()
        )),
        "{log}"
    );
    let web = start_serve(&b, port, &["--no-token"]);
    assert_eq!(get(port, "/version").status, 200);
    drop(web);
    let log = std::fs::read_to_string(b.root.parent().unwrap().join("serve.log")).unwrap();
    assert!(log.contains("no token (--no-token)"), "{log}");
}

#[test]
fn the_token_guards_the_api_but_not_the_page() {
    let d = Dir::new();
    let b = offline_box(&d);
    let port = free_port();
    let web = start_serve(&b, port, &["--token", "s3cret"]);

    assert_eq!(
        get(port, "/").status,
        200,
        "the page itself asks for the token"
    );
    for path in [
        "/version",
        "/box_config",
        "/box_update/status",
        "/box_update/check",
    ] {
        let r = get(port, path);
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.json()["ok"], false);
    }
    let wrong = request(port, "GET", "/version", &[("X-Box-Token", "guess")], b"");
    assert_eq!(wrong.status, 401);
    let ok = request(port, "GET", "/version", &[("X-Box-Token", "s3cret")], b"");
    assert_eq!(ok.status, 200);
    let ok = request(
        port,
        "GET",
        "/box_update/status",
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    assert_eq!(ok.status, 200);
    let config_before = std::fs::read(&b.config).unwrap();
    let r = post_json(port, "/box_update", &json!({}));
    assert_eq!(r.status, 401);
    let r = post_json(
        port,
        "/box_config",
        &json!({"box_config": {"updates_ep": "http://evil.example"}}),
    );
    assert_eq!(r.status, 401);
    assert_eq!(std::fs::read(&b.config).unwrap(), config_before);
    let s = request(
        port,
        "GET",
        "/box_update/status",
        &[("X-Box-Token", "s3cret")],
        b"",
    )
    .json();
    assert_eq!(s["state"], "idle");

    // The token may also come from the box config.
    drop(web);
    let mut cfg: Value = serde_json::from_slice(&config_before).unwrap();
    cfg["updater_token"] = json!("from-config");
    std::fs::write(&b.config, cfg.to_string()).unwrap();
    let web = start_serve(&b, port, &[]);
    assert_eq!(get(web.port, "/version").status, 401);
    let r = request(
        web.port,
        "GET",
        "/version",
        &[("X-Box-Token", "from-config")],
        b"",
    );
    assert_eq!(r.status, 200);
}

#[test]
fn an_uploaded_image_is_installed_and_confirmed_when_serve_restarts() {
    let d = Dir::new();
    let b = offline_box(&d);
    let port = free_port();
    let web = start_serve(&b, port, &[]);
    let img = image(&d, "s1", V1, &[]);
    let bytes = std::fs::read(&img).unwrap();

    let r = upload(port, &format!("opq-box-update-{V1}.tar.bz2"), &bytes, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let s = wait_idle(port, 20);
    assert_eq!(s["state"], "rebooting", "{s}");
    assert_eq!(s["version"], V1);
    assert_eq!(b.reboot_count(), 1);
    assert_eq!(b.current_version(), Some(V1));
    b.assert_current_complete();
    assert!(
        tree(&b.root.join("var/lib/box-updater/downloads")).is_empty(),
        "the upload is not kept"
    );

    drop(web);
    let web = start_serve(&b, port, &[]);
    let s = get(web.port, "/box_update/status").json();
    assert_eq!(s["state"], "committed", "{s}");
    assert_eq!(s["pending"], Value::Null);
    assert_eq!(b.reboot_count(), 1);
}

#[test]
fn a_signed_box_takes_an_upload_only_with_its_signature() {
    let d = Dir::new();
    keygen(&d, "k");
    let img = image(&d, "s1", V1, &["--sign-key", "k.key"]);
    let bytes = std::fs::read(&img).unwrap();
    let sig = sh(d.path(), &format!("base64 -w0 '{}.minisig'", img.display()));
    let b = offline_box(&d);
    let port = free_port();
    let pubkey = d.join("k.pub");
    let _web = start_serve(&b, port, &["--public-key", pubkey.to_str().unwrap()]);
    let name = format!("opq-box-update-{V1}.tar.bz2");

    let r = upload(port, &name, &bytes, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let s = wait_idle(port, 20);
    assert_eq!(s["state"], "failed", "{s}");
    assert!(s["message"].as_str().unwrap().contains("not signed"), "{s}");
    assert_eq!(s["version"], Value::Null);
    assert_eq!(b.reboot_count(), 0);

    let r = upload(port, &name, &bytes, &[("X-Minisig", "!!not base64!!")]);
    assert_eq!(r.status, 400, "{}", r.text());

    let r = upload(port, &name, &bytes, &[("X-Minisig", sig.trim())]);
    assert_eq!(r.status, 202, "{}", r.text());
    let s = wait_idle(port, 20);
    assert_eq!(s["state"], "rebooting", "{s}");
    assert_eq!(s["version"], V1);
    assert_eq!(b.reboot_count(), 1);
}

#[test]
fn a_tampered_or_misnamed_upload_is_refused_and_the_box_keeps_its_version() {
    let d = Dir::new();
    let b = offline_box(&d);
    let port = free_port();
    let _web = start_serve(&b, port, &[]);
    let v1 = std::fs::read(image(&d, "s1", V1, &[])).unwrap();
    let r = upload(port, &format!("opq-box-update-{V1}.tar.bz2"), &v1, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(wait_idle(port, 20)["version"], V1);
    assert_eq!(b.reboot_count(), 1);

    let v2 = image(&d, "s2", V2, &[]);
    let tampered = d.join("tampered.tar.bz2");
    tamper_image(&d, &v2, V2, &tampered);
    let name2 = format!("opq-box-update-{V2}.tar.bz2");
    let r = upload(port, &name2, &std::fs::read(&tampered).unwrap(), &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let s = wait_idle(port, 20);
    assert_eq!(s["state"], "failed", "{s}");
    let msg = s["message"].as_str().unwrap();
    assert!(msg.contains("SHA256SUMS"), "{msg}");
    assert_eq!(s["last_result"]["result"], "failed");
    assert_eq!(s["version"], V1);

    // Bytes damaged in transit: the archive itself is broken.
    let mut broken = std::fs::read(&v2).unwrap();
    let mid = broken.len() / 2;
    broken[mid] ^= 0x55;
    let r = upload(port, &name2, &broken, &[]);
    assert_eq!(r.status, 202, "{}", r.text());
    let s = wait_idle(port, 20);
    assert_eq!(s["state"], "failed", "{s}");
    assert_eq!(s["version"], V1);

    // Refused before anything is stored.
    for (name, body, code) in [
        ("evil.sh", &v1[..], 400),
        ("..%2Fopq-box-update-1.tar.bz2", &v1[..], 400),
        (name2.as_str(), &b""[..], 400),
    ] {
        let r = upload(port, name, body, &[]);
        assert_eq!(r.status, code, "{name}: {}", r.text());
    }

    assert_eq!(b.current_version(), Some(V1));
    assert_eq!(b.reboot_count(), 1);
    assert_eq!(b.releases(), vec![format!("opq-box-update-{V1}")]);
    assert!(tree(&b.root.join("var/lib/box-updater/downloads")).is_empty());
    b.assert_current_complete();
}

/// Fails unless the daemon still runs and answers.
fn assert_still_serving(web: &mut Running, what: &str) {
    assert!(
        web.child.try_wait().unwrap().is_none(),
        "box-updater died after {what}"
    );
    let r = get(web.port, "/version");
    assert_eq!(r.status, 200, "after {what}: {}", r.text());
    assert_eq!(r.json(), json!({"version": null}), "after {what}");
}

#[test]
fn a_huge_announced_body_is_refused_unread_and_the_daemon_lives_on() {
    let d = Dir::new();
    let b = offline_box(&d);
    let mut web = start_serve(&b, free_port(), &[]);
    let port = web.port;
    let config_before = std::fs::read(&b.config).unwrap();
    let origin = format!("Origin: http://127.0.0.1:{port}\r\n");
    let page = format!("{origin}Sec-Fetch-Site: same-origin\r\n");
    let json_page = format!("{page}Content-Type: application/json\r\n");
    let upload_page = format!("{page}X-Requested-With: box-updater\r\n");
    let upload = format!("/box_update/upload?name=opq-box-update-{V1}.tar.bz2");
    // (path, headers beside Host and Content-Length, the answer)
    let cases: Vec<(&str, String, u16)> = vec![
        ("/box_update", json_page.clone(), 413),
        ("/box_update", String::new(), 415),
        ("/box_update", "Origin: http://evil.example\r\n".into(), 403),
        ("/box_config", json_page.clone(), 413),
        ("/box_config", "Content-Type: text/plain\r\n".into(), 415),
        ("/box_config", "Sec-Fetch-Site: cross-site\r\n".into(), 403),
        (&upload, upload_page.clone(), 413),
        (&upload, String::new(), 400),
        (&upload, "Origin: http://evil.example\r\n".into(), 403),
        ("/box_update/upload?name=evil.sh", upload_page.clone(), 400),
        ("/version", String::new(), 405),
    ];
    for (path, headers, want) in &cases {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{headers}\
             Content-Length: 999999999999999\r\n\r\n{{\"force\": true, \"pad\": \""
        );
        let r = raw_request(port, head.as_bytes());
        assert_eq!(
            r.status,
            *want,
            "POST {path} with {headers:?}: {}",
            r.text()
        );
        assert_eq!(r.json()["ok"], false, "POST {path}");
        assert_eq!(r.header("Connection"), Some("close"), "POST {path}");
        assert_still_serving(&mut web, &format!("POST {path} with {headers:?}"));
    }

    // With a token, the refusal comes before anything else is looked at.
    drop(web);
    let mut web = start_serve(&b, port, &["--token", "s3cret"]);
    for path in ["/box_update", "/box_config", upload.as_str()] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{json_page}\
             Content-Length: 999999999999999\r\n\r\n"
        );
        let r = raw_request(port, head.as_bytes());
        assert_eq!(r.status, 401, "POST {path}: {}", r.text());
        assert!(web.child.try_wait().unwrap().is_none(), "died after {path}");
    }
    let r = request(port, "GET", "/version", &[("X-Box-Token", "s3cret")], b"");
    assert_eq!(r.status, 200);

    // Nothing started, nothing written.
    assert_eq!(std::fs::read(&b.config).unwrap(), config_before);
    assert!(b.releases().is_empty());
    assert!(tree(&b.root.join("var/lib/box-updater/downloads")).is_empty());
}

/// Reads what the server sends until it closes; returns it and when it closed.
fn read_until_closed(mut s: TcpStream) -> (String, Instant) {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    (String::from_utf8_lossy(&got).into_owned(), Instant::now())
}

#[test]
fn stalled_clients_never_hold_up_others_and_are_dropped_after_the_timeout() {
    let d = Dir::new();
    let b = offline_box(&d);
    let port = free_port();
    let mut web = start_serve(&b, port, &["--web-timeout", "2"]);
    let connect = |bytes: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(bytes.as_bytes()).unwrap();
        s
    };
    let same = format!(
        "Host: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\n"
    );
    let t0 = Instant::now();
    // More of each than tiny_http had workers: there, any four of them stopped the daemon.
    let mut stalled = Vec::new();
    for _ in 0..6 {
        stalled.push(("silent", connect("")));
        stalled.push(("half a head", connect("GET /box_update/sta")));
        stalled.push((
            "a JSON body that never comes",
            connect(&format!(
                "POST /box_config HTTP/1.1\r\n{same}Content-Type: application/json\r\n\
                 Content-Length: 100\r\n\r\n{{\"box_config\": "
            )),
        ));
    }
    // An upload that stops: it holds the engine's reservation while it lasts.
    stalled.push((
        "an upload that stops",
        connect(&format!(
            "POST /box_update/upload?name=opq-box-update-{V1}.tar.bz2 HTTP/1.1\r\n{same}\
             X-Requested-With: box-updater\r\nContent-Length: 1000000\r\n\r\nBZh9"
        )),
    ));

    // Meanwhile the page and the API answer at once.
    assert_eq!(get(port, "/").status, 200);
    assert_still_serving(&mut web, "stalled clients connected");
    let s = get(port, "/box_update/status").json();
    assert_eq!(s["state"], "idle", "{s}");
    let answered = t0.elapsed();
    assert!(
        answered < Duration::from_secs(2),
        "answers waited for stalled clients: {answered:?}"
    );

    let readers: Vec<_> = stalled
        .into_iter()
        .map(|(what, s)| std::thread::spawn(move || (what, read_until_closed(s))))
        .collect();
    for r in readers {
        let (what, (got, closed)) = r.join().unwrap();
        let waited = closed - t0;
        assert!(
            waited >= Duration::from_millis(1500) && waited < Duration::from_secs(12),
            "{what}: dropped after {waited:?}, the timeout is 2 s"
        );
        match what {
            "silent" => assert_eq!(got, "", "{what}"),
            _ => assert!(got.starts_with("HTTP/1.1 408 "), "{what}: {got:?}"),
        }
    }
    // The stopped upload gave the engine back and left nothing behind.
    let s = get(port, "/box_update/status").json();
    assert_eq!(s["running"], false, "{s}");
    assert!(tree(&b.root.join("var/lib/box-updater/downloads")).is_empty());
    assert_still_serving(&mut web, "stalled clients were dropped");
}

#[test]
fn a_chunked_request_body_gets_a_clear_411() {
    let d = Dir::new();
    let b = offline_box(&d);
    let mut web = start_serve(&b, free_port(), &[]);
    let port = web.port;
    let config_before = std::fs::read(&b.config).unwrap();
    let same = format!(
        "Host: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nSec-Fetch-Site: same-origin\r\n"
    );
    for (path, headers) in [
        ("/box_config", "Content-Type: application/json\r\n"),
        ("/box_update", "Content-Type: application/json\r\n"),
        (
            "/box_update/upload?name=opq-box-update-1700000101.tar.bz2",
            "X-Requested-With: box-updater\r\n",
        ),
    ] {
        let body = r#"{"box_config": {"updates_ep": "http://evil.example"}}"#;
        let r = raw_request(
            port,
            format!(
                "POST {path} HTTP/1.1\r\n{same}{headers}Transfer-Encoding: chunked\r\n\r\n\
                 {:x}\r\n{body}\r\n0\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 411, "{path}: {}", r.text());
        assert!(r.text().contains("Content-Length"), "{path}: {}", r.text());
    }
    // Another transfer coding is not understood at all.
    let r = raw_request(
        port,
        format!(
            "POST /box_update HTTP/1.1\r\n{same}Content-Type: application/json\r\n\
             Transfer-Encoding: gzip\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 501, "{}", r.text());
    assert_eq!(std::fs::read(&b.config).unwrap(), config_before);
    assert_eq!(get(port, "/box_update/status").json()["state"], "idle");
    assert_still_serving(&mut web, "chunked bodies");
}

/// Opens `n` connections at once, then sends `/version` on each in turn; returns how many were
/// answered 200 and how many 503.
fn flood(port: u16, n: usize) -> (usize, usize) {
    let flood: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).expect("connecting"))
        .collect();
    let request = format!("GET /version HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let (mut served, mut busy) = (0, 0);
    for mut s in flood {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // A connection turned away was answered and closed before this is sent.
        let _ = s.write_all(request.as_bytes());
        let r = parse_answer(&read_answer(&mut s));
        match r.status {
            200 => {
                assert_eq!(r.json(), json!({"version": null}));
                served += 1;
            }
            503 => {
                assert_eq!(r.header("Retry-After"), Some("5"));
                busy += 1;
            }
            other => panic!("connection answered {other}: {}", r.text()),
        }
    }
    (served, busy)
}

#[test]
fn a_flood_of_connections_is_held_and_past_the_limit_gets_503() {
    let d = Dir::new();
    let b = offline_box(&d);
    // Open connections cost no thread: 600 at once are all held and all answered.
    let mut web = start_serve(&b, free_port(), &[]);
    assert_eq!(flood(web.port, 600), (600, 0));
    assert_still_serving(&mut web, "600 connections");
    drop(web);

    // Past the bound on open connections, new ones get 503 at once, and the daemon lives on.
    let mut web = start_serve(&b, free_port(), &["--web-max-connections", "50"]);
    let port = web.port;
    let (served, busy) = flood(port, 200);
    assert_eq!(served + busy, 200);
    assert!(served >= 1, "none served");
    assert!(
        busy >= 100,
        "200 connections at once with a bound of 50: {busy} turned away"
    );
    assert_still_serving(&mut web, "200 connections over the bound");
    assert_eq!(get(port, "/").status, 200);
}
