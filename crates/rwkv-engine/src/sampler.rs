//! The per-sequence sampler: bans, repetition penalties and a seeded `sample_logits`.
//!
//! One [`Sampler`] lives as long as one reply (the reference resets the occurrence counts for
//! every reply). Per decode step the caller does, as `PIPELINE.generate` does (spec §5.2):
//!
//! 1. `let token = sampler.sample(&mut logits);` (bans, penalties, [`sample_logits`]);
//! 2. if `sampler.is_stop_token(token)`: stop; the token is neither recorded nor emitted;
//! 3. `sampler.record(token, is_frequency_exempt(text_of(token)))`;
//! 4. feed the decoded text to a `rwkv_tokenizer::StopChecker` (by whoever holds the tokenizer).
//!
//! A backend may rank a row where its logits are instead of returning it: a greedy decode without
//! penalties picks from the row's best tokens ([`Sampler::pick_from_candidates`]), a plain sampled
//! decode draws from the tokens its filters keep ([`Sampler::pick_from_kept`]); both give exactly
//! the token that [`Sampler::sample`] gives on the whole row.

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rwkv_model::{Candidate, Nucleus};

use crate::logprobs::{token_logprobs, Logprobs};
use crate::params::{SamplerError, SamplingParams};
use crate::penalty::Penalties;
use crate::sample_logits::{draw_kept, sample_logits, SampleScratch};

/// Samples the tokens of one sequence reproducibly.
///
/// The RNG is ChaCha20 seeded from [`SamplingParams::seed`], so the same seed, parameters and
/// logits give the same tokens on every platform. Without a seed, one is drawn from the OS and
/// reported by [`Sampler::seed`] so that the run can be replayed.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    vocab_size: usize,
    seed: u64,
    rng: ChaCha20Rng,
    penalties: Penalties,
    /// Reused buffers: sampling a 65,536-entry vocabulary allocates nothing after construction.
    scratch: SampleScratch,
}

impl Sampler {
    /// Validates `params` against a model with `vocab_size` logits and builds the sampler.
    pub fn new(params: SamplingParams, vocab_size: usize) -> Result<Self, SamplerError> {
        params.validate_for_vocab(vocab_size)?;
        let seed = params.seed.unwrap_or_else(rand::random);
        let penalties = Penalties::new(
            params.presence_penalty,
            params.frequency_penalty,
            params.penalty_decay,
        );
        Ok(Self {
            params,
            vocab_size,
            seed,
            rng: ChaCha20Rng::seed_from_u64(seed),
            penalties,
            scratch: SampleScratch::new(vocab_size),
        })
    }

    /// Picks the next token from the model's `logits` (one per vocabulary entry).
    ///
    /// In the reference order: banned logits become -inf, penalties are subtracted, then
    /// [`sample_logits`] runs. `logits` is left holding the banned and penalised values (NaN may
    /// stay NaN or become -inf; both count as -inf), which is what [`token_logprobs`] should see.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        debug_assert_eq!(logits.len(), self.vocab_size, "logits of the wrong model");
        self.ban_and_penalise(logits);
        let p = &self.params;
        let (temperature, top_p, top_k) = (p.temperature, p.top_p, p.top_k);
        sample_logits(
            logits,
            temperature,
            top_p,
            top_k,
            &mut self.scratch,
            &mut self.rng,
        )
    }

    /// [`Self::sample`], plus the log-probabilities of the chosen token and the `top_n` most likely
    /// tokens, computed on the banned and penalised logits at temperature 1, before filtering.
    pub fn sample_with_logprobs(&mut self, logits: &mut [f32], top_n: usize) -> Logprobs {
        let token = self.sample(logits);
        token_logprobs(logits, token, top_n)
    }

    /// How many of a row's best tokens ([`rwkv_model::OutputRows::Top`]) decide this sampler's
    /// next token exactly, or `None` if it needs the whole row. Greedy sampling without
    /// penalties picks the best token that is not banned, so the best `1 + bans` suffice.
    pub fn candidates_needed(&self) -> Option<usize> {
        let p = &self.params;
        let greedy = p.temperature == 0.0 || p.top_p <= 0.0;
        let no_penalties = p.presence_penalty == 0.0 && p.frequency_penalty == 0.0;
        let bans = p.token_ban.len() + (self.vocab_size - self.below());
        (greedy && no_penalties && bans < MAX_BANS_FOR_CANDIDATES)
            .then(|| (1 + bans).min(self.vocab_size))
    }

    /// Ids from here to the end of the vocabulary are banned ([`SamplingParams::sample_below`]).
    fn below(&self) -> usize {
        self.params
            .sample_below
            .map_or(self.vocab_size, |b| (b as usize).min(self.vocab_size))
    }

    fn is_banned(&self, token: u32) -> bool {
        token as usize >= self.below() || self.params.token_ban.contains(&token)
    }

    /// The token [`Self::sample`] would pick from the whole row, given the row's best tokens
    /// (best first; at least [`Self::candidates_needed`] of them): the first that is not banned,
    /// or token 0 if nothing can be chosen (every allowed logit is -inf or NaN), as greedy
    /// sampling of the row answers.
    pub fn pick_from_candidates(&self, candidates: &[Candidate]) -> u32 {
        let allowed = candidates.iter().find(|c| !self.is_banned(c.token));
        match allowed {
            Some(c) if !c.logit.is_nan() && c.logit != f32::NEG_INFINITY => c.token,
            _ => 0,
        }
    }

    /// The filters of a sampled decode that a backend may apply on its side
    /// ([`rwkv_model::OutputRows::Nucleus`]): temperature and top-p above 0, and top-p below 1
    /// or a small top-k, so that few tokens are kept; no bans or penalties, which change the
    /// logits before the filters. `None` where the whole row is needed.
    pub fn nucleus_filter(&self) -> Option<Nucleus> {
        let p = &self.params;
        let sampled = p.temperature > 0.0 && p.top_p > 0.0;
        let plain =
            p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 && p.token_ban.is_empty();
        let filter = Nucleus {
            top_p: p.top_p,
            top_k: p.top_k,
            below: self.below(),
        };
        (sampled && plain && filter.can_be_small(self.vocab_size)).then_some(filter)
    }

    /// Draws the next token from the tokens the backend's filter kept (best first; see
    /// [`Self::nucleus_filter`]), as [`Self::sample`] draws from the kept tokens of a row.
    pub fn pick_from_kept(&mut self, kept: &[Candidate]) -> u32 {
        draw_kept(kept, self.params.temperature, &mut self.rng)
    }

    /// Records a sampled, non-stop token for the repetition penalties (decay, then add 0 or 1).
    pub fn record(&mut self, token: u32, excluded_from_frequency: bool) {
        self.penalties.record(token, excluded_from_frequency);
    }

    /// True if sampling `token` ends the generation.
    pub fn is_stop_token(&self, token: u32) -> bool {
        self.params.stop_tokens.contains(&token)
    }

    /// True if emitting `token` ends the generation (it is emitted first, unlike a stop token).
    pub fn is_end_token(&self, token: u32) -> bool {
        self.params.end_tokens.contains(&token)
    }

    /// The seed in use: the requested one, or the one drawn from the OS.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The validated parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The occurrence counts recorded so far.
    pub fn penalties(&self) -> &Penalties {
        &self.penalties
    }

    fn ban_and_penalise(&self, logits: &mut [f32]) {
        for &token in &self.params.token_ban {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit = f32::NEG_INFINITY;
            }
        }
        let below = self.below().min(logits.len());
        logits[below..].fill(f32::NEG_INFINITY);
        self.penalties.apply(logits);
    }
}

/// Above this many banned tokens, greedy sampling reads the whole row rather than asking for
/// that many candidates.
const MAX_BANS_FOR_CANDIDATES: usize = 63;

#[cfg(test)]
mod tests {
    use super::*;

    fn params(seed: u64) -> SamplingParams {
        SamplingParams {
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    /// Generates `n` tokens from fixed logits, recording each one as `generate` would.
    fn run(sampler: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                let token = sampler.sample(&mut logits.to_vec());
                sampler.record(token, false);
                token
            })
            .collect()
    }

    fn flat(v: usize) -> Vec<f32> {
        (0..v).map(|i| (i % 7) as f32 * 0.1).collect()
    }

    #[test]
    fn same_seed_gives_the_same_sequence_and_different_seeds_differ() {
        let logits = flat(1000);
        let a = run(&mut Sampler::new(params(42), 1000).unwrap(), &logits, 64);
        let b = run(&mut Sampler::new(params(42), 1000).unwrap(), &logits, 64);
        let c = run(&mut Sampler::new(params(43), 1000).unwrap(), &logits, 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn an_unseeded_sampler_reports_a_seed_that_replays_it() {
        let logits = flat(1000);
        let mut first = Sampler::new(SamplingParams::default(), 1000).unwrap();
        let replay = params(first.seed());
        let a = run(&mut first, &logits, 32);
        assert_eq!(
            a,
            run(&mut Sampler::new(replay, 1000).unwrap(), &logits, 32)
        );
    }

    #[test]
    fn banned_tokens_are_never_sampled() {
        let mut logits = vec![0.0f32; 50];
        logits[3] = 100.0;
        logits[4] = 99.0;
        let p = SamplingParams {
            token_ban: vec![3, 4],
            top_p: 1.0,
            ..params(5)
        };
        let tokens = run(&mut Sampler::new(p, 50).unwrap(), &logits, 500);
        assert!(tokens.iter().all(|&t| t != 3 && t != 4));
    }

    #[test]
    fn penalties_and_decay_follow_the_reference_arithmetic() {
        let p = SamplingParams {
            temperature: 0.0,
            ..params(1)
        };
        let mut sampler = Sampler::new(p, 8).unwrap();
        sampler.record(5, false); // {5: 1}
        sampler.record(5, false); // {5: 1·0.996 + 1}
        sampler.record(3, true); // {5: 1.996·0.996, 3: 0}
        let occ5 = (1.0 * 0.996 + 1.0) * 0.996;
        assert_eq!(sampler.penalties().occurrence(5), Some(occ5));
        assert_eq!(sampler.penalties().occurrence(3), Some(0.0));
        let mut logits = [2.0f32; 8];
        sampler.sample(&mut logits);
        let (presence, frequency) = (0.2, 0.2);
        assert_eq!(logits[5], 2.0 - (presence + occ5 * frequency) as f32);
        assert_eq!(logits[3], 2.0 - presence as f32);
        assert_eq!(logits[0], 2.0);
    }

    #[test]
    fn penalties_steer_greedy_decoding_away_from_repeats() {
        let p = SamplingParams {
            temperature: 0.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.5,
            ..params(1)
        };
        let tokens = run(&mut Sampler::new(p, 3).unwrap(), &[0.9, 0.6, 0.0], 3);
        assert_eq!(tokens, [0, 1, 2]);
    }

    #[test]
    fn stop_tokens_are_recognised() {
        let p = SamplingParams {
            stop_tokens: vec![0, 261],
            ..params(1)
        };
        let sampler = Sampler::new(p, 65536).unwrap();
        assert!(sampler.is_stop_token(0) && sampler.is_stop_token(261));
        assert!(!sampler.is_stop_token(1));
    }

    #[test]
    fn logprobs_describe_the_penalised_distribution_before_filtering() {
        let p = SamplingParams {
            temperature: 0.0,
            token_ban: vec![2],
            ..params(1)
        };
        let mut sampler = Sampler::new(p, 3).unwrap();
        let lp = sampler.sample_with_logprobs(&mut [0.0, 0.0, 5.0], 3);
        assert_eq!(lp.token, 0);
        assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(lp.top[2], (2, f32::NEG_INFINITY));
    }

    #[test]
    fn invalid_parameters_are_rejected_at_construction() {
        let p = SamplingParams {
            top_p: 2.0,
            ..params(1)
        };
        assert_eq!(Sampler::new(p, 10).unwrap_err().field(), "top_p");
        let p = SamplingParams {
            token_ban: vec![10],
            ..params(1)
        };
        assert_eq!(Sampler::new(p, 10).unwrap_err().field(), "token_ban");
    }

    #[test]
    fn candidates_pick_exactly_what_greedy_sampling_of_the_row_picks() {
        let greedy = |ban: Vec<u32>| {
            Sampler::new(
                SamplingParams {
                    temperature: 0.0,
                    token_ban: ban,
                    presence_penalty: 0.0,
                    frequency_penalty: 0.0,
                    ..params(1)
                },
                8,
            )
            .unwrap()
        };
        let inf = f32::INFINITY;
        let rows: [[f32; 8]; 6] = [
            [0.5, 2.0, -1.0, 2.0, 0.0, 1.0, 3.0, 3.0],
            [f32::NAN, 1.0, 1.0, -inf, 0.0, 7.0, 7.0, 6.0],
            [-inf, -inf, f32::NAN, -inf, -inf, -inf, -inf, -inf],
            [inf, 0.0, inf, 9.0, 1.0, 1.0, 0.0, 0.0],
            [f32::NAN; 8],
            [0.0, -inf, -inf, -inf, -inf, -inf, -inf, 5.0],
        ];
        for ban in [
            vec![],
            vec![6],
            vec![6, 7, 5],
            vec![0, 3],
            vec![7, 0, 1, 2, 3, 4, 5, 6],
        ] {
            for row in &rows {
                let mut sampler = greedy(ban.clone());
                let k = sampler
                    .candidates_needed()
                    .expect("greedy without penalties");
                let candidates = rwkv_model::backend::top_candidates(row, k);
                let want = sampler.sample(&mut row.to_vec());
                assert_eq!(
                    sampler.pick_from_candidates(&candidates),
                    want,
                    "{row:?} banning {ban:?}"
                );
            }
        }
        // Sampling, penalties or logprobs need the whole row.
        let sampled = Sampler::new(params(1), 8).unwrap();
        assert_eq!(sampled.candidates_needed(), None);
        let penalised = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                presence_penalty: 0.5,
                frequency_penalty: 0.0,
                ..params(1)
            },
            8,
        )
        .unwrap();
        assert_eq!(penalised.candidates_needed(), None);
    }

    /// What a GPU does for a `Nucleus` row, on the host: rank the best candidates, compute the
    /// row's softmax denominator, decide the kept set.
    fn kept_by_backend(row: &[f32], filter: Nucleus) -> Option<Vec<Candidate>> {
        use rwkv_model::nucleus::{kept_set, NUCLEUS_CANDIDATES};
        let cands = rwkv_model::backend::top_candidates(row, NUCLEUS_CANDIDATES);
        let max = cands[0].logit;
        let sum: f64 = row.iter().map(|&l| f64::from((l - max).exp())).sum();
        kept_set(&cands, max, sum as f32, filter, row.len())
    }

    #[test]
    fn drawing_from_the_kept_set_is_drawing_from_the_row() {
        let vocab = 500;
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let (mut decided, mut undecided) = (0, 0);
        for i in 0..300u64 {
            // Peaked and flat rows: a few large logits over a noisy floor.
            let scale = [1.0, 3.0, 8.0][(i % 3) as usize];
            let row: Vec<f32> = (0..vocab)
                .map(|_| rand::Rng::gen::<f32>(&mut rng) * scale)
                .collect();
            let top_p = [0.3, 0.7, 0.95][(i / 3 % 3) as usize];
            let top_k = [0, 5, 40][(i / 9 % 3) as usize];
            let temperature = [0.7, 1.0, 1.3][(i / 27 % 3) as usize];
            // Half the rows ban their last ids, as a tokenizer with fewer ids than the model
            // asks: the backend drops them from its candidates and decides, or returns the row.
            let sample_below = [None, Some(vocab as u32 - 6)][(i % 2) as usize];
            let p = SamplingParams {
                temperature,
                top_p,
                top_k,
                sample_below,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                ..params(100 + i)
            };
            let mut from_row = Sampler::new(p.clone(), vocab).unwrap();
            let mut from_kept = Sampler::new(p, vocab).unwrap();
            let filter = from_kept.nucleus_filter().expect("a filter that keeps few");
            let Some(kept) = kept_by_backend(&row, filter) else {
                undecided += 1;
                continue;
            };
            decided += 1;
            // Several draws: the RNG streams stay in step.
            for _ in 0..4 {
                let want = from_row.sample(&mut row.clone());
                assert_eq!(from_kept.pick_from_kept(&kept), want, "row {i}");
            }
        }
        assert!(
            decided > 100 && undecided > 10,
            "{decided} decided, {undecided} not"
        );
    }

    /// `sample_below` bans the ids from it on: never sampled, skipped among greedy candidates
    /// (which grow to cover them), and carried to the backend with the nucleus filter.
    #[test]
    fn ids_from_sample_below_on_are_never_chosen() {
        let vocab = 10;
        let row: Vec<f32> = (0..vocab).map(|i| i as f32).collect();
        let mut hot = Sampler::new(
            SamplingParams {
                temperature: 1.0,
                top_p: 1.0,
                sample_below: Some(7),
                ..params(3)
            },
            vocab,
        )
        .unwrap();
        for _ in 0..50 {
            assert!(hot.sample(&mut row.clone()) < 7);
        }
        let mut greedy = Sampler::new(
            SamplingParams {
                temperature: 0.0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                sample_below: Some(7),
                ..params(3)
            },
            vocab,
        )
        .unwrap();
        assert_eq!(greedy.candidates_needed(), Some(4));
        let best = rwkv_model::backend::top_candidates(&row, 4);
        assert_eq!(greedy.pick_from_candidates(&best), 6);
        assert_eq!(greedy.sample(&mut row.clone()), 6);
        let plain = Sampler::new(
            SamplingParams {
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                sample_below: Some(7),
                ..params(1)
            },
            vocab,
        )
        .unwrap();
        assert_eq!(plain.nucleus_filter().map(|f| f.below), Some(7));
        let zero = SamplingParams {
            sample_below: Some(0),
            ..params(1)
        };
        assert_eq!(
            Sampler::new(zero, vocab).unwrap_err().field(),
            "sample_below"
        );
    }

    #[test]
    fn only_plain_sampled_decodes_ask_for_a_nucleus() {
        let sampled = Sampler::new(
            SamplingParams {
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                ..params(1)
            },
            8,
        )
        .unwrap();
        assert!(sampled.nucleus_filter().is_some());
        let with = |p: SamplingParams| Sampler::new(p, 8).unwrap().nucleus_filter();
        // Greedy, penalties, bans, or no filter at all: the whole row.
        assert_eq!(
            with(SamplingParams {
                temperature: 0.0,
                ..params(1)
            }),
            None
        );
        assert_eq!(
            with(SamplingParams {
                presence_penalty: 0.5,
                ..params(1)
            }),
            None
        );
        assert_eq!(
            with(SamplingParams {
                token_ban: vec![3],
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                ..params(1)
            }),
            None
        );
        assert_eq!(
            with(SamplingParams {
                top_p: 1.0,
                top_k: 0,
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                ..params(1)
            }),
            None
        );
        // Nothing drawable: token 0, as a row of -inf gives.
        let mut s = Sampler::new(params(1), 8).unwrap();
        let none = [Candidate {
            token: 5,
            logit: f32::NEG_INFINITY,
        }];
        assert_eq!(s.pick_from_kept(&none), 0);
    }
}
