//! [`MemoryRegistry`]: membership inside one process (single-process mode and tests).

use std::sync::Arc;

use tokio::sync::watch;

use crate::{validate, Membership, Registration, Registry, RegistryError, WorkerRecord};

/// A registry that lives in memory; clones share it.
#[derive(Clone, Debug)]
pub struct MemoryRegistry {
    members: Arc<watch::Sender<Membership>>,
    /// Which registration wrote each id's record (a serial number per registration), so an
    /// old registration leaving never removes a newer one's record, even an identical one.
    owners: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    serials: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self {
            members: Arc::new(watch::channel(Membership::new()).0),
            owners: Arc::default(),
            serials: Arc::default(),
        }
    }
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Removes the record of `id` if registration `serial` still owns it (a newer
    /// registration under the same id stays).
    fn remove(&self, id: &str, serial: u64) {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.get(id) != Some(&serial) {
            return;
        }
        owners.remove(id);
        self.members.send_if_modified(|m| m.remove(id).is_some());
    }
}

#[async_trait::async_trait]
impl Registry for MemoryRegistry {
    async fn register(&self, record: WorkerRecord) -> Result<Registration, RegistryError> {
        validate(&record)?;
        let id = record.id.clone();
        let serial = self
            .serials
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        {
            let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
            owners.insert(id.clone(), serial);
            self.members.send_modify(|m| {
                m.insert(record.id.clone(), record);
            });
        }
        let me = self.clone();
        Ok(Registration::new(move || {
            Box::pin(async move {
                me.remove(&id, serial);
            })
        }))
    }

    async fn watch(&self) -> Result<watch::Receiver<Membership>, RegistryError> {
        Ok(self.members.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> WorkerRecord {
        WorkerRecord {
            id: id.into(),
            address: "http://127.0.0.1:1".into(),
            model: "m".into(),
            slots: 4,
        }
    }

    #[tokio::test]
    async fn an_old_registration_leaving_keeps_a_newer_one_of_the_same_id() {
        let registry = MemoryRegistry::new();
        let old = registry.register(record("a")).await.unwrap();
        // The same worker back (an identical record) before the old registration left.
        let _new = registry.register(record("a")).await.unwrap();
        old.deregister().await;
        let members = registry.watch().await.unwrap().borrow().clone();
        assert_eq!(members.get("a"), Some(&record("a")));
    }

    #[tokio::test]
    async fn watchers_see_registration_and_removal() {
        let registry = MemoryRegistry::new();
        let mut watch = registry.watch().await.unwrap();
        let a = registry.register(record("a")).await.unwrap();
        let b = registry.register(record("b")).await.unwrap();
        watch.changed().await.unwrap();
        assert_eq!(watch.borrow_and_update().len(), 2);
        a.deregister().await;
        assert_eq!(
            watch.borrow_and_update().keys().collect::<Vec<_>>(),
            vec!["b"]
        );
        drop(b);
        tokio::task::yield_now().await;
        assert!(
            watch.borrow().is_empty(),
            "dropping a registration removes it"
        );
    }

    #[tokio::test]
    async fn invalid_records_are_refused() {
        let registry = MemoryRegistry::new();
        for bad in [
            WorkerRecord {
                id: String::new(),
                ..record("x")
            },
            WorkerRecord {
                address: "10.0.0.1:5".into(),
                ..record("x")
            },
            WorkerRecord {
                model: String::new(),
                ..record("x")
            },
        ] {
            assert!(registry.register(bad).await.is_err());
        }
        assert!(registry.watch().await.unwrap().borrow().is_empty());
    }
}
