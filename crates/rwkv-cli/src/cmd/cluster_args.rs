//! Flags shared by the cluster commands (`rwkv worker`, `rwkv router`): where etcd is.

use std::time::Duration;

use anyhow::Context;
use rwkv_cluster::EtcdRegistry;
use serde::Deserialize;

#[derive(clap::Args, Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (e.g. `http://127.0.0.1:2379`).
    #[arg(long, env = "RWKV_ETCD")]
    pub etcd: Option<String>,
    /// Key prefix of this cluster in etcd [default: /rwkv].
    #[arg(long, env = "RWKV_ETCD_PREFIX")]
    pub etcd_prefix: Option<String>,
    /// Seconds after which a dead worker's record expires [default: 5].
    #[arg(long, env = "RWKV_LEASE_TTL")]
    pub lease_ttl: Option<u64>,
}

const MIN_LEASE_TTL: u64 = 2;
const MAX_LEASE_TTL: u64 = 3600;

impl EtcdArgs {
    pub fn or(self, file: EtcdArgs) -> Self {
        Self {
            etcd: self.etcd.or(file.etcd),
            etcd_prefix: self.etcd_prefix.or(file.etcd_prefix),
            lease_ttl: self.lease_ttl.or(file.lease_ttl),
        }
    }

    /// `lease_ttl` (default 5 s), checked: etcd takes whole seconds, and a lease shorter than
    /// 2 s would expire between two keep-alives.
    pub fn lease_ttl(&self) -> anyhow::Result<Duration> {
        let ttl = self.lease_ttl.unwrap_or(5);
        anyhow::ensure!(
            (MIN_LEASE_TTL..=MAX_LEASE_TTL).contains(&ttl),
            "--lease-ttl must be {MIN_LEASE_TTL} to {MAX_LEASE_TTL} seconds, got {ttl}"
        );
        Ok(Duration::from_secs(ttl))
    }

    /// [`EtcdArgs::connect`], trying again (every 1 to 10 s) for up to `wait`: a cluster
    /// starting at once has etcd, workers and routers coming up in any order.
    pub async fn connect_retrying(&self, wait: Duration) -> anyhow::Result<EtcdRegistry> {
        // Settings that are wrong stay wrong: only reaching etcd is tried again.
        self.endpoints()?;
        self.lease_ttl()?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_secs(1);
        loop {
            match self.connect().await {
                Ok(registry) => return Ok(registry),
                Err(e) if tokio::time::Instant::now() + pause < deadline => {
                    tracing::warn!("{e:#}; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
                Err(e) => return Err(e.context(format!("gave up after {wait:?}"))),
            }
        }
    }

    fn endpoints(&self) -> anyhow::Result<Vec<String>> {
        let endpoints: Vec<String> = self
            .etcd
            .as_deref()
            .context("--etcd is required (or RWKV_ETCD, or `etcd` in the config file)")?
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        anyhow::ensure!(!endpoints.is_empty(), "--etcd names no endpoint");
        Ok(endpoints)
    }

    pub async fn connect(&self) -> anyhow::Result<EtcdRegistry> {
        let endpoints = self.endpoints()?;
        let prefix = self.etcd_prefix.as_deref().unwrap_or("/rwkv");
        let ttl = self.lease_ttl()?;
        EtcdRegistry::connect(&endpoints, prefix, ttl)
            .await
            .with_context(|| format!("cannot reach etcd at {}", endpoints.join(",")))
    }
}
