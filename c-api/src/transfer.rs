//! Transfers: post a batch, then poll, wait or cancel.

use std::sync::Arc;

use kvferry_core::{Error, Op, Transfer, TransferRequest, TransferStatus};

use crate::agent::{check_owner, kvferry_agent};
use crate::args::{Out, deadline_ms, slice_arg};
use crate::handles::{self, Kind, handle};
use crate::memory::kvferry_descs;
use crate::peer::kvferry_peer;
use crate::status::{CResult, Failure, guard, kvferry_status};

/// What a transfer does, seen from the agent that posts it.
pub type kvferry_op = u32;
/// The peer's memory -> this agent's memory.
pub const KVFERRY_OP_READ: kvferry_op = 1;
/// This agent's memory -> the peer's memory.
pub const KVFERRY_OP_WRITE: kvferry_op = 2;

/// A posted transfer (or notification): poll, wait or cancel it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_transfer {
    pub id: u64,
}

handle!(kvferry_transfer, Transfer, Kind::Transfer);

/// Cancel a transfer that is still running (one that finished keeps its outcome).
pub(crate) fn stop(transfer: &Transfer) {
    if transfer.poll() == TransferStatus::InProgress {
        transfer.cancel();
    }
}

/// Keep a posted transfer under a handle; if the agent went away meanwhile, stop it.
fn track(agent: kvferry_agent, transfer: Transfer) -> CResult<kvferry_transfer> {
    let transfer = Arc::new(transfer);
    handles::insert(agent, transfer.clone()).inspect_err(|_| transfer.cancel())
}

/// Post a transfer of `count` pairs: `local[local_indices[i]]` <-> `remote[remote_indices[i]]`
/// (READ or WRITE per `op`), with lengths equal pair by pair. With `notification` not NULL, its
/// `notification_len` bytes reach the peer (`kvferry_notification_take`) once all the data is in
/// place; `count` may then be 0. The transfer fails with `KVFERRY_ERR_TIMEOUT` if not done within
/// `timeout_ms`. Never blocks on the network: completion comes through `*out`.
///
/// Ownership: the index arrays and the notification are borrowed for the call. The memory behind
/// both lists must stay registered until the transfer is done, failed or cancelled. `*out` belongs
/// to the agent: release it with `kvferry_transfer_destroy`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments, reason = "a flat C signature beats a request struct whose layout would freeze")]
pub unsafe extern "C" fn kvferry_transfer_post(
    agent: kvferry_agent,
    op: kvferry_op,
    local: kvferry_descs,
    local_indices: *const usize,
    remote: kvferry_descs,
    remote_indices: *const usize,
    count: usize,
    notification: *const u8,
    notification_len: usize,
    timeout_ms: u32,
    out: *mut kvferry_transfer,
) -> kvferry_status {
    guard(|| {
        let op = match op {
            KVFERRY_OP_READ => Op::Read,
            KVFERRY_OP_WRITE => Op::Write,
            other => return Err(Failure::invalid_argument(format!("unknown transfer op {other}"))),
        };
        let local_indices = unsafe { slice_arg(local_indices, count, "local_indices") }?;
        let remote_indices = unsafe { slice_arg(remote_indices, count, "remote_indices") }?;
        let notification = match notification.is_null() {
            true if notification_len > 0 => return Err(Failure::null("notification")),
            true => None,
            false => Some(unsafe { slice_arg(notification, notification_len, "notification") }?),
        };
        let out = unsafe { Out::new(out, "out") }?;
        let state = handles::get(agent)?;
        let (local, local_owner) = handles::lookup(local)?;
        let (remote, remote_owner) = handles::lookup(remote)?;
        check_owner(agent, local_owner, "the local descriptor list")?;
        check_owner(agent, remote_owner, "the remote descriptor list")?;
        let request = TransferRequest {
            notification,
            ..TransferRequest::new(
                op,
                (local.local()?, local_indices),
                (remote.remote()?, remote_indices),
                deadline_ms(timeout_ms),
            )
        };
        let transfer = state.agent.post(request)?;
        out.set(track(agent, transfer)?);
        Ok(())
    })
}

/// Send `data_len` bytes of `data` to the peer as a notification alone, within `timeout_ms`.
///
/// Ownership: `data` is borrowed for the call. `*out` belongs to the peer's agent: release it with
/// `kvferry_transfer_destroy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_notify(
    peer: kvferry_peer,
    data: *const u8,
    data_len: usize,
    timeout_ms: u32,
    out: *mut kvferry_transfer,
) -> kvferry_status {
    guard(|| {
        let data = unsafe { slice_arg(data, data_len, "data") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let (peer, agent) = handles::lookup(peer)?;
        let transfer = peer.agent.agent.notify(&peer.name, data, deadline_ms(timeout_ms))?;
        out.set(track(kvferry_agent { id: agent }, transfer)?);
        Ok(())
    })
}

/// Check a transfer without blocking: stores whether it has finished in `*done` and returns
/// `KVFERRY_OK` while it runs or once it succeeded, or the error it failed with (`*done` true).
///
/// Ownership: `done` is the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_transfer_poll(transfer: kvferry_transfer, done: *mut bool) -> kvferry_status {
    guard(|| {
        let done = unsafe { Out::new(done, "done") }?;
        let status = handles::get(transfer)?.poll();
        done.set(status != TransferStatus::InProgress);
        match status {
            TransferStatus::Failed(e) => Err(Error::from(e).into()),
            TransferStatus::InProgress | TransferStatus::Done => Ok(()),
        }
    })
}

/// Block until the transfer completes (`KVFERRY_OK`), fails (its error), or reaches its deadline
/// (`KVFERRY_ERR_TIMEOUT`).
///
/// Ownership: borrows `transfer`; it stays valid (destroy it when done). Another thread may
/// destroy it meanwhile: the wait still returns the outcome.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_transfer_wait(transfer: kvferry_transfer) -> kvferry_status {
    guard(|| Ok(handles::get(transfer)?.wait()?))
}

/// Stop a transfer: parts not yet started are skipped. Returns once the transfer no longer
/// touches local memory (or at its deadline); it then reports `KVFERRY_ERR_CANCELLED` unless it
/// had already finished.
///
/// Ownership: borrows `transfer`; it stays valid until destroyed.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_transfer_cancel(transfer: kvferry_transfer) -> kvferry_status {
    guard(|| {
        handles::get(transfer)?.cancel();
        Ok(())
    })
}

/// Store the number of bytes the transfer moves in `*bytes`.
///
/// Ownership: `bytes` is the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_transfer_bytes(transfer: kvferry_transfer, bytes: *mut u64) -> kvferry_status {
    guard(|| {
        let bytes = unsafe { Out::new(bytes, "bytes") }?;
        bytes.set(handles::get(transfer)?.bytes());
        Ok(())
    })
}

/// Release a transfer; one still running is cancelled first, so once this returns it no longer
/// touches local memory.
///
/// Ownership: consumes `transfer`; every copy of the handle becomes invalid.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_transfer_destroy(transfer: kvferry_transfer) -> kvferry_status {
    guard(|| {
        stop(&*handles::remove(transfer)?);
        Ok(())
    })
}
