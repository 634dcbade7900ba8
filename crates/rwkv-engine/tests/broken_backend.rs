//! A backend that breaks for good (a tensor-parallel group aborted after a GPU failed): the
//! generations in flight fail, and from then on the engine refuses new work and reports the
//! backend as broken, so the worker answers "unavailable" and routers stop sending it requests.

mod common;

use std::sync::{Arc, Mutex};

use common::{weights, Custom};
use rwkv_cpu::CpuBackend;
use rwkv_engine::{
    Engine, EngineConfig, EngineError, GenerateEvent, GenerateRequest, SamplingParams, ScoreRequest,
};
use rwkv_model::{Backend, BackendError, Logits, SeqStep};

/// Runs `steps` forward steps, then breaks and stays broken.
fn breaks_after(
    inner: CpuBackend,
    mut steps: usize,
) -> Custom<impl FnMut(&mut CpuBackend, &[SeqStep<'_>]) -> Result<Logits, BackendError> + Send> {
    let broken: Arc<Mutex<Option<String>>> = Arc::default();
    let set = broken.clone();
    let forward = move |backend: &mut CpuBackend, batch: &[SeqStep<'_>]| {
        if steps == 0 {
            let why = "rank 1: device lost".to_string();
            *set.lock().unwrap() = Some(why.clone());
            return Err(BackendError::Device(why));
        }
        steps -= 1;
        backend.forward(batch)
    };
    Custom {
        broken,
        ..Custom::new(inner, forward)
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
    let backend = breaks_after(CpuBackend::new(&weights, 2), 4);
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
