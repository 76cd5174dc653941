//! The small HTTP/1.1 server both long-running programs speak (`update-server`, and
//! `box-updater serve`): bounded request heads, `Content-Length` bodies read only as far as a
//! handler wants them, keep-alive, socket timeouts, files by `sendfile`, one thread per open
//! connection from a bounded pool and a 503 beyond it.
//!
//! Threads: the caller's runs the accept loop; each open connection has its own (see `pool`).

pub mod conn;
pub mod file;
pub mod pool;
pub mod request;
pub mod response;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

pub use conn::{BodyError, Handler, RequestBody};
pub use file::{FileMeta, file_response};
pub use request::{Method, Request, route_path};
pub use response::{Body, Response};

/// The longest the accept loop waits before it looks at the stop flag.
const ACCEPT_WAIT: Duration = Duration::from_millis(250);

/// How a server treats its clients.
#[derive(Debug, Clone)]
pub struct Config {
    /// Silence allowed from a client (between requests, within a head or a body, or leaving an
    /// answer unread), and time allowed for a whole request head.
    pub timeout: Duration,
    /// Connections served at once; each has its own thread, so a slow client never holds up
    /// another. Beyond this, new clients get 503.
    pub max_connections: usize,
    /// The `Server` header.
    pub name: &'static str,
    /// Whether handlers may read request bodies (`Content-Length` only; transfer-coded ones get
    /// 411 or 501). Without, a handler sees an empty body and a body sent anyway ends the
    /// connection after the answer.
    pub bodies: bool,
}

/// A listening server; `run` takes connections until the stop flag is set.
pub struct Server {
    listener: TcpListener,
    addr: SocketAddr,
    pool: pool::Pool,
    max_connections: usize,
    stop: Arc<AtomicBool>,
    busy: Arc<AtomicUsize>,
    timeout: Duration,
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
        let busy = Arc::new(AtomicUsize::new(0));
        let (max_connections, timeout) = (config.max_connections, config.timeout);
        let pool = {
            let (stop, busy) = (stop.clone(), busy.clone());
            pool::Pool::new(config.max_connections, move |stream, peer| {
                conn::serve_connection(
                    stream,
                    peer,
                    &config,
                    &handler,
                    &|| stop.load(Ordering::Relaxed),
                    &|on| {
                        if on {
                            busy.fetch_add(1, Ordering::SeqCst);
                        } else {
                            busy.fetch_sub(1, Ordering::SeqCst);
                        }
                    },
                )
            })
        };
        Ok(Server {
            listener,
            addr,
            pool,
            max_connections,
            stop,
            busy,
            timeout,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Takes connections until the stop flag is set.
    pub fn run(&self) {
        while !self.stop.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    if let Err(e) = prepare(&stream, self.timeout) {
                        log::debug!("dropping {peer}: {e}");
                        continue;
                    }
                    if let Err((stream, peer)) = self.pool.submit((stream, peer)) {
                        log::warn!(
                            "{peer} turned away: all {} connections are busy",
                            self.max_connections
                        );
                        turn_away(stream);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let timeout = PollTimeout::try_from(ACCEPT_WAIT).unwrap_or(PollTimeout::MAX);
                    let _ = poll(
                        &mut [PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)],
                        timeout,
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of file descriptors, mostly: wait for some to be given back.
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Closes the listening socket and gives answers in flight up to `grace` to finish; returns
    /// how many did not.
    pub fn finish(self, grace: Duration) -> usize {
        drop(self.listener);
        let deadline = Instant::now() + grace;
        while self.busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.busy.load(Ordering::SeqCst)
    }
}

/// Socket options for one connection; the timeouts are what drops idle and stalled clients.
fn prepare(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

fn turn_away(mut stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = stream.write_all(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
          Content-Length: 12\r\nRetry-After: 5\r\nConnection: close\r\n\r\nserver busy\n",
    );
}
