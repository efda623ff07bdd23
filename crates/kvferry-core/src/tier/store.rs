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

use bytes::Bytes;

use crate::deadline::Deadline;
use crate::error::{Error, Result};
use crate::memory::host::HostBuffer;
use crate::memory::{CopyFence, CopyOp, Device, FenceSignal, MemKind, MemRegion};
use crate::sync::Locked;
use crate::tier::disk::{DiskEntry, DiskFiles, Record, block_checksum, write_failed};
use crate::tier::policy::{AdmissionFilter, EvictionPolicy, Policy, new_policy};
use crate::tier::remote::{RemoteLookup, RemoteStats, RemoteTier};
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
    /// The remote level's counters, with one.
    pub remote: Option<RemoteStats>,
}

impl TierStats {
    /// Every count of the store, by the name each front end gives it (the Python dict's key, the C
    /// struct's field): the one list they take their fields from, and are tested against. The
    /// flags (`disk_failure`, `io_fallback`, a remote tier) and the remote's counts
    /// ([`RemoteStats::counts`]) are apart.
    pub fn counts(&self) -> [(&'static str, u64); 14] {
        [
            ("host_blocks", self.host_blocks as u64),
            ("host_capacity_blocks", self.host_capacity_blocks as u64),
            ("disk_blocks", self.disk_blocks as u64),
            ("disk_capacity_blocks", self.disk_capacity_blocks as u64),
            ("host_hits", self.host_hits),
            ("disk_hits", self.disk_hits),
            ("misses", self.misses),
            ("host_evictions", self.host_evictions),
            ("disk_evictions", self.disk_evictions),
            ("disk_writes", self.disk_writes),
            ("not_admitted", self.not_admitted),
            ("promotions", self.promotions),
            ("corrupt_blocks", self.corrupt_blocks),
            ("torn_records", self.torn_records),
        ]
    }
}

/// Where a DRAM slab is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Claimed by the put, fetch or promotion filling it: invisible to lookups, never evicted, and
    /// holding its claim's pin until [`State::publish`] or [`State::release_claim`].
    Claimed,
    /// Filled and visible to lookups.
    Ready,
}

struct HostSlot {
    key: BlockKey,
    /// Readers, evictions and leases holding the slab, and a claim's own pin.
    pins: u32,
    fill: Fill,
    /// A copy is on disk too, so evicting needs no write.
    on_disk: bool,
}

impl HostSlot {
    fn ready(&self) -> bool {
        self.fill == Fill::Ready
    }

    /// Ready and held by nobody: the eviction policy may take it.
    fn evictable(&self) -> bool {
        self.ready() && self.pins == 0
    }
}

struct DiskBlock {
    entry: DiskEntry,
    pins: u32,
}

struct DiskState {
    /// The files behind their own lock, taken after the state's (never before it): a direct write
    /// appends its records holding only this one, so lookups do not wait on the log's write or
    /// fsync.
    files: Arc<Mutex<DiskFiles>>,
    /// Keys a direct write is storing: not found yet, and not stored twice meanwhile.
    storing: HashSet<BlockKey>,
    /// The directory, for errors, without taking the files' lock.
    dir: std::path::PathBuf,
    blocks: HashMap<BlockKey, DiskBlock>,
    free: Vec<u32>,
    policy: Box<dyn Policy>,
    slots: u32,
    /// Set on the first failed write: the tier keeps serving reads but takes no more blocks.
    failed: Option<TierError>,
}

impl DiskState {
    fn log(&self) -> MutexGuard<'_, DiskFiles> {
        self.files.locked()
    }
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
    /// Slabs lent to uploads ([`SlabLease`]), at most half the arena, so that a slow remote can
    /// pin no more of DRAM than that; beyond it an upload takes a copy.
    leased: usize,
}

impl State {
    /// `host_blocks` free slabs in DRAM, no disk tier, nothing counted yet.
    fn new(host_blocks: usize, policy: EvictionPolicy, admission: AdmissionFilter) -> State {
        State {
            host: HashMap::new(),
            slots: (0..host_blocks).map(|_| None).collect(),
            free: (0..host_blocks as u32).rev().collect(),
            policy: new_policy(policy, host_blocks),
            disk: None,
            admission,
            stats: TierStats::default(),
            subscribers: Vec::new(),
            leased: 0,
        }
    }

    /// Claim free slabs for the `keys` not in DRAM yet (pinned, not visible to lookups until
    /// [`publish`](Self::publish)), adding them to `claimed`; returns how many keys still lack one.
    fn claim_free(&mut self, keys: &[BlockKey], claimed: &mut Vec<(BlockKey, u32)>) -> usize {
        for key in keys {
            if self.host.contains_key(key) {
                continue;
            }
            let Some(index) = self.free.pop() else { break };
            self.slots[index as usize] = Some(HostSlot { key: *key, pins: 1, fill: Fill::Claimed, on_disk: false });
            self.host.insert(*key, index);
            claimed.push((*key, index));
        }
        keys.iter().filter(|k| !self.host.contains_key(k)).count()
    }

    /// Make filled claims visible to lookups and evictable: the claim's pin goes.
    fn publish(&mut self, claimed: &[(BlockKey, u32)]) {
        for (key, index) in claimed {
            let slot = self.slot(*index);
            slot.fill = Fill::Ready;
            slot.pins -= 1;
            self.policy.inserted(*key);
        }
    }

    /// Up to `count` evictable slabs (filled, unpinned) in the policy's order, pinned for the
    /// eviction.
    fn pin_victims(&mut self, count: usize) -> Vec<(BlockKey, u32)> {
        let (host, slots) = (&self.host, &self.slots);
        let keys = self.policy.victims(count, &mut |key| {
            host.get(key).is_some_and(|&i| slots[i as usize].as_ref().is_some_and(HostSlot::evictable))
        });
        keys.into_iter()
            .map(|key| {
                let index = self.host[&key];
                self.slot(index).pins += 1;
                (key, index)
            })
            .collect()
    }

    fn emit(&mut self, event: TierEvent) {
        // A change of no block says nothing; `Cleared` names none by nature.
        if !event.keys().is_empty() || event == TierEvent::Cleared {
            self.subscribers.retain(|s| s.send(event.clone()).is_ok());
        }
    }

    /// The slab holding `key`, if it is filled and visible to lookups.
    fn ready_slab(&self, key: &BlockKey) -> Option<u32> {
        self.host.get(key).copied().filter(|&i| self.slots[i as usize].as_ref().is_some_and(HostSlot::ready))
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
            let _ = disk.log().append(&[Record::Remove(key)]);
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
        let logged = disk.log().append(&[Record::Remove(victim)]);
        if let Err(e) = logged {
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

/// Record what was written, then release the victims (their pins, taken with
/// [`Pins::into_victims`]): each one no one else pinned meanwhile
/// leaves DRAM and its slab is returned; with `keep_unwritten`, only those now on disk.
fn finish_eviction(
    state: &mut State,
    victims: Vec<(BlockKey, u32)>,
    written: &[(WriteDown, std::io::Result<u64>)],
    keep_unwritten: bool,
) -> Vec<u32> {
    let mut stored = Vec::new();
    if let Some(disk) = &mut state.disk {
        let mut files = disk.files.locked();
        let mut failure = None;
        let mut records = Vec::new();
        for (w, result) in written {
            match result {
                Ok(checksum) => {
                    records.push(Record::Store(w.key, DiskEntry { slot: w.disk_slot, checksum: *checksum }))
                }
                Err(e) => {
                    disk.free.push(w.disk_slot);
                    failure.get_or_insert_with(|| write_failed(files.dir(), "writing a block", e));
                }
            }
        }
        let logged = files.append(&records);
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
        } else if files.needs_compaction(disk.blocks.len()) {
            let live: HashMap<BlockKey, DiskEntry> = disk.blocks.iter().map(|(k, b)| (*k, b.entry)).collect();
            if let Err(e) = files.rewrite(&live) {
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
    // Each victim's pin is given back here, under the lock, before its slab may be freed.
    for (key, index) in victims {
        let slot = state.slot(index);
        slot.pins -= 1;
        if slot.pins > 0 || (keep_unwritten && !slot.on_disk) {
            continue;
        }
        let on_disk = slot.on_disk;
        state.slots[index as usize] = None;
        state.host.remove(&key);
        state.policy.evicted(&key);
        state.stats.host_evictions += 1;
        if on_disk {
            moved.push(key)
        } else {
            dropped.push(key)
        }
        freed.push(index);
    }
    // Blocks written now and kept in DRAM (a reader pinned them meanwhile) are stored on disk too.
    let kept: Vec<BlockKey> = stored.iter().filter(|k| state.host.contains_key(k)).copied().collect();
    state.emit(TierEvent::Stored { keys: kept, medium: Medium::Disk });
    state.emit(TierEvent::Moved { keys: moved, from: Medium::Cpu, to: Medium::Disk });
    state.emit(TierEvent::Removed { keys: dropped, medium: Medium::Cpu });
    freed
}

/// A host slab being written down to a disk slot.
#[derive(Clone, Copy)]
struct WriteDown {
    key: BlockKey,
    host_slot: u32,
    disk_slot: u32,
}

/// One block of a direct write: the caller's address and the disk slot it goes to.
#[derive(Clone, Copy)]
struct DirectWrite {
    key: BlockKey,
    addr: u64,
    slot: u32,
}

/// What a direct write claimed under the lock.
struct DirectClaim {
    files: Arc<Mutex<DiskFiles>>,
    writes: Vec<DirectWrite>,
    /// Blocks evicted for the slots, gone from the index, whose removals are not logged yet.
    victims: Vec<BlockKey>,
    /// Blocks the write needs when fewer slots could be claimed.
    short: Option<usize>,
}

/// The part of a store its workers share.
struct Shared {
    block_size: usize,
    copy_timeout: std::time::Duration,
    arena: HostBuffer,
    state: Mutex<State>,
    /// Told whenever slots claimed by a put, a fetch or a promotion are published or given back,
    /// for a get that waits on another's claim ([`Shared::pin_when_ready`]).
    claims_settled: Condvar,
    remote: Option<RemoteTier>,
}

/// Wakes the waiters on claims when the function that made them returns, whichever way it does.
struct SettleClaims<'a>(&'a Shared);

impl Drop for SettleClaims<'_> {
    fn drop(&mut self) {
        self.0.claims_settled.notify_all();
    }
}

type Job = Box<dyn FnOnce(&Arc<Shared>, Option<&mut Ring>) + Send>;

impl Shared {
    fn stats(&self) -> TierStats {
        let state = self.lock();
        let mut stats = state.stats.clone();
        stats.host_blocks = state.slots.iter().flatten().filter(|s| s.ready()).count();
        if let Some(disk) = &state.disk {
            stats.disk_blocks = disk.blocks.len();
            stats.disk_failure = disk.failed.as_ref().map(|e| e.to_string());
        }
        drop(state);
        stats.remote = self.remote.as_ref().map(RemoteTier::stats);
        stats
    }
}

/// A store of fixed-size KV blocks keyed by chained prefix hashes, in pinned DRAM, on NVMe, and in a
/// remote level shared by every engine.
///
/// `put` and `get` return at once with a [`CopyFence`]; worker threads do the work. `lookup` only
/// reads the index and answers directly; `lookup_remote` asks the remote level without waiting.
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
                    files: Arc::new(Mutex::new(files)),
                    storing: HashSet::new(),
                    dir: disk.dir.clone(),
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
                let files = disk.log();
                let (ring, refused) = Ring::new(
                    disk_config.queue_depth,
                    files.data_fd(),
                    arena.as_ptr() as usize,
                    arena.len(),
                    block_size,
                );
                let reasons: Vec<String> = refused.into_iter().chain(files.buffered().map(str::to_string)).collect();
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
        let mut state = State::new(host_blocks, config.policy, AdmissionFilter::new(total_blocks, admit_after));
        (state.disk, state.stats) = (disk, stats);
        let remote = config.remote.clone().map(|r| RemoteTier::open(r, block_size)).transpose()?;
        let shared = Arc::new(Shared {
            block_size,
            copy_timeout: config.copy_timeout,
            arena,
            state: Mutex::new(state),
            claims_settled: Condvar::new(),
            remote,
        });
        if let Some(remote) = &shared.remote {
            // Weak: the client's tasks outlive the store, which must not be kept alive by them.
            let announce = Mutex::new(Arc::downgrade(&shared));
            remote.set_on_uploaded(Box::new(move |key| {
                let shared = announce.locked().upgrade();
                if let Some(shared) = shared {
                    shared.lock().emit(TierEvent::Stored { keys: vec![key], medium: Medium::Remote });
                }
            }));
        }
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
                            let job = receiver.locked().recv();
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

    /// Like [`TierStore::lookup`], then the remote level for the blocks after the local prefix,
    /// without waiting: `None` while the remote is being asked (look again later). Blocks found
    /// only there are [`Medium::Remote`]; a `get` reads them into DRAM.
    pub fn lookup_remote(&self, keys: &[BlockKey]) -> Option<Vec<Medium>> {
        let mut found = self.lookup(keys);
        let Some(remote) = &self.shared.remote else { return Some(found) };
        if found.len() == keys.len() {
            return Some(found);
        }
        match remote.lookup(&keys[found.len()..]) {
            RemoteLookup::Found(n) => {
                found.extend(std::iter::repeat_n(Medium::Remote, n));
                Some(found)
            }
            RemoteLookup::Pending => None,
        }
    }

    /// The remote level, with one.
    pub fn remote(&self) -> Option<&RemoteTier> {
        self.shared.remote.as_ref()
    }

    /// The keys of every block on the disk tier (none without one), in slot order. Right after
    /// [`TierStore::open`] these are the blocks the replayed index log holds: a restarted engine
    /// rebuilds its own index of the store from them instead of starting empty. Blocks being
    /// written are not listed until their record is.
    pub fn disk_keys(&self) -> Vec<BlockKey> {
        let state = self.shared.lock();
        let Some(disk) = &state.disk else { return Vec::new() };
        let mut blocks: Vec<(u32, BlockKey)> = disk.blocks.iter().map(|(k, b)| (b.entry.slot, *k)).collect();
        blocks.sort_unstable_by_key(|&(slot, _)| slot);
        blocks.into_iter().map(|(_, k)| k).collect()
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

    /// Copy cached blocks out into memory of `device`, reading disk and remote blocks into DRAM
    /// first (where they stay, promoted). Fails with [`TierError::NotCached`] naming the first
    /// block missing; a remote block that cannot be read fails it with the remote's error.
    ///
    /// # Safety
    /// The regions must be writable by `device`, not overlap, and stay valid until the fence
    /// completes.
    pub unsafe fn get(&self, device: Arc<dyn Device>, blocks: Vec<BlockRegions>) -> Result<CopyFence> {
        self.check_blocks(&blocks)?;
        self.submit(move |shared, ring| shared.get(ring, device.as_ref(), &blocks))
    }

    /// Write blocks from host memory straight to the disk tier, without a stop in DRAM: for a caller
    /// that keeps its own copy (vLLM's CPU tier) and wants the disk as a second level. Each block is
    /// one region of the block size at an address aligned to [`DISK_ALIGNMENT`] (`O_DIRECT` reads
    /// and writes it where it is). Blocks already on disk, or being written there, are skipped; the
    /// disk's policy makes room by evicting unpinned blocks, and the admission filter does not apply.
    ///
    /// A block becomes visible to [`TierStore::lookup`] only once its bytes and its record are
    /// written; a block whose write fails is never found. The disk takes a batch whole or not at
    /// all: more blocks than it has slots is [`TierError::DiskFull`], too few unpinned slots
    /// [`TierError::NoRoom`], and nothing is written in either case.
    ///
    /// # Safety
    /// The regions must be readable and stay valid and unchanged until the fence completes.
    pub unsafe fn put_to_disk(&self, blocks: Vec<BlockRegions>) -> Result<CopyFence> {
        self.check_blocks(&blocks)?;
        self.check_direct(&blocks)?;
        self.submit(move |shared, ring| shared.put_to_disk(ring, &blocks))
    }

    /// Read blocks from the disk tier straight into host memory (no promotion to DRAM), each
    /// checked against its checksum where it landed. Each block is one region as for
    /// [`TierStore::put_to_disk`]. Fails with [`TierError::NotCached`] naming the first block not on
    /// disk, before reading anything; a block that fails its checksum is dropped from the tier and
    /// fails the read with [`TierError::BlockCorrupt`]. After a failure the regions' bytes are
    /// unspecified: the caller must not use them.
    ///
    /// # Safety
    /// The regions must be writable, not overlap, and stay valid until the fence completes.
    pub unsafe fn get_from_disk(&self, blocks: Vec<BlockRegions>) -> Result<CopyFence> {
        self.check_blocks(&blocks)?;
        self.check_direct(&blocks)?;
        self.submit(move |shared, ring| shared.get_from_disk(ring, &blocks))
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
            if state.slots[index].as_ref().is_some_and(HostSlot::evictable) {
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
                disk.log().rewrite(&HashMap::new())?;
            } else {
                disk.log().append(&gone.iter().map(|k| Record::Remove(*k)).collect::<Vec<_>>())?;
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

    /// Blocks that `O_DIRECT` can move where they are: one aligned host region each, with a disk.
    fn check_direct(&self, blocks: &[BlockRegions]) -> Result<()> {
        if self.shared.lock().disk.is_none() {
            return Err(TierError::Config { why: "the store has no disk tier to read or write directly".into() }.into());
        }
        for (index, (_, regions)) in blocks.iter().enumerate() {
            let why = match regions.as_slice() {
                [region] if region.kind != MemKind::Host => format!("it is in {} memory, not host memory", region.kind),
                [region] if !region.addr.is_multiple_of(DISK_ALIGNMENT as u64) => {
                    format!("its address {:#x} is not aligned to {DISK_ALIGNMENT} bytes (O_DIRECT)", region.addr)
                }
                [_] => continue,
                _ => format!("it has {} regions; a direct disk read or write takes one", regions.len()),
            };
            return Err(TierError::BadBlock { index, why }.into());
        }
        Ok(())
    }

    fn submit(
        &self,
        work: impl FnOnce(&Arc<Shared>, Option<&mut Ring>) -> Result<()> + Send + 'static,
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
        *self.result.locked() = Some(result);
        self.done.notify_all();
    }
}

impl FenceSignal for Outcome {
    fn poll(&self) -> Option<Result<()>> {
        self.result.locked().clone()
    }

    fn wait(&self, deadline: Deadline) -> Result<()> {
        let mut result = self.result.locked();
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

/// A DRAM slab lent to an upload, which sends its bytes without copying them: pinned, so neither
/// evicted nor rewritten, until the upload drops it. It keeps the arena mapped if the upload
/// outlives the store.
struct SlabLease {
    shared: Arc<Shared>,
    index: u32,
}

impl AsRef<[u8]> for SlabLease {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the slab was lent holding a whole block (its copy done) and stays pinned, and a
        // pinned slab is neither evicted nor written.
        unsafe { self.shared.slab_bytes(self.index) }
    }
}

impl Drop for SlabLease {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.leased -= 1;
        state.slot(self.index).pins -= 1;
    }
}

/// Pins on DRAM slabs and disk blocks, a reader's or an eviction's: while they are held, those
/// blocks are neither evicted (by anyone else) nor rewritten. Dropping them unpins (taking the state's lock, so they must not be
/// dropped under it: [`release`](Self::release) unpins under a lock already held).
#[must_use]
struct Pins<'a> {
    shared: &'a Shared,
    host: Vec<(BlockKey, u32)>,
    disk: Vec<(BlockKey, DiskEntry)>,
}

impl<'a> Pins<'a> {
    fn new(shared: &'a Shared) -> Pins<'a> {
        Pins { shared, host: Vec::new(), disk: Vec::new() }
    }

    /// Pin a ready DRAM slab.
    fn pin_host(&mut self, state: &mut State, key: BlockKey, index: u32) {
        state.slot(index).pins += 1;
        self.host.push((key, index));
    }

    /// Take over a pin already held on a slab: a claim's on the slab it has just filled, or the one
    /// [`Shared::pin_when_ready`] took.
    fn adopt(&mut self, key: BlockKey, index: u32) {
        self.host.push((key, index));
    }

    fn pin_disk(&mut self, block: &mut DiskBlock, key: BlockKey) {
        block.pins += 1;
        self.disk.push((key, block.entry));
    }

    /// Move `other`'s pins into these.
    fn extend(&mut self, mut other: Pins<'a>) {
        self.host.append(&mut other.host);
        self.disk.append(&mut other.disk);
    }

    /// The victims' pins, for [`finish_eviction`] to give back one by one under the lock.
    fn into_victims(mut self) -> Vec<(BlockKey, u32)> {
        std::mem::take(&mut self.host)
    }

    /// The pins [`State::pin_victims`] took for an eviction.
    fn of_victims(shared: &'a Shared, victims: Vec<(BlockKey, u32)>) -> Pins<'a> {
        Pins { shared, host: victims, disk: Vec::new() }
    }

    fn keys(&self) -> HashSet<BlockKey> {
        self.host.iter().map(|(k, _)| *k).chain(self.disk.iter().map(|(k, _)| *k)).collect()
    }

    /// Unpin under the state's lock, held by the caller.
    fn release(mut self, state: &mut State) {
        self.unpin(state);
    }

    fn unpin(&mut self, state: &mut State) {
        for (_, index) in self.host.drain(..) {
            state.slot(index).pins -= 1;
        }
        let disk = std::mem::take(&mut self.disk);
        if let Some(d) = &mut state.disk {
            for (key, _) in disk {
                if let Some(block) = d.blocks.get_mut(&key) {
                    block.pins -= 1;
                }
            }
        }
    }
}

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        if !self.host.is_empty() || !self.disk.is_empty() {
            let mut state = self.shared.lock();
            self.unpin(&mut state);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.locked()
    }

    fn slab(&self, index: u32) -> u64 {
        self.arena.as_ptr() as u64 + index as u64 * self.block_size as u64
    }

    /// # Safety
    /// The slab must be pinned, and not being written.
    unsafe fn slab_bytes(&self, index: u32) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.slab(index) as *const u8, self.block_size) }
    }

    /// Lend slab `index` (holding a whole block) to an upload, pinned until the upload lets go of
    /// it; `None` once half the arena is lent.
    fn lend(self: &Arc<Self>, state: &mut State, index: u32) -> Option<SlabLease> {
        if state.leased >= state.slots.len() / 2 {
            return None;
        }
        state.leased += 1;
        state.slot(index).pins += 1;
        Some(SlabLease { shared: Arc::clone(self), index })
    }

    fn put(self: &Arc<Self>, ring: Option<&mut Ring>, device: &dyn Device, blocks: &[BlockRegions]) -> Result<()> {
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
        let _settle = SettleClaims(self);
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
        if copied.is_ok()
            && let Some(remote) = &self.remote
        {
            for (key, index) in &claimed {
                // The upload reads the slab itself where it can: no copy, no fresh pages to fault in.
                remote.offer_with(*key, || {
                    let lease = self.lend(&mut self.lock(), *index);
                    match lease {
                        Some(lease) => Bytes::from_owner(lease),
                        // SAFETY: the slab is claimed by this put and its copy has completed.
                        None => Bytes::copy_from_slice(unsafe { self.slab_bytes(*index) }),
                    }
                });
            }
        }
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
        state.publish(&claimed);
        state.emit(TierEvent::Stored { keys: claimed.iter().map(|(k, _)| *k).collect(), medium: Medium::Cpu });
        Ok(())
    }

    fn get(&self, mut ring: Option<&mut Ring>, device: &dyn Device, blocks: &[BlockRegions]) -> Result<()> {
        // Blocks only the remote holds come into DRAM first, pinned until the copies out are done.
        let from_remote = self.fetch_remote(ring.as_deref_mut(), blocks)?;
        self.get_local(ring, device, blocks, &from_remote.keys())
    }

    /// Read the blocks of `blocks` that neither DRAM nor disk holds from the remote level into
    /// fresh slabs, verified, and publish them in DRAM; returns them still pinned. Fails if one
    /// cannot be read (those that could are kept).
    fn fetch_remote(&self, ring: Option<&mut Ring>, blocks: &[BlockRegions]) -> Result<Pins<'_>> {
        let Some(remote) = &self.remote else { return Ok(Pins::new(self)) };
        let wanted: Vec<BlockKey> = {
            let state = self.lock();
            let mut seen = HashSet::new();
            blocks
                .iter()
                .map(|(k, _)| *k)
                .filter(|k| {
                    !state.host.contains_key(k)
                        && !state.disk.as_ref().is_some_and(|d| d.blocks.contains_key(k))
                        && seen.insert(*k)
                })
                .collect()
        };
        if wanted.is_empty() {
            return Ok(Pins::new(self));
        }
        if let Some(refused) = remote.refusal() {
            return Err(refused.into());
        }
        // Each object streams into a slab claimed for it, checked as it lands.
        let claimed = self.reserve(ring, &wanted)?;
        let _settle = SettleClaims(self);
        let mut destinations: Vec<(BlockKey, &mut [u8])> = claimed
            .iter()
            // SAFETY: each slab is claimed by this worker alone until it is published or released.
            .map(|(key, index)| {
                (*key, unsafe { std::slice::from_raw_parts_mut(self.slab(*index) as *mut u8, self.block_size) })
            })
            .collect();
        let fetched = remote.fetch_into(&mut destinations, Deadline::after(self.copy_timeout));
        drop(destinations);
        let mut first_error = None;
        let mut missing = 0;
        let mut published = Pins::new(self);
        let mut state = self.lock();
        for ((key, index), got) in claimed.into_iter().zip(fetched) {
            match got {
                Ok(()) => {
                    let slot = state.slot(index);
                    slot.fill = Fill::Ready;
                    state.policy.inserted(key);
                    published.adopt(key, index);
                }
                Err(e) => {
                    state.release_claim(index);
                    missing += u64::from(matches!(e, TierError::NotCached { .. }));
                    first_error.get_or_insert(e);
                }
            }
        }
        state.stats.misses += missing;
        state.stats.promotions += published.host.len() as u64;
        state.emit(TierEvent::Stored { keys: published.host.iter().map(|(k, _)| *k).collect(), medium: Medium::Cpu });
        if let Some(e) = first_error {
            published.release(&mut state);
            return Err(e.into());
        }
        Ok(published)
    }

    /// `get` of blocks in DRAM and on disk; those in `fetched` came from the remote just now and are
    /// counted as the remote's hits, not DRAM's.
    fn get_local(
        &self,
        ring: Option<&mut Ring>,
        device: &dyn Device,
        blocks: &[BlockRegions],
        fetched: &HashSet<BlockKey>,
    ) -> Result<()> {
        // Pin what is where: DRAM slabs to copy from, disk blocks to promote first. The pins are
        // made before the lock is taken, so that a return under it drops the lock first.
        let mut pinned_host = Pins::new(self);
        let mut from_disk = Pins::new(self);
        let mut promoting = HashSet::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            for (key, _) in blocks {
                state.admission.record(key);
                if let Some(index) = state.ready_slab(key) {
                    pinned_host.pin_host(state, *key, index);
                    state.policy.touched(key);
                    if !fetched.contains(key) {
                        state.stats.host_hits += 1;
                    }
                    continue;
                }
                let on_disk = state.disk.as_mut().and_then(|d| d.blocks.get_mut(key).map(|b| (b, &mut d.policy)));
                match on_disk {
                    Some((block, policy)) if promoting.insert(*key) => {
                        from_disk.pin_disk(block, *key);
                        policy.touched(key);
                        state.stats.disk_hits += 1;
                    }
                    Some(_) => {}
                    None => {
                        state.stats.misses += 1;
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
        copy_out(&pinned_host.host);
        let on_disk: Vec<BlockKey> = from_disk.disk.iter().map(|(k, _)| *k).collect();
        let promoted = self.promote(ring, from_disk, &mut |key, index| copy_out(&[(key, index)]));
        let mut outcome = promoted.map(|promoted| pinned_host.extend(promoted));
        // A disk block another get promoted at the same time is in DRAM under that get's claim.
        let in_hand: HashSet<BlockKey> = pinned_host.keys();
        for key in &on_disk {
            if outcome.is_err() || in_hand.contains(key) {
                continue;
            }
            outcome = self.pin_when_ready(key).map(|index| {
                pinned_host.adopt(*key, index);
                copy_out(&[(*key, index)]);
            });
        }
        let deadline = Deadline::after(self.copy_timeout);
        // Every fence is waited for, even after a failure: the copies read slabs about to be unpinned.
        let waited: Vec<Result<()>> = fences.iter().map(|f| f.wait(deadline)).collect();
        drop(pinned_host);
        outcome?;
        if let Some(e) = copy_error {
            return Err(e);
        }
        waited.into_iter().collect()
    }

    /// Pin `key`'s slab once the put or promotion filling it publishes it.
    fn pin_when_ready(&self, key: &BlockKey) -> Result<u32> {
        let deadline = Deadline::after(self.copy_timeout);
        let mut state = self.lock();
        loop {
            let Some(&index) = state.host.get(key) else { return Err(TierError::NotCached { key: *key }.into()) };
            let slot = state.slot(index);
            if slot.ready() {
                slot.pins += 1;
                return Ok(index);
            }
            if deadline.expired() {
                return Err(crate::memory::MemoryError::FenceTimeout.into());
            }
            state =
                self.claims_settled.wait_timeout(state, deadline.remaining()).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Read pinned disk blocks into fresh slabs, verify them and publish them in DRAM, calling
    /// `on_ready` with each verified block as soon as its read completes. Returns the slabs, still
    /// pinned for the caller; unpins the disk blocks.
    fn promote(
        &self,
        ring: Option<&mut Ring>,
        pinned: Pins<'_>,
        on_ready: &mut dyn FnMut(BlockKey, u32),
    ) -> Result<Pins<'_>> {
        let blocks = pinned.disk.clone();
        if blocks.is_empty() {
            return Ok(Pins::new(self));
        }
        let Some(ring) = ring else {
            unreachable!("disk blocks exist only with a disk tier, which gives every worker a ring")
        };
        let keys: Vec<BlockKey> = blocks.iter().map(|(k, _)| *k).collect();
        let claimed = self.reserve(Some(&mut *ring), &keys)?;
        let _settle = SettleClaims(self);
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

        let mut promoted = Pins::new(self);
        let mut state = self.lock();
        pinned.release(&mut state);
        let mut first_error = None;
        for ((key, index), verified) in claimed.iter().zip(verified) {
            match verified {
                Ok(()) => {
                    let slot = state.slot(*index);
                    slot.fill = Fill::Ready;
                    slot.on_disk = true;
                    state.policy.inserted(*key);
                    promoted.adopt(*key, *index);
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
        state.stats.promotions += promoted.host.len() as u64;
        state.emit(TierEvent::Stored { keys: promoted.host.iter().map(|(k, _)| *k).collect(), medium: Medium::Cpu });
        if let Some(e) = first_error {
            promoted.release(&mut state);
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
                let wanted = state.claim_free(keys, &mut claimed);
                if wanted == 0 {
                    return Ok(claimed);
                }
                let victims = state.pin_victims(wanted);
                if victims.is_empty() {
                    claimed.iter().for_each(|(_, index)| state.release_claim(*index));
                    return Err(TierError::NoRoom { needed: wanted, medium: Medium::Cpu }.into());
                }
                let writes = self.plan_writes(state, &victims, false);
                (Pins::of_victims(self, victims), writes)
            };
            let written = self.write_down(ring.as_deref_mut(), writes);
            let mut state = self.lock();
            let freed = finish_eviction(&mut state, victims.into_victims(), &written, false);
            state.free.extend(freed);
        }
        let mut state = self.lock();
        claimed.iter().for_each(|(_, index)| state.release_claim(*index));
        Err(TierError::NoRoom { needed: keys.len(), medium: Medium::Cpu }.into())
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

    fn put_to_disk(&self, ring: Option<&mut Ring>, blocks: &[BlockRegions]) -> Result<()> {
        let Some(ring) = ring else { unreachable!("check_direct refused a store without a disk tier") };
        let Some(claim) = self.claim_direct(blocks)? else { return Ok(()) };
        let DirectClaim { files, writes, victims, short } = claim;
        // Victims' removals are logged before their slots are overwritten (and outside the state lock,
        // as every append of a direct write is).
        let removals: Vec<Record> = victims.iter().map(|k| Record::Remove(*k)).collect();
        if let Err(e) = files.locked().append(&removals) {
            self.abandon_direct(&writes, Some(&e));
            return Err(e.into());
        }
        if let Some(needed) = short {
            self.abandon_direct(&writes, None);
            return Err(TierError::NoRoom { needed, medium: Medium::Disk }.into());
        }
        let ops: Vec<IoOp> = writes
            .iter()
            .map(|w| IoOp {
                addr: w.addr as usize,
                len: self.block_size,
                offset: w.slot as u64 * self.block_size as u64,
            })
            .collect();
        let mut written: Vec<std::io::Result<u64>> = (0..writes.len()).map(|_| Ok(0)).collect();
        ring.run(Direction::Write, &ops, &mut |i, outcome| {
            written[i] = outcome.map(|()| {
                let w = &writes[i];
                // SAFETY: the caller keeps the block readable and unchanged until the fence completes
                // (see `TierStore::put_to_disk`), so these are the bytes just written.
                let bytes = unsafe { std::slice::from_raw_parts(w.addr as *const u8, self.block_size) };
                block_checksum(&w.key, w.slot, bytes)
            });
        });
        if let Some(remote) = &self.remote {
            for (w, outcome) in writes.iter().zip(&written) {
                if outcome.is_ok() {
                    // SAFETY: as above; the caller's block is readable until the fence completes.
                    remote.offer(w.key, unsafe { std::slice::from_raw_parts(w.addr as *const u8, self.block_size) });
                }
            }
        }
        let dir = self.lock().disk.as_ref().expect("a direct write's store has a disk tier").dir.clone();
        let mut failure: Option<TierError> = None;
        let mut stored: Vec<(BlockKey, DiskEntry)> = Vec::new();
        let mut failed: Vec<DirectWrite> = Vec::new();
        for (w, outcome) in writes.iter().zip(written) {
            match outcome {
                Ok(checksum) => stored.push((w.key, DiskEntry { slot: w.slot, checksum })),
                Err(e) => {
                    failure.get_or_insert_with(|| write_failed(&dir, "writing a block", &e));
                    failed.push(*w);
                }
            }
        }
        if let Err(e) = files.locked().append_unpublished(&stored) {
            // No record, no block: every slot goes back, and the bytes written into them are never
            // read.
            self.abandon_direct(&writes, Some(&e));
            return Err(e.into());
        }

        let mut state = self.lock();
        let state = &mut *state;
        let disk = state.disk.as_mut().expect("a direct write's store has a disk tier");
        let mut published = Vec::new();
        for (key, entry) in &stored {
            disk.storing.remove(key);
            // A DRAM eviction may have written the same key down meanwhile: that copy stays (a reader
            // may hold it) and this slot goes back; the later record of the two wins at replay, and
            // the checksum, which binds the slot, keeps a reused slot from serving the key.
            if disk.blocks.contains_key(key) {
                disk.free.push(entry.slot);
                continue;
            }
            disk.blocks.insert(*key, DiskBlock { entry: *entry, pins: 0 });
            disk.policy.inserted(*key);
            published.push(*key);
        }
        for w in &failed {
            disk.storing.remove(&w.key);
            disk.free.push(w.slot);
        }
        let mut files = disk.log();
        files.published(stored.iter().map(|(k, _)| *k));
        if failure.is_none() && files.needs_compaction(disk.blocks.len()) {
            let live: HashMap<BlockKey, DiskEntry> = disk.blocks.iter().map(|(k, b)| (*k, b.entry)).collect();
            if let Err(e) = files.rewrite(&live) {
                failure = Some(e);
            }
        }
        drop(files);
        if let Some(e) = &failure {
            tracing::warn!("the disk tier stops taking blocks: {e}");
            disk.failed.get_or_insert(e.clone());
        }
        for key in &published {
            if let Some(&index) = state.host.get(key) {
                state.slot(index).on_disk = true;
            }
        }
        state.stats.disk_writes += published.len() as u64;
        state.emit(TierEvent::Stored { keys: published, medium: Medium::Disk });
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Under the lock: the blocks of a direct write that are new to the disk, each with a slot (a
    /// free one or an unpinned victim's, whose removal the caller logs), or as many slots as could
    /// be had when every other block is being read (`short`). `None` when there is nothing to write.
    fn claim_direct(&self, blocks: &[BlockRegions]) -> Result<Option<DirectClaim>> {
        let mut state = self.lock();
        let state = &mut *state;
        let disk = state.disk.as_mut().expect("check_direct refused a store without a disk tier");
        if let Some(e) = &disk.failed {
            return Err(e.clone().into());
        }
        let mut fresh: Vec<(BlockKey, u64)> = Vec::new();
        let mut seen = HashSet::new();
        for (key, regions) in blocks {
            if disk.blocks.contains_key(key) {
                disk.policy.touched(key);
            } else if !disk.storing.contains(key) && seen.insert(*key) {
                fresh.push((*key, regions[0].addr));
            }
        }
        if fresh.is_empty() {
            return Ok(None);
        }
        if fresh.len() > disk.slots as usize {
            let cause = format!("{} blocks do not fit in its {} slots", fresh.len(), disk.slots);
            return Err(TierError::DiskFull { dir: disk.dir.display().to_string(), cause }.into());
        }
        let (mut slots, mut victims) = (Vec::new(), Vec::new());
        while slots.len() < fresh.len() {
            if let Some(slot) = disk.free.pop() {
                slots.push(slot);
                continue;
            }
            let blocks = &disk.blocks;
            let Some(victim) = disk.policy.victim(&mut |k| blocks.get(k).is_some_and(|b| b.pins == 0)) else { break };
            let block = disk.blocks.remove(&victim).expect("the policy names indexed blocks");
            disk.policy.evicted(&victim);
            state.stats.disk_evictions += 1;
            slots.push(block.entry.slot);
            victims.push(victim);
        }
        let short = (slots.len() < fresh.len()).then_some(fresh.len());
        // Slots and keys are claimed even when short, so that the caller logs the victims' removals
        // before any of their slots can be reused, and then gives everything back.
        let writes: Vec<DirectWrite> =
            fresh.iter().zip(&slots).map(|(&(key, addr), &slot)| DirectWrite { key, addr, slot }).collect();
        disk.storing.extend(writes.iter().map(|w| w.key));
        let files = Arc::clone(&disk.files);
        for victim in &victims {
            if let Some(&index) = state.host.get(victim) {
                state.slot(index).on_disk = false;
            }
        }
        state.emit(TierEvent::Removed { keys: victims.clone(), medium: Medium::Disk });
        Ok(Some(DirectClaim { files, writes, victims, short }))
    }

    /// Give back the slots of a direct write that failed before publishing anything; `failure` stops
    /// the disk taking blocks.
    fn abandon_direct(&self, writes: &[DirectWrite], failure: Option<&TierError>) {
        let mut state = self.lock();
        let disk = state.disk.as_mut().expect("a direct write's store has a disk tier");
        for w in writes {
            disk.storing.remove(&w.key);
            disk.free.push(w.slot);
        }
        if let Some(e) = failure {
            tracing::warn!("the disk tier stops taking blocks: {e}");
            disk.failed.get_or_insert(e.clone());
        }
    }

    fn get_from_disk(&self, ring: Option<&mut Ring>, blocks: &[BlockRegions]) -> Result<()> {
        let Some(ring) = ring else { unreachable!("check_direct refused a store without a disk tier") };
        // Made before the lock is taken, so that a return under it drops the lock first.
        let mut pins = Pins::new(self);
        {
            let mut state = self.lock();
            let state = &mut *state;
            let disk = state.disk.as_mut().expect("check_direct refused a store without a disk tier");
            for (key, _) in blocks {
                match disk.blocks.get_mut(key) {
                    Some(block) => {
                        pins.pin_disk(block, *key);
                        disk.policy.touched(key);
                    }
                    None => {
                        state.stats.misses += 1;
                        return Err(TierError::NotCached { key: *key }.into());
                    }
                }
            }
            state.stats.disk_hits += pins.disk.len() as u64;
        }
        let pinned = pins.disk.clone();
        let ops: Vec<IoOp> = blocks
            .iter()
            .zip(&pinned)
            .map(|((_, regions), (_, entry))| IoOp {
                addr: regions[0].addr as usize,
                len: self.block_size,
                offset: entry.slot as u64 * self.block_size as u64,
            })
            .collect();
        let mut verified: Vec<std::result::Result<(), TierError>> = vec![Ok(()); ops.len()];
        ring.run(Direction::Read, &ops, &mut |i, read| {
            let (key, entry) = pinned[i];
            verified[i] = read
                .map_err(|e| TierError::DiskIo { op: format!("reading block {key}"), cause: e.to_string() })
                .and_then(|()| {
                    // SAFETY: the caller keeps the region valid until the fence completes and this
                    // read into it has completed.
                    let bytes = unsafe { std::slice::from_raw_parts(ops[i].addr as *const u8, self.block_size) };
                    if block_checksum(&key, entry.slot, bytes) != entry.checksum {
                        return Err(TierError::BlockCorrupt { key });
                    }
                    Ok(())
                });
        });
        let mut state = self.lock();
        pins.release(&mut state);
        let mut first_error = None;
        let mut dropped = HashSet::new();
        for ((key, _), outcome) in pinned.iter().zip(verified) {
            if let Err(e) = outcome {
                if matches!(e, TierError::BlockCorrupt { .. }) && dropped.insert(*key) {
                    state.drop_corrupt(*key);
                }
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    fn offload(&self, ring: Option<&mut Ring>, keys: &[BlockKey]) -> Result<()> {
        // Made before the lock is taken, so that it is dropped after it.
        let mut victims = Pins::new(self);
        let writes = {
            let mut state = self.lock();
            let state = &mut *state;
            let mut seen = HashSet::new();
            for key in keys {
                let Some(&index) = state.host.get(key) else { continue };
                if !state.slot(index).ready() || !seen.insert(*key) {
                    continue;
                }
                victims.pin_host(state, *key, index);
            }
            self.plan_writes(state, &victims.host, true)
        };
        let written = self.write_down(ring, writes);
        let mut state = self.lock();
        let freed = finish_eviction(&mut state, victims.into_victims(), &written, true);
        state.free.extend(freed);
        match state.disk.as_ref().and_then(|d| d.failed.clone()) {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::mpsc::Receiver;
    use std::time::Duration;

    use super::*;
    use crate::error::ErrorCode;
    use crate::memory::host::{HostAllocOptions, HostBuffer};
    use crate::tier::DiskConfig;

    const BLOCK: usize = 4096;

    fn key(i: u32) -> BlockKey {
        BlockKey::chain(None, &[i], b"")
    }

    /// A DRAM-only state of `slabs` slabs under LRU: the transitions below run on it alone, with no
    /// thread, arena or file.
    fn dram(slabs: usize) -> State {
        State::new(slabs, EvictionPolicy::Lru, AdmissionFilter::new(slabs, 0))
    }

    fn put_into(state: &mut State, ids: &[u32]) -> Vec<(BlockKey, u32)> {
        let keys: Vec<BlockKey> = ids.iter().map(|&i| key(i)).collect();
        let mut claimed = Vec::new();
        assert_eq!(state.claim_free(&keys, &mut claimed), 0);
        state.publish(&claimed);
        claimed
    }

    #[test]
    fn a_claim_is_pinned_and_invisible_until_published() {
        let mut state = dram(2);
        let mut claimed = Vec::new();
        assert_eq!(state.claim_free(&[key(1), key(2), key(3)], &mut claimed), 1, "two slabs for three keys");
        assert_eq!(claimed.len(), 2);
        assert!(state.ready_slab(&key(1)).is_none(), "a claim is not a block yet");
        assert!(state.pin_victims(2).is_empty(), "claims are never victims");
        state.publish(&claimed);
        let index = state.ready_slab(&key(1)).unwrap();
        assert_eq!(state.slots[index as usize].as_ref().map(|s| s.pins), Some(0));
        // A key already in DRAM takes no second slab.
        let mut again = Vec::new();
        assert_eq!(state.claim_free(&[key(1)], &mut again), 0);
        assert!(again.is_empty());
    }

    #[test]
    fn a_released_claim_gives_its_slab_back_and_leaves_no_key() {
        let mut state = dram(1);
        let mut claimed = Vec::new();
        state.claim_free(&[key(7)], &mut claimed);
        assert!(state.free.is_empty());
        state.release_claim(claimed[0].1);
        assert_eq!(state.free.len(), 1);
        assert!(!state.host.contains_key(&key(7)));
        assert_eq!(put_into(&mut state, &[8]).len(), 1, "the slab is claimable again");
    }

    #[test]
    fn a_readers_pins_hold_its_slabs_until_they_are_dropped_or_released() {
        let alloc = crate::memory::host::HostAllocOptions::new().with_pin(false);
        let store = TierStore::open(TierConfig::new(4096, 2 * 4096).with_host_alloc(alloc)).unwrap();
        let shared = &*store.shared;
        put_into(&mut shared.lock(), &[1, 2]);
        let (one, two) = {
            let state = shared.lock();
            (state.ready_slab(&key(1)).unwrap(), state.ready_slab(&key(2)).unwrap())
        };
        let evictable = |index: u32| shared.lock().slot(index).evictable();

        let mut pins = Pins::new(shared);
        pins.pin_host(&mut shared.lock(), key(1), one);
        assert!(!evictable(one) && evictable(two));
        drop(pins);
        assert!(evictable(one), "dropping the pins unpins");

        let mut pins = Pins::new(shared);
        let mut state = shared.lock();
        pins.pin_host(&mut state, key(2), two);
        pins.pin_host(&mut state, key(2), two);
        assert_eq!(state.slot(two).pins, 2, "each reader holds its own pin");
        pins.release(&mut state);
        assert!(state.slot(two).evictable(), "released under the lock already held");
    }

    #[test]
    fn an_eviction_frees_its_victims_unless_a_reader_pinned_one_meanwhile() {
        let mut state = dram(3);
        let (sender, events) = mpsc::channel();
        state.subscribers.push(sender);
        put_into(&mut state, &[1, 2, 3]);
        let victims = state.pin_victims(2);
        assert_eq!(victims.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [key(1), key(2)]);
        // A reader takes block 2 while its eviction writes (nothing, without a disk tier).
        let read = state.ready_slab(&key(2)).unwrap();
        state.slot(read).pins += 1;
        let freed = finish_eviction(&mut state, victims, &[], false);
        assert_eq!(freed.len(), 1, "only the block nobody else held leaves DRAM");
        assert!(state.ready_slab(&key(1)).is_none() && state.ready_slab(&key(2)).is_some());
        assert_eq!(state.stats.host_evictions, 1);
        assert_eq!(state.slot(read).pins, 1, "the eviction gave its own pin back, the reader's stays");
        let removed: Vec<TierEvent> = events.try_iter().filter(|e| matches!(e, TierEvent::Removed { .. })).collect();
        assert_eq!(removed, [TierEvent::Removed { keys: vec![key(1)], medium: Medium::Cpu }]);
    }

    #[test]
    fn victims_come_in_lru_order_and_pinned_blocks_are_skipped() {
        let mut state = dram(3);
        put_into(&mut state, &[1, 2, 3]);
        // Block 1 is the oldest, but a reader holds it.
        let index = state.ready_slab(&key(1)).unwrap();
        state.slot(index).pins += 1;
        let victims = state.pin_victims(1);
        assert_eq!(victims.iter().map(|(k, _)| *k).collect::<Vec<_>>(), [key(2)]);
        // A victim is pinned for its eviction, so the next choice passes it by too.
        assert_eq!(state.pin_victims(1).iter().map(|(k, _)| *k).collect::<Vec<_>>(), [key(3)]);
        assert!(state.pin_victims(1).is_empty(), "every block is pinned now");
        state.slot(index).pins -= 1;
        assert_eq!(state.pin_victims(1).iter().map(|(k, _)| *k).collect::<Vec<_>>(), [key(1)]);
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("kvferry-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn open(dir: &std::path::Path, disk_blocks: usize) -> TierStore {
        let config = TierConfig::new(BLOCK, BLOCK as u64)
            .with_host_alloc(HostAllocOptions::new().with_pin(false))
            .with_disk(DiskConfig::new(dir, (disk_blocks * BLOCK) as u64));
        TierStore::open(config).unwrap()
    }

    /// `count` blocks, block `i` filled with `seed + i`, page-aligned as `O_DIRECT` needs.
    fn buffer(count: usize, seed: u8) -> HostBuffer {
        let buf = HostBuffer::alloc(count * BLOCK, &HostAllocOptions::new().with_pin(false)).unwrap();
        for i in 0..count {
            buf.write_at(i * BLOCK, &[seed.wrapping_add(i as u8); BLOCK]).unwrap();
        }
        buf
    }

    fn blocks(buf: &HostBuffer, ids: &[u32]) -> Vec<BlockRegions> {
        ids.iter()
            .enumerate()
            .map(|(n, &i)| (key(i), vec![MemRegion::host(buf.as_ptr().wrapping_add(n * BLOCK), BLOCK)]))
            .collect()
    }

    fn wait(fence: Result<CopyFence>) -> Result<()> {
        fence?.wait(Deadline::after(Duration::from_secs(30)))
    }

    fn events(receiver: &Receiver<TierEvent>) -> Vec<TierEvent> {
        receiver.try_iter().collect()
    }

    #[test]
    fn a_flushed_remote_has_announced_every_upload_it_waited_for() {
        let dir = temp_dir("remote-events");
        let remote = crate::tier::RemoteConfig::new(crate::tier::RemoteLocation::Path(dir.clone()), "events");
        let config = TierConfig::new(BLOCK, (8 * BLOCK) as u64)
            .with_host_alloc(HostAllocOptions::new().with_pin(false))
            .with_remote(remote);
        let store = TierStore::open(config).unwrap();
        let events_of = store.subscribe();
        for round in 0..8u32 {
            let ids: Vec<u32> = (round * 4..round * 4 + 4).collect();
            let source = buffer(ids.len(), round as u8);
            wait(unsafe { store.put(Arc::new(crate::HostDevice::new().unwrap()), blocks(&source, &ids)) }).unwrap();
            assert!(store.remote().unwrap().flush(Deadline::after(Duration::from_secs(10))));
            let mut announced: Vec<BlockKey> = events(&events_of)
                .into_iter()
                .filter_map(|e| match e {
                    TierEvent::Stored { keys, medium: Medium::Remote } => Some(keys),
                    _ => None,
                })
                .flatten()
                .collect();
            announced.sort();
            let mut expected: Vec<BlockKey> = ids.iter().map(|&i| key(i)).collect();
            expected.sort();
            assert_eq!(announced, expected, "round {round}");
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn uploads_lend_at_most_half_the_arena_and_give_every_slab_back() {
        let dir = temp_dir("remote-leases");
        let remote = || crate::tier::RemoteConfig::new(crate::tier::RemoteLocation::Path(dir.clone()), "leases");
        let open = || {
            let config = TierConfig::new(BLOCK, (8 * BLOCK) as u64)
                .with_host_alloc(HostAllocOptions::new().with_pin(false))
                .with_remote(remote());
            TierStore::open(config).unwrap()
        };
        let (writer, device) = (open(), Arc::new(crate::HostDevice::new().unwrap()));
        let ids: Vec<u32> = (0..8).collect();
        let source = buffer(8, 40);
        wait(unsafe { writer.put(device.clone(), blocks(&source, &ids)) }).unwrap();
        assert!(writer.remote().unwrap().flush(Deadline::after(Duration::from_secs(10))));
        assert_eq!(writer.remote().unwrap().stats().uploads, 8);
        {
            let state = writer.shared.lock();
            assert_eq!(state.leased, 0);
            assert!(state.slots.iter().flatten().all(|slot| slot.pins == 0), "a slab stayed pinned");
        }
        // Half the arena at most; a lease pins its slab against eviction until dropped.
        let indices: Vec<u32> = ids.iter().map(|&i| writer.shared.lock().host[&key(i)]).collect();
        let leases: Vec<Option<SlabLease>> =
            indices.iter().map(|&i| writer.shared.lend(&mut writer.shared.lock(), i)).collect();
        assert_eq!(leases.iter().filter(|l| l.is_some()).count(), 4);
        let pinned = |store: &TierStore| store.shared.lock().slots.iter().flatten().filter(|s| s.pins > 0).count();
        assert_eq!(pinned(&writer), 4);
        drop(leases);
        assert_eq!(pinned(&writer), 0);
        assert_eq!(writer.shared.lock().leased, 0);
        // Every slab can be evicted again: eight new blocks take the whole arena.
        let more: Vec<u32> = (8..16).collect();
        let newer = buffer(8, 90);
        wait(unsafe { writer.put(device.clone(), blocks(&newer, &more)) }).unwrap();
        assert_eq!(writer.lookup(&[key(8)]), vec![Medium::Cpu]);
        assert!(writer.remote().unwrap().flush(Deadline::after(Duration::from_secs(10))));
        drop(writer);
        // Lent or copied, every upload carried its block's bytes.
        let reader = open();
        let back = buffer(8, 0);
        wait(unsafe { reader.get(device.clone(), blocks(&back, &ids)) }).unwrap();
        assert_eq!(unsafe { back.as_slice() }, unsafe { source.as_slice() });
        drop(reader);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn put_to_disk_skips_dram_and_reads_back_byte_exact_into_caller_memory() {
        let dir = temp_dir("direct");
        let store = open(&dir, 8);
        let events_of = store.subscribe();
        let source = buffer(3, 10);
        // SAFETY: `source` outlives the wait.
        wait(unsafe { store.put_to_disk(blocks(&source, &[1, 2, 3])) }).unwrap();
        assert_eq!(store.lookup(&[key(1), key(2), key(3)]), [Medium::Disk; 3]);
        let stats = store.stats();
        assert_eq!((stats.host_blocks, stats.disk_blocks, stats.disk_writes), (0, 3, 3));
        assert_eq!(
            events(&events_of),
            [TierEvent::Stored { keys: vec![key(1), key(2), key(3)], medium: Medium::Disk }]
        );
        // Again: nothing new to write.
        wait(unsafe { store.put_to_disk(blocks(&source, &[1, 2, 3])) }).unwrap();
        assert_eq!(store.stats().disk_writes, 3);

        let dest = buffer(3, 0);
        // SAFETY: `dest` outlives the wait.
        wait(unsafe { store.get_from_disk(blocks(&dest, &[3, 1, 2])) }).unwrap();
        let bytes = dest.to_vec();
        for (n, seed) in [(0, 12u8), (1, 10), (2, 11)] {
            assert!(bytes[n * BLOCK..(n + 1) * BLOCK].iter().all(|&b| b == seed), "block {n}");
        }
        assert_eq!(store.stats().host_blocks, 0, "a direct read promotes nothing");

        // A key not on disk fails before anything is read.
        let missing = unsafe { store.get_from_disk(blocks(&dest, &[1, 9])) };
        assert_eq!(wait(missing).unwrap_err().code(), ErrorCode::TierNotCached);
        drop(store);

        // The blocks and their records survive the store.
        let store = open(&dir, 8);
        assert_eq!(store.lookup(&[key(1), key(2), key(3)]), [Medium::Disk; 3]);
        let dest = buffer(1, 0);
        wait(unsafe { store.get_from_disk(blocks(&dest, &[2])) }).unwrap();
        assert!(dest.to_vec().iter().all(|&b| b == 11));
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn disk_keys_list_what_the_replayed_index_holds() {
        let dir = temp_dir("disk-keys");
        let store = open(&dir, 4);
        assert_eq!(store.disk_keys(), []);
        let source = buffer(3, 30);
        wait(unsafe { store.put_to_disk(blocks(&source, &[3, 1, 2])) }).unwrap();
        // A block only in DRAM is not persisted, so not listed.
        wait(unsafe { store.put(Arc::new(crate::HostDevice::new().unwrap()), blocks(&source, &[7])) }).unwrap();
        assert_eq!(store.lookup(&[key(7)]), [Medium::Cpu]);
        assert_eq!(store.disk_keys(), [key(3), key(1), key(2)], "slot order");
        drop(store);

        let store = open(&dir, 4);
        assert_eq!(store.disk_keys(), [key(3), key(1), key(2)]);
        // The listing follows the tier: an eviction to make room removes its victim.
        let more = buffer(2, 60);
        wait(unsafe { store.put_to_disk(blocks(&more, &[4, 5])) }).unwrap();
        let listed = store.disk_keys();
        assert_eq!(listed.len(), 4);
        assert!(listed.contains(&key(4)) && listed.contains(&key(5)));
        drop(store);
        let store = open(&dir, 4);
        assert_eq!(store.disk_keys().len(), 4);
        store.clear().unwrap();
        assert_eq!(store.disk_keys(), []);
        drop(store);
        assert_eq!(open(&dir, 4).disk_keys(), []);
        let dram_only = TierStore::open(
            TierConfig::new(BLOCK, BLOCK as u64).with_host_alloc(HostAllocOptions::new().with_pin(false)),
        )
        .unwrap();
        assert_eq!(dram_only.disk_keys(), []);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_flipped_byte_on_disk_fails_the_direct_read_and_drops_the_block() {
        let dir = temp_dir("direct-corrupt");
        let store = open(&dir, 4);
        let source = buffer(2, 40);
        wait(unsafe { store.put_to_disk(blocks(&source, &[1, 2])) }).unwrap();
        drop(store);
        // Slots are handed out from the front of the file: block 2 is in slot 1.
        let path = dir.join("blocks.kvf");
        let mut data = std::fs::read(&path).unwrap();
        data[BLOCK + 17] ^= 0x01;
        std::fs::write(&path, &data).unwrap();

        let store = open(&dir, 4);
        let events_of = store.subscribe();
        let dest = buffer(2, 0);
        let read = unsafe { store.get_from_disk(blocks(&dest, &[1, 2])) };
        assert_eq!(wait(read).unwrap_err().code(), ErrorCode::TierBlockCorrupt);
        assert_eq!(store.lookup(&[key(2)]), []);
        assert_eq!(store.lookup(&[key(1)]), [Medium::Disk]);
        assert_eq!(store.stats().corrupt_blocks, 1);
        assert_eq!(events(&events_of), [TierEvent::Removed { keys: vec![key(2)], medium: Medium::Disk }]);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_direct_write_larger_than_the_disk_fails_whole_and_eviction_makes_room_otherwise() {
        let dir = temp_dir("direct-full");
        let store = open(&dir, 2);
        let source = buffer(3, 70);
        let too_big = unsafe { store.put_to_disk(blocks(&source, &[1, 2, 3])) };
        assert_eq!(wait(too_big).unwrap_err().code(), ErrorCode::TierDiskFull);
        assert_eq!(store.lookup(&[key(1)]), []);
        assert_eq!(store.stats().disk_blocks, 0);
        // The tier still takes batches that fit; a full disk evicts its least recent blocks.
        wait(unsafe { store.put_to_disk(blocks(&source, &[1, 2])) }).unwrap();
        let events_of = store.subscribe();
        let third = buffer(1, 99);
        wait(unsafe { store.put_to_disk(blocks(&third, &[3])) }).unwrap();
        assert_eq!(store.lookup(&[key(3)]), [Medium::Disk]);
        assert_eq!(store.stats().disk_evictions, 1);
        assert_eq!(
            events(&events_of),
            [
                TierEvent::Removed { keys: vec![key(1)], medium: Medium::Disk },
                TierEvent::Stored { keys: vec![key(3)], medium: Medium::Disk }
            ]
        );
        let dest = buffer(1, 0);
        wait(unsafe { store.get_from_disk(blocks(&dest, &[3])) }).unwrap();
        assert!(dest.to_vec().iter().all(|&b| b == 99));
        drop(store);
        // The evicted block stays gone after a restart; the slot it had serves the new one.
        let store = open(&dir, 2);
        assert_eq!(store.lookup(&[key(1)]), []);
        assert_eq!(store.lookup(&[key(2)]), [Medium::Disk]);
        assert_eq!(store.lookup(&[key(3)]), [Medium::Disk]);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_direct_write_short_of_unpinned_slots_writes_nothing_and_leaves_no_slot_behind() {
        let dir = temp_dir("direct-pinned");
        let store = open(&dir, 3);
        let source = buffer(3, 20);
        wait(unsafe { store.put_to_disk(blocks(&source, &[1, 2, 3])) }).unwrap();
        // Readers hold blocks 2 and 3 (as a get does while it reads them).
        let pin = |delta: i32| {
            let mut state = store.shared.lock();
            for k in [key(2), key(3)] {
                let block = state.disk.as_mut().unwrap().blocks.get_mut(&k).unwrap();
                block.pins = block.pins.checked_add_signed(delta).unwrap();
            }
        };
        pin(1);
        let events_of = store.subscribe();
        let more = buffer(2, 50);
        let short = unsafe { store.put_to_disk(blocks(&more, &[4, 5])) };
        assert_eq!(wait(short).unwrap_err().code(), ErrorCode::TierNoRoom);
        // Block 1 was evicted for the write (and says so); nothing of the write is found.
        assert_eq!(events(&events_of), [TierEvent::Removed { keys: vec![key(1)], medium: Medium::Disk }]);
        assert_eq!(store.lookup(&[key(4)]), []);
        assert_eq!(store.lookup(&[key(2), key(3)]), [Medium::Disk; 2]);
        {
            let state = store.shared.lock();
            let disk = state.disk.as_ref().unwrap();
            assert!(disk.storing.is_empty());
            assert_eq!(disk.free, [0], "block 1's slot is free again, once");
        }
        pin(-1);
        wait(unsafe { store.put_to_disk(blocks(&more, &[4, 5])) }).unwrap();
        assert_eq!(store.lookup(&[key(4), key(5)]), [Medium::Disk; 2]);
        let dest = buffer(2, 0);
        wait(unsafe { store.get_from_disk(blocks(&dest, &[4, 5])) }).unwrap();
        assert_eq!(dest.to_vec(), more.to_vec());
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn direct_blocks_must_be_one_aligned_host_region_and_need_a_disk() {
        let dir = temp_dir("direct-refused");
        let store = open(&dir, 4);
        let buf = buffer(2, 0);
        let base = buf.as_ptr();
        let code = |blocks: Vec<BlockRegions>| unsafe { store.put_to_disk(blocks) }.err().unwrap().code();
        let split = vec![(
            key(1),
            vec![MemRegion::host(base, BLOCK / 2), MemRegion::host(base.wrapping_add(BLOCK / 2), BLOCK / 2)],
        )];
        assert_eq!(code(split), ErrorCode::TierBadBlock);
        let unaligned = vec![(key(1), vec![MemRegion::host(base.wrapping_add(512), BLOCK)])];
        assert_eq!(code(unaligned), ErrorCode::TierBadBlock);
        let device =
            vec![(key(1), vec![MemRegion { addr: base as u64, len: BLOCK as u64, kind: MemKind::Cuda { device: 0 } }])];
        assert_eq!(code(device), ErrorCode::TierBadBlock);
        drop(store);
        let dram_only = TierStore::open(
            TierConfig::new(BLOCK, BLOCK as u64).with_host_alloc(HostAllocOptions::new().with_pin(false)),
        )
        .unwrap();
        let err = unsafe { dram_only.get_from_disk(blocks(&buf, &[1])) }.err().unwrap();
        assert_eq!(err.code(), ErrorCode::TierConfig);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lookup_answers_while_the_index_log_is_held() {
        let dir = temp_dir("direct-lookup");
        let store = open(&dir, 4);
        let source = buffer(2, 5);
        wait(unsafe { store.put_to_disk(blocks(&source, &[1])) }).unwrap();
        // A direct write appends (and, with sync_writes, fsyncs) holding the log's lock only: hold
        // it as a slow disk would, and lookups must still answer.
        let files = Arc::clone(&store.shared.lock().disk.as_ref().unwrap().files);
        let held = files.locked();
        let write = unsafe { store.put_to_disk(blocks(&source, &[2])) }.unwrap();
        // The write has claimed its slot and waits for the log.
        while !store.shared.lock().disk.as_ref().unwrap().storing.contains(&key(2)) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert_eq!(store.lookup(&[key(1), key(2)]), [Medium::Disk], "block 2 is not findable before its record");
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(write.poll().is_none(), "the write waits for the log");
        drop(held);
        write.wait(Deadline::after(Duration::from_secs(30))).unwrap();
        assert_eq!(store.lookup(&[key(1), key(2)]), [Medium::Disk; 2]);
        drop(store);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
