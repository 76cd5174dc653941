//! `build-update`: the image as GNU tar, sha256sum and minisign see it; reproducibility; bad input.

use std::os::unix::fs::PermissionsExt;

use crate::util::*;

const V: u64 = 1_700_000_000;

#[test]
fn image_extracts_with_gnu_tar_and_its_sums_pass() {
    let d = Dir::new();
    sample_payload(&d, "one");
    d.write("payload/notes.txt", "a lone file payload\n");
    let out = d.mkdir("out");
    let o = run(cmd(BUILD_UPDATE)
        .current_dir(d.path())
        .args(["--out", "out", "--version", &V.to_string()])
        .args(["payload/box-config-daemon", "payload/notes.txt"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let image = out.join(format!("opq-box-update-{V}.tar.bz2"));
    assert_eq!(
        d.join(stdout(&o).lines().last().unwrap()),
        image,
        "image path alone on the last line"
    );

    let listing = sh(&out, &format!("tar tjvf opq-box-update-{V}.tar.bz2"));
    for want in [
        "root/root",
        &format!("opq-box-update-{V}/VERSION"),
        &format!("opq-box-update-{V}/SHA256SUMS"),
        &format!("opq-box-update-{V}/install_update.sh"),
        &format!("opq-box-update-{V}/box-config-daemon/run.sh"),
        &format!("opq-box-update-{V}/notes.txt"),
    ] {
        assert!(listing.contains(want), "{want} missing from:\n{listing}");
    }
    assert!(
        listing.lines().all(|l| l.contains("root/root")),
        "every entry owned by root:\n{listing}"
    );
    assert!(listing.contains("-rwxr-xr-x root/root") && listing.contains("-rw-r--r-- root/root"));

    sh(
        &out,
        &format!("sha256sum -c opq-box-update-{V}.tar.bz2.sha256"),
    );
    sh(
        &out,
        &format!("mkdir x && tar xjf opq-box-update-{V}.tar.bz2 -C x"),
    );
    let top = out.join(format!("x/opq-box-update-{V}"));
    let checked = sh(&top, "sha256sum -c SHA256SUMS");
    assert!(
        checked.contains("box-config-daemon/run.sh: OK") && checked.contains("VERSION: OK"),
        "{checked}"
    );
    assert_eq!(
        std::fs::read_to_string(top.join("VERSION")).unwrap(),
        format!("{V}\n")
    );
    let mode = std::fs::metadata(top.join("install_update.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);
    // Only the image and its sidecar were published: no temp files.
    assert_eq!(
        tree(&out).iter().filter(|p| !p.starts_with('x')).count(),
        2,
        "{:?}",
        tree(&out)
    );
}

#[test]
fn signature_verifies_with_debian_minisign_and_binds_the_name() {
    let d = Dir::new();
    sample_payload(&d, "signed");
    keygen(&d, "k");
    assert_eq!(
        std::fs::metadata(d.join("k.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let out = d.mkdir("out");
    let image = build_image(
        &d,
        &out,
        V,
        &["payload/box-config-daemon"],
        &["--sign-key", "k.key"],
    );
    let pubkey = d.join("k.pub");
    let verified = sh(
        &out,
        &format!("minisign -V -p {} -m {}", pubkey.display(), image.display()),
    );
    assert!(
        verified.contains(&format!("file:opq-box-update-{V}.tar.bz2 version:{V}")),
        "{verified}"
    );

    let mut bytes = std::fs::read(&image).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&image, &bytes).unwrap();
    assert!(
        !sh_ok(
            &out,
            &format!("minisign -V -p {} -m {}", pubkey.display(), image.display())
        ),
        "a flipped byte must fail"
    );
}

#[test]
fn same_inputs_and_version_give_identical_bytes() {
    let d = Dir::new();
    let payload = sample_payload(&d, "repro");
    let a = build_image(&d, &d.mkdir("a"), V, &["payload/box-config-daemon"], &[]);
    // Touching files and changing the umask-visible modes must not change the image.
    sh(
        &payload,
        "touch -d '2001-01-01' config.json && chmod 600 config.json && chmod 700 run.sh",
    );
    let b = build_image(&d, &d.mkdir("b"), V, &["payload/box-config-daemon"], &[]);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    // The build's threads don't change the bytes either.
    let o = run(cmd(BUILD_UPDATE).current_dir(d.path()).args([
        "--out",
        "c",
        "--threads",
        "1",
        "--version",
        &V.to_string(),
        "payload/box-config-daemon",
    ]));
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(d.join(format!("c/opq-box-update-{V}.tar.bz2"))).unwrap()
    );
    // SOURCE_DATE_EPOCH sets the entries' mtime.
    let o = run(cmd(BUILD_UPDATE)
        .current_dir(d.path())
        .env("SOURCE_DATE_EPOCH", "1000000000")
        .args([
            "--out",
            "e",
            "--version",
            &V.to_string(),
            "payload/box-config-daemon",
        ]));
    assert!(o.status.success());
    let listing = sh(&d.join("e"), "tar tvjf *.tar.bz2 --full-time");
    assert!(listing.contains("2001-09-09"), "{listing}");
}

#[test]
fn large_payload_is_many_bzip2_streams_that_stock_tools_read() {
    let d = Dir::new();
    // About 4 MiB of mixed text and noise: several independent streams.
    let mut data = Vec::with_capacity(4 << 20);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    while data.len() < 4 << 20 {
        x ^= x << 7;
        x ^= x >> 9;
        if x.is_multiple_of(3) {
            data.extend_from_slice(
                format!("line {} of the power quality log\n", x % 1000).as_bytes(),
            );
        } else {
            data.extend_from_slice(&x.to_le_bytes());
        }
    }
    d.write("payload/blob/data.bin", &data);
    let out = d.mkdir("out");
    let image = build_image(&d, &out, V, &["payload/blob"], &[]);
    let bytes = std::fs::read(&image).unwrap();
    let streams = bytes
        .windows(10)
        .filter(|w| w.starts_with(b"BZh9") && w[4..] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59])
        .count();
    assert!(
        streams >= 4,
        "expected several bzip2 streams, found {streams}"
    );
    sh(&out, "bunzip2 -t *.tar.bz2");
    sh(&out, "mkdir x && tar xjf *.tar.bz2 -C x");
    assert_eq!(
        std::fs::read(out.join(format!("x/opq-box-update-{V}/blob/data.bin"))).unwrap(),
        data
    );
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut bzip2::read::MultiBzDecoder::new(&bytes[..]), &mut back)
        .unwrap();
    assert!(back.len() > data.len());
}

#[test]
fn symlinks_inside_the_payload_are_kept() {
    let d = Dir::new();
    sample_payload(&d, "links");
    std::os::unix::fs::symlink(
        "config.json",
        d.join("payload/box-config-daemon/current.json"),
    )
    .unwrap();
    d.mkdir("payload/box-config-daemon/sub");
    std::os::unix::fs::symlink("../run.sh", d.join("payload/box-config-daemon/sub/run")).unwrap();
    let out = d.mkdir("out");
    build_image(&d, &out, V, &["payload/box-config-daemon"], &[]);
    let listing = sh(&out, "tar tvjf *.tar.bz2");
    assert!(
        listing.contains("current.json -> config.json") && listing.contains("sub/run -> ../run.sh"),
        "{listing}"
    );
}

/// Runs build-update expecting failure; returns stderr after checking `out` is as it was.
fn refused(d: &Dir, args: &[&str]) -> String {
    let out = d.join("out");
    let before = tree(&out);
    let o = run(cmd(BUILD_UPDATE).current_dir(d.path()).args(args));
    let err = stderr(&o);
    assert!(!o.status.success(), "{args:?} must fail");
    assert_eq!(tree(&out), before, "{args:?} changed --out");
    assert!(
        err.starts_with("build-update: error:") || err.starts_with("error:"),
        "{args:?}: {err}"
    );
    err
}

#[test]
fn bad_input_is_refused_and_leaves_out_unchanged() {
    let d = Dir::new();
    sample_payload(&d, "bad");
    d.mkdir("out");
    d.write("VERSION", "1\n");
    d.write("install_update.sh", "#!/bin/sh\n");
    d.write("SHA256SUMS", "");
    d.write("bad.key", "untrusted comment: nope\nnot-a-key\n");
    d.write("notadir", "x");
    d.mkdir("escape");
    std::os::unix::fs::symlink("/etc/passwd", d.join("escape/passwd")).unwrap();
    d.mkdir("escape2/sub");
    std::os::unix::fs::symlink("../../payload", d.join("escape2/sub/up")).unwrap();
    d.mkdir("special");
    sh(d.path(), "mkfifo special/fifo");
    let v = V.to_string();
    let p = "payload/box-config-daemon";
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--out", "out", "--version", &v, "missing-dir"],
            "missing-dir",
        ),
        (vec!["--out", "out", "--version", &v, "VERSION"], "VERSION"),
        (
            vec!["--out", "out", "--version", &v, "install_update.sh"],
            "install_update.sh",
        ),
        (
            vec!["--out", "out", "--version", &v, "SHA256SUMS"],
            "SHA256SUMS",
        ),
        (vec!["--out", "out", "--version", "soon", p], "soon"),
        (vec!["--out", "out", "--version", "0", p], "zero"),
        (vec!["--out", "out", "--version=-5", p], "-5"),
        (
            vec!["--out", "out", "--version", &v, "--sign-key", "bad.key", p],
            "bad.key",
        ),
        (
            vec!["--out", "out", "--version", &v, "--sign-key", "nokey", p],
            "nokey",
        ),
        (
            vec![
                "--out",
                "out",
                "--version",
                &v,
                "--install-script",
                "noscript",
                p,
            ],
            "noscript",
        ),
        (vec!["--out", "notadir/out", "--version", &v, p], "notadir"),
        (
            vec!["--out", "out", "--version", &v, "escape"],
            "/etc/passwd",
        ),
        (vec!["--out", "out", "--version", &v, "escape2"], "outside"),
        (vec!["--out", "out", "--version", &v, "special"], "FIFO"),
        (
            vec![
                "--out",
                "out",
                "--version",
                &v,
                p,
                "payload/box-config-daemon/",
            ],
            "unique",
        ),
    ];
    for (args, mention) in cases {
        let err = refused(&d, &args);
        assert!(
            err.contains(mention),
            "{args:?}: error should mention {mention:?}: {err}"
        );
        assert!(
            err.trim_end().lines().count() <= 3,
            "{args:?}: keep errors short: {err}"
        );
    }
    assert!(tree(&d.join("out")).is_empty());
}

#[test]
fn an_existing_image_is_never_overwritten() {
    let d = Dir::new();
    sample_payload(&d, "first");
    let out = d.mkdir("out");
    let image = build_image(&d, &out, V, &["payload/box-config-daemon"], &[]);
    let first = std::fs::read(&image).unwrap();
    sample_payload(&d, "second");
    let err = refused(
        &d,
        &[
            "--out",
            "out",
            "--version",
            &V.to_string(),
            "payload/box-config-daemon",
        ],
    );
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&image).unwrap(), first);
}

#[test]
fn default_install_script_is_shellcheck_clean_and_migrates_a_sandbox() {
    let d = Dir::new();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/build-update/install_update.sh"
    );
    if sh_ok(d.path(), "command -v shellcheck") {
        sh(d.path(), &format!("shellcheck -s sh {script}"));
    } else {
        panic!("shellcheck is not installed: scripts/test.sh installs it");
    }
    sample_payload(&d, "migrate");
    let out = d.mkdir("out");
    build_image(&d, &out, V, &["payload/box-config-daemon"], &[]);
    sh(&out, "tar xjf *.tar.bz2");
    let root = d.mkdir("root");
    // As the old shell updater ran it: from the unpacked directory, no BOX_UPDATE_* variables.
    sh(
        &out.join(format!("opq-box-update-{V}")),
        &format!("BOX_ROOT={} ./install_update.sh", root.display()),
    );
    let current = std::fs::read_link(root.join("opt/opq/current")).unwrap();
    assert_eq!(
        current.to_str().unwrap(),
        format!("releases/opq-box-update-{V}")
    );
    sh(&root.join("opt/opq/current"), "sha256sum -c SHA256SUMS");
    assert!(
        root.join("etc/systemd/system/box-config-daemon.service")
            .is_file()
    );
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/box-config-daemon.service")
            .is_symlink()
    );
    // Nothing outside the sandbox root was touched: the only top-level entries are etc and opt.
    let top: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(top.len(), 2, "{top:?}");
}

#[test]
fn migrating_a_box_with_box_updater_installs_the_guard_and_defuses_the_old_button() {
    let d = Dir::new();
    sample_payload(&d, "migrate");
    let bu = d.mkdir("payload/box-updater");
    let updater = d.write(
        "payload/box-updater/box-updater",
        "#!/bin/sh\necho updater\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&updater, std::fs::Permissions::from_mode(0o755)).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("box-updater");
    for unit in ["box-updater.service", "box-updater-guard.service"] {
        std::fs::copy(repo.join(unit), bu.join(unit)).unwrap();
    }
    let out = d.mkdir("out");
    build_image(
        &d,
        &out,
        V,
        &["payload/box-config-daemon", "payload/box-updater"],
        &[],
    );
    sh(&out, "tar xjf *.tar.bz2");
    let root = d.mkdir("root");
    // The original page's updater, as on a box that never had box-updater.
    let old = d.write(
        "root/usr/local/box-config-daemon/updater/updater.sh",
        "#!/bin/bash\nwget \"$1/latest\"; tar xf *; sudo ./install_update.sh; sudo reboot\n",
    );
    let release = out.join(format!("opq-box-update-{V}"));
    let migrate = format!("BOX_ROOT={} ./install_update.sh", root.display());
    let log = sh(&release, &migrate);
    assert!(log.contains("installed the guard"), "{log}");
    let guard = root.join("var/lib/box-updater/guard/box-updater");
    assert_eq!(
        std::fs::read(&guard).unwrap(),
        std::fs::read(&updater).unwrap()
    );
    let units = root.join("etc/systemd/system");
    assert!(units.join("box-updater-guard.service").is_file());
    assert!(
        units
            .join("multi-user.target.wants/box-updater-guard.service")
            .is_symlink()
    );
    assert!(
        units
            .join("multi-user.target.wants/box-updater.service")
            .is_symlink()
    );
    let shim = std::fs::read_to_string(&old).unwrap();
    assert!(
        shim.contains("asks box-updater") && !shim.contains("sudo"),
        "{shim}"
    );
    if sh_ok(d.path(), "command -v shellcheck") {
        sh(d.path(), &format!("shellcheck -s sh {}", old.display()));
    }
    // Run again, as box-updater runs a release's script: the guard is not the release's to touch.
    std::fs::write(&guard, "the confirmed one").unwrap();
    std::fs::remove_file(units.join("box-updater-guard.service")).unwrap();
    sh(
        &release,
        &format!(
            "BOX_ROOT={} BOX_UPDATE_VERSION={V} BOX_UPDATE_RELEASE_DIR=$PWD ./install_update.sh",
            root.display()
        ),
    );
    assert_eq!(
        std::fs::read_to_string(&guard).unwrap(),
        "the confirmed one"
    );
    assert!(!units.join("box-updater-guard.service").exists());
    assert_eq!(
        std::fs::read_to_string(&old).unwrap(),
        shim,
        "the shim stays"
    );
}
