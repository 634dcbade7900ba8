//! Where scores come from: an engine in this process, or a cluster's `POST /v1/score`.
//!
//! Both take token ids (the caller tokenizes, with the same tokenizer in both modes), so the two
//! see identical inputs and, on the same model and numerics, give identical results.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context};
use rwkv_engine::{EngineHandle, ScoreRequest, ScoreResult};
use serde::Deserialize;
use serde_json::json;

/// The scores of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    /// `ln p` of each single-token continuation, in request order.
    pub logprobs: Vec<f32>,
    pub context_tokens: usize,
    /// Context tokens whose prefill the prefix cache saved.
    pub cached_tokens: usize,
}

/// Scores single-token continuations of a context.
pub trait Scorer: Send + Sync {
    /// What produces the scores (model and numerics), for the results' fingerprint.
    fn identity(&self) -> &str;

    /// Scores each of `continuations` (one token each) after `context`. `tenant` scopes the
    /// prefix cache where the backend lets the client choose it (in-process only: a cluster puts
    /// every request of an API key in one tenant).
    fn score(
        &self,
        tenant: String,
        context: Vec<u32>,
        continuations: Vec<u32>,
    ) -> impl Future<Output = anyhow::Result<Scored>> + Send;
}

/// An engine in this process; the blocking [`EngineHandle::score`] runs on tokio's blocking
/// threads, so many questions wait at once and the engine batches them.
pub struct InProcess {
    handle: EngineHandle,
    identity: String,
}

impl InProcess {
    pub fn new(handle: EngineHandle, identity: String) -> Self {
        Self { handle, identity }
    }
}

impl Scorer for InProcess {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn score(
        &self,
        tenant: String,
        context: Vec<u32>,
        continuations: Vec<u32>,
    ) -> impl Future<Output = anyhow::Result<Scored>> + Send {
        let handle = self.handle.clone();
        async move {
            let req = ScoreRequest {
                tenant,
                context,
                continuations: continuations.iter().map(|&t| vec![t]).collect(),
                top_logprobs: None,
            };
            let result: ScoreResult = tokio::task::spawn_blocking(move || handle.score(req))
                .await
                .context("the scoring thread failed")??;
            let logprobs = result
                .scores
                .iter()
                .map(|s| s.logprobs.first().copied())
                .collect::<Option<Vec<f32>>>()
                .context("the engine returned an empty score")?;
            Ok(Scored {
                logprobs,
                context_tokens: result.context_tokens,
                cached_tokens: result.cached_tokens,
            })
        }
    }
}

/// A router or `rwkv serve` reached over HTTP.
pub struct Http {
    client: reqwest::Client,
    score_url: String,
    model: String,
    identity: String,
}

/// Attempts per request when the cluster says it is busy (429) or has no worker ready (503).
const MAX_ATTEMPTS: u32 = 8;

#[derive(Deserialize)]
struct ScoreBody {
    scores: Vec<ScoreEntry>,
    usage: ScoreUsage,
}

#[derive(Deserialize)]
struct ScoreEntry {
    logprobs: Vec<f32>,
}

#[derive(Deserialize)]
struct ScoreUsage {
    context_tokens: usize,
    cached_tokens: usize,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

impl Http {
    /// Connects to `endpoint` (e.g. `http://127.0.0.1:8000`) and picks `model`, or the only model
    /// it serves; `api_key` goes with every request.
    pub async fn connect(
        endpoint: &str,
        model: Option<&str>,
        api_key: Option<&str>,
    ) -> anyhow::Result<Self> {
        let base = endpoint.trim_end_matches('/').to_owned();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = api_key {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .context("the API key is not a valid header value")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .context("cannot build the HTTP client")?;
        let url = format!("{base}/v1/models");
        let response = client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        if !status.is_success() {
            bail!("GET {url}: {status}: {}", error_message(response).await);
        }
        let models: ModelList = response
            .json()
            .await
            .with_context(|| format!("GET {url}: not a model list"))?;
        let ids: Vec<String> = models.data.into_iter().map(|m| m.id).collect();
        let model = match (model, ids.as_slice()) {
            (Some(m), _) if ids.iter().any(|id| id == m) => m.to_owned(),
            (Some(m), _) => bail!("{base} does not serve `{m}`; it serves: {}", ids.join(", ")),
            (None, [only]) => only.clone(),
            (None, []) => bail!("{base} serves no model (no worker ready?)"),
            (None, _) => bail!(
                "{base} serves several models ({}); choose one with --model-id",
                ids.join(", ")
            ),
        };
        Ok(Self {
            client,
            score_url: format!("{base}/v1/score"),
            identity: format!("endpoint model {model}"),
            model,
        })
    }
}

impl Scorer for Http {
    fn identity(&self) -> &str {
        &self.identity
    }

    fn score(
        &self,
        _tenant: String,
        context: Vec<u32>,
        continuations: Vec<u32>,
    ) -> impl Future<Output = anyhow::Result<Scored>> + Send {
        let continuations: Vec<Vec<u32>> = continuations.iter().map(|&t| vec![t]).collect();
        let body = json!({"model": self.model, "context": context, "continuations": continuations});
        let (client, url) = (self.client.clone(), self.score_url.clone());
        async move {
            let mut attempt = 0;
            let response = loop {
                attempt += 1;
                let response = client
                    .post(&url)
                    .json(&body)
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?;
                let status = response.status();
                let busy = status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::SERVICE_UNAVAILABLE;
                if busy && attempt < MAX_ATTEMPTS {
                    // Back-pressure from the cluster, not a failure: wait as it asks (capped).
                    let wait = retry_after(&response).unwrap_or(Duration::from_secs(1));
                    tokio::time::sleep(wait.min(Duration::from_secs(10))).await;
                    continue;
                }
                if !status.is_success() {
                    bail!("POST {url}: {status}: {}", error_message(response).await);
                }
                break response;
            };
            let body: ScoreBody = response
                .json()
                .await
                .with_context(|| format!("POST {url}: unexpected response"))?;
            let logprobs = body
                .scores
                .iter()
                .map(|s| s.logprobs.first().copied())
                .collect::<Option<Vec<f32>>>()
                .with_context(|| format!("POST {url}: a score without logprobs"))?;
            if logprobs.len() != continuations.len() {
                bail!(
                    "POST {url}: {} scores for {} continuations",
                    logprobs.len(),
                    continuations.len()
                );
            }
            Ok(Scored {
                logprobs,
                context_tokens: body.usage.context_tokens,
                cached_tokens: body.usage.cached_tokens,
            })
        }
    }
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(reqwest::header::RETRY_AFTER)?;
    value
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

/// The message of an OpenAI-style error body, else the body itself.
async fn error_message(response: reqwest::Response) -> String {
    let text = response.text().await.unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(text)
}
