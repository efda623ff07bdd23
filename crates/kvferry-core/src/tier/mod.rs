//! The tiered block store: KV blocks that no longer fit in device memory are kept in a pinned host
//! arena and on NVMe, found again by chained prefix keys, and brought back on a prefix hit.
//!
//! ```text
//! put(device memory)  →  CPU: pinned arena, fixed slabs, LRU/ARC  →  DISK: O_DIRECT file, io_uring
//! get(device memory)  ←  CPU hit, or DISK hit promoted to CPU     ←  (checksum verified on read)
//! ```
//!
//! A [`TierStore`] owns both levels. Blocks enter DRAM on [`TierStore::put`]; when DRAM is full the
//! eviction policy picks a victim, which is written to disk if the admission filter has seen it often
//! enough, and dropped otherwise. A disk hit is read back into DRAM (promotion) and copied out from
//! there. Blocks being read are pinned and never evicted. Every change is announced as a
//! [`TierEvent`] naming the medium, as vLLM's KV events do.

pub(crate) mod disk;
pub(crate) mod error;
pub(crate) mod key;
#[cfg(feature = "kv-events")]
pub mod kv_events;
pub(crate) mod medium;
mod options;
mod policy;
pub(crate) mod remote;
mod store;
mod uring;

use std::path::PathBuf;
use std::time::Duration;

pub use error::TierError;
pub use key::{BlockKey, MAX_KEY_BYTES};
pub use medium::Medium;
pub use options::StoreOptions;
pub use policy::EvictionPolicy;
pub use remote::{RemoteConfig, RemoteLocation, RemoteLookup, RemoteStats, RemoteTier};
pub use store::{TierStats, TierStore};

use crate::memory::MemRegion;
use crate::memory::host::HostAllocOptions;

/// One block of a `put` or `get`: its key and the regions it is gathered from or scattered to, in
/// order (one per layer, say), which add up to the store's block size.
pub type BlockRegions = (BlockKey, Vec<MemRegion>);

/// `O_DIRECT` needs block sizes and file offsets aligned to the device's logical block; 4 KiB covers
/// every NVMe and file system in use.
pub const DISK_ALIGNMENT: usize = 4096;

/// Whether the disk tier can use io_uring here; `Err` says why not (it then uses `pread`/`pwrite`).
pub fn io_uring_available() -> Result<(), String> {
    uring::probe().map_err(|e| e.to_string())
}

/// A change in where blocks live, for routers that must know where a prefix can be found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TierEvent {
    Stored {
        keys: Vec<BlockKey>,
        medium: Medium,
    },
    Removed {
        keys: Vec<BlockKey>,
        medium: Medium,
    },
    /// The blocks left `from` and are now in `to` (a `Removed` and a `Stored` in one).
    Moved {
        keys: Vec<BlockKey>,
        from: Medium,
        to: Medium,
    },
    /// `clear()` left the store empty, in both tiers. It follows the `Removed` events that name
    /// the blocks, so a subscriber may act on either.
    Cleared,
}

impl TierEvent {
    /// The blocks the event names (none for `Cleared`).
    pub fn keys(&self) -> &[BlockKey] {
        match self {
            TierEvent::Stored { keys, .. } | TierEvent::Removed { keys, .. } | TierEvent::Moved { keys, .. } => keys,
            TierEvent::Cleared => &[],
        }
    }
}

/// The disk tier: a directory the user names, and how the store uses it.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub dir: PathBuf,
    /// Bytes of blocks the disk tier holds (rounded down to whole blocks); preallocated at open.
    pub capacity: u64,
    /// Reads or writes each ring keeps in flight.
    pub queue_depth: usize,
    /// How often the admission filter must have seen a block (puts and hits) before an eviction from
    /// DRAM writes it to disk; 0 or 1 admits every block.
    pub admit_after: u8,
    /// fsync the data file and the index log after each batch of writes, so that the index survives
    /// power loss too (a kill never needs it).
    pub sync_writes: bool,
}

impl DiskConfig {
    pub fn new(dir: impl Into<PathBuf>, capacity: u64) -> Self {
        DiskConfig { dir: dir.into(), capacity, queue_depth: 32, admit_after: 2, sync_writes: false }
    }

    pub fn with_queue_depth(mut self, queue_depth: usize) -> Self {
        self.queue_depth = queue_depth;
        self
    }

    pub fn with_admit_after(mut self, admit_after: u8) -> Self {
        self.admit_after = admit_after;
        self
    }

    pub fn with_sync_writes(mut self, sync_writes: bool) -> Self {
        self.sync_writes = sync_writes;
        self
    }
}

/// How a [`TierStore`] is built.
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// Bytes per block; every block of a store has this size.
    pub block_size: usize,
    /// Bytes of the host arena (rounded down to whole blocks), allocated up front.
    pub host_capacity: u64,
    /// Pinning and huge pages of the arena.
    pub host_alloc: HostAllocOptions,
    pub policy: EvictionPolicy,
    pub disk: Option<DiskConfig>,
    /// The level below DRAM and disk that every engine pointing at it shares.
    pub remote: Option<RemoteConfig>,
    /// Threads, each with its own io_uring, that run puts and gets.
    pub workers: usize,
    /// How long a worker waits for a device copy before failing the operation.
    pub copy_timeout: Duration,
}

impl TierConfig {
    /// A DRAM-only store with LRU eviction and two workers.
    pub fn new(block_size: usize, host_capacity: u64) -> Self {
        TierConfig {
            block_size,
            host_capacity,
            host_alloc: HostAllocOptions::new(),
            policy: EvictionPolicy::Lru,
            disk: None,
            remote: None,
            workers: 2,
            copy_timeout: Duration::from_secs(60),
        }
    }

    pub fn with_disk(mut self, disk: DiskConfig) -> Self {
        self.disk = Some(disk);
        self
    }

    pub fn with_remote(mut self, remote: RemoteConfig) -> Self {
        self.remote = Some(remote);
        self
    }

    pub fn with_policy(mut self, policy: EvictionPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn with_host_alloc(mut self, options: HostAllocOptions) -> Self {
        self.host_alloc = options;
        self
    }

    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }
}
