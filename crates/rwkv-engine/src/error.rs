//! [`EngineError`]: every way a request, a session operation or the engine itself can fail.

use rwkv_model::BackendError;

use crate::params::SamplerError;

/// Why the engine refused or failed a request. Messages name the field, the id or the limit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// An engine setting is unusable (zero budgets, a backend without slots).
    #[error("invalid engine configuration: {0}")]
    Config(String),
    /// The sampling parameters were rejected.
    #[error(transparent)]
    Sampling(#[from] SamplerError),
    /// A request gave no token to feed, so there is nothing to predict from.
    #[error("the request has no input tokens (a prompt, or a session with pending tokens)")]
    EmptyInput,
    /// An input token id does not exist in the model's vocabulary.
    #[error("input token id {token} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab { token: u32, vocab: usize },
    /// A scoring request has nothing to score; the message names the field (`continuations[2]`).
    #[error("nothing to score: {0}")]
    EmptyScore(String),
    /// A generation asked for an unusable number of choices (0, too many, or several for a
    /// session turn, whose conversation can only continue one way).
    #[error("invalid number of choices {n}: {reason}")]
    Choices { n: usize, reason: &'static str },
    /// Too many requests already wait for a slot (back-pressure).
    #[error("the engine is overloaded: {waiting} requests wait, the limit is {limit}")]
    Overloaded { waiting: usize, limit: usize },
    /// No session with this id exists for the caller's tenant.
    #[error("session {id} not found")]
    SessionNotFound { id: u64 },

    /// The session's conversation would grow past [`crate::EngineConfig::max_session_tokens`].
    #[error(
        "the session would hold {tokens} tokens, over this worker's limit of {limit}: rewind \
         it to an earlier turn, or start a new session"
    )]
    SessionFull { tokens: usize, limit: usize },
    /// The engine holds as many sessions, or as many session tokens, as it is configured for
    /// ([`crate::EngineConfig::max_sessions`], [`crate::EngineConfig::max_sessions_tokens`]).
    #[error(
        "this worker is full of sessions: {what} would reach {would}, its limit is {limit}; \
         delete sessions that are no longer needed, or try again later"
    )]
    SessionCapacity {
        what: &'static str,
        would: usize,
        limit: usize,
    },
    /// The session is generating; it cannot be continued, forked, exported or deleted now.
    #[error("session {id} is busy with a running generation")]
    SessionBusy { id: u64 },
    /// The session's state was evicted from every tier; continuing it recomputes the state,
    /// exporting it needs the state now.
    #[error("session {id} has no stored state (evicted); continue it once to rebuild the state")]
    StateUnavailable { id: u64 },
    /// A rewind named a turn the session does not have.
    #[error("session {id} has turns 0 to {last}; there is no turn {turn}")]
    NoSuchTurn { id: u64, turn: usize, last: usize },
    /// An exported state failed validation on import.
    #[error("invalid state export: {0}")]
    Import(String),
    /// The backend failed a forward step or a state transfer.
    #[error("backend error: {0}")]
    Backend(#[from] BackendError),
    /// A forward step failed; every sequence of that batch ends with this error, and their
    /// states are not trusted (sessions replay their history next turn).
    #[error("the forward step failed: {0}")]
    StepFailed(String),
    /// The engine thread has stopped (shut down, or it failed to start).
    #[error("the engine has stopped")]
    Stopped,
    /// The backend can no longer run anything (`Backend::broken`): no new work is taken.
    #[error("the backend is broken ({0})")]
    BackendBroken(String),
}

impl EngineError {
    /// A stable machine-readable name for error bodies and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Config(_) => "config",
            Self::Sampling(e) => e.kind(),
            Self::EmptyInput => "empty_input",
            Self::TokenOutOfVocab { .. } => "token_out_of_vocab",
            Self::EmptyScore(_) => "empty_score",
            Self::Choices { .. } => "invalid_choices",
            Self::Overloaded { .. } => "overloaded",
            Self::SessionNotFound { .. } => "session_not_found",
            Self::SessionFull { .. } => "session_full",
            Self::SessionCapacity { .. } => "session_capacity",
            Self::SessionBusy { .. } => "session_busy",
            Self::StateUnavailable { .. } => "state_unavailable",
            Self::NoSuchTurn { .. } => "no_such_turn",
            Self::Import(_) => "invalid_import",
            Self::Backend(_) => "backend",
            Self::StepFailed(_) => "step_failed",
            Self::Stopped => "stopped",
            Self::BackendBroken(_) => "backend_broken",
        }
    }
}
