//! Checking: asks the update server for its newest version and compares it with the installed one.

use anyhow::{Result, bail};

use super::{Downloading, State, UpToDate};
use crate::image::Version;
use crate::updater::engine::Engine;
use crate::updater::http::FetchError;

#[derive(Debug)]
pub struct Checking {
    pub force: bool,
}

/// What the server offers against what the box runs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Offer {
    pub installed: Option<Version>,
    pub newest: Option<Version>,
    pub update_available: bool,
}

/// Asks the server without installing anything (the page's check: one try, a quick answer).
pub fn check(engine: &Engine) -> Result<Offer> {
    let server = engine.updates_ep()?;
    offer(engine, &server).map_err(|e| engine.unreachable_hint(e, &server))
}

/// One question to the server: its newest version against the installed one.
fn offer(engine: &Engine, server: &str) -> Result<Offer, FetchError> {
    let installed = engine.layout().installed_version();
    let url = format!("{server}/version");
    let newest = match engine.http.get_text(&url, 1024)? {
        None => None,
        Some(text) => Some(text.trim().parse::<Version>().map_err(|_| {
            FetchError::Permanent(format!("{url} did not answer with a version number"))
        })?),
    };
    Ok(Offer {
        installed,
        newest,
        update_available: newest.is_some_and(|n| installed.is_none_or(|i| n > i)),
    })
}

impl Checking {
    pub fn handle(self, engine: &Engine) -> Result<State> {
        let server = engine.updates_ep()?;
        // A box often checks right after its boot, when the network may drop a first connection.
        let offer = engine
            .with_retries("the newest version", || offer(engine, &server))
            .map_err(|e| engine.unreachable_hint(e, &server))?;
        let Some(newest) = offer.newest else {
            bail!("the update server at {server} has no image yet");
        };
        if !offer.update_available && !self.force {
            return Ok(State::UpToDate(UpToDate {
                installed: offer.installed,
                newest,
            }));
        }
        let (image, url) =
            engine.with_retries("the newest image", || engine.http.resolve_latest(&server))?;
        if Some(image.version()) == offer.installed {
            if self.force {
                bail!(
                    "version {} is the running release; there is nothing to reinstall",
                    image.version()
                );
            }
            return Ok(State::UpToDate(UpToDate {
                installed: offer.installed,
                newest: image.version(),
            }));
        }
        if offer.installed.is_some_and(|i| image.version() < i) && !self.force {
            bail!(
                "the server's newest image {} is older than the installed version {}; use --force to downgrade",
                image.version(),
                offer.installed.map(|v| v.to_string()).unwrap_or_default()
            );
        }
        Ok(State::Downloading(Downloading { image, url }))
    }
}
