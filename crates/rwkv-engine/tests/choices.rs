//! Multi-choice generations (`generate_n`): the prompt is prefilled once and every choice is
//! exactly what a separate request with its own seed gives, whether its fork found a free slot
//! or had to wait for one; choices are cancelled one by one.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::{alone, hooked, weights};
use rwkv_cpu::CpuBackend;
use rwkv_engine::{
    Engine, EngineConfig, EngineError, FinishReason, GenerateEvent, GenerateRequest,
    SamplingParams, SchedulerConfig, Usage,
};
use rwkv_model::{ModelWeights, SeqStep};

const TENANT: &str = "acme";

/// An engine with `slots` slots, small prefill chunks (a prompt takes several steps) and no
/// prefix cache (so nothing but the fork can skip a prefill); and its fed-token counter.
fn start(weights: &ModelWeights, slots: usize) -> (Engine, Arc<AtomicUsize>) {
    let fed = Arc::new(AtomicUsize::new(0));
    let counter = fed.clone();
    // Counts the tokens the backend is fed.
    let backend = hooked(
        CpuBackend::new(weights, slots),
        move |steps: &[SeqStep<'_>]| {
            let tokens: usize = steps.iter().map(|s| s.tokens.len()).sum();
            counter.fetch_add(tokens, Ordering::SeqCst);
        },
    );
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 24,
            prefill_chunk: 8,
            ..SchedulerConfig::default()
        },
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    };
    (Engine::start(backend, cfg).unwrap(), fed)
}

/// Sampled (not greedy), so that choices differ, with a fixed seed.
fn sampled(max_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 1.0,
        top_p: 0.9,
        max_tokens,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

fn request(prompt: &[u32], params: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        tenant: TENANT.into(),
        tokens: prompt.to_vec(),
        params,
        ..GenerateRequest::default()
    }
}

fn prompt() -> Vec<u32> {
    (0..40).map(|i| (i * 37 + 11) % 1000 + 1).collect()
}

/// Runs `prompt` once, so that the engine caches its end with the logits (an exact hit later).
fn cache_prompt_end(engine: &Engine, prompt: &[u32]) {
    let (_, end) = engine
        .generate(request(prompt, sampled(1, 3)))
        .unwrap()
        .collect();
    finished(&end);
}

fn finished(end: &GenerateEvent) -> (FinishReason, Usage) {
    match end {
        GenerateEvent::Finished { reason, usage } => (*reason, *usage),
        other => panic!("expected the end of the stream, got {other:?}"),
    }
}

/// Runs `n` choices on an engine with `slots` slots and checks each against a separate request
/// with seed `7 + i`, and that the prompt was fed once.
fn choices_match_separate_requests(slots: usize, n: usize) {
    let weights = weights();
    let (engine, fed) = start(&weights, slots);
    let prompt = prompt();
    let max_tokens = 6;
    let streams = engine
        .generate_n(request(&prompt, sampled(max_tokens, 7)), n)
        .unwrap();
    assert_eq!(streams.len(), n);
    let mut outputs = Vec::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let (tokens, end) = stream.collect();
        let (reason, usage) = finished(&end);
        assert_eq!(reason, FinishReason::Length, "choice {i}");
        assert_eq!(usage.prompt_tokens, prompt.len(), "choice {i}");
        // The first choice prefilled the prompt; every other one started from its state.
        let cached = if i == 0 { 0 } else { prompt.len() };
        assert_eq!(usage.cached_tokens, cached, "choice {i}");
        assert_eq!(usage.generated_tokens, max_tokens, "choice {i}");
        let want = alone(&weights, &prompt, sampled(max_tokens, 7 + i as u64));
        assert_eq!(tokens, want, "choice {i} differs from a separate request");
        outputs.push(tokens);
    }
    // The choices are really sampled independently (a model this small still spreads its
    // probability over many tokens).
    outputs.sort();
    outputs.dedup();
    assert!(outputs.len() > 1, "all {n} choices are identical");
    // The prompt once, then every sampled token but the last of each choice.
    assert_eq!(
        fed.load(Ordering::SeqCst),
        prompt.len() + n * (max_tokens - 1)
    );
    let stats = engine.stats().unwrap();
    assert_eq!(
        (stats.running, stats.waiting, stats.slots_free),
        (0, 0, slots)
    );
}

#[test]
fn choices_with_free_slots_fork_on_the_device_and_match_separate_requests() {
    choices_match_separate_requests(8, 4);
}

#[test]
fn choices_without_free_slots_wait_with_a_host_copy_and_match_separate_requests() {
    // Two slots for five choices: three forks wait and start from the saved state and logits.
    choices_match_separate_requests(2, 5);
}

#[test]
fn cancelling_the_first_choice_before_the_fork_hands_the_prefill_to_the_next() {
    let weights = weights();
    let (engine, fed) = start(&weights, 4);
    let prompt = prompt();
    let mut streams = engine
        .generate_n(request(&prompt, sampled(5, 7)), 3)
        .unwrap();
    // The cancel is queued right behind the request, so it is handled before any step.
    streams[0].cancel();
    let (tokens, end) = streams.remove(0).collect();
    assert!(tokens.is_empty());
    assert_eq!(finished(&end).0, FinishReason::Cancelled);
    for (i, stream) in (1..).zip(streams) {
        let (tokens, end) = stream.collect();
        assert_eq!(finished(&end).0, FinishReason::Length);
        assert_eq!(
            tokens,
            alone(&weights, &prompt, sampled(5, 7 + i)),
            "choice {i}"
        );
    }
    assert_eq!(fed.load(Ordering::SeqCst), prompt.len() + 2 * 4);
}

#[test]
fn cancelling_a_choice_before_the_fork_leaves_the_others() {
    let weights = weights();
    let (engine, fed) = start(&weights, 4);
    let prompt = prompt();
    let mut streams = engine
        .generate_n(request(&prompt, sampled(5, 7)), 3)
        .unwrap();
    // Dropping a stream cancels its choice.
    drop(streams.remove(1));
    for (i, stream) in [0u64, 2].into_iter().zip(streams) {
        let (tokens, end) = stream.collect();
        assert_eq!(finished(&end).0, FinishReason::Length);
        assert_eq!(
            tokens,
            alone(&weights, &prompt, sampled(5, 7 + i)),
            "choice {i}"
        );
    }
    assert_eq!(fed.load(Ordering::SeqCst), prompt.len() + 2 * 4);
    let stats = engine.stats().unwrap();
    assert_eq!((stats.running, stats.waiting, stats.slots_free), (0, 0, 4));
}

#[test]
fn zero_max_tokens_feeds_the_prompt_once_and_ends_every_choice() {
    let weights = weights();
    let (engine, fed) = start(&weights, 2);
    let prompt = prompt();
    let streams = engine
        .generate_n(request(&prompt, sampled(0, 7)), 3)
        .unwrap();
    for stream in streams {
        let (tokens, end) = stream.collect();
        assert!(tokens.is_empty());
        assert_eq!(finished(&end).0, FinishReason::Length);
    }
    assert_eq!(fed.load(Ordering::SeqCst), prompt.len());
}

#[test]
fn unusable_choice_counts_are_refused() {
    let weights = weights();
    let (engine, _) = start(&weights, 2);
    let req = request(&prompt(), sampled(2, 7));
    for n in [0, rwkv_engine::MAX_CHOICES + 1] {
        let e = engine.generate_n(req.clone(), n).unwrap_err();
        assert!(matches!(e, EngineError::Choices { .. }), "{e}");
    }
    let session = engine.create_session(TENANT).unwrap();
    let turn = GenerateRequest {
        session: Some(session),
        ..req
    };
    let e = engine.generate_n(turn, 2).unwrap_err();
    assert!(e.to_string().contains("session"), "{e}");
}

#[test]
fn choices_of_an_exact_cache_hit_leave_the_slots_promised_to_other_admissions() {
    let weights = weights();
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 24,
            prefill_chunk: 8,
            ..SchedulerConfig::default()
        },
        ..EngineConfig::default()
    };
    let engine = Engine::start(CpuBackend::new(&weights, 2), cfg).unwrap();
    let prompt = prompt();
    cache_prompt_end(&engine, &prompt);
    // Both are admitted together onto the two free slots; the first samples at placement (an
    // exact hit) and forks its choices, which must not take the slot the second was given.
    let choices = engine
        .generate_n(request(&prompt, sampled(4, 7)), 3)
        .unwrap();
    let other = engine.generate(request(&[5, 6, 7], sampled(4, 1))).unwrap();
    let (tokens, end) = other.collect();
    assert_eq!(finished(&end).0, FinishReason::Length, "{end:?}");
    assert_eq!(tokens, alone(&weights, &[5, 6, 7], sampled(4, 1)));
    for (i, stream) in (0..).zip(choices) {
        let (tokens, end) = stream.collect();
        let (reason, usage) = finished(&end);
        assert_eq!(reason, FinishReason::Length);
        assert_eq!(usage.cached_tokens, prompt.len(), "choice {i}");
        assert_eq!(
            tokens,
            alone(&weights, &prompt, sampled(4, 7 + i)),
            "choice {i}"
        );
    }
}

/// Choices of an exact cache hit that ends at its first token: the first choice leaves during
/// its own placement and the others, queued then with a host copy, start in the same round,
/// with nothing else running and no other command to wake the engine (the streams are kept
/// open, so no cancellation does either).
#[test]
fn choices_of_a_hit_that_ends_at_placement_start_without_another_command() {
    let weights = weights();
    let engine = Engine::start(CpuBackend::new(&weights, 2), EngineConfig::default()).unwrap();
    let prompt = prompt();
    cache_prompt_end(&engine, &prompt);
    let choices = engine
        .generate_n(request(&prompt, sampled(1, 7)), 3)
        .unwrap();
    for (i, stream) in (0..).zip(&choices) {
        let mut tokens = Vec::new();
        loop {
            match stream.recv_timeout(std::time::Duration::from_secs(10)) {
                Ok(GenerateEvent::Token { token, .. }) => tokens.push(token),
                Ok(end) => {
                    assert_eq!(finished(&end).0, FinishReason::Length, "choice {i}");
                    break;
                }
                Err(ended) => panic!("choice {i}: no end after 10 s (stream ended: {ended})"),
            }
        }
        assert_eq!(
            tokens,
            alone(&weights, &prompt, sampled(1, 7 + i)),
            "choice {i}"
        );
    }
}
