//! Copies into our memory from a peer's, made by the process that owns the destination: an owner
//! pulling a WRITE, an initiator a READ. A source is reached with `process_vm_readv` in the
//! peer's address space, or with `pread` from a memfd the peer passed us ([`PeerFile`]); neither
//! maps the peer's file, so a hole in it costs us no page and a hugetlb file no `SIGBUS`. Large
//! batches are split over the host device's copy pool and the calling thread.
//!
//! [`PeerFile`]: crate::memory::host::PeerFile

use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use super::wire;
use crate::memory::host::{HostDevice, MIN_WORKER_SHARE, read_file_at};
use crate::sync::Locked;

/// Where a pull's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Source {
    /// The address space of this process.
    Process(u32),
    /// A peer's memfd, opened as a [`PeerFile`](crate::memory::host::PeerFile) that the caller
    /// keeps open until the pull returns; `remote` is an offset into it.
    File(RawFd),
}

/// One range copied into our memory: `len` bytes from `remote` in `source` to `local`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Pull {
    pub source: Source,
    pub local: u64,
    pub remote: u64,
    pub len: u64,
}

/// Copy every range in order; an error names the one it stopped at.
///
/// # Safety
/// Every `local` range must be memory of ours that stays valid and that nothing else reads or
/// writes during the call; every [`Source::File`] descriptor must stay open.
pub(super) unsafe fn pull(ops: &[Pull]) -> Result<(), (usize, io::Error)> {
    let mut at = 0;
    while at < ops.len() {
        match ops[at].source {
            Source::File(fd) => {
                let op = ops[at];
                // SAFETY: the caller's guarantees.
                unsafe { read_file_at(fd, op.local, op.len, op.remote) }.map_err(|e| (at, e))?;
                at += 1;
            }
            Source::Process(pid) => {
                let run = ops[at..].iter().take_while(|op| op.source == Source::Process(pid)).count();
                read_process(pid, &ops[at..at + run]).map_err(|(index, e)| (at + index, e))?;
                at += run;
            }
        }
    }
    Ok(())
}

/// Read one word at a peer's probe address with `process_vm_readv`: proves that cross-memory
/// attach is allowed and that `pid` is the peer (not a namesake in another pid namespace).
pub(super) fn probe_cross_memory(pid: u32, probe_addr: u64) -> Result<(), String> {
    let mut word = 0u64;
    let read = Pull { source: Source::Process(pid), local: &mut word as *mut u64 as u64, remote: probe_addr, len: 8 };
    // SAFETY: the destination is a local word nothing else touches.
    unsafe { pull(&[read]) }.map_err(|(_, e)| e.to_string())?;
    match word == wire::PROBE_MAGIC {
        true => Ok(()),
        false => Err(format!("pid {pid} is not the peer's process as seen from here")),
    }
}

/// Copy ranges of process `pid` into ours with `process_vm_readv`, up to 1024 per call, looping
/// over partial copies; an error names the op it stopped at. The kernel checks the remote ranges
/// against the peer's address space; the local ones are the caller's to vouch for.
fn read_process(pid: u32, ops: &[Pull]) -> Result<(), (usize, io::Error)> {
    const IOV_MAX: usize = 1024;
    let iov = |addr: u64, len: u64| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len as usize };
    let (mut next, mut done_in_next) = (0usize, 0u64);
    while next < ops.len() {
        let window = &ops[next..ops.len().min(next + IOV_MAX)];
        let skip = |k: usize| if k == 0 { done_in_next } else { 0 };
        let local: Vec<libc::iovec> =
            window.iter().enumerate().map(|(k, op)| iov(op.local + skip(k), op.len - skip(k))).collect();
        let remote: Vec<libc::iovec> =
            window.iter().enumerate().map(|(k, op)| iov(op.remote + skip(k), op.len - skip(k))).collect();
        // SAFETY: the local iovecs name memory the caller vouched for; the kernel checks the
        // remote ones.
        let n = unsafe {
            libc::process_vm_readv(
                pid as libc::pid_t,
                local.as_ptr(),
                local.len() as _,
                remote.as_ptr(),
                remote.len() as _,
                0,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err((next, e));
        }
        if n == 0 {
            return Err((next, io::Error::from_raw_os_error(libc::EFAULT)));
        }
        let mut left = n as u64;
        while left > 0 {
            let rest = ops[next].len - done_in_next;
            if left < rest {
                done_in_next += left;
                break;
            }
            left -= rest;
            next += 1;
            done_in_next = 0;
        }
    }
    Ok(())
}

/// [`pull`], split into equal byte shares of at least [`MIN_WORKER_SHARE`] over the copy pool
/// and this thread, so that one large transfer uses several cores. Returns once every share is
/// done; an error names the first op (in `ops`' order) that failed.
///
/// # Safety
/// As for [`pull`].
pub(super) unsafe fn pull_sharing(device: &HostDevice, ops: Vec<Pull>) -> Result<(), (usize, io::Error)> {
    let total = ops.iter().fold(0u64, |acc, op| acc.saturating_add(op.len));
    let shares = (device.threads() as u64 + 1).min(total / MIN_WORKER_SHARE as u64);
    if shares < 2 {
        // SAFETY: the caller's guarantees.
        return unsafe { pull(&ops) };
    }
    // Each share: its pieces and, for each, the index of the op it came from.
    type Share = (Vec<Pull>, Vec<usize>);
    let share_len = total.div_ceil(shares);
    let mut split: Vec<Share> = Vec::new();
    let (mut current, mut from, mut current_len) = (Vec::new(), Vec::new(), 0u64);
    for (index, mut op) in ops.into_iter().enumerate() {
        while op.len > 0 {
            let take = op.len.min(share_len - current_len);
            current.push(Pull { len: take, ..op });
            from.push(index);
            (op.local, op.remote, op.len, current_len) =
                (op.local + take, op.remote + take, op.len - take, current_len + take);
            if current_len == share_len {
                split.push((std::mem::take(&mut current), std::mem::take(&mut from)));
                current_len = 0;
            }
        }
    }
    if !current.is_empty() {
        split.push((current, from));
    }
    let failed: Arc<Mutex<Option<(usize, io::Error)>>> = Arc::default();
    let tasks = split
        .into_iter()
        .map(|(share, from)| {
            let failed = failed.clone();
            Box::new(move || {
                // SAFETY: the caller's guarantees hold until `run_sharing` has run every share.
                if let Err((at, e)) = unsafe { pull(&share) } {
                    let mut first = failed.locked();
                    if first.as_ref().is_none_or(|(index, _)| from[at] < *index) {
                        *first = Some((from[at], e));
                    }
                }
            }) as Box<dyn FnOnce() + Send>
        })
        .collect();
    device.run_sharing(tasks);
    match failed.locked().take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
