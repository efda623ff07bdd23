//! The shared-memory transport, for peers on the same host.
//!
//! The endpoint names the host (its boot id), the process and an abstract Unix socket. Every
//! connection to that socket first proves the cluster secret ([`crate::auth`]); then the memory
//! owner answers with a lease file of that connection's own. The bytes never cross the socket, and
//! each side copies only into memory it owns:
//!
//! - **WRITE**: the initiator names its own sources; the owner checks key and range and copies
//!   them into its memory, then answers: a source in a shareable region of the initiator's is
//!   passed once per connection with `SCM_RIGHTS` (`SHARE`), and the owner, after checking that
//!   the file cannot shrink, keeps it (within [`ShmConfig::max_shared_sources`]) and copies with
//!   `pread`; any other source is pulled with `process_vm_readv`;
//! - **READ**: after a grant (`MAP`, key checked), the initiator copies, either **mapped** — a region
//!   backed by a shareable file (a memfd [`HostBuffer`](crate::memory::host::HostBuffer), see
//!   [`HostAllocOptions::shareable`](crate::memory::host::HostAllocOptions)) is passed once with
//!   `SCM_RIGHTS`, kept and read with `pread` — or **cross-memory**, with `process_vm_readv`, one
//!   system call for up to 1024 ranges. Neither side maps the other's file (a hole would cost the
//!   reader a page, a hugetlb hole a `SIGBUS`; see `pull.rs`); large batches are split over the
//!   host device's copy pool. A READ that raced a deregistration is discarded (see `lease.rs`).
//!
//! A peer on another host, an unreachable socket, a failed handshake, or cross-memory attach
//! refused by the kernel in either direction (ptrace policy, pid namespaces) makes
//! [`Transport::link`] fail, and the agent falls back to the next transport (TCP).

mod lease;
mod link;
mod owner;
mod pull;
mod wire;

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use self::link::{LinkInfo, RemoteShm, ShmLink, Worker};
use self::owner::OwnerShared;
use self::wire::Reach;
use crate::auth::Auth;
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::limits::ServeLimits;
use crate::memory::host::HostDevice;
use crate::memory::{MemKind, MemRegion};
use crate::net::Server;
use crate::sync::Locked;
use crate::transport::host::boot_id;
use crate::transport::keys;
use crate::transport::progress::Progress;
use crate::transport::{
    ConnectError, Endpoint, MemoryOwner, NotificationQueue, PeerLink, RemoteRegion, Transport, TransportKind,
    remote_keys, require_host,
};

#[derive(Debug, Clone)]
pub struct ShmConfig {
    /// Pool threads copying large batches through mappings, next to the progress thread running
    /// the batch, which copies a share too; `None`: one per core but one, at least 1 and at most 7.
    pub copy_threads: Option<usize>,
    /// The connect, the handshake and the hello together, at link time and on first use.
    pub connect_timeout: Duration,
    /// How long a request this agent serves may take, from its first byte to its answer's last,
    /// before its connection is closed.
    pub request_timeout: Duration,
    /// How long a connection may stay idle between requests before it is closed, on both sides
    /// (the initiator connects again on the next batch).
    pub idle_timeout: Duration,
    /// Threads running every link's batches, whatever the number of peers.
    pub threads: usize,
    /// Serving threads and connections the peers of this transport can make it spend. The
    /// per-peer limit (`max_per_ip`) counts connections per user id (`SO_PEERCRED`);
    /// `idle_timeout` there is for a connection that has sent no request since its handshake.
    pub limits: ServeLimits,
    /// Files one connection's initiator may have shared at once, each holding a descriptor
    /// (beyond, a `SHARE` is refused and that source pulled cross-memory).
    pub max_shared_sources: usize,
}

impl Default for ShmConfig {
    fn default() -> Self {
        ShmConfig {
            copy_threads: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            threads: 2,
            limits: ServeLimits::default(),
            max_shared_sources: 1024,
        }
    }
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
    auth: Auth,
    device: Arc<HostDevice>,
    server: Option<Server<OwnerShared>>,
    /// This transport's links, told when a local registration goes.
    links: Mutex<Vec<Weak<ShmLink>>>,
    progress: Progress<Worker>,
}

impl ShmTransport {
    pub fn start(
        local_name: &str,
        config: ShmConfig,
        auth: Auth,
        notifications: Arc<NotificationQueue>,
    ) -> Result<ShmTransport> {
        let boot_id = boot_id()?;
        // The progress thread running a batch copies a share itself: with one pool thread per core but one, a batch keeps
        // every core busy without more copying threads than cores.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let device = Arc::new(HostDevice::with_threads(config.copy_threads.unwrap_or((cores - 1).clamp(1, 7)))?);
        let pid = std::process::id();
        let socket = format!("kvferry-shm-{pid}-{:016x}", keys::new_key()? as u64);
        let addr = UnixAddr::from_abstract_name(&socket).map_err(|e| Error::io("naming the shm socket", e))?;
        let listener = UnixListener::bind_addr(&addr).map_err(|e| Error::io(format!("binding @{socket}"), e))?;
        let shared = Arc::new(OwnerShared::new(auth, notifications, &config, device.clone()));
        let server = Server::start(listener, "kvferry-shm", shared.clone(), config.limits.clone())?;
        Ok(ShmTransport {
            progress: Progress::new(&format!("kvf-shm-{local_name}"), config.threads, Some(config.idle_timeout)),
            local_name: local_name.to_string(),
            config,
            endpoint: Endpoint { kind: TransportKind::Shm, address: format!("{boot_id}/{pid}/{socket}") },
            boot_id,
            auth: shared.auth.clone(),
            shared,
            device,
            server: Some(server),
            links: Mutex::default(),
        })
    }
}

impl Drop for ShmTransport {
    fn drop(&mut self) {
        // Stops accepting and closes every connection, those mid-request included.
        drop(self.server.take());
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

    fn register(&self, region: MemRegion, owner: MemoryOwner) -> Result<Vec<u8>> {
        require_host(TransportKind::Shm, &region)?;
        // Mapped only when the file starts at the region: that is how shareable buffers map it.
        let shareable = owner.as_ref().is_some_and(|m| m.share_fd().is_some() && m.region().addr == region.addr);
        let reach = if shareable { Reach::Mapped } else { Reach::CrossMemory };
        let key = keys::new_key()?;
        self.shared.keys.insert(key, region, owner);
        Ok(wire::encode_key(key, reach))
    }

    fn deregister(&self, key: &[u8]) {
        let Some((key, _)) = wire::decode_key(key) else { return };
        self.shared.deregister(key);
        self.links.locked().retain(|link| {
            let Some(link) = link.upgrade() else { return false };
            link.forget(key);
            true
        });
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
        // Only what decides whether the link is usable, by one deadline: connect, prove the
        // secret, and check cross-memory attach both ways. The connection is closed again; the
        // link's worker connects on first use.
        let deadline = Deadline::after(self.config.connect_timeout);
        let conn = link::connect(address.socket, &self.local_name, &self.auth, deadline).map_err(|e| match e {
            ConnectError::Unauthenticated(cause) => {
                Error::Transfer(crate::transport::TransferError::Unauthenticated { peer: peer.to_string(), cause })
            }
            ConnectError::Unreachable(cause) => {
                unsupported(format!("its socket @{} is unreachable: {cause}", address.socket))
            }
        })?;
        if conn.pid != address.pid {
            return Err(unsupported(format!("pid {} answers for the endpoint of pid {}", conn.pid, address.pid)));
        }
        if !conn.can_pull {
            return Err(unsupported("it cannot read this process's memory to pull WRITEs (ptrace policy)".into()));
        }
        if regions.iter().flatten().any(|r| r.reach == Reach::CrossMemory) {
            pull::probe_cross_memory(conn.pid, conn.probe)
                .map_err(|cause| unsupported(format!("cross-memory attach is refused: {cause}")))?;
        }
        let info = LinkInfo {
            local_name: self.local_name.clone(),
            peer: peer.to_string(),
            endpoint: endpoint.address.clone(),
            socket: address.socket.to_string(),
            pid: conn.pid,
            auth: self.auth.clone(),
            connect_timeout: self.config.connect_timeout,
            local: self.shared.clone(),
        };
        let link = Arc::new(ShmLink::new(info, regions, self.device.clone(), &self.progress));
        let mut links = self.links.locked();
        links.retain(|link| link.strong_count() > 0);
        links.push(Arc::downgrade(&link));
        Ok(link)
    }
}

#[cfg(test)]
mod tests;

#[cfg(feature = "fuzzing")]
pub(crate) use wire::decode_key;
