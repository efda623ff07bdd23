//! The tier store: KV blocks kept in a pinned DRAM arena and on disk, found again by prefix keys.
//!
//! A store is a root handle of its own (no agent needed); its puts, gets and offloads are store
//! operations, polled, waited on and destroyed like transfers. A store operation cannot be
//! cancelled (a worker may be copying caller memory), so destroying one, or its store, waits for it.

use std::collections::VecDeque;
use std::ffi::c_char;
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kvferry_core::tier::{BlockRegions, MAX_KEY_BYTES, StoreOptions, TierError, TierStats};
use kvferry_core::{BlockKey, CopyFence, Deadline, Device, Error, HostDevice, Medium, MemKind, TierEvent, TierStore};

use crate::args::{KeyValue, Out, OutBuf, deadline_ms, options_arg, slice_arg};
use crate::codes::{KVFERRY_ERR_TIMEOUT, KVFERRY_ERR_UNSUPPORTED};
use crate::handles::{self, Kind, handle};
use crate::memory::{kvferry_region, mem_regions};
use crate::status::{CResult, Failure, guard, kvferry_status};

/// The longest block key: engine hashes up to this many bytes are kept verbatim.
pub const KVFERRY_BLOCK_KEY_MAX_BYTES: usize = 32;
const _: () = assert!(KVFERRY_BLOCK_KEY_MAX_BYTES == MAX_KEY_BYTES);

/// The key of one cached block: `len` (1 to `KVFERRY_BLOCK_KEY_MAX_BYTES`) significant bytes.
/// Keys are values: compare `len` and the first `len` bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_block_key {
    pub len: u8,
    pub bytes: [u8; KVFERRY_BLOCK_KEY_MAX_BYTES],
}

impl kvferry_block_key {
    fn to_core(self, index: usize) -> CResult<BlockKey> {
        let len = self.len as usize;
        let key = match self.bytes.get(..len) {
            Some(bytes) => BlockKey::from_engine_hash(bytes),
            None => Err(TierError::BadKey { len }),
        };
        key.map_err(|e| {
            let failure = Failure::from(Error::from(e));
            Failure::new(failure.code, format!("keys[{index}]: {}", failure.message))
        })
    }

    fn from_core(key: &BlockKey) -> Self {
        let mut bytes = [0; KVFERRY_BLOCK_KEY_MAX_BYTES];
        bytes[..key.as_bytes().len()].copy_from_slice(key.as_bytes());
        kvferry_block_key { len: key.as_bytes().len() as u8, bytes }
    }
}

fn core_keys(keys: &[kvferry_block_key]) -> CResult<Vec<BlockKey>> {
    keys.iter().enumerate().map(|(i, k)| k.to_core(i)).collect()
}

/// Where a block is, spelled as vLLM's KV events spell it (`"GPU"`, `"CPU"`, `"DISK"`).
pub type kvferry_medium = u32;
/// No medium (the `from` of an event that is not a move).
pub const KVFERRY_MEDIUM_NONE: kvferry_medium = 0;
pub const KVFERRY_MEDIUM_GPU: kvferry_medium = 1;
/// The store's pinned DRAM arena.
pub const KVFERRY_MEDIUM_CPU: kvferry_medium = 2;
/// The store's disk tier.
pub const KVFERRY_MEDIUM_DISK: kvferry_medium = 3;
/// The remote tier every engine shares (object storage or a shared directory).
pub const KVFERRY_MEDIUM_REMOTE: kvferry_medium = 4;

fn medium(medium: Medium) -> kvferry_medium {
    match medium {
        Medium::Gpu => KVFERRY_MEDIUM_GPU,
        Medium::Cpu => KVFERRY_MEDIUM_CPU,
        Medium::Disk => KVFERRY_MEDIUM_DISK,
        Medium::Remote => KVFERRY_MEDIUM_REMOTE,
    }
}

/// What happened to a block (`kvferry_store_event::kind`).
pub type kvferry_store_event_kind = u32;
/// The block is now in `medium`.
pub const KVFERRY_STORE_EVENT_STORED: kvferry_store_event_kind = 1;
/// The block left `medium`.
pub const KVFERRY_STORE_EVENT_REMOVED: kvferry_store_event_kind = 2;
/// The block left `from` and is now in `medium`.
pub const KVFERRY_STORE_EVENT_MOVED: kvferry_store_event_kind = 3;
/// `kvferry_store_clear` left no block in either tier; it follows the `REMOVED` events naming the
/// blocks. `medium` and `from` are `KVFERRY_MEDIUM_NONE` and `key` is empty (`len` 0).
pub const KVFERRY_STORE_EVENT_CLEARED: kvferry_store_event_kind = 4;

/// One block's change of place. `from` is `KVFERRY_MEDIUM_NONE` unless `kind` is
/// `KVFERRY_STORE_EVENT_MOVED`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_store_event {
    pub kind: kvferry_store_event_kind,
    pub medium: kvferry_medium,
    pub from: kvferry_medium,
    pub key: kvferry_block_key,
}

/// Occupancy and counters of a store (`kvferry_store_stats_get`), as `docs/tier.md` describes them:
/// blocks held and slots per tier, hits per tier and misses, evictions per tier, disk writes,
/// evicted blocks the admission filter kept off the disk, disk blocks read back into DRAM on a hit
/// (promotions), blocks dropped for a bad checksum, torn index records dropped at open (the counts
/// of `TierStats::counts`, under the same names); `disk_failed`: the disk tier stopped taking writes (full disk,
/// i/o error) and serves reads only; `io_fallback`: it runs without some kernel fast path
/// (io_uring, registered buffers, `O_DIRECT`).
///
/// The `remote_` fields are the remote tier's (all 0 and false unless `remote_enabled`): blocks
/// read from it, keys it did not hold when asked, blocks uploaded and their bytes, offered blocks
/// it already held, offered blocks dropped (upload budget spent or breaker open), failed requests,
/// objects dropped for a bad checksum or framing, objects of another namespace or block, times the
/// breaker opened, bytes of uploads queued or in flight now; `remote_breaker_open`: no request is
/// sent to it for now after repeated failures.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_store_stats {
    pub block_size: u64,
    pub host_blocks: u64,
    pub host_capacity_blocks: u64,
    pub disk_blocks: u64,
    pub disk_capacity_blocks: u64,
    pub host_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub host_evictions: u64,
    pub disk_evictions: u64,
    pub disk_writes: u64,
    pub not_admitted: u64,
    pub promotions: u64,
    pub corrupt_blocks: u64,
    pub torn_records: u64,
    pub remote_hits: u64,
    pub remote_misses: u64,
    pub remote_uploads: u64,
    pub remote_upload_bytes: u64,
    pub remote_already_stored: u64,
    pub remote_dropped: u64,
    pub remote_errors: u64,
    pub remote_corrupt: u64,
    pub remote_mismatched: u64,
    pub remote_breaker_trips: u64,
    pub remote_upload_bytes_pending: u64,
    pub disk_failed: bool,
    pub io_fallback: bool,
    pub remote_enabled: bool,
    pub remote_breaker_open: bool,
}

impl kvferry_store_stats {
    fn from_core(block_size: usize, stats: TierStats) -> Self {
        let remote = stats.remote.clone().unwrap_or_default();
        kvferry_store_stats {
            block_size: block_size as u64,
            host_blocks: stats.host_blocks as u64,
            host_capacity_blocks: stats.host_capacity_blocks as u64,
            disk_blocks: stats.disk_blocks as u64,
            disk_capacity_blocks: stats.disk_capacity_blocks as u64,
            host_hits: stats.host_hits,
            disk_hits: stats.disk_hits,
            misses: stats.misses,
            host_evictions: stats.host_evictions,
            disk_evictions: stats.disk_evictions,
            disk_writes: stats.disk_writes,
            not_admitted: stats.not_admitted,
            promotions: stats.promotions,
            corrupt_blocks: stats.corrupt_blocks,
            torn_records: stats.torn_records,
            remote_hits: remote.hits,
            remote_misses: remote.misses,
            remote_uploads: remote.uploads,
            remote_upload_bytes: remote.upload_bytes,
            remote_already_stored: remote.already_stored,
            remote_dropped: remote.dropped,
            remote_errors: remote.errors,
            remote_corrupt: remote.corrupt,
            remote_mismatched: remote.mismatched,
            remote_breaker_trips: remote.breaker_trips,
            remote_upload_bytes_pending: remote.upload_bytes_pending,
            disk_failed: stats.disk_failure.is_some(),
            io_fallback: stats.io_fallback.is_some(),
            remote_enabled: stats.remote.is_some(),
            remote_breaker_open: remote.breaker_open,
        }
    }
}

/// A tiered block store: pinned DRAM, optionally backed by a disk directory and a remote tier.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_store {
    pub id: u64,
}

/// A put, get or offload in progress: poll, wait, destroy.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct kvferry_store_op {
    pub id: u64,
}

pub(crate) struct StoreState {
    store: TierStore,
    /// Copies between caller memory and the arena.
    device: Arc<dyn Device>,
    /// Present when the store was created with `events=on`.
    events: Option<Mutex<Events>>,
}

struct Events {
    receiver: mpsc::Receiver<TierEvent>,
    /// One entry per key, taken from the receiver and not yet handed to C, oldest first.
    pending: VecDeque<kvferry_store_event>,
}

impl Events {
    fn take_arrived(&mut self) {
        loop {
            let event = match self.receiver.try_recv() {
                Ok(event) => event,
                // The store outlives its receiver's use here, so a disconnect only means "no more".
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            };
            let (kind, keys, to, from) = match event {
                TierEvent::Stored { keys, medium: m } => (KVFERRY_STORE_EVENT_STORED, keys, m, None),
                TierEvent::Removed { keys, medium: m } => (KVFERRY_STORE_EVENT_REMOVED, keys, m, None),
                TierEvent::Moved { keys, from, to } => (KVFERRY_STORE_EVENT_MOVED, keys, to, Some(from)),
                TierEvent::Cleared => {
                    self.pending.push_back(kvferry_store_event {
                        kind: KVFERRY_STORE_EVENT_CLEARED,
                        medium: KVFERRY_MEDIUM_NONE,
                        from: KVFERRY_MEDIUM_NONE,
                        key: kvferry_block_key { len: 0, bytes: [0; KVFERRY_BLOCK_KEY_MAX_BYTES] },
                    });
                    continue;
                }
            };
            self.pending.extend(keys.iter().map(|key| kvferry_store_event {
                kind,
                medium: medium(to),
                from: from.map_or(KVFERRY_MEDIUM_NONE, medium),
                key: kvferry_block_key::from_core(key),
            }));
        }
    }
}

handle!(kvferry_store, StoreState, Kind::Store);
handle!(kvferry_store_op, CopyFence, Kind::StoreOp);

/// The store `options` describe, by the parser every front end shares ([`StoreOptions::parse`]).
pub(crate) fn store_options(options: &[KeyValue]) -> CResult<StoreOptions> {
    Ok(StoreOptions::parse(options.iter().copied())?)
}

/// Open a tier store: a pinned DRAM arena, with `disk.dir` a disk tier whose blocks survive the
/// process (reopening the same directory finds them again), and with `remote.url` or `remote.path`
/// a remote tier that every store pointing at it with the same namespace shares.
///
/// `options` is an array of `option_count` `"key=value"` strings: `block_size=BYTES` and
/// `host_capacity=BYTES` (required; the arena is allocated up front), `policy=lru|arc` (default
/// lru), `workers=N` (threads doing the copies and disk i/o, default 2), `pin=on|off` (page-lock
/// the arena, default on), `events=on|off` (queue events for `kvferry_store_events_take`, default
/// off: an undrained queue grows), `disk.dir=PATH` and `disk.capacity=BYTES` (together; the block
/// size must then be a multiple of 4096), `disk.queue_depth=N` (default 32), `disk.admit_after=N`
/// (how often a block must have been seen before an eviction writes it down; 0 or 1 writes every
/// block; default 2), `disk.sync_writes=on|off` (default off).
///
/// The remote tier: `remote.url=URL` (`s3://bucket/prefix` for any S3-compatible store, with
/// credentials, region and endpoint from the `AWS_*` environment variables; or `file:///dir`) or
/// `remote.path=DIR` (a directory every host mounts), with `remote.namespace=TEXT` (required:
/// model, dtype, tokens per block, layout and rank, everything that makes bytes for one key
/// differ; stores share blocks exactly when their namespaces and block sizes are equal),
/// `remote.timeout_ms=N` (each request's deadline, default 5000), `remote.failures_to_open=N` and
/// `remote.retry_after_ms=N` (the breaker: after N failures in a row no request for that long,
/// defaults 3 and 5000), `remote.concurrency=N` (requests
/// in flight for reads and for writes each, default 16), `remote.max_upload_bytes=BYTES` (uploads
/// queued or in flight; blocks offered beyond it are dropped and counted, default 256 MiB), and
/// `remote.option.NAME=VALUE` (a client setting by its `object_store` name, taking precedence over
/// the environment: `remote.option.aws_endpoint=http://minio:9000`, `aws_region`,
/// `aws_allow_http`...). Every block put is uploaded in the background. Nothing is sent at
/// creation: an unreachable store shows in the stats, not as a failure here; a URL of another
/// scheme, an unknown client setting, or client settings for a directory are
/// `KVFERRY_ERR_TIER_CONFIG`.
///
/// An unknown key is an error.
///
/// Ownership: `options` is borrowed for the call. On success `*out` is a new store the caller
/// owns and must release with `kvferry_store_destroy`; on failure `*out` is untouched.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_create(
    options: *const *const c_char,
    option_count: usize,
    out: *mut kvferry_store,
) -> kvferry_status {
    guard(|| {
        let options = unsafe { options_arg(options, option_count) }?;
        let out = unsafe { Out::new(out, "out") }?;
        let StoreOptions { config, events } = store_options(&options)?;
        let store = TierStore::open(config)?;
        let device: Arc<dyn Device> = Arc::new(HostDevice::new()?);
        let events = events.then(|| Mutex::new(Events { receiver: store.subscribe(), pending: VecDeque::new() }));
        out.set(handles::insert_root(Arc::new(StoreState { store, device, events })));
        Ok(())
    })
}

/// Block until `fence` has completed, whatever its outcome: it may be copying caller memory, and
/// there is no cancelling that. The store's workers bound each copy by their copy timeout.
fn wait_done(fence: &CopyFence) {
    while !fence.is_done() {
        let _ = fence.wait(Deadline::after(Duration::from_secs(1)));
    }
}

/// Destroy a store and its operations. Operations still running are finished first (they cannot
/// be cancelled), as are calls on the store that other threads are making; then the store stops its
/// threads and closes its disk files. The disk tier's blocks stay in `disk.dir` for the next store
/// opened there. Once this returns, kvferry no longer touches memory given to any put or get of the
/// store.
///
/// Ownership: consumes `store` and its operations; every copy of their handles becomes invalid.
/// Destroying it again returns `KVFERRY_ERR_INVALID_HANDLE`.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_store_destroy(store: kvferry_store) -> kvferry_status {
    guard(|| {
        // Operations need nothing done: the store's drop runs every submitted job to the end.
        for (_, object) in handles::remove_root(store)? {
            let Ok(mut state) = object.downcast::<StoreState>() else { continue };
            // A call that looked the store up before it left the table may still be submitting a
            // copy of caller memory; such calls never block, so wait for them to let go, then drop
            // the store here, where its drop drains the job queue and joins the workers.
            loop {
                match Arc::try_unwrap(state) {
                    Ok(last) => break drop(last),
                    Err(shared) => state = shared,
                }
                std::thread::yield_now();
            }
        }
        Ok(())
    })
}

/// Keep a submitted operation under a handle; if the store went away meanwhile, let the operation
/// finish before reporting that, since it may use caller memory.
fn track(store: kvferry_store, fence: CopyFence) -> CResult<kvferry_store_op> {
    let fence = Arc::new(fence);
    handles::insert(store, fence.clone()).inspect_err(|_| wait_done(&fence))
}

/// Which way a batch of blocks goes.
#[derive(Clone, Copy)]
enum Direction {
    Put,
    Get,
}

/// Put and get: check the arguments, pair keys with their regions, submit, hand out the operation.
#[allow(clippy::too_many_arguments, reason = "the C arguments of put and get, passed through")]
unsafe fn submit_blocks(
    direction: Direction,
    store: kvferry_store,
    keys: *const kvferry_block_key,
    count: usize,
    regions: *const kvferry_region,
    regions_per_block: usize,
    out: *mut kvferry_store_op,
) -> kvferry_status {
    guard(|| {
        if count > 0 && regions_per_block == 0 {
            return Err(Failure::invalid_argument("regions_per_block must not be 0"));
        }
        let region_count = count
            .checked_mul(regions_per_block)
            .ok_or_else(|| Failure::invalid_argument("count * regions_per_block overflows"))?;
        let keys = unsafe { slice_arg(keys, count, "keys") }?;
        let regions = unsafe { slice_arg(regions, region_count, "regions") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let keys = core_keys(keys)?;
        let regions = mem_regions(regions)?;
        if let Some(index) = regions.iter().position(|r| r.kind != MemKind::Host) {
            return Err(Failure::new(
                KVFERRY_ERR_UNSUPPORTED,
                format!("regions[{index}]: the store copies host memory only (KVFERRY_MEM_HOST)"),
            ));
        }
        let blocks: Vec<BlockRegions> = match regions_per_block {
            0 => Vec::new(),
            n => keys.into_iter().zip(regions.chunks_exact(n).map(<[_]>::to_vec)).collect(),
        };
        let state = handles::get(store)?;
        let device = state.device.clone();
        // SAFETY: host memory (checked above) that the caller keeps valid, and for a get writable
        // and not overlapping, until the operation is done, as the header states; destroying the
        // operation or the store waits for that.
        let fence = unsafe {
            match direction {
                Direction::Put => state.store.put(device, blocks),
                Direction::Get => state.store.get(device, blocks),
            }
        }?;
        out.set(track(store, fence)?);
        Ok(())
    })
}

/// Copy `count` blocks into the store: block `i`, keyed `keys[i]`, is the concatenation of
/// `regions[i * regions_per_block ..][.. regions_per_block]` (one region per layer, say), which must
/// add up to the block size. Blocks already cached are skipped. A batch needs DRAM for all its
/// blocks at once: more than the arena holds fails with `KVFERRY_ERR_TIER_NO_ROOM`. Returns at
/// once; the copy completes through `*out`.
///
/// Ownership: `keys` and `regions` are borrowed for the call; the memory the regions describe must
/// stay valid and unchanged until the operation is done (destroying the operation or the store
/// waits for that). `*out` belongs to the store: release it with `kvferry_store_op_destroy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_put(
    store: kvferry_store,
    keys: *const kvferry_block_key,
    count: usize,
    regions: *const kvferry_region,
    regions_per_block: usize,
    out: *mut kvferry_store_op,
) -> kvferry_status {
    unsafe { submit_blocks(Direction::Put, store, keys, count, regions, regions_per_block, out) }
}

/// Copy `count` cached blocks out of the store into caller memory, laid out as for
/// `kvferry_store_put`. Disk and remote blocks are read into DRAM first and stay there (promoted).
/// The operation fails with `KVFERRY_ERR_TIER_NOT_CACHED`, naming the block, if one is missing,
/// and with `KVFERRY_ERR_TIER_REMOTE_*` if a block only the remote tier holds cannot be read.
///
/// Ownership: as for `kvferry_store_put`; the destination regions must not overlap and must not be
/// read until the operation is done.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_get(
    store: kvferry_store,
    keys: *const kvferry_block_key,
    count: usize,
    regions: *const kvferry_region,
    regions_per_block: usize,
    out: *mut kvferry_store_op,
) -> kvferry_status {
    unsafe { submit_blocks(Direction::Get, store, keys, count, regions, regions_per_block, out) }
}

/// Move `count` blocks from DRAM to the disk tier (writing those not there yet) and free their DRAM;
/// blocks not in DRAM are skipped. Returns at once; completion comes through `*out`.
///
/// Ownership: `keys` is borrowed for the call. `*out` belongs to the store.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_offload(
    store: kvferry_store,
    keys: *const kvferry_block_key,
    count: usize,
    out: *mut kvferry_store_op,
) -> kvferry_status {
    guard(|| {
        let keys = unsafe { slice_arg(keys, count, "keys") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let keys = core_keys(keys)?;
        let fence = handles::get(store)?.store.offload(keys)?;
        out.set(track(store, fence)?);
        Ok(())
    })
}

/// Check an operation without blocking: stores whether it has finished in `*done` and returns
/// `KVFERRY_OK` while it runs or once it succeeded, or the error it failed with (`*done` true).
///
/// Ownership: `done` is the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_op_poll(op: kvferry_store_op, done: *mut bool) -> kvferry_status {
    guard(|| {
        let done = unsafe { Out::new(done, "done") }?;
        let outcome = handles::get(op)?.poll();
        done.set(outcome.is_some());
        Ok(outcome.unwrap_or(Ok(()))?)
    })
}

/// Block until the operation completes (`KVFERRY_OK`), fails (its error), or `timeout_ms` passes
/// (`KVFERRY_ERR_TIMEOUT`; the operation goes on).
///
/// Ownership: borrows `op`; it stays valid (destroy it when done).
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_store_op_wait(op: kvferry_store_op, timeout_ms: u32) -> kvferry_status {
    guard(|| {
        let fence = handles::get(op)?;
        match fence.wait(deadline_ms(timeout_ms)) {
            Err(_) if !fence.is_done() => Err(Failure::new(
                KVFERRY_ERR_TIMEOUT,
                format!("the store operation did not finish within {timeout_ms} ms"),
            )),
            outcome => Ok(outcome?),
        }
    })
}

/// Release an operation. One still running is waited for first (it cannot be cancelled), so once
/// this returns kvferry no longer touches its memory.
///
/// Ownership: consumes `op`; every copy of the handle becomes invalid.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_store_op_destroy(op: kvferry_store_op) -> kvferry_status {
    guard(|| {
        wait_done(&*handles::remove(op)?);
        Ok(())
    })
}

/// The longest cached prefix of `keys[0..count]`: stores its length in `*found` and where each of
/// its blocks is (`KVFERRY_MEDIUM_CPU` or `_DISK`; DRAM wins) in `media[0..*found]`. When
/// `capacity` is smaller than the prefix, returns `KVFERRY_ERR_BUFFER_TOO_SMALL` with the prefix
/// length in `*found` (`capacity` = `count` always suffices). Never blocks on i/o.
///
/// Ownership: `keys` is borrowed for the call; `media` and `found` are the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_lookup(
    store: kvferry_store,
    keys: *const kvferry_block_key,
    count: usize,
    media: *mut kvferry_medium,
    capacity: usize,
    found: *mut usize,
) -> kvferry_status {
    guard(|| {
        let keys = unsafe { slice_arg(keys, count, "keys") }?;
        let out = unsafe { OutBuf::new(media, capacity, found, "the media array") }?;
        let keys = core_keys(keys)?;
        let hits: Vec<kvferry_medium> = handles::get(store)?.store.lookup(&keys).into_iter().map(medium).collect();
        out.fill_items(&hits)
    })
}

/// Like `kvferry_store_lookup`, then the remote tier for the blocks after the local prefix, without
/// waiting on the network: blocks only the remote holds are `KVFERRY_MEDIUM_REMOTE` (a get reads
/// them into DRAM). While the remote is being asked about them, `*pending` is true, `*found` is 0
/// and `media` is untouched: call again later (a later call answers from what the remote said).
/// Otherwise `*pending` is false and `*found` and `media` are as for `kvferry_store_lookup`,
/// `KVFERRY_ERR_BUFFER_TOO_SMALL` included. A remote that fails counts as not holding the blocks.
/// Without a remote tier this is `kvferry_store_lookup` with `*pending` false.
///
/// Ownership: `keys` is borrowed for the call; `media`, `found` and `pending` are the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_lookup_remote(
    store: kvferry_store,
    keys: *const kvferry_block_key,
    count: usize,
    media: *mut kvferry_medium,
    capacity: usize,
    found: *mut usize,
    pending: *mut bool,
) -> kvferry_status {
    guard(|| {
        let keys = unsafe { slice_arg(keys, count, "keys") }?;
        let out = unsafe { OutBuf::new(media, capacity, found, "the media array") }?;
        let pending = unsafe { Out::new(pending, "pending") }?;
        let keys = core_keys(keys)?;
        match handles::get(store)?.store.lookup_remote(&keys) {
            None => {
                pending.set(true);
                out.fill_items(&[])
            }
            Some(hits) => {
                pending.set(false);
                out.fill_items(&hits.into_iter().map(medium).collect::<Vec<_>>())
            }
        }
    })
}

/// Wait until every upload to the remote tier queued so far has ended (stored or failed), or
/// `timeout_ms` has passed: stores in `*done` whether they all ended. Without a remote tier there
/// is nothing to wait for (`*done` true at once). For a process that exits soon after its last
/// put, so that its blocks reach the remote first.
///
/// Ownership: `done` is the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_remote_flush(
    store: kvferry_store,
    timeout_ms: u32,
    done: *mut bool,
) -> kvferry_status {
    guard(|| {
        let done = unsafe { Out::new(done, "done") }?;
        let state = handles::get(store)?;
        done.set(state.store.remote().is_none_or(|remote| remote.flush(deadline_ms(timeout_ms))));
        Ok(())
    })
}

/// The keys of every block on the disk tier, in slot order (none without a disk tier): stores them
/// in `keys[0..*count]`. Right after `kvferry_store_create` they are the blocks the directory's
/// index log held, so an engine restarted on the directory can rebuild its own index from them.
/// When `capacity` is too small, returns `KVFERRY_ERR_BUFFER_TOO_SMALL` with the number of keys in
/// `*count`. Never blocks on i/o.
///
/// Ownership: `keys` and `count` are the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_disk_keys(
    store: kvferry_store,
    keys: *mut kvferry_block_key,
    capacity: usize,
    count: *mut usize,
) -> kvferry_status {
    guard(|| {
        let out = unsafe { OutBuf::new(keys, capacity, count, "the key array") }?;
        let keys: Vec<kvferry_block_key> =
            handles::get(store)?.store.disk_keys().iter().map(kvferry_block_key::from_core).collect();
        out.fill_items(&keys)
    })
}

/// Forget every block that is not being read or written, in DRAM and on disk.
///
/// Ownership: borrows `store`.
#[unsafe(no_mangle)]
pub extern "C" fn kvferry_store_clear(store: kvferry_store) -> kvferry_status {
    guard(|| Ok(handles::get(store)?.store.clear()?))
}

/// Store the store's occupancy and counters in `*stats`.
///
/// Ownership: `stats` is the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_stats_get(
    store: kvferry_store,
    stats: *mut kvferry_store_stats,
) -> kvferry_status {
    guard(|| {
        let stats = unsafe { Out::new(stats, "stats") }?;
        let state = handles::get(store)?;
        stats.set(kvferry_store_stats::from_core(state.store.block_size(), state.store.stats()));
        Ok(())
    })
}

/// Move up to `capacity` of the oldest queued events into `events` (one per block, in order) and
/// store how many in `*count`; never blocks. Fewer than `capacity` means the queue is now empty.
/// The store must have been created with `events=on` (else `KVFERRY_ERR_INVALID_ARGUMENT`).
///
/// Ownership: `events` and `count` are the caller's. Events are meant to be drained by one thread
/// per store.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_store_events_take(
    store: kvferry_store,
    events: *mut kvferry_store_event,
    capacity: usize,
    count: *mut usize,
) -> kvferry_status {
    guard(|| {
        let out = unsafe { OutBuf::new(events, capacity, count, "the event array") }?;
        let state = handles::get(store)?;
        let queue = state
            .events
            .as_ref()
            .ok_or_else(|| Failure::invalid_argument("the store was created without events=on"))?;
        let mut queue = queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.take_arrived();
        let taken = queue.pending.len().min(out.capacity());
        let batch: Vec<kvferry_store_event> = queue.pending.drain(..taken).collect();
        out.fill_items(&batch)
    })
}

/// The key of the block holding `tokens[0..token_count]` after the block keyed `*parent` (NULL for
/// the first block of a sequence), mixed with `extra_len` bytes of `extra` (LoRA id, multimodal
/// hashes, cache salt; NULL when 0): xxh3-128, 16 bytes. Equal prefixes give equal keys in every
/// process and across restarts.
///
/// Ownership: all inputs are borrowed for the call; `out` is the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_block_key_chain(
    parent: *const kvferry_block_key,
    tokens: *const u32,
    token_count: usize,
    extra: *const u8,
    extra_len: usize,
    out: *mut kvferry_block_key,
) -> kvferry_status {
    guard(|| {
        let tokens = unsafe { slice_arg(tokens, token_count, "tokens") }?;
        let extra = unsafe { slice_arg(extra, extra_len, "extra") }?;
        let out = unsafe { Out::new(out, "out") }?;
        // SAFETY: a non-NULL `parent` points to a key, by the caller's contract.
        let parent = unsafe { parent.as_ref() }.map(|p| p.to_core(0)).transpose()?;
        out.set(kvferry_block_key::from_core(&BlockKey::chain(parent.as_ref(), tokens, extra)));
        Ok(())
    })
}

/// The chained keys of every full block of `tokens[0..token_count]`, `block_tokens` tokens per
/// block, into `keys[0..*count]` (a trailing partial block has no key). With `capacity` too small,
/// returns `KVFERRY_ERR_BUFFER_TOO_SMALL` with the number needed in `*count`.
///
/// Ownership: inputs are borrowed for the call; `keys` and `count` are the caller's.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments, reason = "inputs and a caller array with its capacity and length")]
pub unsafe extern "C" fn kvferry_block_key_prefix(
    tokens: *const u32,
    token_count: usize,
    block_tokens: usize,
    extra: *const u8,
    extra_len: usize,
    keys: *mut kvferry_block_key,
    capacity: usize,
    count: *mut usize,
) -> kvferry_status {
    guard(|| {
        let tokens = unsafe { slice_arg(tokens, token_count, "tokens") }?;
        let extra = unsafe { slice_arg(extra, extra_len, "extra") }?;
        let out = unsafe { OutBuf::new(keys, capacity, count, "the key array") }?;
        if block_tokens == 0 {
            return Err(Failure::invalid_argument("block_tokens must not be 0"));
        }
        let keys: Vec<kvferry_block_key> =
            BlockKey::prefix_keys(tokens, block_tokens, extra).iter().map(kvferry_block_key::from_core).collect();
        out.fill_items(&keys)
    })
}

/// A key from the engine's own block hash (`hash_len` bytes, 1 to `KVFERRY_BLOCK_KEY_MAX_BYTES`),
/// kept verbatim so that events carry the engine's hashes. Other lengths return
/// `KVFERRY_ERR_TIER_BAD_KEY`.
///
/// Ownership: `hash` is borrowed for the call; `out` is the caller's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvferry_block_key_from_hash(
    hash: *const u8,
    hash_len: usize,
    out: *mut kvferry_block_key,
) -> kvferry_status {
    guard(|| {
        let hash = unsafe { slice_arg(hash, hash_len, "hash") }?;
        let out = unsafe { Out::new(out, "out") }?;
        let key = BlockKey::from_engine_hash(hash).map_err(Error::from)?;
        out.set(kvferry_block_key::from_core(&key));
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::KVFERRY_ERR_TIER_BAD_KEY;

    #[test]
    fn keys_cross_the_boundary_unchanged() {
        let chained = BlockKey::chain(None, &[1, 2, 3], b"salt");
        let engine = BlockKey::from_engine_hash(&[9; 32]).unwrap();
        for key in [chained, engine] {
            assert_eq!(kvferry_block_key::from_core(&key).to_core(0).unwrap(), key);
        }
        let mut bad = kvferry_block_key::from_core(&chained);
        for len in [0, KVFERRY_BLOCK_KEY_MAX_BYTES as u8 + 1, u8::MAX] {
            bad.len = len;
            let failure = bad.to_core(4).unwrap_err();
            assert_eq!(failure.code, KVFERRY_ERR_TIER_BAD_KEY);
            assert!(failure.message.starts_with("keys[4]: "), "{}", failure.message);
            assert!(failure.message.ends_with(&format!("got {len}")), "{}", failure.message);
        }
    }
}
