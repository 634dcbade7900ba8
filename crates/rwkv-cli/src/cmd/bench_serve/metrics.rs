//! From the timed requests of one point to its metrics, with vLLM's definitions:
//!
//! - TTFT: send to the first chunk carrying text.
//! - ITL: every gap between consecutive chunks carrying text (one sample per gap, pooled over
//!   all requests).
//! - TPOT: per request, `(e2e - ttft) / (output_tokens - 1)`; requests of one token have none.
//! - E2E: send to `data: [DONE]`.
//! - Throughputs: totals over successful requests divided by the point's wall-clock duration
//!   (first send to last answer). Token counts are the server's `usage`; a request without one
//!   counts its text chunks as output tokens and its word count as input tokens.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::client::{Failure, Success};
use super::stats::Summary;
use super::Load;

/// One request as it went.
#[derive(Debug)]
pub struct Record {
    /// Turn of its conversation, from 0 (always 0 in completions mode).
    pub turn: usize,
    /// Words of new input it sent (the intended token count of a completion prompt).
    pub words: usize,
    pub result: Result<Success, Failure>,
}

impl Record {
    fn output_tokens(s: &Success) -> u64 {
        u64::from(s.completion_tokens.unwrap_or(s.text_chunks))
    }

    fn input_tokens(&self, s: &Success) -> u64 {
        s.prompt_tokens.map_or(self.words as u64, u64::from)
    }
}

/// The requests of one point and how long the point took.
#[derive(Debug)]
pub struct PointRun {
    pub load: Load,
    pub duration: Duration,
    pub records: Vec<Record>,
}

impl PointRun {
    pub fn successes(&self) -> impl Iterator<Item = (&Record, &Success)> {
        self.records
            .iter()
            .filter_map(|r| r.result.as_ref().ok().map(|s| (r, s)))
    }

    /// TTFT, ITL, TPOT and E2E samples in milliseconds.
    pub fn latencies_ms(&self) -> Latencies {
        let mut l = Latencies::default();
        for (_, s) in self.successes() {
            l.ttft.push(ms(s.ttft));
            l.e2e.push(ms(s.e2e));
            l.itl.extend(s.itl.iter().copied().map(ms));
            let out = Record::output_tokens(s);
            if out > 1 {
                l.tpot
                    .push(ms(s.e2e.saturating_sub(s.ttft)) / (out - 1) as f64);
            }
        }
        l
    }
}

/// Latency samples of one point, milliseconds.
#[derive(Debug, Default)]
pub struct Latencies {
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
    pub tpot: Vec<f64>,
    pub e2e: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// TTFT of one turn across all conversations (chat mode): later turns have longer prompts,
/// but a server with a prefix-state cache only prefills the new part.
#[derive(Debug, Serialize)]
pub struct TurnMetrics {
    /// 1 for the first turn.
    pub turn: usize,
    pub completed: usize,
    pub mean_input_tokens: f64,
    pub ttft_ms: Option<Summary>,
}

/// Everything reported for one point (one row of the table, one entry of the JSON).
#[derive(Debug, Serialize)]
pub struct PointMetrics {
    /// `inf`, `4 req/s` or `concurrency 16`.
    pub label: String,
    /// Requests (conversations in chat mode) per second, or `"inf"`; null in closed-loop mode.
    pub request_rate: Option<Value>,
    /// Requests in flight (users in chat mode); null in open-loop mode.
    pub concurrency: Option<usize>,
    pub completed: usize,
    pub failed: usize,
    /// Failures by status: HTTP code, or `transport`, `stream-error`, `truncated`, `bad-json`,
    /// `aborted` (chat turns never sent because an earlier turn failed).
    pub errors: BTreeMap<String, usize>,
    /// The first message seen for each failure status.
    pub error_examples: BTreeMap<String, String>,
    pub duration_s: f64,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub total_input_tokens: u64,
    pub total_output_tokens: u64,
    pub mean_input_tokens: f64,
    pub mean_output_tokens: f64,
    /// Successful requests whose stream had no `usage` chunk (token counts are estimates).
    pub requests_without_usage: usize,
    pub ttft_ms: Option<Summary>,
    pub tpot_ms: Option<Summary>,
    pub itl_ms: Option<Summary>,
    pub e2e_ms: Option<Summary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_turn: Vec<TurnMetrics>,
}

/// Aggregates one point; `turns` > 1 adds the per-turn TTFT.
pub fn compute(run: &PointRun, turns: usize) -> PointMetrics {
    let mut errors = BTreeMap::new();
    let mut error_examples = BTreeMap::new();
    for r in &run.records {
        if let Err(f) = &r.result {
            *errors.entry(f.status.clone()).or_insert(0) += 1;
            error_examples
                .entry(f.status.clone())
                .or_insert_with(|| f.message.clone());
        }
    }
    let (mut input, mut output, mut completed, mut without_usage) = (0u64, 0u64, 0usize, 0usize);
    for (r, s) in run.successes() {
        completed += 1;
        input += r.input_tokens(s);
        output += Record::output_tokens(s);
        if s.completion_tokens.is_none() {
            without_usage += 1;
        }
    }
    let secs = run.duration.as_secs_f64().max(1e-9);
    let per_request = |total: u64| {
        if completed == 0 {
            0.0
        } else {
            total as f64 / completed as f64
        }
    };
    let lat = run.latencies_ms();
    let per_turn = if turns > 1 {
        (0..turns)
            .map(|turn| {
                let done: Vec<(&Record, &Success)> =
                    run.successes().filter(|(r, _)| r.turn == turn).collect();
                let ttft: Vec<f64> = done.iter().map(|(_, s)| ms(s.ttft)).collect();
                let input: u64 = done.iter().map(|(r, s)| r.input_tokens(s)).sum();
                TurnMetrics {
                    turn: turn + 1,
                    completed: done.len(),
                    mean_input_tokens: if done.is_empty() {
                        0.0
                    } else {
                        input as f64 / done.len() as f64
                    },
                    ttft_ms: Summary::of(&ttft),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    PointMetrics {
        label: run.load.label(),
        request_rate: run.load.rate_json(),
        concurrency: run.load.concurrency(),
        completed,
        failed: run.records.len() - completed,
        errors,
        error_examples,
        duration_s: secs,
        request_throughput: completed as f64 / secs,
        output_throughput: output as f64 / secs,
        total_token_throughput: (input + output) as f64 / secs,
        total_input_tokens: input,
        total_output_tokens: output,
        mean_input_tokens: per_request(input),
        mean_output_tokens: per_request(output),
        requests_without_usage: without_usage,
        ttft_ms: Summary::of(&lat.ttft),
        tpot_ms: Summary::of(&lat.tpot),
        itl_ms: Summary::of(&lat.itl),
        e2e_ms: Summary::of(&lat.e2e),
        per_turn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ttft: u64, itl: &[u64], e2e: u64, tokens: Option<u32>) -> Success {
        Success {
            ttft: Duration::from_millis(ttft),
            itl: itl.iter().map(|&m| Duration::from_millis(m)).collect(),
            e2e: Duration::from_millis(e2e),
            prompt_tokens: tokens.map(|_| 10),
            completion_tokens: tokens,
            text_chunks: itl.len() as u32 + 1,
            text: String::new(),
        }
    }

    #[test]
    fn throughput_latency_and_failures() {
        let run = PointRun {
            load: Load::Concurrency(2),
            duration: Duration::from_secs(2),
            records: vec![
                Record {
                    turn: 0,
                    words: 10,
                    result: Ok(ok(100, &[10, 30], 140, Some(3))),
                },
                Record {
                    turn: 1,
                    words: 12,
                    // No usage: 2 text chunks are the output, 12 words the input.
                    result: Ok(ok(200, &[20], 220, None)),
                },
                Record {
                    turn: 1,
                    words: 10,
                    result: Err(Failure::new("429", "queue full")),
                },
            ],
        };
        let m = compute(&run, 2);
        assert_eq!((m.completed, m.failed), (2, 1));
        assert_eq!(m.errors["429"], 1);
        assert_eq!(m.error_examples["429"], "queue full");
        assert_eq!((m.total_input_tokens, m.total_output_tokens), (22, 5));
        assert!((m.request_throughput - 1.0).abs() < 1e-12);
        assert!((m.output_throughput - 2.5).abs() < 1e-12);
        assert!((m.total_token_throughput - 13.5).abs() < 1e-12);
        assert_eq!(m.requests_without_usage, 1);
        let ttft = m.ttft_ms.unwrap();
        assert!((ttft.mean - 150.0).abs() < 1e-9);
        // ITL pools the gaps of both requests: 10, 20, 30.
        let itl = m.itl_ms.unwrap();
        assert_eq!(itl.n, 3);
        assert!((itl.median - 20.0).abs() < 1e-9);
        // TPOT: (140-100)/(3-1) = 20 and (220-200)/(2-1) = 20.
        let tpot = m.tpot_ms.unwrap();
        assert!((tpot.mean - 20.0).abs() < 1e-9);
        assert_eq!(m.per_turn.len(), 2);
        assert_eq!(m.per_turn[1].completed, 1);
        assert!((m.per_turn[1].ttft_ms.as_ref().unwrap().mean - 200.0).abs() < 1e-9);
    }

    #[test]
    fn a_point_without_successes_reports_no_latencies() {
        let run = PointRun {
            load: Load::Rate(f64::INFINITY),
            duration: Duration::from_millis(5),
            records: vec![Record {
                turn: 0,
                words: 1,
                result: Err(Failure::new("transport", "refused")),
            }],
        };
        let m = compute(&run, 1);
        assert_eq!((m.completed, m.failed), (0, 1));
        assert!(m.ttft_ms.is_none() && m.itl_ms.is_none());
        assert_eq!(m.request_rate, Some(Value::from("inf")));
        assert_eq!(m.mean_output_tokens, 0.0);
    }
}
