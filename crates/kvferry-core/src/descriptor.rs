//! Errors in the descriptors a caller hands over, found before anything moves: a leaf that the
//! agent and the transports that check descriptors themselves (fabric) both build.

use crate::error::code::ErrorCode;
use crate::transport::kind::TransportKind;

/// Errors in what the caller asked for, found before anything is sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DescError {
    #[error("descriptor {index} ({addr:#x}+{len}) is not inside any local registration")]
    NotRegistered { index: usize, addr: u64, len: u64 },
    #[error(
        "descriptor {index} ({addr:#x}+{len}) is not inside any region peer {peer} registered for a shared transport"
    )]
    RemoteRegionUnknown { peer: String, index: usize, addr: u64, len: u64 },
    #[error("descriptor {index} has length zero")]
    ZeroLength { index: usize },
    #[error("descriptor {index} ({addr:#x}+{len}) overflows the address space")]
    RangeOverflow { index: usize, addr: u64, len: u64 },
    #[error("pair {position}: local length {local_len} differs from remote length {remote_len}")]
    LengthMismatch { position: usize, local_len: u64, remote_len: u64 },
    #[error("no peer named {peer}")]
    UnknownPeer { peer: String },
    #[error("index {index} is outside a prepared list of {len} descriptors")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("descriptors were prepared against older metadata of peer {peer}; prepare them again")]
    Stale { peer: String },
    #[error("a transfer needs at least one descriptor pair or a notification")]
    EmptyTransfer,
    #[error("no link to peer {peer} moves every descriptor of the request: {}", join_gaps(.gaps))]
    NoCommonLink { peer: String, gaps: Vec<LinkGap> },
}

/// Why one of a peer's links cannot move a request: the first descriptor without a key for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkGap {
    pub transport: TransportKind,
    pub side: DescSide,
    /// The descriptor's index in its prepared list.
    pub index: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescSide {
    Local,
    Remote,
}

impl std::fmt::Display for LinkGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.side {
            DescSide::Local => {
                write!(f, "{}: local descriptor {} is not registered for it", self.transport, self.index)
            }
            DescSide::Remote => {
                write!(f, "{}: the peer did not register remote descriptor {} for it", self.transport, self.index)
            }
        }
    }
}

fn join_gaps(gaps: &[LinkGap]) -> String {
    gaps.iter().map(LinkGap::to_string).collect::<Vec<_>>().join("; ")
}

impl DescError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DescError::NotRegistered { .. } => ErrorCode::NotRegistered,
            DescError::RemoteRegionUnknown { .. } => ErrorCode::RemoteRegionUnknown,
            DescError::ZeroLength { .. } => ErrorCode::ZeroLength,
            DescError::RangeOverflow { .. } => ErrorCode::RangeOverflow,
            DescError::LengthMismatch { .. } => ErrorCode::LengthMismatch,
            DescError::UnknownPeer { .. } => ErrorCode::UnknownPeer,
            DescError::IndexOutOfRange { .. } => ErrorCode::DescIndexOutOfRange,
            DescError::Stale { .. } => ErrorCode::StaleDescriptors,
            DescError::EmptyTransfer => ErrorCode::EmptyTransfer,
            DescError::NoCommonLink { .. } => ErrorCode::NoCommonLink,
        }
    }
}
