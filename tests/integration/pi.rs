//! The ARM box-updater (built for Raspberry Pi OS, aarch64) under qemu-user-static, updating a
//! sandboxed box from the native update-server: the end-to-end update as it runs on a Pi.

use std::path::PathBuf;

use crate::util::*;

const V1: u64 = 1_700_000_001;
const V2: u64 = 1_700_000_002;

fn arm_runner() -> Vec<String> {
    let bin = std::env::var("OPQ_PI_BOX_UPDATER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/aarch64-unknown-linux-gnu/debug/box-updater")
        });
    let qemu = PathBuf::from("/usr/bin/qemu-aarch64-static");
    assert!(
        bin.is_file() && qemu.is_file(),
        "the ARM box-updater ({}) or qemu-user-static is missing: run scripts/test.sh, which builds \
         it with scripts/build-pi.sh --debug --bin box-updater aarch64",
        bin.display()
    );
    vec![
        qemu.display().to_string(),
        "-L".into(),
        "/usr/aarch64-linux-gnu".into(),
        bin.display().to_string(),
    ]
}

#[test]
fn the_arm_box_updater_updates_a_box_under_qemu() {
    let runner = arm_runner();
    let d = Dir::new();
    keygen(&d, "k");
    let updates = d.mkdir("updates");
    sample_payload(&d, "pi-1");
    let staging = d.mkdir("staging1");
    build_image(
        &d,
        &staging,
        V1,
        &["payload/box-config-daemon"],
        &["--sign-key", "k.key"],
    );
    publish_dir(&staging, &updates);
    let server = start_update_server(&updates);
    let mut b = BoxUnderTest::new(&d, "pibox", &server.url(""));
    b.runner = Some(runner);
    let key = d.join("k.pub");
    let key = key.to_str().unwrap();

    let version = b.run(&["--version"]);
    assert!(
        stdout(&version).contains("box-updater"),
        "{}",
        stderr(&version)
    );
    let o = b.run(&["update", "--public-key", key]);
    assert!(o.status.success(), "ARM update failed: {}", stderr(&o));
    assert!(b.run(&["confirm", "--public-key", key]).status.success());
    assert_eq!(b.current_version(), Some(V1));
    b.assert_current_complete();

    sample_payload(&d, "pi-2");
    let staging = d.mkdir("staging2");
    build_image(
        &d,
        &staging,
        V2,
        &["payload/box-config-daemon"],
        &["--sign-key", "k.key"],
    );
    publish_dir(&staging, &updates);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let st = b.run(&["check"]);
        if stdout(&st).contains(&format!("\"newest\":{V2}")) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server never listed V2: {}",
            stdout(&st)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = b.run(&["update", "--public-key", key]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.reboot_count(), 2);
    let o = b.run(&[
        "confirm",
        "--public-key",
        key,
        "--health-check",
        "grep -q pi-2 box-config-daemon/config.json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.current_version(), Some(V2));
    assert_eq!(b.status()["state"], "committed");
    b.assert_current_complete();
}
