//! The virtual box's disks from the host, with no loop mount: making an ext4 image from a tree
//! (`mkfs.ext4 -d`), copying the cached system disk, checking a file system (`e2fsck`) after its
//! journal is replayed as the guest's next mount would, and reading files and links (`debugfs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {what} (is e2fsprogs installed?)"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A new ext4 image of `size_mib` (sparse) labelled `label`, holding `tree` if given.
pub fn make_ext4(image: &Path, size_mib: u64, label: &str, tree: Option<&Path>) -> Result<()> {
    let mut c = Command::new("mkfs.ext4");
    c.args(["-q", "-F", "-L", label]);
    if let Some(t) = tree {
        c.arg("-d").arg(t);
    }
    c.arg(image).arg(format!("{size_mib}M"));
    run(&mut c, "mkfs.ext4").map(|_| ())
}

/// Copies a disk image, keeping it sparse (and sharing blocks where the file system can).
pub fn copy_image(from: &Path, to: &Path) -> Result<()> {
    run(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(from)
            .arg(to),
        "cp",
    )
    .map(|_| ())
}

/// What `check` found.
#[derive(Debug)]
pub struct FsCheck {
    /// `e2fsck -fn` found nothing to fix after the journal was replayed.
    pub clean: bool,
    /// Whether the journal had to be replayed (the file system was not unmounted cleanly).
    pub replayed: bool,
    pub report: String,
}

/// Checks the file system of a disk image as the guest's next boot would find it: on a copy, the
/// journal is replayed (`e2fsck -E journal_only`), then `e2fsck -fn` must find nothing to fix.
/// The image itself is not changed. Returns the replayed copy's path too, for `cat`/`readlink`.
pub fn check(image: &Path, scratch: &Path) -> Result<(FsCheck, PathBuf)> {
    let copy = scratch.join(format!(
        "{}.checked",
        image.file_name().unwrap_or_default().to_string_lossy()
    ));
    copy_image(image, &copy)?;
    let replay = Command::new("e2fsck")
        .args(["-y", "-E", "journal_only"])
        .arg(&copy)
        .output()
        .context("cannot run e2fsck")?;
    let replay_text = String::from_utf8_lossy(&replay.stdout).into_owned()
        + &String::from_utf8_lossy(&replay.stderr);
    let replayed = replay_text.contains("recovering journal");
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&copy)
        .output()
        .context("cannot run e2fsck")?;
    let report =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    Ok((
        FsCheck {
            clean: out.status.success(),
            replayed,
            report,
        },
        copy,
    ))
}

/// A file's contents, read with debugfs (`path` from the file system's root).
pub fn cat(image: &Path, path: &str) -> Result<Vec<u8>> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat \"{path}\""))
        .arg(image)
        .output()
        .context("cannot run debugfs")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if let Some(line) = err.lines().find(|l| l.contains("File not found")) {
        bail!("{path}: {line}");
    }
    Ok(out.stdout)
}

/// Where a symbolic link points, read with debugfs; `None` when there is no such link.
pub fn readlink(image: &Path, path: &str) -> Result<Option<String>> {
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat \"{path}\""))
            .arg(image),
        "debugfs",
    )?;
    Ok(out.lines().find_map(|l| {
        l.trim()
            .strip_prefix("Fast link dest: ")
            .map(|d| d.trim_matches('"').to_string())
    }))
}

/// The names in a directory, read with debugfs (without `.` and `..`).
pub fn ls(image: &Path, path: &str) -> Result<Vec<String>> {
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("ls -p \"{path}\""))
            .arg(image),
        "debugfs",
    )?;
    // `ls -p` prints /inode/mode/uid/gid/name/size/ per entry.
    let mut names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_string))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect();
    names.sort();
    Ok(names)
}

/// Copies a directory out of a disk image into `dest` (which must not exist), with debugfs's
/// `rdump`: files with their contents, links as links.
pub fn dump(image: &Path, path: &str, dest: &Path) -> Result<()> {
    let parent = dest
        .parent()
        .context("dump needs a destination with a parent")?;
    let staging = parent.join(format!(
        ".dump-{}",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    let out = run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump \"{path}\" \"{}\"", staging.display()))
            .arg(image),
        "debugfs rdump",
    )?;
    let name = Path::new(path)
        .file_name()
        .with_context(|| format!("{path}: not a directory path"))?;
    let dumped = staging.join(name);
    if !dumped.is_dir() {
        bail!("{path} is not a directory on the disk: {out}");
    }
    std::fs::rename(&dumped, dest)?;
    std::fs::remove_dir_all(&staging)?;
    Ok(())
}

/// What `current` points at on a data disk (`/opq/current`, as the guest mounts the disk on
/// /data and binds /data/opq on /opt/opq), checked complete: the release directory exists, its
/// `VERSION` matches its name, and every file passes its `SHA256SUMS` with nothing missing or
/// extra. Returns the release's version. `image` should be a checked copy (see `check`).
pub fn current_release(image: &Path, scratch: &Path) -> Result<u64> {
    let link = readlink(image, "/opq/current")?.context("/opq/current is not a link")?;
    let name = link
        .strip_prefix("releases/")
        .with_context(|| format!("current -> {link}: not releases/<name>"))?;
    let version: u64 = name
        .strip_prefix("opq-box-update-")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("current -> {link}: not a release name"))?;
    let dest = scratch.join(name);
    let _ = std::fs::remove_dir_all(&dest);
    dump(image, &format!("/opq/{link}"), &dest)
        .with_context(|| format!("current -> {link}, which is not there"))?;
    let text = std::fs::read_to_string(dest.join("VERSION"))
        .with_context(|| format!("{name} has no VERSION"))?;
    if text != format!("{version}\n") {
        bail!("{name}: VERSION says {text:?}");
    }
    let sums = std::fs::read_to_string(dest.join("SHA256SUMS"))
        .with_context(|| format!("{name} has no SHA256SUMS"))?;
    opq_update::sums::Sha256Sums::parse(&sums)
        .and_then(|s| s.verify_dir(&dest))
        .with_context(|| format!("{name} is not complete"))?;
    std::fs::remove_dir_all(&dest)?;
    Ok(version)
}

/// Runs debugfs requests (one a line: `write HOSTFILE PATH`, `symlink PATH TARGET`, ...) on an
/// image with writes allowed; the image must not be in use.
pub fn debugfs_write(image: &Path, requests: &str) -> Result<()> {
    let file = image.with_extension("debugfs");
    std::fs::write(&file, requests)?;
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&file)
        .arg(image)
        .output()
        .context("cannot run debugfs")?;
    let _ = std::fs::remove_file(&file);
    let err = String::from_utf8_lossy(&out.stderr);
    // debugfs exits 0 even when a request fails; its complaints come on stderr after the banner.
    if !out.status.success() || err.lines().skip(1).any(|l| !l.trim().is_empty()) {
        bail!("debugfs -w on {}: {err}", image.display());
    }
    Ok(())
}
