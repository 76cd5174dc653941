//! Parallel bzip2 decompression of multi-stream files such as `build-update` writes: the file is
//! split at stream boundaries, streams are decoded on every core and read back in order. Anything
//! unusual (a stream too large to hold, one that inflates too far, a single-stream file from
//! another builder) is decoded sequentially from that point on, so memory stays bounded whatever
//! the input.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use bzip2::read::MultiBzDecoder;

use crate::archive::bunzip::{self, Decoder};

/// A stream longer than this (compressed) is not one of ours: decode it sequentially instead.
const MAX_PIECE: usize = 2 << 20;
/// A stream that inflates past this is decoded sequentially, to keep memory bounded.
const MAX_PIECE_OUT: u64 = 8 << 20;
const MAGIC_LEN: usize = 10;

/// Where one bzip2 stream begins: "BZh" + level digit + the first block's magic, byte-aligned.
fn is_stream_start(w: &[u8]) -> bool {
    w.len() >= MAGIC_LEN
        && &w[..3] == b"BZh"
        && (b'1'..=b'9').contains(&w[3])
        && w[4..10] == [0x31, 0x41, 0x59, 0x26, 0x53, 0x59]
}

enum Piece {
    /// Decoded bytes of one stream, and the file offset where the stream ends.
    Data(io::Result<Vec<u8>>, u64),
    /// Decode sequentially from this file offset to the end.
    SequentialFrom(u64),
    /// Scanning the input failed.
    Failed(io::Error),
}

type Job = (u64, u64, Vec<u8>);
/// Buffers of decoded pieces the reader is done with, for the decoders to fill again: each piece
/// would otherwise be a fresh megabyte of pages for the kernel to fault in and zero.
type Pool = Arc<Mutex<Vec<Vec<u8>>>>;

/// A `Read` of the decompressed content of a bzip2 file, decoded on `threads` cores.
pub struct ParallelBzReader {
    path: std::path::PathBuf,
    results: Receiver<(u64, Piece)>,
    pending: BTreeMap<u64, Piece>,
    next: u64,
    current: io::Cursor<Vec<u8>>,
    pool: Pool,
    pool_max: usize,
    sequential: Option<MultiBzDecoder<BufReader<Counted>>>,
    /// Compressed bytes of the file behind what has been read so far.
    consumed: Arc<AtomicU64>,
    done: bool,
    threads: Vec<JoinHandle<()>>,
}

impl ParallelBzReader {
    pub fn open(path: &Path, threads: usize) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let mut head = [0u8; MAGIC_LEN];
        let n = read_full(&mut file, &mut head)?;
        if n < MAGIC_LEN || !is_stream_start(&head) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a bzip2 file",
            ));
        }
        file.seek(SeekFrom::Start(0))?;
        let threads_n = threads.max(1);
        // Pieces in memory at once: one queued and one decoding per thread, compressed; one
        // decoding, one queued per thread and the one being read, decoded. The reader (tar,
        // hashing, writing) is faster than the decoders, so deeper queues only cost memory.
        let (job_tx, job_rx) = sync_channel::<Job>(threads_n);
        let (res_tx, res_rx) = sync_channel::<(u64, Piece)>(threads_n);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let pool: Pool = Arc::new(Mutex::new(Vec::new()));
        let mut handles = Vec::new();
        for i in 0..threads_n {
            let job_rx = Arc::clone(&job_rx);
            let res_tx = res_tx.clone();
            let pool = Arc::clone(&pool);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("bunzip2-{i}"))
                    .spawn(move || decode_worker(job_rx, res_tx, pool))?,
            );
        }
        handles.push(
            std::thread::Builder::new()
                .name("bunzip2-scan".into())
                .spawn(move || scan(file, job_tx, res_tx))?,
        );
        Ok(ParallelBzReader {
            path: path.to_path_buf(),
            results: res_rx,
            pending: BTreeMap::new(),
            next: 0,
            current: io::Cursor::new(Vec::new()),
            pool,
            pool_max: threads_n * 2 + 1,
            sequential: None,
            consumed: Arc::new(AtomicU64::new(0)),
            done: false,
            threads: handles,
        })
    }

    /// How far into the compressed file reading has come, for progress against the file's size;
    /// shared, as the reader itself is handed to the tar reader.
    pub fn consumed(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.consumed)
    }

    /// Moves to the next piece in order; false at the end.
    fn advance(&mut self) -> io::Result<bool> {
        loop {
            if let Some(piece) = self.pending.remove(&self.next) {
                self.next += 1;
                match piece {
                    Piece::Data(data, end) => {
                        let spent = std::mem::replace(&mut self.current, io::Cursor::new(data?));
                        let spent = spent.into_inner();
                        if let Ok(mut pool) = self.pool.lock()
                            && pool.len() < self.pool_max
                            && spent.capacity() > 0
                        {
                            pool.push(spent);
                        }
                        self.consumed.store(end, Ordering::Relaxed);
                        return Ok(true);
                    }
                    Piece::SequentialFrom(offset) => {
                        let mut f = File::open(&self.path)?;
                        f.seek(SeekFrom::Start(offset))?;
                        self.consumed.store(offset, Ordering::Relaxed);
                        let counted = Counted {
                            file: f,
                            consumed: Arc::clone(&self.consumed),
                        };
                        self.sequential = Some(MultiBzDecoder::new(BufReader::with_capacity(
                            256 * 1024,
                            counted,
                        )));
                        return Ok(true);
                    }
                    Piece::Failed(e) => return Err(e),
                }
            }
            match self.results.recv() {
                Ok((seq, piece)) => {
                    self.pending.insert(seq, piece);
                }
                // Every sender is gone and the next piece never came: that was the end.
                Err(_) => return Ok(false),
            }
        }
    }
}

impl Read for ParallelBzReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(dec) = &mut self.sequential {
                return dec.read(buf);
            }
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.done {
                return Ok(n);
            }
            if !self.advance()? {
                self.done = true;
            }
        }
    }
}

/// The file behind sequential decoding, counting what is read of it.
struct Counted {
    file: File,
    consumed: Arc<AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        self.consumed.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Drop for ParallelBzReader {
    fn drop(&mut self) {
        // Unblock the threads: they stop when their channels close.
        let (_, dead) = sync_channel(0);
        let _ = std::mem::replace(&mut self.results, dead);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Reads the file, cuts it at stream starts and hands the pieces to the decoders, in order.
fn scan(file: File, jobs: SyncSender<Job>, results: SyncSender<(u64, Piece)>) {
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut cur: Vec<u8> = Vec::with_capacity(1 << 20);
    let mut cur_offset = 0u64;
    let mut seq = 0u64;
    let mut searched = 1usize;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = results.send((seq, Piece::Failed(e)));
                return;
            }
        };
        if chunk.is_empty() {
            if !cur.is_empty() {
                let _ = jobs.send((seq, cur_offset, cur));
            }
            return;
        }
        let n = chunk.len();
        cur.extend_from_slice(chunk);
        reader.consume(n);
        // Cut at every stream start found after this stream's own header.
        let mut start = searched.max(1);
        while start + MAGIC_LEN <= cur.len() {
            let Some(p) = cur[start..].windows(MAGIC_LEN).position(is_stream_start) else {
                break;
            };
            let cut = start + p;
            let rest = cur.split_off(cut);
            let piece = std::mem::replace(&mut cur, rest);
            let len = piece.len() as u64;
            if jobs.send((seq, cur_offset, piece)).is_err() {
                return;
            }
            seq += 1;
            cur_offset += len;
            start = 1;
        }
        searched = cur.len().saturating_sub(MAGIC_LEN - 1).max(1);
        if cur.len() > MAX_PIECE {
            let _ = results.send((seq, Piece::SequentialFrom(cur_offset)));
            return;
        }
    }
}

fn decode_worker(jobs: Arc<Mutex<Receiver<Job>>>, results: SyncSender<(u64, Piece)>, pool: Pool) {
    let mut decoder = Decoder::new();
    loop {
        let job = jobs.lock().map(|rx| rx.recv());
        let Ok(Ok((seq, offset, piece))) = job else {
            return;
        };
        let end = offset + piece.len() as u64;
        let buf = pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_default();
        let out = match decode_one(&mut decoder, &piece, buf) {
            Some(r) => Piece::Data(r, end),
            None => Piece::SequentialFrom(offset),
        };
        if results.send((seq, out)).is_err() {
            return;
        }
    }
}

/// Decodes one piece: a whole stream, or several when the scan could not see where the next
/// began (an empty stream has no block magic to find); `None` when it inflates too far to hold in
/// memory.
fn decode_one(
    decoder: &mut Decoder,
    piece: &[u8],
    mut out: Vec<u8>,
) -> Option<io::Result<Vec<u8>>> {
    out.clear();
    out.reserve((piece.len() * 8).clamp(64 << 10, 1 << 20));
    let mut at = 0;
    while at < piece.len() {
        match decoder.decode_stream(&piece[at..], &mut out, MAX_PIECE_OUT as usize) {
            Ok(used) => at += used,
            Err(bunzip::Error::TooLarge) => return None,
            Err(bunzip::Error::Unsupported) => return decode_one_libbz2(piece),
            Err(bunzip::Error::Corrupt(_)) if at > 0 && !piece[at..].starts_with(b"BZh") => {
                return Some(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bzip2 data is corrupt: garbage after the end of a stream",
                )));
            }
            Err(e) => return Some(Err(io::Error::new(io::ErrorKind::InvalidData, e))),
        }
    }
    Some(Ok(out))
}

/// The same with libbz2, for the obsolete forms the fast decoder leaves out.
fn decode_one_libbz2(piece: &[u8]) -> Option<io::Result<Vec<u8>>> {
    let mut dec = bzip2::bufread::MultiBzDecoder::new(piece);
    let mut out = Vec::new();
    if let Err(e) = (&mut dec).take(MAX_PIECE_OUT + 1).read_to_end(&mut out) {
        return Some(Err(e));
    }
    if out.len() as u64 > MAX_PIECE_OUT {
        return None;
    }
    Some(Ok(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::pbzip::{CHUNK, ParallelBzWriter};
    use std::io::Write;

    fn data(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| ((i * 7919) % 251) as u8 ^ ((i >> 10) as u8))
            .collect()
    }

    fn decode_file(bytes: &[u8], threads: usize) -> io::Result<Vec<u8>> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.bz2");
        std::fs::write(&p, bytes).unwrap();
        let mut out = Vec::new();
        ParallelBzReader::open(&p, threads)?.read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn reads_multistream_in_order() {
        let input = data(CHUNK * 5 + 77);
        let mut w = ParallelBzWriter::new(Vec::new(), 2);
        w.write_all(&input).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(decode_file(&bytes, 3).unwrap(), input);
        assert_eq!(decode_file(&bytes, 1).unwrap(), input);
    }

    #[test]
    fn reads_single_stream_files_of_other_builders() {
        let input = data(5 << 20);
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::fast());
        enc.write_all(&input).unwrap();
        let bytes = enc.finish().unwrap();
        assert_eq!(decode_file(&bytes, 2).unwrap(), input);
    }

    #[test]
    fn highly_compressible_streams_fall_back_to_sequential() {
        let input = vec![0u8; 40 << 20];
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
        enc.write_all(&input).unwrap();
        let one = enc.finish().unwrap();
        let mut bytes = one.clone();
        bytes.extend_from_slice(&one);
        assert_eq!(decode_file(&bytes, 2).unwrap().len(), 80 << 20);
    }

    fn libbz2(data: &[u8], level: u32) -> Vec<u8> {
        let mut enc = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::new(level));
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// Streams of several blocks each (level 1 cuts blocks at 100 kB), of differing levels, an
    /// empty stream among them: decoded in parallel, in order, byte for byte.
    #[test]
    fn multiblock_streams_of_mixed_levels_decode_in_order() {
        let parts: Vec<Vec<u8>> = (0..7).map(|i| data(150_000 + i * 61_001)).collect();
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let level = [1, 9, 2, 1, 5, 3, 9][i];
            let p = if i == 3 { &[][..] } else { &p[..] };
            bytes.extend_from_slice(&libbz2(p, level));
            want.extend_from_slice(p);
        }
        for threads in [1, 2, 3] {
            assert!(
                decode_file(&bytes, threads).unwrap() == want,
                "{threads} threads"
            );
        }
    }

    /// A bit flipped in the block of a middle stream is an error naming the damage, whichever
    /// thread decodes it; what came before it is read, nothing after it.
    #[test]
    fn damage_in_a_middle_stream_is_an_error() {
        let input = data(CHUNK * 4);
        let mut w = ParallelBzWriter::new(Vec::new(), 2);
        w.write_all(&input).unwrap();
        let bytes = w.finish().unwrap();
        let starts: Vec<usize> = (0..bytes.len() - MAGIC_LEN)
            .filter(|&i| is_stream_start(&bytes[i..]))
            .collect();
        assert_eq!(starts.len(), 4);
        for at in [starts[2] + 40, (starts[2] + starts[3]) / 2, starts[3] - 12] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            let d = tempfile::tempdir().unwrap();
            let p = d.path().join("f.bz2");
            std::fs::write(&p, &bad).unwrap();
            let mut r = ParallelBzReader::open(&p, 2).unwrap();
            let mut out = Vec::new();
            let err = r.read_to_end(&mut out).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
            assert!(err.to_string().contains("bzip2"), "{err}");
            assert!(out.len() <= CHUNK * 2 && input.starts_with(&out), "at {at}");
        }
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        assert!(decode_file(b"<html>not an image</html>", 2).is_err());
        let mut w = ParallelBzWriter::new(Vec::new(), 2);
        w.write_all(&data(CHUNK * 2)).unwrap();
        let bytes = w.finish().unwrap();
        assert!(decode_file(&bytes[..bytes.len() - 100], 2).is_err());
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 3] ^= 0x40;
        assert!(decode_file(&flipped, 2).is_err());
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"\n<html>appended by a proxy</html>\n");
        let err = decode_file(&trailing, 2).unwrap_err();
        assert!(err.to_string().contains("garbage after"), "{err}");
    }
}
