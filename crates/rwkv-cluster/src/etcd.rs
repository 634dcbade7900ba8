//! [`EtcdRegistry`]: membership in etcd. A worker's record lives at `<prefix>/workers/<id>` as
//! JSON, attached to a lease it keeps alive; if the process dies the lease expires (after `ttl`)
//! and the record disappears. Routers read the prefix once and then watch it, so they see a
//! change within a round trip; a broken watch is re-established from a fresh read.
//!
//! The key is the truth: a record counts only under the key of its own `id`, so a record
//! written under another key can neither add a phantom worker nor take over a real one's
//! entry, and whatever a key holds replaces what it held before. A worker checks its own key
//! with every lease refresh and writes its record again if someone deleted it.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, EventType, GetOptions, PutOptions, WatchOptions};
use tokio::sync::watch;

use crate::{validate, Membership, Registration, Registry, RegistryError, WorkerRecord};

/// Membership stored in an etcd cluster.
#[derive(Clone)]
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
    ttl: Duration,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn backend(e: etcd_client::Error) -> RegistryError {
    RegistryError::Backend(e.to_string())
}

/// How long to wait before retrying a failed etcd call in a background task.
const RETRY: Duration = Duration::from_millis(500);

/// How to reach an etcd that is not open to anyone on its network: TLS (a CA to verify it,
/// and a client certificate for etcd's `--client-cert-auth`) and a user (etcd's
/// authentication, so that its roles decide who may write the membership).
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    /// PEM CA that signed etcd's certificate; set, the endpoints must be `https://`.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM certificate chain and key this process presents to etcd.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    /// User name and password.
    pub user: Option<(String, String)>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_identity.is_some())
            .field("user", &self.user.as_ref().map(|(name, _)| name))
            .finish()
    }
}

impl EtcdSecurity {
    fn apply(
        &self,
        endpoints: &[String],
        options: ConnectOptions,
    ) -> Result<ConnectOptions, RegistryError> {
        let mut options = options;
        if let Some((name, password)) = &self.user {
            // etcd's auth tokens expire (5 minutes by default): a long-lived worker renews them.
            options = options
                .with_user(name.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        match &self.ca_pem {
            Some(ca) => {
                if let Some(plain) = endpoints.iter().find(|e| !e.starts_with("https://")) {
                    return Err(RegistryError::Backend(format!(
                        "etcd endpoint {plain} is not https:// but an etcd CA is set"
                    )));
                }
                let mut tls = etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(ca.clone()));
                if let Some((cert, key)) = &self.client_identity {
                    tls = tls.identity(etcd_client::Identity::from_pem(cert.clone(), key.clone()));
                }
                options = options.with_tls(tls);
            }
            None if self.client_identity.is_some() => {
                return Err(RegistryError::Backend(
                    "an etcd client certificate needs the etcd CA too".into(),
                ));
            }
            None => {}
        }
        Ok(options)
    }
}

impl EtcdRegistry {
    /// Connects to `endpoints` (e.g. `http://127.0.0.1:2379`). Records live under `prefix`
    /// (e.g. `/rwkv`); a worker's record expires `ttl` after its process stops refreshing it.
    pub async fn connect(
        endpoints: &[String],
        prefix: &str,
        ttl: Duration,
    ) -> Result<Self, RegistryError> {
        Self::connect_secured(endpoints, prefix, ttl, &EtcdSecurity::default()).await
    }

    /// [`EtcdRegistry::connect`] to an etcd that needs TLS or a user.
    pub async fn connect_secured(
        endpoints: &[String],
        prefix: &str,
        ttl: Duration,
        security: &EtcdSecurity,
    ) -> Result<Self, RegistryError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        let options = security.apply(endpoints, options)?;
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(|e| match e {
                // With a user, connecting authenticates: etcd answers a wrong name or
                // password with INVALID_ARGUMENT ("authentication failed").
                etcd_client::Error::GRpcStatus(status)
                    if security.user.is_some()
                        && matches!(
                            status.code(),
                            tonic::Code::InvalidArgument | tonic::Code::Unauthenticated
                        ) =>
                {
                    RegistryError::Refused(status.message().to_owned())
                }
                e => backend(e),
            })?;
        Ok(Self {
            client,
            prefix: format!("{}/workers/", prefix.trim_end_matches('/')),
            ttl: ttl.max(Duration::from_secs(2)),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// The worker id a key under the prefix names.
    fn id_of(&self, key: &[u8]) -> String {
        String::from_utf8_lossy(key.get(self.prefix.len()..).unwrap_or_default()).into_owned()
    }

    /// Grants a lease and writes the record under it; returns the lease id.
    async fn put_with_lease(
        client: &mut Client,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<i64, etcd_client::Error> {
        let lease = client.lease_grant(ttl.as_secs() as i64, None).await?.id();
        client
            .put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await?;
        Ok(lease)
    }

    /// Reads the whole membership; returns it with the revision it was read at.
    async fn read_all(&self, client: &mut Client) -> Result<(Membership, i64), RegistryError> {
        let response = client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(backend)?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut members = Membership::new();
        for kv in response.kvs() {
            let id = self.id_of(kv.key());
            if let Some(record) = parse(&id, kv.value()) {
                members.insert(id, record);
            }
        }
        Ok((members, revision))
    }

    /// Follows the prefix from `revision` on, applying events to `members`, until the watch
    /// breaks or every receiver is gone (`Ok(false)`).
    async fn follow(
        &self,
        client: &mut Client,
        mut members: Membership,
        revision: i64,
        tx: &watch::Sender<Membership>,
    ) -> Result<bool, RegistryError> {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = client
            .watch(self.prefix.as_str(), Some(options))
            .await
            .map_err(backend)?;
        loop {
            let Some(response) = stream.message().await.map_err(backend)? else {
                return Ok(true);
            };
            if response.canceled() {
                // A compaction (the membership is read again) or something lasting, such as a
                // permission etcd refuses: say which, since the re-read repeats every 500 ms.
                tracing::warn!(
                    reason = response.cancel_reason(),
                    compact_revision = response.compact_revision(),
                    "etcd cancelled the membership watch; reading the membership again"
                );
                return Ok(true);
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let id = self.id_of(kv.key());
                // What the key holds now replaces what it held: nothing valid means no worker.
                let record = match event.event_type() {
                    EventType::Put => parse(&id, kv.value()),
                    EventType::Delete => None,
                };
                match record {
                    Some(record) => members.insert(id, record),
                    None => members.remove(&id),
                };
            }
            if tx.send(members.clone()).is_err() {
                return Ok(false);
            }
        }
    }
}

/// The record under the key of worker `id`, if it is a valid record of that worker.
fn parse(id: &str, value: &[u8]) -> Option<WorkerRecord> {
    match serde_json::from_slice::<WorkerRecord>(value) {
        Ok(record) if record.id != id => {
            tracing::warn!(
                key = id,
                record = record.id,
                "ignoring a worker record stored under another worker's key"
            );
            None
        }
        Ok(record) if validate(&record).is_ok() => Some(record),
        _ => {
            tracing::warn!(key = id, "ignoring an invalid worker record in etcd");
            None
        }
    }
}

/// What a worker finds under its own key at a lease refresh.
enum OwnKey {
    Ours,
    /// No record, or ours under a lease this worker no longer keeps alive (a put that timed
    /// out but was applied during a re-registration): either way it must be written again
    /// under the live lease, or it disappears.
    Gone,
    Another,
}

/// Checks that `key` still holds `value`, under `lease`.
async fn own_key(
    client: &mut Client,
    key: &str,
    value: &[u8],
    lease: i64,
) -> Result<OwnKey, etcd_client::Error> {
    let response = client.get(key, None).await?;
    Ok(match response.kvs().first() {
        None => OwnKey::Gone,
        Some(kv) if kv.value() == value && kv.lease() == lease => OwnKey::Ours,
        Some(kv) if kv.value() == value => OwnKey::Gone,
        Some(_) => OwnKey::Another,
    })
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    async fn register(&self, record: WorkerRecord) -> Result<Registration, RegistryError> {
        validate(&record)?;
        let key = self.key(&record.id);
        let value = serde_json::to_vec(&record)
            .map_err(|e| RegistryError::InvalidRecord(record.id.clone(), e.to_string()))?;
        let mut client = self.client.clone();
        let ttl = self.ttl;
        let lease = Self::put_with_lease(&mut client, &key, &value, ttl)
            .await
            .map_err(backend)?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        // Keeps the lease alive; if it was lost (etcd restarted, a long pause), registers again.
        let keeper = {
            let mut client = client.clone();
            let key = key.clone();
            tokio::spawn(async move {
                let mut lease = lease;
                loop {
                    let alive = async {
                        let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
                        let mut duplicate_reported = false;
                        loop {
                            // Keep-alives every ttl/3 whatever the checks below cost: they
                            // share a budget of ttl/4 and the round ends at its start + ttl/3.
                            let round = tokio::time::Instant::now();
                            let budget = round + ttl / 4;
                            keeper.keep_alive().await?;
                            match responses.message().await? {
                                Some(r) if r.ttl() > 0 => {}
                                _ => return Ok::<(), etcd_client::Error>(()),
                            }
                            // Bounded, so that a slow read (an etcd leader election) never
                            // delays the next keep-alive past the lease's expiry; the check
                            // is simply skipped this round.
                            let check = tokio::time::timeout_at(
                                budget,
                                own_key(&mut client, &key, &value, lease),
                            );
                            match check.await.unwrap_or(Ok(OwnKey::Ours))? {
                                OwnKey::Ours => {}
                                // Deleted by hand (etcdctl del) while the lease lives: without
                                // this the worker would stay out of every router's table.
                                OwnKey::Gone => {
                                    tracing::warn!(
                                        "this worker's etcd record was deleted (or is under a \
                                         lost lease); writing it again"
                                    );
                                    let options = PutOptions::new().with_lease(lease);
                                    let put =
                                        client.put(key.as_str(), value.as_slice(), Some(options));
                                    match tokio::time::timeout_at(budget, put).await {
                                        Ok(written) => {
                                            written?;
                                        }
                                        Err(_) => {
                                            tracing::warn!("rewriting the etcd record timed out")
                                        }
                                    }
                                }
                                // Overwriting it back would make two workers flap; say it once.
                                OwnKey::Another if !duplicate_reported => {
                                    duplicate_reported = true;
                                    tracing::error!(
                                        key,
                                        "another record took this worker's etcd key: two workers \
                                         share one worker_id, and routers see only one of them"
                                    );
                                }
                                OwnKey::Another => {}
                            }
                            tokio::time::sleep_until(round + ttl / 3).await;
                        }
                    };
                    tokio::select! {
                        _ = &mut stopped => return lease,
                        result = alive => {
                            if let Err(e) = result {
                                tracing::warn!("etcd lease keep-alive failed: {e}");
                            }
                        }
                    }
                    tokio::time::sleep(RETRY).await;
                    match Self::put_with_lease(&mut client, &key, &value, ttl).await {
                        Ok(new) => {
                            tracing::info!("re-registered in etcd with a new lease");
                            lease = new;
                        }
                        Err(e) => tracing::warn!("etcd re-registration failed: {e}"),
                    }
                }
            })
        };
        Ok(Registration::new(move || {
            Box::pin(async move {
                let _ = stop.send(());
                let lease = keeper.await.unwrap_or(lease);
                // Revoking the lease deletes the key with it.
                if let Err(e) = client.lease_revoke(lease).await {
                    tracing::warn!(
                        "etcd deregistration failed ({e}); the record expires with its lease"
                    );
                    let _ = client.delete(key, None).await;
                }
            })
        }))
    }

    async fn watch(&self) -> Result<watch::Receiver<Membership>, RegistryError> {
        let mut client = self.client.clone();
        let (members, revision) = self.read_all(&mut client).await?;
        let (tx, rx) = watch::channel(members.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let (mut members, mut revision) = (members, revision);
            loop {
                match me.follow(&mut client, members, revision, &tx).await {
                    Ok(false) => return,
                    Ok(true) => {}
                    Err(e) => tracing::warn!("etcd watch broke: {e}; re-reading"),
                }
                loop {
                    if tx.is_closed() {
                        return;
                    }
                    tokio::time::sleep(RETRY).await;
                    if let Ok(fresh) = me.read_all(&mut client).await {
                        (members, revision) = fresh;
                        if tx.send(members.clone()).is_err() {
                            return;
                        }
                        break;
                    }
                }
            }
        });
        Ok(rx)
    }
}
