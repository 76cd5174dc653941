//! The update server: a watched directory of images served over HTTP.
//!
//! Threads: the caller's runs the accept loop; one watcher keeps the index; one hasher fills in
//! missing digests; one waits for SIGTERM/SIGINT; each open connection has its own (see
//! `crate::http`).

pub mod health;
pub mod index;
pub mod routes;
pub mod settings;
pub mod watch;

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{SigSet, Signal};

use crate::http;

pub use settings::{Flags, Settings};

/// How long in-flight responses may take to finish once a stop is asked for; then the process
/// ends and interrupted downloads resume with a Range request.
const STOP_GRACE: Duration = Duration::from_secs(5);

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
    let listener = crate::cli::listen(
        SocketAddr::new(settings.bind, settings.port),
        &format!("--port N (or \"port\" in {})", settings::SETTINGS_ENV),
    )?;

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

    let (fleet, syncer) = crate::fleet::start(&settings.fleet)?;
    let app = routes::App {
        public_base_url: settings.public_base_url.clone(),
        index: index.clone(),
        fleet,
    };
    let config = http::Config {
        timeout: settings.timeout,
        max_connections: settings.max_connections,
        name: "update-server",
        // For `POST /report` alone, which takes at most a few KiB.
        bodies: true,
    };
    let server = http::Server::new(listener, config, stop, move |req, body| {
        app.handle(req, body)
    })?;

    log::info!(
        "listening on {}, serving {} from {}",
        server.local_addr(),
        index.snapshot().summary(),
        settings.dir.display()
    );
    server.run();
    let left = server.finish(STOP_GRACE);
    if let Some(s) = syncer {
        s.stop();
    }
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
