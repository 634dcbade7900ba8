//! Scoring requests in the step loop: a job and its lanes.
//!
//! A request becomes a job worked on by one or more lanes (sequences the scheduler plans like
//! prompts, so scoring shares batches with decodes under the same budgets and fairness). The
//! first lane is admitted like a prompt and prefills the context, through the prefix cache; the
//! context's last logits row scores every continuation's first token. Each continuation of two or
//! more tokens (a branch) then feeds all its tokens but the last from a copy of the context's
//! state, asking for every row:
//! - the first lane runs one branch itself: its slot already holds the context;
//! - more branches get lanes of their own in slots that are free at that moment, each a
//!   `copy_state` of the context. Nobody waits for those slots (admission has just run and left
//!   them), so this parallelism never delays another request;
//! - when branches outnumber lanes, the context state is also saved to host memory once, and a
//!   lane that finishes a branch reloads it for the next one.
//!
//! A job therefore needs only the one slot it was admitted with and never holds a slot while
//! waiting for another, so jobs cannot deadlock each other.

use std::collections::VecDeque;

use rwkv_model::{Backend, State};

use super::{Core, Role, Seq};
use crate::error::EngineError;
use crate::logprobs::LogSoftmax;
use crate::request::FinishReason;
use crate::scheduler::SeqId;
use crate::score::{ContinuationScore, ScoreRequest, ScoreResult};
use crate::telemetry::Ended;

/// What a scoring sequence works on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Lane {
    /// The request (its id).
    pub(crate) job: SeqId,
    /// The continuation being fed; `None` while feeding the context.
    pub(crate) branch: Option<usize>,
}

/// One scoring request in flight.
pub(crate) struct ScoreJob {
    continuations: Vec<Vec<u32>>,
    /// Alternatives per position, capped at the vocabulary.
    top_n: Option<usize>,
    scores: Vec<ContinuationScore>,
    context_tokens: usize,
    cached_tokens: usize,
    /// The context, once fed: the history of every lane that starts a branch.
    context: Vec<u32>,
    /// Branches (continuation indices) no lane has started.
    pending: VecDeque<usize>,
    /// Branches not fully scored; the job answers when none is left.
    unscored: usize,
    /// The context state in host memory, while branches wait for a lane.
    saved: Option<State>,
    /// Every lane the job has had (cancelling the job stops those still running).
    lanes: Vec<SeqId>,
    reply: crate::channel::Tx<Result<ScoreResult, EngineError>>,
}

impl ScoreJob {
    /// The first lane got its slot: the context's length and the part the prefix cache covered.
    pub(crate) fn placed(&mut self, context_tokens: usize, cached_tokens: usize) {
        self.context_tokens = context_tokens;
        self.cached_tokens = cached_tokens;
    }
}

/// Appends one token's score computed from the row that predicts it.
fn score_token(
    score: &mut ContinuationScore,
    row: &LogSoftmax<'_>,
    token: u32,
    top: Option<Vec<(u32, f32)>>,
) {
    score.logprobs.push(row.logprob(token));
    score.greedy &= row.argmax() == token;
    if let Some(top) = top {
        score.top.push(top);
    }
}

impl<B: Backend> Core<B> {
    /// Queues a validated request as a job with one lane, which waits for a slot like a prompt.
    pub(super) fn enqueue_score(
        &mut self,
        id: SeqId,
        req: ScoreRequest,
        reply: crate::channel::Tx<Result<ScoreResult, EngineError>>,
    ) {
        if let Err(e) = self.usable().and_then(|()| self.sched.enqueue(id)) {
            // The caller may be gone already; then nobody needs the error.
            let _ = reply.send(Err(e));
            return;
        }
        let scores = req
            .continuations
            .iter()
            .map(|c| ContinuationScore {
                logprobs: Vec::with_capacity(c.len()),
                greedy: true,
                top: Vec::new(),
            })
            .collect();
        let job = ScoreJob {
            top_n: req.top_logprobs.map(|n| n.min(self.vocab())),
            continuations: req.continuations,
            scores,
            context_tokens: 0,
            cached_tokens: 0,
            context: Vec::new(),
            pending: VecDeque::new(),
            unscored: 0,
            saved: None,
            lanes: vec![id],
            reply,
        };
        self.jobs.insert(id, job);
        let lane = Lane {
            job: id,
            branch: None,
        };
        let seq = Seq {
            tenant: req.tenant,
            session: None,
            input: req.context,
            slot: None,
            fed: Vec::new(),
            unfed: Vec::new(),
            finish: None,
            role: Role::Score(lane),
            forked: None,
            preempted: None,
            placed_step: 0,
        };
        self.seqs.insert(id, seq);
    }

    /// Cancels job `id` if it is one: its lanes leave at the end of the step and nobody is
    /// answered (the caller dropped its handle). False if no such job exists.
    pub(super) fn cancel_job(&mut self, id: SeqId) -> bool {
        let Some(job) = self.jobs.remove(&id) else {
            return false;
        };
        self.stop_lanes(&job.lanes);
        self.metrics.ended(Ended::ScoreCancelled);
        true
    }

    /// Answers job `id` with an error and stops its other lanes.
    pub(super) fn fail_job(&mut self, id: SeqId, e: EngineError) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let _ = job.reply.send(Err(e));
        self.stop_lanes(&job.lanes);
        self.metrics.ended(Ended::ScoreFailed);
    }

    fn stop_lanes(&mut self, lanes: &[SeqId]) {
        for lane in lanes {
            if let Some(seq) = self.seqs.get_mut(lane) {
                seq.finish.get_or_insert(FinishReason::Cancelled);
            }
        }
    }

    /// Takes the logit rows of lane `id` after it fed a chunk that started at history length
    /// `before`: the context's last row, or one row per fed continuation token.
    pub(super) fn lane_rows(
        &mut self,
        id: SeqId,
        lane: Lane,
        before: usize,
        rows: &[f32],
        vocab: usize,
    ) {
        if !self.jobs.contains_key(&lane.job) {
            // Cancelled or failed meanwhile; the lane only has to leave.
            self.finish_lane(id, FinishReason::Cancelled);
            return;
        }
        let outcome = match lane.branch {
            None if rows.is_empty() => Ok(()), // A context chunk before the last.
            None => self.context_scored(id, lane.job, rows),
            Some(index) => self.branch_scored(id, lane.job, index, before, rows, vocab),
        };
        if let Err(e) = outcome {
            self.fail_job(lane.job, e);
        }
    }

    /// The context is in lane `id`'s state and `row` predicts each continuation's first token:
    /// score those, then start the branches.
    fn context_scored(&mut self, id: SeqId, job_id: SeqId, row: &[f32]) -> Result<(), EngineError> {
        let context = self.seqs[&id].fed.clone();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Ok(());
        };
        let dist = LogSoftmax::new(row);
        let top = job.top_n.map(|n| dist.top(n));
        for (cont, score) in job.continuations.iter().zip(&mut job.scores) {
            score_token(score, &dist, cont[0], top.clone());
        }
        job.context = context;
        job.pending = (0..job.continuations.len())
            .filter(|&i| job.continuations[i].len() > 1)
            .collect();
        job.unscored = job.pending.len();
        if job.unscored == 0 {
            self.finish_lane(id, FinishReason::Length);
            self.finish_job(job_id);
            return Ok(());
        }
        self.fork_branches(id, job_id)
    }

    /// Gives branches to lane `id` (which holds the context) and to new lanes in free slots.
    fn fork_branches(&mut self, id: SeqId, job_id: SeqId) -> Result<(), EngineError> {
        let source = self.seqs[&id]
            .slot
            .ok_or_else(|| EngineError::Config("scoring lane without a slot".into()))?;
        while self.jobs[&job_id].pending.len() > 1 {
            let Some(slot) = self.slots.take_free() else {
                break;
            };
            if let Err(e) = self.backend.copy_state(source, slot) {
                self.slots.release(slot);
                return Err(e.into());
            }
            let lane_id = self.next_id();
            let tenant = self.seqs[&id].tenant.clone();
            self.seqs.insert(
                lane_id,
                Seq {
                    tenant,
                    session: None,
                    input: Vec::new(),
                    slot: Some(slot),
                    fed: Vec::new(),
                    unfed: Vec::new(),
                    finish: None,
                    forked: None,
                    preempted: None,
                    placed_step: 0,
                    role: Role::Score(Lane {
                        job: job_id,
                        branch: None,
                    }),
                },
            );
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.lanes.push(lane_id);
            }
            let (pos, pending) = self.next_branch(lane_id, job_id);
            self.sched.fork(lane_id, pos, pending);
            self.sched.needs_all_rows(lane_id);
        }
        if self.jobs[&job_id].pending.len() > 1 {
            let saved = self.backend.save_state(source)?;
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.saved = Some(saved);
            }
        }
        let (pos, pending) = self.next_branch(id, job_id);
        self.sched.start(id, pos, pending);
        // Continuations need every token's logits: they share the step's row budget.
        self.sched.needs_all_rows(id);
        Ok(())
    }

    /// Sets lane `id` (whose state is the context) to feed the job's next pending branch and
    /// returns the scheduler's view of it: start position and tokens to feed.
    fn next_branch(&mut self, id: SeqId, job_id: SeqId) -> (usize, usize) {
        let (Some(job), Some(seq)) = (self.jobs.get_mut(&job_id), self.seqs.get_mut(&id)) else {
            return (0, 0);
        };
        let Some(index) = job.pending.pop_front() else {
            return (0, 0);
        };
        if job.pending.is_empty() {
            // Every branch has a lane now; nobody will reload the context.
            job.saved = None;
        }
        let cont = &job.continuations[index];
        seq.role = Role::Score(Lane {
            job: job_id,
            branch: Some(index),
        });
        seq.fed.clone_from(&job.context);
        seq.unfed = cont[..cont.len() - 1].to_vec();
        (seq.fed.len(), seq.unfed.len())
    }

    /// Scores the continuation tokens that `rows` predict; when the branch is done, the lane
    /// takes the next pending branch or leaves.
    fn branch_scored(
        &mut self,
        id: SeqId,
        job_id: SeqId,
        index: usize,
        before: usize,
        rows: &[f32],
        vocab: usize,
    ) -> Result<(), EngineError> {
        let done = self.seqs[&id].unfed.is_empty();
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return Ok(());
        };
        // Row `j` follows continuation token `offset + j`, so it predicts the one after it.
        let offset = before - job.context.len();
        let cont = &job.continuations[index];
        for (j, row) in rows.chunks_exact(vocab).enumerate() {
            let dist = LogSoftmax::new(row);
            let top = job.top_n.map(|n| dist.top(n));
            score_token(&mut job.scores[index], &dist, cont[offset + j + 1], top);
        }
        if !done {
            return Ok(());
        }
        job.unscored -= 1;
        if job.pending.is_empty() {
            let finished = job.unscored == 0;
            self.finish_lane(id, FinishReason::Length);
            if finished {
                self.finish_job(job_id);
            }
            return Ok(());
        }
        let saved = job.saved.as_ref().ok_or_else(|| {
            EngineError::StepFailed("a scoring request lost its context state".into())
        })?;
        let slot = self.seqs[&id]
            .slot
            .ok_or_else(|| EngineError::Config("scoring lane without a slot".into()))?;
        self.backend.load_state(slot, saved)?;
        let (pos, pending) = self.next_branch(id, job_id);
        self.sched.start(id, pos, pending);
        // Continuations need every token's logits: they share the step's row budget.
        self.sched.needs_all_rows(id);
        Ok(())
    }

    fn finish_lane(&mut self, id: SeqId, reason: FinishReason) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.finish.get_or_insert(reason);
        }
    }

    /// Every continuation is scored: answer and forget the job.
    fn finish_job(&mut self, job_id: SeqId) {
        let Some(job) = self.jobs.remove(&job_id) else {
            return;
        };
        let result = ScoreResult {
            scores: job.scores,
            context_tokens: job.context_tokens,
            cached_tokens: job.cached_tokens,
        };
        // The caller may have stopped waiting; the scores are then simply dropped.
        let _ = job.reply.send(Ok(result));
        self.metrics.ended(Ended::Scored);
    }
}
