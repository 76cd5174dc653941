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
