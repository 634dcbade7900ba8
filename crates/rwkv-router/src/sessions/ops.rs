//! Session operations, shared by the HTTP routes (`/v1/sessions`) and the gRPC `Sessions`
//! service: each checks its input, finds the session's worker and makes the worker call.

use std::sync::Arc;

use rwkv_proto::wv1;
use serde_json::Value;

use super::{check_quota, session_error, session_json, worker_of, SessionAddr};
use crate::api::{self, Content, Sampling, Validated};
use crate::chat::{self, ChatMessage};
use crate::checks::{check_prompt, encode, resolve_model};
use crate::error::ApiError;
use crate::generation::{self, GenerationSpec, SessionTurn};
use crate::pool::WorkerEntry;
use crate::tenants::Tenant;
use crate::Router;

/// A session as callers see it.
#[derive(Clone, Debug)]
pub struct SessionView {
    pub addr: SessionAddr,
    pub model: String,
    pub info: wv1::SessionInfo,
}

impl SessionView {
    pub fn to_json(&self) -> Value {
        session_json(&self.addr, &self.model, &self.info)
    }
}

/// The model a new session runs: the one named, the configured default, or the only one.
fn session_model(state: &Router, named: Option<String>) -> Result<String, ApiError> {
    let mut model = named
        .filter(|m| !m.is_empty())
        .or_else(|| state.cfg.default_model.clone())
        .unwrap_or_default();
    resolve_model(state, &mut model)?;
    Ok(model)
}

/// Makes a new session of `model` with `call` (a worker call returning the new session's id):
/// once the tenant's quota allows one more, on the worker holding the fewest sessions
/// ([`crate::pool::WorkerPool::for_new_sessions`]), or on the next whenever a worker is full
/// of sessions (RESOURCE_EXHAUSTED: its `max_sessions` or `max_sessions_tokens`), so one full
/// worker does not refuse sessions the others have room for. Any other refusal is final; `param` is the field a refused request is blamed on.
async fn create_on_some_worker<F, Fut>(
    state: &Router,
    tenant: &Tenant,
    model: &str,
    param: Option<&str>,
    mut call: F,
) -> Result<(Arc<WorkerEntry>, u64), ApiError>
where
    F: FnMut(Arc<WorkerEntry>) -> Fut,
    Fut: std::future::Future<Output = Result<u64, tonic::Status>>,
{
    let workers = state.pool.for_new_sessions(model);
    let Some(first) = workers.first() else {
        return Err(ApiError::unavailable(format!(
            "no worker of `{model}` is ready"
        )));
    };
    let state_bytes = first.info().map_or(0, |i| i.state_bytes);
    check_quota(&state.pool, tenant, state_bytes).await?;
    let refused = |status: &tonic::Status| {
        let e = ApiError::from_status(status);
        match param {
            Some(param) => blame(e, param),
            None => e,
        }
    };
    let mut full = None;
    for worker in workers {
        match call(worker.clone()).await {
            Ok(id) => {
                worker.session_placed();
                return Ok((worker, id));
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                tracing::info!(
                    worker = worker.record.id,
                    "no room for another session there: {}",
                    status.message()
                );
                full = Some(status);
            }
            Err(status) => return Err(refused(&status)),
        }
    }
    Err(refused(&full.expect("at least one worker was tried")))
}

/// Session `id` on `worker`.
fn on(worker: &WorkerEntry, id: u64) -> SessionAddr {
    SessionAddr {
        worker: worker.record.id.clone(),
        id,
    }
}

/// A worker's refusal of a request as a fault of its field `param` (the worker cannot name it).
fn blame(mut e: ApiError, param: &str) -> ApiError {
    if e.status == axum::http::StatusCode::BAD_REQUEST {
        e.param = Some(param.into());
    }
    e
}

fn session_ref(tenant: &Tenant, addr: &SessionAddr) -> wv1::SessionRef {
    wv1::SessionRef {
        tenant: tenant.name().to_owned(),
        session: addr.id,
    }
}

/// The session named by a public id and its worker.
fn locate(state: &Router, id: &str) -> Result<(SessionAddr, Arc<WorkerEntry>), ApiError> {
    let addr = SessionAddr::parse(id)?;
    let worker = worker_of(&state.pool, &addr)?;
    Ok((addr, worker))
}

/// Reads a session on its worker: 404 for unknown ids and other tenants' sessions.
async fn view(
    worker: &WorkerEntry,
    tenant: &Tenant,
    addr: SessionAddr,
) -> Result<SessionView, ApiError> {
    let info = worker
        .client
        .clone()
        .get_session(session_ref(tenant, &addr))
        .await
        .map_err(|s| session_error(&addr, &s))?
        .into_inner();
    Ok(SessionView {
        addr,
        model: worker.record.model.clone(),
        info,
    })
}

/// A new session of `model` (or the default), starting with an optional system prompt.
pub async fn create(
    state: &Router,
    tenant: &Tenant,
    model: Option<String>,
    system: Option<&str>,
) -> Result<SessionView, ApiError> {
    let model = session_model(state, model)?;
    let tokens = match system {
        None => Vec::new(),
        Some(system) => {
            let text = format!("System: {}{}", chat::clean(system), chat::TURN_END);
            let tokens = encode(state, &text, "system")?;
            check_prompt(state, &tokens, "system")?;
            tokens
        }
    };
    let (worker, session) = create_on_some_worker(state, tenant, &model, None, |worker| {
        let request = wv1::CreateSessionRequest {
            tenant: tenant.name().to_owned(),
            tokens: tokens.clone(),
        };
        async move {
            let created = worker.client.clone().create_session(request).await?;
            Ok(created.into_inner().session)
        }
    })
    .await?;
    view(&worker, tenant, on(&worker, session)).await
}

/// A new session from an export (`export`'s bytes), on a worker of `model`.
pub async fn import(
    state: &Router,
    tenant: &Tenant,
    model: Option<String>,
    data: Vec<u8>,
) -> Result<SessionView, ApiError> {
    if data.is_empty() {
        return Err(ApiError::invalid(
            "data",
            "an export of a session is required (see export)",
        ));
    }
    let model = session_model(state, model)?;
    let (worker, session) = create_on_some_worker(state, tenant, &model, Some("data"), |worker| {
        let request = wv1::ImportSessionRequest {
            tenant: tenant.name().to_owned(),
            data: data.clone(),
        };
        async move {
            let imported = worker.client.clone().import_session(request).await?;
            Ok(imported.into_inner().session)
        }
    })
    .await?;
    view(&worker, tenant, on(&worker, session)).await
}

/// The tenant's sessions on every worker that answers.
pub async fn list(state: &Router, tenant: &Tenant) -> Vec<SessionView> {
    let mut all = Vec::new();
    for worker in state.pool.workers() {
        let listed = worker
            .client
            .clone()
            .list_sessions(wv1::ListSessionsRequest {
                tenant: tenant.name().to_owned(),
            })
            .await;
        match listed {
            Ok(list) => {
                all.extend(
                    list.into_inner()
                        .sessions
                        .into_iter()
                        .map(|info| SessionView {
                            addr: on(&worker, info.session),
                            model: worker.record.model.clone(),
                            info,
                        }),
                )
            }
            Err(status) => {
                tracing::warn!(worker = worker.record.id, "cannot list sessions: {status}");
            }
        }
    }
    all
}

pub async fn get(state: &Router, tenant: &Tenant, id: &str) -> Result<SessionView, ApiError> {
    let (addr, worker) = locate(state, id)?;
    view(&worker, tenant, addr).await
}

pub async fn delete(state: &Router, tenant: &Tenant, id: &str) -> Result<SessionAddr, ApiError> {
    let (addr, worker) = locate(state, id)?;
    worker
        .client
        .clone()
        .delete_session(session_ref(tenant, &addr))
        .await
        .map_err(|s| session_error(&addr, &s))?;
    Ok(addr)
}

/// A copy of the session that continues on its own (same worker).
pub async fn fork(state: &Router, tenant: &Tenant, id: &str) -> Result<SessionView, ApiError> {
    let (addr, worker) = locate(state, id)?;
    // Unknown sessions are 404 before the quota says 429.
    view(&worker, tenant, addr.clone()).await?;
    let state_bytes = worker.info().map_or(0, |i| i.state_bytes);
    check_quota(&state.pool, tenant, state_bytes).await?;
    let child = worker
        .client
        .clone()
        .fork_session(session_ref(tenant, &addr))
        .await
        .map_err(|s| session_error(&addr, &s))?
        .into_inner()
        .session;
    view(&worker, tenant, on(&worker, child)).await
}

/// Back to the end of turn `turn` (0: as created).
pub async fn rewind(
    state: &Router,
    tenant: &Tenant,
    id: &str,
    turn: i64,
) -> Result<SessionView, ApiError> {
    let (addr, worker) = locate(state, id)?;
    let turn = u32::try_from(turn)
        .map_err(|_| ApiError::invalid("turn", format!("`turn` must be 0 or more, got {turn}")))?;
    let info = worker
        .client
        .clone()
        .rewind_session(wv1::RewindSessionRequest {
            tenant: tenant.name().to_owned(),
            session: addr.id,
            turn,
        })
        .await
        .map_err(|s| blame(session_error(&addr, &s), "turn"))?
        .into_inner();
    Ok(SessionView {
        addr,
        model: worker.record.model.clone(),
        info,
    })
}

/// The session's tokens and state, bound to the model's weights.
pub async fn export(
    state: &Router,
    tenant: &Tenant,
    id: &str,
) -> Result<(SessionAddr, Vec<u8>), ApiError> {
    let (addr, worker) = locate(state, id)?;
    let data = worker
        .client
        .clone()
        .export_session(session_ref(tenant, &addr))
        .await
        .map_err(|s| session_error(&addr, &s))?
        .into_inner()
        .data;
    Ok((addr, data))
}

/// One user message to a session, as both APIs receive it.
#[derive(Clone, Debug, Default)]
pub struct Message {
    pub content: Option<Content>,
    pub sampling: Sampling,
    /// `max_completion_tokens` or `max_tokens`.
    pub max_tokens: Option<i64>,
    /// `Some(n)`: log-probabilities with `n` alternatives (already checked).
    pub top_logprobs: Option<u32>,
}

/// A turn that has started: its settings and the reply's events.
pub struct Turn {
    pub addr: SessionAddr,
    pub request_id: String,
    pub validated: Validated,
    /// The turn's events, as choice 0.
    pub events: generation::ResponseEvents,
}

/// The message's text, as the World format takes it.
fn message_text(content: Option<Content>) -> Result<String, ApiError> {
    let messages = api::chat_messages(&[api::Message {
        role: "user".into(),
        content,
    }])
    .map_err(|mut e| {
        e.param = Some("content".into());
        e
    })?;
    let text = messages
        .into_iter()
        .next()
        .map(|m| m.content)
        .unwrap_or_default();
    if chat::clean(&text).is_empty() {
        return Err(ApiError::invalid("content", "`content` must not be empty"));
    }
    Ok(text)
}

/// Validates a message and starts its turn on the session's worker. The turn ends where the
/// model writes the turn separator (kept in the session) or at `max_tokens`; dropping the
/// events cancels it.
pub fn send(
    state: &Router,
    tenant: &Tenant,
    id: &str,
    request_id: String,
    msg: Message,
) -> Result<Turn, ApiError> {
    let (addr, worker) = locate(state, id)?;
    if msg.sampling.stop.is_some() {
        return Err(ApiError::invalid(
            "stop",
            "`stop` is not supported on sessions: a turn ends where the model ends it, so the \
             session holds exactly what it wrote",
        ));
    }
    if msg.sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            "a session takes one reply per turn; fork the session for alternatives",
        ));
    }
    let mut v = msg.sampling.validate(
        &state.cfg,
        msg.max_tokens,
        state.cfg.default_chat_max_tokens,
    )?;
    let model = worker.record.model.clone();
    if !v.model.is_empty() && v.model != model {
        return Err(ApiError::invalid(
            "model",
            format!("this session runs `{model}`, not `{}`", v.model),
        ));
    }
    v.model = model;
    let prompt = chat::render(&[ChatMessage {
        role: "user".into(),
        content: message_text(msg.content)?,
    }])?;
    let tokens = encode(state, &prompt, "content")?;
    check_prompt(state, &tokens, "content")?;
    let mut params = v.params.clone();
    params.token_ban = state.unusable_tokens.to_vec();
    params.sample_below = Some(state.sample_below);
    // End-of-text is banned as in chat completions; the turn ends on a token that writes the
    // turn separator, which stays in the session.
    params.token_ban.push(0);
    params.end_tokens = state.turn_end_tokens.to_vec();
    let spec = GenerationSpec {
        request_id: request_id.clone(),
        tenant: tenant.name().to_owned(),
        weight: tenant.weight(),
        model: v.model.clone(),
        prompt: tokens,
        params,
        max_tokens: v.max_tokens,
        // Trims the separator (and anything after it) from the text; the worker ends the turn.
        stop: vec![chat::TURN_END.to_owned()],
        top_logprobs: msg.top_logprobs,
        deadline: state.cfg.deadline(),
        session: Some(SessionTurn {
            worker: addr.worker.clone(),
            id: addr.id,
            separator: state.turn_separator.to_vec(),
        }),
        trace: crate::http::current_trace(),
    };
    let (tx, events) = generation::response_channel();
    let sink = generation::ChoiceSink::new(tx, 0);
    generation::start(state.pool.clone(), state.tokenizer.clone(), spec, sink);
    Ok(Turn {
        addr,
        request_id,
        validated: v,
        events,
    })
}
