//! Scoring through the engine on the CPU backend with a tiny random model: the scores must be
//! the log-softmax of one direct forward pass over context + continuation, whatever the slots,
//! chunking, prefix cache or concurrent generations.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rwkv_cpu::CpuBackend;
use rwkv_engine::{
    ContinuationScore, Engine, EngineConfig, EngineError, GenerateRequest, SamplingParams,
    SchedulerConfig, ScoreRequest, ScoreResult,
};
use rwkv_model::{Backend, ModelWeights, OutputRows, SeqStep};

const TENANT: &str = "acme";
const TOLERANCE: f64 = 1e-5;

fn weights() -> ModelWeights {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rwkv6-tiny-c128-l2.safetensors");
    ModelWeights::load(path).unwrap()
}

fn config(tokens: usize, chunk: usize, cache_bytes: usize) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: tokens,
            max_batch_size: 64,
            prefill_chunk: chunk,
            checkpoint_every: 8,
            ..SchedulerConfig::default()
        },
        prefix_cache_bytes: cache_bytes,
        ..EngineConfig::default()
    }
}

fn start(weights: &ModelWeights, slots: usize, cfg: EngineConfig) -> Engine {
    Engine::start(CpuBackend::new(weights, slots), cfg).unwrap()
}

fn score_request(context: &[u32], continuations: &[Vec<u32>], top: Option<usize>) -> ScoreRequest {
    ScoreRequest {
        tenant: TENANT.into(),
        context: context.to_vec(),
        continuations: continuations.to_vec(),
        top_logprobs: top,
    }
}

/// Log-softmax of a row in f64, the reference's arithmetic.
fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
    let z: f64 = row.iter().map(|&l| f64::from(l - max).exp()).sum();
    row.iter().map(|&l| f64::from(l - max) - z.ln()).collect()
}

/// The reference: one forward over context + continuation on a fresh backend, every row.
fn direct(weights: &ModelWeights, context: &[u32], cont: &[u32], top: usize) -> ContinuationScore {
    let mut backend = CpuBackend::new(weights, 1);
    let tokens = [context, cont].concat();
    let step = SeqStep {
        slot: 0,
        tokens: &tokens,
        output: OutputRows::All,
    };
    let logits = backend.forward(&[step]).unwrap();
    let mut score = ContinuationScore {
        greedy: true,
        ..ContinuationScore::default()
    };
    for (i, &token) in cont.iter().enumerate() {
        let row = logits.row(context.len() - 1 + i);
        let lp = log_softmax(row);
        score.logprobs.push(lp[token as usize] as f32);
        // Lowest id among ties, like greedy sampling.
        let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        score.greedy &= best == token as usize;
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        if top > 0 {
            let alternatives = order[..top].iter().map(|&t| (t as u32, lp[t] as f32));
            score.top.push(alternatives.collect());
        }
    }
    score
}

fn assert_close(got: &ContinuationScore, want: &ContinuationScore, what: &str) {
    assert_eq!(got.logprobs.len(), want.logprobs.len(), "{what}");
    for (i, (&g, &w)) in got.logprobs.iter().zip(&want.logprobs).enumerate() {
        let diff = (f64::from(g) - f64::from(w)).abs();
        assert!(diff < TOLERANCE, "{what} token {i}: {g} vs {w}");
    }
    assert_eq!(got.greedy, want.greedy, "{what}");
    assert_eq!(got.top.len(), want.top.len(), "{what}");
    for (g, w) in got.top.iter().zip(&want.top) {
        let ids = |t: &[(u32, f32)]| t.iter().map(|p| p.0).collect::<Vec<_>>();
        assert_eq!(ids(g), ids(w), "{what}");
        for (a, b) in g.iter().zip(w) {
            assert!(
                (f64::from(a.1) - f64::from(b.1)).abs() < TOLERANCE,
                "{what}"
            );
        }
    }
}

fn assert_matches_direct(weights: &ModelWeights, req: &ScoreRequest, result: &ScoreResult) {
    let top = req.top_logprobs.unwrap_or(0);
    assert_eq!(result.scores.len(), req.continuations.len());
    for (i, (cont, got)) in req.continuations.iter().zip(&result.scores).enumerate() {
        let want = direct(weights, &req.context, cont, top);
        assert_close(
            got,
            &want,
            &format!("continuation {i} ({} tokens)", cont.len()),
        );
    }
}

/// Continuations of one, two and many tokens, one of them greedy by construction.
fn continuations(weights: &ModelWeights, context: &[u32]) -> Vec<Vec<u32>> {
    let greedy = {
        let mut backend = CpuBackend::new(weights, 1);
        let step = SeqStep {
            slot: 0,
            tokens: context,
            output: OutputRows::Last,
        };
        let row = backend.forward(&[step]).unwrap().data;
        let best = (0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        best as u32
    };
    vec![
        vec![greedy],
        vec![7],
        vec![3, 9],
        (20..33).collect(),
        vec![greedy, 5, 5, 5, 5],
        (100..140).rev().collect(),
    ]
}

#[test]
fn scores_are_the_log_softmax_of_a_direct_forward_pass() {
    let weights = weights();
    let context: Vec<u32> = (1..=23).map(|i| (i * 37) % 1000).collect();
    let conts = continuations(&weights, &context);
    // One slot: every branch runs in the context's slot, reloading the context from the host.
    // Eight slots: branches fork into free slots. Small budgets chunk the context and branches.
    for (slots, budget, chunk) in [(1, 8, 4), (8, 16, 8), (3, 64, 64)] {
        let engine = start(&weights, slots, config(budget, chunk, 0));
        for top in [None, Some(3)] {
            let req = score_request(&context, &conts, top);
            let result = engine.score(req.clone()).unwrap();
            assert_matches_direct(&weights, &req, &result);
            assert_eq!((result.context_tokens, result.cached_tokens), (23, 0));
        }
        assert!(
            engine
                .score(score_request(&context, &conts, None))
                .unwrap()
                .scores[0]
                .greedy
        );
        let stats = engine.stats().unwrap();
        assert_eq!(
            (stats.running, stats.slots_free),
            (0, slots),
            "slots {slots}"
        );
    }
}

#[test]
fn a_small_row_budget_splits_continuations_without_changing_scores() {
    let weights = weights();
    let context: Vec<u32> = (1..=23).map(|i| (i * 37) % 1000).collect();
    let conts = continuations(&weights, &context);
    let mut cfg = config(64, 64, 0);
    // Three rows per step over all continuation lanes: the 40-token one takes 14 steps.
    cfg.scheduler.max_output_rows = 3;
    let engine = start(&weights, 8, cfg);
    let req = score_request(&context, &conts, Some(2));
    let result = engine.score(req.clone()).unwrap();
    assert_matches_direct(&weights, &req, &result);
}

#[test]
fn a_one_token_context_and_one_token_continuations_need_only_the_context_pass() {
    let weights = weights();
    let engine = start(&weights, 1, config(64, 16, 0));
    let req = score_request(&[42], &[vec![1], vec![2], vec![999]], Some(2));
    let result = engine.score(req.clone()).unwrap();
    assert_matches_direct(&weights, &req, &result);
}

#[test]
fn a_prefix_cache_hit_gives_the_same_scores_and_reports_the_cached_tokens() {
    let weights = weights();
    let engine = start(&weights, 2, config(64, 16, 16 << 20));
    let shots: Vec<u32> = (200..240).collect();
    let question = |q: u32| [&shots[..], &[q, q + 1, q + 2]].concat();
    let conts = vec![vec![11], vec![12, 13], vec![14, 15, 16]];
    let cold = engine
        .score(score_request(&question(500), &conts, None))
        .unwrap();
    assert_eq!((cold.context_tokens, cold.cached_tokens), (43, 0));
    // The same few-shot prefix with another question: the aligned checkpoint at 40 is reused.
    let req = score_request(&question(600), &conts, None);
    let other = engine.score(req.clone()).unwrap();
    assert_eq!((other.context_tokens, other.cached_tokens), (43, 40));
    assert_matches_direct(&weights, &req, &other);
    // The same request again: its own prompt-end state cannot serve (the last context token
    // must be fed for its logits), the checkpoint before it does.
    let warm = engine
        .score(score_request(&question(500), &conts, None))
        .unwrap();
    assert_eq!(warm.cached_tokens, 40);
    for (w, c) in warm.scores.iter().zip(&cold.scores) {
        assert_close(w, c, "warm vs cold");
    }
    // Another tenant shares nothing.
    let mut foreign = score_request(&question(500), &conts, None);
    foreign.tenant = "other".into();
    assert_eq!(engine.score(foreign).unwrap().cached_tokens, 0);
    let cache = engine.stats().unwrap().cache;
    assert_eq!(cache.tokens_saved, 80);
}

#[test]
fn scoring_alongside_generations_changes_neither() {
    let weights = weights();
    let greedy = |max_tokens| SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    };
    let prompts: Vec<Vec<u32>> = (0..6).map(|i| (i * 10 + 1..i * 10 + 9).collect()).collect();
    let generate = |engine: &Engine| -> Vec<_> {
        let streams: Vec<_> = prompts
            .iter()
            .map(|p| {
                let req = GenerateRequest {
                    tenant: TENANT.into(),
                    tokens: p.clone(),
                    params: greedy(12),
                    ..GenerateRequest::default()
                };
                engine.generate(req).unwrap()
            })
            .collect();
        streams.into_iter().map(|s| s.collect().0).collect()
    };
    let alone: Vec<Vec<u32>> = generate(&start(&weights, 8, config(32, 8, 0)));

    let engine = start(&weights, 8, config(32, 8, 0));
    let context: Vec<u32> = (300..330).collect();
    let conts = continuations(&weights, &context);
    let reqs: Vec<ScoreRequest> = (0..4)
        .map(|i| score_request(&context[i..], &conts[i..], Some(2)))
        .collect();
    let (generated, scored) = std::thread::scope(|s| {
        let scorers: Vec<_> = reqs
            .iter()
            .map(|r| s.spawn(|| engine.score(r.clone()).unwrap()))
            .collect();
        let generated = generate(&engine);
        let scored: Vec<ScoreResult> = scorers.into_iter().map(|h| h.join().unwrap()).collect();
        (generated, scored)
    });
    assert_eq!(generated, alone);
    for (req, result) in reqs.iter().zip(&scored) {
        assert_matches_direct(&weights, req, result);
    }
}

#[test]
fn dropping_a_pending_score_cancels_it_and_frees_its_slots() {
    let weights = weights();
    let engine = start(&weights, 2, config(4, 4, 0));
    let context: Vec<u32> = (1..400).collect();
    let pending = engine
        .submit_score(score_request(&context, &[vec![1, 2], vec![3, 4]], None))
        .unwrap();
    assert!(pending.wait_timeout(Duration::from_millis(1)).is_none());
    drop(pending);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = engine.stats().unwrap();
        if stats.running == 0 && stats.slots_free == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "slots not freed: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The engine goes on serving.
    let req = score_request(&[5, 6], &[vec![7, 8]], None);
    assert_matches_direct(&weights, &req, &engine.score(req.clone()).unwrap());
}

#[test]
fn bad_score_requests_are_refused_with_clear_errors() {
    let weights = weights();
    let engine = start(&weights, 1, config(64, 16, 0));
    let err = engine
        .score(score_request(&[], &[vec![1]], None))
        .unwrap_err();
    assert!(matches!(err, EngineError::EmptyInput), "{err}");
    let err = engine.score(score_request(&[1], &[], None)).unwrap_err();
    assert!(err.to_string().contains("`continuations`"), "{err}");
    let err = engine
        .score(score_request(&[1], &[vec![2], vec![]], None))
        .unwrap_err();
    assert!(err.to_string().contains("`continuations[1]`"), "{err}");
    for (context, cont) in [(vec![1000], vec![1]), (vec![1], vec![2, 1000])] {
        let err = engine
            .score(score_request(&context, &[cont], None))
            .unwrap_err();
        assert!(
            matches!(
                err,
                EngineError::TokenOutOfVocab {
                    token: 1000,
                    vocab: 1000
                }
            ),
            "{err}"
        );
    }
    // A huge `top_logprobs` is capped at the vocabulary, not allocated.
    let result = engine
        .score(score_request(&[1], &[vec![2]], Some(usize::MAX)))
        .unwrap();
    assert_eq!(result.scores[0].top[0].len(), 1000);
    // Refused requests took nothing.
    let stats = engine.stats().unwrap();
    assert_eq!((stats.running, stats.waiting, stats.slots_free), (0, 0, 1));
}
