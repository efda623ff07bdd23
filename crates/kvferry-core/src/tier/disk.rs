//! The disk tier's files: one preallocated data file of fixed-size slots, read and written with
//! `O_DIRECT` through io_uring, and an append-only index log that survives restarts.
//!
//! Crash safety comes from ordering and checksums, not from fsync on the hot path: a block's data is
//! written (and its completion reaped) before the log records it, a slot is recorded free before it is
//! reused, and every record carries the checksum of its block, which every read verifies. A kill at
//! any point therefore leaves at worst a block with no record (lost, never served) or a torn last
//! record (dropped at open). With `sync_writes` the log is also fsynced after each batch, which extends
//! the same guarantee to power loss.
//!
//! The checksum covers the block's key and slot as well as its bytes ([`block_checksum`]), so a record
//! that names one key with another block's slot and checksum fails on read instead of serving the
//! other block's bytes under the wrong key.
//!
//! At open, and whenever dead records outnumber live ones four to one, the log is rewritten compacted
//! (one record per live block) through a temporary file and a rename.
//!
//! The directory belongs to one store at a time: `open` takes an exclusive `flock` on its lock file
//! and holds it until the files are dropped, so a second store (in this process or another) gets
//! [`TierError::DiskLocked`] instead of two stores handing out the same slots.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

use crate::tier::{BlockKey, TierError};

const DATA_FILE: &str = "blocks.kvf";
const LOG_FILE: &str = "index.kvf";
const LOG_TMP_FILE: &str = "index.kvf.tmp";
const LOCK_FILE: &str = "lock.kvf";
/// Format 2: block checksums cover the key and the slot as well as the bytes.
const LOG_MAGIC: &[u8; 8] = b"KVFIDX02";
/// Format 1, whose checksums covered the bytes only: such a log is discarded at open (see `replay`).
const FORMAT_1_MAGIC: &[u8; 8] = b"KVFIDX01";
const HEADER_LEN: usize = 32;
pub(crate) const RECORD_LEN: usize = 64;
const STORE: u8 = 1;
const REMOVE: u8 = 2;

/// The checksum a record carries for the block `key` stored in `slot`: xxh3-64 over
/// `key length (u8) ‖ key ‖ slot (u32 le) ‖ data`. Binding the key and the slot means a record naming
/// `key` can only be satisfied by the bytes written for `key` into that very slot.
pub(crate) fn block_checksum(key: &BlockKey, slot: u32, data: &[u8]) -> u64 {
    let mut hasher = Xxh3::new();
    hasher.update(&[key.as_bytes().len() as u8]);
    hasher.update(key.as_bytes());
    hasher.update(&slot.to_le_bytes());
    hasher.update(data);
    hasher.digest()
}

/// Where a block lives on disk and its [`block_checksum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DiskEntry {
    pub slot: u32,
    pub checksum: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    Store(BlockKey, DiskEntry),
    Remove(BlockKey),
}

impl Record {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let mut rec = [0u8; RECORD_LEN];
        let (kind, key, entry) = match self {
            Record::Store(key, entry) => (STORE, key, *entry),
            Record::Remove(key) => (REMOVE, key, DiskEntry { slot: 0, checksum: 0 }),
        };
        rec[0] = kind;
        rec[1] = key.as_bytes().len() as u8;
        rec[4..8].copy_from_slice(&entry.slot.to_le_bytes());
        rec[8..8 + key.as_bytes().len()].copy_from_slice(key.as_bytes());
        rec[40..48].copy_from_slice(&entry.checksum.to_le_bytes());
        let crc = crc32fast::hash(&rec[..RECORD_LEN - 4]);
        rec[RECORD_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&rec);
    }

    /// `None` when the record is torn or corrupt.
    pub(crate) fn decode(rec: &[u8]) -> Option<Record> {
        let crc = u32::from_le_bytes(rec[RECORD_LEN - 4..].try_into().ok()?);
        if crc32fast::hash(&rec[..RECORD_LEN - 4]) != crc {
            return None;
        }
        let key = BlockKey::from_engine_hash(rec.get(8..8 + rec[1] as usize)?).ok()?;
        let slot = u32::from_le_bytes(rec[4..8].try_into().ok()?);
        let checksum = u64::from_le_bytes(rec[40..48].try_into().ok()?);
        match rec[0] {
            STORE => Some(Record::Store(key, DiskEntry { slot, checksum })),
            REMOVE => Some(Record::Remove(key)),
            _ => None,
        }
    }
}

/// What the disk tier held when it was last closed or killed.
pub(crate) struct Replayed {
    pub blocks: HashMap<BlockKey, DiskEntry>,
    /// Torn records dropped from the log's tail.
    pub torn_records: u64,
}

pub(crate) struct DiskFiles {
    dir: PathBuf,
    block_size: usize,
    slots: u32,
    data: File,
    log: File,
    /// Records in the log, live or not.
    log_records: usize,
    sync_writes: bool,
    /// Why the data file is not opened with `O_DIRECT`, when it is not.
    buffered: Option<String>,
    /// Store records appended to the log whose blocks are not in the store's index yet (a direct
    /// write publishes them after the append, without holding the log): a compaction in between
    /// must keep them.
    unpublished: HashMap<BlockKey, DiskEntry>,
    /// Holds the directory's `flock` for as long as the files are open.
    _lock: File,
}

fn unavailable(dir: &Path, what: &str, err: std::io::Error) -> TierError {
    classify(dir, what, &err, |cause| TierError::DiskUnavailable { dir: dir.display().to_string(), cause })
}

/// A write that failed while the tier was running.
pub(crate) fn write_failed(dir: &Path, what: &str, err: &std::io::Error) -> TierError {
    classify(dir, what, err, |_| TierError::DiskIo { op: what.into(), cause: err.to_string() })
}

/// `DiskFull` for a full disk, `otherwise(cause)` for anything else.
fn classify(dir: &Path, what: &str, err: &std::io::Error, otherwise: impl FnOnce(String) -> TierError) -> TierError {
    let cause = format!("{what}: {err}");
    if is_full(err) {
        return TierError::DiskFull { dir: dir.display().to_string(), cause };
    }
    otherwise(cause)
}

/// ENOSPC, and EFBIG (a file size limit is a full disk as far as the store is concerned).
fn is_full(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC | libc::EFBIG | libc::EDQUOT))
}

pub(crate) fn header(block_size: usize, slots: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(LOG_MAGIC);
    h[8..16].copy_from_slice(&(block_size as u64).to_le_bytes());
    h[16..20].copy_from_slice(&slots.to_le_bytes());
    let crc = crc32fast::hash(&h[..HEADER_LEN - 4]);
    h[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    h
}

impl DiskFiles {
    /// Open (or create) the tier in `dir`: `slots` blocks of `block_size` bytes, preallocated.
    pub(crate) fn open(
        dir: &Path,
        block_size: usize,
        slots: u32,
        sync_writes: bool,
    ) -> Result<(DiskFiles, Replayed), TierError> {
        std::fs::create_dir_all(dir).map_err(|e| unavailable(dir, "creating the directory", e))?;
        // Locked before anything is read or written: another store's replay or appends must not
        // interleave with ours.
        let lock = lock_dir(dir)?;
        let open_data = |flags: i32| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(flags)
                .open(dir.join(DATA_FILE))
        };
        let (data, buffered) = match open_data(libc::O_DIRECT) {
            Ok(data) => (data, None),
            // File systems without direct i/o (tmpfs before Linux 6.6) still work, through the page
            // cache: slower and with a second copy of each block in memory, hence the note.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let data = open_data(0).map_err(|e| unavailable(dir, "opening the data file", e))?;
                (data, Some(format!("O_DIRECT: {e}; the data file goes through the page cache")))
            }
            Err(e) => return Err(unavailable(dir, "opening the data file with O_DIRECT", e)),
        };
        // Replayed first: a log for another geometry must not resize the data file.
        let replayed = replay(dir, block_size, slots)?;
        let len = block_size as u64 * slots as u64;
        // SAFETY: plain syscall on an open descriptor.
        if unsafe { libc::fallocate(data.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(unavailable(dir, &format!("preallocating {len} bytes"), err));
            }
            // No preallocation on this file system: a sparse file, whose blocks are allocated on
            // first write (where a full disk then shows up instead).
            data.set_len(len.max(data.metadata().map(|m| m.len()).unwrap_or(0)))
                .map_err(|e| unavailable(dir, "sizing the data file", e))?;
        }
        let log = rewrite_log(dir, block_size, slots, &replayed.blocks)?;
        let log_records = replayed.blocks.len();
        let files = DiskFiles {
            dir: dir.to_path_buf(),
            block_size,
            slots,
            data,
            log,
            log_records,
            sync_writes,
            buffered,
            unpublished: HashMap::new(),
            _lock: lock,
        };
        Ok((files, replayed))
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn buffered(&self) -> Option<&str> {
        self.buffered.as_deref()
    }

    pub(crate) fn data_fd(&self) -> std::os::fd::RawFd {
        self.data.as_raw_fd()
    }

    /// Append records in one write.
    pub(crate) fn append(&mut self, records: &[Record]) -> Result<(), TierError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(records.len() * RECORD_LEN);
        records.iter().for_each(|r| r.encode(&mut bytes));
        self.log.write_all(&bytes).map_err(|e| write_failed(&self.dir, "appending to the index log", &e))?;
        self.log_records += records.len();
        if self.sync_writes {
            self.data.sync_data().map_err(|e| write_failed(&self.dir, "syncing the data file", &e))?;
            self.log.sync_data().map_err(|e| write_failed(&self.dir, "syncing the index log", &e))?;
        }
        Ok(())
    }

    /// Whether the log holds so many dead records (blocks removed or overwritten since) next to
    /// `live` ones that it is worth rewriting.
    pub(crate) fn needs_compaction(&self, live: usize) -> bool {
        self.log_records > 4 * live + 4096
    }

    /// Replace the log with one record per block of `live` (all of them: none to forget every
    /// block) and per block appended but not published yet, atomically.
    pub(crate) fn rewrite(&mut self, live: &HashMap<BlockKey, DiskEntry>) -> Result<(), TierError> {
        let mut kept = live.clone();
        kept.extend(self.unpublished.iter().map(|(k, e)| (*k, *e)));
        self.log = rewrite_log(&self.dir, self.block_size, self.slots, &kept)?;
        self.log_records = kept.len();
        Ok(())
    }

    /// Append store records for blocks that the caller publishes in the index afterwards (and then
    /// reports with [`DiskFiles::published`]).
    pub(crate) fn append_unpublished(&mut self, stored: &[(BlockKey, DiskEntry)]) -> Result<(), TierError> {
        let records: Vec<Record> = stored.iter().map(|(k, e)| Record::Store(*k, *e)).collect();
        self.append(&records)?;
        self.unpublished.extend(stored.iter().copied());
        Ok(())
    }

    /// The blocks of an [`DiskFiles::append_unpublished`] are in the index now (or were dropped).
    pub(crate) fn published(&mut self, keys: impl IntoIterator<Item = BlockKey>) {
        for key in keys {
            self.unpublished.remove(&key);
        }
    }
}

/// Take the directory's lock without waiting: `DiskLocked` when another open file description (a
/// store in this process or in another) holds it. The lock goes with the descriptor, so a killed
/// store never leaves it behind.
fn lock_dir(dir: &Path) -> Result<File, TierError> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| unavailable(dir, "opening the lock file", e))?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(TierError::DiskLocked { dir: dir.display().to_string(), lock: path.display().to_string() });
        }
        return Err(unavailable(dir, "locking the directory", err));
    }
    Ok(file)
}

fn replay(dir: &Path, block_size: usize, slots: u32) -> Result<Replayed, TierError> {
    let mut bytes = Vec::new();
    match File::open(dir.join(LOG_FILE)) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes).map_err(|e| unavailable(dir, "reading the index log", e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(unavailable(dir, "opening the index log", e)),
    }
    replay_log(dir, &bytes, block_size, slots)
}

/// What the index log `bytes` (of the tier in `dir`) holds; the log's contents are not trusted.
pub(crate) fn replay_log(dir: &Path, bytes: &[u8], block_size: usize, slots: u32) -> Result<Replayed, TierError> {
    let corrupt = |why: String| TierError::IndexCorrupt { path: dir.join(LOG_FILE).display().to_string(), why };
    let mut replayed = Replayed { blocks: HashMap::new(), torn_records: 0 };
    if bytes.is_empty() {
        return Ok(replayed);
    }
    if bytes.len() >= 8 && bytes[..8] == FORMAT_1_MAGIC[..] {
        // Its checksums do not bind keys, so none of its records can be trusted to name the right
        // block; the tier is a cache, so it starts empty (the log is rewritten in format 2 at open)
        // rather than refusing to open.
        tracing::warn!(
            "discarding the disk tier's index {}: it is in format 1, whose checksums do not cover the \
             block's key; the disk tier starts empty",
            dir.join(LOG_FILE).display()
        );
        return Ok(replayed);
    }
    if bytes.len() < HEADER_LEN || bytes[..8] != LOG_MAGIC[..] {
        return Err(corrupt("no kvferry index header".into()));
    }
    let expected = header(block_size, slots);
    if bytes[..HEADER_LEN] != expected[..] {
        let crc = u32::from_le_bytes(bytes[HEADER_LEN - 4..HEADER_LEN].try_into().unwrap_or_default());
        if crc32fast::hash(&bytes[..HEADER_LEN - 4]) != crc {
            return Err(corrupt("the header's checksum does not match".into()));
        }
        let found_block = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
        let found_slots = u32::from_le_bytes(bytes[16..20].try_into().unwrap_or_default());
        return Err(TierError::IndexMismatch {
            path: dir.join(LOG_FILE).display().to_string(),
            found: format!("{found_slots} blocks of {found_block} bytes"),
            expected: format!("{slots} blocks of {block_size} bytes"),
        });
    }
    let body = &bytes[HEADER_LEN..];
    let mut owner_of_slot: HashMap<u32, BlockKey> = HashMap::new();
    let records = body.len().div_ceil(RECORD_LEN);
    for (i, rec) in body.chunks(RECORD_LEN).enumerate() {
        let decoded = if rec.len() == RECORD_LEN { Record::decode(rec) } else { None };
        let Some(record) = decoded else {
            // Only the last record can be torn by a crash: appends are sequential.
            if i + 1 == records {
                replayed.torn_records += 1;
                break;
            }
            return Err(corrupt(format!("record {i} of {records} is damaged")));
        };
        match record {
            Record::Store(key, entry) => {
                if entry.slot >= slots {
                    return Err(corrupt(format!("record {i} names slot {} of {slots}", entry.slot)));
                }
                // A later store into the same slot overwrote whatever was there.
                if let Some(previous) = owner_of_slot.insert(entry.slot, key) {
                    replayed.blocks.remove(&previous);
                }
                if let Some(old) = replayed.blocks.insert(key, entry)
                    && old.slot != entry.slot
                {
                    owner_of_slot.remove(&old.slot);
                }
            }
            Record::Remove(key) => {
                if let Some(old) = replayed.blocks.remove(&key) {
                    owner_of_slot.remove(&old.slot);
                }
            }
        }
    }
    Ok(replayed)
}

/// Write a fresh log holding `blocks`, replace the old one atomically and open it for appending.
fn rewrite_log(
    dir: &Path,
    block_size: usize,
    slots: u32,
    blocks: &HashMap<BlockKey, DiskEntry>,
) -> Result<File, TierError> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + blocks.len() * RECORD_LEN);
    bytes.extend_from_slice(&header(block_size, slots));
    for (key, entry) in blocks {
        Record::Store(*key, *entry).encode(&mut bytes);
    }
    let tmp = dir.join(LOG_TMP_FILE);
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(LOG_FILE))?;
        // The rename must reach the disk before records are appended to the new log.
        File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(unavailable(dir, "rewriting the index log", e));
    }
    OpenOptions::new().append(true).open(dir.join(LOG_FILE)).map_err(|e| unavailable(dir, "opening the index log", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> BlockKey {
        BlockKey::chain(None, &[i], b"")
    }

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let store = Record::Store(key(1), DiskEntry { slot: 7, checksum: 0xdead_beef });
        let mut bytes = vec![];
        store.encode(&mut bytes);
        Record::Remove(key(2)).encode(&mut bytes);
        assert_eq!(bytes.len(), 2 * RECORD_LEN);
        assert_eq!(Record::decode(&bytes[..RECORD_LEN]), Some(store));
        assert_eq!(Record::decode(&bytes[RECORD_LEN..]), Some(Record::Remove(key(2))));
        for at in [0, 1, 5, 20, 45, 63] {
            let mut damaged = bytes[..RECORD_LEN].to_vec();
            damaged[at] ^= 0x10;
            assert_eq!(Record::decode(&damaged), None, "flip at {at}");
        }
    }

    #[test]
    fn block_checksums_bind_key_slot_and_bytes() {
        let data = vec![0x5au8; 4096];
        let sum = block_checksum(&key(1), 7, &data);
        // The documented layout, hashed in one piece.
        let mut whole = vec![16u8];
        whole.extend_from_slice(key(1).as_bytes());
        whole.extend_from_slice(&7u32.to_le_bytes());
        whole.extend_from_slice(&data);
        assert_eq!(sum, xxhash_rust::xxh3::xxh3_64(&whole));
        assert_ne!(sum, block_checksum(&key(2), 7, &data));
        assert_ne!(sum, block_checksum(&key(1), 8, &data));
        let mut other = data.clone();
        other[4095] ^= 1;
        assert_ne!(sum, block_checksum(&key(1), 7, &other));
        // A short key is not its zero-padded form.
        let short = BlockKey::from_engine_hash(&[1]).unwrap();
        let padded = BlockKey::from_engine_hash(&[1, 0]).unwrap();
        assert_ne!(block_checksum(&short, 0, &data), block_checksum(&padded, 0, &data));
    }

    #[test]
    fn a_second_open_of_a_directory_is_refused_until_the_first_closes() {
        let dir = std::env::temp_dir().join(format!("kvferry-disk-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (first, _) = DiskFiles::open(&dir, 4096, 4, false).unwrap();
        // flock is per open file description: a second open in the same process is refused too, as
        // one in another process is (the Python tests check that case).
        match DiskFiles::open(&dir, 4096, 4, false) {
            Err(TierError::DiskLocked { dir: named, lock }) => {
                assert_eq!(named, dir.display().to_string());
                assert!(lock.ends_with(LOCK_FILE), "{lock}");
            }
            other => panic!("expected DiskLocked, got {:?}", other.map(|_| ())),
        }
        drop(first);
        let (again, replayed) = DiskFiles::open(&dir, 4096, 4, false).unwrap();
        assert!(replayed.blocks.is_empty());
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_compaction_keeps_blocks_appended_but_not_yet_published() {
        let dir = std::env::temp_dir().join(format!("kvferry-disk-unpublished-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (mut files, _) = DiskFiles::open(&dir, 4096, 8, false).unwrap();
        let (live, pending) = (DiskEntry { slot: 0, checksum: 1 }, DiskEntry { slot: 1, checksum: 2 });
        files.append(&[Record::Store(key(1), live)]).unwrap();
        files.append_unpublished(&[(key(2), pending)]).unwrap();
        // The index (what `live` holds) does not know key 2 yet; the rewritten log must.
        files.rewrite(&HashMap::from([(key(1), live)])).unwrap();
        drop(files);
        let (mut files, replayed) = DiskFiles::open(&dir, 4096, 8, false).unwrap();
        assert_eq!(replayed.blocks, HashMap::from([(key(1), live), (key(2), pending)]));
        // Once published, a block is the index's to keep: a rewrite without it forgets it.
        files.append_unpublished(&[(key(3), DiskEntry { slot: 2, checksum: 3 })]).unwrap();
        files.published([key(3)]);
        files.rewrite(&HashMap::from([(key(1), live)])).unwrap();
        drop(files);
        let (_, replayed) = DiskFiles::open(&dir, 4096, 8, false).unwrap();
        assert_eq!(replayed.blocks, HashMap::from([(key(1), live)]));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
