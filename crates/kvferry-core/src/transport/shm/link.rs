//! The initiator's side of the shm transport: one worker thread per peer that opens a window on
//! the owner (`ACQUIRE`), copies the bytes itself, and closes the window (`RELEASE`, which carries
//! the notification). Mapped regions are copied with `memcpy` by the host device's copy pool;
//! cross-memory regions with `process_vm_readv`/`process_vm_writev` on this thread, while the pool
//! works.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use super::wire::{self, Failure, Header, Reach, WireDesc};
use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::host::{HostBuffer, HostDevice};
use crate::memory::{CopyOp, Device, MemRegion};
use crate::transport::{Batch, Completion, Op, PartOutcome, PeerLink, TransferError, XferOp};

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

/// Connect to an owner and say hello; returns the stream, the owner's pid and its probe address.
pub(super) fn connect(
    socket: &UnixAddr,
    local_name: &str,
    timeout: Duration,
) -> Result<(UnixStream, u32, u64), String> {
    if timeout.is_zero() {
        return Err("deadline passed before connecting".into());
    }
    let io = |e: io::Error| e.to_string();
    let mut stream = UnixStream::connect_addr(socket).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(&wire::encode_hello(local_name)).map_err(io)?;
    let ack = Header::read_from(&mut stream).map_err(|e| format!("handshake failed: {e}"))?;
    match ack.tag {
        0 => Ok((stream, ack.count, ack.payload_len)),
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
        conn: UnixStream,
        device: Arc<HostDevice>,
    ) -> Result<ShmLink> {
        let regions = Arc::new(regions);
        let peer = info.peer.clone();
        let (jobs, batches) = mpsc::channel::<Batch>();
        let worker =
            Worker { info, regions: regions.clone(), conn: Some(conn), maps: HashMap::new(), device, holding: false };
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

struct Worker {
    info: LinkInfo,
    regions: Arc<Vec<Option<RemoteShm>>>,
    conn: Option<UnixStream>,
    /// The peer's shareable regions mapped so far, by key: each is mapped once per connection.
    maps: HashMap<u128, HostBuffer>,
    device: Arc<HostDevice>,
    /// Whether the owner has a window open for us (between ACQUIRE and RELEASE).
    holding: bool,
}

impl Worker {
    fn run(mut self, batches: mpsc::Receiver<Batch>) {
        for batch in batches {
            self.run_batch(&batch);
        }
    }

    fn run_batch(&mut self, batch: &Batch) {
        let completion = &*batch.completion;
        let chunks: Vec<&[XferOp]> = batch.ops.chunks(wire::MAX_DESCS).collect();
        let mut result = Ok(());
        for (i, chunk) in chunks.iter().enumerate() {
            result = match completion.skip_reason() {
                Some(e) => Err(e),
                None => self.acquire_and_copy(completion, chunk),
            };
            // Every window but the last closes at once; the last closes with the notification.
            if result.is_ok() && i + 1 < chunks.len() {
                result = self.release(completion, None);
            }
            if result.is_err() {
                break;
            }
        }
        match completion.part_done(result) {
            PartOutcome::LastOk { notification } => {
                // Even without a notification the window is closed with a round trip: a mapping
                // outlives a dead peer, so this is where its death is noticed.
                let closed = match self.holding || notification.is_some() {
                    true => self.release(completion, notification),
                    false => Ok(()),
                };
                completion.finish(closed);
            }
            _ if self.holding => {
                // The batch already failed; this only lets the owner deregister without waiting.
                let _ = self.release(completion, None);
            }
            _ => {}
        }
    }

    /// The connection, ready for an exchange within the batch's deadline. A lost connection is
    /// re-established only when no window was open on it.
    fn connection(&mut self, c: &Completion) -> Result<&mut UnixStream, TransferError> {
        let peer = &self.info.peer;
        if self.conn.is_none() {
            if self.holding {
                self.holding = false;
                let cause = "the connection closed while the owner held our window".into();
                return Err(TransferError::PeerDisconnected { peer: peer.clone(), op: c.op(), cause });
            }
            let timeout = c.deadline().remaining().min(self.info.connect_timeout);
            let unreachable = |cause| TransferError::PeerUnreachable {
                peer: peer.clone(),
                endpoint: self.info.endpoint.clone(),
                cause,
            };
            let (stream, pid, _) = connect(&self.info.socket, &self.info.local_name, timeout)
                .map_err(|cause| if c.deadline().expired() { c.timeout_error() } else { unreachable(cause) })?;
            if pid != self.info.pid {
                return Err(unreachable(format!("another process (pid {pid}) now serves the endpoint")));
            }
            // Mappings of a previous connection may name revoked registrations; map afresh.
            self.maps.clear();
            self.conn = Some(stream);
        }
        let left = c.deadline().remaining();
        if left.is_zero() {
            // Closing the connection is what releases an open window on the owner's side.
            self.drop_connection();
            return Err(c.timeout_error());
        }
        let stream = self.conn.as_mut().expect("connected above");
        match stream.set_read_timeout(Some(left)).and_then(|()| stream.set_write_timeout(Some(left))) {
            Ok(()) => Ok(self.conn.as_mut().expect("connected above")),
            Err(e) => Err(self.named(c, Failure::Io(e))),
        }
    }

    fn drop_connection(&mut self) {
        self.conn = None;
        self.holding = false;
    }

    /// Name a failure for the caller; a connection that may be out of step is dropped.
    fn named(&mut self, c: &Completion, failure: Failure) -> TransferError {
        let peer = self.info.peer.clone();
        match failure {
            Failure::Rejected(index, reason) => TransferError::Rejected { peer, op: c.op(), index, reason },
            Failure::Protocol(detail) => {
                self.drop_connection();
                TransferError::Protocol { peer, detail }
            }
            Failure::Io(e) => {
                self.drop_connection();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => c.timeout_error(),
                    _ => TransferError::PeerDisconnected { peer, op: c.op(), cause: e.to_string() },
                }
            }
        }
    }

    fn region(&self, op: &XferOp) -> RemoteShm {
        self.regions[op.remote_region as usize].expect("post checked every op's region")
    }

    fn acquire_and_copy(&mut self, c: &Completion, ops: &[XferOp]) -> Result<(), TransferError> {
        let descs: Vec<WireDesc> =
            ops.iter().map(|o| WireDesc { key: self.region(o).key, addr: o.remote_addr, len: o.len }).collect();
        let request = wire::encode_descs(wire::ACQUIRE, &descs);
        let stream = self.connection(c)?;
        let acquired = stream.write_all(&request).map_err(Failure::Io).and_then(|()| read_status(stream));
        if let Err(f) = acquired {
            return Err(self.named(c, f));
        }
        self.holding = true;

        let mut copies = Vec::new();
        let mut cross = Vec::new();
        for op in ops {
            let region = self.region(op);
            match region.reach {
                Reach::CrossMemory => cross.push(*op),
                Reach::Mapped => {
                    let base = self.mapping(c, &region)?;
                    // The owner checked the range against its registration; checked again here
                    // because a wrong offset would touch our own memory.
                    let offset = op
                        .remote_addr
                        .checked_sub(region.region.addr)
                        .filter(|off| off.checked_add(op.len).is_some_and(|end| end <= region.region.len));
                    let Some(offset) = offset else {
                        let detail = format!("op at {:#x}+{} lies outside the mapped region", op.remote_addr, op.len);
                        return Err(self.named(c, Failure::Protocol(detail)));
                    };
                    let (local, remote) = (op.local_addr, base + offset);
                    let (src, dst) = if c.op() == Op::Read { (remote, local) } else { (local, remote) };
                    copies.push(CopyOp { src, dst, len: op.len });
                }
            }
        }
        // SAFETY: local addresses are registered memory held by the batch; remote ones lie inside
        // mappings this worker keeps until the fence is done; the owner's window keeps the
        // registration alive meanwhile.
        let fence = unsafe { self.device.copy_batch(&copies) }.map_err(|e| TransferError::Protocol {
            peer: self.info.peer.clone(),
            detail: format!("invalid copy: {e}"),
        })?;
        let crossed = cross_memory_copy(self.info.pid, c.op(), &cross);
        if fence.wait(c.deadline()).is_err() {
            // Host copies cannot hang; finish them before the caller may reuse the local memory.
            while fence.wait(Deadline::after(Duration::from_secs(1))).is_err() {}
            return Err(c.timeout_error());
        }
        crossed.map_err(|e| {
            let (peer, op) = (self.info.peer.clone(), c.op());
            match e.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => {
                    TransferError::CrossMemoryRefused { peer, op, cause: e.to_string() }
                }
                Some(libc::ESRCH) => TransferError::PeerDisconnected { peer, op, cause: "the process exited".into() },
                _ => TransferError::Protocol { peer, detail: format!("cross-memory copy failed: {e}") },
            }
        })
    }

    /// The address where the region is mapped here, mapping it on first use.
    fn mapping(&mut self, c: &Completion, region: &RemoteShm) -> Result<u64, TransferError> {
        if let Some(map) = self.maps.get(&region.key) {
            return Ok(map.as_ptr() as u64);
        }
        let peer = self.info.peer.clone();
        let failed = |cause: String| TransferError::MappingFailed { peer: peer.clone(), cause };
        let mut request = Header { tag: wire::MAP, count: 0, payload_len: 0 }.encode().to_vec();
        request.extend_from_slice(&region.key.to_le_bytes());
        let stream = self.connection(c)?;
        let mut ack = [0u8; wire::MAP_ACK_LEN];
        let exchanged = stream.write_all(&request).and_then(|()| wire::recv_with_fd(stream, &mut ack));
        let fd = match exchanged {
            Ok(fd) => fd,
            Err(e) => return Err(self.named(c, Failure::Io(e))),
        };
        let header = Header::decode(ack[..wire::HEADER_LEN].try_into().expect("header length"));
        if header.tag == wire::STATUS_NOT_SHAREABLE {
            return Err(failed("the region has no shareable file".into()));
        }
        if let Err(f) = wire::status_of(header) {
            return Err(self.named(c, f));
        }
        let addr = u64::from_le_bytes(ack[16..24].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(ack[24..32].try_into().expect("8 bytes"));
        if (addr, len) != (region.region.addr, region.region.len) {
            return Err(failed(format!("the owner maps {addr:#x}+{len}, its metadata said {:?}", region.region)));
        }
        let fd = fd.ok_or_else(|| failed("no file descriptor came with the answer".into()))?;
        let map = HostBuffer::map_shared(std::os::fd::AsFd::as_fd(&fd)).map_err(|e| failed(e.to_string()))?;
        if (map.len() as u64) < len {
            return Err(failed(format!("the file holds {} bytes, the region {len}", map.len())));
        }
        let base = map.as_ptr() as u64;
        self.maps.insert(region.key, map);
        Ok(base)
    }

    fn release(&mut self, c: &Completion, notification: Option<Vec<u8>>) -> Result<(), TransferError> {
        let data = notification.as_deref().unwrap_or_default();
        let header =
            Header { tag: wire::RELEASE, count: notification.is_some() as u32, payload_len: data.len() as u64 };
        let mut request = header.encode().to_vec();
        request.extend_from_slice(data);
        let stream = self.connection(c)?;
        let released = stream.write_all(&request).map_err(Failure::Io).and_then(|()| read_status(stream));
        self.holding = false;
        released.map(|_| ()).map_err(|f| self.named(c, f))
    }
}
