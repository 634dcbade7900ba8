//! The public gRPC API (`rwkv.api.v1`, `proto/rwkv/api/v1/api.proto`), served on the HTTP
//! API's port. It is a second face of the same router: requests go through the same checks
//! ([`crate::api`], [`crate::checks`]), tenants, queue and workers as their HTTP twins, and
//! sessions through [`crate::sessions::ops`].

use std::sync::Arc;

use rwkv_proto::av1::inference_server::{Inference, InferenceServer};
use rwkv_proto::av1::sessions_server::SessionsServer;
use rwkv_proto::{av1, wv1};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::api::{self, Sampling, Stop};
use crate::chat::{self, ChatMessage};
use crate::checks::{check_prompt, check_vocab, encode, resolve_model};
use crate::error::ApiError;
use crate::generation::{self, GenerationEvent, TokenOut, Usage};
use crate::http::{self, Dialect};
use crate::scoring::{self, ScoreInput};
use crate::sessions::SessionView;
use crate::tenants::{Admission, Tenant};
use crate::Router;

/// Largest message of the sessions service either way: a session export of a large model (see
/// the HTTP import limit). The inference service takes requests up to `max_body_bytes`, as the
/// HTTP API does.
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
    let max_request = state.cfg.max_body_bytes;
    let api = PublicApi { state };
    tonic::service::Routes::new(
        InferenceServer::new(api.clone())
            .max_decoding_message_size(max_request)
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

mod sessions;

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

    /// Streams the events of a request's `choices` to the client, holding the tenant's
    /// admission until every choice is done; each choice starts with `echo` when given.
    /// Dropping the stream (the client left) drops `events`, which cancels the work.
    fn stream(
        &self,
        id: String,
        admission: Admission,
        dialect: Dialect,
        choices: usize,
        echo: Option<av1::Echo>,
        mut events: generation::ResponseEvents,
    ) -> EventStream {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        tokio::spawn(async move {
            if let Some(echo) = echo {
                for choice in 0..choices {
                    let event = av1::generate_event::Event::Echo(echo.clone());
                    if tx
                        .send(Ok(generate_event(&id, choice, event)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            // Per choice: whether its reply has started (chat trims the reply's first space).
            let mut started = vec![false; choices];
            let mut open = choices;
            while let Some((choice, event)) = events.recv().await {
                let Some(started) = started.get_mut(choice) else {
                    continue;
                };
                let (item, last) = match event {
                    GenerationEvent::Token(t) => {
                        let mut token = token_of(&state, t);
                        if dialect == Dialect::Chat {
                            token.text = http::trim_reply_start(started, token.text);
                        }
                        let event = av1::generate_event::Event::Token(token);
                        (Ok(generate_event(&id, choice, event)), false)
                    }
                    GenerationEvent::Done {
                        tail,
                        finish,
                        usage,
                    } => {
                        let mut tail = tail;
                        if dialect == Dialect::Chat {
                            tail = http::trim_reply_start(started, tail);
                            tail.truncate(tail.trim_end().len());
                        }
                        http::count_tokens(&usage);
                        // The choices share the prompt: it is charged once.
                        http::record_usage(&admission, &usage, choice == 0);
                        let done = av1::Done {
                            finish_reason: finish.as_str().to_owned(),
                            usage: Some(usage_of(&usage)),
                            tail,
                        };
                        let event = av1::generate_event::Event::Done(done);
                        open -= 1;
                        (Ok(generate_event(&id, choice, event)), open == 0)
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

fn generate_event(
    id: &str,
    choice: usize,
    event: av1::generate_event::Event,
) -> av1::GenerateEvent {
    av1::GenerateEvent {
        id: id.to_owned(),
        event: Some(event),
        choice: rwkv_proto::count_u32(choice),
    }
}

fn token_of(state: &Router, t: TokenOut) -> av1::Token {
    let (logprob, top) = match t.logprobs {
        Some(wv1::TokenLogprobs { logprob, top }) => (
            Some(logprob),
            top.into_iter().map(|a| top_logprob(state, a)).collect(),
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
        n: s.n.map(i64::from),
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
            let (text, tokens) = match req.prompt {
                Some(av1::complete_request::Prompt::Text(text)) => {
                    let tokens = encode(state, &text, "prompt")?;
                    (text, tokens)
                }
                Some(av1::complete_request::Prompt::Tokens(ids)) => {
                    let bytes = state.tokenizer.decode_bytes_lossy(&ids.ids);
                    (String::from_utf8_lossy(&bytes).into_owned(), ids.ids)
                }
                None => (String::new(), Vec::new()),
            };
            check_prompt(state, &tokens, "prompt")?;
            Ok::<_, ApiError>((v, top, text, tokens))
        })();
        let (v, top, text, tokens) = prepared.map_err(|e| status_of(&e))?;
        let id = http::new_id("cmpl");
        let echo = if req.echo {
            Some(
                self.echo(&tenant, &id, &v.model, text, &tokens, top)
                    .await?,
            )
        } else {
            None
        };
        let prompts = [tokens];
        let events = if v.max_tokens == 0 {
            // Nothing to generate (echo only): no worker needs to run the prompt.
            http::already_finished(&prompts, v.n)
        } else {
            http::start_choices(state, &tenant, &id, &prompts, &v, Dialect::Completion, top)
        };
        Ok(Response::new(self.stream(
            id,
            admission,
            Dialect::Completion,
            v.n,
            echo,
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
            v.n,
            None,
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

    async fn score(
        &self,
        request: Request<av1::ScoreRequest>,
    ) -> Result<Response<av1::ScoreResponse>, Status> {
        let tenant = self.tenant(&request)?;
        let admission = tenant.admit().map_err(|e| status_of(&e))?;
        let req = request.into_inner();
        let continuations = req
            .continuations
            .into_iter()
            // An unset continuation is an empty one, which validation names.
            .map(|c| score_input(Some(c)).unwrap_or(ScoreInput::Tokens(Vec::new())))
            .collect();
        let scored = scoring::score_inputs(
            &self.state,
            &admission,
            Some(req.model).filter(|m| !m.is_empty()),
            req.top_logprobs.map(i64::from),
            score_input(req.context),
            Some(continuations),
        )
        .await
        .map_err(|e| status_of(&e))?;
        let response = scored.response;
        let scores = response
            .scores
            .into_iter()
            .zip(scored.continuations)
            .map(|(s, tokens)| av1::ContinuationScore {
                tokens,
                sum_logprob: s.logprobs.iter().map(|&l| f64::from(l)).sum(),
                logprobs: s.logprobs,
                greedy: s.greedy,
                top: s
                    .top
                    .into_iter()
                    .map(|t| av1::Alternatives {
                        top: t
                            .top
                            .into_iter()
                            .map(|a| top_logprob(&self.state, a))
                            .collect(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(av1::ScoreResponse {
            model: scored.model,
            scores,
            context_tokens: response.context_tokens,
            cached_tokens: response.cached_tokens,
        }))
    }

    async fn tokenize(
        &self,
        request: Request<av1::TokenizeRequest>,
    ) -> Result<Response<av1::TokenIds>, Status> {
        let _admission = self
            .tenant(&request)?
            .admit_request()
            .map_err(|e| status_of(&e))?;
        let ids =
            encode(&self.state, &request.into_inner().text, "text").map_err(|e| status_of(&e))?;
        Ok(Response::new(av1::TokenIds { ids }))
    }

    async fn detokenize(
        &self,
        request: Request<av1::TokenIds>,
    ) -> Result<Response<av1::DetokenizeResponse>, Status> {
        let _admission = self
            .tenant(&request)?
            .admit_request()
            .map_err(|e| status_of(&e))?;
        let ids = request.into_inner().ids;
        check_vocab(&self.state, &ids, "ids").map_err(|e| status_of(&e))?;
        let bytes = self.state.tokenizer.decode_bytes_lossy(&ids);
        Ok(Response::new(av1::DetokenizeResponse {
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }))
    }
}

impl PublicApi {
    /// The echo of a completion's prompt: its text, and with `top` its tokens' own
    /// log-probabilities (scored on a worker).
    async fn echo(
        &self,
        tenant: &Tenant,
        id: &str,
        model: &str,
        text: String,
        tokens: &[u32],
        top: Option<u32>,
    ) -> Result<av1::Echo, Status> {
        let mut echo = av1::Echo {
            text,
            tokens: Vec::new(),
        };
        if top.is_some() {
            let request_id = format!("{id}/p0");
            let outs = http::prompt_scores(&self.state, tenant, &request_id, model, tokens, top)
                .await
                .map_err(|e| status_of(&e))?;
            echo.tokens = outs
                .into_iter()
                .map(|t| {
                    let mut token = token_of(&self.state, t);
                    token.text = http::token_text(&self.state, token.id);
                    token
                })
                .collect();
        }
        Ok(echo)
    }
}

fn score_input(t: Option<av1::TextOrTokens>) -> Option<ScoreInput> {
    Some(match t?.value? {
        av1::text_or_tokens::Value::Text(text) => ScoreInput::Text(text),
        av1::text_or_tokens::Value::Tokens(ids) => ScoreInput::Tokens(ids.ids),
    })
}

fn top_logprob(state: &Router, a: wv1::TopLogprob) -> av1::TopLogprob {
    av1::TopLogprob {
        token: a.token,
        text: http::token_text(state, a.token),
        logprob: a.logprob,
    }
}
