//! The memory owner's side of the TCP transport: accepts connections and serves READ, WRITE and
//! NOTIFY requests against the registered regions. Every descriptor is checked against the key
//! table (key, range) before a byte moves; nothing from the wire is trusted.

use std::io::{self, IoSlice};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use super::wire;
use crate::auth::{Auth, AuthError, Channel};
use crate::deadline::Deadline;
use crate::limits::{Budget, Reservation};
use crate::memory::MemKind;
use crate::net::{DeadlineStream, Next, Service, received};
use crate::tls::PeerStream;
use crate::transport::frame::{self, FrameKind, Header, WireDesc, invalid};
use crate::transport::keys::{Cut, KeyTable};
use crate::transport::staging::{Bounce, Segment, StageError, Stager};
use crate::transport::{Notification, NotificationQueue, RejectReason};

/// Descriptors are read in pieces of this many bytes, so that memory follows the bytes that have
/// arrived rather than the count a header announced.
const DESC_CHUNK: usize = 1024 * frame::DESC_LEN;

/// What the serving threads share.
pub(super) struct TargetShared {
    auth: Auth,
    pub keys: KeyTable,
    pub notifications: Arc<NotificationQueue>,
    /// The longest a request may take from its first byte to its answer's last; past it the
    /// connection is closed (which releases the regions it holds, so deregistration never waits on
    /// a stopped initiator for longer).
    request_timeout: Duration,
    stager: Option<Arc<Stager>>,
    /// Bytes held by requests still being read, over all connections.
    budget: Arc<Budget>,
}

impl TargetShared {
    pub fn new(
        auth: Auth,
        notifications: Arc<NotificationQueue>,
        request_timeout: Duration,
        stager: Option<Arc<Stager>>,
        request_bytes: u64,
    ) -> Self {
        TargetShared {
            auth,
            keys: KeyTable::default(),
            notifications,
            request_timeout,
            stager,
            budget: Budget::new(request_bytes),
        }
    }
}

/// An authenticated connection: the initiator's name and the request being read.
pub(super) struct Conn {
    from: String,
    reading: Reading,
}

/// How far the request being read has arrived. Everything before the payload is read as it
/// arrives, without holding a thread; its bytes count against the transport's budget.
enum Reading {
    Header { buf: [u8; frame::HEADER_LEN], got: usize },
    Descs { header: Header, kind: FrameKind, buf: Vec<u8>, held: Reservation },
    Notification { buf: Vec<u8>, got: usize, _held: Reservation },
}

impl Reading {
    fn start() -> Reading {
        Reading::Header { buf: [0; frame::HEADER_LEN], got: 0 }
    }
}

/// A serving thread's scratch: the descriptors of the request it serves, and bounce buffers for
/// staged requests (allocated on the first one).
#[derive(Default)]
pub(super) struct Worker {
    descs: Vec<WireDesc>,
    bounce: Option<Bounce>,
}

impl Service for TargetShared {
    type Stream = PeerStream;
    type Conn = Conn;
    type Worker = Worker;

    fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    fn handshake(&self, stream: &mut PeerStream, deadline: Deadline) -> io::Result<Conn> {
        stream.socket().set_nodelay(true)?;
        super::set_keepalive(stream.socket())?;
        // Nothing but the handshake is read from a connection that has not proven the secret.
        self.auth.accept_stream(stream, Channel::Tcp, deadline).map_err(|e| match e {
            AuthError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
        })?;
        let from = accept_hello(stream, deadline)?;
        Ok(Conn { from, reading: Reading::start() })
    }

    fn readable(
        &self,
        stream: &mut PeerStream,
        conn: &mut Conn,
        worker: &mut Worker,
        deadline: Deadline,
    ) -> io::Result<Next> {
        loop {
            match &mut conn.reading {
                Reading::Header { buf, got } => {
                    let started = *got > 0;
                    if let Some(next) = received(stream.recv_ready(&mut buf[*got..], deadline), got, started)? {
                        return Ok(next);
                    }
                    if *got < frame::HEADER_LEN {
                        continue;
                    }
                    let header = Header::decode(buf);
                    let Some(kind) = FrameKind::from_wire(header.tag) else {
                        return Err(invalid(format!("unknown request kind {}", header.tag)));
                    };
                    let count = header.count as usize;
                    if count > frame::MAX_DESCS {
                        // The stream cannot be resynchronised cheaply; answer and close.
                        respond(stream, Err((0, RejectReason::TooLarge)), &[], deadline)?;
                        return Err(invalid(format!("{count} descriptors in one request")));
                    }
                    conn.reading = match kind {
                        FrameKind::Notify => {
                            if count != 0 || header.payload_len > frame::MAX_NOTIFICATION {
                                respond(stream, Err((0, RejectReason::TooLarge)), &[], deadline)?;
                                return Err(invalid("oversized notification"));
                            }
                            let len = header.payload_len as usize;
                            let mut held = self.budget.reservation();
                            if !held.grow(len as u64) {
                                return busy_close(stream, frame::BUSY_REQUEST_BYTES, deadline);
                            }
                            Reading::Notification { buf: vec![0; len], got: 0, _held: held }
                        }
                        _ => Reading::Descs { header, kind, buf: Vec::new(), held: self.budget.reservation() },
                    };
                }
                Reading::Descs { header, kind, buf, held } => {
                    let want = header.count as usize * frame::DESC_LEN;
                    if buf.len() < want {
                        let start = buf.len();
                        let chunk = (want - start).min(DESC_CHUNK);
                        if buf.capacity() < start + chunk {
                            let more = (start + chunk).max(2 * buf.capacity()).min(want);
                            if !held.grow((more - buf.capacity()) as u64) {
                                return busy_close(stream, frame::BUSY_REQUEST_BYTES, deadline);
                            }
                            buf.reserve_exact(more - start);
                        }
                        buf.resize(start + chunk, 0);
                        let mut got = start;
                        let next = received(stream.recv_ready(&mut buf[start..], deadline), &mut got, true);
                        buf.truncate(got);
                        if let Some(next) = next? {
                            return Ok(next);
                        }
                        continue;
                    }
                    let (header, kind) = (*header, *kind);
                    worker.descs.clear();
                    worker.descs.extend(buf.chunks_exact(frame::DESC_LEN).map(WireDesc::decode));
                    conn.reading = Reading::start();
                    let descs = std::mem::take(&mut worker.descs);
                    let served = match kind {
                        FrameKind::Read => serve_read(stream, self, &descs, &mut worker.bounce, deadline),
                        _ => serve_write(stream, self, &descs, header.payload_len, &mut worker.bounce, deadline),
                    };
                    worker.descs = descs;
                    // A request of many descriptors leaves no large buffer behind on the worker.
                    if worker.descs.capacity() > DESC_CHUNK {
                        worker.descs = Vec::new();
                    }
                    served?;
                    return Ok(Next::Idle);
                }
                Reading::Notification { buf, got, .. } => {
                    if *got < buf.len() {
                        if let Some(next) = received(stream.recv_ready(&mut buf[*got..], deadline), got, true)? {
                            return Ok(next);
                        }
                        continue;
                    }
                    let data = std::mem::take(buf);
                    conn.reading = Reading::start();
                    // Refused in step when the queue is full: the stream stays usable.
                    let note = Notification { from: conn.from.clone(), data };
                    self.notifications.deliver(note, |room| {
                        let answered = match room {
                            true => respond(stream, Ok(0), &[], deadline),
                            false => respond_busy(stream, frame::BUSY_NOTIFICATIONS, deadline),
                        };
                        (answered.is_ok(), answered)
                    })?;
                    return Ok(Next::Idle);
                }
            }
        }
    }
}

/// Refuse a request for a limit and close: its remaining bytes were not read, so the stream is out
/// of step.
fn busy_close(stream: &mut PeerStream, what: u32, deadline: Deadline) -> io::Result<Next> {
    let _ = respond_busy(stream, what, deadline);
    Ok(Next::Close)
}

fn respond_busy(stream: &mut PeerStream, what: u32, deadline: Deadline) -> io::Result<()> {
    let header = Header { tag: frame::STATUS_BUSY, count: what, payload_len: 0 };
    stream.write_all_by(&header.encode(), deadline)
}

/// Reads the initiator's hello; returns its agent name.
fn accept_hello(stream: &mut PeerStream, deadline: Deadline) -> io::Result<String> {
    let mut head = [0u8; 8];
    stream.read_exact_by(&mut head, deadline)?;
    if head[..4] != wire::MAGIC {
        return Err(invalid("not a kvferry tcp connection"));
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != wire::VERSION {
        stream.write_all_by(&wire::encode_hello_ack(wire::HELLO_BAD_VERSION), deadline)?;
        return Err(invalid(format!("peer speaks wire version {version}, this agent {}", wire::VERSION)));
    }
    let name_len = u16::from_le_bytes([head[6], head[7]]) as usize;
    if name_len > frame::MAX_NAME {
        return Err(invalid("agent name too long"));
    }
    let mut name = vec![0u8; name_len];
    stream.read_exact_by(&mut name, deadline)?;
    let name = String::from_utf8(name).map_err(|_| invalid("agent name is not UTF-8"))?;
    stream.write_all_by(&wire::encode_hello_ack(wire::HELLO_OK), deadline)?;
    Ok(name)
}

fn respond(
    stream: &mut PeerStream,
    status: Result<u64, (u32, RejectReason)>,
    payload: &[IoSlice<'_>],
    deadline: Deadline,
) -> io::Result<()> {
    let header = match status {
        Ok(payload_len) => Header { tag: 0, count: 0, payload_len },
        Err((index, reason)) => Header { tag: reason.to_wire(), count: index, payload_len: 0 },
    };
    let encoded = header.encode();
    let mut bufs = Vec::with_capacity(1 + payload.len());
    bufs.push(IoSlice::new(&encoded));
    bufs.extend_from_slice(payload);
    frame::write_all_vectored_by(stream, &mut bufs, deadline)
}

/// The staging path for a request, when it names memory the transport stages: the stager and the
/// payload's segments.
fn staged<'a>(shared: &'a TargetShared, descs: &[WireDesc], kinds: &[MemKind]) -> Option<(&'a Stager, Vec<Segment>)> {
    let stager = shared.stager.as_deref()?;
    if !kinds.iter().any(|&k| stager.stages(k)) {
        return None;
    }
    let segments = descs.iter().zip(kinds).map(|(d, &kind)| Segment { addr: d.addr, len: d.len, kind }).collect();
    Some((stager, segments))
}

/// A device failure mid-payload cannot be answered in step with the stream: close the connection
/// (the initiator sees it fail) and say why here.
fn staging_failed(e: StageError) -> io::Error {
    match e {
        StageError::Io(e) => e,
        StageError::Device(e) => {
            tracing::warn!(error = %e, "tcp transport: staging through host memory failed; closing the connection");
            io::Error::other(e.to_string())
        }
    }
}

/// Shuts the request's connection down when its region is deregistered. The raw descriptor stays
/// valid for as long as the cut is registered: the request ends before its connection is closed.
fn cut_of(stream: &PeerStream) -> Cut {
    let fd = stream.as_raw_fd();
    // SAFETY: shutdown(2) on a socket this connection still owns (see above).
    Arc::new(move || unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    })
}

fn serve_read(
    stream: &mut PeerStream,
    shared: &TargetShared,
    descs: &[WireDesc],
    bounce: &mut Option<Bounce>,
    deadline: Deadline,
) -> io::Result<()> {
    match shared.keys.resolve(descs, &cut_of(stream)) {
        Err(rejection) => respond(stream, Err(rejection), &[], deadline),
        Ok((_held, kinds)) => {
            let total = descs.iter().map(|d| d.len).sum();
            if let Some((stager, segments)) = staged(shared, descs, &kinds) {
                respond(stream, Ok(total), &[], deadline)?;
                return stager
                    .send(bounce, &segments, deadline, |chunk| stream.write_all_by(chunk, deadline))
                    .map_err(staging_failed);
            }
            // Zero-copy: the kernel reads straight from the registered memory, which `_held` keeps
            // registered until the send is done (under TLS, rustls encrypts from it: one copy).
            let payload = unsafe { frame::slices(descs.iter().map(|d| (d.addr, d.len))) };
            respond(stream, Ok(total), &payload, deadline)
        }
    }
}

fn serve_write(
    stream: &mut PeerStream,
    shared: &TargetShared,
    descs: &[WireDesc],
    payload_len: u64,
    bounce: &mut Option<Bounce>,
    deadline: Deadline,
) -> io::Result<()> {
    let described: u64 = descs.iter().fold(0u64, |acc, d| acc.saturating_add(d.len));
    if described != payload_len {
        return Err(invalid(format!("write carries {payload_len} bytes but describes {described}")));
    }
    match shared.keys.resolve(descs, &cut_of(stream)) {
        Err(rejection) => {
            drain(stream, payload_len, deadline)?;
            respond(stream, Err(rejection), &[], deadline)
        }
        Ok((_held, kinds)) => {
            if let Some((stager, segments)) = staged(shared, descs, &kinds) {
                stager
                    .receive(bounce, &segments, deadline, |chunk| stream.read_exact_by(chunk, deadline))
                    .map_err(staging_failed)?;
                return respond(stream, Ok(0), &[], deadline);
            }
            // Zero-copy: the kernel writes straight into the registered memory (under TLS, rustls
            // decrypts into its buffer and copies from there into it: one copy).
            let mut dst = unsafe { frame::slices_mut(descs.iter().map(|d| (d.addr, d.len))) };
            frame::read_exact_vectored_by(stream, &mut dst, deadline)?;
            respond(stream, Ok(0), &[], deadline)
        }
    }
}

/// Discard a rejected request's payload so the stream stays in step. Only the error path copies.
fn drain(stream: &mut PeerStream, mut len: u64, deadline: Deadline) -> io::Result<()> {
    let mut sink = [0u8; 64 * 1024];
    while len > 0 {
        let n = len.min(sink.len() as u64) as usize;
        stream.read_exact_by(&mut sink[..n], deadline)?;
        len -= n as u64;
    }
    Ok(())
}
