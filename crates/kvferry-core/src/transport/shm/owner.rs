//! The memory owner's side of the shm transport. Initiators copy the bytes themselves (through a
//! mapping or cross-memory attach); this side grants access per registration (`MAP`: checks the key,
//! answers with the registered range, its lease slot and, for shareable memory, the file), revokes
//! it through the lease file, and receives notifications, which initiators send after the data.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::lease::Leases;
use super::wire::{self, Header, invalid};
use crate::net::Connections;
use crate::transport::keys::KeyTable;
use crate::transport::{Notification, NotificationQueue, RejectReason};

/// Read by initiators with `process_vm_readv` to check that cross-memory attach reaches us.
pub(super) static PROBE: AtomicU64 = AtomicU64::new(wire::PROBE_MAGIC);

pub(super) struct OwnerShared {
    pub keys: KeyTable,
    pub leases: Leases,
    /// The lease slot of each registered key.
    pub slots: Mutex<HashMap<u128, u32>>,
    pub notifications: Arc<NotificationQueue>,
    /// Longest a message may stall mid-way, and a deregistration may wait for initiators to leave.
    pub request_timeout: Duration,
    pub connections: Connections,
}

impl OwnerShared {
    pub fn new(notifications: Arc<NotificationQueue>, request_timeout: Duration) -> crate::error::Result<Self> {
        Ok(OwnerShared {
            keys: KeyTable::default(),
            leases: Leases::new()?,
            slots: Mutex::new(HashMap::new()),
            notifications,
            request_timeout,
            connections: Connections::default(),
        })
    }
}

pub(super) fn serve(stream: UnixStream, shared: &OwnerShared) {
    shared.connections.serve(stream, |stream| {
        if let Err(e) = serve_connection(stream, shared) {
            tracing::debug!(error = %e, "shm transport: connection closed");
        }
    });
}

fn respond(stream: &mut UnixStream, status: Result<(), (u32, RejectReason)>) -> io::Result<()> {
    let header = match status {
        Ok(()) => Header { tag: 0, count: 0, payload_len: 0 },
        Err((index, reason)) => Header { tag: reason.to_wire(), count: index, payload_len: 0 },
    };
    stream.write_all(&header.encode())
}

fn accept_hello(stream: &mut UnixStream, shared: &OwnerShared) -> io::Result<String> {
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
    let ack = Header { tag: 0, count: std::process::id(), payload_len: probe }.encode();
    wire::send_with_fd(stream, &ack, shared.leases.fd())?;
    Ok(name)
}

fn serve_connection(mut stream: UnixStream, shared: &OwnerShared) -> io::Result<()> {
    stream.set_read_timeout(Some(shared.request_timeout))?;
    stream.set_write_timeout(Some(shared.request_timeout))?;
    let from = accept_hello(&mut stream, shared)?;
    loop {
        // Idle time between requests is unlimited; a request, once started, is bounded.
        stream.set_read_timeout(None)?;
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
            wire::NOTIFY => {
                if header.payload_len > wire::MAX_NOTIFICATION {
                    respond(&mut stream, Err((0, RejectReason::TooLarge)))?;
                    return Err(invalid("oversized notification"));
                }
                let mut data = vec![0u8; header.payload_len as usize];
                stream.read_exact(&mut data)?;
                // Acknowledge first, as the TCP target does: a receiver that acts on the
                // notification by shutting down would otherwise fail a sender that succeeded.
                respond(&mut stream, Ok(()))?;
                shared.notifications.push(Notification { from: from.clone(), data });
            }
            other => return Err(invalid(format!("unknown request kind {other}"))),
        }
    }
}

/// Grant access to a registration, after checking its key: its range, its lease slot, and the
/// memfd behind it when it has one.
fn serve_map(stream: &mut UnixStream, shared: &OwnerShared, key: u128) -> io::Result<()> {
    let slot = shared.slots.lock().unwrap().get(&key).copied();
    let (Some(entry), Some(slot)) = (shared.keys.get(key), slot) else {
        let mut refusal =
            Header { tag: RejectReason::UnknownKey.to_wire(), count: 0, payload_len: 16 }.encode().to_vec();
        refusal.resize(wire::MAP_ACK_LEN, 0);
        return stream.write_all(&refusal);
    };
    let mut ack = Header { tag: 0, count: slot, payload_len: 16 }.encode().to_vec();
    ack.extend_from_slice(&entry.region.addr.to_le_bytes());
    ack.extend_from_slice(&entry.region.len.to_le_bytes());
    match entry.memory().and_then(|m| m.share_fd()) {
        Some(fd) => wire::send_with_fd(stream, &ack, fd),
        None => stream.write_all(&ack),
    }
}
