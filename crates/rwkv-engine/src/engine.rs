//! [`Engine`]: a backend and its step loop on a dedicated OS thread, and [`EngineHandle`], the
//! cloneable way in.
//!
//! Requests travel over a channel as commands carrying their own reply or event sender, so the
//! engine thread is the single owner of all scheduling state (no locks) and no network round
//! trip sits between two tokens. Handle methods block only for session operations, which the
//! engine answers between two steps.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use rwkv_model::{Backend, ModelConfig};

use crate::error::EngineError;
use crate::prefix_cache::CacheStats;
use crate::request::{Command, GenerateRequest, GenerateStream, SessionId, Sibling};
use crate::sampler::Sampler;
use crate::scheduler::SchedulerConfig;
use crate::score::{PendingScore, ScoreRequest, ScoreResult};
use crate::sessions::{SessionCommand, SessionInfo, SessionKey};
use crate::step_loop::Core;

/// Most choices one generation request may ask for ([`EngineHandle::generate_n`]).
pub const MAX_CHOICES: usize = 256;

/// Default of [`EngineConfig::preempt_after_steps`]: long generations yield their slot to waiting
/// requests after this many steps (a few seconds of decoding on a GPU).
pub const DEFAULT_PREEMPT_AFTER_STEPS: u64 = 256;

/// Everything the engine needs besides the backend.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Per-step budgets and prefill checkpoint spacing (`checkpoint_every`, 0 = none).
    pub scheduler: SchedulerConfig,
    /// Model name in prefix-cache keys.
    pub model_id: String,
    /// Hash of the model's weights; exports are bound to it and imports must match it.
    pub model_hash: [u8; 32],
    /// Bytes of host memory for swapped-out session states.
    pub host_tier_bytes: usize,
    /// A directory for the disk tier: session states the host tier evicts are written there
    /// and read back on the session's next turn (`None`: no disk tier, such a session replays
    /// its history instead).
    pub disk_tier_dir: Option<std::path::PathBuf>,
    /// Bytes of disk the disk tier may use.
    pub disk_tier_bytes: usize,
    /// Bytes of host memory for prefix-cache states (0 disables the cache).
    pub prefix_cache_bytes: usize,
    /// Cache the state at the end of every prompt.
    pub cache_prompt_end: bool,
    /// Cache the state at the end of every generation.
    pub cache_generation_end: bool,
    /// Preemption: when new requests wait and no slot is free, a generation that has held its
    /// slot for this many forward steps is swapped out to host memory and queued again, and
    /// its slot goes to the oldest waiting request (0: never preempt). A preempted generation
    /// continues exactly where it stopped; at most as many are preempted at once as there are
    /// slots, so their host memory is bounded by one copy of the state pool.
    pub preempt_after_steps: u64,
    /// Token ids exempt from the frequency penalty (whitespace and digits in the reference); the
    /// engine has no tokenizer, so whoever has one computes this list once.
    pub frequency_exempt: Vec<u32>,
    /// Most tokens one session's conversation may hold when a turn starts (its history, kept
    /// to rebuild a lost state, grows with every turn; a turn's own reply may go past it).
    pub max_session_tokens: usize,
    /// Most sessions this engine holds, all tenants together.
    pub max_sessions: usize,
    /// Most tokens all sessions' conversations hold together when a session is created,
    /// forked, imported or continued (the histories live in host memory, 4 bytes a token).
    pub max_sessions_tokens: usize,
    /// A session not used (no turn, fork, rewind or export) for this long is deleted, with its
    /// state: clients that walk away do not hold host memory and `max_sessions` for ever.
    /// `None`: sessions live until deleted.
    pub session_idle_timeout: Option<std::time::Duration>,
}

/// The default [`EngineConfig::session_idle_timeout`]: a day.
pub const DEFAULT_SESSION_IDLE_TIMEOUT: std::time::Duration =
    std::time::Duration::from_secs(24 * 60 * 60);

/// The default [`EngineConfig::max_session_tokens`]: 1 Mi tokens, 4 MiB of history.
pub const DEFAULT_MAX_SESSION_TOKENS: usize = 1 << 20;
/// The default [`EngineConfig::max_sessions`].
pub const DEFAULT_MAX_SESSIONS: usize = 65_536;
/// The default [`EngineConfig::max_sessions_tokens`]: 1 Gi tokens, 4 GiB of histories.
pub const DEFAULT_MAX_SESSIONS_TOKENS: usize = 1 << 30;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            scheduler: SchedulerConfig::default(),
            model_id: "model".into(),
            model_hash: [0; 32],
            host_tier_bytes: 4 << 30,
            disk_tier_dir: None,
            disk_tier_bytes: 16 << 30,
            prefix_cache_bytes: 1 << 30,
            cache_prompt_end: true,
            cache_generation_end: true,
            preempt_after_steps: DEFAULT_PREEMPT_AFTER_STEPS,
            frequency_exempt: Vec::new(),
            max_session_tokens: DEFAULT_MAX_SESSION_TOKENS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_tokens: DEFAULT_MAX_SESSIONS_TOKENS,
            session_idle_timeout: Some(DEFAULT_SESSION_IDLE_TIMEOUT),
        }
    }
}

/// A snapshot of the engine's load, for metrics, health checks and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub slots_total: usize,
    pub slots_free: usize,
    /// Slots holding idle sessions (reclaimable by swapping them out).
    pub slots_parked: usize,
    /// Generations preempted and waiting, with their state in host memory.
    pub preempted: usize,
    /// Generations paused because their readers fell behind (they keep their slots until
    /// preempted).
    pub held_for_readers: usize,
    pub sessions: usize,
    pub host_tier_bytes: usize,
    pub host_tier_entries: usize,
    pub disk_tier_bytes: usize,
    pub disk_tier_entries: usize,
    pub cache: CacheStats,
    pub cache_entries: usize,
    pub cache_bytes: usize,
}

/// The cloneable front of a running engine.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    commands: Sender<Command>,
    config: Arc<ModelConfig>,
    next_id: Arc<AtomicU64>,
}

/// A running engine; dropping it stops the thread after failing the requests in flight.
#[derive(Debug)]
pub struct Engine {
    handle: EngineHandle,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Validates the configuration and starts the step loop on its own thread. Install the
    /// metrics recorder before this: the engine resolves its metric handles here
    /// ([`crate::telemetry`]).
    pub fn start<B: Backend + 'static>(backend: B, cfg: EngineConfig) -> Result<Self, EngineError> {
        let (tx, rx) = mpsc::channel();
        let config = Arc::new(backend.config().clone());
        // Shared with the engine thread, which numbers the scoring lanes it forks.
        let next_id = Arc::new(AtomicU64::new(1));
        let core = Core::new(backend, cfg, rx, next_id.clone())?;
        let thread = std::thread::Builder::new()
            .name("rwkv-engine".into())
            .spawn(move || core.run())
            .map_err(|e| EngineError::Config(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            handle: EngineHandle {
                commands: tx,
                config,
                next_id,
            },
            thread: Some(thread),
        })
    }

    /// A handle for submitting work; handles outlive nothing: once the engine stops, their calls
    /// fail with [`EngineError::Stopped`].
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Stops the loop and waits for the thread.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        // The thread may have exited already (all handles dropped); then the send fails.
        let _ = self.handle.commands.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            // A panic on the engine thread has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

impl std::ops::Deref for Engine {
    type Target = EngineHandle;

    fn deref(&self) -> &EngineHandle {
        &self.handle
    }
}

impl EngineHandle {
    /// The model the engine runs.
    pub fn model(&self) -> &ModelConfig {
        &self.config
    }

    /// Validates and submits a generation; events arrive on the returned stream.
    pub fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, EngineError> {
        let mut streams = self.generate_n(req, 1)?;
        streams.pop().ok_or(EngineError::Stopped)
    }

    /// Validates and submits a generation of `n` choices, one stream each. The prompt is
    /// prefilled once; when it is in, every other choice starts from a copy of that state and
    /// of the logits after it, so choice `i` is exactly what a separate request with seed
    /// `seed + i` would give (with no seed, each choice draws its own). Choices then run, end
    /// and can be cancelled independently. A session's turn has one choice.
    pub fn generate_n(
        &self,
        req: GenerateRequest,
        n: usize,
    ) -> Result<Vec<GenerateStream>, EngineError> {
        let vocab = self.config.vocab_size;
        check_vocab(&req.tokens, vocab)?;
        check_vocab(&req.separator, vocab)?;
        if req.session.is_none() && req.tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let reason = match n {
            0 => Some("at least one choice is needed"),
            n if n > MAX_CHOICES => Some("at most 256 choices per request"),
            n if n > 1 && req.session.is_some() => Some("a session turn has exactly one choice"),
            _ => None,
        };
        if let Some(reason) = reason {
            return Err(EngineError::Choices { n, reason });
        }
        let mut samplers = Vec::with_capacity(n);
        for i in 0..n {
            let mut params = req.params.clone();
            params.seed = params.seed.map(|s| s.wrapping_add(i as u64));
            samplers.push(Box::new(Sampler::new(params, vocab)?));
        }
        // One id, stream and sampler per choice; the first choice carries the others.
        let first = self.next_id.fetch_add(n as u64, Ordering::Relaxed);
        let mut streams = Vec::with_capacity(n);
        let mut choices = Vec::with_capacity(n);
        for (id, sampler) in (first..).zip(samplers) {
            let (events, rx) = crate::channel::channel();
            streams.push(GenerateStream {
                id,
                events: rx,
                commands: self.commands.clone(),
            });
            choices.push(Sibling {
                id,
                sampler,
                events,
            });
        }
        let mut choices = choices.into_iter();
        let Some(lead) = choices.next() else {
            return Err(EngineError::Choices {
                n,
                reason: "at least one choice is needed",
            });
        };
        self.send(Command::Generate {
            id: lead.id,
            req: Box::new(req),
            sampler: lead.sampler,
            events: lead.events,
            submitted: Instant::now(),
            siblings: choices.collect(),
        })?;
        Ok(streams)
    }

    /// Scores each continuation after the context and waits for the result: the log-softmax of
    /// the raw logits (no penalties, temperature 1). The context is prefilled once, through the
    /// tenant's prefix cache, and every continuation starts from a copy of its state. Runs in
    /// the step loop like a generation (same batches, budgets and slots).
    pub fn score(&self, req: ScoreRequest) -> Result<ScoreResult, EngineError> {
        self.submit_score(req)?.wait()
    }

    /// Validates and submits a scoring request without waiting; dropping the returned handle
    /// before the answer cancels the request.
    pub fn submit_score(&self, req: ScoreRequest) -> Result<PendingScore, EngineError> {
        req.validate(self.config.vocab_size)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = crate::channel::channel();
        self.send(Command::Score { id, req, reply })?;
        Ok(PendingScore {
            id,
            reply: rx,
            commands: self.commands.clone(),
        })
    }

    /// A new, empty session for `tenant`.
    pub fn create_session(&self, tenant: &str) -> Result<SessionId, EngineError> {
        self.create_session_with(tenant, Vec::new())
    }

    /// A new session whose conversation starts with `tokens` (a system prompt), fed with the
    /// first turn. Token ids are checked against the vocabulary.
    pub fn create_session_with(
        &self,
        tenant: &str,
        tokens: Vec<u32>,
    ) -> Result<SessionId, EngineError> {
        check_vocab(&tokens, self.config.vocab_size)?;
        let tenant = tenant.to_owned();
        self.ask(|reply| SessionCommand::Create {
            tenant,
            tokens,
            reply,
        })
    }

    /// A session's length and turn boundaries.
    pub fn session_info(&self, tenant: &str, id: SessionId) -> Result<SessionInfo, EngineError> {
        let key = SessionKey::new(tenant, id);
        self.ask(|reply| SessionCommand::Info { key, reply })
    }

    /// The tenant's sessions, by id.
    pub fn list_sessions(&self, tenant: &str) -> Result<Vec<SessionInfo>, EngineError> {
        let tenant = tenant.to_owned();
        self.ask(|reply| SessionCommand::List { tenant, reply })
    }

    /// Goes back to the end of turn `turn` (0: as created); later tokens are dropped.
    pub fn rewind_session(
        &self,
        tenant: &str,
        id: SessionId,
        turn: usize,
    ) -> Result<SessionInfo, EngineError> {
        let key = SessionKey::new(tenant, id);
        self.ask(|reply| SessionCommand::Rewind { key, turn, reply })
    }

    /// A copy of a session (same tokens, copied state).
    pub fn fork_session(&self, tenant: &str, id: SessionId) -> Result<SessionId, EngineError> {
        let key = SessionKey::new(tenant, id);
        self.ask(|reply| SessionCommand::Fork { key, reply })
    }

    /// Deletes a session and frees its state.
    pub fn delete_session(&self, tenant: &str, id: SessionId) -> Result<(), EngineError> {
        let key = SessionKey::new(tenant, id);
        self.ask(|reply| SessionCommand::Delete { key, reply })
    }

    /// The session's state and tokens in the export format ([`crate::export`]).
    pub fn export_session(&self, tenant: &str, id: SessionId) -> Result<Vec<u8>, EngineError> {
        let key = SessionKey::new(tenant, id);
        self.ask(|reply| SessionCommand::Export { key, reply })
    }

    /// A new session for `tenant` from an export, validated first.
    pub fn import_session(&self, tenant: &str, bytes: Vec<u8>) -> Result<SessionId, EngineError> {
        let tenant = tenant.to_owned();
        self.ask(|reply| SessionCommand::Import {
            tenant,
            bytes,
            reply,
        })
    }

    /// Current load and tier usage; [`EngineError::BackendBroken`] once the backend cannot
    /// run anything any more (the worker reports that as unavailable, and routers stop sending
    /// it work).
    pub fn stats(&self) -> Result<EngineStats, EngineError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Command::Stats(reply))?;
        rx.recv().map_err(|_| EngineError::Stopped)?
    }

    fn ask<T>(
        &self,
        make: impl FnOnce(SyncSender<Result<T, EngineError>>) -> SessionCommand,
    ) -> Result<T, EngineError> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Command::Session(make(reply)))?;
        rx.recv().map_err(|_| EngineError::Stopped)?
    }

    fn send(&self, cmd: Command) -> Result<(), EngineError> {
        self.commands.send(cmd).map_err(|_| EngineError::Stopped)
    }
}

impl<B: Backend> Core<B> {
    pub(crate) fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.sched.running_len(),
            waiting: self.sched.waiting_len(),
            slots_total: self.slots.total(),
            slots_free: self.slots.free_len(),
            slots_parked: self.slots.parked_len(),
            preempted: self.preempted_len(),
            held_for_readers: self.held_len(),
            sessions: self.sessions.len(),
            host_tier_bytes: self.host.used_bytes(),
            host_tier_entries: self.host.len(),
            disk_tier_bytes: self.disk.as_ref().map_or(0, |d| d.used_bytes()),
            disk_tier_entries: self.disk.as_ref().map_or(0, |d| d.len()),
            cache: self.cache.stats(),
            cache_entries: self.cache.len(),
            cache_bytes: self.cache.used_bytes(),
        }
    }
}

/// Refuses token ids outside the vocabulary.
fn check_vocab(tokens: &[u32], vocab: usize) -> Result<(), EngineError> {
    match tokens.iter().find(|&&t| t as usize >= vocab) {
        Some(&token) => Err(EngineError::TokenOutOfVocab { token, vocab }),
        None => Ok(()),
    }
}
