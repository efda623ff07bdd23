//! What CUDA and ROCm devices share: one [`Device`] implementation over the handful of driver calls
//! that differ between vendors ([`GpuRuntime`]).
//!
//! Each device owns one dedicated stream: every batch is enqueued on it and followed by an event,
//! which backs the batch's [`CopyFence`]. Batches on one device therefore complete in order, and
//! never wait behind an engine's compute streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::{
    CopyFence, CopyOp, Device, FenceSignal, IpcHandle, MemKind, MemRegion, Memory, MemoryError, PinGuard,
    coalesce_copies,
};

/// The bytes of a vendor IPC memory handle (`cudaIpcMemHandle_t`, `hipIpcMemHandle_t`).
pub const IPC_HANDLE_LEN: usize = 64;

/// Exported handle bytes: vendor handle | offset of the region in its allocation (u64 LE).
const EXPORTED_LEN: usize = IPC_HANDLE_LEN + 8;

/// `NoDevice` unless `ordinal` names one of the `count` devices of `kind` (`cuda`, `rocm`) present.
pub(crate) fn check_ordinal(kind: &str, ordinal: u32, count: u32) -> Result<()> {
    if ordinal >= count {
        return Err(MemoryError::NoDevice {
            kind: kind.into(),
            reason: format!("ordinal {ordinal} asked for, {count} device(s) present"),
        }
        .into());
    }
    Ok(())
}

/// The driver calls a GPU [`Device`] needs. Implemented for CUDA and HIP; every call is made with
/// the device's context bound to the calling thread (`bind` first).
pub trait GpuRuntime: Send + Sync + 'static {
    fn kind(&self) -> MemKind;

    /// Make this device current on the calling thread.
    fn bind(&self) -> Result<()>;

    fn alloc(&self, len: usize) -> Result<u64>;

    /// # Safety
    /// `ptr` came from [`alloc`](Self::alloc) and nothing uses it any more.
    unsafe fn free(&self, ptr: u64);

    /// Page-lock and map host memory for the device's DMA engines. `Ok(false)` when the range was
    /// registered already (by someone else, who will also unregister it).
    ///
    /// # Safety
    /// The range must be mapped host memory.
    unsafe fn host_register(&self, addr: u64, len: u64) -> Result<bool>;

    /// # Safety
    /// `addr` was registered by [`host_register`](Self::host_register).
    unsafe fn host_unregister(&self, addr: u64);

    /// Enqueue copies (validated and merged already) on the device's stream.
    ///
    /// # Safety
    /// As [`Device::copy_batch`].
    unsafe fn enqueue_copies(&self, copies: &[CopyOp]) -> Result<()>;

    /// Record an event after everything enqueued so far; returns its handle.
    fn record_event(&self) -> Result<usize>;

    /// `None` while work before the event runs, then its outcome.
    fn query_event(&self, event: usize) -> Option<Result<()>>;

    fn destroy_event(&self, event: usize);

    /// The allocation holding `addr`: (base, size). Fails for addresses the driver does not know.
    fn address_range(&self, addr: u64) -> Result<(u64, u64)>;

    fn ipc_get(&self, base: u64) -> Result<[u8; IPC_HANDLE_LEN]>;

    /// Map another process's allocation; returns its base address here.
    fn ipc_open(&self, handle: &[u8; IPC_HANDLE_LEN]) -> Result<u64>;

    /// # Safety
    /// `base` came from [`ipc_open`](Self::ipc_open) and nothing uses it any more.
    unsafe fn ipc_close(&self, base: u64);
}

/// A GPU as a [`Device`]. Cheap to clone.
pub struct GpuDevice<R: GpuRuntime> {
    runtime: Arc<R>,
}

impl<R: GpuRuntime> Clone for GpuDevice<R> {
    fn clone(&self) -> Self {
        GpuDevice { runtime: self.runtime.clone() }
    }
}

impl<R: GpuRuntime> GpuDevice<R> {
    pub(crate) fn from_runtime(runtime: R) -> Self {
        GpuDevice { runtime: Arc::new(runtime) }
    }

    pub(crate) fn runtime(&self) -> &R {
        &self.runtime
    }

    /// Describe `len` bytes of existing device memory at `addr` (a framework tensor's data
    /// pointer), checking with the driver that they lie inside one allocation of this device. The
    /// result can be registered with [`Agent::register_raw`](crate::Agent::register_raw).
    pub fn region_of(&self, addr: u64, len: u64) -> Result<MemRegion> {
        self.allocation_of(addr, len).map(|(region, _)| region)
    }

    /// As [`region_of`](Self::region_of), with the base address of the allocation holding it.
    fn allocation_of(&self, addr: u64, len: u64) -> Result<(MemRegion, u64)> {
        self.runtime.bind()?;
        let (base, size) = self.runtime.address_range(addr)?;
        let region = MemRegion { addr, len, kind: self.runtime.kind() };
        let inside = MemRegion { addr: base, len: size, kind: region.kind }.contains(addr, len);
        if len == 0 || !inside {
            return Err(Error::InvalidArgument(format!(
                "{addr:#x}+{len} is not inside one {} allocation (the allocation is {base:#x}+{size})",
                region.kind
            )));
        }
        Ok((region, base))
    }

    /// Copy a batch and wait for it; a convenience for setup code and tests.
    ///
    /// # Safety
    /// As [`Device::copy_batch`].
    pub unsafe fn copy_now(&self, ops: &[CopyOp], deadline: Deadline) -> Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.copy_batch(ops) }?.wait(deadline)
    }
}

impl<R: GpuRuntime> Device for GpuDevice<R> {
    fn name(&self) -> String {
        self.runtime.kind().to_string()
    }

    fn kind(&self) -> MemKind {
        self.runtime.kind()
    }

    fn alloc(&self, len: usize) -> Result<Arc<dyn Memory>> {
        if len == 0 {
            return Err(Error::InvalidArgument(format!("cannot allocate an empty {} buffer", self.kind())));
        }
        self.runtime.bind()?;
        let addr = self.runtime.alloc(len)?;
        let region = MemRegion { addr, len: len as u64, kind: self.kind() };
        Ok(Arc::new(GpuMemory { runtime: self.runtime.clone(), region, base: addr, owned: Owned::Allocation }))
    }

    fn pin_host(&self, region: MemRegion) -> Result<PinGuard> {
        if region.kind != MemKind::Host || region.len == 0 || region.end().is_none() {
            return Err(Error::InvalidArgument(format!("cannot pin {region:?} as host memory for {}", self.kind())));
        }
        self.runtime.bind()?;
        // SAFETY: the caller hands us host memory it owns; the driver checks that it is mapped.
        let registered = unsafe { self.runtime.host_register(region.addr, region.len) }?;
        let runtime = self.runtime.clone();
        Ok(PinGuard::new(move || {
            if registered && runtime.bind().is_ok() {
                // SAFETY: registered above, once.
                unsafe { runtime.host_unregister(region.addr) };
            }
        }))
    }

    unsafe fn copy_batch(&self, ops: &[CopyOp]) -> Result<CopyFence> {
        let copies: Vec<CopyOp> = coalesce_copies(ops)?
            .into_iter()
            .map(|p| CopyOp { src: p.src as u64, dst: p.dst as u64, len: p.len as u64 })
            .collect();
        self.runtime.bind()?;
        if !copies.is_empty() {
            // SAFETY: the caller's contract; the ops were validated.
            unsafe { self.runtime.enqueue_copies(&copies) }?;
        }
        let event = self.runtime.record_event()?;
        Ok(CopyFence::new(Arc::new(GpuFence { runtime: self.runtime.clone(), event })))
    }

    fn export_ipc(&self, region: MemRegion) -> Result<IpcHandle> {
        if region.kind != self.kind() {
            return Err(Error::InvalidArgument(format!("cannot export {} memory from {}", region.kind, self.kind())));
        }
        let (_, base) = self.allocation_of(region.addr, region.len)?;
        let handle = self.runtime.ipc_get(base)?;
        let mut bytes = Vec::with_capacity(EXPORTED_LEN);
        bytes.extend_from_slice(&handle);
        bytes.extend_from_slice(&(region.addr - base).to_le_bytes());
        Ok(IpcHandle { kind: region.kind, len: region.len, bytes })
    }

    fn import_ipc(&self, handle: &IpcHandle) -> Result<Arc<dyn Memory>> {
        let invalid = |reason: String| Error::from(MemoryError::InvalidIpcHandle { reason });
        if handle.kind != self.kind() {
            return Err(invalid(format!("a {} handle cannot be opened on {}", handle.kind, self.kind())));
        }
        if handle.bytes.len() != EXPORTED_LEN || handle.len == 0 {
            return Err(invalid(format!("{} bytes for {} bytes of memory", handle.bytes.len(), handle.len)));
        }
        let (vendor, offset) = handle.bytes.split_at(IPC_HANDLE_LEN);
        let vendor: [u8; IPC_HANDLE_LEN] = vendor.try_into().expect("split at the handle length");
        let offset = u64::from_le_bytes(offset.try_into().expect("eight bytes remain"));
        self.runtime.bind()?;
        let base = self.runtime.ipc_open(&vendor)?;
        let mut memory = GpuMemory {
            runtime: self.runtime.clone(),
            region: MemRegion { addr: base, len: 0, kind: self.kind() },
            base,
            owned: Owned::IpcMapping,
        };
        // The exporter's claim is checked against what the driver mapped before anyone copies; on
        // failure `memory` drops and closes the mapping.
        let (_, size) = self.runtime.address_range(base)?;
        match offset.checked_add(handle.len) {
            Some(end) if end <= size => {
                memory.region = MemRegion { addr: base + offset, len: handle.len, kind: self.kind() };
                Ok(Arc::new(memory))
            }
            _ => Err(invalid(format!("{offset}+{} lies outside the {size}-byte allocation", handle.len))),
        }
    }
}

enum Owned {
    Allocation,
    IpcMapping,
}

/// Device memory this process allocated or mapped from another process; released on drop.
struct GpuMemory<R: GpuRuntime> {
    runtime: Arc<R>,
    region: MemRegion,
    base: u64,
    owned: Owned,
}

impl<R: GpuRuntime> Memory for GpuMemory<R> {
    fn region(&self) -> MemRegion {
        self.region
    }
}

impl<R: GpuRuntime> Drop for GpuMemory<R> {
    fn drop(&mut self) {
        if self.runtime.bind().is_err() {
            return;
        }
        // SAFETY: the memory is released once, here; registrations keep it alive while in use.
        unsafe {
            match self.owned {
                Owned::Allocation => self.runtime.free(self.base),
                Owned::IpcMapping => self.runtime.ipc_close(self.base),
            }
        }
    }
}

/// A batch's completion: an event recorded after its copies on the device's stream.
struct GpuFence<R: GpuRuntime> {
    runtime: Arc<R>,
    event: usize,
}

/// Spin this long before sleeping between event queries: most batches finish within it.
const SPIN: Duration = Duration::from_micros(50);

impl<R: GpuRuntime> FenceSignal for GpuFence<R> {
    fn poll(&self) -> Option<Result<()>> {
        // Fences are polled from any thread; the driver wants the device's context there.
        if let Err(e) = self.runtime.bind() {
            return Some(Err(e));
        }
        self.runtime.query_event(self.event)
    }

    fn wait(&self, deadline: Deadline) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(outcome) = self.poll() {
                return outcome;
            }
            if deadline.expired() {
                return Err(MemoryError::FenceTimeout.into());
            }
            // Polling rather than a blocking synchronize keeps the deadline enforceable.
            if started.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

impl<R: GpuRuntime> Drop for GpuFence<R> {
    fn drop(&mut self) {
        if self.runtime.bind().is_ok() {
            self.runtime.destroy_event(self.event);
        }
    }
}

/// The tests every GPU device runs: `$open(ordinal)` opens a `$device`, `$count()` counts them.
/// Without the hardware they check that opening fails with a typed error, then print why the rest
/// is skipped.
#[cfg(test)]
macro_rules! gpu_device_tests {
    ($device:ty, $open:path, $count:path) => {
        /// The device, or `None` after printing why the test is skipped.
        fn device_or_skip() -> Option<$device> {
            $open(0).map_err(|e| println!("skipping: {e}")).ok()
        }

        #[test]
        fn a_missing_ordinal_is_no_device() {
            let Ok(count) = $count() else { return println!("skipping: no device") };
            let err = $open(count).err().expect("one past the last ordinal");
            assert_eq!(err.code(), crate::ErrorCode::NoDevice);
        }

        #[test]
        fn opening_without_a_device_is_a_typed_error() {
            match $open(0) {
                Ok(device) => {
                    println!("{} is present; the no-device path is not reachable here", crate::Device::name(&device))
                }
                // No panic from a loader, and a code callers can branch on.
                Err(e) => assert!(matches!(e.code(), crate::ErrorCode::NoDriver | crate::ErrorCode::NoDevice), "{e}"),
            }
        }

        #[test]
        fn copies_round_trip_through_the_device() {
            let Some(device) = device_or_skip() else { return };
            crate::memory::gpu::conformance::round_trip(&device);
        }

        #[test]
        fn existing_device_pointers_are_described_exactly() {
            let Some(device) = device_or_skip() else { return };
            crate::memory::gpu::conformance::describes_existing_pointers(&device);
        }

        #[test]
        fn malformed_ipc_handles_are_refused() {
            let Some(device) = device_or_skip() else { return };
            crate::memory::gpu::conformance::refuses_malformed_ipc_handles(&device);
        }
    };
}
#[cfg(test)]
pub(crate) use gpu_device_tests;

/// Checks every GPU device passes, run by each vendor's tests where its hardware is present.
#[cfg(test)]
pub(crate) mod conformance {
    use super::*;
    use crate::error::ErrorCode;
    use crate::memory::host::{HostAllocOptions, HostBuffer};

    fn deadline() -> Deadline {
        Deadline::after(Duration::from_secs(20))
    }

    /// Scattered 16-token blocks H2D, D2D inside the device, D2H, and the bytes come back intact.
    pub fn round_trip<R: GpuRuntime>(device: &GpuDevice<R>) {
        const BLOCK: usize = 16 * 8 * 128 * 2; // 16 tokens x 8 heads x 128 x fp16
        const BLOCKS: usize = 64;
        let host = HostBuffer::alloc(BLOCK * BLOCKS, &HostAllocOptions::new()).unwrap();
        let data: Vec<u8> = (0..host.len()).map(|i| (i * 31 % 253) as u8).collect();
        host.write_at(0, &data).unwrap();
        let _pin = device.pin_host(host.region()).unwrap();
        let a = device.alloc(BLOCK * BLOCKS * 2).unwrap().region();
        let b = device.alloc(BLOCK * BLOCKS).unwrap().region();
        assert_eq!(a.kind, device.kind());
        // Block i goes to slot 2i of `a` (scattered), then gathered back densely into `b`.
        let h2d: Vec<CopyOp> = (0..BLOCKS)
            .map(|i| CopyOp {
                src: host.as_ptr() as u64 + (i * BLOCK) as u64,
                dst: a.addr + (2 * i * BLOCK) as u64,
                len: BLOCK as u64,
            })
            .collect();
        let d2d: Vec<CopyOp> = h2d
            .iter()
            .enumerate()
            .map(|(i, op)| CopyOp { src: op.dst, dst: b.addr + (i * BLOCK) as u64, len: op.len })
            .collect();
        let back = HostBuffer::alloc(BLOCK * BLOCKS, &HostAllocOptions::new()).unwrap();
        let _pin_back = device.pin_host(back.region()).unwrap();
        let d2h = [CopyOp { src: b.addr, dst: back.as_ptr() as u64, len: (BLOCK * BLOCKS) as u64 }];
        unsafe {
            // One stream: the three batches run in order, so only the last fence needs waiting.
            device.copy_batch(&h2d).unwrap();
            device.copy_batch(&d2d).unwrap();
            device.copy_now(&d2h, deadline()).unwrap();
        }
        assert!(back.to_vec() == data, "bytes changed on the way through {}", device.name());
    }

    /// Existing allocations are described exactly; foreign addresses and overruns are refused.
    pub fn describes_existing_pointers<R: GpuRuntime>(device: &GpuDevice<R>) {
        let memory = device.alloc(1 << 20).unwrap();
        let r = memory.region();
        assert_eq!(
            device.region_of(r.addr + 4096, 8192).unwrap(),
            MemRegion { addr: r.addr + 4096, len: 8192, kind: r.kind }
        );
        assert_eq!(device.region_of(r.addr, r.len + 1).unwrap_err().code(), ErrorCode::InvalidArgument);
        let host = HostBuffer::alloc(4096, &HostAllocOptions::new()).unwrap();
        assert!(device.region_of(host.as_ptr() as u64, 4096).is_err());
    }

    /// Malformed handles are refused before the driver sees them.
    pub fn refuses_malformed_ipc_handles<R: GpuRuntime>(device: &GpuDevice<R>) {
        let memory = device.alloc(1 << 20).unwrap();
        let mut handle = device.export_ipc(memory.region()).unwrap();
        assert_eq!(handle.bytes.len(), EXPORTED_LEN);
        handle.bytes.pop();
        assert_eq!(device.import_ipc(&handle).err().unwrap().code(), ErrorCode::InvalidIpcHandle);
        let wrong_kind = IpcHandle { kind: MemKind::Host, ..device.export_ipc(memory.region()).unwrap() };
        assert_eq!(device.import_ipc(&wrong_kind).err().unwrap().code(), ErrorCode::InvalidIpcHandle);
    }
}
