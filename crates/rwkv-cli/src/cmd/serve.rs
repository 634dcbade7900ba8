//! `rwkv serve`: the router and one in-process worker in one process, no etcd needed.
//!
//! The worker still serves its gRPC API (on a loopback port), and the router reaches it through
//! the same client, pool and failover code as in a cluster, so single-process mode runs the
//! production path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rwkv_cluster::{MemoryRegistry, Registry, WorkerRecord};
use rwkv_proto::auth::WorkerToken;
use rwkv_router::{PoolConfig, Router, RouterConfig, WorkerPool};
use rwkv_worker::WorkerService;
use serde::Deserialize;

use super::server::{self, EngineArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the flags, with `_` for `-`).
    #[arg(long, env = "RWKV_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    router: RouterArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

/// Router settings (flags, `RWKV_*` variables or TOML keys).
#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterArgs {
    /// HTTP listen address [default: 127.0.0.1:8000].
    #[arg(long, env = "RWKV_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Requests that may wait for a free worker; more get 429 [default: 256].
    #[arg(long, env = "RWKV_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Requests in flight per worker, as a multiple of its slots. Above 1 each worker keeps a
    /// queue of its own, which it serves by preempting long generations, so short requests are
    /// not stuck behind long ones; 1 keeps every waiting request in the router's fair queue
    /// [default: 2].
    #[arg(long, env = "RWKV_WORKER_OVERCOMMIT")]
    pub worker_overcommit: Option<f64>,
    /// Seconds a request may spend queued and running [default: 600].
    #[arg(long, env = "RWKV_REQUEST_TIMEOUT")]
    pub request_timeout: Option<u64>,
    /// Longest prompt in tokens [default: 65536].
    #[arg(long, env = "RWKV_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Largest `max_tokens` [default: 8192].
    #[arg(long, env = "RWKV_MAX_TOKENS_LIMIT")]
    pub max_tokens_limit: Option<u32>,
    /// Largest request body in bytes [default: 4 MiB].
    #[arg(long, env = "RWKV_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Tenants file (TOML): API keys as SHA-256 digests and per-tenant limits; re-read when it
    /// changes. Without it the API is open (no key, one tenant).
    #[arg(long, env = "RWKV_TENANTS")]
    pub tenants: Option<PathBuf>,
    /// Serve HTTPS (and gRPC over TLS) with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "RWKV_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "RWKV_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Also serve `/metrics` (Prometheus) and `/health` on this address, plain HTTP without API
    /// keys: for a scraper on a private port when the API needs keys (its own `/metrics` needs
    /// an admin key then).
    #[arg(long, env = "RWKV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl RouterArgs {
    pub fn or(self, file: RouterArgs) -> Self {
        Self {
            listen: self.listen.or(file.listen),
            max_queue: self.max_queue.or(file.max_queue),
            worker_overcommit: self.worker_overcommit.or(file.worker_overcommit),
            request_timeout: self.request_timeout.or(file.request_timeout),
            max_prompt_tokens: self.max_prompt_tokens.or(file.max_prompt_tokens),
            max_tokens_limit: self.max_tokens_limit.or(file.max_tokens_limit),
            max_body_bytes: self.max_body_bytes.or(file.max_body_bytes),
            tenants: self.tenants.or(file.tenants),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
        }
    }

    /// The router over `pool`, with API keys when a tenants file is configured (watched for
    /// changes as long as the runtime runs).
    pub fn build_router(
        &self,
        cfg: RouterConfig,
        pool: WorkerPool,
        tokenizer: Arc<rwkv_tokenizer::Tokenizer>,
        prometheus: metrics_exporter_prometheus::PrometheusHandle,
    ) -> anyhow::Result<Router> {
        let router = Router::new(cfg, pool, tokenizer, Some(prometheus));
        let Some(path) = &self.tenants else {
            tracing::warn!("no --tenants file: the API is open to anyone who can reach it");
            return Ok(router);
        };
        let tenants =
            Arc::new(rwkv_router::tenants::Tenants::from_file(path).map_err(anyhow::Error::msg)?);
        tenants.watch(Duration::from_secs(2));
        Ok(router.with_tenants(tenants))
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8000)))
    }

    pub fn router_config(&self, default_model: Option<String>) -> anyhow::Result<RouterConfig> {
        let d = RouterConfig::default();
        anyhow::ensure!(
            self.request_timeout != Some(0),
            "--request-timeout must be at least 1 second"
        );
        // Zero would refuse every request (413 for any body).
        anyhow::ensure!(
            self.max_body_bytes != Some(0),
            "--max-body-bytes must be at least 1"
        );
        Ok(RouterConfig {
            default_model,
            max_prompt_tokens: self.max_prompt_tokens.unwrap_or(d.max_prompt_tokens),
            max_tokens_limit: self.max_tokens_limit.unwrap_or(d.max_tokens_limit),
            max_body_bytes: self.max_body_bytes.unwrap_or(d.max_body_bytes),
            request_timeout: self
                .request_timeout
                .map_or(d.request_timeout, Duration::from_secs),
            ..d
        })
    }

    pub fn pool_config(&self) -> anyhow::Result<PoolConfig> {
        let d = PoolConfig::default();
        let overcommit = self.worker_overcommit.unwrap_or(d.overcommit);
        anyhow::ensure!(
            overcommit.is_finite() && overcommit >= 1.0,
            "--worker-overcommit must be a number >= 1, got {overcommit}"
        );
        // Zero would answer 429 to every request that finds the workers busy for an instant.
        anyhow::ensure!(self.max_queue != Some(0), "--max-queue must be at least 1");
        Ok(PoolConfig {
            max_queue: self.max_queue.unwrap_or(d.max_queue),
            overcommit,
            ..d
        })
    }
}

/// Everything `rwkv serve` reads from a config file.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ServeFile {
    #[serde(flatten)]
    router: RouterArgs,
    #[serde(flatten)]
    engine: EngineArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    server::init_tracing();
    let file: ServeFile = server::read_config(args.config.as_deref())?;
    let router_args = args.router.or(file.router);
    let engine_args = args.engine.or(file.engine);
    // The router's settings, TLS pair and port are checked before the model loads (minutes
    // for a large one); the engine's when it starts.
    let pool_config = router_args.pool_config()?;
    router_args.router_config(None)?;
    let tls = server::tls_pair(&router_args.tls_cert, &router_args.tls_key)?;
    if let Some((cert, key)) = &tls {
        rwkv_router::tls::server_config(cert, key).map_err(anyhow::Error::msg)?;
    }
    let listen = router_args.listen();
    let listener = std::net::TcpListener::bind(listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("cannot listen on {listen}"))?;
    let prometheus = server::install_metrics()?;
    let model = server::load_model(&engine_args)?;
    let tokenizer = server::load_tokenizer(&engine_args, model.weights.config.vocab_size)?;
    let (engine, identity) = server::start_engine(&engine_args, &model, &tokenizer, "local")?;
    let runtime = server::runtime()?;
    runtime.block_on(async move {
        let worker_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot open the worker's loopback port")?;
        let worker_addr = worker_listener.local_addr()?;
        // The loopback port is open to every local user: a token only this process knows
        // keeps them off it.
        let token = WorkerToken::random();
        let service =
            WorkerService::new(engine.handle(), identity.clone()).require_token(token.clone());
        let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
        let worker_task = tokio::spawn(rwkv_worker::serve(
            service.clone(),
            worker_listener,
            async {
                let _ = worker_stopped.await;
            },
        ));

        let registry = MemoryRegistry::new();
        let registration = registry
            .register(WorkerRecord {
                id: identity.worker_id.clone(),
                address: format!("http://{worker_addr}"),
                model: identity.model_id.clone(),
                slots: identity.slots as u32,
            })
            .await?;
        let pool = WorkerPool::new(PoolConfig {
            worker_token: Some(token),
            ..pool_config
        });
        pool.follow(&registry).await?;
        if let Some(addr) = router_args.metrics_listen {
            server::serve_metrics(addr, prometheus.clone()).await?;
        }
        let router = router_args.build_router(
            router_args.router_config(Some(identity.model_id.clone()))?,
            pool,
            Arc::new(tokenizer),
            prometheus,
        )?;
        let listener = tokio::net::TcpListener::from_std(listener)
            .with_context(|| format!("cannot listen on {listen}"))?;
        eprintln!(
            "[rwkv] serving `{}` on {}://{} (OpenAI API under /v1, gRPC rwkv.api.v1; Ctrl-C stops)",
            identity.model_id,
            if tls.is_some() { "https" } else { "http" },
            listener.local_addr()?
        );
        // Graceful shutdown: stop accepting HTTP, let open streams finish, then drain the worker.
        server::serve_api(router, listener, tls).await?;
        service.start_drain();
        registration.deregister().await;
        let _ = stop_worker.send(());
        let _ = worker_task.await;
        engine.shutdown();
        anyhow::Ok(())
    })
}
