//! Greedy decoding without penalties asks the backend for each row's best tokens only
//! (`OutputRows::Top`), and still picks exactly what sampling the whole row picks, bans
//! included.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{alone, hooked, weights};
use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, GenerateRequest, SamplingParams};
use rwkv_model::{OutputRows, SeqStep};

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

#[test]
fn greedy_decodes_from_candidates_exactly_and_penalties_keep_whole_rows() {
    let weights = weights();
    let top_requests = Arc::new(AtomicUsize::new(0));
    let counter = top_requests.clone();
    // Counts the sequences that ask for candidates instead of a row.
    let backend = hooked(
        CpuBackend::new(&weights, 8),
        move |steps: &[SeqStep<'_>]| {
            let tops = steps
                .iter()
                .filter(|s| matches!(s.output, OutputRows::Top(_)))
                .count();
            counter.fetch_add(tops, Ordering::SeqCst);
        },
    );
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

/// A backend's candidate outside the vocabulary fails the step with a clear error: it is
/// never sent to the client as a token or fed back to the model.
#[test]
fn a_candidate_outside_the_vocabulary_fails_the_step() {
    let weights = weights();
    let vocab = weights.config.vocab_size as u32;
    let backend = common::Custom::new(
        CpuBackend::new(&weights, 2),
        move |backend: &mut CpuBackend, steps: &[SeqStep<'_>]| {
            let mut logits = rwkv_model::Backend::forward(backend, steps)?;
            for c in &mut logits.top {
                c.token = vocab + 5;
            }
            Ok(logits)
        },
    );
    let engine = Engine::start(backend, EngineConfig::default()).unwrap();
    let req = GenerateRequest {
        tenant: "t".into(),
        tokens: vec![5, 6, 7],
        params: params(vec![], 0.0),
        ..GenerateRequest::default()
    };
    let (tokens, end) = engine.generate(req).unwrap().collect();
    // The first token comes from the prompt's whole row; the first decode step fails.
    assert_eq!(tokens.len(), 1);
    match end {
        rwkv_engine::GenerateEvent::Error(rwkv_engine::EngineError::StepFailed(m)) => {
            assert!(m.contains("token id below"), "{m}");
        }
        other => panic!("{other:?}"),
    }
}
