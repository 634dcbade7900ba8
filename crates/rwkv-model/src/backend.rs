//! The contract between the engine and a compute backend (CPU, CUDA).
//!
//! A backend owns a pool of state slots. A forward step takes a ragged batch: several sequences,
//! each naming its slot and bringing any number of new tokens (1 for decode, many for prefill),
//! and returns logits only for the rows asked for. States never leave the backend unless
//! [`Backend::save_state`] copies one out, which is what state swapping builds on.

use crate::config::ModelConfig;
use crate::nucleus::{Nucleus, NucleusRow};
use crate::state::State;

/// Which positions of a sequence's new tokens need logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OutputRows {
    /// None (a prefill chunk that is not the last one).
    None,
    /// The last new token only (decode, end of prompt).
    Last,
    /// Every new token (scoring, conformance tests).
    All,
    /// Only the `k` best tokens of the last new token's logits, as [`Candidate`]s in
    /// [`Logits::top`] (greedy decoding needs no more, and a GPU then moves a few bytes per
    /// sequence instead of a vocabulary of floats).
    Top(usize),
    /// For the last new token, the tokens that these sampling filters keep, as a
    /// [`NucleusRow`] in [`Logits::nucleus`]: the kept set where the backend decides it, else
    /// the whole row (see [`crate::nucleus`]).
    Nucleus(Nucleus),
}

impl OutputRows {
    /// Number of logit rows this choice produces for `n_tokens` new tokens.
    pub fn rows(self, n_tokens: usize) -> usize {
        match self {
            OutputRows::None | OutputRows::Top(_) | OutputRows::Nucleus(_) => 0,
            OutputRows::Last => usize::from(n_tokens > 0),
            OutputRows::All => n_tokens,
        }
    }

    /// Number of candidates this choice produces for `n_tokens` new tokens.
    pub fn candidates(self, n_tokens: usize) -> usize {
        match self {
            OutputRows::Top(k) if n_tokens > 0 => k,
            _ => 0,
        }
    }

    /// Number of [`NucleusRow`]s this choice produces for `n_tokens` new tokens.
    pub fn nucleus_rows(self, n_tokens: usize) -> usize {
        usize::from(matches!(self, OutputRows::Nucleus(_)) && n_tokens > 0)
    }
}

/// One of the best tokens of a logits row ([`OutputRows::Top`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub token: u32,
    pub logit: f32,
}

/// One sequence's part of a forward step.
#[derive(Clone, Copy, Debug)]
pub struct SeqStep<'a> {
    /// The state slot this sequence reads and updates.
    pub slot: usize,
    /// New tokens, in order.
    pub tokens: &'a [u32],
    pub output: OutputRows,
}

/// Logit rows of a step: for each sequence in order, its requested rows, each `vocab` wide;
/// for each sequence that asked for [`OutputRows::Top`], in order, its `k` candidates; and for
/// each that asked for [`OutputRows::Nucleus`], in order, its [`NucleusRow`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Logits {
    pub vocab: usize,
    pub data: Vec<f32>,
    pub top: Vec<Candidate>,
    pub nucleus: Vec<NucleusRow>,
}

impl Logits {
    pub fn rows(&self) -> usize {
        self.data.len().checked_div(self.vocab).unwrap_or(0)
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.vocab..(i + 1) * self.vocab]
    }
}

/// Why a backend refused or failed a call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    #[error("slot {slot} does not exist (the pool has {slots} slots)")]
    BadSlot { slot: usize, slots: usize },
    #[error("slot {slot} appears twice in one step")]
    DuplicateSlot { slot: usize },
    #[error("token id {token} is out of range (vocabulary size {vocab})")]
    BadToken { token: u32, vocab: usize },
    #[error("{k} candidates asked for; between 1 and the vocabulary size {vocab} are possible")]
    BadCandidates { k: usize, vocab: usize },
    #[error("nucleus filter top_p {top_p} is outside (0, 1]")]
    BadNucleus { top_p: f32 },
    #[error("state does not fit this model: {0}")]
    State(String),
    #[error("device error: {0}")]
    Device(String),
}

/// A compute backend with a pool of per-sequence state slots.
pub trait Backend: Send {
    /// The model this backend runs.
    fn config(&self) -> &ModelConfig;

    /// A short name for logs and metrics (`cpu`, `cuda:0`).
    fn name(&self) -> String;

    /// Number of state slots.
    fn num_slots(&self) -> usize;

    /// Runs one step over a ragged batch, updating each sequence's slot in place.
    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError>;

    /// Overwrites a slot with a state (swap-in, import, `--state-in`).
    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError>;

    /// Copies a slot's state out (swap-out, export).
    fn save_state(&mut self, slot: usize) -> Result<State, BackendError>;

    /// Resets a slot to the model's initial state (zeros, or the state-tuned `time_state`).
    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError>;

    /// Copies one slot into another (fork).
    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError>;

    /// Whether [`OutputRows::Nucleus`] saves this backend work: it decides kept sets where the
    /// logits are (a GPU), rather than returning every row whole as a host backend does (for
    /// which asking is only an extra copy). Every backend must accept the request either way.
    fn decides_nucleus(&self) -> bool {
        false
    }

    /// Why this backend can no longer run anything (a tensor-parallel group that was aborted
    /// after a rank failed), or `None` while it works. A broken backend stays broken: the
    /// engine refuses new work and reports it, so the worker leaves the routing table.
    fn broken(&self) -> Option<String> {
        None
    }
}

/// A boxed backend is a backend, so a backend chosen at run time (`Box<dyn Backend>`) can drive
/// code that is generic over [`Backend`], such as the engine.
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn config(&self) -> &ModelConfig {
        (**self).config()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn num_slots(&self) -> usize {
        (**self).num_slots()
    }
    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        (**self).forward(steps)
    }
    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        (**self).load_state(slot, state)
    }
    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        (**self).save_state(slot)
    }
    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        (**self).reset_state(slot)
    }
    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        (**self).copy_state(src, dst)
    }
    fn decides_nucleus(&self) -> bool {
        (**self).decides_nucleus()
    }
    fn broken(&self) -> Option<String> {
        (**self).broken()
    }
}

/// The checks every backend applies before touching memory: slots exist and are distinct, and
/// every token is inside the vocabulary.
pub fn validate_steps(
    cfg: &ModelConfig,
    slots: usize,
    steps: &[SeqStep<'_>],
) -> Result<(), BackendError> {
    let mut seen = vec![false; slots];
    for step in steps {
        check_slot(step.slot, slots)?;
        if std::mem::replace(&mut seen[step.slot], true) {
            return Err(BackendError::DuplicateSlot { slot: step.slot });
        }
        match step.output {
            OutputRows::Top(k) if k == 0 || k > cfg.vocab_size => {
                return Err(BackendError::BadCandidates {
                    k,
                    vocab: cfg.vocab_size,
                });
            }
            OutputRows::Nucleus(f) if !(f.top_p > 0.0 && f.top_p <= 1.0) => {
                return Err(BackendError::BadNucleus { top_p: f.top_p });
            }
            _ => {}
        }
        if let Some(&token) = step.tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(BackendError::BadToken {
                token,
                vocab: cfg.vocab_size,
            });
        }
    }
    Ok(())
}

/// The `k` best tokens of a logits row: logit descending (NaN counts as -inf), ties by lower
/// token id, so the first candidate is what greedy sampling picks from the whole row.
pub fn top_candidates(row: &[f32], k: usize) -> Vec<Candidate> {
    let key = |l: f32| if l.is_nan() { f32::NEG_INFINITY } else { l };
    let k = k.min(row.len());
    let mut best: Vec<Candidate> = Vec::with_capacity(k + 1);
    for (token, &logit) in row.iter().enumerate() {
        let value = key(logit);
        // Only a value above the current k-th (or any while fewer than k) can enter; an equal
        // value has a higher id, so it ranks after.
        if best.len() == k && best.last().is_none_or(|last| value <= key(last.logit)) {
            continue;
        }
        let at = best.partition_point(|c| key(c.logit) >= value);
        best.insert(
            at,
            Candidate {
                token: token as u32,
                logit,
            },
        );
        best.truncate(k);
    }
    best
}

/// `steps` with every [`OutputRows::Top`] and [`OutputRows::Nucleus`] asking for its last row
/// instead: for backends that compute candidates from full rows ([`take_candidates`] then
/// picks them, and returns nucleus rows whole).
pub fn tops_as_last<'a>(steps: &[SeqStep<'a>]) -> Vec<SeqStep<'a>> {
    steps
        .iter()
        .map(|s| match s.output {
            OutputRows::Top(_) | OutputRows::Nucleus(_) => SeqStep {
                output: OutputRows::Last,
                ..*s
            },
            _ => *s,
        })
        .collect()
}

/// Turns the logits of a step computed with [`tops_as_last`] into what `steps` asked for: the
/// last rows of `Top` sequences leave `data` and become their candidates, those of `Nucleus`
/// sequences become their (whole-row) [`NucleusRow`]s.
pub fn take_candidates(steps: &[SeqStep<'_>], full: Logits) -> Logits {
    let transformed =
        |s: &SeqStep<'_>| matches!(s.output, OutputRows::Top(_) | OutputRows::Nucleus(_));
    if !steps.iter().any(transformed) {
        return full;
    }
    let vocab = full.vocab;
    let mut out = Logits {
        vocab,
        data: Vec::with_capacity(full.data.len()),
        top: full.top,
        nucleus: full.nucleus,
    };
    let mut rows = full.data.chunks_exact(vocab.max(1));
    for s in steps {
        let n = s.tokens.len();
        match s.output {
            OutputRows::Top(k) if n > 0 => {
                if let Some(row) = rows.next() {
                    out.top.extend(top_candidates(row, k));
                }
            }
            OutputRows::Nucleus(_) if n > 0 => {
                if let Some(row) = rows.next() {
                    out.nucleus.push(NucleusRow::Row(row.to_vec()));
                }
            }
            other => {
                for row in rows.by_ref().take(other.rows(n)) {
                    out.data.extend_from_slice(row);
                }
            }
        }
    }
    out
}

/// Checks that `slot` exists in a pool of `slots`.
pub fn check_slot(slot: usize, slots: usize) -> Result<(), BackendError> {
    if slot < slots {
        Ok(())
    } else {
        Err(BackendError::BadSlot { slot, slots })
    }
}

/// Checks that a state has the size of this model's state (load/swap-in of a foreign state).
pub fn check_state(cfg: &ModelConfig, state: &State) -> Result<(), BackendError> {
    let want = cfg.state_len();
    if state.as_flat().len() == want {
        Ok(())
    } else {
        Err(BackendError::State(format!(
            "state has {} values, the model needs {want}",
            state.as_flat().len()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(c: &[Candidate]) -> Vec<u32> {
        c.iter().map(|c| c.token).collect()
    }

    #[test]
    fn candidates_rank_by_logit_then_lower_id_with_nan_last() {
        let row = [
            1.0,
            f32::NAN,
            3.0,
            3.0,
            f32::NEG_INFINITY,
            2.0,
            f32::INFINITY,
        ];
        assert_eq!(tokens(&top_candidates(&row, 1)), [6]);
        assert_eq!(tokens(&top_candidates(&row, 4)), [6, 2, 3, 5]);
        // NaN ranks as -inf, after every finite value; among the -inf, lower ids first.
        assert_eq!(tokens(&top_candidates(&row, 99)), [6, 2, 3, 5, 0, 1, 4]);
        assert!(top_candidates(&row, 0).is_empty());
    }

    #[test]
    fn candidates_replace_only_the_rows_of_top_steps() {
        let vocab = 3;
        let toks = [7u32, 8, 9];
        let steps = [
            SeqStep {
                slot: 0,
                tokens: &toks[..2],
                output: OutputRows::All,
            },
            SeqStep {
                slot: 1,
                tokens: &toks[..1],
                output: OutputRows::Top(2),
            },
            SeqStep {
                slot: 2,
                tokens: &toks,
                output: OutputRows::None,
            },
            SeqStep {
                slot: 3,
                tokens: &[],
                output: OutputRows::Top(1),
            },
            SeqStep {
                slot: 4,
                tokens: &toks[..1],
                output: OutputRows::Last,
            },
            SeqStep {
                slot: 5,
                tokens: &toks[..2],
                output: OutputRows::Nucleus(Nucleus {
                    top_p: 0.5,
                    top_k: 0,
                    below: usize::MAX,
                }),
            },
        ];
        let as_last = tops_as_last(&steps);
        assert_eq!(as_last[1].output, OutputRows::Last);
        assert_eq!(as_last[3].output, OutputRows::Last);
        assert_eq!(as_last[5].output, OutputRows::Last);
        let rows: usize = as_last.iter().map(|s| s.output.rows(s.tokens.len())).sum();
        assert_eq!(rows, 5);
        // Rows: two of the All step, one for the Top step, one for the Last step, one for the
        // Nucleus step.
        let full = Logits {
            vocab,
            data: vec![
                0.0, 1.0, 2.0, // All, first
                3.0, 4.0, 5.0, // All, second
                9.0, 7.0, 8.0, // Top(2)
                6.0, 6.0, 6.0, // Last
                1.5, 2.5, 3.5, // Nucleus
            ],
            ..Logits::default()
        };
        let out = take_candidates(&steps, full);
        assert_eq!(out.data, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0]);
        assert_eq!(out.nucleus, [NucleusRow::Row(vec![1.5, 2.5, 3.5])]);
        assert_eq!(
            out.top,
            [
                Candidate {
                    token: 0,
                    logit: 9.0
                },
                Candidate {
                    token: 2,
                    logit: 8.0
                }
            ]
        );
        let expected: usize = steps
            .iter()
            .map(|s| s.output.candidates(s.tokens.len()))
            .sum();
        assert_eq!(out.top.len(), expected);
    }
}
