//! Stateful sessions across the cluster: where a session lives, its public id, the worker calls
//! that manage it, and the per-tenant session quota.
//!
//! A session's state lives on one worker, so its public id names that worker:
//! `sess_<worker id in hex>_<id on the worker>`. Any router replica can route it without shared
//! state, and the worker scopes every session to its tenant, so another tenant's id (or a forged
//! one) is simply not found. When the worker leaves the cluster, its sessions go with it
//! (`session_lost`); export a session to keep it beyond its worker's life.
//!
//! [`ops`] holds the operations both APIs (HTTP and gRPC) call.

pub mod ops;

pub use ops::SessionView;

use std::sync::Arc;

use rwkv_proto::wv1;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::pool::{WorkerEntry, WorkerPool};
use crate::tenants::Tenant;

/// Where a session lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionAddr {
    pub worker: String,
    pub id: u64,
}

impl SessionAddr {
    /// The id clients use.
    pub fn public_id(&self) -> String {
        let hex: String = self.worker.bytes().map(|b| format!("{b:02x}")).collect();
        format!("sess_{hex}_{}", self.id)
    }

    /// Reads a public id; anything malformed is a session that does not exist.
    pub fn parse(public: &str) -> Result<Self, ApiError> {
        let not_found = || not_found(public);
        let rest = public.strip_prefix("sess_").ok_or_else(not_found)?;
        let (hex, id) = rest.rsplit_once('_').ok_or_else(not_found)?;
        let id: u64 = id.parse().map_err(|_| not_found())?;
        if hex.is_empty() || hex.len() % 2 != 0 || hex.len() > 512 {
            return Err(not_found());
        }
        // By bytes: a client's id may hold any UTF-8, and slicing a str between the bytes of
        // one character would panic.
        let digit = |b: u8| char::from(b).to_digit(16).ok_or_else(not_found);
        let bytes = hex
            .as_bytes()
            .chunks_exact(2)
            .map(|pair| Ok((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
            .collect::<Result<Vec<u8>, ApiError>>()?;
        let worker = String::from_utf8(bytes).map_err(|_| not_found())?;
        Ok(Self { worker, id })
    }
}

fn not_found(public: &str) -> ApiError {
    let mut e = ApiError::not_found(format!("session `{public}` not found"));
    e.code = Some("session_not_found");
    e
}

/// The session's worker left the cluster (or died while running its turn).
pub fn worker_gone() -> ApiError {
    ApiError::session_lost(
        "the worker holding this session is no longer in the cluster; its state is lost \
         (export sessions you need to keep)",
    )
}

/// A session's worker, or `session_lost`.
pub fn worker_of(pool: &WorkerPool, addr: &SessionAddr) -> Result<Arc<WorkerEntry>, ApiError> {
    pool.worker(&addr.worker).ok_or_else(worker_gone)
}

/// A worker's refusal of a session call, in the client's terms: unknown sessions are 404 with
/// the public id, an unreachable worker loses the session.
pub fn session_error(addr: &SessionAddr, status: &tonic::Status) -> ApiError {
    match status.code() {
        tonic::Code::NotFound => not_found(&addr.public_id()),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal => {
            let mut e = ApiError::unavailable(format!(
                "the worker holding this session failed: {}",
                status.message()
            ));
            e.code = Some("session_unavailable");
            e
        }
        _ => ApiError::from_status(status),
    }
}

/// The JSON object clients see for a session.
pub fn session_json(addr: &SessionAddr, model: &str, info: &wv1::SessionInfo) -> Value {
    json!({
        "id": addr.public_id(),
        "object": "session",
        "model": model,
        "tokens": info.tokens,
        "turns": info.turns,
        "busy": info.busy,
    })
}

/// Sessions and state bytes the tenant holds over the whole cluster. A worker that does not
/// answer counts as holding none (its sessions are about to be lost anyway).
pub async fn usage(pool: &WorkerPool, tenant: &str) -> (usize, u64) {
    let calls = pool.workers().into_iter().map(|w| {
        let tenant = tenant.to_owned();
        async move {
            let state_bytes = w.info().map_or(0, |i| i.state_bytes);
            let listed = w
                .client
                .clone()
                .list_sessions(wv1::ListSessionsRequest { tenant })
                .await;
            match listed {
                Ok(list) => {
                    let n = list.into_inner().sessions.len();
                    (n, n as u64 * state_bytes)
                }
                Err(status) => {
                    tracing::warn!(worker = w.record.id, "cannot list sessions: {status}");
                    (0, 0)
                }
            }
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .fold((0, 0), |(n, b), (dn, db)| (n + dn, b + db))
}

/// Refuses a new session (create, fork, import) that would take the tenant over its limits.
pub async fn check_quota(
    pool: &WorkerPool,
    tenant: &Tenant,
    new_state_bytes: u64,
) -> Result<(), ApiError> {
    let (max_sessions, max_bytes) = (tenant.config.max_sessions, tenant.config.max_state_bytes);
    if max_sessions.is_none() && max_bytes.is_none() {
        return Ok(());
    }
    let (sessions, bytes) = usage(pool, tenant.name()).await;
    if let Some(max) = max_sessions {
        if sessions >= max as usize {
            return Err(quota(format!(
                "tenant `{}` holds {sessions} sessions, its limit is {max}; delete one first",
                tenant.name()
            )));
        }
    }
    if let Some(max) = max_bytes {
        if bytes + new_state_bytes > max {
            return Err(quota(format!(
                "tenant `{}` holds {bytes} bytes of session state and a new session needs \
                 {new_state_bytes}; its limit is {max}",
                tenant.name()
            )));
        }
    }
    Ok(())
}

fn quota(message: String) -> ApiError {
    let mut e = ApiError::rate_limited(message, 60);
    e.code = Some("session_quota_exceeded");
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ids_round_trip_and_forgeries_are_not_found() {
        let addr = SessionAddr {
            worker: "worker-0:50051".into(),
            id: 4_000_000_123,
        };
        let public = addr.public_id();
        assert!(public.starts_with("sess_"));
        assert_eq!(SessionAddr::parse(&public).unwrap(), addr);
        for bad in [
            "",
            "sess_",
            "sess__1",
            "sess_7_1",
            "sess_zz_1",
            "sess_6869_x",
            "chatcmpl-1",
            "sess_ff_1",
            // Non-ASCII where hex digits go (it panicked once, slicing inside a character).
            "sess_a\u{e9}0_1",
            "sess_\u{e9}_1",
            "sess_+1_1",
        ] {
            let e = SessionAddr::parse(bad).unwrap_err();
            assert_eq!(e.status, 404, "{bad}");
        }
    }
}
