//! One streamed request to an OpenAI-compatible endpoint, timed chunk by chunk.
//!
//! Timestamps are taken when each network chunk arrives, before any JSON parsing, so the
//! client's own work does not leak into TTFT or inter-token latency. Everything that is not a
//! clean stream ending in `data: [DONE]` is a failure with a short status key (the HTTP status,
//! or `transport`, `stream-error`, `truncated`, `bad-json`), so reports can count failures by
//! cause.

use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::Value;

use super::sse::SseParser;

/// Which route a request goes to; it decides where a chunk's text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    /// `/v1/completions`: text in `choices[0].text`.
    Completions,
    /// `/v1/chat/completions`: text in `choices[0].delta.content`.
    Chat,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Completions => "/v1/completions",
            Api::Chat => "/v1/chat/completions",
        }
    }
}

/// A request that streamed to its end.
#[derive(Clone, Debug, Default)]
pub struct Success {
    /// Time to the first chunk carrying text (the whole request when none did).
    pub ttft: Duration,
    /// Gaps between consecutive chunks carrying text.
    pub itl: Vec<Duration>,
    /// Send to `[DONE]`.
    pub e2e: Duration,
    /// From the final `usage` chunk, when the server sent one.
    pub prompt_tokens: Option<u32>,
    pub completion_tokens: Option<u32>,
    /// Chunks that carried text: the token count of last resort when there is no `usage`.
    pub text_chunks: u32,
    /// The generated text (chat mode sends it back as the assistant's turn).
    pub text: String,
}

/// A request that did not stream to its end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// `429`, `503`, ... or `transport`, `stream-error`, `truncated`, `bad-json`, `aborted`.
    pub status: String,
    pub message: String,
}

impl Failure {
    pub fn new(status: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: status.into(),
            message: message.into(),
        }
    }
}

/// Folds the events of one stream into a [`Success`], given when each arrived.
#[derive(Debug)]
pub struct StreamAcc {
    api: Api,
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    out: Success,
    done: bool,
}

impl StreamAcc {
    pub fn new(api: Api, start: Instant) -> Self {
        Self {
            api,
            start,
            first: None,
            last: None,
            out: Success::default(),
            done: false,
        }
    }

    /// Takes one event's `data`, received at `at`. Returns `Ok(true)` at `[DONE]`.
    pub fn event(&mut self, data: &str, at: Instant) -> Result<bool, Failure> {
        if data.trim() == "[DONE]" {
            self.done = true;
            return Ok(true);
        }
        let chunk: Value = serde_json::from_str(data)
            .map_err(|e| Failure::new("bad-json", format!("unparsable chunk `{data}`: {e}")))?;
        // Errors after the headers went out (the status is already 200) come as a chunk.
        if let Some(error) = chunk.get("error") {
            return Err(Failure::new("stream-error", error_text(error)));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            let field = |name| usage.get(name).and_then(Value::as_u64).map(|n| n as u32);
            self.out.prompt_tokens = field("prompt_tokens");
            self.out.completion_tokens = field("completion_tokens");
        }
        let choice = chunk.get("choices").and_then(|c| c.get(0));
        let text = match self.api {
            Api::Completions => choice.and_then(|c| c.get("text")),
            Api::Chat => choice.and_then(|c| c.get("delta")?.get("content")),
        };
        // Chunks without text (the chat role chunk, a token that ends mid-character, the usage
        // chunk) are not tokens the user sees, so they neither start TTFT nor split an ITL gap.
        if let Some(text) = text.and_then(Value::as_str).filter(|t| !t.is_empty()) {
            match self.last {
                None => self.first = Some(at),
                Some(last) => self.out.itl.push(at.saturating_duration_since(last)),
            }
            self.last = Some(at);
            self.out.text_chunks += 1;
            self.out.text.push_str(text);
        }
        Ok(false)
    }

    /// The result once the body has ended at `at`.
    pub fn finish(mut self, at: Instant) -> Result<Success, Failure> {
        if !self.done {
            return Err(Failure::new(
                "truncated",
                "the stream ended without `data: [DONE]`",
            ));
        }
        self.out.e2e = at.saturating_duration_since(self.start);
        self.out.ttft = self
            .first
            .map_or(self.out.e2e, |f| f.saturating_duration_since(self.start));
        Ok(self.out)
    }
}

/// `error.message` of an OpenAI error object (or the whole value when it has another shape).
fn error_text(error: &Value) -> String {
    error
        .get("message")
        .and_then(Value::as_str)
        .map_or_else(|| error.to_string(), str::to_owned)
}

/// An HTTP client bound to one server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// `endpoint` is the server's base URL (`http://host:port`, with or without `/v1`).
    pub fn new(endpoint: &str, timeout: Duration) -> anyhow::Result<Self> {
        let base = endpoint.trim_end_matches('/');
        let base = base.strip_suffix("/v1").unwrap_or(base).to_owned();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10))
            // Token chunks are tiny; Nagle would only add delay to the requests we send.
            .tcp_nodelay(true)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { http, base })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The model ids of `GET /v1/models`.
    pub async fn models(&self) -> anyhow::Result<Vec<String>> {
        let url = format!("{}/v1/models", self.base);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("GET {url}: the answer is not JSON"))?;
        anyhow::ensure!(status.is_success(), "GET {url}: {status}: {body}");
        Ok(body["data"]
            .as_array()
            .map(|models| {
                models
                    .iter()
                    .filter_map(|m| m["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Sends `body` (which must ask for `stream: true`) and times the streamed answer.
    pub async fn stream(&self, api: Api, body: &Value) -> Result<Success, Failure> {
        let url = format!("{}{}", self.base, api.path());
        let start = Instant::now();
        let response = self
            .http
            .post(&url)
            .json(body)
            .send()
            .await
            .map_err(|e| Failure::new("transport", format!("{e:#}")))?;
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .map(|v| format!(" (Retry-After: {v})"))
                .unwrap_or_default();
            let text = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").map(error_text))
                .unwrap_or(text);
            return Err(Failure::new(
                status.as_u16().to_string(),
                format!("{message}{retry_after}"),
            ));
        }
        let mut acc = StreamAcc::new(api, start);
        let mut parser = SseParser::default();
        let mut bytes = response.bytes_stream();
        while let Some(chunk) = bytes.next().await {
            let at = Instant::now();
            let chunk = chunk.map_err(|e| Failure::new("transport", format!("{e:#}")))?;
            for data in parser.push(&chunk) {
                if acc.event(&data, at)? {
                    // Anything after `[DONE]` is ignored; the request is over for the user.
                    return acc.finish(at);
                }
            }
        }
        let at = Instant::now();
        if let Some(data) = parser.finish() {
            acc.event(&data, at)?;
        }
        acc.finish(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn completion_stream_timings_and_usage() {
        let t0 = Instant::now();
        let mut acc = StreamAcc::new(Api::Completions, t0);
        let events = [
            (
                r#"{"choices":[{"index":0,"text":"Hel","finish_reason":null}]}"#,
                10,
            ),
            // A token that ends mid-character streams as empty text: not a visible token.
            (
                r#"{"choices":[{"index":0,"text":"","finish_reason":null}]}"#,
                12,
            ),
            (
                r#"{"choices":[{"index":0,"text":"lo","finish_reason":null}]}"#,
                15,
            ),
            (
                r#"{"choices":[{"index":0,"text":"!","finish_reason":"length"}]}"#,
                22,
            ),
            (
                r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":4}}"#,
                23,
            ),
        ];
        for (data, at) in events {
            assert!(!acc.event(data, t0 + ms(at)).unwrap());
        }
        assert!(acc.event("[DONE]", t0 + ms(24)).unwrap());
        let s = acc.finish(t0 + ms(24)).unwrap();
        assert_eq!(s.ttft, ms(10));
        assert_eq!(s.itl, [ms(5), ms(7)]);
        assert_eq!(s.e2e, ms(24));
        assert_eq!((s.prompt_tokens, s.completion_tokens), (Some(5), Some(4)));
        assert_eq!((s.text.as_str(), s.text_chunks), ("Hello!", 3));
    }

    #[test]
    fn chat_text_is_in_the_delta_and_the_role_chunk_is_not_a_token() {
        let t0 = Instant::now();
        let mut acc = StreamAcc::new(Api::Chat, t0);
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#;
        acc.event(role, t0 + ms(1)).unwrap();
        acc.event(r#"{"choices":[{"delta":{"content":"Hi"}}]}"#, t0 + ms(30))
            .unwrap();
        acc.event(r#"{"choices":[{"delta":{"content":" you"}}]}"#, t0 + ms(40))
            .unwrap();
        acc.event("[DONE]", t0 + ms(41)).unwrap();
        let s = acc.finish(t0 + ms(41)).unwrap();
        assert_eq!((s.ttft, s.itl.as_slice()), (ms(30), &[ms(10)][..]));
        assert_eq!(s.text, "Hi you");
        assert_eq!(s.completion_tokens, None);
    }

    #[test]
    fn failures_are_classified() {
        let t0 = Instant::now();
        let mut acc = StreamAcc::new(Api::Completions, t0);
        let err = acc
            .event(r#"{"error":{"message":"worker lost","type":"x"}}"#, t0)
            .unwrap_err();
        assert_eq!(err, Failure::new("stream-error", "worker lost"));
        assert_eq!(acc.event("{nope", t0).unwrap_err().status, "bad-json");
        let acc = StreamAcc::new(Api::Completions, t0);
        assert_eq!(acc.finish(t0).unwrap_err().status, "truncated");
    }

    #[test]
    fn a_stream_without_text_has_ttft_equal_to_e2e() {
        let t0 = Instant::now();
        let mut acc = StreamAcc::new(Api::Completions, t0);
        acc.event("[DONE]", t0 + ms(9)).unwrap();
        let s = acc.finish(t0 + ms(9)).unwrap();
        assert_eq!((s.ttft, s.e2e, s.itl.len()), (ms(9), ms(9), 0));
    }
}
