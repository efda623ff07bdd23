//! The [`Agent`]: one engine rank's registry of memory, its transports, its peers, and the
//! transfers between them.
//!
//! ```text
//! register (RAII) → metadata() → peer.add_peer(bytes) → prepare_local / prepare_remote
//!   → read / write / post (batch, deadline, notification) → Transfer::poll / wait / cancel
//! ```

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use crate::auth::Auth;
use crate::sync::{Locked, ReadWriteLocked};
mod config;

pub use config::AgentConfig;

use crate::deadline::Deadline;
use crate::descriptor::{DescError, DescSide, LinkGap};
use crate::error::{Error, Result};
use crate::limits::AgentLimits;
use crate::memory::{MemRegion, Memory};
use crate::metadata::{AgentMetadata, RegionInfo};
use crate::metrics::Metrics;
use crate::side_channel::{self, MetadataHost, SideChannelServer};
use crate::transport::shm::ShmTransport;
use crate::transport::staging::Stager;
use crate::transport::tcp::TcpTransport;
use crate::transport::{
    Batch, Completion, Endpoint, NotificationQueue, Op, PeerLink, RemoteRegion, TransferError, Transport,
    TransportKind, XferOp,
};

pub use crate::transport::{Notification, TransferStatus};

/// A registered region on this agent.
struct LocalReg {
    id: u64,
    region: MemRegion,
    keys: Vec<(TransportKind, Vec<u8>)>,
    /// Keeps owned memory alive; `None` for raw registrations, whose owner promised to keep it.
    owner: Option<Arc<dyn Memory>>,
    /// The local transfers posted on this memory that may not have settled, so that dropping the
    /// registration can stop them. Closed by the drop: later posts fail with `NotRegistered`.
    transfers: Pending,
}

struct Peer {
    meta: AgentMetadata,
    /// Every transport that reached the peer, in this agent's order of preference; never empty.
    /// Each transfer takes the first that holds keys for all its descriptors.
    links: Vec<(TransportKind, Arc<dyn PeerLink>)>,
    /// Transfers posted to the peer that may not have settled, so that [`Agent::peer_gone`] can
    /// fail them. Kept across metadata updates.
    pending: Arc<Pending>,
    /// Added by its own EXCHANGE on the side channel (not by this agent's caller): such a peer
    /// counts against [`AgentLimits::max_peers`] and is forgotten once idle.
    exchanged: bool,
    /// When a transfer to the peer was last posted or its metadata last arrived, in milliseconds
    /// since the agent started.
    last_used: AtomicU64,
}

/// The transfers posted to one peer (or on one registration), pruned of settled ones as it grows.
#[derive(Default)]
struct Pending {
    transfers: Mutex<PendingList>,
}

#[derive(Default)]
struct PendingList {
    transfers: Vec<Weak<Completion>>,
    /// The length at which the list is pruned next: twice what the last pruning kept (at least
    /// 64), so that pruning costs a constant per post however many transfers stay pending.
    prune_at: usize,
    closed: bool,
}

impl Pending {
    /// Adds a transfer; false once the list is closed.
    fn push(&self, completion: &Arc<Completion>) -> bool {
        let mut list = self.transfers.locked();
        if list.closed {
            return false;
        }
        if list.transfers.len() >= list.prune_at {
            list.transfers.retain(|w| w.upgrade().is_some_and(|c| !c.is_settled()));
            list.prune_at = (2 * list.transfers.len()).max(64);
        }
        list.transfers.push(Arc::downgrade(completion));
        true
    }

    fn take(&self) -> Vec<Arc<Completion>> {
        self.transfers.locked().transfers.drain(..).filter_map(|w| w.upgrade()).collect()
    }

    /// Takes the transfers and refuses any more.
    fn close(&self) -> Vec<Arc<Completion>> {
        let mut list = self.transfers.locked();
        list.closed = true;
        list.transfers.drain(..).filter_map(|w| w.upgrade()).collect()
    }
}

impl Peer {
    fn preferred(&self) -> &(TransportKind, Arc<dyn PeerLink>) {
        &self.links[0]
    }

    fn kinds(&self) -> Kinds {
        Kinds::of(self.links.iter().map(|(kind, _)| *kind))
    }
}

/// A set of transports, one bit per wire tag: small enough to keep with every prepared descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kinds(u32);

impl Kinds {
    const ALL: Kinds = Kinds(u32::MAX);

    fn of(kinds: impl IntoIterator<Item = TransportKind>) -> Kinds {
        Kinds(kinds.into_iter().fold(0, |bits, k| bits | 1 << k.to_wire()))
    }

    fn keyed(keys: &[(TransportKind, Vec<u8>)]) -> Kinds {
        Kinds::of(keys.iter().map(|(kind, _)| *kind))
    }

    fn and(self, other: Kinds) -> Kinds {
        Kinds(self.0 & other.0)
    }

    fn has(self, kind: TransportKind) -> bool {
        self.0 & 1 << kind.to_wire() != 0
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }
}

pub(crate) struct AgentInner {
    name: String,
    transports: Vec<Arc<dyn Transport>>,
    /// Keyed by (start address, id): a lookup walks back from the address.
    registry: Mutex<BTreeMap<(u64, u64), Arc<LocalReg>>>,
    next_reg_id: AtomicU64,
    generation: AtomicU64,
    peers: RwLock<HashMap<String, Arc<Peer>>>,
    notifications: Arc<NotificationQueue>,
    side_channel: Mutex<Option<SideChannelServer>>,
    metrics: Arc<Metrics>,
    pub(crate) auth: Auth,
    limits: AgentLimits,
    started: Instant,
}

/// One engine rank's endpoint: registered memory, transports, peers, transfers. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<AgentInner>,
}

/// Keeps a region registered; deregisters it when dropped.
///
/// The drop first stops every local transfer posted on the region (as [`Transfer::cancel`] does:
/// running parts are cut off, so over TCP it waits only for the sockets' calls to return, not for
/// the peer; for raw memory over a transport that cannot cut a part off, until its parts have
/// reported), then revokes the region's keys with each transport, which waits for the remote
/// requests using it. Once it returns no local transfer touches the memory any more.
pub struct Registration {
    agent: Weak<AgentInner>,
    reg: Arc<LocalReg>,
}

impl Registration {
    pub fn region(&self) -> MemRegion {
        self.reg.region
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let agent = self.agent.upgrade();
        if let Some(agent) = &agent {
            agent.unlist(&self.reg);
        }
        // The memory belongs to the caller once we return: stop the local transfers using it
        // instead of waiting for them to end. Batches that hold the registration but were stopped
        // are skipped by their transport, so they need no waiting. Raw memory may be freed at once,
        // so a transport that cannot cut a running part off is waited for however long it takes;
        // owned memory stays alive with such a part (its keep-alive), so its cancel suffices.
        let raw = self.reg.owner.is_none();
        for completion in self.reg.transfers.close() {
            match raw {
                true => completion.stop(),
                false => completion.cancel(),
            }
        }
        if let Some(agent) = &agent {
            agent.revoke(&self.reg.keys);
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration").field("id", &self.reg.id).field("region", &self.reg.region).finish()
    }
}

/// Local descriptors checked once against this agent's registrations and reused: transfers pick
/// entries by index. A distinct type from [`RemoteDescs`], so the two cannot be swapped.
#[derive(Debug, Clone)]
pub struct LocalDescs {
    /// The agent that prepared them.
    agent: usize,
    /// `regs[slot]` is the registration holding each descriptor. Weak, so a prepared list never
    /// keeps memory registered.
    regs: Vec<Weak<LocalReg>>,
    descs: Vec<PreparedDesc>,
}

/// A peer's descriptors checked once against the regions it advertised, and reused.
#[derive(Debug, Clone)]
pub struct RemoteDescs {
    peer: String,
    /// `slot` indexes the peer's regions as of this generation of its metadata.
    generation: u64,
    descs: Vec<PreparedDesc>,
}

/// Either kind of prepared list, for front ends whose callers hold both in one type (a Python
/// `Prepared`, a C `kvferry_descs`): they ask for the kind a call needs and get the one error for a
/// list of the other kind.
#[derive(Debug, Clone)]
pub enum PreparedList {
    Local(LocalDescs),
    Remote(RemoteDescs),
}

impl PreparedList {
    pub fn len(&self) -> usize {
        match self {
            PreparedList::Local(l) => l.len(),
            PreparedList::Remote(r) => r.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The peer a remote list targets; `None` for a local list.
    pub fn peer(&self) -> Option<&str> {
        match self {
            PreparedList::Local(_) => None,
            PreparedList::Remote(r) => Some(r.peer()),
        }
    }

    /// The list as the local side of a transfer.
    pub fn local(&self) -> Result<&LocalDescs> {
        match self {
            PreparedList::Local(l) => Ok(l),
            PreparedList::Remote(_) => Err(Error::InvalidArgument("the local list was prepared for a peer".into())),
        }
    }

    /// The list as the remote side of a transfer.
    pub fn remote(&self) -> Result<&RemoteDescs> {
        match self {
            PreparedList::Remote(r) => Ok(r),
            PreparedList::Local(_) => {
                Err(Error::InvalidArgument("the remote list was prepared for local memory".into()))
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PreparedDesc {
    addr: u64,
    len: u64,
    slot: u32,
    /// The transports holding a key for the region: a transfer goes over a link all its pairs share.
    kinds: Kinds,
}

impl std::fmt::Debug for LocalReg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalReg").field("id", &self.id).field("region", &self.region).finish()
    }
}

impl LocalDescs {
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }
}

impl RemoteDescs {
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// The peer the list targets.
    pub fn peer(&self) -> &str {
        &self.peer
    }
}

/// What to move: pairs `local[local_indices[i]]` ↔ `remote[remote_indices[i]]`.
pub struct TransferRequest<'a> {
    pub op: Op,
    pub local: &'a LocalDescs,
    pub local_indices: &'a [usize],
    pub remote: &'a RemoteDescs,
    pub remote_indices: &'a [usize],
    /// Delivered to the peer once all the data is in place.
    pub notification: Option<&'a [u8]>,
    pub deadline: Deadline,
}

impl<'a> TransferRequest<'a> {
    /// A request without a notification; set `notification` on the result to add one.
    pub fn new(
        op: Op,
        (local, local_indices): (&'a LocalDescs, &'a [usize]),
        (remote, remote_indices): (&'a RemoteDescs, &'a [usize]),
        deadline: Deadline,
    ) -> Self {
        TransferRequest { op, local, local_indices, remote, remote_indices, notification: None, deadline }
    }
}

/// A posted transfer.
pub struct Transfer {
    completion: Arc<Completion>,
    ops: usize,
    post_time: Duration,
    transport: TransportKind,
    mode: Option<&'static str>,
}

impl Transfer {
    pub fn poll(&self) -> TransferStatus {
        self.completion.status()
    }

    /// Block until the transfer completes, fails or reaches its deadline.
    pub fn wait(&self) -> Result<()> {
        self.completion.wait().map_err(Error::from)
    }

    /// Block until the transfer completes or fails, or `until` passes first: `None` then, and the
    /// transfer goes on (its own deadline still bounds it).
    pub fn wait_until(&self, until: Deadline) -> Option<Result<()>> {
        self.completion.wait_until(until).map(|outcome| outcome.map_err(Error::from))
    }

    /// Stop the transfer. Returns once it no longer touches local memory: over TCP at once (a part
    /// on a socket is cut off by shutting the socket down, and waited for); over transports that
    /// cannot interrupt a running part, once its parts have reported or at its deadline.
    pub fn cancel(&self) {
        self.completion.cancel()
    }

    pub fn peer(&self) -> &str {
        self.completion.peer()
    }

    pub fn bytes(&self) -> u64 {
        self.completion.bytes()
    }

    /// Ops on the wire after coalescing adjacent descriptor pairs.
    pub fn ops(&self) -> usize {
        self.ops
    }

    /// How long posting took on the caller's thread.
    pub fn post_time(&self) -> Duration {
        self.post_time
    }

    /// The transport that moves this transfer.
    pub fn transport(&self) -> TransportKind {
        self.transport
    }

    /// How the transport moves it, where it has more than one way: `mapped`, `cross-memory` or
    /// `mapped+cross-memory` for shm.
    pub fn mode(&self) -> Option<&'static str> {
        self.mode
    }

    /// From post to completion, once completed.
    pub fn elapsed(&self) -> Option<Duration> {
        self.completion.elapsed()
    }
}

fn check_range(index: usize, d: &MemRegion) -> Result<(), DescError> {
    if d.len == 0 {
        return Err(DescError::ZeroLength { index });
    }
    if d.end().is_none() {
        return Err(DescError::RangeOverflow { index, addr: d.addr, len: d.len });
    }
    Ok(())
}

impl Agent {
    pub fn new(config: AgentConfig) -> Result<Agent> {
        if config.name.is_empty() || config.name.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument("an agent name must be 1 to 65535 bytes".into()));
        }
        let mut auth = Auth::resolve(&config.auth)?;
        if let Some(tls) = &config.tls {
            auth = auth.with_tls(tls)?;
        }
        let limits = config.limits.clone();
        let notifications =
            Arc::new(NotificationQueue::with_limits(limits.max_notifications, limits.max_notification_bytes));
        let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
        let stager = config.staging.map(Stager::new).transpose()?.map(Arc::new);
        // In order of preference: add_peer links a peer through the first of these that reaches it.
        #[cfg(feature = "cuda")]
        if let Some(ipc) = config.cuda_ipc {
            let ipc = crate::transport::cuda_ipc::CudaIpcTransport::start(
                &config.name,
                ipc,
                auth.clone(),
                notifications.clone(),
            )?;
            transports.push(Arc::new(ipc));
        }
        if let Some(shm) = config.shm {
            // Shared memory only speeds up same-host peers: a system without it still has an agent.
            match ShmTransport::start(&config.name, shm, auth.clone(), notifications.clone()) {
                Ok(t) => transports.push(Arc::new(t)),
                Err(e) => tracing::warn!(error = %e, "the shm transport is unavailable; peers use the others"),
            }
        }
        #[cfg(feature = "fabric")]
        if let Some(fabric) = config.fabric {
            let fabric = crate::transport::fabric::FabricTransport::start(
                &config.name,
                fabric,
                auth.clone(),
                notifications.clone(),
            )?;
            transports.push(Arc::new(fabric));
        }
        if let Some(tcp) = config.tcp {
            transports.push(Arc::new(TcpTransport::start_staged(
                &config.name,
                tcp,
                auth.clone(),
                notifications.clone(),
                stager.clone(),
            )?));
        }
        if transports.is_empty() {
            return Err(Error::InvalidArgument("an agent needs at least one transport".into()));
        }
        Ok(Agent {
            inner: Arc::new(AgentInner {
                name: config.name,
                transports,
                registry: Mutex::new(BTreeMap::new()),
                next_reg_id: AtomicU64::new(1),
                generation: AtomicU64::new(1),
                peers: RwLock::new(HashMap::new()),
                notifications,
                side_channel: Mutex::new(None),
                metrics: Arc::new(Metrics::default()),
                auth,
                limits,
                started: Instant::now(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// How this agent authenticates its peers.
    pub fn auth(&self) -> &Auth {
        &self.inner.auth
    }

    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.inner.transports.iter().map(|t| t.endpoint()).collect()
    }

    /// Register memory the registration keeps alive.
    pub fn register(&self, memory: Arc<dyn Memory>) -> Result<Registration> {
        let region = memory.region();
        self.inner.register(self, region, Some(memory), None)
    }

    /// Register memory the registration keeps alive with only some of the enabled transports: a
    /// region kept off shared memory, say. Transfers touching it go over a link of one of these.
    pub fn register_with(&self, memory: Arc<dyn Memory>, transports: &[TransportKind]) -> Result<Registration> {
        let region = memory.region();
        self.inner.register(self, region, Some(memory), Some(transports))
    }

    /// Register memory owned elsewhere (a framework's tensor, say).
    ///
    /// # Safety
    /// The region must be valid memory of its kind until the returned [`Registration`] is dropped.
    pub unsafe fn register_raw(&self, region: MemRegion) -> Result<Registration> {
        self.inner.register(self, region, None, None)
    }

    /// This agent's metadata as of now, for peers.
    pub fn metadata(&self) -> Vec<u8> {
        self.inner.metadata().encode()
    }

    /// Add (or update) a peer from its metadata; returns its name. The peer is linked through every
    /// transport both agents enable that reaches it; TCP connects on first use, shm checks now that
    /// the peer shares this kernel.
    pub fn add_peer(&self, metadata: &[u8]) -> Result<String> {
        self.inner.add_peer(metadata)
    }

    /// Forget a peer. Transfers already posted to it run on to their end.
    pub fn remove_peer(&self, name: &str) -> Result<()> {
        self.inner.remove_peer(name).map(drop)
    }

    /// The peer is known to be gone (its discovery lease expired, say): forget it and fail its
    /// pending transfers at once with [`TransferError::PeerDisconnected`](crate::transport::TransferError)
    /// carrying `cause`, rather than letting them wait for a connection that will not answer
    /// until their deadlines. Returns how many transfers were failed.
    pub fn peer_gone(&self, name: &str, cause: &str) -> Result<usize> {
        self.inner.peer_gone(name, cause)
    }

    /// The counters of this agent's transfers; render them, or attach tier stores to them.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    pub fn peers(&self) -> Vec<String> {
        self.inner.peers.read_locked().keys().cloned().collect()
    }

    pub fn peer_metadata(&self, name: &str) -> Option<AgentMetadata> {
        self.inner.peers.read_locked().get(name).map(|p| p.meta.clone())
    }

    /// The transport this agent prefers for a peer: notifications alone go over it, and every
    /// transfer whose descriptors it can reach.
    pub fn peer_transport(&self, name: &str) -> Option<TransportKind> {
        self.inner.peers.read_locked().get(name).map(|p| p.preferred().0)
    }

    /// Every transport linking this agent to a peer, most preferred first.
    pub fn peer_transports(&self, name: &str) -> Option<Vec<TransportKind>> {
        self.inner.peers.read_locked().get(name).map(|p| p.links.iter().map(|(kind, _)| *kind).collect())
    }

    /// Check local descriptors against this agent's registrations.
    pub fn prepare_local(&self, descs: &[MemRegion]) -> Result<LocalDescs> {
        let registry = self.inner.registry.locked();
        let mut regs: Vec<Weak<LocalReg>> = Vec::new();
        let mut slots: HashMap<u64, u32> = HashMap::new();
        let mut prepared = Vec::with_capacity(descs.len());
        for (index, d) in descs.iter().enumerate() {
            check_range(index, d)?;
            // Registrations may overlap: walk back from the address to the first that holds it.
            let reg = registry
                .range(..=(d.addr, u64::MAX))
                .rev()
                .map(|(_, r)| r)
                .find(|r| r.region.kind == d.kind && r.region.contains(d.addr, d.len))
                .ok_or(DescError::NotRegistered { index, addr: d.addr, len: d.len })?;
            let slot = *slots.entry(reg.id).or_insert_with(|| {
                regs.push(Arc::downgrade(reg));
                (regs.len() - 1) as u32
            });
            prepared.push(PreparedDesc { addr: d.addr, len: d.len, slot, kinds: Kinds::keyed(&reg.keys) });
        }
        Ok(LocalDescs { agent: self.id(), regs, descs: prepared })
    }

    /// Check remote descriptors against the regions the peer advertised.
    pub fn prepare_remote(&self, peer: &str, descs: &[MemRegion]) -> Result<RemoteDescs> {
        let peer_entry = self.inner.peer(peer)?;
        let regions = &peer_entry.meta.regions;
        let linked = peer_entry.kinds();
        let mut prepared = Vec::with_capacity(descs.len());
        let mut last_slot = 0usize;
        for (index, d) in descs.iter().enumerate() {
            check_range(index, d)?;
            // The region must also be open to a transport that links this peer.
            let holds = |r: &RegionInfo| {
                r.region.kind == d.kind
                    && r.region.contains(d.addr, d.len)
                    && !Kinds::keyed(&r.keys).and(linked).is_empty()
            };
            // Consecutive descriptors usually fall in the same region: try it first.
            let slot = match regions.get(last_slot) {
                Some(r) if holds(r) => last_slot,
                _ => regions.iter().position(holds).ok_or_else(|| DescError::RemoteRegionUnknown {
                    peer: peer.into(),
                    index,
                    addr: d.addr,
                    len: d.len,
                })?,
            };
            last_slot = slot;
            let kinds = Kinds::keyed(&regions[slot].keys).and(linked);
            prepared.push(PreparedDesc { addr: d.addr, len: d.len, slot: slot as u32, kinds });
        }
        Ok(RemoteDescs { peer: peer.into(), generation: peer_entry.meta.generation, descs: prepared })
    }

    /// Read `remote[remote_indices[i]]` into `local[local_indices[i]]`.
    pub fn read(
        &self,
        local: &LocalDescs,
        local_indices: &[usize],
        remote: &RemoteDescs,
        remote_indices: &[usize],
        deadline: Deadline,
    ) -> Result<Transfer> {
        self.post(TransferRequest::new(Op::Read, (local, local_indices), (remote, remote_indices), deadline))
    }

    /// Write `local[local_indices[i]]` into `remote[remote_indices[i]]`.
    pub fn write(
        &self,
        local: &LocalDescs,
        local_indices: &[usize],
        remote: &RemoteDescs,
        remote_indices: &[usize],
        deadline: Deadline,
    ) -> Result<Transfer> {
        self.post(TransferRequest::new(Op::Write, (local, local_indices), (remote, remote_indices), deadline))
    }

    /// Send a notification alone.
    pub fn notify(&self, peer: &str, data: &[u8], deadline: Deadline) -> Result<Transfer> {
        let started = Instant::now();
        let peer_entry = self.inner.peer(peer)?;
        let link = peer_entry.preferred();
        check_notification(link, data)?;
        let completion = Completion::new(peer, Op::Notify, 0, Some(data.to_vec()), deadline);
        self.submit(&peer_entry, link, started, Vec::new(), completion, Vec::new())
    }

    /// Post a transfer. Never blocks on the network: completion comes through the handle.
    pub fn post(&self, req: TransferRequest<'_>) -> Result<Transfer> {
        let started = Instant::now();
        if req.op == Op::Notify {
            return Err(Error::InvalidArgument("use Agent::notify for a notification without data".into()));
        }
        let (regs, peer) = (&req.local.regs, &req.remote.peer);
        if req.local.agent != self.id() {
            return Err(Error::InvalidArgument("the local list was prepared by another agent".into()));
        }
        let peer_entry = self.inner.peer(peer)?;
        if peer_entry.meta.generation != req.remote.generation {
            return Err(DescError::Stale { peer: peer.clone() }.into());
        }
        if req.local_indices.len() != req.remote_indices.len() {
            return Err(Error::InvalidArgument(format!(
                "{} local indices but {} remote indices",
                req.local_indices.len(),
                req.remote_indices.len()
            )));
        }
        if req.local_indices.is_empty() && req.notification.is_none() {
            return Err(DescError::EmptyTransfer.into());
        }
        let pick = |list: &[PreparedDesc], index: usize| {
            list.get(index).copied().ok_or(DescError::IndexOutOfRange { index, len: list.len() })
        };
        // Upgrade each registration once (with the first index using it): the batch holds them
        // until its last part is done.
        let mut held: Vec<Option<(Arc<LocalReg>, DescError)>> = vec![None; regs.len()];
        let mut ops: Vec<XferOp> = Vec::with_capacity(req.local_indices.len());
        let mut last_local_slot = u32::MAX;
        let mut bytes = 0u64;
        let mut shared = Kinds::ALL;
        for (position, (&li, &ri)) in req.local_indices.iter().zip(req.remote_indices).enumerate() {
            let (l, r) = (pick(&req.local.descs, li)?, pick(&req.remote.descs, ri)?);
            if l.len != r.len {
                return Err(DescError::LengthMismatch { position, local_len: l.len, remote_len: r.len }.into());
            }
            let reg = &mut held[l.slot as usize];
            if reg.is_none() {
                let not_registered = DescError::NotRegistered { index: li, addr: l.addr, len: l.len };
                *reg = Some((regs[l.slot as usize].upgrade().ok_or(not_registered.clone())?, not_registered));
            }
            bytes += l.len;
            shared = shared.and(l.kinds).and(r.kinds);
            // Coalesce pairs that continue the previous op on both sides.
            if let Some(prev) = ops.last_mut()
                && last_local_slot == l.slot
                && prev.remote_region == r.slot
                && prev.local_addr + prev.len == l.addr
                && prev.remote_addr + prev.len == r.addr
            {
                prev.len += l.len;
                continue;
            }
            last_local_slot = l.slot;
            ops.push(XferOp { local_addr: l.addr, remote_region: r.slot, remote_addr: r.addr, len: l.len });
        }
        let link = peer_entry
            .links
            .iter()
            .find(|(kind, _)| shared.has(*kind))
            .ok_or_else(|| DescError::NoCommonLink { peer: peer.clone(), gaps: link_gaps(&peer_entry, &req) })?;
        if let Some(n) = req.notification {
            check_notification(link, n)?;
        }
        let held: Vec<(Arc<LocalReg>, DescError)> = held.into_iter().flatten().collect();
        let notification = req.notification.map(<[u8]>::to_vec);
        let completion = Completion::new(peer, req.op, bytes, notification, req.deadline);
        self.submit(&peer_entry, link, started, ops, completion, held)
    }

    /// Hand the batch on the local registrations `regs` (each with the error naming the first
    /// descriptor in it, should it be going away) to one of the peer's links; `started` is when the
    /// caller entered `post`.
    fn submit(
        &self,
        peer: &Peer,
        (transport, link): &(TransportKind, Arc<dyn PeerLink>),
        started: Instant,
        ops: Vec<XferOp>,
        completion: Completion,
        regs: Vec<(Arc<LocalReg>, DescError)>,
    ) -> Result<Transfer> {
        let n_ops = ops.len();
        let mode = link.mode(&ops);
        let completion = Arc::new(completion.observed(self.inner.metrics.clone(), *transport));
        // A registration being dropped has stopped taking transfers: its memory is going away.
        if let Some((_, not_registered)) = regs.iter().find(|(r, _)| !r.transfers.push(&completion)) {
            completion.abandon();
            return Err(not_registered.clone().into());
        }
        peer.last_used.store(self.inner.now_ms(), Ordering::Relaxed);
        peer.pending.push(&completion);
        let keep_alive: Arc<dyn Any + Send + Sync> = Arc::new(regs);
        if let Err(e) = link.post(Batch { ops, completion: completion.clone(), keep_alive }) {
            completion.abandon();
            return Err(e);
        }
        Ok(Transfer { completion, ops: n_ops, post_time: started.elapsed(), transport: *transport, mode })
    }

    /// Notifications received so far (emptied by the call).
    pub fn take_notifications(&self) -> Vec<Notification> {
        self.inner.notifications.take()
    }

    /// Wait until at least one notification has arrived or the deadline passes, then take them all.
    pub fn wait_notifications(&self, deadline: Deadline) -> Vec<Notification> {
        self.inner.notifications.wait(deadline)
    }

    /// Serve this agent's metadata on `listen` so peers can find it from `host:port` alone.
    /// Returns the bound address. Peers that send their own metadata are added as peers.
    pub fn serve_side_channel(&self, listen: SocketAddr) -> Result<SocketAddr> {
        let host: Weak<dyn MetadataHost> = Arc::downgrade(&self.inner) as Weak<AgentInner>;
        let server =
            side_channel::serve(host, self.inner.auth.clone(), listen, self.inner.limits.side_channel.clone())?;
        let addr = server.local_addr();
        *self.inner.side_channel.locked() = Some(server);
        Ok(addr)
    }

    /// Exchange metadata with the agent serving a side channel at `addr` and add it as a peer.
    pub fn connect_peer(&self, addr: &str, deadline: Deadline) -> Result<String> {
        let theirs = side_channel::exchange(&self.inner.auth, addr, Some(&self.metadata()), deadline)?;
        self.add_peer(&theirs)
    }

    fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    /// A reference that does not keep the agent alive, for its background threads.
    #[cfg(feature = "etcd")]
    pub(crate) fn downgrade(&self) -> Weak<AgentInner> {
        Arc::downgrade(&self.inner)
    }

    #[cfg(feature = "etcd")]
    pub(crate) fn upgrade(inner: &Weak<AgentInner>) -> Option<Agent> {
        inner.upgrade().map(|inner| Agent { inner })
    }

    /// Increases on every registration change, and with it [`metadata`](Self::metadata).
    #[cfg(feature = "etcd")]
    pub(crate) fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }
}

/// For each of the peer's links, the first descriptor of an (already checked) request it has no key for.
fn link_gaps(peer: &Peer, req: &TransferRequest<'_>) -> Vec<LinkGap> {
    let pairs = || req.local_indices.iter().zip(req.remote_indices);
    let lacks = |list: &[PreparedDesc], index: usize, kind| !list[index].kinds.has(kind);
    peer.links
        .iter()
        .filter_map(|&(transport, _)| {
            pairs().find_map(|(&li, &ri)| {
                let gap = |side, index| Some(LinkGap { transport, side, index });
                if lacks(&req.local.descs, li, transport) {
                    gap(DescSide::Local, li)
                } else if lacks(&req.remote.descs, ri, transport) {
                    gap(DescSide::Remote, ri)
                } else {
                    None
                }
            })
        })
        .collect()
}

fn check_notification((transport, link): &(TransportKind, Arc<dyn PeerLink>), data: &[u8]) -> Result<()> {
    let limit = link.max_notification();
    if data.len() as u64 > limit {
        return Err(Error::InvalidArgument(format!(
            "a notification of {} bytes exceeds the {transport} transport's limit of {limit}",
            data.len(),
        )));
    }
    Ok(())
}

impl AgentInner {
    /// Registers with every enabled transport that moves the region's memory, or with those of
    /// `only` among them.
    fn register(
        &self,
        agent: &Agent,
        region: MemRegion,
        owner: Option<Arc<dyn Memory>>,
        only: Option<&[TransportKind]>,
    ) -> Result<Registration> {
        if region.len == 0 || region.end().is_none() {
            return Err(Error::InvalidArgument(format!(
                "cannot register {:#x}+{}: empty or past the end of the address space",
                region.addr, region.len
            )));
        }
        let mut keys = Vec::new();
        let wanted = |t: &&Arc<dyn Transport>| t.supports(region.kind) && only.is_none_or(|o| o.contains(&t.kind()));
        for t in self.transports.iter().filter(wanted) {
            match t.register(region, owner.clone()) {
                Ok(key) => keys.push((t.kind(), key)),
                Err(e) => {
                    self.revoke(&keys);
                    return Err(e);
                }
            }
        }
        if keys.is_empty() {
            return Err(Error::Unsupported {
                what: format!("registering {} memory", region.kind),
                why: match only {
                    None => "no enabled transport can move it".into(),
                    Some(only) => {
                        let names: Vec<&str> = only.iter().map(|k| k.name()).collect();
                        format!("none of the enabled transports among [{}] can move it", names.join(", "))
                    }
                },
            });
        }
        let id = self.next_reg_id.fetch_add(1, Ordering::Relaxed);
        let reg = Arc::new(LocalReg { id, region, keys, owner, transfers: Pending::default() });
        self.registry.locked().insert((region.addr, id), reg.clone());
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(Registration { agent: Arc::downgrade(&agent.inner), reg })
    }

    /// Take a registration out of the registry: no new prepared list finds it, and metadata from
    /// now on omits it.
    fn unlist(&self, reg: &LocalReg) {
        self.registry.locked().remove(&(reg.region.addr, reg.id));
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn revoke(&self, keys: &[(TransportKind, Vec<u8>)]) {
        for (kind, key) in keys {
            if let Some(t) = self.transports.iter().find(|t| t.kind() == *kind) {
                t.deregister(key);
            }
        }
    }

    pub(crate) fn metadata(&self) -> AgentMetadata {
        let registry = self.registry.locked();
        AgentMetadata {
            name: self.name.clone(),
            generation: self.generation.load(Ordering::Acquire),
            endpoints: self.transports.iter().map(|t| t.endpoint()).collect(),
            regions: registry.values().map(|r| RegionInfo { region: r.region, keys: r.keys.clone() }).collect(),
        }
    }

    fn peer(&self, name: &str) -> Result<Arc<Peer>> {
        self.peers.read_locked().get(name).cloned().ok_or_else(|| DescError::UnknownPeer { peer: name.into() }.into())
    }

    pub(crate) fn add_peer(&self, bytes: &[u8]) -> Result<String> {
        self.link_peer(AgentMetadata::decode(bytes)?, false)
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

impl MetadataHost for AgentInner {
    fn encoded_metadata(&self) -> Vec<u8> {
        self.metadata().encode()
    }

    /// Add the peer whose EXCHANGE arrived on the side channel. Such peers are bounded in number:
    /// idle ones are forgotten first, and when none is, a new one is refused as busy.
    fn add_exchanged_peer(&self, bytes: &[u8]) -> Result<String> {
        let meta = AgentMetadata::decode(bytes)?;
        let idle_ms = self.limits.peer_idle_timeout.as_millis() as u64;
        let now = self.now_ms();
        let mut peers = self.peers.write_locked();
        if !peers.contains_key(&meta.name) {
            let exchanged = peers.values().filter(|p| p.exchanged).count();
            if exchanged >= self.limits.max_peers {
                peers.retain(|name, p| {
                    let keep = !p.exchanged || now.saturating_sub(p.last_used.load(Ordering::Relaxed)) < idle_ms;
                    if !keep {
                        tracing::info!(peer = %name, "forgetting a peer idle since it exchanged metadata");
                    }
                    keep
                });
                if peers.values().filter(|p| p.exchanged).count() >= self.limits.max_peers {
                    return Err(TransferError::PeerBusy {
                        peer: meta.name,
                        op: Op::Notify,
                        cause: format!("this agent holds {} peers added by exchange", self.limits.max_peers),
                    }
                    .into());
                }
            }
        }
        drop(peers);
        self.link_peer(meta, true)
    }
}

impl AgentInner {
    fn link_peer(&self, meta: AgentMetadata, exchanged: bool) -> Result<String> {
        if meta.name == self.name {
            return Err(Error::InvalidArgument(format!("metadata of {} is this agent's own", meta.name)));
        }
        if let Some(known) = self.peers.read_locked().get(&meta.name) {
            let unchanged = known.meta.endpoints == meta.endpoints && known.meta.regions == meta.regions;
            if unchanged || known.meta.generation > meta.generation {
                // Nothing new, or older news: keep the link, its connections and prepared lists valid.
                known.last_used.store(self.now_ms(), Ordering::Relaxed);
                return Ok(meta.name);
            }
        }
        // Our transports in order (cuda-ipc, shm, then the rest): a transport that cannot link this
        // peer (another host, an unreachable socket) is left out of its links.
        let mut refused = Error::Unsupported {
            what: format!("talking to peer {}", meta.name),
            why: "it shares no transport with this agent".into(),
        };
        let mut links = Vec::new();
        for (transport, endpoint) in
            self.transports.iter().filter_map(|t| meta.endpoints.iter().find(|e| e.kind == t.kind()).map(|e| (t, e)))
        {
            let regions = meta
                .regions
                .iter()
                .map(|r| RemoteRegion { region: r.region, key: r.key(transport.kind()).unwrap_or_default().to_vec() })
                .collect();
            match transport.link(&meta.name, endpoint, regions) {
                Ok(link) => links.push((transport.kind(), link)),
                Err(e) => {
                    tracing::debug!(peer = %meta.name, transport = %transport.kind(), error = %e, "not linked");
                    refused = e;
                }
            }
        }
        if links.is_empty() {
            return Err(refused);
        }
        let name = meta.name.clone();
        let mut peers = self.peers.write_locked();
        let known = peers.get(&name);
        let pending = known.map(|p| p.pending.clone()).unwrap_or_default();
        // A peer the caller added stays one the caller added.
        let exchanged = exchanged && known.is_none_or(|p| p.exchanged);
        let last_used = AtomicU64::new(self.now_ms());
        peers.insert(name.clone(), Arc::new(Peer { meta, links, pending, exchanged, last_used }));
        Ok(name)
    }

    fn remove_peer(&self, name: &str) -> Result<Arc<Peer>> {
        self.peers.write_locked().remove(name).ok_or_else(|| DescError::UnknownPeer { peer: name.into() }.into())
    }

    pub(crate) fn peer_gone(&self, name: &str, cause: &str) -> Result<usize> {
        let peer = self.remove_peer(name)?;
        let pending = peer.pending.take();
        for completion in &pending {
            let op = completion.op();
            completion.fail(TransferError::PeerDisconnected { peer: name.into(), op, cause: cause.into() });
        }
        tracing::info!(peer = name, cause, failed = pending.len(), "peer gone");
        Ok(pending.len())
    }
}
