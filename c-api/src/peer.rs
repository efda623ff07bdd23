//! Peers: found through metadata or the side channel, named by handle.

use std::ffi::c_char;
use std::sync::{Arc, PoisonError};

use kvferry_core::{DescError, Error};

use crate::agent::{AgentState, kvferry_agent};
use crate::args::{Out, OutBuf, deadline_ms, slice_arg, str_arg};
use crate::handles::{self, Kind, handle};
use crate::status::{CResult, guard, kvferry_status};

/// Another agent this agent can move data to and from. One peer has one handle: adding the same
/// peer again (say, with updated metadata) returns the same handle.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_peer {
    pub id: u64,
}

pub(crate) struct PeerState {
    pub agent: Arc<AgentState>,
    pub name: String,
}

handle!(kvferry_peer, PeerState, Kind::Peer);

/// The handle of `name`, a peer `state` already knows; made on first use.
fn peer_handle(agent: kvferry_agent, state: &Arc<AgentState>, name: String) -> CResult<kvferry_peer> {
    let mut peers = state.peers.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(&known) = peers.get(&name) {
        return Ok(known);
    }
    let peer = handles::insert(agent, Arc::new(PeerState { agent: state.clone(), name: name.clone() }))?;
    peers.insert(name, peer);
    Ok(peer)
}

/// Add (or update) a peer from the metadata it published (`kvferry_agent_metadata`), and store its
/// handle in `*out`. Connections open on first use, so this never blocks on the network.
///
/// Ownership: `metadata` is borrowed for the call. `*out` belongs to the agent: release it with
/// `kvferry_peer_destroy`, or let `kvferry_agent_destroy` do it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_peer_add(
    agent: kvferry_agent,
    metadata: *const u8,
    metadata_len: usize,
    out: *mut kvferry_peer,
) -> kvferry_status {
    guard(|| {
        let metadata = unsafe { slice_arg(metadata, metadata_len, "metadata") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let state = handles::get(agent)?;
        let name = state.agent.add_peer(metadata)?;
        out.set(peer_handle(agent, &state, name)?);
        Ok(())
    })
}

/// Exchange metadata with the agent serving a side channel at `address` (`"host:port"`), waiting
/// at most `timeout_ms`; both agents become peers of each other. Stores the peer in `*out`.
///
/// Ownership: as for `kvferry_peer_add`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_peer_connect(
    agent: kvferry_agent,
    address: *const c_char,
    timeout_ms: u32,
    out: *mut kvferry_peer,
) -> kvferry_status {
    guard(|| {
        let address = unsafe { str_arg(address, "address") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let state = handles::get(agent)?;
        let name = state.agent.connect_peer(address, deadline_ms(timeout_ms))?;
        out.set(peer_handle(agent, &state, name)?);
        Ok(())
    })
}

/// The handle of a peer the agent knows by name: one that connected to this agent's side channel,
/// or the sender of a notification. Returns `KVFERRY_ERR_UNKNOWN_PEER` for a name it does not know.
///
/// Ownership: as for `kvferry_peer_add`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_peer_lookup(
    agent: kvferry_agent,
    name: *const c_char,
    out: *mut kvferry_peer,
) -> kvferry_status {
    guard(|| {
        let name = unsafe { str_arg(name, "name") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let state = handles::get(agent)?;
        if state.agent.peer_metadata(name).is_none() {
            return Err(Error::from(DescError::UnknownPeer { peer: name.into() }).into());
        }
        out.set(peer_handle(agent, &state, name.to_string())?);
        Ok(())
    })
}

/// Copy the peer's agent name, NUL-terminated, into `buf`; `*len` gets its length without the
/// NUL. With a `capacity` too small, returns `KVFERRY_ERR_BUFFER_TOO_SMALL` and stores the needed
/// capacity (NUL included) in `*len`.
///
/// Ownership: `buf` and `len` are the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_peer_name(
    peer: kvferry_peer,
    buf: *mut c_char,
    capacity: usize,
    len: *mut usize,
) -> kvferry_status {
    guard(|| {
        let out = unsafe { OutBuf::new(buf.cast(), capacity, len, "the name buffer") }?;
        out.fill_c_str(&handles::get(peer)?.name)
    })
}

/// Forget a peer: the agent drops its metadata and connections. Transfers already posted to it
/// run to their end; descriptor lists prepared for it fail with `KVFERRY_ERR_UNKNOWN_PEER`.
///
/// Ownership: consumes `peer`; every copy of the handle becomes invalid.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_peer_destroy(peer: kvferry_peer) -> kvferry_status {
    guard(|| {
        let state = handles::remove(peer)?;
        // Held while the agent forgets the peer, so a concurrent add of the same name cannot be
        // forgotten with it.
        let mut peers = state.agent.peers.lock().unwrap_or_else(PoisonError::into_inner);
        peers.remove(&state.name);
        state.agent.agent.remove_peer(&state.name)?;
        Ok(())
    })
}
