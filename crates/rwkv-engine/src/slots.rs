//! Device slots: who holds each of the backend's state slots.
//!
//! A slot is free, held by a running sequence (not tracked here: the sequence owns it), or
//! parked: an idle session whose state stays on the device so that its next turn starts at
//! once. Parked slots are reclaimable; the engine swaps the least recently parked one out to the
//! host tier ([`crate::tiers`]) when it needs a slot and none is free. Admission counts free plus
//! parked slots, so memory per session is known in advance and nothing is over-committed.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// The backend's slots, as free and parked sets.
#[derive(Debug)]
pub struct SlotTable<K> {
    total: usize,
    free: Vec<usize>,
    parked: HashMap<K, (usize, u64)>,
    /// Park tick to key: the first entry is the swap-out victim.
    order: BTreeMap<u64, K>,
    tick: u64,
}

impl<K: Clone + Eq + Hash> SlotTable<K> {
    /// All `total` slots free.
    pub fn new(total: usize) -> Self {
        Self {
            total,
            // Reversed so that `pop` hands out slot 0 first (easier to read in logs).
            free: (0..total).rev().collect(),
            parked: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
        }
    }

    /// Number of slots of the backend.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Slots a new sequence could get now: free ones plus reclaimable parked ones.
    pub fn available(&self) -> usize {
        self.free.len() + self.parked.len()
    }

    /// Free slots (no swap needed).
    pub fn free_len(&self) -> usize {
        self.free.len()
    }

    /// Parked slots.
    pub fn parked_len(&self) -> usize {
        self.parked.len()
    }

    /// Takes a free slot, if any.
    pub fn take_free(&mut self) -> Option<usize> {
        self.free.pop()
    }

    /// Returns a slot to the free set.
    pub fn release(&mut self, slot: usize) {
        debug_assert!(slot < self.total && !self.free.contains(&slot));
        self.free.push(slot);
    }

    /// Parks an idle session's state in `slot`.
    pub fn park(&mut self, key: K, slot: usize) {
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        if let Some((_, old)) = self.parked.insert(key, (slot, self.tick)) {
            self.order.remove(&old);
        }
    }

    /// The slot where `key` is parked, removed from the parked set (the caller now owns it).
    pub fn unpark(&mut self, key: &K) -> Option<usize> {
        let (slot, tick) = self.parked.remove(key)?;
        self.order.remove(&tick);
        Some(slot)
    }

    /// The slot where `key` is parked, left parked.
    pub fn parked_slot(&self, key: &K) -> Option<usize> {
        self.parked.get(key).map(|&(slot, _)| slot)
    }

    /// Unparks the least recently parked session: the caller swaps its state out.
    pub fn pop_lru(&mut self) -> Option<(K, usize)> {
        let (_, key) = self.order.pop_first()?;
        let (slot, _) = self.parked.remove(&key)?;
        Some((key, slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parked_slots_are_reclaimed_least_recently_parked_first() {
        let mut t = SlotTable::new(3);
        let (a, b, c) = (
            t.take_free().unwrap(),
            t.take_free().unwrap(),
            t.take_free().unwrap(),
        );
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(t.available(), 0);
        t.park("x", a);
        t.park("y", b);
        t.park("x", a); // Re-parking refreshes x.
        assert_eq!(t.available(), 2);
        assert_eq!(t.pop_lru(), Some(("y", b)));
        assert_eq!(t.unpark(&"x"), Some(a));
        assert_eq!(t.pop_lru(), None);
        t.release(c);
        assert_eq!((t.free_len(), t.parked_len()), (1, 0));
    }
}
