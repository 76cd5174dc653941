//! Shared test harness: a temp directory per test, the real binaries, free ports, sample images.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BUILD_UPDATE: &str = env!("CARGO_BIN_EXE_build-update");
pub const UPDATE_SERVER: &str = env!("CARGO_BIN_EXE_update-server");
pub const BOX_UPDATER: &str = env!("CARGO_BIN_EXE_box-updater");

/// One test's own directory, removed when the test ends.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Self {
        Dir {
            tmp: tempfile::Builder::new()
                .prefix("opq-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.tmp.path().join(p)
    }
    /// Creates `rel` (and its parents) with `content`.
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
        let p = self.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        p
    }
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// A command for one of the project's binaries, with proxies off for loopback.
pub fn cmd(bin: &str) -> Command {
    let mut c = Command::new(bin);
    c.env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost");
    c.env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY");
    c.env_remove("ALL_PROXY").env_remove("all_proxy");
    c
}

pub fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null()).output().expect("running a binary")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a shell command line; panics with its output when it fails.
pub fn sh(dir: &Path, line: &str) -> String {
    let o = Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "`{line}` failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Runs a shell command line and returns whether it succeeded.
pub fn sh_ok(dir: &Path, line: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(dir)
        .output()
        .unwrap()
        .status
        .success()
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
pub fn wait_for_port(port: u16, child: &mut Child) {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("process exited before listening on {port}: {status}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("nothing listens on {port} after 20 s");
}

/// A child process killed when the test ends, whatever way it ends.
pub struct Running {
    pub child: Child,
    pub port: u16,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds an image of `payloads` (paths relative to `dir`) at `version` into `out`; returns its path.
pub fn build_image(
    dir: &Dir,
    out: &Path,
    version: u64,
    payloads: &[&str],
    extra: &[&str],
) -> PathBuf {
    let mut c = cmd(BUILD_UPDATE);
    c.current_dir(dir.path())
        .arg("--out")
        .arg(out)
        .arg("--version")
        .arg(version.to_string());
    c.args(extra).args(payloads);
    let o = run(&mut c);
    assert!(o.status.success(), "build-update failed: {}", stderr(&o));
    PathBuf::from(stdout(&o).lines().last().expect("image path on stdout"))
}

/// A small payload like a box's services: a config daemon with a script and a unit.
pub fn sample_payload(dir: &Dir, label: &str) -> PathBuf {
    dir.write(
        "payload/box-config-daemon/config.json",
        format!("{{\"label\": \"{label}\"}}\n"),
    );
    let bin = dir.write(
        "payload/box-config-daemon/run.sh",
        "#!/bin/sh\necho running\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.write(
        "payload/box-config-daemon/box-config-daemon.service",
        "[Unit]\nDescription=OPQ box config daemon\n[Service]\nExecStart=/opt/opq/current/box-config-daemon/run.sh\n[Install]\nWantedBy=multi-user.target\n",
    );
    dir.join("payload/box-config-daemon")
}

/// Lists the entries of a directory tree, relative, sorted; for "nothing changed" checks.
pub fn tree(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                walk(root, &p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Starts the real update-server over `dir` on a free port.
pub fn start_update_server(dir: &Path) -> Running {
    start_update_server_with(dir, &[])
}

/// The same, with more flags (e.g. `--public-base-url`).
pub fn start_update_server_with(dir: &Path, extra: &[&str]) -> Running {
    let port = free_port();
    let mut child = cmd(UPDATE_SERVER)
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting update-server");
    wait_for_port(port, &mut child);
    Running { child, port }
}

/// A sandboxed box: its root, its config naming the server, and a recording reboot command.
pub struct BoxUnderTest {
    pub root: PathBuf,
    pub config: PathBuf,
    pub reboots: PathBuf,
    /// `--reserve-mib`, for boxes on a deliberately small disk.
    pub reserve_mib: Option<u64>,
    /// Runs another box-updater build (e.g. an ARM one under qemu): program and leading args.
    pub runner: Option<Vec<String>>,
}

impl BoxUnderTest {
    pub fn new(dir: &Dir, name: &str, server: &str) -> Self {
        let root = dir.mkdir(&format!("{name}/root"));
        let config = dir.write(
            &format!("{name}/box_config.json"),
            format!("{{\"updates_ep\": \"{server}\", \"box_id\": 7, \"calibration\": {{\"gain\": 1.5}}}}\n"),
        );
        let reboots = dir.join(format!("{name}/reboots"));
        BoxUnderTest {
            root,
            config,
            reboots,
            reserve_mib: None,
            runner: None,
        }
    }

    /// `box-updater <args> --root … --box-config … --reboot-command …`, fast retries.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = match &self.runner {
            Some(r) => {
                let mut c = cmd(&r[0]);
                c.args(&r[1..]);
                c
            }
            None => cmd(BOX_UPDATER),
        };
        c.args(args)
            .arg("--root")
            .arg(&self.root)
            .arg("--box-config")
            .arg(&self.config)
            .arg("--reboot-command")
            .arg(format!("echo reboot >> '{}'", self.reboots.display()))
            .args(["--retry-delay-ms", "50"])
            .args(if args.contains(&"--network-timeout") {
                &[][..]
            } else {
                &["--network-timeout", "5"][..]
            })
            .env("RUST_LOG", "warn");
        if let Some(r) = self.reserve_mib {
            c.arg("--reserve-mib").arg(r.to_string());
        }
        c
    }

    /// Rewrites the box config so that `updates_ep` names `url`.
    pub fn point_at(&self, url: &str) {
        std::fs::write(&self.config, format!("{{\"updates_ep\": \"{url}\"}}\n")).unwrap();
    }

    pub fn run(&self, args: &[&str]) -> Output {
        run(&mut self.cmd(args))
    }

    pub fn reboot_count(&self) -> usize {
        std::fs::read_to_string(&self.reboots)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    pub fn current(&self) -> Option<String> {
        std::fs::read_link(self.root.join("opt/opq/current"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    pub fn current_version(&self) -> Option<u64> {
        self.current()?
            .strip_prefix("releases/opq-box-update-")?
            .parse()
            .ok()
    }

    pub fn releases(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root.join("opt/opq/releases"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn status(&self) -> serde_json::Value {
        let o = self.run(&["status"]);
        assert!(o.status.success(), "status failed: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).expect("status is JSON")
    }

    /// `current` points at a complete release: its SHA256SUMS passes.
    pub fn assert_current_complete(&self) {
        let cur = self.root.join("opt/opq/current");
        assert!(
            cur.join("SHA256SUMS").is_file(),
            "current has no SHA256SUMS: {:?}",
            self.current()
        );
        assert!(
            sh_ok(&cur, "sha256sum -c --quiet SHA256SUMS"),
            "current release fails its SHA256SUMS"
        );
    }
}

/// Moves every file of a build's `--out` directory into a served directory by rename, as a
/// publisher would: sidecars first, the image last, so a watcher never sees an image alone.
pub fn publish_dir(from: &Path, to: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort_by_key(|n| n.to_string_lossy().ends_with(".tar.bz2"));
    for n in names {
        std::fs::rename(from.join(&n), to.join(&n)).unwrap();
    }
}

/// Reads one request head (through the blank line) from a proxy's client, byte by byte so that
/// nothing after it is consumed; `None` when the client goes away first.
pub fn read_head(s: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut req = Vec::new();
    let mut b = [0u8; 1];
    while !req.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).ok()? == 0 {
            return None;
        }
        req.push(b[0]);
    }
    Some(req)
}

/// A relayed request with `Connection: close`, so that the upstream ends its answer with EOF.
pub fn close_request(req: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(req);
    let mut lines: Vec<&str> = text
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    lines.truncate(lines.len().saturating_sub(2));
    (lines.join("\r\n") + "\r\nConnection: close\r\n\r\n").into_bytes()
}

/// `build-update keygen` into `dir` as `<name>.key` / `<name>.pub`.
pub fn keygen(dir: &Dir, name: &str) {
    let (sk, pk) = (format!("{name}.key"), format!("{name}.pub"));
    let o = run(cmd(BUILD_UPDATE).current_dir(dir.path()).args([
        "keygen",
        "--secret-key",
        &sk,
        "--public-key",
        &pk,
    ]));
    assert!(o.status.success(), "keygen failed: {}", stderr(&o));
}

/// A one-shot `GET` over loopback: (status, head, body); status 0 when the answer is not HTTP.
pub fn http_get(port: u16, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// Waits until the update-server on `port` names `version` as its newest.
pub fn wait_listed(port: u16, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while http_get(port, "/version").2.trim() != version.to_string() {
        assert!(
            Instant::now() < deadline,
            "the server never listed {version}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One request over loopback with any method, headers and body: (status, head, body).
pub fn http_send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// Starts update-server over `dir` on a free port with `extra` flags and `env`, its log in
/// `log`.
pub fn start_update_server_logged(
    dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> Running {
    // A port among the flags is kept (a restart on the same port); else a free one.
    let given = extra
        .iter()
        .position(|a| *a == "--port")
        .and_then(|i| extra.get(i + 1))
        .and_then(|p| p.parse().ok());
    let port = given.unwrap_or_else(free_port);
    let mut c = cmd(UPDATE_SERVER);
    c.args(["--bind", "127.0.0.1"]);
    if given.is_none() {
        c.args(["--port", &port.to_string()]);
    }
    c.args(extra)
        .arg("--dir")
        .arg(dir)
        .env_remove("BOX_UPDATE_SERVER_SETTINGS")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        )
        .spawn()
        .expect("starting update-server");
    wait_for_port(port, &mut child);
    Running { child, port }
}

/// Stops a server with SIGTERM and waits for it to end (it writes what it holds first).
pub fn stop_gracefully(mut r: Running) {
    let pid = nix::unistd::Pid::from_raw(r.child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(15);
    while r.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A real PostgreSQL server (Debian's binaries) on a temp directory and a free loopback port,
/// run as `nobody` when the tests run as root (PostgreSQL refuses root); stopped and removed
/// when dropped.
pub struct Postgres {
    tmp: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
}

impl Postgres {
    fn bin_dir() -> PathBuf {
        let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
            .unwrap_or_default();
        found.retain(|p| p.join("initdb").is_file());
        found.sort();
        found.pop().unwrap_or_else(|| {
            panic!(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): scripts/test.sh \
                 installs the Debian package postgresql"
            )
        })
    }

    /// A command of PostgreSQL's, as the unprivileged owner of the data directory.
    fn pg(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        let mut c = if nix::unistd::geteuid().is_root() {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .arg(exe);
            c
        } else {
            Command::new(exe)
        };
        c.env("HOME", self.tmp.path()).current_dir(self.tmp.path());
        c
    }

    pub fn start() -> Postgres {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::Builder::new()
            .prefix("opq-pg-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        if nix::unistd::geteuid().is_root() {
            let nobody = Some(nix::unistd::Uid::from_raw(65534));
            nix::unistd::chown(tmp.path(), nobody, Some(nix::unistd::Gid::from_raw(65534)))
                .unwrap();
        }
        let pg = Postgres {
            tmp,
            bin: Self::bin_dir(),
            port: free_port(),
        };
        let data = pg.tmp.path().join("data");
        let o = run(pg.pg("initdb").arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "fleet",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
        ]));
        assert!(
            o.status.success(),
            "initdb failed: {}{}",
            stdout(&o),
            stderr(&o)
        );
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            pg.port,
            pg.tmp.path().display()
        );
        let o = run(pg
            .pg("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &opts, "-l"])
            .arg(pg.tmp.path().join("log"))
            .args(["-w", "-t", "60", "start"]));
        assert!(
            o.status.success(),
            "pg_ctl start failed: {}{}{}",
            stdout(&o),
            stderr(&o),
            std::fs::read_to_string(pg.tmp.path().join("log")).unwrap_or_default()
        );
        pg
    }

    /// The URL of database `postgres` as the superuser `fleet`.
    pub fn url(&self) -> String {
        format!("postgres://fleet@127.0.0.1:{}/postgres", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.tmp.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.tmp.path().join("data");
        let _ = run(self
            .pg("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "-t", "30", "stop"]));
    }
}

/// Polls `f` until it holds; panics with `what` after `within`. Returns how long it took.
pub fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if f() {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what}: not within {within:?}");
}
