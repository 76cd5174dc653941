//! Network faults between the box and the server, through a small misbehaving proxy: each gives a
//! bounded, clear outcome, never a hang and never a bad install.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::util::*;

const V1: u64 = 1_700_000_001;
const V2: u64 = 1_700_000_002;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// Relay everything untouched.
    Pass,
    /// Close the connection halfway through the image body.
    ResetMidBody,
    /// Send half the image body, then go silent.
    StallMidBody,
    /// Answer a Range request with the whole file (200), as servers that ignore Range do.
    IgnoreRange,
    /// On a resume, serve a different file (another ETag, other bytes).
    OtherFileOnResume,
    /// Image requests answer 404 / 500.
    Status404,
    Status500,
    /// /latest redirects to a host where nothing listens.
    RedirectElsewhere,
    /// The image body runs past its Content-Length.
    LongerThanLength,
    /// The first request for /version and for /latest is closed unanswered (seen on the virtual
    /// box, right after a boot).
    DropFirstCheck,
}

struct Proxy {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

/// Reads a whole upstream response: (head, body).
fn fetch(upstream: u16, req: &[u8]) -> (String, Vec<u8>) {
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
    up.write_all(&close_request(req)).unwrap();
    let mut all = Vec::new();
    up.read_to_end(&mut all).unwrap();
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    (
        String::from_utf8_lossy(&all[..split]).into_owned(),
        all[split..].to_vec(),
    )
}

impl Proxy {
    fn start(upstream: u16, fault: Fault, other_image: Option<Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let image_requests = Arc::new(AtomicUsize::new(0));
        let check_requests = Arc::new(AtomicUsize::new(0));
        let reqs = requests.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { continue };
                let reqs = reqs.clone();
                let image_requests = image_requests.clone();
                let check_requests = check_requests.clone();
                let other = other_image.clone();
                std::thread::spawn(move || {
                    let _ = client.set_write_timeout(Some(Duration::from_secs(10)));
                    let Some(req) = read_head(&mut client) else {
                        return;
                    };
                    let text = String::from_utf8_lossy(&req).into_owned();
                    let line = text.lines().next().unwrap_or("").to_string();
                    let range = text
                        .lines()
                        .any(|l| l.to_ascii_lowercase().starts_with("range:"));
                    reqs.lock().unwrap().push(text.clone());
                    let is_image = line.contains(".tar.bz2 ");
                    let nth_image = if is_image {
                        image_requests.fetch_add(1, Ordering::SeqCst)
                    } else {
                        usize::MAX
                    };
                    let reply = |client: &mut TcpStream, head: &str, body: &[u8]| {
                        let _ = client.write_all(head.as_bytes());
                        let _ = client.write_all(body);
                    };
                    let is_check = line.contains("/version ") || line.contains("/latest ");
                    match fault {
                        Fault::DropFirstCheck
                            if is_check
                                && check_requests
                                    .fetch_add(1, Ordering::SeqCst)
                                    .is_multiple_of(2) => {}
                        Fault::RedirectElsewhere if line.contains("/latest") => {
                            let dead = TcpListener::bind("127.0.0.1:0")
                                .unwrap()
                                .local_addr()
                                .unwrap()
                                .port();
                            reply(
                                &mut client,
                                &format!(
                                    "HTTP/1.1 303 See Other\r\nLocation: http://127.0.0.1:{dead}/update/opq-box-update-{V2}.tar.bz2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                                ),
                                b"",
                            );
                        }
                        Fault::Status404 if is_image => reply(
                            &mut client,
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found",
                            b"",
                        ),
                        Fault::Status500 if is_image || line.contains("/version") => reply(
                            &mut client,
                            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\noops",
                            b"",
                        ),
                        Fault::IgnoreRange if is_image && range => {
                            let plain = text
                                .lines()
                                .filter(|l| !l.to_ascii_lowercase().starts_with("range:"))
                                .collect::<Vec<_>>()
                                .join("\r\n")
                                + "\r\n";
                            let (head, body) = fetch(upstream, plain.as_bytes());
                            reply(&mut client, &head, &body);
                        }
                        Fault::OtherFileOnResume if is_image && range => {
                            let other = other.unwrap();
                            let asked: usize = text
                                .lines()
                                .find(|l| l.to_ascii_lowercase().starts_with("range:"))
                                .and_then(|l| l.split('=').nth(1))
                                .and_then(|r| r.trim_end_matches('-').trim().parse().ok())
                                .unwrap_or(0);
                            let rest = &other[asked.min(other.len())..];
                            reply(
                                &mut client,
                                &format!(
                                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {asked}-{}/{}\r\nETag: \"another-file\"\r\nConnection: close\r\n\r\n",
                                    rest.len(),
                                    other.len() - 1,
                                    other.len()
                                ),
                                rest,
                            );
                        }
                        Fault::LongerThanLength if is_image => {
                            let (head, mut body) = fetch(upstream, &req);
                            body.extend_from_slice(&[0x42; 4096]);
                            reply(&mut client, &head, &body);
                        }
                        Fault::ResetMidBody | Fault::StallMidBody if is_image && nth_image == 0 => {
                            let (head, body) = fetch(upstream, &req);
                            reply(&mut client, &head, &body[..body.len() / 2]);
                            if fault == Fault::StallMidBody {
                                std::thread::sleep(Duration::from_secs(8));
                            }
                            let _ = client.shutdown(Shutdown::Both);
                        }
                        _ => {
                            let (head, body) = fetch(upstream, &req);
                            reply(&mut client, &head, &body);
                        }
                    }
                    let _ = client.shutdown(Shutdown::Both);
                });
            }
        });
        Proxy { port, requests }
    }
}

struct Setup {
    dir: Dir,
    server: Running,
    v2_image: Vec<u8>,
}

/// A server with V2 published and a box on V1 (installed directly from another server).
fn setup() -> (Setup, BoxUnderTest) {
    let dir = Dir::new();
    let mut noise = Vec::new();
    let mut x = 3u64;
    while noise.len() < 1 << 20 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        noise.extend_from_slice(&x.to_le_bytes());
    }
    dir.write("payload/box-config-daemon/blob.bin", &noise);
    sample_payload(&dir, "faults");
    let first = dir.mkdir("first");
    build_image(&dir, &first, V1, &["payload/box-config-daemon"], &[]);
    let s1 = start_update_server(&first);
    let b = BoxUnderTest::new(&dir, "box", &s1.url(""));
    let o = b.run(&["update"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(b.run(&["confirm"]).status.success());
    drop(s1);
    let updates = dir.mkdir("updates");
    let staging = dir.mkdir("staging");
    // Signed, and every update() checks the signature: its prehash is taken as the bytes arrive,
    // so each resume and restart below must feed it exactly the file's bytes.
    keygen(&dir, "k");
    let image = build_image(
        &dir,
        &staging,
        V2,
        &["payload/box-config-daemon"],
        &["--sign-key", "k.key"],
    );
    let v2_image = std::fs::read(&image).unwrap();
    publish_dir(&staging, &updates);
    let server = start_update_server(&updates);
    (
        Setup {
            dir,
            server,
            v2_image,
        },
        b,
    )
}

/// Runs `update` and returns (exit code, stderr, seconds taken); the run must end in time.
fn update(b: &BoxUnderTest, extra: &[&str]) -> (Option<i32>, String, f64) {
    let t = Instant::now();
    // Setup's directory holds the box (box/root) and the key (k.pub).
    let key = b.root.join("../../k.pub");
    let mut args = vec![
        "update",
        "--network-timeout",
        "2",
        "--public-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let o = b.run(&args);
    (
        o.status.code(),
        stderr(&o) + &stdout(&o),
        t.elapsed().as_secs_f64(),
    )
}

fn assert_untouched(b: &BoxUnderTest) {
    assert_eq!(b.current_version(), Some(V1));
    assert_eq!(b.reboot_count(), 1);
    b.assert_current_complete();
    assert!(
        !b.releases().iter().any(|r| r.contains(&V2.to_string())),
        "{:?}",
        b.releases()
    );
}

#[test]
fn connection_refused_is_a_clear_bounded_failure() {
    let (_s, b) = setup();
    let dead = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    b.point_at(&format!("http://127.0.0.1:{}", dead));
    let (code, err, secs) = update(&b, &["--retries", "2"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("cannot reach"), "{err}");
    assert!(secs < 10.0, "took {secs} s");
    assert_untouched(&b);
}

#[test]
fn reset_mid_body_is_retried_and_resumed() {
    let (s, b) = setup();
    let p = Proxy::start(s.server.port, Fault::ResetMidBody, None);
    b.point_at(&format!("http://127.0.0.1:{}", p.port));
    let (code, err, _) = update(&b, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(b.current_version(), Some(V2));
    b.assert_current_complete();
    let reqs = p.requests.lock().unwrap();
    assert!(
        reqs.iter()
            .any(|r| r.to_ascii_lowercase().contains("range: bytes=")),
        "the retry resumed"
    );
    // The signature's prehash went on over the resumed bytes; the file was not read again.
    let log = std::fs::read_to_string(b.root.join("var/log/opq/box_update.log")).unwrap();
    assert!(
        log.contains("verified over the bytes as they arrived"),
        "{log}"
    );
}

#[test]
fn a_stall_longer_than_the_read_timeout_is_cut_and_resumed() {
    let (s, b) = setup();
    let p = Proxy::start(s.server.port, Fault::StallMidBody, None);
    b.point_at(&format!("http://127.0.0.1:{}", p.port));
    let (code, err, secs) = update(&b, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        secs < 8.0,
        "the stall was not cut by the 2 s read timeout: {secs} s"
    );
    assert_eq!(b.current_version(), Some(V2));
}

#[test]
fn a_server_that_ignores_range_restarts_from_zero() {
    let (s, b) = setup();
    // First run: cut, leaving a .part; second run through a proxy that ignores Range.
    let cut = Proxy::start(s.server.port, Fault::ResetMidBody, None);
    b.point_at(&format!("http://127.0.0.1:{}", cut.port));
    let (code, _, _) = update(&b, &["--retries", "0"]);
    assert_eq!(code, Some(1));
    let p = Proxy::start(s.server.port, Fault::IgnoreRange, None);
    b.point_at(&format!("http://127.0.0.1:{}", p.port));
    let (code, err, _) = update(&b, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(b.current_version(), Some(V2));
    b.assert_current_complete();
    let log = std::fs::read_to_string(b.root.join("var/log/opq/box_update.log")).unwrap();
    assert!(log.contains("starting over"), "{log}");
}

#[test]
fn a_different_file_on_resume_is_never_spliced() {
    let (s, b) = setup();
    let cut = Proxy::start(s.server.port, Fault::ResetMidBody, None);
    b.point_at(&format!("http://127.0.0.1:{}", cut.port));
    assert_eq!(update(&b, &["--retries", "0"]).0, Some(1));
    let mut other = s.v2_image.clone();
    other.reverse();
    let p = Proxy::start(s.server.port, Fault::OtherFileOnResume, Some(other));
    b.point_at(&format!("http://127.0.0.1:{}", p.port));
    let (code, err, _) = update(&b, &["--retries", "3"]);
    // Either the restart from zero gets the real file, or the update fails: never a mix.
    if code == Some(0) {
        assert_eq!(b.current_version(), Some(V2));
        b.assert_current_complete();
    } else {
        assert!(
            err.contains("sha256") || err.contains("starting over") || err.contains("restarting"),
            "{err}"
        );
        assert_untouched(&b);
    }
    let _ = s.dir.path();
}

#[test]
fn not_found_and_server_errors_fail_cleanly() {
    for fault in [Fault::Status404, Fault::Status500] {
        let (s, b) = setup();
        let p = Proxy::start(s.server.port, fault, None);
        b.point_at(&format!("http://127.0.0.1:{}", p.port));
        let (code, err, secs) = update(&b, &["--retries", "2"]);
        assert_eq!(code, Some(1), "{fault:?}: {err}");
        assert!(
            err.contains(if fault == Fault::Status404 {
                "404"
            } else {
                "500"
            }),
            "{fault:?}: {err}"
        );
        assert!(secs < 10.0, "{fault:?}: {secs} s");
        assert_untouched(&b);
    }
}

#[test]
fn a_redirect_to_a_dead_host_fails_cleanly() {
    let (s, b) = setup();
    let p = Proxy::start(s.server.port, Fault::RedirectElsewhere, None);
    b.point_at(&format!("http://127.0.0.1:{}", p.port));
    let (code, err, secs) = update(&b, &["--retries", "1"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("cannot reach"), "{err}");
    assert!(secs < 10.0);
    assert_untouched(&b);
}

#[test]
fn a_body_longer_than_its_content_length_is_cut_at_the_length() {
    let (s, b) = setup();
    let p = Proxy::start(s.server.port, Fault::LongerThanLength, None);
    b.point_at(&format!("http://127.0.0.1:{}", p.port));
    let (code, err, _) = update(&b, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(b.current_version(), Some(V2));
    b.assert_current_complete();
}

#[test]
fn relaying_untouched_works() {
    let (s, b) = setup();
    let p = Proxy::start(s.server.port, Fault::Pass, None);
    b.point_at(&format!("http://127.0.0.1:{}", p.port));
    assert_eq!(update(&b, &[]).0, Some(0));
    assert_eq!(b.current_version(), Some(V2));
}

#[test]
fn a_check_whose_connection_drops_is_retried() {
    let (s, b) = setup();
    let proxy = Proxy::start(s.server.port, Fault::DropFirstCheck, None);
    b.point_at(&format!("http://127.0.0.1:{}", proxy.port));
    let (code, err, _) = update(&b, &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("retry 1 of"), "{err}");
    assert_eq!(b.current_version(), Some(V2));
    let asked = proxy.requests.lock().unwrap().clone();
    let checks = asked
        .iter()
        .filter(|r| r.starts_with("GET /version "))
        .count();
    assert_eq!(checks, 2, "{asked:?}");
}
