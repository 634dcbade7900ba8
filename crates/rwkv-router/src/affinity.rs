//! Which worker holds the state after which token prefix: the router's half of cache-aware
//! routing. Workers cache the state at the end of every prompt and generation; the router
//! remembers where each of those ended, keyed by a hash of the token prefix, and sends a new
//! request to the worker holding its longest remembered prefix. It is a hint: a worker may have
//! evicted the state since, which costs a prefill, never a wrong answer.

use std::collections::{HashMap, VecDeque};

/// Bounded map from prefix hash to worker id; the oldest entries go first.
#[derive(Debug)]
pub struct Affinity {
    holders: HashMap<u64, String>,
    order: VecDeque<u64>,
    capacity: usize,
}

/// FNV-1a over token ids, extended one token at a time so every prefix's hash costs O(1).
fn extend(hash: u64, token: u32) -> u64 {
    let mut h = hash;
    for byte in token.to_le_bytes() {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

const SEED: u64 = 0xcbf2_9ce4_8422_2325;

fn hash(tokens: &[u32]) -> u64 {
    tokens.iter().fold(SEED, |h, &t| extend(h, t))
}

impl Affinity {
    pub fn new(capacity: usize) -> Self {
        Self {
            holders: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn insert(&mut self, tokens: &[u32], worker: &str) {
        if tokens.is_empty() {
            return;
        }
        let key = hash(tokens);
        if self.holders.insert(key, worker.to_owned()).is_none() {
            self.order.push_back(key);
            while self.order.len() > self.capacity {
                if let Some(old) = self.order.pop_front() {
                    self.holders.remove(&old);
                }
            }
        }
    }

    /// The worker holding the longest remembered prefix of `tokens` (the whole of it included).
    pub fn longest(&self, tokens: &[u32]) -> Option<String> {
        let mut best = None;
        let mut h = SEED;
        for &t in tokens {
            h = extend(h, t);
            if let Some(worker) = self.holders.get(&h) {
                best = Some(worker);
            }
        }
        best.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_remembered_prefix_wins() {
        let mut a = Affinity::new(8);
        a.insert(&[1, 2], "short");
        a.insert(&[1, 2, 3, 4], "long");
        assert_eq!(a.longest(&[1, 2, 3, 4, 5]).as_deref(), Some("long"));
        assert_eq!(a.longest(&[1, 2, 3]).as_deref(), Some("short"));
        assert_eq!(a.longest(&[2, 2, 3]), None);
    }

    #[test]
    fn capacity_evicts_the_oldest() {
        let mut a = Affinity::new(2);
        a.insert(&[1], "a");
        a.insert(&[2], "b");
        a.insert(&[3], "c");
        assert_eq!(a.longest(&[1]), None);
        assert_eq!(a.longest(&[3]).as_deref(), Some("c"));
    }
}
