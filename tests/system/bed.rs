//! The test bed around one virtual box: the work directory, the real update-server on
//! 127.0.0.1 that the guest reaches as `http://10.0.2.100:8151`, the signing key, images built
//! with the project's own `build-update`, and the box's forwarded ports (its new page, the old
//! page, the sample service), with a small HTTP client that never hangs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::disk;
use crate::util::{self, Dir, Running};
use crate::vm::{Arch, Boot, Forward, GuestForward, Machine, MachineSpec};

/// Where the guest finds the update server (a guest forward to the host's update-server).
pub const SERVER_IP: &str = "10.0.2.100";
pub const SERVER_PORT: u16 = 8151;
/// The box's ports: box-updater's page, the original box-config-daemon's, the sample service.
pub const PAGE: u16 = 8080;
pub const OLD_PAGE: u16 = 8888;
pub const SAMPLE: u16 = 8081;
/// The box's `updater_token` (tests/system/rootfs/etc/opq/opqbox_config.json): the page asks it
/// of every client that is not on the box itself, and the host reaches the box through qemu's
/// network, not over the box's loopback.
pub const TOKEN: &str = "opq-vm-token-5f3a9c";
/// How long a boot may take from power-on to its markers on the console (emulation on a busy
/// 2-core machine is slow).
const BOOT_MARKER: Duration = Duration::from_secs(300);

/// What the harness was given: the cached system disk, kernel and initrd, and the guest's build
/// of box-updater.
pub struct Inputs {
    pub arch: Arch,
    pub vm_dir: PathBuf,
    pub guest_updater: PathBuf,
    pub artifacts: PathBuf,
    /// Virtual CPUs (`-smp`).
    pub smp: u32,
}

pub struct Bed {
    pub dir: Dir,
    pub updates: PathBuf,
    pub server: Running,
    pub machine: Machine,
    pub boot: Option<Boot>,
    pub ports: Ports,
    pub inputs: Inputs,
    /// Seconds from power-on to the console's ready line, per boot.
    pub boot_times: Vec<f64>,
}

#[derive(Clone, Copy)]
pub struct Ports {
    pub page: u16,
    pub old_page: u16,
    pub sample: u16,
}

/// How a box differs from the story's: the data disk's size, more disks (empty, sparse: the
/// dm-log-writes logs), more kernel arguments.
pub struct BoxSpec {
    pub data_mib: u64,
    pub extra_disks: Vec<(&'static str, u64)>,
    pub extra_cmdline: String,
}

impl Default for BoxSpec {
    fn default() -> Self {
        BoxSpec {
            data_mib: 1024,
            extra_disks: Vec::new(),
            extra_cmdline: String::new(),
        }
    }
}

impl Bed {
    /// A fresh box: a copy of the cached system disk, a new data disk (empty `opq/` and
    /// `box-updater/`), the update-server over an empty directory, a signing key.
    pub fn new(inputs: Inputs) -> Result<Bed> {
        Bed::new_with(inputs, BoxSpec::default())
    }

    /// The same, as `spec` says.
    pub fn new_with(inputs: Inputs, spec: BoxSpec) -> Result<Bed> {
        let dir = Dir::new();
        let updates = dir.mkdir("updates");
        let server = util::start_update_server(&updates);
        util::keygen(&dir, "fleet");
        let root = dir.join("root.img");
        disk::copy_image(&inputs.vm_dir.join("root.img"), &root)?;
        let data_tree = dir.mkdir("data-tree");
        std::fs::create_dir_all(data_tree.join("opq"))?;
        std::fs::create_dir_all(data_tree.join("box-updater"))?;
        let data = dir.join("data.img");
        disk::make_ext4(&data, spec.data_mib, "opqdata", Some(&data_tree))?;
        let mut disks = vec![root, data];
        for (name, mib) in &spec.extra_disks {
            let d = dir.join(format!("{name}.img"));
            std::fs::File::create(&d)?.set_len(mib << 20)?;
            disks.push(d);
        }
        let ports = Ports {
            page: util::free_port(),
            old_page: util::free_port(),
            sample: util::free_port(),
        };
        let log_dir = inputs.artifacts.clone();
        let _ = std::fs::remove_dir_all(&log_dir);
        let (kernel, initrd) = (
            inputs.vm_dir.join("vmlinuz"),
            inputs.vm_dir.join("initrd.img"),
        );
        let machine = Machine::new(MachineSpec {
            arch: inputs.arch,
            kernel,
            initrd,
            disks,
            mem_mib: 512,
            smp: inputs.smp,
            forwards: vec![
                Forward {
                    host: ports.page,
                    guest: PAGE,
                },
                Forward {
                    host: ports.old_page,
                    guest: OLD_PAGE,
                },
                Forward {
                    host: ports.sample,
                    guest: SAMPLE,
                },
            ],
            guest_forwards: vec![GuestForward {
                guest_ip: SERVER_IP.into(),
                guest_port: SERVER_PORT,
                host_port: server.port,
            }],
            log_dir,
            extra_cmdline: spec.extra_cmdline,
        })?;
        Ok(Bed {
            dir,
            updates,
            server,
            machine,
            boot: None,
            ports,
            inputs,
            boot_times: Vec::new(),
        })
    }

    pub fn data_disk(&self) -> PathBuf {
        self.machine.spec.disks[1].clone()
    }

    pub fn system_disk(&self) -> PathBuf {
        self.machine.spec.disks[0].clone()
    }

    /// Powers the box on and waits for the end of its boot; returns where `current` points at
    /// the start of the boot (`none` on a box without releases). A boot that ends by itself
    /// before its ready line (the guard reboots a bad release early) is no error: `boot()` is
    /// then down, and `boot_times` has no entry for it.
    pub fn power_on(&mut self) -> Result<String> {
        let mut boot = self.machine.boot()?;
        let line = boot
            .wait_for("opq-vm: boot ", BOOT_MARKER)
            .with_context(|| format!("booting:\n{}", boot.console_tail(30)))?;
        let current = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("current="))
            .unwrap_or("none")
            .to_string();
        let left = BOOT_MARKER.saturating_sub(boot.started.elapsed());
        match boot.wait_for("opq-vm: ready", left) {
            Ok(_) => self.boot_times.push(boot.started.elapsed().as_secs_f64()),
            Err(_) if !boot.running() => {}
            Err(e) => return Err(e.context(format!("booting:\n{}", boot.console_tail(30)))),
        }
        self.boot = Some(boot);
        Ok(current)
    }

    pub fn boot(&mut self) -> &mut Boot {
        self.boot.as_mut().expect("the box is powered on")
    }

    /// Waits for the guest to reboot by itself (qemu's `-no-reboot` ends the boot).
    pub fn wait_reboot(&mut self, timeout: Duration) -> Result<()> {
        let boot = self.boot();
        boot.wait_down(timeout)
            .with_context(|| format!("waiting for a reboot:\n{}", boot.console_tail(30)))?;
        Ok(())
    }

    /// Whether the box is still up (has not rebooted) after `d`.
    pub fn stays_up(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if !self.boot().running() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.boot().running()
    }

    /// Cuts the power (SIGKILL to qemu).
    pub fn power_cut(&mut self) {
        if let Some(mut b) = self.boot.take() {
            b.kill();
        }
    }

    /// The console log of the current boot, last lines, for failure messages.
    pub fn console_tail(&self, n: usize) -> String {
        self.boot
            .as_ref()
            .map(|b| b.console_tail(n))
            .unwrap_or_default()
    }

    /// Builds an image with the project's `build-update` and publishes it to the server, as a
    /// fleet's CI would: into a staging directory, then renamed into the served one.
    pub fn publish(&self, version: u64, release: &Release) -> Result<PathBuf> {
        let payload = self.dir.mkdir(&format!("payload-{version}"));
        release.write(
            version,
            &payload,
            &self.inputs.guest_updater,
            &self.dir.join("fleet.pub"),
        )?;
        let staging = self.dir.mkdir(&format!("staging-{version}"));
        let mut c = util::cmd(util::BUILD_UPDATE);
        c.current_dir(&payload)
            .arg("--out")
            .arg(&staging)
            .args(["--version", &version.to_string()]);
        if release.signed {
            c.arg("--sign-key").arg(self.dir.join("fleet.key"));
        }
        if let Some(script) = &release.install_script {
            let p = payload.join("install-script.sh");
            write_exec(&p, script)?;
            c.arg("--install-script").arg(&p);
        }
        c.args(["box-updater", "opq-sample", "health_check.sh"]);
        if release.extra_unit {
            c.arg("opq-extra");
        }
        let out = c.output().context("running build-update")?;
        if !out.status.success() {
            bail!(
                "build-update failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        util::publish_dir(&staging, &self.updates);
        util::wait_listed(self.server.port, version);
        Ok(self
            .updates
            .join(format!("opq-box-update-{version}.tar.bz2")))
    }

    /// Makes the powered-off box one that already runs `version` under box-updater, from the
    /// host, as a migration would leave it (tests/system/README.md: the power-cut runs start
    /// there rather than replay the story's migration): the image is published and unpacked
    /// into `releases/` of a new data disk, `current` points at it, its `box-updater` is the
    /// guard, and its units (the guard's included) are written into the system disk with
    /// `debugfs -w`, enabled for multi-user.target. No state file: the guard confirms the
    /// release at the first boot, as after a migration.
    pub fn install_from_host(&mut self, version: u64, release: &Release) -> Result<()> {
        let image = self.publish(version, release)?;
        let tree = self.dir.mkdir(&format!("installed-{version}"));
        let releases = tree.join("opq/releases");
        std::fs::create_dir_all(&releases)?;
        let out = std::process::Command::new("tar")
            .arg("-xjf")
            .arg(&image)
            .arg("-C")
            .arg(&releases)
            .output()
            .context("running tar")?;
        if !out.status.success() {
            bail!(
                "tar -xjf {}: {}",
                image.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let name = format!("opq-box-update-{version}");
        let rel = releases.join(&name);
        std::os::unix::fs::symlink(format!("releases/{name}"), tree.join("opq/current"))?;
        let guard = tree.join("box-updater/guard");
        std::fs::create_dir_all(&guard)?;
        std::fs::copy(
            rel.join("box-updater/box-updater"),
            guard.join("box-updater"),
        )?;
        disk::make_ext4(&self.data_disk(), self.data_mib()?, "opqdata", Some(&tree))?;
        let mut units = vec![
            rel.join("box-updater/box-updater.service"),
            rel.join("box-updater/box-updater-guard.service"),
            rel.join("opq-sample/opq-sample.service"),
        ];
        if release.extra_unit {
            units.push(rel.join("opq-extra/opq-extra.service"));
        }
        let mut script = String::new();
        for u in &units {
            let base = u.file_name().unwrap_or_default().to_string_lossy();
            script.push_str(&format!(
                "write {} /etc/systemd/system/{base}\nsymlink /etc/systemd/system/multi-user.target.wants/{base} /etc/systemd/system/{base}\n",
                u.display()
            ));
        }
        disk::debugfs_write(&self.system_disk(), &script)?;
        Ok(())
    }

    fn data_mib(&self) -> Result<u64> {
        Ok(std::fs::metadata(self.data_disk())?.len() >> 20)
    }

    /// Takes an image and its sidecars off the server.
    pub fn unpublish(&self, version: u64) {
        for ext in ["", ".sha256", ".minisig"] {
            let _ = std::fs::remove_file(
                self.updates
                    .join(format!("opq-box-update-{version}.tar.bz2{ext}")),
            );
        }
    }

    pub fn page_get(&self, path: &str) -> Result<(u16, String)> {
        http(self.ports.page, "GET", path, None, Some(TOKEN))
    }

    /// A POST of JSON to the box's page, as its Update Box button sends it.
    pub fn page_post(&self, path: &str, json: &str) -> Result<(u16, String)> {
        http(self.ports.page, "POST", path, Some(json), Some(TOKEN))
    }

    pub fn page_json(&self, path: &str) -> Result<Value> {
        let (code, body) = self.page_get(path)?;
        if code != 200 {
            bail!("GET {path} on the page: {code} {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    pub fn status(&self) -> Result<Value> {
        self.page_json("/box_update/status")
    }

    /// Waits until the box's page answers `/version`; returns the installed version.
    pub fn wait_page(&mut self, timeout: Duration) -> Result<Option<u64>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(v) = self.page_json("/version") {
                return Ok(v["version"].as_u64());
            }
            if !self.boot().running() {
                bail!("the box went down while waiting for its page");
            }
            if Instant::now() >= deadline {
                bail!(
                    "the page on port {PAGE} did not answer within {} s:\n{}",
                    timeout.as_secs(),
                    self.console_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Polls the status until `done` says so; returns that status.
    pub fn wait_status(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        loop {
            if let Ok(s) = self.status() {
                if done(&s) {
                    return Ok(s);
                }
                last = s;
            }
            if Instant::now() >= deadline {
                bail!(
                    "{what}: not within {} s; last status {last}\n{}",
                    timeout.as_secs(),
                    self.console_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What the sample service of the running release says: its version and directory.
    pub fn sample(&mut self, timeout: Duration) -> Result<(String, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok((200, body)) = http(self.ports.sample, "GET", "/", None, None) {
                let v: Value = serde_json::from_str(&body)?;
                return Ok((
                    v["version"].as_str().unwrap_or("").to_string(),
                    v["dir"].as_str().unwrap_or("").to_string(),
                ));
            }
            if !self.boot().running() {
                bail!("the box went down while waiting for the sample service");
            }
            if Instant::now() >= deadline {
                bail!(
                    "the sample service did not answer within {} s",
                    timeout.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// What goes into one release image of the story.
pub struct Release {
    pub signed: bool,
    /// The sample service exits 1 at start.
    pub failing_service: bool,
    /// box-updater is a program that exits at once.
    pub broken_updater: bool,
    pub install_script: Option<String>,
    /// A service of its own that the other releases do not have (`opq-extra.service`).
    pub extra_unit: bool,
    /// The sample service is busybox's httpd serving a file (python's start costs seconds of
    /// emulated CPU at every boot), and its unit names the version (so each update replaces it).
    pub light: bool,
}

impl Release {
    pub fn good() -> Release {
        Release {
            signed: true,
            failing_service: false,
            broken_updater: false,
            install_script: None,
            extra_unit: false,
            light: false,
        }
    }

    /// A good release of the power-cut runs: light (see `light`).
    pub fn light() -> Release {
        Release {
            light: true,
            ..Release::good()
        }
    }

    /// The payload: `box-updater/` as `scripts/make-box-payload.sh` assembles it (the guest's
    /// binary, the project's units, the fleet's public key), a sample service of the box with its
    /// unit, and the image's `health_check.sh`.
    fn write(&self, version: u64, dir: &Path, updater: &Path, public_key: &Path) -> Result<()> {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let bu = dir.join("box-updater");
        std::fs::create_dir_all(&bu)?;
        if self.broken_updater {
            write_exec(
                &bu.join("box-updater"),
                "#!/bin/sh\necho 'box-updater: broken on purpose' >&2\nexit 1\n",
            )?;
        } else {
            std::fs::copy(updater, bu.join("box-updater"))?;
        }
        // The project's units; both tell the console which step an update is at (the guest's
        // box-updater is the fault-injection build, see src/updater/fault.rs), for the power
        // cuts.
        let trace = "[Service]\nEnvironment=OPQ_FAULT_TRACE=/dev/console\n";
        let unit = std::fs::read_to_string(repo.join("box-updater/box-updater.service"))?;
        std::fs::write(
            bu.join("box-updater.service"),
            unit.replace("[Service]\n", trace),
        )?;
        // The guard's, with a shorter wait and fewer boots so the story fits in CI.
        let guard = std::fs::read_to_string(repo.join("box-updater/box-updater-guard.service"))?;
        let fast = guard
            .replace("--max-boots 3", "--max-boots 2")
            .replace("--health-timeout 180", "--health-timeout 120")
            .replace("[Service]\n", trace);
        if !fast.contains("--max-boots 2") || !fast.contains("--health-timeout 120") {
            bail!("box-updater-guard.service no longer has --max-boots 3 --health-timeout 180");
        }
        std::fs::write(bu.join("box-updater-guard.service"), fast)?;
        std::fs::copy(public_key, bu.join("box-update.pub"))?;

        let sample = dir.join("opq-sample");
        std::fs::create_dir_all(&sample)?;
        let (run, unit) = if self.light {
            let www = sample.join("www");
            std::fs::create_dir_all(&www)?;
            std::fs::write(
                www.join("index.html"),
                format!(
                    "{{\"version\": \"{version}\", \"dir\": \"/opt/opq/releases/opq-box-update-{version}/opq-sample\"}}\n"
                ),
            )?;
            (
                SAMPLE_RUN_LIGHT,
                SAMPLE_UNIT.replace(
                    "[Service]\n",
                    &format!("[Service]\nEnvironment=OPQ_SAMPLE_VERSION={version}\n"),
                ),
            )
        } else {
            write_exec(&sample.join("sample.py"), SAMPLE_PY)?;
            (SAMPLE_RUN, SAMPLE_UNIT.to_string())
        };
        write_exec(
            &sample.join("run.sh"),
            &run.replace(
                "@FAIL@\n",
                if self.failing_service {
                    "echo 'opq-sample: failing on purpose' >&2\nexit 1\n"
                } else {
                    ""
                },
            ),
        )?;
        std::fs::write(sample.join("opq-sample.service"), unit)?;
        write_exec(&dir.join("health_check.sh"), HEALTH_CHECK)?;
        if self.extra_unit {
            let extra = dir.join("opq-extra");
            std::fs::create_dir_all(&extra)?;
            std::fs::write(extra.join("opq-extra.service"), EXTRA_UNIT)?;
        }
        Ok(())
    }
}

const SAMPLE_PY: &str = r#"#!/usr/bin/python3
"""A service of the box, run from /opt/opq/current: says which release it runs from."""
import json, os
from http.server import BaseHTTPRequestHandler, HTTPServer

here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(here, "..", "VERSION")) as f:
    version = f.read().strip()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"version": version, "dir": here}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer(("", 8081), Handler).serve_forever()
"#;

// The failing release's service exits 1 at once (python's start costs seconds under emulation).
const SAMPLE_RUN: &str = "#!/bin/sh
@FAIL@
exec /usr/bin/python3 \"$(dirname \"$0\")/sample.py\"
";

// The light sample: busybox's httpd serves the release's own index.html (its version), from the
// release `current` pointed at when it started.
const SAMPLE_RUN_LIGHT: &str = "#!/bin/sh
@FAIL@
exec /usr/bin/busybox httpd -f -p 8081 -h \"$(dirname \"$0\")/www\"
";

const SAMPLE_UNIT: &str = "[Unit]
Description=OPQ sample service (test bed)
After=network.target

[Service]
ExecStart=/opt/opq/current/opq-sample/run.sh
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
";

pub const EXTRA_UNIT_NAME: &str = "opq-extra.service";
const EXTRA_UNIT: &str = "[Unit]
Description=A service only one release of the test bed has

[Service]
ExecStart=/bin/sleep infinity

[Install]
WantedBy=multi-user.target
";

// A unit is "active" as soon as its process started; the check waits for the service to answer
// (the guard gives it what is left of --health-timeout).
const HEALTH_CHECK: &str = "#!/bin/sh
# The image's own health check: its sample service answers, from this very release.
for _ in $(seq 60); do
    wget -q -O - http://127.0.0.1:8081/ | grep -q \"\\\"version\\\": \\\"$BOX_UPDATE_VERSION\\\"\" && exit 0
    sleep 1
done
exit 1
";

fn write_exec(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// One HTTP/1.1 request over loopback with short timeouts, with the box's token if given:
/// (status, body). Errors when nothing answers (a port forward whose guest side is closed
/// accepts and then hangs up).
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    json: Option<&str>,
    token: Option<&str>,
) -> Result<(u16, String)> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let body = json.unwrap_or("");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("X-Box-Token: {t}\r\n"));
    }
    if json.is_some() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP answer: {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}
