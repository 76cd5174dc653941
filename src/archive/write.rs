//! Reproducible tar writing: sorted entries, fixed mtime, owner root:root, normalised modes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tar::{EntryType, Header};

use crate::sums::HashingReader;

/// What one archive entry is made from.
#[derive(Debug, Clone)]
pub enum Source {
    Dir,
    /// A file on disk, with the size and digest it had when it was hashed: if it changes before it
    /// is archived, the build fails rather than ship a file that disagrees with SHA256SUMS.
    File {
        path: PathBuf,
        size: u64,
        digest: String,
        executable: bool,
    },
    Symlink {
        target: String,
    },
    Bytes {
        data: Vec<u8>,
        executable: bool,
    },
}

/// One entry: its path inside the archive (relative, `/`-separated) and its source.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: String,
    pub source: Source,
}

pub fn mode_for(executable: bool) -> u32 {
    if executable { 0o755 } else { 0o644 }
}

fn base_header(kind: EntryType, mode: u32, mtime: u64) -> Result<Header> {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_username("root")?;
    h.set_groupname("root")?;
    h.set_mtime(mtime);
    h.set_size(0);
    Ok(h)
}

/// Writes `entries` (already sorted) as a tar stream into `out`. `on_bytes` hears how many payload
/// bytes have been archived so far, for progress.
pub fn write_tar<W: Write>(
    out: W,
    entries: &[Entry],
    mtime: u64,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<W> {
    let mut builder = tar::Builder::new(out);
    for entry in entries {
        match &entry.source {
            Source::Dir => {
                let mut h = base_header(EntryType::Directory, 0o755, mtime)?;
                builder.append_data(&mut h, format!("{}/", entry.path), io::empty())?;
            }
            Source::Symlink { target } => {
                let mut h = base_header(EntryType::Symlink, 0o777, mtime)?;
                builder.append_link(&mut h, &entry.path, target)?;
            }
            Source::Bytes { data, executable } => {
                let mut h = base_header(EntryType::Regular, mode_for(*executable), mtime)?;
                h.set_size(data.len() as u64);
                builder.append_data(&mut h, &entry.path, &data[..])?;
            }
            Source::File {
                path,
                size,
                digest,
                executable,
            } => {
                let mut h = base_header(EntryType::Regular, mode_for(*executable), mtime)?;
                h.set_size(*size);
                let file =
                    File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
                let mut reader = HashingReader::new(Progress {
                    inner: file.take(*size),
                    on_bytes,
                });
                builder
                    .append_data(&mut h, &entry.path, &mut reader)
                    .with_context(|| format!("archiving {}", path.display()))?;
                if reader.bytes_read() != *size || &reader.finish() != digest {
                    bail!(
                        "{} changed while the image was being built; build again",
                        path.display()
                    );
                }
            }
        }
    }
    builder.into_inner().context("finishing the tar stream")
}

struct Progress<'a, R> {
    inner: R,
    on_bytes: &'a mut dyn FnMut(u64),
}

impl<R: Read> Read for Progress<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.on_bytes)(n as u64);
        Ok(n)
    }
}
