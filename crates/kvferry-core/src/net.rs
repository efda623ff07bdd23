//! A listening socket served by a thread that stops when its [`Acceptor`] is dropped: TCP for the
//! transport and the side channel, Unix for the shared-memory transport.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::deadline::Deadline;
use crate::error::{Error, Result};

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

/// A listener an [`Acceptor`] can serve.
pub(crate) trait Listener: Send + 'static {
    type Stream: Send + 'static;
    type Addr: Clone + Send + 'static;
    fn accept_one(&self) -> io::Result<Self::Stream>;
    fn addr(&self) -> io::Result<Self::Addr>;
    /// Connect to the listener at `addr`, so that an `accept` blocked on it returns.
    fn wake(addr: &Self::Addr) -> bool;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Addr = SocketAddr;

    fn accept_one(&self) -> io::Result<TcpStream> {
        self.accept().map(|(s, _)| s)
    }

    fn addr(&self) -> io::Result<SocketAddr> {
        self.local_addr()
    }

    fn wake(addr: &SocketAddr) -> bool {
        let mut wake = *addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        TcpStream::connect_timeout(&wake, Duration::from_secs(1)).is_ok()
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Addr = UnixAddr;

    fn accept_one(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }

    fn addr(&self) -> io::Result<UnixAddr> {
        self.local_addr()
    }

    fn wake(addr: &UnixAddr) -> bool {
        UnixStream::connect_addr(addr).is_ok()
    }
}

pub(crate) struct Acceptor<L: Listener = TcpListener> {
    addr: L::Addr,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor<TcpListener> {
    /// Bind `listen` and serve it (see [`Acceptor::serve`]).
    pub fn spawn(listen: SocketAddr, name: &str, serve: impl Fn(TcpStream) + Send + Sync + 'static) -> Result<Self> {
        let listener = TcpListener::bind(listen).map_err(|e| Error::io(format!("binding {listen}"), e))?;
        Acceptor::serve(listener, name, serve)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl<L: Listener> Acceptor<L> {
    /// Hand every connection accepted on `listener` to `serve` on a thread of its own, so a slow or
    /// stuck peer never holds up the others.
    pub fn serve(listener: L, name: &str, serve: impl Fn(L::Stream) + Send + Sync + 'static) -> Result<Self> {
        let addr = listener.addr().map_err(|e| Error::io("reading the listen address", e))?;
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let serve = Arc::new(serve);
        let conn_name = format!("{name}-conn");
        let thread = thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                loop {
                    let stream = listener.accept_one();
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    match stream {
                        Ok(stream) => {
                            let serve = serve.clone();
                            if let Err(e) = thread::Builder::new().name(conn_name.clone()).spawn(move || serve(stream))
                            {
                                tracing::error!(error = %e, "cannot spawn a connection thread");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "accept failed"),
                    }
                }
            })
            .map_err(|e| Error::io("spawning an accept thread", e))?;
        Ok(Acceptor { addr, stopping, thread: Some(thread) })
    }
}

impl<L: Listener> Drop for Acceptor<L> {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // `accept` has no timeout: a connection of our own wakes it to see the flag.
        if L::wake(&self.addr)
            && let Some(t) = self.thread.take()
        {
            let _ = t.join();
        }
    }
}

/// The connections a server is serving, so that all of them can be closed when it goes away
/// (otherwise they would outlive it, blocked in `read`).
#[derive(Default)]
pub(crate) struct Connections {
    open: Mutex<HashMap<u64, OwnedFd>>,
    next: AtomicU64,
}

impl Connections {
    /// Run `serve` on `stream`; [`shutdown_all`](Self::shutdown_all) can close it meanwhile.
    pub fn serve<S: AsFd>(&self, stream: S, serve: impl FnOnce(S)) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(handle) = stream.as_fd().try_clone_to_owned() {
            self.open.lock().unwrap().insert(id, handle);
        }
        serve(stream);
        self.open.lock().unwrap().remove(&id);
    }

    pub fn shutdown_all(&self) {
        for (_, handle) in self.open.lock().unwrap().drain() {
            // SAFETY: shutting down a socket we hold a descriptor of; its owner sees end of file.
            unsafe { libc::shutdown(handle.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
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
