//! The connection threads: each open connection has one, so a slow download never holds up
//! another client; threads are reused, and bounded in number.

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Threads kept waiting for connections even when there is no traffic.
const KEEP_IDLE: usize = 4;
/// How long a spare thread waits for a connection before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// Connection threads need little stack: no recursion, buffers on the heap.
const STACK: usize = 256 * 1024;

pub type Conn = (TcpStream, SocketAddr);
type Work = dyn Fn(TcpStream, SocketAddr) + Send + Sync;

struct State {
    queue: VecDeque<Conn>,
    idle: usize,
    threads: usize,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    max: usize,
    work: Box<Work>,
}

#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl Pool {
    pub fn new(max: usize, work: impl Fn(TcpStream, SocketAddr) + Send + Sync + 'static) -> Pool {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                }),
                wake: Condvar::new(),
                max,
                work: Box::new(work),
            }),
        }
    }

    /// Hands a connection to a thread; gives it back when all `max` are busy.
    pub fn submit(&self, conn: Conn) -> Result<(), Conn> {
        let mut st = self.shared.lock();
        if st.idle > st.queue.len() {
            st.queue.push_back(conn);
            self.shared.wake.notify_one();
            return Ok(());
        }
        if st.threads >= self.shared.max {
            return Err(conn);
        }
        // Queued first, so that the new thread (or any thread that frees up sooner) takes it.
        st.queue.push_back(conn);
        st.threads += 1;
        drop(st);
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("conn".into())
            .stack_size(STACK)
            .spawn(move || shared.worker())
        {
            Ok(_) => Ok(()),
            Err(e) => {
                log::warn!("cannot start a connection thread: {e}");
                let mut st = self.shared.lock();
                st.threads -= 1;
                st.queue.pop_back().map_or(Ok(()), Err)
            }
        }
    }

    /// Connection threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self) {
        let mut st = self.lock();
        loop {
            if let Some((stream, peer)) = st.queue.pop_front() {
                drop(st);
                // A bug in a handler must cost one connection, never a thread of the pool.
                if catch_unwind(AssertUnwindSafe(|| (self.work)(stream, peer))).is_err() {
                    log::error!("serving {peer} panicked; connection dropped");
                }
                st = self.lock();
                continue;
            }
            st.idle += 1;
            let (guard, waited) = self
                .wake
                .wait_timeout(st, IDLE_EXIT)
                .unwrap_or_else(|e| e.into_inner());
            st = guard;
            st.idle -= 1;
            if waited.timed_out() && st.queue.is_empty() && st.threads > KEEP_IDLE {
                st.threads -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc::channel;

    fn pair(l: &TcpListener) -> (TcpStream, Conn) {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (c, l.accept().unwrap())
    }

    #[test]
    fn connections_run_in_parallel_up_to_the_bound() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let pool = Pool::new(2, move |mut s, _| {
            // Holds its thread until the client says something.
            let mut b = [0u8; 1];
            let _ = s.read(&mut b);
            tx.lock().unwrap().send(b[0]).unwrap();
        });
        let (mut c1, s1) = pair(&l);
        let (mut c2, s2) = pair(&l);
        let (_c3, s3) = pair(&l);
        assert!(pool.submit(s1).is_ok());
        assert!(pool.submit(s2).is_ok());
        assert!(
            pool.submit(s3).is_err(),
            "a third connection is over the bound"
        );
        c2.write_all(b"2").unwrap();
        assert_eq!(
            rx.recv().unwrap(),
            b'2',
            "the second is served while the first waits"
        );
        c1.write_all(b"1").unwrap();
        assert_eq!(rx.recv().unwrap(), b'1');
        assert_eq!(pool.threads(), 2);
    }

    #[test]
    fn a_panicking_handler_keeps_its_thread() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let pool = Pool::new(1, move |_, _| {
            tx.lock().unwrap().send(()).unwrap();
            panic!("handler bug");
        });
        for _ in 0..3 {
            let (_c, mut conn) = pair(&l);
            // The one thread must be back and idle before it can take the next connection.
            while let Err(back) = pool.submit(conn) {
                conn = back;
                std::thread::yield_now();
            }
            rx.recv().unwrap();
        }
        assert_eq!(pool.threads(), 1);
    }
}
