//! Wire messages to engine requests (validated) and engine results back to wire messages.

use rwkv_engine::{
    EngineError, EngineStats, FinishReason, GenerateEvent, GenerateRequest, Logprobs,
    SamplingParams, ScoreRequest, ScoreResult,
};
use rwkv_proto::{count_u32, wv1, FieldError};
use tonic::Status;

/// Reads the wire's sampling settings over the reference defaults, and validates them.
pub(crate) fn sampling_params(p: Option<wv1::SamplingParams>) -> Result<SamplingParams, Status> {
    let mut params = SamplingParams::default();
    if let Some(p) = p {
        let set = |slot: &mut f32, v: Option<f32>| {
            if let Some(v) = v {
                *slot = v;
            }
        };
        set(&mut params.temperature, p.temperature);
        set(&mut params.top_p, p.top_p);
        set(&mut params.presence_penalty, p.presence_penalty);
        set(&mut params.frequency_penalty, p.frequency_penalty);
        set(&mut params.penalty_decay, p.penalty_decay);
        if let Some(k) = p.top_k {
            params.top_k = k as usize;
        }
        if let Some(n) = p.max_tokens {
            params.max_tokens = n as usize;
        }
        params.token_ban = p.token_ban;
        params.sample_below = p.sample_below;
        params.stop_tokens = p.stop_tokens;
        params.end_tokens = p.end_tokens;
        params.seed = p.seed;
    }
    params
        .validate()
        .map_err(|e| Status::invalid_argument(format!("params.{}: {e}", e.field())))?;
    Ok(params)
}

/// Most alternatives per token a request may ask for (the router's public limit is 20).
pub const MAX_TOP_LOGPROBS: u32 = 100;

fn top_logprobs(n: Option<u32>) -> Result<Option<usize>, Status> {
    match n {
        Some(n) if n > MAX_TOP_LOGPROBS => Err(FieldError::new(
            "top_logprobs",
            format!("at most {MAX_TOP_LOGPROBS}, got {n}"),
        )
        .into()),
        n => Ok(n.map(|n| n as usize)),
    }
}

pub(crate) fn generate_request(req: wv1::GenerateRequest) -> Result<GenerateRequest, Status> {
    let tenant = tenant(req.tenant)?;
    Ok(GenerateRequest {
        tenant,
        session: req.session,
        tokens: req.tokens,
        params: sampling_params(req.params)?,
        top_logprobs: top_logprobs(req.top_logprobs)?,
        separator: req.separator,
    })
}

pub(crate) fn session_info(info: rwkv_engine::SessionInfo) -> wv1::SessionInfo {
    wv1::SessionInfo {
        session: info.id,
        tokens: count_u32(info.tokens),
        turns: info.turns.into_iter().map(count_u32).collect(),
        busy: info.busy,
    }
}

pub(crate) fn score_request(req: wv1::ScoreRequest) -> Result<ScoreRequest, Status> {
    Ok(ScoreRequest {
        tenant: tenant(req.tenant)?,
        context: req.context,
        continuations: req.continuations.into_iter().map(|c| c.tokens).collect(),
        top_logprobs: top_logprobs(req.top_logprobs)?,
    })
}

/// Tenants are names the router assigns; an empty one is a bug on the caller's side.
pub(crate) fn tenant(tenant: String) -> Result<String, Status> {
    if tenant.is_empty() {
        return Err(FieldError::new("tenant", "must not be empty").into());
    }
    Ok(tenant)
}

/// One engine event as a wire event; `Err` is the stream's terminal status.
pub(crate) fn event(event: GenerateEvent) -> Result<wv1::GenerateEvent, Status> {
    match event {
        GenerateEvent::Token { token, logprobs } => Ok(wv1::GenerateEvent::token(wv1::Token {
            token,
            logprobs: logprobs.map(|l| token_logprobs(&l)),
        })),
        GenerateEvent::Finished { reason, usage } => {
            Ok(wv1::GenerateEvent::finished(wv1::Finished {
                reason: finish_reason(reason) as i32,
                usage: Some(wv1::Usage {
                    prompt_tokens: count_u32(usage.prompt_tokens),
                    cached_tokens: count_u32(usage.cached_tokens),
                    generated_tokens: count_u32(usage.generated_tokens),
                }),
            }))
        }
        GenerateEvent::Error(e) => Err(status_of(&e)),
    }
}

fn finish_reason(reason: FinishReason) -> wv1::FinishReason {
    match reason {
        FinishReason::Length => wv1::FinishReason::Length,
        FinishReason::Stop => wv1::FinishReason::Stop,
        FinishReason::Cancelled => wv1::FinishReason::Cancelled,
    }
}

fn token_logprobs(l: &Logprobs) -> wv1::TokenLogprobs {
    wv1::TokenLogprobs {
        logprob: l.logprob,
        top: top_list(&l.top),
    }
}

fn top_list(top: &[(u32, f32)]) -> Vec<wv1::TopLogprob> {
    top.iter()
        .map(|&(token, logprob)| wv1::TopLogprob { token, logprob })
        .collect()
}

pub(crate) fn score_response(result: ScoreResult) -> wv1::ScoreResponse {
    wv1::ScoreResponse {
        scores: result
            .scores
            .into_iter()
            .map(|s| wv1::ContinuationScore {
                top: s
                    .top
                    .iter()
                    .zip(&s.logprobs)
                    .map(|(top, &logprob)| wv1::TokenLogprobs {
                        logprob,
                        top: top_list(top),
                    })
                    .collect(),
                logprobs: s.logprobs,
                greedy: s.greedy,
            })
            .collect(),
        context_tokens: count_u32(result.context_tokens),
        cached_tokens: count_u32(result.cached_tokens),
    }
}

pub(crate) fn load(stats: &EngineStats, draining: bool) -> wv1::WorkerLoad {
    wv1::WorkerLoad {
        running: count_u32(stats.running),
        waiting: count_u32(stats.waiting),
        slots_total: count_u32(stats.slots_total),
        slots_free: count_u32(stats.slots_free + stats.slots_parked),
        sessions: count_u32(stats.sessions),
        cache_hits: stats.cache.hits,
        cache_misses: stats.cache.misses,
        cache_entries: count_u32(stats.cache_entries),
        host_tier_bytes: stats.host_tier_bytes as u64,
        draining,
    }
}

/// The gRPC status for an engine error: the code tells the caller whether to fix the request
/// (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION), retry later or elsewhere
/// (RESOURCE_EXHAUSTED, UNAVAILABLE), or report a fault (INTERNAL).
pub fn status_of(e: &EngineError) -> Status {
    let message = e.to_string();
    match e {
        EngineError::Sampling(s) => Status::invalid_argument(format!("params.{}: {s}", s.field())),
        EngineError::EmptyInput
        | EngineError::NoSuchTurn { .. }
        | EngineError::EmptyScore(_)
        | EngineError::TokenOutOfVocab { .. }
        | EngineError::Choices { .. }
        | EngineError::SessionFull { .. }
        | EngineError::Import(_) => Status::invalid_argument(message),
        EngineError::Overloaded { .. } | EngineError::SessionCapacity { .. } => {
            Status::resource_exhausted(message)
        }
        EngineError::SessionNotFound { .. } => Status::not_found(message),
        EngineError::SessionBusy { .. } | EngineError::StateUnavailable { .. } => {
            Status::failed_precondition(message)
        }
        EngineError::Stopped | EngineError::BackendBroken(_) => Status::unavailable(message),
        EngineError::Config(_) | EngineError::Backend(_) | EngineError::StepFailed(_) => {
            Status::internal(message)
        }
    }
}
