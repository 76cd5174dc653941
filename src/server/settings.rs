//! The server's settings: command-line flags over `BOX_UPDATE_SERVER_SETTINGS` over defaults.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The environment variable of the original docker deployment.
pub const SETTINGS_ENV: &str = "BOX_UPDATE_SERVER_SETTINGS";
pub const DEFAULT_PORT: u16 = 8151;
pub const DEFAULT_DIR: &str = "/var/opq/box-updates";
const DEFAULT_TIMEOUT_SECS: u64 = 30;
const DEFAULT_RESCAN_SECS: u64 = 30;
/// Open connections: each costs a socket and a few hundred bytes, so the bound is the
/// file-descriptor limit in practice.
const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub dir: PathBuf,
    pub bind: IpAddr,
    pub port: u16,
    /// How long a client may stay silent (between requests, or mid-request) or leave a response
    /// unread before its connection is dropped.
    pub timeout: Duration,
    /// How often the directory is listed in full, for file systems where inotify misses events.
    pub rescan: Duration,
    /// Connections open at once (a socket and a few hundred bytes each, in the event loops);
    /// beyond this, or the open-file limit, new clients get 503.
    pub max_connections: usize,
    /// Where the image files are served from when they are not served here (a CDN, an
    /// S3-compatible store, nginx): `/latest` and `/update/<name>` redirect to `<URL>/<name>`.
    pub public_base_url: Option<String>,
}

/// What the command line gave; `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub dir: Option<PathBuf>,
    pub port: Option<u16>,
    pub bind: Option<IpAddr>,
    pub timeout_secs: Option<u64>,
    pub public_base_url: Option<String>,
}

/// What the environment's JSON gave.
#[derive(Debug, Default, PartialEq)]
struct EnvSettings {
    dir: Option<PathBuf>,
    port: Option<u16>,
    bind: Option<IpAddr>,
    timeout_secs: Option<u64>,
    rescan_secs: Option<u64>,
    max_connections: Option<usize>,
    public_base_url: Option<String>,
}

/// A base URL the boxes can fetch from: http(s), a host, no query; kept without a trailing slash.
fn base_url(url: &str) -> Result<String> {
    crate::updater::config::check_url(url).context("public base URL")?;
    if url.contains(['?', '#']) {
        bail!("public base URL {url:?} must not have a query or fragment");
    }
    Ok(url.trim_end_matches('/').to_string())
}

impl Settings {
    /// Merges flags, the environment's JSON (the text of `BOX_UPDATE_SERVER_SETTINGS`, if set)
    /// and the defaults. Flags win.
    pub fn resolve(flags: Flags, env_json: Option<&str>) -> Result<Settings> {
        let env = match env_json.map(str::trim).filter(|s| !s.is_empty()) {
            Some(text) => parse_env(text).with_context(|| format!("bad {SETTINGS_ENV}"))?,
            None => EnvSettings::default(),
        };
        let positive = |n: u64, what: &str| -> Result<Duration> {
            if n == 0 {
                bail!("{what} must be at least 1 second");
            }
            Ok(Duration::from_secs(n))
        };
        let max_connections = env.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            bail!("max_connections must be at least 1");
        }
        Ok(Settings {
            dir: flags
                .dir
                .or(env.dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR)),
            bind: flags
                .bind
                .or(env.bind)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            port: flags.port.or(env.port).unwrap_or(DEFAULT_PORT),
            timeout: positive(
                flags
                    .timeout_secs
                    .or(env.timeout_secs)
                    .unwrap_or(DEFAULT_TIMEOUT_SECS),
                "the timeout",
            )?,
            rescan: positive(
                env.rescan_secs.unwrap_or(DEFAULT_RESCAN_SECS),
                "rescan_secs",
            )?,
            max_connections,
            public_base_url: flags
                .public_base_url
                .or(env.public_base_url)
                .map(|u| base_url(&u))
                .transpose()?,
        })
    }

    /// Reads the settings from the flags and the process environment.
    pub fn from_env(flags: Flags) -> Result<Settings> {
        let env = std::env::var(SETTINGS_ENV).ok();
        Settings::resolve(flags, env.as_deref())
    }
}

fn parse_env(text: &str) -> Result<EnvSettings> {
    let value: Value = serde_json::from_str(text).context("it is not JSON")?;
    let Value::Object(map) = value else {
        bail!(
            "it must be a JSON object such as {{\"port\": 8151, \"updates_dir\": \"{DEFAULT_DIR}\"}}"
        );
    };
    let mut out = EnvSettings::default();
    for (key, v) in &map {
        match key.as_str() {
            "port" => out.port = Some(number(v, key)?),
            "updates_dir" => {
                let s = v
                    .as_str()
                    .with_context(|| format!("\"updates_dir\" must be a string, not {v}"))?;
                if s.is_empty() {
                    bail!("\"updates_dir\" is empty");
                }
                out.dir = Some(PathBuf::from(s));
            }
            "bind" => {
                let s = v
                    .as_str()
                    .with_context(|| format!("\"bind\" must be a string, not {v}"))?;
                out.bind =
                    Some(crate::cli::parse_ip(s).map_err(|e| anyhow::anyhow!("\"bind\": {e}"))?);
            }
            "timeout_secs" => out.timeout_secs = Some(number(v, key)?),
            "rescan_secs" => out.rescan_secs = Some(number(v, key)?),
            "max_connections" => out.max_connections = Some(number(v, key)?),
            "public_base_url" => {
                let s = v
                    .as_str()
                    .with_context(|| format!("\"public_base_url\" must be a string, not {v}"))?;
                out.public_base_url = Some(s.to_string());
            }
            // The deployment's JSON may carry keys meant for other services.
            other => log::warn!("ignoring unknown setting {other:?} in {SETTINGS_ENV}"),
        }
    }
    Ok(out)
}

/// A non-negative integer that fits `T`. A string of digits (env files and templates tend to
/// quote everything) is read as its number with a warning, rather than refused: a deployment that
/// ran with it before keeps running, and its log says what to fix.
fn number<T: TryFrom<u64>>(v: &Value, key: &str) -> Result<T> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            let n = s.parse().ok();
            if let Some(n) = n {
                log::warn!(
                    "{SETTINGS_ENV}: {key:?} is the string {s:?}; read as the number {n} (write it without quotes)"
                );
            }
            n
        }
        _ => None,
    };
    n.and_then(|n| T::try_from(n).ok())
        .with_context(|| format!("{key:?} must be a non-negative integer in range, not {v}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_flags_or_env() {
        let s = Settings::resolve(Flags::default(), None).unwrap();
        assert_eq!(s.port, 8151);
        assert_eq!(s.dir, PathBuf::from("/var/opq/box-updates"));
        assert_eq!(s.bind, IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(s.timeout, Duration::from_secs(30));
        assert_eq!(Settings::resolve(Flags::default(), Some("  ")).unwrap(), s);
    }

    #[test]
    fn env_json_of_the_docker_deployment_is_read() {
        let s = Settings::resolve(
            Flags::default(),
            Some(r#"{"port": 9000, "updates_dir": "/srv/u", "bind": "127.0.0.1", "timeout_secs": "5"}"#),
        )
        .unwrap();
        assert_eq!(s.port, 9000);
        assert_eq!(s.dir, PathBuf::from("/srv/u"));
        assert_eq!(s.bind, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(s.timeout, Duration::from_secs(5));
    }

    #[test]
    fn flags_win_over_env() {
        let flags = Flags {
            dir: Some("/a".into()),
            port: Some(1),
            bind: Some("::1".parse().unwrap()),
            timeout_secs: Some(2),
            public_base_url: Some("https://cdn.example/boxes/".into()),
        };
        let s = Settings::resolve(
            flags,
            Some(r#"{"port": 9000, "updates_dir": "/b", "bind": "127.0.0.1", "timeout_secs": 9}"#),
        )
        .unwrap();
        assert_eq!(
            (s.dir, s.port, s.bind.to_string(), s.timeout.as_secs()),
            (PathBuf::from("/a"), 1, "::1".to_string(), 2)
        );
        assert_eq!(
            s.public_base_url.as_deref(),
            Some("https://cdn.example/boxes")
        );
        let bad = Flags {
            public_base_url: Some("ftp://x".into()),
            ..Flags::default()
        };
        assert!(Settings::resolve(bad, None).is_err());
    }

    #[test]
    fn bad_env_json_is_a_clear_error() {
        for (text, want) in [
            ("{port: 1}", "not JSON"),
            ("[1]", "JSON object"),
            (r#"{"port": 70000}"#, "\"port\" must be"),
            (r#"{"port": -1}"#, "\"port\" must be"),
            (r#"{"updates_dir": 3}"#, "must be a string"),
            (r#"{"updates_dir": ""}"#, "is empty"),
            (r#"{"bind": "everywhere"}"#, "not an IP address"),
            (r#"{"bind": "localhost"}"#, "give 127.0.0.1"),
            (r#"{"timeout_secs": 0}"#, "at least 1 second"),
            (r#"{"max_connections": 0}"#, "at least 1"),
        ] {
            let err = format!(
                "{:#}",
                Settings::resolve(Flags::default(), Some(text)).unwrap_err()
            );
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let s = Settings::resolve(Flags::default(), Some(r#"{"port": 1, "mongo": "x"}"#)).unwrap();
        assert_eq!(s.port, 1);
    }
}
