//! The shared-memory transport, for peers on the same host.
//!
//! The endpoint names the host (its boot id), the process and an abstract Unix socket. Over that
//! socket the memory owner grants access to a registration once (after checking its key) and
//! receives notifications; revocation goes through a shared lease file of slots. The bytes never
//! cross the socket:
//!
//! - **mapped**: a region backed by a shareable file (a memfd
//!   [`HostBuffer`](crate::memory::host::HostBuffer), see
//!   [`HostAllocOptions::shareable`](crate::memory::host::HostAllocOptions)) is passed to the
//!   initiator once with `SCM_RIGHTS`, mapped and cached; an op is one `memcpy`, large batches split
//!   over the host device's copy pool;
//! - **cross-memory**: any other host region is copied with `process_vm_readv`/`process_vm_writev`,
//!   one system call for up to 1024 ranges.
//!
//! A peer on another host, an unreachable socket, or cross-memory attach refused by the kernel
//! (ptrace policy, pid namespaces) makes [`Transport::link`] fail, and the agent falls back to the
//! next transport (TCP).

mod lease;
mod link;
mod owner;
mod wire;

use std::any::Any;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::sync::Arc;
use std::time::Duration;

use self::link::{LinkInfo, RemoteShm, ShmLink};
use self::owner::OwnerShared;
use self::wire::Reach;
use crate::error::{Error, Result};
use crate::memory::host::HostDevice;
use crate::memory::{MemKind, MemRegion};
use crate::net::Acceptor;
use crate::transport::keys::{self, memory_of};
use crate::transport::{
    Endpoint, NotificationQueue, PeerLink, RemoteRegion, Transport, TransportKind, remote_keys, require_host,
};

#[derive(Debug, Clone)]
pub struct ShmConfig {
    /// Pool threads copying large batches through mappings, next to the link's worker, which
    /// copies a share too; `None`: one per core but one, at least 1 and at most 7.
    pub copy_threads: Option<usize>,
    pub connect_timeout: Duration,
    /// How long a peer may hold a window on this agent's memory (or stall mid-message) before its
    /// connection is closed.
    pub request_timeout: Duration,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            copy_threads: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// This host's boot id: peers with the same one share the kernel, so shared memory can reach them.
pub fn boot_id() -> Result<String> {
    let path = "/proc/sys/kernel/random/boot_id";
    let id = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading {path}"), e))?;
    Ok(id.trim().to_string())
}

/// Where a peer's shm transport listens, parsed from its endpoint address
/// `boot-id/pid/socket-name`.
struct ShmAddress<'a> {
    boot_id: &'a str,
    pid: u32,
    socket: &'a str,
}

impl<'a> ShmAddress<'a> {
    fn parse(address: &'a str) -> Option<ShmAddress<'a>> {
        let mut parts = address.splitn(3, '/');
        let boot_id = parts.next()?;
        let pid = parts.next()?.parse().ok()?;
        let socket = parts.next().filter(|s| !s.is_empty())?;
        Some(ShmAddress { boot_id, pid, socket })
    }
}

pub struct ShmTransport {
    local_name: String,
    config: ShmConfig,
    boot_id: String,
    endpoint: Endpoint,
    shared: Arc<OwnerShared>,
    device: Arc<HostDevice>,
    acceptor: Option<Acceptor<UnixListener>>,
}

impl ShmTransport {
    pub fn start(local_name: &str, config: ShmConfig, notifications: Arc<NotificationQueue>) -> Result<ShmTransport> {
        let boot_id = boot_id()?;
        // The worker copies a share itself: with one pool thread per core but one, a batch keeps
        // every core busy without more copying threads than cores.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let device = Arc::new(HostDevice::with_threads(config.copy_threads.unwrap_or((cores - 1).clamp(1, 7)))?);
        let pid = std::process::id();
        let socket = format!("kvferry-shm-{pid}-{:016x}", keys::new_key()? as u64);
        let addr = UnixAddr::from_abstract_name(&socket).map_err(|e| Error::io("naming the shm socket", e))?;
        let listener = UnixListener::bind_addr(&addr).map_err(|e| Error::io(format!("binding @{socket}"), e))?;
        let shared = Arc::new(OwnerShared::new(notifications, config.request_timeout)?);
        let serve_shared = shared.clone();
        let acceptor = Acceptor::serve(listener, "kvferry-shm", move |stream| owner::serve(stream, &serve_shared))?;
        Ok(ShmTransport {
            local_name: local_name.to_string(),
            config,
            endpoint: Endpoint { kind: TransportKind::Shm, address: format!("{boot_id}/{pid}/{socket}") },
            boot_id,
            shared,
            device,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        // Stop accepting first, then close what was accepted (as the TCP transport does).
        drop(self.acceptor.take());
        self.shared.connections.shutdown_all();
    }
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    fn supports(&self, kind: MemKind) -> bool {
        kind == MemKind::Host
    }

    fn register(&self, region: MemRegion, keep_alive: Arc<dyn Any + Send + Sync>) -> Result<Vec<u8>> {
        require_host(TransportKind::Shm, &region)?;
        // Mapped only when the file starts at the region: that is how shareable buffers map it.
        let shareable =
            memory_of(&keep_alive).is_some_and(|m| m.share_fd().is_some() && m.region().addr == region.addr);
        let reach = if shareable { Reach::Mapped } else { Reach::CrossMemory };
        let key = keys::new_key()?;
        let slot = self.shared.leases.open(key as u64)?;
        self.shared.slots.lock().unwrap().insert(key, slot);
        self.shared.keys.insert(key, region, keep_alive);
        Ok(wire::encode_key(key, reach))
    }

    fn deregister(&self, key: &[u8]) {
        if let Some((key, _)) = wire::decode_key(key) {
            // No new grants first, then wait for initiators inside the registration to leave.
            let slot = self.shared.slots.lock().unwrap().remove(&key);
            if let Some(slot) = slot {
                self.shared.leases.revoke(slot, self.config.request_timeout);
            }
            self.shared.keys.remove(key);
        }
    }

    fn link(&self, peer: &str, endpoint: &Endpoint, regions: Vec<RemoteRegion>) -> Result<Arc<dyn PeerLink>> {
        let address = ShmAddress::parse(&endpoint.address)
            .ok_or_else(|| Error::InvalidArgument(format!("peer {peer} published a malformed shm endpoint")))?;
        let unsupported = |why: String| Error::Unsupported { what: format!("shared memory with peer {peer}"), why };
        if address.boot_id != self.boot_id {
            return Err(unsupported("it runs on another host (boot ids differ)".into()));
        }
        let regions = remote_keys(peer, TransportKind::Shm, &regions, |r| {
            wire::decode_key(&r.key).map(|(key, reach)| RemoteShm { key, reach, region: r.region })
        })?;
        let socket = UnixAddr::from_abstract_name(address.socket)
            .map_err(|e| Error::InvalidArgument(format!("peer {peer} published an invalid socket name: {e}")))?;
        let (conn, pid, probe, leases) = link::connect(&socket, &self.local_name, self.config.connect_timeout)
            .map_err(|cause| unsupported(format!("its socket @{} is unreachable: {cause}", address.socket)))?;
        if pid != address.pid {
            return Err(unsupported(format!("pid {pid} answers for the endpoint of pid {}", address.pid)));
        }
        if regions.iter().flatten().any(|r| r.reach == Reach::CrossMemory) {
            link::probe_cross_memory(pid, probe)
                .map_err(|cause| unsupported(format!("cross-memory attach is refused: {cause}")))?;
        }
        let info = LinkInfo {
            local_name: self.local_name.clone(),
            peer: peer.to_string(),
            endpoint: endpoint.address.clone(),
            socket,
            pid,
            connect_timeout: self.config.connect_timeout,
        };
        Ok(Arc::new(ShmLink::new(info, regions, (conn, leases), self.device.clone())?))
    }
}

#[cfg(test)]
mod tests;

#[cfg(feature = "fuzzing")]
pub(crate) use wire::decode_key;
