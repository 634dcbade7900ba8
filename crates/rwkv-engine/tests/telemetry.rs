//! What the engine records through the `metrics` facade, read back with the debugging recorder.
//! One test per binary: the recorder is process-global.

use std::path::PathBuf;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use metrics_util::MetricKind;
use rwkv_cpu::CpuBackend;
use rwkv_engine::telemetry::*;
use rwkv_engine::{
    Engine, EngineConfig, GenerateEvent, GenerateRequest, SamplingParams, SchedulerConfig,
    ScoreRequest,
};
use rwkv_model::{ModelWeights, State};

type Metric = (MetricKind, String, Vec<(String, String)>, DebugValue);

fn weights() -> ModelWeights {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/rwkv6-tiny-c128-l2.safetensors");
    ModelWeights::load(path).unwrap()
}

fn find<'a>(metrics: &'a [Metric], name: &str, labels: &[(&str, &str)]) -> &'a DebugValue {
    metrics
        .iter()
        .find(|(_, n, l, _)| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&(k.to_string(), v.to_string())))
        })
        .map(|m| &m.3)
        .unwrap_or_else(|| panic!("{name} {labels:?} was not recorded"))
}

fn counter(metrics: &[Metric], name: &str, labels: &[(&str, &str)]) -> u64 {
    match find(metrics, name, labels) {
        DebugValue::Counter(n) => *n,
        other => panic!("{name} is not a counter: {other:?}"),
    }
}

fn histogram(metrics: &[Metric], name: &str) -> Vec<f64> {
    match find(metrics, name, &[]) {
        DebugValue::Histogram(values) => values.iter().map(|v| v.into_inner()).collect(),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

fn gauge(metrics: &[Metric], name: &str) -> f64 {
    match find(metrics, name, &[]) {
        DebugValue::Gauge(v) => v.into_inner(),
        other => panic!("{name} is not a gauge: {other:?}"),
    }
}

fn request(tokens: &[u32], max_tokens: usize, session: Option<u64>) -> GenerateRequest {
    GenerateRequest {
        tenant: "acme".into(),
        session,
        tokens: tokens.to_vec(),
        params: SamplingParams {
            temperature: 0.0,
            max_tokens,
            ..SamplingParams::default()
        },
        ..GenerateRequest::default()
    }
}

fn finished(engine: &Engine, req: GenerateRequest) {
    let (_, end) = engine.generate(req).unwrap().collect();
    assert!(matches!(end, GenerateEvent::Finished { .. }), "{end:?}");
}

#[test]
fn a_short_generation_records_steps_tokens_latencies_and_swaps() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();
    describe();

    let weights = weights();
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 64,
            ..SchedulerConfig::default()
        },
        ..EngineConfig::default()
    };
    let engine = Engine::start(CpuBackend::new(&weights, 1), cfg).unwrap();
    // Prefill 5 tokens (step 1, first token), then 3 decode steps: 4 tokens in 4 steps.
    finished(&engine, request(&[1, 2, 3, 4, 5], 4, None));
    // Two sessions on one slot: b swaps a out, a's next turn swaps b out and a back in, and
    // the scoring request below swaps a out again.
    let a = engine.create_session("acme").unwrap();
    let b = engine.create_session("acme").unwrap();
    finished(&engine, request(&[7], 1, Some(a)));
    finished(&engine, request(&[8], 1, Some(b)));
    finished(&engine, request(&[9], 1, Some(a)));
    let score = ScoreRequest {
        tenant: "acme".into(),
        context: vec![1, 2],
        continuations: vec![vec![3], vec![4, 5]],
        top_logprobs: None,
    };
    engine.score(score).unwrap();
    // Joining the engine thread makes every record of the last step visible.
    engine.shutdown();

    let metrics: Vec<Metric> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let (kind, key) = key.into_parts();
            let labels = key
                .labels()
                .map(|l| (l.key().to_string(), l.value().to_string()))
                .collect();
            (kind, key.name().to_string(), labels, value)
        })
        .collect();

    // Generation: 4 steps; session turns: 1 step each (a one-token input samples at once);
    // scoring: the context step, then one step for the two-token continuation.
    let steps = 4 + 3 + 2;
    assert_eq!(counter(&metrics, STEPS, &[]), steps);
    assert_eq!(
        histogram(&metrics, STEP_SEQUENCES),
        vec![1.0; steps as usize]
    );
    let tokens = histogram(&metrics, STEP_TOKENS);
    assert_eq!(tokens, [5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0]);
    let forward = histogram(&metrics, FORWARD_SECONDS);
    assert_eq!(forward.len(), steps as usize);
    assert!(forward.iter().all(|&s| s > 0.0 && s < 60.0), "{forward:?}");

    assert_eq!(counter(&metrics, GENERATED_TOKENS, &[]), 4 + 3);
    let ttft = histogram(&metrics, TIME_TO_FIRST_TOKEN);
    assert_eq!(ttft.len(), 4, "one per generation");
    assert!(ttft.iter().all(|&s| s > 0.0 && s < 60.0), "{ttft:?}");
    assert_eq!(histogram(&metrics, INTER_TOKEN_LATENCY).len(), 3);
    let generate = [("kind", "generate"), ("reason", "length")];
    assert_eq!(counter(&metrics, REQUESTS_FINISHED, &generate), 4);
    let scored = [("kind", "score"), ("reason", "scored")];
    assert_eq!(counter(&metrics, REQUESTS_FINISHED, &scored), 1);

    let state_bytes = State::zeros(&weights.config).as_flat().len() as u64 * 4;
    for (direction, count) in [("out", 3), ("in", 1)] {
        let labels = [("direction", direction)];
        assert_eq!(counter(&metrics, SWAPS, &labels), count, "{direction}");
        let bytes = counter(&metrics, SWAP_BYTES, &labels);
        assert_eq!(bytes, count * state_bytes, "{direction}");
    }
    // Lookups: the generation, the score, and both sessions' first turns (a session without a
    // stored state starts from the cache); a's second turn swaps in instead. Nothing matches.
    assert_eq!(counter(&metrics, PREFIX_CACHE_MISSES, &[]), 4);
    assert_eq!(counter(&metrics, PREFIX_CACHE_HITS, &[]), 0);
    assert_eq!(gauge(&metrics, SLOTS_TOTAL), 1.0);
    assert_eq!(gauge(&metrics, RUNNING), 0.0);
}
