//! The worker's gRPC service (`rwkv.worker.v1.Worker`): a thin shell around one [`Engine`].
//!
//! It owns the translation between wire messages and engine requests (validated on receipt:
//! every rejected field is named in an `INVALID_ARGUMENT` status), the bridge from the engine's
//! blocking event channel to a gRPC server stream (a client that goes away cancels its
//! sequence), draining, and the worker-level metrics. It does not own scheduling, state or
//! sampling (the engine does) and never sees text: tokenization and stop strings belong to the
//! router, so this crate does not depend on the tokenizer.
//!
//! [`Engine`]: rwkv_engine::Engine

mod convert;
mod service;
pub mod telemetry;

pub use convert::status_of;
pub use service::{check_tls, serve, serve_tls, WorkerIdentity, WorkerService};
