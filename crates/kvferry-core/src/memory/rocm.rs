//! AMD GPUs through the HIP runtime, loaded at run time.
//!
//! `libamdhip64.so` is opened with `dlopen` rather than linked: a build with the `rocm` feature then
//! needs no ROCm installation to compile or to start, and a machine without ROCm (or without an AMD
//! GPU) gets [`MemoryError::NoDriver`] / [`MemoryError::NoDevice`]. The few entry points used are
//! declared here from HIP's C API (stable since ROCm 5), so no `-sys` crate or headers are needed.
//! Copies are one `hipMemcpyAsync(hipMemcpyDefault)` per merged op on the device's own stream.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::OnceLock;

use super::dynlib::DynLib;
use super::gpu::{GpuDevice, GpuRuntime, IPC_HANDLE_LEN, check_ordinal};
use crate::error::{Error, Result};
use crate::memory::{CopyOp, MemKind, MemoryError};

/// AMD GPU memory as a [`Device`](crate::Device): `RocmDevice::open(ordinal)`.
pub type RocmDevice = GpuDevice<RocmRuntime>;

const RUNTIME_LIBRARIES: &[&str] = &["libamdhip64.so.6", "libamdhip64.so.5", "libamdhip64.so"];

type HipError = c_int;
type HipStream = *mut c_void;
type HipEvent = *mut c_void;

const HIP_SUCCESS: HipError = 0;
const HIP_ERROR_NO_DEVICE: HipError = 100;
const HIP_ERROR_NOT_READY: HipError = 600;
const HIP_ERROR_HOST_MEMORY_ALREADY_REGISTERED: HipError = 712;
const HIP_MEMCPY_DEFAULT: c_int = 4;
const HIP_STREAM_NON_BLOCKING: c_uint = 1;
const HIP_EVENT_DISABLE_TIMING: c_uint = 2;
const HIP_HOST_REGISTER_PORTABLE: c_uint = 1;
const HIP_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 1;

#[repr(C)]
#[derive(Clone, Copy)]
struct HipIpcMemHandle {
    reserved: [c_char; IPC_HANDLE_LEN],
}

/// Declares the HIP entry points once: the table's fields and the loader that fills them.
macro_rules! hip_api {
    ($($name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        #[allow(non_snake_case)]
        struct HipApi {
            $($name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        impl HipApi {
            fn load(lib: &DynLib) -> std::result::Result<HipApi, String> {
                Ok(HipApi {
                    $($name: {
                        let symbol = CString::new(stringify!($name)).expect("identifiers have no NUL");
                        let ptr = lib
                            .symbol(&symbol)
                            .ok_or_else(|| format!("the HIP runtime lacks {}", stringify!($name)))?;
                        // SAFETY: the symbol is HIP's C function with exactly this signature.
                        unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) -> $ret>(ptr) }
                    },)*
                })
            }
        }
    };
}

hip_api! {
    hipInit: fn(c_uint) -> HipError;
    hipGetDeviceCount: fn(*mut c_int) -> HipError;
    hipSetDevice: fn(c_int) -> HipError;
    hipGetErrorString: fn(HipError) -> *const c_char;
    hipMalloc: fn(*mut *mut c_void, usize) -> HipError;
    hipFree: fn(*mut c_void) -> HipError;
    hipHostRegister: fn(*mut c_void, usize, c_uint) -> HipError;
    hipHostUnregister: fn(*mut c_void) -> HipError;
    hipMemcpyAsync: fn(*mut c_void, *const c_void, usize, c_int, HipStream) -> HipError;
    hipStreamCreateWithFlags: fn(*mut HipStream, c_uint) -> HipError;
    hipStreamDestroy: fn(HipStream) -> HipError;
    hipEventCreateWithFlags: fn(*mut HipEvent, c_uint) -> HipError;
    hipEventRecord: fn(HipEvent, HipStream) -> HipError;
    hipEventQuery: fn(HipEvent) -> HipError;
    hipEventDestroy: fn(HipEvent) -> HipError;
    hipMemGetAddressRange: fn(*mut *mut c_void, *mut usize, *mut c_void) -> HipError;
    hipIpcGetMemHandle: fn(*mut HipIpcMemHandle, *mut c_void) -> HipError;
    hipIpcOpenMemHandle: fn(*mut *mut c_void, HipIpcMemHandle, c_uint) -> HipError;
    hipIpcCloseMemHandle: fn(*mut c_void) -> HipError;
}

/// Loads the runtime and counts devices once per process.
fn runtime_api() -> Result<(&'static HipApi, u32)> {
    static API: OnceLock<std::result::Result<(HipApi, u32), MemoryError>> = OnceLock::new();
    let loaded = API.get_or_init(|| {
        let no_driver = |reason| MemoryError::NoDriver { kind: "rocm".into(), reason };
        let lib = DynLib::open(RUNTIME_LIBRARIES).map_err(no_driver)?;
        let api = HipApi::load(&lib).map_err(no_driver)?;
        let no_device = |reason| MemoryError::NoDevice { kind: "rocm".into(), reason };
        // SAFETY: loaded entry points; hipInit has no preconditions.
        let init = unsafe { (api.hipInit)(0) };
        if init != HIP_SUCCESS {
            return Err(no_device(format!("hipInit: {}", describe(&api, init))));
        }
        let mut count = 0;
        // SAFETY: valid out-pointer.
        match unsafe { (api.hipGetDeviceCount)(&mut count) } {
            HIP_SUCCESS if count > 0 => Ok((api, count as u32)),
            HIP_SUCCESS | HIP_ERROR_NO_DEVICE => Err(no_device("the HIP runtime sees no GPU".into())),
            other => Err(no_device(format!("hipGetDeviceCount: {}", describe(&api, other)))),
        }
    });
    match loaded {
        Ok((api, count)) => Ok((api, *count)),
        Err(e) => Err(e.clone().into()),
    }
}

/// How many AMD GPUs this process can use. `NoDriver` or `NoDevice` when there are none.
pub fn device_count() -> Result<u32> {
    runtime_api().map(|(_, count)| count)
}

fn describe(api: &HipApi, error: HipError) -> String {
    // SAFETY: returns a static string (or null for unknown codes).
    let text = unsafe { (api.hipGetErrorString)(error) };
    if text.is_null() {
        return format!("hip error {error}");
    }
    // SAFETY: checked non-null; static and NUL-terminated.
    format!("{} ({error})", unsafe { CStr::from_ptr(text) }.to_string_lossy())
}

impl RocmDevice {
    /// Open GPU `ordinal` and create the device's copy stream.
    pub fn open(ordinal: u32) -> Result<RocmDevice> {
        let (api, count) = runtime_api()?;
        check_ordinal("rocm", ordinal, count)?;
        let mut runtime = RocmRuntime { api, ordinal, stream: std::ptr::null_mut() };
        runtime.bind()?;
        // SAFETY: valid out-pointer; on failure `runtime` drops with a null stream.
        let created = unsafe { (api.hipStreamCreateWithFlags)(&mut runtime.stream, HIP_STREAM_NON_BLOCKING) };
        runtime.check("hipStreamCreateWithFlags", created)?;
        Ok(GpuDevice::from_runtime(runtime))
    }
}

/// The HIP side of [`GpuDevice`]: a device ordinal and one copy stream.
pub struct RocmRuntime {
    api: &'static HipApi,
    ordinal: u32,
    stream: HipStream,
}

// SAFETY: HIP streams may be used from any thread once the device is set there (`bind`).
unsafe impl Send for RocmRuntime {}
unsafe impl Sync for RocmRuntime {}

impl RocmRuntime {
    fn check(&self, call: &str, result: HipError) -> Result<()> {
        match result {
            HIP_SUCCESS => Ok(()),
            other => Err(MemoryError::DeviceCall {
                device: format!("rocm:{}", self.ordinal),
                call: call.into(),
                cause: describe(self.api, other),
            }
            .into()),
        }
    }
}

impl Drop for RocmRuntime {
    fn drop(&mut self) {
        if !self.stream.is_null() && self.bind().is_ok() {
            // SAFETY: our stream, destroyed once.
            unsafe { (self.api.hipStreamDestroy)(self.stream) };
        }
    }
}

impl GpuRuntime for RocmRuntime {
    fn kind(&self) -> MemKind {
        MemKind::Rocm { device: self.ordinal }
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: the ordinal was checked against the device count.
        self.check("hipSetDevice", unsafe { (self.api.hipSetDevice)(self.ordinal as c_int) })
    }

    fn alloc(&self, len: usize) -> Result<u64> {
        let mut ptr = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        match unsafe { (self.api.hipMalloc)(&mut ptr, len) } {
            HIP_SUCCESS => Ok(ptr as u64),
            other => {
                Err(MemoryError::AllocFailed { kind: self.kind(), len: len as u64, cause: describe(self.api, other) }
                    .into())
            }
        }
    }

    unsafe fn free(&self, ptr: u64) {
        // SAFETY: the caller's contract.
        unsafe { (self.api.hipFree)(ptr as *mut c_void) };
    }

    unsafe fn host_register(&self, addr: u64, len: u64) -> Result<bool> {
        // SAFETY: the caller's contract.
        match unsafe { (self.api.hipHostRegister)(addr as *mut c_void, len as usize, HIP_HOST_REGISTER_PORTABLE) } {
            HIP_SUCCESS => Ok(true),
            HIP_ERROR_HOST_MEMORY_ALREADY_REGISTERED => Ok(false),
            other => Err(MemoryError::PinFailed {
                addr,
                len,
                cause: format!("hipHostRegister: {}", describe(self.api, other)),
            }
            .into()),
        }
    }

    unsafe fn host_unregister(&self, addr: u64) {
        // SAFETY: the caller's contract.
        unsafe { (self.api.hipHostUnregister)(addr as *mut c_void) };
    }

    unsafe fn enqueue_copies(&self, copies: &[CopyOp]) -> Result<()> {
        for c in copies {
            // SAFETY: hipMemcpyDefault infers the direction from unified addresses; ranges are the
            // caller's.
            let result = unsafe {
                (self.api.hipMemcpyAsync)(
                    c.dst as *mut c_void,
                    c.src as *const c_void,
                    c.len as usize,
                    HIP_MEMCPY_DEFAULT,
                    self.stream,
                )
            };
            self.check("hipMemcpyAsync", result)?;
        }
        Ok(())
    }

    fn record_event(&self) -> Result<usize> {
        let mut event = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        let created = unsafe { (self.api.hipEventCreateWithFlags)(&mut event, HIP_EVENT_DISABLE_TIMING) };
        self.check("hipEventCreateWithFlags", created)?;
        // SAFETY: both handles are live.
        if let Err(e) = self.check("hipEventRecord", unsafe { (self.api.hipEventRecord)(event, self.stream) }) {
            self.destroy_event(event as usize);
            return Err(e);
        }
        Ok(event as usize)
    }

    fn query_event(&self, event: usize) -> Option<Result<()>> {
        // SAFETY: the fence owns the event until it drops.
        match unsafe { (self.api.hipEventQuery)(event as HipEvent) } {
            HIP_SUCCESS => Some(Ok(())),
            HIP_ERROR_NOT_READY => None,
            other => Some(self.check("copies on the stream", other)),
        }
    }

    fn destroy_event(&self, event: usize) {
        // SAFETY: called once per event, by its owner.
        unsafe { (self.api.hipEventDestroy)(event as HipEvent) };
    }

    fn address_range(&self, addr: u64) -> Result<(u64, u64)> {
        let (mut base, mut size) = (std::ptr::null_mut(), 0usize);
        // SAFETY: valid out-pointers; the runtime checks the address.
        let result = unsafe { (self.api.hipMemGetAddressRange)(&mut base, &mut size, addr as *mut c_void) };
        self.check("hipMemGetAddressRange", result).map_err(|e| {
            Error::InvalidArgument(format!("{addr:#x} is not device memory known to rocm:{}: {e}", self.ordinal))
        })?;
        Ok((base as u64, size as u64))
    }

    fn ipc_get(&self, base: u64) -> Result<[u8; IPC_HANDLE_LEN]> {
        let mut handle = HipIpcMemHandle { reserved: [0; IPC_HANDLE_LEN] };
        // SAFETY: valid out-pointer; `base` is an allocation's start.
        self.check("hipIpcGetMemHandle", unsafe { (self.api.hipIpcGetMemHandle)(&mut handle, base as *mut c_void) })?;
        Ok(handle.reserved.map(|b| b as u8))
    }

    fn ipc_open(&self, handle: &[u8; IPC_HANDLE_LEN]) -> Result<u64> {
        let handle = HipIpcMemHandle { reserved: handle.map(|b| b as c_char) };
        let mut base = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the runtime validates the handle.
        let result = unsafe { (self.api.hipIpcOpenMemHandle)(&mut base, handle, HIP_IPC_MEM_LAZY_ENABLE_PEER_ACCESS) };
        self.check("hipIpcOpenMemHandle", result)?;
        Ok(base as u64)
    }

    unsafe fn ipc_close(&self, base: u64) {
        // SAFETY: the caller's contract.
        unsafe { (self.api.hipIpcCloseMemHandle)(base as *mut c_void) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_runtime_loads_with_every_entry_point() {
        // Where a HIP runtime is installed (CI installs Debian's), all declared symbols resolve.
        match DynLib::open(RUNTIME_LIBRARIES) {
            Ok(lib) => {
                HipApi::load(&lib).unwrap();
            }
            Err(e) => println!("skipping: no HIP runtime installed ({e})"),
        }
    }

    crate::memory::gpu::gpu_device_tests!(RocmDevice, RocmDevice::open, device_count);
}
