//! The worker's gRPC service over 127.0.0.1 with the CPU backend: results equal the engine's,
//! errors carry the right codes and name the field, and disconnects free slots.

use std::path::PathBuf;
use std::time::Duration;

use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, GenerateRequest, SamplingParams};
use rwkv_model::ModelWeights;
use rwkv_proto::auth::{ClientAuth, WorkerToken};
use rwkv_proto::wv1::{self, worker_client::WorkerClient};
use rwkv_worker::{WorkerIdentity, WorkerService};
use tonic::transport::Channel;
use tonic::Code;

const SLOTS: usize = 4;

fn weights() -> ModelWeights {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rwkv6-tiny-c128-l2.safetensors");
    ModelWeights::load(path).unwrap()
}

struct Fixture {
    engine: Engine,
    client: WorkerClient<Channel>,
    /// The client's connection, for clients of other kinds.
    channel: Channel,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

async fn start() -> Fixture {
    start_with(None).await
}

/// A worker that requires `token`, if given (the fixture's client does not send it).
async fn start_with(token: Option<WorkerToken>) -> Fixture {
    let engine =
        Engine::start(CpuBackend::new(&weights(), SLOTS), EngineConfig::default()).unwrap();
    let service = WorkerService::new(
        engine.handle(),
        WorkerIdentity {
            worker_id: "w0".into(),
            model_id: "tiny".into(),
            model_hash: [7; 32],
            backend: "cpu".into(),
            slots: SLOTS,
            max_batch_size: 64,
            max_waiting: 256,
        },
    );
    let service = match token {
        Some(token) => service.require_token(token),
        None => service,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(rwkv_worker::serve(service, listener, async {
        let _ = rx.await;
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    Fixture {
        engine,
        client: WorkerClient::new(channel.clone()),
        channel,
        _shutdown: tx,
    }
}

fn greedy(max_tokens: u32) -> wv1::SamplingParams {
    wv1::SamplingParams {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..Default::default()
    }
}

fn generate_request(tokens: &[u32], params: wv1::SamplingParams) -> wv1::GenerateRequest {
    wv1::GenerateRequest {
        tenant: "acme".into(),
        tokens: tokens.to_vec(),
        params: Some(params),
        ..Default::default()
    }
}

/// Reads a whole stream: the tokens and the final event.
async fn collect(
    client: &mut WorkerClient<Channel>,
    req: wv1::GenerateRequest,
) -> Result<(Vec<u32>, wv1::Finished), tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut tokens = Vec::new();
    while let Some(event) = stream.message().await? {
        match event.event.unwrap() {
            wv1::generate_event::Event::Token(t) => tokens.push(t.token),
            wv1::generate_event::Event::Finished(f) => return Ok((tokens, f)),
        }
    }
    panic!("stream ended without a finished event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_generation_over_grpc_equals_the_engine() {
    let mut fx = start().await;
    let prompt = [1u32, 20, 300, 999, 7];
    let (tokens, finished) = collect(&mut fx.client, generate_request(&prompt, greedy(12)))
        .await
        .unwrap();
    assert_eq!(finished.reason, wv1::FinishReason::Length as i32);
    assert_eq!(finished.usage.unwrap().generated_tokens, 12);

    let direct = fx
        .engine
        .generate(GenerateRequest {
            tenant: "other".into(),
            tokens: prompt.to_vec(),
            params: SamplingParams {
                temperature: 0.0,
                max_tokens: 12,
                ..SamplingParams::default()
            },
            ..GenerateRequest::default()
        })
        .unwrap()
        .collect()
        .0;
    assert_eq!(tokens, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_choices_share_one_stream_and_equal_separate_requests() {
    let mut fx = start().await;
    let prompt = [1u32, 20, 300, 999, 7, 42, 5];
    let sampled = |seed: u64| wv1::SamplingParams {
        temperature: Some(1.0),
        top_p: Some(0.9),
        max_tokens: Some(8),
        seed: Some(seed),
        ..Default::default()
    };
    let req = wv1::GenerateRequest {
        n: 3,
        ..generate_request(&prompt, sampled(11))
    };
    let mut stream = fx.client.generate(req).await.unwrap().into_inner();
    let mut tokens = vec![Vec::new(); 3];
    let mut usage = vec![None; 3];
    while let Some(event) = stream.message().await.unwrap() {
        let choice = event.choice as usize;
        assert!(
            usage[choice].is_none(),
            "event after choice {choice} finished"
        );
        match event.event.unwrap() {
            wv1::generate_event::Event::Token(t) => tokens[choice].push(t.token),
            wv1::generate_event::Event::Finished(f) => usage[choice] = f.usage,
        }
    }
    for (i, (got, usage)) in tokens.iter().zip(&usage).enumerate() {
        let usage = usage.expect("every choice finishes");
        assert_eq!(usage.generated_tokens, 8);
        // The prompt was prefilled once: every other choice started from that state.
        let cached = if i == 0 { 0 } else { prompt.len() as u32 };
        assert_eq!(usage.cached_tokens, cached, "choice {i}");
        let alone = generate_request(&prompt, sampled(11 + i as u64));
        let (want, _) = collect(&mut fx.client, alone).await.unwrap();
        assert_eq!(got, &want, "choice {i}");
    }
    let session = fx
        .client
        .create_session(wv1::CreateSessionRequest {
            tenant: "acme".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session;
    let turn = wv1::GenerateRequest {
        n: 2,
        session: Some(session),
        ..generate_request(&prompt, sampled(1))
    };
    let status = collect(&mut fx.client, turn).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("choices"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_naming_the_field() {
    let mut fx = start().await;
    let vocab = fx
        .client
        .info(wv1::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .vocab_size;
    let cases = [
        (generate_request(&[vocab], greedy(1)), "vocabulary"),
        (
            generate_request(
                &[1],
                wv1::SamplingParams {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
            ),
            "temperature",
        ),
        (
            generate_request(
                &[1],
                wv1::SamplingParams {
                    top_p: Some(f32::NAN),
                    ..Default::default()
                },
            ),
            "top_p",
        ),
        (generate_request(&[], greedy(1)), "no input tokens"),
        (
            wv1::GenerateRequest {
                top_logprobs: Some(65536),
                ..generate_request(&[1], greedy(1))
            },
            "top_logprobs",
        ),
        (
            generate_request(
                &[1],
                wv1::SamplingParams {
                    token_ban: vec![1; vocab as usize + 1],
                    ..greedy(1)
                },
            ),
            "token_ban",
        ),
        (
            wv1::GenerateRequest {
                tenant: String::new(),
                ..generate_request(&[1], greedy(1))
            },
            "tenant",
        ),
    ];
    for (req, needle) in cases {
        let status = collect(&mut fx.client, req).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{needle}: {status:?}");
    }
    // The worker still serves.
    assert!(
        collect(&mut fx.client, generate_request(&[1, 2], greedy(2)))
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_round_trip_and_stay_within_their_tenant() {
    let mut fx = start().await;
    let c = &mut fx.client;
    let session = c
        .create_session(wv1::CreateSessionRequest {
            tenant: "acme".into(),
            tokens: vec![3, 4],
        })
        .await
        .unwrap()
        .into_inner();
    let turn = |tokens: &[u32]| wv1::GenerateRequest {
        session: Some(session.session),
        ..generate_request(tokens, greedy(5))
    };
    collect(c, turn(&[5, 6, 7])).await.unwrap();
    let export = c
        .export_session(session.clone())
        .await
        .unwrap()
        .into_inner();
    let (expected, _) = collect(c, turn(&[8])).await.unwrap();

    let imported = c
        .import_session(wv1::ImportSessionRequest {
            tenant: "acme".into(),
            data: export.data.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (again, _) = collect(
        c,
        wv1::GenerateRequest {
            session: Some(imported.session),
            ..generate_request(&[8], greedy(5))
        },
    )
    .await
    .unwrap();
    assert_eq!(again, expected, "an imported session continues exactly");

    let foreign = wv1::SessionRef {
        tenant: "intruder".into(),
        session: session.session,
    };
    let status = c.export_session(foreign.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = c.get_session(foreign.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let listed = c
        .list_sessions(wv1::ListSessionsRequest {
            tenant: "intruder".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty());

    // Turn boundaries: created with 2 tokens, then two turns of 3 + 5 and 1 + 5 tokens.
    let info = c.get_session(session.clone()).await.unwrap().into_inner();
    assert_eq!(info.turns, vec![2, 10, 16]);
    let rewound = c
        .rewind_session(wv1::RewindSessionRequest {
            tenant: "acme".into(),
            session: session.session,
            turn: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((rewound.tokens, rewound.turns), (10, vec![2, 10]));
    let (replayed, _) = collect(c, turn(&[8])).await.unwrap();
    assert_eq!(
        replayed, expected,
        "a rewound session replays its turn exactly"
    );
    let status = c
        .rewind_session(wv1::RewindSessionRequest {
            tenant: "acme".into(),
            session: session.session,
            turn: 5,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = c.delete_session(foreign).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);

    let mut corrupt = export.data;
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    let status = c
        .import_session(wv1::ImportSessionRequest {
            tenant: "acme".into(),
            data: corrupt,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    c.delete_session(session).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_slot() {
    let mut fx = start().await;
    let mut streams = Vec::new();
    for i in 0..SLOTS as u32 {
        let mut s = fx
            .client
            .generate(generate_request(&[1 + i], greedy(1_000_000)))
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().unwrap();
        streams.push(s);
    }
    let load = fx
        .client
        .load(wv1::LoadRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((load.running, load.slots_free), (SLOTS as u32, 0));
    drop(streams);
    let mut load = load;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        load = fx
            .client
            .load(wv1::LoadRequest {})
            .await
            .unwrap()
            .into_inner();
        if load.running == 0 {
            break;
        }
    }
    assert_eq!((load.running, load.slots_free), (0, SLOTS as u32));
}

/// A drain whose time runs out reports what is still running (it is not an error), and so
/// does one with no time at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_times_out_reports_the_work_still_running() {
    let mut fx = start().await;
    let mut running = fx.client.clone();
    let in_flight = tokio::spawn(async move {
        collect(&mut running, generate_request(&[3, 4], greedy(100_000))).await
    });
    for _ in 0..400 {
        let load = fx.client.load(wv1::LoadRequest {}).await.unwrap();
        if load.into_inner().running == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for timeout_ms in [0, 200] {
        let load = fx
            .client
            .drain(wv1::DrainRequest { timeout_ms })
            .await
            .unwrap()
            .into_inner();
        assert!(load.draining);
        assert_eq!(load.running, 1, "timeout {timeout_ms} ms");
    }
    in_flight.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_work_in_flight_and_refuses_new_work() {
    let mut fx = start().await;
    let mut running = fx.client.clone();
    let in_flight =
        tokio::spawn(
            async move { collect(&mut running, generate_request(&[3, 4], greedy(30))).await },
        );
    // Drain only once the generation runs (a fixed sleep loses that race on a loaded machine).
    for _ in 0..400 {
        let load = fx.client.load(wv1::LoadRequest {}).await.unwrap();
        if load.into_inner().running == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let load = fx
        .client
        .drain(wv1::DrainRequest { timeout_ms: 30_000 })
        .await
        .unwrap()
        .into_inner();
    assert!(load.draining);
    assert_eq!((load.running, load.waiting), (0, 0));
    let (tokens, _) = in_flight.await.unwrap().unwrap();
    assert_eq!(tokens.len(), 30, "work in flight finishes during a drain");
    let status = collect(&mut fx.client, generate_request(&[1], greedy(1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scores_over_grpc_equal_the_engine() {
    let mut fx = start().await;
    let context = vec![3u32, 14, 15, 92, 65];
    let continuations = vec![vec![35u32], vec![89, 79, 32], vec![38]];
    let response = fx
        .client
        .score(wv1::ScoreRequest {
            tenant: "acme".into(),
            context: context.clone(),
            continuations: continuations
                .iter()
                .map(|c| wv1::TokenIds { tokens: c.clone() })
                .collect(),
            top_logprobs: Some(2),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let direct = fx
        .engine
        .score(rwkv_engine::ScoreRequest {
            tenant: "other".into(),
            context,
            continuations,
            top_logprobs: Some(2),
        })
        .unwrap();
    assert_eq!(response.scores.len(), 3);
    for (got, want) in response.scores.iter().zip(&direct.scores) {
        assert_eq!(got.logprobs, want.logprobs);
        assert_eq!(got.greedy, want.greedy);
        assert_eq!(got.top.len(), want.logprobs.len());
        assert!(got.top.iter().all(|t| t.top.len() == 2));
    }
    let status = fx
        .client
        .score(wv1::ScoreRequest {
            tenant: "acme".into(),
            context: vec![1],
            continuations: vec![],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// `sample_below` bans every id from it to the end of the model's vocabulary: with 3, a
/// sampled generation at a high temperature only ever picks 0, 1 or 2; at or above the
/// vocabulary it limits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_at_or_above_sample_below_are_never_sampled() {
    let mut fx = start().await;
    let vocab = fx.engine.model().vocab_size as u32;
    let hot = |below: Option<u32>| wv1::SamplingParams {
        temperature: Some(2.0),
        top_p: Some(1.0),
        seed: Some(5),
        max_tokens: Some(40),
        sample_below: below,
        ..Default::default()
    };
    let (tokens, _) = collect(&mut fx.client, generate_request(&[1, 2], hot(Some(3))))
        .await
        .unwrap();
    assert_eq!(tokens.len(), 40);
    assert!(tokens.iter().all(|&t| t < 3), "{tokens:?}");
    let (free, _) = collect(&mut fx.client, generate_request(&[1, 2], hot(None)))
        .await
        .unwrap();
    assert!(free.iter().any(|&t| t >= 3), "{free:?}");
    let (unlimited, _) = collect(
        &mut fx.client,
        generate_request(&[1, 2], hot(Some(vocab + 5))),
    )
    .await
    .unwrap();
    assert_eq!(
        unlimited, free,
        "a limit above the vocabulary limits nothing"
    );
}

/// A worker started with a token answers only calls that carry it: without it, or with another
/// token, every method (generation, session export, drain) is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_token_refuses_calls_without_it() {
    let token = WorkerToken::new("the-cluster-token-0123").unwrap();
    let mut fx = start_with(Some(token.clone())).await;
    let channel = fx.channel.clone();
    let with = |t: Option<WorkerToken>| {
        WorkerClient::with_interceptor(channel.clone(), ClientAuth::new(t))
    };
    let other = WorkerToken::new("another-token-0123456").unwrap();
    for mut client in [with(None), with(Some(other))] {
        let info = client.info(wv1::InfoRequest {}).await.unwrap_err();
        assert_eq!(info.code(), Code::Unauthenticated, "{info}");
        let generate = client
            .generate(generate_request(&[1, 2], greedy(2)))
            .await
            .unwrap_err();
        assert_eq!(generate.code(), Code::Unauthenticated);
        let drain = client
            .drain(wv1::DrainRequest { timeout_ms: 0 })
            .await
            .unwrap_err();
        assert_eq!(drain.code(), Code::Unauthenticated);
    }
    let mut client = with(Some(token));
    let load = client.load(wv1::LoadRequest {}).await.unwrap().into_inner();
    assert!(!load.draining, "a refused Drain drained the worker");
    let mut stream = client
        .generate(generate_request(&[1, 2], greedy(3)))
        .await
        .unwrap()
        .into_inner();
    let mut events = 0;
    while stream.message().await.unwrap().is_some() {
        events += 1;
    }
    assert_eq!(events, 4, "three tokens and the end");
    // The fixture's own client sends no token.
    let refused = fx.client.load(wv1::LoadRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
}
