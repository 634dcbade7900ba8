//! CPU backend for RWKV-6: the numerical reference every other backend is tested against, and
//! the backend that serves where no GPU exists.
//!
//! It owns the f32 forward pass over ragged batches ([`forward`]), the kernels it needs
//! ([`ops`]: products, norms, the WKV recurrence) and a pool of host state slots. It never
//! touches CUDA or tokio. [`tp`] runs the same forward sharded over in-process tensor-parallel
//! ranks ([`TpCpuBackend`]), the CPU check of the sharding math.
//!
//! [`CpuBackend::new`] follows the reference's `cpu fp32` strategy: weights are upcast to f32
//! exactly, activations and state are f32 (spec section 7.1). [`CpuBackend::with_options`] selects
//! the fast paths ([`Precision::Bf16`], [`Precision::Int8`]): weights stay bf16 (or int8) in
//! memory and are read directly by SIMD kernels ([`ops::gemm`]) on a persistent thread pool;
//! activations, accumulation and state remain f32.

pub mod forward;
pub mod model;
pub mod ops;
pub mod tp;

use rwkv_model::backend::{check_slot, check_state, take_candidates, tops_as_last, validate_steps};
use rwkv_model::{Backend, BackendError, Logits, ModelConfig, ModelWeights, SeqStep, State};

use crate::model::CpuModel;
pub use crate::model::{CpuOptions, Precision};
pub use crate::ops::gemm::Isa;
pub use crate::tp::TpCpuBackend;

/// The CPU backend: f32 weights and a fixed pool of state slots in host memory.
pub struct CpuBackend {
    model: CpuModel,
    slots: Vec<State>,
    initial: State,
}

impl CpuBackend {
    /// Prepares the weights and allocates `slots` states, each set to the model's initial state.
    pub fn new(weights: &ModelWeights, slots: usize) -> Self {
        Self::with_options(weights, slots, CpuOptions::default())
    }

    /// Like [`CpuBackend::new`], with a weight precision, thread count and kernel set.
    pub fn with_options(weights: &ModelWeights, slots: usize, options: CpuOptions) -> Self {
        let initial = weights.initial_state();
        Self {
            model: CpuModel::with_options(weights, options),
            slots: vec![initial.clone(); slots],
            initial,
        }
    }

    /// The weight precision in use.
    pub fn precision(&self) -> Precision {
        self.model.precision
    }

    /// The kernel set in use.
    pub fn isa(&self) -> Isa {
        self.model.isa
    }

    /// Bytes of weight data held in memory.
    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }

    /// Runs one step like [`Backend::forward`] and returns, for every requested row, only the
    /// logits of `candidates` (row-major, `candidates.len()` wide): scoring a few choices skips
    /// most of the head.
    pub fn forward_candidates(
        &mut self,
        steps: &[SeqStep<'_>],
        candidates: &[u32],
    ) -> Result<Vec<f32>, BackendError> {
        let vocab = self.model.config.vocab_size;
        if let Some(&token) = candidates.iter().find(|&&t| t as usize >= vocab) {
            return Err(BackendError::BadToken { token, vocab });
        }
        validate_steps(&self.model.config, self.slots.len(), steps)?;
        let mut by_slot: Vec<Option<&mut State>> = self.slots.iter_mut().map(Some).collect();
        let mut states: Vec<&mut State> = steps
            .iter()
            .map(|s| {
                by_slot[s.slot]
                    .take()
                    .expect("slots were validated to be distinct")
            })
            .collect();
        Ok(forward::forward_with_head(
            &self.model,
            steps,
            &mut states,
            forward::HeadRows::Candidates(candidates),
        ))
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn name(&self) -> String {
        match self.model.precision {
            Precision::F32 => "cpu".into(),
            Precision::Bf16 => "cpu-bf16".into(),
            Precision::Int8 => "cpu-int8".into(),
        }
    }

    fn num_slots(&self) -> usize {
        self.slots.len()
    }

    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        validate_steps(&self.model.config, self.slots.len(), steps)?;
        // Slots are distinct (validated), so each can be borrowed mutably once.
        let mut by_slot: Vec<Option<&mut State>> = self.slots.iter_mut().map(Some).collect();
        let mut states: Vec<&mut State> = steps
            .iter()
            .map(|s| {
                by_slot[s.slot]
                    .take()
                    .expect("slots were validated to be distinct")
            })
            .collect();
        let data = forward::forward(&self.model, &tops_as_last(steps), &mut states);
        let full = Logits {
            vocab: self.model.config.vocab_size,
            data,
            ..Logits::default()
        };
        Ok(take_candidates(steps, full))
    }

    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        check_slot(slot, self.slots.len())?;
        check_state(&self.model.config, state)?;
        self.slots[slot].clone_from(state);
        Ok(())
    }

    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        check_slot(slot, self.slots.len())?;
        Ok(self.slots[slot].clone())
    }

    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        check_slot(slot, self.slots.len())?;
        self.slots[slot].clone_from(&self.initial);
        Ok(())
    }

    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        check_slot(src, self.slots.len())?;
        check_slot(dst, self.slots.len())?;
        if src != dst {
            let copy = self.slots[src].clone();
            self.slots[dst] = copy;
        }
        Ok(())
    }
}
