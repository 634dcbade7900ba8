//! Scoring through the cluster: log-probabilities of continuations given a context, on the
//! worker holding the longest cached prefix of the context. The worker prefills the context
//! once and forks its state per continuation; a failed worker is replaced like in a generation.

use rwkv_proto::{wv1, TraceContext};
use tokio::time::Instant;

use crate::error::ApiError;
use crate::pool::{is_worker_fault, PoolError, WorkerPool};

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
