//! The small HTTP/1.1 server both long-running programs speak (`update-server`, and
//! `box-updater serve`): bounded request heads, `Content-Length` bodies read only as far as a
//! handler wants them, keep-alive and pipelining, timeouts for idle and stalled clients, files
//! by `sendfile`. An open connection costs a socket and a few hundred bytes in an event loop
//! (`mio`), never a thread; request heads are tokenized by `httparse`.
//!
//! Threads: one event loop per core when handlers run on the loops (`Handlers::Inline`), or one
//! loop and a bounded pool of workers that only requests being answered occupy
//! (`Handlers::Workers`). The caller's thread waits in `run` until the stop flag is set.

pub mod conn;
mod event;
pub mod file;
pub mod pool;
pub mod request;
pub mod response;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use mio::Poll;

pub use conn::{BodyError, Handler, INLINE_BODY, RequestBody};
pub use event::PENDING_BUDGET;
pub use file::{FileMeta, file_response};
pub use request::{Method, Request, route_path};
pub use response::{Body, Response};

/// How often `run` looks at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);
/// File descriptors kept free of connections, for the files the handlers open.
const FD_RESERVE: u64 = 64;
/// Requests that may wait for a busy worker before more are turned away with 503.
const WORKER_QUEUE: usize = 256;
/// Connections waiting to be accepted.
const BACKLOG: libc::c_int = 4096;
/// Event loops at most, whatever the number of cores.
const MAX_LOOPS: usize = 8;

/// Where handlers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handlers {
    /// On the event loops, one per core: for handlers that never wait on anything but memory
    /// and local files. A request body (at most `Config::inline_body` bytes) is read whole
    /// before the handler runs; a larger one is refused (413) unread.
    Inline,
    /// On up to this many worker threads, beside one event loop: a handler may block, and reads
    /// a request body from the socket as it asks for it.
    Workers(usize),
}

/// How a server treats its clients.
#[derive(Debug, Clone)]
pub struct Config {
    /// Silence allowed from a client (between requests, within a head or a body, or leaving an
    /// answer unread), and time allowed for a whole request head.
    pub timeout: Duration,
    /// Connections open at once; beyond this (or the file-descriptor limit), new clients get
    /// 503. Idle connections cost a socket and a few hundred bytes each.
    pub max_connections: usize,
    /// The `Server` header.
    pub name: &'static str,
    /// Whether handlers may read request bodies (`Content-Length` only; transfer-coded ones get
    /// 411 or 501). Without, a handler sees an empty body and a body sent anyway ends the
    /// connection after the answer.
    pub bodies: bool,
    /// With `Handlers::Inline`, the largest body the loops read whole for a handler (at most
    /// `INLINE_BODY`): the most any of the server's endpoints takes, so that a client announcing
    /// more is refused at once and holds no more of the loops' memory than that.
    pub inline_body: usize,
    /// Where handlers run.
    pub handlers: Handlers,
}

/// A listening server; `run` serves until the stop flag is set.
pub struct Server {
    addr: SocketAddr,
    shared: Arc<event::Shared>,
    loops: Mutex<Vec<event::EventLoop>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// Serves `listener` with `handler`. Once `stop` is set, no new connection is taken and no
    /// connection is kept alive past its current answer.
    pub fn new(
        listener: TcpListener,
        config: Config,
        stop: Arc<AtomicBool>,
        handler: impl Fn(&Request<'_>, &mut RequestBody<'_>) -> Response + Send + Sync + 'static,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        // A burst of thousands of connections must wait in the backlog, not be dropped and
        // retried a second later (the kernel caps this at net.core.somaxconn).
        {
            use std::os::fd::AsRawFd;
            // SAFETY: listen(2) on a socket this function owns; it only changes the backlog.
            unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) };
        }
        let fds = raise_fd_limit();
        let max_connections = config
            .max_connections
            .min(usize::try_from(fds.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX))
            .max(1);
        if max_connections < config.max_connections {
            log::info!(
                "at most {max_connections} connections at once (file-descriptor limit {fds})"
            );
        }
        let n = match config.handlers {
            Handlers::Inline => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_LOOPS),
            Handlers::Workers(_) => 1,
        };
        let polls = (0..n)
            .map(|_| Poll::new())
            .collect::<io::Result<Vec<_>>>()?;
        let inboxes = polls
            .iter()
            .map(event::Inbox::new)
            .collect::<io::Result<Vec<_>>>()?;
        let workers = match config.handlers {
            Handlers::Workers(w) => Some(w),
            Handlers::Inline => None,
        };
        let pool_cell: Arc<OnceLock<Weak<event::Shared>>> = Arc::new(OnceLock::new());
        let pool = workers.map(|w| {
            let cell = pool_cell.clone();
            pool::Pool::new(w, WORKER_QUEUE, move |job| {
                if let Some(shared) = cell.get().and_then(Weak::upgrade) {
                    event::work(job, &shared);
                }
            })
        });
        let shared = Arc::new(event::Shared::new(
            config,
            Box::new(handler),
            stop.clone(),
            max_connections,
            inboxes,
            pool,
        ));
        let _ = pool_cell.set(Arc::downgrade(&shared));
        let mut listener = Some(mio::net::TcpListener::from_std(listener));
        let loops = polls
            .into_iter()
            .enumerate()
            .map(|(i, poll)| event::EventLoop::new(i, poll, listener.take(), shared.clone()))
            .collect();
        Ok(Server {
            addr,
            shared,
            loops: Mutex::new(loops),
            stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts the event loops and waits until the stop flag is set.
    pub fn run(&self) {
        let loops = std::mem::take(&mut *self.loops.lock().unwrap_or_else(|e| e.into_inner()));
        for (i, l) in loops.into_iter().enumerate() {
            if let Err(e) = std::thread::Builder::new()
                .name(format!("http-loop-{i}"))
                .spawn(move || l.run())
            {
                log::error!("cannot start event loop {i}: {e}");
                self.stop.store(true, Ordering::SeqCst);
            }
        }
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(STOP_POLL);
        }
    }

    /// Gives answers in flight up to `grace` to finish once stopped (the loops have closed the
    /// listening socket); returns how many did not.
    pub fn finish(self, grace: Duration) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + grace;
        while self.shared.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.shared.busy.load(Ordering::SeqCst)
    }
}

/// Raises this process's soft limit on open files to its hard limit (as Go and nginx do):
/// connections are file descriptors, and the usual soft limit of 1024 is far below what an
/// event loop holds. Returns the soft limit in force.
// rlim_t is 32 bits on 32-bit ARM (the Pi's armv7 build): the conversion is not useless there.
#[allow(clippy::useless_conversion)]
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => u64::from(hard),
            Err(e) => {
                log::debug!("cannot raise the open-file limit to {hard}: {e}");
                u64::from(soft)
            }
        },
        Ok((soft, _)) => u64::from(soft),
        Err(_) => 1024,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};

    struct Running {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        server: Option<Arc<Server>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(s) = self.server.take().and_then(Arc::into_inner) {
                s.finish(Duration::from_secs(1));
            }
        }
    }

    /// A server on loopback with `handle`, its handlers where `handlers` says.
    fn serve(
        handlers: Handlers,
        bodies: bool,
        handle: impl Fn(&Request<'_>, &mut RequestBody<'_>) -> Response + Send + Sync + 'static,
    ) -> Running {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config {
            timeout: Duration::from_millis(500),
            max_connections: 10_000,
            name: "test",
            bodies,
            inline_body: INLINE_BODY,
            handlers,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let server = Arc::new(Server::new(l, config, stop.clone(), handle).unwrap());
        let addr = server.local_addr();
        let s = server.clone();
        std::thread::spawn(move || s.run());
        Running {
            addr,
            stop,
            server: Some(server),
        }
    }

    fn connect(r: &Running) -> TcpStream {
        let c = TcpStream::connect(r.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    /// Everything the server sends until it closes.
    fn all(mut c: TcpStream) -> String {
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    fn echo(req: &Request<'_>, body: &mut RequestBody<'_>) -> Response {
        match body.read_to_vec(16) {
            Ok(b) => Response::text(
                200,
                format!("{} {}\n", req.target, String::from_utf8_lossy(&b)),
            ),
            Err(e) => Response::text(e.status(), e.to_string()),
        }
    }

    const MODES: [Handlers; 2] = [Handlers::Inline, Handlers::Workers(2)];

    #[test]
    fn bodies_are_read_by_length_and_the_next_request_follows() {
        for mode in MODES {
            let r = serve(mode, true, echo);
            let mut c = connect(&r);
            c.write_all(
                b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloPOST /b HTTP/1.1\r\n\
                  Host: x\r\nContent-Length: 3\r\n\r\nbye\
                  GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
            let got = all(c);
            let bodies: Vec<&str> = got
                .split("\r\n\r\n")
                .skip(1)
                .map(|b| b.split("HTTP/1.1").next().unwrap())
                .collect();
            assert_eq!(
                bodies,
                ["/a hello\n", "/b bye\n", "/c \n"],
                "{mode:?}: {got}"
            );
            assert_eq!(got.matches("HTTP/1.1 200 OK").count(), 3, "{mode:?}: {got}");
        }
    }

    #[test]
    fn a_body_that_trickles_in_is_read_whole() {
        for mode in MODES {
            let r = serve(mode, true, echo);
            let mut c = connect(&r);
            for part in [
                &b"POST /t HTTP/1.1\r\nHost: x\r\nCont"[..],
                b"ent-Length: 6\r\n\r\n",
                b"abc",
                b"def",
            ] {
                c.write_all(part).unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
            c.shutdown(Shutdown::Write).unwrap();
            let got = all(c);
            assert!(
                got.starts_with("HTTP/1.1 200 OK") && got.ends_with("/t abcdef\n"),
                "{mode:?}: {got}"
            );
        }
    }

    #[test]
    fn a_body_refused_unread_ends_the_connection_and_allocates_nothing() {
        for mode in MODES {
            let r = serve(mode, true, echo);
            let mut c = connect(&r);
            c.write_all(
                b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999999999\r\n\r\nsome",
            )
            .unwrap();
            let got = all(c);
            assert!(
                got.starts_with("HTTP/1.1 413 Content Too Large\r\n"),
                "{mode:?}: {got}"
            );
            assert!(got.contains("\r\nConnection: close\r\n"), "{mode:?}: {got}");
        }
        // On the loops, a body past what they read whole is refused even where the handler
        // would take it.
        let r = serve(Handlers::Inline, true, |_, body| {
            match body.read_to_vec(1 << 20) {
                Ok(_) => Response::text(200, "read\n"),
                Err(e) => Response::text(e.status(), e.to_string()),
            }
        });
        let mut c = connect(&r);
        let head = format!(
            "POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            INLINE_BODY + 1
        );
        c.write_all(head.as_bytes()).unwrap();
        let got = all(c);
        assert!(
            got.starts_with("HTTP/1.1 413 ") && got.contains("65536 bytes"),
            "{got}"
        );
    }

    #[test]
    fn the_loops_read_no_body_past_the_servers_limit() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config {
            timeout: Duration::from_secs(5),
            max_connections: 100,
            name: "test",
            bodies: true,
            inline_body: 16,
            handlers: Handlers::Inline,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let server = Arc::new(Server::new(l, config, stop.clone(), echo).unwrap());
        let r = Running {
            addr: server.local_addr(),
            stop,
            server: Some(server.clone()),
        };
        std::thread::spawn(move || server.run());
        // Announced past the limit and never sent: refused at once, not waited for.
        let mut c = connect(&r);
        c.write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 17\r\n\r\n")
            .unwrap();
        let t0 = Instant::now();
        let got = all(c);
        assert!(got.starts_with("HTTP/1.1 413 "), "{got}");
        assert!(got.contains("16 bytes"), "{got}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        // Within it, read whole as ever.
        let mut c = connect(&r);
        c.write_all(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 16\r\nConnection: close\r\n\r\n0123456789abcdef")
            .unwrap();
        assert!(all(c).ends_with("/b 0123456789abcdef\n"));
    }

    #[test]
    fn a_body_that_never_comes_times_out() {
        for mode in MODES {
            let r = serve(mode, true, echo);
            let mut c = connect(&r);
            c.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
                .unwrap();
            let t0 = Instant::now();
            let got = all(c);
            assert!(got.starts_with("HTTP/1.1 408 "), "{mode:?}: {got}");
            assert!(t0.elapsed() < Duration::from_secs(5));
        }
    }

    #[test]
    fn transfer_codings_are_refused_clearly() {
        for mode in MODES {
            for (te, want) in [("chunked", "HTTP/1.1 411 "), ("gzip", "HTTP/1.1 501 ")] {
                let r = serve(mode, true, echo);
                let mut c = connect(&r);
                c.write_all(
                    format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: {te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
                let got = all(c);
                assert!(got.starts_with(want), "{mode:?} {te}: {got}");
                assert!(got.contains("Content-Length"), "{mode:?} {te}: {got}");
            }
        }
    }

    #[test]
    fn without_bodies_the_handler_sees_none_and_the_connection_closes() {
        for mode in MODES {
            let r = serve(mode, false, echo);
            let mut c = connect(&r);
            c.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
                .unwrap();
            let got = all(c);
            assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{mode:?}: {got}");
            assert!(
                got.contains("Connection: close\r\n") && got.ends_with("/a \n"),
                "{mode:?}: {got}"
            );
        }
    }

    #[test]
    fn the_go_ahead_comes_only_when_the_body_is_wanted() {
        for mode in MODES {
            let r = serve(mode, true, echo);
            let mut c = connect(&r);
            c.write_all(
                b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            )
            .unwrap();
            let mut first = [0u8; 25];
            c.read_exact(&mut first).unwrap();
            assert_eq!(&first, b"HTTP/1.1 100 Continue\r\n\r\n", "{mode:?}");
            c.write_all(b"ok").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            let got = all(c);
            assert!(
                got.starts_with("HTTP/1.1 200 OK") && got.ends_with("/a ok\n"),
                "{mode:?}: {got}"
            );
        }
        // A worker asks the handler first; a refused body gets no go-ahead.
        let r = serve(Handlers::Workers(1), true, echo);
        let mut c = connect(&r);
        c.write_all(
            b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 99\r\n\r\n",
        )
        .unwrap();
        let got = all(c);
        assert!(
            got.starts_with("HTTP/1.1 413 "),
            "refused without a go-ahead: {got}"
        );
    }

    #[test]
    fn idle_connections_hold_no_thread_and_no_buffer() {
        for mode in MODES {
            let r = serve(mode, true, echo);
            let idle: Vec<TcpStream> = (0..1500).map(|_| connect(&r)).collect();
            // A third of them start a request and stall in its head.
            for c in idle.iter().step_by(3) {
                (&*c).write_all(b"GET /slow HTTP/1.1\r\nHo").unwrap();
            }
            let t0 = Instant::now();
            let mut c = connect(&r);
            c.write_all(b"GET /now HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            assert!(all(c).ends_with("/now \n"), "{mode:?}");
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "{mode:?}: {:?}",
                t0.elapsed()
            );
            let pending = r
                .server
                .as_ref()
                .unwrap()
                .shared
                .pending
                .load(Ordering::SeqCst);
            assert!(
                pending <= 500 * 64,
                "{mode:?}: {pending} bytes held for 500 partial heads"
            );
            drop(idle);
        }
    }

    #[test]
    fn a_panicking_handler_costs_one_request() {
        for mode in MODES {
            let r = serve(mode, false, |req, _| {
                if req.target == "/boom" {
                    panic!("handler bug");
                }
                Response::text(200, "fine\n")
            });
            let mut c = connect(&r);
            c.write_all(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let got = all(c);
            assert!(
                got.starts_with("HTTP/1.1 500 ") && got.contains("Connection: close"),
                "{mode:?}: {got}"
            );
            let mut c = connect(&r);
            c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            assert!(all(c).ends_with("fine\n"), "{mode:?}");
        }
    }

    #[test]
    fn a_stop_ends_idle_connections_and_lets_answers_finish() {
        for mode in MODES {
            let r = serve(mode, false, |_, _| {
                std::thread::sleep(Duration::from_millis(300));
                Response::text(200, "slow answer\n")
            });
            let idle = connect(&r);
            let mut busy = connect(&r);
            busy.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            std::thread::sleep(Duration::from_millis(50));
            r.stop.store(true, Ordering::SeqCst);
            let got = all(busy);
            assert!(
                got.contains("slow answer") && got.contains("Connection: close"),
                "{mode:?}: {got}"
            );
            assert_eq!(all(idle), "", "{mode:?}");
        }
    }
}
