//! The prefix state cache: states saved at chosen token positions, found again by the longest
//! cached prefix of a new request's tokens.
//!
//! An RWKV state is valid for exactly the token sequence that produced it, so the key is
//! (tenant, model id, prefix length, hash of the prefix). Lookup hashes the request's prefixes
//! incrementally and probes only the lengths this tenant has stored, longest first; a hit is
//! verified against the stored tokens, so a hash collision can only cost a miss, never a wrong
//! state. Entries are host-memory copies bounded by bytes with LRU eviction; losing one costs
//! recomputation, never data. Tenants never see each other's entries.

use std::collections::{BTreeMap, HashMap};

use rwkv_model::State;

use crate::tiers::{LruStore, Weigh};

/// Identifies one cached state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PrefixKey {
    pub tenant: String,
    pub model: String,
    /// Prefix length in tokens (the state's position).
    pub len: usize,
    /// [`prefix_hash`] of the prefix.
    pub hash: u64,
}

/// A cached state and the exact tokens that produced it (checked on every hit), with the
/// logits after the last token when they were at hand (prompt ends): with them, a request for
/// exactly these tokens samples its first token without running the model.
#[derive(Clone, Debug)]
pub struct CachedPrefix {
    pub tokens: Vec<u32>,
    pub state: State,
    pub logits: Option<Vec<f32>>,
}

impl Weigh for CachedPrefix {
    fn bytes(&self) -> usize {
        let logits = self.logits.as_deref().map_or(0, std::mem::size_of_val);
        self.state.bytes() + std::mem::size_of_val(self.tokens.as_slice()) + logits
    }
}

/// Hashes of every prefix of `tokens`: element `i` hashes `tokens[..i]` (FNV-1a over token ids).
pub fn prefix_hashes(tokens: &[u32]) -> Vec<u64> {
    let mut out = Vec::with_capacity(tokens.len() + 1);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    out.push(h);
    for &t in tokens {
        h = (h ^ u64::from(t)).wrapping_mul(0x0000_0100_0000_01b3);
        // An extra avalanche step so that nearby token ids do not give nearby hashes.
        h ^= h >> 29;
        out.push(h);
    }
    out
}

/// The hash of the whole of `tokens`.
pub fn prefix_hash(tokens: &[u32]) -> u64 {
    prefix_hashes(tokens).last().copied().unwrap_or_default()
}

/// Hit and miss counters, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Tokens whose prefill a hit skipped.
    pub tokens_saved: u64,
}

/// The prefix cache of one model.
#[derive(Debug)]
pub struct PrefixCache {
    model: String,
    store: LruStore<PrefixKey, CachedPrefix>,
    /// Per tenant, the stored prefix lengths (with entry counts), so a lookup probes only those.
    lengths: HashMap<String, BTreeMap<usize, usize>>,
    stats: CacheStats,
}

impl PrefixCache {
    /// An empty cache for `model` holding at most `capacity_bytes` (0 disables caching).
    pub fn new(model: impl Into<String>, capacity_bytes: usize) -> Self {
        Self {
            model: model.into(),
            store: LruStore::new(capacity_bytes),
            lengths: HashMap::new(),
            stats: CacheStats::default(),
        }
    }

    /// Saves `state` as the state after exactly `tokens` for `tenant`.
    pub fn insert(&mut self, tenant: &str, tokens: &[u32], state: State) {
        self.insert_with_logits(tenant, tokens, state, None);
    }

    /// [`Self::insert`], with the logits the model gave after the last token.
    pub fn insert_with_logits(
        &mut self,
        tenant: &str,
        tokens: &[u32],
        state: State,
        logits: Option<Vec<f32>>,
    ) {
        if tokens.is_empty() {
            return;
        }
        let key = self.key(tenant, tokens.len(), prefix_hash(tokens));
        let is_new = !self.store.contains(&key);
        // The same prefix saved again without logits (a generation that ended before feeding its
        // last token is saved at its prompt's end): the state is the same, so keep the logits.
        let logits = match logits {
            Some(logits) => Some(logits),
            None => self
                .store
                .remove(&key)
                .filter(|old| old.tokens == tokens)
                .and_then(|old| old.logits),
        };
        let entry = CachedPrefix {
            tokens: tokens.to_vec(),
            state,
            logits,
        };
        let evicted = self.store.insert(key.clone(), entry);
        if is_new {
            *self
                .lengths
                .entry(key.tenant.clone())
                .or_default()
                .entry(key.len)
                .or_default() += 1;
        }
        for (gone, _) in evicted {
            self.forget_length(&gone);
        }
    }

    /// The longest cached prefix of `tokens` no longer than `max_len`: its length and state.
    pub fn lookup(
        &mut self,
        tenant: &str,
        tokens: &[u32],
        max_len: usize,
    ) -> Option<(usize, &State)> {
        let max_len = max_len.min(tokens.len());
        if max_len == 0 {
            // A one-token prompt leaves nothing that a cached state could cover (and an empty
            // `1..=0` range would panic in BTreeMap::range).
            self.stats.misses += 1;
            return None;
        }
        let candidates: Vec<usize> = self
            .lengths
            .get(tenant)
            .map(|l| l.range(1..=max_len).rev().map(|(&len, _)| len).collect())
            .unwrap_or_default();
        let hashes = prefix_hashes(&tokens[..max_len]);
        let found = candidates.into_iter().find_map(|len| {
            let key = self.key(tenant, len, hashes[len]);
            let verified = self
                .store
                .get(&key)
                .is_some_and(|e| e.tokens == tokens[..len]);
            verified.then_some((len, key))
        });
        match found {
            Some((len, key)) => {
                self.stats.hits += 1;
                self.stats.tokens_saved += len as u64;
                self.store.get(&key).map(|e| (len, &e.state))
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// The state after exactly `tokens` and the logits that follow it, if both are cached:
    /// the whole prompt is a hit, and nothing needs to run before sampling.
    pub fn lookup_exact(&mut self, tenant: &str, tokens: &[u32]) -> Option<(&State, &[f32])> {
        if tokens.is_empty() {
            return None;
        }
        let key = self.key(tenant, tokens.len(), prefix_hash(tokens));
        let hit = self
            .store
            .get(&key)
            .is_some_and(|e| e.tokens == tokens && e.logits.is_some());
        if !hit {
            return None;
        }
        self.stats.hits += 1;
        self.stats.tokens_saved += tokens.len() as u64;
        let entry = self.store.get(&key)?;
        Some((&entry.state, entry.logits.as_deref()?))
    }

    /// Hit and miss counts so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Number of cached states.
    pub fn len(&self) -> usize {
        self.store.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }

    /// Bytes held.
    pub fn used_bytes(&self) -> usize {
        self.store.used_bytes()
    }

    fn key(&self, tenant: &str, len: usize, hash: u64) -> PrefixKey {
        PrefixKey {
            tenant: tenant.to_owned(),
            model: self.model.clone(),
            len,
            hash,
        }
    }

    fn forget_length(&mut self, key: &PrefixKey) {
        let Some(lengths) = self.lengths.get_mut(&key.tenant) else {
            return;
        };
        if let Some(count) = lengths.get_mut(&key.len) {
            *count -= 1;
            if *count == 0 {
                lengths.remove(&key.len);
            }
        }
        if lengths.is_empty() {
            self.lengths.remove(&key.tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rwkv_model::{DType, ModelConfig};

    fn cfg() -> ModelConfig {
        ModelConfig {
            n_embd: 8,
            n_layer: 1,
            n_head: 1,
            head_size: 8,
            dim_ffn: 16,
            vocab_size: 10,
            maa_lora: 2,
            decay_lora: 2,
            weight_dtype: DType::F32,
            has_time_state: false,
        }
    }

    fn state(tag: f32) -> State {
        let mut s = State::zeros(&cfg());
        s.as_flat_mut()[0] = tag;
        s
    }

    fn hit(cache: &mut PrefixCache, tenant: &str, tokens: &[u32]) -> Option<(usize, f32)> {
        cache
            .lookup(tenant, tokens, tokens.len())
            .map(|(len, s)| (len, s.as_flat()[0]))
    }

    #[test]
    fn the_longest_cached_prefix_wins() {
        let mut cache = PrefixCache::new("m", 1 << 20);
        cache.insert("t", &[1, 2], state(2.0));
        cache.insert("t", &[1, 2, 3, 4], state(4.0));
        cache.insert("t", &[1, 2, 9], state(9.0));
        assert_eq!(hit(&mut cache, "t", &[1, 2, 3, 4, 5]), Some((4, 4.0)));
        assert_eq!(hit(&mut cache, "t", &[1, 2, 3, 7]), Some((2, 2.0)));
        assert_eq!(hit(&mut cache, "t", &[5, 1, 2]), None);
        // `max_len` keeps at least one token to feed.
        assert_eq!(cache.lookup("t", &[1, 2, 3, 4], 3).map(|h| h.0), Some(2));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.tokens_saved), (3, 1, 8));
    }

    #[test]
    fn a_one_token_prompt_is_a_miss_not_a_panic() {
        let mut cache = PrefixCache::new("m", 1 << 20);
        cache.insert("t", &[1, 2], state(2.0));
        assert!(cache.lookup("t", &[1], 0).is_none());
        assert!(cache.lookup("t", &[], 5).is_none());
        assert!(cache.lookup("nobody", &[1], 0).is_none());
    }

    #[test]
    fn tenants_never_see_each_others_states() {
        let mut cache = PrefixCache::new("m", 1 << 20);
        cache.insert("a", &[1, 2, 3], state(1.0));
        assert_eq!(hit(&mut cache, "b", &[1, 2, 3, 4]), None);
        assert_eq!(hit(&mut cache, "a", &[1, 2, 3, 4]), Some((3, 1.0)));
    }

    #[test]
    fn a_hash_collision_is_a_miss_not_a_wrong_state() {
        let mut cache = PrefixCache::new("m", 1 << 20);
        // Store a state under the key of [1, 2, 3] but recorded as produced by other tokens.
        let key = cache.key("t", 3, prefix_hash(&[1, 2, 3]));
        let bogus = CachedPrefix {
            tokens: vec![7, 7, 7],
            state: state(7.0),
            logits: Some(vec![0.0; 4]),
        };
        cache.store.insert(key, bogus);
        cache.lengths.entry("t".into()).or_default().insert(3, 1);
        assert_eq!(hit(&mut cache, "t", &[1, 2, 3, 4]), None);
        assert!(cache.lookup_exact("t", &[1, 2, 3]).is_none());
    }

    #[test]
    fn capacity_is_explicit_and_eviction_is_lru() {
        let one = state(0.0).bytes() + 3 * 4;
        let mut cache = PrefixCache::new("m", 2 * one);
        cache.insert("t", &[1, 1, 1], state(1.0));
        cache.insert("t", &[2, 2, 2], state(2.0));
        assert!(hit(&mut cache, "t", &[1, 1, 1, 0]).is_some()); // [2, 2, 2] is now the oldest.
        cache.insert("t", &[3, 3, 3], state(3.0));
        assert_eq!(cache.len(), 2);
        assert!(cache.used_bytes() <= 2 * one);
        assert_eq!(hit(&mut cache, "t", &[2, 2, 2, 0]), None);
        assert_eq!(hit(&mut cache, "t", &[3, 3, 3, 0]), Some((3, 3.0)));
        let mut off = PrefixCache::new("m", 0);
        off.insert("t", &[1], state(1.0));
        assert!(off.is_empty());
    }

    #[test]
    fn saving_the_same_prefix_again_without_logits_keeps_them() {
        let mut cache = PrefixCache::new("m", 1 << 20);
        cache.insert_with_logits("t", &[1, 2, 3], state(1.0), Some(vec![0.5; 10]));
        // A generation that ended before feeding a token saves its prompt's end again.
        cache.insert("t", &[1, 2, 3], state(1.0));
        let (s, logits) = cache
            .lookup_exact("t", &[1, 2, 3])
            .expect("still an exact hit");
        assert_eq!((s.as_flat()[0], logits), (1.0, &[0.5; 10][..]));
        assert_eq!(cache.len(), 1);
    }
}
