//! Several choices of one prompt (`n > 1`) in one worker call.
//!
//! The worker prefills the prompt once and forks its state per choice; its stream carries every
//! choice's events, tagged with the choice. Here each choice keeps its own text-side progress
//! and sends to its own [`ChoiceSink`], so to the API layer the choices look like separate
//! generations.
//!
//! A choice that a stop string ends stops being forwarded at once, but the worker keeps
//! generating it until it ends there (an end token or `max_tokens`) or until every choice has
//! ended here, when dropping the call cancels what is left. If the worker fails, each unfinished
//! choice fails over on its own, like a single generation, from the tokens it already has.

use std::sync::Arc;

use rwkv_proto::wv1;
use rwkv_tokenizer::Tokenizer;
use tokio::time::Instant;
use tonic::Status;

use super::{
    conclude, next_event_of, open_stream, resume, unless_client_leaves, warn_failover,
    AttemptError, ChoiceSink, Ended, GenerationEvent, GenerationSpec, Progress,
};
use crate::error::ApiError;
use crate::pool::{Lease, Requester, WorkerPool};

/// One choice: its spec (its own seed and request id), progress and where its events go.
struct Choice {
    spec: GenerationSpec,
    progress: Progress,
    sink: ChoiceSink,
    /// Still forwarding events (not ended, client still there).
    open: bool,
}

/// Starts the choices of one prompt: `specs[i]` is choice `i`, all with the same prompt and
/// settings except the seed, which must be choice 0's plus `i` (what the worker gives each
/// fork). Choice `i`'s events go to `sinks[i]`; dropping the response cancels the call.
pub fn start_choices(
    pool: WorkerPool,
    tokenizer: Arc<Tokenizer>,
    specs: Vec<GenerationSpec>,
    sinks: Vec<ChoiceSink>,
) {
    assert_eq!(specs.len(), sinks.len(), "one sink per choice");
    if specs.len() == 1 {
        for (spec, sink) in specs.into_iter().zip(sinks) {
            super::start(pool.clone(), tokenizer.clone(), spec, sink);
        }
        return;
    }
    let choices = specs
        .into_iter()
        .zip(sinks)
        .map(|(spec, sink)| Choice {
            progress: Progress::new(&spec),
            spec,
            sink,
            open: true,
        })
        .collect();
    tokio::spawn(run(pool, tokenizer, choices));
}

async fn run(pool: WorkerPool, tokenizer: Arc<Tokenizer>, mut choices: Vec<Choice>) {
    let started = Instant::now();
    let first = choices[0].spec.clone();
    let who = Requester {
        tenant: &first.tenant,
        weight: first.weight,
    };
    let sinks: Vec<ChoiceSink> = choices.iter().map(|c| c.sink.clone()).collect();
    let sinks: Vec<&ChoiceSink> = sinks.iter().collect();
    let leasing = pool.acquire_units(
        &first.model,
        &who,
        &first.prompt,
        &[],
        first.deadline,
        choices.len(),
    );
    let Some(leased) = unless_client_leaves(&sinks, leasing).await else {
        return;
    };
    let lease = match leased {
        Ok(lease) => lease,
        Err(e) => return fail_open(&choices, ApiError::from(e)).await,
    };
    let worker_id = lease.worker.record.id.clone();
    let attempted = attempt(&pool, &tokenizer, &lease, &mut choices, started);
    let Some(attempted) = unless_client_leaves(&sinks, attempted).await else {
        return;
    };
    match attempted {
        Ok(()) => pool.record_success(&lease.worker),
        Err(AttemptError::Fatal(e)) => fail_open(&choices, e).await,
        Err(AttemptError::Retry(status)) => {
            pool.record_failover(&lease.worker, &status);
            drop(lease);
            for choice in choices.into_iter().filter(|c| c.open) {
                let Choice {
                    spec,
                    mut progress,
                    sink,
                    ..
                } = choice;
                warn_failover(&spec, &worker_id, progress.generated.len(), &status);
                let (pool, tokenizer) = (pool.clone(), tokenizer.clone());
                let (tried, status) = (vec![worker_id.clone()], status.clone());
                // Each choice goes on alone, like a single generation, from its own tokens.
                tokio::spawn(async move {
                    let outcome = resume(
                        &pool,
                        &tokenizer,
                        &spec,
                        &sink,
                        started,
                        &mut progress,
                        tried,
                        Some(status),
                    )
                    .await;
                    if let Err(e) = outcome {
                        let _ = sink.send(GenerationEvent::Failed(e)).await;
                    }
                });
            }
        }
    }
}

async fn fail_open(choices: &[Choice], e: ApiError) {
    for choice in choices.iter().filter(|c| c.open) {
        let _ = choice.sink.send(GenerationEvent::Failed(e.clone())).await;
    }
}

/// The one worker call for every choice. Returns when every choice has ended (or lost its
/// client); an error leaves the choices still open for the caller to fail over or fail.
async fn attempt(
    pool: &WorkerPool,
    tokenizer: &Tokenizer,
    lease: &Lease,
    choices: &mut [Choice],
    started: Instant,
) -> Result<(), AttemptError> {
    let spec = choices[0].spec.clone();
    let worker_id = lease.worker.record.id.clone();
    let request = wv1::GenerateRequest {
        tenant: spec.tenant.clone(),
        session: None,
        tokens: spec.prompt.clone(),
        separator: Vec::new(),
        params: Some(wv1::SamplingParams {
            max_tokens: Some(spec.max_tokens),
            ..spec.params.clone()
        }),
        top_logprobs: spec.top_logprobs,
        request_id: spec.request_id.clone(),
        n: choices.len() as u32,
    };
    let mut stream = open_stream(&spec, lease, request).await?;
    // Dropping the stream when every choice has ended cancels what the worker still runs.
    while choices.iter().any(|c| c.open) {
        let (index, event) = next_event_of(&spec, &mut stream).await?;
        let Some(choice) = choices.get_mut(index as usize) else {
            return Err(AttemptError::Retry(Status::internal(format!(
                "the worker sent choice {index} of {}",
                choices.len()
            ))));
        };
        if !choice.open {
            continue;
        }
        let ended = match event {
            wv1::generate_event::Event::Token(token) => {
                let (out, stopped) = choice.progress.take(tokenizer, token);
                if choice.sink.send(GenerationEvent::Token(out)).await.is_err() {
                    choice.open = false;
                    continue;
                }
                if !stopped {
                    continue;
                }
                Ended::StopString
            }
            wv1::generate_event::Event::Finished(finished) => Ended::Worker(finished),
        };
        let done = conclude(
            pool,
            &choice.spec,
            &mut choice.progress,
            &ended,
            &worker_id,
            started,
        );
        let _ = choice.sink.send(done).await;
        choice.open = false;
    }
    Ok(())
}
