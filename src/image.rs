//! Image names and versions: `opq-box-update-<VERSION>.tar.bz2`, its sidecars and the VERSION file.

use std::fmt;
use std::str::FromStr;

pub const PREFIX: &str = "opq-box-update-";
pub const SUFFIX: &str = ".tar.bz2";
pub const SHA256_SUFFIX: &str = ".sha256";
pub const MINISIG_SUFFIX: &str = ".minisig";

/// Files that every image's top directory holds beside the payload.
pub const VERSION_FILE: &str = "VERSION";
pub const INSTALL_SCRIPT: &str = "install_update.sh";
pub const SUMS_FILE: &str = "SHA256SUMS";
pub const RESERVED_NAMES: [&str; 3] = [VERSION_FILE, INSTALL_SCRIPT, SUMS_FILE];

/// An image version: seconds since the Unix epoch when it was built. Never zero.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "u64", into = "u64")]
pub struct Version(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionError {
    #[error("version {0:?} is not a positive decimal integer (seconds since the Unix epoch)")]
    NotDecimal(String),
    #[error("version must be greater than zero")]
    Zero,
}

impl Version {
    pub fn new(n: u64) -> Result<Self, VersionError> {
        if n == 0 {
            Err(VersionError::Zero)
        } else {
            Ok(Version(n))
        }
    }
    pub fn get(self) -> u64 {
        self.0
    }
    /// The text of an image's VERSION file.
    pub fn file_contents(self) -> String {
        format!("{}\n", self.0)
    }
    /// Reads a VERSION file's text: the number, optionally followed by one newline.
    pub fn parse_file(text: &[u8]) -> Result<Self, VersionError> {
        let text = std::str::from_utf8(text)
            .map_err(|_| VersionError::NotDecimal(String::from_utf8_lossy(text).into_owned()))?;
        text.strip_suffix('\n').unwrap_or(text).parse()
    }
}

impl FromStr for Version {
    type Err = VersionError;
    /// Only canonical decimal: digits, no sign, no leading zero, so that a name maps to one version
    /// and back.
    fn from_str(s: &str) -> Result<Self, VersionError> {
        let canonical = !s.is_empty()
            && s.len() <= 20
            && s.bytes().all(|b| b.is_ascii_digit())
            && !(s.len() > 1 && s.starts_with('0'));
        if !canonical {
            return Err(VersionError::NotDecimal(s.to_string()));
        }
        let n: u64 = s
            .parse()
            .map_err(|_| VersionError::NotDecimal(s.to_string()))?;
        Version::new(n)
    }
}

impl TryFrom<u64> for Version {
    type Error = VersionError;
    fn try_from(n: u64) -> Result<Self, VersionError> {
        Version::new(n)
    }
}

impl From<Version> for u64 {
    fn from(v: Version) -> u64 {
        v.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The name of one image, derived from its version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageName(pub Version);

impl ImageName {
    pub fn version(self) -> Version {
        self.0
    }
    /// `opq-box-update-<V>`: the archive's top directory and the release directory's name.
    pub fn top_dir(self) -> String {
        format!("{PREFIX}{}", self.0)
    }
    pub fn file_name(self) -> String {
        format!("{PREFIX}{}{SUFFIX}", self.0)
    }
    pub fn sha256_name(self) -> String {
        format!("{}{SHA256_SUFFIX}", self.file_name())
    }
    pub fn minisig_name(self) -> String {
        format!("{}{MINISIG_SUFFIX}", self.file_name())
    }
    /// Parses an image file name; sidecars and anything else give `None`.
    pub fn parse_file_name(name: &str) -> Option<Self> {
        let v = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
        v.parse().ok().map(ImageName)
    }
    /// Parses a release directory name (`opq-box-update-<V>`).
    pub fn parse_top_dir(name: &str) -> Option<Self> {
        name.strip_prefix(PREFIX)?.parse().ok().map(ImageName)
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

/// What a file in an update directory is, judged by its name alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Image,
    Sha256,
    Minisig,
}

/// Classifies a file name as an image or one of its sidecars; anything else is `None`.
pub fn classify(name: &str) -> Option<(ImageName, FileKind)> {
    if let Some(image) = ImageName::parse_file_name(name) {
        return Some((image, FileKind::Image));
    }
    if let Some(base) = name.strip_suffix(SHA256_SUFFIX) {
        return ImageName::parse_file_name(base).map(|i| (i, FileKind::Sha256));
    }
    if let Some(base) = name.strip_suffix(MINISIG_SUFFIX) {
        return ImageName::parse_file_name(base).map(|i| (i, FileKind::Minisig));
    }
    None
}

/// The trusted comment that binds a signature to one image file and version.
pub fn trusted_comment(image: ImageName) -> String {
    format!("file:{} version:{}", image.file_name(), image.version())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_only_canonical_decimal() {
        assert_eq!(
            "1700000000".parse::<Version>().unwrap().get(),
            1_700_000_000
        );
        for bad in [
            "",
            "0",
            "01",
            "+1",
            "-1",
            "1.0",
            " 1",
            "1 ",
            "abc",
            "99999999999999999999999",
        ] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn names_round_trip_and_order_numerically() {
        let a = ImageName::parse_file_name("opq-box-update-999.tar.bz2").unwrap();
        let b = ImageName::parse_file_name("opq-box-update-1000.tar.bz2").unwrap();
        assert!(a < b);
        assert_eq!(b.file_name(), "opq-box-update-1000.tar.bz2");
        assert_eq!(b.top_dir(), "opq-box-update-1000");
        assert_eq!(ImageName::parse_top_dir("opq-box-update-1000"), Some(b));
        assert_eq!(
            classify("opq-box-update-1000.tar.bz2.sha256"),
            Some((b, FileKind::Sha256))
        );
        assert_eq!(
            classify("opq-box-update-1000.tar.bz2.minisig"),
            Some((b, FileKind::Minisig))
        );
        for bad in [
            "opq-box-update-.tar.bz2",
            "opq-box-update-0.tar.bz2",
            "opq-box-update-1.tar.gz",
            "x-opq-box-update-1.tar.bz2",
            "opq-box-update-1.tar.bz2.part",
            "opq-box-update-1.tar.bz2.sha256.sha256",
            "../opq-box-update-1.tar.bz2",
        ] {
            assert_eq!(classify(bad), None, "{bad}");
        }
    }

    #[test]
    fn version_file_allows_one_trailing_newline() {
        assert_eq!(Version::parse_file(b"42\n").unwrap().get(), 42);
        assert_eq!(Version::parse_file(b"42").unwrap().get(), 42);
        assert!(Version::parse_file(b"42\n\n").is_err());
        assert!(Version::parse_file(b"\xff").is_err());
    }

    #[test]
    fn trusted_comment_names_file_and_version() {
        let i = ImageName(Version::new(7).unwrap());
        assert_eq!(
            trusted_comment(i),
            "file:opq-box-update-7.tar.bz2 version:7"
        );
    }
}
