//! One update at a time: an exclusive `flock` on the updater's lock file, released on drop or
//! when the process dies.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

pub struct UpdateLock {
    _lock: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another update is running (pid {0}); wait for it to finish")]
    Busy(String),
    #[error("cannot open lock file {0}: {1}")]
    Io(String, std::io::Error),
}

impl UpdateLock {
    pub fn try_acquire(path: &Path) -> Result<Self, LockError> {
        let io = |e| LockError::Io(path.display().to_string(), e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let _ = lock.set_len(0);
                let _ = lock.rewind();
                let _ = write!(lock, "{}", std::process::id());
                Ok(UpdateLock { _lock: lock })
            }
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                Err(LockError::Busy(if pid.trim().is_empty() {
                    "unknown".into()
                } else {
                    pid.trim().into()
                }))
            }
        }
    }
}
