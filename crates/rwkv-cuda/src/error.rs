//! The crate's one error type.

use rwkv_model::BackendError;

/// Everything that can go wrong in the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// No usable CUDA driver or device; callers fall back to the CPU backend.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A CUDA library (NVRTC, cuBLAS) could not be loaded.
    #[error("CUDA library `{lib}` is not available: {hint}")]
    MissingLibrary { lib: &'static str, hint: String },
    /// A driver API call failed.
    #[error("CUDA driver error during {op}: {source}")]
    Driver {
        op: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// NVRTC rejected a kernel file; `log` is the compiler's log.
    #[error("NVRTC failed to compile kernel file `{kernel}` ({options}):\n{log}")]
    Nvrtc {
        kernel: String,
        options: String,
        log: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error during {op}: {source}")]
    Cublas {
        op: &'static str,
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// An NCCL call failed (tensor parallelism).
    #[error("NCCL error during {op}: {detail}")]
    Nccl { op: &'static str, detail: String },
    /// A launch or copy was asked for with inconsistent sizes; nothing was launched.
    #[error("shape error in {op}: {detail}")]
    Shape { op: &'static str, detail: String },
    /// The model cannot run on this backend (for example an unsupported head size).
    #[error("unsupported model for the CUDA backend: {0}")]
    Unsupported(String),
    /// A slot index or state that the backend contract rejects.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl CudaError {
    /// Wraps a driver error with the operation that produced it.
    pub fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        move |source| Self::Driver { op, source }
    }

    /// Wraps a cuBLAS error with the operation that produced it.
    pub fn cublas(op: &'static str) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Self {
        move |source| Self::Cublas { op, source }
    }

    /// A shape error.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Self::Shape {
            op,
            detail: detail.into(),
        }
    }
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Backend(b) => b,
            other => BackendError::Device(other.to_string()),
        }
    }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;
