//! The update server: a watched directory of images served over HTTP.
//!
//! Threads: the caller's runs the accept loop; one watcher keeps the index; one hasher fills in
//! missing digests; one waits for SIGTERM/SIGINT; each open connection has its own (see `pool`).

pub mod http;
pub mod index;
pub mod pool;
pub mod routes;
pub mod settings;
pub mod watch;

use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};

pub use settings::{Flags, Settings};

/// How long in-flight responses may take to finish once a stop is asked for; then the process
/// ends and interrupted downloads resume with a Range request.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The longest the accept loop waits before it looks at the stop flag.
const ACCEPT_WAIT: Duration = Duration::from_millis(250);

/// Runs the server until SIGTERM or SIGINT.
pub fn run(settings: Settings) -> Result<()> {
    // Blocked here, before any thread starts, so that every thread inherits the mask: SIGTERM and
    // SIGINT are taken by `sigwait` in one thread, and SIGIO (a broken file lease, see
    // `index::open_for_writing`) is never delivered.
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGTERM);
    waited.add(Signal::SIGINT);
    let mut blocked = waited;
    blocked.add(Signal::SIGIO);
    blocked.thread_block().context("cannot block signals")?;

    check_dir(&settings.dir)?;
    let index = Arc::new(index::Index::new(settings.dir.clone()));
    let watcher = watch::Watcher::new(index.clone(), settings.rescan)?;
    let listener = TcpListener::bind((settings.bind, settings.port)).with_context(|| {
        format!(
            "cannot listen on {}",
            SocketAddr::new(settings.bind, settings.port)
        )
    })?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;

    let stop = Arc::new(AtomicBool::new(false));
    watcher
        .spawn(stop.clone())
        .context("cannot start the watcher")?;
    {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(sig) = waited.wait() {
                    log::info!("got {sig}, stopping");
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .context("cannot start the signal thread")?;
    }

    let busy = Arc::new(AtomicUsize::new(0));
    let pool = {
        let app = routes::App {
            index: index.clone(),
        };
        let limits = http::ConnLimits {
            timeout: settings.timeout,
        };
        let (stop, busy) = (stop.clone(), busy.clone());
        pool::Pool::new(settings.max_connections, move |stream, peer| {
            http::serve_connection(
                stream,
                peer,
                &limits,
                &|req| app.respond(req),
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

    log::info!(
        "listening on {addr}, serving {} from {}",
        index.snapshot().summary(),
        settings.dir.display()
    );
    accept_loop(&listener, &pool, &settings, &stop);
    drop(listener);

    let deadline = Instant::now() + STOP_GRACE;
    while busy.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = busy.load(Ordering::SeqCst);
    if left > 0 {
        log::warn!("stopped with {left} responses cut short");
    } else {
        log::info!("stopped");
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<()> {
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("update directory {} does not exist", dir.display())
        }
        Err(e) => bail!("cannot reach update directory {}: {e}", dir.display()),
    };
    if !meta.is_dir() {
        bail!("update directory {} is not a directory", dir.display());
    }
    std::fs::read_dir(dir)
        .with_context(|| format!("cannot read update directory {}", dir.display()))?;
    Ok(())
}

fn accept_loop(listener: &TcpListener, pool: &pool::Pool, settings: &Settings, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(e) = prepare(&stream, settings.timeout) {
                    log::debug!("dropping {peer}: {e}");
                    continue;
                }
                if let Err((stream, peer)) = pool.submit((stream, peer)) {
                    log::warn!(
                        "{peer} turned away: all {} connections are busy",
                        settings.max_connections
                    );
                    turn_away(stream);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let timeout = PollTimeout::try_from(ACCEPT_WAIT).unwrap_or(PollTimeout::MAX);
                let _ = poll(
                    &mut [PollFd::new(listener.as_fd(), PollFlags::POLLIN)],
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
