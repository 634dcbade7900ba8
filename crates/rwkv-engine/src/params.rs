//! Per-request sampling parameters, their defaults and their validation.
//!
//! The defaults are the reference `PIPELINE_ARGS` (spec §5.2). [`SamplingParams::validate`] checks
//! everything that does not depend on the model; [`crate::Sampler::new`] additionally checks token
//! ids against the vocabulary.

/// Largest accepted temperature. Beyond this, p^(1/T) is indistinguishable from uniform over the
/// kept set, so larger values are almost certainly a client mistake.
pub const MAX_TEMPERATURE: f32 = 100.0;

/// Accepted magnitude of the presence and frequency penalties (the OpenAI range).
///
/// Negative values are allowed on purpose: as in the OpenAI API they *encourage* repetition, and
/// the arithmetic of spec §5.2 works unchanged with them.
pub const MAX_PENALTY: f32 = 2.0;

/// Everything that steers how one sequence picks its next token and when it stops.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy. Applied after filtering, as p^(1/T) (spec §5.1). Range [0, 100].
    pub temperature: f32,
    /// Nucleus mass in [0, 1]. 0 is greedy; 1 disables the nucleus filter (see [`crate::sampler`]).
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens; 0 (or at least the vocabulary size) disables it.
    pub top_k: usize,
    /// Subtracted once from every token generated so far (`alpha_presence`).
    pub presence_penalty: f32,
    /// Subtracted per decayed occurrence (`alpha_frequency`).
    pub frequency_penalty: f32,
    /// Factor applied to every occurrence count before each new token is recorded (`alpha_decay`).
    pub penalty_decay: f32,
    /// Token ids whose logit is forced to -inf before penalties and sampling.
    pub token_ban: Vec<u32>,
    /// Ids at or above this are banned like `token_ban` (the caller's tokenizer has no text for
    /// them: World has 65530 ids, the models 65536); `None`, or the vocabulary size or more,
    /// bans none. Kept apart from `token_ban` so that a backend can still decide a sampled
    /// row's kept set ([`rwkv_model::Nucleus::below`]).
    pub sample_below: Option<u32>,
    /// Token ids that end the generation when sampled; the stop token is neither recorded nor emitted.
    pub stop_tokens: Vec<u32>,
    /// Token ids that end the generation after being emitted: they are recorded, sent and stay
    /// in a session's conversation (a chat turn's closing `\n\n`).
    pub end_tokens: Vec<u32>,
    /// Texts that end the generation; matched across token boundaries by `rwkv_tokenizer::StopChecker` (the router's job).
    pub stop_strings: Vec<String>,
    /// RNG seed; `None` draws one from the OS (the chosen seed is still reported by the sampler).
    pub seed: Option<u64>,
    /// Upper bound on generated tokens (the reference `generate` default `token_count` is 100).
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    /// The reference `PIPELINE_ARGS` defaults.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 0.85,
            top_k: 0,
            presence_penalty: 0.2,
            frequency_penalty: 0.2,
            penalty_decay: 0.996,
            token_ban: Vec::new(),
            sample_below: None,
            stop_tokens: Vec::new(),
            end_tokens: Vec::new(),
            stop_strings: Vec::new(),
            seed: None,
            max_tokens: 100,
        }
    }
}

/// Why a set of sampling parameters was rejected. Every message names the field and its limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// A float field is NaN, infinite or outside its range.
    #[error("`{field}` must be a finite number in {allowed}, got {value}")]
    OutOfRange {
        field: &'static str,
        allowed: &'static str,
        value: f32,
    },
    /// A token id in `token_ban` or `stop_tokens` does not exist in the model's vocabulary.
    #[error("`{field}` contains token id {id}, but the vocabulary only has ids 0..{vocab_size}")]
    TokenOutOfVocab {
        field: &'static str,
        id: u32,
        vocab_size: usize,
    },
    /// An empty stop string would match before the first token and end every generation at once.
    #[error("`stop_strings[{index}]` is empty; stop strings must contain at least one character")]
    EmptyStopString { index: usize },
    /// The sampler was built for a model without logits.
    #[error("`vocab_size` must be at least 1")]
    EmptyVocab,
    /// More banned ids than the vocabulary has (repeats included).
    #[error("`token_ban` lists {len} ids; at most the vocabulary's {vocab_size}")]
    TooManyBans { len: usize, vocab_size: usize },
    /// `sample_below` of 0 bans every token.
    #[error("`sample_below` must be at least 1 (0 bans every token)")]
    NothingToSample,
}

impl SamplerError {
    /// The offending request field, for error bodies that point at a parameter.
    pub fn field(&self) -> &'static str {
        match self {
            Self::OutOfRange { field, .. } | Self::TokenOutOfVocab { field, .. } => field,
            Self::EmptyStopString { .. } => "stop_strings",
            Self::EmptyVocab => "vocab_size",
            Self::NothingToSample => "sample_below",
            Self::TooManyBans { .. } => "token_ban",
        }
    }

    /// A stable machine-readable name for the error (error bodies and metric labels).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::OutOfRange { .. } => "out_of_range",
            Self::TokenOutOfVocab { .. } => "token_out_of_vocab",
            Self::EmptyStopString { .. } => "empty_stop_string",
            Self::EmptyVocab => "empty_vocab",
            Self::NothingToSample => "nothing_to_sample",
            Self::TooManyBans { .. } => "too_many_bans",
        }
    }
}

impl SamplingParams {
    /// Checks every field that does not depend on the model.
    ///
    /// Ranges: temperature [0, 100], top_p [0, 1], presence and frequency penalties [-2, 2]
    /// (negative values encourage repetition), penalty_decay [0, 1]; NaN and infinities are
    /// rejected everywhere; stop strings must be non-empty. `top_k`, `seed` and `max_tokens`
    /// accept any value (context limits are the engine's business).
    pub fn validate(&self) -> Result<(), SamplerError> {
        check(
            "temperature",
            self.temperature,
            0.0,
            MAX_TEMPERATURE,
            "[0, 100]",
        )?;
        check("top_p", self.top_p, 0.0, 1.0, "[0, 1]")?;
        let (lo, hi) = (-MAX_PENALTY, MAX_PENALTY);
        check("presence_penalty", self.presence_penalty, lo, hi, "[-2, 2]")?;
        check(
            "frequency_penalty",
            self.frequency_penalty,
            lo,
            hi,
            "[-2, 2]",
        )?;
        check("penalty_decay", self.penalty_decay, 0.0, 1.0, "[0, 1]")?;
        if self.sample_below == Some(0) {
            return Err(SamplerError::NothingToSample);
        }
        match self.stop_strings.iter().position(String::is_empty) {
            Some(index) => Err(SamplerError::EmptyStopString { index }),
            None => Ok(()),
        }
    }

    /// [`Self::validate`] plus the checks that need the model's vocabulary size.
    pub fn validate_for_vocab(&self, vocab_size: usize) -> Result<(), SamplerError> {
        if vocab_size == 0 {
            return Err(SamplerError::EmptyVocab);
        }
        self.validate()?;
        // Each choice holds its own copy and every step scans it: no longer than the vocabulary.
        if self.token_ban.len() > vocab_size {
            return Err(SamplerError::TooManyBans {
                len: self.token_ban.len(),
                vocab_size,
            });
        }
        check_ids("token_ban", &self.token_ban, vocab_size)?;
        check_ids("stop_tokens", &self.stop_tokens, vocab_size)?;
        check_ids("end_tokens", &self.end_tokens, vocab_size)
    }
}

fn check(
    field: &'static str,
    value: f32,
    lo: f32,
    hi: f32,
    allowed: &'static str,
) -> Result<(), SamplerError> {
    // `contains` is false for NaN, so NaN is rejected by the same test as out-of-range values.
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(SamplerError::OutOfRange {
            field,
            allowed,
            value,
        })
    }
}

fn check_ids(field: &'static str, ids: &[u32], vocab_size: usize) -> Result<(), SamplerError> {
    match ids.iter().find(|&&id| id as usize >= vocab_size) {
        Some(&id) => Err(SamplerError::TokenOutOfVocab {
            field,
            id,
            vocab_size,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(params: SamplingParams) -> &'static str {
        params.validate_for_vocab(100).unwrap_err().field()
    }

    #[test]
    fn defaults_are_the_reference_pipeline_args_and_valid() {
        let p = SamplingParams::default();
        assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 0.85, 0));
        assert_eq!((p.presence_penalty, p.frequency_penalty), (0.2, 0.2));
        assert_eq!(p.penalty_decay, 0.996);
        assert!(p.token_ban.is_empty() && p.stop_tokens.is_empty() && p.seed.is_none());
        assert_eq!(p.validate_for_vocab(65536), Ok(()));
    }

    #[test]
    fn validation_errors_name_the_field_and_the_range() {
        let base = SamplingParams::default;
        let err = SamplingParams {
            temperature: f32::NAN,
            ..base()
        }
        .validate()
        .unwrap_err();
        assert_eq!(err.field(), "temperature");
        let msg = err.to_string();
        assert!(
            msg.contains("`temperature`") && msg.contains("[0, 100]"),
            "{msg}"
        );

        let t = |temperature| {
            field_of(SamplingParams {
                temperature,
                ..base()
            })
        };
        assert_eq!(t(-0.1), "temperature");
        assert_eq!(t(100.5), "temperature");
        let p = |top_p| field_of(SamplingParams { top_p, ..base() });
        assert_eq!(p(1.01), "top_p");
        assert_eq!(p(-0.01), "top_p");
        let presence = SamplingParams {
            presence_penalty: f32::INFINITY,
            ..base()
        };
        assert_eq!(field_of(presence), "presence_penalty");
        let frequency = SamplingParams {
            frequency_penalty: -2.5,
            ..base()
        };
        assert_eq!(field_of(frequency), "frequency_penalty");
        let decay = SamplingParams {
            penalty_decay: 1.5,
            ..base()
        };
        assert_eq!(field_of(decay), "penalty_decay");
    }

    #[test]
    fn negative_penalties_and_edge_values_are_accepted() {
        let p = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            presence_penalty: -2.0,
            frequency_penalty: -0.5,
            penalty_decay: 0.0,
            ..SamplingParams::default()
        };
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn token_ids_outside_the_vocabulary_are_rejected_by_field() {
        let ban = SamplingParams {
            token_ban: vec![3, 100],
            ..SamplingParams::default()
        };
        let err = ban.validate_for_vocab(100).unwrap_err();
        assert_eq!(err.field(), "token_ban");
        assert!(err.to_string().contains("0..100"), "{err}");
        let stop = SamplingParams {
            stop_tokens: vec![1000],
            ..SamplingParams::default()
        };
        assert_eq!(field_of(stop), "stop_tokens");
        assert_eq!(
            SamplingParams::default().validate_for_vocab(0),
            Err(SamplerError::EmptyVocab)
        );
    }

    #[test]
    fn empty_stop_strings_are_rejected_with_their_index() {
        let p = SamplingParams {
            stop_strings: vec!["\n\n".into(), String::new()],
            ..SamplingParams::default()
        };
        assert_eq!(
            p.validate(),
            Err(SamplerError::EmptyStopString { index: 1 })
        );
        assert_eq!(p.validate().unwrap_err().kind(), "empty_stop_string");
    }
}
