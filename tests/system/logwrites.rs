//! A replayer for the kernel's dm-log-writes logs (Documentation/admin-guide/device-mapper/
//! log-writes.rst; the format as xfstests' src/log-writes reads it): the log device holds a
//! super block at sector 0 (magic, version, number of entries, sector size), then the entries,
//! each one sector of header (`sector`, `nr_sectors`, `flags`, `data_len`, all little-endian
//! u64; a mark's name follows the header in the same sector), followed by the write's data
//! (`nr_sectors` sectors; none for flushes, marks and discards). The target logs a write only
//! once a flush or FUA has made it durable, so replaying the entries up to a flush or FUA
//! rebuilds exactly what the disk is guaranteed to hold at that moment.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
pub const METADATA: u64 = 1 << 4;
const MAGIC: u64 = 0x006a_7366_7773_6872;
const VERSION: u64 = 1;

#[derive(Debug, Clone)]
pub struct Entry {
    /// Its number in the log, from 1.
    pub index: u64,
    /// Where it writes, in sectors of the log's sector size.
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// Where its data starts in the log file (bytes).
    pub data_at: u64,
    pub mark: Option<String>,
}

impl Entry {
    /// A point where the disk's contents are defined: after a flush or a FUA write.
    pub fn is_flush_point(&self) -> bool {
        self.flags & (FLUSH | FUA) != 0
    }
    pub fn writes(&self) -> bool {
        self.flags & (MARK | DISCARD) == 0 && self.nr_sectors > 0
    }
}

pub struct Log {
    pub sectorsize: u64,
    /// What the super block counts (updated by the target at each FUA and mark, and at the end).
    pub counted: u64,
    pub entries: Vec<Entry>,
    file: File,
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Log {
    /// Reads the entries of the log in `path`. Entries past the super block's count are read
    /// too while their headers make sense (a log whose target was never removed has its last
    /// writes after the last count); a header of zeros ends the log.
    pub fn open(path: &Path, device_sectors: u64) -> Result<Log> {
        let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut sb = [0u8; 28];
        file.read_exact(&mut sb)
            .with_context(|| format!("{}: no super block", path.display()))?;
        ensure!(
            le64(&sb, 0) == MAGIC,
            "{}: not a dm-log-writes log (magic {:#x})",
            path.display(),
            le64(&sb, 0)
        );
        ensure!(le64(&sb, 8) == VERSION, "log version {}", le64(&sb, 8));
        let counted = le64(&sb, 16);
        let sectorsize = u32::from_le_bytes(sb[24..28].try_into().expect("4 bytes")) as u64;
        ensure!(
            sectorsize >= 512 && sectorsize.is_power_of_two(),
            "sector size {sectorsize}"
        );
        let mut entries = Vec::new();
        let mut at = sectorsize;
        let mut header = vec![0u8; sectorsize as usize];
        loop {
            if at + sectorsize > len {
                break;
            }
            file.seek(SeekFrom::Start(at))?;
            file.read_exact(&mut header)?;
            let (sector, nr, flags, data_len) = (
                le64(&header, 0),
                le64(&header, 8),
                le64(&header, 16),
                le64(&header, 24),
            );
            let index = entries.len() as u64 + 1;
            let beyond = index > counted;
            if header.iter().all(|&b| b == 0) {
                break;
            }
            let sane = flags & !(FLUSH | FUA | DISCARD | MARK | METADATA) == 0
                && sector.saturating_add(nr) <= device_sectors
                && (flags & MARK == 0 || data_len < sectorsize - 32);
            if !sane {
                if beyond {
                    break;
                }
                bail!(
                    "entry {index} at byte {at} makes no sense: sector {sector}, {nr} sectors, flags {flags:#x}"
                );
            }
            let mark = (flags & MARK != 0)
                .then(|| String::from_utf8_lossy(&header[32..32 + data_len as usize]).into_owned());
            let data_sectors = if flags & (DISCARD | MARK) != 0 { 0 } else { nr };
            let next = at + sectorsize + data_sectors * sectorsize;
            if next > len {
                if beyond {
                    break;
                }
                bail!("entry {index}: its data runs past the end of the log");
            }
            entries.push(Entry {
                index,
                sector,
                nr_sectors: nr,
                flags,
                data_at: at + sectorsize,
                mark,
            });
            at = next;
        }
        ensure!(
            entries.len() as u64 >= counted,
            "{}: the super block counts {counted} entries, {} found",
            path.display(),
            entries.len()
        );
        Ok(Log {
            sectorsize,
            counted,
            entries,
            file,
        })
    }

    /// Applies one entry to the device image: its data written where it went (a discard
    /// writes zeros, as a discarded range reads on the box's disks).
    pub fn apply(&self, e: &Entry, dev: &File) -> Result<()> {
        if e.flags & MARK != 0 || e.nr_sectors == 0 {
            return Ok(());
        }
        let len = (e.nr_sectors * self.sectorsize) as usize;
        let buf = if e.flags & DISCARD != 0 {
            vec![0u8; len]
        } else {
            let mut b = vec![0u8; len];
            self.file.read_exact_at(&mut b, e.data_at)?;
            b
        };
        dev.write_all_at(&buf, e.sector * self.sectorsize)
            .with_context(|| format!("replaying entry {}", e.index))?;
        Ok(())
    }
}
