//! The engine's metrics: their names (one constant each, with meaning and unit), their
//! descriptions ([`describe`]) and the handles the step loop records through.
//!
//! Metrics go through the `metrics` facade; the binary installs a recorder (a Prometheus
//! exporter) and calls [`describe`]. The engine resolves every handle once, when it starts, so
//! the recorder must be installed before [`crate::Engine::start`]; recording is then a few atomic
//! operations on a handle, without a registry lookup or an allocation. Most values are recorded
//! once per step; only the latency histograms take one value per token or request.

use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Unit,
};

use crate::request::FinishReason;

/// Counter: forward steps run (one backend call each).
pub const STEPS: &str = "rwkv_engine_steps_total";
/// Histogram: sequences in one step's batch (decodes and prefill chunks).
pub const STEP_SEQUENCES: &str = "rwkv_engine_step_sequences";
/// Histogram: tokens fed in one step, all sequences together.
pub const STEP_TOKENS: &str = "rwkv_engine_step_tokens";
/// Histogram, seconds: the backend's forward call of one step.
pub const FORWARD_SECONDS: &str = "rwkv_engine_forward_seconds";
/// Gauge: sequences holding a slot (generations, and the lanes of scoring requests).
pub const RUNNING: &str = "rwkv_engine_running_sequences";
/// Gauge: requests waiting for a slot.
pub const WAITING: &str = "rwkv_engine_waiting_sequences";
/// Gauge: device state slots not free (running sequences and parked idle sessions).
pub const SLOTS_IN_USE: &str = "rwkv_engine_slots_in_use";
/// Gauge: device state slots of the backend.
pub const SLOTS_TOTAL: &str = "rwkv_engine_slots_total";
/// Counter: states moved between tiers, by `direction` (`out`: from a device slot to the host
/// tier, to make room or to preempt; `in`: from the host tier back to a slot; `disk_out`: from
/// the full host tier to the disk tier; `disk_in`: from the disk tier back to a slot).
pub const SWAPS: &str = "rwkv_engine_swaps_total";
/// Counter, bytes: state bytes moved by swaps, by `direction`.
pub const SWAP_BYTES: &str = "rwkv_engine_swap_bytes_total";
/// Histogram, seconds: time of one swap, by `direction`.
pub const SWAP_SECONDS: &str = "rwkv_engine_swap_seconds";
/// Gauge: generations held (not stepped) because their readers fell behind.
pub const HELD_FOR_READERS: &str = "rwkv_engine_generations_held_for_readers";
/// Counter: generations preempted (swapped out so that waiting requests get a slot).
pub const PREEMPTIONS: &str = "rwkv_engine_preemptions_total";
/// Counter: sessions deleted because they sat idle longer than `session_idle_timeout`.
pub const SESSIONS_EXPIRED: &str = "rwkv_engine_sessions_expired_total";
/// Counter: prefix-cache lookups that found a cached state.
pub const PREFIX_CACHE_HITS: &str = "rwkv_engine_prefix_cache_hits_total";
/// Counter: prefix-cache lookups that found nothing (the prefill starts from scratch).
pub const PREFIX_CACHE_MISSES: &str = "rwkv_engine_prefix_cache_misses_total";
/// Counter, tokens: prompt tokens whose prefill a prefix-cache hit skipped.
pub const PREFIX_CACHE_SKIPPED_TOKENS: &str = "rwkv_engine_prefix_cache_skipped_tokens_total";
/// Counter, tokens: tokens generated (emitted to clients; stop tokens excluded).
pub const GENERATED_TOKENS: &str = "rwkv_engine_generated_tokens_total";
/// Counter: requests that ended, by `kind` (`generate`, `score`) and `reason` (`length`, `stop`,
/// `scored`, `cancelled`, `error`).
pub const REQUESTS_FINISHED: &str = "rwkv_engine_requests_finished_total";
/// Histogram, seconds: from a generation's submission to the engine until its first token.
pub const TIME_TO_FIRST_TOKEN: &str = "rwkv_engine_time_to_first_token_seconds";
/// Histogram, seconds: between two consecutive tokens of one generation.
pub const INTER_TOKEN_LATENCY: &str = "rwkv_engine_inter_token_latency_seconds";

/// Registers the unit and description of every engine metric with the installed recorder.
pub fn describe() {
    use Unit::{Bytes, Count, Seconds};
    describe_counter!(STEPS, Count, "Forward steps run by the engine.");
    describe_histogram!(STEP_SEQUENCES, Count, "Sequences in one step's batch.");
    describe_histogram!(STEP_TOKENS, Count, "Tokens fed in one step.");
    describe_histogram!(
        FORWARD_SECONDS,
        Seconds,
        "Backend forward time of one step."
    );
    describe_gauge!(RUNNING, Count, "Sequences holding a state slot.");
    describe_gauge!(WAITING, Count, "Requests waiting for a state slot.");
    describe_gauge!(
        SLOTS_IN_USE,
        Count,
        "State slots not free (running or parked)."
    );
    describe_gauge!(SLOTS_TOTAL, Count, "State slots of the backend.");
    describe_gauge!(
        HELD_FOR_READERS,
        Count,
        "Generations paused until their readers catch up."
    );
    describe_counter!(SWAPS, Count, "Session states swapped, by direction.");
    describe_counter!(SWAP_BYTES, Bytes, "State bytes swapped, by direction.");
    describe_histogram!(SWAP_SECONDS, Seconds, "Time of one swap, by direction.");
    describe_counter!(
        PREEMPTIONS,
        Count,
        "Generations preempted for waiting requests."
    );
    describe_counter!(
        SESSIONS_EXPIRED,
        Count,
        "Sessions deleted after sitting idle past the idle timeout."
    );
    describe_counter!(PREFIX_CACHE_HITS, Count, "Prefix-cache lookups that hit.");
    describe_counter!(
        PREFIX_CACHE_MISSES,
        Count,
        "Prefix-cache lookups that missed."
    );
    describe_counter!(
        PREFIX_CACHE_SKIPPED_TOKENS,
        Count,
        "Prompt tokens whose prefill a prefix-cache hit skipped."
    );
    describe_counter!(GENERATED_TOKENS, Count, "Tokens generated.");
    describe_counter!(
        REQUESTS_FINISHED,
        Count,
        "Requests that ended, by kind and reason."
    );
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Seconds,
        "From a generation's submission to its first token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Seconds,
        "Between two consecutive tokens of one generation."
    );
}

/// How a request ended, for the labels of [`REQUESTS_FINISHED`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    Generation(FinishReason),
    GenerationFailed,
    Scored,
    ScoreCancelled,
    ScoreFailed,
}

/// Which way a state moved between a device slot and the host tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Swap {
    Out = 0,
    In = 1,
    /// From the host tier to the disk tier.
    DiskOut = 2,
    /// From the disk tier back to a slot.
    DiskIn = 3,
}

/// One handle per counter, label set and histogram the step loop records.
pub(crate) struct Metrics {
    steps: Counter,
    step_sequences: Histogram,
    step_tokens: Histogram,
    forward_seconds: Histogram,
    running: Gauge,
    waiting: Gauge,
    slots_in_use: Gauge,
    held_for_readers: Gauge,
    /// Per [`Swap`]: count, bytes, seconds.
    swaps: [(Counter, Counter, Histogram); 4],
    cache_hits: Counter,
    cache_misses: Counter,
    cache_skipped: Counter,
    generated: Counter,
    preemptions: Counter,
    sessions_expired: Counter,
    /// Generations by reason: length, stop, cancelled, error.
    generations_ended: [Counter; 4],
    /// Scoring requests by reason: scored, cancelled, error.
    scores_ended: [Counter; 3],
    ttft: Histogram,
    itl: Histogram,
}

impl Metrics {
    /// Resolves every handle with the recorder installed now; `slots` is constant per engine.
    pub(crate) fn new(slots: usize) -> Self {
        let swap = |direction: &'static str| {
            (
                counter!(SWAPS, "direction" => direction),
                counter!(SWAP_BYTES, "direction" => direction),
                histogram!(SWAP_SECONDS, "direction" => direction),
            )
        };
        let generation = |reason: &'static str| counter!(REQUESTS_FINISHED, "kind" => "generate", "reason" => reason);
        let score = |reason: &'static str| counter!(REQUESTS_FINISHED, "kind" => "score", "reason" => reason);
        gauge!(SLOTS_TOTAL).set(slots as f64);
        Self {
            steps: counter!(STEPS),
            step_sequences: histogram!(STEP_SEQUENCES),
            step_tokens: histogram!(STEP_TOKENS),
            forward_seconds: histogram!(FORWARD_SECONDS),
            running: gauge!(RUNNING),
            waiting: gauge!(WAITING),
            slots_in_use: gauge!(SLOTS_IN_USE),
            held_for_readers: gauge!(HELD_FOR_READERS),
            swaps: [swap("out"), swap("in"), swap("disk_out"), swap("disk_in")],
            cache_hits: counter!(PREFIX_CACHE_HITS),
            cache_misses: counter!(PREFIX_CACHE_MISSES),
            cache_skipped: counter!(PREFIX_CACHE_SKIPPED_TOKENS),
            generated: counter!(GENERATED_TOKENS),
            preemptions: counter!(PREEMPTIONS),
            sessions_expired: counter!(SESSIONS_EXPIRED),
            generations_ended: ["length", "stop", "cancelled", "error"].map(generation),
            scores_ended: ["scored", "cancelled", "error"].map(score),
            ttft: histogram!(TIME_TO_FIRST_TOKEN),
            itl: histogram!(INTER_TOKEN_LATENCY),
        }
    }

    /// The load gauges, set once per loop iteration.
    pub(crate) fn load(&self, running: usize, waiting: usize, slots_in_use: usize) {
        self.running.set(running as f64);
        self.waiting.set(waiting as f64);
        self.slots_in_use.set(slots_in_use as f64);
    }

    /// Generations held for their readers, set before each plan.
    pub(crate) fn held_for_readers(&self, held: usize) {
        self.held_for_readers.set(held as f64);
    }

    /// One forward step: its batch and the backend's time.
    pub(crate) fn step(&self, sequences: usize, tokens: usize, forward: Duration) {
        self.steps.increment(1);
        self.step_sequences.record(sequences as f64);
        self.step_tokens.record(tokens as f64);
        self.forward_seconds.record(forward);
    }

    pub(crate) fn swap(&self, direction: Swap, bytes: usize, time: Duration) {
        let (count, total_bytes, seconds) = &self.swaps[direction as usize];
        count.increment(1);
        total_bytes.increment(bytes as u64);
        seconds.record(time);
    }

    /// A generation was preempted (its swap out is recorded by [`Metrics::swap`]).
    pub(crate) fn preempted(&self) {
        self.preemptions.increment(1);
    }

    /// Sessions deleted for sitting idle.
    pub(crate) fn sessions_expired(&self, count: usize) {
        self.sessions_expired.increment(count as u64);
    }

    /// A prefix-cache lookup: `Some(len)` on a hit that skipped `len` tokens.
    pub(crate) fn cache_lookup(&self, hit: Option<usize>) {
        match hit {
            Some(len) => {
                self.cache_hits.increment(1);
                self.cache_skipped.increment(len as u64);
            }
            None => self.cache_misses.increment(1),
        }
    }

    /// Tokens emitted in one step, all generations together.
    pub(crate) fn generated(&self, tokens: usize) {
        if tokens > 0 {
            self.generated.increment(tokens as u64);
        }
    }

    /// A generation's first token came `since_submit` after it was submitted.
    pub(crate) fn first_token(&self, since_submit: Duration) {
        self.ttft.record(since_submit);
    }

    /// A generation's next token came `gap` after its previous one.
    pub(crate) fn next_token(&self, gap: Duration) {
        self.itl.record(gap);
    }

    pub(crate) fn ended(&self, how: Ended) {
        let counter = match how {
            Ended::Generation(FinishReason::Length) => &self.generations_ended[0],
            Ended::Generation(FinishReason::Stop) => &self.generations_ended[1],
            Ended::Generation(FinishReason::Cancelled) => &self.generations_ended[2],
            Ended::GenerationFailed => &self.generations_ended[3],
            Ended::Scored => &self.scores_ended[0],
            Ended::ScoreCancelled => &self.scores_ended[1],
            Ended::ScoreFailed => &self.scores_ended[2],
        };
        counter.increment(1);
    }
}
