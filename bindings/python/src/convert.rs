//! Python arguments to kvferry values: timeouts, device names, memory objects.

use std::time::{Duration, Instant};

use kvferry_core::metadata::RegionInfo;
use kvferry_core::{Deadline, MemKind, MemRegion};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::registration::Keep;

/// `(addr, length)` as Python passes it: a tuple, a list, any sequence of two ints.
pub(crate) type Span = [u64; 2];

/// A deadline `timeout` seconds from now.
pub(crate) fn deadline(timeout: f64) -> PyResult<Deadline> {
    let bad = || PyValueError::new_err(format!("timeout must be a finite number of seconds >= 0, got {timeout}"));
    let timeout = Duration::try_from_secs_f64(timeout).map_err(|_| bad())?;
    // Past the clock's range, `Instant + Duration` would panic.
    Instant::now().checked_add(timeout).map(Deadline::at).ok_or_else(bad)
}

/// `"cpu"`, `"cuda"`, `"cuda:N"`, `"rocm"`, `"rocm:N"`.
pub(crate) fn parse_device(device: &str) -> PyResult<MemKind> {
    let (family, ordinal) = match device.split_once(':') {
        Some((family, ordinal)) => (family, Some(ordinal)),
        None => (device, None),
    };
    let number = || -> PyResult<u32> {
        ordinal.map_or(Ok(0), |o| {
            o.parse().map_err(|_| PyValueError::new_err(format!("{device:?}: the device ordinal must be a number")))
        })
    };
    match family {
        "cpu" if ordinal.is_none() => Ok(MemKind::Host),
        "cuda" => Ok(MemKind::Cuda { device: number()? }),
        "rocm" => Ok(MemKind::Rocm { device: number()? }),
        _ => Err(PyValueError::new_err(format!("unknown device {device:?}: expected cpu, cuda:N or rocm:N"))),
    }
}

/// The device name `parse_device` reads back.
pub(crate) fn device_name(kind: MemKind) -> String {
    match kind {
        MemKind::Host => "cpu".to_string(),
        other => other.to_string(),
    }
}

/// The kind of the region among `regions` that holds `[addr, addr + len)`; host memory when none
/// does, so that preparing it fails with the agent's own "not registered" error.
pub(crate) fn kind_at(regions: &[RegionInfo], addr: u64, len: u64) -> MemKind {
    regions.iter().find(|r| r.region.contains(addr, len)).map_or(MemKind::Host, |r| r.region.kind)
}

/// The memory behind a torch tensor or a buffer-protocol object, and what keeps it there.
pub(crate) fn describe_memory(obj: &Bound<'_, PyAny>, device: Option<&str>) -> PyResult<(MemRegion, Keep)> {
    if obj.hasattr("data_ptr")? && obj.hasattr("element_size")? {
        return describe_tensor(obj, device);
    }
    let py = obj.py();
    // A memoryview holds an export of the buffer: a bytearray cannot be resized (and its memory
    // moved) while the registration keeps it.
    let view = py.import("builtins")?.getattr("memoryview")?.call1((obj,)).map_err(|_| {
        PyTypeError::new_err(format!(
            "cannot register a {}: expected a torch.Tensor or a buffer (numpy array, bytearray, ...)",
            obj.get_type().name().map_or_else(|_| "?".to_string(), |n| n.to_string())
        ))
    })?;
    if view.getattr("readonly")?.extract::<bool>()? {
        return Err(PyValueError::new_err("cannot register a read-only buffer: peers may write into it"));
    }
    if !view.getattr("c_contiguous")?.extract::<bool>()? {
        return Err(PyValueError::new_err("cannot register a buffer that is not C-contiguous"));
    }
    let len: u64 = view.getattr("nbytes")?.extract()?;
    if len == 0 {
        return Err(PyValueError::new_err("cannot register an empty buffer"));
    }
    if let Some(device) = device
        && parse_device(device)? != MemKind::Host
    {
        return Err(PyValueError::new_err(format!("a buffer is host memory, not {device}")));
    }
    // The buffer protocol without the limited API's 3.11 buffer calls: ctypes maps a char onto the
    // first byte, and its address is the buffer's.
    let ctypes = py.import("ctypes")?;
    let first = ctypes.getattr("c_char")?.call_method1("from_buffer", (&view,))?;
    let addr: u64 = ctypes.call_method1("addressof", (first,))?.extract()?;
    let owner = PyTuple::new(py, [obj.clone(), view])?.into_any();
    Ok((MemRegion { addr, len, kind: MemKind::Host }, Keep::Buffer(owner.unbind())))
}

fn describe_tensor(tensor: &Bound<'_, PyAny>, device: Option<&str>) -> PyResult<(MemRegion, Keep)> {
    if !tensor.call_method0("is_contiguous")?.extract::<bool>()? {
        return Err(PyValueError::new_err("cannot register a tensor that is not contiguous (call .contiguous())"));
    }
    let addr: u64 = tensor.call_method0("data_ptr")?.extract()?;
    let numel: u64 = tensor.call_method0("numel")?.extract()?;
    let element_size: u64 = tensor.call_method0("element_size")?.extract()?;
    let len =
        numel.checked_mul(element_size).ok_or_else(|| PyValueError::new_err("the tensor's size in bytes overflows"))?;
    let kind = match device {
        Some(device) => parse_device(device)?,
        None => {
            let on = tensor.getattr("device")?;
            let family: String = on.getattr("type")?.extract()?;
            let ordinal: Option<u32> = on.getattr("index")?.extract()?;
            match family.as_str() {
                "cpu" => MemKind::Host,
                // ROCm builds of torch call their devices "cuda" too: pass device="rocm:N" there.
                "cuda" => MemKind::Cuda { device: ordinal.unwrap_or(0) },
                other => return Err(PyValueError::new_err(format!("cannot register a tensor on {other:?}"))),
            }
        }
    };
    // Holds (and where it can, pins) the tensor's storage; see kvferry/_memory.py.
    let keep = tensor.py().import("kvferry._memory")?.getattr("TensorKeep")?.call1((tensor, addr, len))?;
    Ok((MemRegion { addr, len, kind }, Keep::Tensor(keep.unbind())))
}
