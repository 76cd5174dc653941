//! The box owner's page in a real browser: `tests/browser/update_flow.mjs` drives Debian's Chromium
//! (through playwright-core) against a real update-server and a sandboxed `box-updater serve`;
//! this side builds the images, owns the processes and "reboots" the box when the page asks.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;
use crate::web_api::{start_serve, tamper_image};

const V_OLD: u64 = 1_700_000_201;
const V_NEW: u64 = 1_700_000_202;
const V_FAIL: u64 = 1_700_000_203;
const V_TAMPERED: u64 = 1_700_000_204;
const TOKEN: &str = "phone-token-1";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Chromium, node and playwright-core must be there: a missing one fails the test with the way
/// to get it, since a skipped browser test would pass without testing the page.
fn browser_tools() -> (PathBuf, PathBuf) {
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let script_dir = repo().join("tests/browser");
    let mut missing = Vec::new();
    if !chromium.is_file() {
        missing.push(format!("chromium ({})", chromium.display()));
    }
    let node_ok = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !node_ok {
        missing.push("node".to_string());
    }
    if !script_dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push("tests/browser/node_modules/playwright-core".to_string());
    }
    assert!(
        missing.is_empty(),
        "the browser test needs {}: run scripts/test.sh, which installs them (apt package \
         chromium, and npm install in tests/browser)",
        missing.join(", ")
    );
    (chromium, script_dir)
}

/// A relay between the box and its update server that paces what the server sends, so that a
/// download of a small image lasts long enough for the page to show its bytes and percent.
struct SlowLink {
    port: u16,
}

impl SlowLink {
    const CHUNK: usize = 16 * 1024;
    const PAUSE: Duration = Duration::from_millis(25);

    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; Self::CHUNK];
                    loop {
                        match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if c_write.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if n == Self::CHUNK {
                                    std::thread::sleep(Self::PAUSE);
                                }
                            }
                        }
                    }
                    let _ = c_write.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        SlowLink { port }
    }
}

/// Moves an image and its sidecars into the server's directory, sidecars first.
fn publish(image: &Path, updates: &Path) {
    let name = image.file_name().unwrap().to_string_lossy().into_owned();
    for ext in [".sha256", ""] {
        std::fs::rename(
            image.with_file_name(format!("{name}{ext}")),
            updates.join(format!("{name}{ext}")),
        )
        .unwrap();
    }
}

/// What the browser script printed so far, for failure messages.
fn script_output(artifacts: &Path) -> String {
    ["update_flow.log", "update_flow.err"]
        .iter()
        .map(|f| std::fs::read_to_string(artifacts.join(f)).unwrap_or_default())
        .collect()
}

/// Waits for the script to write `name` into the control directory; fails at once if the script
/// has ended, with its output.
fn wait_for_signal(control: &Path, name: &str, node: &mut Child, artifacts: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !control.join(name).exists() {
        if let Ok(Some(status)) = node.try_wait() {
            panic!(
                "the browser script ended ({status}) before `{name}`:\n{}",
                script_output(artifacts)
            );
        }
        assert!(
            Instant::now() < deadline,
            "the browser script never reached `{name}`:\n{}",
            script_output(artifacts)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_owner_updates_the_box_from_the_page_in_chromium() {
    let (chromium, script_dir) = browser_tools();
    let artifacts = repo().join("artifacts/browser");
    if artifacts.exists() {
        std::fs::remove_dir_all(&artifacts).unwrap();
    }
    std::fs::create_dir_all(&artifacts).unwrap();

    let d = Dir::new();
    let updates = d.mkdir("updates");
    let server = start_update_server(&updates);
    let link = SlowLink::start(server.port);

    // The box runs V_OLD, installed and confirmed as after an earlier update.
    sample_payload(&d, "old");
    let old = build_image(
        &d,
        &d.mkdir("s-old"),
        V_OLD,
        &["payload/box-config-daemon"],
        &[],
    );
    publish(&old, &updates);
    wait_listed(server.port, V_OLD);
    let b = BoxUnderTest::new(&d, "box", &format!("http://127.0.0.1:{}", link.port));
    for step in ["update", "confirm"] {
        let o = b.run(&[step]);
        assert!(o.status.success(), "{step}: {}", stderr(&o));
    }
    assert_eq!(b.current_version(), Some(V_OLD));
    let reboots_before = b.reboot_count();

    // V_NEW: a MiB of noise, so that the paced download takes a moment, and an install script
    // that takes one too, so that the page can show both steps.
    let mut noise = Vec::with_capacity(1 << 20);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    while noise.len() < 1 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.extend_from_slice(&x.to_le_bytes());
    }
    d.write("payload/box-config-daemon/calibration.bin", &noise);
    let slow = d.write(
        "slow_install.sh",
        "#!/bin/sh\necho installing the new services\nsleep 1\necho new services installed\n",
    );
    let new = build_image(
        &d,
        &d.mkdir("s-new"),
        V_NEW,
        &["payload/box-config-daemon"],
        &["--install-script", slow.to_str().unwrap()],
    );
    publish(&new, &updates);
    wait_listed(server.port, V_NEW);
    std::fs::remove_file(d.join("payload/box-config-daemon/calibration.bin")).unwrap();

    let failing = d.write(
        "failing_install.sh",
        "#!/bin/sh\necho 'install_update: broken on purpose' >&2\nexit 7\n",
    );
    let fail = build_image(
        &d,
        &d.mkdir("s-fail"),
        V_FAIL,
        &["payload/box-config-daemon"],
        &["--install-script", failing.to_str().unwrap()],
    );
    let tampered_src = build_image(
        &d,
        &d.mkdir("s-tampered"),
        V_TAMPERED,
        &["payload/box-config-daemon"],
        &[],
    );
    let tampered = d
        .mkdir("import")
        .join(format!("opq-box-update-{V_TAMPERED}.tar.bz2"));
    tamper_image(&d, &tampered_src, V_TAMPERED, &tampered);

    let port = free_port();
    let mut web = Some(start_serve(&b, port, &["--token", TOKEN]));
    let control = d.mkdir("control");
    let mut node = cmd("node")
        .arg(script_dir.join("update_flow.mjs"))
        .current_dir(&script_dir)
        .env("BOX_URL", format!("http://127.0.0.1:{port}/"))
        .env("ARTIFACTS_DIR", &artifacts)
        .env("CONTROL_DIR", &control)
        .env("BOX_TOKEN", TOKEN)
        .env("V_OLD", V_OLD.to_string())
        .env("V_NEW", V_NEW.to_string())
        .env("V_FAIL", V_FAIL.to_string())
        .env("TAMPERED_IMAGE", &tampered)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(artifacts.join("update_flow.log")).unwrap())
        .stderr(std::fs::File::create(artifacts.join("update_flow.err")).unwrap())
        .spawn()
        .expect("starting node");

    // The page saw the update reach "rebooting": the reboot is recorded, the switch is done.
    wait_for_signal(&control, "rebooting", &mut node, &artifacts);
    assert_eq!(
        b.reboot_count(),
        reboots_before + 1,
        "the update asked for a reboot"
    );
    assert_eq!(b.current_version(), Some(V_NEW));
    b.assert_current_complete();

    // The reboot: the daemon goes away; while it is down the failing image is published; then
    // it comes back and, at start, confirms V_NEW.
    drop(web.take());
    publish(&fail, &updates);
    wait_listed(server.port, V_FAIL);
    std::fs::write(control.join("down"), "").unwrap();
    wait_for_signal(&control, "seen-down", &mut node, &artifacts);
    web = Some(start_serve(&b, port, &["--token", TOKEN]));

    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = node.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = node.kill();
            panic!(
                "the browser script did not finish:\n{}",
                script_output(&artifacts)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "the browser script failed ({status}); screenshots in {}:\n{}",
        artifacts.display(),
        script_output(&artifacts)
    );
    drop(web);

    // What the page did, as the box sees it.
    assert_eq!(
        b.current_version(),
        Some(V_NEW),
        "the failures changed nothing"
    );
    assert_eq!(b.reboot_count(), reboots_before + 1);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&b.config).unwrap()).unwrap();
    assert_eq!(config["note"], "<i>kept as text</i>");
    assert_eq!(config["calibration"]["gain"], 1.5, "other keys are kept");
    let shots = std::fs::read_dir(&artifacts)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".png"))
        .count();
    assert!(shots >= 10, "a screenshot of each state: {shots}");
}

#[test]
fn the_operator_sees_the_fleet_in_chromium() {
    let (chromium, script_dir) = browser_tools();
    let artifacts = repo().join("artifacts/browser-fleet");
    if artifacts.exists() {
        std::fs::remove_dir_all(&artifacts).unwrap();
    }
    std::fs::create_dir_all(&artifacts).unwrap();
    const TOKEN: &str = "fleet-operator-1";
    const V1: u64 = 1_700_000_401;
    const V2: u64 = 1_700_000_402;

    let d = Dir::new();
    let updates = d.mkdir("updates");
    sample_payload(&d, "fleet");
    for v in [V1, V2] {
        let out = d.mkdir(&format!("s-{v}"));
        build_image(&d, &out, v, &["payload/box-config-daemon"], &[]);
        publish_dir(&out, &updates);
    }
    let server = start_update_server_logged(
        &updates,
        &["--fleet-token", TOKEN],
        &[],
        &d.join("server.log"),
    );
    // V2 goes to everyone, and halts at its first failure.
    let o = run(cmd(UPDATE_SERVER)
        .args(["rollout", &V2.to_string(), "--percent", "100"])
        .args(["--halt-after", "1", "--halt-share", "1", "--dir"])
        .arg(&updates)
        .env_remove("BOX_UPDATE_SERVER_SETTINGS"));
    assert!(o.status.success(), "{}", stderr(&o));

    // The fleet: boxes that committed V1, failed and rolled back V2, one whose message is
    // markup, and an old box whose user agent is.
    let report = |id: &str, outcome: &str, target: u64, message: &str| {
        let body = serde_json::json!({
            "v": 1, "box_id": id, "outcome": outcome, "target_version": target,
            "running_version": V1, "previous_version": V1, "message": message,
            "durations_ms": {"downloading": 2100, "installing": 900, "rebooting": 41000},
        })
        .to_string();
        let v1 = V1.to_string();
        let (status, _, text) = http_send(
            server.port,
            "POST",
            "/report",
            &[
                ("Content-Type", "application/json"),
                ("X-OPQ-Box-Id", id),
                ("X-OPQ-Box-Version", &v1),
                ("X-OPQ-Box-State", outcome),
                ("User-Agent", "box-updater/0.1.0 (opq-box)"),
            ],
            body.as_bytes(),
        );
        assert_eq!(status, 202, "{text}");
    };
    for i in 1..=5 {
        report(
            &format!("pq-{i}"),
            "committed",
            V1,
            &format!("version {V1} is confirmed"),
        );
    }
    report(
        "pq-7",
        "failed",
        V2,
        "update failed while installing: install_update.sh failed with exit code 7",
    );
    report(
        "pq-8",
        "rolled_back",
        V2,
        &format!("rolled back to version {V1}: version {V2} is not healthy"),
    );
    report("pq-bold", "committed", V1, "<b>not bold</b>");
    sh(
        d.path(),
        &format!(
            "wget -q -U '<img src=x onerror=alert(1)> Wget/1.21' -O /dev/null http://127.0.0.1:{}/latest",
            server.port
        ),
    );
    let boxes = 5 + 3 + 1;
    // The halt is decided by the server's fleet thread within a second or two.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let auth = format!("Bearer {TOKEN}");
        let (_, _, body) = http_send(
            server.port,
            "GET",
            "/fleet.json",
            &[("Authorization", &auth)],
            b"",
        );
        if body.contains("\"state\":\"halted\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout never halted: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let o = cmd("node")
        .arg(script_dir.join("fleet_view.mjs"))
        .current_dir(&script_dir)
        .env("FLEET_URL", server.url("/fleet"))
        .env("ARTIFACTS_DIR", &artifacts)
        .env("FLEET_TOKEN", TOKEN)
        .env("V_HALTED", V2.to_string())
        .env("BOX_COUNT", boxes.to_string())
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .output()
        .expect("starting node");
    std::fs::write(
        artifacts.join("fleet_view.log"),
        [&o.stdout[..], &o.stderr[..]].concat(),
    )
    .unwrap();
    assert!(
        o.status.success(),
        "the fleet page failed in Chromium; screenshots in {}:\n{}{}",
        artifacts.display(),
        stdout(&o),
        stderr(&o)
    );
}
