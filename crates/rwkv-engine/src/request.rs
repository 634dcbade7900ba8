//! What callers send to the engine and what comes back: generation requests, their event
//! stream, and the session identifiers (scoring has its own module, [`crate::score`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{
    self, Receiver, RecvTimeoutError, SendError, Sender, SyncSender, TryRecvError,
};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::error::EngineError;
use crate::logprobs::Logprobs;
use crate::params::SamplingParams;
use crate::scheduler::SeqId;
use crate::score::{ScoreRequest, ScoreResult};

/// A session handle, unique within the engine; it is only valid together with its tenant.
pub type SessionId = u64;

/// One generation: a stateless prompt, or tokens appended to a session.
#[derive(Clone, Debug, Default)]
pub struct GenerateRequest {
    /// Owner of the session and of the prefix-cache entries this request may use.
    pub tenant: String,
    /// Continue this session (its state and pending tokens come first); `None`: stateless.
    pub session: Option<SessionId>,
    /// The prompt, or the tokens appended to the session.
    pub tokens: Vec<u32>,
    /// Sampling, stop tokens and `max_tokens` (0 feeds the input without generating).
    /// Stop strings are not checked here: the engine has no tokenizer, the router does it.
    pub params: SamplingParams,
    /// `Some(n)`: report the chosen token's log-probability and the `n` best alternatives.
    pub top_logprobs: Option<usize>,
    /// Sessions only: put before `tokens` when the conversation is not empty and its last token
    /// is not one of `params.end_tokens` (the previous turn did not close itself).
    pub separator: Vec<u32>,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` tokens were generated.
    Length,
    /// A stop token was sampled (it is not emitted).
    Stop,
    /// The client cancelled or went away.
    Cancelled,
}

/// Token counts of a finished generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Tokens that had to be in the state before generating (session history included).
    pub prompt_tokens: usize,
    /// Of those, tokens whose prefill was skipped (session state or prefix-cache hit).
    pub cached_tokens: usize,
    /// Tokens emitted.
    pub generated_tokens: usize,
}

/// One event of a generation's stream. The last event is `Finished` or `Error`.
#[derive(Debug)]
pub enum GenerateEvent {
    Token {
        token: u32,
        /// Present when the request asked for `top_logprobs`.
        logprobs: Option<Logprobs>,
    },
    Finished {
        reason: FinishReason,
        usage: Usage,
    },
    Error(EngineError),
}

/// A choice of a multi-choice generation that has not started yet: it gets a copy of the first
/// choice's state and logits when that choice's prompt is done, and then runs on its own.
#[derive(Debug)]
pub(crate) struct Sibling {
    pub(crate) id: SeqId,
    pub(crate) sampler: Box<crate::sampler::Sampler>,
    pub(crate) events: EventSender,
}

/// What both ends of one generation's event stream share: how many events the reader has not
/// taken yet, and the async reader waiting for the next one, if any.
#[derive(Debug, Default)]
pub(crate) struct EventSignal {
    unread: AtomicUsize,
    waiting: Mutex<Option<Waker>>,
}

impl EventSignal {
    fn wake(&self) {
        let waiting = self
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }
}

/// The engine's end of one generation's event stream. The channel itself is unbounded (the step
/// loop must never block on a reader), so it counts the events its reader has not taken yet:
/// the step loop holds a generation whose reader fell behind instead of buffering its tokens
/// without limit. Each event (and the end of the stream) also wakes an async reader.
#[derive(Debug)]
pub(crate) struct EventSender {
    /// `None` only while dropping: the channel must be closed before the reader is woken.
    tx: Option<Sender<GenerateEvent>>,
    signal: Arc<EventSignal>,
}

impl EventSender {
    /// Sends `event`; fails when the reader is gone.
    pub(crate) fn send(&self, event: GenerateEvent) -> Result<(), SendError<GenerateEvent>> {
        let Some(tx) = &self.tx else {
            return Err(SendError(event));
        };
        self.signal.unread.fetch_add(1, Ordering::SeqCst);
        match tx.send(event) {
            Ok(()) => {
                self.signal.wake();
                Ok(())
            }
            Err(e) => {
                self.signal.unread.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Events sent that the reader has not taken yet.
    pub(crate) fn unread(&self) -> usize {
        self.signal.unread.load(Ordering::SeqCst)
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        // Close the channel first, so that the woken reader finds it closed.
        drop(self.tx.take());
        self.signal.wake();
    }
}

/// A generation's event channel: the engine's end, and the parts of a [`GenerateStream`].
pub(crate) fn event_channel() -> (EventSender, Receiver<GenerateEvent>, Arc<EventSignal>) {
    let (tx, rx) = mpsc::channel();
    let signal = Arc::new(EventSignal::default());
    let sender = EventSender {
        tx: Some(tx),
        signal: signal.clone(),
    };
    (sender, rx, signal)
}

/// Commands the engine thread receives.
pub(crate) enum Command {
    Generate {
        id: SeqId,
        /// Boxed, like the sampler: they are large and every other command is small.
        req: Box<GenerateRequest>,
        sampler: Box<crate::sampler::Sampler>,
        events: EventSender,
        /// When the handle accepted the request (the start of the time to first token).
        submitted: Instant,
        /// The request's other choices (`n > 1`): each is forked from this generation's state
        /// once its prompt is in.
        siblings: Vec<Sibling>,
    },
    Score {
        id: SeqId,
        req: ScoreRequest,
        reply: SyncSender<Result<ScoreResult, EngineError>>,
    },
    /// Cancels a generation or a scoring request; unknown (finished) ids are ignored.
    Cancel(SeqId),
    Session(crate::sessions::SessionCommand),
    /// The engine's load, or why its backend is broken.
    Stats(std::sync::mpsc::SyncSender<Result<crate::engine::EngineStats, EngineError>>),
    Shutdown,
}

/// The receiving end of one generation. Dropping it cancels the generation, which frees its slot
/// at the engine's next step.
#[derive(Debug)]
pub struct GenerateStream {
    pub(crate) id: SeqId,
    pub(crate) events: Receiver<GenerateEvent>,
    /// Shared with the engine's [`EventSender`]: taken events are counted off here, and an
    /// async reader waits here.
    pub(crate) signal: Arc<EventSignal>,
    pub(crate) commands: Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Generate { id, .. } => write!(f, "Generate({id})"),
            Command::Score { id, .. } => write!(f, "Score({id})"),
            Command::Cancel(id) => write!(f, "Cancel({id})"),
            Command::Session(_) => write!(f, "Session"),
            Command::Stats(_) => write!(f, "Stats"),
            Command::Shutdown => write!(f, "Shutdown"),
        }
    }
}

impl GenerateStream {
    /// The engine's id of this generation.
    pub fn id(&self) -> SeqId {
        self.id
    }

    /// The next event; `None` once the stream has ended.
    pub fn recv(&self) -> Option<GenerateEvent> {
        let event = self.events.recv().ok()?;
        self.taken();
        Some(event)
    }

    /// The next event, waiting at most `timeout`; `Err(true)` if the stream has ended.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<GenerateEvent, bool> {
        let event = self.events.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => false,
            RecvTimeoutError::Disconnected => true,
        })?;
        self.taken();
        Ok(event)
    }

    /// The next event, without blocking a thread: for async readers (the worker's gRPC
    /// streams), many of which may wait at once. `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<GenerateEvent> {
        std::future::poll_fn(move |cx| self.poll_next(cx)).await
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<GenerateEvent>> {
        let mut registered = false;
        loop {
            match self.events.try_recv() {
                Ok(event) => {
                    self.taken();
                    return Poll::Ready(Some(event));
                }
                Err(TryRecvError::Disconnected) => return Poll::Ready(None),
                Err(TryRecvError::Empty) if registered => return Poll::Pending,
                // Register, then look once more: an event sent in between found no waker to
                // wake, but is in the channel now.
                Err(TryRecvError::Empty) => {
                    *self
                        .signal
                        .waiting
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = Some(cx.waker().clone());
                    registered = true;
                }
            }
        }
    }

    fn taken(&self) {
        self.signal.unread.fetch_sub(1, Ordering::SeqCst);
    }

    /// Asks the engine to stop this generation; it ends with `FinishReason::Cancelled`.
    pub fn cancel(&self) {
        // The engine may already have stopped; then there is nothing left to cancel.
        let _ = self.commands.send(Command::Cancel(self.id));
    }

    /// Reads events until the end: the tokens, and the final event.
    pub fn collect(self) -> (Vec<u32>, GenerateEvent) {
        let mut tokens = Vec::new();
        while let Some(event) = self.recv() {
            match event {
                GenerateEvent::Token { token, .. } => tokens.push(token),
                end => return (tokens, end),
            }
        }
        (tokens, GenerateEvent::Error(EngineError::Stopped))
    }
}

impl Drop for GenerateStream {
    fn drop(&mut self) {
        self.cancel();
    }
}
