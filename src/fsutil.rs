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

/// A name in the same directory that readers of that directory ignore (hidden, `.tmp` suffix),
/// and that no other call gives. The pid alone is not enough: a box's daemons start with the
/// same pids at every boot, so a temp file a power cut left behind would carry the name the
/// same daemon picks after the reboot (seen on the virtual box: one state write refused with
/// "File exists"), and two threads of one process could pick the same name.
pub fn temp_sibling(path: &Path, tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    parent_of(path).join(format!(
        ".{name}.{tag}-{}-{seq}-{nanos:09}.tmp",
        std::process::id()
    ))
}

/// Writes `data` to `path` as temp file, fsync, rename, fsync of the directory: a reader or a
/// power cut sees either the old file or the new one.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let (tmp, mut f) = create_temp(path, "new", mode)?;
    {
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(tmp.path(), path)?;
    tmp.disarm();
    fsync_dir(parent_of(path))
}

/// Creates a fresh temp sibling of `path` for writing. A name that exists already is never
/// opened (nor removed: it may be another writer's); the next name is tried instead.
pub fn create_temp(path: &Path, tag: &str, mode: u32) -> io::Result<(TempPath, File)> {
    let mut tries = 0;
    loop {
        let name = temp_sibling(path, tag);
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&name)
        {
            Ok(f) => return Ok((TempPath::new(name), f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    }
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
    fn concurrent_writers_and_leftover_temps_never_collide() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        // What a power cut leaves: a temp file under the name the old scheme gave this pid.
        let leftover = d
            .path()
            .join(format!(".state.json.new-{}.tmp", std::process::id()));
        fs::write(&leftover, b"half").unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..50 {
                        write_atomic(p, format!("{t}-{i}").as_bytes(), 0o644).unwrap();
                    }
                });
            }
        });
        assert!(fs::read_to_string(&p).unwrap().ends_with("-49"));
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(leftover.exists(), "another writer's temp file was removed");
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
