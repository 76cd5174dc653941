//! The update log on the box (`var/log/opq/box_update.log`, as on the original boxes): every step,
//! and the install script's output, with a timestamp; also mirrored to the process log.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct UpdateLog {
    path: PathBuf,
}

impl UpdateLog {
    pub fn new(path: PathBuf) -> Self {
        UpdateLog { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> std::io::Result<File> {
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
    }

    /// Appends one line, and mirrors it to the process log; a log that can't be written must not
    /// stop an update.
    pub fn line(&self, level: log::Level, msg: &str) {
        log::log!(level, "{msg}");
        self.file_only(level, msg);
    }

    /// Appends one line to the file alone: for an update's final message, which the caller
    /// prints (the command line) or logs (the daemon) once itself.
    pub fn file_only(&self, level: log::Level, msg: &str) {
        if let Ok(mut f) = self.open() {
            let _ = writeln!(f, "{} {} {msg}", timestamp(), level.as_str().to_lowercase());
        }
    }

    pub fn info(&self, msg: &str) {
        self.line(log::Level::Info, msg);
    }
    pub fn warn(&self, msg: &str) {
        self.line(log::Level::Warn, msg);
    }
    pub fn error(&self, msg: &str) {
        self.line(log::Level::Error, msg);
    }

    /// A file handle for a child's stdout and stderr to append to.
    pub fn for_child(&self) -> std::io::Result<File> {
        self.open()
    }

    /// The last `n` lines, read from the end of the file without loading all of it.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let Ok(mut f) = File::open(&self.path) else {
            return Vec::new();
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(64 * 1024);
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(start)).is_err() || f.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        let text = String::from_utf8_lossy(&buf);
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        if start > 0 && !lines.is_empty() {
            lines.remove(0);
        }
        let skip = lines.len().saturating_sub(n);
        lines.split_off(skip)
    }
}

/// UTC time as `YYYY-MM-DDTHH:MM:SSZ`, without a date crate.
pub fn timestamp() -> String {
    format_utc(crate::fsutil::unix_now())
}

pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_utc() {
        assert_eq!(super::format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(super::format_utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
