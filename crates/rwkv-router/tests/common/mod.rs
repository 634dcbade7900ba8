//! The router's test harness: a CPU worker behind its gRPC service on 127.0.0.1, the router in
//! front, and a real HTTP client (reqwest) parsing JSON and SSE.
// Each test file uses a different part of the harness.
#![allow(dead_code)]

pub use std::sync::Arc;
pub use std::time::Duration;

pub use rwkv_cluster::{MemoryRegistry, Registry, WorkerRecord};
pub use rwkv_cpu::CpuBackend;
pub use rwkv_engine::{Engine, EngineConfig, GenerateRequest, SamplingParams};
pub use rwkv_model::{synthetic, Checkpoint, ModelWeights};
pub use rwkv_router::tenants::{key_digest, TenantConfig, Tenants, TenantsFile};
pub use rwkv_router::{PoolConfig, Router, RouterConfig, WorkerPool};
pub use rwkv_tokenizer::Tokenizer;
pub use rwkv_worker::{WorkerIdentity, WorkerService};
pub use serde_json::{json, Value};

pub const MODEL: &str = "tiny";

/// A random-weight model with the World vocabulary, so text prompts work.
pub fn weights() -> ModelWeights {
    let spec = synthetic::SyntheticSpec::new(64, 2, 65536);
    let ckpt = Checkpoint::from_tensors("synthetic", synthetic::random_checkpoint(&spec));
    ModelWeights::from_checkpoint(&ckpt).unwrap()
}

pub struct Cluster {
    pub base: String,
    pub http: reqwest::Client,
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    _registration: rwkv_cluster::Registration,
    _stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

pub async fn start(cfg: RouterConfig, slots: usize) -> Cluster {
    start_full(cfg, slots, 256, None).await
}

/// A cluster whose worker gets only as many requests as it has slots (no overcommit), so every
/// other request waits in the router's queue of `max_queue`.
pub async fn start_with_queue(cfg: RouterConfig, slots: usize, max_queue: usize) -> Cluster {
    start_pool(
        cfg,
        slots,
        None,
        PoolConfig {
            max_queue,
            overcommit: 1.0,
            ..PoolConfig::default()
        },
    )
    .await
}

pub async fn start_full(
    cfg: RouterConfig,
    slots: usize,
    max_queue: usize,
    tenants: Option<TenantsFile>,
) -> Cluster {
    let pool = PoolConfig {
        max_queue,
        ..PoolConfig::default()
    };
    start_pool(cfg, slots, tenants, pool).await
}

pub async fn start_pool(
    cfg: RouterConfig,
    slots: usize,
    tenants: Option<TenantsFile>,
    pool_cfg: PoolConfig,
) -> Cluster {
    start_engine(cfg, slots, tenants, pool_cfg, EngineConfig::default()).await
}

/// [`start_pool`] with these worker engine settings.
pub async fn start_engine(
    cfg: RouterConfig,
    slots: usize,
    tenants: Option<TenantsFile>,
    pool_cfg: PoolConfig,
    engine_cfg: EngineConfig,
) -> Cluster {
    let engine = Engine::start(
        CpuBackend::new(&weights(), slots),
        EngineConfig {
            model_id: MODEL.into(),
            ..engine_cfg
        },
    )
    .unwrap();
    let service = WorkerService::new(
        engine.handle(),
        WorkerIdentity {
            worker_id: "w0".into(),
            model_id: MODEL.into(),
            model_hash: [0; 32],
            backend: "cpu".into(),
            slots,
            max_batch_size: 64,
            max_waiting: 256,
        },
    );
    let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let worker_addr = worker_listener.local_addr().unwrap();
    let (stop_worker, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(rwkv_worker::serve(service, worker_listener, async {
        let _ = rx.await;
    }));

    let registry = MemoryRegistry::new();
    let registration = registry
        .register(WorkerRecord {
            id: "w0".into(),
            address: format!("http://{worker_addr}"),
            model: MODEL.into(),
            slots: slots as u32,
        })
        .await
        .unwrap();
    let pool = WorkerPool::new(PoolConfig {
        poll_interval: Duration::from_millis(50),
        ..pool_cfg
    });
    pool.follow(&registry).await.unwrap();
    let tokenizer = Arc::new(Tokenizer::world());
    let router = Router::new(
        RouterConfig {
            default_model: Some(MODEL.into()),
            ..cfg
        },
        pool.clone(),
        tokenizer.clone(),
        None,
    );
    let router = match tenants {
        Some(file) => router.with_tenants(Arc::new(Tenants::from_config(file))),
        None => router,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_router, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(rwkv_router::serve_http(router, listener, async {
        let _ = rx.await;
    }));
    for _ in 0..200 {
        if pool.is_ready() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pool.is_ready(), "the worker never became ready");
    Cluster {
        base,
        http: reqwest::Client::new(),
        engine,
        tokenizer,
        _registration: registration,
        _stop: vec![stop_worker, stop_router],
    }
}

impl Cluster {
    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// Greedy continuation computed by the engine directly.
    pub fn direct(&self, prompt: &str, max_tokens: usize) -> String {
        let tokens = self.tokenizer.encode(prompt).unwrap();
        greedy_text(&self.engine, &self.tokenizer, tokens, max_tokens)
    }
}

/// The greedy continuation of `tokens` on `engine` with the API's settings (end-of-text stops
/// it, unusable tokens banned, no penalties), as text.
pub fn greedy_text(
    engine: &Engine,
    tokenizer: &Tokenizer,
    tokens: Vec<u32>,
    max_tokens: usize,
) -> String {
    let (out, _) = engine
        .generate(GenerateRequest {
            tenant: "direct".into(),
            tokens,
            params: SamplingParams {
                temperature: 0.0,
                stop_tokens: vec![0],
                token_ban: (65530..65536).collect(),
                presence_penalty: 0.0,
                frequency_penalty: 0.0,
                max_tokens,
                ..SamplingParams::default()
            },
            ..GenerateRequest::default()
        })
        .unwrap()
        .collect();
    String::from_utf8_lossy(&tokenizer.decode_bytes_lossy(&out)).into_owned()
}

/// Reads an SSE body into its `data:` payloads.
pub async fn sse_events(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("data:"))
                .map(|d| d.trim().to_owned())
        })
        .collect()
}

pub fn tenant(name: &str, key: &str, admin: bool) -> TenantConfig {
    TenantConfig {
        name: name.into(),
        api_key_sha256: vec![key_digest(key)],
        admin,
        requests_per_second: None,
        burst: None,
        max_concurrent: Some(1),
        tokens_per_minute: None,
        weight: None,
        max_sessions: None,
        max_state_bytes: None,
    }
}

/// Asserts that an OpenAI-style error body's message mentions `what`.
pub fn assert_error_mentions(body: &Value, what: &str) {
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(what), "no {what:?} in {body}");
}
