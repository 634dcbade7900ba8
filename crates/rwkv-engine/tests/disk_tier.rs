//! The disk tier: session states the host tier evicts are written to files and read back on
//! the session's next turn, so the turn continues exactly without replaying the history; a
//! corrupted file only costs the replay.

mod common;

use std::path::{Path, PathBuf};

use common::weights;
use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, EngineError, SchedulerConfig, Usage};
use rwkv_model::ModelWeights;

const TENANT: &str = "acme";

/// One slot, so every other session's turn swaps ours out; no host tier, so a swapped-out
/// state goes straight to the disk tier (when there is one); no prefix cache, so a lost state
/// can only be replayed.
fn start(weights: &ModelWeights, disk: Option<&Path>) -> Engine {
    let cfg = EngineConfig {
        scheduler: SchedulerConfig {
            max_batch_tokens: 64,
            prefill_chunk: 16,
            ..SchedulerConfig::default()
        },
        host_tier_bytes: 0,
        disk_tier_dir: disk.map(Path::to_owned),
        prefix_cache_bytes: 0,
        ..EngineConfig::default()
    };
    Engine::start(CpuBackend::new(weights, 1), cfg).unwrap()
}

fn turn(engine: &Engine, session: u64, tokens: &[u32]) -> (Vec<u32>, Usage) {
    common::greedy_turn(engine, TENANT, session, tokens, 6).unwrap()
}

/// Two sessions taking turns on one slot: each second turn finds its state swapped out. Returns
/// the replies and the second turns' usage.
fn converse(engine: &Engine) -> (Vec<Vec<u32>>, Vec<Usage>) {
    let a = engine.create_session(TENANT).unwrap();
    let b = engine.create_session(TENANT).unwrap();
    let mut replies = Vec::new();
    let mut usages = Vec::new();
    for (session, tokens) in [(a, vec![1u32, 2, 3, 4, 5]), (b, vec![60, 61])] {
        replies.push(turn(engine, session, &tokens).0);
    }
    for (session, tokens) in [(a, vec![7u32, 8]), (b, vec![9])] {
        let (reply, usage) = turn(engine, session, &tokens);
        replies.push(reply);
        usages.push(usage);
    }
    (replies, usages)
}

fn state_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rwkvstate"))
        .collect()
}

/// The tier writes and deletes files on a thread of its own: waits (up to 10 s) until the
/// directory holds `n` complete state files, and returns them.
fn wait_for_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    for _ in 0..1000 {
        let files = state_files(dir);
        if files.len() == n {
            return files;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("expected {n} state files, found {:?}", state_files(dir));
}

#[test]
fn evicted_session_states_come_back_from_disk_exactly() {
    let weights = weights();
    let dir = tempfile::tempdir().unwrap();
    let (replayed, replay_usage) = converse(&start(&weights, None));
    let engine = start(&weights, Some(dir.path()));
    let (from_disk, disk_usage) = converse(&engine);
    assert_eq!(from_disk, replayed);
    // Without a disk tier the second turns replayed every earlier token; with one, the state
    // was read back and nothing before the new tokens was fed again.
    assert!(replay_usage.iter().all(|u| u.cached_tokens == 0));
    for (u, history) in disk_usage.iter().zip([5 + 6, 2 + 6]) {
        // The last reply token is pending (never fed), so the state covers one token less.
        assert_eq!(u.cached_tokens, history - 1, "{u:?}");
    }
    // The session that ran last is parked in the slot; the other one's state is on disk.
    let stats = engine.stats().unwrap();
    assert_eq!((stats.host_tier_entries, stats.disk_tier_entries), (0, 1));
    wait_for_files(dir.path(), 1);
    // Deleting the sessions deletes their files.
    for session in engine.list_sessions(TENANT).unwrap() {
        engine.delete_session(TENANT, session.id).unwrap();
    }
    wait_for_files(dir.path(), 0);
}

#[test]
fn a_corrupted_state_file_costs_a_replay_not_the_session() {
    let weights = weights();
    let dir = tempfile::tempdir().unwrap();
    let engine = start(&weights, Some(dir.path()));
    let a = engine.create_session(TENANT).unwrap();
    let b = engine.create_session(TENANT).unwrap();
    let a1 = turn(&engine, a, &[1, 2, 3]).0;
    turn(&engine, b, &[4]);
    // Session a's state is on disk now (the file appears once complete): damage it. The writer
    // reports the file right after it appears; give it a moment, so that the engine reads the
    // file rather than the copy it keeps until then.
    let files = wait_for_files(dir.path(), 1);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&files[0], bytes).unwrap();
    let (a2, usage) = turn(&engine, a, &[5]);
    assert_eq!(usage.cached_tokens, 0, "the history was replayed");
    // The same as a session that never left memory.
    let reference = Engine::start(CpuBackend::new(&weights, 2), EngineConfig::default()).unwrap();
    let r = reference.create_session(TENANT).unwrap();
    assert_eq!(turn(&reference, r, &[1, 2, 3]).0, a1);
    assert_eq!(turn(&reference, r, &[5]).0, a2);
}

#[test]
fn an_unusable_disk_tier_directory_is_a_clear_error() {
    let weights = weights();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let cfg = EngineConfig {
        disk_tier_dir: Some(file.join("tier")),
        ..EngineConfig::default()
    };
    let e = Engine::start(CpuBackend::new(&weights, 1), cfg).unwrap_err();
    assert!(matches!(e, EngineError::Config(_)), "{e}");
    assert!(e.to_string().contains("disk tier"), "{e}");
}

/// File names are one process's counter: a second engine on the same directory would delete and
/// overwrite the first one's states, so it is refused.
#[test]
fn a_disk_tier_directory_serves_one_engine_at_a_time() {
    let dir = std::env::temp_dir().join(format!("rwkv-disk-lock-{}", std::process::id()));
    let w = weights();
    let first = start(&w, Some(&dir));
    let cfg = EngineConfig {
        disk_tier_dir: Some(dir.clone()),
        ..EngineConfig::default()
    };
    let err = Engine::start(CpuBackend::new(&w, 1), cfg.clone()).unwrap_err();
    assert!(
        err.to_string().contains("in use by another worker"),
        "{err}"
    );
    drop(first);
    assert!(Engine::start(CpuBackend::new(&w, 1), cfg).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}
