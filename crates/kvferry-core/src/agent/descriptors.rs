//! Descriptors checked once and reused: local ones against this agent's registrations, remote
//! ones against the regions a peer advertised, each with the transports that hold a key for it.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use super::Agent;
use super::registry::{Kinds, LocalReg};
use crate::descriptor::DescError;
use crate::error::{Error, Result};
use crate::memory::MemRegion;
use crate::metadata::RegionInfo;
use crate::sync::Locked;

/// Local descriptors checked once against this agent's registrations and reused: transfers pick
/// entries by index. A distinct type from [`RemoteDescs`], so the two cannot be swapped.
#[derive(Debug, Clone)]
pub struct LocalDescs {
    /// The agent that prepared them.
    pub(super) agent: usize,
    /// `regs[slot]` is the registration holding each descriptor. Weak, so a prepared list never
    /// keeps memory registered.
    pub(super) regs: Vec<Weak<LocalReg>>,
    pub(super) descs: Vec<PreparedDesc>,
}

/// A peer's descriptors checked once against the regions it advertised, and reused.
#[derive(Debug, Clone)]
pub struct RemoteDescs {
    pub(super) peer: String,
    /// `slot` indexes the peer's regions as of this generation of its metadata.
    pub(super) generation: u64,
    pub(super) descs: Vec<PreparedDesc>,
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
pub(super) struct PreparedDesc {
    pub(super) addr: u64,
    pub(super) len: u64,
    pub(super) slot: u32,
    /// The transports holding a key for the region: a transfer goes over a link all its pairs share.
    pub(super) kinds: Kinds,
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
}
