//! Verifying: the image's sha256 must match its sidecar and, where the box has a public key, its
//! minisign signature must verify and name this image: all before anything is unpacked.

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::{State, Unpacking};
use crate::image::ImageName;
use crate::sums::parse_sidecar;
use crate::updater::engine::Engine;

#[derive(Debug)]
pub struct Verifying {
    pub image: ImageName,
    pub file: PathBuf,
    /// The digest computed while the file arrived (empty for an upload: computed here).
    pub sha256: String,
    pub sidecar: Option<String>,
    pub signature: Option<String>,
    /// Whether `signature` verified over the bytes as they were downloaded (computed on the way
    /// in, as `sha256` is); `None` when it could not be checked that way: the file is read.
    pub streamed_signature: Option<Result<(), String>>,
    /// Uploaded by the box's owner rather than downloaded: there is no sidecar to fetch.
    pub local: bool,
    /// An upload of an older version was asked for explicitly.
    pub allow_older: bool,
}

/// An uploaded image. Its name must be an image name; `force` allows same-or-older versions.
pub fn from_local(
    file: PathBuf,
    file_name: String,
    signature: Option<String>,
    force: bool,
) -> State {
    let Some(image) = ImageName::parse_file_name(&file_name) else {
        let _ = std::fs::remove_file(&file);
        return State::failed(
            crate::updater::status::Step::Verifying,
            format!("{file_name:?} is not an update image name (opq-box-update-<VERSION>.tar.bz2)"),
        );
    };
    State::Verifying(Verifying {
        image,
        file,
        sha256: String::new(),
        sidecar: None,
        signature,
        streamed_signature: None,
        local: true,
        allow_older: force,
    })
}

impl Verifying {
    pub fn handle(self, engine: &Engine) -> Result<State> {
        let result = self.check(engine);
        if result.is_err() {
            // A file that failed its checks is never worth resuming.
            let _ = std::fs::remove_file(&self.file);
            let _ = std::fs::remove_file(crate::updater::http::meta_path(&self.file));
        }
        result?;
        Ok(State::Unpacking(Unpacking {
            image: self.image,
            file: self.file,
        }))
    }

    fn check(&self, engine: &Engine) -> Result<()> {
        let s = &engine.settings;
        let name = self.image.file_name();
        let installed = engine.layout().installed_version();
        if self.local && installed == Some(self.image.version()) {
            bail!(
                "version {} is the running release; there is nothing to install",
                self.image.version()
            );
        }
        if self.local && !self.allow_older && installed.is_some_and(|i| self.image.version() < i) {
            bail!("{name} is older than the installed version; import it with force to downgrade");
        }
        match &self.sidecar {
            Some(text) => {
                let want = parse_sidecar(text, &name)?;
                if want != self.sha256 {
                    bail!(
                        "{name} does not match its .sha256 sidecar (expected {want}, got {}); the download is corrupt or was tampered with",
                        self.sha256
                    );
                }
            }
            None if self.local => {
                engine.log.info(&format!(
                    "{name} was uploaded without a sidecar; its SHA256SUMS will be checked"
                ));
            }
            None if s.allow_unverified => {
                engine.log.warn(&format!("{name} has no .sha256 sidecar; installing unverified as --allow-unverified says"));
            }
            None => bail!(
                "the server has no .sha256 sidecar for {name}; refusing an unverified image (use --allow-unverified for old servers)"
            ),
        }
        if let Some(pk) = &s.public_key {
            let Some(sig) = &self.signature else {
                bail!("{name} is not signed, and this box only installs signed images");
            };
            let how = match &self.streamed_signature {
                Some(verdict) => {
                    crate::signing::verify_streamed(verdict, sig, self.image)?;
                    "over the bytes as they arrived"
                }
                None => {
                    crate::signing::verify_image(pk, &self.file, sig, self.image)?;
                    "over the file"
                }
            };
            engine
                .log
                .info(&format!("signature of {name} verified {how}"));
        }
        Ok(())
    }
}
