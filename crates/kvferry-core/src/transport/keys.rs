//! The memory owner's table of registration keys, shared by the transports that check every
//! remote access against it: 128 random bits per registration, a region, and what keeps it alive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread;
use std::time::Duration;

use crate::error::Result;
use crate::memory::{MemKind, MemRegion, Memory};
use crate::sync::{Locked, ReadWriteLocked};
use crate::transport::MemoryOwner;
use crate::transport::RejectReason;
use crate::transport::frame::WireDesc;

/// Cuts off the connection of a request that uses a region (shuts its socket down), so that
/// deregistration ends the request instead of waiting for its peer.
pub(crate) type Cut = Arc<dyn Fn() + Send + Sync>;

/// A registered region as the target sees it.
pub(crate) struct KeyEntry {
    pub region: MemRegion,
    owner: MemoryOwner,
    /// The requests using the region now, each with its cut-off.
    users: Mutex<HashMap<u64, Cut>>,
}

/// The entries a request uses, held (and its cut-off registered with them) until it is dropped.
pub(crate) struct Held {
    entries: Vec<Arc<KeyEntry>>,
    id: u64,
}

impl Drop for Held {
    fn drop(&mut self) {
        for entry in &self.entries {
            entry.users.locked().remove(&self.id);
        }
    }
}

/// The entries a request holds, and the kind of memory each of its descriptors names.
pub(crate) type Resolved = (Held, Vec<MemKind>);

static NEXT_USE: AtomicU64 = AtomicU64::new(0);

/// Key → region. A request holds the entries it uses, so deregistration can wait for it.
#[derive(Default)]
pub(crate) struct KeyTable {
    entries: RwLock<HashMap<u128, Arc<KeyEntry>>>,
}

impl KeyTable {
    pub fn insert(&self, key: u128, region: MemRegion, owner: MemoryOwner) {
        let entry = KeyEntry { region, owner, users: Mutex::new(HashMap::new()) };
        self.entries.write_locked().insert(key, Arc::new(entry));
    }

    pub fn get(&self, key: u128) -> Option<Arc<KeyEntry>> {
        self.entries.read_locked().get(&key).cloned()
    }

    /// A registration whose region holds the `len` bytes at `addr`, and its key: how the shm
    /// initiator finds the file behind a WRITE's source (a scan, once per region and connection).
    pub fn find(&self, addr: u64, len: u64) -> Option<(u128, Arc<KeyEntry>)> {
        let entries = self.entries.read_locked();
        entries.iter().find(|(_, e)| e.region.contains(addr, len)).map(|(k, e)| (*k, e.clone()))
    }

    /// Remove a key, cut off the requests using its region, and wait until they have let go (the
    /// cut makes their socket calls return, so this does not wait on any peer).
    pub fn remove(&self, key: u128) {
        let Some(entry) = self.entries.write_locked().remove(&key) else { return };
        let cuts: Vec<Cut> = entry.users.locked().values().cloned().collect();
        for cut in cuts {
            cut();
        }
        while Arc::strong_count(&entry) > 1 {
            thread::sleep(Duration::from_micros(200));
        }
    }

    /// Check every descriptor; on success returns the entries they use (held for the request, with
    /// `cut` registered: deregistration calls it) and the kind of memory each descriptor names.
    pub fn resolve(&self, descs: &[WireDesc], cut: &Cut) -> Result<Resolved, (u32, RejectReason)> {
        let entries = self.entries.read_locked();
        let mut held: Vec<Arc<KeyEntry>> = Vec::new();
        let mut kinds = Vec::with_capacity(descs.len());
        let mut last: Option<(u128, Arc<KeyEntry>)> = None;
        for (i, d) in descs.iter().enumerate() {
            let reject = |reason| (i as u32, reason);
            if d.len == 0 {
                return Err(reject(RejectReason::ZeroLength));
            }
            if d.addr.checked_add(d.len).is_none() {
                return Err(reject(RejectReason::RangeOverflow));
            }
            let entry = match &last {
                Some((k, e)) if *k == d.key => e.clone(),
                _ => {
                    let e = entries.get(&d.key).ok_or(reject(RejectReason::UnknownKey))?.clone();
                    if !held.iter().any(|h| Arc::ptr_eq(h, &e)) {
                        held.push(e.clone());
                    }
                    last = Some((d.key, e.clone()));
                    e
                }
            };
            if !entry.region.contains(d.addr, d.len) {
                return Err(reject(RejectReason::OutOfRange));
            }
            kinds.push(entry.region.kind);
        }
        // Registered under the table's read lock: a `remove` either sees this request or is
        // seen by it (the key is gone and the descriptor refused).
        let id = NEXT_USE.fetch_add(1, Ordering::Relaxed);
        for entry in &held {
            entry.users.locked().insert(id, cut.clone());
        }
        Ok((Held { entries: held, id }, kinds))
    }
}

impl KeyEntry {
    /// The memory behind the region, when the agent registered memory it owns.
    pub fn memory(&self) -> Option<&Arc<dyn Memory>> {
        self.owner.as_ref()
    }
}

/// A fresh 128-bit key.
pub(crate) fn new_key() -> Result<u128> {
    crate::transport::random_key().map(u128::from_le_bytes)
}
