//! `max_session_tokens`: a session's conversation (kept whole, to rebuild a lost state) stops
//! growing at the limit. A turn that would start past it is refused, before it runs, with an
//! error that says what to do; the session is left as it was, and rewinding makes room again.
//! Creating or importing a session over the limit is refused too.

mod common;

use common::weights;
use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, EngineError};

const TENANT: &str = "acme";

fn start(limit: usize) -> Engine {
    let cfg = EngineConfig {
        max_session_tokens: limit,
        ..EngineConfig::default()
    };
    Engine::start(CpuBackend::new(&weights(), 2), cfg).unwrap()
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
