//! `update-server`: the real binary on 127.0.0.1 over raw HTTP/1.1, its watched directory, the
//! paths an attacker sends, `wget` as the old boxes run it, settings, timeouts and signals.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::*;

const V1: u64 = 1_700_000_000;
const V2: u64 = 1_700_000_100;

/// A running `update-server`, its port learnt from its start line, its log kept.
struct Server {
    run: Running,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let mut c = cmd(UPDATE_SERVER);
        c.args(["--bind", "127.0.0.1", "--port", "0", "--dir"])
            .arg(dir);
        Server::spawn(c)
    }

    /// Starts `c` (stderr is taken over) and waits for `listening on 127.0.0.1:PORT`.
    fn spawn(mut c: Command) -> Server {
        c.env_remove("BOX_UPDATE_SERVER_SETTINGS")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        spawn_logged(c)
    }

    fn port(&self) -> u16 {
        self.run.port
    }

    fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[])
    }

    fn request(&self, method: &str, path: &str, headers: &[&str]) -> Reply {
        let mut raw =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
        for h in headers {
            raw.push_str(h);
            raw.push_str("\r\n");
        }
        raw.push_str("\r\n");
        self.raw(raw.as_bytes())
    }

    fn raw(&self, bytes: &[u8]) -> Reply {
        raw_request(self.port(), bytes)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn pid(&self) -> u32 {
        self.run.child.id()
    }
}

fn spawn_logged(mut c: Command) -> Server {
    let mut child = c.spawn().expect("starting update-server");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let port = line.split("listening on ").nth(1).map(|rest| {
                    let addr = rest.split(',').next().unwrap_or("");
                    addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok())
                });
                // Logged before the port is told, so that the start line is in `log()`.
                log.lock().unwrap().push(line);
                if let Some(port) = port {
                    let _ = tx.send(port);
                }
            }
        });
    }
    let port = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Some(p)) => p,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "update-server did not start:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
    };
    Server {
        run: Running { child, port },
        log,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `bytes` as they are and reads the one answer until the server closes.
fn raw_request(port: u16, bytes: &[u8]) -> Reply {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it has read everything (over-long heads).
    let _ = s.write_all(bytes);
    let mut all = Vec::new();
    // A reset after the answer (the server did not read all of an over-long head) still leaves
    // the answer in `all`.
    let read = s.read_to_end(&mut all);
    assert!(
        !all.is_empty(),
        "no answer to {:?}: {read:?}",
        String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
    );
    parse_reply(&all, false).0
}

/// Parses one response from the front of `all`; returns it and the bytes after it. The answer to
/// a HEAD request has a Content-Length but no body.
fn parse_reply(all: &[u8], to_head: bool) -> (Reply, &[u8]) {
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(all)));
    let head = std::str::from_utf8(&all[..end]).unwrap();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let rest = &all[end + 4..];
    let len = headers
        .get("content-length")
        .filter(|_| !to_head)
        .map(|v| v.parse::<usize>().unwrap())
        .unwrap_or(0)
        .min(rest.len());
    (
        Reply {
            status,
            headers,
            body: rest[..len].to_vec(),
        },
        &rest[len..],
    )
}

/// Polls `f` until it holds or `within` passes; returns how long it took.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn image_name(v: u64) -> String {
    format!("opq-box-update-{v}.tar.bz2")
}

/// A test directory with a payload and a directory `updates` for the server.
fn setup() -> (Dir, PathBuf) {
    let d = Dir::new();
    sample_payload(&d, "x");
    let updates = d.mkdir("updates");
    (d, updates)
}

#[test]
fn every_endpoint_answers_exactly() {
    let (d, updates) = setup();
    keygen(&d, "k");
    build_image(&d, &updates, V1, &["payload/box-config-daemon"], &[]);
    build_image(
        &d,
        &updates,
        V2,
        &["payload/box-config-daemon"],
        &["--sign-key", "k.key"],
    );
    // Fewer digits, so first in a plain string sort, but older; and no sidecar.
    fs::write(updates.join(image_name(999_999_999)), b"old image").unwrap();
    let s = Server::start(&updates);
    assert!(
        s.log()
            .contains("3 images (newest opq-box-update-1700000100.tar.bz2) from "),
        "{}",
        s.log()
    );

    let r = s.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let body = r.text();
    let ts = body
        .strip_prefix(r#"{"name": "Box Update Server", "ok": true, "timestamp": "#)
        .and_then(|b| b.strip_suffix(r#", "subcomponents": []}"#))
        .unwrap_or_else(|| panic!("{body}"));
    let ts: u64 = ts.parse().unwrap();
    let now = opq_update::fsutil::unix_now();
    assert!(ts <= now && ts + 10 >= now);

    let r = s.get("/version");
    assert_eq!((r.status, r.text().as_str()), (200, "1700000100"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));

    let r = s.get("/ls");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.text(),
        format!(
            "{}\n{}\n{}\n",
            image_name(999_999_999),
            image_name(V1),
            image_name(V2)
        )
    );
    assert_eq!(r.header("cache-control"), Some("no-cache"));

    let r = s.request("GET", "/ls", &["Accept: application/json"]);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let list: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    let sidecar = |v: u64| {
        let t = fs::read_to_string(updates.join(format!("{}.sha256", image_name(v)))).unwrap();
        t.split_whitespace().next().unwrap().to_string()
    };
    let size = |v: u64| fs::metadata(updates.join(image_name(v))).unwrap().len();
    assert_eq!(
        list,
        serde_json::json!([
            {"name": image_name(999_999_999), "version": 999_999_999u64, "size": 9,
             "sha256": sha256_hex(b"old image"), "signed": false},
            {"name": image_name(V1), "version": V1, "size": size(V1), "sha256": sidecar(V1),
             "signed": false},
            {"name": image_name(V2), "version": V2, "size": size(V2), "sha256": sidecar(V2),
             "signed": true},
        ])
    );

    let r = s.get("/latest");
    assert_eq!(r.status, 303);
    assert_eq!(
        r.header("location"),
        Some(format!("/update/{}", image_name(V2)).as_str())
    );
    assert_eq!(r.header("cache-control"), Some("no-cache"));

    let want = fs::read(updates.join(image_name(V2))).unwrap();
    let r = s.get(&format!("/update/{}", image_name(V2)));
    assert_eq!(r.status, 200);
    assert!(r.body == want, "the image's bytes");
    assert_eq!(
        r.header("content-length"),
        Some(want.len().to_string().as_str())
    );
    assert_eq!(
        r.header("content-disposition"),
        Some(format!("attachment; filename=\"{}\"", image_name(V2)).as_str())
    );
    // An image may be replaced under its name: caches keep it but ask again each time.
    assert_eq!(r.header("cache-control"), Some("public, no-cache"));
    assert!(r.header("etag").is_some_and(|e| e.starts_with('"')));
    assert!(
        r.header("last-modified")
            .is_some_and(|d| d.ends_with(" GMT"))
    );

    for sidecar in [".sha256", ".minisig"] {
        let name = format!("{}{sidecar}", image_name(V2));
        let r = s.get(&format!("/update/{name}"));
        assert_eq!(r.status, 200, "{name}");
        assert!(r.body == fs::read(updates.join(&name)).unwrap(), "{name}");
    }
    // V1 is not signed: its .minisig is not in the index.
    assert_eq!(
        s.get(&format!("/update/{}.minisig", image_name(V1))).status,
        404
    );

    let r = s.request("HEAD", &format!("/update/{}", image_name(V2)), &[]);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("content-length"),
        Some(want.len().to_string().as_str())
    );
    assert!(r.body.is_empty());
    let r = s.request("HEAD", "/version", &[]);
    assert_eq!((r.status, r.header("content-length")), (200, Some("10")));

    let r = s.request("POST", "/version", &["Content-Length: 0"]);
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, HEAD")));
    assert_eq!(s.get("/nothing-here").status, 404);

    // One access line per request: peer, method, path, status, bytes, milliseconds. The line
    // is written after the answer and read by another thread: wait for it.
    let has_line = |log: &str| {
        log.lines().any(|l| {
            l.contains("127.0.0.1:") && l.contains(" GET /version 200 10 ") && l.ends_with("ms")
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !has_line(&s.log()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(has_line(&s.log()), "{}", s.log());
}

#[test]
fn an_empty_directory_has_no_version() {
    let (_d, updates) = setup();
    let s = Server::start(&updates);
    let r = s.get("/version");
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(r.text(), "no update image available\n");
    assert_eq!(s.get("/latest").status, 404);
    let r = s.get("/ls");
    assert_eq!((r.status, r.text().as_str()), (200, ""));
    let r = s.request("GET", "/ls", &["Accept: application/json"]);
    assert_eq!((r.status, r.text().as_str()), (200, "[]"));
}

#[test]
fn images_come_and_go_without_a_restart() {
    let (d, updates) = setup();
    let built = d.mkdir("built");
    let i1 = build_image(&d, &built, V1, &["payload/box-config-daemon"], &[]);
    let i2 = build_image(&d, &built, V2, &["payload/box-config-daemon"], &[]);
    let s = Server::start(&updates);
    assert_eq!(s.get("/version").status, 404);

    // Copied in: written, then closed.
    fs::copy(&i1, updates.join(image_name(V1))).unwrap();
    let took = eventually(Duration::from_secs(1), "a copied image in /version", || {
        s.get("/version").text() == V1.to_string()
    });
    eprintln!("copied image listed after {took:?}");

    // Renamed in, as build-update publishes.
    fs::copy(&i2, updates.join(".incoming.tmp")).unwrap();
    fs::rename(updates.join(".incoming.tmp"), updates.join(image_name(V2))).unwrap();
    eventually(
        Duration::from_secs(1),
        "a renamed-in image in /version",
        || s.get("/version").text() == V2.to_string(),
    );
    assert_eq!(
        s.get("/latest").header("location"),
        Some(format!("/update/{}", image_name(V2)).as_str())
    );

    // Removed: the one before is the newest again, then none.
    fs::remove_file(updates.join(image_name(V2))).unwrap();
    eventually(Duration::from_secs(1), "a removed image gone", || {
        s.get("/version").text() == V1.to_string()
    });
    assert_eq!(s.get(&format!("/update/{}", image_name(V2))).status, 404);
    // Moved out.
    fs::rename(updates.join(image_name(V1)), d.join("away.tar.bz2")).unwrap();
    eventually(Duration::from_secs(1), "a moved-out image gone", || {
        s.get("/version").status == 404
    });
    let log = s.log();
    assert!(
        log.contains(&format!("image added: {}", image_name(V1))),
        "{log}"
    );
    assert!(
        log.contains(&format!("image removed: {}", image_name(V2))),
        "{log}"
    );
}

#[test]
fn a_file_still_being_written_is_not_listed_until_closed() {
    let (_d, updates) = setup();
    let whole: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();

    // Open for writing before the server starts: the first scan leaves it out too.
    let early = updates.join(image_name(V1));
    let mut early_f = File::create(&early).unwrap();
    early_f.write_all(&whole[..1000]).unwrap();
    let s = Server::start(&updates);
    assert_eq!(s.get("/ls").text(), "");

    // Being written while the server runs.
    let late = updates.join(image_name(V2));
    let mut late_f = File::create(&late).unwrap();
    late_f.write_all(&whole[..100_000]).unwrap();
    late_f.flush().unwrap();
    // A complete file written after it: once that one is listed, the events about the
    // half-written file (which came first) have been handled too.
    fs::write(updates.join(image_name(5)), b"marker").unwrap();
    eventually(Duration::from_secs(2), "the marker image", || {
        s.get("/ls").text().contains(&image_name(5))
    });
    assert_eq!(s.get("/ls").text(), format!("{}\n", image_name(5)));
    assert_eq!(s.get("/version").text(), "5");
    assert_eq!(s.get(&format!("/update/{}", image_name(V2))).status, 404);
    assert_eq!(s.get(&format!("/update/{}", image_name(V1))).status, 404);

    late_f.write_all(&whole[100_000..]).unwrap();
    drop(late_f);
    eventually(Duration::from_secs(1), "the closed image", || {
        s.get("/version").text() == V2.to_string()
    });
    let r = s.get(&format!("/update/{}", image_name(V2)));
    assert!(
        r.status == 200 && r.body == whole,
        "the whole file is served"
    );

    early_f.write_all(&whole[1000..]).unwrap();
    drop(early_f);
    eventually(Duration::from_secs(1), "the image open at start", || {
        s.get("/ls").text().contains(&image_name(V1))
    });
}

#[test]
fn the_rescan_finds_what_inotify_does_not_report_as_complete() {
    let (d, updates) = setup();
    // A hard link appears with IN_CREATE alone (no writer ever closes it), much as a file
    // written on another host of a network file system shows up: only the rescan can take it.
    let outside = d.write("outside.tar.bz2", "linked");
    let mut c = cmd(UPDATE_SERVER);
    c.env("BOX_UPDATE_SERVER_SETTINGS", r#"{"rescan_secs": 1}"#)
        .args(["--bind", "127.0.0.1", "--port", "0", "--dir"])
        .arg(&updates);
    let s = spawn_env(c);
    fs::hard_link(&outside, updates.join(image_name(V1))).unwrap();
    eventually(Duration::from_secs(5), "the linked image", || {
        s.get("/version").text() == V1.to_string()
    });
    assert_eq!(
        s.get(&format!("/update/{}", image_name(V1))).text(),
        "linked"
    );
    assert!(s.log().contains("rescan found changes"), "{}", s.log());
}

#[test]
fn the_directory_removed_and_created_again_is_survived() {
    let (d, updates) = setup();
    fs::write(updates.join(image_name(V1)), b"one").unwrap();
    let s = Server::start(&updates);
    assert_eq!(s.get("/version").text(), V1.to_string());

    fs::remove_dir_all(&updates).unwrap();
    eventually(
        Duration::from_secs(2),
        "nothing served without the directory",
        || s.get("/version").status == 404,
    );
    assert_eq!(s.get(&format!("/update/{}", image_name(V1))).status, 404);

    fs::create_dir(&updates).unwrap();
    fs::write(updates.join(image_name(V2)), b"two").unwrap();
    eventually(Duration::from_secs(2), "the new directory's image", || {
        s.get("/version").text() == V2.to_string()
    });
    assert_eq!(s.get(&format!("/update/{}", image_name(V2))).text(), "two");

    // Swapped for another directory by renames, as a deploy script might.
    let next = d.mkdir("next");
    fs::write(next.join(image_name(V2 + 1)), b"three").unwrap();
    fs::rename(&updates, d.join("old")).unwrap();
    fs::rename(&next, &updates).unwrap();
    eventually(
        Duration::from_secs(2),
        "the swapped-in directory's image",
        || s.get("/version").text() == (V2 + 1).to_string(),
    );
    // The directory moved away is no longer served from.
    assert_eq!(s.get(&format!("/update/{}", image_name(V2))).status, 404);
    assert!(s.log().contains("went away"), "{}", s.log());
}

#[test]
fn nothing_outside_the_index_is_ever_served() {
    let (d, updates) = setup();
    d.write("secret.txt", "TOPSECRET outside\n");
    fs::write(updates.join(image_name(V1)), b"the image").unwrap();
    fs::write(updates.join("secret.txt"), b"TOPSECRET inside\n").unwrap();
    fs::write(
        updates.join(format!("{}.part", image_name(V2))),
        b"TOPSECRET part",
    )
    .unwrap();
    fs::write(updates.join(".hidden"), b"TOPSECRET hidden").unwrap();
    std::os::unix::fs::symlink(d.join("secret.txt"), updates.join(image_name(V2))).unwrap();
    fs::create_dir(updates.join(image_name(V2 + 1))).unwrap();
    fs::write(updates.join(image_name(V2 + 1)).join("x"), b"TOPSECRET dir").unwrap();
    let s = Server::start(&updates);
    assert_eq!(s.get("/version").text(), V1.to_string());

    let long = "a".repeat(5000);
    let targets = [
        "/update/../secret.txt".to_string(),
        "/update/../../../../etc/passwd".into(),
        "/../secret.txt".into(),
        "/update/%2e%2e/secret.txt".into(),
        "/update/%2E%2E%2Fsecret.txt".into(),
        "/update/..%2fsecret.txt".into(),
        "/update/%2e%2e%2f%2e%2e%2fetc%2fpasswd".into(),
        "/update/..%5csecret.txt".into(),
        "/update/..\\secret.txt".into(),
        "/update/.%2e/secret.txt".into(),
        "/update//etc/passwd".into(),
        "//update/secret.txt".into(),
        "/update/./secret.txt".into(),
        format!("/update/{}/", image_name(V1)),
        format!("/update/{}%00", image_name(V1)),
        format!("/update/{}%2F", image_name(V1)),
        format!("/update/%2e%2e%2F{}", image_name(V1)),
        "/update/%2e%2e/%2e%2e/etc/passwd".into(),
        "/etc/passwd".into(),
        "etc/passwd".into(),
        "*".into(),
        "http://127.0.0.1/../secret.txt".into(),
        "/update/secret.txt".into(),
        "/update/.hidden".into(),
        format!("/update/{}.part", image_name(V2)),
        format!("/update/{}", image_name(V2)),
        format!("/update/{}/x", image_name(V2 + 1)),
        format!("/update/{}", image_name(V2 + 1)),
        "/update/".into(),
        "/update".into(),
        format!("/update/{long}"),
        format!("/update/{}", "a".repeat(20_000)),
    ];
    for t in &targets {
        let r = s.get(t);
        assert_eq!(r.status, 404, "{t}");
        assert!(!r.text().contains("TOPSECRET"), "{t}");
    }
    // Percent-encoded unreserved characters are those characters (RFC 3986 6.2.2.2).
    for t in [
        format!("/update/%6fpq-box-update-{V1}.tar.bz2"),
        format!("/update/%6F%70%71%2Dbox-update-{V1}%2etar.bz2"),
        format!("/%75pdate/opq-box-update-{V1}.tar.bz2?x=%2F"),
    ] {
        let r = s.get(&t);
        assert_eq!((r.status, r.text().as_str()), (200, "the image"), "{t}");
    }

    // Malformed request lines and heads: a clear answer, never a crash.
    for (raw, want) in [
        ("GET /version\r\n\r\n", 400),
        ("GET  /version HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        ("GET /version HTTP/1.1\r\n\r\n", 400),
        ("\u{1}\u{2}\u{3}\r\n\r\n", 400),
        ("GET /version HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (
            "GET /version HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
            400,
        ),
    ] {
        assert_eq!(s.raw(raw.as_bytes()).status, want, "{raw:?}");
    }
    let huge_header = format!(
        "GET /version HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\n\r\n",
        "j".repeat(20_000)
    );
    assert_eq!(s.raw(huge_header.as_bytes()).status, 431);
    // A body the server does not want, announced absurdly large, is not waited for.
    let r = s.raw(b"GET /version HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999999\r\n\r\n");
    assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    assert_eq!(s.get("/version").text(), V1.to_string(), "still serving");
    assert_eq!(
        s.get(&format!("/update/{}", image_name(V1))).text(),
        "the image"
    );
}

#[test]
fn ranges_and_conditional_requests() {
    let (_d, updates) = setup();
    let bytes: Vec<u8> = (0..1000u32).map(|i| (i % 256) as u8).collect();
    fs::write(updates.join(image_name(V1)), &bytes).unwrap();
    let s = Server::start(&updates);
    let path = format!("/update/{}", image_name(V1));

    let r = s.request("GET", &path, &["Range: bytes=10-19"]);
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(r.header("content-length"), Some("10"));
    assert_eq!(r.body, &bytes[10..20]);
    let r = s.request("GET", &path, &["Range: bytes=990-"]);
    assert_eq!((r.status, &r.body[..]), (206, &bytes[990..]));
    let r = s.request("GET", &path, &["Range: bytes=-5"]);
    assert_eq!(r.header("content-range"), Some("bytes 995-999/1000"));
    assert_eq!(r.body, &bytes[995..]);
    let r = s.request("GET", &path, &["Range: bytes=1000-"]);
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */1000"));
    // Several ranges at once are not offered: the whole file.
    let r = s.request("GET", &path, &["Range: bytes=0-1,5-6"]);
    assert_eq!((r.status, r.body.len()), (200, 1000));

    let etag = s.get(&path).header("etag").unwrap().to_string();
    let r = s.request("GET", &path, &[&format!("If-None-Match: {etag}")]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    let r = s.request("GET", &path, &["If-None-Match: \"something-else\""]);
    assert_eq!((r.status, r.body.len()), (200, 1000));
    // If-Range with the current ETag resumes; with an old one, the whole file comes.
    let r = s.request(
        "GET",
        &path,
        &["Range: bytes=500-", &format!("If-Range: {etag}")],
    );
    assert_eq!((r.status, &r.body[..]), (206, &bytes[500..]));
    let r = s.request("GET", &path, &["Range: bytes=500-", "If-Range: \"old\""]);
    assert_eq!((r.status, r.body.len()), (200, 1000));

    let r = s.request("HEAD", &path, &[]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert!(r.body.is_empty());

    // Preconditions (RFC 9110 13.1.1, 13.1.4): the client's copy must still be the one served.
    let last_modified = r.header("last-modified").unwrap().to_string();
    let r = s.request("GET", &path, &[&format!("If-Match: {etag}")]);
    assert_eq!((r.status, r.body.len()), (200, 1000));
    let r = s.request(
        "GET",
        &path,
        &[&format!("If-Unmodified-Since: {last_modified}")],
    );
    assert_eq!((r.status, r.body.len()), (200, 1000));
    for h in [
        "If-Match: \"something-else\"".to_string(),
        format!("If-Match: W/{etag}"),
        "If-Unmodified-Since: Tue, 14 Nov 2023 22:13:20 GMT".to_string(),
    ] {
        let r = s.request("GET", &path, &[&h, "Range: bytes=500-"]);
        assert_eq!(r.status, 412, "{h}");
        assert!(
            r.text().contains("precondition failed"),
            "{h}: {}",
            r.text()
        );
        let r = s.request("HEAD", &path, &[&h]);
        assert_eq!(r.status, 412, "HEAD, {h}");
    }

    // The image replaced under its name: a resume that names the old copy fails rather than
    // splice two files, and caches that revalidate get the new one.
    let newer: Vec<u8> = (0..1000u32).map(|i| (i % 13) as u8).collect();
    let tmp = updates.join(".replacement");
    fs::write(&tmp, &newer).unwrap();
    fs::rename(&tmp, updates.join(image_name(V1))).unwrap();
    eventually(Duration::from_secs(5), "the replacement served", || {
        s.get(&path).body == newer
    });
    let r = s.request(
        "GET",
        &path,
        &["Range: bytes=500-", &format!("If-Match: {etag}")],
    );
    assert_eq!(r.status, 412);
    let r = s.request("GET", &path, &[&format!("If-None-Match: {etag}")]);
    assert_eq!((r.status, &r.body[..]), (200, &newer[..]));
    assert_ne!(r.header("etag"), Some(etag.as_str()));
}

#[test]
fn ls_negotiates_its_answer_by_accept_q_values() {
    let (_d, updates) = setup();
    fs::write(updates.join(image_name(V1)), b"abc").unwrap();
    let s = Server::start(&updates);
    for (accept, json) in [
        ("", false),
        ("application/json", true),
        ("application/*", true),
        ("*/*", false),
        ("text/plain;q=0.5, application/json", true),
        ("text/plain, application/json;q=0.9", false),
        ("application/json;q=0", false),
        ("*/*;q=0.1, application/json;q=0.2", true),
        ("*/*, application/json;q=0", false),
        (
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
            false,
        ),
    ] {
        let headers: Vec<String> = if accept.is_empty() {
            vec![]
        } else {
            vec![format!("Accept: {accept}")]
        };
        let h: Vec<&str> = headers.iter().map(String::as_str).collect();
        let r = s.request("GET", "/ls", &h);
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.header("vary"), Some("Accept"), "{accept}");
        if json {
            assert_eq!(
                r.header("content-type"),
                Some("application/json"),
                "{accept}"
            );
            assert!(r.text().starts_with('['), "{accept}: {}", r.text());
        } else {
            assert!(
                r.header("content-type").unwrap().starts_with("text/plain"),
                "{accept}"
            );
            assert_eq!(r.text(), format!("{}\n", image_name(V1)), "{accept}");
        }
    }
}

#[test]
fn keep_alive_and_pipelined_requests() {
    let (_d, updates) = setup();
    fs::write(updates.join(image_name(V1)), b"abc").unwrap();
    let s = Server::start(&updates);
    let mut c = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        format!(
            "GET /version HTTP/1.1\r\nHost: x\r\n\r\n\r\nHEAD /ls HTTP/1.1\r\nHost: x\r\n\r\n\
             GET /update/{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            image_name(V1)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    let (r1, rest) = parse_reply(&all, false);
    let (r2, rest) = parse_reply(rest, true);
    let (r3, rest) = parse_reply(rest, false);
    assert_eq!((r1.status, r1.text()), (200, V1.to_string()));
    assert_eq!((r2.status, r2.header("content-length")), (200, Some("34")));
    assert_eq!((r3.status, r3.text().as_str()), (200, "abc"));
    assert!(rest.is_empty());
}

#[test]
fn wget_follows_latest_and_saves_the_image() {
    let (d, updates) = setup();
    let image = build_image(&d, &updates, V1, &["payload/box-config-daemon"], &[]);
    let want = sha256_hex(&fs::read(&image).unwrap());
    let s = Server::start(&updates);
    let work = d.mkdir("box");
    // As the old boxes' shell updater runs it.
    sh(
        &work,
        &format!(
            "NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 wget -q http://127.0.0.1:{}/latest -O update.tar.bz2 \
             && tar xf update.tar.bz2",
            s.port()
        ),
    );
    assert_eq!(
        sha256_hex(&fs::read(work.join("update.tar.bz2")).unwrap()),
        want
    );
    assert_eq!(
        fs::read_to_string(work.join(format!("opq-box-update-{V1}/VERSION"))).unwrap(),
        format!("{V1}\n")
    );
    // And resuming a cut download.
    let bytes = fs::read(&image).unwrap();
    fs::write(work.join("part.tar.bz2"), &bytes[..bytes.len() / 2]).unwrap();
    sh(
        &work,
        &format!(
            "NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 wget -q -c http://127.0.0.1:{}/update/{} -O part.tar.bz2",
            s.port(),
            image_name(V1)
        ),
    );
    assert_eq!(
        sha256_hex(&fs::read(work.join("part.tar.bz2")).unwrap()),
        want
    );
}

#[test]
fn settings_come_from_the_environment_and_flags_win() {
    let (d, updates) = setup();
    fs::write(updates.join(image_name(V1)), b"env").unwrap();
    let other = d.mkdir("other");
    fs::write(other.join(image_name(V2)), b"flag").unwrap();
    let env =
        serde_json::json!({"port": 0, "updates_dir": updates, "bind": "127.0.0.1"}).to_string();

    // The docker deployment's way: the environment only.
    let mut c = cmd(UPDATE_SERVER);
    c.env("BOX_UPDATE_SERVER_SETTINGS", &env);
    let s = spawn_env(c);
    assert_eq!(s.get("/version").text(), V1.to_string());
    assert!(
        s.log().contains(&format!("from {}", updates.display())),
        "{}",
        s.log()
    );
    drop(s);

    // A flag beats the environment.
    let port = free_port();
    let env =
        serde_json::json!({"port": port, "updates_dir": updates, "bind": "127.0.0.1"}).to_string();
    let mut c = cmd(UPDATE_SERVER);
    c.env("BOX_UPDATE_SERVER_SETTINGS", &env)
        .arg("--dir")
        .arg(&other);
    let s = spawn_env(c);
    assert_eq!(s.port(), port, "the port from the environment");
    assert_eq!(
        s.get("/version").text(),
        V2.to_string(),
        "the directory from the flag"
    );
}

fn spawn_env(mut c: Command) -> Server {
    c.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    spawn_logged(c)
}

#[test]
fn bad_settings_are_clear_errors() {
    let d = Dir::new();
    d.write("file", "x");
    for (args, env, want) in [
        (
            vec!["--dir", "missing"],
            None,
            "update directory missing does not exist",
        ),
        (
            vec!["--dir", "file"],
            None,
            "update directory file is not a directory",
        ),
        (
            vec!["--dir", "."],
            Some("{\"port\": \"x\"}"),
            "BOX_UPDATE_SERVER_SETTINGS",
        ),
        (vec!["--dir", ".", "--port", "99999"], None, "99999"),
    ] {
        let mut c = cmd(UPDATE_SERVER);
        c.current_dir(d.path())
            .args(&args)
            .env_remove("BOX_UPDATE_SERVER_SETTINGS");
        if let Some(e) = env {
            c.env("BOX_UPDATE_SERVER_SETTINGS", e);
        }
        let o = run(&mut c);
        assert!(!o.status.success(), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: {err}");
        if !args.contains(&"99999") {
            assert!(err.contains("update-server: error: "), "{err}");
        }
    }
}

#[test]
fn idle_and_stalled_clients_are_dropped_and_never_hold_up_others() {
    let (_d, updates) = setup();
    // Big enough to fill the socket buffers of a client that does not read; sparse, so cheap.
    let big = File::create(updates.join(image_name(V1))).unwrap();
    big.set_len(64 << 20).unwrap();
    drop(big);
    let mut c = cmd(UPDATE_SERVER);
    c.args([
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--timeout",
        "1",
        "--dir",
    ])
    .arg(&updates);
    let s = Server::spawn(c);

    // Downloads that are never read.
    let stalled: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
            c.write_all(
                format!("GET /update/{} HTTP/1.1\r\nHost: x\r\n\r\n", image_name(V1)).as_bytes(),
            )
            .unwrap();
            c
        })
        .collect();
    // A client that connects and says nothing; one that stops mid-head.
    let mut silent = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    let mut partial = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
    partial.write_all(b"GET /vers").unwrap();

    let t0 = Instant::now();
    assert_eq!(s.get("/version").text(), V1.to_string());
    assert!(t0.elapsed() < Duration::from_millis(500), "/version waited");

    for c in [&mut silent, &mut partial] {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let t0 = Instant::now();
    let mut got = Vec::new();
    silent.read_to_end(&mut got).unwrap();
    assert!(got.is_empty() && t0.elapsed() < Duration::from_secs(5));
    let mut got = Vec::new();
    partial.read_to_end(&mut got).unwrap();
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 408 "),
        "{got:?}"
    );

    eventually(Duration::from_secs(10), "stalled downloads dropped", || {
        s.log().matches(" aborted ").count() == stalled.len()
    });
    assert!(s.log().contains("stopped reading"), "{}", s.log());
    drop(stalled);
}

#[test]
fn memory_stays_flat_with_parallel_downloads() {
    let (_d, updates) = setup();
    let big = File::create(updates.join(image_name(V1))).unwrap();
    big.set_len(128 << 20).unwrap();
    drop(big);
    let s = Server::start(&updates);
    let port = s.port();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let path = format!("/update/{}", image_name(V1));
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
                c.write_all(
                    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut total = 0u64;
                loop {
                    match c.read(&mut buf).unwrap() {
                        0 => break total,
                        n => total += n as u64,
                    }
                }
            })
        })
        .collect();
    for t in threads {
        assert!(
            t.join().unwrap() > 128 << 20,
            "the whole image and its head"
        );
    }
    let status = fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        hwm_kib < 32 * 1024,
        "peak RSS {hwm_kib} KiB for 8 x 128 MiB downloads"
    );
}

#[test]
fn sigterm_and_sigint_stop_it_cleanly() {
    let (_d, updates) = setup();
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let mut s = Server::start(&updates);
        assert_eq!(s.get("/").status, 200);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(s.pid() as i32), sig).unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = s.run.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "still running after {sig}"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{sig}: {status}");
        eventually(Duration::from_secs(2), "the last log line", || {
            s.log().contains("stopped")
        });
        assert!(s.log().contains(&format!("got {sig}")), "{}", s.log());
    }
}

#[test]
fn the_container_settings_are_what_the_server_reads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = fs::read_to_string(root.join("update-server/Dockerfile")).unwrap();
    let json = dockerfile
        .split("BOX_UPDATE_SERVER_SETTINGS='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .expect("the Dockerfile sets BOX_UPDATE_SERVER_SETTINGS");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(v["port"], 8151);
    assert_eq!(v["updates_dir"], "/var/opq/box-updates");
    assert!(
        dockerfile.contains("VOLUME /var/opq/box-updates") && dockerfile.contains("EXPOSE 8151")
    );

    // The container's settings, with the directory and port moved by flags for the test.
    let (_d, updates) = setup();
    fs::write(updates.join(image_name(V1)), b"x").unwrap();
    let mut c = cmd(UPDATE_SERVER);
    c.env("BOX_UPDATE_SERVER_SETTINGS", json)
        .args(["--bind", "127.0.0.1", "--port", "0", "--dir"])
        .arg(&updates);
    let s = spawn_env(c);
    assert_eq!(s.get("/version").text(), V1.to_string());
}

#[test]
fn the_scripts_are_shellcheck_clean() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !sh_ok(root, "command -v shellcheck") {
        panic!("shellcheck is not installed: scripts/test.sh installs it");
    }
    sh(
        root,
        "shellcheck -x scripts/*.sh scripts/bench/*.sh scripts/bench/*/*.sh .ci/run",
    );
}

#[test]
fn an_unreadable_directory_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    let d = Dir::new();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let locked = d.mkdir("locked");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads everything: the server runs as nobody then.
    let mut c = if nix::unistd::geteuid().is_root() {
        let mut c = cmd("setpriv");
        c.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            UPDATE_SERVER,
        ]);
        c
    } else {
        cmd(UPDATE_SERVER)
    };
    c.arg("--dir")
        .arg(&locked)
        .env_remove("BOX_UPDATE_SERVER_SETTINGS");
    let o = run(&mut c);
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "update-server: error: cannot read update directory {}",
            locked.display()
        )) && err.contains("ermission denied"),
        "{err}"
    );
}
