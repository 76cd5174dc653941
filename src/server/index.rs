//! The in-memory index of the update directory: the complete images and sidecars it holds, what
//! requests are answered from, and the only way a request ever reaches a file.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use crate::image::{FileKind, ImageName, Version, classify};
use crate::sums;

/// The identity and validators of one file as it was indexed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileInfo {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: SystemTime,
}

impl FileInfo {
    pub fn from_metadata(m: &Metadata) -> FileInfo {
        let mtime = SystemTime::UNIX_EPOCH
            + Duration::new(
                m.mtime().max(0) as u64,
                m.mtime_nsec().clamp(0, 999_999_999) as u32,
            );
        FileInfo {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime,
        }
    }

    /// A strong validator: changes whenever the file is replaced or rewritten.
    pub fn etag(&self) -> String {
        let ns = self
            .mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("\"{:x}-{:x}-{:x}\"", self.ino, self.size, ns)
    }
}

/// One image and what is published beside it.
#[derive(Debug)]
pub struct Image {
    pub name: ImageName,
    pub file: FileInfo,
    pub sha256: Option<FileInfo>,
    pub minisig: Option<FileInfo>,
    /// Filled once, from the sidecar or by hashing the image; shared with the next snapshot as
    /// long as neither file changed.
    digest: Arc<OnceLock<Option<String>>>,
}

impl Image {
    pub fn file_info(&self, kind: FileKind) -> Option<&FileInfo> {
        match kind {
            FileKind::Image => Some(&self.file),
            FileKind::Sha256 => self.sha256.as_ref(),
            FileKind::Minisig => self.minisig.as_ref(),
        }
    }

    pub fn signed(&self) -> bool {
        self.minisig.is_some()
    }

    pub fn digest_known(&self) -> bool {
        self.digest.get().is_some()
    }

    /// The image's sha256: its `.sha256` sidecar's when that names this image, else computed
    /// from the file. Computed once per file; `None` when the files can't be read.
    pub fn digest(&self, dir: &Path) -> Option<String> {
        self.digest
            .get_or_init(|| {
                let from_sidecar = self
                    .sha256
                    .as_ref()
                    .and_then(|info| read_sidecar(dir, &self.name, info));
                if from_sidecar.is_some() {
                    return from_sidecar;
                }
                let file = open_indexed(dir, &self.name.file_name(), &self.file).ok()?;
                match sums::sha256_reader(file) {
                    Ok((digest, _)) => Some(digest),
                    Err(e) => {
                        log::warn!("cannot hash {}: {e}", self.name);
                        None
                    }
                }
            })
            .clone()
    }
}

fn read_sidecar(dir: &Path, name: &ImageName, info: &FileInfo) -> Option<String> {
    let file = open_indexed(dir, &name.sha256_name(), info).ok()?;
    let mut text = String::new();
    file.take(4096).read_to_string(&mut text).ok()?;
    match sums::parse_sidecar(&text, &name.file_name()) {
        Ok(d) => Some(d),
        Err(e) => {
            log::warn!("ignoring {}: {e:#}", name.sha256_name());
            None
        }
    }
}

/// What the directory held at one moment: images by version, oldest first.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub images: BTreeMap<Version, Arc<Image>>,
}

impl Snapshot {
    pub fn newest(&self) -> Option<&Arc<Image>> {
        self.images.values().next_back()
    }

    /// "3 images (newest opq-box-update-N.tar.bz2)", for the log.
    pub fn summary(&self) -> String {
        match (self.images.len(), self.newest()) {
            (_, None) => "no images".into(),
            (1, Some(img)) => format!("1 image ({})", img.name),
            (n, Some(img)) => format!("{n} images (newest {})", img.name),
        }
    }

    /// Finds a file by its name: an image, or a sidecar of an image that is there.
    pub fn lookup(&self, name: &str) -> Option<(&Arc<Image>, FileKind, &FileInfo)> {
        let (image, kind) = classify(name)?;
        let entry = self.images.get(&image.version())?;
        Some((entry, kind, entry.file_info(kind)?))
    }

    /// Builds the snapshot of `files`, keeping the digests of images whose files did not change.
    pub fn build(files: &Files, previous: &Snapshot) -> Snapshot {
        let mut images = BTreeMap::new();
        for (name, info) in files {
            let Some((image, FileKind::Image)) = classify(name) else {
                continue;
            };
            let sha256 = files.get(&image.sha256_name()).copied();
            let minisig = files.get(&image.minisig_name()).copied();
            let digest = match previous.images.get(&image.version()) {
                Some(old) if old.file == *info && old.sha256 == sha256 => old.digest.clone(),
                _ => Arc::new(OnceLock::new()),
            };
            images.insert(
                image.version(),
                Arc::new(Image {
                    name: image,
                    file: *info,
                    sha256,
                    minisig,
                    digest,
                }),
            );
        }
        Snapshot { images }
    }
}

/// The complete files of the directory that classify as images or sidecars, by name.
pub type Files = BTreeMap<String, FileInfo>;

/// The index shared by the request threads and kept up to date by the watcher.
pub struct Index {
    dir: PathBuf,
    current: RwLock<Arc<Snapshot>>,
}

impl Index {
    pub fn new(dir: PathBuf) -> Index {
        Index {
            dir,
            current: RwLock::new(Arc::new(Snapshot::default())),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn publish(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    /// Opens an indexed file for serving, if it is still the very file that was indexed.
    pub fn open(&self, name: &str, info: &FileInfo) -> io::Result<File> {
        open_indexed(&self.dir, name, info)
    }
}

/// Opens `dir/name` without following a symlink and checks that it is the regular file `info`
/// describes: whatever happened to the directory since, only an indexed file is ever opened.
pub fn open_indexed(dir: &Path, name: &str, info: &FileInfo) -> io::Result<File> {
    let file = open_nofollow(&dir.join(name))?;
    let meta = file.metadata()?;
    if !meta.is_file() || FileInfo::from_metadata(&meta) != *info {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the file changed since it was indexed",
        ));
    }
    Ok(file)
}

/// O_NONBLOCK so that a FIFO swapped in under an image's name can't block the open.
fn open_nofollow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

/// What a look at one directory entry found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// A regular file nobody has open for writing (as far as the kernel can tell us).
    Complete(FileInfo),
    /// A regular file that some process still has open for writing.
    Writing,
    /// A regular file whose writers can't be known (no lease permission, or a network file
    /// system): only inotify's events can tell whether it is complete.
    Unknown(FileInfo),
    /// Gone, or not a regular file (symlinks and directories are never served).
    Absent,
}

/// Looks at `dir/name`. With `check_writers`, asks the kernel whether anyone has the file open
/// for writing.
pub fn probe(dir: &Path, name: &str, check_writers: bool) -> Probe {
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => {}
        _ => return Probe::Absent,
    }
    let Ok(file) = open_nofollow(&path) else {
        return Probe::Absent;
    };
    let info = match file.metadata() {
        Ok(m) if m.is_file() => FileInfo::from_metadata(&m),
        _ => return Probe::Absent,
    };
    if !check_writers {
        return Probe::Complete(info);
    }
    match open_for_writing(&file) {
        Some(false) => Probe::Complete(info),
        Some(true) => Probe::Writing,
        None => Probe::Unknown(info),
    }
}

/// Whether any process has `file` open for writing. The kernel refuses a read lease exactly
/// then (EAGAIN), so taking one and dropping it at once answers the question without reading
/// /proc. `None` when leases can't be taken here (another owner without CAP_LEASE, NFS, leases
/// disabled). A writer opening the file in the instant the lease is held gets it at once after
/// its release; the lease-break signal (SIGIO) is blocked by the server.
fn open_for_writing(file: &File) -> Option<bool> {
    let fd = file.as_raw_fd();
    // SAFETY: F_SETLEASE takes an integer argument and touches no memory of ours; `fd` stays
    // open for the duration of both calls since `file` is borrowed.
    let r = unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) };
    if r == 0 {
        // SAFETY: as above.
        unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
        return Some(false);
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Some(true),
        _ => None,
    }
}

/// Lists the directory: every image or sidecar that is a complete regular file. `pending` names
/// (created or modified, not yet closed, as inotify told) are left out when the kernel can't say
/// whether they are still being written.
pub fn scan(dir: &Path, pending: &HashSet<String>) -> io::Result<Files> {
    let mut files = Files::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if classify(&name).is_none() {
            continue;
        }
        match probe(dir, &name, true) {
            Probe::Complete(info) => {
                files.insert(name, info);
            }
            Probe::Unknown(info) if !pending.contains(&name) => {
                files.insert(name, info);
            }
            Probe::Unknown(_) | Probe::Writing | Probe::Absent => {}
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn info(size: u64) -> FileInfo {
        FileInfo {
            dev: 1,
            ino: size + 100,
            size,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(size),
        }
    }

    fn files(names: &[&str]) -> Files {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), info(i as u64 + 1)))
            .collect()
    }

    #[test]
    fn snapshot_orders_numerically_and_joins_sidecars() {
        let f = files(&[
            "opq-box-update-999.tar.bz2",
            "opq-box-update-1000.tar.bz2",
            "opq-box-update-1000.tar.bz2.sha256",
            "opq-box-update-1000.tar.bz2.minisig",
            "opq-box-update-5.tar.bz2.sha256",
        ]);
        let s = Snapshot::build(&f, &Snapshot::default());
        let versions: Vec<u64> = s.images.keys().map(|v| v.get()).collect();
        assert_eq!(versions, [999, 1000], "an orphan sidecar is not an image");
        let newest = s.newest().unwrap();
        assert_eq!(newest.name.file_name(), "opq-box-update-1000.tar.bz2");
        assert!(newest.signed() && newest.sha256.is_some());
        assert!(!s.images[&Version::new(999).unwrap()].signed());
        assert!(
            s.lookup("opq-box-update-1000.tar.bz2.minisig").is_some()
                && s.lookup("opq-box-update-999.tar.bz2.minisig").is_none()
                && s.lookup("opq-box-update-5.tar.bz2.sha256").is_none()
                && s.lookup("secret.txt").is_none()
        );
    }

    #[test]
    fn digests_survive_rebuilds_only_while_files_are_unchanged() {
        let mut f = files(&["opq-box-update-7.tar.bz2"]);
        let s1 = Snapshot::build(&f, &Snapshot::default());
        let v = Version::new(7).unwrap();
        s1.images[&v].digest.set(Some("d".into())).unwrap();
        let s2 = Snapshot::build(&f, &s1);
        assert!(s2.images[&v].digest_known());
        f.insert("opq-box-update-7.tar.bz2".into(), info(42));
        let s3 = Snapshot::build(&f, &s2);
        assert!(!s3.images[&v].digest_known());
    }

    #[test]
    fn digest_comes_from_the_sidecar_or_the_file() {
        let d = tempfile::tempdir().unwrap();
        let name = "opq-box-update-3.tar.bz2";
        std::fs::write(d.path().join(name), b"abc").unwrap();
        let real = sums::sha256_file(&d.path().join(name)).unwrap();
        let f = scan(d.path(), &HashSet::new()).unwrap();
        let s = Snapshot::build(&f, &Snapshot::default());
        assert_eq!(s.newest().unwrap().digest(d.path()), Some(real.clone()));

        let other = "0".repeat(64);
        std::fs::write(
            d.path().join(format!("{name}.sha256")),
            sums::sidecar_text(&other, name),
        )
        .unwrap();
        let s = Snapshot::build(&scan(d.path(), &HashSet::new()).unwrap(), &s);
        assert_eq!(s.newest().unwrap().digest(d.path()), Some(other));

        // A sidecar naming another image is not believed.
        std::fs::write(
            d.path().join(format!("{name}.sha256")),
            sums::sidecar_text(&"1".repeat(64), "opq-box-update-4.tar.bz2"),
        )
        .unwrap();
        let s = Snapshot::build(&scan(d.path(), &HashSet::new()).unwrap(), &s);
        assert_eq!(s.newest().unwrap().digest(d.path()), Some(real));
    }

    #[test]
    fn scan_skips_files_open_for_writing_symlinks_and_strangers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("opq-box-update-1.tar.bz2"), b"done").unwrap();
        std::fs::write(p.join("secret.txt"), b"no").unwrap();
        std::fs::write(p.join("opq-box-update-2.tar.bz2.part"), b"no").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", p.join("opq-box-update-3.tar.bz2")).unwrap();
        std::fs::create_dir(p.join("opq-box-update-4.tar.bz2")).unwrap();
        let mut writing = File::create(p.join("opq-box-update-5.tar.bz2")).unwrap();
        writing.write_all(b"half").unwrap();

        let names = |f: Files| f.into_keys().collect::<Vec<_>>();
        assert_eq!(
            names(scan(p, &HashSet::new()).unwrap()),
            ["opq-box-update-1.tar.bz2"]
        );
        drop(writing);
        assert_eq!(
            names(scan(p, &HashSet::new()).unwrap()),
            ["opq-box-update-1.tar.bz2", "opq-box-update-5.tar.bz2"]
        );
    }

    #[test]
    fn open_indexed_refuses_a_replaced_file() {
        let d = tempfile::tempdir().unwrap();
        let name = "opq-box-update-1.tar.bz2";
        std::fs::write(d.path().join(name), b"one").unwrap();
        let Probe::Complete(i) = probe(d.path(), name, false) else {
            panic!("not found")
        };
        assert!(open_indexed(d.path(), name, &i).is_ok());
        std::fs::write(d.path().join("new"), b"two!").unwrap();
        std::fs::rename(d.path().join("new"), d.path().join(name)).unwrap();
        assert!(open_indexed(d.path(), name, &i).is_err());
        std::fs::remove_file(d.path().join(name)).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.path().join(name)).unwrap();
        assert!(open_indexed(d.path(), name, &i).is_err());
        assert_eq!(probe(d.path(), name, true), Probe::Absent);
    }
}
