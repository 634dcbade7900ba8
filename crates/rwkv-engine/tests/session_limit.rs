//! `max_session_tokens`: a session's conversation (kept whole, to rebuild a lost state) stops
//! growing at the limit. A turn that would start past it is refused, before it runs, with an
//! error that says what to do; the session is left as it was, and rewinding makes room again.
//! Creating or importing a session over the limit is refused too.
//!
//! `max_sessions` and `max_sessions_tokens`: the worker as a whole holds at most so many
//! sessions and so many session tokens, whatever tenants ask for; creating, forking, importing
//! or continuing past them is refused with a retryable error, and deleting makes room.
//!
//! `session_idle_timeout`: a session nobody used for that long is deleted, and makes room.

mod common;

use common::weights;
use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, EngineError};

const TENANT: &str = "acme";

fn start(limit: usize) -> Engine {
    start_with(EngineConfig {
        max_session_tokens: limit,
        ..EngineConfig::default()
    })
}

fn start_with(cfg: EngineConfig) -> Engine {
    Engine::start(CpuBackend::new(&weights(), 2), cfg).unwrap()
}

fn is_capacity(e: &EngineError, what: &str) -> bool {
    matches!(e, EngineError::SessionCapacity { what: w, .. } if w.contains(what))
}

fn turn(engine: &Engine, session: u64, tokens: &[u32]) -> Result<Vec<u32>, EngineError> {
    common::greedy_turn(engine, TENANT, session, tokens, 4).map(|(reply, _)| reply)
}

#[test]
fn a_session_stops_growing_at_max_session_tokens() {
    let engine = start(20);
    let s = engine.create_session(TENANT).unwrap();
    assert_eq!(turn(&engine, s, &[1, 2, 3, 4, 5, 6]).unwrap().len(), 4);
    let before = engine.session_info(TENANT, s).unwrap();
    assert_eq!(before.tokens, 10);
    assert_eq!(turn(&engine, s, &[7, 8, 9, 10, 11, 12]).unwrap().len(), 4);
    // 20 tokens now: the next turn would start with 23.
    let err = turn(&engine, s, &[13, 14, 15]).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::SessionFull {
                tokens: 23,
                limit: 20
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("rewind"), "{err}");
    let after = engine.session_info(TENANT, s).unwrap();
    assert_eq!((after.tokens, after.busy), (20, false));
    // Back to the end of the first turn: room for another.
    engine.rewind_session(TENANT, s, 1).unwrap();
    assert_eq!(turn(&engine, s, &[13, 14, 15]).unwrap().len(), 4);

    // Too long to create, or to import into a worker with a smaller limit.
    let err = engine.create_session_with(TENANT, vec![1; 21]).unwrap_err();
    assert!(matches!(err, EngineError::SessionFull { .. }), "{err}");
    let export = engine.export_session(TENANT, s).unwrap();
    let small = start(8);
    let err = small.import_session(TENANT, export.clone()).unwrap_err();
    assert!(
        err.to_string().contains("over this worker's limit of 8"),
        "{err}"
    );
    assert!(engine.import_session(TENANT, export).is_ok());
}

#[test]
fn the_worker_holds_at_most_max_sessions_whoever_creates_them() {
    let engine = start_with(EngineConfig {
        max_sessions: 3,
        ..EngineConfig::default()
    });
    let a = engine.create_session(TENANT).unwrap();
    let b = engine.create_session("other").unwrap();
    let c = engine.fork_session(TENANT, a).unwrap();
    let export = engine.export_session(TENANT, a).unwrap();
    for err in [
        engine.create_session("third").unwrap_err(),
        engine.fork_session(TENANT, a).unwrap_err(),
        engine.import_session(TENANT, export.clone()).unwrap_err(),
    ] {
        assert!(is_capacity(&err, "sessions"), "{err}");
        assert_eq!(err.kind(), "session_capacity");
        assert!(err.to_string().contains("limit is 3"), "{err}");
    }
    assert_eq!(engine.stats().unwrap().sessions, 3);
    engine.delete_session("other", b).unwrap();
    engine.import_session(TENANT, export).unwrap();
    engine.delete_session(TENANT, c).unwrap();
    engine.create_session("third").unwrap();
}

#[test]
fn all_sessions_together_hold_at_most_max_sessions_tokens() {
    let engine = start_with(EngineConfig {
        max_sessions_tokens: 30,
        ..EngineConfig::default()
    });
    let a = engine.create_session_with(TENANT, vec![1; 12]).unwrap();
    let b = engine.create_session_with(TENANT, vec![2; 12]).unwrap();
    // 24 held: a fork (12 more) or a 7-token turn would pass 30.
    let err = engine.fork_session(TENANT, a).unwrap_err();
    assert!(is_capacity(&err, "tokens"), "{err}");
    let err = turn(&engine, b, &[3; 7]).unwrap_err();
    assert!(is_capacity(&err, "tokens"), "{err}");
    assert_eq!(
        engine.session_info(TENANT, b).unwrap().tokens,
        12,
        "left as it was"
    );
    // A 2-token turn fits (its 4-token reply may go past the total, like a session's own limit).
    assert_eq!(turn(&engine, b, &[3, 4]).unwrap().len(), 4);
    let err = engine.create_session_with("third", vec![5]).unwrap_err();
    assert!(is_capacity(&err, "tokens"), "{err}");
    engine.delete_session(TENANT, a).unwrap();
    engine.create_session_with("third", vec![5]).unwrap();
}

#[test]
fn sessions_idle_past_the_timeout_are_deleted_and_make_room() {
    use std::time::Duration;
    let engine = start_with(EngineConfig {
        session_idle_timeout: Some(Duration::from_secs(4)),
        max_sessions: 2,
        ..EngineConfig::default()
    });
    let old = engine.create_session(TENANT).unwrap();
    turn(&engine, old, &[5, 6]).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let recent = engine.create_session(TENANT).unwrap();
    let err = engine.create_session(TENANT).unwrap_err();
    assert!(is_capacity(&err, "sessions"), "{err}");
    std::thread::sleep(Duration::from_millis(2000));
    // `old` has been idle for 4.5 s, `recent` for 2 s: the next command finds one gone.
    let third = engine.create_session(TENANT).unwrap();
    let err = engine.session_info(TENANT, old).unwrap_err();
    assert!(matches!(err, EngineError::SessionNotFound { .. }), "{err}");
    engine.session_info(TENANT, recent).unwrap();
    engine.session_info(TENANT, third).unwrap();
    assert_eq!(engine.stats().unwrap().sessions, 2);
}
