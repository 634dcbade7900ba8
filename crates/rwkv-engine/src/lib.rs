//! The RWKV-6 inference engine, independent of any backend and of any network layer.
//!
//! This crate owns token sampling now, and will own the continuous-batching step loop, the
//! scheduler and the state tiers (slots, state cache). It speaks token ids and logits only.
//!
//! It deliberately does not: run the model (that is a `Backend` from `rwkv-model`, implemented by
//! `rwkv-cpu` and `rwkv-cuda`), tokenize, or talk gRPC/HTTP/etcd. It never depends on tonic,
//! etcd-client, cudarc or any backend crate.
//!
//! Modules:
//! - [`params`]: [`SamplingParams`] (defaults = reference `PIPELINE_ARGS`) and [`SamplerError`].
//! - [`sampler`]: [`Sampler`], the per-sequence sampler (bans, penalties, seeded RNG).
//! - [`mod@sample_logits`]: the stateless `PIPELINE.sample_logits` port and its documented deviations.
//! - [`penalty`]: decayed presence/frequency penalties and the frequency-exempt token rule.
//! - [`stop`]: [`StopChecker`], stop strings matched across token boundaries.
//! - [`logprobs`]: log-probabilities of the chosen token and the top alternatives.
//! - `vecmath` (private): branch-free, vectorisable passes over the vocabulary.

pub mod logprobs;
pub mod params;
pub mod penalty;
pub mod sample_logits;
pub mod sampler;
pub mod stop;
mod vecmath;

pub use logprobs::{token_logprobs, Logprobs};
pub use params::{SamplerError, SamplingParams};
pub use penalty::{is_frequency_exempt, Penalties};
pub use sample_logits::{sample_logits, SampleScratch};
pub use sampler::Sampler;
pub use stop::{StopChecker, StopOutcome};
