//! Downloading: fetches the image's sidecars, then the image into a `.part` file, resuming and
//! retrying transient failures, hashing as it goes.

use anyhow::{Result, bail};

use super::{State, Verifying};
use crate::image::ImageName;
use crate::signing::{StreamingCheck, StreamingKey};
use crate::updater::engine::Engine;
use crate::updater::http::Tap;

#[derive(Debug)]
pub struct Downloading {
    pub image: ImageName,
    pub url: String,
}

impl Downloading {
    pub fn handle(self, engine: &Engine) -> Result<State> {
        let s = &engine.settings;
        let sidecar = engine.with_retries("the .sha256 sidecar", || {
            engine.http.get_text(&format!("{}.sha256", self.url), 4096)
        })?;
        let signature = match &s.public_key {
            None => None,
            Some(_) => match engine.with_retries("the signature", || {
                engine
                    .http
                    .get_text(&format!("{}.minisig", self.url), 16 * 1024)
            })? {
                Some(sig) => Some(sig),
                None => bail!(
                    "{} is not signed, and this box only installs signed images",
                    self.image
                ),
            },
        };
        let part = engine
            .layout()
            .downloads_dir()
            .join(format!("{}.part", self.image.file_name()));
        // The image and what it expands to must fit: allow a third of the free space for the file.
        let max_size = engine.usable_space(&engine.layout().downloads_dir()) / 3;
        let log = |m: &str| engine.log.info(m);
        // The signature's BLAKE2b prehash is computed on the way in, as the sha256 is, so that
        // verifying does not read the whole file again.
        let streaming_key = match (&s.public_key, &signature) {
            (Some(pk), Some(sig)) => StreamingKey::new(pk, sig),
            _ => None,
        };
        let mut check = SignatureTap(streaming_key.as_ref().map(StreamingKey::start));
        let (sha256, size) = engine.with_retries("the image", || {
            engine.http.download(
                &self.url,
                &part,
                max_size,
                &mut |done, total| {
                    engine.status.update_progress(|st| {
                        st.bytes_done = done;
                        st.bytes_total = total;
                    })
                },
                &mut check,
                &log,
            )
        })?;
        let streamed_signature = check.0.map(StreamingCheck::finish);
        engine.status.update(|st| {
            st.bytes_done = size;
            st.bytes_total = Some(size);
        });
        engine.log.info(&format!(
            "downloaded {} ({size} bytes, sha256 {sha256})",
            self.image
        ));
        Ok(State::Verifying(Verifying {
            image: self.image,
            file: part,
            sha256,
            sidecar,
            signature,
            streamed_signature,
            local: false,
            allow_older: false,
        }))
    }
}

/// The signature check fed from the download, where the key and signature allow it.
struct SignatureTap<'a>(Option<StreamingCheck<'a>>);

impl Tap for SignatureTap<'_> {
    fn restart(&mut self) {
        if let Some(c) = &mut self.0 {
            c.restart();
        }
    }
    fn update(&mut self, bytes: &[u8]) {
        if let Some(c) = &mut self.0 {
            c.update(bytes);
        }
    }
}
