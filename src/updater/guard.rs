//! The guard: a copy of the last confirmed release's `box-updater`, kept outside `releases/` in
//! `var/lib/box-updater/guard/`, and its unit `box-updater-guard.service`, which runs it at every
//! boot to confirm or roll back a newly switched release. A new release cannot break it: it is
//! replaced only once a release is confirmed, by the guard itself. Installed by the first
//! migration (`install_update.sh`) or by the first confirm of a release that carries it.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::fsutil::{TempPath, fsync_dir, temp_sibling, write_atomic};
use crate::updater::layout::Layout;

pub const UNIT: &str = "box-updater-guard.service";
/// Where a release carries the updater and the guard's unit.
const RELEASE_DIR: &str = "box-updater";
const BINARY: &str = "box-updater";

pub fn binary(layout: &Layout) -> PathBuf {
    layout.state_dir().join("guard").join(BINARY)
}

pub fn unit_path(layout: &Layout) -> PathBuf {
    layout.units_dir().join(UNIT)
}

/// Whether a guard confirms releases on this box at boot (else `serve` does it at its start).
pub fn installed(layout: &Layout) -> bool {
    binary(layout).is_file() && unit_path(layout).is_file()
}

/// Makes the updater of the confirmed `release` (a release directory) the guard, and installs the
/// guard's unit from it. Returns whether anything changed. A release without an updater leaves
/// the guard as it is.
pub fn refresh(layout: &Layout, release: &Path) -> Result<bool> {
    let src = release.join(RELEASE_DIR).join(BINARY);
    if !src.is_file() {
        return Ok(false);
    }
    let mut changed = false;
    let dest = binary(layout);
    if !same_content(&src, &dest) {
        let dir = dest.parent().expect("guard binary has a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = TempPath::new(temp_sibling(&dest, "new"));
        std::fs::copy(&src, tmp.path())
            .with_context(|| format!("copying {} to the guard", src.display()))?;
        std::fs::File::open(tmp.path())?.sync_all()?;
        std::fs::rename(tmp.path(), &dest)?;
        tmp.disarm();
        fsync_dir(dir)?;
        changed = true;
    }
    let unit_src = release.join(RELEASE_DIR).join(UNIT);
    if let Ok(text) = std::fs::read(&unit_src) {
        let dest = unit_path(layout);
        if std::fs::read(&dest).ok().as_deref() != Some(&text[..]) {
            std::fs::create_dir_all(layout.units_dir())?;
            write_atomic(&dest, &text, 0o644)
                .with_context(|| format!("installing {}", dest.display()))?;
            changed = true;
        }
        let wants = layout.units_dir().join("multi-user.target.wants");
        let link = wants.join(UNIT);
        let target = Path::new("/etc/systemd/system").join(UNIT);
        if std::fs::read_link(&link).ok().as_deref() != Some(&target) {
            std::fs::create_dir_all(&wants)?;
            let tmp = TempPath::new(temp_sibling(&link, "new"));
            std::os::unix::fs::symlink(&target, tmp.path())?;
            std::fs::rename(tmp.path(), &link)?;
            tmp.disarm();
            fsync_dir(&wants)?;
            changed = true;
        }
    }
    Ok(changed)
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if ma.len() != mb.len() {
        return false;
    }
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        match fa.read(&mut ba) {
            Ok(0) => return true,
            Ok(n) => {
                if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
                    return false;
                }
            }
            Err(_) => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_copies_the_updater_and_installs_the_unit_once() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path().join("root"));
        let rel = d.path().join("rel");
        std::fs::create_dir_all(rel.join("box-updater")).unwrap();
        assert!(
            !refresh(&layout, &rel).unwrap(),
            "no updater: nothing to do"
        );
        std::fs::write(rel.join("box-updater/box-updater"), vec![7u8; 200_000]).unwrap();
        std::fs::write(rel.join("box-updater").join(UNIT), "[Install]\n").unwrap();
        assert!(refresh(&layout, &rel).unwrap());
        assert!(installed(&layout));
        assert_eq!(std::fs::read(binary(&layout)).unwrap(), vec![7u8; 200_000]);
        assert_eq!(
            std::fs::read_link(
                layout
                    .units_dir()
                    .join("multi-user.target.wants")
                    .join(UNIT)
            )
            .unwrap(),
            Path::new("/etc/systemd/system").join(UNIT)
        );
        assert!(!refresh(&layout, &rel).unwrap(), "unchanged");
        std::fs::write(rel.join("box-updater/box-updater"), vec![8u8; 200_000]).unwrap();
        assert!(refresh(&layout, &rel).unwrap());
        assert_eq!(std::fs::read(binary(&layout)).unwrap(), vec![8u8; 200_000]);
    }
}
