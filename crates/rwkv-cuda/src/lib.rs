//! CUDA backend for RWKV-6: the only crate in the workspace that touches cudarc.
//!
//! It owns:
//! - the kernels (`kernels/*.cu`, one file per op family, symbols `{op}_{dtype}`), embedded
//!   in the binary and compiled at run time by NVRTC for the device's architecture, cached by
//!   (file, defines, arch) ([`compile`]); checked launch wrappers ([`kernels`], [`launch`]);
//! - the GEMMs through cuBLAS: bf16 weights, bf16 (optionally hi+lo split) activations, f32
//!   accumulation and output ([`gemm`]);
//! - the device state pool: fixed-size slots addressed by index, swapped to and from pinned
//!   host memory on a separate copy stream, ordered by per-slot events ([`pool`]);
//! - the forward pass over ragged batches ([`forward`], [`plan`], [`exec`]) behind
//!   [`CudaBackend`], which implements [`rwkv_model::Backend`].
//!
//! - CUDA graphs of the decode body, captured per batch size and replayed ([`graph`]);
//! - tensor parallelism: one rank per device holding its shard, partial sums added by NCCL
//!   ([`tp`], [`nccl`]).
//!
//! It does not own scheduling, sampling policy,
//! networking or async runtimes (no tokio, no tonic); the engine drives it synchronously.
//!
//! Builds and links without CUDA (cudarc loads libcuda, libnvrtc and libcublas at run time).
//! [`CudaBackend::new`] probes for the driver first and returns [`CudaError::NoDevice`] where
//! there is none, so callers fall back to the CPU backend.
//!
//! Testing without a GPU: `tests/nvrtc.rs` compiles every kernel file with NVRTC (PyPI wheel);
//! `tests/emu.rs` compiles the same kernel sources as C++ against a small CUDA emulation and
//! runs the real forward orchestration on the host against the CPU backend. `tests/gpu.rs` and
//! the workspace's `tests/tests/cuda.rs` need a device (`scripts/gpu-check.sh`).

pub mod backend;
pub mod compile;
pub mod device;
pub mod error;
pub mod exec;
pub mod forward;
pub mod gemm;
pub mod graph;
pub mod kernels;
pub mod launch;
pub mod nccl;
pub mod plan;
pub mod pool;
pub mod profile;
mod recurrent;
pub mod tp;
pub mod weights;

pub use backend::{CudaBackend, CudaOptions, TopK};
pub use device::{device_count, driver_available};
pub use error::{CudaError, Result};
pub use forward::GemmPrecision;
pub use nccl::nccl_available;
pub use pool::HostState;
pub use tp::{tensor_parallel, CudaRank, TpCudaBackend};
