//! Safe unpacking of an image into a new release directory: every entry is checked before it is
//! written, files are verified against SHA256SUMS as they are written, and nothing can land
//! outside the release, whatever the archive holds.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use tar::EntryType;

use crate::archive::pbunzip::ParallelBzReader;
use crate::image::{INSTALL_SCRIPT, ImageName, SUMS_FILE, VERSION_FILE, Version};
use crate::sums::Sha256Sums;

/// Bounds on what one image may expand to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 4 << 30,
            max_entries: 200_000,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Unpacked {
    pub files: u64,
    pub bytes: u64,
}

/// Why an image was refused: what the box owner reads on the page.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Refused(msg.into()).into())
}

/// Progress of an unpacking: bytes just written (expanded), and how far into the compressed
/// image reading has come.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub written: u64,
    pub compressed: u64,
}

/// Unpacks `image` (named `name`) into `dest`, which must not exist yet. On error `dest` may hold
/// a partial tree: the caller owns and removes it.
pub fn unpack_image(
    image: &Path,
    name: ImageName,
    dest: &Path,
    limits: Limits,
    threads: usize,
    on_progress: &mut dyn FnMut(Progress),
) -> Result<Unpacked> {
    let reader = ParallelBzReader::open(image, threads).map_err(|e| {
        if e.kind() == io::ErrorKind::InvalidData {
            Refused(format!("{} is not a bzip2 image", name.file_name())).into()
        } else {
            anyhow::Error::new(e).context(format!("reading {}", image.display()))
        }
    })?;
    fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
    let consumed = reader.consumed();
    let mut archive = tar::Archive::new(reader);
    let mut u = Unpacker {
        top: name.top_dir(),
        dest: dest.to_path_buf(),
        limits,
        sums: None,
        seen: HashSet::new(),
        links: HashSet::new(),
        verified: BTreeMap::new(),
        stats: Unpacked::default(),
        entries: 0,
    };
    let entries = archive
        .entries()
        .map_err(|e| Refused(format!("the image is not a tar archive: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| Refused(format!("the image is damaged: {e}")))?;
        u.entry(entry, &mut |written| {
            on_progress(Progress {
                written,
                compressed: consumed.load(Ordering::Relaxed),
            })
        })?;
    }
    u.finish(name)
}

struct Unpacker {
    top: String,
    dest: PathBuf,
    limits: Limits,
    /// SHA256SUMS, once read: later files are checked as they are written.
    sums: Option<Sha256Sums>,
    seen: HashSet<PathBuf>,
    links: HashSet<PathBuf>,
    /// Files written after SHA256SUMS, with their digests.
    verified: BTreeMap<String, String>,
    stats: Unpacked,
    entries: u64,
}

impl Unpacker {
    /// The entry's path inside the release, or a refusal for anything that could leave it.
    fn release_path(&self, raw: &Path) -> Result<Option<PathBuf>> {
        let shown = raw.display();
        let mut comps = Vec::new();
        for c in raw.components() {
            match c {
                Component::Normal(n) => comps.push(n),
                Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    return refuse(format!("the image holds an absolute path: {shown}"));
                }
                Component::ParentDir => {
                    return refuse(format!("the image holds a path with '..': {shown}"));
                }
            }
        }
        match comps.first() {
            Some(first) if *first == self.top.as_str() => {}
            _ => {
                return refuse(format!(
                    "the image holds {shown}, outside its top directory {}",
                    self.top
                ));
            }
        }
        if comps.len() == 1 {
            return Ok(None);
        }
        Ok(Some(comps[1..].iter().collect()))
    }

    fn entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<()> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return refuse(format!(
                "the image holds more than {} entries",
                self.limits.max_entries
            ));
        }
        let raw = entry
            .path()
            .map_err(|e| Refused(format!("the image holds an unreadable path: {e}")))?
            .into_owned();
        let kind = entry.header().entry_type();
        let Some(rel) = self.release_path(&raw)? else {
            return match kind {
                EntryType::Directory => Ok(()),
                _ => refuse(format!(
                    "the image's top directory {} is not a directory",
                    self.top
                )),
            };
        };
        // Nothing may be written through a symlink the image made: that is how a link that points
        // out would be used.
        for anc in rel.ancestors().skip(1) {
            if self.links.contains(anc) {
                return refuse(format!(
                    "{} would be written through the symlink {}",
                    raw.display(),
                    anc.display()
                ));
            }
        }
        let target = self.dest.join(&rel);
        match kind {
            EntryType::Directory => {
                self.make_parents(&rel)?;
                match fs::symlink_metadata(&target) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return refuse(format!("{} appears twice in the image", raw.display()));
                    }
                    Err(_) => fs::create_dir(&target)
                        .with_context(|| format!("creating {}", target.display()))?,
                }
                self.seen.insert(rel);
                Ok(())
            }
            EntryType::Regular | EntryType::Continuous => {
                self.claim(&rel, &raw)?;
                self.make_parents(&rel)?;
                let mode = entry.header().mode().unwrap_or(0o644);
                self.write_file(&mut entry, &rel, &target, mode, on_bytes)
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| Refused(format!("unreadable symlink target: {e}")))?
                    .with_context(|| format!("symlink {} has no target", raw.display()))?
                    .into_owned();
                if !link_stays_inside(&rel, &link) {
                    return refuse(format!(
                        "symlink {} points to {}, outside the release",
                        raw.display(),
                        link.display()
                    ));
                }
                self.claim(&rel, &raw)?;
                self.make_parents(&rel)?;
                std::os::unix::fs::symlink(&link, &target)
                    .with_context(|| format!("creating {}", target.display()))?;
                self.links.insert(rel);
                Ok(())
            }
            EntryType::Link => refuse(format!(
                "the image holds a hard link ({}); images may not",
                raw.display()
            )),
            EntryType::Char | EntryType::Block => {
                refuse(format!("the image holds a device file: {}", raw.display()))
            }
            EntryType::Fifo => refuse(format!("the image holds a FIFO: {}", raw.display())),
            other => refuse(format!(
                "the image holds {} of unsupported type {other:?}",
                raw.display()
            )),
        }
    }

    fn claim(&mut self, rel: &Path, raw: &Path) -> Result<()> {
        if !self.seen.insert(rel.to_path_buf()) {
            return refuse(format!("{} appears twice in the image", raw.display()));
        }
        Ok(())
    }

    /// Creates missing parent directories (archives need not list them), never through a link.
    fn make_parents(&mut self, rel: &Path) -> Result<()> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut sofar = PathBuf::new();
        for c in parent.components() {
            sofar.push(c);
            let full = self.dest.join(&sofar);
            match fs::symlink_metadata(&full) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return refuse(format!(
                        "{} is used as a directory but is not one",
                        sofar.display()
                    ));
                }
                Err(_) => {
                    fs::create_dir(&full)
                        .with_context(|| format!("creating {}", full.display()))?;
                    self.seen.insert(sofar.clone());
                }
            }
        }
        Ok(())
    }

    fn write_file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        rel: &Path,
        target: &Path,
        mode: u32,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<()> {
        let rel_str = rel.to_string_lossy().into_owned();
        let size = entry.header().size().unwrap_or(0);
        if self.stats.bytes.saturating_add(size) > self.limits.max_bytes {
            return refuse(format!(
                "the image expands past {} MiB, more than this box allows",
                self.limits.max_bytes >> 20
            ));
        }
        // setuid, setgid and sticky bits are dropped; the owner can always read and write.
        let mode = (mode & 0o777) | 0o600;
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(target)
            .with_context(|| format!("creating {}", target.display()))?;
        let is_sums = rel_str == SUMS_FILE;
        let mut keep = if is_sums { Some(Vec::new()) } else { None };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Refused(format!(
                        "the image is damaged while reading {rel_str}: {e}"
                    ))
                    .into());
                }
            };
            out.write_all(&buf[..n])
                .with_context(|| format!("writing {}", target.display()))?;
            hasher.update(&buf[..n]);
            if let Some(k) = &mut keep {
                if k.len() + n > 16 << 20 {
                    return refuse("SHA256SUMS is implausibly large");
                }
                k.extend_from_slice(&buf[..n]);
            }
            written += n as u64;
            on_bytes(n as u64);
        }
        fs::set_permissions(target, fs::Permissions::from_mode(mode))?;
        self.stats.bytes += written;
        self.stats.files += 1;
        let digest = hex::encode(hasher.finalize());
        if let Some(text) = keep {
            let text =
                String::from_utf8(text).map_err(|_| Refused("SHA256SUMS is not text".into()))?;
            let sums = Sha256Sums::parse(&text).map_err(|e| Refused(format!("{e:#}")))?;
            self.sums = Some(sums);
        } else if let Some(sums) = &self.sums {
            match sums.entries.get(&rel_str) {
                None => return refuse(format!("{rel_str} is not listed in SHA256SUMS")),
                Some(want) if *want != digest => {
                    return refuse(format!("{rel_str} does not match SHA256SUMS"));
                }
                Some(_) => {
                    self.verified.insert(rel_str, digest);
                }
            }
        }
        Ok(())
    }

    fn finish(self, name: ImageName) -> Result<Unpacked> {
        let dest = &self.dest;
        let version_text = fs::read(dest.join(VERSION_FILE))
            .map_err(|_| Refused(format!("the image has no {VERSION_FILE} file")))?;
        let version = Version::parse_file(&version_text)
            .map_err(|e| Refused(format!("the image's VERSION file is invalid: {e}")))?;
        if version != name.version() {
            return refuse(format!(
                "the image's VERSION says {version}, but its name says {}",
                name.version()
            ));
        }
        let script = dest.join(INSTALL_SCRIPT);
        match fs::symlink_metadata(&script) {
            Ok(m) if m.is_file() => {
                fs::set_permissions(
                    &script,
                    fs::Permissions::from_mode((m.permissions().mode() & 0o777) | 0o700),
                )?;
            }
            _ => return refuse(format!("the image has no {INSTALL_SCRIPT}")),
        }
        let Some(sums) = &self.sums else {
            return refuse(format!("the image has no {SUMS_FILE}"));
        };
        // Files written before SHA256SUMS was seen (unsorted archives), or never written, are
        // checked against the tree now.
        if self.verified.len() != sums.entries.len() {
            sums.verify_dir(dest)
                .map_err(|e| Refused(format!("{e:#}")))?;
        } else {
            // Every listed file matched as it was written; refuse extras that slipped in before.
            sums.verify_listing(dest)
                .map_err(|e| Refused(format!("{e:#}")))?;
        }
        Ok(self.stats)
    }
}

/// A symlink's target, resolved from the link's own directory, must stay inside the release.
pub fn link_stays_inside(link_rel: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth = link_rel
        .parent()
        .map(|p| p.components().count())
        .unwrap_or(0) as i64;
    for c in target.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}
