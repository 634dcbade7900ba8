//! The engine thread's state and its step loop: admit, plan, execute, absorb, retire.
//!
//! Everything here runs on the one engine thread, which owns the backend, the scheduler, the
//! slots, both host tiers and every sequence; no lock exists. A sequence ([`Seq`]) is a slot and
//! the tokens it feeds; it works for a generation ([`generation`]: samples a token from each
//! last row) or for a scoring request ([`scoring`]: reads log-probabilities from the rows).
//! Session operations are in [`crate::sessions`], which extends [`Core`].

mod choices;
mod generation;
mod preemption;
mod scoring;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvError, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rwkv_model::{Backend, Candidate, Logits, NucleusRow, OutputRows, SeqStep, State};

use crate::disk_tier::DiskTier;
use crate::engine::EngineConfig;
use crate::error::EngineError;
use crate::prefix_cache::PrefixCache;
use crate::request::{Command, FinishReason};
use crate::scheduler::{BatchItem, Scheduler, SeqId};
use crate::sessions::{Session, SessionKey};
use crate::slots::SlotTable;
use crate::telemetry::{Ended, Metrics, Swap};
use crate::tiers::{LruStore, Weigh};

pub(crate) use generation::{Generation, Pick};
pub(crate) use scoring::{Lane, ScoreJob};

/// How often an idle step loop looks at the readers of held generations.
const HELD_POLL: Duration = Duration::from_millis(20);
/// How often an idle engine with sessions wakes up to delete the expired ones.
const EXPIRY_POLL: Duration = Duration::from_secs(10);

/// One sequence in flight: a slot and the tokens it feeds.
pub(crate) struct Seq {
    pub(crate) tenant: String,
    pub(crate) session: Option<SessionKey>,
    /// Input not yet placed: the request's tokens until admission resolves where state starts.
    pub(crate) input: Vec<u32>,
    pub(crate) slot: Option<usize>,
    /// Tokens the slot's state has consumed (the prefix-cache key of that state).
    pub(crate) fed: Vec<u32>,
    /// Tokens to feed, in order: the rest of the prompt (or of a scoring context or
    /// continuation), then each sampled token.
    pub(crate) unfed: Vec<u32>,
    /// Set when the sequence must leave at the end of this step.
    pub(crate) finish: Option<FinishReason>,
    pub(crate) role: Role,
    /// A choice forked from another that found no free slot: it waits for one with a copy of
    /// the state and logits it starts from (`input` is the prompt that state has consumed).
    pub(crate) forked: Option<Arc<Forked>>,
    /// A generation preempted to let waiting requests in: its state (after `fed`) while it
    /// waits for a slot again.
    pub(crate) preempted: Option<State>,
    /// The engine step at which it last got its slot (preemption picks the longest holder).
    pub(crate) placed_step: u64,
}

impl Seq {
    /// A generation past its prompt: it has sampled a token, which is all it has left to feed.
    /// (A prompt still prefilling can also have one token left between two chunks; it is not
    /// decoding: its last token's logits must come back whole, for its choices' fork.)
    pub(crate) fn is_decoding(&self) -> bool {
        matches!(&self.role, Role::Generate(g) if g.usage.generated_tokens > 0)
            && self.unfed.len() == 1
    }
}

/// The state and the logits row a forked choice starts from.
pub(crate) struct Forked {
    pub(crate) state: State,
    pub(crate) logits: Vec<f32>,
}

/// What a sequence works for.
pub(crate) enum Role {
    /// A generation. Boxed: the sampler is large and lanes are small.
    Generate(Box<Generation>),
    /// A lane of a scoring request: its context, then one continuation after another.
    Score(Lane),
}

/// Everything the engine thread owns.
pub(crate) struct Core<B: Backend> {
    pub(crate) backend: B,
    pub(crate) cfg: EngineConfig,
    pub(crate) sched: Scheduler,
    pub(crate) slots: SlotTable<SessionKey>,
    /// Swapped-out session states (the host tier).
    pub(crate) host: LruStore<SessionKey, State>,
    /// Session states the host tier evicted (the optional disk tier).
    pub(crate) disk: Option<DiskTier>,
    pub(crate) cache: PrefixCache,
    pub(crate) sessions: HashMap<SessionKey, Session>,
    pub(crate) seqs: HashMap<SeqId, Seq>,
    /// Scoring requests in flight, by request id (which is also the id of their first lane).
    jobs: HashMap<SeqId, ScoreJob>,
    /// The id counter shared with the handles, so that lanes the engine forks get unique ids.
    ids: Arc<AtomicU64>,
    pub(crate) next_session: u64,
    /// Token ids that do not count for the frequency penalty, indexed by id.
    exempt: Vec<bool>,
    /// Threads a large batch's sampling may use (the machine's parallelism).
    sampling_threads: usize,
    /// Forward steps run so far (the clock of preemption).
    steps: u64,
    /// Admitted sequences are being placed: free slots are promised to them, so choices forked
    /// meanwhile (an exact cache hit samples at placement) must not take one.
    placing: bool,
    /// The model's initial state, for exporting a session that has not run yet.
    pub(crate) initial: State,
    pub(crate) metrics: Metrics,
    commands: Receiver<Command>,
    /// When idle sessions were last looked for (at most once a second).
    pub(crate) expiry_checked: Instant,
}

/// What one forward step returned: the logits, and which rows each planned sequence asked for.
struct StepOutput {
    logits: Logits,
    outputs: Vec<OutputRows>,
}

impl<B: Backend> Core<B> {
    pub(crate) fn new(
        mut backend: B,
        cfg: EngineConfig,
        commands: Receiver<Command>,
        ids: Arc<AtomicU64>,
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
        let disk = match &cfg.disk_tier_dir {
            Some(dir) => Some(DiskTier::open(
                dir,
                cfg.disk_tier_bytes,
                cfg.model_hash,
                backend.config().clone(),
            )?),
            None => None,
        };
        Ok(Self {
            initial,
            slots: SlotTable::new(backend.num_slots()),
            host: LruStore::new(cfg.host_tier_bytes),
            disk,
            cache: PrefixCache::new(cfg.model_id.clone(), cfg.prefix_cache_bytes),
            metrics: Metrics::new(backend.num_slots()),
            backend,
            cfg,
            sched,
            sessions: HashMap::new(),
            seqs: HashMap::new(),
            jobs: HashMap::new(),
            ids,
            // Ids start at a random point so that an id from before a restart of this worker is
            // unlikely to name a new session of the same tenant.
            next_session: 1 + u64::from(rand::random::<u32>()),
            exempt,
            sampling_threads: thread::available_parallelism().map_or(1, |n| n.get()),
            steps: 0,
            placing: false,
            commands,
            expiry_checked: Instant::now(),
        })
    }

    /// The step loop. Returns when shut down or when every handle is gone and no work is left.
    pub(crate) fn run(mut self) {
        let mut idle = true;
        while self.admit(idle) {
            // A generation answered from the cache may have ended at admission.
            self.retire_finished();
            self.hold_slow_readers();
            let plan = self.sched.plan();
            idle = plan.is_empty();
            if idle {
                continue;
            }
            match self.execute(&plan) {
                Ok(step) => self.absorb(&plan, step),
                Err(e) => self.fail_batch(&plan, &e),
            }
            self.retire_finished();
            self.record_load();
        }
        self.stop_all();
    }

    /// Sets the load gauges; called whenever admission or retirement may have changed them, so
    /// they are current before the next command is answered.
    fn record_load(&self) {
        let in_use = self.slots.total() - self.slots.free_len();
        let (running, waiting) = (self.sched.running_len(), self.sched.waiting_len());
        self.metrics.load(running, waiting, in_use);
    }

    /// Step 1: take commands (waiting for one when idle) and give slots to waiting sequences.
    fn admit(&mut self, idle: bool) -> bool {
        // Nothing could run last step, so only a command can change that: wait for one. Or a
        // reader catching up, which sends none: while generations are held for their readers,
        // look again every HELD_POLL.
        // Idle with sessions that may expire: wake up now and then to delete them, so that
        // their states leave host memory even when no request comes.
        let poll = if self.held_len() > 0 {
            Some(HELD_POLL)
        } else if self.cfg.session_idle_timeout.is_some() && !self.sessions.is_empty() {
            Some(EXPIRY_POLL)
        } else {
            None
        };
        if let (true, Some(poll)) = (idle, poll) {
            match self.commands.recv_timeout(poll) {
                Ok(cmd) => {
                    if !self.handle(cmd) {
                        return false;
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.expire_idle_sessions(),
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        } else if idle {
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
        self.preempt_for_waiting();
        // Again while sequences wait and slots are free: a sequence can leave during its own
        // placement (an exact cache hit whose first token ends it, a failed placement) and
        // free its slot, or queue choices forked at placement. Left to the next round, they
        // would wait for an unrelated command when nothing else runs.
        loop {
            self.placing = true;
            let admitted = self.sched.admit(self.slots.available());
            let any = !admitted.is_empty();
            for id in admitted {
                if let Err(e) = self.place(id) {
                    self.fail(id, e);
                }
            }
            self.placing = false;
            self.retire_finished();
            if !any || self.sched.waiting_len() == 0 || self.slots.available() == 0 {
                break;
            }
        }
        self.record_load();
        true
    }

    /// Applies one command; false means shut down.
    fn handle(&mut self, cmd: Command) -> bool {
        // First, so that a new session finds the room the expired ones left.
        self.expire_idle_sessions();
        match cmd {
            Command::Generate {
                id,
                req,
                sampler,
                events,
                submitted,
                siblings,
            } => self.enqueue_generation(id, req, sampler, events, submitted, siblings),
            Command::Score { id, req, reply } => self.enqueue_score(id, req, reply),
            Command::Cancel(id) => {
                if !self.cancel_job(id) && !self.cancel_choice(id) {
                    if let Some(seq) = self.seqs.get_mut(&id) {
                        seq.finish.get_or_insert(FinishReason::Cancelled);
                    }
                }
            }
            Command::Session(cmd) => self.session_command(cmd),
            Command::Stats(reply) => {
                let _ = reply.send(self.usable().map(|()| self.stats()));
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// A fresh id for a sequence the engine creates itself (a scoring lane).
    fn next_id(&self) -> SeqId {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Gives an admitted sequence a slot holding the right state and tells the scheduler what is
    /// left to feed: the session's own state, else the longest cached prefix, else the start.
    fn place(&mut self, id: SeqId) -> Result<(), EngineError> {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return Ok(());
        };
        if let Some(state) = seq.preempted.take() {
            return self.resume(id, state);
        }
        let input = std::mem::take(&mut seq.input);
        let forked = seq.forked.take();
        let session = seq.session.clone();
        let tenant = seq.tenant.clone();
        let generation = matches!(seq.role, Role::Generate(_));
        let mut ready_logits = None;
        let (slot, pos, all) = match &session {
            // A forked choice: the state after the whole prompt, and the logits to sample from.
            _ if forked.is_some() => {
                let forked = forked.as_deref().expect("checked above");
                let slot = self.acquire_slot()?;
                if let Err(e) = self.backend.load_state(slot, &forked.state) {
                    self.slots.release(slot);
                    return Err(e.into());
                }
                ready_logits = Some(forked.logits.clone());
                (slot, input.len(), input)
            }
            Some(key) => self.place_session(key, &input)?,
            None if generation => {
                let slot = self.acquire_slot()?;
                match self.restore_generation(slot, &tenant, &input) {
                    Ok((pos, logits)) => {
                        ready_logits = logits;
                        (slot, pos, input)
                    }
                    Err(e) => {
                        self.slots.release(slot);
                        return Err(e);
                    }
                }
            }
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
        seq.placed_step = self.steps;
        seq.fed = all[..pos].to_vec();
        seq.unfed = all[pos..].to_vec();
        match &mut seq.role {
            Role::Generate(g) => {
                g.usage.prompt_tokens = all.len();
                g.usage.cached_tokens = pos;
            }
            Role::Score(lane) => {
                if let Some(job) = self.jobs.get_mut(&lane.job) {
                    job.placed(all.len(), pos);
                }
            }
        }
        self.sched.start(id, pos, all.len() - pos);
        if let Some(mut logits) = ready_logits {
            // The whole prompt was cached with the logits after it: sample the first token now;
            // the sequence then decodes like any other (or ends, and retires this step).
            let emitted =
                self.sample_generations(vec![(id, Pick::Row(&mut logits[..]))], Instant::now());
            self.metrics.generated(emitted);
        }
        Ok(())
    }

    /// Places a generation's state: the exact prompt with its logits when cached (nothing to
    /// feed), else the longest cached prefix leaving one token to feed.
    fn restore_generation(
        &mut self,
        slot: usize,
        tenant: &str,
        tokens: &[u32],
    ) -> Result<(usize, Option<Vec<f32>>), EngineError> {
        if let Some((state, logits)) = self.cache.lookup_exact(tenant, tokens) {
            let logits = logits.to_vec();
            self.backend.load_state(slot, state)?;
            self.metrics.cache_lookup(Some(tokens.len()));
            return Ok((tokens.len(), Some(logits)));
        }
        self.restore_prefix(slot, tenant, tokens)
            .map(|pos| (pos, None))
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
        let hit = self.cache.lookup(tenant, tokens, max);
        self.metrics.cache_lookup(hit.as_ref().map(|&(len, _)| len));
        match hit {
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
        let started = Instant::now();
        match self.backend.save_state(slot) {
            Ok(state) => {
                self.metrics
                    .swap(Swap::Out, state.bytes(), started.elapsed());
                self.store_host(key, state);
            }
            Err(e) => {
                self.slots.release(slot);
                return Err(e.into());
            }
        }
        Ok(slot)
    }

    /// Step 3: one forward over the planned ragged batch.
    fn execute(&mut self, plan: &[BatchItem]) -> Result<StepOutput, EngineError> {
        let mut steps = Vec::with_capacity(plan.len());
        let mut outputs = Vec::with_capacity(plan.len());
        let decides_nucleus = self.backend.decides_nucleus();
        for item in plan {
            let seq = &self.seqs[&item.id];
            let slot = seq
                .slot
                .ok_or_else(|| EngineError::Config("unplaced sequence".into()))?;
            let output = match &seq.role {
                // A continuation needs the distribution after each of its tokens.
                Role::Score(lane) if lane.branch.is_some() => OutputRows::All,
                _ if item.tokens != seq.unfed.len() => OutputRows::None,
                // A decode may need only the row's best tokens or its nucleus (the end of a
                // prompt keeps its whole row: it is cached with the state, and choices fork
                // from it).
                Role::Generate(g) if item.decode => g.decode_output(decides_nucleus),
                // Otherwise only the end of the input predicts anything.
                _ => OutputRows::Last,
            };
            outputs.push(output);
            steps.push(SeqStep {
                slot,
                tokens: &seq.unfed[..item.tokens],
                output,
            });
        }
        let tokens = plan.iter().map(|i| i.tokens).sum();
        let started = Instant::now();
        let logits = self.backend.forward(&steps)?;
        self.steps += 1;
        self.metrics.step(plan.len(), tokens, started.elapsed());
        let rows: usize = plan
            .iter()
            .zip(&outputs)
            .map(|(item, o)| o.rows(item.tokens))
            .sum();
        let candidates: usize = plan
            .iter()
            .zip(&outputs)
            .map(|(item, o)| o.candidates(item.tokens))
            .sum();
        let nucleus: usize = plan
            .iter()
            .zip(&outputs)
            .map(|(item, o)| o.nucleus_rows(item.tokens))
            .sum();
        let vocab = self.vocab();
        let bad_nucleus = logits.nucleus.iter().any(|n| match n {
            NucleusRow::Kept(kept) => {
                kept.is_empty() || kept.iter().any(|c| c.token as usize >= vocab)
            }
            NucleusRow::Row(row) => row.len() != vocab,
        });
        let bad_candidate = logits.top.iter().any(|c| c.token as usize >= vocab);
        if logits.data.len() != rows * logits.vocab
            || logits.vocab != vocab
            || logits.top.len() != candidates
            || logits.nucleus.len() != nucleus
            || bad_nucleus
            || bad_candidate
        {
            return Err(EngineError::StepFailed(format!(
                "the backend returned {} logits of width {} and {} candidates and {} nucleus \
                 rows, expected {rows} rows of {vocab}, {candidates} candidates and {nucleus} \
                 nucleus rows (of kept tokens or {vocab} logits), every token id below {vocab}",
                logits.data.len(),
                logits.vocab,
                logits.top.len(),
                logits.nucleus.len(),
            )));
        }
        Ok(StepOutput { logits, outputs })
    }

    /// Step 4: move fed tokens into the state's history, save checkpoints, and hand each
    /// sequence its logit rows (generations sample and send a token, scoring lanes read
    /// log-probabilities).
    fn absorb(&mut self, plan: &[BatchItem], step: StepOutput) {
        let StepOutput {
            mut logits,
            outputs,
        } = step;
        let vocab = logits.vocab;
        // One clock read per step: every token of this step is emitted at this time.
        let now = Instant::now();
        let mut rest: &mut [f32] = &mut logits.data;
        let mut rest_top: &[Candidate] = &logits.top;
        let mut rest_nucleus: &mut [NucleusRow] = &mut logits.nucleus;
        let mut to_sample = Vec::new();
        for (item, output) in plan.iter().zip(outputs) {
            let n_rows = output.rows(item.tokens);
            let (rows, tail) = std::mem::take(&mut rest).split_at_mut(n_rows * vocab);
            rest = tail;
            let (top, tail) = rest_top.split_at(output.candidates(item.tokens));
            rest_top = tail;
            let (nucleus, tail) =
                std::mem::take(&mut rest_nucleus).split_at_mut(output.nucleus_rows(item.tokens));
            rest_nucleus = tail;
            let Some(seq) = self.seqs.get_mut(&item.id) else {
                continue;
            };
            let before = seq.fed.len();
            seq.fed.extend(seq.unfed.drain(..item.tokens));
            let input_done = seq.unfed.is_empty();
            let lane = match &seq.role {
                Role::Generate(_) => None,
                Role::Score(lane) => Some(*lane),
            };
            // Prompts and scoring contexts are checkpointed for the prefix cache; a generation's
            // state is also saved when it ends (see `retire`), a continuation's never.
            let caches = lane.is_none_or(|l| l.branch.is_none());
            if !item.decode && caches {
                // A generation's prompt end keeps its logits: an exact repeat then needs no
                // forward step at all.
                let logits = (input_done && lane.is_none() && n_rows == 1).then_some(&*rows);
                self.checkpoint(item.id, input_done, logits);
            }
            match lane {
                None if input_done && !top.is_empty() => {
                    to_sample.push((item.id, Pick::Candidates(top)));
                }
                None if input_done && !nucleus.is_empty() => {
                    let pick = match &mut nucleus[0] {
                        NucleusRow::Kept(kept) => Pick::Kept(kept),
                        NucleusRow::Row(row) => Pick::Row(row),
                    };
                    to_sample.push((item.id, pick));
                }
                None if input_done => to_sample.push((item.id, Pick::Row(rows))),
                None => {}
                Some(lane) => self.lane_rows(item.id, lane, before, rows, vocab),
            }
        }
        let emitted = self.sample_generations(to_sample, now);
        self.metrics.generated(emitted);
    }

    /// Refuses new work once the backend is broken.
    fn usable(&self) -> Result<(), EngineError> {
        match self.backend.broken() {
            Some(why) => Err(EngineError::BackendBroken(why)),
            None => Ok(()),
        }
    }

    fn vocab(&self) -> usize {
        self.backend.config().vocab_size
    }

    /// Saves the prefix-cache states a prefill chunk just reached: aligned positions inside a
    /// long prompt, and the end of the prompt.
    fn checkpoint(&mut self, id: SeqId, prompt_done: bool, logits: Option<&[f32]>) {
        let seq = &self.seqs[&id];
        let every = self.cfg.scheduler.checkpoint_every;
        let aligned = every > 0 && seq.fed.len().is_multiple_of(every) && !prompt_done;
        if aligned || prompt_done && self.cfg.cache_prompt_end {
            self.save_to_cache(id, if prompt_done { logits } else { None });
        }
    }

    fn save_to_cache(&mut self, id: SeqId, logits: Option<&[f32]>) {
        if self.cfg.prefix_cache_bytes == 0 {
            return;
        }
        let seq = &self.seqs[&id];
        let Some(slot) = seq.slot else { return };
        let untrusted = seq
            .session
            .as_ref()
            .and_then(|key| self.sessions.get(key))
            .is_some_and(|s| s.imported_state);
        if untrusted {
            return;
        }
        // A failed copy only costs a future cache miss, so it is not an error for the request.
        if let Ok(state) = self.backend.save_state(slot) {
            let logits = logits.map(<[f32]>::to_vec);
            self.cache
                .insert_with_logits(&seq.tenant, &seq.fed, state, logits);
        }
    }

    /// Step 5: finished and cancelled sequences report and give back or park their slot.
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
        let Some(seq) = self.seqs.get(&id) else {
            return;
        };
        let Some(reason) = seq.finish else {
            return;
        };
        let generation = matches!(seq.role, Role::Generate(_));
        if generation && reason != FinishReason::Cancelled && self.cfg.cache_generation_end {
            self.save_to_cache(id, None);
        }
        self.sched.remove(id);
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        if let Role::Generate(g) = &seq.role {
            g.finished(reason);
            // Choices never forked end with it: each is a stream of its own.
            for _ in 0..=g.siblings.len() {
                self.metrics.ended(Ended::Generation(reason));
            }
        }
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
        let consumed = match (seq.slot, seq.preempted) {
            (Some(slot), _) if state_intact => {
                self.slots.park(key.clone(), slot);
                true
            }
            (Some(slot), _) => {
                self.slots.release(slot);
                true
            }
            // Preempted: its state goes where an idle session's state goes.
            (None, Some(state)) => {
                if state_intact {
                    self.store_host(key.clone(), state);
                }
                true
            }
            // A sequence that never got a slot consumed nothing; its input is dropped with it.
            (None, None) => false,
        };
        if consumed {
            if let Some(session) = self.sessions.get_mut(&key) {
                session.history = seq.fed;
                session.pending = seq.unfed;
                // The turn consumed its input, so it counts (even if cancelled part-way).
                session
                    .turns
                    .push(session.history.len() + session.pending.len());
            }
        }
        self.release_session(&key, id);
    }

    /// Ends one sequence with an error (a scoring lane fails its whole request). Its state is
    /// not trusted afterwards.
    fn fail(&mut self, id: SeqId, e: EngineError) {
        self.sched.remove(id);
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        match &seq.role {
            Role::Generate(g) => {
                g.failed(e);
                for _ in 0..=g.siblings.len() {
                    self.metrics.ended(Ended::GenerationFailed);
                }
            }
            Role::Score(lane) => self.fail_job(lane.job, e),
        }
        self.release_seq(id, seq, false);
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
        // Nothing runs or waits any more: the gauges say so rather than their last values.
        self.record_load();
    }
}
