//! Posting transfers: pairs of prepared descriptors checked and coalesced into ops, the link that
//! holds keys for all of them chosen, and the batch handed to it; the [`Transfer`] handle.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Agent;
use super::descriptors::{LocalDescs, PreparedDesc, RemoteDescs};
use super::peers::Peer;
use super::registry::{Kinds, LocalReg};
use crate::deadline::Deadline;
use crate::descriptor::{DescError, DescSide, LinkGap};
use crate::error::{Error, Result};
use crate::transport::{Batch, Completion, Op, PeerLink, TransferStatus, TransportKind, XferOp};

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

impl Agent {
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
