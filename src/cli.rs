//! What the three programs share at their edges: logging setup and turning errors into exits.

use std::io::{self, IsTerminal};
use std::net::{IpAddr, SocketAddr, TcpListener};

/// Starts logging to stderr at the level in `RUST_LOG` (default `info`), in short lines.
pub fn init_logging() {
    let env = env_logger::Env::default().default_filter_or("info");
    env_logger::Builder::from_env(env)
        .format_target(false)
        .format_timestamp_millis()
        .init();
}

/// Prints an error chain as one line, `program: error: outer: inner`, and exits with `code`.
pub fn exit_with_error(program: &str, err: &anyhow::Error, code: i32) -> ! {
    eprintln!("{program}: error: {err:#}");
    std::process::exit(code)
}

const ADDRESS_EXAMPLES: &str =
    "127.0.0.1 (this machine only), 0.0.0.0 (every IPv4 address) or :: (every address)";

/// An IP address to listen on, for clap and the settings JSON. Host names are not resolved (a
/// server should listen where it was told, not wherever a name points today): the error says
/// which address to write instead.
pub fn parse_ip(text: &str) -> Result<IpAddr, String> {
    if let Ok(ip) = text.parse() {
        return Ok(ip);
    }
    if let Ok(sock) = text.parse::<SocketAddr>() {
        return Err(format!(
            "{text:?} has a port: give the address alone ({}) and the port with the port setting",
            sock.ip()
        ));
    }
    Err(match text.to_ascii_lowercase().as_str() {
        "localhost" => "host names are not resolved: for localhost, give 127.0.0.1 (or ::1)".into(),
        "" => format!("give an IP address, e.g. {ADDRESS_EXAMPLES}"),
        _ => format!(
            "{text:?} is not an IP address (host names are not resolved; resolve it first, e.g. with `getent hosts {text}`): give e.g. {ADDRESS_EXAMPLES}"
        ),
    })
}

/// `ADDR:PORT` to listen on (box-updater's `--listen`), with an example when it is not one.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let example = "e.g. 0.0.0.0:8080 (every address) or 127.0.0.1:8080 (this machine only)";
    if text.parse::<u16>().is_ok() {
        return Err(format!(
            "{text:?} is a port alone: give ADDR:PORT, {example}"
        ));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => Err(match host {
            "" => format!(
                "give the address too, e.g. 0.0.0.0:{port} (every address) or 127.0.0.1:{port} (this machine only)"
            ),
            h if h.eq_ignore_ascii_case("localhost") => {
                format!("host names are not resolved: for localhost, give 127.0.0.1:{port}")
            }
            h => format!(
                "{h:?} is not an IP address (host names are not resolved): give ADDR:PORT, {example}"
            ),
        }),
        _ => Err(format!("give ADDR:PORT, {example}")),
    }
}

/// Listens on `addr`; when it can't, the error says why and what to do. `change` names how the
/// user picks another address or port (e.g. `--port N`).
pub fn listen(addr: SocketAddr, change: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::AddrInUse => format!(
                "another program (perhaps another copy of this one) listens there: stop it, or choose another port with {change}"
            ),
            io::ErrorKind::PermissionDenied if addr.port() < 1024 => format!(
                "ports below 1024 need root (or CAP_NET_BIND_SERVICE): choose a port from 1024 up with {change}"
            ),
            io::ErrorKind::AddrNotAvailable => format!(
                "this machine has no address {}: give one of its own, e.g. {ADDRESS_EXAMPLES}, with {change}",
                addr.ip()
            ),
            _ => format!("choose another address or port with {change}"),
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}; {hint}")
    })
}

/// Progress of a long job on stderr: a bar on a terminal, a few plain lines otherwise. Quiet for
/// small jobs, where it would only be noise.
pub struct StderrProgress {
    label: String,
    total: u64,
    tty: bool,
    shown: bool,
    last_step: u64,
}

impl StderrProgress {
    pub const QUIET_BELOW: u64 = 16 << 20;

    pub fn new(label: &str) -> Self {
        StderrProgress {
            label: label.into(),
            total: 0,
            tty: std::io::stderr().is_terminal(),
            shown: false,
            last_step: 0,
        }
    }

    fn mib(n: u64) -> f64 {
        n as f64 / (1 << 20) as f64
    }
}

impl crate::build::Progress for StderrProgress {
    fn start(&mut self, total: u64) {
        self.total = total;
        self.shown = total >= Self::QUIET_BELOW;
    }

    fn advance(&mut self, done: u64) {
        if !self.shown || self.total == 0 {
            return;
        }
        let pct = done.min(self.total) * 100 / self.total;
        if self.tty {
            // Redraw at most once a percent.
            if pct != self.last_step || done == 0 {
                self.last_step = pct;
                let filled = (pct / 4) as usize;
                eprint!(
                    "\r{} [{}{}] {pct:3}% {:.1}/{:.1} MiB",
                    self.label,
                    "#".repeat(filled),
                    " ".repeat(25 - filled),
                    Self::mib(done),
                    Self::mib(self.total)
                );
            }
        } else {
            let step = pct / 25;
            if step > self.last_step && step < 4 {
                self.last_step = step;
                eprintln!(
                    "{}: {pct}% ({:.1} of {:.1} MiB)",
                    self.label,
                    Self::mib(done),
                    Self::mib(self.total)
                );
            }
        }
    }

    fn finish(&mut self) {
        if !self.shown {
            return;
        }
        if self.tty {
            eprintln!();
        }
        eprintln!("{}: done ({:.1} MiB)", self.label, Self::mib(self.total));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_and_what_to_write_instead() {
        assert_eq!(
            parse_listen("127.0.0.1:8080").unwrap(),
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap()
        );
        assert!(parse_listen("[::]:8080").is_ok());
        for (text, want) in [
            ("8080", "is a port alone: give ADDR:PORT, e.g. 0.0.0.0:8080"),
            ("localhost:8080", "give 127.0.0.1:8080"),
            (":8080", "give the address too, e.g. 0.0.0.0:8080"),
            ("box.local:80", "\"box.local\" is not an IP address"),
            ("127.0.0.1", "give ADDR:PORT"),
            ("127.0.0.1:99999", "give ADDR:PORT"),
        ] {
            let err = parse_listen(text).unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn bind_addresses_and_what_to_write_instead() {
        assert_eq!(parse_ip("::1").unwrap().to_string(), "::1");
        for (text, want) in [
            ("localhost", "give 127.0.0.1"),
            ("LOCALHOST", "give 127.0.0.1"),
            (
                "127.0.0.1:8151",
                "has a port: give the address alone (127.0.0.1)",
            ),
            ("", "give an IP address"),
            ("updates.example.org", "getent hosts updates.example.org"),
        ] {
            let err = parse_ip(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn a_port_in_use_suggests_another() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let err = listen(taken.local_addr().unwrap(), "--port N").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("cannot listen on 127.0.0.1:")
                && msg.contains("choose another port with --port N"),
            "{msg}"
        );
    }
}
