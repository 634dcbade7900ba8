//! OpenAI-compatible request bodies and their validation into what a generation needs.
//!
//! Unknown fields are ignored (clients send many); known fields are checked with errors that
//! name them. Defaults follow OpenAI (temperature 1, top_p 1, no penalties, `max_tokens` 16 for
//! completions), not the RWKV demos: clients written for OpenAI expect its semantics. RWKV
//! extensions: `top_k`, `penalty_decay`.

use serde::Deserialize;

use crate::chat::ChatMessage;
use crate::error::ApiError;
use crate::RouterConfig;

/// `prompt` of `/v1/completions`: text, several texts, token ids, or several token-id lists.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// `stop`: one string or a list.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by completions and chat completions.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub penalty_decay: Option<f64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub user: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Option<Prompt>,
    /// Number of top alternatives per token (0 = only the chosen token's log-probability).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Chat message content: a string or a list of typed parts (only text parts are accepted).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Option<Vec<Message>>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Everything a generation needs besides its prompt, checked.
#[derive(Clone, Debug)]
pub struct Validated {
    pub model: String,
    pub params: rwkv_proto::wv1::SamplingParams,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

/// Parses a JSON body into `T`, with the parser's message (it names the field) in a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_json(format!("invalid JSON body: {e}")))
}

fn in_range(name: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x as f32)),
        Some(x) => Err(ApiError::invalid(
            name,
            format!("`{name}` must be between {lo} and {hi}, got {x}"),
        )),
    }
}

impl Sampling {
    /// Checks every shared field against the router's limits.
    pub fn validate(
        &self,
        cfg: &RouterConfig,
        max_tokens: Option<i64>,
        default_max_tokens: u32,
    ) -> Result<Validated, ApiError> {
        let model = self
            .model
            .clone()
            .or_else(|| cfg.default_model.clone())
            .unwrap_or_default();
        let max_tokens = match max_tokens {
            None => default_max_tokens.min(cfg.max_tokens_limit),
            Some(m) if m < 0 => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!("`max_tokens` must not be negative, got {m}"),
                ))
            }
            Some(m) if m > i64::from(cfg.max_tokens_limit) => {
                return Err(ApiError::invalid(
                    "max_tokens",
                    format!(
                        "`max_tokens` is {m}, more than this server's limit of {}",
                        cfg.max_tokens_limit
                    ),
                ))
            }
            Some(m) => m as u32,
        };
        let temperature = in_range("temperature", self.temperature, 0.0, 2.0)?;
        let top_p = in_range("top_p", self.top_p, 0.0, 1.0)?;
        let presence = in_range("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        let frequency = in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        let decay = in_range("penalty_decay", self.penalty_decay, 0.0, 1.0)?;
        let top_k = match self.top_k {
            None => None,
            Some(k) if (0..=i64::from(u32::MAX)).contains(&k) => Some(k as u32),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be 0 (off) or positive, got {k}"),
                ))
            }
        };
        let n = match self.n {
            None => 1,
            Some(n) if n >= 1 && n as usize <= cfg.max_n => n as usize,
            Some(n) => {
                return Err(ApiError::invalid(
                    "n",
                    format!("`n` must be between 1 and {}, got {n}", cfg.max_n),
                ))
            }
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > cfg.max_stop {
            return Err(ApiError::invalid(
                "stop",
                format!("at most {} stop strings, got {}", cfg.max_stop, stop.len()),
            ));
        }
        if let Some(i) = stop.iter().position(|s| s.is_empty() || s.len() > 1024) {
            return Err(ApiError::invalid(
                "stop",
                format!("`stop[{i}]` must be 1 to 1024 bytes long"),
            ));
        }
        let params = rwkv_proto::wv1::SamplingParams {
            temperature: Some(temperature.unwrap_or(1.0)),
            top_p: Some(top_p.unwrap_or(1.0)),
            top_k,
            presence_penalty: Some(presence.unwrap_or(0.0)),
            frequency_penalty: Some(frequency.unwrap_or(0.0)),
            penalty_decay: decay,
            token_ban: Vec::new(),
            stop_tokens: Vec::new(),
            end_tokens: Vec::new(),
            // Set with the bans, from the tokenizer, when the request is sent.
            sample_below: None,
            // Negative seeds (some clients send them) are as good as any: reinterpret the bits.
            seed: self.seed.map(|s| s as u64),
            max_tokens: Some(max_tokens),
        };
        Ok(Validated {
            model,
            params,
            max_tokens,
            stop,
            n,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// `logprobs` of completions / `top_logprobs` of chat: how many alternatives, checked.
pub fn top_logprobs(
    name: &str,
    v: Option<i64>,
    cfg: &RouterConfig,
) -> Result<Option<u32>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) if (0..=i64::from(cfg.max_logprobs)).contains(&n) => Ok(Some(n as u32)),
        Some(n) => Err(ApiError::invalid(
            name,
            format!(
                "`{name}` must be between 0 and {}, got {n}",
                cfg.max_logprobs
            ),
        )),
    }
}

/// The chat messages as plain text, refusing non-text parts.
pub fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("messages[{i}].content[{j}]"),
                                    "only text content parts are supported",
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: m.role.clone(),
                content,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RouterConfig {
        RouterConfig::default()
    }

    fn sampling(json: &str) -> Sampling {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn defaults_are_openai_defaults() {
        let v = sampling("{}").validate(&cfg(), None, 16).unwrap();
        assert_eq!(v.max_tokens, 16);
        assert_eq!(v.params.temperature, Some(1.0));
        assert_eq!(v.params.top_p, Some(1.0));
        assert_eq!(v.params.presence_penalty, Some(0.0));
        assert_eq!((v.n, v.stream), (1, false));
    }

    #[test]
    fn out_of_range_fields_are_named() {
        for (json, max_tokens, field) in [
            (r#"{"temperature": 3}"#, None, "temperature"),
            (r#"{"top_p": -0.1}"#, None, "top_p"),
            (r#"{"presence_penalty": 9}"#, None, "presence_penalty"),
            (r#"{"n": 0}"#, None, "n"),
            (r#"{"top_k": -1}"#, None, "top_k"),
            (r#"{"stop": [""]}"#, None, "stop"),
            ("{}", Some(-1), "max_tokens"),
            ("{}", Some(1 << 40), "max_tokens"),
        ] {
            let e = sampling(json).validate(&cfg(), max_tokens, 16).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(field), "{json}");
            assert_eq!(e.status, 400);
        }
    }

    #[test]
    fn prompts_of_every_shape_parse() {
        for (json, ok) in [
            (r#"{"prompt": "hi"}"#, true),
            (r#"{"prompt": ["a", "b"]}"#, true),
            (r#"{"prompt": [1, 2, 3]}"#, true),
            (r#"{"prompt": [[1], [2, 3]]}"#, true),
            (r#"{"prompt": {"x": 1}}"#, false),
        ] {
            assert_eq!(
                parse::<CompletionRequest>(json.as_bytes()).is_ok(),
                ok,
                "{json}"
            );
        }
    }
}
