//! Tokenization for the RWKV-6 serving system: text to token ids and back, and the text-side
//! checks of a stream (stop strings). Nothing else: no model, no sampling (those live in the
//! model/engine crates).
//!
//! Module map:
//! - [`error`]: [`TokenizerError`], the one error type (names the file, line or id at fault).
//! - [`world`]: [`WorldTokenizer`], the RWKV World vocabulary (`rwkv_vocab_v20230424.txt`,
//!   embedded; Python-literal parsing with a byte-length self-check) and greedy longest-match
//!   encoding on a byte trie.
//! - [`hf`]: [`HfTokenizer`], a Hugging Face `tokenizer.json` (e.g. `20B_tokenizer.json` for the
//!   Pile models) through the `tokenizers` crate, with raw per-token bytes for streaming.
//! - [`stream`]: [`StreamDecoder`], incremental UTF-8 decoding that never emits half a character
//!   and never blocks on invalid bytes.
//! - [`stop`]: [`StopChecker`], stop strings matched across token boundaries in decoded text.
//! - this file: [`Tokenizer`], one handle over both kinds, chosen with [`Tokenizer::load`].
//!
//! Behaviour follows `shared/reference/rwkv6-spec.md` section 4.

pub mod error;
pub mod hf;
pub mod stop;
pub mod stream;
pub mod world;

use std::path::Path;
use std::sync::Arc;

pub use error::{Result, TokenizerError};
pub use hf::HfTokenizer;
pub use stop::{StopChecker, StopOutcome};
pub use stream::StreamDecoder;
pub use world::WorldTokenizer;

/// Either tokenizer behind one cheap-to-clone, thread-safe handle.
#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// RWKV World vocabulary (greedy byte trie).
    World(Arc<WorldTokenizer>),
    /// Hugging Face `tokenizer.json`.
    Hf(Arc<HfTokenizer>),
}

impl Tokenizer {
    /// The builtin World tokenizer (shared; parsed once per process).
    pub fn world() -> Self {
        Self::World(WorldTokenizer::builtin())
    }

    /// Loads a tokenizer from a spec: `"world"` (the builtin World vocabulary), a path to a
    /// Hugging Face `.json`, or a path to a World-format `.txt` vocabulary.
    pub fn load(spec: &str) -> Result<Self> {
        if spec.eq_ignore_ascii_case("world") {
            return Ok(Self::world());
        }
        let extension = Path::new(spec)
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("json") => Ok(Self::Hf(Arc::new(HfTokenizer::from_file(spec)?))),
            Some("txt") => Ok(Self::World(Arc::new(WorldTokenizer::from_file(spec)?))),
            _ => Err(TokenizerError::UnknownSpec {
                spec: spec.to_string(),
            }),
        }
    }

    /// "world" or "hf", for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::World(_) => "world",
            Self::Hf(_) => "hf",
        }
    }

    /// Encodes text to ids. Never fails for World; Hugging Face errors are passed on.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Self::World(t) => Ok(t.encode(text)),
            Self::Hf(t) => t.encode(text),
        }
    }

    /// Encodes raw bytes. World takes any bytes; Hugging Face needs valid UTF-8.
    pub fn encode_bytes(&self, bytes: &[u8]) -> Result<Vec<u32>> {
        match self {
            Self::World(t) => Ok(t.encode_bytes(bytes)),
            Self::Hf(t) => t.encode_bytes(bytes),
        }
    }

    /// Concatenated token bytes; an id without bytes is an error naming it.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        match self {
            Self::World(t) => t.decode_bytes(ids),
            Self::Hf(t) => t.decode_bytes(ids),
        }
    }

    /// Concatenated token bytes, unknown ids contributing nothing.
    pub fn decode_bytes_lossy(&self, ids: &[u32]) -> Vec<u8> {
        match self {
            Self::World(t) => t.decode_bytes_lossy(ids),
            Self::Hf(t) => t.decode_bytes_lossy(ids),
        }
    }

    /// Decodes to text; unknown ids are errors, invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Self::World(t) => t.decode(ids),
            Self::Hf(t) => t.decode(ids),
        }
    }

    /// Bytes of a single token (`None` for unknown ids; see [`HfTokenizer::token_bytes`]).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        match self {
            Self::World(t) => t.token_bytes(id),
            Self::Hf(t) => t.token_bytes(id),
        }
    }

    /// Number of id slots (`max id + 1`): 65530 for World, 50277 for `20B_tokenizer.json`.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::World(t) => t.vocab_size(),
            Self::Hf(t) => t.vocab_size(),
        }
    }
}

impl From<Arc<WorldTokenizer>> for Tokenizer {
    fn from(t: Arc<WorldTokenizer>) -> Self {
        Self::World(t)
    }
}

impl From<Arc<HfTokenizer>> for Tokenizer {
    fn from(t: Arc<HfTokenizer>) -> Self {
        Self::Hf(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ASSETS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/");

    #[test]
    fn load_world_spec_gives_the_shared_builtin() {
        let a = Tokenizer::load("world").unwrap();
        let b = Tokenizer::load("World").unwrap();
        assert_eq!(a.kind(), "world");
        match (&a, &b) {
            (Tokenizer::World(x), Tokenizer::World(y)) => assert!(Arc::ptr_eq(x, y)),
            _ => panic!("expected World"),
        }
        assert_eq!(a.encode("Hello, world!").unwrap(), [33155, 45, 40213, 34]);
        assert_eq!(a.vocab_size(), 65530);
    }

    #[test]
    fn load_txt_path_gives_a_world_tokenizer() {
        let tok = Tokenizer::load(&format!("{ASSETS}rwkv_vocab_v20230424.txt")).unwrap();
        assert_eq!(tok.kind(), "world");
        assert_eq!(tok.encode_bytes(b"\n\n").unwrap(), [261]);
        assert_eq!(tok.token_bytes(261), Some(&b"\n\n"[..]));
    }

    #[test]
    fn load_json_path_gives_a_hugging_face_tokenizer() {
        let tok = Tokenizer::load(&format!("{ASSETS}20B_tokenizer.json")).unwrap();
        assert_eq!(tok.kind(), "hf");
        assert_eq!(tok.vocab_size(), 50277);
        let ids = tok.encode("Hello, world!").unwrap();
        assert_eq!(ids, [12092, 13, 1533, 2]);
        assert_eq!(tok.decode_bytes(&ids).unwrap(), b"Hello, world!");
        assert_eq!(tok.decode(&ids).unwrap(), "Hello, world!");
        assert_eq!(tok.decode_bytes_lossy(&[2, 99_999]), b"!");
    }

    #[test]
    fn unsupported_or_missing_specs_are_clear_errors() {
        let err = Tokenizer::load("gpt2").unwrap_err();
        assert!(err.to_string().contains("\"gpt2\""), "{err}");
        let err = Tokenizer::load("/nonexistent/x.json").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.json"), "{err}");
        let err = Tokenizer::load("/nonexistent/v.txt").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/v.txt"), "{err}");
    }

    #[test]
    fn hf_stream_decoding_rebuilds_multibyte_text() {
        let tok = Tokenizer::load(&format!("{ASSETS}20B_tokenizer.json")).unwrap();
        let text = "起業家イーロン・マスク氏 😀 done";
        let ids = tok.encode(text).unwrap();
        let mut decoder = StreamDecoder::new();
        let mut out = String::new();
        for &id in &ids {
            let piece = decoder.push(&tok, id).unwrap();
            assert!(!piece.contains(char::REPLACEMENT_CHARACTER));
            out.push_str(&piece);
        }
        out.push_str(&decoder.finish());
        assert_eq!(out, text);
    }
}
