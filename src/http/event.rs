//! The event loops: every open connection lives here as a socket and a few hundred bytes of
//! state, never as a thread. A loop reads request heads as they trickle in, answers each request
//! (on the loop itself, or on a worker thread for handlers that may block), and writes answers as
//! fast as each client takes them, files by `sendfile`. A sweep a few times a second drops idle
//! and stalled clients.
//!
//! Threads: each loop is one; loop 0 also accepts and deals new connections out in turn.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use super::Config;
use super::conn::{After, Answer, BodySource, Ctx, Handler, Step, head_end, refuse, take_request};
use super::pool::Pool;
use super::request::MAX_HEAD;
use super::response::Progress;

const LISTENER: Token = Token(usize::MAX - 1);
const WAKER: Token = Token(usize::MAX);
/// How long a closing connection keeps reading what the client still sends, and how much.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;
/// The most bytes all connections together may hold in request heads not yet complete (the
/// slowloris budget). Complete heads that arrive in one piece never count against it.
pub const PENDING_BUDGET: usize = 16 << 20;

/// What every loop and worker of one server shares.
pub(crate) struct Shared {
    pub config: Config,
    pub handler: Box<Handler>,
    pub stop: Arc<AtomicBool>,
    /// Requests being answered: dispatched to a worker, or with an answer going out.
    pub busy: AtomicUsize,
    /// Connections open, all loops.
    pub open: AtomicUsize,
    pub max_connections: usize,
    /// Bytes held in incomplete request heads, all loops.
    pub pending: AtomicUsize,
    pub inboxes: Vec<Inbox>,
    pub pool: Option<Pool<Job>>,
    next_loop: AtomicUsize,
    /// Turn-aways not yet logged, and the second of the last line about them: a flood writes a
    /// line a second, not one per connection.
    turned_away: AtomicUsize,
    turned_away_logged: std::sync::atomic::AtomicU64,
}

/// How other threads hand a loop its work.
pub(crate) struct Inbox {
    msgs: Mutex<Vec<Msg>>,
    waker: Waker,
}

enum Msg {
    /// A new connection, accepted by loop 0.
    New(TcpStream, SocketAddr),
    /// A connection back from a worker.
    Back(Box<Conn>),
}

/// A connection handed to a worker, and the loop it goes back to.
pub(crate) struct Job {
    conn: Box<Conn>,
    home: usize,
}

enum Phase {
    Reading,
    Writing(Box<Answer>),
    Lingering {
        until: Instant,
        drained: usize,
    },
    /// To be closed by its loop (a worker ended it).
    Done,
}

/// Where a connection stands once an answer has gone out whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    NextRequest,
    Lingering,
    Closed,
}

/// A loop's place for a connection: here, or out on a worker (its key stays taken).
enum Slot {
    Here(Conn),
    Away,
}

pub(crate) struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    key: usize,
    /// Bytes received and not yet consumed: an incomplete head, or requests pipelined behind
    /// the one being answered. Empty (no allocation) while the connection is idle.
    buf: Vec<u8>,
    phase: Phase,
    /// The last time the client sent or took something.
    since: Instant,
    /// When the first byte of the head being read arrived.
    head_started: Option<Instant>,
    /// A `100 Continue` went out for the body being read.
    continued: bool,
    /// How much of `buf` is counted in `Shared::pending`.
    counted: usize,
}

/// What a loop does with a connection after it made what progress it could.
enum Next {
    /// Wait for the socket.
    Wait,
    /// More to send at once, after the other connections had their turn.
    Again,
    Close,
    /// Answer on a worker (a whole head is in).
    Dispatch,
}

impl Shared {
    pub fn new(
        config: Config,
        handler: Box<Handler>,
        stop: Arc<AtomicBool>,
        max_connections: usize,
        inboxes: Vec<Inbox>,
        pool: Option<Pool<Job>>,
    ) -> Shared {
        Shared {
            config,
            handler,
            stop,
            busy: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            max_connections,
            pending: AtomicUsize::new(0),
            inboxes,
            pool,
            next_loop: AtomicUsize::new(0),
            turned_away: AtomicUsize::new(0),
            turned_away_logged: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Logs a client turned away with 503, at most once a second, with how many since.
    fn turn_away_logged(&self, peer: SocketAddr, why: std::fmt::Arguments<'_>) {
        let n = self.turned_away.fetch_add(1, Ordering::Relaxed) + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.turned_away_logged.load(Ordering::Relaxed);
        if now > last
            && self
                .turned_away_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.turned_away.store(0, Ordering::Relaxed);
            if n > 1 {
                log::warn!(
                    "{peer} turned away: {why} ({n} clients turned away since the last such line)"
                );
            } else {
                log::warn!("{peer} turned away: {why}");
            }
        }
    }

    fn ctx(&self, peer: SocketAddr) -> Ctx<'_> {
        Ctx {
            config: &self.config,
            handler: &*self.handler,
            peer,
            stop: &self.stop,
        }
    }

    fn send(&self, to: usize, msg: Msg) {
        let inbox = &self.inboxes[to];
        inbox
            .msgs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(msg);
        if let Err(e) = inbox.waker.wake() {
            log::error!("cannot wake event loop {to}: {e}");
        }
    }
}

impl Inbox {
    pub fn new(poll: &Poll) -> io::Result<Inbox> {
        Ok(Inbox {
            msgs: Mutex::new(Vec::new()),
            waker: Waker::new(poll.registry(), WAKER)?,
        })
    }
}

pub(crate) struct EventLoop {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    conns: Slab<Slot>,
    /// What each read lands in first; connections keep only the bytes they were sent.
    scratch: Vec<u8>,
    shared: Arc<Shared>,
    accept_paused_until: Option<Instant>,
    tick: Duration,
    /// Connections with more to send now, once the others had their turn.
    again: Vec<usize>,
}

impl EventLoop {
    pub fn new(id: usize, poll: Poll, listener: Option<TcpListener>, shared: Arc<Shared>) -> Self {
        let tick =
            (shared.config.timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        EventLoop {
            id,
            poll,
            listener,
            conns: Slab::new(),
            scratch: vec![0; MAX_HEAD],
            shared,
            accept_paused_until: None,
            tick,
            again: Vec::new(),
        }
    }

    /// Runs until the server stops and nothing this loop holds is in flight any more.
    pub fn run(mut self) {
        if let Some(l) = &mut self.listener
            && let Err(e) = self
                .poll
                .registry()
                .register(l, LISTENER, Interest::READABLE)
        {
            log::error!("cannot watch the listening socket: {e}");
            return;
        }
        let mut events = Events::with_capacity(1024);
        let mut next_sweep = Instant::now() + self.tick;
        let mut stopping = false;
        loop {
            let wait = if self.again.is_empty() {
                next_sweep.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            if let Err(e) = self.poll.poll(&mut events, Some(wait))
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("event loop {} cannot wait for events: {e}", self.id);
                std::thread::sleep(Duration::from_millis(100));
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    WAKER => self.take_inbox(),
                    Token(key) => self.drive(key),
                }
            }
            for key in std::mem::take(&mut self.again) {
                self.drive(key);
            }
            let now = Instant::now();
            if now >= next_sweep {
                next_sweep = now + self.tick;
                self.sweep(now);
                if self.accept_paused_until.is_some_and(|t| now >= t) {
                    self.accept_paused_until = None;
                    self.accept();
                }
            }
            if !stopping && self.shared.stop.load(Ordering::SeqCst) {
                stopping = true;
                self.listener = None;
                // Connections between requests end now; answers in flight may finish.
                let idle: Vec<usize> = self
                    .conns
                    .iter()
                    .filter(
                        |(_, s)| matches!(s, Slot::Here(c) if matches!(c.phase, Phase::Reading)),
                    )
                    .map(|(k, _)| k)
                    .collect();
                for key in idle {
                    self.close(key);
                }
            }
            if stopping && self.conns.is_empty() {
                return;
            }
        }
    }

    fn accept(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    let open = self.shared.open.fetch_add(1, Ordering::SeqCst);
                    if open >= self.shared.max_connections {
                        self.shared.open.fetch_sub(1, Ordering::SeqCst);
                        self.shared.turn_away_logged(
                            peer,
                            format_args!(
                                "all {} connections are taken",
                                self.shared.max_connections
                            ),
                        );
                        turn_away(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let loops = self.shared.inboxes.len();
                    let to = self.shared.next_loop.fetch_add(1, Ordering::Relaxed) % loops;
                    if to == self.id {
                        self.add(stream, peer);
                    } else {
                        self.shared.send(to, Msg::New(stream, peer));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    // Out of file descriptors or memory, mostly: the connection waits in the
                    // backlog until some are given back.
                    log::warn!("accept failed: {e}");
                    self.accept_paused_until = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
            }
        }
    }

    fn add(&mut self, mut stream: TcpStream, peer: SocketAddr) {
        if self.listener.is_none() && self.shared.stop.load(Ordering::SeqCst) {
            self.shared.open.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot watch the connection from {peer}: {e}");
            self.shared.open.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        entry.insert(Slot::Here(Conn {
            stream,
            peer,
            key,
            buf: Vec::new(),
            phase: Phase::Reading,
            since: Instant::now(),
            head_started: None,
            continued: false,
            counted: 0,
        }));
    }

    fn take_inbox(&mut self) {
        let msgs = std::mem::take(
            &mut *self.shared.inboxes[self.id]
                .msgs
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for msg in msgs {
            match msg {
                Msg::New(stream, peer) => self.add(stream, peer),
                Msg::Back(conn) => {
                    let key = conn.key;
                    self.shared.busy.fetch_sub(1, Ordering::SeqCst);
                    let stopping = self.shared.stop.load(Ordering::SeqCst);
                    let idle = matches!(conn.phase, Phase::Reading | Phase::Done);
                    self.conns[key] = Slot::Here(*conn);
                    if stopping && idle {
                        self.close(key);
                    } else {
                        // Events that came while it was away were not seen: look now.
                        self.drive(key);
                    }
                }
            }
        }
    }

    /// Makes what progress connection `key` allows now.
    fn drive(&mut self, key: usize) {
        let Some(Slot::Here(conn)) = self.conns.get_mut(key) else {
            return;
        };
        let workers = self.shared.pool.is_some();
        match progress(conn, &self.shared, &mut self.scratch, workers) {
            Next::Wait => {}
            Next::Again => {
                if !self.again.contains(&key) {
                    self.again.push(key);
                }
            }
            Next::Close => self.close(key),
            Next::Dispatch => self.dispatch(key),
        }
    }

    fn dispatch(&mut self, key: usize) {
        let Slot::Here(conn) = std::mem::replace(&mut self.conns[key], Slot::Away) else {
            return;
        };
        let pool = self
            .shared
            .pool
            .as_ref()
            .expect("dispatch only with workers");
        self.shared.busy.fetch_add(1, Ordering::SeqCst);
        if let Err(job) = pool.submit(Job {
            conn: Box::new(conn),
            home: self.id,
        }) {
            self.shared.busy.fetch_sub(1, Ordering::SeqCst);
            let mut conn = *job.conn;
            self.shared
                .turn_away_logged(conn.peer, format_args!("every worker is busy"));
            let answer = busy_answer(&self.shared, conn.peer);
            start_answer(&mut conn, answer, &self.shared);
            self.conns[key] = Slot::Here(conn);
            self.drive(key);
        }
    }

    fn close(&mut self, key: usize) {
        let Some(Slot::Here(conn)) = self.conns.try_remove(key) else {
            return;
        };
        finish_conn(conn, &self.shared, self.poll.registry());
    }

    /// Drops idle and stalled connections, and answers 408 to heads that take too long.
    fn sweep(&mut self, now: Instant) {
        let timeout = self.shared.config.timeout;
        let mut close = Vec::new();
        let mut too_slow = Vec::new();
        for (key, slot) in self.conns.iter() {
            let Slot::Here(c) = slot else { continue };
            match &c.phase {
                Phase::Reading if c.buf.is_empty() => {
                    if now.duration_since(c.since) > timeout {
                        close.push(key);
                    }
                }
                Phase::Reading => {
                    if c.head_started
                        .is_some_and(|t| now.duration_since(t) > timeout)
                        || now.duration_since(c.since) > timeout
                    {
                        too_slow.push(key);
                    }
                }
                Phase::Writing(_) => {
                    if now.duration_since(c.since) > timeout {
                        close.push(key);
                    }
                }
                Phase::Lingering { until, .. } => {
                    if now >= *until {
                        close.push(key);
                    }
                }
                Phase::Done => close.push(key),
            }
        }
        for key in close {
            self.close(key);
        }
        for key in too_slow {
            let Slot::Here(conn) = &mut self.conns[key] else {
                continue;
            };
            let why = if head_end(&conn.buf).is_some() {
                "request body too slow\n"
            } else {
                "request head too slow\n"
            };
            let answer = refuse(&self.shared.ctx(conn.peer), 408, why);
            release(conn, &self.shared);
            conn.buf = Vec::new();
            start_answer(conn, answer, &self.shared);
            self.drive(key);
        }
    }
}

/// The 503 for a connection over the bound, written without waiting, then closed.
fn turn_away(stream: TcpStream) {
    let _ = (&stream).write(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n\
          Content-Length: 12\r\nRetry-After: 5\r\nConnection: close\r\n\r\nserver busy\n",
    );
    let _ = stream.shutdown(Shutdown::Write);
}

fn busy_answer(shared: &Shared, peer: SocketAddr) -> Answer {
    let mut a = refuse(&shared.ctx(peer), 503, "server busy\n");
    a.after = After::Close { drain: true };
    a
}

/// Gives back what a closed connection held: its count, its pending bytes, an answer cut short.
fn finish_conn(mut conn: Conn, shared: &Shared, registry: &mio::Registry) {
    release(&mut conn, shared);
    if let Phase::Writing(answer) = &conn.phase {
        shared.busy.fetch_sub(1, Ordering::SeqCst);
        if let Some(log) = &answer.log {
            let e = io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading");
            log.write(conn.peer, Err(&e));
        }
    }
    let _ = registry.deregister(&mut conn.stream);
    shared.open.fetch_sub(1, Ordering::SeqCst);
}

/// Stops counting `conn`'s buffer against the pending budget.
fn release(conn: &mut Conn, shared: &Shared) {
    if conn.counted > 0 {
        shared.pending.fetch_sub(conn.counted, Ordering::SeqCst);
        conn.counted = 0;
    }
}

fn start_answer(conn: &mut Conn, answer: Answer, shared: &Shared) {
    shared.busy.fetch_add(1, Ordering::SeqCst);
    conn.since = Instant::now();
    conn.phase = Phase::Writing(Box::new(answer));
}

/// What a read brought.
enum Got {
    Data,
    WouldBlock,
    Closed,
}

/// Reads what the socket holds into `conn.buf`, letting it grow to `limit` bytes, through the
/// loop's scratch buffer: `conn.buf` gets exactly what arrived, so an idle connection holds no
/// buffer and a slowloris one only the bytes it sent.
fn read_more(conn: &mut Conn, limit: usize, scratch: &mut [u8]) -> Got {
    let len = conn.buf.len();
    if len >= limit {
        return Got::WouldBlock;
    }
    let room = (limit - len).min(scratch.len());
    loop {
        match (&conn.stream).read(&mut scratch[..room]) {
            Ok(0) => return Got::Closed,
            Ok(n) => {
                conn.buf.extend_from_slice(&scratch[..n]);
                conn.since = Instant::now();
                if len == 0 {
                    conn.head_started = Some(conn.since);
                }
                return Got::Data;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Got::WouldBlock,
            Err(_) => return Got::Closed,
        }
    }
}

/// Before a connection waits: an empty buffer is freed, a partial head keeps about what it
/// holds and counts against the pending budget. `false` when the budget is spent.
fn park(conn: &mut Conn, shared: &Shared) -> bool {
    if conn.buf.is_empty() {
        conn.buf = Vec::new();
        release(conn, shared);
        conn.head_started = None;
        return true;
    }
    if conn.buf.capacity() > conn.buf.len() + conn.buf.len() / 2 + 64 {
        conn.buf.shrink_to_fit();
    }
    let now = conn.buf.capacity();
    if now > conn.counted {
        let more = now - conn.counted;
        let before = shared.pending.fetch_add(more, Ordering::SeqCst);
        conn.counted = now;
        if before + more > PENDING_BUDGET {
            return false;
        }
    } else if now < conn.counted {
        shared
            .pending
            .fetch_sub(conn.counted - now, Ordering::SeqCst);
        conn.counted = now;
    }
    true
}

/// Moves `conn` on as far as it goes without waiting: reads and answers requests (or, with
/// workers, stops at a whole head), writes answers, drains a closing connection.
fn progress(conn: &mut Conn, shared: &Shared, scratch: &mut [u8], workers: bool) -> Next {
    loop {
        match &mut conn.phase {
            Phase::Reading => {
                let step = if workers {
                    // Refusals of what the head holds are made on the worker too.
                    if head_end(&conn.buf).is_some() || conn.buf.len() >= MAX_HEAD {
                        return Next::Dispatch;
                    }
                    Step::NeedMore {
                        limit: MAX_HEAD,
                        go_ahead: false,
                    }
                } else {
                    take_request(&mut conn.buf, &shared.ctx(conn.peer), BodySource::Buffered)
                };
                match step {
                    Step::Answer(a) => start_answer(conn, a, shared),
                    Step::NeedMore { limit, go_ahead } => {
                        if go_ahead && !conn.continued {
                            conn.continued = true;
                            // 25 bytes into a socket that has sent nothing yet: they fit.
                            let _ = (&conn.stream).write(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                        match read_more(conn, limit, scratch) {
                            Got::Data => {}
                            Got::WouldBlock => {
                                if park(conn, shared) {
                                    return Next::Wait;
                                }
                                shared.turn_away_logged(
                                    conn.peer,
                                    format_args!(
                                        "incomplete requests hold {} MiB",
                                        PENDING_BUDGET >> 20
                                    ),
                                );
                                release(conn, shared);
                                conn.buf = Vec::new();
                                let a = busy_answer(shared, conn.peer);
                                start_answer(conn, a, shared);
                            }
                            Got::Closed => return Next::Close,
                        }
                    }
                }
            }
            Phase::Writing(answer) => match answer.out.advance(&conn.stream) {
                Ok(Progress::Turn) => {
                    conn.since = Instant::now();
                    return Next::Again;
                }
                Ok(Progress::Done) => {
                    if answered(conn, shared) == Then::Closed {
                        return Next::Close;
                    }
                }
                Ok(Progress::Full) => {
                    if answer.out.progressed() {
                        conn.since = Instant::now();
                    }
                    if conn.buf.is_empty() {
                        park(conn, shared);
                    }
                    return Next::Wait;
                }
                Err(e) => {
                    shared.busy.fetch_sub(1, Ordering::SeqCst);
                    if let Some(log) = &answer.log {
                        log.write(conn.peer, Err(&e));
                    }
                    conn.phase = Phase::Done;
                    return Next::Close;
                }
            },
            Phase::Done => return Next::Close,
            Phase::Lingering { .. } => {
                release(conn, shared);
                conn.buf = Vec::new();
                let Phase::Lingering { drained, .. } = &mut conn.phase else {
                    unreachable!()
                };
                let mut sink = [0u8; 4096];
                loop {
                    match (&conn.stream).read(&mut sink) {
                        Ok(0) => return Next::Close,
                        Ok(n) => {
                            *drained += n;
                            if *drained >= LINGER_BYTES {
                                return Next::Close;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Wait,
                        Err(_) => return Next::Close,
                    }
                }
            }
        }
    }
}

/// After an answer has gone out whole: logs it, and moves the connection on to the next request
/// or to its close.
fn answered(conn: &mut Conn, shared: &Shared) -> Then {
    shared.busy.fetch_sub(1, Ordering::SeqCst);
    let Phase::Writing(answer) = std::mem::replace(&mut conn.phase, Phase::Done) else {
        return Then::Closed;
    };
    if let Some(log) = &answer.log {
        log.write(conn.peer, Ok(answer.out.body_sent()));
    }
    conn.since = Instant::now();
    match answer.after {
        After::KeepAlive => {
            conn.phase = Phase::Reading;
            conn.continued = false;
            conn.head_started = (!conn.buf.is_empty()).then_some(conn.since);
            Then::NextRequest
        }
        After::Close { drain } => {
            let _ = conn.stream.shutdown(Shutdown::Write);
            conn.buf = Vec::new();
            if !drain {
                return Then::Closed;
            }
            conn.phase = Phase::Lingering {
                until: conn.since + LINGER,
                drained: 0,
            };
            Then::Lingering
        }
    }
}

/// On a worker: answers the requests whose heads are in, then hands the connection back to its
/// loop (to wait for the next request, or for the client to take the rest of an answer).
pub(crate) fn work(job: Job, shared: &Shared) {
    let Job { mut conn, home } = job;
    release(&mut conn, shared);
    let timeout = shared.config.timeout;
    loop {
        if !matches!(conn.phase, Phase::Reading) {
            break;
        }
        let step = {
            let peer = conn.peer;
            let Conn { buf, stream, .. } = &mut *conn;
            take_request(
                buf,
                &shared.ctx(peer),
                BodySource::Socket {
                    stream: &*stream,
                    timeout,
                },
            )
        };
        let Step::Answer(answer) = step else {
            break;
        };
        start_answer(&mut conn, answer, shared);
        let Phase::Writing(answer) = &mut conn.phase else {
            unreachable!()
        };
        match answer.out.advance(&conn.stream) {
            Ok(Progress::Done) => {
                // Only a whole pipelined head is answered here; a part waits on the loop.
                if answered(&mut conn, shared) != Then::NextRequest || head_end(&conn.buf).is_none()
                {
                    break;
                }
            }
            // The rest goes out from the loop as the client takes it.
            Ok(Progress::Full | Progress::Turn) => break,
            Err(e) => {
                shared.busy.fetch_sub(1, Ordering::SeqCst);
                if let Some(log) = &answer.log {
                    log.write(conn.peer, Err(&e));
                }
                conn.phase = Phase::Done;
                break;
            }
        }
    }
    if conn.buf.is_empty() {
        conn.buf = Vec::new();
    } else {
        conn.buf.shrink_to_fit();
    }
    shared.send(home, Msg::Back(conn));
}
