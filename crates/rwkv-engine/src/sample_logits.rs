//! `PIPELINE.sample_logits` (spec §5.1): softmax, nucleus and top-k filtering, temperature, draw.
//!
//! The reference algorithm, for logits `l` over V tokens:
//!
//! 1. temperature 0 (or top_p 0) is greedy;
//! 2. `p = softmax(l)` in f32 over all V entries;
//! 3. nucleus: sort `p` descending, `cum` = f32 running sum, `cutoff` = the sorted value at the
//!    first index where `cum >= top_p`; keep every entry `>= cutoff` (ties at the cutoff included);
//! 4. top-k: additionally keep only the k largest entries (when `0 < k < V`);
//! 5. temperature **after** filtering: weights `p^(1/T)` on the kept entries;
//! 6. draw proportionally to the weights.
//!
//! Conscious deviations, all of which only remove arbitrariness or a numerical accident:
//!
//! * **`top_p >= 1` means "no nucleus filter".** In the reference, the f32 cumulative sum of 65,536
//!   sorted probabilities usually ends slightly *below* 1.0, no index qualifies, the cutoff becomes
//!   the largest probability, and `top_p = 1` silently collapses to greedy (spec §5.1, §7.2 item
//!   10). Likewise, when the running sum never reaches a `top_p < 1` (a value within rounding of
//!   1), nothing is cut instead of everything but the top token.
//! * **Ties are broken by the lower token id.** Greedy (temperature 0 or top_p 0) returns the
//!   lowest id among equal maxima, where the reference draws uniformly among them; top-k keeps the
//!   lower ids among equal probabilities, where numpy's argsort order is unspecified.
//! * **The temperature weight is computed as `exp((l - max) / T)`**, which equals `p^(1/T)` up to
//!   the factor `sum^(1/T)` that the normalisation removes. Unlike `p^(1/T)`, it cannot underflow
//!   to zero for every kept token at small T.
//! * NaN logits are treated as -inf (never sampled) and +inf as `f32::MAX`; if no token has a
//!   finite logit (everything banned), token 0 is returned.
//! * `exp` is a vectorisable polynomial within 2 ulp of libm's (numpy and torch use their own
//!   SIMD `exp` too), and the softmax denominator is summed in lanes rather than sequentially.
//!
//! Efficiency (V = 65,536): nothing is allocated per call (see [`SampleScratch`]), every pass over
//! the vocabulary vectorises, and instead of sorting all V probabilities, only the candidates
//! above a threshold are sorted. The threshold starts at `p_max / 16` and drops by 16x until the
//! candidates provably contain the nucleus (their mass reaches top_p) or the top-k (there are at
//! least k). Candidates are exactly a prefix of the global descending order, so the running sum,
//! cutoff and kept set are those of a full sort. A peaked distribution costs about five linear
//! passes; only a very flat one (a nucleus of thousands of tokens) pays for a large sort.

use rand::Rng;

use crate::logprobs::clean;
use crate::vecmath::{argmax, clean_and_max, exp_nonpositive, exp_shifted, mass_above};

/// Successive thresholds are `p_max / d` for these `d`, then 0 (every token). Each round costs
/// one linear pass; a peaked LM distribution almost always stops in the first or second round.
const THRESHOLD_DIVISORS: [f32; 4] = [16.0, 256.0, 4096.0, 65536.0];

/// Buffers reused across calls of [`sample_logits`], so that sampling never allocates.
///
/// Holds 12 bytes per vocabulary entry. It carries no state between calls, so an engine may share
/// one per worker thread instead of one per sequence.
#[derive(Debug, Clone, Default)]
pub struct SampleScratch {
    /// The unnormalised softmax `e = exp(l - max)`; after filtering, the sampling weights.
    probs: Vec<f32>,
    /// Candidates as [`sort_key`]s: sorted ascending, they run by descending probability, ties
    /// by ascending id. Sorting plain `u64`s is several times faster than sorting ids with a
    /// comparator that looks their probabilities up, which matters for flat distributions.
    order: Vec<u64>,
}

impl SampleScratch {
    /// Buffers sized for `vocab_size` logits, so that the first call does not allocate either.
    pub fn new(vocab_size: usize) -> Self {
        Self {
            probs: Vec::with_capacity(vocab_size),
            order: Vec::with_capacity(vocab_size),
        }
    }
}

/// Packs `(e, id)` so that ascending `u64` order is descending `e`, then ascending id. The bits
/// of a non-negative `f32` are ordered like its value, so inverting them reverses that order.
fn sort_key(id: u32, e: f32) -> u64 {
    (u64::from(!e.to_bits()) << 32) | u64::from(id)
}

/// The token id of a [`sort_key`].
fn key_id(key: u64) -> u32 {
    key as u32 // the low half is the id by construction
}

/// The `e` of a [`sort_key`].
fn key_e(key: u64) -> f32 {
    f32::from_bits(!((key >> 32) as u32))
}

/// Which tokens survived filtering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Every token (zero-probability ones simply get weight 0).
    All,
    /// The first `n` entries of `SampleScratch::order`.
    Prefix(usize),
}

/// Samples one token id from `logits` per spec §5.1 (with the deviations in the module docs).
///
/// `logits` is modified in place only to replace NaN by -inf and +inf by `f32::MAX`, and not at
/// all by greedy sampling (temperature or `top_p` 0). Expects
/// validated parameters: `temperature` in [0, 100], `top_p` in [0, 1]; `top_k` 0 or `>= V`
/// disables top-k.
pub fn sample_logits<R: Rng + ?Sized>(
    logits: &mut [f32],
    temperature: f32,
    top_p: f32,
    top_k: usize,
    scratch: &mut SampleScratch,
    rng: &mut R,
) -> u32 {
    debug_assert!(
        temperature >= 0.0 && temperature.is_finite(),
        "{temperature}"
    );
    debug_assert!((0.0..=1.0).contains(&top_p), "{top_p}");
    if temperature == 0.0 || top_p <= 0.0 {
        // Read-only: at a batch of 64 rows of 65,536 logits, this pass is the engine's largest
        // cost per decode step, and it is bound by memory traffic.
        return argmax(logits).0;
    }
    let max = clean_and_max(logits);
    if max == f32::NEG_INFINITY {
        // Nothing can be sampled; greedy's answer, token 0, keeps the result defined.
        return 0;
    }
    let filtered = top_p < 1.0 || (top_k > 0 && top_k < logits.len());
    if !filtered {
        // Nothing to cut: the T = 1 softmax is never needed, only the weights p^(1/T).
        return scratch.draw_all(logits, max, temperature, rng);
    }
    let sum = scratch.exponentiate(logits, max);
    match scratch.keep(sum, top_p, top_k) {
        Kept::Prefix(n) => scratch.draw_prefix(logits, max, n, temperature, rng),
        Kept::All => scratch.draw_all(logits, max, temperature, rng),
    }
}

impl SampleScratch {
    /// Fills `probs` with the unnormalised softmax `e = exp(l - max)` and returns `sum(e)`.
    ///
    /// Normalising all V entries would be a pass of its own; instead, the few values that need
    /// the probability `p = e · (1/sum)` compute it on the fly, with the same rounding as a
    /// normalised buffer (torch's softmax also multiplies by the reciprocal). Since the argmax has
    /// `e = 1`, thresholds relative to the largest probability are plain numbers in `e` space.
    fn exponentiate(&mut self, logits: &[f32], max: f32) -> f32 {
        self.probs.resize(logits.len(), 0.0);
        exp_shifted(logits, max, 1.0, &mut self.probs) as f32
    }

    /// Applies the nucleus and top-k filters to `probs` (holding `e`, summing to `sum`).
    fn keep(&mut self, sum: f32, top_p: f32, top_k: usize) -> Kept {
        let nucleus = (top_p < 1.0).then_some(top_p);
        let k = if top_k < self.probs.len() { top_k } else { 0 };
        if nucleus.is_none() && k == 0 {
            return Kept::All;
        }
        let needed_mass = f64::from(top_p) * f64::from(sum);
        let thresholds = THRESHOLD_DIVISORS.iter().map(|d| 1.0 / d);
        for threshold in thresholds.chain(std::iter::once(0.0)) {
            // A cheap vectorised pre-check, so that only a promising threshold pays for the
            // compaction and the sort.
            let (count, mass) = mass_above(&self.probs, threshold);
            let enough = threshold == 0.0
                || (k > 0 && count >= k)
                || (nucleus.is_some() && mass >= needed_mass);
            if enough {
                self.gather(threshold);
                if let Some(n) = self.prefix_len(nucleus, k, 1.0 / sum) {
                    return Kept::Prefix(n);
                }
            }
        }
        // The running sum over all V tokens stayed below top_p (rounding): cut nothing.
        Kept::All
    }

    /// Collects the ids with `e >= threshold` into `order`, in id order.
    fn gather(&mut self, threshold: f32) {
        const BLOCK: usize = 64;
        self.order.clear();
        for (b, block) in self.probs.chunks(BLOCK).enumerate() {
            // Most blocks hold no candidate: a branch-free check (vectorised) skips them, where
            // a plain filter costs a compare and a branch per token.
            if !block.iter().fold(false, |any, &e| any | (e >= threshold)) {
                continue;
            }
            let base = (b * BLOCK) as u32;
            let ids = (base..).zip(block.iter().copied());
            let keys = ids.filter(|&(_, e)| e >= threshold);
            self.order.extend(keys.map(|(id, e)| sort_key(id, e)));
        }
    }

    /// Sorts the candidates and returns how many of them survive both filters, or `None` when
    /// the nucleus is not decided by these candidates and more are needed.
    fn prefix_len(&mut self, nucleus: Option<f32>, k: usize, inv_sum: f32) -> Option<usize> {
        let order = &mut self.order;
        if k > 0 && order.len() > k {
            // Anything beyond the k best is cut by top-k anyway; selecting first keeps the sort
            // at O(k log k).
            order.select_nth_unstable(k - 1);
            order.truncate(k);
        }
        order.sort_unstable();
        let Some(top_p) = nucleus else {
            return Some(order.len());
        };
        let prob = |key: u64| key_e(key) * inv_sum;
        let mut cum = 0.0f32;
        for (i, &key) in order.iter().enumerate() {
            cum += prob(key);
            if cum >= top_p {
                // Ties are judged on the rounded probabilities, as the reference compares them.
                let cutoff = prob(key);
                let ties = order[i + 1..].iter().take_while(|&&t| prob(t) == cutoff);
                return Some(i + 1 + ties.count());
            }
        }
        // Unreached nucleus: if these are the k best, top-k decides; otherwise widen the net.
        (k > 0 && order.len() == k).then_some(k)
    }

    /// Draws from all V tokens with probability proportional to `p^(1/T)`.
    fn draw_all<R: Rng + ?Sized>(
        &mut self,
        logits: &[f32],
        max: f32,
        temperature: f32,
        rng: &mut R,
    ) -> u32 {
        self.probs.resize(logits.len(), 0.0);
        let total = exp_shifted(logits, max, 1.0 / temperature, &mut self.probs);
        let u = rng.gen::<f64>() * total;
        pick(u, (0..logits.len() as u32).zip(self.probs.iter().copied()))
    }

    /// Draws from the first `n` tokens of `order` with probability proportional to `p^(1/T)`.
    fn draw_prefix<R: Rng + ?Sized>(
        &mut self,
        logits: &[f32],
        max: f32,
        n: usize,
        temperature: f32,
        rng: &mut R,
    ) -> u32 {
        let Self { probs, order } = self;
        let kept = &order[..n];
        if temperature != 1.0 {
            let inv_t = 1.0 / temperature;
            for &key in kept {
                let id = key_id(key) as usize;
                probs[id] = exp_nonpositive((logits[id] - max) * inv_t);
            }
        }
        let weighted = kept
            .iter()
            .map(|&key| (key_id(key), probs[key_id(key) as usize]));
        draw(weighted, rng)
    }
}

/// Draws from the tokens that a backend's filters kept (`rwkv_model::OutputRows::Nucleus`;
/// best first, with their logits) the way [`sample_logits`] draws from the kept tokens of a
/// whole row: weights `exp((l - max) / T)` with `max` the best logit, one `f64` from `rng`.
/// NaN counts as -inf and +inf as `f32::MAX`; with nothing drawable, token 0 (no draw), as
/// [`sample_logits`] answers a row without a finite logit.
pub fn draw_kept<R: Rng + ?Sized>(
    kept: &[rwkv_model::Candidate],
    temperature: f32,
    rng: &mut R,
) -> u32 {
    let max = kept.first().map_or(f32::NEG_INFINITY, |c| clean(c.logit));
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let inv_t = 1.0 / temperature;
    let weighted = kept
        .iter()
        .map(|c| (c.token, exp_nonpositive((clean(c.logit) - max) * inv_t)));
    draw(weighted, rng)
}

/// One draw from `(id, weight)` pairs in proportion to their weights: a single `f64` from `rng`
/// scaled by the total, then [`pick`].
fn draw<R: Rng + ?Sized>(weighted: impl Iterator<Item = (u32, f32)> + Clone, rng: &mut R) -> u32 {
    let total: f64 = weighted.clone().map(|(_, w)| f64::from(w)).sum();
    let u = rng.gen::<f64>() * total;
    pick(u, weighted)
}

/// Inverse-CDF walk: the first `(id, weight)` whose cumulative weight exceeds `u`.
fn pick(mut u: f64, weights: impl Iterator<Item = (u32, f32)>) -> u32 {
    let mut last = 0;
    for (id, w) in weights.filter(|&(_, w)| w > 0.0) {
        let w = f64::from(w);
        if u < w {
            return id;
        }
        u -= w;
        last = id;
    }
    // Rounding in the subtraction can leave `u` just above the last weight.
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// Draws `n` tokens and returns how often each id came up.
    fn histogram(logits: &[f32], t: f32, top_p: f32, top_k: usize, n: usize) -> Vec<usize> {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut scratch = SampleScratch::new(logits.len());
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            let mut l = logits.to_vec();
            counts[sample_logits(&mut l, t, top_p, top_k, &mut scratch, &mut rng) as usize] += 1;
        }
        counts
    }

    /// Pearson's chi-square of observed counts against expected probabilities (over `ids`).
    fn chi_square(counts: &[usize], expected: &[(usize, f64)]) -> f64 {
        let n: usize = expected.iter().map(|&(id, _)| counts[id]).sum();
        let term = |&(id, p): &(usize, f64)| {
            let e = p * n as f64;
            (counts[id] as f64 - e).powi(2) / e
        };
        expected.iter().map(term).sum()
    }

    /// The first maximum, by definition.
    fn greedy(logits: &[f32]) -> usize {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        logits.iter().position(|&l| l == max).unwrap_or(0)
    }

    fn ln(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// Normally distributed logits with standard deviation `std` (Box-Muller).
    fn random_logits(v: usize, std: f32, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut normal = || {
            let (u1, u2): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
        };
        (0..v).map(|_| std * normal()).collect()
    }

    /// Spec §5.1 done literally with a full sort (plus this module's documented deviations).
    fn reference_kept(probs: &[f32], top_p: f32, top_k: usize) -> Vec<u32> {
        let mut order: Vec<u32> = (0..probs.len() as u32).collect();
        order.sort_by(|&a, &b| {
            probs[b as usize]
                .total_cmp(&probs[a as usize])
                .then(a.cmp(&b))
        });
        let mut cum = 0.0f32;
        let first = order.iter().position(|&id| {
            cum += probs[id as usize];
            cum >= top_p
        });
        let cutoff = match first {
            Some(i) if top_p < 1.0 => probs[order[i] as usize],
            _ => 0.0,
        };
        let k = if top_k > 0 && top_k < probs.len() {
            top_k
        } else {
            probs.len()
        };
        let mut kept: Vec<u32> = order[..k]
            .iter()
            .copied()
            .filter(|&id| probs[id as usize] >= cutoff)
            .collect();
        kept.sort_unstable();
        kept
    }

    /// The normalised softmax, rounded exactly as the sampler rounds it.
    fn softmax(scratch: &mut SampleScratch, logits: &[f32]) -> Vec<f32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let inv_sum = 1.0 / scratch.exponentiate(logits, max);
        scratch.probs.iter().map(|&e| e * inv_sum).collect()
    }

    fn fast_kept(
        scratch: &mut SampleScratch,
        logits: &[f32],
        top_p: f32,
        top_k: usize,
    ) -> Vec<u32> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = scratch.exponentiate(logits, max);
        let mut kept: Vec<u32> = match scratch.keep(sum, top_p, top_k) {
            Kept::All => (0..logits.len() as u32).collect(),
            Kept::Prefix(n) => scratch.order[..n].iter().map(|&k| key_id(k)).collect(),
        };
        kept.sort_unstable();
        kept
    }

    #[test]
    fn greedy_picks_the_argmax_and_the_lowest_id_among_ties() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut scratch = SampleScratch::default();
        let mut logits = [1.0, 3.0, f32::NAN, 3.0, 2.0];
        assert_eq!(
            sample_logits(&mut logits, 0.0, 0.85, 0, &mut scratch, &mut rng),
            1
        );
        assert_eq!(
            sample_logits(&mut logits, 1.0, 0.0, 0, &mut scratch, &mut rng),
            1
        );
    }

    #[test]
    fn temperature_zero_is_greedy_whatever_top_p_and_top_k() {
        let logits = random_logits(65536, 2.0, 3);
        let best = greedy(&logits);
        let counts = histogram(&logits, 0.0, 1.0, 0, 50);
        assert_eq!(counts[best], 50);
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let logits = random_logits(65536, 1.0, 4);
        let best = greedy(&logits);
        assert_eq!(histogram(&logits, 1.0, 1.0, 1, 50)[best], 50);
        assert_eq!(histogram(&[0.0, 2.0, 2.0], 1.0, 1.0, 1, 20)[1], 20);
    }

    #[test]
    fn tiny_top_p_equals_greedy() {
        let logits = random_logits(65536, 1.0, 5);
        let best = greedy(&logits);
        assert_eq!(histogram(&logits, 1.0, 1e-6, 0, 50)[best], 50);
    }

    #[test]
    fn nucleus_tokens_only_and_at_renormalised_frequencies() {
        // Sorted running sum 0.4, 0.65, 0.8, 0.9 >= 0.85: the nucleus is the first four; the
        // other 993 tokens share the remaining 1 %.
        let head = [0.15f32, 0.05, 0.4, 0.02, 0.1, 0.25, 0.03];
        let mut probs = head.to_vec();
        probs.resize(1000, 0.01 / 993.0);
        let counts = histogram(&ln(&probs), 1.0, 0.85, 0, 2000);
        let nucleus = [2usize, 5, 0, 4];
        let inside: usize = nucleus.iter().map(|&id| counts[id]).sum();
        assert_eq!(inside, 2000, "drew outside the nucleus");
        let expected: Vec<(usize, f64)> = nucleus
            .iter()
            .map(|&id| (id, f64::from(probs[id]) / 0.9))
            .collect();
        // 3 degrees of freedom: P(chi2 > 25) < 2e-5, and the seed is fixed anyway.
        let chi2 = chi_square(&counts, &expected);
        assert!(chi2 < 25.0, "chi2 {chi2}, counts {:?}", &counts[..7]);
    }

    #[test]
    fn temperature_is_applied_after_filtering_as_p_to_the_one_over_t() {
        // Nucleus at T = 1 is {0, 1}. Applying T = 2 first would flatten it to three tokens.
        let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
        for (t, n) in [(2.0f32, 4000), (0.5, 4000)] {
            let counts = histogram(&logits, t, 0.7, 0, n);
            assert_eq!(counts[0] + counts[1], n, "T = {t}: {counts:?}");
            let (w0, w1) = (
                0.5f64.powf(1.0 / f64::from(t)),
                0.3f64.powf(1.0 / f64::from(t)),
            );
            let expected = [(0, w0 / (w0 + w1)), (1, w1 / (w0 + w1))];
            // 1 degree of freedom: P(chi2 > 20) < 1e-5.
            let chi2 = chi_square(&counts, &expected);
            assert!(chi2 < 20.0, "T = {t}: chi2 {chi2}, counts {counts:?}");
        }
    }

    #[test]
    fn top_p_one_keeps_every_token_instead_of_collapsing_to_greedy() {
        let logits = random_logits(65536, 1.0, 6);
        let mut scratch = SampleScratch::new(logits.len());
        assert_eq!(fast_kept(&mut scratch, &logits, 1.0, 0).len(), 65536);
        let counts = histogram(&logits, 1.0, 1.0, 0, 200);
        assert!(counts.iter().filter(|&&c| c > 0).count() > 150);
    }

    #[test]
    fn thresholded_filtering_matches_a_full_sort() {
        let mut scratch = SampleScratch::new(65536);
        for (seed, std) in [(10u64, 0.5f32), (11, 1.0), (12, 3.0), (13, 8.0)] {
            let mut logits = random_logits(65536, std, seed);
            let probs = softmax(&mut scratch, &logits);
            for top_p in [0.1, 0.5, 0.85, 0.99, 0.999_999, 1.0] {
                for top_k in [0, 1, 40, 5000] {
                    let want = reference_kept(&probs, top_p, top_k);
                    let got = fast_kept(&mut scratch, &logits, top_p, top_k);
                    assert_eq!(got, want, "std {std} top_p {top_p} top_k {top_k}");
                }
            }
            // Coarse logits produce many exact ties at the cutoff: all must be kept.
            logits
                .iter_mut()
                .for_each(|l| *l = (*l * 2.0).round() / 2.0);
            let probs = softmax(&mut scratch, &logits);
            for top_p in [0.3, 0.85] {
                assert_eq!(
                    fast_kept(&mut scratch, &logits, top_p, 0),
                    reference_kept(&probs, top_p, 0)
                );
            }
        }
    }

    #[test]
    fn nan_logits_are_never_sampled_and_all_banned_gives_token_zero() {
        let counts = histogram(&[f32::NAN, 0.0, f32::NAN, 0.0], 1.0, 1.0, 0, 200);
        assert_eq!(counts[0] + counts[2], 0);
        let counts = histogram(&[f32::NEG_INFINITY; 4], 1.0, 0.85, 0, 5);
        assert_eq!(counts[0], 5);
        let counts = histogram(&[0.0, f32::INFINITY, 5.0], 0.7, 1.0, 0, 20);
        assert_eq!(counts[1], 20);
    }

    #[test]
    fn sampling_does_not_grow_the_scratch_buffers() {
        let logits = random_logits(65536, 2.0, 8);
        let mut scratch = SampleScratch::new(65536);
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let ptrs = (scratch.probs.as_ptr(), scratch.order.as_ptr());
        for (t, p, k) in [
            (1.0, 0.85, 0),
            (0.7, 1.0, 0),
            (1.3, 0.5, 40),
            (1.0, 1.0, 100),
        ] {
            let mut l = logits.clone();
            sample_logits(&mut l, t, p, k, &mut scratch, &mut rng);
        }
        assert_eq!(ptrs, (scratch.probs.as_ptr(), scratch.order.as_ptr()));
    }
}
