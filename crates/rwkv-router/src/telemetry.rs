//! Names of the router's metrics, in one place, with [`describe`] registering their meaning.

/// Counter: HTTP requests by `route` and `status`.
pub const HTTP_REQUESTS: &str = "rwkv_router_http_requests_total";
/// Histogram (seconds): HTTP request duration by `route` (until the last byte for streams).
pub const HTTP_SECONDS: &str = "rwkv_router_http_request_seconds";
/// Gauge: requests waiting in the router's queue for a worker.
pub const QUEUED: &str = "rwkv_router_queued_requests";
/// Counter: requests refused by the router, by `reason` (`queue_full`, `queue_timeout`).
pub const REJECTED: &str = "rwkv_router_rejected_requests_total";
/// Gauge: workers in the routing table.
pub const WORKERS: &str = "rwkv_router_workers";
/// Counter: failed worker calls, by `worker` (they feed the circuit breaker).
pub const WORKER_FAILURES: &str = "rwkv_router_worker_failures_total";
/// Counter: generations moved to another worker after a failure.
pub const FAILOVERS: &str = "rwkv_router_failovers_total";
/// Histogram (seconds): time to first token as the router sees it (queueing included).
pub const TTFT_SECONDS: &str = "rwkv_router_time_to_first_token_seconds";
/// Histogram (seconds): mean time between tokens of one generation.
pub const ITL_SECONDS: &str = "rwkv_router_inter_token_latency_seconds";
/// Counter: prompt and completion tokens served, by `kind` (`prompt`, `cached`, `completion`).
pub const TOKENS: &str = "rwkv_router_tokens_total";

/// Registers the descriptions with the installed recorder.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(HTTP_REQUESTS, "HTTP requests by route and status.");
    describe_histogram!(
        HTTP_SECONDS,
        Unit::Seconds,
        "HTTP request duration by route."
    );
    describe_gauge!(QUEUED, "Requests waiting in the router for a free worker.");
    describe_counter!(REJECTED, "Requests refused by the router, by reason.");
    describe_gauge!(WORKERS, "Workers in the routing table.");
    describe_counter!(WORKER_FAILURES, "Failed calls to a worker, by worker.");
    describe_counter!(
        FAILOVERS,
        "Generations moved to another worker after a failure."
    );
    describe_histogram!(
        TTFT_SECONDS,
        Unit::Seconds,
        "Time to first token (router view)."
    );
    describe_histogram!(
        ITL_SECONDS,
        Unit::Seconds,
        "Mean inter-token latency per generation."
    );
    describe_counter!(
        TOKENS,
        "Tokens served, by kind (prompt, cached, completion)."
    );
}
