//! What callers send to the engine and what comes back: generation requests, their event
//! stream, and the session identifiers (scoring has its own module, [`crate::score`]).

use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use crate::channel;
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

/// The engine's end of one generation's event stream (see [`crate::channel`]: the step loop
/// holds a generation whose reader fell behind instead of buffering its tokens without limit).
pub(crate) type EventSender = channel::Tx<GenerateEvent>;

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
        reply: channel::Tx<Result<ScoreResult, EngineError>>,
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
    pub(crate) events: channel::Rx<GenerateEvent>,
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
        self.events.recv()
    }

    /// The next event, waiting at most `timeout`; `Err(true)` if the stream has ended.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<GenerateEvent, bool> {
        self.events.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => false,
            RecvTimeoutError::Disconnected => true,
        })
    }

    /// The next event, without blocking a thread: for async readers (the worker's gRPC
    /// streams), many of which may wait at once. `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<GenerateEvent> {
        std::future::poll_fn(move |cx| self.events.poll_recv(cx)).await
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
