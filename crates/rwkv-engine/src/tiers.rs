//! Host-memory tiers: a byte-bounded LRU store, used for swapped-out session states (the host
//! tier) and, through [`crate::prefix_cache`], for cached prefix states.
//!
//! States are exact f32 copies made by `Backend::save_state`, so a swap-out followed by a swap-in
//! restores the very same numbers. Eviction is explicit: [`LruStore::insert`] returns what it
//! dropped, so the owner can record that those states must now be recomputed.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

use rwkv_model::State;

/// Anything whose memory footprint the store should count.
pub trait Weigh {
    /// Bytes held.
    fn bytes(&self) -> usize;
}

impl Weigh for State {
    fn bytes(&self) -> usize {
        std::mem::size_of_val(self.as_flat())
    }
}

/// A map bounded by the total [`Weigh::bytes`] of its values, evicting the least recently used.
#[derive(Debug)]
pub struct LruStore<K, V> {
    capacity: usize,
    used: usize,
    tick: u64,
    entries: HashMap<K, (V, u64)>,
    /// Last-use tick to key; the first entry is the eviction victim.
    order: BTreeMap<u64, K>,
}

impl<K: Clone + Eq + Hash, V: Weigh> LruStore<K, V> {
    /// An empty store holding at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            used: 0,
            tick: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Stores `value` under `key` (replacing any previous value) and returns every entry evicted
    /// to make room. A value larger than the whole capacity is returned at once, not stored.
    pub fn insert(&mut self, key: K, value: V) -> Vec<(K, V)> {
        let mut evicted = Vec::new();
        // A replaced value is superseded, not evicted, so it is not reported.
        self.remove(&key);
        let size = value.bytes();
        if size > self.capacity {
            evicted.push((key, value));
            return evicted;
        }
        while self.used + size > self.capacity {
            match self.pop_lru() {
                Some(entry) => evicted.push(entry),
                None => break,
            }
        }
        self.used += size;
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(key, (value, self.tick));
        evicted
    }

    /// The value under `key`, marked as just used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.touch(key);
        self.entries.get(key).map(|(v, _)| v)
    }

    /// Whether `key` is stored (does not count as a use).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// Takes the value out of the store.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        let (value, tick) = self.entries.remove(key)?;
        self.order.remove(&tick);
        self.used -= value.bytes();
        Some(value)
    }

    /// Bytes held now.
    pub fn used_bytes(&self) -> usize {
        self.used
    }

    /// The byte bound.
    pub fn capacity_bytes(&self) -> usize {
        self.capacity
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn touch(&mut self, key: &K) {
        if let Some((_, tick)) = self.entries.get_mut(key) {
            self.order.remove(tick);
            self.tick += 1;
            *tick = self.tick;
            self.order.insert(self.tick, key.clone());
        }
    }

    fn pop_lru(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let (value, _) = self.entries.remove(&key)?;
        self.used -= value.bytes();
        Some((key, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Blob(usize);
    impl Weigh for Blob {
        fn bytes(&self) -> usize {
            self.0
        }
    }

    fn keys(evicted: &[(u32, Blob)]) -> Vec<u32> {
        evicted.iter().map(|(k, _)| *k).collect()
    }

    #[test]
    fn least_recently_used_entries_are_evicted_first() {
        let mut store = LruStore::new(30);
        assert!(store.insert(1, Blob(10)).is_empty());
        assert!(store.insert(2, Blob(10)).is_empty());
        assert!(store.insert(3, Blob(10)).is_empty());
        assert!(store.get(&1).is_some()); // 2 is now the oldest.
        assert_eq!(keys(&store.insert(4, Blob(15))), vec![2, 3]);
        assert_eq!((store.len(), store.used_bytes()), (2, 25));
    }

    #[test]
    fn oversized_values_are_refused_and_replacements_are_not_evictions() {
        let mut store = LruStore::new(30);
        store.insert(1, Blob(10));
        assert_eq!(keys(&store.insert(2, Blob(31))), vec![2]);
        assert!(!store.contains(&2));
        assert!(store.insert(1, Blob(20)).is_empty());
        assert_eq!(store.used_bytes(), 20);
        assert_eq!(store.remove(&1).map(|b| b.0), Some(20));
        assert!(store.is_empty() && store.used_bytes() == 0);
    }
}
