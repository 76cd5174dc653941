//! Where the box keeps its releases, its `current` link, the updater's state and the update log,
//! all under `--root`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil::fsync_dir;
use crate::image::{ImageName, Version};

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    pub fn opq_dir(&self) -> PathBuf {
        self.root.join("opt/opq")
    }
    pub fn releases_dir(&self) -> PathBuf {
        self.root.join("opt/opq/releases")
    }
    pub fn current_link(&self) -> PathBuf {
        self.root.join("opt/opq/current")
    }
    pub fn release_dir(&self, image: ImageName) -> PathBuf {
        self.releases_dir().join(image.top_dir())
    }
    pub fn partial_dir(&self, image: ImageName) -> PathBuf {
        self.releases_dir()
            .join(format!("{}.partial", image.top_dir()))
    }
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("var/lib/box-updater")
    }
    pub fn downloads_dir(&self) -> PathBuf {
        self.state_dir().join("downloads")
    }
    pub fn state_file(&self) -> PathBuf {
        self.state_dir().join("state.json")
    }
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir().join("lock")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("var/log/opq/box_update.log")
    }
    /// Where `install_update.sh` installs the box's systemd units.
    pub fn units_dir(&self) -> PathBuf {
        self.root.join("etc/systemd/system")
    }
    /// The OPQ box's config, where the original box software reads it.
    pub fn default_box_config(&self) -> PathBuf {
        self.root.join("etc/opq/opqbox_config.json")
    }

    pub fn create_dirs(&self) -> io::Result<()> {
        for d in [
            self.releases_dir(),
            self.downloads_dir(),
            self.root.join("var/log/opq"),
        ] {
            fs::create_dir_all(&d)?;
        }
        Ok(())
    }

    /// The release `current` points at, if it points at a well-named release directory.
    pub fn current(&self) -> Option<ImageName> {
        let target = fs::read_link(self.current_link()).ok()?;
        let name = target.file_name()?.to_str()?;
        ImageName::parse_top_dir(name)
    }

    pub fn installed_version(&self) -> Option<Version> {
        self.current().map(ImageName::version)
    }

    /// Complete release directories, oldest first.
    pub fn releases(&self) -> Vec<ImageName> {
        let mut out: Vec<ImageName> = fs::read_dir(self.releases_dir())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| ImageName::parse_top_dir(e.file_name().to_str()?))
            .collect();
        out.sort();
        out
    }

    /// Points `current` at `image` with one atomic rename, and makes it durable.
    pub fn switch_current(&self, image: ImageName) -> io::Result<()> {
        let opq = self.opq_dir();
        fs::create_dir_all(&opq)?;
        let tmp = opq.join(".current.new");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(image.top_dir()), &tmp)?;
        fs::rename(&tmp, self.current_link())?;
        fsync_dir(&opq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_is_a_relative_link_and_reads_back() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::new(d.path());
        l.create_dirs().unwrap();
        assert_eq!(l.installed_version(), None);
        let a = ImageName(Version::new(5).unwrap());
        let b = ImageName(Version::new(6).unwrap());
        for i in [a, b] {
            fs::create_dir_all(l.release_dir(i)).unwrap();
        }
        l.switch_current(a).unwrap();
        l.switch_current(b).unwrap();
        assert_eq!(
            fs::read_link(l.current_link()).unwrap(),
            Path::new("releases/opq-box-update-6")
        );
        assert_eq!(l.installed_version(), Some(b.version()));
        assert_eq!(l.releases(), vec![a, b]);
    }
}
