//! Leases: how an owner tells an initiator that a registration it READs from is gone, without
//! being asked per batch.
//!
//! Every connection gets a lease file of its own (a memfd shared by the owner and that one peer
//! only): a peer can mark only its own slots, so a hostile one that sets `revoked` everywhere
//! only fails its own transfers. The owner opens a slot when it grants a registration on that
//! connection (`MAP`) and, at deregistration, sets `revoked` in the slot of every connection that
//! holds one, then returns: it waits for no peer. An initiator checks its slot before a READ and
//! again after the copy (after a full fence), and discards a copy that raced the revocation: the
//! bytes landed in its own memory, but the transfer fails. The owner's store of `revoked` is
//! followed by a full fence before deregistration returns, so a copy that saw memory the owner
//! reused afterwards also sees the revocation.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use crate::error::Result;
use crate::memory::host::{HostAllocOptions, HostBuffer};
use crate::sync::Locked;

/// Registrations one connection can hold grants for at once.
const SLOTS: usize = 1 << 16;

#[repr(C)]
pub(super) struct Slot {
    /// The low 64 bits of the registration's key: a slot reused by a later registration is not
    /// mistaken for the old one.
    tag: AtomicU64,
    revoked: AtomicU32,
    _pad: AtomicU32,
}

/// The slots as laid out in a lease file, owned or mapped.
pub(super) struct LeaseFile {
    file: HostBuffer,
}

impl LeaseFile {
    /// The owner's file: untouched slots read as tag 0, revoked 0, so they are opened explicitly.
    /// Pages are only allocated where slots are used.
    fn create() -> Result<LeaseFile> {
        let options = HostAllocOptions::new().with_pin(false).with_shareable(true);
        Ok(LeaseFile { file: HostBuffer::alloc(SLOTS * size_of::<Slot>(), &options)? })
    }

    /// An initiator's view of an owner's file.
    pub fn map(fd: BorrowedFd<'_>) -> Result<LeaseFile> {
        Ok(LeaseFile { file: HostBuffer::map_shared(fd)? })
    }

    pub fn slot(&self, index: u32) -> Option<&Slot> {
        let at = (index as usize).checked_mul(size_of::<Slot>())?;
        if at.checked_add(size_of::<Slot>())? > self.file.len() {
            return None;
        }
        // SAFETY: the slot lies inside the mapping, which is page aligned, so every slot is aligned
        // for its atomics; the mapping lives as long as `self`.
        Some(unsafe { &*self.file.as_ptr().add(at).cast::<Slot>() })
    }

    /// Whether the slot still carries the registration `tag`, unrevoked. Called before a copy and
    /// after it: the fence orders the copy's loads before the check.
    pub fn held(&self, index: u32, tag: u64) -> bool {
        fence(Ordering::SeqCst);
        let Some(slot) = self.slot(index) else { return false };
        slot.tag.load(Ordering::SeqCst) == tag && slot.revoked.load(Ordering::SeqCst) == 0
    }

    /// What a hostile holder of the file can do: revoke every slot (it hurts only itself).
    #[cfg(test)]
    pub fn revoke_all(&self) {
        for index in 0..SLOTS as u32 {
            self.slot(index).expect("slots below SLOTS exist").revoked.store(1, Ordering::SeqCst);
        }
    }
}

/// One connection's lease file and the slots it has open, by key.
pub(super) struct Leases {
    file: LeaseFile,
    /// Open slots by key, freed slots, and the first never used.
    state: Mutex<(HashMap<u128, u32>, Vec<u32>, u32)>,
}

impl Leases {
    pub fn new() -> Result<Leases> {
        Ok(Leases { file: LeaseFile::create()?, state: Mutex::new((HashMap::new(), Vec::new(), 0)) })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.file.share_fd().expect("the lease file is shareable")
    }

    /// The slot of a registration granted on this connection (opened on first grant); `None`
    /// when the connection holds [`SLOTS`] grants already.
    pub fn open(&self, key: u128) -> Option<u32> {
        let mut state = self.state.locked();
        let (open, free, next) = &mut *state;
        if let Some(&index) = open.get(&key) {
            return Some(index);
        }
        let index = match free.pop() {
            Some(index) => index,
            None if (*next as usize) < SLOTS => {
                *next += 1;
                *next - 1
            }
            None => return None,
        };
        let slot = self.file.slot(index).expect("slots below SLOTS exist");
        slot.tag.store(key as u64, Ordering::SeqCst);
        slot.revoked.store(0, Ordering::SeqCst);
        open.insert(key, index);
        Some(index)
    }

    /// Revoke the registration's slot, if this connection holds one, and free it. Never waits:
    /// a peer that copied meanwhile discards what it read (see the module documentation).
    pub fn revoke(&self, key: u128) {
        let mut state = self.state.locked();
        let (open, free, _) = &mut *state;
        if let Some(index) = open.remove(&key) {
            self.file.slot(index).expect("open slots exist").revoked.store(1, Ordering::SeqCst);
            free.push(index);
        }
        fence(Ordering::SeqCst);
    }
}
