//! Fault injection in the engine: the update is killed (SIGKILL, as a power cut would stop it) at
//! every named fault point and at random byte offsets of the download and the unpack; after each
//! kill `current` points at a complete release, and the next run finishes the job. Also a disk
//! that fills up (a small tmpfs as the box's root, when the suite runs as root).
#![cfg(feature = "fault-injection")]

use std::time::{Duration, Instant};

use crate::util::*;

const V1: u64 = 1_700_000_001;
const V2: u64 = 1_700_000_002;

struct Setup {
    dir: Dir,
    server: Running,
    image_size: u64,
}

/// A server offering V2 (about 1.5 MiB of payload) and a fresh box built by `new_box`.
fn setup() -> Setup {
    let dir = Dir::new();
    let mut text = String::new();
    let mut x = 11u64;
    while text.len() < 3 << 19 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        text.push_str(&format!("{:x} {}\n", x, x % 977));
    }
    dir.write("payload/box-config-daemon/data.txt", &text);
    sample_payload(&dir, "faults");
    let first = dir.mkdir("v1");
    build_image(&dir, &first, V1, &["payload/box-config-daemon"], &[]);
    let updates = dir.mkdir("updates");
    let staging = dir.mkdir("staging");
    let image = build_image(&dir, &staging, V2, &["payload/box-config-daemon"], &[]);
    let image_size = std::fs::metadata(&image).unwrap().len();
    publish_dir(&staging, &updates);
    // V1 is installed straight from its own directory through a second server.
    let server = start_update_server(&updates);
    Setup {
        dir,
        server,
        image_size,
    }
}

fn new_box(s: &Setup, name: &str) -> BoxUnderTest {
    let v1 = start_update_server(&s.dir.join("v1"));
    let b = BoxUnderTest::new(&s.dir, name, &v1.url(""));
    assert!(b.run(&["update"]).status.success());
    assert!(b.run(&["confirm"]).status.success());
    b.point_at(&s.server.url(""));
    b
}

/// Kills the update at `fault`; checks the box; runs it again; checks it finished.
fn kill_then_finish(s: &Setup, b: &BoxUnderTest, fault: &str) {
    let o = run(b.cmd(&["update"]).env("OPQ_FAULT", fault));
    assert!(
        o.status.code().is_none(),
        "{fault}: the update should have been killed: {}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("fault injected"),
        "{fault}: never reached: {}",
        stderr(&o)
    );
    b.assert_current_complete();
    let v = b.current_version();
    assert!(v == Some(V1) || v == Some(V2), "{fault}: current is {v:?}");
    let st = b.status();
    assert_ne!(
        st["running"], true,
        "{fault}: a dead update is not reported running"
    );

    let o = b.run(&["update"]);
    assert!(
        o.status.success(),
        "{fault}: the next run failed: {}",
        stderr(&o)
    );
    if v == Some(V2) {
        // Killed after the switch: the new release is current and waits for its confirmation.
        assert_eq!(b.status()["pending"]["new"], V2, "{fault}");
    }
    assert!(b.run(&["confirm"]).status.success(), "{fault}");
    assert_eq!(b.current_version(), Some(V2), "{fault}");
    b.assert_current_complete();
    assert!(
        !b.releases().iter().any(|r| r.ends_with(".partial")),
        "{fault}: {:?}",
        b.releases()
    );
    let downloads = tree(&b.root.join("var/lib/box-updater/downloads"));
    assert!(
        downloads.is_empty(),
        "{fault}: downloads left: {downloads:?}"
    );
    let _ = s;
}

#[test]
fn a_kill_at_every_fault_point_leaves_a_working_box() {
    let s = setup();
    let half = s.image_size / 2;
    let points = [
        "before:checking".to_string(),
        "before:downloading".into(),
        format!("download@{half}"),
        "before:verifying".into(),
        "before:unpacking".into(),
        "unpack@1".into(),
        format!("unpack@{}", 1 << 20),
        "unpack:before-rename".into(),
        "before:installing".into(),
        "install:after-script".into(),
        "before:switching".into(),
        "switch:before-rename".into(),
        "switch:after-rename".into(),
        "before:rebooting".into(),
    ];
    for (i, p) in points.iter().enumerate() {
        let b = new_box(&s, &format!("box{i}"));
        kill_then_finish(&s, &b, p);
    }
}

#[test]
fn kills_at_random_byte_offsets_of_download_and_unpack() {
    let s = setup();
    let mut seed = 0x9E3779B97F4A7C15u64;
    for i in 0..12 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let fault = if i % 2 == 0 {
            format!("download@{}", 1 + seed % (s.image_size - 1))
        } else {
            format!("unpack@{}", 1 + seed % (3 << 19))
        };
        let b = new_box(&s, &format!("rbox{i}"));
        kill_then_finish(&s, &b, &fault);
    }
}

/// A small tmpfs mounted at `path`, unmounted on drop. Needs root.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn a_disk_filling_up_during_download_fails_cleanly() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs as the box's root needs root (CI runs as root)");
        return;
    }
    let s = setup();
    // Room for the box's first release and the image check, not for what a filler takes.
    let b = BoxUnderTest::new(&s.dir, "full", &s.server.url(""));
    let b = BoxUnderTest {
        reserve_mib: Some(1),
        ..b
    };
    let Some(_fs) = Tmpfs::mount(&b.root, "24m") else {
        panic!("mounting a tmpfs failed although running as root");
    };
    let v1 = start_update_server(&s.dir.join("v1"));
    b.point_at(&v1.url(""));
    assert!(b.run(&["update"]).status.success());
    assert!(b.run(&["confirm"]).status.success());
    b.point_at(&s.server.url(""));
    // The download is killed halfway (a .part is left), the disk fills up, and the next run
    // can't write the rest.
    let o = run(b
        .cmd(&["update"])
        .env("OPQ_FAULT", format!("download@{}", s.image_size / 2)));
    assert!(o.status.code().is_none());
    let filler = b.root.join("filler");
    let _ = std::process::Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", filler.display()),
            "bs=64k",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let o = b.run(&["update", "--retries", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("No space left") || err.contains("not enough free space"),
        "{err}"
    );
    assert_eq!(b.current_version(), Some(V1));
    b.assert_current_complete();
    assert!(
        tree(&b.root.join("var/lib/box-updater/downloads")).is_empty(),
        "partial files cleaned up"
    );
    std::fs::remove_file(&filler).unwrap();
    let o = b.run(&["update"]);
    assert!(
        o.status.success(),
        "with room again the update goes through: {}",
        stderr(&o)
    );
    assert_eq!(b.current_version(), Some(V2));
}

#[test]
fn an_image_that_expands_past_the_free_space_is_refused_while_unpacking() {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs as the box's root needs root (CI runs as root)");
        return;
    }
    let d = Dir::new();
    // 40 MiB of zeros compress to almost nothing: the download fits, the expansion does not.
    d.write("payload/zeros/zeros.bin", vec![0u8; 40 << 20]);
    let updates = d.mkdir("updates");
    let staging = d.mkdir("staging");
    build_image(&d, &staging, V2, &["payload/zeros"], &[]);
    publish_dir(&staging, &updates);
    let server = start_update_server(&updates);
    let b = BoxUnderTest::new(&d, "full", &server.url(""));
    let b = BoxUnderTest {
        reserve_mib: Some(1),
        ..b
    };
    let Some(_fs) = Tmpfs::mount(&b.root, "32m") else {
        panic!("mounting a tmpfs failed although running as root");
    };
    let t = Instant::now();
    let o = b.run(&["update"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("expands past"), "{}", stderr(&o));
    assert!(t.elapsed() < Duration::from_secs(30));
    assert_eq!(b.current_version(), None);
    assert!(
        b.releases().is_empty(),
        "partial release cleaned up: {:?}",
        b.releases()
    );
    assert!(tree(&b.root.join("var/lib/box-updater/downloads")).is_empty());
}
