//! Minisign keys and signatures that bind an image's bytes to its file name and version.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};
use minisign::{KeyPair, PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};

use crate::fsutil::{TempPath, fsync_dir, rename_noreplace, temp_sibling};
use crate::image::{ImageName, trusted_comment};

/// The environment variable holding the password of an encrypted secret key.
pub const PASSWORD_ENV: &str = "BUILD_UPDATE_KEY_PASSWORD";

/// Writes a new unencrypted key pair; neither file may exist yet. The secret key is mode 0600.
pub fn generate_keypair(secret_path: &Path, public_path: &Path) -> Result<()> {
    for p in [secret_path, public_path] {
        if p.exists() {
            bail!(
                "{} already exists; remove it or choose another path",
                p.display()
            );
        }
    }
    let KeyPair { pk, sk } =
        KeyPair::generate_unencrypted_keypair().context("generating a key pair")?;
    let sk_text = sk.to_box(Some("opq box update secret key"))?.into_string();
    let pk_text = pk.to_box()?.into_string();
    let sk_tmp = write_new(secret_path, sk_text.as_bytes(), 0o600)?;
    let pk_tmp = write_new(public_path, pk_text.as_bytes(), 0o644)?;
    rename_noreplace(sk_tmp.path(), secret_path)
        .with_context(|| format!("writing {}", secret_path.display()))?;
    sk_tmp.disarm();
    if let Err(e) = rename_noreplace(pk_tmp.path(), public_path) {
        let _ = std::fs::remove_file(secret_path);
        return Err(e).with_context(|| format!("writing {}", public_path.display()));
    }
    pk_tmp.disarm();
    for p in [secret_path, public_path] {
        fsync_dir(
            p.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )?;
    }
    Ok(())
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<TempPath> {
    let tmp = TempPath::new(temp_sibling(path, "key"));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp.path())
        .with_context(|| {
            format!(
                "cannot create {}; check the directory exists and is writable",
                path.display()
            )
        })?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(tmp)
}

/// Loads a secret key file; an encrypted one needs its password in `BUILD_UPDATE_KEY_PASSWORD`.
pub fn load_secret_key(path: &Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read secret key {}", path.display()))?;
    let parse = || -> Result<SecretKey, minisign::PError> {
        let sk_box = SecretKeyBox::from_string(&text)?;
        match std::env::var(PASSWORD_ENV) {
            Ok(pw) => SecretKey::from_box(sk_box, Some(pw)),
            Err(_) => SecretKey::from_unencrypted_box(sk_box),
        }
    };
    match std::panic::catch_unwind(parse) {
        Ok(Ok(sk)) if !sk.is_encrypted() => Ok(sk),
        Ok(Ok(_)) => bail!(
            "secret key {} is password-protected; set {PASSWORD_ENV} to its password",
            path.display()
        ),
        Ok(Err(e)) => bail!(
            "{} is not a usable minisign secret key ({e}); create one with `build-update keygen` \
             (or set {PASSWORD_ENV} for a password-protected key)",
            path.display()
        ),
        Err(_) => bail!(
            "{} is not a minisign secret key; create one with `build-update keygen`",
            path.display()
        ),
    }
}

/// Signs the image file at `path`, named `image`; returns the `.minisig` text.
pub fn sign_image(sk: &SecretKey, path: &Path, image: ImageName) -> Result<String> {
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let comment = trusted_comment(image);
    let untrusted = format!("signature of {} by build-update", image.file_name());
    let sig = minisign::sign(
        None,
        sk,
        std::io::BufReader::new(file),
        Some(&comment),
        Some(&untrusted),
    )
    .context("signing the image")?;
    Ok(sig.into_string())
}

/// Reads a public key given inline (the base64 line) or as a minisign `.pub` file.
pub fn load_public_key(key_or_file: &str) -> Result<PublicKey> {
    if let Ok(pk) = PublicKey::from_base64(key_or_file.trim()) {
        return Ok(pk);
    }
    let text = std::fs::read_to_string(key_or_file).with_context(|| {
        format!(
            "--public-key {key_or_file:?} is neither a minisign public key nor a readable key file"
        )
    })?;
    parse_public_key_text(&text)
        .with_context(|| format!("{key_or_file} is not a minisign public key"))
}

fn parse_public_key_text(text: &str) -> Result<PublicKey> {
    let text = text.trim();
    if !text.contains('\n') {
        return PublicKey::from_base64(text).map_err(|e| anyhow::anyhow!("{e}"));
    }
    let parse = || PublicKeyBox::from_string(text).and_then(|b| b.into_public_key());
    match std::panic::catch_unwind(parse) {
        Ok(Ok(pk)) => Ok(pk),
        Ok(Err(e)) => bail!("{e}"),
        Err(_) => bail!("malformed key file"),
    }
}

/// Checks that `sig_text` is a valid signature of the image file at `path` by `pk`, and that its
/// trusted comment names exactly this image and version, so a signature can't be moved.
pub fn verify_image(pk: &PublicKey, path: &Path, sig_text: &str, image: ImageName) -> Result<()> {
    let sig = parse_signature(sig_text, image)?;
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    minisign::verify(pk, &sig, std::io::BufReader::new(file), true, false, false)
        .map_err(|e| anyhow::anyhow!("the signature of {image} does not verify: {e}"))?;
    check_trusted_comment(&sig, image)
}

fn parse_signature(sig_text: &str, image: ImageName) -> Result<SignatureBox> {
    match std::panic::catch_unwind(|| SignatureBox::from_string(sig_text)) {
        Ok(Ok(sig)) => Ok(sig),
        _ => bail!("the .minisig of {image} is not a minisign signature"),
    }
}

fn check_trusted_comment(sig: &SignatureBox, image: ImageName) -> Result<()> {
    let comment = sig.trusted_comment().map_err(|e| anyhow::anyhow!("{e}"))?;
    let want = trusted_comment(image);
    if comment != want {
        bail!(
            "the signature is for another image: its trusted comment is {comment:?}, expected {want:?}"
        );
    }
    Ok(())
}

/// A signature and its key, parsed for checking an image while its bytes stream past (during the
/// download), so that the file is not read a second time for the signature's BLAKE2b prehash.
pub struct StreamingKey {
    pk: minisign_verify::PublicKey,
    sig: minisign_verify::Signature,
}

impl StreamingKey {
    /// `None` when the signature can't be checked this way (a legacy signature, a malformed
    /// one): `verify_image` then reads the file and says what is wrong.
    pub fn new(pk: &PublicKey, sig_text: &str) -> Option<Self> {
        let parsed = std::panic::catch_unwind(|| {
            let pk = minisign_verify::PublicKey::from_base64(&pk.to_base64()).ok()?;
            let sig = minisign_verify::Signature::decode(sig_text).ok()?;
            pk.verify_stream(&sig).ok()?;
            Some(StreamingKey { pk, sig })
        });
        parsed.ok().flatten()
    }

    pub fn start(&self) -> StreamingCheck<'_> {
        let fresh = self
            .pk
            .verify_stream(&self.sig)
            .expect("checked in StreamingKey::new");
        StreamingCheck {
            now: fresh.clone(),
            fresh,
        }
    }
}

/// The running prehash of the bytes seen so far.
pub struct StreamingCheck<'a> {
    fresh: minisign_verify::StreamVerifier<'a>,
    now: minisign_verify::StreamVerifier<'a>,
}

impl StreamingCheck<'_> {
    /// Forgets what was seen: the bytes start again from the first.
    pub fn restart(&mut self) {
        self.now = self.fresh.clone();
    }

    pub fn update(&mut self, bytes: &[u8]) {
        self.now.update(bytes);
    }

    /// Whether the signature verifies over the bytes seen; the error is for `finish_streamed`.
    pub fn finish(mut self) -> Result<(), String> {
        self.now.finalize().map_err(|e| e.to_string())
    }
}

/// `verify_image` for an image whose bytes were checked as they streamed past: `verdict` is what
/// `StreamingCheck::finish` said over exactly the bytes of the file.
pub fn verify_streamed(
    verdict: &Result<(), String>,
    sig_text: &str,
    image: ImageName,
) -> Result<()> {
    let sig = parse_signature(sig_text, image)?;
    if let Err(e) = verdict {
        bail!("the signature of {image} does not verify: {e}");
    }
    check_trusted_comment(&sig, image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Version;

    #[test]
    fn sign_and_verify_binds_name_and_version() {
        let d = tempfile::tempdir().unwrap();
        let (skp, pkp) = (d.path().join("k.key"), d.path().join("k.pub"));
        generate_keypair(&skp, &pkp).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&skp).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(
            generate_keypair(&skp, &pkp).is_err(),
            "must not overwrite keys"
        );

        let sk = load_secret_key(&skp).unwrap();
        let pk = load_public_key(pkp.to_str().unwrap()).unwrap();
        let img = d.path().join("img");
        std::fs::write(&img, b"image bytes").unwrap();
        let one = ImageName(Version::new(1).unwrap());
        let two = ImageName(Version::new(2).unwrap());
        let sig = sign_image(&sk, &img, one).unwrap();
        verify_image(&pk, &img, &sig, one).unwrap();
        let moved = verify_image(&pk, &img, &sig, two).unwrap_err().to_string();
        assert!(moved.contains("another image"), "{moved}");
        std::fs::write(&img, b"image bytez").unwrap();
        assert!(verify_image(&pk, &img, &sig, one).is_err());
        std::fs::write(&img, b"image bytes").unwrap();
        assert!(verify_image(&pk, &img, "garbage", one).is_err());

        let inline = std::fs::read_to_string(&pkp)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        load_public_key(&inline).unwrap();
    }

    /// The check made while downloading agrees with the one that reads the file, on a good
    /// image, a tampered one, one seen twice after a restart, and a signature moved over.
    #[test]
    fn streamed_check_agrees_with_reading_the_file() {
        let d = tempfile::tempdir().unwrap();
        let (skp, pkp) = (d.path().join("k.key"), d.path().join("k.pub"));
        generate_keypair(&skp, &pkp).unwrap();
        let sk = load_secret_key(&skp).unwrap();
        let pk = load_public_key(pkp.to_str().unwrap()).unwrap();
        let img = d.path().join("img");
        let bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&img, &bytes).unwrap();
        let one = ImageName(Version::new(1).unwrap());
        let two = ImageName(Version::new(2).unwrap());
        let sig = sign_image(&sk, &img, one).unwrap();
        let key = StreamingKey::new(&pk, &sig).expect("a current minisign signature");
        let streamed = |data: &[u8], restart_after: Option<usize>| {
            let mut c = key.start();
            if let Some(k) = restart_after {
                c.update(&data[..k]);
                c.update(b"bytes of an abandoned attempt");
                c.restart();
            }
            for piece in data.chunks(65_536) {
                c.update(piece);
            }
            c.finish()
        };
        verify_streamed(&streamed(&bytes, None), &sig, one).unwrap();
        verify_streamed(&streamed(&bytes, Some(1000)), &sig, one).unwrap();
        let moved = verify_streamed(&streamed(&bytes, None), &sig, two).unwrap_err();
        assert!(moved.to_string().contains("another image"), "{moved}");

        let mut tampered = bytes.clone();
        tampered[123_456] ^= 1;
        let e = verify_streamed(&streamed(&tampered, None), &sig, one).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
        std::fs::write(&img, &tampered).unwrap();
        assert!(verify_image(&pk, &img, &sig, one).is_err());
        assert!(streamed(&bytes[..bytes.len() - 1], None).is_err());

        assert!(StreamingKey::new(&pk, "garbage").is_none());
        let (sk2, pk2) = (d.path().join("2.key"), d.path().join("2.pub"));
        generate_keypair(&sk2, &pk2).unwrap();
        let other = load_public_key(pk2.to_str().unwrap()).unwrap();
        assert!(
            StreamingKey::new(&other, &sig).is_none(),
            "another key's signature is left to verify_image, which says it does not verify"
        );
        let e = verify_image(&other, &img, &sig, one).unwrap_err();
        assert!(e.to_string().contains("does not verify"), "{e}");
    }

    #[test]
    fn bad_secret_key_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bad.key");
        std::fs::write(&p, "untrusted comment: x\nnot base64 at all\n").unwrap();
        let e = format!("{:#}", load_secret_key(&p).unwrap_err());
        assert!(e.contains("bad.key") && e.contains("keygen"), "{e}");
    }
}
