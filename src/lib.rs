//! kvferry: move paged KV-cache blocks between inference engines and keep more of them than device
//! memory holds.
//!
//! This crate is the facade; the implementation lives in [`kvferry_core`]. The data path reads
//! `describe (Layout) → register (Agent) → exchange metadata → post (batch, deadline) → complete`.
pub use kvferry_core::*;
