//! `update-server healthcheck`: asks the running server for `GET /` on its own address and port,
//! for a container's HEALTHCHECK (the image holds no shell and no curl, only this binary).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::Settings;

/// The address a client on this machine reaches the server at: its bind address, or loopback
/// when it listens on every address.
pub fn local_address(settings: &Settings) -> Result<SocketAddr> {
    if settings.port == 0 {
        bail!(
            "the server's port is 0 (any free one), so there is no known port to check; give --port N"
        );
    }
    let ip = match settings.bind {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    Ok(SocketAddr::new(ip, settings.port))
}

/// `GET /` must answer 200 with `"ok": true` within `timeout`; returns a line saying so.
pub fn check(settings: &Settings, timeout: Duration) -> Result<String> {
    let addr = local_address(settings)?;
    let url = format!("http://{addr}/");
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("cannot connect to {url}: is update-server running?"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: update-server-healthcheck\r\nConnection: close\r\n\r\n"
    )
    .with_context(|| format!("sending to {url}"))?;
    let mut answer = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut answer)
        .with_context(|| format!("no answer from {url} within {} s", timeout.as_secs()))?;
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url} did not answer with HTTP"))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "200" {
        bail!(
            "{url} answered {:?}",
            head.lines().next().unwrap_or_default()
        );
    }
    let health: serde_json::Value = serde_json::from_str(body.trim())
        .with_context(|| format!("{url} did not answer with the health JSON"))?;
    if health.get("ok") != Some(&serde_json::Value::Bool(true)) {
        bail!("{url} says it is not healthy: {}", body.trim());
    }
    Ok(format!("healthy: {url} answered 200 {}", body.trim()))
}
