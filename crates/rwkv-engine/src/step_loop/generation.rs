//! Generations in the step loop: enqueueing a request, sampling a token from each last logits
//! row, and reporting the token events and the end of the stream.

use std::collections::HashMap;
use std::thread;
use std::time::Instant;

use rwkv_model::{Backend, Candidate, OutputRows};

use super::{Core, Role, Seq};
use crate::error::EngineError;
use crate::request::{EventSender, FinishReason, GenerateEvent, GenerateRequest, Sibling, Usage};
use crate::sampler::Sampler;
use crate::scheduler::SeqId;
use crate::sessions::SessionKey;

/// What a generating sequence carries besides its tokens.
pub(crate) struct Generation {
    pub(crate) sampler: Sampler,
    pub(crate) top_logprobs: Option<usize>,
    pub(crate) usage: Usage,
    /// The client's end of the stream; a failed send means it went away (cancellation).
    pub(crate) events: EventSender,
    /// When the handle accepted the request: time to first token counts from here, so it
    /// includes the wait in the command channel and for a slot.
    pub(crate) submitted: Instant,
    /// When the previous token was emitted (inter-token latency).
    pub(crate) last_token: Option<Instant>,
    /// The request's other choices, until this one's prompt is in and they are forked from it.
    pub(crate) siblings: Vec<Sibling>,
    /// Not stepped while its reader is behind ([`Core::hold_slow_readers`]).
    pub(crate) held: bool,
}

/// Unread events at which a generation is held: its reader (the worker's stream to a client
/// that stopped reading, say) is this far behind, and more tokens would only pile up in memory.
pub(crate) const HOLD_AT_UNREAD: usize = 256;
/// Unread events at or below which a held generation runs again.
pub(crate) const RESUME_AT_UNREAD: usize = 64;

impl Generation {
    /// What a decode step asks the backend for: the row's best tokens for greedy sampling, the
    /// kept set of the sampling filters where the backend decides those (it may still return
    /// the row), or the whole row where log-probabilities, bans or penalties need it.
    pub(crate) fn decode_output(&self, backend_decides_nucleus: bool) -> OutputRows {
        if self.top_logprobs.is_some() {
            return OutputRows::Last;
        }
        if let Some(k) = self.sampler.candidates_needed() {
            return OutputRows::Top(k);
        }
        match self.sampler.nucleus_filter() {
            Some(filter) if backend_decides_nucleus => OutputRows::Nucleus(filter),
            _ => OutputRows::Last,
        }
    }

    /// Sends the stream's last event; the client may be gone already. Choices not forked yet
    /// end the same way (they never started, so they have no tokens).
    pub(crate) fn finished(&self, reason: FinishReason) {
        let _ = self.events.send(GenerateEvent::Finished {
            reason,
            usage: self.usage,
        });
        for sibling in &self.siblings {
            let _ = sibling.events.send(GenerateEvent::Finished {
                reason,
                usage: Usage::default(),
            });
        }
    }

    /// Ends the stream with an error; the client may be gone already. Choices not forked yet
    /// fail too.
    pub(crate) fn failed(&self, e: EngineError) {
        for sibling in &self.siblings {
            let _ = sibling.events.send(GenerateEvent::Error(e.clone()));
        }
        let _ = self.events.send(GenerateEvent::Error(e));
    }
}

impl<B: Backend> Core<B> {
    /// Holds the generations whose readers fell [`HOLD_AT_UNREAD`] events behind and releases
    /// those whose readers caught up to [`RESUME_AT_UNREAD`]. A held generation keeps its slot,
    /// state and sampled token, so it continues exactly; preemption takes its slot first when
    /// requests wait. Called before each plan.
    pub(super) fn hold_slow_readers(&mut self) {
        let mut held = 0;
        for (&id, seq) in &mut self.seqs {
            let Role::Generate(g) = &mut seq.role else {
                continue;
            };
            // Only a generation on a slot is held: the scheduler starts every admission
            // released, so one waiting now is judged again once it runs.
            if seq.slot.is_none() {
                g.held = false;
                continue;
            }
            let unread = g.events.unread();
            let hold = if g.held {
                unread > RESUME_AT_UNREAD
            } else {
                unread >= HOLD_AT_UNREAD
            };
            if hold != g.held {
                g.held = hold;
                self.sched.hold(id, hold);
            }
            held += usize::from(hold);
        }
        self.metrics.held_for_readers(held);
    }

    /// Whether a generation's reader keeps up (a held one would be released).
    pub(crate) fn reader_keeps_up(seq: &Seq) -> bool {
        match &seq.role {
            Role::Generate(g) => g.events.unread() <= RESUME_AT_UNREAD,
            Role::Score(_) => true,
        }
    }

    /// Generations held for their readers.
    pub(crate) fn held_len(&self) -> usize {
        self.seqs
            .values()
            .filter(|s| matches!(&s.role, Role::Generate(g) if g.held))
            .count()
    }

    pub(super) fn enqueue_generation(
        &mut self,
        id: SeqId,
        req: Box<GenerateRequest>,
        sampler: Box<Sampler>,
        events: EventSender,
        submitted: Instant,
        siblings: Vec<Sibling>,
    ) {
        let session = req.session.map(|sid| SessionKey::new(&req.tenant, sid));
        let mut req = *req;
        if let Some(key) = &session {
            if self.needs_separator(key, &req.params.end_tokens) {
                req.tokens.splice(0..0, req.separator.iter().copied());
            }
        }
        let checked = self
            .usable()
            .and_then(|()| match &session {
                Some(key) => self.claim_session(key, id, req.tokens.len()),
                None if req.tokens.is_empty() => Err(EngineError::EmptyInput),
                None => Ok(()),
            })
            .and_then(|()| self.sched.enqueue(id));
        if let Err(e) = checked {
            if let Some(key) = &session {
                self.release_session(key, id);
            }
            // The client may be gone already; then nobody needs the error.
            for sibling in &siblings {
                let _ = sibling.events.send(GenerateEvent::Error(e.clone()));
            }
            let _ = events.send(GenerateEvent::Error(e));
            return;
        }
        let generation = Generation {
            sampler: *sampler,
            top_logprobs: req.top_logprobs,
            usage: Usage::default(),
            events,
            submitted,
            last_token: None,
            siblings,
            held: false,
        };
        let seq = Seq {
            tenant: req.tenant,
            session,
            input: req.tokens,
            slot: None,
            fed: Vec::new(),
            unfed: Vec::new(),
            finish: None,
            role: Role::Generate(Box::new(generation)),
            forked: None,
            preempted: None,
            placed_step: 0,
        };
        self.seqs.insert(id, seq);
    }

    /// Samples the next token of each generation from its logits row and sends it; a client
    /// that went away is cancelled. Large batches sample on several threads: every sequence has
    /// its own sampler and random stream, so the tokens do not depend on the split. Returns the
    /// number of tokens emitted.
    pub(super) fn sample_generations(
        &mut self,
        rows: Vec<(SeqId, Pick<'_>)>,
        now: Instant,
    ) -> usize {
        // Choices forked now sample their first token from copies of the row, before the first
        // choice's sampler touches it.
        let mut forked_rows = Vec::new();
        for (id, pick) in &rows {
            if let Pick::Row(row) = pick {
                forked_rows.extend(self.fork_choices(*id, row));
            }
        }
        let mut rows: HashMap<SeqId, Pick<'_>> = rows.into_iter().collect();
        rows.extend(
            forked_rows
                .iter_mut()
                .map(|(id, row)| (*id, Pick::Row(&mut row[..]))),
        );
        let mut work: Vec<Draw<'_>> = self
            .seqs
            .iter_mut()
            .filter_map(|(&id, seq)| {
                let pick = rows.remove(&id)?;
                Some(Draw {
                    id,
                    seq,
                    pick,
                    event: None,
                })
            })
            .collect();
        work.sort_unstable_by_key(|d| d.id);
        let exempt = &self.exempt[..];
        let draw = |d: &mut Draw<'_>| {
            if let Role::Generate(g) = &mut d.seq.role {
                d.event = sample_one(g, &mut d.seq.unfed, &mut d.seq.finish, &mut d.pick, exempt);
            }
        };
        let threads = self
            .sampling_threads
            .min(work.len() / PARALLEL_SAMPLING_ROWS);
        if threads > 1 {
            let per_thread = work.len().div_ceil(threads);
            thread::scope(|s| {
                for chunk in work.chunks_mut(per_thread) {
                    s.spawn(|| chunk.iter_mut().for_each(draw));
                }
            });
        } else {
            work.iter_mut().for_each(draw);
        }
        let events: Vec<(SeqId, Option<GenerateEvent>)> =
            work.into_iter().map(|d| (d.id, d.event)).collect();
        events
            .into_iter()
            .map(|(id, event)| self.emit(id, event, now))
            .sum()
    }

    /// Sends a sampled token (none when the generation ended without one) and records its
    /// latency. Returns the number of tokens emitted (0 or 1).
    fn emit(&mut self, id: SeqId, event: Option<GenerateEvent>, now: Instant) -> usize {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return 0;
        };
        let Role::Generate(g) = &mut seq.role else {
            return 0;
        };
        let Some(event) = event else {
            return 0;
        };
        match g.last_token.replace(now) {
            None => self.metrics.first_token(now - g.submitted),
            Some(previous) => self.metrics.next_token(now - previous),
        }
        if g.events.send(event).is_err() {
            seq.finish = Some(FinishReason::Cancelled);
        }
        if seq.finish.is_none() {
            self.sched.on_token(id);
        }
        1
    }
}

/// Rows each sampling thread gets at least: below that, starting a thread costs more than the
/// rows it would take (a 65,536-entry top-p row takes tens of microseconds).
const PARALLEL_SAMPLING_ROWS: usize = 8;

/// What a generation's next token is drawn from.
pub(crate) enum Pick<'a> {
    /// The whole logits row (sampling may rewrite it).
    Row(&'a mut [f32]),
    /// The row's best tokens, best first: enough for greedy sampling without penalties
    /// ([`Sampler::candidates_needed`]).
    Candidates(&'a [Candidate]),
    /// The tokens the backend's nucleus filter kept, best first
    /// ([`Sampler::nucleus_filter`]).
    Kept(&'a [Candidate]),
}

/// One generation's sampling work in a step.
struct Draw<'a> {
    id: SeqId,
    seq: &'a mut Seq,
    pick: Pick<'a>,
    event: Option<GenerateEvent>,
}

/// Samples one token from the logits row. Returns the token event, if a token is emitted; sets
/// `finish` when the generation ends (stop token, `max_tokens`).
fn sample_one(
    g: &mut Generation,
    unfed: &mut Vec<u32>,
    finish: &mut Option<FinishReason>,
    pick: &mut Pick<'_>,
    exempt: &[bool],
) -> Option<GenerateEvent> {
    let max_tokens = g.sampler.params().max_tokens;
    if g.usage.generated_tokens >= max_tokens {
        *finish = Some(FinishReason::Length);
        return None;
    }
    let (token, logprobs) = match (pick, g.top_logprobs) {
        (Pick::Candidates(candidates), _) => (g.sampler.pick_from_candidates(candidates), None),
        (Pick::Kept(kept), _) => (g.sampler.pick_from_kept(kept), None),
        (Pick::Row(logits), Some(n)) => {
            let lp = g.sampler.sample_with_logprobs(logits, n);
            (lp.token, Some(lp))
        }
        (Pick::Row(logits), None) => (g.sampler.sample(logits), None),
    };
    if g.sampler.is_stop_token(token) {
        *finish = Some(FinishReason::Stop);
        return None;
    }
    g.sampler
        .record(token, exempt.get(token as usize).copied().unwrap_or(false));
    g.usage.generated_tokens += 1;
    // The token joins the conversation now; it is fed next step unless the generation ends, in
    // which case it stays pending for a session's next turn.
    unfed.push(token);
    if g.sampler.is_end_token(token) {
        *finish = Some(FinishReason::Stop);
    } else if g.usage.generated_tokens >= max_tokens {
        *finish = Some(FinishReason::Length);
    }
    Some(GenerateEvent::Token { token, logprobs })
}
