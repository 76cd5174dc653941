//! One update at a time: an exclusive `flock` on the updater's lock file, released on drop or
//! when the process dies.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::{Duration, Instant};

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
    /// Takes the lock, waiting up to `wait` for it. Readers that only ask whether an update runs
    /// (the status, the web page's polling) hold the lock for an instant, and an update that
    /// collided with one of them must not give up as if another update ran.
    pub fn acquire_within(path: &Path, wait: Duration) -> Result<Self, LockError> {
        let deadline = Instant::now() + wait;
        loop {
            match Self::try_acquire(path) {
                Err(LockError::Busy(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_brief_holder_is_waited_for_and_a_long_one_reported() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("lock");
        let held = UpdateLock::try_acquire(&path).unwrap();
        assert!(matches!(
            UpdateLock::try_acquire(&path),
            Err(LockError::Busy(_))
        ));
        assert!(matches!(
            UpdateLock::acquire_within(&path, Duration::from_millis(30)),
            Err(LockError::Busy(_))
        ));
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                UpdateLock::acquire_within(&path, Duration::from_secs(10)).is_ok()
            })
        };
        drop(held);
        assert!(waiter.join().unwrap(), "the lock was taken once released");
    }
}
