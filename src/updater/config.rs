//! The OPQ box's JSON config file: `updates_ep` names the update server; every other key belongs
//! to other services and is kept as it is. Edits are validated, then written atomically with the
//! previous file kept as a backup.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Map, Value};

use crate::fsutil::write_atomic;

pub const UPDATES_EP: &str = "updates_ep";

/// Reads the config file as a JSON object.
pub fn read(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the box config {}", path.display()))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => bail!("box config {} is not a JSON object", path.display()),
        Err(e) => bail!("box config {} is not valid JSON: {e}", path.display()),
    }
}

/// The update server's base URL from the config, without a trailing slash.
pub fn updates_ep(path: &Path) -> Result<String> {
    let map = read(path)?;
    let ep = map
        .get(UPDATES_EP)
        .and_then(Value::as_str)
        .with_context(|| {
            format!(
                "box config {} has no \"{UPDATES_EP}\" (the update server's URL)",
                path.display()
            )
        })?;
    check_url(ep).with_context(|| format!("\"{UPDATES_EP}\" in {}", path.display()))?;
    Ok(ep.trim_end_matches('/').to_string())
}

pub fn check_url(url: &str) -> Result<()> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .with_context(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        bail!("{url:?} names no host");
    }
    Ok(())
}

/// A config edit as the page sends it: `{"box_config": <object or JSON text>}` or the object.
pub fn parse_edit(body: &[u8]) -> std::result::Result<Map<String, Value>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the request is not valid JSON: {e}"))?;
    let inner = match value {
        Value::Object(mut m) if m.contains_key("box_config") => {
            m.remove("box_config").unwrap_or(Value::Null)
        }
        other => other,
    };
    let config = match inner {
        Value::String(text) => serde_json::from_str::<Value>(&text)
            .map_err(|e| format!("the config is not valid JSON: {e}"))?,
        other => other,
    };
    let Value::Object(map) = config else {
        return Err("the config must be a JSON object".into());
    };
    match map.get(UPDATES_EP) {
        None => {}
        Some(Value::String(s)) => check_url(s).map_err(|e| format!("{UPDATES_EP}: {e}"))?,
        Some(_) => return Err(format!("{UPDATES_EP} must be a string URL")),
    }
    Ok(map)
}

pub fn backup_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".bak");
    path.with_file_name(name)
}

/// Writes `map` as the new config, keeping the previous file as `<file>.bak`.
pub fn write(path: &Path, map: &Map<String, Value>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if let Ok(old) = std::fs::read(path) {
        write_atomic(&backup_path(path), &old, 0o644)
            .context("keeping a backup of the box config")?;
    }
    let mut text = serde_json::to_vec_pretty(map)?;
    text.push(b'\n');
    write_atomic(path, &text, 0o644).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_accept_the_original_pages_body_and_plain_objects() {
        let orig = br#"{"box_config": "{\"updates_ep\": \"http://emilia.ics.hawaii.edu:8151\", \"box_id\": 3}"}"#;
        let m = parse_edit(orig).unwrap();
        assert_eq!(m["box_id"], 3);
        let m = parse_edit(br#"{"box_config": {"updates_ep": "https://x.example/u"}}"#).unwrap();
        assert_eq!(m[UPDATES_EP], "https://x.example/u");
        assert!(parse_edit(br#"{"box_config": "[1,2]"}"#).is_err());
        assert!(parse_edit(br#"{"box_config": "{oops"}"#).is_err());
        assert!(parse_edit(br#"{"box_config": {"updates_ep": "ftp://x"}}"#).is_err());
        assert!(parse_edit(br#"{"box_config": {"updates_ep": 5}}"#).is_err());
        assert!(parse_edit(b"not json").is_err());
    }

    #[test]
    fn write_keeps_a_backup_and_other_keys() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("box.json");
        std::fs::write(&p, r#"{"updates_ep": "http://a:1", "other": {"x": 1}}"#).unwrap();
        let mut m = read(&p).unwrap();
        m.insert(UPDATES_EP.into(), "http://b:2".into());
        write(&p, &m).unwrap();
        assert_eq!(updates_ep(&p).unwrap(), "http://b:2");
        assert_eq!(read(&p).unwrap()["other"]["x"], 1);
        assert!(
            std::fs::read_to_string(backup_path(&p))
                .unwrap()
                .contains("http://a:1")
        );
    }
}
