//! Log-probabilities of the chosen token and its strongest alternatives.
//!
//! They are computed as `log_softmax` of the logits the sampler saw **after bans and penalties,
//! at temperature 1, before top-p/top-k filtering**. That is the distribution the nucleus is cut
//! from (spec §5.1 applies temperature only after filtering), it does not depend on sampling
//! settings that merely truncate it, and with zero penalties it is the model's own distribution,
//! which is what scoring clients (lm-eval's `logprobs` with `temperature=0`) expect.

use crate::vecmath;

/// The chosen token's log-probability and the `top_n` most likely tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprobs {
    /// The token that was sampled.
    pub token: u32,
    /// Its natural-log probability (`-inf` for a banned token).
    pub logprob: f32,
    /// Up to `top_n` `(token, logprob)` pairs, most likely first, ties by lower id.
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` evaluated at `token`, plus the `top_n` best alternatives.
///
/// NaN logits count as -inf and +inf as `f32::MAX` (the sampler does the same). If every logit
/// is -inf, all log-probabilities are -inf. Two passes over the logits, no allocation besides the
/// returned `top` vector.
pub fn token_logprobs(logits: &[f32], token: u32, top_n: usize) -> Logprobs {
    let row = LogSoftmax::new(logits);
    Logprobs {
        token,
        logprob: row.logprob(token),
        top: row.top(top_n),
    }
}

/// One row of logits read as log-probabilities (log-softmax at temperature 1), normalised once
/// so that several tokens can be scored against it (scoring reads one row for every
/// continuation's first token).
#[derive(Clone, Copy, Debug)]
pub struct LogSoftmax<'a> {
    logits: &'a [f32],
    log_z: f64,
    argmax: u32,
}

impl<'a> LogSoftmax<'a> {
    /// Two vectorised passes over the row: the maximum (and argmax), then the normaliser.
    pub fn new(logits: &'a [f32]) -> Self {
        let (argmax, max) = vecmath::argmax(logits);
        let log_z = if max == f32::NEG_INFINITY {
            // Nothing can be sampled; `l - max` would be NaN.
            f64::NEG_INFINITY
        } else {
            vecmath::log_sum_exp(logits, max)
        };
        Self {
            logits,
            log_z,
            argmax,
        }
    }

    /// `ln p(token)`; -inf for a token outside the row or with a -inf (or NaN) logit.
    pub fn logprob(&self, token: u32) -> f32 {
        match self.logits.get(token as usize) {
            Some(&logit) => self.of_logit(logit),
            None => f32::NEG_INFINITY,
        }
    }

    /// The most likely token, lowest id among ties: the token greedy sampling picks.
    pub fn argmax(&self) -> u32 {
        self.argmax
    }

    /// Up to `n` `(token, logprob)` pairs, most likely first, ties by lower id.
    pub fn top(&self, n: usize) -> Vec<(u32, f32)> {
        top_n_by_logit(self.logits, n)
            .into_iter()
            .map(|id| (id, self.of_logit(self.logits[id as usize])))
            .collect()
    }

    fn of_logit(&self, logit: f32) -> f32 {
        let logit = clean(logit);
        if logit == f32::NEG_INFINITY || self.log_z == f64::NEG_INFINITY {
            f32::NEG_INFINITY
        } else {
            (f64::from(logit) - self.log_z) as f32
        }
    }
}

/// Maps the non-finite logits that a buggy model or an over-eager bias can produce onto values
/// the arithmetic handles: NaN can never be chosen, +inf is merely the largest possible logit.
pub(crate) fn clean(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit.min(f32::MAX)
    }
}

/// Ids of the `n` largest logits, best first, ties by lower id, NaN never included.
///
/// A sorted insertion buffer of length `n` beats sorting V entries: `n` is small (OpenAI caps it
/// at 20) and most logits fail the first comparison against the current n-th best.
fn top_n_by_logit(logits: &[f32], n: usize) -> Vec<u32> {
    // Capped: `n` comes from requests, and a huge `n` must not reserve a huge buffer.
    let mut best: Vec<u32> = Vec::with_capacity(n.min(logits.len()));
    if n == 0 {
        return best;
    }
    for (id, &logit) in logits.iter().enumerate() {
        if logit.is_nan() {
            continue;
        }
        // Strict `>`: an equal logit with a higher id ranks after the ones already kept.
        let pos = best.partition_point(|&b| logits[b as usize] >= logit);
        if pos < n {
            if best.len() == n {
                best.pop();
            }
            best.insert(pos, id as u32);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() < 1e-6
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_logits() {
        let logits = [1.0f32, 2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        let lp = token_logprobs(&logits, 1, 2);
        assert_eq!(lp.token, 1);
        assert!(close(lp.logprob, 2.0 - z.ln()), "{lp:?}");
        assert_eq!(lp.top.len(), 2);
        assert_eq!((lp.top[0].0, lp.top[1].0), (2, 1));
        assert!(close(lp.top[0].1, 3.0 - z.ln()));
        let total: f64 = (0..4)
            .map(|t| f64::from(token_logprobs(&logits, t, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn banned_tokens_have_minus_infinite_logprob_and_rank_last() {
        let logits = [f32::NEG_INFINITY, 0.0, 0.0, f32::NAN];
        let lp = token_logprobs(&logits, 0, 4);
        assert_eq!(lp.logprob, f32::NEG_INFINITY);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2, 0]);
        assert!(close(lp.top[0].1, 0.5f64.ln()));
        assert_eq!(token_logprobs(&logits, 3, 0).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn an_infinite_logit_takes_all_the_mass() {
        let lp = token_logprobs(&[0.0, f32::INFINITY, 1.0], 1, 1);
        assert_eq!((lp.logprob, lp.top[0]), (0.0, (1, 0.0)));
    }

    #[test]
    fn top_alternatives_break_ties_by_lower_id_and_respect_n() {
        let logits = [5.0f32, 7.0, 5.0, 7.0, 1.0];
        let ids: Vec<u32> = token_logprobs(&logits, 4, 3)
            .top
            .iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(ids, [1, 3, 0]);
        assert!(token_logprobs(&logits, 4, 0).top.is_empty());
        assert_eq!(token_logprobs(&logits, 4, 10).top.len(), 5);
    }

    #[test]
    fn one_normalisation_scores_every_token_of_a_row() {
        let logits = [0.5f32, 3.0, f32::NAN, 3.0, -1.0];
        let row = LogSoftmax::new(&logits);
        for token in 0..6 {
            assert_eq!(
                row.logprob(token),
                token_logprobs(&logits, token, 0).logprob
            );
        }
        assert_eq!(row.logprob(5), f32::NEG_INFINITY, "outside the vocabulary");
        // The greedy sampler's choice: the lowest id among the maxima, never NaN.
        assert_eq!(row.argmax(), 1);
        assert_eq!(LogSoftmax::new(&[f32::NAN, f32::NEG_INFINITY]).argmax(), 0);
        assert_eq!(
            LogSoftmax::new(&[1.0, f32::INFINITY, f32::INFINITY]).argmax(),
            1
        );
        assert_eq!(row.top(2), token_logprobs(&logits, 0, 2).top);
        // A request's `top_logprobs` may be anything; the buffer is bounded by the row.
        assert_eq!(row.top(usize::MAX).len(), 4);
    }

    #[test]
    fn all_minus_infinity_gives_minus_infinity_everywhere() {
        let lp = token_logprobs(&[f32::NEG_INFINITY; 3], 2, 1);
        assert_eq!(lp.logprob, f32::NEG_INFINITY);
        assert_eq!(lp.top, [(0, f32::NEG_INFINITY)]);
    }
}
