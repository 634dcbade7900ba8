//! API keys, tenants and per-tenant limits.
//!
//! A tenants file (TOML) maps API keys to tenants: keys are stored as SHA-256 hex digests, never
//! in clear, and a tenant may have several (rotation: add the new key, move clients, remove the
//! old one). The file is re-read when it changes, without a restart. With no tenants file the
//! router is open: every request belongs to the tenant `default` and no key is needed.
//!
//! Limits per tenant: requests per second (token bucket with a burst), concurrent requests,
//! and tokens per minute (prompt plus completion, over a sliding one-minute window). A request
//! over a limit gets a 429 with `Retry-After` before it touches a worker.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// One tenant in the tenants file.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// SHA-256 hex digests of the tenant's API keys (`printf %s KEY | sha256sum`).
    pub api_key_sha256: Vec<String>,
    /// May call cluster operations (`/metrics` when keys are required).
    #[serde(default)]
    pub admin: bool,
    pub requests_per_second: Option<f64>,
    /// Requests allowed at once above the steady rate [default: one second's worth, at least 1].
    pub burst: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    /// Share of the workers while tenants' requests wait for them [default: 1].
    pub weight: Option<u32>,
    /// Stateful sessions the tenant may hold at once, over the whole cluster.
    pub max_sessions: Option<u32>,
    /// Bytes of recurrent state those sessions may hold (each session holds one model state).
    pub max_state_bytes: Option<u64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    #[serde(default)]
    pub tenants: Vec<TenantConfig>,
}

/// The SHA-256 hex digest of an API key, as the tenants file stores it.
pub fn key_digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tenant's live state: its limits and what it uses now.
#[derive(Debug)]
pub struct Tenant {
    pub config: TenantConfig,
    bucket: Mutex<Bucket>,
    in_flight: AtomicU32,
    tokens: Mutex<VecDeque<(Instant, u64)>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Requests the token bucket holds: `burst`, but at least one second's worth of `rate` and 1.
fn bucket_depth(config: &TenantConfig, rate: f64) -> f64 {
    f64::from(config.burst.unwrap_or(0))
        .max(rate.ceil())
        .max(1.0)
}

/// Held while a request runs; releases the tenant's concurrency slot when dropped.
#[derive(Debug)]
pub struct Admission {
    tenant: Arc<Tenant>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.tenant.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub fn tenant(&self) -> &Arc<Tenant> {
        &self.tenant
    }
}

const WINDOW: Duration = Duration::from_secs(60);

impl Tenant {
    fn new(config: TenantConfig) -> Self {
        let burst = bucket_depth(&config, config.requests_per_second.unwrap_or(1.0));
        Self {
            config,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                updated: Instant::now(),
            }),
            in_flight: AtomicU32::new(0),
            tokens: Mutex::new(VecDeque::new()),
        }
    }

    /// The tenant of the open mode (no tenants file).
    pub fn open() -> Self {
        Self::new(TenantConfig {
            name: "default".into(),
            api_key_sha256: Vec::new(),
            admin: true,
            requests_per_second: None,
            burst: None,
            max_concurrent: None,
            tokens_per_minute: None,
            weight: None,
            max_sessions: None,
            max_state_bytes: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn weight(&self) -> u32 {
        self.config.weight.unwrap_or(1).max(1)
    }

    /// Checks every limit; on success the request holds a concurrency slot until dropped.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, ApiError> {
        let name = &self.config.name;
        if let Some(limit) = self.config.tokens_per_minute {
            let used = self.tokens_in_window();
            if used >= limit {
                return Err(ApiError::rate_limited(
                    format!("tenant `{name}` used {used} of its {limit} tokens per minute"),
                    self.seconds_until_tokens_free(),
                ));
            }
        }
        self.admit_request()
    }

    /// The limits on requests alone (concurrency and requests per second), for requests that
    /// run no model tokens (tokenize, detokenize): a tenant out of tokens for the minute may
    /// still tokenize, but no tenant can call them faster than its request rate.
    pub fn admit_request(self: &Arc<Self>) -> Result<Admission, ApiError> {
        let name = &self.config.name;
        if let Some(limit) = self.config.max_concurrent {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst);
            if now >= limit {
                self.in_flight.fetch_sub(1, Ordering::SeqCst);
                return Err(ApiError::rate_limited(
                    format!("tenant `{name}` already has {limit} requests running"),
                    1,
                ));
            }
        } else {
            self.in_flight.fetch_add(1, Ordering::SeqCst);
        }
        let admission = Admission {
            tenant: self.clone(),
        };
        if let Some(rate) = self.config.requests_per_second {
            let burst = bucket_depth(&self.config, rate);
            let mut b = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.updated).as_secs_f64() * rate).min(burst);
            b.updated = now;
            if b.tokens < 1.0 {
                let wait = ((1.0 - b.tokens) / rate).ceil().max(1.0) as u64;
                return Err(ApiError::rate_limited(
                    format!("tenant `{name}` is over its {rate} requests per second"),
                    wait,
                ));
            }
            b.tokens -= 1.0;
        }
        Ok(admission)
    }

    /// Counts tokens a finished request used against the per-minute limit.
    pub fn record_tokens(&self, tokens: u64) {
        if self.config.tokens_per_minute.is_some() && tokens > 0 {
            let mut window = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
            window.push_back((Instant::now(), tokens));
        }
    }

    fn tokens_in_window(&self) -> u64 {
        let mut window = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        while window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= WINDOW)
        {
            window.pop_front();
        }
        window.iter().map(|(_, n)| n).sum()
    }

    fn seconds_until_tokens_free(&self) -> u64 {
        let window = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        window.front().map_or(1, |(t, _)| {
            WINDOW.saturating_sub(t.elapsed()).as_secs().max(1)
        })
    }
}

/// Who may call the API: the key table, reloaded when its file changes.
#[derive(Debug)]
pub struct Tenants {
    source: Option<PathBuf>,
    state: RwLock<Table>,
}

#[derive(Debug)]
struct Table {
    by_digest: HashMap<String, Arc<Tenant>>,
    /// `None` in open mode.
    modified: Option<SystemTime>,
    open: Option<Arc<Tenant>>,
}

fn read_file(path: &Path) -> Result<(TenantsFile, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the tenants file {}: {e}", path.display()))?;
    let file: TenantsFile = toml::from_str(&text)
        .map_err(|e| format!("invalid tenants file {}: {e}", path.display()))?;
    for t in &file.tenants {
        if t.name.is_empty() || t.name.contains('/') {
            return Err(format!(
                "tenant name `{}` must be non-empty without '/'",
                t.name
            ));
        }
        if let Some(rate) = t.requests_per_second {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(format!(
                    "tenant `{}`: requests_per_second = {rate} must be a number above 0 \
                     (leave it out for no limit)",
                    t.name
                ));
            }
        }
        if let Some(bad) = t
            .api_key_sha256
            .iter()
            .find(|d| d.len() != 64 || !d.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!(
                "tenant `{}`: `{bad}` is not a SHA-256 hex digest (64 hex digits)",
                t.name
            ));
        }
    }
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((file, modified))
}

impl Tenants {
    /// Open mode: no keys, one unlimited tenant `default`.
    pub fn open() -> Self {
        Self {
            source: None,
            state: RwLock::new(Table {
                by_digest: HashMap::new(),
                modified: None,
                open: Some(Arc::new(Tenant::open())),
            }),
        }
    }

    /// Keys from a tenants file; see [`Self::reload_if_changed`].
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let (file, modified) = read_file(path)?;
        let tenants = Self {
            source: Some(path.to_owned()),
            state: RwLock::new(Table {
                by_digest: HashMap::new(),
                modified,
                open: None,
            }),
        };
        tenants.install(file, modified, &HashMap::new());
        Ok(tenants)
    }

    /// From tenants given in code (tests, embedding).
    pub fn from_config(file: TenantsFile) -> Self {
        let tenants = Self {
            source: None,
            state: RwLock::new(Table {
                by_digest: HashMap::new(),
                modified: None,
                open: None,
            }),
        };
        tenants.install(file, None, &HashMap::new());
        tenants
    }

    fn install(
        &self,
        file: TenantsFile,
        modified: Option<SystemTime>,
        previous: &HashMap<String, Arc<Tenant>>,
    ) {
        let mut by_digest = HashMap::new();
        for config in file.tenants {
            // A tenant whose settings did not change keeps its live counters across a reload.
            let kept = previous.values().find(|t| t.config == config).cloned();
            let tenant = kept.unwrap_or_else(|| Arc::new(Tenant::new(config.clone())));
            for digest in &config.api_key_sha256 {
                by_digest.insert(digest.to_ascii_lowercase(), tenant.clone());
            }
        }
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        state.by_digest = by_digest;
        state.modified = modified;
    }

    /// Re-reads the tenants file if it changed; a broken file keeps the previous keys.
    pub fn reload_if_changed(&self) {
        let Some(path) = &self.source else { return };
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let (current, previous) = {
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            (state.modified, state.by_digest.clone())
        };
        if modified == current {
            return;
        }
        match read_file(path) {
            Ok((file, modified)) => {
                self.install(file, modified, &previous);
                tracing::info!(path = %path.display(), "tenants file reloaded");
            }
            Err(e) => tracing::error!("{e}; keeping the previous keys"),
        }
    }

    /// Re-reads the file every `every` while the returned task runs.
    pub fn watch(self: &Arc<Self>, every: Duration) -> Option<tokio::task::JoinHandle<()>> {
        self.source.as_ref()?;
        let me = self.clone();
        Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                me.reload_if_changed();
            }
        }))
    }

    /// The tenant of a request's `Authorization: Bearer <key>` header, or a 401.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Arc<Tenant>, ApiError> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = &state.open {
            return Ok(open.clone());
        }
        let key = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
            })?;
        state
            .by_digest
            .get(&key_digest(key))
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("invalid API key"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(name: &str, key: &str) -> TenantConfig {
        TenantConfig {
            name: name.into(),
            api_key_sha256: vec![key_digest(key)],
            admin: false,
            requests_per_second: None,
            burst: None,
            max_concurrent: None,
            tokens_per_minute: None,
            weight: None,
            max_sessions: None,
            max_state_bytes: None,
        }
    }

    #[test]
    fn keys_map_to_tenants_and_bad_keys_get_401() {
        let t = Tenants::from_config(TenantsFile {
            tenants: vec![tenant("a", "key-a"), tenant("b", "key-b")],
        });
        assert_eq!(t.authenticate(Some("Bearer key-b")).unwrap().name(), "b");
        for bad in [None, Some("Bearer nope"), Some("key-a"), Some("Bearer ")] {
            assert_eq!(t.authenticate(bad).unwrap_err().status, 401, "{bad:?}");
        }
    }

    #[test]
    fn concurrency_and_rate_limits_answer_429_and_recover() {
        let cfg = TenantConfig {
            max_concurrent: Some(2),
            ..tenant("a", "k")
        };
        let t = Arc::new(Tenant::new(cfg));
        let (x, y) = (t.admit().unwrap(), t.admit().unwrap());
        let e = t.admit().unwrap_err();
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(1)));
        drop(x);
        assert!(t.admit().is_ok());
        drop(y);

        let rate = Arc::new(Tenant::new(TenantConfig {
            requests_per_second: Some(2.0),
            ..tenant("r", "k")
        }));
        assert!(rate.admit().is_ok() && rate.admit().is_ok());
        assert_eq!(rate.admit().unwrap_err().status, 429);
    }

    #[test]
    fn a_request_rate_that_is_not_above_zero_is_refused() {
        let dir = std::env::temp_dir().join(format!("rwkv-tenants-rate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tenants.toml");
        for rate in ["0.0", "-1.0", "nan", "inf"] {
            let text = format!(
                "[[tenants]]\nname = \"a\"\napi_key_sha256 = [\"{}\"]\nrequests_per_second = {rate}\n",
                key_digest("k")
            );
            std::fs::write(&path, text).unwrap();
            let err = Tenants::from_file(&path).unwrap_err();
            assert!(err.contains("requests_per_second"), "{rate}: {err}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tokens_per_minute_counts_recorded_usage() {
        let t = Arc::new(Tenant::new(TenantConfig {
            tokens_per_minute: Some(100),
            ..tenant("a", "k")
        }));
        t.record_tokens(60);
        assert!(t.admit().is_ok());
        t.record_tokens(60);
        let e = t.admit().unwrap_err();
        assert_eq!(e.status, 429);
        assert!(e.retry_after.unwrap() >= 1);
    }

    #[test]
    fn requests_without_model_tokens_keep_the_request_limits_but_not_the_token_budget() {
        // A bucket two deep that refills once in 100 s: nothing refills during the test.
        let t = Arc::new(Tenant::new(TenantConfig {
            tokens_per_minute: Some(100),
            requests_per_second: Some(0.01),
            burst: Some(2),
            max_concurrent: Some(1),
            ..tenant("a", "k")
        }));
        t.record_tokens(100);
        assert_eq!(t.admit().unwrap_err().status, 429);
        let held = t.admit_request().unwrap();
        let busy = t.admit_request().unwrap_err();
        assert!(
            busy.message.contains("requests running"),
            "{}",
            busy.message
        );
        drop(held);
        // The bucket is 2 deep: one more, then the rate refuses.
        drop(t.admit_request().unwrap());
        let over = t.admit_request().unwrap_err();
        assert!(over.message.contains("per second"), "{}", over.message);
    }

    #[test]
    fn the_file_reloads_on_change_and_a_broken_file_keeps_the_old_keys() {
        let dir = std::env::temp_dir().join(format!("rwkv-tenants-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tenants.toml");
        let write = |key: &str| {
            let text = format!(
                "[[tenants]]\nname = \"a\"\napi_key_sha256 = [\"{}\"]\n",
                key_digest(key)
            );
            std::fs::write(&path, text).unwrap();
        };
        write("old");
        let t = Tenants::from_file(&path).unwrap();
        assert!(t.authenticate(Some("Bearer old")).is_ok());
        // Rotation: a new key replaces the old one without a restart. Make sure the mtime moves.
        std::thread::sleep(Duration::from_millis(20));
        write("new");
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        t.reload_if_changed();
        assert!(t.authenticate(Some("Bearer new")).is_ok());
        assert!(t.authenticate(Some("Bearer old")).is_err());
        std::fs::write(&path, "not toml [").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + Duration::from_secs(5))
            .unwrap();
        t.reload_if_changed();
        assert!(t.authenticate(Some("Bearer new")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
