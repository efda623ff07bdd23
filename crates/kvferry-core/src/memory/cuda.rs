//! NVIDIA GPUs through the CUDA driver API (`cudarc`, loaded at run time).
//!
//! The build needs no CUDA toolkit. At run time `libcuda.so.1` is opened with `dlopen` before cudarc
//! is touched: cudarc's own loader panics when the library is missing, and a missing driver must be
//! a [`MemoryError::NoDriver`], not a crash.
//!
//! Batches go out with one `cuMemcpyBatchAsync` call when the loaded driver exports it (CUDA 12.8
//! and newer), else one `cuMemcpyAsync` per merged copy; both on the device's own non-blocking
//! stream.

use std::ffi::{CStr, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::sys::{self, CUresult};

use super::dynlib::DynLib;
use super::gpu::{GpuDevice, GpuRuntime, IPC_HANDLE_LEN, check_ordinal};
use crate::error::{Error, Result};
use crate::memory::{CopyOp, MemKind, MemoryError};

/// NVIDIA GPU memory as a [`Device`](crate::Device): `CudaDevice::open(ordinal)`.
pub type CudaDevice = GpuDevice<CudaRuntime>;

/// Names `dlopen` tries, the versioned one first (the unversioned link comes only with dev files).
const DRIVER_LIBRARIES: &[&str] = &["libcuda.so.1", "libcuda.so"];

/// The first driver version with `cuMemcpyBatchAsync` (12.8, as `cuDriverGetVersion` reports it).
const BATCH_COPY_DRIVER: i32 = 12080;

/// Loads and initialises the driver once per process; the outcome is remembered.
fn driver() -> Result<&'static DynLib> {
    static DRIVER: OnceLock<std::result::Result<DynLib, MemoryError>> = OnceLock::new();
    let loaded = DRIVER.get_or_init(|| {
        let lib =
            DynLib::open(DRIVER_LIBRARIES).map_err(|reason| MemoryError::NoDriver { kind: "cuda".into(), reason })?;
        // SAFETY: the library is loaded, so cudarc's loader finds it; cuInit has no preconditions.
        let init = unsafe { sys::cuInit(0) };
        match init {
            CUresult::CUDA_SUCCESS => Ok(lib),
            CUresult::CUDA_ERROR_NO_DEVICE => {
                Err(MemoryError::NoDevice { kind: "cuda".into(), reason: "the driver sees no GPU".into() })
            }
            other => Err(MemoryError::NoDriver { kind: "cuda".into(), reason: format!("cuInit: {}", describe(other)) }),
        }
    });
    loaded.as_ref().map_err(|e| e.clone().into())
}

/// How many CUDA devices this process can use. `NoDriver` or `NoDevice` when there are none.
pub fn device_count() -> Result<u32> {
    driver()?;
    let mut count = 0;
    // SAFETY: the driver is initialised; `count` is a valid out-pointer.
    check("cuda", "cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
    match u32::try_from(count) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(MemoryError::NoDevice { kind: "cuda".into(), reason: "the driver sees no GPU".into() }.into()),
    }
}

fn describe(result: CUresult) -> String {
    let mut text: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: `text` is a valid out-pointer; the driver returns a static string.
    let known = unsafe { sys::cuGetErrorString(result, &mut text) } == CUresult::CUDA_SUCCESS && !text.is_null();
    if known {
        // SAFETY: checked non-null; the string is static and NUL-terminated.
        format!("{result:?} ({})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
    } else {
        format!("{result:?}")
    }
}

fn check(device: &str, call: &str, result: CUresult) -> Result<()> {
    match result {
        CUresult::CUDA_SUCCESS => Ok(()),
        other => {
            Err(MemoryError::DeviceCall { device: device.into(), call: call.into(), cause: describe(other) }.into())
        }
    }
}

impl CudaDevice {
    /// Open GPU `ordinal`: retains its primary context (shared with PyTorch and other users of the
    /// runtime API, so their pointers are valid here) and creates the device's copy stream.
    pub fn open(ordinal: u32) -> Result<CudaDevice> {
        let lib = driver()?;
        let count = device_count()?;
        check_ordinal("cuda", ordinal, count)?;
        let name = format!("cuda:{ordinal}");
        let mut device = 0;
        let mut context = std::ptr::null_mut();
        let mut version = 0;
        // SAFETY: the driver is initialised; out-pointers are valid.
        unsafe {
            check(&name, "cuDeviceGet", sys::cuDeviceGet(&mut device, ordinal as i32))?;
            check(&name, "cuDevicePrimaryCtxRetain", sys::cuDevicePrimaryCtxRetain(&mut context, device))?;
            check(&name, "cuDriverGetVersion", sys::cuDriverGetVersion(&mut version))?;
        }
        let mut runtime = CudaRuntime {
            ordinal,
            device,
            context,
            stream: std::ptr::null_mut(),
            batch_copy: AtomicBool::new(version >= BATCH_COPY_DRIVER && lib.symbol(c"cuMemcpyBatchAsync").is_some()),
        };
        runtime.bind()?;
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: the context is current; on failure `runtime` drops and releases the context.
        check(&name, "cuStreamCreate", unsafe { sys::cuStreamCreate(&mut runtime.stream, flags) })?;
        Ok(GpuDevice::from_runtime(runtime))
    }

    /// Whether batches go out as one `cuMemcpyBatchAsync` call.
    pub fn batches_copies(&self) -> bool {
        self.runtime().batch_copy.load(Ordering::Relaxed)
    }
}

/// The CUDA side of [`GpuDevice`]: a primary context and one copy stream.
pub struct CudaRuntime {
    ordinal: u32,
    device: sys::CUdevice,
    context: sys::CUcontext,
    stream: sys::CUstream,
    /// Cleared if the driver refuses a batched copy, after which copies go one by one.
    batch_copy: AtomicBool,
}

// SAFETY: CUDA contexts and streams may be used from any thread once made current there (`bind`).
unsafe impl Send for CudaRuntime {}
unsafe impl Sync for CudaRuntime {}

impl CudaRuntime {
    fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }

    fn check(&self, call: &str, result: CUresult) -> Result<()> {
        check(&self.name(), call, result)
    }

    /// # Safety
    /// As [`GpuRuntime::enqueue_copies`]; the context is current.
    unsafe fn enqueue_batch(&self, copies: &[CopyOp]) -> Result<()> {
        let mut dsts: Vec<sys::CUdeviceptr> = copies.iter().map(|c| c.dst).collect();
        let mut srcs: Vec<sys::CUdeviceptr> = copies.iter().map(|c| c.src).collect();
        let mut sizes: Vec<usize> = copies.iter().map(|c| c.len as usize).collect();
        // One attribute for every copy: stream order for the sources (they are valid until the fence),
        // and location hints that only matter for managed memory.
        let hint =
            sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE, id: self.ordinal as i32 };
        let mut attrs = [sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: hint,
            dstLocHint: hint,
            flags: 0,
        }];
        let mut attr_starts = [0usize];
        let mut failed_at = usize::MAX;
        // SAFETY: the arrays are `copies.len()` long (one attribute for all); the caller guarantees the
        // ranges.
        let result = unsafe {
            sys::cuMemcpyBatchAsync(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                copies.len(),
                attrs.as_mut_ptr(),
                attr_starts.as_mut_ptr(),
                1,
                &mut failed_at,
                self.stream,
            )
        };
        self.check("cuMemcpyBatchAsync", result)
    }

    /// # Safety
    /// As [`GpuRuntime::enqueue_copies`]; the context is current.
    unsafe fn enqueue_each(&self, copies: &[CopyOp]) -> Result<()> {
        for c in copies {
            // SAFETY: unified addressing lets one call copy in any direction; ranges are the caller's.
            let result = unsafe { sys::cuMemcpyAsync(c.dst, c.src, c.len as usize, self.stream) };
            self.check("cuMemcpyAsync", result)?;
        }
        Ok(())
    }
}

impl Drop for CudaRuntime {
    fn drop(&mut self) {
        if self.bind().is_ok() && !self.stream.is_null() {
            // SAFETY: the stream is ours; pending work completes before its resources go.
            unsafe { sys::cuStreamDestroy_v2(self.stream) };
        }
        // SAFETY: retained once in `open`.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
    }
}

impl GpuRuntime for CudaRuntime {
    fn kind(&self) -> MemKind {
        MemKind::Cuda { device: self.ordinal }
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for the runtime's lifetime.
        self.check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.context) })
    }

    fn alloc(&self, len: usize) -> Result<u64> {
        let mut ptr = 0;
        // SAFETY: valid out-pointer; the context is current.
        match unsafe { sys::cuMemAlloc_v2(&mut ptr, len) } {
            CUresult::CUDA_SUCCESS => Ok(ptr),
            other => {
                Err(MemoryError::AllocFailed { kind: self.kind(), len: len as u64, cause: describe(other) }.into())
            }
        }
    }

    unsafe fn free(&self, ptr: u64) {
        // SAFETY: the caller's contract.
        unsafe { sys::cuMemFree_v2(ptr) };
    }

    unsafe fn host_register(&self, addr: u64, len: u64) -> Result<bool> {
        let flags = sys::CU_MEMHOSTREGISTER_PORTABLE;
        // SAFETY: the caller's contract.
        match unsafe { sys::cuMemHostRegister_v2(addr as *mut c_void, len as usize, flags) } {
            CUresult::CUDA_SUCCESS => Ok(true),
            CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED => Ok(false),
            other => {
                Err(MemoryError::PinFailed { addr, len, cause: format!("cuMemHostRegister: {}", describe(other)) }
                    .into())
            }
        }
    }

    unsafe fn host_unregister(&self, addr: u64) {
        // SAFETY: the caller's contract.
        unsafe { sys::cuMemHostUnregister(addr as *mut c_void) };
    }

    unsafe fn enqueue_copies(&self, copies: &[CopyOp]) -> Result<()> {
        if copies.len() > 1 && self.batch_copy.load(Ordering::Relaxed) {
            // SAFETY: forwarded.
            match unsafe { self.enqueue_batch(copies) } {
                Ok(()) => return Ok(()),
                Err(e) => {
                    // Copies are idempotent (sources and destinations never overlap), so the ones the
                    // batch may have started are simply done again one by one.
                    tracing::warn!(error = %e, "cuMemcpyBatchAsync refused a batch; copying op by op from now on");
                    self.batch_copy.store(false, Ordering::Relaxed);
                }
            }
        }
        // SAFETY: forwarded.
        unsafe { self.enqueue_each(copies) }
    }

    fn record_event(&self) -> Result<usize> {
        let mut event = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: valid out-pointer; the context is current.
        self.check("cuEventCreate", unsafe { sys::cuEventCreate(&mut event, flags) })?;
        // SAFETY: both handles are live.
        if let Err(e) = self.check("cuEventRecord", unsafe { sys::cuEventRecord(event, self.stream) }) {
            self.destroy_event(event as usize);
            return Err(e);
        }
        Ok(event as usize)
    }

    fn query_event(&self, event: usize) -> Option<Result<()>> {
        // SAFETY: the fence owns the event until it drops.
        match unsafe { sys::cuEventQuery(event as sys::CUevent) } {
            CUresult::CUDA_SUCCESS => Some(Ok(())),
            CUresult::CUDA_ERROR_NOT_READY => None,
            other => Some(self.check("copies on the stream", other)),
        }
    }

    fn destroy_event(&self, event: usize) {
        // SAFETY: called once per event, by its owner.
        unsafe { sys::cuEventDestroy_v2(event as sys::CUevent) };
    }

    fn address_range(&self, addr: u64) -> Result<(u64, u64)> {
        let (mut base, mut size) = (0, 0);
        // SAFETY: valid out-pointers; the driver checks the address.
        let result = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) };
        self.check("cuMemGetAddressRange", result).map_err(|e| {
            Error::InvalidArgument(format!("{addr:#x} is not device memory known to {}: {e}", self.name()))
        })?;
        Ok((base, size as u64))
    }

    fn ipc_get(&self, base: u64) -> Result<[u8; IPC_HANDLE_LEN]> {
        let mut handle = sys::CUipcMemHandle { reserved: [0; IPC_HANDLE_LEN] };
        // SAFETY: valid out-pointer; `base` is an allocation's start.
        self.check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut handle, base) })?;
        Ok(handle.reserved.map(|b| b as u8))
    }

    fn ipc_open(&self, handle: &[u8; IPC_HANDLE_LEN]) -> Result<u64> {
        let handle = sys::CUipcMemHandle { reserved: handle.map(|b| b as std::ffi::c_char) };
        let mut base = 0;
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: valid out-pointer; the driver validates the handle.
        self.check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut base, handle, flags) })?;
        Ok(base)
    }

    unsafe fn ipc_close(&self, base: u64) {
        // SAFETY: the caller's contract.
        unsafe { sys::cuIpcCloseMemHandle(base) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::memory::gpu::gpu_device_tests!(CudaDevice, CudaDevice::open, device_count);
}
