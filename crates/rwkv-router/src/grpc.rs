//! The public gRPC API (`rwkv.api.v1`, `proto/rwkv/api/v1/api.proto`), served on the HTTP
//! API's port. It is a second face of the same router: requests go through the same checks
//! ([`crate::api`], [`crate::checks`]), tenants, queue and workers as their HTTP twins, and
//! sessions through [`crate::sessions::ops`].

use std::sync::Arc;

use rwkv_proto::av1::inference_server::{Inference, InferenceServer};
use rwkv_proto::av1::sessions_server::{Sessions, SessionsServer};
use rwkv_proto::{av1, wv1};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::{self, Content, Sampling, Stop};
use crate::chat::{self, ChatMessage};
use crate::checks::{check_prompt, encode, resolve_model};
use crate::error::ApiError;
use crate::generation::{GenerationEvent, TokenOut, Usage};
use crate::http::{self, Dialect};
use crate::sessions::{ops, SessionView};
use crate::tenants::{Admission, Tenant};
use crate::Router;

/// Largest message either way: a session export of a large model (see the HTTP import limit).
const MAX_MESSAGE_BYTES: usize = http::MAX_IMPORT_BYTES;
/// Events buffered per stream before the generation waits for the client.
const STREAM_BUFFER: usize = 64;

/// Both services over one router state; cheap to clone.
#[derive(Clone)]
pub struct PublicApi {
    state: Router,
}

/// The gRPC routes, to be merged into the HTTP router.
pub fn routes(state: Router) -> axum::Router {
    let api = PublicApi { state };
    tonic::service::Routes::new(
        InferenceServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        SessionsServer::new(api)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .into_axum_router()
}

/// An API error as a gRPC status; a field error's message starts with the field.
pub fn status_of(e: &ApiError) -> Status {
    let message = match &e.param {
        Some(param) if !e.message.starts_with(param.as_str()) => {
            format!("{param}: {}", e.message)
        }
        _ => e.message.clone(),
    };
    match e.status.as_u16() {
        400 | 413 => Status::invalid_argument(message),
        401 => Status::unauthenticated(message),
        403 => Status::permission_denied(message),
        404 => Status::not_found(message),
        409 => Status::failed_precondition(message),
        429 => Status::resource_exhausted(message),
        503 => Status::unavailable(message),
        504 => Status::deadline_exceeded(message),
        499 => Status::cancelled(message),
        _ => Status::internal(message),
    }
}

type EventStream = ReceiverStream<Result<av1::GenerateEvent, Status>>;

impl PublicApi {
    /// The caller's tenant from `authorization` metadata (open mode: the default tenant).
    fn tenant<T>(&self, request: &Request<T>) -> Result<Arc<Tenant>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.state
            .tenants
            .authenticate(header)
            .map_err(|e| status_of(&e))
    }

    /// Streams a generation's events to the client, holding the tenant's admission until the
    /// end. Dropping the stream (the client left) drops `events`, which cancels the work.
    fn stream(
        &self,
        id: String,
        admission: Admission,
        dialect: Dialect,
        mut events: mpsc::Receiver<(usize, GenerationEvent)>,
    ) -> EventStream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        tokio::spawn(async move {
            let mut started = false;
            while let Some((_, event)) = events.recv().await {
                let (item, last) = match event {
                    GenerationEvent::Token(t) => {
                        let mut token = token_of(&state, t);
                        if dialect == Dialect::Chat {
                            token.text = http::trim_reply_start(&mut started, token.text);
                        }
                        let event = av1::generate_event::Event::Token(token);
                        (Ok(generate_event(&id, event)), false)
                    }
                    GenerationEvent::Done {
                        tail,
                        finish,
                        usage,
                    } => {
                        let mut tail = tail;
                        if dialect == Dialect::Chat {
                            tail = http::trim_reply_start(&mut started, tail);
                            tail.truncate(tail.trim_end().len());
                        }
                        http::count_tokens(&usage);
                        http::record_usage(&admission, &usage, true);
                        let done = av1::Done {
                            finish_reason: finish.as_str().to_owned(),
                            usage: Some(usage_of(&usage)),
                            tail,
                        };
                        let event = av1::generate_event::Event::Done(done);
                        (Ok(generate_event(&id, event)), true)
                    }
                    GenerationEvent::Failed(e) => (Err(status_of(&e)), true),
                };
                if tx.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

fn generate_event(id: &str, event: av1::generate_event::Event) -> av1::GenerateEvent {
    av1::GenerateEvent {
        id: id.to_owned(),
        event: Some(event),
    }
}

fn token_of(state: &Router, t: TokenOut) -> av1::Token {
    let (logprob, top) = match t.logprobs {
        Some(wv1::TokenLogprobs { logprob, top }) => (
            Some(logprob),
            top.into_iter()
                .map(|a| av1::TopLogprob {
                    token: a.token,
                    text: http::token_text(state, a.token),
                    logprob: a.logprob,
                })
                .collect(),
        ),
        None => (None, Vec::new()),
    };
    av1::Token {
        id: t.id,
        text: t.text,
        logprob,
        top,
    }
}

fn usage_of(u: &Usage) -> av1::Usage {
    av1::Usage {
        prompt_tokens: u.prompt_tokens,
        cached_tokens: u.cached_tokens,
        completion_tokens: u.completion_tokens,
    }
}

/// The wire's sampling settings as the HTTP API's, so both validate alike. Returns them with
/// `max_tokens` and `top_logprobs`.
fn sampling_of(s: Option<av1::Sampling>) -> (Sampling, Option<i64>, Option<i64>) {
    let s = s.unwrap_or_default();
    let sampling = Sampling {
        model: Some(s.model).filter(|m| !m.is_empty()),
        temperature: s.temperature.map(f64::from),
        top_p: s.top_p.map(f64::from),
        top_k: s.top_k.map(i64::from),
        presence_penalty: s.presence_penalty.map(f64::from),
        frequency_penalty: s.frequency_penalty.map(f64::from),
        penalty_decay: s.penalty_decay.map(f64::from),
        stop: (!s.stop.is_empty()).then_some(Stop::Many(s.stop)),
        // The HTTP API takes i64 seeds and reinterprets the bits; do the same.
        seed: s.seed.map(|v| v as i64),
        ..Sampling::default()
    };
    (
        sampling,
        s.max_tokens.map(i64::from),
        s.top_logprobs.map(i64::from),
    )
}

fn session_of(v: &SessionView) -> av1::Session {
    av1::Session {
        id: v.addr.public_id(),
        model: v.model.clone(),
        tokens: v.info.tokens,
        turns: v.info.turns.clone(),
        busy: v.info.busy,
    }
}

#[tonic::async_trait]
impl Inference for PublicApi {
    type CompleteStream = EventStream;
    type ChatStream = EventStream;

    async fn complete(
        &self,
        request: Request<av1::CompleteRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let tenant = self.tenant(&request)?;
        let admission = tenant.admit().map_err(|e| status_of(&e))?;
        let req = request.into_inner();
        let state = &self.state;
        let (sampling, max_tokens, top) = sampling_of(req.sampling);
        let prepared = (|| {
            let mut v = sampling.validate(&state.cfg, max_tokens, 16)?;
            resolve_model(state, &mut v.model)?;
            let top = api::top_logprobs("top_logprobs", top, &state.cfg)?;
            let tokens = match req.prompt {
                Some(av1::complete_request::Prompt::Text(text)) => encode(state, &text, "prompt")?,
                Some(av1::complete_request::Prompt::Tokens(ids)) => ids.ids,
                None => Vec::new(),
            };
            check_prompt(state, &tokens, "prompt")?;
            Ok::<_, ApiError>((v, top, tokens))
        })();
        let (v, top, tokens) = prepared.map_err(|e| status_of(&e))?;
        let id = http::new_id("cmpl");
        let events =
            http::start_choices(state, &tenant, &id, &[tokens], &v, Dialect::Completion, top);
        Ok(Response::new(self.stream(
            id,
            admission,
            Dialect::Completion,
            events,
        )))
    }

    async fn chat(
        &self,
        request: Request<av1::ChatRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let tenant = self.tenant(&request)?;
        let admission = tenant.admit().map_err(|e| status_of(&e))?;
        let req = request.into_inner();
        let state = &self.state;
        let (sampling, max_tokens, top) = sampling_of(req.sampling);
        let prepared = (|| {
            let mut v =
                sampling.validate(&state.cfg, max_tokens, state.cfg.default_chat_max_tokens)?;
            resolve_model(state, &mut v.model)?;
            let top = api::top_logprobs("top_logprobs", top, &state.cfg)?;
            let messages: Vec<ChatMessage> = req
                .messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: m.content,
                })
                .collect();
            let tokens = encode(state, &chat::render(&messages)?, "messages")?;
            check_prompt(state, &tokens, "messages")?;
            v.stop.push(chat::TURN_END.to_owned());
            Ok::<_, ApiError>((v, top, tokens))
        })();
        let (v, top, tokens) = prepared.map_err(|e| status_of(&e))?;
        let id = http::new_id("chatcmpl");
        let events = http::start_choices(state, &tenant, &id, &[tokens], &v, Dialect::Chat, top);
        Ok(Response::new(self.stream(
            id,
            admission,
            Dialect::Chat,
            events,
        )))
    }

    async fn list_models(
        &self,
        request: Request<av1::ListModelsRequest>,
    ) -> Result<Response<av1::ModelList>, Status> {
        self.tenant(&request)?;
        Ok(Response::new(av1::ModelList {
            models: self.state.pool.models(),
        }))
    }
}

#[tonic::async_trait]
impl Sessions for PublicApi {
    type SendStream = EventStream;

    async fn create(
        &self,
        request: Request<av1::CreateSessionRequest>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        let model = Some(req.model).filter(|m| !m.is_empty());
        let view = ops::create(&self.state, &tenant, model, req.system.as_deref())
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn get(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let view = ops::get(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn list(
        &self,
        request: Request<av1::ListSessionsRequest>,
    ) -> Result<Response<av1::SessionList>, Status> {
        let tenant = self.tenant(&request)?;
        let sessions = ops::list(&self.state, &tenant).await;
        Ok(Response::new(av1::SessionList {
            sessions: sessions.iter().map(session_of).collect(),
        }))
    }

    async fn send(
        &self,
        request: Request<av1::SendRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        crate::sessions::SessionAddr::parse(&req.id).map_err(|e| status_of(&e))?;
        let admission = tenant.admit().map_err(|e| status_of(&e))?;
        let (sampling, max_tokens, top) = sampling_of(req.sampling);
        let top =
            api::top_logprobs("top_logprobs", top, &self.state.cfg).map_err(|e| status_of(&e))?;
        let msg = ops::Message {
            content: Some(Content::Text(req.content)),
            sampling,
            max_tokens,
            top_logprobs: top,
        };
        let turn = ops::send(&self.state, &tenant, &req.id, http::new_id("chatcmpl"), msg)
            .map_err(|e| status_of(&e))?;
        let events = crate::generation::single_choice(turn.events);
        Ok(Response::new(self.stream(
            turn.request_id,
            admission,
            Dialect::Chat,
            events,
        )))
    }

    async fn fork(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let view = ops::fork(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn rewind(
        &self,
        request: Request<av1::RewindRequest>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        let view = ops::rewind(&self.state, &tenant, &req.id, i64::from(req.turn))
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn export(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::SessionState>, Status> {
        let tenant = self.tenant(&request)?;
        let (addr, data) = ops::export(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(av1::SessionState {
            id: addr.public_id(),
            data,
        }))
    }

    async fn import(
        &self,
        request: Request<av1::ImportRequest>,
    ) -> Result<Response<av1::Session>, Status> {
        let tenant = self.tenant(&request)?;
        let req = request.into_inner();
        let model = Some(req.model).filter(|m| !m.is_empty());
        let view = ops::import(&self.state, &tenant, model, req.data)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(session_of(&view)))
    }

    async fn delete(
        &self,
        request: Request<av1::SessionRef>,
    ) -> Result<Response<av1::DeleteSessionResponse>, Status> {
        let tenant = self.tenant(&request)?;
        ops::delete(&self.state, &tenant, &request.into_inner().id)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(av1::DeleteSessionResponse {}))
    }
}
