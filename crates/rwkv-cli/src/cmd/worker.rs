//! `rwkv worker`: one engine behind the worker gRPC service, registered in etcd.
//!
//! On SIGTERM/Ctrl-C it drains: it leaves the registry (routers stop sending), refuses new work,
//! lets the work in flight finish (up to `--drain-timeout`), then stops.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use rwkv_cluster::{Registry, WorkerRecord};
use rwkv_proto::auth::read_token_file;
use rwkv_worker::WorkerService;
use serde::Deserialize;

use super::cluster_args::EtcdArgs;
use super::server::{self, EngineArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the flags, with `_` for `-`).
    #[arg(long, env = "RWKV_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    engine: EngineArgs,
}

#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerArgs {
    /// gRPC listen address [default: 0.0.0.0:50051].
    #[arg(long, env = "RWKV_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// URL routers use to reach this worker, e.g. `http://worker-0.workers:50051`
    /// [default: http://<listen> when it is not a wildcard address].
    #[arg(long, env = "RWKV_ADVERTISE")]
    pub advertise: Option<String>,
    /// Unique id in the cluster [default: the host name and port].
    #[arg(long, env = "RWKV_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Serve `/metrics` (Prometheus) and `/health` on this address.
    #[arg(long, env = "RWKV_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Seconds to let work in flight finish on shutdown [default: 60].
    #[arg(long, env = "RWKV_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<u64>,
    /// Serve gRPC over TLS with this certificate chain (PEM); needs --tls-key. Routers then
    /// need --worker-ca, and the advertised address is https://.
    #[arg(long, env = "RWKV_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "RWKV_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// File holding the cluster's worker token (at least 16 printable characters): calls
    /// without it are refused, and routers need the same file. Several lines are several
    /// tokens, each accepted (for rotation). Without it, anyone who reaches the port can use it
    /// as any tenant.
    #[arg(long, env = "RWKV_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<PathBuf>,
}

impl WorkerArgs {
    pub fn or(self, file: WorkerArgs) -> Self {
        Self {
            listen: self.listen.or(file.listen),
            advertise: self.advertise.or(file.advertise),
            worker_id: self.worker_id.or(file.worker_id),
            metrics_listen: self.metrics_listen.or(file.metrics_listen),
            drain_timeout: self.drain_timeout.or(file.drain_timeout),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            worker_token_file: self.worker_token_file.or(file.worker_token_file),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WorkerFile {
    #[serde(flatten)]
    worker: WorkerArgs,
    #[serde(flatten)]
    etcd: EtcdArgs,
    #[serde(flatten)]
    engine: EngineArgs,
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "worker".into())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    server::init_tracing();
    let file: WorkerFile = server::read_config(args.config.as_deref())?;
    let worker_args = args.worker.or(file.worker);
    let etcd_args = args.etcd.or(file.etcd);
    let engine_args = args.engine.or(file.engine);
    anyhow::ensure!(
        engine_args.model.is_some(),
        "--model is required for a worker (only `rwkv serve` has a built-in demo model)"
    );
    let listen = worker_args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 50051)));
    let tls = server::tls_pair(&worker_args.tls_cert, &worker_args.tls_key)?;
    let tls_pem = match &tls {
        Some((cert, key)) => Some((
            std::fs::read(cert).with_context(|| format!("cannot read {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("cannot read {}", key.display()))?,
        )),
        None => None,
    };
    let tokens = match &worker_args.worker_token_file {
        Some(path) => read_token_file(path)?,
        None => Vec::new(),
    };
    if tokens.is_empty() && !listen.ip().is_loopback() {
        tracing::warn!(
            %listen,
            "no worker_token_file: anyone who can reach this port can call it as any tenant \
             (read and export sessions, drain the worker)"
        );
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let advertise = match &worker_args.advertise {
        Some(url) => url.clone(),
        None if !listen.ip().is_unspecified() => format!("{scheme}://{listen}"),
        None => anyhow::bail!(
            "--advertise is required when listening on {listen}: routers need an address they can reach"
        ),
    };
    let worker_id = worker_args
        .worker_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", host_name(), listen.port()));
    // Everything that can be checked is, before the model loads (minutes for a large one):
    // the TLS pair, the port, etcd.
    if let Some((cert, key)) = &tls_pem {
        rwkv_worker::check_tls(cert, key).context("--tls-cert / --tls-key")?;
    }
    // Checked, then let go: a port that accepted connections while the model loads would
    // pass a TCP readiness probe minutes early (and a rolling update would stop the next old
    // worker too soon).
    drop(
        std::net::TcpListener::bind(listen)
            .with_context(|| format!("cannot listen on {listen}"))?,
    );
    if let Some(addr) = worker_args.metrics_listen {
        drop(
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} for metrics"))?,
        );
    }
    let runtime = server::runtime()?;
    let registry = runtime.block_on(etcd_args.connect_retrying(ETCD_START_WAIT))?;
    let prometheus = server::install_metrics()?;
    let model = server::load_model(&engine_args)?;
    let tokenizer = server::load_tokenizer(&engine_args, model.weights.config.vocab_size)?;
    let (engine, identity) = server::start_engine(&engine_args, &model, &tokenizer, &worker_id)?;
    let drain_timeout = Duration::from_secs(worker_args.drain_timeout.unwrap_or(60));
    let result = runtime.block_on(async move {
        if let Some(addr) = worker_args.metrics_listen {
            server::serve_metrics(addr, prometheus).await?;
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let service = WorkerService::new(engine.handle(), identity.clone()).require_tokens(tokens);
        let (stop_server, server_stopped) = tokio::sync::oneshot::channel::<()>();
        let stopped = async {
            let _ = server_stopped.await;
        };
        let mut server = match tls_pem {
            Some((cert, key)) => tokio::spawn(rwkv_worker::serve_tls(
                service.clone(),
                listener,
                cert,
                key,
                stopped,
            )),
            None => tokio::spawn(rwkv_worker::serve(service.clone(), listener, stopped)),
        };
        let registration = registry
            .register(WorkerRecord {
                id: worker_id.clone(),
                address: advertise.clone(),
                model: identity.model_id.clone(),
                slots: identity.slots as u32,
            })
            .await?;
        eprintln!(
            "[rwkv] worker `{worker_id}` serving `{}` at {advertise}",
            identity.model_id
        );
        // Until a signal, the gRPC server failing, or the backend breaking (a GPU fault):
        // the last two stop the worker with an error, so that its supervisor restarts it.
        let mut server_ended = false;
        let failure = tokio::select! {
            () = server::shutdown_signal() => None,
            ended = &mut server => {
                server_ended = true;
                Some(match ended {
                    Ok(Ok(())) => anyhow::anyhow!("the gRPC server stopped"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("the gRPC server failed"),
                    Err(e) => anyhow::Error::new(e).context("the gRPC server task failed"),
                })
            }
            why = backend_broken(&engine) => Some(anyhow::anyhow!(
                "the backend cannot run any more ({why}); restart the worker"
            )),
        };
        if let Some(e) = &failure {
            tracing::error!("{e:#}");
        }

        // Drain: leave the registry, refuse new work, let the work in flight finish.
        service.start_drain();
        registration.deregister().await;
        let drained = if failure.is_none() {
            service.drain_for(drain_timeout).await
        } else {
            service.drain_for(Duration::ZERO).await
        };
        match drained {
            Ok(load) => tracing::info!(
                unfinished = load.running + load.waiting,
                "drained; stopping"
            ),
            Err(status) => tracing::warn!("drain: {}", status.message()),
        }
        // What did not finish in time fails now (its streams end with the engine's error),
        // so the server's graceful stop has nothing left to wait for but the goodbyes; a
        // peer that never answers those is not waited for either.
        stop_engine(engine).await;
        let _ = stop_server.send(());
        // (A finished task's handle must not be polled again.)
        if !server_ended
            && tokio::time::timeout(SERVER_STOP_WAIT, &mut server)
                .await
                .is_err()
        {
            tracing::warn!("connections still open after {SERVER_STOP_WAIT:?}; leaving them");
            server.abort();
        }
        failure.map_or(Ok(()), Err)
    });
    // An engine thread stuck in a hung device call must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

/// How long a starting worker keeps trying to reach etcd (which may be starting too).
pub const ETCD_START_WAIT: Duration = Duration::from_secs(120);
/// How long the gRPC server may take to close its connections once the engine has stopped.
const SERVER_STOP_WAIT: Duration = Duration::from_secs(5);

/// Resolves with the reason once the engine reports its backend broken (or itself stopped).
async fn backend_broken(engine: &rwkv_engine::Engine) -> String {
    let handle = engine.handle();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let handle = handle.clone();
        match tokio::task::spawn_blocking(move || handle.stats()).await {
            Ok(Ok(_)) => {}
            Ok(Err(rwkv_engine::EngineError::BackendBroken(why))) => return why,
            Ok(Err(rwkv_engine::EngineError::Stopped)) => return "the engine stopped".into(),
            Ok(Err(_)) | Err(_) => {}
        }
    }
}

/// Stops the engine (failing what still runs) without blocking the async threads, and without
/// waiting for ever on an engine stuck in a device call.
async fn stop_engine(engine: rwkv_engine::Engine) {
    let stopping = tokio::task::spawn_blocking(move || engine.shutdown());
    if tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .is_err()
    {
        tracing::error!("the engine did not stop within 10 s (a hung device?); exiting anyway");
    }
}
