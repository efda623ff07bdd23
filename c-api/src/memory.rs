//! Registered memory and prepared descriptor lists.

use kvferry_core::{MemKind, MemRegion, PreparedList, Registration};

use crate::agent::kvferry_agent;
use crate::args::{Out, slice_arg};
use crate::handles::{self, Kind, handle};
use crate::peer::kvferry_peer;
use crate::status::{CResult, Failure, guard, kvferry_status};

/// Where a region's memory lives (`kvferry_region::mem_kind`).
pub type kvferry_mem_kind = u32;
pub const KVFERRY_MEM_HOST: kvferry_mem_kind = 0;
pub const KVFERRY_MEM_CUDA: kvferry_mem_kind = 1;
pub const KVFERRY_MEM_ROCM: kvferry_mem_kind = 2;

/// A span of memory: `len` bytes at `addr`, of kind `mem_kind`; `device` is the GPU ordinal for
/// GPU memory and 0 for host memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_region {
    pub addr: u64,
    pub len: u64,
    pub mem_kind: kvferry_mem_kind,
    pub device: u32,
}

impl kvferry_region {
    fn to_mem_region(self, index: usize) -> CResult<MemRegion> {
        let kind = match self.mem_kind {
            KVFERRY_MEM_HOST => MemKind::Host,
            KVFERRY_MEM_CUDA => MemKind::Cuda { device: self.device },
            KVFERRY_MEM_ROCM => MemKind::Rocm { device: self.device },
            other => return Err(Failure::invalid_argument(format!("region {index}: unknown memory kind {other}"))),
        };
        Ok(MemRegion { addr: self.addr, len: self.len, kind })
    }
}

pub(crate) fn mem_regions(regions: &[kvferry_region]) -> CResult<Vec<MemRegion>> {
    regions.iter().enumerate().map(|(i, r)| r.to_mem_region(i)).collect()
}

/// Memory registered with an agent, open to its peers through the keys in the agent's metadata.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_registration {
    pub id: u64,
}

handle!(kvferry_registration, Registration, Kind::Registration);

/// A list of memory spans checked once (local: against this agent's registrations; remote:
/// against the regions a peer published); transfers pick entries by index.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_descs {
    pub id: u64,
}

handle!(kvferry_descs, PreparedList, Kind::Descs);

/// Register `region` with every transport of the agent that can move its kind of memory, and store
/// the registration in `*out`. Peers see it in metadata the agent publishes from now on.
///
/// Ownership: the memory stays the caller's and must stay valid until the registration is
/// destroyed (directly or by `kvferry_agent_destroy`); kvferry neither frees nor copies it.
/// `*out` belongs to the agent.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_register(
    agent: kvferry_agent,
    region: kvferry_region,
    out: *mut kvferry_registration,
) -> kvferry_status {
    guard(|| {
        let out = unsafe { Out::new(out, "out") }?;
        let region = region.to_mem_region(0)?;
        let state = handles::get(agent)?;
        // SAFETY: the caller keeps the memory valid until the registration is destroyed, as the
        // header states; destroying it waits for local transfers still using the memory.
        let registration = unsafe { state.agent.register_raw(region) }?;
        out.set(handles::insert(agent, registration.into())?);
        Ok(())
    })
}

/// Deregister: peers lose access (requests they have in flight finish first), and once this
/// returns no local transfer touches the memory, so the caller may free it.
///
/// Ownership: consumes `registration`; every copy of the handle becomes invalid.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_registration_destroy(registration: kvferry_registration) -> kvferry_status {
    guard(|| handles::remove(registration).map(drop))
}

/// Check `count` local spans against the agent's registrations and store the prepared list in
/// `*out`. A list never keeps memory registered: a transfer using a span whose registration was
/// destroyed fails with `KVFERRY_ERR_NOT_REGISTERED`.
///
/// Ownership: `regions` is borrowed for the call (the list keeps its own copy). `*out` belongs to
/// the agent: release it with `kvferry_descs_destroy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_descs_prepare_local(
    agent: kvferry_agent,
    regions: *const kvferry_region,
    count: usize,
    out: *mut kvferry_descs,
) -> kvferry_status {
    unsafe {
        prepare(regions, count, out, |regions| {
            let state = handles::get(agent)?;
            Ok((PreparedList::Local(state.agent.prepare_local(regions)?), agent))
        })
    }
}

/// Check `count` spans of the peer's memory against the regions it published and store the
/// prepared list in `*out`. A list prepared before the peer's metadata changed fails with
/// `KVFERRY_ERR_STALE_DESCRIPTORS`; prepare it again.
///
/// Ownership: as for `kvferry_descs_prepare_local`; the list belongs to the peer's agent.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_descs_prepare_remote(
    peer: kvferry_peer,
    regions: *const kvferry_region,
    count: usize,
    out: *mut kvferry_descs,
) -> kvferry_status {
    unsafe {
        prepare(regions, count, out, |regions| {
            let (peer, agent) = handles::lookup(peer)?;
            Ok((
                PreparedList::Remote(peer.agent.agent.prepare_remote(&peer.name, regions)?),
                kvferry_agent { id: agent },
            ))
        })
    }
}

/// Both prepare functions: check the arguments, prepare the list, and hand it out as a dependent of
/// the agent `prepare_with` names.
unsafe fn prepare(
    regions: *const kvferry_region,
    count: usize,
    out: *mut kvferry_descs,
    prepare_with: impl FnOnce(&[MemRegion]) -> CResult<(PreparedList, kvferry_agent)>,
) -> kvferry_status {
    guard(|| {
        let regions = unsafe { slice_arg(regions, count, "regions") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let (descs, agent) = prepare_with(&mem_regions(regions)?)?;
        out.set(handles::insert(agent, descs.into())?);
        Ok(())
    })
}

/// Release a descriptor list. Transfers already posted with it are unaffected.
///
/// Ownership: consumes `descs`; every copy of the handle becomes invalid.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_descs_destroy(descs: kvferry_descs) -> kvferry_status {
    guard(|| handles::remove(descs).map(drop))
}
