//! The initiator's side of the shm transport: one worker thread per peer. For each batch it enters
//! the lease slots of the regions it touches (refused once a registration is revoked), checks every
//! op against the range the owner granted, copies the bytes itself, leaves the slots, and checks
//! that the owner is still alive before the batch completes; a notification then follows on the
//! socket. Mapped regions are copied with `memcpy` by the host device's copy pool (this thread
//! taking a share), cross-memory regions with `process_vm_readv`/`process_vm_writev` on this
//! thread while the pool works.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use super::lease::LeaseFile;
use super::wire::{self, Failure, Header, Reach};
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::host::{HostBuffer, HostDevice};
use crate::memory::{CopyOp, MemRegion};
use crate::transport::{Batch, Completion, Op, PartOutcome, PeerLink, RejectReason, TransferError, XferOp};

/// A peer's region as this transport reaches it.
#[derive(Debug, Clone, Copy)]
pub(super) struct RemoteShm {
    pub key: u128,
    pub reach: Reach,
    pub region: MemRegion,
}

pub(super) struct LinkInfo {
    pub local_name: String,
    pub peer: String,
    /// The endpoint as published, for error messages.
    pub endpoint: String,
    pub socket: UnixAddr,
    /// The owner's process id as seen from here (checked by the probe when cross-memory is used).
    pub pid: u32,
    pub connect_timeout: Duration,
}

/// A connection to an owner and its lease file.
pub(super) type Connection = (UnixStream, LeaseFile);

/// Connect to an owner and say hello; returns the stream, the owner's pid, its probe address and
/// its lease file.
pub(super) fn connect(
    socket: &UnixAddr,
    local_name: &str,
    timeout: Duration,
) -> Result<(UnixStream, u32, u64, LeaseFile), String> {
    if timeout.is_zero() {
        return Err("deadline passed before connecting".into());
    }
    let io = |e: io::Error| e.to_string();
    let mut stream = UnixStream::connect_addr(socket).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(&wire::encode_hello(local_name)).map_err(io)?;
    let mut ack = [0u8; wire::HEADER_LEN];
    let leases = wire::recv_with_fd(&stream, &mut ack).map_err(|e| format!("handshake failed: {e}"))?;
    let ack = Header::decode(&ack);
    match ack.tag {
        0 => {
            let leases = leases.ok_or("the owner sent no lease file")?;
            let leases = LeaseFile::map(leases.as_fd()).map_err(|e| e.to_string())?;
            Ok((stream, ack.count, ack.payload_len, leases))
        }
        wire::STATUS_BAD_VERSION => Err(format!("peer speaks shm version {}, this agent {}", ack.count, wire::VERSION)),
        other => Err(format!("handshake refused with status {other}")),
    }
}

/// Read one word at the owner's probe address with `process_vm_readv`: proves that cross-memory
/// attach is allowed and that `pid` is the owner (not a namesake in another pid namespace).
pub(super) fn probe_cross_memory(pid: u32, probe_addr: u64) -> Result<(), String> {
    let mut word = 0u64;
    let op = XferOp { local_addr: &mut word as *mut u64 as u64, remote_region: 0, remote_addr: probe_addr, len: 8 };
    cross_memory_copy(pid, Op::Read, &[op]).map_err(|e| e.to_string())?;
    match word == wire::PROBE_MAGIC {
        true => Ok(()),
        false => Err(format!("pid {pid} is not the peer's process as seen from here")),
    }
}

/// Copy the ops between this process and process `pid`, looping over partial transfers.
fn cross_memory_copy(pid: u32, op: Op, ops: &[XferOp]) -> io::Result<()> {
    // IOV_MAX on Linux: the most iovecs one call takes.
    const IOV_MAX: usize = 1024;
    let iov = |addr: u64, len: u64| libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len as usize };
    let (mut next, mut done_in_next) = (0usize, 0u64);
    while next < ops.len() {
        let window = &ops[next..ops.len().min(next + IOV_MAX)];
        let skip = |k: usize| if k == 0 { done_in_next } else { 0 };
        let local: Vec<libc::iovec> =
            window.iter().enumerate().map(|(k, o)| iov(o.local_addr + skip(k), o.len - skip(k))).collect();
        let remote: Vec<libc::iovec> =
            window.iter().enumerate().map(|(k, o)| iov(o.remote_addr + skip(k), o.len - skip(k))).collect();
        let call = if op == Op::Read { libc::process_vm_readv } else { libc::process_vm_writev };
        // SAFETY: the local iovecs name registered memory held by the batch; the kernel checks the
        // remote ones against the peer's address space.
        let n = unsafe {
            call(pid as libc::pid_t, local.as_ptr(), local.len() as _, remote.as_ptr(), remote.len() as _, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EFAULT));
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

pub(super) struct ShmLink {
    peer: String,
    regions: Arc<Vec<Option<RemoteShm>>>,
    jobs: mpsc::Sender<Batch>,
}

impl ShmLink {
    pub fn new(
        info: LinkInfo,
        regions: Vec<Option<RemoteShm>>,
        conn: Connection,
        device: Arc<HostDevice>,
    ) -> Result<ShmLink> {
        let regions = Arc::new(regions);
        let peer = info.peer.clone();
        let (jobs, batches) = mpsc::channel::<Batch>();
        let worker = Worker { info, regions: regions.clone(), conn: Some(conn), grants: HashMap::new(), device };
        thread::Builder::new()
            .name(format!("kvferry-shm-{peer}"))
            .spawn(move || worker.run(batches))
            .map_err(|e| Error::io("spawning an shm link worker", e))?;
        Ok(ShmLink { peer, regions, jobs })
    }
}

impl PeerLink for ShmLink {
    fn post(&self, batch: Batch) -> Result<()> {
        if let Some(op) =
            batch.ops.iter().find(|o| self.regions.get(o.remote_region as usize).is_none_or(Option::is_none))
        {
            return Err(Error::InvalidArgument(format!(
                "peer {} has no shm-accessible region {}",
                self.peer, op.remote_region
            )));
        }
        batch.completion.set_parts(1);
        if let Err(mpsc::SendError(batch)) = self.jobs.send(batch) {
            let cause = "the link's worker thread has exited".to_string();
            let e = TransferError::PeerDisconnected { peer: self.peer.clone(), op: batch.completion.op(), cause };
            // A failed part settles the batch as failed; nothing else to do.
            let _ = batch.completion.part_done(Err(e));
        }
        Ok(())
    }

    fn mode(&self, ops: &[XferOp]) -> Option<&'static str> {
        let reach = |o: &XferOp| self.regions[o.remote_region as usize].map(|r| r.reach);
        let mapped = ops.iter().any(|o| reach(o) == Some(Reach::Mapped));
        let cross = ops.iter().any(|o| reach(o) == Some(Reach::CrossMemory));
        match (mapped, cross) {
            (true, true) => Some("mapped+cross-memory"),
            (true, false) => Some(Reach::Mapped.name()),
            (false, true) => Some(Reach::CrossMemory.name()),
            (false, false) => None,
        }
    }
}

fn read_status(stream: &mut UnixStream) -> Result<Header, Failure> {
    wire::status_of(Header::read_from(stream)?)
}

/// What the owner granted for one registration.
struct Grant {
    /// The registered range, as the owner has it.
    region: MemRegion,
    slot: u32,
    /// The mapping of a shareable region.
    map: Option<HostBuffer>,
}

struct Worker {
    info: LinkInfo,
    regions: Arc<Vec<Option<RemoteShm>>>,
    conn: Option<Connection>,
    /// Grants received on this connection, by key.
    grants: HashMap<u128, Grant>,
    device: Arc<HostDevice>,
}

impl Worker {
    fn run(mut self, batches: mpsc::Receiver<Batch>) {
        for batch in batches {
            self.run_batch(&batch);
        }
    }

    fn run_batch(&mut self, batch: &Batch) {
        let completion = &*batch.completion;
        let result = match completion.skip_reason() {
            Some(e) => Err(e),
            None => self.copy(completion, &batch.ops),
        };
        if let PartOutcome::LastOk { notification } = completion.part_done(result) {
            let sent = match notification {
                Some(data) => self.notify(completion, &data),
                None => Ok(()),
            };
            completion.finish(sent);
        }
    }

    /// The connection, ready for an exchange within the batch's deadline.
    fn connection(&mut self, c: &Completion) -> Result<&mut Connection, TransferError> {
        if self.conn.is_none() {
            let timeout = c.deadline().remaining().min(self.info.connect_timeout);
            let unreachable = |cause| TransferError::PeerUnreachable {
                peer: self.info.peer.clone(),
                endpoint: self.info.endpoint.clone(),
                cause,
            };
            let (stream, pid, _, leases) = connect(&self.info.socket, &self.info.local_name, timeout)
                .map_err(|cause| if c.deadline().expired() { c.timeout_error() } else { unreachable(cause) })?;
            if pid != self.info.pid {
                return Err(unreachable(format!("another process (pid {pid}) now serves the endpoint")));
            }
            // Grants name slots of the previous connection's lease file; ask afresh.
            self.grants.clear();
            self.conn = Some((stream, leases));
        }
        let left = c.deadline().remaining();
        if left.is_zero() {
            return Err(c.timeout_error());
        }
        let (stream, _) = self.conn.as_mut().expect("connected above");
        match stream.set_read_timeout(Some(left)).and_then(|()| stream.set_write_timeout(Some(left))) {
            Ok(()) => Ok(self.conn.as_mut().expect("connected above")),
            Err(e) => Err(self.named(c, Failure::Io(e))),
        }
    }

    /// Name a failure for the caller; a connection that may be out of step is dropped.
    fn named(&mut self, c: &Completion, failure: Failure) -> TransferError {
        if failure.breaks_stream() {
            self.disconnect();
        }
        failure.into_error(&self.info.peer, c)
    }

    /// Forget the connection and everything granted on it.
    fn disconnect(&mut self) {
        self.conn = None;
        self.grants.clear();
    }

    fn region(&self, op: &XferOp) -> RemoteShm {
        self.regions[op.remote_region as usize].expect("post checked every op's region")
    }

    /// Check every op against its grant, enter the lease slots, copy, leave, and check the owner
    /// is still there (a mapping stays valid after its death, so the copy alone cannot tell).
    fn copy(&mut self, c: &Completion, ops: &[XferOp]) -> Result<(), TransferError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut copies = Vec::new();
        let mut cross = Vec::new();
        let mut slots: Vec<(u32, u64, u32)> = Vec::new();
        for (index, op) in ops.iter().enumerate() {
            let remote = self.region(op);
            let grant = match self.grant(c, &remote) {
                Ok(grant) => grant,
                // The owner refused the key: name the op that used it.
                Err(TransferError::Rejected { peer, op, reason, .. }) => {
                    return Err(TransferError::Rejected { peer, op, index: index as u32, reason });
                }
                Err(e) => return Err(e),
            };
            let rejected = |reason| Failure::Rejected(index as u32, reason);
            let offset = op.remote_addr.checked_sub(grant.region.addr);
            let inside = offset.and_then(|o| o.checked_add(op.len)).is_some_and(|end| end <= grant.region.len);
            if !inside {
                return Err(self.named(c, rejected(RejectReason::OutOfRange)));
            }
            if !slots.iter().any(|&(slot, _, _)| slot == grant.slot) {
                slots.push((grant.slot, remote.key as u64, index as u32));
            }
            match &grant.map {
                None => cross.push(*op),
                Some(map) => {
                    let (local, remote) = (op.local_addr, map.as_ptr() as u64 + offset.expect("checked inside"));
                    let (src, dst) = if c.op() == Op::Read { (remote, local) } else { (local, remote) };
                    copies.push(CopyOp { src, dst, len: op.len });
                }
            }
        }
        let (stream, leases) = self.conn.as_ref().expect("grants come with a connection");
        for (entered, &(slot, tag, index)) in slots.iter().enumerate() {
            if !leases.enter(slot, tag) {
                slots[..entered].iter().for_each(|&(slot, _, _)| leases.leave(slot));
                // The registration is gone: forget its grant (and unmap its file).
                self.grants.retain(|_, g| g.slot != slot);
                return Err(self.named(c, Failure::Rejected(index, RejectReason::UnknownKey)));
            }
        }
        // SAFETY: local addresses are registered memory held by the batch; remote ones lie inside
        // mappings kept in `grants` until the fence is done; the leases keep the owner from
        // deregistering meanwhile.
        let fence = unsafe { self.device.copy_batch_sharing(&copies) };
        let crossed = cross_memory_copy(self.info.pid, c.op(), &cross);
        let timed_out = match &fence {
            Ok(fence) if fence.wait(c.deadline()).is_err() => {
                // Host copies cannot hang; finish them before the caller may reuse the memory.
                while fence.wait(Deadline::after(Duration::from_secs(1))).is_err() {}
                true
            }
            _ => false,
        };
        slots.iter().for_each(|&(slot, _, _)| leases.leave(slot));
        let hung_up = peer_hung_up(stream);
        let (peer, op) = (self.info.peer.clone(), c.op());
        if hung_up {
            self.disconnect();
            return Err(TransferError::PeerDisconnected { peer, op, cause: "its process exited".into() });
        }
        if timed_out {
            return Err(c.timeout_error());
        }
        fence.map_err(|e| TransferError::Protocol { peer: peer.clone(), detail: format!("invalid copy: {e}") })?;
        crossed.map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => TransferError::CrossMemoryRefused { peer, op, cause: e.to_string() },
            Some(libc::ESRCH) => TransferError::PeerDisconnected { peer, op, cause: "its process exited".into() },
            _ => TransferError::Protocol { peer, detail: format!("cross-memory copy failed: {e}") },
        })
    }

    /// The owner's grant for a region, asked for on first use and kept for the connection.
    fn grant(&mut self, c: &Completion, remote: &RemoteShm) -> Result<&Grant, TransferError> {
        if !self.grants.contains_key(&remote.key) {
            let grant = self.ask_grant(c, remote)?;
            self.grants.insert(remote.key, grant);
        }
        Ok(&self.grants[&remote.key])
    }

    fn ask_grant(&mut self, c: &Completion, remote: &RemoteShm) -> Result<Grant, TransferError> {
        let peer = self.info.peer.clone();
        let failed = |cause: String| TransferError::MappingFailed { peer: peer.clone(), cause };
        let mut request = Header { tag: wire::MAP, count: 0, payload_len: 0 }.encode().to_vec();
        request.extend_from_slice(&remote.key.to_le_bytes());
        let (stream, _) = self.connection(c)?;
        let mut ack = [0u8; wire::MAP_ACK_LEN];
        let fd = match stream.write_all(&request).and_then(|()| wire::recv_with_fd(stream, &mut ack)) {
            Ok(fd) => fd,
            Err(e) => return Err(self.named(c, Failure::Io(e))),
        };
        let header = match wire::status_of(Header::decode(ack[..wire::HEADER_LEN].try_into().expect("header"))) {
            Ok(header) => header,
            Err(f) => return Err(self.named(c, f)),
        };
        let addr = u64::from_le_bytes(ack[16..24].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(ack[24..32].try_into().expect("8 bytes"));
        let region = MemRegion { addr, len, ..remote.region };
        let map = match (remote.reach, fd) {
            (Reach::CrossMemory, _) => None,
            (Reach::Mapped, None) => return Err(failed("no file descriptor came with the grant".into())),
            (Reach::Mapped, Some(fd)) => {
                let map = HostBuffer::map_shared(fd.as_fd()).map_err(|e| failed(e.to_string()))?;
                if (map.len() as u64) < len {
                    return Err(failed(format!("the file holds {} bytes, the region {len}", map.len())));
                }
                Some(map)
            }
        };
        Ok(Grant { region, slot: header.count, map })
    }

    fn notify(&mut self, c: &Completion, data: &[u8]) -> Result<(), TransferError> {
        let mut request = Header { tag: wire::NOTIFY, count: 0, payload_len: data.len() as u64 }.encode().to_vec();
        request.extend_from_slice(data);
        let (stream, _) = self.connection(c)?;
        let sent = stream.write_all(&request).map_err(Failure::Io).and_then(|()| read_status(stream));
        sent.map(|_| ()).map_err(|f| self.named(c, f))
    }
}

/// Whether the owner's end of the socket is closed (its process exited), without blocking.
fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut poll = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, no timeout.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0 && poll.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}
