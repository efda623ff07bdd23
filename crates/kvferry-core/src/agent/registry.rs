//! Memory this agent registered: each registration's keys (one per transport), the registry
//! prepared lists are checked against, and the metadata peers get.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use super::pending::Pending;
use super::{Agent, AgentInner};
use crate::error::{Error, Result};
use crate::memory::{MemRegion, Memory};
use crate::metadata::{AgentMetadata, RegionInfo};
use crate::sync::Locked;
use crate::transport::{Transport, TransportKind};

/// A set of transports, one bit per wire tag: small enough to keep with every prepared descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Kinds(u32);

impl Kinds {
    pub(super) const ALL: Kinds = Kinds(u32::MAX);

    pub(super) fn of(kinds: impl IntoIterator<Item = TransportKind>) -> Kinds {
        Kinds(kinds.into_iter().fold(0, |bits, k| bits | 1 << k.to_wire()))
    }

    pub(super) fn keyed(keys: &[(TransportKind, Vec<u8>)]) -> Kinds {
        Kinds::of(keys.iter().map(|(kind, _)| *kind))
    }

    pub(super) fn and(self, other: Kinds) -> Kinds {
        Kinds(self.0 & other.0)
    }

    pub(super) fn has(self, kind: TransportKind) -> bool {
        self.0 & 1 << kind.to_wire() != 0
    }

    pub(super) fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// Registrations by (start address, id): a lookup walks back from the address.
pub(super) type Registry = BTreeMap<(u64, u64), Arc<LocalReg>>;

/// A registered region on this agent.
pub(super) struct LocalReg {
    pub(super) id: u64,
    pub(super) region: MemRegion,
    pub(super) keys: Vec<(TransportKind, Vec<u8>)>,
    /// Keeps owned memory alive; `None` for raw registrations, whose owner promised to keep it.
    pub(super) owner: Option<Arc<dyn Memory>>,
    /// The local transfers posted on this memory that may not have settled, so that dropping the
    /// registration can stop them. Closed by the drop: later posts fail with `NotRegistered`.
    pub(super) transfers: Pending,
}

/// Keeps a region registered; deregisters it when dropped.
///
/// The drop first stops every local transfer posted on the region (as [`Transfer::cancel`](super::Transfer::cancel) does:
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

impl std::fmt::Debug for LocalReg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalReg").field("id", &self.id).field("region", &self.region).finish()
    }
}

impl Agent {
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
}
