//! `build-update`: stages payloads into a reproducible, signed image and publishes it atomically.

use std::fs::{self, File};
use std::io::BufWriter;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::archive::pbzip::{ParallelBzWriter, default_threads};
use crate::archive::write::{Entry, Source, write_tar};
use crate::fsutil::{TempPath, fsync_dir, rename_noreplace, temp_sibling, unix_now, write_atomic};
use crate::image::{INSTALL_SCRIPT, ImageName, RESERVED_NAMES, SUMS_FILE, VERSION_FILE, Version};
use crate::sums::{Sha256Sums, is_plain_relative_path, sha256_file, sidecar_text};

/// The project's own install script, used when `--install-script` is not given.
pub const DEFAULT_INSTALL_SCRIPT: &str = include_str!("../build-update/install_update.sh");

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    pub out: PathBuf,
    pub version: Option<Version>,
    pub sign_key: Option<PathBuf>,
    pub install_script: Option<PathBuf>,
    pub payloads: Vec<PathBuf>,
    pub threads: Option<usize>,
}

/// What a finished build published.
#[derive(Debug, Clone)]
pub struct Built {
    pub image: PathBuf,
    pub name: ImageName,
    pub sha256: String,
    pub signed: bool,
    pub size: u64,
}

/// Hears how the build advances: `total` payload bytes, `done` so far.
pub trait Progress {
    fn start(&mut self, _total: u64) {}
    fn advance(&mut self, _done: u64) {}
    fn finish(&mut self) {}
}

pub struct NoProgress;
impl Progress for NoProgress {}

/// The version to build when none is given: `SOURCE_DATE_EPOCH` if set, else now.
pub fn default_version() -> Result<Version> {
    let now = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds"))?,
        Err(_) => unix_now(),
    };
    Ok(Version::new(now)?)
}

fn mtime_for(version: Version) -> Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .with_context(|| format!("SOURCE_DATE_EPOCH={s:?} is not a number of seconds")),
        Err(_) => Ok(version.get()),
    }
}

pub fn build(opts: &BuildOptions, progress: &mut dyn Progress) -> Result<Built> {
    let version = match opts.version {
        Some(v) => v,
        None => default_version()?,
    };
    let name = ImageName(version);
    let mtime = mtime_for(version)?;
    if opts.payloads.is_empty() {
        bail!("no payload given; name the directories or files the image should carry");
    }

    // Everything that can be checked without writing is checked before --out is touched.
    let top = name.top_dir();
    let mut entries = vec![Entry {
        path: top.clone(),
        source: Source::Dir,
    }];
    let mut seen = std::collections::BTreeSet::new();
    for payload in &opts.payloads {
        let base = payload_base_name(payload)?;
        if !seen.insert(base.clone()) {
            bail!("two payloads are named {base:?}; each payload's base name must be unique");
        }
        collect_payload(payload, &format!("{top}/{base}"), &mut entries)?;
    }
    let script = match &opts.install_script {
        Some(p) => fs::read(p).with_context(|| {
            format!("cannot read install script {}; check the path", p.display())
        })?,
        None => DEFAULT_INSTALL_SCRIPT.as_bytes().to_vec(),
    };
    let secret_key = match &opts.sign_key {
        Some(p) => Some(crate::signing::load_secret_key(p)?),
        None => None,
    };

    let out = &opts.out;
    let image_path = out.join(name.file_name());
    if image_path.exists() {
        bail!(
            "{} already exists; images are never overwritten, build with another --version",
            image_path.display()
        );
    }
    let created_out = !out.exists();
    if created_out {
        fs::create_dir_all(out)
            .with_context(|| format!("cannot create output directory {}", out.display()))?;
    }
    let result = publish(
        opts,
        name,
        mtime,
        entries,
        script,
        secret_key.as_ref(),
        progress,
    );
    if result.is_err() && created_out {
        let _ = fs::remove_dir(out);
    }
    result
}

fn publish(
    opts: &BuildOptions,
    name: ImageName,
    mtime: u64,
    mut entries: Vec<Entry>,
    script: Vec<u8>,
    secret_key: Option<&minisign::SecretKey>,
    progress: &mut dyn Progress,
) -> Result<Built> {
    let out = &opts.out;
    let top = name.top_dir();
    let image_path = out.join(name.file_name());
    let tmp_image = TempPath::new(temp_sibling(&image_path, "build"));
    let file = File::options()
        .write(true)
        .create_new(true)
        .open(tmp_image.path())
        .with_context(|| {
            format!(
                "cannot write to {}; check it is a writable directory",
                out.display()
            )
        })?;

    // SHA256SUMS sorts first, so every file is hashed before the archive is written.
    let total: u64 = entries
        .iter()
        .map(|e| {
            if let Source::File { size, .. } = &e.source {
                *size
            } else {
                0
            }
        })
        .sum();
    let mut sums = Sha256Sums::default();
    hash_files(&mut entries)?;
    let version_text = name.version().file_contents();
    sums.insert(
        VERSION_FILE.into(),
        crate::sums::sha256_reader(version_text.as_bytes())?.0,
    );
    sums.insert(
        INSTALL_SCRIPT.into(),
        crate::sums::sha256_reader(&script[..])?.0,
    );
    for e in &entries {
        if let Source::File { digest, .. } = &e.source {
            let rel = e
                .path
                .strip_prefix(&format!("{top}/"))
                .expect("payload under top");
            sums.insert(rel.to_string(), digest.clone());
        }
    }
    entries.push(bytes_entry(
        &top,
        VERSION_FILE,
        version_text.into_bytes(),
        false,
    ));
    entries.push(bytes_entry(&top, INSTALL_SCRIPT, script, true));
    entries.push(bytes_entry(
        &top,
        SUMS_FILE,
        sums.render().into_bytes(),
        false,
    ));
    entries.sort_by(|a, b| a.path.cmp(&b.path));

    progress.start(total);
    let threads = opts.threads.unwrap_or_else(default_threads);
    let hashed = crate::sums::HashingWriter::new(BufWriter::with_capacity(256 * 1024, file));
    let compressor = ParallelBzWriter::new(hashed, threads);
    let mut done = 0u64;
    let compressor = write_tar(compressor, &entries, mtime, &mut |n| {
        done += n;
        progress.advance(done);
    })?;
    let hashed = compressor
        .finish()
        .with_context(|| format!("writing the image into {}", out.display()))?;
    let size = hashed.written();
    let (buf, sha256) = hashed.finish();
    let file = buf.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::set_permissions(tmp_image.path(), fs::Permissions::from_mode(0o644))?;
    progress.finish();

    let sig_text = match secret_key {
        Some(sk) => Some(crate::signing::sign_image(sk, tmp_image.path(), name)?),
        None => None,
    };

    // Sidecars first, image last: a watcher that sees the image sees its sidecars too.
    let sha_path = out.join(name.sha256_name());
    let sig_path = out.join(name.minisig_name());
    let mut placed: Vec<PathBuf> = Vec::new();
    let publish = (|| -> Result<()> {
        write_atomic(
            &sha_path,
            sidecar_text(&sha256, &name.file_name()).as_bytes(),
            0o644,
        )
        .with_context(|| format!("writing {}", sha_path.display()))?;
        placed.push(sha_path.clone());
        if let Some(sig) = &sig_text {
            write_atomic(&sig_path, sig.as_bytes(), 0o644)
                .with_context(|| format!("writing {}", sig_path.display()))?;
            placed.push(sig_path.clone());
        }
        rename_noreplace(tmp_image.path(), &image_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!(
                    "{} appeared while building; images are never overwritten",
                    image_path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!("publishing {}", image_path.display()))
            }
        })?;
        fsync_dir(out)?;
        Ok(())
    })();
    if let Err(e) = publish {
        for p in placed {
            let _ = fs::remove_file(p);
        }
        return Err(e);
    }
    tmp_image.disarm();
    Ok(Built {
        image: image_path,
        name,
        sha256,
        signed: sig_text.is_some(),
        size,
    })
}

fn bytes_entry(top: &str, name: &str, data: Vec<u8>, executable: bool) -> Entry {
    Entry {
        path: format!("{top}/{name}"),
        source: Source::Bytes { data, executable },
    }
}

/// Hashes every payload file, on all cores: the files are independent.
fn hash_files(entries: &mut [Entry]) -> Result<()> {
    let threads = default_threads();
    let mut files: Vec<&mut Entry> = entries
        .iter_mut()
        .filter(|e| matches!(e.source, Source::File { .. }))
        .collect();
    let per = files.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let handles: Vec<_> = files
            .chunks_mut(per)
            .map(|chunk| {
                s.spawn(move || -> Result<()> {
                    for e in chunk.iter_mut() {
                        if let Source::File { path, digest, .. } = &mut e.source {
                            *digest = sha256_file(path).with_context(|| {
                                format!("cannot read {}; check its permissions", path.display())
                            })?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .try_for_each(|h| h.join().expect("hashing thread panicked"))
    })
}

fn payload_base_name(payload: &Path) -> Result<String> {
    let meta = fs::metadata(payload).with_context(|| {
        format!(
            "payload {} does not exist or cannot be read; pass an existing file or directory",
            payload.display()
        )
    })?;
    let _ = meta;
    let canon = fs::canonicalize(payload)
        .with_context(|| format!("cannot resolve payload {}", payload.display()))?;
    let base = payload
        .file_name()
        .filter(|_| {
            !matches!(
                payload.components().next_back(),
                Some(Component::ParentDir | Component::CurDir)
            )
        })
        .or_else(|| canon.file_name())
        .with_context(|| {
            format!(
                "payload {} has no base name; name a directory or file",
                payload.display()
            )
        })?
        .to_str()
        .with_context(|| {
            format!(
                "payload {} has a name that is not UTF-8; rename it",
                payload.display()
            )
        })?
        .to_string();
    if RESERVED_NAMES.contains(&base.as_str()) {
        bail!(
            "payload {} is named {base:?}, which the image reserves for itself; rename the payload",
            payload.display()
        );
    }
    if !is_plain_relative_path(&base) {
        bail!(
            "payload {} has an unusable name; rename it",
            payload.display()
        );
    }
    Ok(base)
}

/// Adds the payload at `src` under the archive path `dst`, walking directories in sorted order.
fn collect_payload(src: &Path, dst: &str, entries: &mut Vec<Entry>) -> Result<()> {
    let meta =
        fs::metadata(src).with_context(|| format!("cannot read payload {}", src.display()))?;
    if meta.is_dir() {
        walk_dir(src, src, dst, entries)
    } else if meta.is_file() {
        entries.push(file_entry(src, dst, &meta)?);
        Ok(())
    } else {
        bail!(
            "payload {} is not a regular file or directory",
            src.display()
        )
    }
}

fn file_entry(path: &Path, dst: &str, meta: &fs::Metadata) -> Result<Entry> {
    File::open(path)
        .with_context(|| format!("cannot read {}; check its permissions", path.display()))?;
    Ok(Entry {
        path: dst.to_string(),
        source: Source::File {
            path: path.to_path_buf(),
            size: meta.len(),
            digest: String::new(),
            executable: meta.mode() & 0o111 != 0,
        },
    })
}

fn walk_dir(root: &Path, dir: &Path, dst: &str, entries: &mut Vec<Entry>) -> Result<()> {
    entries.push(Entry {
        path: dst.to_string(),
        source: Source::Dir,
    });
    let mut children: Vec<_> = fs::read_dir(dir)
        .with_context(|| {
            format!(
                "cannot read directory {}; check its permissions",
                dir.display()
            )
        })?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    children.sort_by_key(|c| c.file_name());
    for child in children {
        let path = child.path();
        let name = child.file_name();
        let name = name
            .to_str()
            .filter(|n| is_plain_relative_path(n))
            .with_context(|| format!("{} has a name an image can't carry (not UTF-8, or a newline or backslash in it); rename it", path.display()))?;
        let child_dst = format!("{dst}/{name}");
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let ft = meta.file_type();
        if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            check_link_inside(root, &path, &target)?;
            let target = target.to_str().with_context(|| {
                format!("symlink {} has a target that is not UTF-8", path.display())
            })?;
            entries.push(Entry {
                path: child_dst,
                source: Source::Symlink {
                    target: target.to_string(),
                },
            });
        } else if ft.is_dir() {
            walk_dir(root, &path, &child_dst, entries)?;
        } else if ft.is_file() {
            entries.push(file_entry(&path, &child_dst, &meta)?);
        } else {
            bail!(
                "{} is a device, socket or FIFO; an image carries only files, directories and symlinks",
                path.display()
            );
        }
    }
    Ok(())
}

/// A symlink is kept only if its target, resolved from where it sits, stays inside the payload.
fn check_link_inside(root: &Path, link: &Path, target: &Path) -> Result<()> {
    let outside = || {
        anyhow::anyhow!(
            "symlink {} points to {}, outside its payload {}; make it relative and inside the payload, or copy the file in",
            link.display(),
            target.display(),
            root.display()
        )
    };
    if target.is_absolute() {
        return Err(outside());
    }
    let rel_dir = link
        .parent()
        .and_then(|p| p.strip_prefix(root).ok())
        .ok_or_else(outside)?;
    let mut depth: Vec<&std::ffi::OsStr> = rel_dir
        .components()
        .filter_map(|c| {
            if let Component::Normal(n) = c {
                Some(n)
            } else {
                None
            }
        })
        .collect();
    for c in target.components() {
        match c {
            Component::Normal(n) => depth.push(n),
            Component::CurDir => {}
            Component::ParentDir => {
                depth.pop().ok_or_else(outside)?;
            }
            _ => return Err(outside()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_check_is_relative_to_the_link() {
        let root = Path::new("/p");
        assert!(check_link_inside(root, Path::new("/p/a/l"), Path::new("../b")).is_ok());
        assert!(check_link_inside(root, Path::new("/p/a/l"), Path::new("../../b")).is_err());
        assert!(check_link_inside(root, Path::new("/p/l"), Path::new("/etc/passwd")).is_err());
        assert!(check_link_inside(root, Path::new("/p/l"), Path::new("a/./b/../c")).is_ok());
    }
}
