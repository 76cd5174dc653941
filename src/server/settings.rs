//! The server's settings: command-line flags over `BOX_UPDATE_SERVER_SETTINGS` over defaults.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::fleet::FleetSettings;
use crate::fleet::rollout::parse_percent;
use crate::fleet::store::Database;

/// The environment variable of the original docker deployment.
pub const SETTINGS_ENV: &str = "BOX_UPDATE_SERVER_SETTINGS";
pub const DEFAULT_PORT: u16 = 8151;
pub const DEFAULT_DIR: &str = "/var/opq/box-updates";
const DEFAULT_TIMEOUT_SECS: u64 = 30;
const DEFAULT_RESCAN_SECS: u64 = 30;
const DEFAULT_MAX_CONNECTIONS: usize = 512;
const DEFAULT_MAX_BOXES: usize = 100_000;
/// A new rollout halts once this many boxes of its share failed or rolled back...
pub const DEFAULT_HALT_FAILURES: u32 = 3;
/// ...and they are at least this share (basis points) of the boxes that reported on it.
pub const DEFAULT_HALT_SHARE: u32 = 1000;

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
    /// Connections served at once; each has its own thread, so a slow download never holds up
    /// another client. Beyond this, new clients get 503.
    pub max_connections: usize,
    /// Where the image files are served from when they are not served here (a CDN, an
    /// S3-compatible store, nginx): `/latest` and `/update/<name>` redirect to `<URL>/<name>`.
    pub public_base_url: Option<String>,
    /// The fleet's database, token and bounds.
    pub fleet: FleetSettings,
    /// The threshold a new rollout halts at, unless `update-server rollout` is told otherwise.
    pub halt_failures: u32,
    pub halt_share: u32,
}

/// What the command line gave; `None` means "not given".
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub dir: Option<PathBuf>,
    pub port: Option<u16>,
    pub bind: Option<IpAddr>,
    pub timeout_secs: Option<u64>,
    pub public_base_url: Option<String>,
    pub database: Option<String>,
    pub fleet_token: Option<String>,
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
    database: Option<String>,
    fleet_token: Option<String>,
    max_boxes: Option<usize>,
    halt_failures: Option<u32>,
    halt_share: Option<u32>,
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
        let dir = flags
            .dir
            .or(env.dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        let database = flags.database.or(env.database);
        let fleet = FleetSettings {
            explicit: database.is_some(),
            database: match &database {
                Some(d) => Database::parse(d)?,
                None => Database::beside(&dir),
            },
            token: match flags.fleet_token.or(env.fleet_token) {
                Some(t) if t.trim().is_empty() => bail!("the fleet token is empty"),
                t => t.map(|t| t.trim().to_string()),
            },
            max_boxes: env.max_boxes.unwrap_or(DEFAULT_MAX_BOXES),
        };
        if fleet.max_boxes == 0 {
            bail!("max_boxes must be at least 1");
        }
        Ok(Settings {
            dir,
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
            fleet,
            halt_failures: env.halt_failures.unwrap_or(DEFAULT_HALT_FAILURES),
            halt_share: env.halt_share.unwrap_or(DEFAULT_HALT_SHARE),
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
            "database" | "fleet_token" => {
                let s = v
                    .as_str()
                    .with_context(|| format!("{key:?} must be a string, not {v}"))?;
                let slot = if key == "database" {
                    &mut out.database
                } else {
                    &mut out.fleet_token
                };
                *slot = Some(s.to_string());
            }
            "max_boxes" => out.max_boxes = Some(number(v, key)?),
            "halt_failures" => out.halt_failures = Some(number(v, key)?),
            "halt_share" => {
                let text = match v {
                    Value::Number(n) => n.to_string(),
                    Value::String(s) => s.clone(),
                    _ => String::new(),
                };
                out.halt_share =
                    Some(parse_percent(&text).map_err(|e| anyhow::anyhow!("\"halt_share\": {e}"))?);
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
            database: Some("postgres://fleet@db/fleet".into()),
            fleet_token: Some("t".into()),
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
    fn fleet_settings_default_beside_the_directory() {
        let s = Settings::resolve(Flags::default(), Some(r#"{"updates_dir": "/srv/u"}"#)).unwrap();
        assert_eq!(
            s.fleet.database,
            Database::Sqlite("/srv/u.fleet.sqlite".into())
        );
        assert!(!s.fleet.explicit && s.fleet.token.is_none());
        assert_eq!((s.halt_failures, s.halt_share), (3, 1000));
        let s = Settings::resolve(
            Flags::default(),
            Some(
                r#"{"database": "/var/lib/fleet.db", "fleet_token": "op", "max_boxes": 5,
                    "halt_failures": 10, "halt_share": 2.5}"#,
            ),
        )
        .unwrap();
        assert_eq!(
            s.fleet.database,
            Database::Sqlite("/var/lib/fleet.db".into())
        );
        assert!(s.fleet.explicit);
        assert_eq!(s.fleet.token.as_deref(), Some("op"));
        assert_eq!(
            (s.fleet.max_boxes, s.halt_failures, s.halt_share),
            (5, 10, 250)
        );
        for (text, want) in [
            (r#"{"database": "mysql://x/y"}"#, "neither postgres"),
            (r#"{"database": 5}"#, "must be a string"),
            (r#"{"fleet_token": " "}"#, "token is empty"),
            (r#"{"max_boxes": 0}"#, "at least 1"),
            (r#"{"halt_share": 101}"#, "percentage"),
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
