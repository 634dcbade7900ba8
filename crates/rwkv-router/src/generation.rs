//! One generation through the cluster: pick a worker, stream its tokens, turn them into text,
//! check stop strings, and fail over to another worker if this one dies mid-stream.
//!
//! Failover replays the tokens generated so far as part of the prompt on the next worker, with
//! `max_tokens` reduced by as many, so the client's stream continues without duplication. The
//! replayed tokens count as prompt on the new worker, so presence/frequency penalties restart
//! there and a sampled (non-greedy) continuation differs from what the dead worker would have
//! produced; a greedy one is identical.
//!
//! A session's turn is different: its state lives on one worker, so it runs there or fails
//! (no failover), and the worker, not a stop string, decides where the turn ends, so that the
//! session's conversation is exactly what the model wrote (stop strings only trim the text).

use std::sync::Arc;
use std::time::Duration;

use rwkv_proto::{wv1, TraceContext};
use rwkv_tokenizer::{StopChecker, StreamDecoder, Tokenizer};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tonic::Status;

use crate::error::ApiError;
use crate::pool::{Lease, WorkerPool};
use crate::telemetry;

mod choices;

pub use choices::start_choices;

/// What the API layer asks for, already validated and tokenized.
#[derive(Clone, Debug)]
pub struct GenerationSpec {
    pub request_id: String,
    pub tenant: String,
    /// The tenant's fair-share weight while waiting for a worker.
    pub weight: u32,
    pub model: String,
    pub prompt: Vec<u32>,
    /// Sampling settings as the worker takes them (`max_tokens` is taken from `max_tokens`).
    pub params: wv1::SamplingParams,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub top_logprobs: Option<u32>,
    pub deadline: Instant,
    /// A turn of this session: `prompt` is appended to it.
    pub session: Option<SessionTurn>,
    /// The HTTP request's trace; each worker call gets a child span of it.
    pub trace: Option<TraceContext>,
}

/// Where a session lives and how its turns join.
#[derive(Clone, Debug)]
pub struct SessionTurn {
    pub worker: String,
    pub id: u64,
    /// Put before the turn's tokens when the previous turn did not end on an end token.
    pub separator: Vec<u32>,
}

/// One generated token with the text it released (possibly empty: a partial UTF-8 character,
/// or text held back because it may begin a stop string).
#[derive(Clone, Debug)]
pub struct TokenOut {
    pub id: u32,
    pub text: String,
    pub logprobs: Option<wv1::TokenLogprobs>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Length,
    Stop,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::Stop => "stop",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
}

#[derive(Debug)]
pub enum GenerationEvent {
    Token(TokenOut),
    /// The last event on success: any text still held back, why it ended, and the counts.
    Done {
        tail: String,
        finish: Finish,
        usage: Usage,
    },
    /// The last event on failure.
    Failed(ApiError),
}

/// How many workers one request may try before giving up.
const MAX_ATTEMPTS: usize = 3;
/// Events buffered between the generations of one response and the API layer.
const EVENT_BUFFER: usize = 64;

/// One response's events: each tagged with the index of the choice it belongs to.
pub type ResponseEvents = mpsc::Receiver<(usize, GenerationEvent)>;
type ResponseSender = mpsc::Sender<(usize, GenerationEvent)>;

/// The channel every choice of one response sends its events into, and the receiver the API
/// layer reads them from.
pub fn response_channel() -> (ResponseSender, ResponseEvents) {
    mpsc::channel(EVENT_BUFFER)
}

/// Where one choice's events go: the response's one channel, tagged with the choice's index.
///
/// Every choice of a response shares that channel, so when the response is dropped (the
/// client left, or the request was already answered with an error) all of them see it closed
/// at the same moment. A choice that wins a worker's slot after that, even the slot another
/// choice just gave up, starts nothing: there is no chain of per-choice forwarders for its
/// cancellation to race along.
#[derive(Clone, Debug)]
pub struct ChoiceSink {
    index: usize,
    tx: ResponseSender,
}

/// The response was dropped: nobody reads the events any more.
#[derive(Debug)]
pub struct ClientGone;

impl ChoiceSink {
    pub fn new(tx: ResponseSender, index: usize) -> Self {
        Self { index, tx }
    }

    async fn send(&self, event: GenerationEvent) -> Result<(), ClientGone> {
        self.tx
            .send((self.index, event))
            .await
            .map_err(|_| ClientGone)
    }

    async fn closed(&self) {
        self.tx.closed().await;
    }
}

/// Starts the generation on a task; its events go to `sink`. Dropping the response's receiver
/// (the client went away) cancels the worker's sequence at its next step.
pub fn start(pool: WorkerPool, tokenizer: Arc<Tokenizer>, spec: GenerationSpec, sink: ChoiceSink) {
    tokio::spawn(async move {
        let started = Instant::now();
        let outcome = run(&pool, &tokenizer, &spec, &sink, started).await;
        if let Err(e) = outcome {
            let _ = sink.send(GenerationEvent::Failed(e)).await;
        }
    });
}

/// Runs `work` until it ends or every sink in `sinks` is closed (the client left: nobody reads
/// the events), whichever comes first; `None` for the latter. Dropping `work` then gives back
/// its place in the queue or its worker call (which cancels the sequence on the worker), so a
/// request the client gave up on, such as the other choices of a request already answered
/// with an error, runs nothing.
///
/// The departure is checked first: work that became ready in the same instant (a lease just
/// granted) must not go on for a client that is already gone.
pub(crate) async fn unless_client_leaves<T>(
    sinks: &[&ChoiceSink],
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    let all_closed = async {
        for sink in sinks {
            sink.closed().await;
        }
    };
    tokio::select! {
        biased;
        () = all_closed => None,
        out = work => Some(out),
    }
}

/// Text-side state of a generation, kept across failovers.
struct Progress {
    generated: Vec<u32>,
    decoder: StreamDecoder,
    stops: StopChecker,
    first_token_at: Option<Instant>,
    last_token_at: Option<Instant>,
}

impl Progress {
    fn new(spec: &GenerationSpec) -> Self {
        Self {
            generated: Vec::new(),
            decoder: StreamDecoder::new(),
            stops: StopChecker::new(spec.stop.iter().cloned()),
            first_token_at: None,
            last_token_at: None,
        }
    }

    /// Takes a generated token: its text, released up to any stop string. The flag says a
    /// stop string ended the text.
    fn take(&mut self, tokenizer: &Tokenizer, token: wv1::Token) -> (TokenOut, bool) {
        let now = Instant::now();
        self.first_token_at.get_or_insert(now);
        self.last_token_at = Some(now);
        self.generated.push(token.token);
        let piece = self
            .decoder
            .push(tokenizer, token.token)
            .unwrap_or_default();
        let outcome = self.stops.push(&piece);
        let out = TokenOut {
            id: token.token,
            text: outcome.emit,
            logprobs: token.logprobs,
        };
        (out, outcome.stopped)
    }
}

/// The generation ended: by a stop string (router side) or by the worker's own finish.
enum Ended {
    StopString,
    Worker(wv1::Finished),
}

enum AttemptError {
    /// The worker failed; another may succeed.
    Retry(Status),
    /// The request itself is at fault, or the client left.
    Fatal(ApiError),
}

async fn run(
    pool: &WorkerPool,
    tokenizer: &Tokenizer,
    spec: &GenerationSpec,
    sink: &ChoiceSink,
    started: Instant,
) -> Result<(), ApiError> {
    let mut progress = Progress::new(spec);
    resume(
        pool,
        tokenizer,
        spec,
        sink,
        started,
        &mut progress,
        Vec::new(),
        None,
    )
    .await
}

/// Runs the generation from `progress` on, trying workers not in `tried`; `last_error` is the
/// failure that brought it here, if any (reported when no other worker is left).
#[allow(clippy::too_many_arguments)]
async fn resume(
    pool: &WorkerPool,
    tokenizer: &Tokenizer,
    spec: &GenerationSpec,
    sink: &ChoiceSink,
    started: Instant,
    progress: &mut Progress,
    mut tried: Vec<String>,
    mut last_error: Option<Status>,
) -> Result<(), ApiError> {
    // A session's state is on its worker: there is nowhere else to try.
    let attempts = if spec.session.is_some() {
        1
    } else {
        MAX_ATTEMPTS
    };
    while tried.len() < attempts {
        let context = context_after(spec, progress);
        let who = crate::pool::Requester {
            tenant: &spec.tenant,
            weight: spec.weight,
        };
        let acquiring = async {
            match &spec.session {
                Some(s) => {
                    pool.acquire_on(&spec.model, &who, &s.worker, spec.deadline)
                        .await
                }
                None => {
                    pool.acquire(&spec.model, &who, &context, &tried, spec.deadline)
                        .await
                }
            }
        };
        let Some(acquired) = unless_client_leaves(&[sink], acquiring).await else {
            return Err(ApiError::client_gone());
        };
        let lease = match acquired {
            Ok(lease) => lease,
            // Every worker that could serve it failed already: report the last failure.
            Err(crate::pool::PoolError::NoWorker(_)) if last_error.is_some() => break,
            Err(crate::pool::PoolError::NoWorker(_)) if spec.session.is_some() => {
                return Err(crate::sessions::worker_gone())
            }
            Err(e) => return Err(e.into()),
        };
        let worker_id = lease.worker.record.id.clone();
        let attempted = attempt(tokenizer, spec, &lease, &context, progress, sink);
        let Some(attempted) = unless_client_leaves(&[sink], attempted).await else {
            return Err(ApiError::client_gone());
        };
        match attempted {
            Ok(ended) => {
                pool.record_success(&lease.worker);
                let done = conclude(pool, spec, progress, &ended, &worker_id, started);
                let _ = sink.send(done).await;
                return Ok(());
            }
            Err(AttemptError::Fatal(e)) => return Err(e),
            Err(AttemptError::Retry(status)) => {
                warn_failover(spec, &worker_id, progress.generated.len(), &status);
                pool.record_failover(&lease.worker, &status);
                tried.push(worker_id);
                last_error = Some(status);
            }
        }
    }
    Err(ApiError::unavailable(format!(
        "the request failed on {} worker(s); last error: {}",
        tried.len(),
        last_error.map_or_else(|| "none".into(), |s| s.message().to_owned())
    )))
}

fn warn_failover(spec: &GenerationSpec, worker_id: &str, generated: usize, status: &Status) {
    tracing::warn!(
        request_id = spec.request_id,
        trace_id = spec.trace.map(|t| t.trace_id_hex()),
        worker = worker_id,
        generated,
        "worker failed mid-request ({status}); failing over"
    );
}

/// The last event of a generation that ended on `worker_id`: the text still held back, why it
/// ended, and the counts. Also remembers where its states are cached and records latencies.
fn conclude(
    pool: &WorkerPool,
    spec: &GenerationSpec,
    progress: &mut Progress,
    ended: &Ended,
    worker_id: &str,
    started: Instant,
) -> GenerationEvent {
    let (worker_finish, cached) = match ended {
        Ended::StopString => (Finish::Stop, 0),
        Ended::Worker(f) => (
            if f.reason == wv1::FinishReason::Stop as i32 {
                Finish::Stop
            } else {
                Finish::Length
            },
            f.usage.map_or(0, |u| u.cached_tokens),
        ),
    };
    // Flush the text held back (a partial character, a possible stop string start) unless a
    // stop string already ended the text.
    let mut tail = String::new();
    if !progress.stops.is_stopped() {
        let rest = progress.decoder.finish();
        tail = progress.stops.push(&rest).emit;
        if !progress.stops.is_stopped() {
            tail.push_str(&progress.stops.finish());
        }
    }
    let finish = if progress.stops.is_stopped() {
        Finish::Stop
    } else {
        worker_finish
    };
    let prompt_tokens = spec.prompt.len() as u32;
    let usage = Usage {
        prompt_tokens,
        cached_tokens: cached.min(prompt_tokens),
        completion_tokens: progress.generated.len() as u32,
    };
    // The worker cached the state after the prompt and after the generation (a session's
    // prompt is only its new turn: nothing to remember).
    if spec.session.is_none() {
        pool.remember_prefix(&spec.prompt, worker_id);
        pool.remember_prefix(&context_after(spec, progress), worker_id);
    }
    record_latency(started, progress);
    GenerationEvent::Done {
        tail,
        finish,
        usage,
    }
}

fn context_after(spec: &GenerationSpec, progress: &Progress) -> Vec<u32> {
    spec.prompt
        .iter()
        .chain(&progress.generated)
        .copied()
        .collect()
}

fn record_latency(started: Instant, progress: &Progress) {
    if let Some(first) = progress.first_token_at {
        metrics::histogram!(telemetry::TTFT_SECONDS).record((first - started).as_secs_f64());
        if let Some(last) = progress.last_token_at {
            let gaps = progress.generated.len().saturating_sub(1);
            if gaps > 0 {
                let mean = (last - first).as_secs_f64() / gaps as f64;
                metrics::histogram!(telemetry::ITL_SECONDS).record(mean);
            }
        }
    }
}

/// One try on one worker.
async fn attempt(
    tokenizer: &Tokenizer,
    spec: &GenerationSpec,
    lease: &Lease,
    context: &[u32],
    progress: &mut Progress,
    sink: &ChoiceSink,
) -> Result<Ended, AttemptError> {
    let remaining = spec.max_tokens - progress.generated.len() as u32;
    let (session, tokens, separator) = match &spec.session {
        Some(s) => (Some(s.id), spec.prompt.clone(), s.separator.clone()),
        None => (None, context.to_vec(), Vec::new()),
    };
    let request = wv1::GenerateRequest {
        tenant: spec.tenant.clone(),
        session,
        tokens,
        separator,
        params: Some(wv1::SamplingParams {
            max_tokens: Some(remaining),
            ..spec.params.clone()
        }),
        top_logprobs: spec.top_logprobs,
        request_id: spec.request_id.clone(),
        n: 1,
    };
    let mut stream = open_stream(spec, lease, request).await?;
    loop {
        match next_event(spec, &mut stream).await? {
            wv1::generate_event::Event::Token(token) => {
                let (out, stopped) = progress.take(tokenizer, token);
                if sink.send(GenerationEvent::Token(out)).await.is_err() {
                    // The client left; dropping the stream cancels the sequence on the worker.
                    return Err(AttemptError::Fatal(ApiError::client_gone()));
                }
                // A session's turn runs until the worker ends it, so that the session holds
                // exactly what was generated; the text after the stop is not sent.
                if stopped && spec.session.is_none() {
                    return Ok(Ended::StopString);
                }
            }
            wv1::generate_event::Event::Finished(finished) => return Ok(Ended::Worker(finished)),
        }
    }
}

/// Sends `request` to the lease's worker, with a child of the spec's trace, and opens the
/// stream of its events.
async fn open_stream(
    spec: &GenerationSpec,
    lease: &Lease,
    request: wv1::GenerateRequest,
) -> Result<tonic::Streaming<wv1::GenerateEvent>, AttemptError> {
    let mut request = tonic::Request::new(request);
    if let Some(trace) = &spec.trace {
        trace.child().inject(&mut request);
    }
    let mut client = lease.worker.client.clone();
    match tokio::time::timeout_at(spec.deadline, client.generate(request)).await {
        Err(_) => Err(AttemptError::Fatal(ApiError::timeout())),
        Ok(Err(status)) => Err(classify(spec, status)),
        Ok(Ok(response)) => Ok(response.into_inner()),
    }
}

/// The next event of a worker's stream, with its choice: a worker that ends the stream early,
/// sends an empty event or fails is an error for [`classify`], a deadline that passes is fatal.
async fn next_event_of(
    spec: &GenerationSpec,
    stream: &mut tonic::Streaming<wv1::GenerateEvent>,
) -> Result<(u32, wv1::generate_event::Event), AttemptError> {
    let next = match tokio::time::timeout_at(spec.deadline, stream.message()).await {
        Err(_) => return Err(AttemptError::Fatal(ApiError::timeout())),
        Ok(next) => next,
    };
    match next {
        Ok(Some(wv1::GenerateEvent {
            event: Some(event),
            choice,
        })) => Ok((choice, event)),
        Ok(Some(wv1::GenerateEvent { event: None, .. })) => Err(AttemptError::Retry(
            Status::internal("empty event from worker"),
        )),
        Ok(None) => Err(AttemptError::Retry(Status::unavailable(
            "the worker closed the stream before finishing",
        ))),
        Err(status) => Err(classify(spec, status)),
    }
}

/// [`next_event_of`] for a one-choice stream.
async fn next_event(
    spec: &GenerationSpec,
    stream: &mut tonic::Streaming<wv1::GenerateEvent>,
) -> Result<wv1::generate_event::Event, AttemptError> {
    next_event_of(spec, stream).await.map(|(_, event)| event)
}

/// Worker faults are retried elsewhere; request faults go back to the client (an unknown
/// session by its public id).
fn classify(spec: &GenerationSpec, status: Status) -> AttemptError {
    // A session's turn has nowhere else to go: its worker full (of sessions, or of waiting
    // work) is the client's 429, not a failed worker.
    if spec.session.is_some() && status.code() == tonic::Code::ResourceExhausted {
        return AttemptError::Fatal(ApiError::from_status(&status));
    }
    if crate::pool::is_worker_fault(status.code()) {
        return AttemptError::Retry(status);
    }
    AttemptError::Fatal(match &spec.session {
        Some(s) if status.code() == tonic::Code::NotFound => {
            let addr = crate::sessions::SessionAddr {
                worker: s.worker.clone(),
                id: s.id,
            };
            crate::sessions::session_error(&addr, &status)
        }
        _ => ApiError::from_status(&status),
    })
}

/// Default time a request may wait and run in total.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    /// Work that is ready in the same instant the client is found gone (a lease granted to a
    /// queued choice of a response already answered) must not go on: the departure wins every
    /// time, not by the luck of the poll order.
    #[tokio::test]
    async fn a_departed_client_wins_over_work_that_is_ready_too() {
        let (tx, rx) = response_channel();
        let sinks = [ChoiceSink::new(tx.clone(), 0), ChoiceSink::new(tx, 1)];
        drop(rx);
        for _ in 0..64 {
            let out = unless_client_leaves(&[&sinks[0], &sinks[1]], async { "lease" }).await;
            assert_eq!(out, None);
        }
    }

    #[tokio::test]
    async fn choices_of_one_response_share_its_channel_and_its_departure() {
        let (tx, mut rx) = response_channel();
        let (a, b) = (ChoiceSink::new(tx.clone(), 3), ChoiceSink::new(tx, 5));
        b.send(GenerationEvent::Failed(ApiError::client_gone()))
            .await
            .unwrap();
        assert_eq!(rx.recv().await.map(|(i, _)| i), Some(5));
        let sinks = [&a];
        let pending = unless_client_leaves(&sinks, std::future::pending::<()>());
        drop(rx);
        assert_eq!(pending.await, None);
        assert!(a
            .send(GenerationEvent::Failed(ApiError::client_gone()))
            .await
            .is_err());
    }
}
