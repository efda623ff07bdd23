//! The agents this one talks to: each peer's metadata and its links (one per transport that
//! reaches it, in order of preference), added by the caller or by their own EXCHANGE on the side
//! channel (bounded in number, forgotten once idle).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::pending::Pending;
use super::registry::Kinds;
use super::{Agent, AgentInner};
use crate::descriptor::DescError;
use crate::error::{Error, Result};
use crate::metadata::AgentMetadata;
use crate::side_channel::MetadataHost;
use crate::sync::ReadWriteLocked;
use crate::transport::{Op, PeerLink, RemoteRegion, TransferError, TransportKind};

pub(super) struct Peer {
    pub(super) meta: AgentMetadata,
    /// Every transport that reached the peer, in this agent's order of preference; never empty.
    /// Each transfer takes the first that holds keys for all its descriptors.
    pub(super) links: Vec<(TransportKind, Arc<dyn PeerLink>)>,
    /// Transfers posted to the peer that may not have settled, so that [`Agent::peer_gone`] can
    /// fail them. Kept across metadata updates.
    pub(super) pending: Arc<Pending>,
    /// Added by its own EXCHANGE on the side channel (not by this agent's caller): such a peer
    /// counts against [`AgentLimits::max_peers`] and is forgotten once idle.
    pub(super) exchanged: bool,
    /// When a transfer to the peer was last posted or its metadata last arrived, in milliseconds
    /// since the agent started.
    pub(super) last_used: AtomicU64,
}

impl Peer {
    pub(super) fn preferred(&self) -> &(TransportKind, Arc<dyn PeerLink>) {
        &self.links[0]
    }

    pub(super) fn kinds(&self) -> Kinds {
        Kinds::of(self.links.iter().map(|(kind, _)| *kind))
    }
}

impl Agent {
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
}

impl AgentInner {
    pub(super) fn peer(&self, name: &str) -> Result<Arc<Peer>> {
        self.peers.read_locked().get(name).cloned().ok_or_else(|| DescError::UnknownPeer { peer: name.into() }.into())
    }

    pub(crate) fn add_peer(&self, bytes: &[u8]) -> Result<String> {
        self.link_peer(AgentMetadata::decode(bytes)?, false)
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
