//! What the engine's integration tests share: the tiny fixture model, the reference run of one
//! sequence alone, and a CPU backend with a hook before every forward step.
// Each test file uses a different part of this.
#![allow(dead_code)]

use std::path::PathBuf;

use rwkv_cpu::CpuBackend;
use rwkv_engine::{Sampler, SamplingParams};
use rwkv_model::{Backend, BackendError, Logits, ModelConfig, ModelWeights, OutputRows};
use rwkv_model::{SeqStep, State};

/// The tiny random-weight fixture (C=128, L=2).
pub fn weights() -> ModelWeights {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rwkv6-tiny-c128-l2.safetensors");
    ModelWeights::load(path).unwrap()
}

/// The reference: one sequence, the whole prompt in one forward call, full logits rows, the
/// sampler on each whole row, until `max_tokens` or a stop token.
pub fn alone(weights: &ModelWeights, prompt: &[u32], params: SamplingParams) -> Vec<u32> {
    let mut backend = CpuBackend::new(weights, 1);
    let vocab = backend.config().vocab_size;
    let mut sampler = Sampler::new(params.clone(), vocab).unwrap();
    let mut feed = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < params.max_tokens {
        let step = SeqStep {
            slot: 0,
            tokens: &feed,
            output: OutputRows::Last,
        };
        let mut logits = backend.forward(&[step]).unwrap().data;
        let token = sampler.sample(&mut logits);
        if sampler.is_stop_token(token) {
            break;
        }
        sampler.record(token, false);
        out.push(token);
        feed = vec![token];
    }
    out
}

/// The CPU backend, calling `before_forward` with every step before running it (to count, to
/// slow down, to watch what the engine asks for).
pub struct Hooked<F> {
    pub inner: CpuBackend,
    pub before_forward: F,
}

impl<F: FnMut(&[SeqStep<'_>]) + Send> Backend for Hooked<F> {
    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn num_slots(&self) -> usize {
        self.inner.num_slots()
    }
    fn forward(&mut self, steps: &[SeqStep<'_>]) -> Result<Logits, BackendError> {
        (self.before_forward)(steps);
        self.inner.forward(steps)
    }
    fn load_state(&mut self, slot: usize, state: &State) -> Result<(), BackendError> {
        self.inner.load_state(slot, state)
    }
    fn save_state(&mut self, slot: usize) -> Result<State, BackendError> {
        self.inner.save_state(slot)
    }
    fn reset_state(&mut self, slot: usize) -> Result<(), BackendError> {
        self.inner.reset_state(slot)
    }
    fn copy_state(&mut self, src: usize, dst: usize) -> Result<(), BackendError> {
        self.inner.copy_state(src, dst)
    }
}
