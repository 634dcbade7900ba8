//! Scoring through the cluster: log-probabilities of continuations given a context, on the
//! worker holding the longest cached prefix of the context. The worker prefills the context
//! once and forks its state per continuation; a failed worker is replaced like in a generation.

use rwkv_proto::{wv1, TraceContext};
use tokio::time::Instant;

use crate::api;
use crate::checks::{check_prompt, encode, resolve_model};
use crate::error::ApiError;
use crate::http::{current_trace, new_id};
use crate::pool::{is_worker_fault, PoolError, WorkerPool};
use crate::tenants::Admission;
use crate::Router;

/// Most continuations one scoring request may bring.
pub const MAX_CONTINUATIONS: usize = 1024;

/// A scoring context or continuation as the APIs take it: text (tokenized on its own) or ids.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum ScoreInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// A scoring request's answer, with what it was asked.
pub struct Scored {
    pub model: String,
    /// The continuations as token ids, in request order.
    pub continuations: Vec<Vec<u32>>,
    /// Alternatives asked for per token.
    pub top: Option<u32>,
    pub response: wv1::ScoreResponse,
}

/// Validates a scoring request (model, `top_logprobs`, context and continuations, each field
/// named in errors), runs it on a worker and charges the tenant its tokens. The HTTP and gRPC
/// APIs both answer from this.
pub async fn score_inputs(
    state: &Router,
    admission: &Admission,
    model: Option<String>,
    top_logprobs: Option<i64>,
    context: Option<ScoreInput>,
    continuations: Option<Vec<ScoreInput>>,
) -> Result<Scored, ApiError> {
    let mut v = api::Sampling {
        model,
        ..api::Sampling::default()
    }
    .validate(&state.cfg, Some(0), 0)?;
    resolve_model(state, &mut v.model)?;
    let top = api::top_logprobs("top_logprobs", top_logprobs, &state.cfg)?;
    let to_tokens = |t: ScoreInput, field: &str| match t {
        ScoreInput::Text(text) => encode(state, &text, field),
        ScoreInput::Tokens(ids) => Ok(ids),
    };
    let context = context.ok_or_else(|| ApiError::invalid("context", "`context` is required"))?;
    let context = to_tokens(context, "context")?;
    check_prompt(state, &context, "context")?;
    let continuations = continuations.filter(|c| !c.is_empty()).ok_or_else(|| {
        ApiError::invalid("continuations", "`continuations` must be a non-empty list")
    })?;
    if continuations.len() > MAX_CONTINUATIONS {
        return Err(ApiError::invalid(
            "continuations",
            format!("at most {MAX_CONTINUATIONS} continuations per request"),
        ));
    }
    let mut lists = Vec::with_capacity(continuations.len());
    for (i, c) in continuations.into_iter().enumerate() {
        let field = format!("continuations[{i}]");
        let tokens = to_tokens(c, &field)?;
        check_prompt(state, &tokens, &field)?;
        lists.push(tokens);
    }
    // Every continuation token comes back with its log-probability and alternatives, so the
    // response grows with the total: it is held to one prompt's worth.
    let total: usize = lists.iter().map(Vec::len).sum();
    if total > state.cfg.max_prompt_tokens {
        return Err(ApiError::invalid(
            "continuations",
            format!(
                "the continuations hold {total} tokens together; at most {} per request",
                state.cfg.max_prompt_tokens
            ),
        ));
    }
    let tenant = admission.tenant();
    let spec = ScoreSpec {
        request_id: new_id("score"),
        tenant: tenant.name().to_owned(),
        weight: tenant.weight(),
        model: v.model.clone(),
        context,
        continuations: lists.clone(),
        top_logprobs: top,
        deadline: state.cfg.deadline(),
        trace: current_trace(),
    };
    let response = score(&state.pool, &spec).await?;
    tenant.record_tokens(
        u64::from(response.context_tokens) + lists.iter().map(|l| l.len() as u64).sum::<u64>(),
    );
    Ok(Scored {
        model: v.model,
        continuations: lists,
        top,
        response,
    })
}

/// A scoring request, validated and tokenized.
#[derive(Clone, Debug)]
pub struct ScoreSpec {
    pub request_id: String,
    pub tenant: String,
    /// The tenant's fair-share weight while waiting for a worker.
    pub weight: u32,
    pub model: String,
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
    pub top_logprobs: Option<u32>,
    pub deadline: Instant,
    /// The HTTP request's trace; each worker call gets a child span of it.
    pub trace: Option<TraceContext>,
}

const MAX_ATTEMPTS: usize = 3;

pub async fn score(pool: &WorkerPool, spec: &ScoreSpec) -> Result<wv1::ScoreResponse, ApiError> {
    let mut tried: Vec<String> = Vec::new();
    let mut last_error = String::new();
    while tried.len() < MAX_ATTEMPTS {
        let lease = match pool
            .acquire(
                &spec.model,
                &crate::pool::Requester {
                    tenant: &spec.tenant,
                    weight: spec.weight,
                },
                &spec.context,
                &tried,
                spec.deadline,
            )
            .await
        {
            Ok(lease) => lease,
            Err(PoolError::NoWorker(_)) if !tried.is_empty() => break,
            Err(e) => return Err(e.into()),
        };
        let request = wv1::ScoreRequest {
            tenant: spec.tenant.clone(),
            context: spec.context.clone(),
            continuations: spec
                .continuations
                .iter()
                .map(|c| wv1::TokenIds { tokens: c.clone() })
                .collect(),
            top_logprobs: spec.top_logprobs,
            request_id: spec.request_id.clone(),
        };
        let mut request = tonic::Request::new(request);
        if let Some(trace) = &spec.trace {
            trace.child().inject(&mut request);
        }
        let mut client = lease.worker.client.clone();
        match tokio::time::timeout_at(spec.deadline, client.score(request)).await {
            Err(_) => return Err(ApiError::timeout()),
            Ok(Ok(response)) => {
                pool.record_success(&lease.worker);
                pool.remember_prefix(&spec.context, &lease.worker.record.id);
                return Ok(response.into_inner());
            }
            Ok(Err(status)) if is_worker_fault(status.code()) => {
                tracing::warn!(
                    request_id = spec.request_id,
                    trace_id = spec.trace.map(|t| t.trace_id_hex()),
                    worker = lease.worker.record.id,
                    "scoring failed on a worker ({status}); trying another"
                );
                pool.record_failover(&lease.worker, &status);
                tried.push(lease.worker.record.id.clone());
                last_error = status.message().to_owned();
            }
            Ok(Err(status)) => return Err(ApiError::from_status(&status)),
        }
    }
    Err(ApiError::unavailable(format!(
        "scoring failed on {} worker(s); last error: {last_error}",
        tried.len()
    )))
}
