//! Agents: create and destroy, metadata, the side channel, incoming notifications.

use std::collections::{HashMap, VecDeque};
use std::ffi::c_char;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use kvferry_core::{Agent, AgentConfig, Notification};

use crate::args::{KeyValue, Out, OutBuf, deadline_ms, options_arg, str_arg};
use crate::codes::KVFERRY_ERR_TIMEOUT;
use crate::handles::{self, Kind, handle};
use crate::peer::kvferry_peer;
use crate::status::{CResult, Failure, guard, kvferry_status};

/// One engine rank's endpoint: its transports, registered memory and peers.
///
/// Handles are plain values: copy them freely. `id` 0 is never a valid handle, so a
/// zero-initialized handle is safely "none". Destroying a handle invalidates every copy of it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_agent {
    pub id: u64,
}

pub(crate) struct AgentState {
    pub agent: Agent,
    /// Notifications taken from the agent and not yet handed to C, oldest first.
    notifications: Mutex<VecDeque<Notification>>,
    /// Peer name -> its handle, so one peer has one handle however often it is added.
    pub peers: Mutex<HashMap<String, kvferry_peer>>,
}

handle!(kvferry_agent, AgentState, Kind::Agent);

/// The configuration `options` give, by the parser every front end shares
/// ([`AgentConfig::with_options`]).
pub(crate) fn agent_config(name: &str, options: &[KeyValue]) -> CResult<AgentConfig> {
    Ok(AgentConfig::new(name).with_options(options.iter().copied())?)
}

/// Create an agent named `name` (unique among the agents that talk to each other).
///
/// `options` is an array of `option_count` `"key=value"` strings (NULL when `option_count` is 0),
/// the agent options every front end shares (all of them, with their defaults: `kvferry info`;
/// docs/c-api.md). Among them: `tcp=on|off`, `tcp.listen=IP:PORT` (default 127.0.0.1:0),
/// `tcp.advertise_host=HOST` (needed with a wildcard listen address), `tcp.streams=N` (default 2),
/// `tcp.connect_timeout_ms=MS`, `tcp.request_timeout_ms=MS`, `shm=on|off` (shared memory with peers
/// on this host, default on), `fabric=off|any|PROVIDER` (libfabric, in builds that have it),
/// `secret=S` (the cluster secret peers prove, at least 16 bytes; default: the `KVFERRY_SECRET` or
/// `KVFERRY_SECRET_FILE` environment variable, else a random secret of this process), `auth=none`
/// (no authentication, for closed networks only), `tls.cert=PEM`, `tls.key=PEM`, `tls.ca=PEM`
/// (paths; all three turn TLS on for the side channel and TCP, off by default; the cluster secret
/// is still proven inside it), `tls.require_client_cert=on|off`, `tls.server_name=NAME`, and the
/// limits (`max_peers=N`, `tcp.max_connections=N`, ...). An unknown key is an error; so is turning
/// every transport off.
///
/// Ownership: `name` and `options` are borrowed for the call. On success `*out` is a new agent
/// the caller owns and must release with `kvferry_agent_destroy`; on failure `*out` is untouched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_agent_create(
    name: *const c_char,
    options: *const *const c_char,
    option_count: usize,
    out: *mut kvferry_agent,
) -> kvferry_status {
    guard(|| {
        let name = unsafe { str_arg(name, "name") }?;
        let options = unsafe { options_arg(options, option_count) }?;
        let out = unsafe { Out::new(out, "out") }?;
        let agent = Agent::new(agent_config(name, &options)?)?;
        let state = AgentState { agent, notifications: Mutex::default(), peers: Mutex::default() };
        out.set(handles::insert_root(Arc::new(state)));
        Ok(())
    })
}

/// Destroy an agent and every handle made from it (registrations, peers, descriptor lists,
/// transfers): transfers in flight are cancelled, and once this returns kvferry no longer touches
/// any memory registered with the agent, so the caller may free it.
///
/// Ownership: consumes `agent` and its dependents; every copy of their handles becomes invalid.
/// Destroying it again returns `KVFERRY_ERR_INVALID_HANDLE`.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_agent_destroy(agent: kvferry_agent) -> kvferry_status {
    guard(|| {
        for (kind, object) in handles::remove_root(agent)? {
            if kind == Kind::Transfer
                && let Ok(transfer) = object.downcast::<kvferry_core::Transfer>()
            {
                crate::transfer::stop(&transfer);
            }
            // Everything else releases itself on drop, in the order `remove_root` returns.
        }
        Ok(())
    })
}

/// Copy the agent's metadata (what a peer needs to reach it, for `kvferry_peer_add`) into
/// `buf` and store its length in `*len`. With a `capacity` too small (0 and `buf` NULL to ask),
/// returns `KVFERRY_ERR_BUFFER_TOO_SMALL` and stores the needed size in `*len`.
///
/// Ownership: `buf` and `len` are the caller's; nothing is retained.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_agent_metadata(
    agent: kvferry_agent,
    buf: *mut u8,
    capacity: usize,
    len: *mut usize,
) -> kvferry_status {
    unsafe { agent_bytes(agent, buf, capacity, len, "the metadata buffer", |agent| agent.metadata()) }
}

/// Copy what `bytes` makes of the agent into `buf`, with the size protocol of `OutBuf`.
///
/// # Safety
/// `buf` (of `capacity` bytes) and `len` as `OutBuf::new` requires.
unsafe fn agent_bytes(
    agent: kvferry_agent,
    buf: *mut u8,
    capacity: usize,
    len: *mut usize,
    what: &'static str,
    bytes: impl FnOnce(&kvferry_core::Agent) -> Vec<u8>,
) -> kvferry_status {
    guard(|| {
        let out = unsafe { OutBuf::new(buf, capacity, len, what) }?;
        let state = handles::get(agent)?;
        out.fill_items(&bytes(&state.agent))
    })
}

/// Copy the agent's metrics, Prometheus' text exposition format (`kvferry_transfer_bytes_total`,
/// latency histograms, errors by code; docs/observability.md lists them), into `buf` and store
/// its length in `*len`; the text is not NUL-terminated. With a `capacity` too small (0 and `buf`
/// NULL to ask), returns `KVFERRY_ERR_BUFFER_TOO_SMALL` and stores the needed size in `*len`; the
/// text can grow between the two calls, so ask with some room to spare.
///
/// Ownership: `buf` and `len` are the caller's; nothing is retained.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_agent_metrics(
    agent: kvferry_agent,
    buf: *mut u8,
    capacity: usize,
    len: *mut usize,
) -> kvferry_status {
    unsafe {
        agent_bytes(agent, buf, capacity, len, "the metrics buffer", |agent| agent.metrics().render().into_bytes())
    }
}

/// Serve the agent's metadata on `listen` (`"IP:PORT"`, port 0 picks one) so that peers find it
/// with `kvferry_peer_connect`; peers that connect become peers of this agent too. The port bound
/// is stored in `*port` unless `port` is NULL. Serving again replaces the previous listener.
///
/// Ownership: `listen` is borrowed for the call; the listener lives until the agent is destroyed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_side_channel_serve(
    agent: kvferry_agent,
    listen: *const c_char,
    port: *mut u16,
) -> kvferry_status {
    guard(|| {
        let listen = unsafe { str_arg(listen, "listen") }?;
        let port = unsafe { Out::optional(port, "port") }?;
        let listen: SocketAddr =
            listen.parse().map_err(|_| Failure::invalid_argument(format!("{listen:?} is not an ip:port address")))?;
        let state = handles::get(agent)?;
        let bound = state.agent.serve_side_channel(listen)?;
        if let Some(port) = port {
            port.set(bound.port());
        }
        Ok(())
    })
}

/// Take the oldest notification a peer sent this agent, waiting up to `timeout_ms` for one.
///
/// The sender's name goes into `from` (NUL-terminated; `*from_len` excludes the NUL) and the
/// payload into `data` (`*data_len` bytes). Returns `KVFERRY_ERR_TIMEOUT` when none arrived in
/// time. When either buffer is too small, returns `KVFERRY_ERR_BUFFER_TOO_SMALL`, stores the
/// needed capacities in `*from_len` (NUL included) and `*data_len`, and keeps the notification
/// queued for the next call.
///
/// Ownership: all buffers are the caller's; nothing is retained. Notifications are meant to be
/// consumed by one thread per agent.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments, reason = "two caller buffers with their capacities and lengths")]
pub unsafe extern "C" fn kvferry_notification_take(
    agent: kvferry_agent,
    timeout_ms: u32,
    from: *mut c_char,
    from_capacity: usize,
    from_len: *mut usize,
    data: *mut u8,
    data_capacity: usize,
    data_len: *mut usize,
) -> kvferry_status {
    guard(|| {
        let from = unsafe { OutBuf::new(from.cast(), from_capacity, from_len, "the sender buffer") }?;
        let data = unsafe { OutBuf::new(data, data_capacity, data_len, "the notification buffer") }?;
        let state = handles::get(agent)?;
        let deadline = deadline_ms(timeout_ms);
        let queue = || state.notifications.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let mut pending = queue();
            if pending.is_empty() {
                pending.extend(state.agent.take_notifications());
            }
            if let Some(next) = pending.front() {
                let (from_needed, data_needed) = (next.from.len() + 1, next.data.len());
                if let Err(too_small) = from.check(from_needed).and(data.check(data_needed)) {
                    from.report_needed(from_needed);
                    data.report_needed(data_needed);
                    return Err(too_small);
                }
                let next = pending.pop_front().expect("checked above");
                from.fill_c_str(&next.from)?;
                return data.fill_items(&next.data);
            }
            if deadline.expired() {
                return Err(Failure::new(
                    KVFERRY_ERR_TIMEOUT,
                    format!("no notification arrived within {timeout_ms} ms"),
                ));
            }
            drop(pending);
            let arrived = state.agent.wait_notifications(deadline);
            queue().extend(arrived);
        }
    })
}

/// Fails unless `owner` (the agent a handle was made from) is `agent`.
pub(crate) fn check_owner(agent: kvferry_agent, owner: u64, what: &str) -> CResult {
    if owner != agent.id {
        return Err(Failure::invalid_argument(format!("{what} belongs to another agent")));
    }
    Ok(())
}
