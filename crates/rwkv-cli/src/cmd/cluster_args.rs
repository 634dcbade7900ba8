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

impl EtcdArgs {
    pub fn or(self, file: EtcdArgs) -> Self {
        Self {
            etcd: self.etcd.or(file.etcd),
            etcd_prefix: self.etcd_prefix.or(file.etcd_prefix),
            lease_ttl: self.lease_ttl.or(file.lease_ttl),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<EtcdRegistry> {
        let endpoints: Vec<String> = self
            .etcd
            .as_deref()
            .context("--etcd is required (or RWKV_ETCD, or `etcd` in the config file)")?
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let prefix = self.etcd_prefix.as_deref().unwrap_or("/rwkv");
        let ttl = Duration::from_secs(self.lease_ttl.unwrap_or(5));
        EtcdRegistry::connect(&endpoints, prefix, ttl)
            .await
            .with_context(|| format!("cannot reach etcd at {}", endpoints.join(",")))
    }
}
