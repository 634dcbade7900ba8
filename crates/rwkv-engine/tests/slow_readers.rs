//! Readers that fall behind: a generation whose stream is not read is held (not stepped) once
//! 256 of its events wait unread, so a client that stops reading costs bounded memory; it
//! resumes exactly when the reader catches up, and while held it gives its slot to any request
//! that waits for one.

mod common;

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::{alone, greedy_params, tokens_until_length, weights};
use rwkv_cpu::CpuBackend;
use rwkv_engine::{Engine, EngineConfig, GenerateEvent, GenerateRequest, GenerateStream};

/// Unread events at which the engine holds a generation (its documented bound).
const HOLD_AT: usize = 256;
const PROMPT: [u32; 3] = [5, 6, 7];

fn greedy(tokens: &[u32], max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        tenant: "acme".into(),
        tokens: tokens.to_vec(),
        params: greedy_params(max_tokens),
        ..GenerateRequest::default()
    }
}

fn start(slots: usize, preempt_after_steps: u64) -> Engine {
    let cfg = EngineConfig {
        prefix_cache_bytes: 0,
        preempt_after_steps,
        ..EngineConfig::default()
    };
    Engine::start(CpuBackend::new(&weights(), slots), cfg).unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// Events already waiting on the stream, taken without waiting for more.
fn take_waiting(stream: &GenerateStream) -> Vec<u32> {
    let mut tokens = Vec::new();
    while let Ok(event) = stream.recv_timeout(Duration::ZERO) {
        match event {
            GenerateEvent::Token { token, .. } => tokens.push(token),
            other => panic!("the generation ended while held: {other:?}"),
        }
    }
    tokens
}

fn read_to_end(stream: GenerateStream, mut tokens: Vec<u32>) -> Vec<u32> {
    tokens.extend(tokens_until_length(stream));
    tokens
}

#[test]
fn a_reader_that_stops_reading_holds_its_generation_and_loses_nothing() {
    let max_tokens = 1000;
    let expected = alone(&weights(), &PROMPT, greedy_params(max_tokens));
    let engine = start(2, 256);
    let stream = engine.generate(greedy(&PROMPT, max_tokens)).unwrap();
    wait_until("the generation is held", || {
        engine.stats().unwrap().held_for_readers == 1
    });
    // Held: it stays held (nothing more is generated) for as long as nobody reads.
    thread::sleep(Duration::from_millis(100));
    assert_eq!(engine.stats().unwrap().held_for_readers, 1);
    let first = take_waiting(&stream);
    assert_eq!(
        first.len(),
        HOLD_AT,
        "events buffered for a reader that stopped"
    );
    // The reader caught up: the generation goes on from where it stopped, exactly.
    let tokens = read_to_end(stream, first);
    assert_eq!(tokens, expected);
    assert_eq!(engine.stats().unwrap().held_for_readers, 0);
}

#[test]
fn a_held_generation_gives_its_slot_to_a_waiting_request() {
    // One slot, and preemption by age off: only the hold lets the second request in while the
    // first one's reader is away.
    let engine = start(1, 0);
    let max_tokens = 600;
    let expected = alone(&weights(), &PROMPT, greedy_params(max_tokens));
    let slow = engine.generate(greedy(&PROMPT, max_tokens)).unwrap();
    wait_until("the generation is held", || {
        engine.stats().unwrap().held_for_readers == 1
    });
    let (done, finished) = mpsc::channel();
    let quick = engine.generate(greedy(&[9], 5)).unwrap();
    thread::spawn(move || {
        let _ = done.send(quick.collect());
    });
    let (tokens, end) = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("a request waited behind a generation nobody reads");
    assert_eq!(tokens, alone(&weights(), &[9], greedy_params(5)));
    assert!(matches!(end, GenerateEvent::Finished { .. }), "{end:?}");
    // Back on the free slot, it is held again at once: its reader is as far behind as before.
    wait_until("the generation is back on its slot, held", || {
        let stats = engine.stats().unwrap();
        stats.preempted == 0 && stats.held_for_readers == 1
    });
    thread::sleep(Duration::from_millis(100));
    let first = take_waiting(&slow);
    assert_eq!(first.len(), HOLD_AT, "it ran on after resuming");
    // Read at last, it ends exactly.
    assert_eq!(read_to_end(slow, first), expected);
}

/// A generation preempted for a request whose reader then stops: the held request gives the
/// slot back to the preempted generation, whose reader keeps up, instead of sitting on it.
#[test]
fn a_held_generation_gives_its_slot_back_to_a_preempted_one() {
    let engine = start(1, 8);
    let long = engine.generate(greedy(&PROMPT, 400)).unwrap();
    let expected = alone(&weights(), &PROMPT, greedy_params(400));
    let (done, finished) = mpsc::channel();
    // `long` is read as it comes, on a thread of its own.
    let mut reader = Some(long);
    let first = reader.as_ref().unwrap().recv().unwrap();
    let long = reader.take().unwrap();
    thread::spawn(move || {
        let _ = done.send(long.collect());
    });
    // Preempts `long` (after 8 steps), and is never read.
    let stalled = engine.generate(greedy(&[9], 2000)).unwrap();
    let (rest, end) = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("a preempted generation waited behind one nobody reads");
    assert!(matches!(end, GenerateEvent::Finished { .. }), "{end:?}");
    let GenerateEvent::Token { token, .. } = first else {
        panic!("{first:?}")
    };
    let tokens: Vec<u32> = std::iter::once(token).chain(rest).collect();
    assert_eq!(tokens, expected);
    drop(stalled);
}

/// A held generation swapped out for a preempted one hands the slot to that one, even with
/// new requests queued ahead of it, so preempted states never outnumber the slots: here, with
/// one slot, there is never more than one. (When the new request took the slot, the held and
/// the preempted generation were both in host memory.)
#[test]
fn a_trade_with_new_requests_queued_keeps_one_pool_of_preempted_states() {
    let engine = start(1, 8);
    let long = engine.generate(greedy(&PROMPT, 400)).unwrap();
    let expected = alone(&weights(), &PROMPT, greedy_params(400));
    let first = long.recv().unwrap();
    let (done, finished) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(long.collect());
    });
    // Neither is ever read: `stalled` preempts `long` and is held at 256 unread events;
    // `queued` waits ahead of the preempted `long`.
    let stalled = engine.generate(greedy(&[9], 2000)).unwrap();
    let queued = engine.generate(greedy(&[10], 2000)).unwrap();
    let mut most_preempted = 0;
    let (rest, end) = loop {
        most_preempted = most_preempted.max(engine.stats().unwrap().preempted);
        match finished.recv_timeout(Duration::from_millis(1)) {
            Ok(result) => break result,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("{e}"),
        }
    };
    assert!(matches!(end, GenerateEvent::Finished { .. }), "{end:?}");
    let GenerateEvent::Token { token, .. } = first else {
        panic!("{first:?}")
    };
    let tokens: Vec<u32> = std::iter::once(token).chain(rest).collect();
    assert_eq!(tokens, expected);
    assert_eq!(most_preempted, 1, "preempted states beyond the one slot");
    drop((stalled, queued));
}

/// Runs `future` to completion on this thread, parking it until a waker wakes it: enough to
/// read streams with [`GenerateStream::next`] without an async runtime.
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
        thread::park();
    }
}

/// The async reader (what the worker's streams use) is woken for every event and for the end,
/// and sees exactly what the blocking reader sees.
#[test]
fn an_async_reader_is_woken_for_every_event_and_the_end() {
    let engine = start(2, 256);
    let mut stream = engine.generate(greedy(&PROMPT, 300)).unwrap();
    let (tokens, end) = block_on(async {
        let mut tokens = Vec::new();
        loop {
            match stream.next().await {
                Some(GenerateEvent::Token { token, .. }) => tokens.push(token),
                Some(end) => break (tokens, end),
                None => panic!("the stream closed without its last event"),
            }
        }
    });
    assert!(matches!(end, GenerateEvent::Finished { .. }), "{end:?}");
    assert_eq!(tokens, alone(&weights(), &PROMPT, greedy_params(300)));
    // After the last event the channel closes: the reader is told, not left waiting.
    assert!(block_on(stream.next()).is_none());
}
