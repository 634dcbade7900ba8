//! The public gRPC API (`rwkv.api.v1`) on the HTTP port, against a CPU worker: the same
//! answers as the HTTP API, the same checks, tenants and sessions.

mod common;

use common::*;
use rwkv_proto::av1::inference_client::InferenceClient;
use rwkv_proto::av1::sessions_client::SessionsClient;
use rwkv_proto::av1::{self, generate_event::Event};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request};

async fn channel(c: &Cluster) -> Channel {
    Channel::from_shared(c.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn greedy(max_tokens: u32) -> Option<av1::Sampling> {
    Some(av1::Sampling {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..av1::Sampling::default()
    })
}

/// A request with `authorization: Bearer <key>` when a key is given.
fn with_key<T>(message: T, key: Option<&str>) -> Request<T> {
    let mut r = Request::new(message);
    if let Some(key) = key {
        let value: MetadataValue<_> = format!("Bearer {key}").parse().unwrap();
        r.metadata_mut().insert("authorization", value);
    }
    r
}

/// Reads a generation stream into (text, finish reason, completion tokens).
async fn collect(
    mut stream: tonic::Streaming<av1::GenerateEvent>,
) -> Result<(String, String, u32), tonic::Status> {
    let mut text = String::new();
    let mut ids = std::collections::HashSet::new();
    while let Some(event) = stream.message().await? {
        ids.insert(event.id.clone());
        match event.event {
            Some(Event::Token(t)) => text.push_str(&t.text),
            Some(Event::Done(d)) => {
                text.push_str(&d.tail);
                assert_eq!(ids.len(), 1, "one id per stream");
                assert_eq!(event.choice, 0);
                let usage = d.usage.unwrap();
                return Ok((text, d.finish_reason, usage.completion_tokens));
            }
            Some(Event::Echo(_)) => panic!("an echo nobody asked for"),
            None => panic!("empty event"),
        }
    }
    panic!("the stream ended without a done event")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_chat_match_the_http_api() {
    let c = start(RouterConfig::default(), 4).await;
    let mut inference = InferenceClient::new(channel(&c).await);
    let prompt = "The quick brown fox";
    let stream = inference
        .complete(av1::CompleteRequest {
            prompt: Some(av1::complete_request::Prompt::Text(prompt.into())),
            sampling: greedy(12),
            echo: false,
        })
        .await
        .unwrap()
        .into_inner();
    let (text, finish, generated) = collect(stream).await.unwrap();
    assert_eq!(text, c.direct(prompt, 12));
    assert_eq!((finish.as_str(), generated), ("length", 12));

    let (_, http) = c
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0}),
        )
        .await;
    let stream = inference
        .chat(av1::ChatRequest {
            messages: vec![av1::ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }],
            sampling: greedy(8),
        })
        .await
        .unwrap()
        .into_inner();
    let (text, finish, _) = collect(stream).await.unwrap();
    assert_eq!(text, http["choices"][0]["message"]["content"]);
    assert_eq!(finish, http["choices"][0]["finish_reason"]);

    let models = inference
        .list_models(av1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(models.models, vec![MODEL.to_owned()]);

    // The same checks as HTTP, as gRPC codes; the field leads the message.
    let mut bad = greedy(4).unwrap();
    bad.temperature = Some(9.0);
    let status = inference
        .complete(av1::CompleteRequest {
            prompt: Some(av1::complete_request::Prompt::Text("x".into())),
            sampling: Some(bad),
            echo: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("temperature"), "{status}");
    let mut other_model = greedy(4).unwrap();
    other_model.model = "nope".into();
    let status = inference
        .complete(av1::CompleteRequest {
            prompt: Some(av1::complete_request::Prompt::Tokens(av1::TokenIds {
                ids: vec![1, 2],
            })),
            sampling: Some(other_model),
            echo: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status}");
    let status = inference
        .complete(av1::CompleteRequest {
            prompt: Some(av1::complete_request::Prompt::Tokens(av1::TokenIds {
                ids: vec![1 << 30],
            })),
            sampling: greedy(1),
            echo: false,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    // The HTTP API still answers on the same port.
    let (status, _) = c
        .post("/v1/completions", json!({"prompt": "a", "max_tokens": 1}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_grpc_continue_exactly_and_stay_with_their_tenant() {
    let mut a = tenant("a", "key-a", false);
    a.max_concurrent = None;
    let b = tenant("b", "key-b", false);
    let c = start_full(
        RouterConfig::default(),
        4,
        64,
        Some(TenantsFile {
            tenants: vec![a, b],
        }),
    )
    .await;
    let mut sessions = SessionsClient::new(channel(&c).await);
    let key = Some("key-a");
    let session = sessions
        .create(with_key(
            av1::CreateSessionRequest {
                model: String::new(),
                system: Some("Be brief.".into()),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.model, MODEL);
    assert_eq!(session.turns.len(), 1);
    let send = |id: &str, content: &str| {
        with_key(
            av1::SendRequest {
                id: id.to_owned(),
                content: content.to_owned(),
                sampling: greedy(6),
            },
            key,
        )
    };
    let reply = sessions.send(send(&session.id, "hello")).await.unwrap();
    collect(reply.into_inner()).await.unwrap();
    let fork = sessions
        .fork(with_key(
            av1::SessionRef {
                id: session.id.clone(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    let (original, _, _) = collect(
        sessions
            .send(send(&session.id, "more"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    let (forked, _, _) = collect(
        sessions
            .send(send(&fork.id, "more"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert_eq!(forked, original);

    // Rewind, export, import: the imported session replays the same turn.
    let rewound = sessions
        .rewind(with_key(
            av1::RewindRequest {
                id: session.id.clone(),
                turn: 1,
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rewound.turns.len(), 2);
    let state = sessions
        .export(with_key(
            av1::SessionRef {
                id: session.id.clone(),
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    let imported = sessions
        .import(with_key(
            av1::ImportRequest {
                model: String::new(),
                data: state.data,
            },
            key,
        ))
        .await
        .unwrap()
        .into_inner();
    let (again, _, _) = collect(
        sessions
            .send(send(&imported.id, "more"))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert_eq!(again, original);
    let listed = sessions
        .list(with_key(av1::ListSessionsRequest {}, key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.sessions.len(), 3);

    // Another tenant: not found; no key: unauthenticated.
    let status = sessions
        .get(with_key(
            av1::SessionRef {
                id: session.id.clone(),
            },
            Some("key-b"),
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = sessions
        .send(with_key(
            av1::SendRequest {
                id: session.id.clone(),
                content: "hi".into(),
                sampling: greedy(2),
            },
            Some("key-b"),
        ))
        .await;
    let status = match status {
        Err(s) => s,
        Ok(stream) => collect(stream.into_inner()).await.unwrap_err(),
    };
    assert_eq!(status.code(), Code::NotFound, "{status}");
    let status = sessions
        .list(with_key(av1::ListSessionsRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    sessions
        .delete(with_key(av1::SessionRef { id: fork.id }, key))
        .await
        .unwrap();
}

/// Reads a multi-choice stream: per choice, its echo (if any) and its text.
async fn collect_choices(
    mut stream: tonic::Streaming<av1::GenerateEvent>,
    n: usize,
) -> Vec<(Option<av1::Echo>, String)> {
    let mut choices = vec![(None, String::new()); n];
    let mut done = vec![false; n];
    while let Some(event) = stream.message().await.unwrap() {
        let i = event.choice as usize;
        assert!(!done[i], "an event after choice {i} was done");
        match event.event.unwrap() {
            Event::Echo(e) => {
                assert!(choices[i].1.is_empty(), "the echo comes first");
                choices[i].0 = Some(e);
            }
            Event::Token(t) => choices[i].1.push_str(&t.text),
            Event::Done(d) => {
                choices[i].1.push_str(&d.tail);
                done[i] = true;
            }
        }
    }
    assert!(done.iter().all(|&d| d), "every choice ends with done");
    choices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_tokenize_choices_and_echo_match_the_http_api() {
    let c = start(RouterConfig::default(), 4).await;
    let mut inference = InferenceClient::new(channel(&c).await);

    // Scoring: the same numbers as `/v1/score`.
    let context = "Question: is water wet?\nAnswer:";
    let conts = [" yes", " no", " it depends"];
    let (status, http) = c
        .post(
            "/v1/score",
            json!({"context": context, "continuations": conts, "top_logprobs": 2}),
        )
        .await;
    assert_eq!(status, 200, "{http}");
    let text = |t: &str| av1::TextOrTokens {
        value: Some(av1::text_or_tokens::Value::Text(t.into())),
    };
    let scored = inference
        .score(av1::ScoreRequest {
            model: String::new(),
            context: Some(text(context)),
            continuations: conts.iter().map(|t| text(t)).collect(),
            top_logprobs: Some(2),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scored.model, MODEL);
    assert_eq!(scored.scores.len(), 3);
    for (i, s) in scored.scores.iter().enumerate() {
        let want = &http["scores"][i];
        assert_eq!(json!(s.tokens), want["tokens"], "continuation {i}");
        let want_lps: Vec<f32> = want["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(s.logprobs, want_lps, "continuation {i}");
        assert_eq!(json!(s.greedy), want["greedy"], "continuation {i}");
        assert!((s.sum_logprob - want["sum_logprob"].as_f64().unwrap()).abs() < 1e-6);
        assert_eq!(s.top.len(), s.tokens.len());
        for (j, alternatives) in s.top.iter().enumerate() {
            let ids: Vec<u32> = alternatives.top.iter().map(|a| a.token).collect();
            let want: Vec<u32> = want["top_logprobs"][j]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["token"].as_u64().unwrap() as u32)
                .collect();
            assert_eq!(ids, want, "continuation {i}, token {j}");
        }
    }
    let status = inference
        .score(av1::ScoreRequest {
            model: String::new(),
            context: Some(text(context)),
            continuations: vec![text(" fine"), av1::TextOrTokens { value: None }],
            top_logprobs: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("continuations[1]"), "{status}");

    // Tokenize and detokenize, as `/tokenize` and `/detokenize`.
    let ids = inference
        .tokenize(av1::TokenizeRequest {
            text: "User: hi".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .ids;
    assert_eq!(ids, vec![24281, 59, 4571]);
    let back = inference
        .detokenize(av1::TokenIds { ids })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.text, "User: hi");
    let status = inference
        .detokenize(av1::TokenIds { ids: vec![1 << 30] })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("ids"), "{status}");

    // Three seeded choices: the same texts as HTTP's `n: 3`, each choice tagged.
    let prompt = "Once upon a time";
    let (_, http) = c
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "n": 3, "seed": 9, "max_tokens": 6, "temperature": 1.0}),
        )
        .await;
    let sampling = av1::Sampling {
        max_tokens: Some(6),
        temperature: Some(1.0),
        seed: Some(9),
        n: Some(3),
        ..av1::Sampling::default()
    };
    let stream = inference
        .complete(av1::CompleteRequest {
            prompt: Some(av1::complete_request::Prompt::Text(prompt.into())),
            sampling: Some(sampling),
            echo: false,
        })
        .await
        .unwrap()
        .into_inner();
    let choices = collect_choices(stream, 3).await;
    for (i, (echo, text)) in choices.iter().enumerate() {
        assert!(echo.is_none());
        assert_eq!(text, &http["choices"][i]["text"], "choice {i}");
    }

    // lm-eval style echo: the prompt's own log-probabilities, as HTTP reports them.
    let (_, http) = c
        .post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 0, "echo": true, "logprobs": 1, "n": 2}),
        )
        .await;
    let stream = inference
        .complete(av1::CompleteRequest {
            prompt: Some(av1::complete_request::Prompt::Text(prompt.into())),
            sampling: Some(av1::Sampling {
                max_tokens: Some(0),
                top_logprobs: Some(1),
                n: Some(2),
                ..av1::Sampling::default()
            }),
            echo: true,
        })
        .await
        .unwrap()
        .into_inner();
    let choices = collect_choices(stream, 2).await;
    let want = &http["choices"][0]["logprobs"];
    for (echo, text) in choices {
        let echo = echo.expect("each choice starts with the echo");
        assert_eq!(echo.text, prompt);
        assert!(text.is_empty(), "max_tokens 0 generates nothing");
        let texts: Vec<&str> = echo.tokens.iter().map(|t| t.text.as_str()).collect();
        assert_eq!(json!(texts), want["tokens"]);
        assert_eq!(echo.tokens[0].logprob, None);
        for (j, token) in echo.tokens.iter().enumerate().skip(1) {
            let lp = want["token_logprobs"][j].as_f64().unwrap() as f32;
            assert_eq!(token.logprob, Some(lp), "token {j}");
            assert_eq!(token.top.len(), 1);
        }
    }
}

/// The inference service takes messages up to `max_body_bytes`, like the HTTP API (it allowed
/// the sessions service's 256 MiB before: one Tokenize call of 200 MiB of text cost 700 MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_requests_over_the_body_limit_are_refused() {
    let cfg = RouterConfig {
        max_body_bytes: 4096,
        ..RouterConfig::default()
    };
    let c = start(cfg, 1).await;
    let mut inference = InferenceClient::new(channel(&c).await);
    let small = inference
        .tokenize(av1::TokenizeRequest {
            text: "hello".into(),
        })
        .await
        .unwrap();
    assert!(!small.into_inner().ids.is_empty());
    let err = inference
        .tokenize(av1::TokenizeRequest {
            text: "x".repeat(10_000),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
}

/// Tokenize and detokenize count against a tenant's request rate on both APIs (a bucket of
/// one request here): they run no model tokens, but each costs the router's CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_counts_against_the_request_rate_on_both_apis() {
    let slow = |name: &str, key: &str| TenantConfig {
        requests_per_second: Some(0.01),
        ..tenant(name, key, false)
    };
    let tenants = TenantsFile {
        tenants: vec![slow("http", "key-h"), slow("grpc", "key-g")],
    };
    let c = start_full(RouterConfig::default(), 2, 256, Some(tenants)).await;
    let tokenize = || {
        c.http
            .post(format!("{}/tokenize", c.base))
            .bearer_auth("key-h")
            .json(&json!({"prompt": "Hello"}))
            .send()
    };
    assert_eq!(tokenize().await.unwrap().status(), 200);
    let refused = tokenize().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let detokenize = c
        .http
        .post(format!("{}/detokenize", c.base))
        .bearer_auth("key-h")
        .json(&json!({"tokens": [33]}))
        .send()
        .await
        .unwrap();
    assert_eq!(detokenize.status(), 429);

    let mut client = InferenceClient::new(channel(&c).await);
    let text = || {
        with_key(
            av1::TokenizeRequest {
                text: "Hello".into(),
            },
            Some("key-g"),
        )
    };
    assert!(client.tokenize(text()).await.is_ok());
    let status = client.tokenize(text()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let status = client
        .detokenize(with_key(av1::TokenIds { ids: vec![33] }, Some("key-g")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
}
