//! Unpacking: the verified image into `releases/<name>.partial/`, renamed to its final name once
//! complete and durable.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{Installing, State};
use crate::archive::unpack::unpack_image;
use crate::fsutil::{TempPath, fsync_dir};
use crate::image::ImageName;
use crate::updater::engine::Engine;

#[derive(Debug)]
pub struct Unpacking {
    pub image: ImageName,
    pub file: PathBuf,
}

impl Unpacking {
    pub fn handle(self, engine: &Engine) -> Result<State> {
        let layout = engine.layout();
        let release = layout.release_dir(self.image);
        if release.exists() {
            // Left by a run that stopped before switching: it is not trusted, it is redone.
            engine.log.info(&format!(
                "removing an earlier unfinished copy of {}",
                self.image.top_dir()
            ));
            std::fs::remove_dir_all(&release)
                .with_context(|| format!("removing {}", release.display()))?;
        }
        let partial = TempPath::new(layout.partial_dir(self.image));
        if partial.path().exists() {
            std::fs::remove_dir_all(partial.path())?;
        }
        let total = std::fs::metadata(&self.file).map(|m| m.len()).ok();
        // Progress is shown against the image's (compressed) size, the one total known ahead.
        engine.status.update(|s| {
            s.bytes_done = 0;
            s.bytes_total = total;
        });
        let mut done = 0u64;
        let result = unpack_image(
            &self.file,
            self.image,
            partial.path(),
            engine.unpack_limits(),
            engine.settings.threads,
            &mut |p| {
                done += p.written;
                crate::updater::fault::point_at("unpack", done);
                engine
                    .status
                    .update_progress(|s| s.bytes_done = p.compressed);
            },
        );
        if result.is_err() {
            let _ = std::fs::remove_file(&self.file);
            let _ = std::fs::remove_file(crate::updater::http::meta_path(&self.file));
        }
        let stats = result?;
        engine.sync_disk(partial.path());
        crate::updater::fault::point("unpack:before-rename");
        std::fs::rename(partial.path(), &release)
            .with_context(|| format!("renaming into {}", release.display()))?;
        partial.disarm();
        fsync_dir(&layout.releases_dir())?;
        engine.log.info(&format!(
            "unpacked {} files, {} bytes, from {} ({} bytes)",
            stats.files,
            stats.bytes,
            self.image,
            total.unwrap_or(0)
        ));
        Ok(State::Installing(Installing {
            image: self.image,
            download: self.file,
        }))
    }
}
