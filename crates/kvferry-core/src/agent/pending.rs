//! The transfers posted to a peer or on a registration that may not have settled, so that a peer
//! gone or a registration dropped can stop them.

use std::sync::{Arc, Mutex, Weak};

use crate::sync::Locked;
use crate::transport::Completion;

/// The transfers posted to one peer (or on one registration), pruned of settled ones as it grows.
#[derive(Default)]
pub(super) struct Pending {
    transfers: Mutex<PendingList>,
}

#[derive(Default)]
struct PendingList {
    transfers: Vec<Weak<Completion>>,
    /// The length at which the list is pruned next: twice what the last pruning kept (at least
    /// 64), so that pruning costs a constant per post however many transfers stay pending.
    prune_at: usize,
    closed: bool,
}

impl Pending {
    /// Adds a transfer; false once the list is closed.
    pub(super) fn push(&self, completion: &Arc<Completion>) -> bool {
        let mut list = self.transfers.locked();
        if list.closed {
            return false;
        }
        if list.transfers.len() >= list.prune_at {
            list.transfers.retain(|w| w.upgrade().is_some_and(|c| !c.is_settled()));
            list.prune_at = (2 * list.transfers.len()).max(64);
        }
        list.transfers.push(Arc::downgrade(completion));
        true
    }

    pub(super) fn take(&self) -> Vec<Arc<Completion>> {
        self.transfers.locked().transfers.drain(..).filter_map(|w| w.upgrade()).collect()
    }

    /// Takes the transfers and refuses any more.
    pub(super) fn close(&self) -> Vec<Arc<Completion>> {
        let mut list = self.transfers.locked();
        list.closed = true;
        list.transfers.drain(..).filter_map(|w| w.upgrade()).collect()
    }
}
