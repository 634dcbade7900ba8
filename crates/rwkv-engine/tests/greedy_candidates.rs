//! Greedy decoding without penalties asks the backend for each row's best tokens only
//! (`OutputRows::Top`), and still picks exactly what sampling the whole row picks, bans
//! included.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, GenerateRequest, Sampler, SamplingParams};
use rwkv_model::{Backend, BackendError, Logits, ModelConfig, ModelWeights, OutputRows};
use rwkv_model::{SeqStep, State};

fn weights() -> ModelWeights {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rwkv6-tiny-c128-l2.safetensors");
    ModelWeights::load(path).unwrap()
}

/// The CPU backend, counting the sequences that asked for candidates instead of a row.
struct Watching {
    inner: CpuBackend,
    top_requests: Arc<AtomicUsize>,
}

impl Backend for Watching {
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
        let tops = steps
            .iter()
            .filter(|s| matches!(s.output, OutputRows::Top(_)))
            .count();
        self.top_requests.fetch_add(tops, Ordering::SeqCst);
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

fn params(ban: Vec<u32>, presence_penalty: f32) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        presence_penalty,
        frequency_penalty: 0.0,
        token_ban: ban,
        max_tokens: 10,
        ..SamplingParams::default()
    }
}

/// The reference: one sequence, full logits rows, the sampler on each whole row.
fn alone(weights: &ModelWeights, prompt: &[u32], params: SamplingParams) -> Vec<u32> {
    let mut backend = CpuBackend::new(weights, 1);
    let mut sampler = Sampler::new(params.clone(), backend.config().vocab_size).unwrap();
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
        sampler.record(token, false);
        out.push(token);
        feed = vec![token];
    }
    out
}

#[test]
fn greedy_decodes_from_candidates_exactly_and_penalties_keep_whole_rows() {
    let weights = weights();
    let top_requests = Arc::new(AtomicUsize::new(0));
    let backend = Watching {
        inner: CpuBackend::new(&weights, 8),
        top_requests: top_requests.clone(),
    };
    let engine = Engine::start(backend, EngineConfig::default()).unwrap();
    let prompts: Vec<Vec<u32>> = (0..8u32)
        .map(|i| (0..3 + i).map(|j| (i * 131 + j * 17) % 1000 + 1).collect())
        .collect();
    // The first reply of each prompt, banned in the second run: the ban must be honoured.
    let mut cases = Vec::new();
    for p in &prompts {
        let first = alone(&weights, p, params(vec![], 0.0));
        cases.push((p.clone(), params(vec![], 0.0)));
        cases.push((p.clone(), params(first[..3].to_vec(), 0.0)));
    }
    let streams: Vec<_> = cases
        .iter()
        .map(|(p, params)| {
            let req = GenerateRequest {
                tenant: "t".into(),
                tokens: p.clone(),
                params: params.clone(),
                ..GenerateRequest::default()
            };
            engine.generate(req).unwrap()
        })
        .collect();
    for ((p, params), stream) in cases.iter().zip(streams) {
        let (tokens, _) = stream.collect();
        assert_eq!(
            tokens,
            alone(&weights, p, params.clone()),
            "{p:?} {params:?}"
        );
    }
    // Every decode step after the first token of each of the 16 generations used candidates.
    assert_eq!(top_requests.load(Ordering::SeqCst), 16 * 9);

    // A penalty needs the whole row.
    top_requests.store(0, Ordering::SeqCst);
    let req = GenerateRequest {
        tenant: "t".into(),
        tokens: prompts[0].clone(),
        params: params(vec![], 0.7),
        ..GenerateRequest::default()
    };
    let (tokens, _) = engine.generate(req).unwrap().collect();
    assert_eq!(tokens, alone(&weights, &prompts[0], params(vec![], 0.7)));
    assert_eq!(top_requests.load(Ordering::SeqCst), 0);
}
