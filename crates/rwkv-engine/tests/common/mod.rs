//! What the engine's integration tests share: the tiny fixture model, the reference run of one
//! sequence alone, and a CPU backend with a hook before every forward step.
// Each test file uses a different part of this.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rwkv_cpu::CpuBackend;
use rwkv_engine::{Sampler, SamplingParams};
use rwkv_model::{Backend, BackendError, Logits, ModelConfig, ModelWeights, OutputRows};
use rwkv_model::{SeqStep, State};

/// Greedy sampling (temperature 0, no penalties beyond the defaults) for `max_tokens` tokens.
pub fn greedy_params(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    }
}

/// The tokens of a stream that must end at its `max_tokens` (read to its end).
pub fn tokens_until_length(stream: rwkv_engine::GenerateStream) -> Vec<u32> {
    let (tokens, end) = stream.collect();
    assert!(
        matches!(
            end,
            rwkv_engine::GenerateEvent::Finished {
                reason: rwkv_engine::FinishReason::Length,
                ..
            }
        ),
        "{end:?}"
    );
    tokens
}

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

/// The CPU backend with a test's own forward step (`forward` gets the inner backend, to run the
/// real step around whatever the test does) and the capabilities it reports.
pub struct Custom<F> {
    pub inner: CpuBackend,
    pub forward: F,
    /// What `Backend::decides_nucleus` answers.
    pub decides_nucleus: bool,
    /// What `Backend::broken` answers; the test (or `forward`) sets it.
    pub broken: Arc<Mutex<Option<String>>>,
}

impl<F> Custom<F>
where
    F: FnMut(&mut CpuBackend, &[SeqStep<'_>]) -> Result<Logits, BackendError> + Send,
{
    pub fn new(inner: CpuBackend, forward: F) -> Self {
        Self {
            inner,
            forward,
            decides_nucleus: false,
            broken: Arc::default(),
        }
    }
}

/// The CPU backend, calling `before_forward` with every step before running it (to count, to
/// slow down, to watch what the engine asks for).
pub fn hooked(
    inner: CpuBackend,
    mut before_forward: impl FnMut(&[SeqStep<'_>]) + Send,
) -> Custom<impl FnMut(&mut CpuBackend, &[SeqStep<'_>]) -> Result<Logits, BackendError> + Send> {
    Custom::new(
        inner,
        move |backend: &mut CpuBackend, steps: &[SeqStep<'_>]| {
            before_forward(steps);
            backend.forward(steps)
        },
    )
}

impl<F> Backend for Custom<F>
where
    F: FnMut(&mut CpuBackend, &[SeqStep<'_>]) -> Result<Logits, BackendError> + Send,
{
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
        (self.forward)(&mut self.inner, steps)
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
    fn decides_nucleus(&self) -> bool {
        self.decides_nucleus
    }
    fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap().clone()
    }
}

/// One greedy turn of `tenant`'s session: the reply's tokens and usage, or the engine's error.
pub fn greedy_turn(
    engine: &rwkv_engine::Engine,
    tenant: &str,
    session: u64,
    tokens: &[u32],
    max_tokens: usize,
) -> Result<(Vec<u32>, rwkv_engine::Usage), rwkv_engine::EngineError> {
    use rwkv_engine::{GenerateEvent, GenerateRequest};
    let req = GenerateRequest {
        tenant: tenant.into(),
        session: Some(session),
        tokens: tokens.to_vec(),
        params: greedy_params(max_tokens),
        ..GenerateRequest::default()
    };
    match engine.generate(req)?.collect() {
        (tokens, GenerateEvent::Finished { usage, .. }) => Ok((tokens, usage)),
        (_, GenerateEvent::Error(e)) => Err(e),
        (_, end) => panic!("{end:?}"),
    }
}
