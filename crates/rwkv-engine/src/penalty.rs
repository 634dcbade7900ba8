//! Decayed presence/frequency repetition penalties (spec §5.2, `PIPELINE.generate` semantics).
//!
//! Per step the reference does: forward → bans → `logit[t] -= presence + occ[t]·frequency` for
//! every t seen so far → sample → (stop token? end, unrecorded) → multiply every occurrence by
//! `decay` → `occ[t] += 0 or 1`. Only generated tokens are tracked, never the prompt.

/// Occurrence counts of the tokens generated so far, and the penalty they cost.
///
/// Counts and coefficients are `f64` because the reference keeps them as Python floats; the
/// penalty is rounded to `f32` only when it is subtracted from the (`f32`) logit, as torch does.
#[derive(Debug, Clone, PartialEq)]
pub struct Penalties {
    presence: f64,
    frequency: f64,
    decay: f64,
    /// `(token, decayed count)` in first-seen order, like the reference dict. A dense `[V]` array
    /// would cost 512 KiB per sequence; the number of distinct generated tokens is small, and the
    /// decay already visits every entry per step, so a linear lookup adds no asymptotic cost.
    occurrences: Vec<(u32, f64)>,
}

impl Penalties {
    /// Empty counts with the given coefficients (`alpha_presence`, `alpha_frequency`, `alpha_decay`).
    pub fn new(presence: f32, frequency: f32, decay: f32) -> Self {
        Self {
            presence: widen(presence),
            frequency: widen(frequency),
            decay: widen(decay),
            occurrences: Vec::new(),
        }
    }

    /// Subtracts `presence + occ[t]·frequency` from the logit of every token seen so far.
    ///
    /// Ids beyond `logits.len()` are ignored rather than panicking: they cannot be sampled anyway.
    pub fn apply(&self, logits: &mut [f32]) {
        let (presence, frequency) = (self.presence, self.frequency);
        for &(token, occ) in &self.occurrences {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= (presence + occ * frequency) as f32;
            }
        }
    }

    /// Records a sampled (non-stop) token: decay every count, then add 1, or 0 when the token is
    /// exempt from the frequency part (see [`is_frequency_exempt`]). An exempt token still gets an
    /// entry, so it still pays the presence penalty from now on.
    pub fn record(&mut self, token: u32, excluded_from_frequency: bool) {
        for (_, occ) in &mut self.occurrences {
            *occ *= self.decay;
        }
        let add = if excluded_from_frequency { 0.0 } else { 1.0 };
        match self.occurrences.iter_mut().find(|(t, _)| *t == token) {
            Some((_, occ)) => *occ += add,
            None => self.occurrences.push((token, add)),
        }
    }

    /// The decayed count of `token`, or `None` if it was never generated (so pays no penalty).
    pub fn occurrence(&self, token: u32) -> Option<f64> {
        self.occurrences
            .iter()
            .find(|(t, _)| *t == token)
            .map(|&(_, occ)| occ)
    }

    /// Number of distinct tokens recorded.
    pub fn len(&self) -> usize {
        self.occurrences.len()
    }

    /// True before the first token is recorded.
    pub fn is_empty(&self) -> bool {
        self.occurrences.is_empty()
    }
}

/// The `f64` a client meant by this `f32`: `0.996f32` becomes `0.996`, not `0.99599999189`.
///
/// Requests carry decimal literals that the reference parses straight into Python (f64) floats.
/// Going through the shortest decimal that round-trips the `f32` recovers that literal, so that
/// the decayed counts match the reference bit for bit instead of drifting by 1e-8 per step.
fn widen(x: f32) -> f64 {
    // Display of any f32 (including NaN and inf) parses back as f64; the fallback is unreachable.
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// The characters whose runs the reference exempts from the frequency penalty.
const EXEMPT_TEXT: &[u8] = b" \t0123456789";

/// True when the token's decoded text is a substring of `" \t0123456789"`: a space, a tab, a
/// digit or an ascending digit run such as `"12"` (reference: `if ttt in ' \t0123456789'`).
///
/// Empty text is exempt, because in Python `'' in s` is `True` (e.g. the 20B tokenizer's special
/// tokens decode to `""`). Note that the World reference tokenizer decodes ids without bytes (0,
/// 65530..65535) and incomplete UTF-8 to U+FFFD, which is *not* exempt: callers that want the
/// reference behaviour pass the reference's decoded text, not the raw token bytes, for those ids.
pub fn is_frequency_exempt(text: &[u8]) -> bool {
    text.is_empty() || EXEMPT_TEXT.windows(text.len()).any(|w| w == text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_is_presence_plus_count_times_frequency() {
        let mut p = Penalties::new(0.2, 0.3, 0.996);
        p.record(2, false);
        p.record(2, false);
        let mut logits = [1.0f32; 4];
        p.apply(&mut logits);
        // Python: occ = 1 * 0.996 + 1; logit -= 0.2 + occ * 0.3 (f64, rounded once to f32).
        let occ = 0.996 + 1.0;
        assert_eq!(p.occurrence(2), Some(occ));
        assert_eq!(logits[2], 1.0 - (0.2 + occ * 0.3) as f32);
        assert_eq!([logits[0], logits[1], logits[3]], [1.0; 3]);
    }

    #[test]
    fn every_count_decays_before_the_new_token_is_added() {
        let mut p = Penalties::new(0.0, 1.0, 0.5);
        p.record(7, false); // {7: 1}
        p.record(9, false); // {7: 0.5, 9: 1}
        p.record(7, false); // {7: 1.25, 9: 0.5}
        assert_eq!(p.occurrence(7), Some(1.25));
        assert_eq!(p.occurrence(9), Some(0.5));
        assert_eq!(p.occurrence(1), None);
        assert_eq!(p.len(), 2);
    }

    #[test]
    fn exempt_tokens_pay_presence_but_not_frequency() {
        let mut p = Penalties::new(0.25, 0.5, 0.996);
        p.record(5, true);
        p.record(5, true);
        assert_eq!(p.occurrence(5), Some(0.0));
        let mut logits = [0.0f32; 6];
        p.apply(&mut logits);
        assert_eq!(logits[5], -0.25);
    }

    #[test]
    fn penalties_ignore_ids_beyond_the_logits_and_keep_bans_at_minus_infinity() {
        let mut p = Penalties::new(0.2, 0.2, 0.996);
        p.record(1, false);
        p.record(50, false);
        let mut logits = [0.0, f32::NEG_INFINITY];
        p.apply(&mut logits);
        assert_eq!(logits, [0.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn exempt_text_is_a_substring_of_space_tab_and_digits() {
        for text in ["", " ", "\t", "0", "7", "12", "3456789", " \t0", "\t01"] {
            assert!(is_frequency_exempt(text.as_bytes()), "{text:?}");
        }
        for text in ["21", "  ", "a", " a", "13", "\n", "\u{FFFD}", "0 "] {
            assert!(!is_frequency_exempt(text.as_bytes()), "{text:?}");
        }
        assert!(!is_frequency_exempt(b" \t0123456789x"));
    }
}
