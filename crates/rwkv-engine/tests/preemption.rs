//! Preemption: when every slot runs a long generation, new requests still start soon (long
//! generations are swapped out after `preempt_after_steps`), and every preempted generation,
//! stateless or a session's turn, continues exactly as if it had never been interrupted.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{greedy_params, hooked, tokens_until_length, weights};
use rwkv_cpu::CpuBackend;
use rwkv_engine::{
    Engine, EngineConfig, GenerateEvent, GenerateRequest, GenerateStream, SchedulerConfig,
};
use rwkv_model::{ModelWeights, SeqStep};

const TENANT: &str = "acme";

fn start(weights: &ModelWeights, slots: usize, preempt_after_steps: u64) -> Engine {
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 64,
            prefill_chunk: 16,
            ..SchedulerConfig::default()
        },
        prefix_cache_bytes: 0,
        preempt_after_steps,
        ..EngineConfig::default()
    };
    // Every forward step takes at least a millisecond, so that a long generation takes far
    // longer than a short one however the test threads are scheduled.
    let slow = hooked(CpuBackend::new(weights, slots), |_: &[SeqStep<'_>]| {
        thread::sleep(Duration::from_millis(1))
    });
    Engine::start(slow, cfg).unwrap()
}

fn greedy(tokens: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        tenant: TENANT.into(),
        tokens: tokens.to_vec(),
        params: greedy_params(max_tokens),
        ..GenerateRequest::default()
    }
}

/// Reads a stream to its end on a thread: its tokens and when it finished.
fn watch(stream: GenerateStream) -> mpsc::Receiver<(Vec<u32>, Instant)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let tokens = tokens_until_length(stream);
        let _ = tx.send((tokens, Instant::now()));
    });
    rx
}

/// Waits for a stream's first token (the generation holds a slot and decodes), keeping it.
fn first_token(stream: &GenerateStream) -> u32 {
    match stream.recv() {
        Some(GenerateEvent::Token { token, .. }) => token,
        other => panic!("expected a token, got {other:?}"),
    }
}

/// What the same requests give on an engine that never preempts.
fn undisturbed(weights: &ModelWeights, req: GenerateRequest) -> Vec<u32> {
    let engine = start(weights, 1, 0);
    engine.generate(req).unwrap().collect().0
}

#[test]
fn new_requests_get_slots_from_long_generations_which_continue_exactly() {
    let weights = weights();
    let engine = start(&weights, 2, 4);
    let longs = [vec![5u32, 6, 7], vec![900, 12]];
    let shorts = [vec![40u32, 41, 42, 43], vec![77]];
    // Both slots run long generations...
    let long_streams: Vec<GenerateStream> = longs
        .iter()
        .map(|p| engine.generate(greedy(p, 200)).unwrap())
        .collect();
    let long_firsts: Vec<u32> = long_streams.iter().map(first_token).collect();
    // ...when two short requests arrive.
    let short_watch: Vec<_> = shorts
        .iter()
        .map(|p| watch(engine.generate(greedy(p, 3)).unwrap()))
        .collect();
    let long_watch: Vec<_> = long_streams.into_iter().map(watch).collect();
    let short_done: Vec<(Vec<u32>, Instant)> =
        short_watch.iter().map(|rx| rx.recv().unwrap()).collect();
    let long_done: Vec<(Vec<u32>, Instant)> =
        long_watch.iter().map(|rx| rx.recv().unwrap()).collect();
    // Without preemption the short requests would wait for a long one to finish (about 200
    // steps); with it they got a slot after at most 4.
    let first_long_end = long_done.iter().map(|(_, at)| *at).min().unwrap();
    for (i, (tokens, at)) in short_done.iter().enumerate() {
        assert!(
            *at < first_long_end,
            "short request {i} waited for a long one"
        );
        assert_eq!(tokens, &undisturbed(&weights, greedy(&shorts[i], 3)));
    }
    for (i, (rest, _)) in long_done.into_iter().enumerate() {
        let tokens: Vec<u32> = std::iter::once(long_firsts[i]).chain(rest).collect();
        assert_eq!(
            tokens,
            undisturbed(&weights, greedy(&longs[i], 200)),
            "long {i}"
        );
    }
    let stats = engine.stats().unwrap();
    assert_eq!(
        (
            stats.running,
            stats.waiting,
            stats.preempted,
            stats.slots_free
        ),
        (0, 0, 0, 2)
    );
}

#[test]
fn a_preempted_session_turn_continues_and_the_next_turn_follows_exactly() {
    let weights = weights();
    let run_session = |preempt_after_steps: u64, interrupt: bool| {
        let engine = start(&weights, 1, preempt_after_steps);
        let session = engine.create_session(TENANT).unwrap();
        let turn = |tokens: &[u32], max: usize| GenerateRequest {
            session: Some(session),
            ..greedy(tokens, max)
        };
        let stream = engine.generate(turn(&[3, 4, 5], 60)).unwrap();
        let first = first_token(&stream);
        let watcher = watch(stream);
        let short_end = interrupt.then(|| {
            // A short stateless request takes the only slot for a few steps.
            let (tokens, _) = engine.generate(greedy(&[9, 9], 5)).unwrap().collect();
            assert_eq!(tokens.len(), 5);
            Instant::now()
        });
        let (rest, turn_end) = watcher.recv().unwrap();
        if let Some(short_end) = short_end {
            assert!(short_end < turn_end, "the turn was not preempted");
        }
        let second = engine.generate(turn(&[8], 20)).unwrap().collect().0;
        let stats = engine.stats().unwrap();
        assert_eq!(
            (stats.preempted, stats.slots_free + stats.slots_parked),
            (0, 1)
        );
        (
            std::iter::once(first).chain(rest).collect::<Vec<_>>(),
            second,
        )
    };
    assert_eq!(run_session(2, true), run_session(0, false));
}

#[test]
fn cancelling_a_preempted_generation_frees_everything() {
    let weights = weights();
    let engine = start(&weights, 1, 2);
    let long = engine.generate(greedy(&[1, 2, 3], 500)).unwrap();
    first_token(&long);
    let short = watch(engine.generate(greedy(&[4], 40)).unwrap());
    // The long generation is (almost certainly) preempted now; dropping it cancels it wherever
    // it is.
    thread::sleep(Duration::from_millis(10));
    drop(long);
    let (tokens, _) = short.recv().unwrap();
    assert_eq!(tokens.len(), 40);
    let stats = engine.stats().unwrap();
    assert_eq!(
        (
            stats.running,
            stats.waiting,
            stats.preempted,
            stats.slots_free
        ),
        (0, 0, 0, 1)
    );
}

#[test]
fn with_preemption_disabled_new_requests_wait_for_a_slot() {
    let weights = weights();
    // Disabled: a short request waits for the long one.
    let engine = start(&weights, 1, 0);
    let long = engine.generate(greedy(&[1, 2, 3], 60)).unwrap();
    first_token(&long);
    let long = watch(long);
    let short = watch(engine.generate(greedy(&[4], 2)).unwrap());
    let (_, long_end) = long.recv().unwrap();
    let (_, short_end) = short.recv().unwrap();
    assert!(
        long_end < short_end,
        "the short request ran before the long one ended"
    );
}

/// A prompt with one token left between two prefill chunks is not decoding: it keeps its slot
/// against waiting requests as every prefill does, and its choices still fork from its
/// prompt's logits. (Preempted as a decode, it came back with its last prompt token run as a
/// decode step, whose logits come back as greedy candidates rather than the whole row, so the
/// second choice was never forked and got no token at all.)
#[test]
fn a_prompt_one_token_short_of_its_end_is_not_preempted_as_a_decode() {
    let weights = weights();
    // One slot, chunks of 16, preemption after one step.
    let engine = start(&weights, 1, 1);
    let prompt: Vec<u32> = (100..117).collect(); // 16 + 1 tokens
                                                 // Greedy without penalties: decode steps ask only for the best candidates.
    let candidates = |tokens: &[u32], max_tokens| {
        let mut req = greedy(tokens, max_tokens);
        req.params.presence_penalty = 0.0;
        req.params.frequency_penalty = 0.0;
        req
    };
    let choices = engine.generate_n(candidates(&prompt, 6), 2).unwrap();
    // A request arriving while the prompt is in: it waits for the slot.
    let other = watch(engine.generate(greedy(&[5, 6], 3)).unwrap());
    let want = undisturbed(&weights, candidates(&prompt, 6));
    assert_eq!(want.len(), 6);
    for (i, choice) in choices.into_iter().enumerate() {
        assert_eq!(tokens_until_length(choice), want, "choice {i}");
    }
    assert_eq!(
        other.recv().unwrap().0,
        undisturbed(&weights, greedy(&[5, 6], 3))
    );
}
