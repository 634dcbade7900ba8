//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading a checkpoint or a state file.
///
/// Every variant names the file, and where it applies the tensor, so an operator can tell at a
/// glance which artefact is broken.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a checkpoint this loader understands: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: refusing to unpickle: {reason}")]
    Pickle { path: PathBuf, reason: String },
    #[error("{path}: not an RWKV-6 (x060) checkpoint: {reason}")]
    NotRwkv6 { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    BadShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype} (expected BF16, F16 or F32)")]
    BadDType {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor `{name}` lies outside the file (offset {offset}, {len} bytes, file {file_len} bytes)")]
    OutOfBounds {
        path: PathBuf,
        name: String,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("invalid state: {0}")]
    State(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
