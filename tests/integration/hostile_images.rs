//! Hostile and broken images: each is refused with `current` untouched, no reboot, and nothing
//! written outside the release area.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::util::*;

const V1: u64 = 1_700_000_001;
const V2: u64 = 1_700_000_002;
const V3: u64 = 1_700_000_003;

enum Kind {
    File(Vec<u8>, u32),
    Dir,
    Symlink(&'static str),
    HardLink(String),
    CharDev,
    Fifo,
}

/// One ustar header + data, written by hand so that any name or type can be expressed.
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: &Kind) {
    let mut h = [0u8; 512];
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}\0", width = len - 1);
        h[at..at + len].copy_from_slice(s.as_bytes());
    };
    assert!(name.len() < 100, "keep raw names short");
    h[..name.len()].copy_from_slice(name.as_bytes());
    let (mode, size, flag, link) = match kind {
        Kind::File(data, mode) => (*mode, data.len() as u64, b'0', ""),
        Kind::Dir => (0o755, 0, b'5', ""),
        Kind::Symlink(t) => (0o777, 0, b'2', *t),
        Kind::HardLink(t) => (0o644, 0, b'1', t.as_str()),
        Kind::CharDev => (0o644, 0, b'3', ""),
        Kind::Fifo => (0o644, 0, b'6', ""),
    };
    octal(&mut h, 100, 8, mode as u64);
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, V1);
    h[156] = flag;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u64 = h.iter().map(|&b| b as u64).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    if let Kind::File(data, _) = kind {
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A well-formed image's entries for `version`, as (path, kind), to be spoiled by each case.
fn good_entries(version: u64) -> Vec<(String, Kind)> {
    let top = format!("opq-box-update-{version}");
    let payload = b"service payload\n".to_vec();
    let script = b"#!/bin/sh\necho hostile test install\n".to_vec();
    let vfile = format!("{version}\n").into_bytes();
    let sums = format!(
        "{}  VERSION\n{}  install_update.sh\n{}  svc/app.txt\n",
        sha(&vfile),
        sha(&script),
        sha(&payload)
    );
    vec![
        (format!("{top}/"), Kind::Dir),
        (
            format!("{top}/SHA256SUMS"),
            Kind::File(sums.into_bytes(), 0o644),
        ),
        (format!("{top}/VERSION"), Kind::File(vfile, 0o644)),
        (
            format!("{top}/install_update.sh"),
            Kind::File(script, 0o755),
        ),
        (format!("{top}/svc/"), Kind::Dir),
        (format!("{top}/svc/app.txt"), Kind::File(payload, 0o644)),
    ]
}

fn tar_bz2(entries: &[(String, Kind)]) -> Vec<u8> {
    let mut tar = Vec::new();
    for (name, kind) in entries {
        raw_entry(&mut tar, name, kind);
    }
    tar.extend_from_slice(&[0u8; 1024]);
    let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
    enc.write_all(&tar).unwrap();
    enc.finish().unwrap()
}

struct Case {
    name: &'static str,
    /// Image bytes published as version V2, with a matching sidecar unless `sidecar` says else.
    image: Vec<u8>,
    sidecar: Option<String>,
    expect: &'static str,
}

fn publish_raw(updates: &Path, version: u64, image: &[u8], sidecar: Option<String>) {
    let name = format!("opq-box-update-{version}.tar.bz2");
    let side = sidecar.unwrap_or_else(|| format!("{}  {name}\n", sha(image)));
    std::fs::write(updates.join(format!(".{name}.sha256.tmp")), side).unwrap();
    std::fs::rename(
        updates.join(format!(".{name}.sha256.tmp")),
        updates.join(format!("{name}.sha256")),
    )
    .unwrap();
    std::fs::write(updates.join(format!(".{name}.tmp")), image).unwrap();
    std::fs::rename(updates.join(format!(".{name}.tmp")), updates.join(&name)).unwrap();
}

/// Everything under the box root but the updater's own state and log.
fn box_files(root: &Path) -> Vec<String> {
    tree(root)
        .into_iter()
        .filter(|p| !p.starts_with("var"))
        .collect()
}

fn refuse_all(cases: Vec<Case>, key_args: &[&str], d: &Dir, canaries: &[PathBuf]) {
    let updates = d.mkdir("updates");
    let server = start_update_server(&updates);
    sample_payload(d, "v1");
    let staging = d.mkdir("staging-v1");
    let extra: Vec<&str> = if key_args.is_empty() {
        vec![]
    } else {
        vec!["--sign-key", "k.key"]
    };
    build_image(d, &staging, V1, &["payload/box-config-daemon"], &extra);
    publish_dir(&staging, &updates);
    wait_listed(server.port, V1);
    let b = BoxUnderTest::new(d, "box", &server.url(""));
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(key_args);
        b.run(&all)
    };
    assert!(run(&["update"]).status.success());
    assert!(run(&["confirm"]).status.success());
    std::fs::remove_file(updates.join(format!("opq-box-update-{V1}.tar.bz2"))).unwrap();
    let before = box_files(&b.root);
    for case in cases {
        for ext in ["", ".sha256", ".minisig"] {
            let _ = std::fs::remove_file(updates.join(format!("opq-box-update-{V2}.tar.bz2{ext}")));
        }
        // The previous case's image must be gone from the index first: else `wait_listed` may
        // see it and the box ask for it just as the watcher drops it (a 404, not the refusal).
        let deadline = Instant::now() + Duration::from_secs(5);
        while http_get(server.port, "/version").2.trim() == V2.to_string() {
            assert!(Instant::now() < deadline, "the server never dropped {V2}");
            std::thread::sleep(Duration::from_millis(20));
        }
        publish_raw(&updates, V2, &case.image, case.sidecar);
        wait_listed(server.port, V2);
        let o = run(&["update"]);
        let err = stderr(&o);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{}: must be refused: {}{}",
            case.name,
            stdout(&o),
            err
        );
        assert!(
            err.contains(case.expect),
            "{}: reason should mention {:?}: {err}",
            case.name,
            case.expect
        );
        assert_eq!(
            b.current_version(),
            Some(V1),
            "{}: current moved",
            case.name
        );
        assert_eq!(b.reboot_count(), 1, "{}: rebooted", case.name);
        assert_eq!(
            box_files(&b.root),
            before,
            "{}: files changed outside the updater's state",
            case.name
        );
        for c in canaries {
            assert!(!c.exists(), "{}: wrote {}", case.name, c.display());
        }
        assert!(
            tree(&b.root.join("var/lib/box-updater/downloads")).is_empty(),
            "{}: download kept",
            case.name
        );
        let st = b.status();
        assert_eq!(st["state"], "failed", "{}", case.name);
        assert_eq!(st["version"], V1);
        b.assert_current_complete();
    }
}

fn spoil(f: impl FnOnce(&mut Vec<(String, Kind)>)) -> Vec<u8> {
    let mut e = good_entries(V2);
    f(&mut e);
    tar_bz2(&e)
}

#[test]
fn hostile_archives_are_refused() {
    let d = Dir::new();
    let top = format!("opq-box-update-{V2}");
    let abs_canary = d.join("pwned-absolute");
    let rel_canary = d.join("box/pwned-dotdot");
    let good = tar_bz2(&good_entries(V2));
    let cases = vec![
        Case {
            name: "absolute path",
            image: spoil(|e| {
                e.push((
                    abs_canary.to_str().unwrap().to_string(),
                    Kind::File(b"x".to_vec(), 0o644),
                ))
            }),
            sidecar: None,
            expect: "absolute path",
        },
        Case {
            name: "dot-dot",
            image: spoil(|e| {
                e.push((
                    format!("{top}/../../../../pwned-dotdot"),
                    Kind::File(b"x".to_vec(), 0o644),
                ))
            }),
            sidecar: None,
            expect: "'..'",
        },
        Case {
            name: "symlink pointing out, then a file through it",
            image: spoil(|e| {
                e.push((format!("{top}/out"), Kind::Symlink("../../../../..")));
                e.push((
                    format!("{top}/out/pwned-link"),
                    Kind::File(b"x".to_vec(), 0o644),
                ));
            }),
            sidecar: None,
            expect: "outside the release",
        },
        Case {
            name: "absolute symlink",
            image: spoil(|e| e.push((format!("{top}/etc"), Kind::Symlink("/etc")))),
            sidecar: None,
            expect: "outside the release",
        },
        Case {
            name: "file through an inner symlink",
            image: spoil(|e| {
                e.push((format!("{top}/inner"), Kind::Symlink("svc")));
                e.push((
                    format!("{top}/inner/app2.txt"),
                    Kind::File(b"x".to_vec(), 0o644),
                ));
            }),
            sidecar: None,
            expect: "through the symlink",
        },
        Case {
            name: "hard link",
            image: spoil(|e| {
                e.push((
                    format!("{top}/hard"),
                    Kind::HardLink(format!("{top}/VERSION")),
                ))
            }),
            sidecar: None,
            expect: "hard link",
        },
        Case {
            name: "device file",
            image: spoil(|e| e.push((format!("{top}/dev"), Kind::CharDev))),
            sidecar: None,
            expect: "device file",
        },
        Case {
            name: "FIFO",
            image: spoil(|e| e.push((format!("{top}/fifo"), Kind::Fifo))),
            sidecar: None,
            expect: "FIFO",
        },
        Case {
            name: "entry outside the top directory",
            image: spoil(|e| e.push(("other-dir/file".into(), Kind::File(b"x".to_vec(), 0o644)))),
            sidecar: None,
            expect: "outside its top directory",
        },
        Case {
            name: "VERSION differs from the name",
            image: {
                let mut e = good_entries(V3);
                for (name, _) in e.iter_mut() {
                    *name = name.replace(&V3.to_string(), &V2.to_string());
                }
                tar_bz2(&e)
            },
            sidecar: None,
            expect: "VERSION says",
        },
        Case {
            name: "no install_update.sh",
            image: spoil(|e| e.retain(|(n, _)| !n.ends_with("install_update.sh"))),
            sidecar: None,
            expect: "install_update.sh",
        },
        Case {
            name: "SHA256SUMS mismatch",
            image: spoil(|e| {
                for (n, k) in e.iter_mut() {
                    if n.ends_with("app.txt") {
                        *k = Kind::File(b"tampered\n".to_vec(), 0o644);
                    }
                }
            }),
            sidecar: None,
            expect: "does not match SHA256SUMS",
        },
        Case {
            name: "unlisted extra file",
            image: spoil(|e| {
                e.push((
                    format!("{top}/svc/zz-extra"),
                    Kind::File(b"x".to_vec(), 0o644),
                ))
            }),
            sidecar: None,
            expect: "not listed in SHA256SUMS",
        },
        Case {
            name: "truncated bzip2",
            image: good[..good.len() / 2].to_vec(),
            sidecar: None,
            expect: "damaged",
        },
        Case {
            name: "an HTML page instead of an image",
            image: b"<!doctype html><html><body>Welcome to the hotel Wi-Fi</body></html>\n"
                .to_vec(),
            sidecar: None,
            expect: "not a bzip2 image",
        },
        Case {
            name: "sidecar of another image",
            image: good.clone(),
            sidecar: Some(format!("{}  opq-box-update-{V3}.tar.bz2\n", sha(&good))),
            expect: "sidecar is for",
        },
        Case {
            name: "sidecar hash mismatch",
            image: good.clone(),
            sidecar: Some(format!("{}  opq-box-update-{V2}.tar.bz2\n", sha(b"other"))),
            expect: "does not match its .sha256",
        },
    ];
    refuse_all(
        cases,
        &[],
        &d,
        &[abs_canary, rel_canary, d.join("pwned-link")],
    );
}

#[test]
fn unsigned_wrongly_signed_and_moved_signatures_are_refused() {
    let d = Dir::new();
    keygen(&d, "k");
    keygen(&d, "other");
    let pubkey = d.join("k.pub");
    let key_args = ["--public-key", pubkey.to_str().unwrap()];

    // Unsigned, wrongly signed, and signed-V3-bytes-renamed-to-V2: built now, published by the
    // case loop through their bytes, with the signatures placed beside them by a hook below.
    sample_payload(&d, "v2");
    let s_unsigned = d.mkdir("s-unsigned");
    let unsigned = build_image(&d, &s_unsigned, V2, &["payload/box-config-daemon"], &[]);
    let s_wrong = d.mkdir("s-wrong");
    let wrong = build_image(
        &d,
        &s_wrong,
        V2,
        &["payload/box-config-daemon"],
        &["--sign-key", "other.key"],
    );
    let s_moved = d.mkdir("s-moved");
    let moved = build_image(
        &d,
        &s_moved,
        V3,
        &["payload/box-config-daemon"],
        &["--sign-key", "k.key"],
    );

    // The signature files travel with the image: publish_raw only writes image and sidecar, so
    // each case's .minisig is dropped in through a file the case loop can't see; instead, run
    // the three cases by hand here with the same checks.
    let updates = d.mkdir("updates");
    let server = start_update_server(&updates);
    sample_payload(&d, "v1");
    let s1 = d.mkdir("s1");
    build_image(
        &d,
        &s1,
        V1,
        &["payload/box-config-daemon"],
        &["--sign-key", "k.key"],
    );
    publish_dir(&s1, &updates);
    wait_listed(server.port, V1);
    let b = BoxUnderTest::new(&d, "box", &server.url(""));
    let with_key = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&key_args);
        b.run(&all)
    };
    assert!(
        with_key(&["update"]).status.success(),
        "a properly signed image installs"
    );
    assert!(with_key(&["confirm"]).status.success());
    std::fs::remove_file(updates.join(format!("opq-box-update-{V1}.tar.bz2"))).unwrap();
    let before = box_files(&b.root);

    let cases: Vec<(&str, PathBuf, Option<PathBuf>, &str)> = vec![
        ("unsigned", unsigned.clone(), None, "not signed"),
        (
            "wrongly signed",
            wrong.clone(),
            Some(PathBuf::from(format!("{}.minisig", wrong.display()))),
            "does not verify",
        ),
        (
            "signature moved from another image",
            moved.clone(),
            Some(PathBuf::from(format!("{}.minisig", moved.display()))),
            "another image",
        ),
    ];
    for (name, image, sig, expect) in cases {
        for ext in ["", ".sha256", ".minisig"] {
            let _ = std::fs::remove_file(updates.join(format!("opq-box-update-{V2}.tar.bz2{ext}")));
        }
        if let Some(sig) = sig {
            std::fs::copy(
                sig,
                updates.join(format!("opq-box-update-{V2}.tar.bz2.minisig")),
            )
            .unwrap();
        }
        publish_raw(&updates, V2, &std::fs::read(&image).unwrap(), None);
        wait_listed(server.port, V2);
        let o = with_key(&["update"]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: must be refused: {err}");
        assert!(
            err.contains(expect),
            "{name}: reason should mention {expect:?}: {err}"
        );
        assert_eq!(b.current_version(), Some(V1), "{name}");
        assert_eq!(b.reboot_count(), 1, "{name}");
        assert_eq!(box_files(&b.root), before, "{name}");
    }
}
