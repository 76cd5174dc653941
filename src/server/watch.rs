//! Keeps the index in step with the directory: inotify events as they come, a slow full rescan as
//! the safety net, and the directory itself going away and coming back.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};

use super::index::{Files, Image, Index, Probe, Snapshot, probe, scan};
use crate::image::classify;

/// While the directory is missing, how often to look for it again.
const RETRY_MISSING: Duration = Duration::from_millis(200);
/// The longest the thread sleeps before it looks at the stop flag.
const MAX_WAIT: Duration = Duration::from_secs(1);

fn watch_mask() -> AddWatchFlags {
    AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

/// The directory being watched: the watch, and the inode it is on.
struct Watched {
    wd: WatchDescriptor,
    dev: u64,
    ino: u64,
}

pub struct Watcher {
    index: Arc<Index>,
    dir: PathBuf,
    inotify: Inotify,
    watched: Option<Watched>,
    /// The complete images and sidecars, as last seen.
    files: Files,
    /// Names created or modified and not yet closed: still being written.
    pending: HashSet<String>,
    rescan_every: Duration,
    next_rescan: Instant,
    hasher: Sender<Arc<Image>>,
}

impl Watcher {
    /// Watches the index's directory and fills the index from a first scan; the directory must be
    /// there and readable.
    pub fn new(index: Arc<Index>, rescan_every: Duration) -> Result<Watcher> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .context("cannot start inotify")?;
        let dir = index.dir().to_path_buf();
        let mut w = Watcher {
            index,
            dir: dir.clone(),
            inotify,
            watched: None,
            files: Files::new(),
            pending: HashSet::new(),
            rescan_every,
            next_rescan: Instant::now() + rescan_every,
            hasher: spawn_hasher(dir),
        };
        w.establish()
            .with_context(|| format!("cannot watch update directory {}", w.dir.display()))?;
        Ok(w)
    }

    pub fn spawn(mut self, stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("watcher".into())
            .spawn(move || self.run(&stop))
    }

    fn establish(&mut self) -> Result<()> {
        let meta = std::fs::metadata(&self.dir)?;
        let wd = self.inotify.add_watch(&self.dir, watch_mask())?;
        self.watched = Some(Watched {
            wd,
            dev: meta.dev(),
            ino: meta.ino(),
        });
        self.pending.clear();
        self.files = scan(&self.dir, &self.pending)?;
        self.next_rescan = Instant::now() + self.rescan_every;
        self.publish(false);
        Ok(())
    }

    fn run(&mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if self.watched.is_none() && self.dir.is_dir() {
                match self.establish() {
                    Ok(()) => log::info!(
                        "update directory {} is back: {}",
                        self.dir.display(),
                        self.index.snapshot().summary()
                    ),
                    Err(e) => {
                        self.watched = None;
                        log::debug!("update directory not ready yet: {e:#}");
                    }
                }
            }
            let wait = if self.watched.is_some() {
                self.next_rescan
                    .saturating_duration_since(Instant::now())
                    .min(MAX_WAIT)
            } else {
                RETRY_MISSING
            };
            let mut changed = false;
            let mut rescan = false;
            if self.wait_readable(wait) {
                loop {
                    match self.inotify.read_events() {
                        Ok(events) => {
                            for ev in events {
                                let (c, r) = self.apply(&ev);
                                changed |= c;
                                rescan |= r;
                            }
                        }
                        Err(Errno::EAGAIN) => break,
                        Err(Errno::EINTR) => continue,
                        Err(e) => {
                            log::warn!("reading inotify events failed: {e}");
                            rescan = true;
                            break;
                        }
                    }
                }
            }
            if self.watched.is_some() && (rescan || Instant::now() >= self.next_rescan) {
                changed |= self.rescan();
            }
            if changed {
                self.publish(true);
            }
        }
    }

    fn wait_readable(&self, wait: Duration) -> bool {
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, timeout), Ok(n) if n > 0)
    }

    /// Applies one event; returns (the files changed, a full rescan is needed).
    fn apply(&mut self, ev: &InotifyEvent) -> (bool, bool) {
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            log::warn!("inotify queue overflowed; rescanning");
            return (false, true);
        }
        let Some(watched) = &self.watched else {
            return (false, false);
        };
        if ev.wd != watched.wd {
            // Left over from a directory that went away.
            return (false, false);
        }
        if ev.mask.intersects(
            AddWatchFlags::IN_DELETE_SELF
                | AddWatchFlags::IN_MOVE_SELF
                | AddWatchFlags::IN_IGNORED
                | AddWatchFlags::IN_UNMOUNT,
        ) {
            self.lose_directory();
            return (true, false);
        }
        let Some(name) = ev.name.as_ref().and_then(|n| n.to_str()) else {
            return (false, false);
        };
        if classify(name).is_none() {
            return (false, false);
        }
        let name = name.to_string();
        let m = ev.mask;
        if m.intersects(AddWatchFlags::IN_CLOSE_WRITE | AddWatchFlags::IN_MOVED_TO) {
            // The writer closed it, or it was renamed in whole: complete. The kernel is not asked
            // about other writers here, because it sends IN_CLOSE_WRITE a moment before it stops
            // counting the closing writer.
            self.pending.remove(&name);
            match probe(&self.dir, &name, false) {
                Probe::Complete(info) | Probe::Unknown(info) => {
                    self.files.insert(name, info);
                }
                Probe::Writing | Probe::Absent => {
                    self.files.remove(&name);
                }
            }
        } else if m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MODIFY) {
            self.files.remove(&name);
            self.pending.insert(name);
        } else if m.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_MOVED_FROM) {
            self.pending.remove(&name);
            self.files.remove(&name);
        } else if m.contains(AddWatchFlags::IN_ATTRIB) && self.files.contains_key(&name) {
            // touch or chmod: the validators change.
            match probe(&self.dir, &name, false) {
                Probe::Complete(info) | Probe::Unknown(info) => {
                    self.files.insert(name, info);
                }
                Probe::Writing | Probe::Absent => {
                    self.files.remove(&name);
                }
            }
        } else {
            return (false, false);
        }
        (true, false)
    }

    fn lose_directory(&mut self) {
        if let Some(w) = self.watched.take() {
            // Gone already when the directory was deleted; still there when it was moved away.
            let _ = self.inotify.rm_watch(w.wd);
        }
        self.files.clear();
        self.pending.clear();
        log::warn!(
            "update directory {} went away; serving nothing until it is back",
            self.dir.display()
        );
    }

    /// Lists the directory in full; returns whether that changed anything.
    fn rescan(&mut self) -> bool {
        self.next_rescan = Instant::now() + self.rescan_every;
        let same_dir = match (&self.watched, std::fs::metadata(&self.dir)) {
            (Some(w), Ok(m)) => m.is_dir() && m.dev() == w.dev && m.ino() == w.ino,
            _ => false,
        };
        if !same_dir {
            // Replaced without an event reaching us (bind mounts, network file systems).
            self.lose_directory();
            return true;
        }
        match scan(&self.dir, &self.pending) {
            Ok(files) => {
                self.pending
                    .retain(|n| !files.contains_key(n) && self.dir.join(n).exists());
                if files == self.files {
                    return false;
                }
                log::info!("rescan found changes that inotify did not report");
                self.files = files;
                true
            }
            Err(e) => {
                log::warn!("cannot list {}: {e}", self.dir.display());
                false
            }
        }
    }

    /// Makes the files seen the index's; `report` logs what changed (not wanted for the first
    /// scan, which the start line sums up).
    fn publish(&mut self, report: bool) {
        let old = self.index.snapshot();
        let new = Snapshot::build(&self.files, &old);
        for (v, img) in &new.images {
            match old.images.get(v) {
                None if report => log::info!("image added: {}", img.name),
                Some(o) if report && o.file != img.file => {
                    log::info!("image replaced: {}", img.name)
                }
                _ => {}
            }
            if !img.digest_known() {
                let _ = self.hasher.send(img.clone());
            }
        }
        for (v, img) in &old.images {
            if report && !new.images.contains_key(v) {
                log::info!("image removed: {}", img.name);
            }
        }
        self.index.publish(new);
    }
}

/// Computes missing digests in the background, so that the first `/ls` in JSON rarely waits.
fn spawn_hasher(dir: PathBuf) -> Sender<Arc<Image>> {
    let (tx, rx): (Sender<Arc<Image>>, Receiver<Arc<Image>>) = channel();
    // Without this thread the digests are still computed, by the first request that needs them.
    let _ = std::thread::Builder::new()
        .name("hasher".into())
        .spawn(move || {
            while let Ok(img) = rx.recv() {
                img.digest(&dir);
            }
        });
    tx
}
