//! GPU-aware transfers over a transport that cannot touch device memory (TCP): the payload passes
//! through two pinned host bounce buffers per stream, and the device copy of one chunk overlaps the
//! network transfer of the previous one.
//!
//! ```text
//! send:     D2H chunk 0 | D2H chunk 1   | D2H chunk 2   | ...
//!                       | send chunk 0  | send chunk 1  | send chunk 2
//! receive:  recv chunk 0 | recv chunk 1 | recv chunk 2 | ...
//!                        | H2D chunk 0  | H2D chunk 1  | H2D chunk 2
//! ```
//!
//! Each staged byte costs one extra copy (device ↔ bounce) on each side that stages; that is the
//! price of a transport without device access, and the pipeline hides it behind the wire time.
//! Callers see nothing of it: they register device memory and post transfers as for host memory.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::host::{HostAllocOptions, HostBuffer};
use crate::memory::{CopyFence, CopyOp, Device, MemKind, MemRegion, PinGuard};
use crate::sync::ReadWriteLocked;

/// How the agent stages device memory through host memory for transports that cannot reach it.
#[derive(Clone)]
pub struct StagingConfig {
    /// One device per memory kind to stage; their copy engines move the chunks.
    pub devices: Vec<Arc<dyn Device>>,
    /// Bytes per bounce buffer; each stream (and each served connection) holds two.
    pub chunk_bytes: usize,
    /// Stage host memory too, through the host device in `devices`: the transport then never reads
    /// registered memory directly. For measuring what staging costs on a machine without a GPU.
    pub stage_host: bool,
}

impl StagingConfig {
    /// Stage through `devices` in 2 MiB chunks.
    pub fn new(devices: Vec<Arc<dyn Device>>) -> Self {
        StagingConfig { devices, chunk_bytes: 2 << 20, stage_host: false }
    }
}

impl std::fmt::Debug for StagingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagingConfig")
            .field("devices", &self.devices.iter().map(|d| d.name()).collect::<Vec<_>>())
            .field("chunk_bytes", &self.chunk_bytes)
            .field("stage_host", &self.stage_host)
            .finish()
    }
}

/// A run of a request's payload: `len` bytes at `addr` in memory of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: u64,
    pub len: u64,
    pub kind: MemKind,
}

/// Why a staged transfer stopped: the wire, or a device copy.
#[derive(Debug)]
pub(crate) enum StageError {
    Io(io::Error),
    Device(Error),
}

impl From<io::Error> for StageError {
    fn from(e: io::Error) -> Self {
        StageError::Io(e)
    }
}

impl From<Error> for StageError {
    fn from(e: Error) -> Self {
        StageError::Device(e)
    }
}

/// The staging state a transport shares between its streams: devices, chunk size, and which
/// registered regions are staged (so an initiator can tell its local device addresses apart).
pub(crate) struct Stager {
    devices: Vec<Arc<dyn Device>>,
    chunk_bytes: usize,
    stage_host: bool,
    /// Staged regions registered with the transport, by (start address, key): a lookup walks back
    /// from the address.
    regions: RwLock<BTreeMap<(u64, u128), MemRegion>>,
}

/// How long to wait for device copies into a bounce buffer after a transfer failed, before giving
/// the buffer up for lost rather than freeing memory a DMA engine may still write.
pub(crate) const ABANDON_AFTER: Duration = Duration::from_secs(10);

impl Stager {
    pub fn new(config: StagingConfig) -> Result<Stager> {
        if config.chunk_bytes == 0 {
            return Err(Error::InvalidArgument("staging chunks must be at least one byte".into()));
        }
        for (i, d) in config.devices.iter().enumerate() {
            if config.devices[..i].iter().any(|e| e.kind() == d.kind()) {
                return Err(Error::InvalidArgument(format!("two staging devices for {} memory", d.kind())));
            }
        }
        if config.stage_host && !config.devices.iter().any(|d| d.kind() == MemKind::Host) {
            return Err(Error::InvalidArgument("staging host memory needs a host device".into()));
        }
        Ok(Stager {
            devices: config.devices,
            chunk_bytes: config.chunk_bytes,
            stage_host: config.stage_host,
            regions: RwLock::new(BTreeMap::new()),
        })
    }

    fn device(&self, kind: MemKind) -> Option<&Arc<dyn Device>> {
        self.devices.iter().find(|d| d.kind() == kind)
    }

    /// Whether memory of this kind goes through bounce buffers.
    pub fn stages(&self, kind: MemKind) -> bool {
        match kind {
            MemKind::Host => self.stage_host,
            _ => self.device(kind).is_some(),
        }
    }

    pub fn add_region(&self, key: u128, region: MemRegion) {
        self.regions.write_locked().insert((region.addr, key), region);
    }

    pub fn remove_region(&self, key: u128) {
        self.regions.write_locked().retain(|&(_, k), _| k != key);
    }

    /// The kind of local memory at `addr` if a staged registration holds it, else `None` (host
    /// memory the transport reads directly).
    pub fn staged_kind(&self, addr: u64, len: u64) -> Option<MemKind> {
        let regions = self.regions.read_locked();
        regions.range(..=(addr, u128::MAX)).rev().map(|(_, r)| r).find(|r| r.contains(addr, len)).map(|r| r.kind)
    }

    /// Two pinned bounce buffers, registered with every staging device for DMA.
    pub fn bounce(&self) -> Result<Bounce> {
        let alloc = || HostBuffer::alloc(self.chunk_bytes, &HostAllocOptions::new());
        let buffers = [alloc()?, alloc()?];
        let mut pins = Vec::new();
        for d in self.devices.iter().filter(|d| d.kind() != MemKind::Host) {
            for buffer in &buffers {
                pins.push(d.pin_host(buffer.region())?);
            }
        }
        Ok(Bounce { pins, buffers })
    }

    /// Send `segments` in order through `send`, one chunk at a time, copying chunk i+1 into the
    /// other bounce buffer while chunk i is on the wire.
    pub fn send(
        &self,
        bounce: &mut Option<Bounce>,
        segments: &[Segment],
        deadline: Deadline,
        mut send: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<(), StageError> {
        let chunks = plan(segments, self.chunk_bytes);
        let buffers = take_bounce(self, bounce)?;
        let mut inflight: [Vec<CopyFence>; 2] = [Vec::new(), Vec::new()];
        let outcome = (|| {
            if let Some(first) = chunks.first() {
                inflight[0] = self.start(first, buffers.addr(0), Direction::ToBounce)?;
            }
            for (i, chunk) in chunks.iter().enumerate() {
                // The other buffer's last chunk went out synchronously: it is free for the next one.
                if let Some(next) = chunks.get(i + 1) {
                    inflight[(i + 1) % 2] = self.start(next, buffers.addr((i + 1) % 2), Direction::ToBounce)?;
                }
                wait_slot(&mut inflight[i % 2], deadline)?;
                send(buffers.bytes(i % 2, chunk.len))?;
            }
            Ok(())
        })();
        settle(bounce, buffers, inflight, outcome)
    }

    /// Receive `segments` in order through `recv`, one chunk at a time, copying chunk i out of its
    /// bounce buffer while chunk i+1 arrives in the other.
    pub fn receive(
        &self,
        bounce: &mut Option<Bounce>,
        segments: &[Segment],
        deadline: Deadline,
        mut recv: impl FnMut(&mut [u8]) -> io::Result<()>,
    ) -> Result<(), StageError> {
        let chunks = plan(segments, self.chunk_bytes);
        let buffers = take_bounce(self, bounce)?;
        let mut inflight: [Vec<CopyFence>; 2] = [Vec::new(), Vec::new()];
        let outcome = (|| {
            for (i, chunk) in chunks.iter().enumerate() {
                let slot = i % 2;
                // The buffer is free once the copy of the chunk before last has drained it.
                wait_slot(&mut inflight[slot], deadline)?;
                recv(buffers.bytes_mut(slot, chunk.len))?;
                inflight[slot] = self.start(chunk, buffers.addr(slot), Direction::FromBounce)?;
            }
            for fences in &mut inflight {
                wait_slot(fences, deadline)?;
            }
            Ok(())
        })();
        settle(bounce, buffers, inflight, outcome)
    }

    /// Start the copies between one chunk's pieces and a bounce buffer: one batch per device.
    fn start(&self, chunk: &Chunk, bounce: u64, direction: Direction) -> Result<Vec<CopyFence>> {
        let mut fences = Vec::new();
        for d in &self.devices {
            let ops: Vec<CopyOp> = chunk
                .pieces
                .iter()
                .filter(|p| p.kind == d.kind())
                .map(|p| direction.op(p.addr, bounce + p.offset, p.len))
                .collect();
            if !ops.is_empty() {
                // SAFETY: the pieces lie in registered memory the transport holds for the request; the
                // bounce buffer is ours and nothing else touches it until the fence completes.
                fences.push(unsafe { d.copy_batch(&ops) }?);
            }
        }
        // Pieces with no staging device are host memory read or written directly.
        for p in chunk.pieces.iter().filter(|p| self.device(p.kind).is_none()) {
            let op = direction.op(p.addr, bounce + p.offset, p.len);
            // SAFETY: as above; host memory, disjoint ranges.
            unsafe { std::ptr::copy_nonoverlapping(op.src as *const u8, op.dst as *mut u8, op.len as usize) };
        }
        Ok(fences)
    }
}

/// Two bounce buffers and the device pins that make them DMA targets (dropped first).
pub(crate) struct Bounce {
    pins: Vec<PinGuard>,
    buffers: [HostBuffer; 2],
}

impl Bounce {
    fn addr(&self, slot: usize) -> u64 {
        self.buffers[slot].as_ptr() as u64
    }

    fn bytes(&self, slot: usize, len: u64) -> &[u8] {
        // SAFETY: the chunk's fence completed, so no device writes this buffer while the slice lives.
        let all = unsafe { self.buffers[slot].as_slice() };
        &all[..len as usize]
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self, slot: usize, len: u64) -> &mut [u8] {
        // SAFETY: the copy that last read this buffer completed; the slice is its only user.
        let all = unsafe { self.buffers[slot].as_mut_slice() };
        &mut all[..len as usize]
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        // Unregister from the devices before the memory is unmapped.
        self.pins.clear();
    }
}

fn take_bounce(stager: &Stager, bounce: &mut Option<Bounce>) -> Result<Bounce> {
    match bounce.take() {
        Some(b) => Ok(b),
        None => stager.bounce(),
    }
}

/// Put the bounce buffers back for the next request, unless a device may still be writing them.
fn settle(
    bounce: &mut Option<Bounce>,
    buffers: Bounce,
    inflight: [Vec<CopyFence>; 2],
    outcome: Result<(), StageError>,
) -> Result<(), StageError> {
    let drained = inflight.into_iter().flatten().all(|f| f.wait(Deadline::after(ABANDON_AFTER)).is_ok());
    if drained {
        *bounce = Some(buffers);
    } else {
        // A device copy that never finished may still target this memory: leaking it is the only
        // safe choice. The next request allocates fresh buffers.
        tracing::error!("a staging copy did not finish; abandoning its bounce buffers");
        std::mem::forget(buffers);
    }
    outcome
}

/// Wait for a buffer's copies; they stay listed until done, so a failure leaves them for `settle`.
fn wait_slot(fences: &mut Vec<CopyFence>, deadline: Deadline) -> Result<()> {
    fences.iter().try_for_each(|f| f.wait(deadline))?;
    fences.clear();
    Ok(())
}

#[derive(Clone, Copy)]
enum Direction {
    ToBounce,
    FromBounce,
}

impl Direction {
    fn op(self, memory: u64, bounce: u64, len: u64) -> CopyOp {
        match self {
            Direction::ToBounce => CopyOp { src: memory, dst: bounce, len },
            Direction::FromBounce => CopyOp { src: bounce, dst: memory, len },
        }
    }
}

/// A part of a segment inside one chunk: `offset` is its place in the bounce buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    addr: u64,
    len: u64,
    kind: MemKind,
    offset: u64,
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Chunk {
    pieces: Vec<Piece>,
    len: u64,
}

/// Cut the payload (the segments back to back) into chunks of at most `chunk_bytes`.
fn plan(segments: &[Segment], chunk_bytes: usize) -> Vec<Chunk> {
    let chunk_bytes = chunk_bytes as u64;
    let mut chunks = Vec::new();
    let mut current = Chunk::default();
    for s in segments {
        let mut done = 0;
        while done < s.len {
            let take = (s.len - done).min(chunk_bytes - current.len);
            current.pieces.push(Piece { addr: s.addr + done, len: take, kind: s.kind, offset: current.len });
            current.len += take;
            done += take;
            if current.len == chunk_bytes {
                chunks.push(std::mem::take(&mut current));
            }
        }
    }
    if current.len > 0 {
        chunks.push(current);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::host::HostDevice;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn host_stager(chunk_bytes: usize) -> Stager {
        let host: Arc<dyn Device> = Arc::new(HostDevice::with_threads(2).unwrap());
        Stager::new(StagingConfig { devices: vec![host], chunk_bytes, stage_host: true }).unwrap()
    }

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(20))
    }

    fn host(addr: u64, len: u64) -> Segment {
        Segment { addr, len, kind: MemKind::Host }
    }

    #[test]
    fn plan_cuts_segments_at_chunk_boundaries() {
        let chunks = plan(&[host(0x1000, 5), host(0x9000, 9), host(0x20000, 2)], 6);
        let lens: Vec<u64> = chunks.iter().map(|c| c.len).collect();
        assert_eq!(lens, [6, 6, 4]);
        assert_eq!(
            chunks[0].pieces,
            [
                Piece { addr: 0x1000, len: 5, kind: MemKind::Host, offset: 0 },
                Piece { addr: 0x9000, len: 1, kind: MemKind::Host, offset: 5 }
            ]
        );
        assert_eq!(chunks[1].pieces, [Piece { addr: 0x9001, len: 6, kind: MemKind::Host, offset: 0 }]);
        assert_eq!(chunks[2].pieces[1], Piece { addr: 0x20000, len: 2, kind: MemKind::Host, offset: 2 });
        assert!(plan(&[], 6).is_empty());
    }

    /// Scattered segments, sent staged through a real socket and received staged into other
    /// scattered segments, arrive byte for byte, with chunks alternating between the two buffers.
    #[test]
    fn staged_send_and_receive_move_scattered_bytes_exactly() {
        let stager = host_stager(64 << 10);
        let src = HostBuffer::alloc(1 << 20, &HostAllocOptions::new()).unwrap();
        let dst = HostBuffer::alloc(1 << 20, &HostAllocOptions::new()).unwrap();
        let data: Vec<u8> = (0..src.len()).map(|i| (i % 239) as u8).collect();
        src.write_at(0, &data).unwrap();
        // Odd sizes straddle chunk boundaries; the destination order differs from the source's.
        let sizes = [100_000u64, 3, 200_000, 65_536, 77_777];
        let (mut at_src, mut src_segments) = (0u64, Vec::new());
        for &len in &sizes {
            src_segments.push(host(src.as_ptr() as u64 + at_src, len));
            at_src += len + 1000;
        }
        let total: u64 = sizes.iter().sum();
        let dst_segments =
            [host(dst.as_ptr() as u64 + 500_000, total / 2), host(dst.as_ptr() as u64, total - total / 2)];

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let receiver = std::thread::scope(|s| {
            let stager = &stager;
            let dst_segments = &dst_segments;
            let handle = s.spawn(move || {
                let mut bounce = None;
                stager
                    .receive(&mut bounce, dst_segments, deadline(), |buf| b.read_exact(buf))
                    .map(|()| bounce.is_some())
            });
            let mut bounce = None;
            stager.send(&mut bounce, &src_segments, deadline(), |buf| a.write_all(buf)).unwrap();
            assert!(bounce.is_some(), "the sender keeps its bounce buffers for the next request");
            handle.join().unwrap()
        });
        assert!(receiver.unwrap(), "the receiver keeps its bounce buffers");

        let sent: Vec<u8> = src_segments
            .iter()
            .flat_map(|s| {
                let off = (s.addr - src.as_ptr() as u64) as usize;
                data[off..off + s.len as usize].to_vec()
            })
            .collect();
        let received = dst.to_vec();
        let half = (total / 2) as usize;
        assert!(received[500_000..500_000 + half] == sent[..half]);
        assert!(received[..sent.len() - half] == sent[half..]);
    }

    #[test]
    fn a_wire_failure_mid_way_is_reported_and_the_buffers_survive() {
        let stager = host_stager(4096);
        let src = HostBuffer::alloc(64 << 10, &HostAllocOptions::new()).unwrap();
        let mut bounce = None;
        let mut sent_chunks = 0;
        let outcome = stager.send(&mut bounce, &[host(src.as_ptr() as u64, 64 << 10)], deadline(), |_| {
            sent_chunks += 1;
            match sent_chunks {
                3 => Err(io::ErrorKind::BrokenPipe.into()),
                _ => Ok(()),
            }
        });
        assert!(matches!(outcome, Err(StageError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe));
        assert_eq!(sent_chunks, 3, "nothing is sent after the failure");
        assert!(bounce.is_some(), "copies drained, so the buffers are reused");
    }

    #[test]
    fn a_refused_device_copy_stops_the_transfer_as_a_device_error() {
        // The host device refuses a null source, as a GPU driver refuses a bad pointer.
        let stager = host_stager(4096);
        let mut bounce = None;
        let mut sent = 0;
        let outcome = stager.send(&mut bounce, &[host(0, 10_000)], deadline(), |_| {
            sent += 1;
            Ok(())
        });
        match outcome {
            Err(StageError::Device(e)) => assert_eq!(e.code(), crate::ErrorCode::InvalidCopy, "{e}"),
            other => panic!("expected a device error, got {other:?}"),
        }
        assert_eq!(sent, 0, "nothing reaches the wire");
        assert!(bounce.is_some());
    }

    #[test]
    fn registered_regions_tell_staged_local_memory_apart() {
        let stager = host_stager(4096);
        let gpu = MemKind::Cuda { device: 1 };
        stager.add_region(7, MemRegion { addr: 0x10_0000, len: 0x1000, kind: gpu });
        stager.add_region(8, MemRegion { addr: 0x20_0000, len: 0x1000, kind: MemKind::Host });
        assert_eq!(stager.staged_kind(0x10_0800, 0x800), Some(gpu));
        assert_eq!(stager.staged_kind(0x10_0800, 0x801), None, "runs past the region");
        assert_eq!(stager.staged_kind(0x20_0000, 16), Some(MemKind::Host));
        assert_eq!(stager.staged_kind(0x30_0000, 16), None);
        stager.remove_region(7);
        assert_eq!(stager.staged_kind(0x10_0800, 16), None);
        assert!(stager.stages(MemKind::Host) && !stager.stages(gpu), "only kinds with a device are staged");
    }

    #[test]
    fn configurations_that_cannot_work_are_refused() {
        let host: Arc<dyn Device> = Arc::new(HostDevice::with_threads(1).unwrap());
        let twice = StagingConfig { devices: vec![host.clone(), host.clone()], chunk_bytes: 4096, stage_host: false };
        assert!(Stager::new(twice).is_err());
        assert!(Stager::new(StagingConfig { chunk_bytes: 0, ..StagingConfig::new(vec![host]) }).is_err());
        assert!(Stager::new(StagingConfig { devices: vec![], chunk_bytes: 4096, stage_host: true }).is_err());
    }
}
