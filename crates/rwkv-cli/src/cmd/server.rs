//! What `rwkv serve` and `rwkv worker` share: loading the model (or the demo model), starting the
//! engine on the best backend, metrics, logging, and waiting for a shutdown signal.

use std::path::{Path, PathBuf};

use anyhow::Context;
use rwkv_engine::{is_frequency_exempt, Engine, EngineConfig, SchedulerConfig};
use rwkv_model::{synthetic, Checkpoint, ModelWeights};
use rwkv_tokenizer::Tokenizer;
use rwkv_worker::WorkerIdentity;
use serde::Deserialize;

use super::backend::{BackendKind, CpuPrecision, GpuPrecision, Precisions};

/// Model, backend and engine settings: flags, `RWKV_*` environment variables, or keys of the
/// TOML file given with `--config` (flags win over the environment, which wins over the file).
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineArgs {
    /// Checkpoint (.pth or .safetensors). Without it, a small random-weight demo model is served.
    #[arg(long, env = "RWKV_MODEL")]
    pub model: Option<PathBuf>,
    /// Model name in the API (`model` field, `/v1/models`); default: the file name without its
    /// extension, or `rwkv6-demo`.
    #[arg(long, env = "RWKV_MODEL_ID")]
    pub model_id: Option<String>,
    /// `world`, a Hugging Face tokenizer.json, or a World vocabulary .txt.
    #[arg(long, env = "RWKV_TOKENIZER")]
    pub tokenizer: Option<String>,
    /// Compute backend [default: auto = CUDA when the machine has a GPU (an error if it cannot
    /// be used), else the CPU].
    #[arg(long, value_enum, env = "RWKV_BACKEND")]
    pub backend: Option<BackendKind>,
    /// Weight precision on the CPU [default: bf16].
    #[arg(long, value_enum, env = "RWKV_CPU_PRECISION")]
    pub cpu_precision: Option<CpuPrecision>,
    /// How the CUDA backend feeds its bf16 GEMMs: `split` (f32-class accuracy) or `bf16`
    /// (~1.5x faster prefill, ~1e-3 relative logit error) [default: split].
    #[arg(long, value_enum, env = "RWKV_GPU_PRECISION")]
    pub gpu_precision: Option<GpuPrecision>,
    /// Sequences that run at once (device state slots) [default: 64 on a GPU, 16 on the CPU].
    #[arg(long, env = "RWKV_SLOTS")]
    pub slots: Option<usize>,
    /// Tokens fed per step, all sequences together [default: 2048].
    #[arg(long, env = "RWKV_MAX_BATCH_TOKENS")]
    pub max_batch_tokens: Option<usize>,
    /// Prompt tokens of one sequence per step [default: 512].
    #[arg(long, env = "RWKV_PREFILL_CHUNK")]
    pub prefill_chunk: Option<usize>,
    /// Host memory for swapped-out session states, MiB [default: 4096].
    #[arg(long, env = "RWKV_HOST_TIER_MB")]
    pub host_tier_mb: Option<usize>,
    /// Host memory for cached prefix states, MiB; 0 disables the cache [default: 1024].
    #[arg(long, env = "RWKV_PREFIX_CACHE_MB")]
    pub prefix_cache_mb: Option<usize>,
    /// Directory for the disk tier: session states the host tier evicts are written there and
    /// read back on the session's next turn [default: none, such sessions replay their history].
    #[arg(long, env = "RWKV_DISK_TIER_DIR")]
    pub disk_tier_dir: Option<PathBuf>,
    /// Disk the disk tier may use, MiB [default: 16384].
    #[arg(long, env = "RWKV_DISK_TIER_MB")]
    pub disk_tier_mb: Option<usize>,
    /// Forward steps a generation may hold its slot while new requests wait for one; then it is
    /// swapped out to host memory and resumes later, exactly. 0 never preempts [default: 256].
    #[arg(long, env = "RWKV_PREEMPT_AFTER_STEPS")]
    pub preempt_after_steps: Option<u64>,
    /// Most tokens a session's conversation may hold when a turn starts; a longer one must be
    /// rewound or replaced [default: 1048576].
    #[arg(long, env = "RWKV_MAX_SESSION_TOKENS")]
    pub max_session_tokens: Option<usize>,
    /// Most sessions this process holds, all tenants together; more are refused (429) until
    /// some are deleted [default: 65536].
    #[arg(long, env = "RWKV_MAX_SESSIONS")]
    pub max_sessions: Option<usize>,
    /// Most tokens all sessions' conversations hold together (4 bytes each in host memory);
    /// a session or turn that would go past it is refused (429) [default: 1073741824].
    #[arg(long, env = "RWKV_MAX_SESSIONS_TOKENS")]
    pub max_sessions_tokens: Option<usize>,
    /// Seconds a session may sit unused (no turn, fork, rewind or export) before it is
    /// deleted with its state; 0 keeps sessions until they are deleted [default: 86400].
    #[arg(long, env = "RWKV_SESSION_IDLE_TIMEOUT")]
    pub session_idle_timeout: Option<u64>,
    /// GPUs to run on [default: 0]. One GPU (`0`) runs the whole model; several (`0,1`) shard it
    /// over them, tensor parallel over NCCL (their number must divide the model's heads).
    #[arg(long, env = "RWKV_GPUS")]
    pub gpus: Option<String>,
}

impl EngineArgs {
    /// `self` where set, else `file`.
    pub fn or(self, file: EngineArgs) -> Self {
        Self {
            model: self.model.or(file.model),
            model_id: self.model_id.or(file.model_id),
            tokenizer: self.tokenizer.or(file.tokenizer),
            backend: self.backend.or(file.backend),
            cpu_precision: self.cpu_precision.or(file.cpu_precision),
            gpu_precision: self.gpu_precision.or(file.gpu_precision),
            slots: self.slots.or(file.slots),
            max_batch_tokens: self.max_batch_tokens.or(file.max_batch_tokens),
            prefill_chunk: self.prefill_chunk.or(file.prefill_chunk),
            host_tier_mb: self.host_tier_mb.or(file.host_tier_mb),
            prefix_cache_mb: self.prefix_cache_mb.or(file.prefix_cache_mb),
            preempt_after_steps: self.preempt_after_steps.or(file.preempt_after_steps),
            max_session_tokens: self.max_session_tokens.or(file.max_session_tokens),
            max_sessions: self.max_sessions.or(file.max_sessions),
            max_sessions_tokens: self.max_sessions_tokens.or(file.max_sessions_tokens),
            session_idle_timeout: self.session_idle_timeout.or(file.session_idle_timeout),
            disk_tier_dir: self.disk_tier_dir.or(file.disk_tier_dir),
            disk_tier_mb: self.disk_tier_mb.or(file.disk_tier_mb),
            gpus: self.gpus.or(file.gpus),
        }
    }
}

/// Reads a TOML config file into `T` (unknown keys are errors that name the key).
pub fn read_config<T: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
) -> anyhow::Result<T> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    parse_config(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// A config file's settings. The files are built from flattened groups of settings, and serde
/// loses the key of a flattened value that has the wrong type ("invalid type: string \"64\",
/// expected usize"): the key at fault is then found by reading each setting alone.
fn parse_config<T: serde::de::DeserializeOwned + Default>(text: &str) -> anyhow::Result<T> {
    let whole = match toml::from_str::<T>(text) {
        Ok(config) => return Ok(config),
        Err(e) => e,
    };
    if let Ok(table) = text.parse::<toml::Table>() {
        for (key, value) in table {
            let one = toml::Table::from_iter([(key.clone(), value)]);
            if let Err(e) = T::deserialize(one) {
                anyhow::bail!("`{key}`: {}", e.message());
            }
        }
    }
    Err(whole.into())
}

/// Shape of the built-in demo model: small enough to start in a second on any CPU, with the
/// World vocabulary so text prompts work.
const DEMO_SHAPE: (usize, usize, usize) = (256, 4, 65536);

/// A loaded (or generated) model with its identity.
pub struct LoadedModel {
    pub weights: ModelWeights,
    pub model_id: String,
    pub hash: [u8; 32],
}

pub fn load_model(args: &EngineArgs) -> anyhow::Result<LoadedModel> {
    let (ckpt, default_id) = match &args.model {
        Some(path) => {
            let ckpt = Checkpoint::open(path)?;
            let id = path
                .file_stem()
                .map_or_else(|| "rwkv".into(), |s| s.to_string_lossy().into_owned());
            (ckpt, id)
        }
        None => {
            let (c, l, v) = DEMO_SHAPE;
            tracing::warn!(
                "no --model given: serving a built-in RANDOM-WEIGHT demo model (rwkv6-demo, \
                 C={c} L={l} V={v}); its output is gibberish. Pass --model PATH for a real model."
            );
            let spec = synthetic::SyntheticSpec::new(c, l, v);
            let ckpt = Checkpoint::from_tensors("rwkv6-demo", synthetic::random_checkpoint(&spec));
            (ckpt, "rwkv6-demo".to_owned())
        }
    };
    let weights = ModelWeights::from_checkpoint(&ckpt)?;
    let hash = ckpt.fingerprint();
    Ok(LoadedModel {
        weights,
        model_id: args.model_id.clone().unwrap_or(default_id),
        hash,
    })
}

pub fn load_tokenizer(args: &EngineArgs, vocab: usize) -> anyhow::Result<Tokenizer> {
    let tokenizer = Tokenizer::load(args.tokenizer.as_deref().unwrap_or("world"))?;
    anyhow::ensure!(
        tokenizer.vocab_size() <= vocab,
        "the tokenizer has {} tokens but the model only {vocab}: wrong --tokenizer for this model?",
        tokenizer.vocab_size()
    );
    Ok(tokenizer)
}

/// A setting in MiB as bytes; one too large for this machine's addresses is an error (a shift
/// would silently wrap it, to 0 for 2^44).
fn mib(name: &str, value: usize) -> anyhow::Result<usize> {
    value.checked_mul(1 << 20).ok_or_else(|| {
        anyhow::anyhow!("{name} = {value} MiB is more bytes than this machine can address")
    })
}

/// Starts the engine on the chosen backend; returns it with what the worker tells about itself.
pub fn start_engine(
    args: &EngineArgs,
    model: &LoadedModel,
    tokenizer: &Tokenizer,
    worker_id: &str,
) -> anyhow::Result<(Engine, WorkerIdentity)> {
    let kind = args.backend.unwrap_or(BackendKind::Auto);
    let precisions = Precisions {
        cpu: args.cpu_precision.unwrap_or_default(),
        gpu: args.gpu_precision.unwrap_or_default(),
    };
    let default_slots = if super::backend::gpu_likely(kind) {
        64
    } else {
        16
    };
    let slots = args.slots.unwrap_or(default_slots);
    anyhow::ensure!(slots > 0, "--slots must be at least 1");
    let devices = gpu_devices(args.gpus.as_deref())?;
    let backend = super::backend::open_on(&model.weights, slots, kind, precisions, &devices)?;
    let backend_name = backend.name();
    let vocab = model.weights.config.vocab_size;
    let frequency_exempt = (0..vocab as u32)
        .filter(|&id| tokenizer.token_bytes(id).is_some_and(is_frequency_exempt))
        .collect();
    let scheduler = SchedulerConfig {
        max_batch_tokens: args.max_batch_tokens.unwrap_or(2048),
        max_batch_size: slots,
        prefill_chunk: args.prefill_chunk.unwrap_or(512),
        ..SchedulerConfig::default()
    };
    let cfg = EngineConfig {
        scheduler: scheduler.clone(),
        model_id: model.model_id.clone(),
        model_hash: model.hash,
        host_tier_bytes: mib("host_tier_mb", args.host_tier_mb.unwrap_or(4096))?,
        prefix_cache_bytes: mib("prefix_cache_mb", args.prefix_cache_mb.unwrap_or(1024))?,
        disk_tier_dir: args.disk_tier_dir.clone(),
        disk_tier_bytes: mib("disk_tier_mb", args.disk_tier_mb.unwrap_or(16384))?,
        preempt_after_steps: args
            .preempt_after_steps
            .unwrap_or(rwkv_engine::DEFAULT_PREEMPT_AFTER_STEPS),
        frequency_exempt,
        max_session_tokens: args
            .max_session_tokens
            .unwrap_or(rwkv_engine::DEFAULT_MAX_SESSION_TOKENS),
        max_sessions: args
            .max_sessions
            .unwrap_or(rwkv_engine::DEFAULT_MAX_SESSIONS),
        session_idle_timeout: match args.session_idle_timeout {
            None => Some(rwkv_engine::DEFAULT_SESSION_IDLE_TIMEOUT),
            Some(0) => None,
            Some(secs) => Some(std::time::Duration::from_secs(secs)),
        },
        max_sessions_tokens: args
            .max_sessions_tokens
            .unwrap_or(rwkv_engine::DEFAULT_MAX_SESSIONS_TOKENS),
        ..EngineConfig::default()
    };
    for (flag, value) in [
        ("--max-session-tokens", cfg.max_session_tokens),
        ("--max-sessions", cfg.max_sessions),
        ("--max-sessions-tokens", cfg.max_sessions_tokens),
    ] {
        anyhow::ensure!(value > 0, "{flag} must be at least 1");
    }
    let engine = Engine::start(backend, cfg)?;
    tracing::info!(
        model = model.model_id,
        backend = backend_name,
        slots,
        "engine started"
    );
    let identity = WorkerIdentity {
        worker_id: worker_id.to_owned(),
        model_id: model.model_id.clone(),
        model_hash: model.hash,
        backend: backend_name,
        slots,
        max_batch_size: scheduler.max_batch_size,
        max_waiting: scheduler.max_waiting,
    };
    Ok((engine, identity))
}

/// The GPUs of `--gpus` (default GPU 0): one runs the whole model, several shard it.
fn gpu_devices(gpus: Option<&str>) -> anyhow::Result<Vec<usize>> {
    let Some(list) = gpus else { return Ok(vec![0]) };
    let ids = super::parse_ids(list).context("--gpus takes comma-separated GPU indices")?;
    anyhow::ensure!(!ids.is_empty(), "--gpus is empty");
    let devices: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    if let Some(twice) = devices
        .iter()
        .enumerate()
        .find_map(|(i, d)| devices[..i].contains(d).then_some(d))
    {
        anyhow::bail!("--gpus {list}: GPU {twice} is listed twice");
    }
    Ok(devices)
}

/// The async runtime of the server commands (the engine has its own thread).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Installs the Prometheus recorder (before the engine starts: it resolves its handles once)
/// and registers every metric's description.
pub fn install_metrics() -> anyhow::Result<metrics_exporter_prometheus::PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    rwkv_engine::telemetry::describe();
    rwkv_worker::telemetry::describe();
    rwkv_router::telemetry::describe();
    Ok(handle)
}

/// Serves `/metrics` (Prometheus text) and `/health` on `addr`, plain HTTP without keys, on a
/// task of its own for as long as the runtime runs. Fails only if `addr` cannot be bound.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    prometheus: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "ok" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let text = prometheus.render();
                async move { text }
            }),
        );
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
/// A second one exits at once (status 130), for an operator who will not wait for open streams
/// to finish.
pub async fn shutdown_signal() {
    one_signal().await;
    tracing::info!("shutdown requested (a second Ctrl-C or SIGTERM exits at once)");
    tokio::spawn(async {
        one_signal().await;
        tracing::warn!("second shutdown request: exiting now");
        std::process::exit(130);
    });
}

/// Resolves on the next Ctrl-C or SIGTERM.
async fn one_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// `--tls-cert` and `--tls-key`: both (TLS) or neither (plaintext).
pub fn tls_pair(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
) -> anyhow::Result<Option<(PathBuf, PathBuf)>> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some((cert.clone(), key.clone()))),
        (None, None) => Ok(None),
        _ => anyhow::bail!("--tls-cert and --tls-key go together"),
    }
}

/// Serves the router's HTTP and gRPC APIs until Ctrl-C or SIGTERM, over TLS when a
/// certificate and key are given; open streams finish first.
pub async fn serve_api(
    router: rwkv_router::Router,
    listener: tokio::net::TcpListener,
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    match tls {
        Some((cert, key)) => {
            let config =
                rwkv_router::tls::server_config(&cert, &key).map_err(anyhow::Error::msg)?;
            rwkv_router::serve_https(router, listener, config, shutdown_signal()).await?
        }
        None => rwkv_router::serve_http(router, listener, shutdown_signal()).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{gpu_devices, EngineArgs, GpuPrecision};

    #[test]
    fn gpu_precision_comes_from_the_file_unless_a_flag_sets_it() {
        let file: EngineArgs = toml::from_str("gpu_precision = \"bf16\"").unwrap();
        assert_eq!(file.gpu_precision, Some(GpuPrecision::Bf16));
        let flags = EngineArgs {
            gpu_precision: Some(GpuPrecision::Split),
            ..EngineArgs::default()
        };
        assert_eq!(
            flags.or(file.clone()).gpu_precision,
            Some(GpuPrecision::Split)
        );
        assert_eq!(
            EngineArgs::default().or(file).gpu_precision,
            Some(GpuPrecision::Bf16)
        );
        assert_eq!(
            EngineArgs::default().gpu_precision.unwrap_or_default(),
            GpuPrecision::Split
        );
        let bad = toml::from_str::<EngineArgs>("gpu_precision = \"fp8\"").unwrap_err();
        assert!(bad.to_string().contains("gpu_precision"), "{bad}");
    }

    #[test]
    fn a_setting_of_the_wrong_type_is_named_in_a_file_of_flattened_groups() {
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        struct File {
            #[serde(flatten)]
            engine: EngineArgs,
        }
        let err = super::parse_config::<File>("slots = \"64\"\nprefill_chunk = 8\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("`slots`"), "{err}");
        let err = super::parse_config::<File>("slot = 64\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("slot"), "{err}");
        let ok = super::parse_config::<File>("slots = 64\n").unwrap();
        assert_eq!(ok.engine.slots, Some(64));
    }

    #[test]
    fn gpu_lists_parse_into_distinct_devices() {
        assert_eq!(gpu_devices(None).unwrap(), [0]);
        assert_eq!(gpu_devices(Some("1")).unwrap(), [1]);
        assert_eq!(gpu_devices(Some("2,3")).unwrap(), [2, 3]);
        let twice = gpu_devices(Some("0,1,0")).unwrap_err().to_string();
        assert!(twice.contains("GPU 0 is listed twice"), "{twice}");
        assert!(gpu_devices(Some("0,x")).is_err());
    }
}
