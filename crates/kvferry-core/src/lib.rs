//! kvferry-core: memory (`Device`), KV layout arithmetic (`Layout`), transports (`Transport`) and the
//! `Agent` that ties them together for one engine rank, and the tiered block store (`tier`).

pub mod agent;
pub mod auth;
pub mod deadline;
pub mod descriptor;
pub mod discovery;
pub mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod layout;
pub mod limits;
pub mod memory;
pub mod metadata;
pub mod metrics;
mod net;
mod setting;
pub mod side_channel;
mod sync;
pub mod tier;
pub mod tls;
pub mod transport;
pub use agent::{
    Agent, AgentConfig, LocalDescs, Notification, PreparedList, Registration, RemoteDescs, Transfer, TransferRequest,
    TransferStatus,
};
pub use auth::{Auth, AuthConfig};
pub use deadline::Deadline;
pub use descriptor::{DescError, DescSide, LinkGap};
pub use error::{Error, ErrorCode, Result};
pub use tls::TlsConfig;

pub use layout::{KvLayout, KvPlacement, Region, Selection};
pub use limits::{AgentLimits, ServeLimits};
#[cfg(feature = "cuda")]
pub use memory::cuda::CudaDevice;
pub use memory::host::{HostAllocOptions, HostBuffer, HostDevice, HugePages};
#[cfg(feature = "rocm")]
pub use memory::rocm::RocmDevice;
pub use memory::{CopyFence, CopyOp, Device, MemKind, MemRegion, Memory};
pub use transport::staging::StagingConfig;

pub use tier::{BlockKey, DiskConfig, EvictionPolicy, Medium, TierConfig, TierEvent, TierStore};
pub use transport::{Op, TransportKind};
