//! A tensor-parallel [`Backend`] assembled from ranks.
//!
//! Each [`Rank`] holds one [`ShardPlan`]'s part of the weights and of every state slot, and runs
//! its part of a step, meeting the other ranks in its collective (an all-reduce after
//! `att.output` and after `ffn.value`). [`TpBackend`] drives the ranks on one thread each, so
//! their collective calls can meet, and turns full states into rank parts and back. The ranks
//! are the device-specific part (CUDA devices over NCCL, the kernel emulator in tests); this
//! module is the orchestration they share.
//!
//! A step runs in two rounds: every rank first [`prepare`](Rank::prepare)s (validates the plan,
//! grows its buffers), and only when all succeeded do they [`forward`](Rank::forward). A rank
//! that failed alone after its peers entered a collective would leave them waiting forever;
//! preparation is where a rank can fail on its own (out of memory), so it is done before any
//! rank communicates.

use crate::backend::{check_slot, check_state, validate_steps};
use crate::config::ModelConfig;
use crate::{Backend, BackendError, Logits, SeqStep, ShardError, ShardPlan, State};

/// One rank of a tensor-parallel group. Its slots hold the rank's part of each state, laid out
/// as [`ShardPlan::state_part`] describes.
pub trait Rank: Send {
    fn plan(&self) -> &ShardPlan;

    /// Number of state slots.
    fn num_slots(&self) -> usize;

    /// Everything before the first collective call that can fail on this rank alone (buffers
    /// for `steps`). The steps were validated by the caller.
    fn prepare(&mut self, steps: &[SeqStep<'_>]) -> Result<(), BackendError>;

    /// Runs a prepared step; the rank that computes the head (rank 0) returns the logits, the
    /// others `None`.
    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Option<Logits>, BackendError>;

    /// Sets slot `slot` to a part produced by [`ShardPlan::state_part`].
    fn load_part(&mut self, slot: usize, part: &[f32]) -> Result<(), BackendError>;

    /// The rank's part of slot `slot`.
    fn save_part(&mut self, slot: usize) -> Result<Vec<f32>, BackendError>;

    /// Sets slot `slot` to the model's initial state.
    fn reset_slot(&mut self, slot: usize) -> Result<(), BackendError>;

    /// Copies slot `src` into slot `dst`.
    fn copy_slot(&mut self, src: usize, dst: usize) -> Result<(), BackendError>;

    /// [`Backend::decides_nucleus`] of the head rank.
    fn decides_nucleus(&self) -> bool {
        false
    }
}

/// The model sharded over `world` ranks, as one [`Backend`].
pub struct TpBackend<R> {
    config: ModelConfig,
    ranks: Vec<R>,
    name: String,
}

impl<R: Rank> TpBackend<R> {
    /// Groups `ranks`, which must be ranks `0..world` of one world over `config`, in order, with
    /// the same number of slots.
    pub fn new(config: ModelConfig, ranks: Vec<R>, name: String) -> Result<Self, BackendError> {
        let world = ranks.len();
        let bad = |why: String| BackendError::Device(format!("tensor-parallel group: {why}"));
        ShardPlan::validate(&config, world).map_err(|e: ShardError| bad(e.to_string()))?;
        for (i, r) in ranks.iter().enumerate() {
            let plan = ShardPlan::new(&config, i, world).map_err(|e| bad(e.to_string()))?;
            if r.plan() != &plan {
                return Err(bad(format!("rank {i} holds the shard of {:?}", r.plan())));
            }
            if r.num_slots() != ranks[0].num_slots() {
                return Err(bad(format!(
                    "rank {i} has {} slots, rank 0 has {}",
                    r.num_slots(),
                    ranks[0].num_slots()
                )));
            }
        }
        Ok(Self {
            config,
            ranks,
            name,
        })
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    /// Runs `f` on every rank, each on its own thread (so their collective calls can meet), and
    /// returns the results in rank order, or the first rank's error.
    fn on_all<T: Send>(
        &mut self,
        f: impl Fn(usize, &mut R) -> Result<T, BackendError> + Sync,
    ) -> Result<Vec<T>, BackendError> {
        if let [only] = self.ranks.as_mut_slice() {
            return Ok(vec![f(0, only)?]);
        }
        let f = &f;
        let results: Vec<Result<T, BackendError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .ranks
                .iter_mut()
                .enumerate()
                .map(|(i, r)| s.spawn(move || f(i, r)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        results.into_iter().collect()
    }
}

impl<R: Rank> Backend for TpBackend<R> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn name(&self) -> String {
        self.name.clone()
    }

    fn num_slots(&self) -> usize {
        self.ranks[0].num_slots()
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        validate_steps(&self.config, self.num_slots(), steps)?;
        self.on_all(|_, r| r.prepare(steps))?;
        let mut outs = self.on_all(|_, r| r.forward(steps))?;
        outs.swap_remove(0).ok_or_else(|| {
            BackendError::Device("tensor parallel: rank 0 returned no logits".into())
        })
    }

    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        check_slot(slot, self.num_slots())?;
        check_state(&self.config, state)?;
        self.on_all(|_, r| {
            let part = r.plan().state_part(state);
            r.load_part(slot, &part)
        })?;
        Ok(())
    }

    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        check_slot(slot, self.num_slots())?;
        let parts = self.on_all(|_, r| r.save_part(slot))?;
        let mut state = State::zeros(&self.config);
        for (r, part) in self.ranks.iter().zip(&parts) {
            r.plan()
                .write_state_part(part, &mut state)
                .map_err(|e| BackendError::State(e.to_string()))?;
        }
        Ok(state)
    }

    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        check_slot(slot, self.num_slots())?;
        self.on_all(|_, r| r.reset_slot(slot))?;
        Ok(())
    }

    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        check_slot(src, self.num_slots())?;
        check_slot(dst, self.num_slots())?;
        if src != dst {
            self.on_all(|_, r| r.copy_slot(src, dst))?;
        }
        Ok(())
    }

    fn decides_nucleus(&self) -> bool {
        self.ranks[0].decides_nucleus()
    }
}
