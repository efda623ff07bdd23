//! kvferry-core: memory (`Device`), KV layout arithmetic (`Layout`), transports (`Transport`) and the
//! `Agent` that ties them together for one engine rank.

pub mod agent;
pub mod deadline;
pub mod error;
pub mod layout;
pub mod memory;
pub mod metadata;
pub mod side_channel;
pub mod transport;


pub use deadline::Deadline;
pub use error::{Error, ErrorCode, Result};

pub use memory::{CopyFence, CopyOp, Device, MemKind, MemRegion, Memory};

pub use transport::{Op, TransportKind};
