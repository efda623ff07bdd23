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

pub(crate) mod error;

pub use error::DiscoveryError;

#[cfg(feature = "etcd")]
pub use registry::{EtcdConfig, EtcdDiscovery};

#[cfg(feature = "etcd")]
mod registry;
