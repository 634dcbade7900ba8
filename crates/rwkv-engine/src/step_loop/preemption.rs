//! Preemption: long generations yield their slots to new requests.
//!
//! Slots are few (each is a whole recurrent state on the device), so without preemption a
//! request that arrives when every slot runs a long generation waits until one finishes. Before
//! each admission, if new requests wait and no slot is available, the generations that have held
//! their slot for `preempt_after_steps` steps (longest holder first) are swapped out: the state
//! goes to host memory with the sequence, the sequence goes to the back of the queue, and the
//! slot to the oldest waiting request. A preempted generation is re-admitted like any waiting
//! request and continues exactly (its state, tokens and sampler are untouched).
//!
//! Only new requests trigger preemption by age, never the preempted ones waiting to resume (that
//! would swap two generations back and forth every step). A generation held because its reader
//! fell behind does nothing with its slot, so it gives it up to anything waiting that can run,
//! whatever its age and even with preemption by age off. At most as many generations are
//! preempted at once as there are slots, which bounds their host memory by one copy of the pool.

use std::time::Instant;

use rwkv_model::{Backend, State};

use super::{Core, Role, Seq};
use crate::error::EngineError;
use crate::scheduler::SeqId;
use crate::telemetry::Swap;
use crate::tiers::Weigh;

impl<B: Backend> Core<B> {
    /// Preempts generations while requests wait for slots: first those held for their readers
    /// (they do nothing with their slots), for any waiting sequence that can run, a preempted
    /// generation whose reader keeps up included, and even with preemption by age off; then,
    /// for new requests, those that have held their slots for `preempt_after_steps` steps.
    pub(super) fn preempt_for_waiting(&mut self) {
        if self.sched.waiting_len() == 0 {
            return;
        }
        let mut fresh = 0usize;
        let mut resumable = Vec::new();
        for (&id, seq) in self.seqs.iter().filter(|(_, s)| s.slot.is_none()) {
            if seq.preempted.is_none() {
                fresh += 1;
            } else if Self::reader_keeps_up(seq) {
                resumable.push(id);
            }
        }
        // In request order, so that which heir is promoted does not depend on hashing.
        resumable.sort_unstable();
        let total = self.slots.total();
        // Preempted states held in host memory once admission has run.
        let mut preempted = self.preempted_len();
        let need = (fresh + resumable.len()).saturating_sub(self.slots.available());
        // A held generation swapped out lets a resumable one back in while there are some (the
        // host then holds as many preempted states as before: the resumable one goes to the
        // front of the queue, so that it, not a new request, takes the slot), else a new
        // request (one more).
        let mut resumable = resumable.into_iter();
        for _ in 0..need {
            let trade = resumable.len() > 0;
            if !trade && preempted >= total {
                break;
            }
            let Some(id) = self.held_holder() else { break };
            if self.preempt(id).is_err() {
                return;
            }
            match resumable.next() {
                Some(heir) => self.sched.promote(heir),
                None => preempted += 1,
            }
        }
        let quantum = self.cfg.preempt_after_steps;
        if quantum == 0 {
            return;
        }
        // New requests waiting: not preempted ones (those only take free slots).
        let mut need = fresh.saturating_sub(self.slots.available());
        while need > 0 && preempted < self.slots.total() {
            let Some(id) = self.longest_holder(quantum) else {
                return;
            };
            if self.preempt(id).is_err() {
                // The state could not be saved: the generation keeps its slot and goes on (the
                // next forward step will report a backend that is really broken).
                return;
            }
            need -= 1;
            preempted += 1;
        }
    }

    /// A generation held for its reader on a slot, the one held longest first.
    fn held_holder(&self) -> Option<SeqId> {
        self.longest_decoding(|s| matches!(&s.role, Role::Generate(g) if g.held))
    }

    /// The decoding generation that has held its slot longest, if for at least `quantum` steps.
    fn longest_holder(&self, quantum: u64) -> Option<SeqId> {
        self.longest_decoding(|s| self.steps.saturating_sub(s.placed_step) >= quantum)
    }

    /// Of the generations decoding on a slot that are `eligible`, the one placed earliest.
    fn longest_decoding(&self, eligible: impl Fn(&Seq) -> bool) -> Option<SeqId> {
        self.seqs
            .iter()
            .filter(|(_, s)| {
                s.slot.is_some() && s.finish.is_none() && s.is_decoding() && eligible(s)
            })
            .min_by_key(|(&id, s)| (s.placed_step, id))
            .map(|(&id, _)| id)
    }

    /// Swaps generation `id` out to host memory and queues it again.
    fn preempt(&mut self, id: SeqId) -> Result<(), EngineError> {
        let Some(slot) = self.seqs.get(&id).and_then(|s| s.slot) else {
            return Ok(());
        };
        let started = Instant::now();
        let state = self.backend.save_state(slot)?;
        self.metrics
            .swap(Swap::Out, state.bytes(), started.elapsed());
        self.metrics.preempted();
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.slot = None;
            seq.preempted = Some(state);
            // The scheduler forgets the hold with the slot; it is decided again on resuming.
            if let Role::Generate(g) = &mut seq.role {
                g.held = false;
            }
        }
        self.slots.release(slot);
        self.sched.preempt(id);
        Ok(())
    }

    /// Puts a re-admitted preempted generation back on a slot, where it stopped.
    pub(super) fn resume(&mut self, id: SeqId, state: State) -> Result<(), EngineError> {
        let slot = match self.acquire_slot() {
            Ok(slot) => slot,
            Err(e) => {
                // Keep the state with the sequence: failing it hands a session's state on.
                if let Some(seq) = self.seqs.get_mut(&id) {
                    seq.preempted = Some(state);
                }
                return Err(e);
            }
        };
        let started = Instant::now();
        if let Err(e) = self.backend.load_state(slot, &state) {
            self.slots.release(slot);
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.preempted = Some(state);
            }
            return Err(e.into());
        }
        self.metrics
            .swap(Swap::In, state.bytes(), started.elapsed());
        let Some(seq) = self.seqs.get_mut(&id) else {
            self.slots.release(slot);
            return Ok(());
        };
        seq.slot = Some(slot);
        seq.placed_step = self.steps;
        self.sched
            .resume(id, seq.fed.len(), seq.unfed.len(), seq.is_decoding());
        Ok(())
    }

    /// Generations preempted and waiting to resume.
    pub(crate) fn preempted_len(&self) -> usize {
        self.seqs.values().filter(|s| s.preempted.is_some()).count()
    }
}
