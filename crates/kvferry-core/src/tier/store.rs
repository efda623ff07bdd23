//! [`TierStore`]: the bookkeeping of both tiers under one lock, and worker threads (one io_uring each)
//! that do the copying and the disk i/o outside it.
//!
//! A block's host slab is claimed under the lock, filled or read without it, and published under it
//! again; pins (per-slab counts) keep a block that a worker is reading or writing from being evicted
//! or reused in between.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::host::HostBuffer;
use crate::memory::{CopyFence, CopyOp, Device, FenceSignal, MemRegion};
use crate::tier::disk::{DiskEntry, DiskFiles, Record, block_checksum, write_failed};
use crate::tier::policy::{AdmissionFilter, Policy, new_policy};
use crate::tier::uring::{Direction, IoOp, Ring};
use crate::tier::{BlockKey, BlockRegions, DISK_ALIGNMENT, Medium, TierConfig, TierError, TierEvent};

/// Rounds of "pick victims, write them down" a reservation tries before reporting no room: a victim
/// that a reader pins meanwhile stays, and the next round picks another.
const MAX_RESERVE_ROUNDS: usize = 64;

/// Counters and occupancy of a store, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierStats {
    pub host_blocks: usize,
    pub host_capacity_blocks: usize,
    pub disk_blocks: usize,
    pub disk_capacity_blocks: usize,
    pub host_hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
    pub host_evictions: u64,
    pub disk_evictions: u64,
    pub disk_writes: u64,
    /// Evicted blocks the admission filter kept off the disk.
    pub not_admitted: u64,
    /// Disk blocks read back into DRAM on a hit.
    pub promotions: u64,
    /// Blocks that failed their checksum on read and were dropped.
    pub corrupt_blocks: u64,
    /// Torn records dropped from the index log's tail at open.
    pub torn_records: u64,
    /// Why the disk tier stopped taking writes, if it did.
    pub disk_failure: Option<String>,
    /// Why the rings run without registered buffers or files, if they do.
    pub io_fallback: Option<String>,
}

struct HostSlot {
    key: BlockKey,
    pins: u32,
    /// Filled and visible to lookups.
    ready: bool,
    /// A copy is on disk too, so evicting needs no write.
    on_disk: bool,
}

struct DiskBlock {
    entry: DiskEntry,
    pins: u32,
}

struct DiskState {
    files: DiskFiles,
    blocks: HashMap<BlockKey, DiskBlock>,
    free: Vec<u32>,
    policy: Box<dyn Policy>,
    slots: u32,
    /// Set on the first failed write: the tier keeps serving reads but takes no more blocks.
    failed: Option<TierError>,
}

struct State {
    host: HashMap<BlockKey, u32>,
    slots: Vec<Option<HostSlot>>,
    free: Vec<u32>,
    policy: Box<dyn Policy>,
    disk: Option<DiskState>,
    admission: AdmissionFilter,
    stats: TierStats,
    subscribers: Vec<mpsc::Sender<TierEvent>>,
}

impl State {
    fn emit(&mut self, event: TierEvent) {
        // A change of no block says nothing; `Cleared` names none by nature.
        if !event.keys().is_empty() || event == TierEvent::Cleared {
            self.subscribers.retain(|s| s.send(event.clone()).is_ok());
        }
    }

    /// The slab holding `key`, if it is filled and visible to lookups.
    fn ready_slab(&self, key: &BlockKey) -> Option<u32> {
        self.host.get(key).copied().filter(|&i| self.slots[i as usize].as_ref().is_some_and(|s| s.ready))
    }

    fn slot(&mut self, index: u32) -> &mut HostSlot {
        self.slots[index as usize].as_mut().expect("slots named by the map or a claim are occupied")
    }

    /// Give a claimed slot back (a failed fill, a key that arrived meanwhile).
    fn release_claim(&mut self, index: u32) {
        if let Some(slot) = self.slots[index as usize].take()
            && self.host.get(&slot.key) == Some(&index)
        {
            self.host.remove(&slot.key);
        }
        self.free.push(index);
    }

    /// Drop a disk block whose bytes failed their checksum.
    fn drop_corrupt(&mut self, key: BlockKey) {
        self.stats.corrupt_blocks += 1;
        if let Some(disk) = &mut self.disk
            && let Some(block) = disk.blocks.remove(&key)
        {
            disk.policy.forgotten(&key);
            disk.free.push(block.entry.slot);
            // If the record cannot be written, the next open drops the block again on read.
            let _ = disk.files.append(&[Record::Remove(key)]);
        }
        self.emit(TierEvent::Removed { keys: vec![key], medium: Medium::Disk });
    }

    /// A disk slot for a new block: a free one, or the least valuable unpinned block's (whose removal
    /// is logged before its slot can be overwritten).
    fn claim_disk_slot(&mut self) -> Option<u32> {
        let disk = self.disk.as_mut()?;
        if let Some(slot) = disk.free.pop() {
            return Some(slot);
        }
        let blocks = &disk.blocks;
        let victim = disk.policy.victim(&mut |k| blocks.get(k).is_some_and(|b| b.pins == 0))?;
        if let Err(e) = disk.files.append(&[Record::Remove(victim)]) {
            disk.failed = Some(e);
            return None;
        }
        let block = disk.blocks.remove(&victim)?;
        disk.policy.evicted(&victim);
        self.stats.disk_evictions += 1;
        if let Some(&index) = self.host.get(&victim) {
            self.slot(index).on_disk = false;
        }
        self.emit(TierEvent::Removed { keys: vec![victim], medium: Medium::Disk });
        Some(block.entry.slot)
    }
}

/// A host slab being written down to a disk slot.
#[derive(Clone, Copy)]
struct WriteDown {
    key: BlockKey,
    host_slot: u32,
    disk_slot: u32,
}

/// The part of a store its workers share.
struct Shared {
    block_size: usize,
    copy_timeout: std::time::Duration,
    arena: HostBuffer,
    state: Mutex<State>,
}

type Job = Box<dyn FnOnce(&Shared, Option<&mut Ring>) + Send>;

impl Shared {
    fn stats(&self) -> TierStats {
        let state = self.lock();
        let mut stats = state.stats.clone();
        stats.host_blocks = state.slots.iter().flatten().filter(|s| s.ready).count();
        if let Some(disk) = &state.disk {
            stats.disk_blocks = disk.blocks.len();
            stats.disk_failure = disk.failed.as_ref().map(|e| e.to_string());
        }
        stats
    }
}

/// A two-level (pinned DRAM, NVMe) store of fixed-size KV blocks keyed by chained prefix hashes.
///
/// `put` and `get` return at once with a [`CopyFence`]; worker threads do the work. `lookup` only
/// reads the index and answers directly.
pub struct TierStore {
    shared: Arc<Shared>,
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl TierStore {
    /// Allocate the arena, open (or create) the disk tier and replay its index, start the workers.
    pub fn open(config: TierConfig) -> Result<TierStore> {
        let block_size = config.block_size;
        let invalid = |why: String| Error::from(TierError::Config { why });
        if block_size == 0 {
            return Err(invalid("the block size must not be zero".into()));
        }
        let host_blocks = (config.host_capacity / block_size as u64) as usize;
        if host_blocks == 0 {
            return Err(invalid(format!(
                "a host capacity of {} bytes holds no {block_size}-byte block",
                config.host_capacity
            )));
        }
        if config.workers == 0 {
            return Err(invalid("at least one worker is needed".into()));
        }
        let arena = HostBuffer::alloc(host_blocks * block_size, &config.host_alloc)?;
        let mut stats = TierStats { host_capacity_blocks: host_blocks, ..TierStats::default() };
        let disk = match &config.disk {
            None => None,
            Some(disk) => {
                if !block_size.is_multiple_of(DISK_ALIGNMENT) {
                    return Err(invalid(format!(
                        "with a disk tier the block size must be a multiple of {DISK_ALIGNMENT} (O_DIRECT)"
                    )));
                }
                if disk.queue_depth == 0 {
                    return Err(invalid("the disk queue depth must not be zero".into()));
                }
                let slots = u32::try_from(disk.capacity / block_size as u64)
                    .map_err(|_| invalid("the disk tier holds at most 2^32 - 1 blocks".into()))?;
                if slots == 0 {
                    return Err(invalid(format!("a disk capacity of {} bytes holds no block", disk.capacity)));
                }
                let (files, replayed) = DiskFiles::open(&disk.dir, block_size, slots, disk.sync_writes)?;
                let used: HashSet<u32> = replayed.blocks.values().map(|e| e.slot).collect();
                let mut policy = new_policy(config.policy, slots as usize);
                for key in replayed.blocks.keys() {
                    policy.inserted(*key);
                }
                stats.torn_records = replayed.torn_records;
                stats.disk_capacity_blocks = slots as usize;
                Some(DiskState {
                    files,
                    blocks: replayed.blocks.into_iter().map(|(k, entry)| (k, DiskBlock { entry, pins: 0 })).collect(),
                    free: (0..slots).rev().filter(|s| !used.contains(s)).collect(),
                    policy,
                    slots,
                    failed: None,
                })
            }
        };

        let mut rings = Vec::new();
        if let (Some(disk_config), Some(disk)) = (&config.disk, &disk) {
            for _ in 0..config.workers {
                let (ring, refused) = Ring::new(
                    disk_config.queue_depth,
                    disk.files.data_fd(),
                    arena.as_ptr() as usize,
                    arena.len(),
                    block_size,
                );
                let reasons: Vec<String> =
                    refused.into_iter().chain(disk.files.buffered().map(str::to_string)).collect();
                if !reasons.is_empty() {
                    stats.io_fallback = Some(reasons.join("; "));
                }
                rings.push(Some(ring));
            }
            if let Some(reason) = &stats.io_fallback {
                tracing::warn!("the disk tier runs without some kernel fast paths: {reason}");
            }
        } else {
            rings.resize_with(config.workers, || None);
        }

        let total_blocks = host_blocks + disk.as_ref().map_or(0, |d| d.slots as usize);
        let admit_after = config.disk.as_ref().map_or(0, |d| d.admit_after);
        let state = State {
            host: HashMap::new(),
            slots: (0..host_blocks).map(|_| None).collect(),
            free: (0..host_blocks as u32).rev().collect(),
            policy: new_policy(config.policy, host_blocks),
            disk,
            admission: AdmissionFilter::new(total_blocks, admit_after),
            stats,
            subscribers: Vec::new(),
        };
        let shared =
            Arc::new(Shared { block_size, copy_timeout: config.copy_timeout, arena, state: Mutex::new(state) });
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let workers = rings
            .into_iter()
            .enumerate()
            .map(|(i, mut ring)| {
                let (shared, receiver) = (Arc::clone(&shared), Arc::clone(&receiver));
                std::thread::Builder::new()
                    .name(format!("kvferry-tier-{i}"))
                    .spawn(move || {
                        loop {
                            // The lock is released as soon as a job is taken.
                            let job = receiver.lock().unwrap_or_else(PoisonError::into_inner).recv();
                            let Ok(job) = job else { return };
                            job(&shared, ring.as_mut());
                        }
                    })
                    .map_err(|e| Error::io("starting a tier worker", e))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(TierStore { shared, jobs: Some(sender), workers })
    }

    pub fn block_size(&self) -> usize {
        self.shared.block_size
    }

    /// Events from now on. A dropped receiver unsubscribes.
    pub fn subscribe(&self) -> mpsc::Receiver<TierEvent> {
        let (sender, receiver) = mpsc::channel();
        self.shared.lock().subscribers.push(sender);
        receiver
    }

    /// The longest cached prefix of `keys`: where each of its blocks is (DRAM wins over disk).
    pub fn lookup(&self, keys: &[BlockKey]) -> Vec<Medium> {
        let state = self.shared.lock();
        let mut found = Vec::new();
        for key in keys {
            if state.ready_slab(key).is_some() {
                found.push(Medium::Cpu);
            } else if state.disk.as_ref().is_some_and(|d| d.blocks.contains_key(key)) {
                found.push(Medium::Disk);
            } else {
                break;
            }
        }
        found
    }

    /// Copy blocks into the store from memory of `device`: each block is the concatenation of its
    /// regions, which must add up to the block size. Blocks already cached are skipped.
    ///
    /// # Safety
    /// The regions must be readable by `device` and stay valid and unchanged until the fence
    /// completes.
    pub unsafe fn put(&self, device: Arc<dyn Device>, blocks: Vec<BlockRegions>) -> Result<CopyFence> {
        self.check_blocks(&blocks)?;
        self.submit(move |shared, ring| shared.put(ring, device.as_ref(), &blocks))
    }

    /// Copy cached blocks out into memory of `device`, reading disk blocks into DRAM first (where
    /// they stay, promoted). Fails with [`TierError::NotCached`] naming the first block missing.
    ///
    /// # Safety
    /// The regions must be writable by `device`, not overlap, and stay valid until the fence
    /// completes.
    pub unsafe fn get(&self, device: Arc<dyn Device>, blocks: Vec<BlockRegions>) -> Result<CopyFence> {
        self.check_blocks(&blocks)?;
        self.submit(move |shared, ring| shared.get(ring, device.as_ref(), &blocks))
    }

    /// Move blocks from DRAM to disk (writing those not there yet) and free their slabs; blocks not
    /// in DRAM are skipped, and blocks the disk cannot take stay in DRAM. The disk's admission filter
    /// does not apply: the caller asked.
    pub fn offload(&self, keys: Vec<BlockKey>) -> Result<CopyFence> {
        self.submit(move |shared, ring| shared.offload(ring, &keys))
    }

    /// Forget every block that is not being read or written, in both tiers. Emits `Removed` for
    /// the blocks forgotten and then, if no block is left, `Cleared`.
    pub fn clear(&self) -> Result<()> {
        let mut state = self.shared.lock();
        let state = &mut *state;
        let mut removed = Vec::new();
        for index in 0..state.slots.len() {
            if state.slots[index].as_ref().is_some_and(|s| s.ready && s.pins == 0) {
                let slot = state.slots[index].take().expect("checked above");
                state.host.remove(&slot.key);
                state.policy.forgotten(&slot.key);
                state.free.push(index as u32);
                removed.push(slot.key);
            }
        }
        state.emit(TierEvent::Removed { keys: removed, medium: Medium::Cpu });
        if let Some(disk) = &mut state.disk {
            let gone: Vec<BlockKey> = disk.blocks.iter().filter(|(_, b)| b.pins == 0).map(|(k, _)| *k).collect();
            if gone.len() == disk.blocks.len() {
                disk.files.rewrite(&HashMap::new())?;
            } else {
                disk.files.append(&gone.iter().map(|k| Record::Remove(*k)).collect::<Vec<_>>())?;
            }
            for key in &gone {
                if let Some(block) = disk.blocks.remove(key) {
                    disk.policy.forgotten(key);
                    disk.free.push(block.entry.slot);
                }
            }
            // Descending, so that slots are handed out in file order again (sequential writes).
            disk.free.sort_unstable_by(|a, b| b.cmp(a));
            for slot in state.slots.iter_mut().flatten() {
                slot.on_disk &= disk.blocks.contains_key(&slot.key);
            }
            state.emit(TierEvent::Removed { keys: gone, medium: Medium::Disk });
        }
        if state.host.is_empty() && state.disk.as_ref().is_none_or(|d| d.blocks.is_empty()) {
            state.emit(TierEvent::Cleared);
        }
        Ok(())
    }

    pub fn stats(&self) -> TierStats {
        self.shared.stats()
    }

    /// Reads the store's stats while it is open; `None` once it has been dropped. Metrics keep
    /// this rather than the store, so that a scrape never keeps a store (and its arena) alive.
    pub fn stats_reader(&self) -> impl Fn() -> Option<(TierStats, usize)> + Send + Sync + 'static {
        let shared = Arc::downgrade(&self.shared);
        move || shared.upgrade().map(|s| (s.stats(), s.block_size))
    }

    fn check_blocks(&self, blocks: &[BlockRegions]) -> Result<()> {
        for (index, (_, regions)) in blocks.iter().enumerate() {
            let total = regions.iter().try_fold(0u64, |sum, r| sum.checked_add(r.len));
            if total != Some(self.shared.block_size as u64) {
                return Err(TierError::BadBlock {
                    index,
                    why: format!(
                        "its regions add up to {total:?} bytes, not the block size {}",
                        self.shared.block_size
                    ),
                }
                .into());
            }
            if regions.iter().any(|r| r.end().is_none()) {
                return Err(TierError::BadBlock { index, why: "a region wraps around the address space".into() }.into());
            }
        }
        Ok(())
    }

    fn submit(
        &self,
        work: impl FnOnce(&Shared, Option<&mut Ring>) -> Result<()> + Send + 'static,
    ) -> Result<CopyFence> {
        let outcome = Arc::new(Outcome::default());
        let signal = Arc::clone(&outcome);
        let job: Job = Box::new(move |shared, ring| signal.complete(work(shared, ring)));
        self.jobs.as_ref().ok_or(TierError::Closed)?.send(job).map_err(|_| TierError::Closed)?;
        Ok(CopyFence::new(outcome))
    }
}

impl std::fmt::Debug for TierStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TierStore").field("block_size", &self.shared.block_size).field("stats", &self.stats()).finish()
    }
}

impl Drop for TierStore {
    fn drop(&mut self) {
        // Closing the queue lets the workers finish what was submitted and exit; the rings (which
        // registered the arena) go with them, before the arena is unmapped.
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// The outcome of one store operation, behind a [`CopyFence`].
#[derive(Default)]
struct Outcome {
    result: Mutex<Option<Result<()>>>,
    done: Condvar,
}

impl Outcome {
    fn complete(&self, result: Result<()>) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.done.notify_all();
    }
}

impl FenceSignal for Outcome {
    fn poll(&self) -> Option<Result<()>> {
        self.result.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn wait(&self, deadline: Deadline) -> Result<()> {
        let mut result = self.result.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(result) = &*result {
                return result.clone();
            }
            if deadline.expired() {
                return Err(crate::memory::MemoryError::FenceTimeout.into());
            }
            result = self.done.wait_timeout(result, deadline.remaining()).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn slab(&self, index: u32) -> u64 {
        self.arena.as_ptr() as u64 + index as u64 * self.block_size as u64
    }

    fn put(&self, ring: Option<&mut Ring>, device: &dyn Device, blocks: &[BlockRegions]) -> Result<()> {
        let keys: Vec<BlockKey> = {
            let mut state = self.lock();
            let mut seen = HashSet::new();
            let mut fresh = Vec::new();
            for (key, _) in blocks {
                state.admission.record(key);
                if state.host.contains_key(key) {
                    state.policy.touched(key);
                } else if !state.disk.as_ref().is_some_and(|d| d.blocks.contains_key(key)) && seen.insert(*key) {
                    fresh.push(*key);
                }
            }
            fresh
        };
        if keys.is_empty() {
            return Ok(());
        }
        let claimed = self.reserve(ring, &keys)?;
        let sources: HashMap<BlockKey, &Vec<MemRegion>> = blocks.iter().map(|(k, r)| (*k, r)).collect();
        let mut ops = Vec::new();
        for (key, index) in &claimed {
            let mut at = self.slab(*index);
            for region in sources[key] {
                ops.push(CopyOp { src: region.addr, dst: at, len: region.len });
                at += region.len;
            }
        }
        // SAFETY: the sources are the caller's (see `TierStore::put`); each destination is a slab
        // claimed for this put alone.
        let copied = unsafe { device.copy_batch(&ops) }.and_then(|f| f.wait(Deadline::after(self.copy_timeout)));
        let mut state = self.lock();
        if let Err(e) = copied {
            // A copy that timed out may still write into its slabs, so they leave the arena for good
            // (its capacity shrinks) instead of returning to the free list; a refused copy wrote
            // nothing.
            let timed_out = e.code() == crate::error::ErrorCode::Timeout;
            for (key, index) in &claimed {
                if timed_out {
                    state.host.remove(key);
                    state.slots[*index as usize] = None;
                } else {
                    state.release_claim(*index);
                }
            }
            return Err(e);
        }
        for (key, index) in &claimed {
            let slot = state.slot(*index);
            slot.ready = true;
            slot.pins -= 1;
            state.policy.inserted(*key);
        }
        state.emit(TierEvent::Stored { keys: claimed.iter().map(|(k, _)| *k).collect(), medium: Medium::Cpu });
        Ok(())
    }

    fn get(&self, ring: Option<&mut Ring>, device: &dyn Device, blocks: &[BlockRegions]) -> Result<()> {
        // Pin what is where: DRAM slabs to copy from, disk blocks to promote first.
        let mut pinned_host: Vec<(BlockKey, u32)> = Vec::new();
        let mut from_disk: Vec<(BlockKey, DiskEntry)> = Vec::new();
        let mut promoting = HashSet::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            for (key, _) in blocks {
                state.admission.record(key);
                if let Some(index) = state.ready_slab(key) {
                    state.slot(index).pins += 1;
                    state.policy.touched(key);
                    state.stats.host_hits += 1;
                    pinned_host.push((*key, index));
                    continue;
                }
                let on_disk = state.disk.as_mut().and_then(|d| d.blocks.get_mut(key).map(|b| (b, &mut d.policy)));
                match on_disk {
                    Some((block, policy)) if promoting.insert(*key) => {
                        block.pins += 1;
                        policy.touched(key);
                        state.stats.disk_hits += 1;
                        from_disk.push((*key, block.entry));
                    }
                    Some(_) => {}
                    None => {
                        state.stats.misses += 1;
                        self.unpin(state, &pinned_host, &from_disk);
                        return Err(TierError::NotCached { key: *key }.into());
                    }
                }
            }
        }
        // Copies out start as soon as each block is in DRAM: DRAM hits now, disk blocks as each read
        // completes (while the others are still in flight).
        let mut destinations: HashMap<BlockKey, Vec<&Vec<MemRegion>>> = HashMap::new();
        for (key, regions) in blocks {
            destinations.entry(*key).or_default().push(regions);
        }
        let mut fences = Vec::new();
        let mut copy_error = None;
        let mut copy_out = |slabs: &[(BlockKey, u32)]| {
            let mut ops = Vec::new();
            for (key, index) in slabs {
                for regions in destinations.remove(key).unwrap_or_default() {
                    let mut at = self.slab(*index);
                    for region in regions {
                        ops.push(CopyOp { src: at, dst: region.addr, len: region.len });
                        at += region.len;
                    }
                }
            }
            // SAFETY: the destinations are the caller's (see `TierStore::get`); the slabs stay pinned
            // until every fence has completed.
            match unsafe { device.copy_batch(&ops) } {
                Ok(fence) => fences.push(fence),
                Err(e) => {
                    copy_error.get_or_insert(e);
                }
            }
        };
        copy_out(&pinned_host);
        let promoted = self.promote(ring, &from_disk, &mut |key, index| copy_out(&[(key, index)]));
        let mut outcome = promoted.map(|promoted| pinned_host.extend(promoted));
        // A disk block another get promoted at the same time is in DRAM under that get's claim.
        let in_hand: HashSet<BlockKey> = pinned_host.iter().map(|(k, _)| *k).collect();
        for (key, _) in &from_disk {
            if outcome.is_err() || in_hand.contains(key) {
                continue;
            }
            outcome = self.pin_when_ready(key).map(|index| {
                pinned_host.push((*key, index));
                copy_out(&[(*key, index)]);
            });
        }
        let deadline = Deadline::after(self.copy_timeout);
        // Every fence is waited for, even after a failure: the copies read slabs about to be unpinned.
        let waited: Vec<Result<()>> = fences.iter().map(|f| f.wait(deadline)).collect();
        self.unpin(&mut self.lock(), &pinned_host, &[]);
        outcome?;
        if let Some(e) = copy_error {
            return Err(e);
        }
        waited.into_iter().collect()
    }

    /// Pin `key`'s slab once the put or promotion filling it publishes it.
    fn pin_when_ready(&self, key: &BlockKey) -> Result<u32> {
        let deadline = Deadline::after(self.copy_timeout);
        loop {
            {
                let mut state = self.lock();
                let Some(&index) = state.host.get(key) else { return Err(TierError::NotCached { key: *key }.into()) };
                let slot = state.slot(index);
                if slot.ready {
                    slot.pins += 1;
                    return Ok(index);
                }
            }
            if deadline.expired() {
                return Err(crate::memory::MemoryError::FenceTimeout.into());
            }
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    fn unpin(&self, state: &mut State, host: &[(BlockKey, u32)], disk: &[(BlockKey, DiskEntry)]) {
        for (_, index) in host {
            state.slot(*index).pins -= 1;
        }
        if let Some(d) = &mut state.disk {
            for (key, _) in disk {
                if let Some(block) = d.blocks.get_mut(key) {
                    block.pins -= 1;
                }
            }
        }
    }

    /// Read pinned disk blocks into fresh slabs, verify them and publish them in DRAM, calling
    /// `on_ready` with each verified block as soon as its read completes. Returns the slabs, still
    /// pinned for the caller; unpins the disk blocks.
    fn promote(
        &self,
        ring: Option<&mut Ring>,
        blocks: &[(BlockKey, DiskEntry)],
        on_ready: &mut dyn FnMut(BlockKey, u32),
    ) -> Result<Vec<(BlockKey, u32)>> {
        if blocks.is_empty() {
            return Ok(Vec::new());
        }
        let Some(ring) = ring else {
            unreachable!("disk blocks exist only with a disk tier, which gives every worker a ring")
        };
        let keys: Vec<BlockKey> = blocks.iter().map(|(k, _)| *k).collect();
        let claimed = match self.reserve(Some(&mut *ring), &keys) {
            Ok(claimed) => claimed,
            Err(e) => {
                self.unpin(&mut self.lock(), &[], blocks);
                return Err(e);
            }
        };
        let entry_of: HashMap<BlockKey, DiskEntry> = blocks.iter().copied().collect();
        let ops: Vec<IoOp> = claimed
            .iter()
            .map(|(key, index)| IoOp {
                addr: self.slab(*index) as usize,
                len: self.block_size,
                offset: entry_of[key].slot as u64 * self.block_size as u64,
            })
            .collect();
        let mut verified: Vec<std::result::Result<(), TierError>> = vec![Ok(()); claimed.len()];
        ring.run(Direction::Read, &ops, &mut |i, read| {
            let (key, index) = claimed[i];
            verified[i] = read
                .map_err(|e| TierError::DiskIo { op: format!("reading block {key}"), cause: e.to_string() })
                .and_then(|()| {
                    // SAFETY: the slab is claimed by this worker and the read into it has completed.
                    let bytes = unsafe { std::slice::from_raw_parts(self.slab(index) as *const u8, self.block_size) };
                    // The checksum covers the key and slot too: a record that names this key with
                    // another block's slot and checksum fails here, and never serves that block.
                    let entry = entry_of[&key];
                    if block_checksum(&key, entry.slot, bytes) != entry.checksum {
                        return Err(TierError::BlockCorrupt { key });
                    }
                    on_ready(key, index);
                    Ok(())
                });
        });

        let mut state = self.lock();
        self.unpin(&mut state, &[], blocks);
        let mut first_error = None;
        let mut promoted = Vec::new();
        for ((key, index), verified) in claimed.iter().zip(verified) {
            match verified {
                Ok(()) => {
                    let slot = state.slot(*index);
                    slot.ready = true;
                    slot.on_disk = true;
                    state.policy.inserted(*key);
                    promoted.push((*key, *index));
                }
                Err(e) => {
                    if matches!(e, TierError::BlockCorrupt { .. }) {
                        state.drop_corrupt(*key);
                    }
                    state.release_claim(*index);
                    first_error.get_or_insert(e);
                }
            }
        }
        state.stats.promotions += promoted.len() as u64;
        state.emit(TierEvent::Stored { keys: promoted.iter().map(|(k, _)| *k).collect(), medium: Medium::Cpu });
        if let Some(e) = first_error {
            self.unpin(&mut state, &promoted, &[]);
            return Err(e.into());
        }
        Ok(promoted)
    }

    /// Claim a slab for each key that is not in DRAM yet, evicting (and writing down) as needed.
    /// Claimed slabs are pinned and not ready; keys that another put brought in meanwhile are left
    /// out.
    fn reserve(&self, mut ring: Option<&mut Ring>, keys: &[BlockKey]) -> Result<Vec<(BlockKey, u32)>> {
        let mut claimed: Vec<(BlockKey, u32)> = Vec::new();
        for _ in 0..MAX_RESERVE_ROUNDS {
            let (victims, writes) = {
                let mut state = self.lock();
                let state = &mut *state;
                for key in keys {
                    if state.host.contains_key(key) {
                        continue;
                    }
                    let Some(index) = state.free.pop() else { break };
                    state.slots[index as usize] = Some(HostSlot { key: *key, pins: 1, ready: false, on_disk: false });
                    state.host.insert(*key, index);
                    claimed.push((*key, index));
                }
                let wanted = keys.iter().filter(|k| !state.host.contains_key(k)).count();
                if wanted == 0 {
                    return Ok(claimed);
                }
                let victims = self.pick_victims(state, wanted);
                if victims.is_empty() {
                    claimed.iter().for_each(|(_, index)| state.release_claim(*index));
                    return Err(TierError::NoRoom { needed: wanted, medium: Medium::Cpu }.into());
                }
                let writes = self.plan_writes(state, &victims, false);
                (victims, writes)
            };
            let written = self.write_down(ring.as_deref_mut(), writes);
            let mut state = self.lock();
            let freed = self.finish_eviction(&mut state, &victims, &written, false);
            state.free.extend(freed);
        }
        let mut state = self.lock();
        claimed.iter().for_each(|(_, index)| state.release_claim(*index));
        Err(TierError::NoRoom { needed: keys.len(), medium: Medium::Cpu }.into())
    }

    /// Up to `count` evictable slabs in policy order, pinned for the eviction.
    fn pick_victims(&self, state: &mut State, count: usize) -> Vec<(BlockKey, u32)> {
        let (host, slots) = (&state.host, &state.slots);
        let keys = state.policy.victims(count, &mut |key| {
            host.get(key).is_some_and(|&i| slots[i as usize].as_ref().is_some_and(|s| s.ready && s.pins == 0))
        });
        keys.into_iter()
            .map(|key| {
                let index = state.host[&key];
                state.slot(index).pins += 1;
                (key, index)
            })
            .collect()
    }

    /// Which victims go to disk, with a disk slot each: those not there yet that the admission filter
    /// (or `force`) lets in, while the disk takes writes.
    fn plan_writes(&self, state: &mut State, victims: &[(BlockKey, u32)], force: bool) -> Vec<WriteDown> {
        let mut writes = Vec::new();
        // No disk, or one that stopped taking blocks.
        if state.disk.as_ref().is_none_or(|d| d.failed.is_some()) {
            return writes;
        }
        for (key, index) in victims {
            if state.slot(*index).on_disk {
                continue;
            }
            if !force && !state.admission.admits(key) {
                state.stats.not_admitted += 1;
                continue;
            }
            match state.claim_disk_slot() {
                Some(disk_slot) => writes.push(WriteDown { key: *key, host_slot: *index, disk_slot }),
                None => break,
            }
        }
        writes
    }

    /// Write slabs to their disk slots; returns the checksums of those written.
    fn write_down(&self, ring: Option<&mut Ring>, writes: Vec<WriteDown>) -> Vec<(WriteDown, std::io::Result<u64>)> {
        let Some(ring) = ring else { return Vec::new() };
        if writes.is_empty() {
            return Vec::new();
        }
        let ops: Vec<IoOp> = writes
            .iter()
            .map(|w| IoOp {
                addr: self.slab(w.host_slot) as usize,
                len: self.block_size,
                offset: w.disk_slot as u64 * self.block_size as u64,
            })
            .collect();
        let mut results: Vec<std::io::Result<u64>> = (0..writes.len()).map(|_| Ok(0)).collect();
        // Each slab is hashed once its write is done, while the writes that replaced it are in
        // flight: hashing before submitting left the device idle while the ring hashed a whole
        // batch of completions (they arrive together). Records come after all writes regardless.
        ring.run(Direction::Write, &ops, &mut |i, written| {
            results[i] = written.map(|()| {
                let w = writes[i];
                // SAFETY: the slab is pinned by the eviction and holds a published block, which no one
                // writes while it is pinned, so these are the bytes just written.
                let bytes = unsafe { std::slice::from_raw_parts(self.slab(w.host_slot) as *const u8, self.block_size) };
                block_checksum(&w.key, w.disk_slot, bytes)
            });
        });
        writes.into_iter().zip(results).collect()
    }

    /// Record what was written, then release the victims: each one no one else pinned meanwhile
    /// leaves DRAM and its slab is returned; with `keep_unwritten`, only those now on disk.
    fn finish_eviction(
        &self,
        state: &mut State,
        victims: &[(BlockKey, u32)],
        written: &[(WriteDown, std::io::Result<u64>)],
        keep_unwritten: bool,
    ) -> Vec<u32> {
        let mut stored = Vec::new();
        if let Some(disk) = &mut state.disk {
            let mut failure = None;
            let mut records = Vec::new();
            for (w, result) in written {
                match result {
                    Ok(checksum) => {
                        records.push(Record::Store(w.key, DiskEntry { slot: w.disk_slot, checksum: *checksum }))
                    }
                    Err(e) => {
                        disk.free.push(w.disk_slot);
                        failure.get_or_insert_with(|| write_failed(disk.files.dir(), "writing a block", e));
                    }
                }
            }
            let logged = disk.files.append(&records);
            for record in &records {
                let Record::Store(key, entry) = *record else { continue };
                if logged.is_ok() {
                    disk.blocks.insert(key, DiskBlock { entry, pins: 0 });
                    disk.policy.inserted(key);
                    stored.push(key);
                } else {
                    disk.free.push(entry.slot);
                }
            }
            if let Err(e) = logged {
                failure.get_or_insert(e);
            } else if disk.files.needs_compaction(disk.blocks.len()) {
                let live: HashMap<BlockKey, DiskEntry> = disk.blocks.iter().map(|(k, b)| (*k, b.entry)).collect();
                if let Err(e) = disk.files.rewrite(&live) {
                    failure.get_or_insert(e);
                }
            }
            if let Some(failure) = failure {
                tracing::warn!("the disk tier stops taking blocks: {failure}");
                disk.failed.get_or_insert(failure);
            }
        }
        state.stats.disk_writes += stored.len() as u64;
        for key in &stored {
            let index = state.host[key];
            state.slot(index).on_disk = true;
        }

        let (mut moved, mut dropped, mut freed) = (Vec::new(), Vec::new(), Vec::new());
        for (key, index) in victims {
            let slot = state.slot(*index);
            slot.pins -= 1;
            if slot.pins > 0 || (keep_unwritten && !slot.on_disk) {
                continue;
            }
            let on_disk = slot.on_disk;
            state.slots[*index as usize] = None;
            state.host.remove(key);
            state.policy.evicted(key);
            state.stats.host_evictions += 1;
            if on_disk {
                moved.push(*key)
            } else {
                dropped.push(*key)
            }
            freed.push(*index);
        }
        // Blocks written now and kept in DRAM (a reader pinned them meanwhile) are stored on disk too.
        let kept: Vec<BlockKey> = stored.iter().filter(|k| state.host.contains_key(k)).copied().collect();
        state.emit(TierEvent::Stored { keys: kept, medium: Medium::Disk });
        state.emit(TierEvent::Moved { keys: moved, from: Medium::Cpu, to: Medium::Disk });
        state.emit(TierEvent::Removed { keys: dropped, medium: Medium::Cpu });
        freed
    }

    fn offload(&self, ring: Option<&mut Ring>, keys: &[BlockKey]) -> Result<()> {
        let (victims, writes) = {
            let mut state = self.lock();
            let state = &mut *state;
            let mut victims = Vec::new();
            let mut seen = HashSet::new();
            for key in keys {
                let Some(&index) = state.host.get(key) else { continue };
                let slot = state.slot(index);
                if !slot.ready || !seen.insert(*key) {
                    continue;
                }
                slot.pins += 1;
                victims.push((*key, index));
            }
            let writes = self.plan_writes(state, &victims, true);
            (victims, writes)
        };
        let written = self.write_down(ring, writes);
        let mut state = self.lock();
        let freed = self.finish_eviction(&mut state, &victims, &written, true);
        state.free.extend(freed);
        match state.disk.as_ref().and_then(|d| d.failed.clone()) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}
