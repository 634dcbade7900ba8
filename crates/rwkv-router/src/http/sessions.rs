//! `/v1/sessions`: stateful chat sessions. A session keeps its recurrent state on a worker
//! between turns, so a message only processes its own tokens, never the history again.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /v1/sessions` | create, optionally with a `system` prompt (JSON) |
//! | `POST /v1/sessions/import` | create from an export (`application/octet-stream`) |
//! | `GET /v1/sessions` | the tenant's sessions |
//! | `GET /v1/sessions/{id}` | one session: tokens and turn boundaries |
//! | `DELETE /v1/sessions/{id}` | delete it and free its state |
//! | `POST /v1/sessions/{id}/messages` | send a user message, get (or stream) the reply |
//! | `POST /v1/sessions/{id}/fork` | a copy that continues independently |
//! | `POST /v1/sessions/{id}/rewind` | back to the end of an earlier turn |
//! | `GET /v1/sessions/{id}/export` | tokens and state, bound to the model's weights |
//!
//! Replies use the chat completion format (plus a `session` field), so OpenAI clients can
//! parse them. A turn ends where the model writes the World format's turn separator `\n\n`
//! (or at `max_tokens`); the session then holds exactly the tokens the model wrote, so
//! continuing, forking and rewinding are exact.

use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use rwkv_proto::wv1;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{check_prompt, encode, new_id, now_secs, read_body, Dialect, ResponsePlan};
use crate::api::{self, Content, Sampling};
use crate::chat::{self, ChatMessage};
use crate::error::ApiError;
use crate::generation::{self, GenerationSpec, SessionTurn};
use crate::pool::WorkerEntry;
use crate::sessions::{self as ss, SessionAddr};
use crate::tenants::Tenant;
use crate::Router;
use std::sync::Arc;

/// Largest accepted import body: a 14B model's state is about 80 MiB.
pub const MAX_IMPORT_BYTES: usize = 256 << 20;

/// The session routes (authenticated by the caller's layer).
pub(super) fn routes() -> axum::Router<Router> {
    axum::Router::new()
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/import", post(import))
        .route("/v1/sessions/{id}", get(show).delete(delete))
        .route("/v1/sessions/{id}/messages", post(message))
        .route("/v1/sessions/{id}/fork", post(fork))
        .route("/v1/sessions/{id}/rewind", post(rewind))
        .route("/v1/sessions/{id}/export", get(export))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    model: Option<String>,
    /// The system prompt: the conversation's first turn (`System: ...`).
    system: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ImportQuery {
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RewindRequest {
    turn: i64,
}

#[derive(Debug, Deserialize)]
struct MessageRequest {
    content: Option<Content>,
    max_completion_tokens: Option<i64>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<i64>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// The model a new session runs: the one named, the configured default, or the only one.
fn session_model(state: &Router, named: Option<String>) -> Result<String, ApiError> {
    let mut v = api::Validated {
        model: named
            .or_else(|| state.cfg.default_model.clone())
            .unwrap_or_default(),
        params: Default::default(),
        max_tokens: 0,
        stop: Vec::new(),
        n: 1,
        stream: false,
        include_usage: false,
    };
    super::resolve_model(state, &mut v)?;
    Ok(v.model)
}

/// A worker of `model` for a new session, after the tenant's quota allows one more.
async fn place_new(
    state: &Router,
    tenant: &Tenant,
    model: &str,
) -> Result<Arc<WorkerEntry>, ApiError> {
    let worker = state
        .pool
        .least_loaded(model)
        .ok_or_else(|| ApiError::unavailable(format!("no worker of `{model}` is ready")))?;
    let state_bytes = worker.info().map_or(0, |i| i.state_bytes);
    ss::check_quota(&state.pool, tenant, state_bytes).await?;
    Ok(worker)
}

/// Looks a session up on its worker: 404 for unknown ids and other tenants' sessions.
async fn info_of(
    worker: &WorkerEntry,
    tenant: &Tenant,
    addr: &SessionAddr,
) -> Result<wv1::SessionInfo, ApiError> {
    worker
        .client
        .clone()
        .get_session(wv1::SessionRef {
            tenant: tenant.name().to_owned(),
            session: addr.id,
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| ss::session_error(addr, &s))
}

fn created(addr: &SessionAddr, worker: &WorkerEntry, info: &wv1::SessionInfo) -> Response {
    (
        StatusCode::CREATED,
        Json(ss::session_json(addr, &worker.record.model, info)),
    )
        .into_response()
}

async fn create(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(&state, body).await?;
    let req: CreateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CreateRequest::default()
    } else {
        api::parse(&body)?
    };
    let model = session_model(&state, req.model)?;
    let tokens = match req.system.as_deref() {
        None => Vec::new(),
        Some(system) => {
            let text = format!("System: {}{}", chat::clean(system), chat::TURN_END);
            let tokens = encode(&state, &text, "system")?;
            check_prompt(&state, &tokens, "system")?;
            tokens
        }
    };
    let worker = place_new(&state, &tenant, &model).await?;
    let session = worker
        .client
        .clone()
        .create_session(wv1::CreateSessionRequest {
            tenant: tenant.name().to_owned(),
            tokens,
        })
        .await
        .map_err(|s| ApiError::from_status(&s))?
        .into_inner()
        .session;
    let addr = SessionAddr {
        worker: worker.record.id.clone(),
        id: session,
    };
    let info = info_of(&worker, &tenant, &addr).await?;
    Ok(created(&addr, &worker, &info))
}

async fn import(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Query(query): Query<ImportQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let data = axum::body::to_bytes(body, MAX_IMPORT_BYTES)
        .await
        .map_err(|_| ApiError::too_large(MAX_IMPORT_BYTES))?;
    if data.is_empty() {
        return Err(ApiError::invalid(
            "body",
            "the body must be a session export (GET /v1/sessions/{id}/export)",
        ));
    }
    let model = session_model(&state, query.model)?;
    let worker = place_new(&state, &tenant, &model).await?;
    let session = worker
        .client
        .clone()
        .import_session(wv1::ImportSessionRequest {
            tenant: tenant.name().to_owned(),
            data: data.to_vec(),
        })
        .await
        .map_err(|s| {
            let mut e = ApiError::from_status(&s);
            if e.status == StatusCode::BAD_REQUEST {
                e.param = Some("body".into());
            }
            e
        })?
        .into_inner()
        .session;
    let addr = SessionAddr {
        worker: worker.record.id.clone(),
        id: session,
    };
    let info = info_of(&worker, &tenant, &addr).await?;
    Ok(created(&addr, &worker, &info))
}

async fn list(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
) -> Result<Json<Value>, ApiError> {
    let mut data = Vec::new();
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
                for info in list.into_inner().sessions {
                    let addr = SessionAddr {
                        worker: worker.record.id.clone(),
                        id: info.session,
                    };
                    data.push(ss::session_json(&addr, &worker.record.model, &info));
                }
            }
            Err(status) => {
                tracing::warn!(worker = worker.record.id, "cannot list sessions: {status}");
            }
        }
    }
    Ok(Json(json!({"object": "list", "data": data})))
}

/// The session named in the path and its worker.
fn locate(state: &Router, id: &str) -> Result<(SessionAddr, Arc<WorkerEntry>), ApiError> {
    let addr = SessionAddr::parse(id)?;
    let worker = ss::worker_of(&state.pool, &addr)?;
    Ok((addr, worker))
}

async fn show(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (addr, worker) = locate(&state, &id)?;
    let info = info_of(&worker, &tenant, &addr).await?;
    Ok(Json(ss::session_json(&addr, &worker.record.model, &info)))
}

async fn delete(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let (addr, worker) = locate(&state, &id)?;
    worker
        .client
        .clone()
        .delete_session(wv1::SessionRef {
            tenant: tenant.name().to_owned(),
            session: addr.id,
        })
        .await
        .map_err(|s| ss::session_error(&addr, &s))?;
    Ok(Json(
        json!({"id": addr.public_id(), "object": "session.deleted", "deleted": true}),
    ))
}

async fn fork(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (addr, worker) = locate(&state, &id)?;
    // Check that the session exists (404) before the quota (429).
    info_of(&worker, &tenant, &addr).await?;
    let state_bytes = worker.info().map_or(0, |i| i.state_bytes);
    ss::check_quota(&state.pool, &tenant, state_bytes).await?;
    let child = worker
        .client
        .clone()
        .fork_session(wv1::SessionRef {
            tenant: tenant.name().to_owned(),
            session: addr.id,
        })
        .await
        .map_err(|s| ss::session_error(&addr, &s))?
        .into_inner()
        .session;
    let child = SessionAddr {
        worker: addr.worker.clone(),
        id: child,
    };
    let info = info_of(&worker, &tenant, &child).await?;
    Ok(created(&child, &worker, &info))
}

async fn rewind(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let (addr, worker) = locate(&state, &id)?;
    let body = read_body(&state, body).await?;
    let req: RewindRequest = api::parse(&body)?;
    let turn = u32::try_from(req.turn).map_err(|_| {
        ApiError::invalid(
            "turn",
            format!("`turn` must be 0 or more, got {}", req.turn),
        )
    })?;
    let info = worker
        .client
        .clone()
        .rewind_session(wv1::RewindSessionRequest {
            tenant: tenant.name().to_owned(),
            session: addr.id,
            turn,
        })
        .await
        .map_err(|s| {
            let mut e = ss::session_error(&addr, &s);
            if e.status == StatusCode::BAD_REQUEST {
                e.param = Some("turn".into());
            }
            e
        })?
        .into_inner();
    Ok(Json(ss::session_json(&addr, &worker.record.model, &info)))
}

async fn export(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (addr, worker) = locate(&state, &id)?;
    let data = worker
        .client
        .clone()
        .export_session(wv1::SessionRef {
            tenant: tenant.name().to_owned(),
            session: addr.id,
        })
        .await
        .map_err(|s| ss::session_error(&addr, &s))?
        .into_inner()
        .data;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}.rwkvstate\"", addr.public_id()),
            ),
        ],
        data,
    )
        .into_response())
}

/// The text of the message, as the World format takes it.
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

async fn message(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let (addr, worker) = locate(&state, &id)?;
    let admission = tenant.admit()?;
    let body = read_body(&state, body).await?;
    let req: MessageRequest = api::parse(&body)?;
    if req.sampling.stop.is_some() {
        return Err(ApiError::invalid(
            "stop",
            "`stop` is not supported on sessions: a turn ends where the model ends it, so the \
             session holds exactly what it wrote",
        ));
    }
    if req.sampling.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            "a session takes one reply per turn; fork the session for alternatives",
        ));
    }
    let max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    let mut v = req
        .sampling
        .validate(&state.cfg, max_tokens, state.cfg.default_chat_max_tokens)?;
    let model = worker.record.model.clone();
    if !v.model.is_empty() && v.model != model {
        return Err(ApiError::invalid(
            "model",
            format!("this session runs `{model}`, not `{}`", v.model),
        ));
    }
    v.model = model;
    let top = api::top_logprobs("top_logprobs", req.top_logprobs, &state.cfg)?;
    let top = req.logprobs.then(|| top.unwrap_or(0));
    let prompt = chat::render(&[ChatMessage {
        role: "user".into(),
        content: message_text(req.content)?,
    }])?;
    let tokens = encode(&state, &prompt, "content")?;
    check_prompt(&state, &tokens, "content")?;
    let mut params = v.params.clone();
    params.token_ban = state.unusable_tokens.to_vec();
    // End-of-text is banned as in chat completions; the turn ends on a token that writes the
    // turn separator, which stays in the session.
    params.token_ban.push(0);
    params.end_tokens = state.turn_end_tokens.to_vec();
    let request_id = new_id("chatcmpl");
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
        top_logprobs: top,
        deadline: tokio::time::Instant::now() + state.cfg.request_timeout,
        session: Some(SessionTurn {
            worker: addr.worker.clone(),
            id: addr.id,
            separator: state.turn_separator.to_vec(),
        }),
        trace: super::current_trace(),
    };
    let mut events = generation::start(state.pool.clone(), state.tokenizer.clone(), spec);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if tx.send((0, event)).await.is_err() {
                return;
            }
        }
    });
    let plan = ResponsePlan {
        dialect: Dialect::Chat,
        id: request_id,
        model: v.model.clone(),
        created: now_secs(),
        choices: 1,
        n: 1,
        echo: Vec::new(),
        echo_logprobs: Vec::new(),
        logprobs: top.is_some(),
        include_usage: v.include_usage,
        warnings: Vec::new(),
        session: Some(addr.public_id()),
    };
    Ok(if v.stream {
        super::respond_stream(&state, admission, plan, rx)
    } else {
        super::respond_json(&state, admission, plan, rx).await
    })
}
