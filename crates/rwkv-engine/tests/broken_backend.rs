//! A backend that breaks for good (a tensor-parallel group aborted after a GPU failed): the
//! generations in flight fail, and from then on the engine refuses new work and reports the
//! backend as broken, so the worker answers "unavailable" and routers stop sending it requests.

mod common;

use std::sync::{Arc, Mutex};

use common::weights;
use rwkv_cpu::CpuBackend;
use rwkv_engine::{
    Engine, EngineConfig, EngineError, GenerateEvent, GenerateRequest, SamplingParams, ScoreRequest,
};
use rwkv_model::{Backend, BackendError, Logits, ModelConfig, SeqStep, State};

/// Runs `steps_left` forward steps, then breaks and stays broken.
struct BreaksAfter {
    inner: CpuBackend,
    steps_left: usize,
    broken: Arc<Mutex<Option<String>>>,
}

impl Backend for BreaksAfter {
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
        if self.steps_left == 0 {
            let why = "rank 1: device lost".to_string();
            *self.broken.lock().unwrap() = Some(why.clone());
            return Err(BackendError::Device(why));
        }
        self.steps_left -= 1;
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
    fn broken(&self) -> Option<String> {
        self.broken.lock().unwrap().clone()
    }
}

fn request(max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        tenant: "t".into(),
        tokens: vec![1, 2, 3],
        params: SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..SamplingParams::default()
        },
        ..GenerateRequest::default()
    }
}

#[test]
fn a_broken_backend_fails_its_work_then_refuses_new_work_and_says_why() {
    let weights = weights();
    let backend = BreaksAfter {
        inner: CpuBackend::new(&weights, 2),
        steps_left: 4,
        broken: Arc::default(),
    };
    let engine = Engine::start(backend, EngineConfig::default()).unwrap();
    assert!(engine.stats().is_ok());
    let (tokens, end) = engine.generate(request(50)).unwrap().collect();
    assert!(tokens.len() < 50);
    assert!(
        matches!(&end, GenerateEvent::Error(EngineError::StepFailed(m)) if m.contains("device lost")),
        "{end:?}"
    );
    let broken =
        |e: &EngineError| matches!(e, EngineError::BackendBroken(m) if m.contains("rank 1"));
    let stats = engine.stats().unwrap_err();
    assert!(broken(&stats), "{stats:?}");
    let (tokens, end) = engine.generate(request(5)).unwrap().collect();
    assert!(tokens.is_empty());
    assert!(
        matches!(&end, GenerateEvent::Error(e) if broken(e)),
        "{end:?}"
    );
    let score = engine
        .score(ScoreRequest {
            tenant: "t".into(),
            context: vec![1, 2],
            continuations: vec![vec![3]],
            top_logprobs: None,
        })
        .unwrap_err();
    assert!(broken(&score), "{score:?}");
    assert_eq!(stats.kind(), "backend_broken");
}
