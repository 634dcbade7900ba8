//! The front door of the cluster: an OpenAI-compatible HTTP API and a gRPC API
//! (`rwkv.api.v1`) on one port, over a pool of workers.
//!
//! This crate owns request validation and tokenization ([`api`], [`chat`], [`checks`]), worker
//! selection with a bounded queue, cache-aware placement and circuit breaking ([`pool`],
//! [`affinity`], [`fair`]), the streaming of one generation with stop strings and failover
//! ([`generation`]), scoring ([`scoring`]), stateful sessions and their quota ([`sessions`]),
//! tenants and their limits ([`tenants`]), the HTTP routes ([`http`]) and the gRPC services
//! ([`grpc`]), TLS ([`tls`]) and the router's metrics ([`telemetry`]). It talks to workers only
//! through the worker gRPC service of `rwkv-proto`, and learns about them through a
//! `rwkv_cluster::Registry`. It never depends on the model, the engine or a backend: the same
//! router fronts CPU and GPU workers, in one process (`rwkv serve`) or across machines.

pub mod affinity;
pub mod api;
pub mod chat;
pub mod checks;
pub mod error;
pub mod fair;
pub mod generation;
pub mod grpc;
pub mod http;
pub mod pool;
pub mod scoring;
pub mod sessions;
pub mod telemetry;
pub mod tenants;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

pub use error::ApiError;
pub use http::{router as http_router, serve as serve_http, serve_https};
pub use pool::{PoolConfig, WorkerPool};

/// Limits and defaults of the HTTP API.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Model used when a request names none; `None`: the one model the cluster serves, and a
    /// request without `model` is refused while several are served.
    pub default_model: Option<String>,
    /// Longest accepted prompt, in tokens.
    pub max_prompt_tokens: usize,
    /// Largest accepted `max_tokens`.
    pub max_tokens_limit: u32,
    /// `max_tokens` of a chat completion that sets none.
    pub default_chat_max_tokens: u32,
    /// Largest `n`.
    pub max_n: usize,
    /// Most choices per request: prompts x `n` (each holds a place in the queue and, running,
    /// a state slot).
    pub max_choices: usize,
    /// Most stop strings per request.
    pub max_stop: usize,
    /// Largest `logprobs` / `top_logprobs`.
    pub max_logprobs: u32,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Time a request may spend queued and running, in total.
    pub request_timeout: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            default_model: None,
            max_prompt_tokens: 65536,
            max_tokens_limit: 8192,
            default_chat_max_tokens: 512,
            max_n: 16,
            max_choices: 128,
            max_stop: 16,
            max_logprobs: 20,
            max_body_bytes: 4 << 20,
            request_timeout: generation::DEFAULT_TIMEOUT,
        }
    }
}

impl RouterConfig {
    /// When a request arriving now must be done: `request_timeout` from now, or a century from
    /// now for a timeout too large to add (an `Instant` overflow would panic the handler).
    pub fn deadline(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        now.checked_add(self.request_timeout)
            .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
    }
}

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct Router {
    pub cfg: Arc<RouterConfig>,
    pub pool: WorkerPool,
    pub tokenizer: Arc<rwkv_tokenizer::Tokenizer>,
    /// Renders `/metrics`; `None` when no Prometheus recorder is installed.
    pub prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Token ids of the World tokenizer without text (none today; 0, end of text, is handled
    /// apart): never sampled, as in `rwkv generate`, since the reference decoder would fail on
    /// them. Other tokenizers decode every id of their vocabulary their own way.
    pub unusable_tokens: Arc<Vec<u32>>,
    /// The tokenizer's vocabulary size: generations never sample ids at or above it (the
    /// models' vocabulary is larger: World has 65530 ids, the models 65536).
    pub sample_below: u32,
    /// API keys and per-tenant limits; open (one tenant, no key) unless configured.
    pub tenants: Arc<tenants::Tenants>,
    /// Tokens whose text contains the chat turn separator `\n\n`: a session's turn ends on
    /// one of them (it stays in the conversation).
    pub turn_end_tokens: Arc<Vec<u32>>,
    /// The separator's tokens, put before a turn when the previous one did not end on it.
    pub turn_separator: Arc<Vec<u32>>,
}

impl Router {
    pub fn new(
        cfg: RouterConfig,
        pool: WorkerPool,
        tokenizer: Arc<rwkv_tokenizer::Tokenizer>,
        prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Self {
        let vocab = u32::try_from(tokenizer.vocab_size()).unwrap_or(u32::MAX);
        let unusable = match &*tokenizer {
            rwkv_tokenizer::Tokenizer::World(_) => (1..vocab)
                .filter(|&t| tokenizer.token_bytes(t).is_none())
                .collect(),
            rwkv_tokenizer::Tokenizer::Hf(_) => Vec::new(),
        };
        let separator = chat::TURN_END.as_bytes();
        let turn_end_tokens = (1..tokenizer.vocab_size() as u32)
            .filter(|&t| {
                tokenizer
                    .token_bytes(t)
                    .is_some_and(|b| b.windows(separator.len()).any(|w| w == separator))
            })
            .collect();
        let turn_separator = tokenizer.encode(chat::TURN_END).unwrap_or_default();
        Self {
            cfg: Arc::new(cfg),
            pool,
            tokenizer,
            prometheus,
            unusable_tokens: Arc::new(unusable),
            sample_below: vocab,
            tenants: Arc::new(tenants::Tenants::open()),
            turn_end_tokens: Arc::new(turn_end_tokens),
            turn_separator: Arc::new(turn_separator),
        }
    }

    /// Requires API keys from `tenants` and applies their limits.
    pub fn with_tenants(mut self, tenants: Arc<tenants::Tenants>) -> Self {
        self.tenants = tenants;
        self
    }
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("cfg", &self.cfg)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_too_large_to_add_gives_a_far_deadline_not_a_panic() {
        let cfg = RouterConfig {
            request_timeout: Duration::from_secs(u64::MAX),
            ..RouterConfig::default()
        };
        let far = cfg.deadline();
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(50 * 365 * 86_400));
        let usual = RouterConfig::default().deadline();
        assert!(usual <= tokio::time::Instant::now() + generation::DEFAULT_TIMEOUT);
    }

    fn router_with(tokenizer: rwkv_tokenizer::Tokenizer) -> Router {
        let pool = WorkerPool::new(pool::PoolConfig::default());
        Router::new(RouterConfig::default(), pool, Arc::new(tokenizer), None)
    }

    /// Generations never sample past the tokenizer's vocabulary (World: 65530 ids, the models
    /// 65536), and a tokenizer that is not byte-level (no bytes for any id) has nothing banned:
    /// it decodes its ids its own way (everything but 0 was banned once, so replies were empty).
    #[test]
    fn sampling_stops_at_the_tokenizer_vocabulary_and_bans_nothing_else() {
        let world = router_with(rwkv_tokenizer::Tokenizer::world());
        assert_eq!(world.sample_below, 65530);
        assert!(world.unusable_tokens.is_empty());
        let json = br#"{"version": "1.0", "model": {"type": "WordLevel",
            "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"},
            "pre_tokenizer": {"type": "Whitespace"}}"#;
        let hf = rwkv_tokenizer::HfTokenizer::from_json_bytes(json, "word-level").unwrap();
        let hf = router_with(rwkv_tokenizer::Tokenizer::Hf(Arc::new(hf)));
        assert_eq!(hf.sample_below, 3);
        assert!(hf.unusable_tokens.is_empty());
    }
}
