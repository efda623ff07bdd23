//! Failures of libfabric itself, before a transfer exists.

use crate::error::code::ErrorCode;

/// Failures of libfabric itself, before a transfer exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FabricError {
    #[error("no libfabric provider {wanted} with RDM endpoints, RMA and messages is usable here{found}")]
    NoProvider { wanted: String, found: String },
    /// libfabric is missing, is not libfabric, or is older than 1.17 (see [`libfabric`](super::libfabric)).
    #[error("{0}")]
    Unavailable(String),
    #[error("{call} failed: {detail}")]
    Call { call: &'static str, code: i32, detail: String },
    #[error("peer {peer} uses fabric provider {theirs}; this agent uses {ours}")]
    ProviderMismatch { peer: String, ours: String, theirs: String },
}

impl FabricError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FabricError::NoProvider { .. } | FabricError::Unavailable(_) => ErrorCode::FabricNoProvider,
            FabricError::Call { .. } => ErrorCode::FabricCall,
            FabricError::ProviderMismatch { .. } => ErrorCode::FabricProviderMismatch,
        }
    }
}
