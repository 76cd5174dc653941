//! Durable file operations: atomic writes, no-clobber publication, directory fsync, temp guards.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Makes a rename or create in `dir` durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A name in the same directory that readers of that directory ignore (hidden, `.tmp` suffix).
pub fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent_of(path).join(format!(".{name}.{tag}-{}.tmp", std::process::id()))
}

/// Writes `data` to `path` as temp file, fsync, rename, fsync of the directory: a reader or a
/// power cut sees either the old file or the new one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = TempPath::new(temp_sibling(path, "new"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(tmp.path())?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(tmp.path(), path)?;
    tmp.disarm();
    fsync_dir(parent_of(path))
}

/// Renames `from` to `to` unless `to` exists; atomic, so two publishers can't both win.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            // Some file systems lack RENAME_NOREPLACE: fall back to link + unlink below.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOSYS) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
    fs::hard_link(from, to)?;
    fs::remove_file(from)
}

/// A path removed on drop unless disarmed: temp files and half-built trees never outlive an error.
#[derive(Debug)]
pub struct TempPath {
    path: Option<PathBuf>,
}

impl TempPath {
    pub fn new(path: PathBuf) -> Self {
        TempPath { path: Some(path) }
    }
    pub fn path(&self) -> &Path {
        self.path.as_deref().expect("temp path used after disarm")
    }
    /// Keeps the file: it was renamed into place.
    pub fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {
                    let _ = fs::remove_dir_all(&p);
                }
                Ok(_) => {
                    let _ = fs::remove_file(&p);
                }
                Err(_) => {}
            }
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn rename_noreplace_refuses_existing() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::write(&a, b"a").unwrap();
        fs::write(&b, b"b").unwrap();
        assert_eq!(
            rename_noreplace(&a, &b).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs::read(&b).unwrap(), b"b");
        fs::remove_file(&b).unwrap();
        rename_noreplace(&a, &b).unwrap();
        assert!(!a.exists());
    }

    #[test]
    fn temp_path_cleans_up_unless_disarmed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        fs::write(&p, b"x").unwrap();
        drop(TempPath::new(p.clone()));
        assert!(!p.exists());
        fs::create_dir_all(p.join("sub")).unwrap();
        drop(TempPath::new(p.clone()));
        assert!(!p.exists());
        fs::write(&p, b"x").unwrap();
        TempPath::new(p.clone()).disarm();
        assert!(p.exists());
    }
}
