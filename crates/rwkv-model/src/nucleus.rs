//! Sampling filters a backend may apply before the logits leave it ([`crate::OutputRows::Nucleus`]).
//!
//! A sampled decode draws from the tokens that the nucleus (top-p) and top-k filters of spec
//! §5.1 keep; temperature is applied after filtering, so it does not change which tokens are
//! kept. Usually that is a handful of tokens, so a GPU can rank a row's best
//! [`NUCLEUS_CANDIDATES`] on the device, compute the row's softmax denominator, decide the kept
//! set there and return it, instead of a whole vocabulary of floats. When those candidates do
//! not decide the kept set (a flat distribution), the backend returns the row instead.
//!
//! [`kept_prefix`] is the decision, the same arithmetic as the engine's sampler uses on a whole
//! row: probabilities `exp(l - max) · (1 / sum)` in f32, their running f32 sum over tokens by
//! descending probability (ties by lower id), the cutoff at the first running sum `>= top_p`
//! with every token equal to the cutoff kept, then at most `top_k` tokens.

use crate::backend::Candidate;

/// Most candidates a backend ranks for a [`crate::OutputRows::Nucleus`] row; a kept set larger
/// than this comes back as the whole row.
pub const NUCLEUS_CANDIDATES: usize = 64;

/// The filters of a sampled row: `top_p` in (0, 1] (1 = no nucleus filter), `top_k` 0 or the
/// vocabulary size for none; ids at or above `below` are banned (the caller's tokenizer has no
/// text for them), the vocabulary size or more for none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nucleus {
    pub top_p: f32,
    pub top_k: usize,
    pub below: usize,
}

impl Nucleus {
    /// Whether a kept set of at most [`NUCLEUS_CANDIDATES`] tokens is possible at all: without
    /// a nucleus filter and with no top-k at or below that, every token is kept.
    pub fn can_be_small(self, vocab: usize) -> bool {
        self.top_p < 1.0 || (self.top_k > 0 && self.top_k <= NUCLEUS_CANDIDATES.min(vocab))
    }
}

/// What a backend returns for a [`crate::OutputRows::Nucleus`] row.
#[derive(Clone, Debug, PartialEq)]
pub enum NucleusRow {
    /// Exactly the tokens the filters keep, best first, with their logits.
    Kept(Vec<Candidate>),
    /// The whole logits row: its best candidates did not decide the kept set.
    Row(Vec<f32>),
}

/// The tokens the filters keep, best first, from a row's best `candidates` (best first: logit
/// descending, NaN last, ties by lower id), its largest logit `max` and its softmax denominator
/// `sum` over all `vocab` tokens; `None` when they do not decide it (see [`kept_prefix`]).
///
/// Ids at or above `filter.below` are banned: they count as -inf, as the sampler bans them. A
/// banned candidate is dropped and its exact share taken out of `sum`. A banned id that is not
/// a candidate ranks after the last candidate, so its share is at most the last candidate's;
/// the kept set is decided only when it comes out the same with none and with all of that
/// unknown share removed. A banned best token leaves the denominator unknown: `None`.
pub fn kept_set(
    candidates: &[Candidate],
    max: f32,
    sum: f32,
    filter: Nucleus,
    vocab: usize,
) -> Option<Vec<Candidate>> {
    let below = filter.below.min(vocab);
    if below == vocab {
        return kept_prefix(candidates, max, sum, filter, vocab).map(|n| candidates[..n].to_vec());
    }
    let banned = |c: &&Candidate| c.token as usize >= below;
    if banned(&candidates.first()?) {
        return None;
    }
    let share = |c: &Candidate| (c.logit - max).exp();
    let known: f32 = candidates.iter().filter(banned).map(share).sum();
    let seen_banned = candidates.iter().filter(banned).count();
    let unseen_banned = (vocab - below).saturating_sub(seen_banned);
    let last = candidates.last()?;
    let bound = if candidates.len() >= vocab || unseen_banned == 0 {
        0.0
    } else {
        unseen_banned as f32 * share(last)
    };
    let allowed: Vec<Candidate> = candidates.iter().filter(|c| !banned(c)).copied().collect();
    let plain = Nucleus { below, ..filter };
    let most = sum - known;
    let n = kept_prefix(&allowed, max, most, plain, below)?;
    if bound > 0.0 && kept_prefix(&allowed, max, most - bound, plain, below) != Some(n) {
        return None;
    }
    Some(allowed[..n].to_vec())
}

/// How many of a row's best `candidates` (best first: logit descending, NaN last, ties by lower
/// id) the filters keep, given the row's largest logit `max` and softmax denominator
/// `sum = Σ exp(l - max)` over all `vocab` tokens; `None` when the candidates do not decide it
/// (the kept set may be larger, or a tie at the cutoff may continue past the last candidate).
pub fn kept_prefix(
    candidates: &[Candidate],
    max: f32,
    sum: f32,
    filter: Nucleus,
    vocab: usize,
) -> Option<usize> {
    // A NaN or zero denominator, or no finite logit: nothing to decide from.
    let has_mass = sum > 0.0 && max.is_finite();
    if candidates.is_empty() || !has_mass {
        return None;
    }
    let complete = candidates.len() >= vocab;
    let k = if filter.top_k > 0 && filter.top_k < vocab {
        filter.top_k
    } else {
        0
    };
    // The k best are all top-k can keep; ties past them are cut, so the list ends there.
    let (list, ends_the_row) = if k > 0 && candidates.len() >= k {
        (&candidates[..k], true)
    } else {
        (candidates, complete)
    };
    if filter.top_p >= 1.0 {
        return ends_the_row.then_some(list.len());
    }
    let inv_sum = 1.0 / sum;
    let prob = |c: &Candidate| {
        let l = if c.logit.is_nan() {
            f32::NEG_INFINITY
        } else {
            c.logit
        };
        (l - max).exp() * inv_sum
    };
    let mut cum = 0.0f32;
    for (i, c) in list.iter().enumerate() {
        let p = prob(c);
        cum += p;
        if cum >= filter.top_p {
            let ties = list[i + 1..].iter().take_while(|t| prob(t) == p).count();
            let kept = i + 1 + ties;
            // A tie run that reaches the end of a truncated list may go on beyond it.
            return (kept < list.len() || ends_the_row).then_some(kept);
        }
    }
    // The nucleus was not reached: top-k decides if these are the k best (or the whole row,
    // whose running sum stayed below top_p by rounding: nothing is cut).
    ends_the_row.then_some(list.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(logits: &[f32]) -> Vec<Candidate> {
        logits
            .iter()
            .enumerate()
            .map(|(i, &logit)| Candidate {
                token: i as u32,
                logit,
            })
            .collect()
    }

    /// max and denominator of a whole row.
    fn mass(row: &[f32]) -> (f32, f32) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (max, row.iter().map(|l| (l - max).exp()).sum())
    }

    fn filter(top_p: f32, top_k: usize) -> Nucleus {
        Nucleus {
            top_p,
            top_k,
            below: usize::MAX,
        }
    }

    #[test]
    fn the_nucleus_is_the_shortest_prefix_reaching_top_p() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (as logits of their logs).
        let row: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125]
            .iter()
            .map(|p| p.ln())
            .collect();
        let (max, sum) = mass(&row);
        let all = cands(&row);
        assert_eq!(kept_prefix(&all, max, sum, filter(0.5, 0), 4), Some(1));
        assert_eq!(kept_prefix(&all, max, sum, filter(0.6, 0), 4), Some(2));
        // The cutoff 0.125 ties with the last token: both are kept.
        assert_eq!(kept_prefix(&all, max, sum, filter(0.8, 0), 4), Some(4));
        // Top-k cuts the nucleus; top-k alone keeps k.
        assert_eq!(kept_prefix(&all, max, sum, filter(0.8, 2), 4), Some(2));
        assert_eq!(kept_prefix(&all, max, sum, filter(1.0, 3), 4), Some(3));
        // No filter: every token, decided only by the whole row.
        assert_eq!(kept_prefix(&all, max, sum, filter(1.0, 0), 4), Some(4));
        assert_eq!(kept_prefix(&all[..3], max, sum, filter(1.0, 0), 4), None);
    }

    #[test]
    fn too_few_candidates_leave_the_kept_set_undecided() {
        let row: Vec<f32> = [0.4f32, 0.3, 0.2, 0.05, 0.05]
            .iter()
            .map(|p| p.ln())
            .collect();
        let (max, sum) = mass(&row);
        let best = cands(&row[..3]);
        // 0.4 + 0.3 reaches 0.6 within the three best (the third, 0.2, is not a tie).
        assert_eq!(kept_prefix(&best, max, sum, filter(0.6, 0), 5), Some(2));
        // 0.9 reaches 0.8 at the last candidate: the next, unseen, might tie with it.
        assert_eq!(kept_prefix(&best, max, sum, filter(0.8, 0), 5), None);
        // Not reached at all.
        assert_eq!(kept_prefix(&best, max, sum, filter(0.95, 0), 5), None);
        // A tie at the cutoff that reaches the last candidate may continue past it.
        let tied: Vec<f32> = [0.5f32, 0.1, 0.1, 0.1, 0.1, 0.1]
            .iter()
            .map(|p| p.ln())
            .collect();
        let (max, sum) = mass(&tied);
        assert_eq!(
            kept_prefix(&cands(&tied[..3]), max, sum, filter(0.55, 0), 6),
            None
        );
        assert_eq!(
            kept_prefix(&cands(&tied), max, sum, filter(0.55, 0), 6),
            Some(6)
        );
        // Unless top-k ends the list there.
        assert_eq!(
            kept_prefix(&cands(&tied[..3]), max, sum, filter(0.55, 3), 6),
            Some(3)
        );
        // Nothing to decide from.
        assert_eq!(kept_prefix(&[], max, sum, filter(0.5, 0), 6), None);
        assert_eq!(
            kept_prefix(&cands(&tied), f32::NEG_INFINITY, 0.0, filter(0.5, 0), 6),
            None
        );
    }

    /// The row's `n` best, as a backend ranks them (logit descending, ties by lower id).
    fn best(row: &[f32], n: usize) -> Vec<Candidate> {
        let mut all = cands(row);
        all.sort_by(|a, b| b.logit.total_cmp(&a.logit).then(a.token.cmp(&b.token)));
        all.truncate(n);
        all
    }

    /// What the sampler keeps on the whole row with ids >= `below` banned (-inf).
    fn reference(row: &[f32], f: Nucleus) -> Vec<Candidate> {
        let allowed = &row[..f.below];
        let (max, sum) = mass(allowed);
        let all = best(allowed, allowed.len());
        let n = kept_prefix(&all, max, sum, f, allowed.len()).unwrap();
        all[..n].to_vec()
    }

    fn banned_tail(top_p: f32, top_k: usize, below: usize) -> Nucleus {
        Nucleus {
            below,
            ..filter(top_p, top_k)
        }
    }

    #[test]
    fn banned_ids_are_dropped_with_their_share_or_leave_the_set_undecided() {
        // Ten allowed ids, then two banned ones.
        let mut row: Vec<f32> = (0..12).map(|i| -(i as f32) * 0.5).collect();
        let f = banned_tail(0.7, 0, 10);
        // Banned ids far below everything (untrained rows of a real head): decided, and the
        // same as the sampler's, from 6 candidates that do not include them.
        row[10] = -40.0;
        row[11] = -41.0;
        let (max, sum) = mass(&row);
        let got = kept_set(&best(&row, 6), max, sum, f, 12);
        assert_eq!(got.as_deref(), Some(&reference(&row, f)[..]));
        // A banned id among the candidates: dropped, its exact share taken out.
        row[10] = -0.25;
        let (max, sum) = mass(&row);
        let cands = best(&row, 12);
        assert!(cands[..3].iter().any(|c| c.token == 10));
        let got = kept_set(&cands, max, sum, f, 12).unwrap();
        assert_eq!(got, reference(&row, f));
        assert!(got.iter().all(|c| c.token < 10));
        // Unseen banned ids that may hold enough to move the cutoff: undecided. With the two
        // at -3 (below the 6 best), the best token's probability is 0.381 counting them and
        // at most 0.407 without: a top_p of 0.39 keeps 2 tokens or 1.
        row[10] = -3.0;
        row[11] = -3.0;
        let (max, sum) = mass(&row);
        let f = banned_tail(0.39, 0, 10);
        assert_eq!(kept_set(&best(&row, 6), max, sum, f, 12), None);
        // All of them among the candidates: their shares are known, so it is decided.
        let got = kept_set(&best(&row, 12), max, sum, f, 12);
        assert_eq!(got.as_deref(), Some(&reference(&row, f)[..]));
        // A banned best token: its row's denominator over the allowed ids is unknown.
        row[11] = 5.0;
        let (max, sum) = mass(&row);
        assert_eq!(kept_set(&best(&row, 6), max, sum, f, 12), None);
    }

    #[test]
    fn a_decided_set_with_banned_ids_is_always_the_samplers() {
        let mut x = 7u64;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 40) as f32 / (1u64 << 24) as f32
        };
        let (mut decided, vocab) = (0, 200);
        for trial in 0..400 {
            let scale = [1.0, 4.0, 12.0][trial % 3];
            let row: Vec<f32> = (0..vocab).map(|_| scale * next()).collect();
            let below = vocab - 1 - trial % 20;
            let f = banned_tail([0.3, 0.6, 0.9][trial % 3], [0, 5, 40][trial % 3], below);
            let (max, sum) = mass(&row);
            if let Some(got) = kept_set(&best(&row, 64), max, sum, f, vocab) {
                assert_eq!(got, reference(&row, f), "trial {trial}");
                decided += 1;
            }
        }
        assert!(decided > 100, "only {decided} of 400 decided");
    }

    #[test]
    fn only_filters_that_can_keep_few_tokens_are_worth_asking_for() {
        assert!(filter(0.9, 0).can_be_small(65536));
        assert!(filter(1.0, 40).can_be_small(65536));
        assert!(!filter(1.0, 0).can_be_small(65536));
        assert!(!filter(1.0, 100).can_be_small(65536));
    }
}
