//! The box's systemd units as releases install them (`install_update.sh` copies every
//! `*.service` one level down in a release into `etc/systemd/system` and enables it), and undoing
//! what a dropped release (rolled back, or whose install script failed) left there.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fsutil::write_atomic;
use crate::updater::layout::Layout;

/// The unit files a release carries: every `*.service` one level down, by name, less the guard's
/// unit, which is never a release's to install.
pub fn unit_files(release: &Path) -> BTreeMap<String, PathBuf> {
    let mut units = BTreeMap::new();
    for dir in std::fs::read_dir(release).into_iter().flatten().flatten() {
        if !dir.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.ends_with(".service")
                && name != crate::updater::guard::UNIT
                && f.file_type().is_ok_and(|t| t.is_file())
            {
                units.entry(name).or_insert_with(|| f.path());
            }
        }
    }
    units
}

/// Undoes what the `dropped` release's install script did to the box's units, as the release
/// the box keeps or goes back to (`running`) has them: a unit installed as `dropped` ships it is
/// put back as `running` ships it, or, when `running` has no such unit, removed with its links
/// in `*.wants/` and `*.requires/`. A unit installed otherwise (by hand, by the system, by
/// another release) is left alone. Returns what was done, one phrase each.
pub fn undo(layout: &Layout, dropped: &Path, running: Option<&Path>) -> Vec<String> {
    let units_dir = layout.units_dir();
    let keep = running.map(unit_files).unwrap_or_default();
    let mut done = Vec::new();
    for (name, shipped) in unit_files(dropped) {
        let installed = units_dir.join(&name);
        let (Ok(now), Ok(shipped)) = (std::fs::read(&installed), std::fs::read(&shipped)) else {
            continue;
        };
        if now != shipped {
            continue;
        }
        match keep.get(&name).map(std::fs::read) {
            Some(Ok(ours)) if ours == now => {}
            Some(Ok(ours)) => match write_atomic(&installed, &ours, 0o644) {
                Ok(()) => done.push(format!("put back {name}")),
                Err(e) => done.push(format!("cannot put back {name}: {e}")),
            },
            Some(Err(e)) => done.push(format!("cannot read {name} of the running release: {e}")),
            None => {
                for link in links_to(&units_dir, &name) {
                    let _ = std::fs::remove_file(link);
                }
                match std::fs::remove_file(&installed) {
                    Ok(()) => done.push(format!("removed {name}")),
                    Err(e) => done.push(format!("cannot remove {name}: {e}")),
                }
            }
        }
    }
    if !done.is_empty() {
        let _ = crate::fsutil::fsync_dir(&units_dir);
    }
    done
}

/// The symbolic links that enable `name` for a target (`<target>.wants/<name>`, `.requires/`).
fn links_to(units_dir: &Path, name: &str) -> Vec<PathBuf> {
    std::fs::read_dir(units_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|d| {
            let n = d.file_name().to_string_lossy().into_owned();
            n.ends_with(".wants") || n.ends_with(".requires")
        })
        .map(|d| d.path().join(name))
        .filter(|l| l.is_symlink())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn a_dropped_release_loses_its_own_units_and_gives_back_changed_ones() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::new(d.path().join("root"));
        let units = layout.units_dir();
        let (old, new) = (d.path().join("old"), d.path().join("new"));
        write(&old.join("svc/a.service"), "a old\n");
        write(&new.join("svc/a.service"), "a new\n");
        write(&new.join("svc/b.service"), "b new\n");
        write(&new.join("svc/c.service"), "c new\n");
        write(
            &new.join("box-updater/box-updater-guard.service"),
            "guard\n",
        );
        // As the new release's install script left them: a changed, b added and enabled; c
        // was replaced by hand since; the guard is not the release's.
        write(&units.join("a.service"), "a new\n");
        write(&units.join("b.service"), "b new\n");
        write(&units.join("c.service"), "c by hand\n");
        write(&units.join("box-updater-guard.service"), "guard\n");
        std::fs::create_dir_all(units.join("multi-user.target.wants")).unwrap();
        for u in ["a.service", "b.service"] {
            std::os::unix::fs::symlink(
                Path::new("/etc/systemd/system").join(u),
                units.join("multi-user.target.wants").join(u),
            )
            .unwrap();
        }
        let done = undo(&layout, &new, Some(&old));
        assert_eq!(done, vec!["put back a.service", "removed b.service"]);
        assert_eq!(
            std::fs::read_to_string(units.join("a.service")).unwrap(),
            "a old\n"
        );
        assert!(!units.join("b.service").exists());
        assert!(!units.join("multi-user.target.wants/b.service").is_symlink());
        assert!(units.join("multi-user.target.wants/a.service").is_symlink());
        assert_eq!(
            std::fs::read_to_string(units.join("c.service")).unwrap(),
            "c by hand\n"
        );
        assert!(units.join("box-updater-guard.service").is_file());
        assert!(undo(&layout, &new, Some(&old)).is_empty(), "done once");
    }
}
