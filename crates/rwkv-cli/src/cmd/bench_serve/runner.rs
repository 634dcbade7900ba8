//! Drives one benchmark point: sends the jobs open-loop (at Poisson arrival times) or
//! closed-loop (N in flight), and runs each job's turns.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinSet;

use super::client::{Api, Client, Failure};
use super::metrics::{PointRun, Record};
use super::workload::Job;
use super::Load;

/// What every request of a run shares.
#[derive(Clone)]
pub struct Target {
    pub client: Client,
    pub api: Api,
    pub model: String,
}

/// Runs `jobs` under `load`; `arrivals` (one per job) is used by the open-loop mode only.
pub async fn run_point(
    target: &Target,
    load: Load,
    jobs: Vec<Job>,
    arrivals: Vec<Duration>,
) -> PointRun {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    match load {
        Load::Rate(_) => {
            // One task per job, spawned at its arrival time: how long earlier jobs take never
            // delays later arrivals (open loop), which is what exposes queueing at high rates.
            let start_at = tokio::time::Instant::from_std(start);
            for (job, at) in jobs.into_iter().zip(arrivals) {
                tokio::time::sleep_until(start_at + at).await;
                let target = target.clone();
                tasks.spawn(async move { run_job(&target, &job).await });
            }
        }
        Load::Concurrency(n) => {
            // N simulated clients, each taking the next job as soon as its last one is done.
            let jobs = Arc::new(jobs);
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..n.max(1) {
                let (target, jobs, next) = (target.clone(), jobs.clone(), next.clone());
                tasks.spawn(async move {
                    let mut records = Vec::new();
                    while let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        records.extend(run_job(&target, job).await);
                    }
                    records
                });
            }
        }
    }
    let mut records = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(batch) => records.extend(batch),
            // A panicking task is a bug here, not a server failure: surface it.
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    PointRun {
        load,
        duration: start.elapsed(),
        records,
    }
}

/// Sends one job: a completion, or a conversation whose every turn resends the whole history
/// (as OpenAI clients do) with the assistant's previous reply and a new user message.
pub async fn run_job(target: &Target, job: &Job) -> Vec<Record> {
    let mut records = Vec::with_capacity(job.turns.len());
    let mut messages: Vec<Value> = Vec::new();
    for (t, turn) in job.turns.iter().enumerate() {
        let mut body = json!({
            "model": target.model,
            "max_tokens": turn.max_tokens,
            "stream": true,
            "stream_options": {"include_usage": true},
            // vLLM's way to force `max_tokens` tokens; servers that do not know it ignore it
            // (ours stops early only at end-of-text, rare on the demo model).
            "ignore_eos": true,
            "seed": job.seed + t as u64,
        });
        match target.api {
            Api::Completions => body["prompt"] = Value::from(turn.text.as_str()),
            Api::Chat => {
                messages.push(json!({"role": "user", "content": turn.text}));
                body["messages"] = Value::from(messages.clone());
                body["max_completion_tokens"] = Value::from(turn.max_tokens);
            }
        }
        let result = target.client.stream(target.api, &body).await;
        let failed = result.is_err();
        if let Ok(s) = &result {
            messages.push(json!({"role": "assistant", "content": s.text}));
        }
        records.push(Record {
            turn: t,
            words: turn.words,
            result,
        });
        if failed {
            // A user whose request failed does not go on with the conversation; counting the
            // unsent turns keeps every point's request total the same.
            for (u, rest) in job.turns.iter().enumerate().skip(t + 1) {
                records.push(Record {
                    turn: u,
                    words: rest.words,
                    result: Err(Failure::new(
                        "aborted",
                        "not sent: an earlier turn of the conversation failed",
                    )),
                });
            }
            break;
        }
    }
    records
}
