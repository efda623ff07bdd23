//! Serving listening sockets: an event-driven [`Server`] (a fixed set of threads whatever the
//! number of connections, with the limits of [`ServeLimits`]) for the TCP transport, the side
//! channel, the shared-memory transport and the metrics endpoint.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::limits::{LogLimiter, ServeLimits};
use crate::sync::Locked;

/// Connect to the first address `addr` (`host:port`) resolves to that accepts before the deadline;
/// the error says why the last attempt failed.
pub(crate) fn connect_within(addr: &str, deadline: Deadline) -> std::result::Result<TcpStream, String> {
    let targets = std::net::ToSocketAddrs::to_socket_addrs(addr).map_err(|e| format!("{addr}: {e}"))?;
    let mut last = format!("{addr} resolves to nothing");
    for target in targets {
        let left = deadline.remaining();
        if left.is_zero() {
            return Err(format!("{addr}: the deadline passed while connecting ({last})"));
        }
        match TcpStream::connect_timeout(&target, left) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = format!("{target}: {e}"),
        }
    }
    Err(last)
}

/// A socket whose blocking calls can be bounded by an absolute deadline: the timeout is set again
/// from the time left before every system call, so a peer trickling one byte at a time cannot
/// stretch an exchange past the deadline.
pub(crate) trait DeadlineStream: Read + Write {
    fn set_timeouts(&self, left: Duration) -> io::Result<()>;

    fn read_exact_by(&mut self, mut buf: &mut [u8], deadline: Deadline) -> io::Result<()> {
        while !buf.is_empty() {
            self.set_timeouts(time_left(deadline)?)?;
            match self.read(buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_all_by(&mut self, mut buf: &[u8], deadline: Deadline) -> io::Result<()> {
        while !buf.is_empty() {
            self.set_timeouts(time_left(deadline)?)?;
            match self.write(buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The time left before `deadline`, or `TimedOut` once it has passed.
pub(crate) fn time_left(deadline: Deadline) -> io::Result<Duration> {
    let left = deadline.remaining();
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "the deadline passed"));
    }
    Ok(left)
}

impl DeadlineStream for TcpStream {
    fn set_timeouts(&self, left: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(left))?;
        self.set_write_timeout(Some(left))
    }
}

impl DeadlineStream for UnixStream {
    fn set_timeouts(&self, left: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(left))?;
        self.set_write_timeout(Some(left))
    }
}

/// The head of the handshake's first message (see [`crate::auth`]): a connection is handed to a
/// handshake worker only once that much has arrived, so a client that sends nothing costs no
/// thread time, and one speaking another protocol is refused at once.
const AUTH_HELLO_HEAD: libc::c_int = 8;

/// A stream an event-driven [`Server`] can serve.
pub(crate) trait ServeStream: DeadlineStream + AsRawFd + Send + 'static {}

impl ServeStream for TcpStream {}

impl ServeStream for UnixStream {}

/// Who is at the other end of a connection, as far as the per-peer limit
/// ([`ServeLimits::max_per_ip`]) is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Peer {
    /// A TCP peer's IP address.
    Ip(IpAddr),
    /// A Unix socket peer's user id, as the kernel saw it connect (`SO_PEERCRED`).
    Uid(u32),
}

/// A listener an event-driven [`Server`] accepts on.
pub(crate) trait EventListener: AsRawFd + Send + 'static {
    type Stream: ServeStream;
    /// Accept one connection, with who the peer is where that can be told.
    fn accept_ready(&self) -> io::Result<(Self::Stream, Option<Peer>)>;
}

impl EventListener for TcpListener {
    type Stream = TcpStream;

    fn accept_ready(&self) -> io::Result<(TcpStream, Option<Peer>)> {
        self.accept().map(|(s, a)| (s, Some(Peer::Ip(a.ip()))))
    }
}

impl EventListener for UnixListener {
    type Stream = UnixStream;

    fn accept_ready(&self) -> io::Result<(UnixStream, Option<Peer>)> {
        let (stream, _) = self.accept()?;
        let uid = peer_cred(&stream).ok().map(|cred| Peer::Uid(cred.uid));
        Ok((stream, uid))
    }
}

/// The process at the other end of a Unix socket as the kernel saw it connect (not as it claims).
pub(crate) fn peer_cred(stream: &UnixStream) -> io::Result<libc::ucred> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a ucred of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred)
}

/// What a request left its connection in.
pub(crate) enum Next {
    /// Part of a request has arrived: wait for more (the request's deadline still runs).
    Park,
    /// The request is answered (or none had started): wait for the next one.
    Idle,
    /// Close the connection.
    Close,
}

/// The protocol an event-driven [`Server`] speaks.
pub(crate) trait Service: Send + Sync + 'static {
    type Stream: ServeStream;
    /// What a connection keeps once authenticated (a partly read request, say).
    type Conn: Send + 'static;
    /// What a worker thread keeps between requests (scratch buffers).
    type Worker: Default;
    /// The longest a request may take, from its first byte to its answer's last.
    fn request_timeout(&self) -> Duration;
    /// A connection that has served requests and then sends none for this long is closed; `None`:
    /// idle time between requests is unlimited (only a connection that never sent one expires,
    /// after [`ServeLimits::idle_timeout`]).
    fn idle_between_requests(&self) -> Option<Duration> {
        None
    }
    /// Prove the cluster secret (and any hello) by `deadline`.
    fn handshake(&self, stream: &mut Self::Stream, deadline: Deadline) -> io::Result<Self::Conn>;
    /// The connection is readable: read what has arrived without blocking, and serve the request
    /// once it is whole, by `deadline`.
    fn readable(
        &self,
        stream: &mut Self::Stream,
        conn: &mut Self::Conn,
        worker: &mut Self::Worker,
        deadline: Deadline,
    ) -> io::Result<Next>;
}

/// Read what has arrived, without blocking: `Ok(0)` is end of file, `WouldBlock` nothing yet.
pub(crate) fn recv_ready(stream: &impl AsRawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// What one non-blocking read of a request's bytes leaves its connection in, for a service's
/// `readable`: `None` when bytes arrived (`*got` grew by them); otherwise end of file closes the
/// connection, and no data yet waits for more: parked mid-request (`started`), idle before it.
pub(crate) fn received(read: io::Result<usize>, got: &mut usize, started: bool) -> io::Result<Option<Next>> {
    match read {
        Ok(0) => Ok(Some(Next::Close)),
        Ok(n) => {
            *got += n;
            Ok(None)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(if started { Next::Park } else { Next::Idle })),
        Err(e) => Err(e),
    }
}

fn set_rcvlowat(fd: RawFd, bytes: libc::c_int) {
    // SAFETY: a plain socket option on a descriptor we hold. Best effort: where it is not
    // supported, a partial hello reaches a handshake worker, whose deadline still bounds it.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

const LISTENER: u64 = 0;
const WAKE: u64 = 1;
/// How often connections past their deadlines are looked for.
const SWEEP: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long a worker that has just answered a request (or read part of one) waits on the same
/// connection for more before handing it back to the poll thread. A client's next request often
/// follows within microseconds; taking it on the spot saves the hand-off (the poll thread's
/// wake-up, the queue, a worker's wake-up and a re-arm), the largest cost of a small request.
const LINGER: Duration = Duration::from_millis(2);

/// A connection of an event-driven server.
struct Entry<S: Service> {
    fd: RawFd,
    peer: Option<Peer>,
    accepted: Instant,
    /// When the handshake finished; `None` before.
    authenticated: Option<Instant>,
    /// The first byte of the request being read arrived by then; `None` between requests.
    request_since: Option<Instant>,
    served_any: bool,
    /// When the connection last went idle (its handshake or last request done).
    idle_since: Instant,
    /// `None` while a worker holds the connection.
    slot: Option<Slot<S>>,
}

struct Slot<S: Service> {
    stream: S::Stream,
    conn: Option<S::Conn>,
}

struct Table<S: Service> {
    entries: HashMap<u64, Entry<S>>,
    next: u64,
    unauthenticated: usize,
    per_peer: HashMap<Peer, usize>,
}

impl<S: Service> Table<S> {
    fn remove(&mut self, id: u64) -> Option<Entry<S>> {
        let entry = self.entries.remove(&id)?;
        if entry.authenticated.is_none() {
            self.unauthenticated -= 1;
        }
        if let Some(peer) = entry.peer
            && let Some(n) = self.per_peer.get_mut(&peer)
        {
            *n -= 1;
            if *n == 0 {
                self.per_peer.remove(&peer);
            }
        }
        Some(entry)
    }
}

/// Connection ids handed to a pool of workers.
struct Queue {
    ids: Mutex<VecDeque<u64>>,
    ready: Condvar,
}

impl Queue {
    fn new() -> Queue {
        Queue { ids: Mutex::new(VecDeque::new()), ready: Condvar::new() }
    }

    fn push(&self, id: u64) {
        self.ids.locked().push_back(id);
        self.ready.notify_one();
    }

    /// The next id, or `None` once `stopping` is set.
    fn pop(&self, stopping: &AtomicBool) -> Option<u64> {
        let mut ids = self.ids.locked();
        loop {
            if stopping.load(Ordering::Acquire) {
                return None;
            }
            if let Some(id) = ids.pop_front() {
                return Some(id);
            }
            ids = self.ready.wait(ids).unwrap();
        }
    }

    fn is_empty(&self) -> bool {
        self.ids.locked().is_empty()
    }

    fn stop(&self) {
        let _guard = self.ids.locked();
        self.ready.notify_all();
    }
}

/// Whether `fd` becomes readable (or hung up) within `wait`.
fn readable_within(fd: RawFd, wait: Duration) -> bool {
    let mut pollfd = libc::pollfd { fd, events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    let timeout =
        libc::timespec { tv_sec: wait.as_secs() as libc::time_t, tv_nsec: wait.subsec_nanos() as libc::c_long };
    // SAFETY: one valid pollfd and a valid timespec for the call's duration; no signal mask.
    let n = unsafe { libc::ppoll(&mut pollfd, 1, &timeout, std::ptr::null()) };
    n > 0 && pollfd.revents != 0
}

struct ServerShared<S: Service> {
    service: Arc<S>,
    limits: ServeLimits,
    name: String,
    epoll: OwnedFd,
    wake: OwnedFd,
    table: Mutex<Table<S>>,
    handshakes: Queue,
    requests: Queue,
    /// Request workers waiting on their connection (see [`LINGER`]).
    lingering: AtomicUsize,
    stopping: AtomicBool,
    refused_log: LogLimiter,
    accept_log: LogLimiter,
}

/// An event-driven server: one thread accepts and watches every idle connection (epoll, one-shot),
/// a fixed pool of workers runs handshakes and another serves requests, each request on the
/// connection it arrived on and within its deadline. An idle connection costs a descriptor and an
/// entry, never a thread; the limits decide how many there may be.
pub(crate) struct Server<S: Service> {
    shared: Arc<ServerShared<S>>,
    threads: Vec<JoinHandle<()>>,
}

impl<S: Service> Server<S> {
    /// Serve connections accepted on `listener` with `service`.
    pub fn start<L: EventListener<Stream = S::Stream>>(
        listener: L,
        name: &str,
        service: Arc<S>,
        limits: ServeLimits,
    ) -> Result<Self> {
        let cvt = |r: libc::c_int, what: &str| match r {
            -1 => Err(Error::io(what.to_string(), io::Error::last_os_error())),
            fd => Ok(fd),
        };
        // SAFETY: plain system calls; the descriptors are owned from here on.
        let epoll =
            unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC), "creating an epoll")?) };
        let wake = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK), "creating an eventfd")?)
        };
        set_nonblocking(listener.as_raw_fd()).map_err(|e| Error::io("making the listener non-blocking", e))?;
        epoll_ctl(&epoll, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), LISTENER, true)
            .map_err(|e| Error::io("watching the listener", e))?;
        epoll_ctl(&epoll, libc::EPOLL_CTL_ADD, wake.as_raw_fd(), WAKE, false)
            .map_err(|e| Error::io("watching the wake eventfd", e))?;
        let limits = ServeLimits {
            workers: limits.workers.max(1),
            handshake_workers: limits.handshake_workers.max(1),
            ..limits
        };
        let shared = Arc::new(ServerShared {
            service,
            limits,
            name: name.to_string(),
            epoll,
            wake,
            table: Mutex::new(Table { entries: HashMap::new(), next: 2, unauthenticated: 0, per_peer: HashMap::new() }),
            handshakes: Queue::new(),
            requests: Queue::new(),
            lingering: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            refused_log: LogLimiter::per_second(),
            accept_log: LogLimiter::per_second(),
        });
        let mut server = Server { shared: shared.clone(), threads: Vec::new() };
        let spawn = |name: String, run: Box<dyn FnOnce() + Send>| {
            thread::Builder::new().name(name).spawn(run).map_err(|e| Error::io("spawning a serving thread", e))
        };
        let s = shared.clone();
        server.threads.push(spawn(name.to_string(), Box::new(move || s.poll(listener)))?);
        for i in 0..shared.limits.handshake_workers {
            let s = shared.clone();
            server.threads.push(spawn(format!("{name}-hs{i}"), Box::new(move || s.run_handshakes()))?);
        }
        for i in 0..shared.limits.workers {
            let s = shared.clone();
            server.threads.push(spawn(format!("{name}-w{i}"), Box::new(move || s.run_requests()))?);
        }
        Ok(server)
    }
}

impl<S: Service> Drop for Server<S> {
    fn drop(&mut self) {
        let shared = &self.shared;
        shared.stopping.store(true, Ordering::Release);
        let one = 1u64;
        // SAFETY: an eventfd takes an 8-byte counter increment.
        unsafe { libc::write(shared.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
        shared.handshakes.stop();
        shared.requests.stop();
        {
            // Wake workers blocked mid-request; a worker removes its connection from the table
            // before closing it, so every descriptor here is still open.
            let table = shared.table.locked();
            for entry in table.entries.values() {
                // SAFETY: shutting down a socket the table keeps open.
                unsafe { libc::shutdown(entry.fd, libc::SHUT_RDWR) };
            }
        }
        let me = thread::current().id();
        for t in self.threads.drain(..) {
            // The last reference to what owns the server may be dropped on one of its workers.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
        shared.table.locked().entries.clear();
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we hold.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags == -1 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_ctl(epoll: &OwnedFd, op: libc::c_int, fd: RawFd, token: u64, oneshot: bool) -> io::Result<()> {
    let mut events = libc::EPOLLIN | libc::EPOLLRDHUP;
    if oneshot {
        events |= libc::EPOLLONESHOT;
    }
    let mut event = libc::epoll_event { events: events as u32, u64: token };
    // SAFETY: `event` is a valid epoll_event for the call's duration.
    match unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) } {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

impl<S: Service> ServerShared<S> {
    fn refused(&self, why: &str, peer: Option<Peer>) {
        if let Some(suppressed) = self.refused_log.allow() {
            tracing::warn!(server = %self.name, ?peer, suppressed, "connection refused: {why}");
        }
    }

    /// The accept and readiness loop.
    fn poll<L: EventListener<Stream = S::Stream>>(&self, listener: L) {
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut backoff = BACKOFF_MIN;
        let mut accept_paused_until: Option<Instant> = None;
        let mut last_sweep = Instant::now();
        while !self.stopping.load(Ordering::Acquire) {
            let mut timeout = SWEEP;
            if let Some(until) = accept_paused_until {
                timeout = timeout.min(until.saturating_duration_since(Instant::now()));
            }
            // SAFETY: `events` has room for its length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout.as_millis().max(1) as libc::c_int,
                )
            };
            if self.stopping.load(Ordering::Acquire) {
                break;
            }
            let now = Instant::now();
            for event in events.iter().take(n.max(0) as usize) {
                match event.u64 {
                    LISTENER => match self.accept_all(&listener) {
                        Ok(()) => {
                            backoff = BACKOFF_MIN;
                            self.rearm_listener(&listener);
                        }
                        Err(e) => {
                            // Out of descriptors or memory: pending connections stay in the
                            // backlog, and accepting again at once would only fail again.
                            if let Some(suppressed) = self.accept_log.allow() {
                                tracing::warn!(server = %self.name, error = %e, suppressed, retry_in = ?backoff,
                                    "accept failed; backing off");
                            }
                            accept_paused_until = Some(now + backoff);
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    },
                    WAKE => {}
                    id => self.ready(id, now),
                }
            }
            if accept_paused_until.is_some_and(|t| t <= Instant::now()) {
                accept_paused_until = None;
                self.rearm_listener(&listener);
            }
            if now.duration_since(last_sweep) >= SWEEP {
                last_sweep = now;
                self.sweep(now);
            }
        }
    }

    fn rearm_listener<L: EventListener>(&self, listener: &L) {
        if let Err(e) = epoll_ctl(&self.epoll, libc::EPOLL_CTL_MOD, listener.as_raw_fd(), LISTENER, true) {
            tracing::error!(server = %self.name, error = %e, "cannot watch the listener");
        }
    }

    /// Accept until the backlog is empty; `Err` for a failure that retrying at once cannot fix.
    fn accept_all<L: EventListener<Stream = S::Stream>>(&self, listener: &L) -> io::Result<()> {
        loop {
            match listener.accept_ready() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(()),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => return Err(e),
                    // The client gave up before we took it (ECONNABORTED), a signal, ...
                    _ => {}
                },
            }
        }
    }

    /// Take a new connection in, or close it at once if it is over a limit.
    fn admit(&self, stream: S::Stream, peer: Option<Peer>) {
        let limits = &self.limits;
        let mut table = self.table.locked();
        if table.entries.len() >= limits.max_connections {
            drop(table);
            return self.refused("too many connections", peer);
        }
        if let Some(p) = peer
            && table.per_peer.get(&p).copied().unwrap_or(0) >= limits.max_per_ip
        {
            drop(table);
            return self.refused("too many connections from this peer", peer);
        }
        if table.unauthenticated >= limits.max_unauthenticated {
            // The oldest connection that has sent no whole hello gives way: a flood of silent
            // connections cannot keep an honest client from authenticating.
            let oldest = table
                .entries
                .iter()
                .filter(|(_, e)| e.authenticated.is_none() && e.slot.is_some())
                .min_by_key(|(_, e)| e.accepted)
                .map(|(&id, _)| id);
            match oldest {
                Some(id) => {
                    let old = table.remove(id).expect("listed above");
                    self.refused("too many unauthenticated connections; closed the oldest", old.peer);
                    let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, old.fd, 0, false);
                }
                None => {
                    drop(table);
                    return self.refused("too many unauthenticated connections", peer);
                }
            }
        }
        let fd = stream.as_raw_fd();
        let id = table.next;
        table.next += 1;
        set_rcvlowat(fd, AUTH_HELLO_HEAD);
        if let Err(e) = epoll_ctl(&self.epoll, libc::EPOLL_CTL_ADD, fd, id, true) {
            drop(table);
            tracing::warn!(server = %self.name, error = %e, "cannot watch a connection");
            return;
        }
        table.unauthenticated += 1;
        if let Some(p) = peer {
            *table.per_peer.entry(p).or_default() += 1;
        }
        let now = Instant::now();
        let entry = Entry {
            fd,
            peer,
            accepted: now,
            authenticated: None,
            request_since: None,
            served_any: false,
            idle_since: now,
            slot: Some(Slot { stream, conn: None }),
        };
        table.entries.insert(id, entry);
    }

    /// A watched connection became readable: hand it to a worker.
    fn ready(&self, id: u64, now: Instant) {
        let mut table = self.table.locked();
        let Some(entry) = table.entries.get_mut(&id) else { return };
        if entry.slot.is_none() {
            return;
        }
        match entry.authenticated {
            None => {
                drop(table);
                self.handshakes.push(id);
            }
            Some(_) => {
                entry.request_since.get_or_insert(now);
                drop(table);
                self.requests.push(id);
            }
        }
    }

    /// Close the connections not held by a worker that are past a deadline.
    fn sweep(&self, now: Instant) {
        let limits = &self.limits;
        let request_timeout = self.service.request_timeout();
        let between = self.service.idle_between_requests();
        let mut table = self.table.locked();
        let expired: Vec<u64> = table
            .entries
            .iter()
            .filter(|(_, e)| e.slot.is_some())
            .filter(|(_, e)| match (e.authenticated, e.request_since) {
                (None, _) => now >= e.accepted + limits.handshake_timeout,
                (Some(_), Some(since)) => now >= since + request_timeout,
                (Some(at), None) if !e.served_any => now >= at + limits.idle_timeout,
                (Some(_), None) => between.is_some_and(|idle| now >= e.idle_since + idle),
            })
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(entry) = table.remove(id) {
                tracing::debug!(server = %self.name, peer = ?entry.peer, "closing a connection past its deadline");
                let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, entry.fd, 0, false);
            }
        }
    }

    /// Take a connection out of the table for a worker.
    fn take(&self, id: u64) -> Option<(Slot<S>, Instant, Option<Instant>)> {
        let mut table = self.table.locked();
        let entry = table.entries.get_mut(&id)?;
        let slot = entry.slot.take()?;
        Some((slot, entry.accepted, entry.request_since))
    }

    /// Give a connection back and watch it again, or close it. `request_since`: when the request
    /// a worker parked began (it may have begun while the worker lingered).
    fn put_back(&self, id: u64, slot: Slot<S>, next: io::Result<Next>, request_since: Option<Instant>) {
        let mut table = self.table.locked();
        let keep = matches!(next, Ok(Next::Park | Next::Idle)) && !self.stopping.load(Ordering::Acquire);
        if keep && table.entries.contains_key(&id) {
            let entry = table.entries.get_mut(&id).expect("present above");
            let newly_authenticated = entry.authenticated.is_none();
            entry.authenticated.get_or_insert_with(Instant::now);
            match next {
                Ok(Next::Idle) => {
                    entry.idle_since = Instant::now();
                    if entry.request_since.take().is_some() {
                        entry.served_any = true;
                    }
                }
                _ => {
                    if let Some(since) = request_since {
                        entry.request_since = Some(since);
                        entry.served_any = true;
                    }
                }
            }
            let fd = entry.fd;
            entry.slot = Some(slot);
            if newly_authenticated {
                table.unauthenticated -= 1;
            }
            if epoll_ctl(&self.epoll, libc::EPOLL_CTL_MOD, fd, id, true).is_ok() {
                return;
            }
        } else if let Err(e) = &next {
            tracing::debug!(server = %self.name, error = %e, "connection closed");
        }
        if let Some(entry) = table.remove(id) {
            let _ = epoll_ctl(&self.epoll, libc::EPOLL_CTL_DEL, entry.fd, 0, false);
            // Closed only once out of the table (see `Drop`).
            drop(table);
            drop(entry);
        }
    }

    fn run_handshakes(&self) {
        while let Some(id) = self.handshakes.pop(&self.stopping) {
            let Some((mut slot, accepted, _)) = self.take(id) else { continue };
            let deadline = Deadline::at(accepted + self.limits.handshake_timeout);
            // From here the worker reads with deadlines; the mark only gates the first wake-up.
            set_rcvlowat(slot.stream.as_raw_fd(), 1);
            let next = self.service.handshake(&mut slot.stream, deadline);
            let next = next.map(|conn| {
                slot.conn = Some(conn);
                Next::Idle
            });
            self.put_back(id, slot, next, None);
        }
    }

    fn run_requests(&self) {
        let mut worker = S::Worker::default();
        while let Some(id) = self.requests.pop(&self.stopping) {
            let Some((mut slot, _, since)) = self.take(id) else { continue };
            let mut since = since.unwrap_or_else(Instant::now);
            let mut lingered_into_request = false;
            let next = loop {
                let deadline = Deadline::at(since + self.service.request_timeout());
                let next = match slot.conn.as_mut() {
                    Some(conn) => self.service.readable(&mut slot.stream, conn, &mut worker, deadline),
                    None => Ok(Next::Close),
                };
                let wait_until = match next {
                    Ok(Next::Idle) => None,
                    Ok(Next::Park) => Some(deadline),
                    _ => break next,
                };
                if !self.linger(slot.stream.as_raw_fd(), wait_until) {
                    break next;
                }
                if wait_until.is_none() {
                    // The next request has begun on this worker.
                    since = Instant::now();
                    lingered_into_request = true;
                }
            };
            let parked_since = (matches!(next, Ok(Next::Park)) && lingered_into_request).then_some(since);
            self.put_back(id, slot, next, parked_since);
        }
    }

    /// Wait up to [`LINGER`] (and not past `until`) for more bytes on a connection this worker
    /// holds: only while no other connection is queued, and never with every worker waiting, so
    /// a connection that becomes ready meanwhile always finds a worker.
    fn linger(&self, fd: RawFd, until: Option<Deadline>) -> bool {
        if self.stopping.load(Ordering::Acquire) || !self.requests.is_empty() {
            return false;
        }
        let wait = until.map_or(LINGER, |d| d.remaining().min(LINGER));
        if wait.is_zero() {
            return false;
        }
        if self.lingering.fetch_add(1, Ordering::AcqRel) + 1 >= self.limits.workers {
            self.lingering.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let ready = readable_within(fd, wait);
        self.lingering.fetch_sub(1, Ordering::AcqRel);
        ready
    }
}
