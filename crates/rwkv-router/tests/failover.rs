//! Failover inside the router, with two in-process workers: worker `a` holds the request's
//! prefix (so the router prefers it) and its backend breaks after a few steps; worker `b` is
//! healthy. A multi-choice request that `a` was streaming continues on `b`, each choice from
//! the tokens it already had, and ends exactly as an undisturbed greedy run. And a worker full
//! of sessions passes new sessions on to one with room.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use rwkv_model::{Backend, BackendError, Logits, ModelConfig, SeqStep, State};

/// The CPU backend, failing every forward step once `steps_left` reaches zero (a GPU that
/// fell off the bus, say), each step taking at least `delay`.
struct FailAfter {
    inner: CpuBackend,
    steps_left: Arc<AtomicUsize>,
    delay: Duration,
}

impl Backend for FailAfter {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn num_slots(&self) -> usize {
        self.inner.num_slots()
    }
    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        let left = self.steps_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(BackendError::Device("injected failure".into()));
        }
        self.steps_left.store(left - 1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        self.inner.forward(steps)
    }
    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        self.inner.load_state(slot, state)
    }
    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        self.inner.save_state(slot)
    }
    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        self.inner.reset_state(slot)
    }
    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        self.inner.copy_state(src, dst)
    }
}

const SLOTS: usize = 8;

/// A router over these workers, serving HTTP, once all of them are available.
struct Front {
    pool: WorkerPool,
    tokenizer: Arc<Tokenizer>,
    base: String,
    _registry: MemoryRegistry,
    _registrations: Vec<rwkv_cluster::Registration>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn router_over(records: Vec<WorkerRecord>) -> Front {
    router_over_with(records, PoolConfig::default()).await
}

/// [`router_over`] with these pool settings (its health polls every 50 ms whatever they say).
async fn router_over_with(records: Vec<WorkerRecord>, pool: PoolConfig) -> Front {
    let registry = MemoryRegistry::new();
    let n = records.len();
    let mut registrations = Vec::new();
    for record in records {
        registrations.push(registry.register(record).await.unwrap());
    }
    let pool = WorkerPool::new(PoolConfig {
        poll_interval: Duration::from_millis(50),
        ..pool
    });
    pool.follow(&registry).await.unwrap();
    let tokenizer = Arc::new(Tokenizer::world());
    let router = Router::new(
        RouterConfig {
            default_model: Some(MODEL.into()),
            ..RouterConfig::default()
        },
        pool.clone(),
        tokenizer.clone(),
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(rwkv_router::serve_http(router, listener, async {
        let _ = rx.await;
    }));
    for _ in 0..200 {
        if pool.workers().iter().filter(|w| w.is_available()).count() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Front {
        pool,
        tokenizer,
        base,
        _registry: registry,
        _registrations: registrations,
        _stop: stop,
    }
}

/// Serves `backend` as worker `id`; returns its registration record, its engine and the sender
/// that stops it.
async fn worker<B: Backend + 'static>(
    id: &str,
    backend: B,
) -> (WorkerRecord, Engine, tokio::sync::oneshot::Sender<()>) {
    worker_with(id, backend, EngineConfig::default()).await
}

/// [`worker`] with these engine settings.
async fn worker_with<B: Backend + 'static>(
    id: &str,
    backend: B,
    cfg: EngineConfig,
) -> (WorkerRecord, Engine, tokio::sync::oneshot::Sender<()>) {
    let engine = Engine::start(
        backend,
        EngineConfig {
            model_id: MODEL.into(),
            ..cfg
        },
    )
    .unwrap();
    let service = WorkerService::new(
        engine.handle(),
        WorkerIdentity {
            worker_id: id.into(),
            model_id: MODEL.into(),
            model_hash: [0; 32],
            backend: "cpu".into(),
            slots: SLOTS,
            max_batch_size: 64,
            max_waiting: 256,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(rwkv_worker::serve(service, listener, async {
        let _ = rx.await;
    }));
    let record = WorkerRecord {
        id: id.into(),
        address: format!("http://{addr}"),
        model: MODEL.into(),
        slots: SLOTS as u32,
    };
    (record, engine, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn choices_streamed_by_a_failing_worker_continue_exactly_on_another() {
    let weights = weights();
    let steps_left = Arc::new(AtomicUsize::new(usize::MAX));
    let failing = FailAfter {
        inner: CpuBackend::new(&weights, SLOTS),
        steps_left: steps_left.clone(),
        delay: Duration::ZERO,
    };
    let (record_a, _engine_a, _stop_a) = worker("a", failing).await;
    let (record_b, engine_b, _stop_b) = worker("b", CpuBackend::new(&weights, SLOTS)).await;
    let front = router_over(vec![record_a, record_b]).await;
    let (pool, tokenizer, base) = (
        front.pool.clone(),
        front.tokenizer.clone(),
        front.base.clone(),
    );

    let prompt = "The failover test prompt:";
    let tokens = tokenizer.encode(prompt).unwrap();
    // The router prefers the worker holding the longest cached prefix: make that `a`, and let
    // `a` run the prefill and a few decode steps before it breaks.
    pool.remember_prefix(&tokens, "a");
    steps_left.store(4, Ordering::SeqCst);
    let max_tokens = 12;
    let body = json!({"prompt": prompt, "n": 3, "max_tokens": max_tokens, "temperature": 0,
                      "stream": true});
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut texts = vec![String::new(); 3];
    let mut finished = vec![false; 3];
    for data in sse_events(response).await {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        for choice in v["choices"].as_array().unwrap() {
            let i = choice["index"].as_u64().unwrap() as usize;
            texts[i].push_str(choice["text"].as_str().unwrap_or_default());
            finished[i] |= choice["finish_reason"].is_string();
        }
    }
    assert_eq!(steps_left.load(Ordering::SeqCst), 0, "worker a never broke");
    assert_eq!(finished, vec![true; 3]);
    // What `b` gives without interruption (the API's greedy settings).
    let direct = greedy_text(&engine_b, &tokenizer, tokens, max_tokens);
    assert_eq!(texts, vec![direct; 3]);
}

/// Worker `a` holds one session at most: new sessions and imports beyond it go to `b`, and
/// once both are full the client gets a 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_full_of_sessions_passes_new_ones_to_another() {
    let weights = weights();
    let one = |max_sessions| EngineConfig {
        max_sessions,
        ..EngineConfig::default()
    };
    let (record_a, engine_a, _stop_a) =
        worker_with("a", CpuBackend::new(&weights, SLOTS), one(1)).await;
    let (record_b, engine_b, _stop_b) =
        worker_with("b", CpuBackend::new(&weights, SLOTS), one(2)).await;
    let front = router_over(vec![record_a, record_b]).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{}{path}", front.base))
            .json(&body)
            .send()
    };
    let first = post("/v1/sessions", json!({})).await.unwrap();
    assert_eq!(first.status(), 201);
    let id = first.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let second = post("/v1/sessions", json!({})).await.unwrap();
    assert_eq!(second.status(), 201);
    let export = http
        .get(format!("{}/v1/sessions/{id}/export", front.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let imported = http
        .post(format!("{}/v1/sessions/import", front.base))
        .body(export.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(imported.status(), 201, "{}", imported.text().await.unwrap());
    let sessions = |e: &Engine| e.stats().unwrap().sessions;
    assert_eq!((sessions(&engine_a), sessions(&engine_b)), (1, 2));
    // Both full: the client hears so, retryably.
    let full = post("/v1/sessions", json!({})).await.unwrap();
    assert_eq!(full.status(), 429);
    let body: Value = full.json().await.unwrap();
    assert_error_mentions(&body, "full of sessions");
}

/// New sessions go to the worker holding the fewest: a burst of creations with no traffic
/// alternates between two idle workers (the router counts its own placements until the next
/// load report), and sessions made behind the router's back, which it learns of from the
/// workers' load reports, are evened out before the other worker gets more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_go_to_the_worker_holding_the_fewest() {
    let weights = weights();
    let (record_a, engine_a, _stop_a) = worker_with(
        "a",
        CpuBackend::new(&weights, SLOTS),
        EngineConfig::default(),
    )
    .await;
    let (record_b, engine_b, _stop_b) = worker_with(
        "b",
        CpuBackend::new(&weights, SLOTS),
        EngineConfig::default(),
    )
    .await;
    let front = router_over(vec![record_a, record_b]).await;
    let http = reqwest::Client::new();
    let create = || async {
        let r = http
            .post(format!("{}/v1/sessions", front.base))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    };
    let sessions = |e: &Engine| e.stats().unwrap().sessions;
    for _ in 0..6 {
        create().await;
    }
    // 3 and 3; one off when a load report that already counts a new session lands just
    // before the router counts its own placement.
    let (a, b) = (sessions(&engine_a), sessions(&engine_b));
    assert_eq!(a + b, 6);
    assert!((2..=4).contains(&a), "({a}, {b})");
    // Four more on `b`, not through this router: once a load report says so, the next new
    // sessions go to `a` (all four, or three of them when a report races a placement).
    for _ in 0..4 {
        engine_b.handle().create_session("elsewhere").unwrap();
    }
    let reported = |w: &str| front.pool.worker(w).map_or(0, |w| w.sessions());
    for _ in 0..200 {
        if reported("b") >= b + 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(reported("b") >= b + 4, "b's load report never arrived");
    for _ in 0..4 {
        create().await;
    }
    let more_on_a = sessions(&engine_a) - a;
    assert!(
        more_on_a >= 3,
        "{more_on_a} of 4 went to the worker holding fewer"
    );
}

/// A TCP relay in front of a worker that can freeze: it then stops passing bytes either way
/// but keeps every connection open, like a host that lost power or a dropped NAT entry.
struct FreezingRelay {
    address: String,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl FreezingRelay {
    async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let target = target.trim_start_matches("http://").to_owned();
        let flag = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(&target).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(Self::pass(cr, sw, flag.clone()));
                tokio::spawn(Self::pass(sr, cw, flag.clone()));
            }
        });
        Self { address, frozen }
    }

    async fn pass(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<std::sync::atomic::AtomicBool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 << 10];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.load(Ordering::SeqCst) {
                // Silent for ever, the sockets still open.
                let _keep = (from, to);
                std::future::pending::<()>().await;
                return;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// A worker that goes silent mid-stream without closing its connection: the router's pings
/// go unanswered, the connection fails within seconds, and the stream continues exactly on
/// another worker, long before the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_from_a_worker_gone_silent_fails_over_within_the_keepalive() {
    let weights = weights();
    // Each step takes a few milliseconds, so the stream is still running when `a` freezes.
    let slow = FailAfter {
        inner: CpuBackend::new(&weights, SLOTS),
        steps_left: Arc::new(AtomicUsize::new(usize::MAX)),
        delay: Duration::from_millis(5),
    };
    let (record_a, _engine_a, _stop_a) = worker("a", slow).await;
    let (record_b, engine_b, _stop_b) = worker("b", CpuBackend::new(&weights, SLOTS)).await;
    let relay = FreezingRelay::start(record_a.address.clone()).await;
    let record_a = WorkerRecord {
        address: relay.address.clone(),
        ..record_a
    };
    let front = router_over_with(
        vec![record_a, record_b],
        PoolConfig {
            worker_keepalive: Duration::from_secs(2),
            ..PoolConfig::default()
        },
    )
    .await;
    let prompt = "The keepalive test prompt:";
    let tokens = front.tokenizer.encode(prompt).unwrap();
    front.pool.remember_prefix(&tokens, "a");
    let max_tokens = 120;
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                      "stream": true});
    let started = std::time::Instant::now();
    let mut response = reqwest::Client::new()
        .post(format!("{}/v1/completions", front.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The first tokens come from `a`; then it goes silent.
    let mut raw = Vec::new();
    while raw.len() < 200 {
        raw.extend_from_slice(&response.chunk().await.unwrap().expect("stream ended early"));
    }
    relay.freeze();
    while let Some(chunk) = response.chunk().await.unwrap() {
        raw.extend_from_slice(&chunk);
    }
    let elapsed = started.elapsed();
    let mut text = String::new();
    for block in String::from_utf8(raw).unwrap().split("\n\n") {
        let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
            continue;
        };
        let data = data.trim();
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        text.push_str(v["choices"][0]["text"].as_str().unwrap_or_default());
    }
    assert_eq!(
        text,
        greedy_text(&engine_b, &front.tokenizer, tokens, max_tokens)
    );
    // Well under the 600 s request timeout: the keepalive found the silent worker.
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
}
