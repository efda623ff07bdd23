//! The transports' errors, and why a memory's owner refused a descriptor.

use crate::error::code::ErrorCode;
use crate::transport::kind::Op;

/// Why the owner of the memory refused a descriptor. Sent on the wire as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// No registration has this key (never registered, deregistered, or forged).
    UnknownKey,
    /// The range is not inside the registration the key names.
    OutOfRange,
    ZeroLength,
    /// `addr + len` overflows.
    RangeOverflow,
    /// The request exceeds the target's limits (descriptor count or frame size).
    TooLarge,
}

impl RejectReason {
    pub fn to_wire(self) -> u8 {
        match self {
            RejectReason::UnknownKey => 1,
            RejectReason::OutOfRange => 2,
            RejectReason::ZeroLength => 3,
            RejectReason::RangeOverflow => 4,
            RejectReason::TooLarge => 5,
        }
    }

    pub fn from_wire(b: u8) -> Option<RejectReason> {
        Some(match b {
            1 => RejectReason::UnknownKey,
            2 => RejectReason::OutOfRange,
            3 => RejectReason::ZeroLength,
            4 => RejectReason::RangeOverflow,
            5 => RejectReason::TooLarge,
            _ => return None,
        })
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RejectReason::UnknownKey => "no registration has this key",
            RejectReason::OutOfRange => "range lies outside the registered region",
            RejectReason::ZeroLength => "zero-length range",
            RejectReason::RangeOverflow => "address + length overflows",
            RejectReason::TooLarge => "request exceeds the target's limits",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    #[error("{op} with peer {peer} did not complete before its deadline")]
    Timeout { peer: String, op: Op },
    #[error("{op} with peer {peer} was cancelled")]
    Cancelled { peer: String, op: Op },
    #[error("cannot reach peer {peer} at {endpoint}: {cause}")]
    PeerUnreachable { peer: String, endpoint: String, cause: String },
    #[error("peer {peer} disconnected during {op}: {cause}")]
    PeerDisconnected { peer: String, op: Op, cause: String },
    #[error("peer {peer} rejected {op} descriptor {index}: {reason}")]
    Rejected { peer: String, op: Op, index: u32, reason: RejectReason },
    #[error("protocol error with peer {peer}: {detail}")]
    Protocol { peer: String, detail: String },
    /// The handshake failed: one side did not prove the cluster secret.
    #[error("peer {peer} is not authenticated: {cause}")]
    Unauthenticated { peer: String, cause: String },
    /// The peer refused the request for one of its limits; it may succeed later.
    #[error("peer {peer} refused {op}: {cause}")]
    PeerBusy { peer: String, op: Op, cause: String },
    /// The target's NIC or provider refused a remote access: a key it never issued (or revoked),
    /// or a range outside the registration. libfabric does not say which.
    #[error("peer {peer} refused {op} access to its memory: {cause}")]
    RemoteAccess { peer: String, op: Op, cause: String },
    /// Any other failure a fabric provider reported for the transfer.
    #[error("fabric {op} with peer {peer} failed: {cause}")]
    Fabric { peer: String, op: Op, cause: String },
    /// The kernel refused `process_vm_readv`/`process_vm_writev` into the peer (ptrace policy).
    #[error("{op} with peer {peer}: cross-memory attach refused: {cause}")]
    CrossMemoryRefused { peer: String, op: Op, cause: String },
    /// The peer's shared memory could not be mapped (no file, not sealed, mmap failed).
    #[error("cannot map the shared memory of peer {peer}: {cause}")]
    MappingFailed { peer: String, cause: String },
    #[error("{op} with peer {peer} failed staging through host memory: {cause}")]
    Staging { peer: String, op: Op, cause: String },
    #[error("{op} with peer {peer} failed in the device copy: {cause}")]
    DeviceCopy { peer: String, op: Op, cause: String },
}

impl TransferError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TransferError::Timeout { .. } => ErrorCode::Timeout,
            TransferError::Cancelled { .. } => ErrorCode::Cancelled,
            TransferError::PeerUnreachable { .. } => ErrorCode::PeerUnreachable,
            TransferError::PeerDisconnected { .. } => ErrorCode::PeerDisconnected,
            TransferError::Protocol { .. } => ErrorCode::Protocol,
            TransferError::Unauthenticated { .. } => ErrorCode::Unauthenticated,
            TransferError::PeerBusy { .. } => ErrorCode::PeerBusy,
            TransferError::RemoteAccess { .. } => ErrorCode::FabricRemoteAccess,
            TransferError::Fabric { .. } => ErrorCode::FabricTransfer,
            TransferError::CrossMemoryRefused { .. } => ErrorCode::ShmCrossMemoryRefused,
            TransferError::MappingFailed { .. } => ErrorCode::ShmMappingFailed,
            TransferError::Staging { .. } => ErrorCode::StagingFailed,
            TransferError::DeviceCopy { .. } => ErrorCode::DeviceCopyFailed,
            TransferError::Rejected { reason, .. } => match reason {
                RejectReason::UnknownKey => ErrorCode::RemoteUnknownKey,
                RejectReason::OutOfRange => ErrorCode::RemoteOutOfRange,
                RejectReason::ZeroLength => ErrorCode::RemoteZeroLength,
                RejectReason::RangeOverflow => ErrorCode::RemoteRangeOverflow,
                RejectReason::TooLarge => ErrorCode::RemoteTooLarge,
            },
        }
    }
}
