//! Scale-out: update-server with `--public-base-url` keeps only the index endpoints and sends the
//! image bytes to nginx (Debian's), as it would to a CDN or an S3-compatible store.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

use crate::util::*;

const V1: u64 = 1_700_000_001;

struct Nginx {
    child: std::process::Child,
    port: u16,
    access_log: std::path::PathBuf,
}

impl Nginx {
    /// nginx runs in a process group of its own: the master's pid.
    fn group(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

impl Drop for Nginx {
    /// The way nginx wants to be stopped: SIGQUIT, and the master lets its workers finish, reaps
    /// them and exits. (A SIGKILL of the master alone would orphan the workers, listening on.)
    /// Should it not be gone within 10 s, the whole group is killed.
    fn drop(&mut self) {
        let _ = kill(self.group(), Signal::SIGQUIT);
        let t0 = Instant::now();
        while let Ok(None) = self.child.try_wait() {
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = killpg(self.group(), Signal::SIGKILL);
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// nginx in the foreground, serving `dir` at `/boxes/` on a free port (over TLS with `tls`:
/// certificate and key files).
fn start_nginx(d: &Dir, dir: &std::path::Path) -> Nginx {
    start_nginx_with(d, dir, None)
}

fn start_nginx_with(
    d: &Dir,
    dir: &std::path::Path,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> Nginx {
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nginx is not installed: run scripts/test.sh (it installs nginx-light)");
    let port = free_port();
    let conf_dir = d.mkdir("nginx");
    let access_log = conf_dir.join("access.log");
    // Running as root, nginx's workers would otherwise drop to a user that can't read a temp dir.
    let user = if nix::unistd::geteuid().is_root() {
        "user root;"
    } else {
        ""
    };
    let conf = format!(
        "{user}\nworker_processes 1;\ndaemon off;\npid {c}/nginx.pid;\nerror_log {c}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log {log};\n  client_body_temp_path {c};\n  proxy_temp_path {c};\n  fastcgi_temp_path {c};\n  uwsgi_temp_path {c};\n  scgi_temp_path {c};\n\
           server {{ listen 127.0.0.1:{port}{ssl}; {certs} location /boxes/ {{ alias {dir}/; }} }}\n}}\n",
        c = conf_dir.display(),
        log = access_log.display(),
        dir = dir.display(),
        ssl = if tls.is_some() { " ssl" } else { "" },
        certs = tls
            .map(|(c, k)| format!(
                "ssl_certificate {}; ssl_certificate_key {};",
                c.display(),
                k.display()
            ))
            .unwrap_or_default(),
    );
    let conf_path = conf_dir.join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&conf_dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child);
    Nginx {
        child,
        port,
        access_log,
    }
}

fn location(resp: &str) -> Option<String> {
    resp.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("location")
            .then(|| v.trim().to_string())
    })
}

#[test]
fn images_are_served_by_nginx_while_update_server_keeps_the_index() {
    let d = Dir::new();
    let updates = d.mkdir("updates");
    sample_payload(&d, "cdn");
    let image = build_image(&d, &updates, V1, &["payload/box-config-daemon"], &[]);
    let name = image.file_name().unwrap().to_str().unwrap().to_string();
    let nginx = start_nginx(&d, &updates);
    let base = format!("http://127.0.0.1:{}/boxes", nginx.port);

    let url = format!("{base}/");
    let server = start_update_server_with(&updates, &["--public-base-url", &url]);
    let port = server.port;

    assert_eq!(http_get(port, "/version").2, V1.to_string());
    let (status, resp, _) = http_get(port, "/latest");
    assert_eq!(status, 303);
    assert_eq!(
        location(&resp).as_deref(),
        Some(format!("{base}/{name}").as_str())
    );
    let (status, resp, _) = http_get(port, &format!("/update/{name}.sha256"));
    assert_eq!(status, 302);
    assert_eq!(
        location(&resp).as_deref(),
        Some(format!("{base}/{name}.sha256").as_str())
    );
    // Names outside the index are still 404 here, never redirected.
    assert_eq!(http_get(port, "/update/secret.txt").0, 404);
    assert_eq!(http_get(port, "/update/..%2fetc%2fpasswd").0, 404);

    // An old box: wget follows /latest to nginx and saves the image.
    let got = d.join("wget.tar.bz2");
    let o = Command::new("wget")
        .args(["-q", "-O"])
        .arg(&got)
        .arg(server.url("/latest"))
        .env("no_proxy", "*")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(&got).unwrap(), std::fs::read(&image).unwrap());

    // A new box: box-updater follows the redirect and fetches the image and sidecar from nginx.
    let b = BoxUnderTest::new(&d, "box", &server.url(""));
    let o = b.run(&["update"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.current_version(), Some(V1));
    b.assert_current_complete();
    let log = std::fs::read_to_string(&nginx.access_log).unwrap();
    assert!(
        log.contains(&format!("GET /boxes/{name} ")),
        "nginx served the image: {log}"
    );
    assert!(
        log.contains(&format!("GET /boxes/{name}.sha256 ")),
        "and its sidecar: {log}"
    );

    // Stopped, nginx leaves no worker behind: its process group is empty.
    let group = nginx.group();
    drop(nginx);
    assert_eq!(
        killpg(group, None),
        Err(nix::errno::Errno::ESRCH),
        "nginx's workers outlived it"
    );
}

/// A private CA and a certificate for 127.0.0.1 signed by it: (ca.pem, server.pem, server.key).
fn make_ca(d: &Dir) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = d.mkdir("tls");
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh(
        &dir,
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=opq-test-ca 2>/dev/null && \
         openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null && \
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext 2>/dev/null",
    );
    (dir.join("ca.pem"), dir.join("srv.pem"), dir.join("srv.key"))
}

#[test]
fn https_with_a_private_ca_needs_the_ca_file() {
    let d = Dir::new();
    let updates = d.mkdir("updates");
    sample_payload(&d, "tls");
    build_image(&d, &updates, V1, &["payload/box-config-daemon"], &[]);
    let (ca, cert, key) = make_ca(&d);
    let nginx = start_nginx_with(&d, &updates, Some((&cert, &key)));
    let url = format!("https://127.0.0.1:{}/boxes", nginx.port);
    let server = start_update_server_with(&updates, &["--public-base-url", &url]);
    let b = BoxUnderTest::new(&d, "box", &server.url(""));
    // The bundled roots don't know this CA: refused, nothing installed.
    let o = b.run(&["update", "--retries", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--ca-file"),
        "the error says what to do: {}",
        stderr(&o)
    );
    assert_eq!(b.current_version(), None);
    // With the CA file the same update goes through over TLS.
    let o = b.run(&["update", "--ca-file", ca.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(b.current_version(), Some(V1));
    b.assert_current_complete();
}
