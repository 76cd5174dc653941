//! What a new user trips on, tried as one would: commands run at the wrong moment, typos in
//! flags and paths, servers that are not there, stopping the daemon, the demo, and the test
//! run's own check for processes left behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::util::*;
use crate::web_api::{get, post_json, start_serve};

const V1: u64 = 1_700_000_201;
const V2: u64 = 1_700_000_202;

fn signal(child: &Child, sig: Signal) {
    kill(Pid::from_raw(child.id() as i32), sig).unwrap();
}

/// Waits for `child` to exit within `within`; its exit status.
fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(t0.elapsed() < within, "still running after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// A box whose config names a port where nothing listens.
fn offline_box(d: &Dir) -> BoxUnderTest {
    BoxUnderTest::new(d, "box", &format!("http://127.0.0.1:{}", free_port()))
}

#[test]
fn confirm_with_nothing_pending_succeeds_and_a_rollback_with_nothing_to_go_back_to_is_no_failed_update()
 {
    let d = Dir::new();
    let b = offline_box(&d);

    // A fresh box: nothing to confirm, nothing to roll back to, and neither is an update.
    let o = b.run(&["confirm"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("nothing to confirm"), "{}", stdout(&o));
    let o = b.run(&["rollback"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o).trim(),
        "box-updater: nothing to roll back to: no release is installed on this box yet"
    );
    assert_eq!(b.reboot_count(), 0);
    let st = b.status();
    assert_eq!(
        (&st["state"], st["history"].as_array().unwrap().len()),
        (&serde_json::json!("idle"), 0),
        "not recorded as an update: {st}"
    );

    // After a failed update, confirm does not print that failure again: it is not this boot's.
    let o = b.run(&["update", "--retries", "0"]);
    assert_eq!(o.status.code(), Some(1));
    let o = b.run(&["confirm"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("nothing to confirm") && !stdout(&o).contains("failed"),
        "{}",
        stdout(&o)
    );
    assert_eq!(b.status()["history"].as_array().unwrap().len(), 1);

    // A box with one release: a clear refusal, nothing switched, nothing recorded.
    let updates = d.mkdir("updates");
    sample_payload(&d, "one");
    build_image(&d, &updates, V1, &["payload/box-config-daemon"], &[]);
    let server = start_update_server(&updates);
    b.point_at(&server.url(""));
    assert!(b.run(&["update"]).status.success());
    assert!(b.run(&["confirm"]).status.success());
    let before = b.status()["history"].clone();
    let o = b.run(&["rollback"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "nothing to roll back to: version {V1} is the only release on this box"
        )),
        "{}",
        stderr(&o)
    );
    assert_eq!(b.current_version(), Some(V1));
    assert_eq!(b.status()["history"], before);
}

#[test]
fn a_root_that_does_not_exist_is_a_usage_error_and_nothing_is_created() {
    let d = Dir::new();
    let typo = d.join("typo");
    for args in [
        &["status"][..],
        &["update"],
        &["serve", "--listen", "127.0.0.1:0"],
    ] {
        let o = run(cmd(BOX_UPDATER).args(args).arg("--root").arg(&typo));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("the box root {} does not exist", typo.display())),
            "{}",
            stderr(&o)
        );
        assert!(!typo.exists(), "{args:?} created {}", typo.display());
    }
}

#[test]
fn errors_say_what_to_do_and_are_printed_once() {
    let d = Dir::new();
    let b = offline_box(&d);

    // Nothing listens where the box config points.
    let o = b.run(&["check"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("connection refused")
            && err.contains("is update-server running at http://127.0.0.1:")
            && err.contains(&format!("\"updates_ep\" in {}", b.config.display())),
        "{err}"
    );
    let o = b.run(&["update", "--retries", "0"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert_eq!(count(&err, "connection refused"), 1, "printed once: {err}");
    assert!(err.contains("updates_ep"), "{err}");

    // A box config that is not there: given by hand, or the default.
    let o = run(cmd(BOX_UPDATER)
        .args(["check", "--box-config", "/nonexistent/box.json", "--root"])
        .arg(&b.root));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(count(&err, "/nonexistent/box.json"), 1, "{err}");
    assert!(
        err.contains("given with --box-config") && !err.contains("pass --box-config"),
        "{err}"
    );
    let o = run(cmd(BOX_UPDATER).args(["check", "--root"]).arg(&b.root));
    assert!(
        stderr(&o).contains("pass --box-config FILE"),
        "{}",
        stderr(&o)
    );

    // Addresses: a port alone, a host name, a port in use.
    let o = b.run(&["serve", "--listen", "8080"]);
    assert_eq!(o.status.code(), Some(2), "usage error: {}", stderr(&o));
    assert!(
        stderr(&o).contains("give ADDR:PORT, e.g. 0.0.0.0:8080"),
        "{}",
        stderr(&o)
    );
    let o = b.run(&["serve", "--listen", "localhost:8080"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("give 127.0.0.1:8080"), "{}", stderr(&o));
    let o = run(cmd(UPDATE_SERVER).args(["--bind", "localhost", "--dir", "."]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("give 127.0.0.1"), "{}", stderr(&o));
    let o = run(cmd(UPDATE_SERVER)
        .args(["--dir", "."])
        .env("BOX_UPDATE_SERVER_SETTINGS", r#"{"bind": "localhost"}"#));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("give 127.0.0.1"), "{}", stderr(&o));

    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = run(cmd(UPDATE_SERVER)
        .args(["--bind", "127.0.0.1", "--port", &port, "--dir"])
        // A directory of its own: the fleet's database goes beside it, inside the test's.
        .arg(d.mkdir("updates"))
        .env_remove("BOX_UPDATE_SERVER_SETTINGS"));
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}"))
            && err.contains("choose another port with --port N"),
        "{err}"
    );
    assert_eq!(count(&err, "cannot listen"), 1, "{err}");
    let o = b.run(&["serve", "--listen", &format!("127.0.0.1:{port}")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("choose another port with --listen ADDR:PORT"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_quoted_port_in_the_settings_variable_is_read_with_a_warning() {
    let d = Dir::new();
    let port = free_port();
    let log = d.join("server.log");
    let mut child = cmd(UPDATE_SERVER)
        .env(
            "BOX_UPDATE_SERVER_SETTINGS",
            format!(
                r#"{{"port": "{port}", "bind": "127.0.0.1", "updates_dir": "{}"}}"#,
                d.mkdir("updates").display()
            ),
        )
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    let mut server = Running { child, port };
    signal(&server.child, Signal::SIGTERM);
    assert!(wait_exit(&mut server.child, Duration::from_secs(10)).success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains(&format!(
            "\"port\" is the string \"{port}\"; read as the number {port} (write it without quotes)"
        )),
        "{text}"
    );
}

#[test]
fn serve_stops_cleanly_on_sigterm_and_sigint_finishing_answers_in_flight() {
    let d = Dir::new();
    let b = offline_box(&d);
    let log = b.root.parent().unwrap().join("serve.log");
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        let port = free_port();
        let mut web = start_serve(&b, port, &[]);
        // A config edit whose body is on its way when the stop comes.
        let body = serde_json::json!({"box_config": {"updates_ep": format!("http://127.0.0.1:{port}"), "box_id": 9}}).to_string();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "POST /box_config HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            &body[..10]
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        signal(&web.child, sig);
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&body.as_bytes()[10..]).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{sig}: {answer}");
        let status = wait_exit(&mut web.child, Duration::from_secs(10));
        assert!(status.success(), "{sig}: {status}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains(&format!("got {sig}, stopping")) && text.trim_end().ends_with("stopped"),
            "{text}"
        );
        assert!(
            std::fs::read_to_string(&b.config)
                .unwrap()
                .contains("\"box_id\": 9"),
            "the edit in flight was saved"
        );
    }
}

/// An update server whose image downloads dribble: a relay that passes everything through from
/// `upstream` and sends image bodies 16 KiB at a time, 50 ms apart.
fn slow_relay(upstream: u16) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { continue };
            std::thread::spawn(move || {
                let Some(req) = read_head(&mut client) else {
                    return;
                };
                let slow = String::from_utf8_lossy(&req)
                    .lines()
                    .next()
                    .is_some_and(|l| l.contains(".tar.bz2 "));
                let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                up.write_all(&close_request(&req)).unwrap();
                let mut all = Vec::new();
                up.read_to_end(&mut all).unwrap();
                let chunk = if slow { 16 << 10 } else { all.len().max(1) };
                for piece in all.chunks(chunk) {
                    if client.write_all(piece).is_err() {
                        return;
                    }
                    if slow {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            });
        }
    });
    port
}

#[test]
fn a_stop_lets_an_install_finish_and_leaves_a_download_to_resume() {
    let d = Dir::new();
    let updates = d.mkdir("updates");
    sample_payload(&d, "stop");
    // A slow install script: the stop comes while it runs.
    let script = d.write("slow_install.sh", "#!/bin/sh\nsleep 2\necho installed\n");
    build_image(
        &d,
        &updates,
        V1,
        &["payload/box-config-daemon"],
        &["--install-script", script.to_str().unwrap()],
    );
    let server = start_update_server(&updates);
    let b = BoxUnderTest::new(&d, "box", &server.url(""));
    let log = b.root.parent().unwrap().join("serve.log");
    let port = free_port();
    let mut web = start_serve(&b, port, &[]);
    assert_eq!(
        post_json(port, "/box_update", &serde_json::json!({})).status,
        202
    );
    let mut status = serde_json::Value::Null;
    eventually(Duration::from_secs(20), "installing", || {
        status = get(port, "/box_update/status").json();
        status["state"] == "installing"
    });
    // The installing step does not carry the byte counts of the steps before it.
    assert_eq!(
        (&status["bytes_done"], &status["bytes_total"]),
        (&serde_json::json!(0), &serde_json::Value::Null),
        "{status}"
    );
    signal(&web.child, Signal::SIGTERM);
    let status = wait_exit(&mut web.child, Duration::from_secs(20));
    assert!(status.success(), "{status}");
    // Nothing half-done: the install ran to its end, the box switched and asked to reboot.
    assert_eq!(b.current_version(), Some(V1));
    assert_eq!(b.reboot_count(), 1);
    b.assert_current_complete();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("letting the update finish installing first"),
        "{text}"
    );
    assert!(b.run(&["confirm"]).status.success());

    // A download is left where it stands at once, and the next update resumes it.
    let firmware = d.mkdir("payload/firmware");
    // Incompressible, so that the image is as large as the blob (xorshift).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let blob: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(firmware.join("blob.bin"), blob).unwrap();
    let staging = d.mkdir("staging");
    build_image(
        &d,
        &staging,
        V2,
        &["payload/box-config-daemon", "payload/firmware"],
        &[],
    );
    publish_dir(&staging, &updates);
    wait_listed(server.port, V2);
    b.point_at(&format!("http://127.0.0.1:{}", slow_relay(server.port)));
    let port = free_port();
    let mut web = start_serve(&b, port, &[]);
    assert_eq!(
        post_json(port, "/box_update", &serde_json::json!({})).status,
        202
    );
    eventually(Duration::from_secs(20), "downloading", || {
        let s = get(port, "/box_update/status").json();
        s["state"] == "downloading" && s["bytes_done"].as_u64() > Some(0)
    });
    let t0 = Instant::now();
    signal(&web.child, Signal::SIGTERM);
    let status = wait_exit(&mut web.child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "stopped at once: {:?}",
        t0.elapsed()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("box-updater stopped while downloading"),
        "{text}"
    );
    assert_eq!(b.current_version(), Some(V1), "nothing switched");
    assert!(
        b.status()["message"]
            .as_str()
            .unwrap()
            .contains("interrupted while downloading")
    );
    b.point_at(&server.url(""));
    let o = b.run(&["update"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.current_version(), Some(V2));
    let update_log = std::fs::read_to_string(b.root.join("var/log/opq/box_update.log")).unwrap();
    assert!(update_log.contains("resuming at"), "{update_log}");
}

/// The demo's script, stopped with Ctrl-C (SIGINT) however the test ends: its exit trap stops
/// what it started.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            signal(&self.0, Signal::SIGINT);
            let t0 = Instant::now();
            while let Ok(None) = self.0.try_wait() {
                if t0.elapsed() > Duration::from_secs(20) {
                    let _ = self.0.kill();
                    let _ = self.0.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn the_demo_shows_readable_progress_and_keeps_running_until_ctrl_c() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let bin = Path::new(BOX_UPDATER).parent().unwrap();
    let mut demo = Demo(
        Command::new("bash")
            .arg(root.join("scripts/demo.sh"))
            .arg("--keep")
            .current_dir(root)
            .env("OPQ_DEMO_BIN", bin)
            .env("OPQ_DEMO_MIB", "4")
            // However fast this machine unpacks, the demo's polling (every 50 ms and more) sees it.
            .env("OPQ_FAULT_SLOW", "unpack:100")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = Arc::new(Mutex::new(String::new()));
    for stream in [
        Box::new(demo.0.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(demo.0.stderr.take().unwrap()),
    ] {
        let out = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        });
    }
    let t0 = Instant::now();
    while !out.lock().unwrap().contains("press Ctrl-C to stop") {
        if let Some(status) = demo.0.try_wait().unwrap() {
            panic!("the demo ended ({status}): {}", out.lock().unwrap());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{}",
            out.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = out.lock().unwrap().clone();
    assert!(!text.contains("None"), "no Python None: {text}");
    assert!(
        text.contains("history: committed  nothing -> "),
        "the first install reads 'nothing ->': {text}"
    );
    for line in text.lines().map(str::trim_start) {
        if line.starts_with("downloading") || line.starts_with("unpacking") {
            if line.contains("MiB") && !line.starts_with("downloading  0.0 MiB ") {
                assert!(line.contains(" of "), "progress against a size: {line}");
            }
        } else if ["verifying", "installing", "switching", "rebooting"]
            .iter()
            .any(|s| line.starts_with(s))
        {
            assert!(!line.contains("MiB"), "no stale byte count: {line}");
        }
    }
    // Unpacking is slowed (OPQ_FAULT_SLOW above, in the fault-injection build the suite runs):
    // the demo's polling sees it.
    if cfg!(feature = "fault-injection") {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with("unpacking") && l.contains(" MiB of ")),
            "{text}"
        );
    }
    // The page is there to open.
    let page = text
        .lines()
        .filter_map(|l| l.strip_prefix("the box's page:"))
        .next_back()
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap()
        .to_string();
    let port: u16 = page
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let (status, _, body) = http_get(port, "/");
    assert!(status == 200 && body.contains("Update Box"), "{status}");
    let work = text
        .lines()
        .find_map(|l| l.split("update-server over ").nth(1))
        .map(|p| {
            Path::new(p.trim().trim_end_matches("\u{1b}[0m"))
                .parent()
                .unwrap()
                .to_path_buf()
        })
        .unwrap();
    assert!(work.exists(), "{}", work.display());

    // Ctrl-C: everything the demo started stops, and its directory goes.
    signal(&demo.0, Signal::SIGINT);
    let status = wait_exit(&mut demo.0, Duration::from_secs(20));
    assert_eq!(status.code(), Some(130), "{}", out.lock().unwrap());
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the box stopped"
    );
    assert!(!work.exists(), "{} removed", work.display());
}

#[test]
fn leftovers_finds_the_processes_a_test_run_left_behind() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = Dir::new();
    let id = format!("leftovers-test-{}", std::process::id());
    // One carries the run's marker; the other only works in the run's temp directory.
    let mut marked = Running {
        child: Command::new("sleep")
            .arg("60")
            .env("OPQ_TEST_RUN", &id)
            .spawn()
            .unwrap(),
        port: 0,
    };
    let mut inside = Running {
        child: Command::new("sleep")
            .arg("61")
            .env_clear()
            .current_dir(d.path())
            .spawn()
            .unwrap(),
        port: 0,
    };
    let check = |kill: bool| {
        let mut c = Command::new("bash");
        c.arg(root.join("scripts/leftovers.sh"));
        if kill {
            c.arg("--kill");
        }
        c.arg(&id)
            .arg(d.path())
            .env_remove("OPQ_TEST_RUN")
            .env("LEFTOVERS_WAIT", "1");
        run(&mut c)
    };
    let o = check(false);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    for child in [&marked.child, &inside.child] {
        assert!(
            stderr(&o).contains(&format!(" {} ", child.id())),
            "{} listed: {}",
            child.id(),
            stderr(&o)
        );
    }
    let o = check(true);
    assert_eq!(o.status.code(), Some(1));
    assert!(!marked.child.wait().unwrap().success() && !inside.child.wait().unwrap().success());
    let o = check(false);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
