//! Which block leaves a tier when it is full (LRU or ARC), and which evicted blocks are worth a disk
//! write (a frequency sketch).
//!
//! Policies only order keys; the tier decides what may leave (pinned blocks may not), so
//! [`Policy::victim`] takes a filter and walks past blocks that are being read.

use std::collections::{BTreeMap, HashMap};

use xxhash_rust::xxh3::xxh3_64;

use crate::tier::BlockKey;

/// How a tier picks the block to evict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// Adaptive replacement (Megiddo & Modha): balances recency against frequency, so a long scan of
    /// one-off blocks does not flush the blocks that are hit again and again.
    Arc,
}

pub(crate) trait Policy: Send {
    /// `key` entered the tier.
    fn inserted(&mut self, key: BlockKey);
    /// `key` was hit.
    fn touched(&mut self, key: &BlockKey);
    /// `key` was evicted (ARC remembers it as a ghost).
    fn evicted(&mut self, key: &BlockKey);
    /// `key` left for another reason (cleared, moved on request): no ghost.
    fn forgotten(&mut self, key: &BlockKey);
    /// The next `count` blocks to evict among those `evictable` accepts, in order, without removing
    /// them.
    fn victims(&self, count: usize, evictable: &mut dyn FnMut(&BlockKey) -> bool) -> Vec<BlockKey>;

    /// The next block to evict among those `evictable` accepts.
    fn victim(&self, evictable: &mut dyn FnMut(&BlockKey) -> bool) -> Option<BlockKey> {
        self.victims(1, evictable).pop()
    }
}

pub(crate) fn new_policy(kind: EvictionPolicy, capacity_blocks: usize) -> Box<dyn Policy> {
    match kind {
        EvictionPolicy::Lru => Box::new(Lru::default()),
        EvictionPolicy::Arc => Box::new(Arc::new(capacity_blocks)),
    }
}

/// Keys in recency order, oldest first: O(log n) insert, touch, remove.
#[derive(Default)]
struct RecencyList {
    stamp_of: HashMap<BlockKey, u64>,
    by_stamp: BTreeMap<u64, BlockKey>,
    clock: u64,
}

impl RecencyList {
    fn push(&mut self, key: BlockKey) {
        self.remove(&key);
        self.clock += 1;
        self.stamp_of.insert(key, self.clock);
        self.by_stamp.insert(self.clock, key);
    }

    fn remove(&mut self, key: &BlockKey) -> bool {
        match self.stamp_of.remove(key) {
            Some(stamp) => {
                self.by_stamp.remove(&stamp);
                true
            }
            None => false,
        }
    }

    fn contains(&self, key: &BlockKey) -> bool {
        self.stamp_of.contains_key(key)
    }

    fn len(&self) -> usize {
        self.stamp_of.len()
    }

    fn pop_oldest(&mut self) -> Option<BlockKey> {
        let (_, key) = self.by_stamp.pop_first()?;
        self.stamp_of.remove(&key);
        Some(key)
    }

    /// Up to `count` keys that `accept` takes, oldest first, appended to `out`.
    fn oldest_where(&self, count: usize, accept: &mut dyn FnMut(&BlockKey) -> bool, out: &mut Vec<BlockKey>) {
        let wanted = count.saturating_sub(out.len());
        out.extend(self.by_stamp.values().filter(|key| accept(key)).take(wanted).copied());
    }
}

#[derive(Default)]
struct Lru {
    order: RecencyList,
}

impl Policy for Lru {
    fn inserted(&mut self, key: BlockKey) {
        self.order.push(key);
    }

    fn touched(&mut self, key: &BlockKey) {
        if self.order.contains(key) {
            self.order.push(*key);
        }
    }

    fn evicted(&mut self, key: &BlockKey) {
        self.order.remove(key);
    }

    fn forgotten(&mut self, key: &BlockKey) {
        self.order.remove(key);
    }

    fn victims(&self, count: usize, evictable: &mut dyn FnMut(&BlockKey) -> bool) -> Vec<BlockKey> {
        let mut out = Vec::new();
        self.order.oldest_where(count, evictable, &mut out);
        out
    }
}

/// ARC: `recent` (T1) holds blocks seen once, `frequent` (T2) blocks seen again; the ghost lists
/// remember recently evicted keys of each and move `target` (the share T1 may hold) towards
/// whichever list a returning key came from.
struct Arc {
    capacity: usize,
    target: usize,
    recent: RecencyList,
    frequent: RecencyList,
    recent_ghosts: RecencyList,
    frequent_ghosts: RecencyList,
}

impl Arc {
    fn new(capacity: usize) -> Self {
        Arc {
            capacity: capacity.max(1),
            target: 0,
            recent: RecencyList::default(),
            frequent: RecencyList::default(),
            recent_ghosts: RecencyList::default(),
            frequent_ghosts: RecencyList::default(),
        }
    }

    fn trim_ghosts(&mut self) {
        while self.recent.len() + self.recent_ghosts.len() > self.capacity && self.recent_ghosts.pop_oldest().is_some()
        {
        }
        while self.recent.len() + self.frequent.len() + self.recent_ghosts.len() + self.frequent_ghosts.len()
            > 2 * self.capacity
            && self.frequent_ghosts.pop_oldest().is_some()
        {}
    }
}

impl Policy for Arc {
    fn inserted(&mut self, key: BlockKey) {
        if self.recent_ghosts.remove(&key) {
            let step = (self.frequent_ghosts.len() / self.recent_ghosts.len().max(1)).max(1);
            self.target = (self.target + step).min(self.capacity);
            self.frequent.push(key);
        } else if self.frequent_ghosts.remove(&key) {
            let step = (self.recent_ghosts.len() / self.frequent_ghosts.len().max(1)).max(1);
            self.target = self.target.saturating_sub(step);
            self.frequent.push(key);
        } else {
            self.recent.push(key);
        }
        self.trim_ghosts();
    }

    fn touched(&mut self, key: &BlockKey) {
        if self.recent.remove(key) || self.frequent.contains(key) {
            self.frequent.push(*key);
        }
    }

    fn evicted(&mut self, key: &BlockKey) {
        if self.recent.remove(key) {
            self.recent_ghosts.push(*key);
        } else if self.frequent.remove(key) {
            self.frequent_ghosts.push(*key);
        }
        self.trim_ghosts();
    }

    fn forgotten(&mut self, key: &BlockKey) {
        self.recent.remove(key);
        self.frequent.remove(key);
    }

    fn victims(&self, count: usize, evictable: &mut dyn FnMut(&BlockKey) -> bool) -> Vec<BlockKey> {
        // T1 gives up blocks while it holds more than its target share, then T2, then the rest of T1.
        let mut recent = Vec::new();
        self.recent.oldest_where(count, evictable, &mut recent);
        let surplus = self.recent.len().saturating_sub(self.target).min(recent.len());
        let rest = recent.split_off(surplus);
        self.frequent.oldest_where(count, evictable, &mut recent);
        recent.extend(rest.into_iter().take(count.saturating_sub(recent.len())));
        recent
    }
}

/// A count-min sketch of how often each key was put or hit, halved periodically so that old
/// popularity fades (TinyLFU's aging). Blocks evicted from DRAM reach the disk only when the sketch
/// has seen them at least `threshold` times, which keeps one-hit blocks from costing a disk write; a
/// threshold of 0 or 1 admits every block.
pub(crate) struct AdmissionFilter {
    counters: Vec<u8>,
    mask: usize,
    recorded: usize,
    threshold: u8,
}

const SKETCH_ROWS: usize = 4;
const COUNTER_MAX: u8 = 15;

impl AdmissionFilter {
    /// `capacity_blocks` sizes the sketch (a few counters per block the tiers can hold).
    pub(crate) fn new(capacity_blocks: usize, threshold: u8) -> Self {
        let width = (capacity_blocks.max(64) * 4).next_power_of_two();
        AdmissionFilter { counters: vec![0; width * SKETCH_ROWS], mask: width - 1, recorded: 0, threshold }
    }

    fn slots(&self, key: &BlockKey) -> [usize; SKETCH_ROWS] {
        let hash = xxh3_64(key.as_bytes());
        let (low, high) = (hash as usize, (hash >> 32) as usize | 1);
        let width = self.mask + 1;
        std::array::from_fn(|row| row * width + (low.wrapping_add(row.wrapping_mul(high)) & self.mask))
    }

    pub(crate) fn record(&mut self, key: &BlockKey) {
        for slot in self.slots(key) {
            self.counters[slot] = (self.counters[slot] + 1).min(COUNTER_MAX);
        }
        self.recorded += 1;
        if self.recorded >= 10 * (self.mask + 1) {
            self.recorded = 0;
            self.counters.iter_mut().for_each(|c| *c /= 2);
        }
    }

    pub(crate) fn frequency(&self, key: &BlockKey) -> u8 {
        self.slots(key).into_iter().map(|slot| self.counters[slot]).min().unwrap_or(0)
    }

    pub(crate) fn admits(&self, key: &BlockKey) -> bool {
        self.threshold <= 1 || self.frequency(key) >= self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> BlockKey {
        BlockKey::chain(None, &[i], b"")
    }

    fn victims(policy: &dyn Policy, pinned: &[u32]) -> Option<BlockKey> {
        let pinned: Vec<BlockKey> = pinned.iter().map(|&i| key(i)).collect();
        policy.victim(&mut |k| !pinned.contains(k))
    }

    #[test]
    fn lru_evicts_the_least_recently_used_and_skips_pinned() {
        let mut lru = new_policy(EvictionPolicy::Lru, 4);
        for i in 0..4 {
            lru.inserted(key(i));
        }
        lru.touched(&key(0));
        assert_eq!(victims(&*lru, &[]), Some(key(1)));
        assert_eq!(victims(&*lru, &[1, 2]), Some(key(3)));
        lru.evicted(&key(1));
        assert_eq!(victims(&*lru, &[]), Some(key(2)));
        assert_eq!(victims(&*lru, &[0, 2, 3]), None);
        lru.forgotten(&key(2));
        lru.touched(&key(2));
        assert_eq!(victims(&*lru, &[]), Some(key(3)));
    }

    /// Two blocks that are hit again, then a scan of 20 one-off blocks through a cache of 4: what
    /// is resident at the end.
    fn after_a_scan(kind: EvictionPolicy) -> Vec<BlockKey> {
        let mut policy = new_policy(kind, 4);
        let mut resident = vec![key(0), key(1)];
        for i in 0..2 {
            policy.inserted(key(i));
            policy.touched(&key(i));
        }
        for i in 100..120 {
            if resident.len() == 4 {
                let victim = policy.victim(&mut |_| true).unwrap();
                policy.evicted(&victim);
                resident.retain(|k| *k != victim);
            }
            policy.inserted(key(i));
            resident.push(key(i));
        }
        resident
    }

    #[test]
    fn arc_keeps_frequent_blocks_through_a_scan() {
        let resident = after_a_scan(EvictionPolicy::Arc);
        assert!(resident.contains(&key(0)) && resident.contains(&key(1)), "the scan flushed the hot blocks");
        // LRU, given the same sequence, loses them.
        let resident = after_a_scan(EvictionPolicy::Lru);
        assert!(!resident.contains(&key(0)) && !resident.contains(&key(1)));
    }

    #[test]
    fn several_victims_come_in_eviction_order_without_repeats() {
        let mut lru = new_policy(EvictionPolicy::Lru, 8);
        let mut arc = new_policy(EvictionPolicy::Arc, 8);
        for policy in [&mut lru, &mut arc] {
            for i in 0..6 {
                policy.inserted(key(i));
            }
            policy.touched(&key(0));
            policy.touched(&key(1));
        }
        let not_3 = |k: &BlockKey| *k != key(3);
        assert_eq!(lru.victims(3, &mut { not_3 }), [key(2), key(4), key(5)]);
        assert_eq!(lru.victims(10, &mut |_| true).len(), 6);
        // ARC: T1 (2..6) holds more than its target (0), so it goes first, then T2 (0, 1).
        assert_eq!(arc.victims(3, &mut { not_3 }), [key(2), key(4), key(5)]);
        assert_eq!(arc.victims(6, &mut |_| true), [key(2), key(3), key(4), key(5), key(0), key(1)]);
        assert_eq!(arc.victims(1, &mut |k| *k == key(1)), [key(1)]);
    }

    #[test]
    fn arc_ghost_hits_return_to_the_frequent_list() {
        let mut arc = Arc::new(2);
        arc.inserted(key(1));
        arc.inserted(key(2));
        arc.evicted(&key(1));
        assert!(arc.recent_ghosts.contains(&key(1)));
        arc.inserted(key(1));
        assert!(arc.frequent.contains(&key(1)) && arc.target >= 1);
        // The ghost lists never exceed the cache's size twice over.
        for i in 10..100 {
            arc.inserted(key(i));
            let victim = arc.victim(&mut |_| true).unwrap();
            arc.evicted(&victim);
        }
        let total = arc.recent.len() + arc.frequent.len() + arc.recent_ghosts.len() + arc.frequent_ghosts.len();
        assert!(total <= 4, "{total}");
    }

    #[test]
    fn admission_needs_repeated_sightings_and_fades() {
        let mut filter = AdmissionFilter::new(64, 2);
        filter.record(&key(1));
        assert!(!filter.admits(&key(1)));
        filter.record(&key(1));
        assert!(filter.admits(&key(1)));
        assert!(!filter.admits(&key(2)));
        // Aging halves every count, so a block hit long ago falls below the threshold again.
        for _ in 0..10 * 256 {
            filter.record(&key(2));
        }
        assert!(filter.frequency(&key(1)) < 2);
        // A threshold of 0 or 1 admits even a block never seen (or aged out).
        assert!(AdmissionFilter::new(64, 0).admits(&key(3)) && AdmissionFilter::new(64, 1).admits(&key(3)));
    }
}
