//! The memory layer's errors.

use crate::error::code::ErrorCode;
use crate::memory::region::MemKind;

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
    #[error("no {kind} driver: {reason}")]
    NoDriver { kind: String, reason: String },
    #[error("{device}: {call} failed: {cause}")]
    DeviceCall { device: String, call: String, cause: String },
    #[error("invalid IPC handle: {reason}")]
    InvalidIpcHandle { reason: String },
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
            MemoryError::NoDriver { .. } => ErrorCode::NoDriver,
            MemoryError::DeviceCall { .. } => ErrorCode::DeviceCallFailed,
            MemoryError::InvalidIpcHandle { .. } => ErrorCode::InvalidIpcHandle,
        }
    }
}
