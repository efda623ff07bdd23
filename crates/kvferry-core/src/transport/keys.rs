//! The memory owner's table of registration keys, shared by the transports that check every
//! remote access against it: 128 random bits per registration, a region, and what keeps it alive.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};

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
    /// The [`KeyUse`]s alive, and the signal that the last one went.
    uses: Mutex<usize>,
    unused: Condvar,
}

impl KeyEntry {
    fn new(region: MemRegion, owner: MemoryOwner) -> KeyEntry {
        KeyEntry { region, owner, users: Mutex::default(), uses: Mutex::new(0), unused: Condvar::new() }
    }
}

/// A use of a registration's entry: while one is alive, `KeyTable::remove` of its key waits.
pub(crate) struct KeyUse(Arc<KeyEntry>);

impl KeyUse {
    fn of(entry: &Arc<KeyEntry>) -> KeyUse {
        *entry.uses.locked() += 1;
        KeyUse(entry.clone())
    }
}

impl Clone for KeyUse {
    fn clone(&self) -> KeyUse {
        KeyUse::of(&self.0)
    }
}

impl Drop for KeyUse {
    fn drop(&mut self) {
        let mut uses = self.0.uses.locked();
        *uses -= 1;
        if *uses == 0 {
            self.0.unused.notify_all();
        }
    }
}

impl Deref for KeyUse {
    type Target = KeyEntry;

    fn deref(&self) -> &KeyEntry {
        &self.0
    }
}

/// The entries a request uses, held (and its cut-off registered with them) until it is dropped.
pub(crate) struct Held {
    entries: Vec<KeyUse>,
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
        self.entries.write_locked().insert(key, Arc::new(KeyEntry::new(region, owner)));
    }

    pub fn get(&self, key: u128) -> Option<KeyUse> {
        self.entries.read_locked().get(&key).map(KeyUse::of)
    }

    /// A registration whose region holds the `len` bytes at `addr`, and its key: how the shm
    /// initiator finds the file behind a WRITE's source (a scan, once per region and connection).
    pub fn find(&self, addr: u64, len: u64) -> Option<(u128, KeyUse)> {
        let entries = self.entries.read_locked();
        entries.iter().find(|(_, e)| e.region.contains(addr, len)).map(|(k, e)| (*k, KeyUse::of(e)))
    }

    /// Remove a key, cut off the requests using its region, and wait until every use has let go
    /// (the cut makes their socket calls return, so this does not wait on any peer). Uses are only
    /// made under the table's lock, so none starts once the key is out of it.
    pub fn remove(&self, key: u128) {
        let Some(entry) = self.entries.write_locked().remove(&key) else { return };
        let cuts: Vec<Cut> = entry.users.locked().values().cloned().collect();
        for cut in cuts {
            cut();
        }
        let mut uses = entry.uses.locked();
        while *uses > 0 {
            uses = entry.unused.wait(uses).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Check every descriptor; on success returns the entries they use (held for the request, with
    /// `cut` registered: deregistration calls it) and the kind of memory each descriptor names.
    pub fn resolve(&self, descs: &[WireDesc], cut: &Cut) -> Result<Resolved, (u32, RejectReason)> {
        let entries = self.entries.read_locked();
        let mut held: Vec<KeyUse> = Vec::new();
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
                    if !held.iter().any(|h| Arc::ptr_eq(&h.0, &e)) {
                        held.push(KeyUse::of(&e));
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// `remove` returns only once every use of the entry is gone, however long it is held.
    #[test]
    fn remove_waits_for_the_last_use_and_no_new_use_starts() {
        let table = Arc::new(KeyTable::default());
        table.insert(7, MemRegion::host(std::ptr::null(), 64), None);
        let first = table.get(7).unwrap();
        let second = first.clone();
        let dropped = Arc::new(AtomicBool::new(false));
        let remover = {
            let (table, dropped) = (table.clone(), dropped.clone());
            std::thread::spawn(move || {
                table.remove(7);
                assert!(dropped.load(Ordering::SeqCst), "remove returned while a use was alive");
            })
        };
        drop(first);
        dropped.store(true, Ordering::SeqCst);
        drop(second);
        remover.join().unwrap();
        assert!(table.get(7).is_none());
    }
}
