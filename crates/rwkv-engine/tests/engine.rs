//! The engine on the CPU backend with a tiny random model: batching, swapping, caching, forking
//! and export/import must never change a greedy continuation.

mod common;

use std::time::{Duration, Instant};

use common::{alone, tokens_until_length, weights};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rwkv_cpu::CpuBackend;
use rwkv_engine::{
    Engine, EngineConfig, EngineError, FinishReason, GenerateEvent, GenerateRequest,
    SamplingParams, SchedulerConfig,
};
use rwkv_model::ModelWeights;

const TENANT: &str = "acme";

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    }
}

fn config(tokens: usize, chunk: usize) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: tokens,
            max_batch_size: 64,
            prefill_chunk: chunk,
            ..SchedulerConfig::default()
        },
        host_tier_bytes: 64 << 20,
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    }
}

fn start(weights: &ModelWeights, slots: usize, cfg: EngineConfig) -> Engine {
    Engine::start(CpuBackend::new(weights, slots), cfg).unwrap()
}

fn request(tokens: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        tenant: TENANT.into(),
        tokens: tokens.to_vec(),
        params: greedy(max_tokens),
        ..GenerateRequest::default()
    }
}

/// Runs a request to the end and returns its tokens, checking it finished normally.
fn run(engine: &Engine, req: GenerateRequest) -> Vec<u32> {
    let (tokens, end) = engine.generate(req).unwrap().collect();
    assert!(matches!(end, GenerateEvent::Finished { .. }), "{end:?}");
    tokens
}

fn prompt(rng: &mut ChaCha8Rng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.gen_range(1..1000)).collect()
}

#[test]
fn sixty_four_concurrent_sequences_match_running_each_alone() {
    let weights = weights();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let prompts: Vec<Vec<u32>> = (0..64)
        .map(|i| {
            let len = [1, 3, 9, 17, 40, 70][i % 6] + rng.gen_range(0..3);
            prompt(&mut rng, len)
        })
        .collect();
    // 16 slots for 64 sequences: most wait and are admitted as others finish.
    let engine = start(&weights, 16, config(48, 16));
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| engine.generate(request(p, 6)).unwrap())
        .collect();
    for (p, stream) in prompts.iter().zip(streams) {
        let tokens = tokens_until_length(stream);
        assert_eq!(
            tokens,
            alone(&weights, p, greedy(6)),
            "prompt of {}",
            p.len()
        );
    }
    let stats = engine.stats().unwrap();
    assert_eq!((stats.running, stats.waiting, stats.slots_free), (0, 0, 16));
}

#[test]
fn stop_tokens_end_the_generation_without_being_emitted() {
    let weights = weights();
    let engine = start(&weights, 2, config(64, 16));
    let p = [5, 6, 7, 8];
    let free = run(&engine, request(&p, 6));
    let stop = free[3];
    let mut req = request(&p, 6);
    req.params.stop_tokens = vec![stop];
    let (tokens, end) = engine.generate(req).unwrap().collect();
    let cut = free.iter().position(|&t| t == stop).unwrap();
    assert_eq!(tokens, free[..cut]);
    assert!(matches!(
        end,
        GenerateEvent::Finished {
            reason: FinishReason::Stop,
            ..
        }
    ));
    let mut req = request(&p, 2);
    req.top_logprobs = Some(3);
    let stream = engine.generate(req).unwrap();
    match stream.recv() {
        Some(GenerateEvent::Token {
            token,
            logprobs: Some(lp),
        }) => {
            assert_eq!((token, lp.token, lp.top.len()), (free[0], free[0], 3));
            assert_eq!(lp.top[0].0, token, "greedy picks the most likely token");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn swapped_out_sessions_continue_exactly() {
    let weights = weights();
    let turn1: Vec<u32> = (1..30).collect();
    let turn2: Vec<u32> = vec![11, 12, 13];
    let converse = |slots: usize, crowd: bool, host_bytes: usize| {
        let mut cfg = config(64, 16);
        cfg.host_tier_bytes = host_bytes;
        let engine = start(&weights, slots, cfg);
        let sid = engine.create_session(TENANT).unwrap();
        let mut req = request(&turn1, 5);
        req.session = Some(sid);
        let first = run(&engine, req);
        if crowd {
            // Two other sessions take both slots, so ours is swapped out to the host tier.
            for _ in 0..2 {
                let other = engine.create_session(TENANT).unwrap();
                let mut req = request(&[9, 9, 9], 2);
                req.session = Some(other);
                run(&engine, req);
            }
            let swapped = engine.stats().unwrap().host_tier_entries;
            assert_eq!(swapped >= 1, host_bytes > 0, "{swapped} states swapped out");
        }
        let mut req = request(&turn2, 5);
        req.session = Some(sid);
        (first, run(&engine, req))
    };
    let (a1, a2) = converse(8, false, 64 << 20);
    let (b1, b2) = converse(2, true, 64 << 20);
    assert_eq!((&a1, &a2), (&b1, &b2));
    // With no host tier the swapped-out state is dropped and the history is replayed.
    let (c1, c2) = converse(2, true, 0);
    assert_eq!((&a1, &a2), (&c1, &c2));
    // A session is exactly its tokens: the same as one stateless prompt of the whole history.
    let whole = [&turn1[..], &a1, &turn2].concat();
    assert_eq!(a2, alone(&weights, &whole, greedy(5)));
}

#[test]
fn prefix_cache_hits_skip_prefill_and_give_identical_continuations() {
    let weights = weights();
    let mut cfg = config(64, 16);
    cfg.prefix_cache_bytes = 16 << 20;
    cfg.scheduler.checkpoint_every = 8;
    let engine = start(&weights, 4, cfg);
    let p: Vec<u32> = (100..140).collect();
    let cold = engine.generate(request(&p, 5)).unwrap().collect();
    let warm = engine.generate(request(&p, 5)).unwrap().collect();
    assert_eq!(cold.0, warm.0);
    assert_eq!(cold.0, alone(&weights, &p, greedy(5)));
    let cached = |e: &GenerateEvent| match e {
        GenerateEvent::Finished { usage, .. } => usage.cached_tokens,
        other => panic!("{other:?}"),
    };
    assert_eq!(cached(&cold.1), 0);
    assert_eq!(
        cached(&warm.1),
        p.len(),
        "an exact repeat: the prompt's state and logits are cached, nothing is fed"
    );
    let hits = engine.stats().unwrap().cache.hits;
    // A prompt that leaves the cached one after 35 tokens resumes at the aligned checkpoint.
    let branch = [&p[..35], &[999, 998]].concat();
    let (tokens, end) = engine.generate(request(&branch, 3)).unwrap().collect();
    assert_eq!(
        cached(&end),
        32,
        "the last aligned checkpoint before the branch"
    );
    assert_eq!(tokens, alone(&weights, &branch, greedy(3)));
    assert_eq!(engine.stats().unwrap().cache.hits, hits + 1);
    // An exact repeat whose first token ends it (max_tokens 1) finishes at admission.
    let (one, end) = engine.generate(request(&p, 1)).unwrap().collect();
    assert_eq!((one, cached(&end)), (cold.0[..1].to_vec(), p.len()));
    // The end-of-generation state (prompt + 4 fed tokens) serves the next turn.
    let next = [&p[..], &cold.0, &[7, 8]].concat();
    let (tokens, end) = engine.generate(request(&next, 4)).unwrap().collect();
    assert_eq!(cached(&end), p.len() + 4);
    assert_eq!(tokens, alone(&weights, &next, greedy(4)));
    // Another tenant shares nothing.
    let mut other = request(&p, 5);
    other.tenant = "other".into();
    let (tokens, end) = engine.generate(other).unwrap().collect();
    assert_eq!((tokens, cached(&end)), (cold.0, 0));
}

#[test]
fn cancellation_frees_slots_at_the_next_step() {
    let weights = weights();
    let engine = start(&weights, 3, config(64, 16));
    let mut streams: Vec<_> = (0..4)
        .map(|i| engine.generate(request(&[i + 1, 2, 3], 100_000)).unwrap())
        .collect();
    for s in &streams[..3] {
        assert!(matches!(s.recv(), Some(GenerateEvent::Token { .. })));
    }
    let stats = engine.stats().unwrap();
    assert_eq!((stats.running, stats.waiting, stats.slots_free), (3, 1, 0));
    streams[0].cancel();
    drop(streams.remove(1)); // A client that goes away cancels too.
                             // The waiting request gets a slot and runs.
    assert!(matches!(
        streams[2].recv_timeout(Duration::from_secs(30)),
        Ok(GenerateEvent::Token { .. })
    ));
    let (_, end) = streams.remove(0).collect();
    assert!(matches!(
        end,
        GenerateEvent::Finished {
            reason: FinishReason::Cancelled,
            ..
        }
    ));
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stats = engine.stats().unwrap();
        if stats.running == 0 && stats.slots_free == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "slots not freed: {stats:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn forks_and_imports_continue_exactly_and_stay_tenant_scoped() {
    let weights = weights();
    let mut cfg = config(64, 16);
    cfg.model_hash = [3; 32];
    let engine = start(&weights, 4, cfg.clone());
    let sid = engine.create_session(TENANT).unwrap();
    let mut req = request(&[4, 5, 6, 7, 8], 4);
    req.session = Some(sid);
    run(&engine, req);
    let fork = engine.fork_session(TENANT, sid).unwrap();
    let bytes = engine.export_session(TENANT, sid).unwrap();
    let continue_with = |engine: &Engine, tenant: &str, id| {
        let mut req = request(&[1, 2], 6);
        req.tenant = tenant.into();
        req.session = Some(id);
        run(engine, req)
    };
    let original = continue_with(&engine, TENANT, sid);
    assert_eq!(continue_with(&engine, TENANT, fork), original);

    let other = start(&weights, 2, cfg.clone());
    let imported = other.import_session("beta", bytes.clone()).unwrap();
    assert_eq!(continue_with(&other, "beta", imported), original);

    // Another tenant cannot see, fork, export or delete the session.
    let err = other.export_session(TENANT, imported).unwrap_err();
    assert!(matches!(err, EngineError::SessionNotFound { .. }), "{err}");
    let mut req = request(&[1], 1);
    req.session = Some(imported);
    let (_, end) = other.generate(req).unwrap().collect();
    assert!(matches!(
        end,
        GenerateEvent::Error(EngineError::SessionNotFound { .. })
    ));

    // Corrupted or foreign exports are refused with a reason.
    let mut corrupt = bytes.clone();
    let mid = corrupt.len() / 2;
    corrupt[mid] ^= 0x40;
    let err = other.import_session("beta", corrupt).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    let foreign = start(
        &weights,
        1,
        EngineConfig {
            model_hash: [4; 32],
            ..cfg
        },
    );
    let err = foreign.import_session("beta", bytes).unwrap_err();
    assert!(err.to_string().contains("different model"), "{err}");

    engine.delete_session(TENANT, fork).unwrap();
    assert!(engine.fork_session(TENANT, fork).is_err());
}

/// An imported state is not proven to be what its history computes (a checksum is no
/// signature), so nothing descending from it enters the tenant's prefix cache, where
/// stateless requests with that prefix would start from it; forks of it neither. A session
/// computed here caches its turns as usual.
#[test]
fn states_descending_from_an_import_stay_out_of_the_prefix_cache() {
    let weights = weights();
    let mut cfg = config(64, 16);
    cfg.prefix_cache_bytes = 64 << 20;
    let engine = start(&weights, 2, cfg);
    let turn = |id, tokens: &[u32]| {
        let mut req = request(tokens, 4);
        req.tenant = "beta".into();
        req.session = Some(id);
        run(&engine, req)
    };
    let entries = || engine.stats().unwrap().cache_entries;
    let native = engine.create_session("beta").unwrap();
    let before = entries();
    turn(native, &[4, 5, 6, 7, 8]);
    assert!(entries() > before, "a session's turn is cached");
    let imported = engine
        .import_session("beta", engine.export_session("beta", native).unwrap())
        .unwrap();
    let fork = engine.fork_session("beta", imported).unwrap();
    let before = entries();
    turn(imported, &[1, 2]);
    turn(fork, &[3]);
    turn(imported, &[9, 10, 11]);
    assert_eq!(
        entries(),
        before,
        "nothing from the imported state was cached"
    );
    // The same conversation, computed here, is cached.
    turn(native, &[1, 2]);
    assert!(entries() > before);
}

#[test]
fn bad_requests_are_refused_with_clear_errors() {
    let weights = weights();
    let engine = start(&weights, 1, config(64, 16));
    let err = engine.generate(request(&[], 3)).unwrap_err();
    assert!(matches!(err, EngineError::EmptyInput));
    let err = engine.generate(request(&[1000], 3)).unwrap_err();
    assert!(err.to_string().contains("1000"), "{err}");
    let mut req = request(&[1], 3);
    req.params.top_p = 2.0;
    assert_eq!(engine.generate(req).unwrap_err().kind(), "out_of_range");
    let sid = engine.create_session(TENANT).unwrap();
    let mut req = request(&[], 3);
    req.session = Some(sid);
    let (_, end) = engine.generate(req).unwrap().collect();
    assert!(matches!(end, GenerateEvent::Error(EngineError::EmptyInput)));
    assert!(Engine::start(CpuBackend::new(&weights, 0), EngineConfig::default()).is_err());
}

#[test]
fn default_config_serves_one_token_prompts_and_repeats_through_the_prefix_cache() {
    // The default configuration has the prefix cache on; one-token prompts leave nothing for it
    // to cover, and repeated prompts hit it.
    let weights = weights();
    let engine = Engine::start(CpuBackend::new(&weights, 4), EngineConfig::default()).unwrap();
    let prompts: Vec<Vec<u32>> = vec![vec![5], vec![5, 6, 7], vec![9], vec![5, 6, 7], vec![5]];
    for p in &prompts {
        assert_eq!(
            run(&engine, request(p, 4)),
            alone(&weights, p, greedy(4)),
            "prompt {p:?}"
        );
    }
}

/// One turn of a session: `tokens` appended (after `separator` when the conversation does not
/// end on an end token), greedy, ending on `end_tokens` or after `max_tokens`.
fn turn(engine: &Engine, sid: u64, tokens: &[u32], end_tokens: &[u32], max: usize) -> Vec<u32> {
    let mut req = request(tokens, max);
    req.session = Some(sid);
    req.separator = vec![9];
    req.params.end_tokens = end_tokens.to_vec();
    run(engine, req)
}

#[test]
fn turns_end_tokens_separators_and_rewinds_continue_exactly() {
    let weights = weights();
    let engine = start(&weights, 2, config(64, 16));
    let sid = engine.create_session_with(TENANT, vec![4, 5, 6]).unwrap();
    let info = engine.session_info(TENANT, sid).unwrap();
    assert_eq!((info.tokens, info.turns.clone()), (3, vec![3]));

    // Turn 1: the conversation does not end on an end token, so the separator goes first.
    let out1 = turn(&engine, sid, &[7, 8], &[], 4);
    let mut conv = vec![4, 5, 6, 9, 7, 8];
    assert_eq!(out1, alone(&weights, &conv, greedy(4)));
    conv.extend(&out1);
    let info = engine.session_info(TENANT, sid).unwrap();
    assert_eq!(info.turns, vec![3, conv.len()]);

    // Turn 2 ends on an end token, which is emitted and stays in the conversation.
    let mut prompt2 = conv.clone();
    prompt2.extend([9, 1, 2]);
    let free_run = alone(&weights, &prompt2, greedy(6));
    let end = *free_run[1..]
        .iter()
        .find(|&&t| Some(&t) != conv.last())
        .expect("a token to end on");
    let k = free_run.iter().position(|&t| t == end).unwrap();
    let out2 = turn(&engine, sid, &[1, 2], &[end], 6);
    assert_eq!(out2, free_run[..=k]);
    let turn2 = [&prompt2[..], &out2[..]].concat();

    // Turn 3: the conversation ends on the end token, so no separator.
    let out3 = turn(&engine, sid, &[3], &[end], 3);
    let mut prompt3 = turn2.clone();
    prompt3.push(3);
    let expected3 = alone(&weights, &prompt3, greedy(3));
    let stop3 = expected3
        .iter()
        .position(|&t| t == end)
        .map_or(3, |i| i + 1);
    assert_eq!(out3, expected3[..stop3]);

    // Rewind to turn 1 (the state is dropped and rebuilt): turn 2 replays exactly.
    let info = engine.rewind_session(TENANT, sid, 1).unwrap();
    assert_eq!(
        (info.tokens, info.turns.clone()),
        (conv.len(), vec![3, conv.len()])
    );
    assert_eq!(turn(&engine, sid, &[1, 2], &[end], 6), out2);
    // Rewinding to where it stands keeps the state; turn 3 again.
    let info = engine.rewind_session(TENANT, sid, 2).unwrap();
    assert_eq!(info.tokens, turn2.len());
    assert_eq!(turn(&engine, sid, &[3], &[end], 3), out3);

    let err = engine.rewind_session(TENANT, sid, 9).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::NoSuchTurn {
                turn: 9,
                last: 3,
                ..
            }
        ),
        "{err}"
    );
    assert!(engine.rewind_session("other", sid, 0).is_err());
    let info = engine.rewind_session(TENANT, sid, 0).unwrap();
    assert_eq!((info.tokens, info.turns), (3, vec![3]));
    let listed = engine.list_sessions(TENANT).unwrap();
    assert_eq!(listed.iter().map(|i| i.id).collect::<Vec<_>>(), vec![sid]);
    assert!(engine.list_sessions("other").unwrap().is_empty());
    let err = engine
        .create_session_with(TENANT, vec![1 << 30])
        .unwrap_err();
    assert!(matches!(err, EngineError::TokenOutOfVocab { .. }), "{err}");
}
