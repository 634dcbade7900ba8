//! The pure, synchronous scheduler: which sequences run and how many tokens each feeds per step.
//!
//! It knows sequences only by id and by how many tokens they still have to feed; tokens, slots
//! and states belong to the engine. Each step ([`Scheduler::plan`]) builds a ragged batch:
//!
//! 1. Decodes first, one token each, least recently served first, so a long prompt never stalls
//!    running generations and, when there are more decodes than `max_batch_size`, they rotate.
//! 2. Prefill chunks take what is left of `max_batch_tokens`, each at most `prefill_chunk` tokens,
//!    least recently served first, so several long prompts are chunked and interleaved.
//! 3. A prefill chunk never crosses a multiple of `checkpoint_every`, so the engine can save the
//!    state of long prompts at aligned positions for the prefix cache.
//! 4. Sequences that need the logits of every token they feed (scoring continuations) share at
//!    most `max_output_rows` tokens per step: each row is a vocabulary of f32 on the host, so
//!    this bounds a step's memory however many continuations a request brings.
//!
//! Admission is separate ([`Scheduler::admit`]): the engine says how many slots it can provide,
//! and the oldest waiting sequences become running. No runtime, no clock: plain unit tests.

use std::collections::VecDeque;

use crate::error::EngineError;

/// Engine-wide id of one generation request (a running or waiting sequence).
pub type SeqId = u64;

/// Budgets of one forward step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Tokens fed to the backend per step, decodes and prefill chunks together.
    pub max_batch_tokens: usize,
    /// Sequences per step. Decodes are served first, so keep this at least the number of slots
    /// or prompts wait until enough generations finish.
    pub max_batch_size: usize,
    /// Largest prefill chunk of one sequence in one step.
    pub prefill_chunk: usize,
    /// Prefill chunks end at multiples of this position (0: no alignment).
    pub checkpoint_every: usize,
    /// Sequences allowed to wait for a slot; beyond that, requests are refused (back-pressure).
    pub max_waiting: usize,
    /// Tokens per step, over all sequences that need every token's logits (each costs a
    /// vocabulary-sized row: 256 KiB at 65,536 tokens).
    pub max_output_rows: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 2048,
            max_batch_size: 256,
            prefill_chunk: 512,
            checkpoint_every: 0,
            max_waiting: 4096,
            max_output_rows: 256,
        }
    }
}

impl SchedulerConfig {
    /// Rejects budgets that could never schedule a token.
    pub fn validate(&self) -> Result<(), EngineError> {
        for (field, value) in [
            ("max_batch_tokens", self.max_batch_tokens),
            ("max_batch_size", self.max_batch_size),
            ("prefill_chunk", self.prefill_chunk),
            ("max_output_rows", self.max_output_rows),
        ] {
            if value == 0 {
                return Err(EngineError::Config(format!("`{field}` must be at least 1")));
            }
        }
        Ok(())
    }
}

/// One sequence's part of a planned step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchItem {
    pub id: SeqId,
    /// New tokens this sequence feeds in this step.
    pub tokens: usize,
    /// True for a decode (the one token sampled last step), false for a prefill chunk.
    pub decode: bool,
}

#[derive(Clone, Debug)]
struct Running {
    id: SeqId,
    /// Tokens handed to the engine but not yet planned.
    pending: usize,
    /// Absolute position (tokens already in the state), for checkpoint alignment.
    pos: usize,
    /// Set once the prompt is done: from then on the sequence feeds one sampled token per step.
    decoding: bool,
    /// Serve counter value when the sequence last got tokens; the fairness key. A counter of
    /// serves rather than of steps, so that sequences served in the same step still rotate.
    last_served: u64,
    /// Admission order; breaks ties so older sequences go first.
    admitted: u64,
    /// Every token it feeds needs its logits row (counts against `max_output_rows`).
    all_rows: bool,
    /// Not planned until released: its reader fell behind (see [`Scheduler::hold`]).
    held: bool,
}

/// Waiting and running sequences, and the per-step planning.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    waiting: VecDeque<SeqId>,
    running: Vec<Running>,
    serves: u64,
    admissions: u64,
}

impl Scheduler {
    /// A scheduler with validated budgets.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, EngineError> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            waiting: VecDeque::new(),
            running: Vec::new(),
            serves: 0,
            admissions: 0,
        })
    }

    /// The budgets in use.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a new sequence; refused when `max_waiting` sequences already wait.
    pub fn enqueue(&mut self, id: SeqId) -> Result<(), EngineError> {
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(EngineError::Overloaded {
                waiting: self.waiting.len(),
                limit: self.cfg.max_waiting,
            });
        }
        self.waiting.push_back(id);
        Ok(())
    }

    /// Queues a sequence ahead of every other, whatever the bound: the later part of work that
    /// was already admitted (a forked choice waiting for a slot).
    pub fn enqueue_front(&mut self, id: SeqId) {
        self.waiting.push_front(id);
    }

    /// Moves a waiting sequence to the front of the queue (nothing if it is not waiting).
    pub fn promote(&mut self, id: SeqId) {
        if let Some(i) = self.waiting.iter().position(|&w| w == id) {
            self.waiting.remove(i);
            self.waiting.push_front(id);
        }
    }

    /// Takes a running sequence off its slot and queues it again, last, whatever the bound (it
    /// was admitted already). [`Scheduler::resume`] puts it back when it is admitted again.
    pub fn preempt(&mut self, id: SeqId) {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            self.running.remove(i);
            self.waiting.push_back(id);
        }
    }

    /// Gives a re-admitted (preempted) sequence its work back: `pending` tokens from position
    /// `pos`, as a decode when it was decoding.
    pub fn resume(&mut self, id: SeqId, pos: usize, pending: usize, decoding: bool) {
        if let Some(r) = self.running_mut(id) {
            r.pos = pos;
            r.pending = pending;
            r.decoding = decoding;
        }
    }

    /// Gives sequence `old` (waiting or running) the id `new`, keeping its place and progress.
    pub fn rename(&mut self, old: SeqId, new: SeqId) {
        for w in self.waiting.iter_mut().filter(|w| **w == old) {
            *w = new;
        }
        if let Some(r) = self.running_mut(old) {
            r.id = new;
        }
    }

    /// Moves up to `capacity` of the oldest waiting sequences to running and returns them. They
    /// are not planned until [`Scheduler::start`] gives them tokens.
    pub fn admit(&mut self, capacity: usize) -> Vec<SeqId> {
        let n = capacity.min(self.waiting.len());
        let ids: Vec<SeqId> = self.waiting.drain(..n).collect();
        for &id in &ids {
            self.admissions += 1;
            self.running.push(Running {
                id,
                pending: 0,
                pos: 0,
                decoding: false,
                last_served: 0,
                admitted: self.admissions,
                all_rows: false,
                held: false,
            });
        }
        ids
    }

    /// Gives an admitted sequence its prefill: `pending` tokens starting at position `pos` (a
    /// prefix-cache hit or a session's state already covers the first `pos`).
    pub fn start(&mut self, id: SeqId, pos: usize, pending: usize) {
        if let Some(r) = self.running_mut(id) {
            r.pos = pos;
            r.pending = pending;
            r.decoding = false;
        }
    }

    /// Adds a running sequence that already holds a slot: a fork of a running sequence, given a
    /// slot nobody waited for. It skips the waiting queue (and its bound) and, like
    /// [`Scheduler::start`], feeds `pending` tokens from position `pos`.
    pub fn fork(&mut self, id: SeqId, pos: usize, pending: usize) {
        self.admissions += 1;
        self.running.push(Running {
            id,
            pending,
            pos,
            decoding: false,
            last_served: 0,
            admitted: self.admissions,
            all_rows: false,
            held: false,
        });
    }

    /// Records that a token was sampled and must be fed next step (the sequence is decoding).
    pub fn on_token(&mut self, id: SeqId) {
        if let Some(r) = self.running_mut(id) {
            r.pending += 1;
            r.decoding = true;
        }
    }

    /// From now on every token `id` feeds needs its logits row: its chunks share the step's
    /// `max_output_rows`.
    pub fn needs_all_rows(&mut self, id: SeqId) {
        if let Some(r) = self.running_mut(id) {
            r.all_rows = true;
        }
    }

    /// Holds a running sequence (it keeps its slot and its pending tokens but is not planned)
    /// or releases it. A sequence admitted again after a preemption starts released.
    pub fn hold(&mut self, id: SeqId, held: bool) {
        if let Some(r) = self.running_mut(id) {
            r.held = held;
        }
    }

    /// Forgets a sequence, waiting or running (finished, cancelled or failed).
    pub fn remove(&mut self, id: SeqId) {
        self.waiting.retain(|&w| w != id);
        self.running.retain(|r| r.id != id);
    }

    /// Sequences waiting for a slot.
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences holding a slot.
    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Builds the next step's batch and marks its tokens as planned. Empty when nothing can run.
    pub fn plan(&mut self) -> Vec<BatchItem> {
        let mut batch = Vec::new();
        let mut budget = self.cfg.max_batch_tokens;
        let mut rows_left = self.cfg.max_output_rows;
        for decode in [true, false] {
            let mut order: Vec<usize> = (0..self.running.len())
                .filter(|&i| {
                    let r = &self.running[i];
                    r.pending > 0 && !r.held && r.decoding == decode
                })
                .collect();
            order.sort_by_key(|&i| (self.running[i].last_served, self.running[i].admitted));
            for i in order {
                if budget == 0 || batch.len() >= self.cfg.max_batch_size {
                    return batch;
                }
                let mut n = self.chunk_len(&self.running[i], budget);
                if self.running[i].all_rows {
                    n = n.min(rows_left);
                    if n == 0 {
                        continue;
                    }
                    rows_left -= n;
                }
                let r = &mut self.running[i];
                r.pending -= n;
                r.pos += n;
                self.serves += 1;
                r.last_served = self.serves;
                budget -= n;
                batch.push(BatchItem {
                    id: r.id,
                    tokens: n,
                    decode,
                });
            }
        }
        batch
    }

    /// Tokens a sequence may feed this step with `budget` tokens left.
    fn chunk_len(&self, r: &Running, budget: usize) -> usize {
        if r.decoding {
            return r.pending.min(budget);
        }
        let mut n = r.pending.min(budget).min(self.cfg.prefill_chunk);
        let every = self.cfg.checkpoint_every;
        if every > 0 {
            n = n.min(every - r.pos % every);
        }
        n
    }

    fn running_mut(&mut self, id: SeqId) -> Option<&mut Running> {
        self.running.iter_mut().find(|r| r.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(tokens: usize, size: usize, chunk: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_batch_tokens: tokens,
            max_batch_size: size,
            prefill_chunk: chunk,
            checkpoint_every: 0,
            max_waiting: 100,
            max_output_rows: 256,
        })
        .unwrap()
    }

    fn add(s: &mut Scheduler, id: SeqId, prompt: usize) {
        s.enqueue(id).unwrap();
        assert_eq!(s.admit(1), vec![id]);
        s.start(id, 0, prompt);
    }

    fn item(id: SeqId, tokens: usize, decode: bool) -> BatchItem {
        BatchItem { id, tokens, decode }
    }

    #[test]
    fn zero_budgets_are_rejected_by_name() {
        let err = Scheduler::new(SchedulerConfig {
            prefill_chunk: 0,
            ..SchedulerConfig::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("prefill_chunk"), "{err}");
    }

    #[test]
    fn long_prompts_are_chunked_and_decodes_come_first() {
        let mut s = sched(10, 8, 4);
        add(&mut s, 1, 1);
        s.plan();
        s.on_token(1); // Sequence 1 now decodes.
        add(&mut s, 2, 20);
        assert_eq!(s.plan(), vec![item(1, 1, true), item(2, 4, false)]);
        s.on_token(1);
        assert_eq!(s.plan(), vec![item(1, 1, true), item(2, 4, false)]);
    }

    #[test]
    fn a_long_prompt_does_not_stall_running_decodes() {
        let mut s = sched(8, 8, 1000);
        for id in 0..3 {
            add(&mut s, id, 1);
        }
        s.plan();
        add(&mut s, 9, 10_000);
        for _ in 0..5 {
            for id in 0..3 {
                s.on_token(id);
            }
            let plan = s.plan();
            let decodes: Vec<_> = plan.iter().filter(|i| i.decode).map(|i| i.id).collect();
            assert_eq!(decodes, vec![0, 1, 2]);
            assert_eq!(plan.iter().map(|i| i.tokens).sum::<usize>(), 8);
            assert_eq!(plan.last(), Some(&item(9, 5, false)));
        }
    }

    #[test]
    fn several_long_prompts_interleave() {
        let mut s = sched(4, 8, 4);
        add(&mut s, 1, 12);
        add(&mut s, 2, 12);
        let served: Vec<SeqId> = (0..6).flat_map(|_| s.plan()).map(|i| i.id).collect();
        assert_eq!(served, vec![1, 2, 1, 2, 1, 2]);
        assert!(s.plan().is_empty());
    }

    #[test]
    fn decodes_beyond_the_batch_size_rotate() {
        let mut s = sched(100, 2, 4);
        for id in 0..3 {
            add(&mut s, id, 0);
            s.on_token(id); // Decoding, one sampled token pending.
        }
        let mut counts = [0; 3];
        for _ in 0..6 {
            for i in s.plan() {
                counts[i.id as usize] += 1;
                // Only served sequences sample a new token; the others keep theirs pending.
                s.on_token(i.id);
            }
        }
        assert_eq!(counts.iter().sum::<i32>(), 12);
        assert!(counts.iter().all(|&c| c == 4), "{counts:?}");
    }

    #[test]
    fn batch_size_and_token_budget_are_respected() {
        let mut s = sched(10, 3, 8);
        for id in 0..5 {
            add(&mut s, id, 8);
        }
        for _ in 0..10 {
            let plan = s.plan();
            assert!(plan.len() <= 3);
            assert!(plan.iter().map(|i| i.tokens).sum::<usize>() <= 10);
        }
    }

    #[test]
    fn prefill_chunks_end_at_checkpoint_multiples() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_batch_tokens: 100,
            prefill_chunk: 8,
            checkpoint_every: 5,
            ..SchedulerConfig::default()
        })
        .unwrap();
        s.enqueue(1).unwrap();
        s.admit(1);
        s.start(1, 3, 14); // Resumes at position 3 (a cache hit) with 14 tokens to go.
        let chunks: Vec<usize> = (0..5).flat_map(|_| s.plan()).map(|i| i.tokens).collect();
        assert_eq!(chunks, vec![2, 5, 5, 2]);
    }

    #[test]
    fn forks_run_without_admission_and_are_planned_like_prefills() {
        let mut s = sched(100, 8, 4);
        add(&mut s, 1, 0);
        s.on_token(1);
        s.fork(7, 30, 6); // A fork at position 30 with 6 tokens to feed.
        assert_eq!((s.waiting_len(), s.running_len()), (0, 2));
        assert_eq!(s.plan(), vec![item(1, 1, true), item(7, 4, false)]);
        assert_eq!(s.plan(), vec![item(7, 2, false)]);
        assert!(s.plan().is_empty());
        s.start(7, 36, 3); // The fork's slot is reused for more work.
        assert_eq!(s.plan(), vec![item(7, 3, false)]);
    }

    #[test]
    fn forked_choices_queue_first_past_the_bound_and_renames_keep_progress() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_waiting: 1,
            prefill_chunk: 4,
            ..SchedulerConfig::default()
        })
        .unwrap();
        s.enqueue(1).unwrap();
        // Work already admitted as part of a request does not count against the bound.
        s.enqueue_front(9);
        assert_eq!(s.waiting_len(), 2);
        assert_eq!(s.admit(1), vec![9]);
        s.start(9, 0, 10);
        assert_eq!(s.plan(), vec![item(9, 4, false)]);
        // A renamed sequence keeps its progress (and a waiting one its place).
        s.rename(9, 10);
        s.rename(1, 2);
        assert_eq!(s.plan(), vec![item(10, 4, false)]);
        assert_eq!(s.admit(1), vec![2]);
    }

    #[test]
    fn admission_is_fifo_bounded_by_capacity_and_the_queue_is_bounded() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_waiting: 3,
            ..SchedulerConfig::default()
        })
        .unwrap();
        for id in 0..3 {
            s.enqueue(id).unwrap();
        }
        assert!(matches!(
            s.enqueue(3),
            Err(EngineError::Overloaded { limit: 3, .. })
        ));
        assert_eq!(s.admit(2), vec![0, 1]);
        assert_eq!((s.waiting_len(), s.running_len()), (1, 2));
        s.remove(0);
        s.remove(2);
        assert_eq!((s.waiting_len(), s.running_len()), (0, 1));
        assert!(s.admit(5).is_empty());
    }

    #[test]
    fn sequences_needing_every_row_share_the_step_row_budget() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_batch_tokens: 1024,
            max_output_rows: 100,
            ..SchedulerConfig::default()
        })
        .unwrap();
        for id in 1..=3 {
            add(&mut s, id, 80);
        }
        s.needs_all_rows(1);
        s.needs_all_rows(2);
        // Lane 1 takes 80 rows, lane 2 the 20 left; the plain prefill is not limited.
        assert_eq!(
            s.plan(),
            vec![item(1, 80, false), item(2, 20, false), item(3, 80, false)]
        );
        assert_eq!(s.plan(), vec![item(2, 60, false)]);
        let zero = SchedulerConfig {
            max_output_rows: 0,
            ..SchedulerConfig::default()
        };
        assert!(Scheduler::new(zero).is_err());
    }

    #[test]
    fn a_held_sequence_keeps_its_place_but_is_not_planned() {
        let mut s = sched(64, 8, 16);
        for id in [1, 2] {
            s.enqueue(id).unwrap();
        }
        s.admit(2);
        s.start(1, 0, 0);
        s.start(2, 0, 0);
        s.on_token(1);
        s.on_token(2);
        let planned = |s: &mut Scheduler| s.plan().iter().map(|b| b.id).collect::<Vec<_>>();
        s.hold(1, true);
        assert_eq!(planned(&mut s), vec![2]);
        s.on_token(2);
        assert_eq!(planned(&mut s), vec![2], "held: still not planned");
        assert_eq!(s.running_len(), 2, "a held sequence keeps its slot");
        s.hold(1, false);
        let released = s.plan();
        assert_eq!(
            released[0].id, 1,
            "released: its pending tokens run, least served first"
        );
        assert_eq!(released[0], item(1, 1, true));
    }
}
