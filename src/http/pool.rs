//! Worker threads for handlers that may block (read a request body as it arrives, call out to
//! another server, fsync a file): a request being answered has one; a connection between
//! requests has none. Threads are started on demand, reused, and bounded in number; a few
//! requests may wait for one, and more are refused.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Threads kept waiting for work even when there is none.
const KEEP_IDLE: usize = 2;
/// How long a spare thread waits for work before it ends.
const IDLE_EXIT: Duration = Duration::from_secs(30);
/// Workers need little stack: no recursion, buffers on the heap.
const STACK: usize = 256 * 1024;

struct State<T> {
    queue: VecDeque<T>,
    idle: usize,
    threads: usize,
    /// Threads started that have not yet taken their first job (each has one queued for it).
    starting: usize,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    wake: Condvar,
    max: usize,
    queue_max: usize,
    work: Box<dyn Fn(T) + Send + Sync>,
}

pub struct Pool<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Pool {
            shared: self.shared.clone(),
        }
    }
}

impl<T: Send + 'static> Pool<T> {
    /// Up to `max` threads run `work`; up to `queue_max` jobs wait when all are busy.
    pub fn new(max: usize, queue_max: usize, work: impl Fn(T) + Send + Sync + 'static) -> Self {
        Pool {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    queue: VecDeque::new(),
                    idle: 0,
                    threads: 0,
                    starting: 0,
                }),
                wake: Condvar::new(),
                max: max.max(1),
                queue_max,
                work: Box::new(work),
            }),
        }
    }

    /// Hands a job to a thread; gives it back when all `max` are busy and the queue is full.
    pub fn submit(&self, job: T) -> Result<(), T> {
        let mut st = self.shared.lock();
        if st.idle + st.starting > st.queue.len() {
            st.queue.push_back(job);
            self.shared.wake.notify_one();
            return Ok(());
        }
        if st.threads >= self.shared.max {
            if st.queue.len() >= self.shared.queue_max + st.starting {
                return Err(job);
            }
            st.queue.push_back(job);
            return Ok(());
        }
        // Queued first, so that the new thread (or any thread that frees up sooner) takes it.
        st.queue.push_back(job);
        st.threads += 1;
        st.starting += 1;
        drop(st);
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("http-worker".into())
            .stack_size(STACK)
            .spawn(move || shared.worker())
        {
            Ok(_) => Ok(()),
            Err(e) => {
                log::warn!("cannot start a worker thread: {e}");
                let mut st = self.shared.lock();
                st.threads -= 1;
                st.starting -= 1;
                if st.threads == 0 {
                    return st.queue.pop_back().map_or(Ok(()), Err);
                }
                Ok(())
            }
        }
    }

    /// Worker threads alive now.
    pub fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self) {
        let mut st = self.lock();
        st.starting -= 1;
        loop {
            if let Some(job) = st.queue.pop_front() {
                drop(st);
                // A bug in a job must cost that job, never a thread of the pool.
                if catch_unwind(AssertUnwindSafe(|| (self.work)(job))).is_err() {
                    log::error!("a worker job panicked");
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
    use std::sync::mpsc::{Receiver, channel};

    /// A pool whose jobs wait for a go-ahead each, and report when they run.
    fn gated(max: usize, queue: usize) -> (Pool<Receiver<()>>, Receiver<()>) {
        let (ran_tx, ran) = channel();
        let ran_tx = Mutex::new(ran_tx);
        let pool = Pool::new(max, queue, move |gate: Receiver<()>| {
            ran_tx.lock().unwrap().send(()).unwrap();
            let _ = gate.recv();
        });
        (pool, ran)
    }

    #[test]
    fn jobs_run_in_parallel_up_to_the_bound_then_wait_then_are_refused() {
        let (pool, ran) = gated(2, 1);
        let mut gates = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = channel();
            gates.push(tx);
            assert!(pool.submit(rx).is_ok());
        }
        ran.recv().unwrap();
        ran.recv().unwrap();
        let (_tx, rx) = channel();
        assert!(pool.submit(rx).is_err(), "two running, one waiting: full");
        gates[0].send(()).unwrap();
        ran.recv().unwrap();
        assert_eq!(pool.threads(), 2);
        for g in &gates {
            let _ = g.send(());
        }
    }

    #[test]
    fn a_panicking_job_keeps_its_thread() {
        let (tx, rx) = channel();
        let tx = Mutex::new(tx);
        let pool = Pool::new(1, 0, move |_: ()| {
            tx.lock().unwrap().send(()).unwrap();
            panic!("handler bug");
        });
        for _ in 0..3 {
            // The one thread must be back and idle before it can take the next job.
            while pool.submit(()).is_err() {
                std::thread::yield_now();
            }
            rx.recv().unwrap();
        }
        assert_eq!(pool.threads(), 1);
    }
}
