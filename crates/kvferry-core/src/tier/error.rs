//! The tier store's errors.

use crate::error::code::ErrorCode;
use crate::tier::key::{BlockKey, MAX_KEY_BYTES};
use crate::tier::medium::Medium;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TierError {
    #[error("a block key needs 1 to {MAX_KEY_BYTES} bytes, got {len}")]
    BadKey { len: usize },
    #[error("invalid tier store configuration: {why}")]
    Config { why: String },
    #[error("block {index} of the request is invalid: {why}")]
    BadBlock { index: usize, why: String },
    #[error("the disk tier in {dir} cannot be used: {cause}")]
    DiskUnavailable { dir: String, cause: String },
    #[error("the disk tier in {dir} is full: {cause}")]
    DiskFull { dir: String, cause: String },
    /// Another store (in this process or another) has the directory open.
    #[error("the disk tier in {dir} is in use by another store (its lock file {lock} is held)")]
    DiskLocked { dir: String, lock: String },
    #[error("the disk tier's index {path} is corrupt: {why}")]
    IndexCorrupt { path: String, why: String },
    #[error("the disk tier's index {path} holds {found}, but the store was opened for {expected}")]
    IndexMismatch { path: String, found: String, expected: String },
    #[error("block {key} failed its checksum on disk and was dropped")]
    BlockCorrupt { key: BlockKey },
    #[error("block {key} is not cached")]
    NotCached { key: BlockKey },
    #[error("no room for {needed} blocks in {medium}: every block there is being read or written")]
    NoRoom { needed: usize, medium: Medium },
    #[error("disk i/o failed while {op}: {cause}")]
    DiskIo { op: String, cause: String },
    #[error("the tier store is shut down")]
    Closed,
    /// The remote level could not be reached, answered with an error, or not by the deadline.
    #[error("the remote tier at {location} is unavailable: {cause}")]
    RemoteUnavailable { location: String, cause: String },
    /// An object read from the remote failed its framing or checksum; it was never served.
    #[error("block {key} in the remote tier is corrupt ({why}) and was dropped")]
    RemoteCorrupt { key: BlockKey, why: String },
    /// An intact object under this store's name that holds another namespace's or key's block.
    #[error("block {key} in the remote tier does not match this store ({why}) and was dropped")]
    RemoteMismatch { key: BlockKey, why: String },
}

impl TierError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TierError::BadKey { .. } => ErrorCode::TierBadKey,
            TierError::Config { .. } => ErrorCode::TierConfig,
            TierError::BadBlock { .. } => ErrorCode::TierBadBlock,
            TierError::DiskUnavailable { .. } => ErrorCode::TierDiskUnavailable,
            TierError::DiskFull { .. } => ErrorCode::TierDiskFull,
            TierError::DiskLocked { .. } => ErrorCode::TierDiskLocked,
            TierError::IndexCorrupt { .. } => ErrorCode::TierIndexCorrupt,
            TierError::IndexMismatch { .. } => ErrorCode::TierIndexMismatch,
            TierError::BlockCorrupt { .. } => ErrorCode::TierBlockCorrupt,
            TierError::NotCached { .. } => ErrorCode::TierNotCached,
            TierError::NoRoom { .. } => ErrorCode::TierNoRoom,
            TierError::DiskIo { .. } => ErrorCode::TierDiskIo,
            TierError::Closed => ErrorCode::TierClosed,
            TierError::RemoteUnavailable { .. } => ErrorCode::TierRemoteUnavailable,
            TierError::RemoteCorrupt { .. } => ErrorCode::TierRemoteCorrupt,
            TierError::RemoteMismatch { .. } => ErrorCode::TierRemoteMismatch,
        }
    }
}
