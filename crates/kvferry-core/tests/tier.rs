//! The tier store against real host memory, a real io_uring and real files; crash and full-disk
//! cases run in child processes (this test binary, started again with `KVFERRY_TIER_CHILD`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvferry_core::memory::host::HostBuffer;
use kvferry_core::memory::{CopyFence, CopyOp, Device, IpcHandle, MemKind, MemRegion, Memory, PinGuard};
use kvferry_core::tier::{BlockKey, DiskConfig, EvictionPolicy, Medium, TierConfig, TierError, TierEvent, TierStore};
use kvferry_core::{Deadline, Error, ErrorCode, HostAllocOptions, HostDevice, Result};

const BLOCK: usize = 4096;
const UNPINNED: HostAllocOptions = HostAllocOptions::new().with_pin(false);

fn deadline() -> Deadline {
    Deadline::after(Duration::from_secs(30))
}

fn key(i: u32) -> BlockKey {
    BlockKey::chain(None, &[i], b"")
}

/// The bytes block `i` holds: different for every block and every offset.
fn pattern(i: u32, len: usize) -> Vec<u8> {
    let mut state = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvferry-tier-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn host() -> Arc<dyn Device> {
    Arc::new(HostDevice::with_threads(1).unwrap())
}

fn config(host_blocks: usize) -> TierConfig {
    TierConfig::new(BLOCK, (host_blocks * BLOCK) as u64).with_host_alloc(UNPINNED)
}

fn disk_config(host_blocks: usize, dir: &Path, disk_blocks: usize) -> TierConfig {
    config(host_blocks).with_disk(DiskConfig::new(dir, (disk_blocks * BLOCK) as u64).with_admit_after(0))
}

/// One buffer holding blocks `ids` in order.
fn source(ids: &[u32]) -> HostBuffer {
    let buf = HostBuffer::alloc(ids.len() * BLOCK, &UNPINNED).unwrap();
    for (n, &i) in ids.iter().enumerate() {
        buf.write_at(n * BLOCK, &pattern(i, BLOCK)).unwrap();
    }
    buf
}

fn blocks_of(buf: &HostBuffer, ids: &[u32]) -> Vec<(BlockKey, Vec<MemRegion>)> {
    ids.iter()
        .enumerate()
        .map(|(n, &i)| (key(i), vec![MemRegion::host(buf.as_ptr().wrapping_add(n * BLOCK), BLOCK)]))
        .collect()
}

fn put(store: &TierStore, ids: &[u32]) -> Result<()> {
    let buf = source(ids);
    // SAFETY: `buf` outlives the wait.
    unsafe { store.put(host(), blocks_of(&buf, ids)) }?.wait(deadline())
}

/// Move blocks `ids` down to disk and wait for it.
fn offload(store: &TierStore, ids: &[u32]) {
    store.offload(ids.iter().map(|&i| key(i)).collect()).unwrap().wait(deadline()).unwrap();
}

/// Get blocks `ids` and check every byte.
fn get_exact(store: &TierStore, ids: &[u32]) -> Result<()> {
    let out = HostBuffer::alloc(ids.len() * BLOCK, &UNPINNED).unwrap();
    // SAFETY: `out` outlives the wait.
    unsafe { store.get(host(), blocks_of(&out, ids)) }?.wait(deadline())?;
    let bytes = out.to_vec();
    for (n, &i) in ids.iter().enumerate() {
        assert!(bytes[n * BLOCK..(n + 1) * BLOCK] == pattern(i, BLOCK)[..], "block {i} came back different");
    }
    Ok(())
}

fn lookup(store: &TierStore, ids: &[u32]) -> Vec<Medium> {
    store.lookup(&ids.iter().map(|&i| key(i)).collect::<Vec<_>>())
}

fn drain(receiver: &mpsc::Receiver<TierEvent>) -> Vec<TierEvent> {
    receiver.try_iter().collect()
}

fn code<T>(result: Result<T>) -> ErrorCode {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.code(),
    }
}

#[test]
fn host_tier_round_trips_blocks_byte_exact_and_reports_the_longest_prefix() {
    let store = TierStore::open(config(8)).unwrap();
    let events = store.subscribe();
    put(&store, &[0, 1, 2]).unwrap();
    get_exact(&store, &[2, 0, 1]).unwrap();
    assert_eq!(lookup(&store, &[0, 1, 2, 3]), [Medium::Cpu; 3]);
    assert_eq!(lookup(&store, &[0, 5, 2]), [Medium::Cpu]);
    assert!(lookup(&store, &[5, 0]).is_empty());
    assert_eq!(drain(&events), [TierEvent::Stored { keys: vec![key(0), key(1), key(2)], medium: Medium::Cpu }]);
    assert_eq!(Medium::Cpu.as_str(), "CPU");
    assert_eq!(Medium::Disk.to_string(), "DISK");
    assert_eq!(Medium::Gpu.as_str(), "GPU");

    // Blocks split over several regions (one per layer, say) are gathered and scattered.
    let buf = source(&[7]);
    let half = BLOCK / 2;
    let split = vec![(
        key(7),
        vec![MemRegion::host(buf.as_ptr().wrapping_add(half), half), MemRegion::host(buf.as_ptr(), half)],
    )];
    unsafe { store.put(host(), split.clone()) }.unwrap().wait(deadline()).unwrap();
    let out = HostBuffer::alloc(BLOCK, &UNPINNED).unwrap();
    let gather = vec![(
        key(7),
        vec![MemRegion::host(out.as_ptr().wrapping_add(half), half), MemRegion::host(out.as_ptr(), half)],
    )];
    unsafe { store.get(host(), gather) }.unwrap().wait(deadline()).unwrap();
    assert_eq!(out.to_vec(), pattern(7, BLOCK));

    // Putting a cached block again is a no-op; the store's stats count what it holds.
    put(&store, &[0]).unwrap();
    let stats = store.stats();
    assert_eq!((stats.host_blocks, stats.host_capacity_blocks, stats.host_hits), (4, 8, 4));
}

#[test]
fn bad_requests_are_typed_errors_and_change_nothing() {
    let store = TierStore::open(config(4)).unwrap();
    put(&store, &[1]).unwrap();
    let buf = source(&[2]);
    let short = vec![(key(2), vec![MemRegion::host(buf.as_ptr(), BLOCK - 1)])];
    assert_eq!(code(unsafe { store.put(host(), short) }), ErrorCode::TierBadBlock);
    let wrapping = vec![(key(2), vec![MemRegion { addr: u64::MAX - 10, len: BLOCK as u64, kind: MemKind::Host }])];
    assert_eq!(code(unsafe { store.put(host(), wrapping) }), ErrorCode::TierBadBlock);
    // A missing block fails the get and names the key.
    let out = HostBuffer::alloc(2 * BLOCK, &UNPINNED).unwrap();
    let err = unsafe { store.get(host(), blocks_of(&out, &[1, 9])) }.unwrap().wait(deadline()).unwrap_err();
    assert!(matches!(&err, Error::Tier(TierError::NotCached { key: k }) if *k == key(9)), "{err}");
    // Invalid copies are the device's error, and the slabs claimed for them are given back.
    let null = vec![(key(3), vec![MemRegion { addr: 0, len: BLOCK as u64, kind: MemKind::Host }])];
    let err = unsafe { store.put(host(), null) }.unwrap().wait(deadline()).unwrap_err();
    assert_eq!(err.code(), ErrorCode::InvalidCopy);
    assert!(lookup(&store, &[3]).is_empty());
    get_exact(&store, &[1]).unwrap();
    put(&store, &[4, 5, 6]).unwrap();
    assert_eq!(store.stats().host_blocks, 4);

    for bad in [TierConfig::new(0, 4096), TierConfig::new(4096, 4095), config(1).with_workers(0)] {
        assert_eq!(code(TierStore::open(bad)), ErrorCode::TierConfig);
    }
    let unaligned = TierConfig::new(1000, 10_000).with_disk(DiskConfig::new(temp_dir("unaligned"), 1 << 20));
    assert_eq!(code(TierStore::open(unaligned)), ErrorCode::TierConfig);
}

#[test]
fn lru_evicts_the_least_recently_used_block() {
    let store = TierStore::open(config(4)).unwrap();
    let events = store.subscribe();
    put(&store, &[0, 1, 2, 3]).unwrap();
    get_exact(&store, &[0]).unwrap();
    put(&store, &[4]).unwrap();
    assert_eq!(lookup(&store, &[0]), [Medium::Cpu]);
    assert!(lookup(&store, &[1]).is_empty());
    put(&store, &[5, 6]).unwrap();
    // 2 and 3 were next oldest; 0 (hit) survives.
    assert_eq!(lookup(&store, &[0]), [Medium::Cpu]);
    assert!(lookup(&store, &[2]).is_empty() && lookup(&store, &[3]).is_empty());
    let removed: Vec<BlockKey> = drain(&events)
        .into_iter()
        .flat_map(|e| match e {
            TierEvent::Removed { keys, medium: Medium::Cpu } => keys,
            _ => vec![],
        })
        .collect();
    assert_eq!(removed, [key(1), key(2), key(3)]);
    assert_eq!(store.stats().host_evictions, 3);
}

#[test]
fn arc_keeps_hit_blocks_through_a_scan() {
    let store = TierStore::open(config(4).with_policy(EvictionPolicy::Arc)).unwrap();
    put(&store, &[0, 1]).unwrap();
    get_exact(&store, &[0, 1]).unwrap();
    for i in 100..120 {
        put(&store, &[i]).unwrap();
    }
    assert_eq!(lookup(&store, &[0, 1]), [Medium::Cpu, Medium::Cpu]);
    assert_eq!(store.stats().host_blocks, 4);
}

/// A host device whose copies wait until the test opens a gate: a read that stays in flight.
struct GatedDevice {
    inner: HostDevice,
    gate: Mutex<mpsc::Receiver<()>>,
    entered: Mutex<mpsc::Sender<()>>,
}

impl Device for GatedDevice {
    fn name(&self) -> String {
        "gated".into()
    }
    fn kind(&self) -> MemKind {
        MemKind::Host
    }
    fn alloc(&self, len: usize) -> Result<Arc<dyn Memory>> {
        self.inner.alloc(len)
    }
    fn pin_host(&self, region: MemRegion) -> Result<PinGuard> {
        self.inner.pin_host(region)
    }
    unsafe fn copy_batch(&self, ops: &[CopyOp]) -> Result<CopyFence> {
        self.entered.lock().unwrap().send(()).unwrap();
        self.gate.lock().unwrap().recv_timeout(Duration::from_secs(30)).unwrap();
        // SAFETY: forwarded from our caller.
        unsafe { self.inner.copy_batch(ops) }
    }
    fn export_ipc(&self, region: MemRegion) -> Result<IpcHandle> {
        self.inner.export_ipc(region)
    }
    fn import_ipc(&self, handle: &IpcHandle) -> Result<Arc<dyn Memory>> {
        self.inner.import_ipc(handle)
    }
}

#[test]
fn a_block_being_read_is_never_evicted() {
    let store = TierStore::open(config(2).with_workers(2)).unwrap();
    put(&store, &[0, 1]).unwrap();
    let (open, gate) = mpsc::channel();
    let (entered, inside) = mpsc::channel();
    let gated: Arc<dyn Device> = Arc::new(GatedDevice {
        inner: HostDevice::with_threads(1).unwrap(),
        gate: Mutex::new(gate),
        entered: Mutex::new(entered),
    });
    let out = HostBuffer::alloc(BLOCK, &UNPINNED).unwrap();
    // Block 0 is the oldest, so LRU would evict it first, but the read pins it.
    let reading = unsafe { store.get(gated, blocks_of(&out, &[0])) }.unwrap();
    inside.recv_timeout(Duration::from_secs(30)).unwrap();
    put(&store, &[2]).unwrap();
    assert_eq!(lookup(&store, &[0]), [Medium::Cpu]);
    assert!(lookup(&store, &[1]).is_empty());
    // With block 0 pinned and 2 the only other, two new blocks cannot both fit.
    let err = put(&store, &[3, 4]).unwrap_err();
    assert!(matches!(err, Error::Tier(TierError::NoRoom { medium: Medium::Cpu, .. })), "{err}");
    assert_eq!(lookup(&store, &[0]), [Medium::Cpu]);
    open.send(()).unwrap();
    reading.wait(deadline()).unwrap();
    assert_eq!(out.to_vec(), pattern(0, BLOCK));
    // Unpinned, it is evictable again.
    put(&store, &[3, 4]).unwrap();
    assert!(lookup(&store, &[0]).is_empty());
    assert!(store.stats().host_blocks <= 2);
}

#[test]
fn evicted_blocks_go_to_disk_and_disk_hits_are_promoted() {
    let dir = temp_dir("promote");
    let store = TierStore::open(disk_config(2, &dir, 16)).unwrap();
    let events = store.subscribe();
    put(&store, &[0, 1]).unwrap();
    put(&store, &[2, 3]).unwrap();
    assert_eq!(lookup(&store, &[0, 1, 2, 3]), [Medium::Disk, Medium::Disk, Medium::Cpu, Medium::Cpu]);
    let seen = drain(&events);
    assert!(
        seen.contains(&TierEvent::Moved { keys: vec![key(0), key(1)], from: Medium::Cpu, to: Medium::Disk }),
        "{seen:?}"
    );

    get_exact(&store, &[0]).unwrap();
    assert_eq!(lookup(&store, &[0])[0], Medium::Cpu);
    let seen = drain(&events);
    assert!(seen.contains(&TierEvent::Stored { keys: vec![key(0)], medium: Medium::Cpu }), "{seen:?}");
    // Block 2 was the oldest in DRAM; it went to disk to make room for the promotion.
    assert_eq!(lookup(&store, &[2])[0], Medium::Disk);
    let stats = store.stats();
    assert_eq!((stats.disk_hits, stats.host_blocks, stats.disk_blocks), (1, 2, 3));

    // A promoted block keeps its disk copy, so evicting it again writes nothing.
    let writes = stats.disk_writes;
    put(&store, &[4, 5]).unwrap();
    assert_eq!(lookup(&store, &[0])[0], Medium::Disk);
    assert_eq!(store.stats().disk_writes, writes + 1);
    // A get needing more DRAM than there is fails whole.
    assert_eq!(code(get_exact(&store, &[0, 1, 2, 3, 4, 5])), ErrorCode::TierNoRoom);
    get_exact(&store, &[0, 1]).unwrap();
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_admission_filter_keeps_one_hit_blocks_off_disk() {
    let dir = temp_dir("admission");
    let store =
        TierStore::open(config(2).with_disk(DiskConfig::new(&dir, 16 * BLOCK as u64).with_admit_after(2))).unwrap();
    put(&store, &[0, 1]).unwrap();
    get_exact(&store, &[0]).unwrap();
    put(&store, &[2, 3]).unwrap();
    // 0 was seen twice (put, hit) and went to disk; 1 was seen once and is gone.
    assert_eq!(lookup(&store, &[0]), [Medium::Disk]);
    assert!(lookup(&store, &[1]).is_empty());
    assert_eq!(store.stats().not_admitted, 1);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn capacity_is_never_exceeded() {
    let dir = temp_dir("capacity");
    let store = TierStore::open(disk_config(4, &dir, 8).with_policy(EvictionPolicy::Arc)).unwrap();
    let mut random = [0u8; 600];
    getrandom::fill(&mut random).unwrap();
    for pair in random.chunks(2) {
        let i = (pair[0] % 24) as u32;
        if pair[1] % 3 == 0 && !lookup(&store, &[i]).is_empty() {
            get_exact(&store, &[i]).unwrap();
        } else {
            put(&store, &[i, i + 100]).unwrap();
        }
        let stats = store.stats();
        assert!(stats.host_blocks <= 4 && stats.disk_blocks <= 8, "{stats:?}");
    }
    let stats = store.stats();
    assert!(stats.disk_evictions > 0 && stats.host_evictions > 0, "{stats:?}");
    assert_eq!(std::fs::metadata(dir.join("blocks.kvf")).unwrap().len(), 8 * BLOCK as u64);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn restart_keeps_the_disk_tier_byte_exact() {
    let dir = temp_dir("restart");
    let ids: Vec<u32> = (0..12).collect();
    {
        let store = TierStore::open(disk_config(4, &dir, 32)).unwrap();
        // A batch larger than DRAM cannot be staged there.
        assert_eq!(code(put(&store, &ids)), ErrorCode::TierNoRoom);
        for chunk in ids.chunks(4) {
            put(&store, chunk).unwrap();
        }
        offload(&store, &ids);
        assert_eq!(store.stats().host_blocks, 0);
    }
    for round in 0..2 {
        let store = TierStore::open(disk_config(4, &dir, 32)).unwrap();
        assert_eq!(store.stats().disk_blocks, 12, "round {round}");
        assert_eq!(lookup(&store, &ids), vec![Medium::Disk; 12]);
        for chunk in ids.chunks(3) {
            get_exact(&store, chunk).unwrap();
        }
    }
    // Opening with another geometry is refused rather than misreading the slots.
    assert_eq!(code(TierStore::open(disk_config(4, &dir, 64))), ErrorCode::TierIndexMismatch);
    // Clearing empties both tiers, for good.
    let store = TierStore::open(disk_config(4, &dir, 32)).unwrap();
    get_exact(&store, &[0]).unwrap();
    store.clear().unwrap();
    assert!(lookup(&store, &[0]).is_empty() && lookup(&store, &[1]).is_empty());
    drop(store);
    let store = TierStore::open(disk_config(4, &dir, 32)).unwrap();
    assert_eq!(store.stats().disk_blocks, 0);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Flip one byte of every block in the data file (written through the page cache, not O_DIRECT).
fn corrupt_data_file(dir: &Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("blocks.kvf")).unwrap();
    let len = file.metadata().unwrap().len();
    for at in (100..len).step_by(BLOCK) {
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    }
    file.sync_all().unwrap();
}

#[test]
fn a_corrupt_block_is_dropped_and_never_served() {
    let dir = temp_dir("corrupt");
    {
        let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
        put(&store, &[0, 1]).unwrap();
        offload(&store, &[0, 1]);
    }
    corrupt_data_file(&dir);
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    let events = store.subscribe();
    put(&store, &[5]).unwrap();
    let err = get_exact(&store, &[0]).unwrap_err();
    assert!(matches!(&err, Error::Tier(TierError::BlockCorrupt { key: k }) if *k == key(0)), "{err}");
    assert!(lookup(&store, &[0]).is_empty());
    assert!(drain(&events).contains(&TierEvent::Removed { keys: vec![key(0)], medium: Medium::Disk }));
    assert_eq!(code(get_exact(&store, &[1])), ErrorCode::TierBlockCorrupt);
    assert_eq!(store.stats().corrupt_blocks, 2);
    // DRAM hits are unaffected.
    get_exact(&store, &[5]).unwrap();
    drop(store);
    // The drop was logged: the next open does not list the blocks.
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    assert_eq!(store.stats().disk_blocks, 0);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_damaged_index_is_a_typed_error_and_a_torn_tail_is_dropped() {
    let dir = temp_dir("index");
    let log = dir.join("index.kvf");
    let write_blocks = |ids: &[u32]| {
        let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
        put(&store, ids).unwrap();
        offload(&store, ids);
    };
    write_blocks(&[0, 1, 2]);
    let good = std::fs::read(&log).unwrap();

    // A torn last record (a crash mid-append) costs that record only.
    std::fs::write(&log, &good[..good.len() - 20]).unwrap();
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    let stats = store.stats();
    assert_eq!((stats.disk_blocks, stats.torn_records), (2, 1));
    drop(store);

    write_blocks(&[3, 4, 5]);
    let good = std::fs::read(&log).unwrap();
    // Damage in the middle of the log is not a crash: refuse rather than guess.
    let mut damaged = good.clone();
    damaged[32 + 64 + 10] ^= 1;
    std::fs::write(&log, &damaged).unwrap();
    assert_eq!(code(TierStore::open(disk_config(4, &dir, 8))), ErrorCode::TierIndexCorrupt);
    std::fs::write(&log, b"not an index at all, just some text").unwrap();
    assert_eq!(code(TierStore::open(disk_config(4, &dir, 8))), ErrorCode::TierIndexCorrupt);
    // A DRAM-only store opens regardless and serves.
    let store = TierStore::open(config(4)).unwrap();
    put(&store, &[1]).unwrap();
    get_exact(&store, &[1]).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The index log's layout (docs/tier.md): a 32-byte header, then 64-byte records of kind (u8), key
/// length (u8), slot (u32 le at 4), key (at 8), checksum (u64 le at 40), CRC32 of bytes 0..60 (at 60).
const LOG_HEADER: usize = 32;
const LOG_RECORD: usize = 64;

fn log_records(log: &[u8]) -> Vec<[u8; LOG_RECORD]> {
    log[LOG_HEADER..].chunks(LOG_RECORD).map(|r| r.try_into().unwrap()).collect()
}

/// Where block `i`'s record is among `records`.
fn record_of(records: &[[u8; LOG_RECORD]], i: u32) -> usize {
    records.iter().position(|r| &r[8..8 + r[1] as usize] == key(i).as_bytes()).expect("a record for the block")
}

/// Give a crafted record (or header) a valid CRC, as the store writes it.
fn seal(bytes: &mut [u8]) {
    let end = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..end]);
    bytes[end..].copy_from_slice(&crc.to_le_bytes());
}

/// Blocks 0, 1, 2 on disk in `dir`, and the store closed.
fn three_blocks_on_disk(dir: &Path) {
    let store = TierStore::open(disk_config(4, dir, 8)).unwrap();
    put(&store, &[0, 1, 2]).unwrap();
    offload(&store, &[0, 1, 2]);
}

/// A CRC-valid record naming block 0's key with block 1's slot and checksum.
fn block_0_pointed_at_block_1(records: &[[u8; LOG_RECORD]]) -> [u8; LOG_RECORD] {
    let (a, b) = (records[record_of(records, 0)], records[record_of(records, 1)]);
    assert_ne!(a[4..8], b[4..8], "the blocks share a slot");
    let mut forged = a;
    forged[4..8].copy_from_slice(&b[4..8]);
    forged[40..48].copy_from_slice(&b[40..48]);
    seal(&mut forged);
    forged
}

#[test]
fn a_record_pointed_at_another_block_never_serves_it() {
    let dir = temp_dir("repoint");
    let log = dir.join("index.kvf");
    three_blocks_on_disk(&dir);
    let good = std::fs::read(&log).unwrap();
    let forged = block_0_pointed_at_block_1(&log_records(&good));

    // Appended last, the forged record owns block 1's slot at replay (a later store into a slot
    // overwrote what was there), so block 0 is listed there; its read must fail the checksum, which
    // covers the key, rather than hand out block 1's bytes.
    std::fs::write(&log, [&good[..], &forged[..]].concat()).unwrap();
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    let events = store.subscribe();
    assert_eq!(lookup(&store, &[0]), [Medium::Disk]);
    let out = HostBuffer::alloc(BLOCK, &UNPINNED).unwrap();
    // SAFETY: `out` outlives the wait.
    let err = unsafe { store.get(host(), blocks_of(&out, &[0])) }.unwrap().wait(deadline()).unwrap_err();
    assert!(matches!(&err, Error::Tier(TierError::BlockCorrupt { key: k }) if *k == key(0)), "{err}");
    assert_eq!(err.code(), ErrorCode::TierBlockCorrupt);
    assert!(out.to_vec() != pattern(1, BLOCK), "block 1's bytes were served as block 0");
    assert_eq!(store.stats().corrupt_blocks, 1);
    assert!(lookup(&store, &[0]).is_empty());
    assert!(drain(&events).contains(&TierEvent::Removed { keys: vec![key(0)], medium: Medium::Disk }));
    // Block 1 lost its slot to the forged record; the others keep being served.
    assert!(lookup(&store, &[1]).is_empty());
    get_exact(&store, &[2]).unwrap();
    drop(store);
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    assert_eq!((store.stats().disk_blocks, lookup(&store, &[0])), (1, vec![]));
    get_exact(&store, &[2]).unwrap();
    drop(store);

    // First in the log (in place of block 0's own record), the forged record loses the slot to block
    // 1's record at replay: block 0 is a miss, block 1 comes back byte-exact.
    std::fs::remove_dir_all(&dir).unwrap();
    three_blocks_on_disk(&dir);
    let good = std::fs::read(&log).unwrap();
    let records = log_records(&good);
    let forged = block_0_pointed_at_block_1(&records);
    let a = record_of(&records, 0);
    let mut bytes = good[..LOG_HEADER].to_vec();
    bytes.extend_from_slice(&forged);
    records.iter().enumerate().filter(|(i, _)| *i != a).for_each(|(_, r)| bytes.extend_from_slice(r));
    std::fs::write(&log, bytes).unwrap();
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    assert!(lookup(&store, &[0]).is_empty());
    let err = get_exact(&store, &[0]).unwrap_err();
    assert!(matches!(&err, Error::Tier(TierError::NotCached { key: k }) if *k == key(0)), "{err}");
    get_exact(&store, &[1, 2]).unwrap();
    assert_eq!(store.stats().corrupt_blocks, 0);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_index_in_the_previous_format_is_discarded() {
    let dir = temp_dir("format-1");
    let log = dir.join("index.kvf");
    three_blocks_on_disk(&dir);
    // The same log as format 1 wrote it: its checksums covered the bytes only.
    let mut old = std::fs::read(&log).unwrap();
    assert_eq!(&old[..8], b"KVFIDX02");
    old[..8].copy_from_slice(b"KVFIDX01");
    seal(&mut old[..LOG_HEADER]);
    std::fs::write(&log, &old).unwrap();
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    assert_eq!(store.stats().disk_blocks, 0);
    assert!(lookup(&store, &[0]).is_empty() && lookup(&store, &[1]).is_empty());
    // The log was rewritten in the current format, and the disk tier works as before.
    let rewritten = std::fs::read(&log).unwrap();
    assert_eq!((rewritten.len(), &rewritten[..8]), (LOG_HEADER, &b"KVFIDX02"[..]));
    put(&store, &[5]).unwrap();
    offload(&store, &[5]);
    drop(store);
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    assert_eq!(store.stats().disk_blocks, 1);
    get_exact(&store, &[5]).unwrap();
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unusable_directory_is_a_typed_error() {
    let dir = temp_dir("unusable");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    // A path through a regular file cannot become a directory, whoever we run as.
    let err = TierStore::open(disk_config(4, &file.join("tier"), 8)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::TierDiskUnavailable, "{err}");
    assert!(err.to_string().contains("a-file"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// What a child process does, chosen by `KVFERRY_TIER_CHILD=<mode>:<dir>`.
#[test]
#[ignore = "the entry point of the child processes that the crash and full-disk tests start"]
fn child_process_entry() {
    let spec = std::env::var("KVFERRY_TIER_CHILD").expect("run only as a child, with KVFERRY_TIER_CHILD set");
    let (mode, dir) = spec.split_once(':').unwrap();
    let dir = PathBuf::from(dir);
    match mode {
        "writer" => writer_child(&dir),
        "full-disk" => full_disk_child(&dir),
        other => panic!("unknown child mode {other}"),
    }
}

fn spawn_child(mode: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_process_entry", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("KVFERRY_TIER_CHILD", format!("{mode}:{}", dir.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

const KILL_DISK_BLOCKS: usize = 64;

/// Puts and offloads blocks forever (the disk tier is small, so slots are reused all the time),
/// printing each batch's first id once it is on disk.
fn writer_child(dir: &Path) {
    use std::io::Write;
    let store = TierStore::open(disk_config(8, dir, KILL_DISK_BLOCKS)).unwrap();
    let mut next = getrandom::u32().unwrap() % (1 << 24) * 4;
    loop {
        let ids: Vec<u32> = (next..next + 4).collect();
        put(&store, &ids).unwrap();
        offload(&store, &ids);
        println!("stored {next}");
        std::io::stdout().flush().unwrap();
        next += 4;
    }
}

#[test]
fn killed_writer_leaves_only_intact_blocks() {
    use std::io::BufRead;
    let dir = temp_dir("kill");
    for round in 0..5 {
        let mut child = spawn_child("writer", &dir);
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        // The test harness prints its own lines too.
        let mut next_line = || -> u32 {
            loop {
                let line = lines.next().expect("the writer exited").unwrap();
                if let Some(id) = line.strip_prefix("stored ") {
                    return id.parse().unwrap();
                }
            }
        };
        // Let it get some way, then kill it at a random point of its loop.
        let first = next_line();
        let reported = 1 + getrandom::u32().unwrap() % 40;
        for _ in 1..reported {
            next_line();
        }
        std::thread::sleep(Duration::from_micros(getrandom::u32().unwrap() as u64 % 3000));
        child.kill().unwrap();
        child.wait().unwrap();

        let store = TierStore::open(disk_config(8, &dir, KILL_DISK_BLOCKS)).unwrap();
        let stats = store.stats();
        assert!(stats.disk_blocks > 0 && stats.disk_blocks <= KILL_DISK_BLOCKS, "round {round}: {stats:?}");
        // The child may have run ahead of what it reported by a pipe's worth of lines.
        let ahead = 4 * (reported + 8192);
        let (mut listed, mut served) = (0, 0);
        for i in first..first + ahead {
            if lookup(&store, &[i]).is_empty() {
                continue;
            }
            listed += 1;
            // Every block the index lists comes back byte-exact or is refused as corrupt; never torn.
            match get_exact(&store, &[i]) {
                Ok(()) => served += 1,
                Err(e) => assert_eq!(e.code(), ErrorCode::TierBlockCorrupt, "round {round}, block {i}: {e}"),
            }
        }
        // Blocks from earlier rounds may still be there; this round's are found by id.
        assert!(listed > 0 && listed <= KILL_DISK_BLOCKS, "round {round}: listed {listed}");
        assert!(served > 0, "round {round}: nothing survived");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Under a file size limit of the data file's size: the index log soon cannot grow, which the disk
/// tier must report as full while DRAM keeps serving.
fn full_disk_child(dir: &Path) {
    let data_len = (16 * BLOCK) as u64;
    // SAFETY: plain libc calls; a write past the limit then fails with EFBIG instead of killing us.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit { rlim_cur: data_len, rlim_max: data_len };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
    let too_big = TierStore::open(disk_config(4, &dir.join("big"), 32)).unwrap_err();
    assert_eq!(too_big.code(), ErrorCode::TierDiskFull, "{too_big}");

    let store = TierStore::open(disk_config(4, dir, 16)).unwrap();
    let mut failure = None;
    for i in 0..2000 {
        put(&store, &[i]).unwrap();
        if let Err(e) = store.offload(vec![key(i)]).unwrap().wait(deadline()) {
            failure = Some((i, e));
            break;
        }
    }
    let (at, err) = failure.expect("the index log never hit the size limit");
    assert_eq!(err.code(), ErrorCode::TierDiskFull, "{err}");
    assert!(store.stats().disk_failure.is_some());
    // Blocks on disk are still served; DRAM takes and serves new blocks.
    get_exact(&store, &[at - 1]).unwrap();
    put(&store, &[100_000, 100_001]).unwrap();
    get_exact(&store, &[100_000, 100_001]).unwrap();
    // Eviction now drops blocks instead of writing them.
    put(&store, &[100_002, 100_003, 100_004]).unwrap();
    assert_eq!(store.stats().host_blocks, 4);
    println!("full-disk child ok");
}

#[test]
fn a_full_disk_is_a_typed_error_and_dram_keeps_serving() {
    let dir = temp_dir("full");
    let output = spawn_child("full-disk", &dir).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("full-disk child ok"), "child failed: {stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn engine_hash_keys_survive_a_restart() {
    let dir = temp_dir("engine-keys");
    let engine_key = |i: u8| BlockKey::from_engine_hash(&[i; 32]).unwrap();
    let buf = source(&[40, 41]);
    let blocks: Vec<_> = (0..2)
        .map(|n| (engine_key(n as u8), vec![MemRegion::host(buf.as_ptr().wrapping_add(n * BLOCK), BLOCK)]))
        .collect();
    {
        let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
        unsafe { store.put(host(), blocks.clone()) }.unwrap().wait(deadline()).unwrap();
        store.offload(vec![engine_key(0), engine_key(1)]).unwrap().wait(deadline()).unwrap();
    }
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    assert_eq!(store.lookup(&[engine_key(0), engine_key(1), engine_key(2)]), [Medium::Disk, Medium::Disk]);
    let out = HostBuffer::alloc(2 * BLOCK, &UNPINNED).unwrap();
    let targets: Vec<_> = (0..2)
        .map(|n| (engine_key(n as u8), vec![MemRegion::host(out.as_ptr().wrapping_add(n * BLOCK), BLOCK)]))
        .collect();
    unsafe { store.get(host(), targets) }.unwrap().wait(deadline()).unwrap();
    assert_eq!(out.to_vec(), buf.to_vec());
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn concurrent_puts_and_gets_stay_byte_exact_within_capacity() {
    let dir = temp_dir("concurrent");
    let store = Arc::new(TierStore::open(disk_config(8, &dir, 16).with_workers(3)).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let mut random = [0u8; 400];
                getrandom::fill(&mut random).unwrap();
                let (mut served, mut stats) = (0, store.stats());
                for pair in random.chunks(2) {
                    let ids = [(pair[0] % 32) as u32, (pair[0] % 32 + 1 + t) as u32 % 32];
                    let outcome = if pair[1] % 2 == 0 { put(&store, &ids) } else { get_exact(&store, &ids) };
                    match outcome {
                        Ok(()) => served += 1,
                        // Another thread may evict a block between the lookup and the copy, or pin
                        // every slab for a moment.
                        Err(e) => assert!(
                            matches!(e.code(), ErrorCode::TierNotCached | ErrorCode::TierNoRoom),
                            "thread {t}: {e}"
                        ),
                    }
                    stats = store.stats();
                    assert!(stats.host_blocks <= 8 && stats.disk_blocks <= 16, "{stats:?}");
                }
                (served, stats)
            })
        })
        .collect();
    for thread in threads {
        let (served, _) = thread.join().unwrap();
        assert!(served > 0);
    }
    // Everything the store lists afterwards is intact.
    for i in 0..32 {
        if !lookup(&store, &[i]).is_empty() {
            get_exact(&store, &[i]).unwrap();
        }
    }
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_index_log_is_compacted_while_running() {
    let dir = temp_dir("compaction");
    let log_len = || std::fs::metadata(dir.join("index.kvf")).unwrap().len();
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    let mut largest = 0;
    // Each offload into the full disk logs two records (a removal, a store): 10,000 in all.
    for i in 0..5000 {
        put(&store, &[i]).unwrap();
        offload(&store, &[i]);
        largest = largest.max(log_len());
    }
    // The log never holds more than the compaction threshold (4 × 8 live + 4096) and a batch.
    assert!(largest <= 32 + (4 * 8 + 4096 + 2) * 64, "the log grew to {largest} bytes");
    drop(store);
    let store = TierStore::open(disk_config(4, &dir, 8)).unwrap();
    assert_eq!(store.stats().disk_blocks, 8);
    for chunk in (4992..5000).collect::<Vec<_>>().chunks(4) {
        get_exact(&store, chunk).unwrap();
    }
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_clear_names_the_blocks_it_forgets_and_then_that_the_store_is_empty() {
    let dir = temp_dir("clear-events");
    let store = TierStore::open(disk_config(2, &dir, 8)).unwrap();
    let events = store.subscribe();
    put(&store, &[0, 1]).unwrap();
    offload(&store, &[0]);
    drain(&events);
    store.clear().unwrap();
    assert_eq!(
        drain(&events),
        [
            TierEvent::Removed { keys: vec![key(1)], medium: Medium::Cpu },
            TierEvent::Removed { keys: vec![key(0)], medium: Medium::Disk },
            TierEvent::Cleared,
        ]
    );
    // An empty store's clear forgets nothing, and still says the store is empty.
    store.clear().unwrap();
    assert_eq!(drain(&events), [TierEvent::Cleared]);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();

    let store = TierStore::open(config(4)).unwrap();
    let events = store.subscribe();
    put(&store, &[3]).unwrap();
    store.clear().unwrap();
    assert_eq!(
        drain(&events)[1..],
        [TierEvent::Removed { keys: vec![key(3)], medium: Medium::Cpu }, TierEvent::Cleared]
    );
}
