//! CPU backend for RWKV-6: the numerical reference every other backend is tested against, and
//! the backend that serves where no GPU exists.
//!
//! It owns the f32 forward pass over ragged batches ([`forward`]), the kernels it needs
//! ([`ops`]: products, norms, the WKV recurrence) and a pool of host state slots. It never
//! touches CUDA or tokio.
//!
//! Numerics follow the reference's `cpu fp32` strategy: weights are upcast to f32 exactly,
//! activations and state are f32 (spec section 7.1).

pub mod forward;
pub mod model;
pub mod ops;

use rwkv_model::backend::{check_slot, validate_steps};
use rwkv_model::{Backend, BackendError, Logits, ModelConfig, ModelWeights, SeqStep, State};

use crate::model::CpuModel;

/// The CPU backend: f32 weights and a fixed pool of state slots in host memory.
pub struct CpuBackend {
    model: CpuModel,
    slots: Vec<State>,
    initial: State,
}

impl CpuBackend {
    /// Prepares the weights and allocates `slots` states, each set to the model's initial state.
    pub fn new(weights: &ModelWeights, slots: usize) -> Self {
        let initial = weights.initial_state();
        Self {
            model: CpuModel::new(weights),
            slots: vec![initial.clone(); slots],
            initial,
        }
    }

    fn check_state(&self, state: &State) -> Result<(), BackendError> {
        let want = self.model.config.state_len();
        if state.as_flat().len() == want {
            Ok(())
        } else {
            Err(BackendError::State(format!(
                "state has {} values, the model needs {want}",
                state.as_flat().len()
            )))
        }
    }
}

impl Backend for CpuBackend {
    fn config(&self) -> &ModelConfig {
        &self.model.config
    }

    fn name(&self) -> String {
        "cpu".into()
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
        let data = forward::forward(&self.model, steps, &mut states);
        Ok(Logits {
            vocab: self.model.config.vocab_size,
            data,
        })
    }

    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        check_slot(slot, self.slots.len())?;
        self.check_state(state)?;
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
