//! What the box-updater asks of systemd: telling it the page is ready (`sd_notify`), and whether
//! a release's units really came up after a boot, which is what confirming a release means.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

/// Tells systemd the service is ready (`Type=notify`): the page listens. Without a
/// `NOTIFY_SOCKET` (not started by systemd, or a test) it does nothing.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    use std::os::unix::net::UnixDatagram;
    let Ok(sock) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| sock.send_to_addr(b"READY=1", &addr))
    } else {
        sock.send_to(b"READY=1", Path::new(&path))
    };
    if let Err(e) = sent {
        log::warn!("cannot tell systemd the page is ready: {e}");
    }
}

/// Whether this process can ask systemd about the box's units: the box's root is the real one
/// and systemd runs it. In a `--root` sandbox there are no units to ask about.
pub fn manages(root: &Path) -> bool {
    std::fs::canonicalize(root).is_ok_and(|r| r == Path::new("/"))
        && Path::new("/run/systemd/system").is_dir()
}

/// A unit as `systemctl show` describes it, the properties a health check needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    pub result: String,
    pub restarts: u32,
    pub invocation: String,
    pub oneshot: bool,
    pub exited: bool,
}

impl UnitState {
    pub fn describe(&self) -> String {
        let mut s = format!("{} ({})", self.active, self.sub);
        if self.restarts > 0 {
            s.push_str(&format!(", restarted {} times", self.restarts));
        }
        if !self.result.is_empty() && self.result != "success" {
            s.push_str(&format!(", result {}", self.result));
        }
        s
    }
}

/// The state of each unit, from one `systemctl show` call.
pub fn unit_states(units: &[String]) -> std::io::Result<Vec<UnitState>> {
    if units.is_empty() {
        return Ok(Vec::new());
    }
    let out = Command::new("systemctl")
        .arg("show")
        .arg("--property=ActiveState,SubState,Result,NRestarts,InvocationID,Type,ExecMainExitTimestampMonotonic")
        .args(units)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "systemctl show failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_show(&String::from_utf8_lossy(&out.stdout)))
}

/// `systemctl show` prints one block of `Key=value` lines per unit, blocks split by a blank line.
fn parse_show(text: &str) -> Vec<UnitState> {
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        .map(|block| {
            let kv: HashMap<&str, &str> = block.lines().filter_map(|l| l.split_once('=')).collect();
            let get = |k: &str| kv.get(k).copied().unwrap_or("").to_string();
            UnitState {
                active: get("ActiveState"),
                sub: get("SubState"),
                result: get("Result"),
                restarts: get("NRestarts").parse().unwrap_or(0),
                invocation: get("InvocationID"),
                oneshot: get("Type") == "oneshot",
                exited: get("ExecMainExitTimestampMonotonic")
                    .parse::<u64>()
                    .unwrap_or(0)
                    > 0,
            }
        })
        .collect()
}

/// The units a release installs and enables: its unit files (`units::unit_files`) with a
/// `WantedBy=`, as `install_update.sh` enables them.
pub fn release_units(release: &Path) -> Vec<String> {
    crate::updater::units::unit_files(release)
        .into_iter()
        .filter(|(_, path)| {
            std::fs::read_to_string(path).is_ok_and(|t| {
                t.lines()
                    .any(|l| l.trim_start().starts_with("WantedBy=") && l.len() > 9)
            })
        })
        .map(|(name, _)| name)
        .collect()
}

/// Makes systemd read changed unit files, where it runs the box (`manages`).
pub fn daemon_reload(root: &Path) -> std::io::Result<()> {
    if !manages(root) {
        return Ok(());
    }
    let out = Command::new("systemctl").arg("daemon-reload").output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "systemctl daemon-reload failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_output_parses_per_unit() {
        let text = "ActiveState=active\nSubState=running\nResult=success\nNRestarts=0\nInvocationID=ab\nType=notify\nExecMainExitTimestampMonotonic=0\n\nActiveState=activating\nSubState=auto-restart\nResult=exit-code\nNRestarts=4\nInvocationID=cd\nType=simple\nExecMainExitTimestampMonotonic=123\n";
        let s = parse_show(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].active, "active");
        assert!(!s[0].exited);
        assert_eq!(s[1].restarts, 4);
        assert!(s[1].exited);
        assert_eq!(
            s[1].describe(),
            "activating (auto-restart), restarted 4 times, result exit-code"
        );
    }

    #[test]
    fn release_units_are_the_enabled_services_one_level_down() {
        let d = tempfile::tempdir().unwrap();
        let w = |p: &str, t: &str| {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, t).unwrap();
        };
        w("a/a.service", "[Install]\nWantedBy=multi-user.target\n");
        w("a/helper.service", "[Service]\nExecStart=/bin/true\n");
        w(
            "box-updater/box-updater-guard.service",
            "[Install]\nWantedBy=multi-user.target\n",
        );
        w(
            "b/deep/c.service",
            "[Install]\nWantedBy=multi-user.target\n",
        );
        w("top.service", "[Install]\nWantedBy=multi-user.target\n");
        assert_eq!(release_units(d.path()), vec!["a.service".to_string()]);
    }
}
