//! `rwkv router`: the HTTP API in front of the workers registered in etcd.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rwkv_proto::auth::read_token_file;
use rwkv_router::WorkerPool;
use rwkv_tokenizer::Tokenizer;
use serde::Deserialize;

use super::cluster_args::EtcdArgs;
use super::serve::RouterArgs;
use super::server;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file with any of the settings below (keys as the flags, with `_` for `-`).
    #[arg(long, env = "RWKV_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    router: RouterArgs,
    #[command(flatten)]
    etcd: EtcdArgs,
    #[command(flatten)]
    extra: RouterOnlyArgs,
}

#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterOnlyArgs {
    /// `world`, a Hugging Face tokenizer.json, or a World vocabulary .txt [default: world].
    #[arg(long, env = "RWKV_TOKENIZER")]
    pub tokenizer: Option<String>,
    /// Model for requests that name none [default: the only model served].
    #[arg(long, env = "RWKV_DEFAULT_MODEL")]
    pub default_model: Option<String>,
    /// CA certificate (PEM) that signed the workers' certificates: needed for workers that
    /// advertise https:// addresses.
    #[arg(long, env = "RWKV_WORKER_CA")]
    pub worker_ca: Option<PathBuf>,
    /// File holding the cluster's worker token, sent with every call to a worker: the same
    /// file the workers were started with (of several lines, the first).
    #[arg(long, env = "RWKV_WORKER_TOKEN_FILE")]
    pub worker_token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RouterFile {
    #[serde(flatten)]
    router: RouterArgs,
    #[serde(flatten)]
    etcd: EtcdArgs,
    #[serde(flatten)]
    extra: RouterOnlyArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    server::init_tracing();
    let file: RouterFile = server::read_config(args.config.as_deref())?;
    let router_args = args.router.or(file.router);
    let etcd_args = args.etcd.or(file.etcd);
    let tokenizer_spec = args.extra.tokenizer.or(file.extra.tokenizer);
    let default_model = args.extra.default_model.or(file.extra.default_model);
    let worker_ca = args.extra.worker_ca.or(file.extra.worker_ca);
    // The first token of the file: during a rotation the workers accept the others too.
    let worker_token = match args
        .extra
        .worker_token_file
        .or(file.extra.worker_token_file)
    {
        Some(path) => read_token_file(&path)?.into_iter().next(),
        None => None,
    };
    let tls = server::tls_pair(&router_args.tls_cert, &router_args.tls_key)?;
    if let Some((cert, key)) = &tls {
        rwkv_router::tls::server_config(cert, key).map_err(anyhow::Error::msg)?;
    }
    let tokenizer = Tokenizer::load(tokenizer_spec.as_deref().unwrap_or("world"))?;
    let prometheus = server::install_metrics()?;
    let runtime = server::runtime()?;
    runtime.block_on(async move {
        // The settings are checked before etcd is waited for.
        let mut pool_config = router_args.pool_config()?;
        if let Some(ca) = &worker_ca {
            pool_config.worker_tls =
                Some(rwkv_router::tls::worker_client_config(ca).map_err(anyhow::Error::msg)?);
        }
        pool_config.worker_token = worker_token;
        let cfg = router_args.router_config(default_model)?;
        let registry = etcd_args
            .connect_retrying(super::worker::ETCD_START_WAIT)
            .await?;
        let pool = WorkerPool::new(pool_config);
        pool.follow(&registry).await?;
        if let Some(addr) = router_args.metrics_listen {
            server::serve_metrics(addr, prometheus.clone()).await?;
        }
        let router = router_args.build_router(cfg, pool, Arc::new(tokenizer), prometheus)?;
        let listen = router_args
            .listen
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 8000)));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        eprintln!(
            "[rwkv] router on {}://{}",
            if tls.is_some() { "https" } else { "http" },
            listener.local_addr()?
        );
        server::serve_api(router, listener, tls).await?;
        anyhow::Ok(())
    })
}
