//! Leases: how an owner revokes a registration that initiators reach without asking it per batch.
//!
//! The owner keeps one shareable file of slots, one slot per registration, and passes it to every
//! initiator at hello. Around each batch an initiator enters the slots of the regions it touches
//! (`active += 1`, then checks the slot still carries the registration's tag and is not revoked) and
//! leaves them afterwards. Deregistration sets `revoked`, then waits for `active` to drain. Both
//! sides use sequentially consistent atomics (a store then a load of the other's word), so either
//! the initiator sees the revocation or the owner sees the initiator and waits: no byte moves
//! after deregistration returns.

use std::os::fd::BorrowedFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::memory::host::{HostAllocOptions, HostBuffer};

/// Registrations one agent can have open to shm peers at once.
const SLOTS: usize = 1 << 16;

#[repr(C)]
pub(super) struct Slot {
    /// The low 64 bits of the registration's key: a slot reused by a later registration is not
    /// mistaken for the old one.
    tag: AtomicU64,
    active: AtomicU32,
    revoked: AtomicU32,
}

/// The slots as laid out in a lease file, owned or mapped.
pub(super) struct LeaseFile {
    file: HostBuffer,
}

impl LeaseFile {
    /// The owner's file: untouched slots read as tag 0, revoked 0, so they are opened explicitly.
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

    /// Enter a slot for a batch; `false` (and nothing held) when its registration is gone.
    pub fn enter(&self, index: u32, tag: u64) -> bool {
        let Some(slot) = self.slot(index) else { return false };
        slot.active.fetch_add(1, Ordering::SeqCst);
        if slot.tag.load(Ordering::SeqCst) == tag && slot.revoked.load(Ordering::SeqCst) == 0 {
            return true;
        }
        slot.active.fetch_sub(1, Ordering::SeqCst);
        false
    }

    pub fn leave(&self, index: u32) {
        if let Some(slot) = self.slot(index) {
            slot.active.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The owner's lease file and which of its slots are free.
pub(super) struct Leases {
    file: LeaseFile,
    /// Freed slots, and the first never used.
    free: Mutex<(Vec<u32>, u32)>,
}

impl Leases {
    pub fn new() -> Result<Leases> {
        Ok(Leases { file: LeaseFile::create()?, free: Mutex::new((Vec::new(), 0)) })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.file.share_fd().expect("the lease file is shareable")
    }

    /// A slot for a new registration with this tag.
    pub fn open(&self, tag: u64) -> Result<u32> {
        let mut free = self.free.lock().unwrap();
        let index = match free.0.pop() {
            Some(index) => index,
            None if (free.1 as usize) < SLOTS => {
                free.1 += 1;
                free.1 - 1
            }
            None => {
                return Err(Error::InvalidArgument(format!(
                    "the shm transport holds at most {SLOTS} registrations; deregister some first"
                )));
            }
        };
        let slot = self.file.slot(index).expect("slots below SLOTS exist");
        slot.tag.store(tag, Ordering::SeqCst);
        slot.revoked.store(0, Ordering::SeqCst);
        Ok(index)
    }

    /// Revoke a slot and wait until no initiator is inside it, for at most `timeout` (an initiator
    /// that died inside never leaves; its slot is then not reused).
    pub fn revoke(&self, index: u32, timeout: Duration) {
        let slot = self.file.slot(index).expect("open slots exist");
        slot.revoked.store(1, Ordering::SeqCst);
        let give_up = Instant::now() + timeout;
        while slot.active.load(Ordering::SeqCst) != 0 {
            if Instant::now() >= give_up {
                tracing::warn!(slot = index, "an shm peer did not leave a revoked registration; slot retired");
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.free.lock().unwrap().0.push(index);
    }
}
