//! The crate-level error and its stable numeric codes.
//!
//! Each module has its own `thiserror` enum, in a leaf file of its own that names only plain data
//! (`memory/error.rs`, `transport/error.rs`, ...); [`Error`] wraps them, so every module can return
//! it without the error depending back on the module's logic. [`ErrorCode`] values never change
//! once released: the C ABI and the Python package hand them to users.

use crate::descriptor::DescError;
use crate::discovery::error::DiscoveryError;
use crate::layout::error::LayoutError;
use crate::memory::error::MemoryError;
use crate::metadata::MetadataError;
use crate::tier::error::TierError;
use crate::transport::error::TransferError;

pub(crate) mod code;

pub use code::ErrorCode;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error(transparent)]
    Descriptor(#[from] DescError),
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error(transparent)]
    Tier(#[from] TierError),
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("{what} is not supported: {why}")]
    Unsupported { what: String, why: String },
    #[error("i/o error while {context}: {cause}")]
    Io { context: String, cause: String },
    #[cfg(feature = "fabric")]
    #[error(transparent)]
    Fabric(#[from] crate::transport::fabric::error::FabricError),
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Memory(e) => e.code(),
            Error::Layout(e) => e.code(),
            Error::Metadata(e) => e.code(),
            Error::Descriptor(e) => e.code(),
            Error::Transfer(e) => e.code(),
            Error::Tier(e) => e.code(),
            Error::Discovery(e) => e.code(),
            Error::InvalidArgument(_) => ErrorCode::InvalidArgument,
            Error::Unsupported { .. } => ErrorCode::Unsupported,
            Error::Io { .. } => ErrorCode::Io,
            #[cfg(feature = "fabric")]
            Error::Fabric(e) => e.code(),
        }
    }

    pub(crate) fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        Error::Io { context: context.into(), cause: err.to_string() }
    }
}
