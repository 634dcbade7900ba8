//! RWKV-6 ("x060") model description, shared by every backend.
//!
//! This crate owns: reading checkpoints (PyTorch `.pth` through a restricted pickle reader, and
//! `.safetensors`, both memory-mapped), inferring the [`ModelConfig`] from tensor shapes, the
//! typed and shape-checked [`ModelWeights`] (with the ln0 fold of the reference), the per-sequence
//! [`State`] layout, the [`Backend`] trait, and a random-weight model generator.
//!
//! It does not compute anything beyond load-time transforms: the forward pass lives in the
//! backend crates (`rwkv-cpu`, `rwkv-cuda`). It never depends on tokio, tonic or cudarc.
//!
//! Modules:
//! - [`checkpoint`]: file formats; [`pickle`]: the restricted unpickler.
//! - [`config`]: hyper-parameters; [`weights`]: typed tensors; [`tensor`]: dtype and bytes.
//! - [`state`]: state layout and (de)serialization; [`backend`]: the backend contract;
//!   [`nucleus`]: the sampling filters a backend may apply before logits leave it.
//! - [`shard`]: the tensor-parallel shard plan; [`collective`]: the all-reduce contract;
//!   [`tp`]: a backend assembled from ranks that each hold one shard.
//! - [`synthetic`]: random-weight checkpoints for benchmarks, demos and tests.

pub mod backend;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod error;
pub mod nucleus;
pub mod pickle;
pub mod shard;
pub mod state;
pub mod synthetic;
pub mod tensor;
pub mod tp;
pub mod weights;

pub use backend::{Backend, BackendError, Candidate, Logits, OutputRows, SeqStep};
pub use checkpoint::Checkpoint;
pub use collective::{Collective, CollectiveError, GroupAbort, InProcessCollective};
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use nucleus::{Nucleus, NucleusRow};
pub use shard::{ShardError, ShardPlan};
pub use state::State;
pub use tensor::{DType, Tensor};
pub use weights::ModelWeights;
