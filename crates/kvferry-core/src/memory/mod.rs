//! Memory of one kind behind one trait.
//!
//! A [`MemRegion`] names bytes (address, length, kind); a [`Device`] allocates, pins and copies them.
//! Host memory is the reference implementation ([`host::HostDevice`]); CUDA and ROCm devices implement
//! the same trait, which is why copies are batched and asynchronous (completion through a
//! [`CopyFence`]) and why memory can be exported to another process as an [`IpcHandle`].

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(any(feature = "cuda", feature = "rocm"))]
mod dynlib;
pub(crate) mod error;
#[cfg(any(feature = "cuda", feature = "rocm"))]
pub mod gpu;
pub mod host;
pub mod paged;
pub(crate) mod region;
#[cfg(feature = "rocm")]
pub mod rocm;

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::deadline::Deadline;
use crate::error::Result;

pub use error::MemoryError;
pub use region::{MemKind, MemRegion};

/// Memory that can be registered with an agent and is kept alive by the registration.
pub trait Memory: Send + Sync + 'static {
    fn region(&self) -> MemRegion;

    /// A file another process can map to reach the same bytes (mapped from offset 0 at
    /// `region().addr`), for transports that share memory within a node. `None` when the memory
    /// cannot be shared that way.
    fn share_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// One copy of a batch: `len` bytes from `src` to `dst`. The regions may be of different kinds
/// (host → device and so on) where the device supports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyOp {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// An opaque, serializable handle that lets another process on the same node map this memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpcHandle {
    pub kind: MemKind,
    pub len: u64,
    pub bytes: Vec<u8>,
}

/// Memory of one kind: allocation, pinning for DMA, batched asynchronous copies, IPC export/import.
pub trait Device: Send + Sync {
    /// `host`, `cuda:0`, ...
    fn name(&self) -> String;

    fn kind(&self) -> MemKind;

    /// Allocate `len` bytes of this device's memory, suitable for registration.
    fn alloc(&self, len: usize) -> Result<Arc<dyn Memory>>;

    /// Make existing host memory usable for DMA by this device (page-lock it). The returned guard
    /// undoes it on drop.
    fn pin_host(&self, region: MemRegion) -> Result<PinGuard>;

    /// Start copying a batch; completion is signalled through the returned fence.
    ///
    /// # Safety
    /// Every `src` range must be readable and every `dst` range writable memory that this device
    /// can access, and they must stay valid until the fence completes. Destinations must not overlap
    /// each other or any source.
    unsafe fn copy_batch(&self, ops: &[CopyOp]) -> Result<CopyFence>;

    /// Export memory for another process on this node.
    fn export_ipc(&self, region: MemRegion) -> Result<IpcHandle>;

    /// Map memory exported by another process.
    fn import_ipc(&self, handle: &IpcHandle) -> Result<Arc<dyn Memory>>;
}

/// Undoes a [`Device::pin_host`] when dropped.
pub struct PinGuard {
    unpin: Option<Box<dyn FnOnce() + Send>>,
}

impl PinGuard {
    pub fn new(unpin: impl FnOnce() + Send + 'static) -> Self {
        PinGuard { unpin: Some(Box::new(unpin)) }
    }
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        if let Some(unpin) = self.unpin.take() {
            unpin();
        }
    }
}

/// Completion of a batch of copies. Devices signal it from whatever completes their copies (worker
/// threads for host memory, stream events for GPUs).
#[derive(Clone)]
pub struct CopyFence {
    inner: Arc<dyn FenceSignal>,
}

/// What a device implements to back a [`CopyFence`].
pub trait FenceSignal: Send + Sync {
    /// `None` while copies are running, then their outcome.
    fn poll(&self) -> Option<Result<()>>;
    /// Block until done or the deadline passes (then `Err(MemoryError::FenceTimeout)`).
    fn wait(&self, deadline: Deadline) -> Result<()>;
}

impl CopyFence {
    pub fn new(signal: Arc<dyn FenceSignal>) -> Self {
        CopyFence { inner: signal }
    }

    pub fn poll(&self) -> Option<Result<()>> {
        self.inner.poll()
    }

    pub fn is_done(&self) -> bool {
        self.inner.poll().is_some()
    }

    pub fn wait(&self, deadline: Deadline) -> Result<()> {
        self.inner.wait(deadline)
    }
}

/// One contiguous copy, as plain addresses so that it can cross to a worker thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Piece {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

impl Piece {
    /// Reject what would make `copy_nonoverlapping` undefined even for a caller that otherwise
    /// honours the contract: null, wrapping or overlapping ranges.
    fn validate(op: &CopyOp) -> std::result::Result<Piece, String> {
        if op.src == 0 || op.dst == 0 {
            return Err("null address".into());
        }
        let in_address_space = |addr: u64| addr.checked_add(op.len).and_then(|end| usize::try_from(end).ok()).is_some();
        if !in_address_space(op.src) || !in_address_space(op.dst) {
            return Err(format!("{} bytes from {:#x} to {:#x} overflow the address space", op.len, op.src, op.dst));
        }
        let piece = Piece { src: op.src as usize, dst: op.dst as usize, len: op.len as usize };
        if piece.overlaps() {
            return Err("source and destination overlap".into());
        }
        Ok(piece)
    }

    fn overlaps(&self) -> bool {
        self.src < self.dst + self.len && self.dst < self.src + self.len
    }

    /// Absorb `next` when it continues this piece in both source and destination. Adjacent KV blocks
    /// are common, and one long copy is faster than many short ones: past a few MiB, memcpy switches
    /// to non-temporal stores that do not pull the destination through the cache.
    fn try_extend(&mut self, next: &Piece) -> bool {
        if next.src != self.src + self.len || next.dst != self.dst + self.len {
            return false;
        }
        let merged = Piece { len: self.len + next.len, ..*self };
        if merged.overlaps() {
            return false;
        }
        *self = merged;
        true
    }

    /// # Safety
    /// `src` must be readable and `dst` writable for `len` bytes, and nothing else may access `dst`.
    pub unsafe fn copy(&self) {
        // SAFETY: the caller's guarantees; `validate` ruled out overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.src as *const u8, self.dst as *mut u8, self.len) };
    }
}

/// Validate a batch and merge ops that continue each other; zero-length ops are dropped. Every
/// device runs this first, so a bad op is refused with its index before anything is copied.
pub(crate) fn coalesce_copies(ops: &[CopyOp]) -> Result<Vec<Piece>> {
    let mut pieces: Vec<Piece> = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        if op.len == 0 {
            continue;
        }
        let piece = Piece::validate(op).map_err(|reason| MemoryError::InvalidCopy { index, reason })?;
        if !pieces.last_mut().is_some_and(|last| last.try_extend(&piece)) {
            pieces.push(piece);
        }
    }
    Ok(pieces)
}
