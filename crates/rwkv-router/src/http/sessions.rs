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
use serde::Deserialize;
use serde_json::{json, Value};

use super::{new_id, now_secs, read_body, Dialect, ResponsePlan};
use crate::api::{self, Content, Sampling};
use crate::error::ApiError;
use crate::sessions::{ops, SessionView};
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

fn created(view: &SessionView) -> Response {
    (StatusCode::CREATED, Json(view.to_json())).into_response()
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
    let view = ops::create(&state, &tenant, req.model, req.system.as_deref()).await?;
    Ok(created(&view))
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
    let view = ops::import(&state, &tenant, query.model, data.to_vec())
        .await
        .map_err(|mut e| {
            if e.param.as_deref() == Some("data") {
                e.param = Some("body".into());
            }
            e
        })?;
    Ok(created(&view))
}

async fn list(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
) -> Json<Value> {
    let data: Vec<Value> = ops::list(&state, &tenant)
        .await
        .iter()
        .map(SessionView::to_json)
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn show(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(ops::get(&state, &tenant, &id).await?.to_json()))
}

async fn delete(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let addr = ops::delete(&state, &tenant, &id).await?;
    Ok(Json(
        json!({"id": addr.public_id(), "object": "session.deleted", "deleted": true}),
    ))
}

async fn fork(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    Ok(created(&ops::fork(&state, &tenant, &id).await?))
}

async fn rewind(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let body = read_body(&state, body).await?;
    let req: RewindRequest = api::parse(&body)?;
    Ok(Json(
        ops::rewind(&state, &tenant, &id, req.turn).await?.to_json(),
    ))
}

async fn export(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (addr, data) = ops::export(&state, &tenant, &id).await?;
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

async fn message(
    State(state): State<Router>,
    Extension(tenant): Extension<Arc<Tenant>>,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    // Unknown sessions are 404 before anything counts against the tenant's limits.
    crate::sessions::SessionAddr::parse(&id)?;
    let admission = tenant.admit()?;
    let body = read_body(&state, body).await?;
    let req: MessageRequest = api::parse(&body)?;
    let top = api::top_logprobs("top_logprobs", req.top_logprobs, &state.cfg)?;
    let msg = ops::Message {
        content: req.content,
        max_tokens: req.max_completion_tokens.or(req.sampling.max_tokens),
        sampling: req.sampling,
        top_logprobs: req.logprobs.then(|| top.unwrap_or(0)),
    };
    let logprobs = msg.top_logprobs.is_some();
    let turn = ops::send(&state, &tenant, &id, new_id("chatcmpl"), msg)?;
    let rx = turn.events;
    let v = turn.validated;
    let plan = ResponsePlan {
        dialect: Dialect::Chat,
        id: turn.request_id,
        model: v.model.clone(),
        created: now_secs(),
        choices: 1,
        n: 1,
        echo: Vec::new(),
        echo_logprobs: Vec::new(),
        logprobs,
        include_usage: v.include_usage,
        warnings: Vec::new(),
        session: Some(turn.addr.public_id()),
    };
    Ok(if v.stream {
        super::respond_stream(&state, admission, plan, rx)
    } else {
        super::respond_json(&state, admission, plan, rx).await
    })
}
