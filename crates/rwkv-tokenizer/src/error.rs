//! The one error type of the crate.
//!
//! Every variant names what went wrong precisely enough to act on it: the file and line of a bad
//! vocabulary entry, the offending token id, or the tokenizer spec that could not be understood.

use std::path::PathBuf;

/// Everything that can go wrong while loading a tokenizer, encoding or decoding.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file could not be read.
    #[error("cannot read tokenizer file {}: {source}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A line of a World vocabulary (`<id> <literal> <len>`) is malformed.
    #[error("{source_name}:{line}: {message}")]
    VocabParse {
        /// The vocabulary file (or `builtin:...` for the embedded one).
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },

    /// A World vocabulary is well formed line by line but unusable as a whole.
    #[error("{source_name}: {message}")]
    VocabInvalid {
        /// The vocabulary file (or `builtin:...` for the embedded one).
        source_name: String,
        /// What is wrong with it.
        message: String,
    },

    /// A token id that the tokenizer has no bytes for (e.g. World id 0 or 65530..=65535).
    #[error("unknown token id {id}: the {tokenizer} tokenizer has no token with this id")]
    UnknownId {
        /// The id that was asked for.
        id: u32,
        /// Which tokenizer was asked ("World" or "Hugging Face").
        tokenizer: &'static str,
    },

    /// A Hugging Face `tokenizer.json` could not be loaded.
    #[error("cannot load Hugging Face tokenizer {source_name}: {message}")]
    HfLoad {
        /// The file (or `<json string>`).
        source_name: String,
        /// The message from the `tokenizers` crate.
        message: String,
    },

    /// The Hugging Face tokenizer failed to encode or decode.
    #[error("Hugging Face tokenizer failed to {operation}: {message}")]
    Hf {
        /// "encode" or "decode".
        operation: &'static str,
        /// The message from the `tokenizers` crate.
        message: String,
    },

    /// Hugging Face tokenizers take text, so raw bytes must be valid UTF-8.
    #[error(
        "Hugging Face tokenizers only encode UTF-8 text; input is invalid UTF-8 at byte {offset}"
    )]
    InvalidUtf8 {
        /// Offset of the first invalid byte.
        offset: usize,
    },

    /// `Tokenizer::load` was given something that is neither "world" nor a `.json`/`.txt` path.
    #[error(
        "unsupported tokenizer spec {spec:?}: expected \"world\" (builtin World vocabulary), \
         a path to a Hugging Face tokenizer.json, or a path to a World vocabulary .txt"
    )]
    UnknownSpec {
        /// The spec that was given.
        spec: String,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;
