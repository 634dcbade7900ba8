//! Names of the worker's own metrics (the engine records its step metrics itself).

/// Counter: finished RPCs, labelled by `rpc` and gRPC `code`.
pub const RPCS: &str = "rwkv_worker_rpcs_total";
/// Gauge: 1 while the worker drains (refuses new work), else 0.
pub const DRAINING: &str = "rwkv_worker_draining";

/// Registers the descriptions with the installed recorder.
pub fn describe() {
    metrics::describe_counter!(RPCS, "Finished worker RPCs by method and gRPC status code.");
    metrics::describe_gauge!(DRAINING, "1 while the worker drains and refuses new work.");
}

pub(crate) fn rpc_done(rpc: &'static str, code: tonic::Code) {
    metrics::counter!(RPCS, "rpc" => rpc, "code" => format!("{code:?}")).increment(1);
}
