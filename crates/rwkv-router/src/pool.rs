//! The router's view of the workers: membership, health, load, and picking one per request.
//!
//! Each worker gets at most `slots × overcommit` requests from this router at a time
//! ([`PoolConfig::overcommit`], 2 by default): its batch stays full, and a short queue inside the
//! worker lets its engine preempt long generations for new requests. Everything beyond waits
//! here, in a bounded, per-tenant fair queue (full: [`PoolError::QueueFull`], a 429). A request goes to the worker that holds the longest
//! cached prefix of its tokens ([`crate::affinity`]) unless that worker is full, else to the least
//! loaded one. A worker that fails `breaker_failures` times in a row is skipped for
//! `breaker_cooldown` (circuit breaker); one that leaves the registry leaves the table at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rwkv_cluster::{Membership, Registry, WorkerRecord};
use rwkv_proto::auth::{ClientAuth, WorkerToken};
use rwkv_proto::wv1::{self, worker_client::WorkerClient};
use tokio::sync::Notify;
use tokio::time::Instant;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::affinity::Affinity;
use crate::fair::{FairQueue, Ticket};
use crate::telemetry;

/// Tuning of the pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Requests allowed to wait for a worker; beyond it, new requests get a 429.
    pub max_queue: usize,
    /// Failures in a row that open a worker's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker keeps a worker out.
    pub breaker_cooldown: Duration,
    /// How often each worker's load is polled (also its health check).
    pub poll_interval: Duration,
    /// Largest message accepted from a worker.
    pub max_message_bytes: usize,
    /// How to verify workers that advertise `https://` addresses (their CA); without it such
    /// workers are skipped with a warning.
    pub worker_tls: Option<tonic::transport::ClientTlsConfig>,
    /// The cluster's worker token, sent with every call to a worker (workers started with a
    /// token refuse calls without it).
    pub worker_token: Option<WorkerToken>,
    /// Requests in flight per worker, as a multiple of its state slots. At 1 a worker only
    /// gets what it can run at once and everything else waits here, in the tenants' fair
    /// queue; above 1 each worker also keeps a queue of its own, which its engine serves by
    /// preempting long generations (`preempt_after_steps`), so short requests are not stuck
    /// behind long ones that hold every slot.
    pub overcommit: f64,
    /// HTTP/2 pings to each worker this often (each answered within half of it, or the
    /// connection and its streams fail and fail over): a worker that vanished without closing
    /// its connections (a host that lost power) is noticed within seconds.
    pub worker_keepalive: Duration,
}

/// Default of [`PoolConfig::overcommit`].
pub const DEFAULT_OVERCOMMIT: f64 = 2.0;

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            max_queue: 256,
            breaker_failures: 3,
            breaker_cooldown: Duration::from_secs(5),
            poll_interval: Duration::from_millis(500),
            max_message_bytes: 256 << 20,
            worker_tls: None,
            worker_token: None,
            overcommit: DEFAULT_OVERCOMMIT,
            worker_keepalive: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("no worker serves model `{0}`")]
    NoWorker(String),
    #[error("all workers are busy and {0} requests are already queued; retry later")]
    QueueFull(usize),
    #[error("no worker became free within the request timeout")]
    Timeout,
}

/// One worker: its record, a gRPC client, and the router's bookkeeping.
#[derive(Debug)]
pub struct WorkerEntry {
    pub record: WorkerRecord,
    pub client: WorkerClient<InterceptedService<Channel, ClientAuth>>,
    /// Filled by the first successful `Info` call; the worker gets no traffic before that.
    info: RwLock<Option<wv1::WorkerInfo>>,
    /// Requests this router has in flight on the worker.
    assigned: AtomicUsize,
    /// Requests it may have in flight there: its slots times the overcommit.
    capacity: usize,
    /// Sessions the worker holds (all tenants, all routers): its last load report, with the
    /// value of `placed` when that report was asked for. Together with the sessions this
    /// router placed there since, a burst of creations between two reports spreads instead
    /// of piling onto the worker that looked emptiest.
    reported_sessions: Mutex<(usize, usize)>,
    /// Sessions this router has placed on the worker, ever.
    placed: AtomicUsize,
    failures: AtomicU32,
    /// Breaker open until this instant.
    open_until: Mutex<Option<Instant>>,
    /// False while draining or after its last health check failed.
    healthy: AtomicBool,
    /// Set when the worker left the registry; its poller stops.
    gone: AtomicBool,
}

impl WorkerEntry {
    pub fn info(&self) -> Option<wv1::WorkerInfo> {
        self.info.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::SeqCst)
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sessions held there, as far as this router knows: the last report, plus what this
    /// router placed after that report was asked for (a placement the report already counts
    /// may count twice until the next one).
    pub fn sessions(&self) -> usize {
        let (reported, base) = *self
            .reported_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        reported + self.placed.load(Ordering::SeqCst).saturating_sub(base)
    }

    /// Counts a session this router just placed there.
    pub fn session_placed(&self) {
        self.placed.fetch_add(1, Ordering::SeqCst);
    }

    /// Healthy, known, breaker closed.
    pub fn is_available(&self) -> bool {
        if !self.healthy.load(Ordering::SeqCst) || self.gone.load(Ordering::SeqCst) {
            return false;
        }
        let open = self.open_until.lock().unwrap_or_else(|e| e.into_inner());
        open.is_none_or(|until| Instant::now() >= until)
    }
}

/// Shared by every request handler; cheap to clone.
#[derive(Clone, Debug)]
pub struct WorkerPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cfg: PoolConfig,
    workers: RwLock<BTreeMap<String, Arc<WorkerEntry>>>,
    /// Woken whenever capacity may have appeared (a lease ended, a worker became healthy).
    freed: Notify,
    queued: AtomicUsize,
    affinity: Mutex<Affinity>,
    /// Waiting requests per model, in weighted-fair order across tenants.
    fair: Mutex<HashMap<String, FairQueue>>,
}

/// Who is asking, for fair ordering among the requests that wait.
#[derive(Clone, Debug)]
pub struct Requester<'a> {
    pub tenant: &'a str,
    /// Share of the service while tenants compete (>= 1).
    pub weight: u32,
}

/// A request's claim on one worker; dropping it gives the capacity back.
#[derive(Debug)]
pub struct Lease {
    pool: WorkerPool,
    pub worker: Arc<WorkerEntry>,
    /// Capacity it holds: one per sequence the request runs on the worker.
    units: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.worker.assigned.fetch_sub(self.units, Ordering::SeqCst);
        self.pool.inner.freed.notify_waiters();
    }
}

/// A request's place in the queue; leaving (served, timed out or gone) updates the counts.
struct QueueTicket<'a> {
    pool: &'a WorkerPool,
    model: &'a str,
    ticket: Ticket,
    served: bool,
}

impl Drop for QueueTicket<'_> {
    fn drop(&mut self) {
        self.pool.inner.queued.fetch_sub(1, Ordering::SeqCst);
        let mut fair = self.pool.lock_fair();
        if let Some(q) = fair.get_mut(self.model) {
            if self.served {
                q.served(self.ticket);
            } else {
                q.leave(self.ticket);
            }
            if q.is_empty() {
                fair.remove(self.model);
            }
        }
        drop(fair);
        // The next in line may be able to go now.
        self.pool.inner.freed.notify_waiters();
    }
}

impl WorkerPool {
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                workers: RwLock::new(BTreeMap::new()),
                freed: Notify::new(),
                queued: AtomicUsize::new(0),
                affinity: Mutex::new(Affinity::new(1 << 16)),
                fair: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Follows `registry` for as long as the returned task runs.
    pub async fn follow(
        &self,
        registry: &dyn Registry,
    ) -> Result<tokio::task::JoinHandle<()>, rwkv_cluster::RegistryError> {
        let mut watch = registry.watch().await?;
        let pool = self.clone();
        pool.sync(&watch.borrow_and_update().clone());
        Ok(tokio::spawn(async move {
            while watch.changed().await.is_ok() {
                let members = watch.borrow_and_update().clone();
                pool.sync(&members);
            }
        }))
    }

    /// Makes the table match `members`: new workers get a client and a poller, missing ones go.
    pub fn sync(&self, members: &Membership) {
        let mut workers = self
            .inner
            .workers
            .write()
            .unwrap_or_else(|e| e.into_inner());
        workers.retain(|id, entry| {
            let keep = members.get(id) == Some(&entry.record);
            if !keep {
                entry.gone.store(true, Ordering::SeqCst);
                tracing::info!(worker = id, "worker left the routing table");
            }
            keep
        });
        for (id, record) in members {
            if workers.contains_key(id) {
                continue;
            }
            let channel = match self.endpoint(&record.address) {
                // Pings find a worker that vanished without closing the connection (a host
                // that lost power): its streams fail within seconds and fail over, instead of
                // waiting out the request timeout.
                Ok(endpoint) => endpoint
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true)
                    .tcp_keepalive(Some(Duration::from_secs(30)))
                    .http2_keep_alive_interval(self.inner.cfg.worker_keepalive)
                    .keep_alive_timeout(self.inner.cfg.worker_keepalive / 2)
                    .keep_alive_while_idle(true)
                    .connect_lazy(),
                Err(e) => {
                    tracing::warn!(worker = id, address = record.address, "skipped: {e}");
                    continue;
                }
            };
            let max = self.inner.cfg.max_message_bytes;
            let auth = ClientAuth::new(self.inner.cfg.worker_token.clone());
            let entry = Arc::new(WorkerEntry {
                record: record.clone(),
                client: WorkerClient::with_interceptor(channel, auth)
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
                info: RwLock::new(None),
                assigned: AtomicUsize::new(0),
                capacity: capacity(record.slots, self.inner.cfg.overcommit),
                reported_sessions: Mutex::new((0, 0)),
                placed: AtomicUsize::new(0),
                failures: AtomicU32::new(0),
                open_until: Mutex::new(None),
                healthy: AtomicBool::new(false),
                gone: AtomicBool::new(false),
            });
            tracing::info!(worker = id, address = record.address, "worker joined");
            tokio::spawn(poll(self.clone(), entry.clone()));
            workers.insert(id.clone(), entry);
        }
        metrics::gauge!(telemetry::WORKERS).set(workers.len() as f64);
    }

    /// The endpoint for a worker's address: TLS (verified with the configured CA) for
    /// `https://`, plaintext HTTP/2 for `http://`.
    fn endpoint(&self, address: &str) -> Result<tonic::transport::Endpoint, String> {
        let endpoint = Channel::from_shared(address.to_owned()).map_err(|e| e.to_string())?;
        if !address.starts_with("https://") {
            return Ok(endpoint);
        }
        let tls = self.inner.cfg.worker_tls.clone().ok_or(
            "the worker's address is https:// but no worker CA is configured (--worker-ca)",
        )?;
        endpoint.tls_config(tls).map_err(|e| e.to_string())
    }

    pub fn workers(&self) -> Vec<Arc<WorkerEntry>> {
        let workers = self.inner.workers.read().unwrap_or_else(|e| e.into_inner());
        workers.values().cloned().collect()
    }

    /// Models served by at least one available worker.
    pub fn models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .workers()
            .iter()
            .filter(|w| w.is_available())
            .map(|w| w.record.model.clone())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// At least one worker can take requests.
    pub fn is_ready(&self) -> bool {
        self.workers().iter().any(|w| w.is_available())
    }

    /// Requests waiting for a worker now.
    pub fn queued(&self) -> usize {
        self.inner.queued.load(Ordering::SeqCst)
    }

    /// Waits for a worker of `model` with free capacity, preferring the holder of the longest
    /// cached prefix of `tokens`, skipping `exclude` (workers that already failed this request).
    /// Requests that must wait are served in weighted-fair order across tenants.
    pub async fn acquire(
        &self,
        model: &str,
        who: &Requester<'_>,
        tokens: &[u32],
        exclude: &[String],
        deadline: Instant,
    ) -> Result<Lease, PoolError> {
        self.acquire_units(model, who, tokens, exclude, deadline, 1)
            .await
    }

    /// Like [`WorkerPool::acquire`], for a request that runs `units` sequences on one worker
    /// (the choices of `n > 1`): it waits until the worker has that much room (or is idle, if
    /// `units` exceeds its whole capacity).
    pub async fn acquire_units(
        &self,
        model: &str,
        who: &Requester<'_>,
        tokens: &[u32],
        exclude: &[String],
        deadline: Instant,
        units: usize,
    ) -> Result<Lease, PoolError> {
        let preferred = self.lock_affinity().longest(tokens);
        let units = units.max(1);
        self.acquire_where(model, who, preferred.as_deref(), deadline, units, &|w| {
            !exclude.contains(&w.record.id)
        })
        .await
    }

    /// Waits for capacity on one particular worker (the holder of a session), in the same fair
    /// queue as every other request for `model`. Fails with [`PoolError::NoWorker`] when that
    /// worker is not in the pool.
    pub async fn acquire_on(
        &self,
        model: &str,
        who: &Requester<'_>,
        worker: &str,
        deadline: Instant,
    ) -> Result<Lease, PoolError> {
        self.acquire_where(model, who, None, deadline, 1, &|w| w.record.id == worker)
            .await
    }

    /// Where new sessions of `model` go, best first: the available workers holding the fewest
    /// sessions, ties broken by the most room (fraction of capacity in use). A session stays
    /// on its worker for life: its state takes that worker's host memory, each of its turns
    /// runs there, and each worker caps how many it holds (`max_sessions`). Spreading them by
    /// count evens all three out, where ranking by the moment's traffic would pile a burst
    /// of new sessions onto whichever worker happened to be idle.
    pub fn for_new_sessions(&self, model: &str) -> Vec<Arc<WorkerEntry>> {
        let workers = self.inner.workers.read().unwrap_or_else(|e| e.into_inner());
        // Each worker's counts read once: they change under concurrent requests, and a sort
        // whose order changes while it runs may panic.
        let mut available: Vec<(usize, usize, usize, Arc<WorkerEntry>)> = workers
            .values()
            .filter(|w| w.record.model == model && w.is_available())
            .map(|w| (w.sessions(), w.assigned(), w.capacity(), w.clone()))
            .collect();
        available.sort_by(|(a_s, a_in, a_cap, _), (b_s, b_in, b_cap, _)| {
            a_s.cmp(b_s).then((a_in * b_cap).cmp(&(b_in * a_cap)))
        });
        available.into_iter().map(|(_, _, _, w)| w).collect()
    }

    /// The worker with this id, if it is in the pool.
    pub fn worker(&self, id: &str) -> Option<Arc<WorkerEntry>> {
        let workers = self.inner.workers.read().unwrap_or_else(|e| e.into_inner());
        workers.get(id).cloned()
    }

    async fn acquire_where(
        &self,
        model: &str,
        who: &Requester<'_>,
        preferred: Option<&str>,
        deadline: Instant,
        units: usize,
        eligible: &(dyn Fn(&WorkerEntry) -> bool + Sync),
    ) -> Result<Lease, PoolError> {
        let mut ticket: Option<QueueTicket<'_>> = None;
        loop {
            let notified = self.inner.freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Only the first in line may take capacity while others wait for this model.
            let my_turn = match &ticket {
                Some(t) => self
                    .lock_fair()
                    .get(model)
                    .is_none_or(|q| q.is_first(t.ticket)),
                None => self.lock_fair().get(model).is_none_or(FairQueue::is_empty),
            };
            if my_turn {
                match self.try_pick(model, preferred, units, eligible) {
                    Pick::Leased(lease) => {
                        if let Some(t) = ticket.as_mut() {
                            t.served = true;
                        }
                        return Ok(lease);
                    }
                    Pick::NoWorker => return Err(PoolError::NoWorker(model.to_owned())),
                    Pick::Busy => {}
                }
            }
            if ticket.is_none() {
                let queued = self.inner.queued.fetch_add(1, Ordering::SeqCst);
                let place = self
                    .lock_fair()
                    .entry(model.to_owned())
                    .or_default()
                    .push(who.tenant, who.weight);
                ticket = Some(QueueTicket {
                    pool: self,
                    model,
                    ticket: place,
                    served: false,
                });
                if queued >= self.inner.cfg.max_queue {
                    metrics::counter!(telemetry::REJECTED, "reason" => "queue_full").increment(1);
                    return Err(PoolError::QueueFull(queued));
                }
                metrics::gauge!(telemetry::QUEUED).set((queued + 1) as f64);
                // Now in line: check again at once, it may be this request's turn already.
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                metrics::counter!(telemetry::REJECTED, "reason" => "queue_timeout").increment(1);
                return Err(PoolError::Timeout);
            }
        }
    }

    fn try_pick(
        &self,
        model: &str,
        preferred: Option<&str>,
        units: usize,
        eligible: &(dyn Fn(&WorkerEntry) -> bool + Sync),
    ) -> Pick {
        let workers = self.inner.workers.read().unwrap_or_else(|e| e.into_inner());
        let mut serving = workers
            .values()
            .filter(|w| w.record.model == model && eligible(w))
            .filter(|w| w.is_available())
            .peekable();
        if serving.peek().is_none() {
            // Workers that exist but are briefly unavailable (breaker, first health check) are
            // worth waiting for; a model nobody serves is not.
            let any = workers
                .values()
                .any(|w| w.record.model == model && eligible(w));
            return if any { Pick::Busy } else { Pick::NoWorker };
        }
        // A request larger than a worker fits once that worker is idle.
        let with_room: Vec<&Arc<WorkerEntry>> = serving
            .filter(|w| w.assigned() + units.min(w.capacity()) <= w.capacity())
            .collect();
        let chosen = preferred
            .and_then(|id| with_room.iter().find(|w| w.record.id == id))
            .or_else(|| {
                with_room.iter().min_by(|a, b| {
                    // Least loaded by fraction of capacity in use.
                    (a.assigned() * b.capacity()).cmp(&(b.assigned() * a.capacity()))
                })
            });
        match chosen {
            Some(w) => {
                w.assigned.fetch_add(units, Ordering::SeqCst);
                Pick::Leased(Lease {
                    pool: self.clone(),
                    worker: Arc::clone(w),
                    units,
                })
            }
            None => Pick::Busy,
        }
    }

    /// Remembers that `worker` now holds the state after `tokens` in its prefix cache.
    pub fn remember_prefix(&self, tokens: &[u32], worker: &str) {
        self.lock_affinity().insert(tokens, worker);
    }

    fn lock_fair(&self) -> std::sync::MutexGuard<'_, HashMap<String, FairQueue>> {
        self.inner.fair.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_affinity(&self) -> std::sync::MutexGuard<'_, Affinity> {
        self.inner
            .affinity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A call to `worker` failed in a way that says the worker (not the request) is at fault.
    pub fn record_failure(&self, worker: &WorkerEntry) {
        let failures = worker.failures.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::counter!(telemetry::WORKER_FAILURES, "worker" => worker.record.id.clone())
            .increment(1);
        if failures >= self.inner.cfg.breaker_failures {
            let until = Instant::now() + self.inner.cfg.breaker_cooldown;
            *worker.open_until.lock().unwrap_or_else(|e| e.into_inner()) = Some(until);
            tracing::warn!(worker = worker.record.id, failures, "circuit breaker open");
        }
    }

    pub fn record_success(&self, worker: &WorkerEntry) {
        worker.failures.store(0, Ordering::SeqCst);
    }

    /// A request leaves `worker` for another after `status`: an overloaded worker is busy, not
    /// failing, so only other faults feed its circuit breaker.
    pub fn record_failover(&self, worker: &WorkerEntry, status: &tonic::Status) {
        if status.code() != tonic::Code::ResourceExhausted {
            self.record_failure(worker);
        }
        metrics::counter!(telemetry::FAILOVERS).increment(1);
    }
}

/// Requests a worker with `slots` slots may have in flight: at least its slots (an overcommit
/// below 1, or not a number, counts as 1).
fn capacity(slots: u32, overcommit: f64) -> usize {
    let slots = slots.max(1) as usize;
    let scaled = (slots as f64 * overcommit.max(1.0)).ceil();
    if scaled.is_finite() && scaled < u32::MAX as f64 {
        (scaled as usize).max(slots)
    } else {
        slots
    }
}

/// Whether a worker's answer says the worker (not the request) is at fault, so another worker
/// may succeed: it is down, overloaded, or failed internally.
pub fn is_worker_fault(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Aborted
            | Code::Cancelled
            | Code::ResourceExhausted
            | Code::Internal
    )
}

enum Pick {
    Leased(Lease),
    Busy,
    NoWorker,
}

/// Polls one worker until it leaves: `Info` until it answers, then `Load` as a health check.
async fn poll(pool: WorkerPool, worker: Arc<WorkerEntry>) {
    let interval = pool.inner.cfg.poll_interval;
    // A token mismatch does not mend itself: say so once, at error level, not every poll.
    let mut refusal_reported = false;
    let mut report_refusal = |status: &tonic::Status| {
        if status.code() == tonic::Code::Unauthenticated && !refusal_reported {
            refusal_reported = true;
            tracing::error!(
                worker = worker.record.id,
                "the worker refuses this router's calls: give the router the workers' \
                 worker_token_file ({})",
                status.message()
            );
        }
    };
    while !worker.gone.load(Ordering::SeqCst) {
        let mut client = worker.client.clone();
        let healthy = if worker.info().is_none() {
            match tokio::time::timeout(interval * 4, client.info(wv1::InfoRequest {})).await {
                Ok(Ok(info)) => {
                    let info = info.into_inner();
                    if info.model_id != worker.record.model {
                        tracing::error!(
                            worker = worker.record.id,
                            registered = worker.record.model,
                            serves = info.model_id,
                            "worker serves a different model than it registered; ignoring it"
                        );
                        false
                    } else {
                        *worker.info.write().unwrap_or_else(|e| e.into_inner()) = Some(info);
                        true
                    }
                }
                Ok(Err(status)) => {
                    report_refusal(&status);
                    false
                }
                Err(_) => false,
            }
        } else {
            let placed_before = worker.placed.load(Ordering::SeqCst);
            match tokio::time::timeout(interval * 4, client.load(wv1::LoadRequest {})).await {
                Ok(Ok(load)) => {
                    let load = load.into_inner();
                    *worker
                        .reported_sessions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) =
                        (load.sessions as usize, placed_before);
                    !load.draining
                }
                Ok(Err(status)) => {
                    report_refusal(&status);
                    false
                }
                Err(_) => false,
            }
        };
        let was = worker.healthy.swap(healthy, Ordering::SeqCst);
        if healthy != was {
            tracing::info!(worker = worker.record.id, healthy, "worker health changed");
            if healthy {
                pool.record_success(&worker);
                pool.inner.freed.notify_waiters();
            } else {
                pool.record_failure(&worker);
            }
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::capacity;

    #[test]
    fn capacity_is_the_slots_times_the_overcommit_and_never_below_the_slots() {
        assert_eq!(capacity(4, 2.0), 8);
        assert_eq!(capacity(3, 1.5), 5);
        assert_eq!(capacity(4, 1.0), 4);
        assert_eq!(capacity(4, 0.5), 4);
        assert_eq!(capacity(4, f64::NAN), 4);
        assert_eq!(capacity(4, f64::INFINITY), 4);
        assert_eq!(capacity(0, 2.0), 2);
    }
}
