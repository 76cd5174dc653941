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
    let parse = || SignatureBox::from_string(sig_text);
    let sig = match std::panic::catch_unwind(parse) {
        Ok(Ok(sig)) => sig,
        _ => bail!("the .minisig of {image} is not a minisign signature"),
    };
    let file = File::open(path).with_context(|| format!("reading {}", path.display()))?;
    minisign::verify(pk, &sig, std::io::BufReader::new(file), true, false, false)
        .map_err(|e| anyhow::anyhow!("the signature of {image} does not verify: {e}"))?;
    let comment = sig.trusted_comment().map_err(|e| anyhow::anyhow!("{e}"))?;
    let want = trusted_comment(image);
    if comment != want {
        bail!(
            "the signature is for another image: its trusted comment is {comment:?}, expected {want:?}"
        );
    }
    Ok(())
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
        assert!(verify_image(&pk, &img, "garbage", one).is_err());

        let inline = std::fs::read_to_string(&pkp)
            .unwrap()
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        load_public_key(&inline).unwrap();
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
