//! `http-load`: a bounded load tool for the servers' network face, on loopback only.
//!
//! ```text
//! http-load hold  ADDR --idle N --slow N [--source IP] [--interval-ms MS]
//! http-load probe ADDR --count N [--path PATH] [--host HOST] [--interval-ms MS]
//! ```
//!
//! `hold` opens N connections that never say anything and N slowloris connections (a request
//! head that never ends: one more header line every interval), reopens any the server closes, and
//! keeps them until its stdin closes. It prints `ready IDLE SLOW` once all are open, and at the end
//! how many the server closed. `probe` sends N requests, each on a new connection as a box polling
//! `/version` does, one after the other, and prints the latency percentiles and any failure.
//!
//! Both raise their open-file limit to the hard limit and say so when N does not fit under it.

use std::io::{BufRead, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("hold") => hold(&args[1..]),
        Some("probe") => probe(&args[1..]),
        _ => Err("usage: http-load hold ADDR --idle N --slow N [--source IP] [--interval-ms MS]\n       \
                  http-load probe ADDR --count N [--path PATH] [--host HOST] [--interval-ms MS]"
            .to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("http-load: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--name value` from `args`, parsed.
fn opt<T: std::str::FromStr>(args: &[String], name: &str, default: Option<T>) -> Result<T, String> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} needs a value")),
        None => default.ok_or_else(|| format!("{name} is required")),
    }
}

fn addr_arg(args: &[String]) -> Result<SocketAddr, String> {
    let a = args.first().ok_or("the server's ADDR:PORT is required")?;
    let addr: SocketAddr = a.parse().map_err(|_| format!("{a} is not ADDR:PORT"))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: this tool loads loopback only"
        ));
    }
    Ok(addr)
}

/// Raises the soft open-file limit to the hard one; fails when `need` descriptors do not fit.
fn raise_fd_limit(need: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err("cannot read the open-file limit".into());
        }
        if lim.rlim_cur < need && lim.rlim_max > lim.rlim_cur {
            lim.rlim_cur = lim.rlim_max.min(need.max(lim.rlim_cur));
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    if lim.rlim_cur < need {
        return Err(format!(
            "{need} open files are needed, the limit is {} (hard {}): raise it (ulimit -Hn, or as root)",
            lim.rlim_cur, lim.rlim_max
        ));
    }
    Ok(lim.rlim_cur)
}

/// A nonblocking connection to `to` from `from` (any port), so that tens of thousands of
/// connections can spread over several loopback source addresses.
fn connect(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr structs are
    // local and sized as passed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let sin = |a: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: a.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // The port is chosen at connect(), by the whole 4-tuple: bind(port 0) alone searches
        // for a port free on every address, slower with each of thousands already taken.
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let local = sin(SocketAddrV4::new(from, 0));
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let SocketAddr::V4(to) = to else {
            return Err(std::io::Error::other("IPv4 only"));
        };
        let remote = sin(to);
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}

struct Held {
    /// None while it could not be reopened.
    stream: Option<TcpStream>,
    slow: bool,
}

fn open(from: Ipv4Addr, to: SocketAddr, slow: bool) -> std::io::Result<TcpStream> {
    let mut stream = connect(from, to)?;
    if slow {
        // Half a head; the rest never comes.
        let _ = stream.write(b"GET /version HTTP/1.1\r\nHost: slowloris\r\n");
    }
    Ok(stream)
}

fn hold(args: &[String]) -> Result<(), String> {
    let to = addr_arg(args)?;
    let idle: usize = opt(args, "--idle", Some(0))?;
    let slow: usize = opt(args, "--slow", Some(0))?;
    let from: Ipv4Addr = opt(args, "--source", Some(Ipv4Addr::LOCALHOST))?;
    let interval = Duration::from_millis(opt(args, "--interval-ms", Some(1000))?);
    raise_fd_limit((idle + slow) as u64 + 32)?;
    let mut conns = Vec::with_capacity(idle + slow);
    for i in 0..idle + slow {
        let slow = i >= idle;
        let stream = open(from, to, slow).map_err(|e| format!("cannot connect to {to}: {e}"))?;
        conns.push(Held {
            stream: Some(stream),
            slow,
        });
    }
    println!("ready {idle} {slow}");
    let _ = std::io::stdout().flush();

    // Until stdin closes (the test or bench that started this ends it).
    let done = Arc::new(AtomicBool::new(false));
    {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut sink = String::new();
            let stdin = std::io::stdin();
            let mut lock = stdin.lock();
            while lock.read_line(&mut sink).is_ok_and(|n| n > 0) {
                sink.clear();
            }
            done.store(true, Ordering::SeqCst);
        });
    }
    let (mut closed, mut answered, mut refused) = (0u64, 0u64, 0u64);
    let mut buf = [0u8; 512];
    while !done.load(Ordering::SeqCst) {
        let round = Instant::now();
        for c in conns.iter_mut() {
            let gone = match &mut c.stream {
                None => true,
                Some(stream) => {
                    let mut gone = match stream.read(&mut buf) {
                        Ok(0) => true,
                        Ok(_) => {
                            // An answer (408, 503): the server gave up on it.
                            answered += 1;
                            true
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
                        Err(_) => true,
                    };
                    if !gone && c.slow && stream.write(b"X-Trickle: 1\r\n").is_err() {
                        gone = true;
                    }
                    if gone {
                        closed += 1;
                    }
                    gone
                }
            };
            if gone {
                // Reopened, as an attacker would; when that fails, tried again next round.
                c.stream = open(from, to, c.slow).ok();
                if c.stream.is_none() {
                    refused += 1;
                }
            }
        }
        let spent = round.elapsed();
        if spent < interval {
            std::thread::sleep(interval - spent);
        }
    }
    println!("closed-by-server {closed} answered {answered} reopen-failed {refused}");
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn probe(args: &[String]) -> Result<(), String> {
    let to = addr_arg(args)?;
    let count: usize = opt(args, "--count", Some(1000))?;
    let path: String = opt(args, "--path", Some("/version".to_string()))?;
    let host: String = opt(args, "--host", Some(to.to_string()))?;
    let interval = Duration::from_millis(opt(args, "--interval-ms", Some(0))?);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut times = Vec::with_capacity(count);
    let mut failures = Vec::new();
    let mut first_status = String::new();
    for _ in 0..count {
        let t0 = Instant::now();
        let got = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(request.as_bytes())?;
            let mut out = Vec::new();
            s.read_to_end(&mut out)?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        })();
        let took = t0.elapsed();
        match got {
            Ok(text) if text.starts_with("HTTP/1.1 200 ") => {
                if first_status.is_empty() {
                    first_status = text.lines().next().unwrap_or_default().to_string();
                }
                times.push(took);
            }
            Ok(text) => failures.push(format!("{:?}", &text[..text.len().min(60)])),
            Err(e) => failures.push(e.to_string()),
        }
        if interval > Duration::ZERO {
            std::thread::sleep(interval);
        }
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "probes {} ok {} failed {} p50_ms {:.2} p90_ms {:.2} p99_ms {:.2} max_ms {:.2}",
        count,
        times.len(),
        failures.len(),
        ms(percentile(&times, 0.50)),
        ms(percentile(&times, 0.90)),
        ms(percentile(&times, 0.99)),
        ms(times.last().copied().unwrap_or_default())
    );
    for f in failures.iter().take(5) {
        println!("failure {f}");
    }
    Ok(())
}
