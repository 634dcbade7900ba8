//! The engine thread's state and its step loop: admit, plan, execute, sample, emit, retire.
//!
//! Everything here runs on the one engine thread, which owns the backend, the scheduler, the
//! slots, both host tiers and every sequence; no lock exists. Session operations are in
//! [`crate::sessions`], which extends [`Core`].

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, RecvError, Sender, TryRecvError};

use rwkv_model::{Backend, OutputRows, SeqStep, State};

use crate::engine::EngineConfig;
use crate::error::EngineError;
use crate::prefix_cache::PrefixCache;
use crate::request::{Command, FinishReason, GenerateEvent, GenerateRequest, Usage};
use crate::sampler::Sampler;
use crate::scheduler::{BatchItem, Scheduler, SeqId};
use crate::sessions::{Session, SessionKey};
use crate::slots::SlotTable;
use crate::tiers::LruStore;

/// One generation in flight.
pub(crate) struct Seq {
    pub(crate) tenant: String,
    pub(crate) session: Option<SessionKey>,
    /// Input not yet placed: the request's tokens until admission resolves where state starts.
    pub(crate) input: Vec<u32>,
    pub(crate) slot: Option<usize>,
    /// Tokens the slot's state has consumed (the prefix-cache key of that state).
    pub(crate) fed: Vec<u32>,
    /// Tokens to feed, in order: the rest of the prompt, then each sampled token.
    pub(crate) unfed: Vec<u32>,
    pub(crate) sampler: Sampler,
    pub(crate) top_logprobs: Option<usize>,
    pub(crate) usage: Usage,
    /// The client's end of the stream; a failed send means it went away (cancellation).
    pub(crate) events: Sender<GenerateEvent>,
    /// Set when the sequence must leave at the end of this step.
    pub(crate) finish: Option<FinishReason>,
}

/// Everything the engine thread owns.
pub(crate) struct Core<B: Backend> {
    pub(crate) backend: B,
    pub(crate) cfg: EngineConfig,
    pub(crate) sched: Scheduler,
    pub(crate) slots: SlotTable<SessionKey>,
    /// Swapped-out session states (the host tier).
    pub(crate) host: LruStore<SessionKey, State>,
    pub(crate) cache: PrefixCache,
    pub(crate) sessions: HashMap<SessionKey, Session>,
    pub(crate) seqs: HashMap<SeqId, Seq>,
    pub(crate) next_session: u64,
    /// Token ids that do not count for the frequency penalty, indexed by id.
    exempt: Vec<bool>,
    /// The model's initial state, for exporting a session that has not run yet.
    pub(crate) initial: State,
    commands: Receiver<Command>,
}

impl<B: Backend> Core<B> {
    pub(crate) fn new(
        mut backend: B,
        cfg: EngineConfig,
        commands: Receiver<Command>,
    ) -> Result<Self, EngineError> {
        let sched = Scheduler::new(cfg.scheduler.clone())?;
        if backend.num_slots() == 0 {
            return Err(EngineError::Config("the backend has no state slots".into()));
        }
        let mut exempt = vec![false; backend.config().vocab_size];
        for &t in &cfg.frequency_exempt {
            if let Some(e) = exempt.get_mut(t as usize) {
                *e = true;
            }
        }
        backend.reset_state(0)?;
        let initial = backend.save_state(0)?;
        Ok(Self {
            initial,
            slots: SlotTable::new(backend.num_slots()),
            host: LruStore::new(cfg.host_tier_bytes),
            cache: PrefixCache::new(cfg.model_id.clone(), cfg.prefix_cache_bytes),
            backend,
            cfg,
            sched,
            sessions: HashMap::new(),
            seqs: HashMap::new(),
            next_session: 1,
            exempt,
            commands,
        })
    }

    /// The step loop. Returns when shut down or when every handle is gone and no work is left.
    pub(crate) fn run(mut self) {
        let mut idle = true;
        while self.admit(idle) {
            let plan = self.sched.plan();
            idle = plan.is_empty();
            if idle {
                continue;
            }
            match self.execute(&plan) {
                Ok(logits) => {
                    let events = self.sample(&plan, logits);
                    self.emit(events);
                }
                Err(e) => self.fail_batch(&plan, &e),
            }
            self.retire_finished();
        }
        self.stop_all();
    }

    /// Step 1: take commands (waiting for one when idle) and give slots to waiting sequences.
    fn admit(&mut self, idle: bool) -> bool {
        // Nothing could run last step, so only a command can change that: wait for one.
        if idle {
            match self.commands.recv() {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return false;
                    }
                }
                Err(RecvError) => return false,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return false;
                    }
                }
                Err(TryRecvError::Empty) => break,
                // Every handle is gone: finish the work in flight, then stop.
                Err(TryRecvError::Disconnected) if !self.seqs.is_empty() => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        self.retire_finished();
        for id in self.sched.admit(self.slots.available()) {
            if let Err(e) = self.place(id) {
                self.fail(id, e);
            }
        }
        self.retire_finished();
        true
    }

    /// Applies one command; false means shut down.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Generate {
                id,
                req,
                sampler,
                events,
            } => self.enqueue(id, req, sampler, events),
            Command::Cancel(id) => {
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.finish.get_or_insert(FinishReason::Cancelled);
                }
            }
            Command::Session(cmd) => self.session_command(cmd),
            Command::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Command::Shutdown => return false,
        }
        true
    }

    fn enqueue(
        &mut self,
        id: SeqId,
        req: GenerateRequest,
        sampler: Box<Sampler>,
        events: Sender<GenerateEvent>,
    ) {
        let session = req.session.map(|sid| SessionKey::new(&req.tenant, sid));
        let checked = match &session {
            Some(key) => self.claim_session(key, id, req.tokens.is_empty()),
            None if req.tokens.is_empty() => Err(EngineError::EmptyInput),
            None => Ok(()),
        }
        .and_then(|()| self.sched.enqueue(id));
        if let Err(e) = checked {
            if let Some(key) = &session {
                self.release_session(key, id);
            }
            // The client may be gone already; then nobody needs the error.
            let _ = events.send(GenerateEvent::Error(e));
            return;
        }
        let seq = Seq {
            tenant: req.tenant,
            session,
            input: req.tokens,
            slot: None,
            fed: Vec::new(),
            unfed: Vec::new(),
            sampler: *sampler,
            top_logprobs: req.top_logprobs,
            usage: Usage::default(),
            events,
            finish: None,
        };
        self.seqs.insert(id, seq);
    }

    /// Gives an admitted sequence a slot holding the right state and tells the scheduler what is
    /// left to feed: the session's own state, else the longest cached prefix, else the start.
    fn place(&mut self, id: SeqId) -> Result<(), EngineError> {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return Ok(());
        };
        let input = std::mem::take(&mut seq.input);
        let session = seq.session.clone();
        let tenant = seq.tenant.clone();
        let (slot, pos, all) = match &session {
            Some(key) => self.place_session(key, &input)?,
            None => {
                let slot = self.acquire_slot()?;
                match self.restore_prefix(slot, &tenant, &input) {
                    Ok(pos) => (slot, pos, input),
                    Err(e) => {
                        self.slots.release(slot);
                        return Err(e);
                    }
                }
            }
        };
        let Some(seq) = self.seqs.get_mut(&id) else {
            self.slots.release(slot);
            return Ok(());
        };
        seq.slot = Some(slot);
        seq.fed = all[..pos].to_vec();
        seq.unfed = all[pos..].to_vec();
        seq.usage.prompt_tokens = all.len();
        seq.usage.cached_tokens = pos;
        self.sched.start(id, pos, seq.unfed.len());
        Ok(())
    }

    /// Resets `slot` or loads the longest cached prefix of `tokens` (always leaving at least one
    /// token to feed, whose logits start the generation). Returns the state's position.
    pub(crate) fn restore_prefix(
        &mut self,
        slot: usize,
        tenant: &str,
        tokens: &[u32],
    ) -> Result<usize, EngineError> {
        let max = tokens.len().saturating_sub(1);
        match self.cache.lookup(tenant, tokens, max) {
            Some((len, state)) => {
                self.backend.load_state(slot, state)?;
                Ok(len)
            }
            None => {
                self.backend.reset_state(slot)?;
                Ok(0)
            }
        }
    }

    /// A free slot, swapping the least recently parked session out to the host tier if needed.
    pub(crate) fn acquire_slot(&mut self) -> Result<usize, EngineError> {
        if let Some(slot) = self.slots.take_free() {
            return Ok(slot);
        }
        let (key, slot) = self
            .slots
            .pop_lru()
            .ok_or_else(|| EngineError::Config("no slot available (admission bug)".into()))?;
        match self.backend.save_state(slot) {
            // Evicted host entries lose only their state; the sessions keep their tokens.
            Ok(state) => drop(self.host.insert(key, state)),
            Err(e) => {
                self.slots.release(slot);
                return Err(e.into());
            }
        }
        Ok(slot)
    }

    /// Step 3: one forward over the planned ragged batch.
    fn execute(&mut self, plan: &[BatchItem]) -> Result<rwkv_model::Logits, EngineError> {
        let mut steps = Vec::with_capacity(plan.len());
        for item in plan {
            let seq = &self.seqs[&item.id];
            let slot = seq
                .slot
                .ok_or_else(|| EngineError::Config("unplaced sequence".into()))?;
            let last = item.tokens == seq.unfed.len();
            steps.push(SeqStep {
                slot,
                tokens: &seq.unfed[..item.tokens],
                output: if last {
                    OutputRows::Last
                } else {
                    OutputRows::None
                },
            });
        }
        Ok(self.backend.forward(&steps)?)
    }

    /// Step 4: move fed tokens into the state's history, save checkpoints, and sample where
    /// logits came back. Returns the token events to emit.
    fn sample(
        &mut self,
        plan: &[BatchItem],
        mut logits: rwkv_model::Logits,
    ) -> Vec<(SeqId, GenerateEvent)> {
        let vocab = logits.vocab;
        let mut row = 0;
        let mut events = Vec::new();
        for item in plan {
            let Some(seq) = self.seqs.get_mut(&item.id) else {
                continue;
            };
            let fed: Vec<u32> = seq.unfed.drain(..item.tokens).collect();
            seq.fed.extend(fed);
            let prompt_done = seq.unfed.is_empty();
            if !item.decode {
                self.checkpoint(item.id, prompt_done);
            }
            if !prompt_done {
                continue;
            }
            let logits_row = &mut logits.data[row * vocab..(row + 1) * vocab];
            row += 1;
            let Some(seq) = self.seqs.get_mut(&item.id) else {
                continue;
            };
            if let Some(event) = sample_one(seq, logits_row, &self.exempt) {
                events.push((item.id, event));
            }
            if seq.finish.is_none() {
                self.sched.on_token(item.id);
            }
        }
        events
    }

    /// Step 5: send token events; a client that went away is cancelled.
    fn emit(&mut self, events: Vec<(SeqId, GenerateEvent)>) {
        for (id, event) in events {
            if let Some(seq) = self.seqs.get_mut(&id) {
                if seq.events.send(event).is_err() {
                    seq.finish = Some(FinishReason::Cancelled);
                }
            }
        }
    }

    /// Saves the prefix-cache states a prefill chunk just reached: aligned positions inside a
    /// long prompt, and the end of the prompt.
    fn checkpoint(&mut self, id: SeqId, prompt_done: bool) {
        let seq = &self.seqs[&id];
        let every = self.cfg.scheduler.checkpoint_every;
        let aligned = every > 0 && seq.fed.len() % every == 0 && !prompt_done;
        if aligned || prompt_done && self.cfg.cache_prompt_end {
            self.save_to_cache(id);
        }
    }

    fn save_to_cache(&mut self, id: SeqId) {
        if self.cfg.prefix_cache_bytes == 0 {
            return;
        }
        let seq = &self.seqs[&id];
        let Some(slot) = seq.slot else { return };
        // A failed copy only costs a future cache miss, so it is not an error for the request.
        if let Ok(state) = self.backend.save_state(slot) {
            self.cache.insert(&seq.tenant, &seq.fed, state);
        }
    }

    /// Step 6: finished and cancelled sequences save their end-of-generation state, report, and
    /// give back or park their slot.
    pub(crate) fn retire_finished(&mut self) {
        let done: Vec<SeqId> = self
            .seqs
            .iter()
            .filter(|(_, s)| s.finish.is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            self.retire(id);
        }
    }

    fn retire(&mut self, id: SeqId) {
        let Some(reason) = self.seqs.get(&id).and_then(|s| s.finish) else {
            return;
        };
        if reason != FinishReason::Cancelled && self.cfg.cache_generation_end {
            self.save_to_cache(id);
        }
        self.sched.remove(id);
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        let _ = seq.events.send(GenerateEvent::Finished {
            reason,
            usage: seq.usage,
        });
        self.release_seq(id, seq, true);
    }

    /// Returns a leaving sequence's slot, parking it for its session if the state is intact.
    ///
    /// A session keeps its tokens whatever happens: `history` (in the state) and `pending` (not
    /// yet fed). If the state is lost, nothing is parked or stored, and the next turn replays
    /// the history from the prefix cache or from the start.
    fn release_seq(&mut self, id: SeqId, seq: Seq, state_intact: bool) {
        let Some(key) = seq.session else {
            if let Some(slot) = seq.slot {
                self.slots.release(slot);
            }
            return;
        };
        if let Some(slot) = seq.slot {
            if state_intact {
                self.slots.park(key.clone(), slot);
            } else {
                self.slots.release(slot);
            }
            if let Some(session) = self.sessions.get_mut(&key) {
                session.history = seq.fed;
                session.pending = seq.unfed;
            }
        }
        // A sequence that never got a slot consumed nothing; its input is dropped with it.
        self.release_session(&key, id);
    }

    /// Ends one sequence with an error. Its state is not trusted afterwards.
    fn fail(&mut self, id: SeqId, e: EngineError) {
        self.sched.remove(id);
        if let Some(seq) = self.seqs.remove(&id) {
            let _ = seq.events.send(GenerateEvent::Error(e));
            self.release_seq(id, seq, false);
        }
    }

    fn fail_batch(&mut self, plan: &[BatchItem], e: &EngineError) {
        for item in plan {
            self.fail(item.id, EngineError::StepFailed(e.to_string()));
        }
    }

    fn stop_all(&mut self) {
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.fail(id, EngineError::Stopped);
        }
    }
}

/// Samples one token for `seq` from its logits row. Returns the token event, if a token is
/// emitted; sets `finish` when the generation ends (stop token, `max_tokens`).
fn sample_one(seq: &mut Seq, logits: &mut [f32], exempt: &[bool]) -> Option<GenerateEvent> {
    let max_tokens = seq.sampler.params().max_tokens;
    if seq.usage.generated_tokens >= max_tokens {
        seq.finish = Some(FinishReason::Length);
        return None;
    }
    let (token, logprobs) = match seq.top_logprobs {
        Some(n) => {
            let lp = seq.sampler.sample_with_logprobs(logits, n);
            (lp.token, Some(lp))
        }
        None => (seq.sampler.sample(logits), None),
    };
    if seq.sampler.is_stop_token(token) {
        seq.finish = Some(FinishReason::Stop);
        return None;
    }
    seq.sampler
        .record(token, exempt.get(token as usize).copied().unwrap_or(false));
    seq.usage.generated_tokens += 1;
    // The token joins the conversation now; it is fed next step unless the generation ends, in
    // which case it stays pending for a session's next turn.
    seq.unfed.push(token);
    if seq.usage.generated_tokens >= max_tokens {
        seq.finish = Some(FinishReason::Length);
    }
    Some(GenerateEvent::Token { token, logprobs })
}
