//! Scoring: how likely the model finds each of several continuations of one context, the
//! operation behind lm-eval's `loglikelihood` and multiple-choice evaluation (MMLU).
//!
//! The engine prefills the context once (through the prefix cache, like a prompt), scores every
//! continuation's first token from the context's last logits row, and feeds each longer
//! continuation from a copy of the context's state, asking the backend for every row. Scores are
//! the log-softmax of the raw logits: no penalties, temperature 1.

use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::Duration;

use crate::error::EngineError;
use crate::request::Command;
use crate::scheduler::SeqId;

/// A context and the continuations to score after it.
#[derive(Clone, Debug, Default)]
pub struct ScoreRequest {
    /// Owner of the prefix-cache entries the context may use and create.
    pub tenant: String,
    /// The tokens every continuation follows; at least one.
    pub context: Vec<u32>,
    /// The candidates, each at least one token long, scored independently of one another.
    pub continuations: Vec<Vec<u32>>,
    /// `Some(n)`: also report the `n` most likely tokens at every continuation position.
    pub top_logprobs: Option<usize>,
}

/// The score of one continuation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContinuationScore {
    /// `ln p` of each continuation token given the context and the continuation tokens before it.
    pub logprobs: Vec<f32>,
    /// Every token was the most likely one (ties go to the lowest id, as in greedy sampling).
    pub greedy: bool,
    /// Per token, the `top_logprobs` most likely `(token, logprob)` pairs, best first; empty when
    /// the request did not ask for them.
    pub top: Vec<Vec<(u32, f32)>>,
}

impl ContinuationScore {
    /// The log-probability of the whole continuation (the sum over its tokens).
    pub fn total(&self) -> f64 {
        self.logprobs.iter().map(|&l| f64::from(l)).sum()
    }
}

/// The scores of a request, in the order of its continuations.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreResult {
    pub scores: Vec<ContinuationScore>,
    /// Tokens of the context.
    pub context_tokens: usize,
    /// Context tokens whose prefill was skipped thanks to the prefix cache.
    pub cached_tokens: usize,
}

impl ScoreRequest {
    /// Checks the request against the model's vocabulary before it reaches the engine thread.
    pub fn validate(&self, vocab: usize) -> Result<(), EngineError> {
        if self.context.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if self.continuations.is_empty() {
            return Err(EngineError::EmptyScore(
                "`continuations` is empty; give at least one continuation".into(),
            ));
        }
        if let Some(i) = self.continuations.iter().position(Vec::is_empty) {
            return Err(EngineError::EmptyScore(format!(
                "`continuations[{i}]` is empty; every continuation needs at least one token"
            )));
        }
        let tokens = self
            .context
            .iter()
            .chain(self.continuations.iter().flatten());
        if let Some(&token) = tokens.into_iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::TokenOutOfVocab { token, vocab });
        }
        Ok(())
    }
}

/// A scoring request in flight. Dropping it before the answer cancels the request, which frees
/// its slots at the engine's next step (there is no other way to cancel: nobody would read the
/// answer).
#[derive(Debug)]
pub struct PendingScore {
    pub(crate) id: SeqId,
    pub(crate) reply: crate::channel::Rx<Result<ScoreResult, EngineError>>,
    pub(crate) commands: Sender<Command>,
}

impl PendingScore {
    /// The engine's id of this request.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// Waits for the scores.
    pub fn wait(self) -> Result<ScoreResult, EngineError> {
        // The engine answers every request it accepted; a closed channel means it stopped.
        self.reply.recv().ok_or(EngineError::Stopped)?
    }

    /// Waits at most `timeout`; `None` if the scores are not ready yet.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<Result<ScoreResult, EngineError>> {
        match self.reply.recv_timeout(timeout) {
            Ok(result) => Some(result),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(Err(EngineError::Stopped)),
        }
    }

    /// Waits for the scores without blocking a thread (for async servers). Dropping the future
    /// drops the handle, which cancels the request.
    pub async fn result(mut self) -> Result<ScoreResult, EngineError> {
        // A `&mut` (not a `&`) in the future keeps it `Send`: the receiver is not `Sync`.
        let reply = &mut self.reply;
        std::future::poll_fn(move |cx| reply.poll_recv(cx))
            .await
            .ok_or(EngineError::Stopped)?
    }
}

impl Drop for PendingScore {
    fn drop(&mut self) {
        // The engine may already have answered or stopped; then there is nothing to cancel.
        let _ = self.commands.send(Command::Cancel(self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(context: &[u32], continuations: &[&[u32]]) -> ScoreRequest {
        ScoreRequest {
            context: context.to_vec(),
            continuations: continuations.iter().map(|c| c.to_vec()).collect(),
            ..ScoreRequest::default()
        }
    }

    #[test]
    fn invalid_requests_name_what_is_wrong() {
        assert!(req(&[1], &[&[2], &[3, 4]]).validate(10).is_ok());
        assert!(matches!(
            req(&[], &[&[2]]).validate(10),
            Err(EngineError::EmptyInput)
        ));
        let err = req(&[1], &[]).validate(10).unwrap_err();
        assert!(err.to_string().contains("`continuations`"), "{err}");
        let err = req(&[1], &[&[2], &[]]).validate(10).unwrap_err();
        assert!(err.to_string().contains("`continuations[1]`"), "{err}");
        assert_eq!(err.kind(), "empty_score");
        for bad in [req(&[10], &[&[2]]), req(&[1], &[&[2], &[3, 12]])] {
            let err = bad.validate(10).unwrap_err();
            assert!(
                matches!(err, EngineError::TokenOutOfVocab { vocab: 10, .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn the_total_is_the_sum_of_the_token_logprobs() {
        let score = ContinuationScore {
            logprobs: vec![-0.5, -1.25],
            ..ContinuationScore::default()
        };
        assert_eq!(score.total(), -1.75);
    }
}
