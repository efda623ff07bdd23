//! Cluster discovery through etcd (`etcd` feature): agents find each other through the
//! coordination service a cluster already runs, instead of dialling side channels by address.
//!
//! ```text
//! {prefix}{agent name} = Agent::metadata()     put with a lease, kept alive by a thread
//! lookup(name)         → range → add_peer
//! watch(prefix)        → DELETE of a peer's key (its lease expired: the process died or hung)
//!                      → Agent::peer_gone: its pending transfers fail at once
//! ```
//! The embedded side channel stays the default and needs no etcd.

#[cfg(feature = "etcd")]
mod etcd;

use crate::error::ErrorCode;

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

#[cfg(feature = "etcd")]
pub use registry::{EtcdConfig, EtcdDiscovery};

#[cfg(feature = "etcd")]
mod registry;
