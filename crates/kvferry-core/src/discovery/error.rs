//! Discovery's errors.

use crate::error::code::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    #[error("etcd at {endpoints} is unreachable: {cause}")]
    Unreachable { endpoints: String, cause: String },
    #[error("etcd at {endpoint} answered something unexpected: {why}")]
    BadResponse { endpoint: String, why: String },
    #[error("the etcd lease {lease} of this agent expired")]
    LeaseLost { lease: i64 },
    #[error("no agent named {name} is registered under {prefix}")]
    PeerNotFound { name: String, prefix: String },
    #[error("invalid discovery configuration: {why}")]
    Config { why: String },
}

impl DiscoveryError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DiscoveryError::Unreachable { .. } => ErrorCode::DiscoveryUnreachable,
            DiscoveryError::BadResponse { .. } => ErrorCode::DiscoveryBadResponse,
            DiscoveryError::LeaseLost { .. } => ErrorCode::DiscoveryLeaseLost,
            DiscoveryError::PeerNotFound { .. } => ErrorCode::DiscoveryPeerNotFound,
            DiscoveryError::Config { .. } => ErrorCode::DiscoveryConfig,
        }
    }
}
