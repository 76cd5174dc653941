//! The box's story on the virtual box, each step asserted from outside the machine: through its
//! pages (forwarded ports), its serial console, qemu's own exit at each reboot, and at the end
//! its data disk read from the host.

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::bed::{Bed, EXTRA_UNIT_NAME, Release};
use crate::disk;

pub const V0: u64 = 1_800_000_000;
const V_UNSIGNED: u64 = 1_800_000_050;
pub const V1: u64 = 1_800_000_100;
const V2: u64 = 1_800_000_200;
const V3: u64 = 1_800_000_300;
const V4: u64 = 1_800_000_400;

const BOOT_UP: Duration = Duration::from_secs(120);
const REBOOT: Duration = Duration::from_secs(300);

fn release_link(v: u64) -> String {
    format!("releases/opq-box-update-{v}")
}

fn last_result(s: &Value) -> (&str, u64, &str) {
    let r = &s["last_result"];
    (
        r["result"].as_str().unwrap_or(""),
        r["to"].as_u64().unwrap_or(0),
        r["message"].as_str().unwrap_or(""),
    )
}

pub type Step = (&'static str, fn(&mut Bed) -> Result<String>);

pub const STEPS: [Step; 7] = [
    ("an old box on the original shell updater", old_box),
    ("migration through the old Update Box button", migration),
    ("the old button is safe after migration", old_button_safe),
    ("a normal update through the new page", normal_update),
    (
        "a release whose service fails is rolled back",
        failing_service,
    ),
    (
        "a release whose box-updater cannot start is rolled back",
        broken_updater,
    ),
    (
        "a failed install script leaves the old release",
        failed_install,
    ),
];

/// Step 1: The guest as a box still on the original software: its page on 8888 with the box config
/// at /etc/opq/opqbox_config.json, no box-updater, no releases.
fn old_box(bed: &mut Bed) -> Result<String> {
    let current = bed.power_on()?;
    ensure!(
        current == "none",
        "a fresh box has no release, console says {current}"
    );
    let (code, page) = http_retry(bed.ports.old_page, "/")?;
    ensure!(
        code == 200 && page.contains("Update Box"),
        "old page: {code} {page}"
    );
    let (_, cfg) = http_retry(bed.ports.old_page, "/box_config")?;
    let cfg: Value = serde_json::from_str(&cfg)?;
    ensure!(
        cfg["box_config"]["updates_ep"] == "http://10.0.2.100:8151",
        "the old page reads /etc/opq/opqbox_config.json: {cfg}"
    );
    ensure!(
        bed.page_get("/version").is_err(),
        "nothing answers on 8080 before the migration"
    );
    Ok(format!("booted in {:.1} s", bed.boot_times[0]))
}

/// Step 2: The first image with box-updater, installed by the old button's unchecked steps; the box
/// reboots for real, box-updater comes up from /opt/opq/current, the guard confirms the release.
fn migration(bed: &mut Bed) -> Result<String> {
    bed.publish(V0, &Release::good())?;
    let (code, body) =
        crate::bed::http(bed.ports.old_page, "POST", "/box_update", Some("{}"), None)?;
    ensure!(code == 200, "old button: {code} {body}");
    bed.wait_reboot(REBOOT)?;
    let current = bed.power_on()?;
    ensure!(
        current == release_link(V0),
        "after the migration current is {current}"
    );
    let v = bed.wait_page(BOOT_UP)?;
    ensure!(v == Some(V0), "the page says version {v:?}");
    let s = bed.wait_status("the guard confirms the migrated release", BOOT_UP, |s| {
        last_result(s).0 == "committed"
    })?;
    ensure!(
        s["confirmed"] == V0 && last_result(&s).2.contains("installed without box-updater"),
        "{s}"
    );
    let (ver, dir) = bed.sample(BOOT_UP)?;
    ensure!(
        ver == V0.to_string() && dir == format!("/opt/opq/releases/opq-box-update-{V0}/opq-sample"),
        "the sample service runs {ver} from {dir}"
    );
    Ok(format!("confirmed: {}", last_result(&s).2))
}

/// Step 3: The old page's button again, with an unsigned image on the server: it now goes through
/// box-updater, which refuses it; nothing is installed and the box does not reboot.
fn old_button_safe(bed: &mut Bed) -> Result<String> {
    bed.publish(
        V_UNSIGNED,
        &Release {
            signed: false,
            ..Release::good()
        },
    )?;
    let (code, body) =
        crate::bed::http(bed.ports.old_page, "POST", "/box_update", Some("{}"), None)?;
    ensure!(code == 200, "old button: {code} {body}");
    let s = bed.wait_status("box-updater refuses the unsigned image", BOOT_UP, |s| {
        s["running"] == false && last_result(s).0 == "failed"
    })?;
    let (_, to, msg) = last_result(&s);
    ensure!(
        to == V_UNSIGNED && msg.contains("not signed"),
        "refused for the wrong reason: {s}"
    );
    ensure!(
        bed.stays_up(Duration::from_secs(8)),
        "the box rebooted after a refused image"
    );
    ensure!(
        bed.page_json("/version")?["version"] == V0,
        "the installed version changed"
    );
    let (_, log) = crate::bed::http(bed.ports.old_page, "GET", "/box_update/log", None, None)?;
    let tail = log.rsplit("Asking box-updater").next().unwrap_or("");
    ensure!(
        log.contains("Asking box-updater") && !tail.contains("Running update script"),
        "the old button did not go through box-updater:\n{log}"
    );
    bed.unpublish(V_UNSIGNED);
    Ok(format!("refused: {msg}"))
}

/// Step 4: Update Box on the new page: progress, a real `systemctl reboot`, the new release confirmed
/// by the guard, its services running from it.
fn normal_update(bed: &mut Bed) -> Result<String> {
    bed.publish(V1, &Release::good())?;
    let (code, body) = bed.page_post("/box_update", "{}")?;
    ensure!(code == 202, "Update Box: {code} {body}");
    let mut states = Vec::new();
    while bed.boot().running() {
        if let Ok(s) = bed.status() {
            let st = s["state"].as_str().unwrap_or("").to_string();
            if states.last() != Some(&st) {
                states.push(st);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        ensure!(states.len() < 50, "no reboot: {states:?}");
    }
    // "rebooting" lasts from the switch until systemd stops the page, which can be shorter than
    // a look at the page: what the box wrote last before it went down says it too (the status is
    // written durably before the reboot is asked for; the box shut down cleanly).
    if !states.iter().any(|s| s == "rebooting") {
        let on_disk: Value =
            serde_json::from_slice(&disk::cat(&bed.data_disk(), "/box-updater/state.json")?)
                .context("state.json on the data disk after the reboot")?;
        ensure!(
            on_disk["state"] == "rebooting",
            "neither the page ({states:?}) nor the status it left on disk said rebooting: {on_disk}"
        );
        states.push("rebooting (the status on disk after the shutdown)".into());
    }
    let current = bed.power_on()?;
    ensure!(
        current == release_link(V1),
        "after the update current is {current}"
    );
    let s = bed.wait_status("the guard confirms the new release", BOOT_UP, |s| {
        last_result(s).0 == "committed" && last_result(s).1 == V1
    })?;
    ensure!(s["version"] == V1 && s["pending"].is_null(), "{s}");
    let (ver, dir) = bed.sample(BOOT_UP)?;
    ensure!(
        ver == V1.to_string() && dir.contains(&format!("opq-box-update-{V1}")),
        "the sample service runs {ver} from {dir}"
    );
    Ok(format!("page showed {}", states.join(" → ")))
}

/// Presses Update Box and follows the reboots until the box is back on `back_to`: returns the
/// number of boots on the new release, and the page's status after.
fn update_rolled_back(bed: &mut Bed, new: u64, back_to: u64) -> Result<(u32, Value)> {
    let (code, body) = bed.page_post("/box_update", "{}")?;
    ensure!(code == 202, "Update Box: {code} {body}");
    bed.wait_reboot(REBOOT)?;
    let mut on_new = 0;
    loop {
        let current = bed.power_on()?;
        if current == release_link(back_to) {
            break;
        }
        ensure!(current == release_link(new), "current is {current}");
        on_new += 1;
        ensure!(on_new <= 4, "still on version {new} after {on_new} boots");
        bed.wait_reboot(REBOOT)?;
    }
    bed.wait_page(BOOT_UP)?;
    let s = bed.wait_status("the page reports the rollback", BOOT_UP, |s| {
        s["running"] == false
    })?;
    Ok((on_new, s))
}

/// Step 5: A release whose service exits 1: not healthy at two boots, then rolled back. It also
/// brings a service of its own, which the rollback takes away (checked on the disk at the end).
fn failing_service(bed: &mut Bed) -> Result<String> {
    bed.publish(
        V2,
        &Release {
            failing_service: true,
            extra_unit: true,
            ..Release::good()
        },
    )?;
    let (boots, s) = update_rolled_back(bed, V2, V1)?;
    let (result, to, msg) = last_result(&s);
    ensure!(
        result == "rolled_back" && to == V1 && msg.contains("opq-sample.service"),
        "{s}"
    );
    ensure!(
        boots == 2,
        "rolled back after {boots} boots on the bad release, not 2"
    );
    let (ver, _) = bed.sample(BOOT_UP)?;
    ensure!(ver == V1.to_string(), "the sample service runs {ver}");
    Ok(format!("{boots} boots on {V2}, then: {msg}"))
}

/// Step 6: A release whose box-updater exits at once: its page never answers, the guard (the
/// confirmed release's updater) counts the boots and rolls back.
fn broken_updater(bed: &mut Bed) -> Result<String> {
    bed.publish(
        V3,
        &Release {
            broken_updater: true,
            ..Release::good()
        },
    )?;
    let (code, body) = bed.page_post("/box_update", "{}")?;
    ensure!(code == 202, "Update Box: {code} {body}");
    bed.wait_reboot(REBOOT)?;
    let mut on_new = 0;
    let mut page_answered = false;
    loop {
        let current = bed.power_on()?;
        if current == release_link(V1) {
            break;
        }
        ensure!(current == release_link(V3), "current is {current}");
        on_new += 1;
        ensure!(on_new <= 4, "still on version {V3} after {on_new} boots");
        page_answered |= bed.page_get("/version").is_ok();
        bed.wait_reboot(REBOOT)?;
    }
    ensure!(!page_answered, "the broken updater's page answered");
    bed.wait_page(BOOT_UP)?;
    let s = bed.wait_status("the page reports the rollback", BOOT_UP, |s| {
        s["running"] == false
    })?;
    let (result, to, msg) = last_result(&s);
    ensure!(
        result == "rolled_back" && to == V1 && msg.contains("box-updater.service"),
        "{s}"
    );
    ensure!(on_new == 2, "rolled back after {on_new} boots, not 2");
    Ok(format!("{on_new} boots on {V3}, then: {msg}"))
}

/// Step 7: An image whose install_update.sh fails: the box keeps its release, no reboot.
fn failed_install(bed: &mut Bed) -> Result<String> {
    bed.publish(
        V4,
        &Release {
            install_script: Some(
                "#!/bin/sh\necho 'install_update: cannot install on purpose' >&2\nexit 3\n".into(),
            ),
            ..Release::good()
        },
    )?;
    let (code, body) = bed.page_post("/box_update", "{}")?;
    ensure!(code == 202, "Update Box: {code} {body}");
    let s = bed.wait_status("the install fails", REBOOT, |s| {
        s["running"] == false && last_result(s).0 == "failed"
    })?;
    let (_, _, msg) = last_result(&s);
    ensure!(
        msg.contains("install_update.sh failed with exit code 3"),
        "{s}"
    );
    ensure!(
        bed.stays_up(Duration::from_secs(10)),
        "the box rebooted after a failed install"
    );
    ensure!(s["version"] == V1, "{s}");
    let (ver, _) = bed.sample(BOOT_UP)?;
    ensure!(ver == V1.to_string(), "the sample service runs {ver}");
    Ok(format!("failed: {msg}"))
}

/// After the story: the power is cut, and the box's data disk is checked from the host.
pub fn check_disk(bed: &mut Bed) -> Result<String> {
    bed.power_cut();
    let scratch = bed.dir.mkdir("check");
    let (fsck, copy) = disk::check(&bed.data_disk(), &scratch)?;
    ensure!(fsck.clean, "e2fsck found damage:\n{}", fsck.report);
    let current = disk::current_release(&copy, &scratch)?;
    ensure!(current == V1, "current is version {current}, not {V1}");
    let state: Value = serde_json::from_slice(&disk::cat(&copy, "/box-updater/state.json")?)
        .context("state.json on the disk")?;
    ensure!(
        state["confirmed"] == V1 && state["pending"].is_null(),
        "{state}"
    );
    let guard = disk::cat(&copy, "/box-updater/guard/box-updater")?;
    let good = std::fs::read(&bed.inputs.guest_updater)?;
    if guard != good {
        bail!(
            "the guard is not the confirmed release's box-updater ({} bytes)",
            guard.len()
        );
    }
    // The units of the rolled-back release with a service of its own (step 5) are gone.
    let (sys_fsck, sys) = disk::check(&bed.system_disk(), &scratch)?;
    ensure!(
        sys_fsck.clean,
        "e2fsck of the system disk:\n{}",
        sys_fsck.report
    );
    let units = disk::ls(&sys, "/etc/systemd/system")?;
    let wants = disk::ls(&sys, "/etc/systemd/system/multi-user.target.wants")?;
    ensure!(
        !units.iter().chain(&wants).any(|u| u == EXTRA_UNIT_NAME),
        "{EXTRA_UNIT_NAME} of the rolled-back version {V2} is still installed: {units:?} {wants:?}"
    );
    ensure!(
        wants.iter().any(|u| u == "opq-sample.service"),
        "opq-sample.service is no longer enabled: {wants:?}"
    );
    let releases = disk::ls(&copy, "/opq/releases")?;
    ensure!(
        !releases.iter().any(|r| r.contains(&V4.to_string())),
        "the failed install left {releases:?}"
    );
    Ok(format!(
        "e2fsck clean{}; current -> {}, complete; releases {}",
        if fsck.replayed {
            " after journal replay"
        } else {
            ""
        },
        release_link(V1),
        releases.join(", ")
    ))
}

/// A GET that retries while the guest's service is still starting.
fn http_retry(port: u16, path: &str) -> Result<(u16, String)> {
    let mut last = None;
    for _ in 0..120 {
        match crate::bed::http(port, "GET", path, None, None) {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last.expect("tried")).context(format!("GET {path} on port {port}"))
}
