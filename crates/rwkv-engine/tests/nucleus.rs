//! Sampled decodes without penalties ask the backend for the kept set of their filters
//! (`OutputRows::Nucleus`); a GPU decides it from a row's best candidates and returns those
//! tokens, or the whole row when they do not decide it. Either way the engine must draw
//! exactly what sampling the whole row draws. And a request for log-probabilities always gets
//! whole rows, greedy or not.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{alone, weights, Custom};
use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, GenerateEvent, GenerateRequest, SamplingParams};
use rwkv_model::backend::top_candidates;
use rwkv_model::nucleus::{kept_prefix, NUCLEUS_CANDIDATES};
use rwkv_model::{Backend, BackendError, Logits, NucleusRow, OutputRows, SeqStep};

/// What the backend of these tests saw and did: kept sets and whole rows returned, and the
/// sequences that asked for candidates or a nucleus.
#[derive(Default)]
struct Counts {
    kept: AtomicUsize,
    rows: AtomicUsize,
    ranked: AtomicUsize,
}

/// The CPU backend, deciding nucleus rows as the CUDA backend does: from the row's best
/// candidates and its softmax denominator.
fn decides_nucleus(
    inner: CpuBackend,
    counts: Arc<Counts>,
) -> Custom<impl FnMut(&mut CpuBackend, &[SeqStep<'_>]) -> Result<Logits, BackendError> + Send> {
    let forward = move |backend: &mut CpuBackend, steps: &[SeqStep<'_>]| {
        let ranked = steps
            .iter()
            .filter(|s| matches!(s.output, OutputRows::Top(_) | OutputRows::Nucleus(_)))
            .count();
        counts.ranked.fetch_add(ranked, Ordering::SeqCst);
        let mut out = backend.forward(steps)?;
        let filters = steps.iter().filter_map(|s| match s.output {
            OutputRows::Nucleus(f) if !s.tokens.is_empty() => Some(f),
            _ => None,
        });
        for (row, filter) in out.nucleus.iter_mut().zip(filters) {
            let NucleusRow::Row(logits) = row else {
                unreachable!("the CPU backend returns whole rows")
            };
            let cands = top_candidates(logits, NUCLEUS_CANDIDATES);
            let max = cands[0].logit;
            let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            if let Some(n) = kept_prefix(&cands, max, sum, filter, logits.len()) {
                *row = NucleusRow::Kept(cands[..n].to_vec());
                counts.kept.fetch_add(1, Ordering::SeqCst);
            } else {
                counts.rows.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(out)
    };
    Custom {
        decides_nucleus: true,
        ..Custom::new(inner, forward)
    }
}

fn request(prompt: &[u32], params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        tenant: "t".into(),
        tokens: prompt.to_vec(),
        params,
        ..GenerateRequest::default()
    }
}

#[test]
fn sampled_decodes_draw_from_kept_sets_exactly_as_from_rows() {
    let weights = weights();
    let counts = Arc::new(Counts::default());
    let backend = decides_nucleus(CpuBackend::new(&weights, 8), counts.clone());
    let engine = Engine::start(backend, EngineConfig::default()).unwrap();
    let mut cases = Vec::new();
    for i in 0..12u32 {
        let prompt: Vec<u32> = (0..2 + i).map(|j| (i * 97 + j * 31) % 1000 + 1).collect();
        let params = SamplingParams {
            temperature: [0.6, 1.0, 1.5][(i % 3) as usize],
            top_p: [0.3, 0.9][(i / 3 % 2) as usize],
            top_k: [0, 20][(i / 6) as usize],
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 12,
            seed: Some(u64::from(i) + 1),
            ..SamplingParams::default()
        };
        cases.push((prompt, params));
    }
    let streams: Vec<_> = cases
        .iter()
        .map(|(p, params)| engine.generate(request(p, params.clone())).unwrap())
        .collect();
    for ((p, params), stream) in cases.iter().zip(streams) {
        let (tokens, _) = stream.collect();
        assert_eq!(
            tokens,
            alone(&weights, p, params.clone()),
            "{p:?} {params:?}"
        );
    }
    let (kept, rows) = (
        counts.kept.load(Ordering::SeqCst),
        counts.rows.load(Ordering::SeqCst),
    );
    // 11 decode steps for each of 12 generations (unless one stopped early).
    assert!(
        kept + rows <= 12 * 11 && kept + rows > 100,
        "{kept} + {rows}"
    );
    assert!(kept > 0, "no kept set was decided");
}

#[test]
fn log_probabilities_come_with_every_token_greedy_or_sampled() {
    let weights = weights();
    let counts = Arc::new(Counts::default());
    let backend = decides_nucleus(CpuBackend::new(&weights, 4), counts.clone());
    let engine = Engine::start(backend, EngineConfig::default()).unwrap();
    for temperature in [0.0, 1.0] {
        let params = SamplingParams {
            temperature,
            top_p: 0.5,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            max_tokens: 6,
            seed: Some(3),
            ..SamplingParams::default()
        };
        let mut req = request(&[5, 6, 7], params.clone());
        req.top_logprobs = Some(2);
        let stream = engine.generate(req).unwrap();
        let mut tokens = Vec::new();
        while let Some(event) = stream.recv() {
            match event {
                GenerateEvent::Token { token, logprobs } => {
                    let lp = logprobs.unwrap_or_else(|| panic!("token {} has none", tokens.len()));
                    assert_eq!((lp.token, lp.top.len()), (token, 2));
                    tokens.push(token);
                }
                _ => break,
            }
        }
        assert_eq!(tokens, alone(&weights, &[5, 6, 7], params));
    }
    assert_eq!(
        counts.ranked.load(Ordering::SeqCst),
        0,
        "logprobs need whole rows"
    );
}
