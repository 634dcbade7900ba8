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
/// vocabulary size for none.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Nucleus {
    pub top_p: f32,
    pub top_k: usize,
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
        Nucleus { top_p, top_k }
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

    #[test]
    fn only_filters_that_can_keep_few_tokens_are_worth_asking_for() {
        assert!(filter(0.9, 0).can_be_small(65536));
        assert!(filter(1.0, 40).can_be_small(65536));
        assert!(!filter(1.0, 0).can_be_small(65536));
        assert!(!filter(1.0, 100).can_be_small(65536));
    }
}
