//! Parallel bzip2 compression: the input is cut into fixed blocks, each compressed on its own core
//! as an independent bzip2 stream, and the streams are written one after another, as pbzip2 does.
//! GNU tar, `bunzip2` and `MultiBzDecoder` read the result as one file; the fixed block size keeps
//! the output identical whatever the number of cores.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Raw bytes per stream. bzip2's level-9 block holds 900 000 bytes less a small margin after its
/// run-length pass; staying a little under keeps each stream to one block (input whose run-length
/// pass grows it takes two).
pub const CHUNK: usize = 899_000;

/// How many threads to compress or decompress on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 16)
}

type Job = (u64, Vec<u8>);
type Done = (u64, io::Result<Vec<u8>>);

/// A `Write` that compresses on `threads` worker threads into `out`, in order. Memory is bounded
/// by about `3 × threads` chunks in flight, whatever the input size.
pub struct ParallelBzWriter<W: Write + Send + 'static> {
    buf: Vec<u8>,
    seq: u64,
    jobs: Option<SyncSender<Job>>,
    workers: Vec<JoinHandle<()>>,
    writer: Option<JoinHandle<io::Result<W>>>,
}

impl<W: Write + Send + 'static> ParallelBzWriter<W> {
    pub fn new(out: W, threads: usize) -> Self {
        let threads = threads.max(1);
        let (job_tx, job_rx) = sync_channel::<Job>(threads);
        let (done_tx, done_rx) = sync_channel::<Done>(threads * 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let workers = (0..threads)
            .map(|i| {
                let job_rx = Arc::clone(&job_rx);
                let done_tx = done_tx.clone();
                std::thread::Builder::new()
                    .name(format!("bzip2-{i}"))
                    .spawn(move || compress_worker(job_rx, done_tx))
                    .expect("spawning a compression thread")
            })
            .collect();
        drop(done_tx);
        let writer = std::thread::Builder::new()
            .name("bzip2-out".into())
            .spawn(move || write_in_order(out, done_rx))
            .expect("spawning the output thread");
        ParallelBzWriter {
            buf: Vec::with_capacity(CHUNK),
            seq: 0,
            jobs: Some(job_tx),
            workers,
            writer: Some(writer),
        }
    }

    fn send_chunk(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        let seq = self.seq;
        self.seq += 1;
        let jobs = self.jobs.as_ref().expect("writer used after finish");
        if jobs.send((seq, chunk)).is_err() {
            // The output side stopped: finish() reports its error.
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "compressed output failed",
            ));
        }
        Ok(())
    }

    /// Compresses what is left, waits for every stream to be written and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        let sent = self.send_chunk();
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        let out = self.writer.take().expect("finish called once").join();
        let out = out.map_err(|_| io::Error::other("compression output thread panicked"))??;
        sent.map(|_| out)
    }
}

impl<W: Write + Send + 'static> Write for ParallelBzWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send_chunk()?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for ParallelBzWriter<W> {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn compress_worker(jobs: Arc<Mutex<Receiver<Job>>>, done: SyncSender<Done>) {
    loop {
        let job = jobs.lock().map(|rx| rx.recv());
        let Ok(Ok((seq, chunk))) = job else { return };
        if done.send((seq, compress_chunk(&chunk))).is_err() {
            return;
        }
    }
}

/// One chunk as one complete bzip2 stream at level 9, by our encoder (crates/bzenc), whose block
/// sort takes half libbz2's time.
pub fn compress_chunk(chunk: &[u8]) -> io::Result<Vec<u8>> {
    Ok(crate::archive::bzenc::compress_block(chunk))
}

fn write_in_order<W: Write>(mut out: W, done: Receiver<Done>) -> io::Result<W> {
    let mut next = 0u64;
    let mut pending = BTreeMap::new();
    for (seq, result) in done {
        pending.insert(seq, result?);
        while let Some(data) = pending.remove(&next) {
            out.write_all(&data)?;
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(io::Error::other("a compression thread stopped early"));
    }
    out.flush()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 3 == 0 {
                    (x % 7) as u8 + b'a'
                } else {
                    x as u8
                }
            })
            .collect()
    }

    #[test]
    fn output_is_multistream_and_independent_of_thread_count() {
        let data = sample(CHUNK * 3 + 1234);
        let compress = |threads| {
            let mut w = ParallelBzWriter::new(Vec::new(), threads);
            for piece in data.chunks(100_003) {
                w.write_all(piece).unwrap();
            }
            w.finish().unwrap()
        };
        let one = compress(1);
        assert_eq!(one, compress(4));
        assert!(one.windows(4).filter(|w| w == b"BZh9").count() >= 4);
        let mut back = Vec::new();
        bzip2::read::MultiBzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn empty_input_gives_empty_output() {
        let w = ParallelBzWriter::new(Vec::new(), 2);
        assert!(w.finish().unwrap().is_empty());
    }

    #[test]
    fn output_errors_surface_from_finish() {
        #[derive(Debug)]
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = ParallelBzWriter::new(Broken, 2);
        let data = sample(CHUNK * 2);
        let _ = w.write_all(&data);
        let err = w.finish().unwrap_err();
        assert!(err.to_string().contains("disk full"), "{err}");
    }
}
