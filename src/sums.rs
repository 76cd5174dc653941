//! SHA-256 digests in `sha256sum` format: the image's SHA256SUMS and its `.sha256` sidecar.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The hex digest of everything read from `r`, and how many bytes that was.
pub fn sha256_reader(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 128 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(hasher.finalize()), total))
}

pub fn sha256_file(path: &Path) -> io::Result<String> {
    Ok(sha256_reader(File::open(path)?)?.0)
}

/// A writer that hashes what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }
    pub fn written(&self) -> u64 {
        self.written
    }
    pub fn finish(self) -> (W, String) {
        (self.inner, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    read: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            read: 0,
        }
    }
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
    pub fn finish(self) -> String {
        hex::encode(self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

fn is_hex_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A path that `sha256sum` writes without escaping and that stays inside its directory.
pub fn is_plain_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains(['\n', '\r', '\\', '\0'])
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        && !path.ends_with('/')
}

/// Splits one `sha256sum` line into digest and name (text or binary mode).
fn parse_line(line: &str) -> Option<(&str, &str)> {
    let (digest, rest) = line.split_at_checked(64)?;
    let name = rest
        .strip_prefix("  ")
        .or_else(|| rest.strip_prefix(" *"))?;
    is_hex_digest(digest).then_some((digest, name))
}

/// The content of a SHA256SUMS file: path → lowercase hex digest, sorted by path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sha256Sums {
    pub entries: BTreeMap<String, String>,
}

impl Sha256Sums {
    pub fn insert(&mut self, path: String, digest: String) {
        self.entries.insert(path, digest);
    }

    pub fn render(&self) -> String {
        self.entries
            .iter()
            .map(|(p, d)| format!("{d}  {p}\n"))
            .collect()
    }

    pub fn parse(text: &str) -> Result<Self> {
        let mut sums = Sha256Sums::default();
        for (i, line) in text.lines().enumerate() {
            let (digest, name) = parse_line(line)
                .with_context(|| format!("SHA256SUMS line {} is not `<sha256>  <path>`", i + 1))?;
            if !is_plain_relative_path(name) {
                bail!(
                    "SHA256SUMS line {} names {name:?}, which is not a plain relative path",
                    i + 1
                );
            }
            if sums
                .entries
                .insert(name.to_string(), digest.to_ascii_lowercase())
                .is_some()
            {
                bail!("SHA256SUMS lists {name:?} twice");
            }
        }
        Ok(sums)
    }

    /// Checks that the regular files in `dir` are exactly those listed (SHA256SUMS aside), without
    /// hashing them again.
    pub fn verify_listing(&self, dir: &Path) -> Result<()> {
        let mut found = Vec::new();
        collect_regular_files(dir, dir, &mut found)?;
        for path in &found {
            if path != crate::image::SUMS_FILE && !self.entries.contains_key(path) {
                bail!("{path} is not listed in SHA256SUMS");
            }
        }
        let found: std::collections::HashSet<&String> = found.iter().collect();
        for path in self.entries.keys() {
            if !found.contains(path) {
                bail!("{path} is listed in SHA256SUMS but missing");
            }
        }
        Ok(())
    }

    /// Checks `dir` against these sums: every listed file matches, and every regular file in the
    /// tree (but SHA256SUMS itself) is listed, so nothing unchecked rides along.
    pub fn verify_dir(&self, dir: &Path) -> Result<()> {
        let mut found = Vec::new();
        collect_regular_files(dir, dir, &mut found)?;
        for path in &found {
            if path != crate::image::SUMS_FILE && !self.entries.contains_key(path) {
                bail!("{path} is not listed in SHA256SUMS");
            }
        }
        for (path, want) in &self.entries {
            let full = dir.join(path);
            let meta = std::fs::symlink_metadata(&full)
                .with_context(|| format!("{path} is listed in SHA256SUMS but missing"))?;
            if !meta.is_file() {
                bail!("{path} is listed in SHA256SUMS but is not a regular file");
            }
            let got = sha256_file(&full).with_context(|| format!("reading {}", full.display()))?;
            if &got != want {
                bail!("{path} does not match SHA256SUMS (expected {want}, found {got})");
            }
        }
        Ok(())
    }
}

fn collect_regular_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let ft = entry.file_type()?;
        if ft.is_dir() {
            collect_regular_files(root, &entry.path(), out)?;
        } else if ft.is_file() {
            let rel = entry
                .path()
                .strip_prefix(root)
                .expect("walk stays under root")
                .to_path_buf();
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

/// The `.sha256` sidecar's text for an image.
pub fn sidecar_text(digest: &str, file_name: &str) -> String {
    format!("{digest}  {file_name}\n")
}

/// Reads a `.sha256` sidecar and returns its digest; the sidecar must name `file_name`, so that
/// the sidecar of another image is refused.
pub fn parse_sidecar(text: &str, file_name: &str) -> Result<String> {
    let line = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .context("the .sha256 sidecar is empty")?;
    let (digest, name) =
        parse_line(line.trim_end()).context("the .sha256 sidecar is not in sha256sum format")?;
    if name != file_name {
        bail!("the .sha256 sidecar is for {name:?}, not for {file_name:?}");
    }
    Ok(digest.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sums_round_trip_sorted() {
        let mut s = Sha256Sums::default();
        s.insert("b/x".into(), D.into());
        s.insert("a".into(), D.into());
        let text = s.render();
        assert_eq!(text, format!("{D}  a\n{D}  b/x\n"));
        assert_eq!(Sha256Sums::parse(&text).unwrap(), s);
    }

    #[test]
    fn sums_refuse_escapes_and_bad_lines() {
        for bad in [
            format!("{D}  ../x"),
            format!("{D}  /etc/passwd"),
            format!("{D} x"),
            "abc  x".to_string(),
            format!("\\{D}  a\\nb"),
            format!("{D}  a\n{D}  a"),
        ] {
            assert!(Sha256Sums::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sidecar_must_name_the_image() {
        let t = sidecar_text(D, "opq-box-update-1.tar.bz2");
        assert_eq!(parse_sidecar(&t, "opq-box-update-1.tar.bz2").unwrap(), D);
        assert!(parse_sidecar(&t, "opq-box-update-2.tar.bz2").is_err());
        assert!(parse_sidecar("<html>", "opq-box-update-1.tar.bz2").is_err());
        assert!(parse_sidecar("", "x").is_err());
    }

    #[test]
    fn verify_dir_finds_changed_missing_and_extra_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        let mut s = Sha256Sums::default();
        s.insert("a".into(), D.into());
        s.verify_dir(dir.path()).unwrap();
        std::fs::write(dir.path().join("extra"), b"x").unwrap();
        assert!(
            s.verify_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains("not listed")
        );
        std::fs::remove_file(dir.path().join("extra")).unwrap();
        std::fs::write(dir.path().join("a"), b"changed").unwrap();
        assert!(
            s.verify_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains("does not match")
        );
        std::fs::remove_file(dir.path().join("a")).unwrap();
        assert!(
            s.verify_dir(dir.path())
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }
}
