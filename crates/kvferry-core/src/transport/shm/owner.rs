//! The memory owner's side of the shm transport. Every connection first proves the cluster
//! secret; only then does it get a hello answer (pid, probe, a lease file of its own). The owner
//! copies every byte that lands in its memory itself: a WRITE names the initiator's sources, and
//! the owner checks key and range and copies them (`pull`), with `pread` from a memfd the
//! initiator shared on the connection (`SHARE`, seals checked, kept until `UNSHARE` or the
//! connection's end), or with `process_vm_readv` from the initiator's address space; large
//! copies are split over the host device's copy pool. READs are copied by the initiator (from the
//! owner's file or cross-memory) after a grant (`MAP`: checks the key, answers with the
//! registered range, the connection's lease slot and, for shareable memory, the file);
//! deregistration revokes that slot in every connection's lease file.
//!
//! Connections are served by [`crate::net::Server`]: a fixed set of threads whatever their number.
//! A request is read as it arrives without holding a thread, its bytes counted against the
//! transport's budget; a thread serves it once it is whole.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::ShmConfig;
use super::lease::Leases;
use super::pull::{Pull, Source, probe_cross_memory, pull_sharing};
use super::wire::{self, WriteOp};
use crate::auth::{Auth, AuthError, Channel};
use crate::deadline::Deadline;
use crate::limits::{Budget, Reservation};
use crate::memory::host::{HostDevice, PeerFile};
use crate::net::{DeadlineStream, Next, Service, peer_cred, received, recv_ready};
use crate::sync::Locked;
use crate::transport::frame::{self, Header, invalid};
use crate::transport::frame::{BUSY_NOTIFICATIONS, BUSY_REQUEST_BYTES, STATUS_BUSY};
use crate::transport::keys::{KeyTable, KeyUse};
use crate::transport::{Notification, NotificationQueue, RejectReason};

/// Read with `process_vm_readv`, by initiators to check that cross-memory attach reaches the
/// owner, and by owners to check that they can pull an initiator's WRITEs.
pub(super) static PROBE: AtomicU64 = AtomicU64::new(wire::PROBE_MAGIC);

/// A request's body is read in pieces of this size, so memory follows the bytes that arrived
/// rather than the length a header announced.
const READ_CHUNK: usize = 64 << 10;

/// The lease file of every open connection, by connection id: deregistration revokes in each.
#[derive(Default)]
pub(super) struct LeaseTable {
    open: Mutex<HashMap<u64, Arc<Leases>>>,
    next: AtomicU64,
}

/// Bytes the owner copied for WRITEs, by how it reached the source.
#[derive(Default)]
pub(super) struct Pulled {
    /// From the initiators' shared files.
    pub mapped: AtomicU64,
    /// With `process_vm_readv`.
    pub cross_memory: AtomicU64,
}

/// A source an initiator shared on its connection.
struct SharedSource {
    file: PeerFile,
}

pub(super) struct OwnerShared {
    pub auth: Auth,
    pub keys: KeyTable,
    leases: Arc<LeaseTable>,
    notifications: Arc<NotificationQueue>,
    /// Longest a request may take from its first byte to its answer's last.
    request_timeout: Duration,
    /// Longest a connection may stay idle between requests before it is closed.
    idle_timeout: Duration,
    /// Bytes held by requests still being read, over all connections.
    budget: Arc<Budget>,
    /// Its pool pulls shares of large WRITEs next to the serving thread.
    device: Arc<HostDevice>,
    /// Sources one connection may share at once.
    max_sources: usize,
    pub pulled: Pulled,
}

impl OwnerShared {
    pub fn new(auth: Auth, notifications: Arc<NotificationQueue>, config: &ShmConfig, device: Arc<HostDevice>) -> Self {
        OwnerShared {
            auth,
            keys: KeyTable::default(),
            leases: Arc::default(),
            notifications,
            request_timeout: config.request_timeout,
            idle_timeout: config.idle_timeout,
            budget: Budget::new(config.limits.request_bytes),
            device,
            max_sources: config.max_shared_sources,
            pulled: Pulled::default(),
        }
    }

    /// Deregister: no new grant or pull first (waiting only for our own copies in flight, which
    /// do not depend on the peer running), then revoke the key in every connection's lease file.
    pub fn deregister(&self, key: u128) {
        self.keys.remove(key);
        let leases: Vec<Arc<Leases>> = self.leases.open.locked().values().cloned().collect();
        for l in leases {
            l.revoke(key);
        }
    }
}

/// An authenticated connection: who it is, its lease file (listed for revocation while the
/// connection lives), the sources its initiator shared, and the request being read.
pub(super) struct Conn {
    from: String,
    /// The initiator's pid as the kernel reported it at connect.
    pid: u32,
    leases: Arc<Leases>,
    id: u64,
    table: Arc<LeaseTable>,
    /// Held until `UNSHARE` or the connection's end, by the initiator's source id.
    sources: HashMap<u64, SharedSource>,
    /// The descriptor that came with the request being read (a `SHARE`'s file).
    passed: Option<OwnedFd>,
    reading: Reading,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.table.open.locked().remove(&self.id);
    }
}

/// How far the request being read has arrived.
enum Reading {
    Header { buf: [u8; frame::HEADER_LEN], got: usize },
    Body { header: Header, want: usize, buf: Vec<u8>, held: Reservation },
}

impl Reading {
    fn start() -> Reading {
        Reading::Header { buf: [0; frame::HEADER_LEN], got: 0 }
    }
}

impl Service for OwnerShared {
    type Stream = UnixStream;
    type Conn = Conn;
    type Worker = ();

    fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    fn idle_between_requests(&self) -> Option<Duration> {
        // A peer that went away without closing, or stays silent, costs a descriptor and a lease
        // file for at most this long.
        Some(self.idle_timeout)
    }

    fn handshake(&self, stream: &mut UnixStream, deadline: Deadline) -> io::Result<Conn> {
        // Nothing but the handshake is read from a connection that has not proven the secret.
        self.auth.server(stream, Channel::Shm, deadline).map_err(|e| match e {
            AuthError::Io(e) => e,
            other => io::Error::new(io::ErrorKind::PermissionDenied, other.to_string()),
        })?;
        let leases = Arc::new(Leases::new().map_err(io::Error::other)?);
        let (from, pid) = accept_hello(stream, &leases, deadline)?;
        let id = self.leases.next.fetch_add(1, Ordering::Relaxed);
        self.leases.open.locked().insert(id, leases.clone());
        let table = self.leases.clone();
        Ok(Conn { from, pid, leases, id, table, sources: HashMap::new(), passed: None, reading: Reading::start() })
    }

    fn readable(&self, stream: &mut UnixStream, conn: &mut Conn, _: &mut (), deadline: Deadline) -> io::Result<Next> {
        loop {
            match &mut conn.reading {
                Reading::Header { buf, got } => {
                    let started = *got > 0;
                    // Read with room for a descriptor: one that came with a SHARE must not be lost.
                    let read = match wire::recv_ready_with_fd(stream, &mut buf[*got..]) {
                        Ok((n, fd)) => {
                            if fd.is_some() && (started || conn.passed.is_some()) {
                                return Err(invalid("a descriptor came inside a request"));
                            }
                            conn.passed = conn.passed.take().or(fd);
                            Ok(n)
                        }
                        Err(e) => Err(e),
                    };
                    if let Some(next) = received(read, got, started)? {
                        return Ok(next);
                    }
                    if *got < frame::HEADER_LEN {
                        continue;
                    }
                    let header = Header::decode(buf);
                    if conn.passed.is_some() && header.tag != wire::SHARE {
                        return Err(invalid("a descriptor came with a request that takes none"));
                    }
                    let fixed = |len: usize| match header.payload_len == len as u64 {
                        true => Ok(len),
                        false => Err(invalid("malformed share request")),
                    };
                    let want = match header.tag {
                        wire::MAP => 16,
                        wire::SHARE => fixed(wire::SHARE_LEN)?,
                        wire::UNSHARE => fixed(wire::UNSHARE_LEN)?,
                        wire::WRITE => {
                            let count = header.count as usize;
                            let ops = count * wire::WRITE_OP_LEN;
                            if count == 0 || count > wire::MAX_WRITE_OPS || header.payload_len != ops as u64 {
                                return Err(invalid("malformed write request"));
                            }
                            ops
                        }
                        wire::NOTIFY => {
                            if header.payload_len > frame::MAX_NOTIFICATION {
                                respond(stream, RejectReason::TooLarge.to_wire(), 0, 0, deadline)?;
                                return Err(invalid("oversized notification"));
                            }
                            header.payload_len as usize
                        }
                        other => return Err(invalid(format!("unknown request kind {other}"))),
                    };
                    let (buf, held) = (Vec::new(), self.budget.reservation());
                    conn.reading = Reading::Body { header, want, buf, held };
                }
                Reading::Body { want, buf, held, .. } if buf.len() < *want => {
                    let start = buf.len();
                    let end = (*want).min(start + READ_CHUNK);
                    if buf.capacity() < end {
                        if !held.grow((end - buf.capacity()) as u64) {
                            // The rest of the request was not read: the stream is out of step.
                            let _ = respond(stream, STATUS_BUSY, BUSY_REQUEST_BYTES, 0, deadline);
                            return Ok(Next::Close);
                        }
                        buf.reserve_exact(end - start);
                    }
                    buf.resize(end, 0);
                    let mut got = start;
                    let next = received(recv_ready(stream, &mut buf[start..]), &mut got, true);
                    buf.truncate(got);
                    if let Some(next) = next? {
                        return Ok(next);
                    }
                }
                Reading::Body { .. } => {
                    let Reading::Body { header, buf, .. } = std::mem::replace(&mut conn.reading, Reading::start())
                    else {
                        unreachable!("matched above")
                    };
                    match header.tag {
                        wire::MAP => {
                            let key = u128::from_le_bytes(buf[..16].try_into().expect("16 bytes"));
                            serve_map(stream, self, &conn.leases, key, deadline)?;
                        }
                        wire::WRITE => serve_write(stream, self, &buf, conn, deadline)?,
                        wire::SHARE => {
                            let status = share(self, &mut conn.sources, &buf, conn.passed.take());
                            respond(stream, status, 0, 0, deadline)?;
                        }
                        wire::UNSHARE => {
                            let id = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                            let status = match conn.sources.remove(&id) {
                                Some(_) => 0,
                                None => RejectReason::UnknownKey.to_wire(),
                            };
                            respond(stream, status, 0, 0, deadline)?;
                        }
                        _ => serve_notify(stream, self, &conn.from, buf, deadline)?,
                    }
                    // The next request, if one has come already, wakes the connection again.
                    return Ok(Next::Idle);
                }
            }
        }
    }
}

/// Answer with a header: one non-blocking send, which a Unix socket with room takes whole;
/// by the deadline otherwise.
fn respond(stream: &mut UnixStream, tag: u8, count: u32, payload_len: u64, deadline: Deadline) -> io::Result<()> {
    let head = Header { tag, count, payload_len }.encode();
    // SAFETY: `head` is valid for reads of its length.
    let sent = unsafe {
        libc::send(stream.as_raw_fd(), head.as_ptr().cast(), head.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
    let sent = if sent < 0 { 0 } else { sent as usize };
    if sent == head.len() {
        return Ok(());
    }
    stream.write_all_by(&head[sent..], deadline)
}

/// Authenticate, then answer the hello; returns the peer's name and pid.
fn accept_hello(stream: &mut UnixStream, leases: &Leases, deadline: Deadline) -> io::Result<(String, u32)> {
    let mut head = [0u8; frame::HEADER_LEN];
    stream.read_exact_by(&mut head, deadline)?;
    let hello = Header::decode(&head);
    if hello.tag != wire::HELLO {
        return Err(invalid("not a kvferry shm connection"));
    }
    if hello.count != wire::VERSION {
        respond(stream, wire::STATUS_BAD_VERSION, wire::VERSION, 0, deadline)?;
        return Err(invalid(format!("peer speaks shm version {}, this agent {}", hello.count, wire::VERSION)));
    }
    if hello.payload_len > frame::MAX_NAME as u64 {
        return Err(invalid("agent name too long"));
    }
    let mut probe = [0u8; 8];
    stream.read_exact_by(&mut probe, deadline)?;
    let mut name = vec![0u8; hello.payload_len as usize];
    stream.read_exact_by(&mut name, deadline)?;
    let name = String::from_utf8(name).map_err(|_| invalid("agent name is not UTF-8"))?;
    let pid = peer_cred(stream)?.pid as u32;
    // Whether we can pull this peer's WRITEs: read the word it names in its own memory.
    let can_pull = probe_cross_memory(pid, u64::from_le_bytes(probe)).is_ok();
    let flags = if can_pull { wire::FLAG_CAN_PULL } else { 0 };
    let mut ack = Header { tag: 0, count: std::process::id(), payload_len: PROBE.as_ptr() as u64 }.encode().to_vec();
    ack.extend_from_slice(&flags.to_le_bytes());
    stream.set_timeouts(crate::net::time_left(deadline)?)?;
    wire::send_with_fd(stream, &ack, leases.fd())?;
    Ok((name, pid))
}

/// Queue a notification as every transport does ([`NotificationQueue::deliver`]).
///
/// [`NotificationQueue::deliver`]: crate::transport::NotificationQueue::deliver
fn serve_notify(
    stream: &mut UnixStream,
    shared: &OwnerShared,
    from: &str,
    data: Vec<u8>,
    deadline: Deadline,
) -> io::Result<()> {
    shared.notifications.deliver(Notification { from: from.to_string(), data }, |room| {
        let answered = match room {
            true => respond(stream, 0, 0, 0, deadline),
            false => respond(stream, STATUS_BUSY, BUSY_NOTIFICATIONS, 0, deadline),
        };
        (answered.is_ok(), answered)
    })
}

/// Grant a READ access to a registration, after checking its key: its range, this connection's
/// lease slot for it, and the memfd behind it when it has one.
fn serve_map(
    stream: &mut UnixStream,
    shared: &OwnerShared,
    leases: &Leases,
    key: u128,
    deadline: Deadline,
) -> io::Result<()> {
    // The entry is held until the slot is open: deregistration waits for it, then revokes.
    let entry = shared.keys.get(key);
    let slot = entry.as_ref().map(|_| leases.open(key));
    let (Some(entry), Some(Some(slot))) = (entry, slot) else {
        let reason = if slot == Some(None) { RejectReason::TooLarge } else { RejectReason::UnknownKey };
        let mut refusal = Header { tag: reason.to_wire(), count: 0, payload_len: 16 }.encode().to_vec();
        refusal.resize(wire::MAP_ACK_LEN, 0);
        return stream.write_all_by(&refusal, deadline);
    };
    let mut ack = Header { tag: 0, count: slot, payload_len: 16 }.encode().to_vec();
    ack.extend_from_slice(&entry.region.addr.to_le_bytes());
    ack.extend_from_slice(&entry.region.len.to_le_bytes());
    stream.set_timeouts(crate::net::time_left(deadline)?)?;
    match entry.memory().and_then(|m| m.share_fd()) {
        Some(fd) => wire::send_with_fd(stream, &ack, fd),
        None => stream.write_all_by(&ack, deadline),
    }
}

/// Keep a source the initiator shares (`SHARE`): within the connection's count, and only a file that cannot shrink under our reads (see [`PeerFile::open`]).
/// Returns the answer's status.
fn share(shared: &OwnerShared, sources: &mut HashMap<u64, SharedSource>, body: &[u8], fd: Option<OwnedFd>) -> u8 {
    let word = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8 bytes"));
    let (id, len) = (word(0), word(8));
    let Some(fd) = fd else { return wire::STATUS_BAD_SOURCE };
    if id == wire::FROM_ADDRESS || sources.contains_key(&id) {
        return wire::STATUS_BAD_SOURCE;
    }
    if sources.len() >= shared.max_sources {
        return RejectReason::TooLarge.to_wire();
    }
    let Ok(file) = PeerFile::open(fd, len) else { return wire::STATUS_BAD_SOURCE };
    sources.insert(id, SharedSource { file });
    0
}

/// Check every op of a WRITE against the registrations and the connection's shared sources, then
/// copy the initiator's source bytes into our memory ourselves. The entries are held during the
/// copy, so deregistration waits for it (our own copy, which does not depend on the initiator
/// running: a stopped process's pages and a file are read all the same) and no later copy starts.
fn serve_write(
    stream: &mut UnixStream,
    shared: &OwnerShared,
    body: &[u8],
    conn: &Conn,
    deadline: Deadline,
) -> io::Result<()> {
    let ops: Vec<WriteOp> =
        body.chunks_exact(wire::WRITE_OP_LEN).map(|c| WriteOp::decode(c.try_into().expect("op length"))).collect();
    let checked = match check_write(shared, &conn.sources, conn.pid, &ops) {
        Ok(checked) => checked,
        Err((index, reason)) => return respond(stream, reason.to_wire(), index, 0, deadline),
    };
    let bytes = |file: bool| {
        let of = |p: &&Pull| matches!(p.source, Source::File(_)) == file;
        checked.pulls.iter().filter(of).fold(0u64, |acc, p| acc.saturating_add(p.len))
    };
    let (file_bytes, cross_bytes) = (bytes(true), bytes(false));
    // SAFETY: every destination lies in a registration held until the copies are done, and
    // distinct ops of one WRITE are the initiator's to keep apart (it can only hurt its own
    // transfer); every file lies in `conn.sources`, which this call does not let go of.
    let pulled = unsafe { pull_sharing(&shared.device, checked.pulls) };
    drop(checked.held);
    match pulled {
        Ok(()) => {
            shared.pulled.mapped.fetch_add(file_bytes, Ordering::Relaxed);
            shared.pulled.cross_memory.fetch_add(cross_bytes, Ordering::Relaxed);
            respond(stream, 0, 0, 0, deadline)
        }
        Err((index, e)) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO) as u64;
            respond(stream, wire::STATUS_PULL_FAILED, index as u32, errno, deadline)
        }
    }
}

/// A WRITE's ops, checked: the entries they use (held for the copy) and one pull per op, in the
/// request's order.
#[derive(Default)]
struct Checked {
    held: Vec<KeyUse>,
    pulls: Vec<Pull>,
}

/// Check a WRITE's ops: the destination against the registrations, the source, when shared,
/// against its file; the first refused and why.
fn check_write(
    shared: &OwnerShared,
    sources: &HashMap<u64, SharedSource>,
    pid: u32,
    ops: &[WriteOp],
) -> Result<Checked, (u32, RejectReason)> {
    let mut held: Vec<(u128, KeyUse)> = Vec::new();
    let mut checked = Checked::default();
    for (index, op) in ops.iter().enumerate() {
        let reject = |reason| (index as u32, reason);
        if op.len == 0 {
            return Err(reject(RejectReason::ZeroLength));
        }
        let Some(source_end) = op.source.checked_add(op.len) else { return Err(reject(RejectReason::RangeOverflow)) };
        if op.addr.checked_add(op.len).is_none() {
            return Err(reject(RejectReason::RangeOverflow));
        }
        let position = match held.iter().position(|(k, _)| *k == op.key) {
            Some(position) => position,
            None => {
                held.push((op.key, shared.keys.get(op.key).ok_or(reject(RejectReason::UnknownKey))?));
                held.len() - 1
            }
        };
        let entry = &held[position].1;
        if !entry.region.contains(op.addr, op.len) {
            return Err(reject(RejectReason::OutOfRange));
        }
        let from = match op.from {
            wire::FROM_ADDRESS => Source::Process(pid),
            id => {
                let shared = sources.get(&id).ok_or(reject(RejectReason::UnknownKey))?;
                if source_end > shared.file.len() {
                    return Err(reject(RejectReason::OutOfRange));
                }
                Source::File(shared.file.raw_fd())
            }
        };
        checked.pulls.push(Pull { source: from, local: op.addr, remote: op.source, len: op.len });
    }
    checked.held = held.into_iter().map(|(_, e)| e).collect();
    Ok(checked)
}
