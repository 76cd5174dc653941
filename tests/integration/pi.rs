//! The ARM box-updater (built for 64-bit and 32-bit Raspberry Pi OS) under qemu-user-static,
//! updating a sandboxed box from the native update-server: the end-to-end update as on a Pi.

use std::path::PathBuf;

use crate::util::*;

const V1: u64 = 1_700_000_001;
const V2: u64 = 1_700_000_002;

/// qemu and the ARM box-updater for `triple` (64-bit or 32-bit Raspberry Pi OS).
fn arm_runner(triple: &str) -> Vec<String> {
    let (qemu, sysroot) = match triple {
        "aarch64-unknown-linux-gnu" => ("/usr/bin/qemu-aarch64-static", "/usr/aarch64-linux-gnu"),
        _ => ("/usr/bin/qemu-arm-static", "/usr/arm-linux-gnueabihf"),
    };
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/{triple}/debug/box-updater"));
    let arch = if triple.starts_with("aarch64") {
        "aarch64"
    } else {
        "armv7"
    };
    assert!(
        bin.is_file() && std::path::Path::new(qemu).is_file(),
        "the ARM box-updater ({}) or {qemu} is missing: run scripts/test.sh, which builds it with \
         scripts/build-pi.sh --debug --bin box-updater {arch}",
        bin.display()
    );
    vec![
        qemu.to_string(),
        "-L".into(),
        sysroot.into(),
        bin.display().to_string(),
    ]
}

#[test]
fn the_64_bit_arm_box_updater_updates_a_box_under_qemu() {
    update_under_qemu("aarch64-unknown-linux-gnu");
}

#[test]
fn the_32_bit_arm_box_updater_updates_a_box_under_qemu() {
    update_under_qemu("armv7-unknown-linux-gnueabihf");
}

fn update_under_qemu(triple: &str) {
    let runner = arm_runner(triple);
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
