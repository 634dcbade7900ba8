//! Cluster membership: which workers exist, where they listen and what they serve.
//!
//! This crate owns the [`Registry`] trait (workers register a [`WorkerRecord`] under a lease
//! and remove it when they drain; routers watch the set) and [`MemoryRegistry`], the in-process
//! implementation that `rwkv serve` and tests use, and [`EtcdRegistry`] for clusters. It knows
//! nothing about models, engines or devices: a record is plain data, serialized as JSON so other
//! tools can read it.

mod etcd;
mod memory;

pub use etcd::{EtcdRegistry, EtcdSecurity};
pub use memory::MemoryRegistry;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// One worker as the cluster sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Unique within the cluster (the key of the record).
    pub id: String,
    /// gRPC endpoint, e.g. `http://10.0.0.5:50051`.
    pub address: String,
    /// The model id it serves (what `/v1/models` lists).
    pub model: String,
    /// Sequences it runs at once (its device state slots).
    pub slots: u32,
}

/// Every worker currently registered, by id.
pub type Membership = BTreeMap<String, WorkerRecord>;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("worker record `{0}` is invalid: {1}")]
    InvalidRecord(String, String),
    #[error("registry backend error: {0}")]
    Backend(String),
    /// The backend answered and refused these credentials: trying again will not help.
    #[error("the registry refused this user: {0}")]
    Refused(String),
}

/// Where workers announce themselves and routers learn about them.
#[async_trait::async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Adds (or replaces) `record`; it stays until [`Registration::deregister`] or until the
    /// registration is dropped or its process dies (a lease expires).
    async fn register(&self, record: WorkerRecord) -> Result<Registration, RegistryError>;

    /// The membership now and every later change. Implementations publish a full snapshot per
    /// change, so a slow watcher only ever misses intermediate states, never the latest.
    async fn watch(&self) -> Result<watch::Receiver<Membership>, RegistryError>;
}

/// A live registration. Dropping it deregisters (best effort); [`Self::deregister`] waits
/// until the record is gone.
pub struct Registration {
    remove: Option<Box<dyn FnOnce() -> RemoveFuture + Send>>,
}

type RemoveFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl Registration {
    /// A registration whose removal runs `remove`.
    pub fn new(remove: impl FnOnce() -> RemoveFuture + Send + 'static) -> Self {
        Self {
            remove: Some(Box::new(remove)),
        }
    }

    /// Removes the record and waits until it is gone.
    pub async fn deregister(mut self) {
        if let Some(remove) = self.remove.take() {
            remove().await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(remove) = self.remove.take() {
            // Outside a runtime there is nothing to run the removal on; the lease then expires.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(remove());
            }
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("active", &self.remove.is_some())
            .finish()
    }
}

/// Checks a record before it is published.
pub fn validate(record: &WorkerRecord) -> Result<(), RegistryError> {
    let bad = |why: &str| Err(RegistryError::InvalidRecord(record.id.clone(), why.into()));
    if record.id.is_empty() || record.id.contains('/') {
        return bad("`id` must be non-empty and contain no '/'");
    }
    if !(record.address.starts_with("http://") || record.address.starts_with("https://")) {
        return bad("`address` must be an http:// or https:// URL");
    }
    if record.model.is_empty() {
        return bad("`model` must not be empty");
    }
    Ok(())
}
