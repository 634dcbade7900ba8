//! The HTTP routes: OpenAI-compatible completions and chat (JSON and SSE), stateful sessions
//! ([`sessions`]), models, tokenize and detokenize, health, readiness and Prometheus metrics.

mod sessions;

pub use sessions::MAX_IMPORT_BYTES;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::{self, ChatRequest, CompletionRequest, Prompt, Validated};
use crate::chat;
use crate::checks::{check_prompt, check_vocab, encode, resolve_model};
use crate::error::ApiError;
use crate::generation::{self, Finish, GenerationEvent, GenerationSpec, TokenOut, Usage};
use crate::scoring::{self, ScoreInput, ScoreSpec};
use crate::telemetry;
use crate::tenants::{Admission, Tenant};
use crate::Router;
use rwkv_proto::trace::{TraceContext, TRACEPARENT};
use std::sync::Arc;
use tracing::Instrument;

/// All routes, with request metrics. Everything but `/health` and `/ready` needs an API key
/// when tenants are configured; `/metrics` needs an admin key.
pub fn router(state: Router) -> axum::Router {
    let authenticated = axum::Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/score", post(score))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics_text))
        .merge(sessions::routes())
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let http = axum::Router::new()
        .merge(authenticated)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .with_state(state.clone());
    // The public gRPC API on the same port (HTTP/2); it authenticates from metadata. Its
    // router brings a fallback, which ours replaces for paths outside both APIs.
    crate::grpc::routes(state)
        .merge(http)
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(middleware::from_fn(record_request))
}

/// Maps the request's API key to its tenant (a 401 otherwise) for the handlers.
async fn authenticate(
    State(state): State<Router>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let tenant = state.tenants.authenticate(header)?;
    request.extensions_mut().insert(tenant);
    Ok(next.run(request).await)
}

/// Serves the routes on `listener` until `shutdown` resolves; open streams finish first.
pub async fn serve(
    state: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    telemetry::describe();
    tracing::info!(addr = ?listener.local_addr().ok(), "HTTP API listening");
    // Streams send one small SSE event per token: without TCP_NODELAY, Nagle's algorithm holds
    // each one back until the client's delayed ACK (~40 ms), which shows up as TTFT and ITL.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// [`serve`] over TLS: HTTPS and gRPC over TLS on one port.
pub async fn serve_https(
    state: Router,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    telemetry::describe();
    tracing::info!(addr = ?listener.local_addr().ok(), "HTTPS API listening");
    let listener = crate::tls::TlsListener::new(listener, tls)?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

tokio::task_local! {
    /// The trace of the HTTP request being handled (set by [`record_request`]).
    static TRACE: TraceContext;
}

/// The current request's trace context, for the worker calls it makes.
pub(crate) fn current_trace() -> Option<TraceContext> {
    TRACE.try_with(|t| *t).ok()
}

/// Counts and times every request, and gives it a trace: the caller's `traceparent` continued
/// (or a new trace), a log span carrying its id, and our span's `traceparent` on the response.
async fn record_request(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let trace = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map_or_else(TraceContext::new_root, |t| t.child());
    let span = tracing::info_span!("http", route = %route, trace_id = %trace);
    let started = Instant::now();
    let mut response = TRACE.scope(trace, next.run(request)).instrument(span).await;
    if let Ok(value) = trace.header().parse() {
        response.headers_mut().insert(TRACEPARENT, value);
    }
    let status = response.status().as_u16().to_string();
    metrics::counter!(telemetry::HTTP_REQUESTS, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(telemetry::HTTP_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn read_body(state: &Router, body: Body) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(body, state.cfg.max_body_bytes)
        .await
        .map_err(|_| ApiError::too_large(state.cfg.max_body_bytes))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unique enough ids for responses and logs: start time, then a counter.
pub(crate) fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:08x}", now_secs())
}

/// The text of a token for logprobs displays (invalid UTF-8 shown lossily).
pub(crate) fn token_text(state: &Router, id: u32) -> String {
    String::from_utf8_lossy(state.tokenizer.token_bytes(id).unwrap_or_default()).into_owned()
}

/// One prompt of a completion request, tokenized, with the text `echo` repeats.
struct PreparedPrompt {
    text: String,
    tokens: Vec<u32>,
}

/// The model card warns that a space after a final `:` derails the model; we drop it and say so.
fn strip_colon_space(text: &str) -> Option<String> {
    let trimmed = text.trim_end_matches(' ');
    (trimmed.len() < text.len() && trimmed.ends_with(':')).then(|| trimmed.to_owned())
}

/// `prompts` x `n` choices are more than one request may hold.
fn too_many_choices(state: &Router, prompts: usize, n: usize) -> ApiError {
    ApiError::invalid(
        if n > 1 { "n" } else { "prompt" },
        format!(
            "{prompts} prompt(s) x n = {n} is {} choices; a request may hold at most {} \
             (send the rest as further requests)",
            prompts * n,
            state.cfg.max_choices
        ),
    )
}

fn prepare_prompts(
    state: &Router,
    prompt: Option<Prompt>,
    warnings: &mut Vec<String>,
) -> Result<Vec<PreparedPrompt>, ApiError> {
    let from_text = |text: String, field: &str, warnings: &mut Vec<String>| {
        let text = match strip_colon_space(&text) {
            Some(fixed) => {
                warnings.push(format!(
                    "`{field}` ended with a space after ':'; the space was removed because it \
                     derails RWKV models"
                ));
                fixed
            }
            None => text,
        };
        let tokens = encode(state, &text, field)?;
        check_prompt(state, &tokens, field)?;
        Ok(PreparedPrompt { text, tokens })
    };
    let from_tokens = |tokens: Vec<u32>, field: &str| {
        check_prompt(state, &tokens, field)?;
        let text = String::from_utf8_lossy(&state.tokenizer.decode_bytes_lossy(&tokens)).into();
        Ok(PreparedPrompt { text, tokens })
    };
    let listed = match &prompt {
        Some(Prompt::Texts(v)) => v.len(),
        Some(Prompt::TokenLists(v)) => v.len(),
        _ => 1,
    };
    // Before any tokenizing: a list longer than a request may run is refused whole.
    if listed > state.cfg.max_choices {
        return Err(too_many_choices(state, listed, 1));
    }
    match prompt {
        None => Err(ApiError::invalid("prompt", "`prompt` is required")),
        Some(Prompt::Text(t)) => Ok(vec![from_text(t, "prompt", warnings)?]),
        Some(Prompt::Tokens(t)) => Ok(vec![from_tokens(t, "prompt")?]),
        Some(Prompt::Texts(v)) if !v.is_empty() => v
            .into_iter()
            .enumerate()
            .map(|(i, t)| from_text(t, &format!("prompt[{i}]"), warnings))
            .collect(),
        Some(Prompt::TokenLists(v)) if !v.is_empty() => v
            .into_iter()
            .enumerate()
            .map(|(i, t)| from_tokens(t, &format!("prompt[{i}]")))
            .collect(),
        Some(_) => Err(ApiError::invalid(
            "prompt",
            "`prompt` must not be an empty list",
        )),
    }
}

/// Starts the choices of every prompt and merges their events, tagged with the choice index,
/// into one channel. A prompt's choices run in one worker call that prefills the prompt once
/// and forks the state per choice. When the receiver is dropped (the client left), every
/// forwarding task ends and drops its generation, which cancels it on the worker.
pub(crate) fn start_choices(
    state: &Router,
    tenant: &Tenant,
    request_id: &str,
    prompts: &[Vec<u32>],
    v: &Validated,
    dialect: Dialect,
    top_logprobs: Option<u32>,
) -> generation::ResponseEvents {
    let (tx, rx) = generation::response_channel();
    let deadline = state.cfg.deadline();
    for (p, prompt) in prompts.iter().enumerate() {
        let specs = (0..v.n)
            .map(|i| {
                let index = p * v.n + i;
                let mut params = v.params.clone();
                params.token_ban = state.unusable_tokens.to_vec();
                params.sample_below = Some(state.sample_below);
                match dialect {
                    // End-of-text ends a completion (as in `rwkv generate`)...
                    Dialect::Completion => params.stop_tokens = vec![0],
                    // ...but is banned in chat, so a turn ends on text (the reference chat demo).
                    Dialect::Chat => params.token_ban.push(0),
                }
                // Choices of one request must differ even with a fixed seed; the worker gives
                // its forks the same seeds.
                params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
                GenerationSpec {
                    request_id: format!("{request_id}/{index}"),
                    tenant: tenant.name().to_owned(),
                    weight: tenant.weight(),
                    model: v.model.clone(),
                    prompt: prompt.clone(),
                    params,
                    max_tokens: v.max_tokens,
                    stop: v.stop.clone(),
                    top_logprobs,
                    deadline,
                    session: None,
                    trace: current_trace(),
                }
            })
            .collect();
        let sinks = (0..v.n)
            .map(|i| generation::ChoiceSink::new(tx.clone(), p * v.n + i))
            .collect();
        generation::start_choices(state.pool.clone(), state.tokenizer.clone(), specs, sinks);
    }
    rx
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

pub(crate) fn count_tokens(u: &Usage) {
    metrics::counter!(telemetry::TOKENS, "kind" => "prompt").increment(u.prompt_tokens.into());
    metrics::counter!(telemetry::TOKENS, "kind" => "cached").increment(u.cached_tokens.into());
    metrics::counter!(telemetry::TOKENS, "kind" => "completion")
        .increment(u.completion_tokens.into());
}

/// Charges a finished choice's tokens to its tenant (the prompt once per prompt).
pub(crate) fn record_usage(admission: &Admission, u: &Usage, first_of_prompt: bool) {
    let prompt = if first_of_prompt { u.prompt_tokens } else { 0 };
    admission
        .tenant()
        .record_tokens(u64::from(prompt) + u64::from(u.completion_tokens));
}

fn add_usage(total: &mut Usage, u: &Usage, first_of_prompt: bool) {
    // n choices of one prompt share it: count the prompt once per prompt.
    if first_of_prompt {
        total.prompt_tokens += u.prompt_tokens;
        total.cached_tokens += u.cached_tokens;
    }
    total.completion_tokens += u.completion_tokens;
}

/// Which dialect a response speaks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Completion,
    Chat,
}

/// Accumulates one choice for a non-streaming response.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    tokens: Vec<TokenOut>,
    finish: Option<Finish>,
}

/// Completion-style logprobs of some tokens, starting at `offset` in the choice text.
fn completion_logprobs(state: &Router, tokens: &[TokenOut], mut offset: usize) -> Value {
    let mut texts = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for t in tokens {
        let text = token_text(state, t.id);
        offsets.push(offset);
        offset += text.len();
        texts.push(text);
        let lp = t.logprobs.as_ref();
        lps.push(lp.map(|l| l.logprob));
        let top: serde_json::Map<String, Value> = lp
            .map(|l| {
                l.top
                    .iter()
                    .map(|a| (token_text(state, a.token), json!(a.logprob)))
                    .collect()
            })
            .unwrap_or_default();
        tops.push(Value::Object(top));
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// Chat-style logprobs (`{"content": [{token, logprob, bytes, top_logprobs}]}`).
fn chat_logprobs(state: &Router, tokens: &[TokenOut]) -> Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = state.tokenizer.token_bytes(id).unwrap_or_default().to_vec();
        json!({"token": token_text(state, id), "logprob": logprob, "bytes": bytes})
    };
    let content: Vec<Value> = tokens
        .iter()
        .filter_map(|t| {
            let l = t.logprobs.as_ref()?;
            let mut e = entry(t.id, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|a| entry(a.token, a.logprob)).collect();
            Some(e)
        })
        .collect();
    json!({ "content": content })
}

/// Settings of one request's response, shared by the JSON and SSE paths.
struct ResponsePlan {
    dialect: Dialect,
    id: String,
    model: String,
    created: u64,
    choices: usize,
    n: usize,
    echo: Vec<String>,
    /// Per prompt, the completion-style logprobs of the echoed prompt tokens.
    echo_logprobs: Vec<Value>,
    logprobs: bool,
    include_usage: bool,
    warnings: Vec<String>,
    /// The session a reply belongs to (`/v1/sessions/{id}/messages`).
    session: Option<String>,
}

impl ResponsePlan {
    fn object(&self, stream: bool) -> &'static str {
        match (self.dialect, stream) {
            (Dialect::Completion, _) => "text_completion",
            (Dialect::Chat, false) => "chat.completion",
            (Dialect::Chat, true) => "chat.completion.chunk",
        }
    }

    fn envelope(&self, stream: bool, choices: Vec<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(stream),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if !self.warnings.is_empty() {
            v["warnings"] = json!(self.warnings);
        }
        if let Some(session) = &self.session {
            v["session"] = json!(session);
        }
        v
    }

    fn echo_of(&self, index: usize) -> &str {
        self.echo.get(index / self.n).map_or("", String::as_str)
    }

    fn echo_logprobs_of(&self, index: usize) -> Option<&Value> {
        self.echo_logprobs.get(index / self.n)
    }
}

/// Chat replies start after `"Assistant:"`, and the model's first token starts with a space;
/// clients expect the content without it.
pub(crate) fn trim_reply_start(started: &mut bool, text: String) -> String {
    if *started {
        return text;
    }
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return String::new();
    }
    *started = true;
    trimmed.to_owned()
}

async fn respond_json(
    state: &Router,
    admission: Admission,
    plan: ResponsePlan,
    mut events: generation::ResponseEvents,
) -> Response {
    let mut acc: Vec<ChoiceAcc> = (0..plan.choices).map(|_| ChoiceAcc::default()).collect();
    let mut started = vec![false; plan.choices];
    let mut total = Usage::default();
    let mut done = 0;
    while done < plan.choices {
        let Some((index, event)) = events.recv().await else {
            return ApiError::internal("a generation ended without a result").into_response();
        };
        let choice = &mut acc[index];
        match event {
            GenerationEvent::Token(t) => {
                let text = if plan.dialect == Dialect::Chat {
                    trim_reply_start(&mut started[index], t.text.clone())
                } else {
                    t.text.clone()
                };
                choice.text.push_str(&text);
                choice.tokens.push(t);
            }
            GenerationEvent::Done {
                tail,
                finish,
                usage,
            } => {
                let tail = if plan.dialect == Dialect::Chat {
                    trim_reply_start(&mut started[index], tail)
                } else {
                    tail
                };
                choice.text.push_str(&tail);
                if plan.dialect == Dialect::Chat {
                    choice.text.truncate(choice.text.trim_end().len());
                }
                choice.finish = Some(finish);
                count_tokens(&usage);
                record_usage(&admission, &usage, index % plan.n == 0);
                add_usage(&mut total, &usage, index % plan.n == 0);
                done += 1;
            }
            GenerationEvent::Failed(e) => return e.into_response(),
        }
    }
    let choices = acc
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let finish = c.finish.map(Finish::as_str);
            match plan.dialect {
                Dialect::Completion => {
                    let echo = plan.echo_of(index);
                    let logprobs = plan.logprobs.then(|| {
                        let generated = completion_logprobs(state, &c.tokens, echo.len());
                        match plan.echo_logprobs_of(index) {
                            Some(prompt) => concat_logprobs(prompt, &generated),
                            None => generated,
                        }
                    });
                    json!({"index": index, "text": format!("{echo}{}", c.text),
                           "logprobs": logprobs, "finish_reason": finish})
                }
                Dialect::Chat => {
                    let logprobs = plan.logprobs.then(|| chat_logprobs(state, &c.tokens));
                    json!({"index": index,
                           "message": {"role": "assistant", "content": c.text},
                           "logprobs": logprobs, "finish_reason": finish})
                }
            }
        })
        .collect();
    let mut body = plan.envelope(false, choices);
    body["usage"] = usage_json(&total);
    Json(body).into_response()
}

fn sse(value: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(value.to_string()))
}

fn respond_stream(
    state: &Router,
    admission: Admission,
    plan: ResponsePlan,
    mut events: generation::ResponseEvents,
) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let state = state.clone();
    tokio::spawn(async move {
        let mut started = vec![false; plan.choices];
        let mut total = Usage::default();
        let mut done = 0;
        // Opening chunks: the assistant role (chat) or the echoed prompt (completions).
        for index in 0..plan.choices {
            let opening = match plan.dialect {
                Dialect::Chat => Some(json!({"index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null})),
                Dialect::Completion if !plan.echo.is_empty() => Some(json!({"index": index,
                    "text": plan.echo_of(index), "logprobs": plan.echo_logprobs_of(index),
                    "finish_reason": null})),
                Dialect::Completion => None,
            };
            if let Some(choice) = opening {
                if tx
                    .send(sse(&plan.envelope(true, vec![choice])))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let mut offsets = vec![0usize; plan.choices];
        while done < plan.choices {
            let Some((index, event)) = events.recv().await else {
                break;
            };
            let chunk = match event {
                GenerationEvent::Token(t) => {
                    let text = match plan.dialect {
                        Dialect::Chat => trim_reply_start(&mut started[index], t.text.clone()),
                        Dialect::Completion => t.text.clone(),
                    };
                    let choice = match plan.dialect {
                        Dialect::Completion => {
                            let echo_len = plan.echo_of(index).len();
                            let lp = plan.logprobs.then(|| {
                                completion_logprobs(
                                    &state,
                                    std::slice::from_ref(&t),
                                    echo_len + offsets[index],
                                )
                            });
                            offsets[index] += token_text(&state, t.id).len();
                            json!({"index": index, "text": text, "logprobs": lp,
                                   "finish_reason": null})
                        }
                        Dialect::Chat => {
                            let lp = plan
                                .logprobs
                                .then(|| chat_logprobs(&state, std::slice::from_ref(&t)));
                            json!({"index": index, "delta": {"content": text},
                                   "logprobs": lp, "finish_reason": null})
                        }
                    };
                    plan.envelope(true, vec![choice])
                }
                GenerationEvent::Done {
                    tail,
                    finish,
                    usage,
                } => {
                    done += 1;
                    count_tokens(&usage);
                    record_usage(&admission, &usage, index % plan.n == 0);
                    add_usage(&mut total, &usage, index % plan.n == 0);
                    let choice = match plan.dialect {
                        Dialect::Completion => json!({"index": index, "text": tail,
                            "logprobs": null, "finish_reason": finish.as_str()}),
                        Dialect::Chat => {
                            let tail = trim_reply_start(&mut started[index], tail);
                            let tail = tail.trim_end().to_owned();
                            json!({"index": index, "delta": {"content": tail},
                                   "logprobs": null, "finish_reason": finish.as_str()})
                        }
                    };
                    plan.envelope(true, vec![choice])
                }
                GenerationEvent::Failed(e) => {
                    let _ = tx.send(sse(&e.body())).await;
                    return;
                }
            };
            if tx.send(sse(&chunk)).await.is_err() {
                return;
            }
        }
        if plan.include_usage {
            let mut last = plan.envelope(true, Vec::new());
            last["usage"] = usage_json(&total);
            let _ = tx.send(sse(&last)).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn completions(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    body: Body,
) -> Result<Response, ApiError> {
    let admission = tenant.admit()?;
    let body = read_body(&state, body).await?;
    let req: CompletionRequest = api::parse(&body)?;
    let mut v = req
        .sampling
        .validate(&state.cfg, req.sampling.max_tokens, 16)?;
    let top = api::top_logprobs("logprobs", req.logprobs, &state.cfg)?;
    resolve_model(&state, &mut v.model)?;
    let mut warnings = Vec::new();
    let prompts = prepare_prompts(&state, req.prompt, &mut warnings)?;
    if prompts.len() * v.n > state.cfg.max_choices {
        return Err(too_many_choices(&state, prompts.len(), v.n));
    }
    let id = new_id("cmpl");
    // lm-eval style scoring: `echo` with `logprobs` reports the prompt's own log-probabilities.
    let mut echo_logprobs = Vec::new();
    if req.echo && top.is_some() {
        for (i, p) in prompts.iter().enumerate() {
            let scored = prompt_logprobs(
                &state,
                &tenant,
                &format!("{id}/p{i}"),
                &v.model,
                &p.tokens,
                top,
            )
            .await?;
            echo_logprobs.push(scored);
        }
    }
    let tokens: Vec<Vec<u32>> = prompts.iter().map(|p| p.tokens.clone()).collect();
    let events = if v.max_tokens == 0 {
        // Nothing to generate (scoring, or echo only): no worker needs to run the prompt.
        already_finished(&tokens, v.n)
    } else {
        start_choices(&state, &tenant, &id, &tokens, &v, Dialect::Completion, top)
    };
    let plan = ResponsePlan {
        dialect: Dialect::Completion,
        id,
        model: v.model.clone(),
        created: now_secs(),
        choices: prompts.len() * v.n,
        n: v.n,
        echo: if req.echo {
            prompts.into_iter().map(|p| p.text).collect()
        } else {
            Vec::new()
        },
        echo_logprobs,
        logprobs: top.is_some(),
        include_usage: v.include_usage,
        warnings,
        session: None,
    };
    Ok(if v.stream {
        respond_stream(&state, admission, plan, events)
    } else {
        respond_json(&state, admission, plan, events).await
    })
}

async fn chat_completions(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    body: Body,
) -> Result<Response, ApiError> {
    let admission = tenant.admit()?;
    let body = read_body(&state, body).await?;
    let req: ChatRequest = api::parse(&body)?;
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let mut v = req
        .sampling
        .validate(&state.cfg, max_tokens, state.cfg.default_chat_max_tokens)?;
    let top = api::top_logprobs("top_logprobs", req.top_logprobs, &state.cfg)?;
    let top = if req.logprobs {
        Some(top.unwrap_or(0))
    } else {
        None
    };
    resolve_model(&state, &mut v.model)?;
    let messages = req
        .messages
        .ok_or_else(|| ApiError::invalid("messages", "`messages` is required"))?;
    let prompt = chat::render(&api::chat_messages(&messages)?)?;
    let tokens = encode(&state, &prompt, "messages")?;
    check_prompt(&state, &tokens, "messages")?;
    // The reply ends where the model writes the turn separator; end-of-text is banned so the
    // turn ends on text, as in the reference chat demo.
    v.stop.push(chat::TURN_END.to_owned());
    let id = new_id("chatcmpl");
    let events = start_choices(&state, &tenant, &id, &[tokens], &v, Dialect::Chat, top);
    let plan = ResponsePlan {
        dialect: Dialect::Chat,
        id,
        model: v.model.clone(),
        created: now_secs(),
        choices: v.n,
        n: v.n,
        echo: Vec::new(),
        echo_logprobs: Vec::new(),
        logprobs: top.is_some(),
        include_usage: v.include_usage,
        warnings: Vec::new(),
        session: None,
    };
    Ok(if v.stream {
        respond_stream(&state, admission, plan, events)
    } else {
        respond_json(&state, admission, plan, events).await
    })
}

/// Every choice of every prompt, finished without generating (`max_tokens: 0`).
pub(crate) fn already_finished(prompts: &[Vec<u32>], n: usize) -> generation::ResponseEvents {
    let (tx, rx) = mpsc::channel(prompts.len() * n);
    for (p, prompt) in prompts.iter().enumerate() {
        for i in 0..n {
            let usage = Usage {
                prompt_tokens: prompt.len() as u32,
                ..Usage::default()
            };
            let done = GenerationEvent::Done {
                tail: String::new(),
                finish: Finish::Length,
                usage,
            };
            // The channel holds every event, so this never waits or fails.
            let _ = tx.try_send((p * n + i, done));
        }
    }
    rx
}

/// Completion-style logprobs of a prompt's own tokens: the first has none (nothing precedes it).
async fn prompt_logprobs(
    state: &Router,
    tenant: &Tenant,
    request_id: &str,
    model: &str,
    tokens: &[u32],
    top: Option<u32>,
) -> Result<Value, ApiError> {
    let outs = prompt_scores(state, tenant, request_id, model, tokens, top).await?;
    let mut v = completion_logprobs(state, &outs, 0);
    // OpenAI reports `null` (not `{}`) for the first prompt token's alternatives.
    v["top_logprobs"][0] = Value::Null;
    Ok(v)
}

/// A prompt's own tokens with their log-probabilities given the tokens before them, scored on
/// a worker; the first token has none (nothing precedes it). Texts are left empty.
pub(crate) async fn prompt_scores(
    state: &Router,
    tenant: &Tenant,
    request_id: &str,
    model: &str,
    tokens: &[u32],
    top: Option<u32>,
) -> Result<Vec<TokenOut>, ApiError> {
    let Some(&first) = tokens.first() else {
        return Ok(Vec::new());
    };
    let mut outs = vec![TokenOut {
        id: first,
        text: String::new(),
        logprobs: None,
    }];
    if tokens.len() > 1 {
        let spec = ScoreSpec {
            request_id: request_id.to_owned(),
            tenant: tenant.name().to_owned(),
            weight: tenant.weight(),
            model: model.to_owned(),
            context: tokens[..1].to_vec(),
            continuations: vec![tokens[1..].to_vec()],
            top_logprobs: top,
            deadline: state.cfg.deadline(),
            trace: current_trace(),
        };
        let response = scoring::score(&state.pool, &spec).await?;
        let score = response
            .scores
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::internal("the worker returned no score"))?;
        for (i, (&id, &logprob)) in tokens[1..].iter().zip(&score.logprobs).enumerate() {
            let top = score.top.get(i).map(|t| t.top.clone()).unwrap_or_default();
            outs.push(TokenOut {
                id,
                text: String::new(),
                logprobs: Some(rwkv_proto::wv1::TokenLogprobs { logprob, top }),
            });
        }
    }
    Ok(outs)
}

/// Prompt logprobs followed by generated ones, as one completion-style object.
fn concat_logprobs(prompt: &Value, generated: &Value) -> Value {
    let mut out = prompt.clone();
    for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
        if let (Some(a), Some(b)) = (out[key].as_array_mut(), generated[key].as_array()) {
            a.extend(b.iter().cloned());
        }
    }
    out
}

#[derive(serde::Deserialize)]
struct ScoreRequest {
    model: Option<String>,
    context: Option<ScoreInput>,
    continuations: Option<Vec<ScoreInput>>,
    top_logprobs: Option<i64>,
}

/// `POST /v1/score`: log-probabilities of each continuation after the context. The context is
/// prefilled once on the worker and its state forked per continuation; texts are tokenized
/// separately (so `" A"` is the one token the MMLU script compares).
async fn score(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let admission = tenant.admit()?;
    let body = read_body(&state, body).await?;
    let req: ScoreRequest = api::parse(&body)?;
    let scored = scoring::score_inputs(
        &state,
        &admission,
        req.model,
        req.top_logprobs,
        req.context,
        req.continuations,
    )
    .await?;
    let response = &scored.response;
    let scores: Vec<Value> =
        response
            .scores
            .iter()
            .zip(&scored.continuations)
            .enumerate()
            .map(|(index, (s, tokens))| {
                let sum: f64 = s.logprobs.iter().map(|&l| f64::from(l)).sum();
                let mut entry = json!({"index": index, "tokens": tokens, "logprobs": s.logprobs,
                                   "sum_logprob": sum, "greedy": s.greedy});
                if scored.top.is_some() {
                    entry["top_logprobs"] =
                        s.top
                            .iter()
                            .map(|t| {
                                t.top
                            .iter()
                            .map(|a| json!({"token": a.token, "text": token_text(&state, a.token),
                                            "logprob": a.logprob}))
                            .collect::<Vec<_>>()
                            })
                            .collect();
                }
                entry
            })
            .collect();
    Ok(Json(json!({
        "object": "score",
        "model": scored.model,
        "scores": scores,
        "usage": {"context_tokens": response.context_tokens,
                  "cached_tokens": response.cached_tokens},
    })))
}

async fn models(State(state): State<Router>) -> Json<Value> {
    let data: Vec<Value> = state
        .pool
        .models()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "rwkv"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[derive(serde::Deserialize)]
struct TokenizeRequest {
    prompt: String,
}

async fn tokenize(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let _admission = tenant.admit_request()?;
    let body = read_body(&state, body).await?;
    let req: TokenizeRequest = api::parse(&body)?;
    let tokens = encode(&state, &req.prompt, "prompt")?;
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": state.cfg.max_prompt_tokens,
        "tokens": tokens,
    })))
}

#[derive(serde::Deserialize)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let _admission = tenant.admit_request()?;
    let body = read_body(&state, body).await?;
    let req: DetokenizeRequest = api::parse(&body)?;
    check_vocab(&state, &req.tokens, "tokens")?;
    let bytes = state.tokenizer.decode_bytes_lossy(&req.tokens);
    Ok(Json(
        json!({"prompt": String::from_utf8_lossy(&bytes).into_owned()}),
    ))
}

async fn ready(State(state): State<Router>) -> Response {
    if state.pool.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        ApiError::unavailable("no worker is ready").into_response()
    }
}

async fn metrics_text(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
) -> Response {
    if !tenant.config.admin {
        return ApiError::forbidden("`/metrics` needs an admin API key").into_response();
    }
    match &state.prometheus {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::not_found("metrics are not enabled").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_space_after_a_final_colon_is_stripped() {
        assert_eq!(strip_colon_space("Q: x\nA: ").as_deref(), Some("Q: x\nA:"));
        assert_eq!(strip_colon_space("Assistant:"), None);
        assert_eq!(strip_colon_space("hello "), None);
    }

    #[test]
    fn chat_replies_lose_their_leading_space_once() {
        let mut started = false;
        assert_eq!(trim_reply_start(&mut started, " ".into()), "");
        assert_eq!(trim_reply_start(&mut started, " Hi".into()), "Hi");
        assert_eq!(trim_reply_start(&mut started, " there".into()), " there");
    }
}
