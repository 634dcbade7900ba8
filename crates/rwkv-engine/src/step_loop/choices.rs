//! Multi-choice generations (`n > 1`): one prefill, then a fork per extra choice.
//!
//! A request's first choice carries the others as [`Sibling`]s. When its prompt is in and its
//! first token is about to be sampled, every sibling becomes a sequence of its own: in a free
//! slot, with a device copy of the state, sampling its first token from a copy of the same
//! logits row in the same step; or, with no free slot, waiting at the front of the queue with a
//! host copy of that state and row ([`Forked`]), so that it samples its first token when it is
//! placed. Either way it never runs the prompt again, and from then on each choice is an
//! ordinary generation. Cancelling the first choice before the fork hands its place (and its
//! prefill so far) to the next sibling.

use std::sync::Arc;

use rwkv_model::Backend;

use super::{Core, Forked, Generation, Role, Seq};
use crate::error::EngineError;
use crate::request::{FinishReason, GenerateEvent, Usage};
use crate::scheduler::SeqId;
use crate::telemetry::Ended;

impl<B: Backend> Core<B> {
    /// Starts the siblings of generation `id`, whose prompt is in and whose logits are `row`.
    /// Returns the choices that got a slot now, each with its own copy of the row to sample
    /// from in this step.
    pub(super) fn fork_choices(&mut self, id: SeqId, row: &[f32]) -> Vec<(SeqId, Vec<f32>)> {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return Vec::new();
        };
        let Role::Generate(g) = &mut seq.role else {
            return Vec::new();
        };
        if g.siblings.is_empty() {
            return Vec::new();
        }
        let siblings = std::mem::take(&mut g.siblings);
        let (top_logprobs, submitted, prompt_tokens) =
            (g.top_logprobs, g.submitted, g.usage.prompt_tokens);
        let (tenant, fed, source) = (seq.tenant.clone(), seq.fed.clone(), seq.slot);
        let mut ready = Vec::new();
        // The host copy shared by every choice that has to wait for a slot, made at most once.
        let mut waiting_copy: Option<Arc<Forked>> = None;
        for sibling in siblings {
            let generation = Generation {
                sampler: *sibling.sampler,
                top_logprobs,
                // The whole prompt is in the state it starts from: nothing was prefilled for it.
                usage: Usage {
                    prompt_tokens,
                    cached_tokens: prompt_tokens,
                    generated_tokens: 0,
                },
                events: sibling.events,
                submitted,
                last_token: None,
                siblings: Vec::new(),
                held: false,
            };
            let mut child = Seq {
                tenant: tenant.clone(),
                session: None,
                input: Vec::new(),
                slot: None,
                fed: Vec::new(),
                unfed: Vec::new(),
                finish: None,
                role: Role::Generate(Box::new(generation)),
                forked: None,
                preempted: None,
                placed_step: 0,
            };
            // While admitted sequences are being placed, the free slots are theirs.
            let free = if self.placing {
                None
            } else {
                self.slots.take_free()
            };
            let started = match (source, free) {
                (None, _) => Err(EngineError::Config("a choice forked from no slot".into())),
                (Some(src), Some(slot)) => match self.backend.copy_state(src, slot) {
                    Ok(()) => {
                        child.slot = Some(slot);
                        child.placed_step = self.steps;
                        child.fed.clone_from(&fed);
                        self.sched.fork(sibling.id, fed.len(), 0);
                        ready.push((sibling.id, row.to_vec()));
                        Ok(())
                    }
                    Err(e) => {
                        self.slots.release(slot);
                        Err(e.into())
                    }
                },
                (Some(src), None) => self.host_copy(&mut waiting_copy, src, row).map(|f| {
                    child.input.clone_from(&fed);
                    child.forked = Some(f);
                    // The request was admitted as a whole: its choices do not queue again
                    // behind later requests, nor count against the waiting bound.
                    self.sched.enqueue_front(sibling.id);
                }),
            };
            match started {
                Ok(()) => {
                    self.seqs.insert(sibling.id, child);
                }
                Err(e) => {
                    if let Role::Generate(g) = &child.role {
                        g.failed(e);
                    }
                    self.metrics.ended(Ended::GenerationFailed);
                }
            }
        }
        ready
    }

    /// The host copy of slot `src` and of `row` that waiting choices start from, made on first
    /// use.
    fn host_copy(
        &mut self,
        copy: &mut Option<Arc<Forked>>,
        src: usize,
        row: &[f32],
    ) -> Result<Arc<Forked>, EngineError> {
        if let Some(f) = copy {
            return Ok(Arc::clone(f));
        }
        let forked = Arc::new(Forked {
            state: self.backend.save_state(src)?,
            logits: row.to_vec(),
        });
        *copy = Some(Arc::clone(&forked));
        Ok(forked)
    }

    /// Cancels `id` if it is a choice that has not been forked yet, or the first choice of a
    /// request whose other choices have not been forked yet (the next choice takes its place).
    /// False if `id` is neither: an ordinary cancellation.
    pub(super) fn cancel_choice(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return self.cancel_unforked(id);
        };
        let Role::Generate(g) = &mut seq.role else {
            return false;
        };
        // Siblings are forked when the prompt's logits come back, before the first token is
        // sampled: a lead that has sampled has none left to hand its sequence to (and its
        // sequence holds its own tokens, which no other choice may inherit).
        if g.siblings.is_empty() || g.usage.generated_tokens > 0 {
            return false;
        }
        // The next choice inherits the sequence (its place in the queue and its prefill so
        // far); only its sampler and stream are its own.
        let heir = g.siblings.remove(0);
        let cancelled = std::mem::replace(&mut g.events, heir.events);
        g.sampler = *heir.sampler;
        let _ = cancelled.send(GenerateEvent::Finished {
            reason: FinishReason::Cancelled,
            usage: Usage::default(),
        });
        if let Some(seq) = self.seqs.remove(&id) {
            self.seqs.insert(heir.id, seq);
        }
        self.sched.rename(id, heir.id);
        self.metrics
            .ended(Ended::Generation(FinishReason::Cancelled));
        true
    }

    /// Cancels a choice that is still waiting for its first choice's prompt.
    fn cancel_unforked(&mut self, id: SeqId) -> bool {
        for seq in self.seqs.values_mut() {
            let Role::Generate(g) = &mut seq.role else {
                continue;
            };
            if let Some(i) = g.siblings.iter().position(|s| s.id == id) {
                let sibling = g.siblings.remove(i);
                let _ = sibling.events.send(GenerateEvent::Finished {
                    reason: FinishReason::Cancelled,
                    usage: Usage::default(),
                });
                self.metrics
                    .ended(Ended::Generation(FinishReason::Cancelled));
                return true;
            }
        }
        false
    }
}
