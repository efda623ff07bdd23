//! The memory owner's side of the shm transport. Every connection first proves the cluster
//! secret; only then does it get a hello answer (pid, probe, a lease file of its own). The owner
//! copies every byte that lands in its memory itself: a WRITE names the initiator's source
//! addresses, and the owner checks key and range and pulls them with `process_vm_readv`. READs are
//! copied by the initiator (through a mapping or cross-memory attach) after a grant (`MAP`: checks
//! the key, answers with the registered range, the connection's lease slot and, for shareable
//! memory, the file); deregistration revokes that slot in every connection's lease file.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::lease::Leases;
use super::wire::{self, Header, WriteOp, invalid};
use crate::auth::{Auth, Channel};
use crate::deadline::Deadline;
use crate::net::{Connections, DeadlineStream};
use crate::transport::keys::{KeyEntry, KeyTable};
use crate::transport::{Notification, NotificationQueue, RejectReason};

/// Read with `process_vm_readv`, by initiators to check that cross-memory attach reaches the
/// owner, and by owners to check that they can pull an initiator's WRITEs.
pub(super) static PROBE: AtomicU64 = AtomicU64::new(wire::PROBE_MAGIC);

pub(super) struct OwnerShared {
    pub auth: Auth,
    pub keys: KeyTable,
    /// The lease file of every open connection, by connection id.
    pub leases: Mutex<HashMap<u64, Arc<Leases>>>,
    next_connection: AtomicU64,
    pub notifications: Arc<NotificationQueue>,
    /// Longest a request (the handshake included) may take once started.
    pub request_timeout: Duration,
    /// Longest a connection may stay idle between requests before it is closed.
    pub idle_timeout: Duration,
    pub connections: Connections,
}

impl OwnerShared {
    pub fn new(
        auth: Auth,
        notifications: Arc<NotificationQueue>,
        request_timeout: Duration,
        idle_timeout: Duration,
    ) -> Self {
        OwnerShared {
            auth,
            keys: KeyTable::default(),
            leases: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            notifications,
            request_timeout,
            idle_timeout,
            connections: Connections::default(),
        }
    }

    /// Deregister: no new grant or pull first (waiting only for our own copies in flight, which
    /// do not depend on the peer running), then revoke the key in every connection's lease file.
    pub fn deregister(&self, key: u128) {
        self.keys.remove(key);
        let leases: Vec<Arc<Leases>> = self.leases.lock().unwrap().values().cloned().collect();
        for l in leases {
            l.revoke(key);
        }
    }
}

pub(super) fn serve(stream: UnixStream, shared: &OwnerShared) {
    shared.connections.serve(stream, |stream| {
        if let Err(e) = serve_connection(stream, shared) {
            tracing::debug!(error = %e, "shm transport: connection closed");
        }
    });
}

fn respond(stream: &mut UnixStream, deadline: Deadline, tag: u8, count: u32, payload_len: u64) -> io::Result<()> {
    stream.write_all_by(&Header { tag, count, payload_len }.encode(), deadline)
}

/// The process at the other end of the socket, as the kernel saw it connect (not as it claims).
fn peer_pid(stream: &UnixStream) -> io::Result<libc::pid_t> {
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
    Ok(cred.pid)
}

/// Authenticate, then answer the hello; returns the peer's name and pid.
fn accept_hello(stream: &mut UnixStream, shared: &OwnerShared, leases: &Leases) -> io::Result<(String, u32)> {
    let deadline = Deadline::after(shared.request_timeout);
    shared.auth.server(stream, Channel::Shm, deadline).map_err(|e| invalid(format!("handshake: {e}")))?;
    let mut head = [0u8; wire::HEADER_LEN];
    stream.read_exact_by(&mut head, deadline)?;
    let hello = Header::decode(&head);
    if hello.tag != wire::HELLO {
        return Err(invalid("not a kvferry shm connection"));
    }
    if hello.count != wire::VERSION {
        respond(stream, deadline, wire::STATUS_BAD_VERSION, wire::VERSION, 0)?;
        return Err(invalid(format!("peer speaks shm version {}, this agent {}", hello.count, wire::VERSION)));
    }
    if hello.payload_len > wire::MAX_NAME as u64 {
        return Err(invalid("agent name too long"));
    }
    let mut probe = [0u8; 8];
    stream.read_exact_by(&mut probe, deadline)?;
    let mut name = vec![0u8; hello.payload_len as usize];
    stream.read_exact_by(&mut name, deadline)?;
    let name = String::from_utf8(name).map_err(|_| invalid("agent name is not UTF-8"))?;
    let pid = peer_pid(stream)? as u32;
    // Whether we can pull this peer's WRITEs: read the word it names in its own memory.
    let mut word = 0u64;
    let pulled = pull(pid, &[(&mut word as *mut u64 as u64, u64::from_le_bytes(probe), 8)]);
    let flags = if pulled.is_ok() && word == wire::PROBE_MAGIC { wire::FLAG_CAN_PULL } else { 0 };
    let mut ack = Header { tag: 0, count: std::process::id(), payload_len: PROBE.as_ptr() as u64 }.encode().to_vec();
    ack.extend_from_slice(&flags.to_le_bytes());
    stream.set_timeouts(crate::net::time_left(deadline)?)?;
    wire::send_with_fd(stream, &ack, leases.fd())?;
    Ok((name, pid))
}

fn serve_connection(mut stream: UnixStream, shared: &OwnerShared) -> io::Result<()> {
    let leases = Arc::new(Leases::new().map_err(io::Error::other)?);
    let (from, pid) = accept_hello(&mut stream, shared, &leases)?;
    let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    shared.leases.lock().unwrap().insert(id, leases.clone());
    let served = serve_requests(&mut stream, shared, &leases, &from, pid);
    shared.leases.lock().unwrap().remove(&id);
    served
}

fn serve_requests(
    stream: &mut UnixStream,
    shared: &OwnerShared,
    leases: &Leases,
    from: &str,
    pid: u32,
) -> io::Result<()> {
    loop {
        // Idle time between requests is bounded too: a peer that went away without closing (or
        // stays silent) costs this thread and descriptor for at most `idle_timeout`.
        let mut head = [0u8; wire::HEADER_LEN];
        match stream.read_exact_by(&mut head[..1], Deadline::after(shared.idle_timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let deadline = Deadline::after(shared.request_timeout);
        stream.read_exact_by(&mut head[1..], deadline)?;
        let header = Header::decode(&head);
        match header.tag {
            wire::MAP => {
                let mut key = [0u8; 16];
                stream.read_exact_by(&mut key, deadline)?;
                serve_map(stream, shared, leases, u128::from_le_bytes(key), deadline)?;
            }
            wire::WRITE => serve_write(stream, shared, header, pid, deadline)?,
            wire::NOTIFY => {
                if header.payload_len > wire::MAX_NOTIFICATION {
                    respond(stream, deadline, RejectReason::TooLarge.to_wire(), 0, 0)?;
                    return Err(invalid("oversized notification"));
                }
                let mut data = vec![0u8; header.payload_len as usize];
                stream.read_exact_by(&mut data, deadline)?;
                // Acknowledge first, as the TCP target does: a receiver that acts on the
                // notification by shutting down would otherwise fail a sender that succeeded.
                respond(stream, deadline, 0, 0, 0)?;
                shared.notifications.push(Notification { from: from.to_string(), data });
            }
            other => return Err(invalid(format!("unknown request kind {other}"))),
        }
    }
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

/// Check every op of a WRITE against the registrations, then copy the initiator's source bytes
/// into our memory ourselves. The entries are held during the copy, so deregistration waits for
/// it (our own copy, which does not depend on the initiator running) and no later copy starts.
fn serve_write(
    stream: &mut UnixStream,
    shared: &OwnerShared,
    header: Header,
    pid: u32,
    deadline: Deadline,
) -> io::Result<()> {
    let count = header.count as usize;
    if count == 0 || count > wire::MAX_WRITE_OPS || header.payload_len != (count * wire::WRITE_OP_LEN) as u64 {
        return Err(invalid("malformed write request"));
    }
    let mut body = vec![0u8; count * wire::WRITE_OP_LEN];
    stream.read_exact_by(&mut body, deadline)?;
    let ops: Vec<WriteOp> =
        body.chunks_exact(wire::WRITE_OP_LEN).map(|c| WriteOp::decode(c.try_into().expect("op length"))).collect();
    let (held, copies) = match check_write(shared, &ops) {
        Ok(checked) => checked,
        Err((index, reason)) => return respond(stream, deadline, reason.to_wire(), index, 0),
    };
    let pulled = pull(pid, &copies);
    drop(held);
    match pulled {
        Ok(()) => respond(stream, deadline, 0, 0, 0),
        Err((index, e)) => {
            let errno = e.raw_os_error().unwrap_or(libc::EIO) as u64;
            respond(stream, deadline, wire::STATUS_PULL_FAILED, index as u32, errno)
        }
    }
}

/// The entries a WRITE's ops use (held for the copy) and its copies `(ours, theirs, len)`.
type Checked = (Vec<Arc<KeyEntry>>, Vec<(u64, u64, u64)>);

/// Check a WRITE's ops; the first refused and why.
fn check_write(shared: &OwnerShared, ops: &[WriteOp]) -> Result<Checked, (u32, RejectReason)> {
    let mut held: Vec<(u128, Arc<KeyEntry>)> = Vec::new();
    let mut copies = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let reject = |reason| (index as u32, reason);
        if op.len == 0 {
            return Err(reject(RejectReason::ZeroLength));
        }
        if op.addr.checked_add(op.len).is_none() || op.source.checked_add(op.len).is_none() {
            return Err(reject(RejectReason::RangeOverflow));
        }
        let entry = match held.iter().find(|(k, _)| *k == op.key) {
            Some((_, e)) => e.clone(),
            None => {
                let e = shared.keys.get(op.key).ok_or(reject(RejectReason::UnknownKey))?;
                held.push((op.key, e.clone()));
                e
            }
        };
        if !entry.region.contains(op.addr, op.len) {
            return Err(reject(RejectReason::OutOfRange));
        }
        copies.push((op.addr, op.source, op.len));
    }
    Ok((held.into_iter().map(|(_, e)| e).collect(), copies))
}

/// Copy `(local, remote, len)` ranges from process `pid` into ours with `process_vm_readv`, up to
/// 1024 per call, looping over partial copies; an error names the op it stopped at.
pub(super) fn pull(pid: u32, ops: &[(u64, u64, u64)]) -> Result<(), (usize, io::Error)> {
    const IOV_MAX: usize = 1024;
    let iov = |addr: u64, len: u64| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len as usize };
    let (mut next, mut done_in_next) = (0usize, 0u64);
    while next < ops.len() {
        let window = &ops[next..ops.len().min(next + IOV_MAX)];
        let skip = |k: usize| if k == 0 { done_in_next } else { 0 };
        let local: Vec<libc::iovec> =
            window.iter().enumerate().map(|(k, &(l, _, len))| iov(l + skip(k), len - skip(k))).collect();
        let remote: Vec<libc::iovec> =
            window.iter().enumerate().map(|(k, &(_, r, len))| iov(r + skip(k), len - skip(k))).collect();
        // SAFETY: the local iovecs name memory of ours the caller checked (registered ranges held
        // for the call, or a local word); the kernel checks the remote ones against the peer's
        // address space.
        let n = unsafe {
            libc::process_vm_readv(
                pid as libc::pid_t,
                local.as_ptr(),
                local.len() as _,
                remote.as_ptr(),
                remote.len() as _,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err((next, e));
        }
        if n == 0 {
            return Err((next, io::Error::from_raw_os_error(libc::EFAULT)));
        }
        let mut left = n as u64;
        while left > 0 {
            let rest = ops[next].2 - done_in_next;
            if left < rest {
                done_in_next += left;
                break;
            }
            left -= rest;
            next += 1;
            done_in_next = 0;
        }
    }
    Ok(())
}
