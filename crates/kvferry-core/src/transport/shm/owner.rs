//! The memory owner's side of the shm transport. Initiators copy the bytes themselves (through a
//! mapping or cross-memory attach), but only inside an `ACQUIRE`…`RELEASE` window this side opened
//! after checking every descriptor against the key table; the window holds the registrations, so
//! deregistration waits for it, and the `RELEASE` delivers the notification after the data.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::wire::{self, Header, WireDesc};
use crate::net::Connections;
use crate::transport::keys::{KeyEntry, KeyTable};
use crate::transport::{Notification, NotificationQueue, RejectReason};

/// Read by initiators with `process_vm_readv` to check that cross-memory attach reaches us.
pub(super) static PROBE: AtomicU64 = AtomicU64::new(wire::PROBE_MAGIC);

pub(super) struct OwnerShared {
    pub keys: KeyTable,
    pub notifications: Arc<NotificationQueue>,
    /// Longest an initiator may hold an acquired window (or stall mid-message) before its
    /// connection is closed, which releases what it held.
    request_timeout: Duration,
    pub connections: Connections,
}

impl OwnerShared {
    pub fn new(notifications: Arc<NotificationQueue>, request_timeout: Duration) -> Self {
        OwnerShared { keys: KeyTable::default(), notifications, request_timeout, connections: Connections::default() }
    }
}

pub(super) fn serve(stream: UnixStream, shared: &OwnerShared) {
    shared.connections.serve(stream, |stream| {
        if let Err(e) = serve_connection(stream, shared) {
            tracing::debug!(error = %e, "shm transport: connection closed");
        }
    });
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn respond(stream: &mut UnixStream, status: Result<(), (u32, RejectReason)>) -> io::Result<()> {
    let header = match status {
        Ok(()) => Header { tag: 0, count: 0, payload_len: 0 },
        Err((index, reason)) => Header { tag: reason.to_wire(), count: index, payload_len: 0 },
    };
    stream.write_all(&header.encode())
}

fn accept_hello(stream: &mut UnixStream) -> io::Result<String> {
    let hello = Header::read_from(stream)?;
    if hello.tag != wire::HELLO {
        return Err(invalid("not a kvferry shm connection"));
    }
    if hello.count != wire::VERSION {
        let refusal = Header { tag: wire::STATUS_BAD_VERSION, count: wire::VERSION, payload_len: 0 };
        stream.write_all(&refusal.encode())?;
        return Err(invalid(format!("peer speaks shm version {}, this agent {}", hello.count, wire::VERSION)));
    }
    if hello.payload_len > wire::MAX_NAME as u64 {
        return Err(invalid("agent name too long"));
    }
    let mut name = vec![0u8; hello.payload_len as usize];
    stream.read_exact(&mut name)?;
    let name = String::from_utf8(name).map_err(|_| invalid("agent name is not UTF-8"))?;
    let probe = PROBE.as_ptr() as u64;
    stream.write_all(&Header { tag: 0, count: std::process::id(), payload_len: probe }.encode())?;
    Ok(name)
}

fn serve_connection(mut stream: UnixStream, shared: &OwnerShared) -> io::Result<()> {
    stream.set_read_timeout(Some(shared.request_timeout))?;
    stream.set_write_timeout(Some(shared.request_timeout))?;
    let from = accept_hello(&mut stream)?;
    // The registrations of the open window: while held, deregistration waits.
    let mut held: Vec<Arc<KeyEntry>> = Vec::new();
    let mut desc_buf = Vec::new();
    loop {
        // Idle time between windows is unlimited; an open window is bounded by the request timeout.
        stream.set_read_timeout(if held.is_empty() { None } else { Some(shared.request_timeout) })?;
        let header = match Header::read_from(&mut stream) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        stream.set_read_timeout(Some(shared.request_timeout))?;
        match header.tag {
            wire::MAP => {
                let mut key = [0u8; 16];
                stream.read_exact(&mut key)?;
                serve_map(&mut stream, shared, u128::from_le_bytes(key))?;
            }
            wire::ACQUIRE => {
                let count = header.count as usize;
                if count > wire::MAX_DESCS || !held.is_empty() {
                    respond(&mut stream, Err((0, RejectReason::TooLarge)))?;
                    return Err(invalid("oversized request, or a second window before the first was released"));
                }
                desc_buf.resize(count * wire::DESC_LEN, 0);
                stream.read_exact(&mut desc_buf)?;
                let descs: Vec<WireDesc> = desc_buf.chunks_exact(wire::DESC_LEN).map(WireDesc::decode).collect();
                match shared.keys.resolve(&descs) {
                    Ok(entries) => {
                        held = entries;
                        respond(&mut stream, Ok(()))?;
                    }
                    Err(rejection) => respond(&mut stream, Err(rejection))?,
                }
            }
            wire::RELEASE => {
                if header.payload_len > wire::MAX_NOTIFICATION {
                    respond(&mut stream, Err((0, RejectReason::TooLarge)))?;
                    return Err(invalid("oversized notification"));
                }
                let mut data = vec![0u8; header.payload_len as usize];
                stream.read_exact(&mut data)?;
                held.clear();
                if header.count != 0 {
                    shared.notifications.push(Notification { from: from.clone(), data });
                }
                respond(&mut stream, Ok(()))?;
            }
            other => return Err(invalid(format!("unknown request kind {other}"))),
        }
    }
}

/// Hand out the memfd behind a registration, after checking its key.
fn serve_map(stream: &mut UnixStream, shared: &OwnerShared, key: u128) -> io::Result<()> {
    let refuse = |stream: &mut UnixStream, tag: u8| {
        let mut ack = Header { tag, count: 0, payload_len: 16 }.encode().to_vec();
        ack.resize(wire::MAP_ACK_LEN, 0);
        stream.write_all(&ack)
    };
    let Some(entry) = shared.keys.get(key) else {
        return refuse(stream, RejectReason::UnknownKey.to_wire());
    };
    let Some(fd) = entry.memory().and_then(|m| m.share_fd()) else {
        return refuse(stream, wire::STATUS_NOT_SHAREABLE);
    };
    let mut ack = Header { tag: 0, count: 0, payload_len: 16 }.encode().to_vec();
    ack.extend_from_slice(&entry.region.addr.to_le_bytes());
    ack.extend_from_slice(&entry.region.len.to_le_bytes());
    wire::send_with_fd(stream, &ack, fd)
}
