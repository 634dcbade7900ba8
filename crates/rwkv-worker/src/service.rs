//! [`WorkerService`]: the `rwkv.worker.v1.Worker` implementation, and [`serve`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rwkv_engine::{EngineHandle, GenerateStream};
use rwkv_proto::auth::{ServerAuth, WorkerToken};
use rwkv_proto::wv1::{self, worker_server::Worker};
use rwkv_proto::{count_u32, FieldError, TraceContext};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert::{self, status_of};
use crate::telemetry;

/// What a worker tells about itself in `Info`, besides what the engine knows.
#[derive(Clone, Debug)]
pub struct WorkerIdentity {
    pub worker_id: String,
    pub model_id: String,
    pub model_hash: [u8; 32],
    /// Backend name (`cpu`, `cuda`, ...), for operators.
    pub backend: String,
    pub slots: usize,
    pub max_batch_size: usize,
    pub max_waiting: usize,
}

/// The gRPC face of one engine. Cheap to clone; clones share the drain flag.
#[derive(Clone, Debug)]
pub struct WorkerService {
    engine: EngineHandle,
    identity: Arc<WorkerIdentity>,
    draining: Arc<AtomicBool>,
    /// Calls that carry none of these tokens are refused (none: every call is taken; see
    /// [`WorkerService::require_tokens`]).
    tokens: Vec<WorkerToken>,
}

/// Events buffered per stream before the bridge waits for the client (back-pressure).
const STREAM_BUFFER: usize = 64;

impl WorkerService {
    pub fn new(engine: EngineHandle, identity: WorkerIdentity) -> Self {
        Self {
            engine,
            identity: Arc::new(identity),
            draining: Arc::new(AtomicBool::new(false)),
            tokens: Vec::new(),
        }
    }

    /// Served with [`serve`] or [`serve_tls`], every call must then carry `token` (routers send
    /// it when given the same token); others are refused with UNAUTHENTICATED.
    pub fn require_token(self, token: WorkerToken) -> Self {
        self.require_tokens(vec![token])
    }

    /// Like [`WorkerService::require_token`], taking any of `tokens` (the old and the new one
    /// while the cluster's token is rotated).
    pub fn require_tokens(mut self, tokens: Vec<WorkerToken>) -> Self {
        self.tokens = tokens;
        self
    }

    /// True once `Drain` was called: new generations are refused with UNAVAILABLE.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stops admitting work (what a `Drain` call does first).
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        metrics::gauge!(telemetry::DRAINING).set(1.0);
    }

    fn refuse_if_draining(&self) -> Result<(), Status> {
        if self.is_draining() {
            return Err(Status::unavailable(
                "the worker is draining and accepts no new work",
            ));
        }
        Ok(())
    }

    /// Runs a blocking engine call (the engine answers between two steps) off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        rpc: &'static str,
        call: impl FnOnce(EngineHandle) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let engine = self.engine.clone();
        let result = tokio::task::spawn_blocking(move || call(engine))
            .await
            .map_err(|e| Status::internal(format!("worker task failed: {e}")))
            .and_then(|r| r);
        telemetry::rpc_done(
            rpc,
            result
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
        );
        result.map(Response::new)
    }

    /// Stops admitting work and waits until the work in flight has finished or `timeout` has
    /// passed; returns the load then (nonzero `running`/`waiting` if the timeout won).
    pub async fn drain_for(&self, timeout: Duration) -> Result<wv1::WorkerLoad, Status> {
        self.start_drain();
        tracing::info!(?timeout, "draining");
        // A timeout too large for the clock (a client's u64::MAX) is no timeout.
        let deadline = Instant::now().checked_add(timeout);
        let mut last = None;
        loop {
            // The engine answers between steps, so each reading may take a step's time; a
            // stuck engine (a hung device) must not hold the drain past its deadline, but even
            // a drain whose time is up gets one reading (within a second) to report.
            let wait = match (deadline, &last) {
                (Some(d), Some(_)) => Some(d),
                (Some(d), None) => Some(d.max(Instant::now() + FIRST_READING)),
                (None, _) => None,
            };
            let reading = match wait {
                Some(until) => tokio::time::timeout_at(until.into(), self.load_now()).await,
                None => Ok(self.load_now().await),
            };
            let load = match (reading, last) {
                (Ok(load), _) => load?,
                (Err(_), Some(last)) => return Ok(last),
                (Err(_), None) => {
                    return Err(Status::deadline_exceeded(
                        "the engine did not answer before the drain deadline",
                    ))
                }
            };
            let now = Instant::now();
            if (load.running == 0 && load.waiting == 0) || deadline.is_some_and(|d| now >= d) {
                return Ok(load);
            }
            let pause = deadline.map_or(DRAIN_POLL, |d| DRAIN_POLL.min(d - now));
            last = Some(load);
            tokio::time::sleep(pause).await;
        }
    }

    async fn load_now(&self) -> Result<wv1::WorkerLoad, Status> {
        let draining = self.is_draining();
        let stats = self
            .blocking("load", |engine| engine.stats().map_err(|e| status_of(&e)))
            .await?
            .into_inner();
        Ok(convert::load(&stats, draining))
    }
}

/// Records an RPC's outcome once; dropped before that (tonic drops a cancelled call's future
/// rather than polling it to the end), it records the call as cancelled.
struct Unfinished {
    rpc: &'static str,
    recorded: bool,
}

impl Unfinished {
    fn new(rpc: &'static str) -> Self {
        Self {
            rpc,
            recorded: false,
        }
    }

    fn done(&mut self, code: tonic::Code) {
        telemetry::rpc_done(self.rpc, code);
        self.recorded = true;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if !self.recorded {
            telemetry::rpc_done(self.rpc, tonic::Code::Cancelled);
        }
    }
}

/// Forwards one choice's engine events to the gRPC stream, tagged with the choice, until the
/// choice ends or the client goes away: returning drops `stream`, which cancels the choice if
/// it still runs (that is how a disconnected client frees its slot). An async task, not a
/// thread: a worker may stream thousands of choices at once, and a client that reads slowly
/// only parks its task (the engine holds a generation whose events pile up). Returns the status
/// code the choice ended with.
async fn bridge(
    mut stream: GenerateStream,
    choice: u32,
    out: mpsc::Sender<Result<wv1::GenerateEvent, Status>>,
) -> tonic::Code {
    loop {
        let event = tokio::select! {
            event = stream.next() => event,
            // Gone while the choice waits for a slot or between tokens.
            () = out.closed() => {
                tracing::debug!(choice, "client went away; cancelled");
                return tonic::Code::Cancelled;
            }
        };
        let Some(event) = event else {
            let _ = out
                .send(Err(Status::unavailable("the engine stopped")))
                .await;
            return tonic::Code::Unavailable;
        };
        let item = convert::event(event).map(|e| e.for_choice(choice));
        let last = !matches!(&item, Ok(e) if matches!(e.event, Some(wv1::generate_event::Event::Token(_))));
        let code = item.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok);
        if let Err(status) = &item {
            tracing::warn!(choice, "generation failed: {status}");
        }
        if out.send(item).await.is_err() {
            tracing::debug!(choice, "client went away; cancelled");
            return tonic::Code::Cancelled;
        }
        if last {
            tracing::debug!(choice, ?code, "finished");
            return code;
        }
    }
}

/// Bridges every choice of a generation on its own task, and records the call once all have
/// ended: with the first failure, if any.
fn bridge_choices(
    streams: Vec<GenerateStream>,
    out: mpsc::Sender<Result<wv1::GenerateEvent, Status>>,
    span: tracing::Span,
) {
    let bridges: Vec<_> = (0..)
        .zip(streams)
        .map(|(choice, stream)| {
            let out = out.clone();
            tokio::spawn(bridge(stream, choice, out).instrument(span.clone()))
        })
        .collect();
    drop(out);
    tokio::spawn(async move {
        let mut code = tonic::Code::Ok;
        for bridge in bridges {
            let ended = bridge.await.unwrap_or(tonic::Code::Internal);
            if code == tonic::Code::Ok {
                code = ended;
            }
        }
        telemetry::rpc_done("generate", code);
    });
}

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = ReceiverStream<Result<wv1::GenerateEvent, Status>>;

    async fn generate(
        &self,
        request: Request<wv1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.refuse_if_draining()?;
        // The router's trace: this call's log lines carry its id.
        let trace = TraceContext::extract(&request);
        let req = request.into_inner();
        let request_id = req.request_id.clone();
        let span = tracing::info_span!(
            "generate",
            request_id,
            trace_id = trace.map(|t| t.trace_id_hex())
        );
        let _entered = span.enter();
        let n = req.n.max(1) as usize;
        let req = convert::generate_request(req).inspect_err(|s| {
            tracing::debug!("refused: {s}");
            telemetry::rpc_done("generate", s.code());
        })?;
        tracing::debug!(
            tokens = req.tokens.len(),
            session = req.session,
            n,
            "started"
        );
        // Submitting only queues a command; it does not wait for the engine.
        let streams = self.engine.generate_n(req, n).map_err(|e| {
            let status = status_of(&e);
            telemetry::rpc_done("generate", status.code());
            status
        })?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        bridge_choices(streams, tx, span.clone());
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn score(
        &self,
        request: Request<wv1::ScoreRequest>,
    ) -> Result<Response<wv1::ScoreResponse>, Status> {
        self.refuse_if_draining()?;
        let trace = TraceContext::extract(&request);
        let req = request.into_inner();
        tracing::debug!(
            request_id = req.request_id,
            trace_id = trace.map(|t| t.trace_id_hex()),
            continuations = req.continuations.len(),
            "score"
        );
        let req = convert::score_request(req)?;
        // tonic drops this future when the client goes away: that drops `pending`, which
        // cancels the request in the engine, and the guard records the call as cancelled.
        let mut call = Unfinished::new("score");
        let pending = self.engine.submit_score(req).map_err(|e| status_of(&e));
        let result = match pending {
            Ok(pending) => pending
                .result()
                .await
                .map(convert::score_response)
                .map_err(|e| status_of(&e)),
            Err(status) => Err(status),
        };
        call.done(
            result
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
        );
        result.map(Response::new)
    }

    async fn create_session(
        &self,
        request: Request<wv1::CreateSessionRequest>,
    ) -> Result<Response<wv1::SessionRef>, Status> {
        self.refuse_if_draining()?;
        let r = request.into_inner();
        let tenant = convert::tenant(r.tenant)?;
        self.blocking("create_session", move |engine| {
            let session = engine
                .create_session_with(&tenant, r.tokens)
                .map_err(|e| status_of(&e))?;
            Ok(wv1::SessionRef { tenant, session })
        })
        .await
    }

    async fn get_session(
        &self,
        request: Request<wv1::SessionRef>,
    ) -> Result<Response<wv1::SessionInfo>, Status> {
        let r = request.into_inner();
        let tenant = convert::tenant(r.tenant)?;
        self.blocking("get_session", move |engine| {
            let info = engine
                .session_info(&tenant, r.session)
                .map_err(|e| status_of(&e))?;
            Ok(convert::session_info(info))
        })
        .await
    }

    async fn list_sessions(
        &self,
        request: Request<wv1::ListSessionsRequest>,
    ) -> Result<Response<wv1::SessionList>, Status> {
        let tenant = convert::tenant(request.into_inner().tenant)?;
        self.blocking("list_sessions", move |engine| {
            let list = engine.list_sessions(&tenant).map_err(|e| status_of(&e))?;
            Ok(wv1::SessionList {
                sessions: list.into_iter().map(convert::session_info).collect(),
            })
        })
        .await
    }

    async fn rewind_session(
        &self,
        request: Request<wv1::RewindSessionRequest>,
    ) -> Result<Response<wv1::SessionInfo>, Status> {
        let r = request.into_inner();
        let tenant = convert::tenant(r.tenant)?;
        self.blocking("rewind_session", move |engine| {
            let info = engine
                .rewind_session(&tenant, r.session, r.turn as usize)
                .map_err(|e| status_of(&e))?;
            Ok(convert::session_info(info))
        })
        .await
    }

    async fn fork_session(
        &self,
        request: Request<wv1::SessionRef>,
    ) -> Result<Response<wv1::SessionRef>, Status> {
        self.refuse_if_draining()?;
        let r = request.into_inner();
        let tenant = convert::tenant(r.tenant)?;
        self.blocking("fork_session", move |engine| {
            let session = engine
                .fork_session(&tenant, r.session)
                .map_err(|e| status_of(&e))?;
            Ok(wv1::SessionRef { tenant, session })
        })
        .await
    }

    async fn delete_session(
        &self,
        request: Request<wv1::SessionRef>,
    ) -> Result<Response<wv1::DeleteSessionResponse>, Status> {
        let r = request.into_inner();
        let tenant = convert::tenant(r.tenant)?;
        self.blocking("delete_session", move |engine| {
            engine
                .delete_session(&tenant, r.session)
                .map_err(|e| status_of(&e))?;
            Ok(wv1::DeleteSessionResponse {})
        })
        .await
    }

    async fn export_session(
        &self,
        request: Request<wv1::SessionRef>,
    ) -> Result<Response<wv1::SessionExport>, Status> {
        let r = request.into_inner();
        let tenant = convert::tenant(r.tenant)?;
        self.blocking("export_session", move |engine| {
            let data = engine
                .export_session(&tenant, r.session)
                .map_err(|e| status_of(&e))?;
            Ok(wv1::SessionExport { data })
        })
        .await
    }

    async fn import_session(
        &self,
        request: Request<wv1::ImportSessionRequest>,
    ) -> Result<Response<wv1::SessionRef>, Status> {
        self.refuse_if_draining()?;
        let r = request.into_inner();
        let tenant = convert::tenant(r.tenant)?;
        if r.data.is_empty() {
            return Err(FieldError::new("data", "is empty").into());
        }
        self.blocking("import_session", move |engine| {
            let session = engine
                .import_session(&tenant, r.data)
                .map_err(|e| status_of(&e))?;
            Ok(wv1::SessionRef { tenant, session })
        })
        .await
    }

    async fn info(
        &self,
        _request: Request<wv1::InfoRequest>,
    ) -> Result<Response<wv1::WorkerInfo>, Status> {
        let id = &self.identity;
        let cfg = self.engine.model();
        telemetry::rpc_done("info", tonic::Code::Ok);
        Ok(Response::new(wv1::WorkerInfo {
            worker_id: id.worker_id.clone(),
            model_id: id.model_id.clone(),
            model_hash: id.model_hash.to_vec(),
            backend: id.backend.clone(),
            vocab_size: count_u32(cfg.vocab_size),
            n_layer: count_u32(cfg.n_layer),
            n_embd: count_u32(cfg.n_embd),
            head_size: count_u32(cfg.head_size),
            slots: count_u32(id.slots),
            state_bytes: cfg.state_bytes() as u64,
            max_batch_size: count_u32(id.max_batch_size),
            max_waiting: count_u32(id.max_waiting),
        }))
    }

    async fn load(
        &self,
        _request: Request<wv1::LoadRequest>,
    ) -> Result<Response<wv1::WorkerLoad>, Status> {
        self.load_now().await.map(Response::new)
    }

    async fn drain(
        &self,
        request: Request<wv1::DrainRequest>,
    ) -> Result<Response<wv1::WorkerLoad>, Status> {
        let timeout = Duration::from_millis(request.into_inner().timeout_ms);
        self.drain_for(timeout).await.map(Response::new)
    }
}

/// Serves `service` on `listener` until `shutdown` resolves, then lets open streams finish.
pub async fn serve(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with(service, listener, None, shutdown).await
}

/// [`serve`] over TLS with this certificate chain and key (PEM); routers verify it with the
/// CA that signed it.
pub async fn serve_tls(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    serve_with(service, listener, Some(tls), shutdown).await
}

async fn serve_with(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    let auth = ServerAuth::new(service.tokens.clone());
    tracing::info!(
        ?addr,
        tls = tls.is_some(),
        tokens = service.tokens.len(),
        "worker gRPC service listening"
    );
    telemetry::describe();
    // Keepalive pings find routers that vanished without closing their connections (a host
    // that lost power, a dropped NAT entry): their streams end, which cancels their
    // generations, and a drain's GOAWAY is not left waiting for a peer that never answers.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT));
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
        .tcp_nodelay(true)
        .add_service(InterceptedService::new(
            wv1::worker_server::WorkerServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            auth,
        ))
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
}

/// How often a drain reads the engine's load.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How long a drain whose time is already up waits for its one reading of the load.
const FIRST_READING: Duration = Duration::from_secs(1);

/// HTTP/2 pings on an otherwise quiet connection, and how long the peer has to answer one.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP keepalive probes start after this much silence (a backstop under the HTTP/2 pings).
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Accepted connections with TCP_NODELAY and TCP keepalive. The builder's settings only apply
/// to listeners it binds itself; without NODELAY every token event (a small HTTP/2 frame)
/// waits for the peer's delayed ACK, about 40 ms per token.
fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
}

/// Checks a TLS certificate chain and key (PEM) the way [`serve_tls`] will use them, so a bad
/// pair is reported before the worker loads a model or registers anywhere.
pub fn check_tls(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), tonic::transport::Error> {
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert_pem, key_pem));
    tonic::transport::Server::builder()
        .tls_config(tls)
        .map(|_| ())
}

/// Largest accepted message: a session export of a 7B model's state (33 MiB) with room to spare.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
