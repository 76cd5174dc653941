//! The update-server container, run for real: a Docker engine of the test's own (Debian's
//! dockerd with its own data root, exec root, pidfile and socket, no bridge, no iptables, so it
//! never meets another engine), the project's Dockerfile built where no registry can be reached,
//! and the image run as the original deployment ran it: `BOX_UPDATE_SERVER_SETTINGS` and a
//! mounted update directory, on the host's network bound to 127.0.0.1.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::*;

const V1: u64 = 1_700_000_001;
const V2: u64 = 1_700_000_002;
/// The image's user (update-server/Dockerfile).
const IMAGE_UID: u32 = 8151;

/// Debian's client (what CI has) where it is installed, else the one on PATH.
fn docker_bin() -> &'static str {
    if Path::new("/usr/bin/docker").exists() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// A private dockerd. Its exec root and socket live in a short path of their own under /tmp
/// (containerd's socket paths must stay short); images and containers in the test's directory.
struct Engine {
    dockerd: Option<Child>,
    exec: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
}

impl Engine {
    fn start(d: &Dir) -> Engine {
        let dockerd = ["/usr/sbin/dockerd", "/usr/bin/dockerd"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("dockerd is not installed: scripts/test.sh installs docker.io");
        let exec = tempfile::Builder::new()
            .prefix("opq-docker-")
            .tempdir_in("/tmp")
            .unwrap();
        let data = d.mkdir("docker-data");
        let log = d.join("dockerd.log");
        // No daemon.json of the host's, and containerd namespaces of its own should dockerd find
        // a system containerd to use instead of starting its own.
        let config = d.write("daemon.json", "{}\n");
        let ns = format!("opq-test-{}", std::process::id());
        let child = Command::new(dockerd)
            .args(["--bridge=none", "--iptables=false", "--ip-masq=false"])
            .arg("--data-root")
            .arg(&data)
            .arg("--exec-root")
            .arg(exec.path().join("exec"))
            .arg("--pidfile")
            .arg(exec.path().join("dockerd.pid"))
            .arg("-H")
            .arg(format!(
                "unix://{}",
                exec.path().join("docker.sock").display()
            ))
            .arg("--config-file")
            .arg(&config)
            .arg(format!("--containerd-namespace={ns}"))
            .arg(format!("--containerd-plugins-namespace={ns}-plugins"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(d.join("dockerd.err")).unwrap())
            .spawn()
            .expect("starting dockerd");
        let mut engine = Engine {
            dockerd: Some(child),
            exec,
            data,
            log: d.join("dockerd.err"),
        };
        let t0 = Instant::now();
        loop {
            if engine.docker(&["version"]).status.success() {
                break;
            }
            let exited = engine.dockerd.as_mut().unwrap().try_wait().unwrap();
            if exited.is_some() || t0.elapsed() > Duration::from_secs(60) {
                panic!(
                    "dockerd did not come up ({exited:?}): {}",
                    std::fs::read_to_string(&engine.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        engine
    }

    fn host(&self) -> String {
        format!("unix://{}", self.exec.path().join("docker.sock").display())
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(docker_bin());
        c.args(args).env("DOCKER_HOST", self.host());
        c
    }

    fn docker(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    /// `docker ARGS`, which must succeed; its stdout, trimmed.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "docker {args:?} failed: {}{}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o).trim().to_string()
    }

    fn inspect(&self, what: &str, format: &str) -> String {
        self.ok(&["inspect", "--format", format, what])
    }

    /// Processes that belong to this engine (dockerd, its containerd, shims): their command
    /// lines name its exec root.
    fn processes(&self) -> Vec<u32> {
        let needle = self.exec.path().to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Removes every container, stops dockerd by its pid (SIGTERM, as systemd would) and waits
    /// for it, unmounts what it left mounted and removes its directories. Returns how long
    /// dockerd took to stop.
    fn shutdown(&mut self) -> Duration {
        let Some(mut child) = self.dockerd.take() else {
            return Duration::ZERO;
        };
        let ids = stdout(&self.docker(&["ps", "-aq"]));
        for id in ids.split_whitespace() {
            let _ = self.docker(&["rm", "-f", "-v", id]);
        }
        let t0 = Instant::now();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        while child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = t0.elapsed();
        // A containerd or shim that outlived a killed dockerd is this engine's alone.
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // dockerd leaves its network namespace mount (exec-root/netns/default) behind.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let roots = [self.exec.path().to_path_buf(), self.data.clone()];
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|p| roots.iter().any(|r| Path::new(p).starts_with(r)))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for p in points {
            let _ = Command::new("umount").arg("-l").arg(p).status();
        }
        let _ = std::fs::remove_dir_all(&self.data);
        took
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `GET`/`HEAD` with extra headers: (status, head, body).
fn request(port: u16, method: &str, path: &str, headers: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\r\n"
    )
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head, all[end + 4..].to_vec())
}

/// `bash SCRIPT` from the repository, for a script that runs cargo: without the variables cargo
/// sets for this test (CARGO_PKG_NAME, CARGO_MANIFEST_DIR, ...), which build scripts such as
/// ring's watch, so that the release build scripts/test.sh made first is reused, not redone.
fn script(root: &Path, name: &str) -> Command {
    let mut c = Command::new("bash");
    c.arg(root.join("scripts").join(name)).current_dir(root);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_by_cargo = [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_BIN_",
            "CARGO_CRATE_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&&*key);
        if set_by_cargo {
            c.env_remove(&*key);
        }
    }
    c
}

fn chown_tree(path: &Path, uid: u32) {
    sh(path, &format!("chown -R {uid}:{uid} ."));
}

fn step(t0: &mut Instant, what: &str) {
    eprintln!("docker test: {what}: {:.1} s", t0.elapsed().as_secs_f64());
    *t0 = Instant::now();
}

#[test]
fn the_update_server_image_runs_in_a_real_docker_engine() {
    if !nix::unistd::geteuid().is_root() {
        // Loud on purpose: this is the only test that needs root (dockerd). CI runs as root.
        eprintln!(
            "\n**** SKIPPED the_update_server_image_runs_in_a_real_docker_engine: starting a Docker engine needs root; run scripts/test.sh as root (as CI does) ****\n"
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let d = Dir::new();
    let mut t = Instant::now();
    let mut engine = Engine::start(&d);
    step(&mut t, "engine up");

    // The image, built by the documented script; no registry is reachable, and none is needed.
    let o = run(script(root, "docker-build.sh").env("DOCKER_HOST", engine.host()));
    assert!(o.status.success(), "docker-build.sh: {}", stderr(&o));
    let size: u64 = engine
        .inspect("opq-update-server", "{{.Size}}")
        .parse()
        .unwrap();
    eprintln!("docker test: image size {size} bytes");
    assert!(
        size < 8 << 20,
        "the image is the binary alone: {size} bytes"
    );
    assert_eq!(
        engine.inspect("opq-update-server", "{{.Config.User}}"),
        format!("{IMAGE_UID}:{IMAGE_UID}")
    );
    assert!(
        engine
            .inspect("opq-update-server", "{{json .Config.Env}}")
            .contains(r#"BOX_UPDATE_SERVER_SETTINGS={\"port\": 8151, \"updates_dir\": \"/var/opq/box-updates\"}"#),
        "the original deployment's settings are the image's default"
    );
    step(&mut t, "image built");

    // The update directory, owned by the image's user so that it can take read leases.
    let updates = d.mkdir("updates");
    sample_payload(&d, "docker");
    build_image(&d, &updates, V1, &["payload/box-config-daemon"], &[]);
    chown_tree(&updates, IMAGE_UID);
    let port = free_port();
    let settings = format!(
        r#"{{"port": {port}, "updates_dir": "/var/opq/box-updates", "bind": "127.0.0.1"}}"#
    );
    let volume = format!("{}:/var/opq/box-updates:ro", updates.display());
    engine.ok(&[
        "run",
        "--detach",
        "--name",
        "opq-test",
        "--network",
        "host",
        "--read-only",
        "--health-interval",
        "1s",
        "--health-start-period",
        "1s",
        "-e",
        &format!("BOX_UPDATE_SERVER_SETTINGS={settings}"),
        "-v",
        &volume,
        "opq-update-server",
    ]);
    eventually(Duration::from_secs(20), "the container listening", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    step(&mut t, "container up");

    // Every endpoint.
    let name = format!("opq-box-update-{V1}.tar.bz2");
    let (status, _, body) = http_get(port, "/");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, &health["name"], &health["ok"]),
        (
            200,
            &serde_json::json!("Box Update Server"),
            &serde_json::json!(true)
        )
    );
    let (status, _, version) = http_get(port, "/version");
    assert_eq!((status, version), (200, V1.to_string()));
    assert_eq!(
        http_get(port, "/ls").2.lines().collect::<Vec<_>>(),
        vec![name.as_str()]
    );
    let (status, _, listing) = request(port, "GET", "/ls", "Accept: application/json\r\n");
    let listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
    assert_eq!((status, listing[0]["version"].as_u64()), (200, Some(V1)));
    let (status, head, _) = http_get(port, "/latest");
    assert_eq!(status, 303);
    assert!(head.contains(&format!("/update/{name}")), "{head}");
    let bytes = std::fs::read(updates.join(&name)).unwrap();
    let (status, head, body) = request(port, "GET", &format!("/update/{name}"), "");
    assert_eq!((status, body.len()), (200, bytes.len()));
    assert_eq!(body, bytes);
    assert!(head.to_ascii_lowercase().contains("etag:"), "{head}");
    let (status, _, body) = request(
        port,
        "GET",
        &format!("/update/{name}"),
        "Range: bytes=10-19\r\n",
    );
    assert_eq!((status, body.as_slice()), (206, &bytes[10..20]));
    let (status, head, body) = request(port, "HEAD", &format!("/update/{name}.sha256"), "");
    assert_eq!(status, 200);
    assert!(
        body.is_empty() && head.to_ascii_lowercase().contains("content-length:"),
        "{head}"
    );
    assert_eq!(http_get(port, "/update/..%2f..%2fetc%2fpasswd").0, 404);

    // An image dropped into the mounted directory appears, and a box updates from it.
    let staging = d.mkdir("staging");
    build_image(&d, &staging, V2, &["payload/box-config-daemon"], &[]);
    chown_tree(&staging, IMAGE_UID);
    publish_dir(&staging, &updates);
    wait_listed(port, V2);
    let b = BoxUnderTest::new(&d, "box", &format!("http://127.0.0.1:{port}"));
    let o = b.run(&["update"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.current_version(), Some(V2));
    step(&mut t, "endpoints, a new image, a box updated");

    // Not root, read-only root file system, healthy by its own HEALTHCHECK.
    let pid = engine.inspect("opq-test", "{{.State.Pid}}");
    let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid_line
            .split_whitespace()
            .skip(1)
            .all(|u| u == IMAGE_UID.to_string()),
        "the server runs as {IMAGE_UID}: {uid_line}"
    );
    assert_eq!(
        engine.inspect("opq-test", "{{.HostConfig.ReadonlyRootfs}}"),
        "true"
    );
    eventually(Duration::from_secs(20), "the container healthy", || {
        engine.inspect("opq-test", "{{.State.Health.Status}}") == "healthy"
    });
    step(&mut t, "healthy");

    // `docker stop`: SIGTERM to PID 1, which is the server: it ends at once, cleanly.
    let t0 = Instant::now();
    engine.ok(&["stop", "--time", "10", "opq-test"]);
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(5), "docker stop took {took:?}");
    assert_eq!(engine.inspect("opq-test", "{{.State.ExitCode}}"), "0");
    let logs = engine.docker(&["logs", "opq-test"]);
    let logs = format!("{}{}", stdout(&logs), stderr(&logs));
    assert!(
        logs.contains("got SIGTERM, stopping") && logs.trim_end().ends_with("stopped"),
        "{logs}"
    );
    engine.ok(&["rm", "opq-test"]);
    step(
        &mut t,
        &format!("docker stop ({:.2} s)", took.as_secs_f64()),
    );

    // The image's own settings, untouched: port 8151 on every address, so it runs in a network
    // namespace of its own with no network at all, and only its HEALTHCHECK reaches it.
    engine.ok(&[
        "run",
        "--detach",
        "--name",
        "opq-defaults",
        "--network",
        "none",
        "--read-only",
        "--health-interval",
        "1s",
        "opq-update-server",
    ]);
    eventually(Duration::from_secs(20), "the defaults healthy", || {
        engine.inspect("opq-defaults", "{{.State.Health.Status}}") == "healthy"
    });
    let logs = engine.docker(&["logs", "opq-defaults"]);
    assert!(
        stderr(&logs).contains("listening on 0.0.0.0:8151")
            && stderr(&logs).contains("from /var/opq/box-updates"),
        "{}",
        stderr(&logs)
    );
    engine.ok(&["stop", "opq-defaults"]);
    assert_eq!(engine.inspect("opq-defaults", "{{.State.ExitCode}}"), "0");
    engine.ok(&["rm", "-v", "opq-defaults"]);
    step(&mut t, "the image's defaults");

    // scripts/docker-run.sh as documented: DIR PORT BIND, in the foreground until Ctrl-C, as
    // the directory's owner.
    let served = d.mkdir("served");
    std::fs::set_permissions(&served, std::fs::Permissions::from_mode(0o755)).unwrap();
    build_image(&d, &served, V1, &["payload/box-config-daemon"], &[]);
    chown_tree(&served, 8152);
    let port = free_port();
    let run_sh = script(root, "docker-run.sh")
        .arg(&served)
        .arg(port.to_string())
        .arg("127.0.0.1")
        .env("DOCKER_HOST", engine.host())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("docker-run.log")).unwrap())
        .spawn()
        .unwrap();
    let mut run_sh = Running {
        child: run_sh,
        port,
    };
    wait_for_port(port, &mut run_sh.child);
    assert_eq!(http_get(port, "/version").2, V1.to_string());
    assert_eq!(
        engine.inspect("opq-update-server", "{{.Config.User}}"),
        "8152:8152"
    );
    assert_eq!(
        engine.inspect(
            "opq-update-server",
            "{{.HostConfig.ReadonlyRootfs}} {{.HostConfig.NetworkMode}} {{.HostConfig.CapDrop}}"
        ),
        "true host [ALL]"
    );
    // Ctrl-C: the docker client passes SIGINT on to the server, which stops; --rm removes it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(run_sh.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = run_sh.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "docker-run.sh did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(d.join("docker-run.log")).unwrap();
    assert!(status.success(), "docker-run.sh: {status}: {log}");
    assert!(log.contains("got SIGINT, stopping"), "{log}");
    assert_eq!(engine.ok(&["ps", "-aq"]), "", "--rm removed the container");
    step(&mut t, "scripts/docker-run.sh");

    // The engine stops by its pid, and nothing of it is left.
    let took = engine.shutdown();
    assert!(
        engine.processes().is_empty(),
        "processes of the engine left: {:?}",
        engine.processes()
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&*engine.exec.path().to_string_lossy()),
        "mounts left: {mounts}"
    );
    assert!(!engine.data.exists(), "the data root is removed");
    step(
        &mut t,
        &format!("engine stopped ({:.1} s)", took.as_secs_f64()),
    );
}
