//! Sessions: named, tenant-scoped conversations whose state lives in some tier between turns.
//!
//! A session is its tokens: `history` (what its state has consumed) and `pending` (generated or
//! appended but not fed yet). Its state is wherever it was left: parked in a device slot, swapped
//! out to the host tier, or nowhere (evicted or failed), in which case the next turn replays
//! the history, from the prefix cache when possible. So losing a state costs recomputation,
//! never data. Keys carry the tenant: another tenant's id is simply not found.

use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

/// Idle sessions are looked for at most this often (each look reads every session).
const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(1);

use rwkv_model::{Backend, State};

use crate::error::EngineError;
use crate::export::{self, SessionSnapshot};
use crate::request::SessionId;
use crate::scheduler::SeqId;
use crate::step_loop::Core;
use crate::telemetry::Swap;
use crate::tiers::Weigh;

/// A session as the engine stores it: the tenant is part of the key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub tenant: String,
    pub id: SessionId,
}

impl SessionKey {
    pub fn new(tenant: &str, id: SessionId) -> Self {
        Self {
            tenant: tenant.to_owned(),
            id,
        }
    }
}

/// One session's tokens and lock.
#[derive(Clone, Debug, Default)]
pub(crate) struct Session {
    /// Tokens the session's state has consumed.
    pub(crate) history: Vec<u32>,
    /// Tokens of the conversation not yet in the state (the last generated token, typically).
    pub(crate) pending: Vec<u32>,
    /// The generation using the session; a session runs one generation at a time.
    pub(crate) busy: Option<SeqId>,
    /// Conversation length (`history + pending`) at creation and at the end of each turn:
    /// where a rewind may go back to.
    pub(crate) turns: Vec<usize>,
    /// When it was created or last used (a turn started or ended, a fork, rewind or export):
    /// sessions idle past `session_idle_timeout` are deleted. Set by `new_session`.
    pub(crate) last_used: Option<Instant>,
    /// The state came in with an import: whatever the export's checksum says, nothing proves
    /// it is what `history` computes, so no state descending from it goes into the tenant's
    /// prefix cache (where other requests with that prefix would pick it up). Forks inherit
    /// it; a rewind that drops the state clears it.
    pub(crate) imported_state: bool,
}

impl Session {
    /// A session whose conversation starts with `tokens` (not fed yet).
    fn starting_with(tokens: Vec<u32>) -> Self {
        Self {
            turns: vec![tokens.len()],
            pending: tokens,
            ..Self::default()
        }
    }

    fn len(&self) -> usize {
        self.history.len() + self.pending.len()
    }

    fn last_token(&self) -> Option<u32> {
        self.pending.last().or(self.history.last()).copied()
    }
}

/// What a caller may know about a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub id: SessionId,
    /// Tokens in the conversation, fed or pending.
    pub tokens: usize,
    /// Conversation length at creation (turn 0) and at the end of each turn since.
    pub turns: Vec<usize>,
    /// A generation is using it.
    pub busy: bool,
}

type Reply<T> = SyncSender<Result<T, EngineError>>;

/// Session operations, each with its reply channel.
pub(crate) enum SessionCommand {
    Create {
        tenant: String,
        tokens: Vec<u32>,
        reply: Reply<SessionId>,
    },
    Info {
        key: SessionKey,
        reply: Reply<SessionInfo>,
    },
    List {
        tenant: String,
        reply: Reply<Vec<SessionInfo>>,
    },
    Rewind {
        key: SessionKey,
        turn: usize,
        reply: Reply<SessionInfo>,
    },
    Fork {
        key: SessionKey,
        reply: Reply<SessionId>,
    },
    Delete {
        key: SessionKey,
        reply: Reply<()>,
    },
    Export {
        key: SessionKey,
        reply: Reply<Vec<u8>>,
    },
    Import {
        tenant: String,
        bytes: Vec<u8>,
        reply: Reply<SessionId>,
    },
}

impl<B: Backend> Core<B> {
    /// Runs one session operation and replies; a caller that stopped waiting is ignored.
    pub(crate) fn session_command(&mut self, cmd: SessionCommand) {
        match cmd {
            SessionCommand::Create {
                tenant,
                tokens,
                reply,
            } => {
                let limit = self.cfg.max_session_tokens;
                let created = if tokens.len() > limit {
                    Err(EngineError::SessionFull {
                        tokens: tokens.len(),
                        limit,
                    })
                } else {
                    self.new_session(&tenant, Session::starting_with(tokens))
                };
                let _ = reply.send(created);
            }
            SessionCommand::Info { key, reply } => {
                let info = self
                    .sessions
                    .get(&key)
                    .map(|s| info_of(key.id, s))
                    .ok_or(EngineError::SessionNotFound { id: key.id });
                let _ = reply.send(info);
            }
            SessionCommand::List { tenant, reply } => {
                let mut list: Vec<SessionInfo> = self
                    .sessions
                    .iter()
                    .filter(|(k, _)| k.tenant == tenant)
                    .map(|(k, s)| info_of(k.id, s))
                    .collect();
                list.sort_by_key(|i| i.id);
                let _ = reply.send(Ok(list));
            }
            SessionCommand::Rewind { key, turn, reply } => {
                let _ = reply.send(self.rewind(&key, turn));
            }
            SessionCommand::Fork { key, reply } => {
                let _ = reply.send(self.fork(&key));
            }
            SessionCommand::Delete { key, reply } => {
                let _ = reply.send(self.delete(&key));
            }
            SessionCommand::Export { key, reply } => {
                let _ = reply.send(self.export(&key));
            }
            SessionCommand::Import {
                tenant,
                bytes,
                reply,
            } => {
                let _ = reply.send(self.import(&tenant, &bytes));
            }
        }
    }

    /// True if a turn appended to this session must first close the previous one: the
    /// conversation is not empty and does not end with one of `end_tokens`.
    pub(crate) fn needs_separator(&self, key: &SessionKey, end_tokens: &[u32]) -> bool {
        self.sessions
            .get(key)
            .and_then(Session::last_token)
            .is_some_and(|last| !end_tokens.contains(&last))
    }

    /// Locks a session for generation `id`, which appends `new_tokens`: with none, the session
    /// must have pending tokens to predict from; with them, it must stay within
    /// `max_session_tokens`.
    pub(crate) fn claim_session(
        &mut self,
        key: &SessionKey,
        id: SeqId,
        new_tokens: usize,
    ) -> Result<(), EngineError> {
        let limit = self.cfg.max_session_tokens;
        let session = self.idle_session(key)?;
        if new_tokens == 0 && session.pending.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let tokens = session.len().saturating_add(new_tokens);
        if tokens > limit {
            return Err(EngineError::SessionFull { tokens, limit });
        }
        self.room_for_session_tokens(new_tokens)?;
        if let Some(s) = self.sessions.get_mut(key) {
            s.busy = Some(id);
            s.last_used = Some(Instant::now());
        }
        Ok(())
    }

    /// Unlocks a session if generation `id` holds it.
    pub(crate) fn release_session(&mut self, key: &SessionKey, id: SeqId) {
        if let Some(s) = self.sessions.get_mut(key) {
            if s.busy == Some(id) {
                s.busy = None;
                s.last_used = Some(Instant::now());
            }
        }
    }

    /// Marks a session as used now (it does not expire for another idle timeout).
    fn touch(&mut self, key: &SessionKey) {
        if let Some(s) = self.sessions.get_mut(key) {
            s.last_used = Some(Instant::now());
        }
    }

    /// Deletes the sessions idle for longer than `session_idle_timeout` (none is busy: a turn
    /// in progress is use), with their states in every tier. Looks at most once a second.
    pub(crate) fn expire_idle_sessions(&mut self) {
        let Some(timeout) = self.cfg.session_idle_timeout else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(self.expiry_checked) < EXPIRY_CHECK_EVERY {
            return;
        }
        self.expiry_checked = now;
        let expired: Vec<SessionKey> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.busy.is_none()
                    && s.last_used
                        .is_some_and(|t| now.saturating_duration_since(t) > timeout)
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in &expired {
            self.remove_session(key);
        }
        if !expired.is_empty() {
            self.metrics.sessions_expired(expired.len());
        }
    }

    /// Places a session's next turn: its slot and the state's position in `history + pending +
    /// new`, which is returned as the full token list.
    pub(crate) fn place_session(
        &mut self,
        key: &SessionKey,
        new: &[u32],
    ) -> Result<(usize, usize, Vec<u32>), EngineError> {
        let session = self
            .sessions
            .get(key)
            .ok_or(EngineError::SessionNotFound { id: key.id })?;
        let pos = session.history.len();
        let all: Vec<u32> = [&session.history[..], &session.pending[..], new].concat();
        if let Some(slot) = self.slots.unpark(key) {
            return Ok((slot, pos, all));
        }
        // Taken out before acquiring a slot: that may swap others in and evict this entry.
        let swapped = self.take_stored(key);
        let slot = self.acquire_slot()?;
        let placed = match &swapped {
            Some(state) => {
                let started = Instant::now();
                let loaded = self.backend.load_state(slot, state);
                if loaded.is_ok() {
                    self.metrics
                        .swap(Swap::In, state.bytes(), started.elapsed());
                }
                loaded.map(|()| pos).map_err(Into::into)
            }
            None => self.restore_prefix(slot, &key.tenant, &all),
        };
        match placed {
            Ok(pos) => Ok((slot, pos, all)),
            Err(e) => {
                self.slots.release(slot);
                Err(e)
            }
        }
    }

    /// Adds `session`, if the engine has room for one more session and its tokens.
    fn new_session(&mut self, tenant: &str, session: Session) -> Result<SessionId, EngineError> {
        let (would, limit) = (self.sessions.len() + 1, self.cfg.max_sessions);
        if would > limit {
            return Err(EngineError::SessionCapacity {
                what: "sessions",
                would,
                limit,
            });
        }
        self.room_for_session_tokens(session.len())?;
        let id = self.next_session;
        self.next_session += 1;
        let session = Session {
            last_used: Some(Instant::now()),
            ..session
        };
        self.sessions.insert(SessionKey::new(tenant, id), session);
        Ok(id)
    }

    /// Whether all sessions together may hold `more` tokens. Summed when asked (once per
    /// session operation or turn) rather than kept as a running total that every change of a
    /// conversation would have to update.
    fn room_for_session_tokens(&self, more: usize) -> Result<(), EngineError> {
        let held: usize = self.sessions.values().map(Session::len).sum();
        let (would, limit) = (held.saturating_add(more), self.cfg.max_sessions_tokens);
        if would > limit {
            return Err(EngineError::SessionCapacity {
                what: "the tokens of all sessions",
                would,
                limit,
            });
        }
        Ok(())
    }

    /// The session if it exists for this tenant and is not generating.
    fn idle_session(&self, key: &SessionKey) -> Result<&Session, EngineError> {
        let session = self
            .sessions
            .get(key)
            .ok_or(EngineError::SessionNotFound { id: key.id })?;
        match session.busy {
            Some(_) => Err(EngineError::SessionBusy { id: key.id }),
            None => Ok(session),
        }
    }

    /// The session's stored state, copied from whichever tier holds it.
    fn stored_state(&mut self, key: &SessionKey) -> Result<Option<State>, EngineError> {
        if let Some(slot) = self.slots.parked_slot(key) {
            return Ok(Some(self.backend.save_state(slot)?));
        }
        if let Some(state) = self.host.get(key) {
            return Ok(Some(state.clone()));
        }
        Ok(self.disk.as_mut().and_then(|d| d.get(key)))
    }

    /// Stores an idle session's state in the host tier; what that evicts goes to the disk tier
    /// if there is one (else only the state is lost: the session keeps its tokens and replays
    /// them).
    pub(crate) fn store_host(&mut self, key: SessionKey, state: State) {
        for (evicted, state) in self.host.insert(key, state) {
            if let Some(disk) = &mut self.disk {
                let (started, bytes) = (Instant::now(), state.bytes());
                if disk.put(evicted, state) {
                    self.metrics.swap(Swap::DiskOut, bytes, started.elapsed());
                }
            }
        }
    }

    /// Takes a session's stored state out of the host tier, or else of the disk tier.
    fn take_stored(&mut self, key: &SessionKey) -> Option<State> {
        if let Some(state) = self.host.remove(key) {
            return Some(state);
        }
        let started = Instant::now();
        let state = self.disk.as_mut()?.take(key)?;
        self.metrics
            .swap(Swap::DiskIn, state.bytes(), started.elapsed());
        Some(state)
    }

    /// Forgets a session's stored state in every host-side tier.
    fn drop_stored(&mut self, key: &SessionKey) {
        self.host.remove(key);
        if let Some(disk) = &mut self.disk {
            disk.remove(key);
        }
    }

    /// A new session with the same tokens and a copy of the state: a device-to-device copy when a
    /// slot is free, otherwise a host copy.
    fn fork(&mut self, key: &SessionKey) -> Result<SessionId, EngineError> {
        self.touch(key);
        let copy = Session {
            busy: None,
            ..self.idle_session(key)?.clone()
        };
        let id = self.new_session(&key.tenant, copy)?;
        let child = SessionKey::new(&key.tenant, id);
        if let Some(src) = self.slots.parked_slot(key) {
            if let Some(dst) = self.slots.take_free() {
                if let Err(e) = self.backend.copy_state(src, dst) {
                    self.slots.release(dst);
                    self.sessions.remove(&child);
                    return Err(e.into());
                }
                self.slots.park(child, dst);
                return Ok(id);
            }
        }
        match self.stored_state(key) {
            Ok(Some(state)) => self.store_host(child, state),
            // No stored state: the fork replays the tokens on its first turn, like the parent.
            Ok(None) => {}
            Err(e) => {
                self.sessions.remove(&child);
                return Err(e);
            }
        }
        Ok(id)
    }

    /// Goes back to the end of turn `turn`: later tokens are dropped. The state survives when
    /// it has consumed no dropped token; otherwise it is dropped and the next turn restores
    /// the conversation from the prefix cache (turn ends are cached) or recomputes it.
    fn rewind(&mut self, key: &SessionKey, turn: usize) -> Result<SessionInfo, EngineError> {
        self.touch(key);
        let session = self.idle_session(key)?;
        let Some(&len) = session.turns.get(turn) else {
            return Err(EngineError::NoSuchTurn {
                id: key.id,
                turn,
                last: session.turns.len().saturating_sub(1),
            });
        };
        let state_survives = len >= session.history.len();
        if !state_survives {
            if let Some(slot) = self.slots.unpark(key) {
                self.slots.release(slot);
            }
            self.drop_stored(key);
        }
        let session = self
            .sessions
            .get_mut(key)
            .ok_or(EngineError::SessionNotFound { id: key.id })?;
        let mut all = [&session.history[..], &session.pending[..]].concat();
        all.truncate(len);
        if state_survives {
            session.pending = all.split_off(session.history.len());
        } else {
            session.history.clear();
            session.pending = all;
            session.imported_state = false;
        }
        session.turns.truncate(turn + 1);
        Ok(info_of(key.id, session))
    }

    fn delete(&mut self, key: &SessionKey) -> Result<(), EngineError> {
        self.idle_session(key)?;
        self.remove_session(key);
        Ok(())
    }

    /// Removes an idle session and its state from every tier.
    fn remove_session(&mut self, key: &SessionKey) {
        self.sessions.remove(key);
        if let Some(slot) = self.slots.unpark(key) {
            self.slots.release(slot);
        }
        self.drop_stored(key);
    }

    fn export(&mut self, key: &SessionKey) -> Result<Vec<u8>, EngineError> {
        self.touch(key);
        let session = self.idle_session(key)?.clone();
        let state = match self.stored_state(key)? {
            Some(state) => state,
            None if session.history.is_empty() => self.initial.clone(),
            None => return Err(EngineError::StateUnavailable { id: key.id }),
        };
        let snap = SessionSnapshot {
            history: session.history,
            pending: session.pending,
            state,
        };
        Ok(export::encode(
            &self.cfg.model_hash,
            self.backend.config(),
            &snap,
        ))
    }

    /// Validates an export and stores it as a new session in the host tier; its first turn
    /// swaps it in.
    fn import(&mut self, tenant: &str, bytes: &[u8]) -> Result<SessionId, EngineError> {
        let snap = export::decode(&self.cfg.model_hash, self.backend.config(), bytes)?;
        let tokens = snap.history.len() + snap.pending.len();
        if tokens > self.cfg.max_session_tokens {
            return Err(EngineError::Import(format!(
                "the session holds {tokens} tokens, over this worker's limit of {}",
                self.cfg.max_session_tokens
            )));
        }
        let session = Session {
            turns: vec![snap.history.len() + snap.pending.len()],
            history: snap.history,
            pending: snap.pending,
            busy: None,
            last_used: None,
            imported_state: true,
        };
        let id = self.new_session(tenant, session)?;
        // If no tier can hold it, the session replays its history instead.
        self.store_host(SessionKey::new(tenant, id), snap.state);
        Ok(id)
    }
}

fn info_of(id: SessionId, s: &Session) -> SessionInfo {
    SessionInfo {
        id,
        tokens: s.len(),
        turns: s.turns.clone(),
        busy: s.busy.is_some(),
    }
}
