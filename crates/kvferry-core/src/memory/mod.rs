//! Memory of one kind behind one trait.
//!
//! A [`MemRegion`] names bytes (address, length, kind); a [`Device`] allocates, pins and copies them.
//! Host memory is the reference implementation ([`host::HostDevice`]); CUDA and ROCm devices implement
//! the same trait, which is why copies are batched and asynchronous (completion through a
//! [`CopyFence`]) and why memory can be exported to another process as an [`IpcHandle`].

pub mod host;

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use crate::deadline::Deadline;
use crate::error::{ErrorCode, Result};

/// Where a region lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemKind {
    Host,
    Cuda { device: u32 },
    Rocm { device: u32 },
}

impl MemKind {
    /// Wire encoding: (tag, device ordinal).
    pub fn to_wire(self) -> (u8, u32) {
        match self {
            MemKind::Host => (0, 0),
            MemKind::Cuda { device } => (1, device),
            MemKind::Rocm { device } => (2, device),
        }
    }

    pub fn from_wire(tag: u8, device: u32) -> Option<MemKind> {
        match tag {
            0 => Some(MemKind::Host),
            1 => Some(MemKind::Cuda { device }),
            2 => Some(MemKind::Rocm { device }),
            _ => None,
        }
    }
}

impl std::fmt::Display for MemKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemKind::Host => write!(f, "host"),
            MemKind::Cuda { device } => write!(f, "cuda:{device}"),
            MemKind::Rocm { device } => write!(f, "rocm:{device}"),
        }
    }
}

/// A span of bytes in some memory. Plain data: holding one does not keep the memory alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemRegion {
    pub addr: u64,
    pub len: u64,
    pub kind: MemKind,
}

impl MemRegion {
    pub fn host(ptr: *const u8, len: usize) -> Self {
        MemRegion { addr: ptr as u64, len: len as u64, kind: MemKind::Host }
    }

    /// One past the last byte, or `None` when `addr + len` overflows.
    pub fn end(&self) -> Option<u64> {
        self.addr.checked_add(self.len)
    }

    /// Whether `[addr, addr + len)` lies inside this region (same kind assumed by the caller).
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        match (addr.checked_add(len), self.end()) {
            (Some(end), Some(self_end)) => addr >= self.addr && end <= self_end,
            _ => false,
        }
    }
}

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

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    #[error("allocating {len} bytes of {kind} memory failed: {cause}")]
    AllocFailed { kind: MemKind, len: u64, cause: String },
    #[error("no huge pages available for {len} bytes: {cause}")]
    HugePagesUnavailable { len: u64, cause: String },
    #[error("pinning {len} bytes at {addr:#x} failed: {cause} (check `ulimit -l`)")]
    PinFailed { addr: u64, len: u64, cause: String },
    #[error("copy {index} of the batch is invalid: {reason}")]
    InvalidCopy { index: usize, reason: String },
    #[error("no {kind} device: {reason}")]
    NoDevice { kind: String, reason: String },
    #[error("copies did not complete before the deadline")]
    FenceTimeout,
}

impl MemoryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            MemoryError::AllocFailed { .. } => ErrorCode::AllocFailed,
            MemoryError::HugePagesUnavailable { .. } => ErrorCode::HugePagesUnavailable,
            MemoryError::PinFailed { .. } => ErrorCode::PinFailed,
            MemoryError::InvalidCopy { .. } => ErrorCode::InvalidCopy,
            MemoryError::NoDevice { .. } => ErrorCode::NoDevice,
            MemoryError::FenceTimeout => ErrorCode::Timeout,
        }
    }
}
