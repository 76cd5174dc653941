//! Which names the box's page answers to: its own addresses, its host name, `localhost` and the
//! operator's `--allowed-host` entries. Anything else is a DNS-rebinding page (a site whose name
//! was made to resolve to the box) or a misdirected request, and is refused before any handler
//! runs: the browser sends such a page's requests as same-origin, so no Origin check can tell.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How stale the list of the box's own addresses may be before a miss looks again: a DHCP lease
/// may move the box to a new address at any time.
const REFRESH: Duration = Duration::from_secs(2);

pub struct HostGuard {
    /// Lowercase names without a trailing dot: `localhost`, the host name, `<host name>.local`,
    /// the operator's entries.
    names: Vec<String>,
    /// `--allowed-host '*'`: every name, as before this guard existed.
    any: bool,
    /// The address the daemon listens on, when it is a specific one.
    listen: Option<IpAddr>,
    addrs: Mutex<(Instant, HashSet<IpAddr>)>,
}

impl HostGuard {
    /// `allowed` are the operator's extra names or addresses (a port, if given, is ignored).
    pub fn new(listen: Option<SocketAddr>, allowed: &[String]) -> HostGuard {
        let mut names = vec!["localhost".to_string()];
        if let Some(h) = own_host_name() {
            // Raspberry Pi OS answers mDNS for `<host name>.local` out of the box.
            if !h.contains('.') {
                names.push(format!("{h}.local"));
            } else if let Some(short) = h.split('.').next() {
                names.push(short.to_string());
            }
            names.push(h);
        }
        let mut any = false;
        for a in allowed {
            if a.trim() == "*" {
                any = true;
            } else if let Some(host) = normalize(a) {
                names.push(host);
            }
        }
        HostGuard {
            names,
            any,
            listen: listen.map(|l| l.ip()).filter(|ip| !ip.is_unspecified()),
            addrs: Mutex::new((Instant::now(), own_addresses())),
        }
    }

    /// Checks the authority a request names: the absolute-form target's when it has one (which
    /// then wins over `Host`, RFC 9112 3.2.2), else `Host`. A request without either (HTTP/1.0)
    /// comes from no browser and passes. Returns the refused name.
    pub fn check(&self, host_header: Option<&str>, target: &str) -> Result<(), String> {
        if self.any {
            return Ok(());
        }
        let authority = absolute_authority(target).or(host_header);
        let Some(authority) = authority else {
            return Ok(());
        };
        let Some(host) = normalize(authority) else {
            return Err(authority.to_string());
        };
        if self.allows(&host) {
            Ok(())
        } else {
            Err(host)
        }
    }

    fn allows(&self, host: &str) -> bool {
        if self.names.iter().any(|n| n == host) {
            return true;
        }
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        // A zone (`fe80::1%25eth0`) names the interface, not another host.
        let literal = literal.split("%25").next().unwrap_or(literal);
        let Ok(ip) = literal.parse::<IpAddr>() else {
            return false;
        };
        let ip = ip.to_canonical();
        if ip.is_loopback() || Some(ip) == self.listen {
            return true;
        }
        let mut addrs = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        if addrs.1.contains(&ip) {
            return true;
        }
        if addrs.0.elapsed() >= REFRESH {
            *addrs = (Instant::now(), own_addresses());
            return addrs.1.contains(&ip);
        }
        false
    }

    /// What the log says at start.
    pub fn describe(&self) -> String {
        if self.any {
            return "any host name (--allowed-host '*')".into();
        }
        let addrs = self.addrs.lock().unwrap_or_else(|e| e.into_inner());
        let mut ips: Vec<String> = addrs.1.iter().map(IpAddr::to_string).collect();
        ips.sort();
        format!("{}, {}", self.names.join(", "), ips.join(", "))
    }
}

/// `host[:port]`, `[v6]:port`, `v6` → the lowercase host without a trailing dot; `None` when it
/// is not a plausible host at all.
fn normalize(authority: &str) -> Option<String> {
    let a = authority.trim();
    let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
    let host = if let Some(rest) = a.strip_prefix('[') {
        let end = rest.find(']')?;
        let port = &rest[end + 1..];
        if !(port.is_empty() || port.strip_prefix(':').is_some_and(all_digits)) {
            return None;
        }
        &a[..end + 2]
    } else if a.matches(':').count() > 1 {
        // A bare IPv6 address (only from --allowed-host; a Host header brackets it).
        a
    } else {
        match a.split_once(':') {
            Some((h, port)) if all_digits(port) => h,
            Some(_) => return None,
            None => a,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._:[]%".contains(&b));
    ok.then(|| {
        if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        }
    })
}

fn all_digits(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_digit())
}

/// The authority of an absolute-form request target (`http://host:port/path`).
fn absolute_authority(target: &str) -> Option<&str> {
    let b = target.as_bytes();
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        let head = b.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme.as_bytes())
            .then(|| &target[scheme.len()..])
    })?;
    Some(rest.split(['/', '?']).next().unwrap_or(rest))
}

fn own_host_name() -> Option<String> {
    let name = nix::unistd::gethostname().ok()?;
    let name = name
        .to_str()?
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    (!name.is_empty() && name != "localhost").then_some(name)
}

/// Every address of every interface of the box, now.
fn own_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(list) => {
            for ifa in list {
                let Some(addr) = ifa.address else { continue };
                if let Some(v4) = addr.as_sockaddr_in() {
                    out.insert(IpAddr::V4(v4.ip()));
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    out.insert(IpAddr::V6(v6.ip()).to_canonical());
                }
            }
        }
        Err(e) => log::warn!("cannot list the box's addresses: {e}"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(extra: &[&str]) -> HostGuard {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        HostGuard::new(Some("0.0.0.0:8080".parse().unwrap()), &extra)
    }

    #[test]
    fn names_and_ports_normalize() {
        for (a, want) in [
            ("Box.Example.:8080", Some("box.example")),
            ("localhost", Some("localhost")),
            ("127.0.0.1:18080", Some("127.0.0.1")),
            ("[::1]:8080", Some("[::1]")),
            ("[::1]", Some("[::1]")),
            ("::1", Some("[::1]")),
            ("[::1]x", None),
            ("box:port", None),
            ("", None),
            ("a b", None),
            ("evil.example/x", None),
        ] {
            assert_eq!(normalize(a).as_deref(), want, "{a:?}");
        }
    }

    #[test]
    fn the_box_answers_to_its_own_names_only() {
        let g = guard(&["opq-7.campus.example", "10.9.8.7:8080"]);
        for ok in [
            "localhost:8080",
            "LOCALHOST",
            "127.0.0.1:8080",
            "127.0.0.2",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:8080",
            "opq-7.campus.example",
            "opq-7.campus.example.:80",
            "10.9.8.7:9999",
        ] {
            assert_eq!(g.check(Some(ok), "/"), Ok(()), "{ok}");
        }
        for bad in [
            "evil.example:18080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "203.0.113.9:8080",
            "evil.example:8080:1",
            "",
        ] {
            assert!(g.check(Some(bad), "/").is_err(), "{bad}");
        }
        // An absolute-form target names the host, whatever Host says.
        assert!(
            g.check(Some("localhost"), "http://evil.example:8080/box_config")
                .is_err()
        );
        assert!(g.check(Some("evil.example"), "HTTP://localhost/").is_ok());
        assert_eq!(g.check(None, "/"), Ok(()), "HTTP/1.0 without Host");
    }

    #[test]
    fn the_box_knows_its_host_name_and_addresses() {
        let g = guard(&[]);
        if let Some(h) = own_host_name() {
            assert!(g.check(Some(&format!("{h}:8080")), "/").is_ok(), "{h}");
        }
        for ip in own_addresses() {
            let host = match ip {
                IpAddr::V4(v4) => v4.to_string(),
                IpAddr::V6(v6) => format!("[{v6}]"),
            };
            assert!(g.check(Some(&host), "/").is_ok(), "{host}");
        }
    }

    #[test]
    fn a_star_turns_the_guard_off() {
        assert!(guard(&["*"]).check(Some("evil.example"), "/").is_ok());
    }
}
