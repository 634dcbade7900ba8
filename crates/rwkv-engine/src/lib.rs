//! The RWKV-6 inference engine, independent of any backend and of any network layer.
//!
//! This crate owns the continuous-batching step loop ([`Engine`], on its own OS thread), the
//! pure scheduler, the state tiers (device slots, host tier, optional disk tier, prefix state
//! cache), preemption, multi-choice generations forked from one prefill, sessions with
//! export/import, and token sampling. It speaks token ids and logits only.
//!
//! It deliberately does not: run the model (that is a `Backend` from `rwkv-model`, implemented by
//! `rwkv-cpu` and `rwkv-cuda`), tokenize, or talk gRPC/HTTP/etcd. It never depends on tonic,
//! etcd-client, cudarc or any backend crate.
//!
//! Modules:
//! - [`engine`]: [`Engine`], [`EngineHandle`], [`EngineConfig`], [`EngineStats`].
//! - [`request`]: [`GenerateRequest`], [`GenerateStream`] and its [`GenerateEvent`]s.
//! - [`score`]: [`ScoreRequest`], [`ScoreResult`]: log-probabilities of continuations (eval).
//! - [`scheduler`]: [`Scheduler`], the pure per-step batch planner.
//! - [`slots`], [`tiers`]: device slot table and the byte-bounded LRU host store;
//!   `disk_tier` (private): session states the host tier evicts, in files.
//! - [`prefix_cache`]: [`PrefixCache`], longest-prefix lookup of cached states.
//! - [`sessions`]: tenant-scoped sessions; [`export`]: the session export format.
//! - [`mod@error`]: [`EngineError`], the one error type of the engine.
//! - `step_loop` (private): the engine thread's state and its steps; generations, forked
//!   choices, preemption and scoring jobs in its submodules.
//! - [`telemetry`]: metric names, their descriptions, and the step loop's metric handles.
//! - [`params`]: [`SamplingParams`] (defaults = reference `PIPELINE_ARGS`) and [`SamplerError`].
//! - [`sampler`]: [`Sampler`], the per-sequence sampler (bans, penalties, seeded RNG).
//! - [`mod@sample_logits`]: the stateless `PIPELINE.sample_logits` port and its documented deviations.
//! - [`penalty`]: decayed presence/frequency penalties and the frequency-exempt token rule.
//! - [`logprobs`]: log-probabilities of the chosen token and the top alternatives.
//! - `vecmath` (private): branch-free, vectorisable passes over the vocabulary.

mod disk_tier;
mod engine;
pub mod error;
pub mod export;
pub mod logprobs;
pub mod params;
pub mod penalty;
pub mod prefix_cache;
pub mod request;
pub mod sample_logits;
pub mod sampler;
pub mod scheduler;
pub mod score;
pub mod sessions;
pub mod slots;
mod step_loop;
pub mod telemetry;
pub mod tiers;
mod vecmath;

mod channel;

pub use engine::{
    Engine, EngineConfig, EngineHandle, EngineStats, DEFAULT_MAX_SESSIONS,
    DEFAULT_MAX_SESSIONS_TOKENS, DEFAULT_MAX_SESSION_TOKENS, DEFAULT_PREEMPT_AFTER_STEPS,
    DEFAULT_SESSION_IDLE_TIMEOUT, MAX_CHOICES,
};
pub use error::EngineError;
pub use logprobs::{token_logprobs, LogSoftmax, Logprobs};
pub use params::{SamplerError, SamplingParams};
pub use penalty::{is_frequency_exempt, Penalties};
pub use prefix_cache::{CacheStats, PrefixCache};
pub use request::{FinishReason, GenerateEvent, GenerateRequest, GenerateStream, SessionId, Usage};
pub use sample_logits::{sample_logits, SampleScratch};
pub use sampler::Sampler;
pub use scheduler::{BatchItem, Scheduler, SchedulerConfig, SeqId};
pub use score::{ContinuationScore, PendingScore, ScoreRequest, ScoreResult};
pub use sessions::SessionInfo;
