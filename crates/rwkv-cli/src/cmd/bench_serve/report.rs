//! The human-readable table (one column per point, so a sweep reads left to right) and the
//! JSON file (`{"settings": {...}, "points": [...]}`).

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::metrics::PointMetrics;
use super::stats::Summary;

/// How the benchmark was run: the `settings` of the JSON file.
#[derive(Debug, Serialize)]
pub struct Settings {
    pub tool: &'static str,
    pub endpoint: String,
    pub model: String,
    /// `completions` or `chat`.
    pub mode: &'static str,
    /// `request_rate` or `concurrency`.
    pub sweep: &'static str,
    /// Requests per point (conversations in chat mode).
    pub num_prompts: usize,
    pub turns: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub range_ratio: f64,
    pub input_len_range: (usize, usize),
    pub output_len_range: (usize, usize),
    pub seed: u64,
    /// How prompt lengths were made.
    pub prompt_tokens: &'static str,
    pub started_unix_s: u64,
}

#[derive(Serialize)]
struct Report<'a> {
    settings: &'a Settings,
    points: &'a [PointMetrics],
}

pub fn write_json(path: &Path, settings: &Settings, points: &[PointMetrics]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(&Report { settings, points })?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

type Cell = fn(&PointMetrics) -> String;

fn num(v: f64, digits: usize) -> String {
    format!("{v:.digits$}")
}

/// A statistic of an optional summary, `-` when the point has no samples.
fn stat(s: &Option<Summary>, pick: fn(&Summary) -> f64) -> String {
    s.as_ref().map_or_else(|| "-".into(), |s| num(pick(s), 2))
}

/// Rows of the table: a label and how to render it for a point; `None` is a section heading.
const ROWS: &[(&str, Option<Cell>)] = &[
    ("Successful requests", Some(|m| m.completed.to_string())),
    ("Failed requests", Some(|m| m.failed.to_string())),
    ("Failures by status", Some(errors)),
    ("Duration (s)", Some(|m| num(m.duration_s, 2))),
    (
        "Total input tokens",
        Some(|m| m.total_input_tokens.to_string()),
    ),
    (
        "Total output tokens",
        Some(|m| m.total_output_tokens.to_string()),
    ),
    (
        "Mean input tokens/request",
        Some(|m| num(m.mean_input_tokens, 1)),
    ),
    (
        "Mean output tokens/request",
        Some(|m| num(m.mean_output_tokens, 1)),
    ),
    (
        "Request throughput (req/s)",
        Some(|m| num(m.request_throughput, 2)),
    ),
    (
        "Output token throughput (tok/s)",
        Some(|m| num(m.output_throughput, 2)),
    ),
    (
        "Total token throughput (tok/s)",
        Some(|m| num(m.total_token_throughput, 2)),
    ),
    ("Time to first token", None),
    ("  TTFT mean (ms)", Some(|m| stat(&m.ttft_ms, |s| s.mean))),
    (
        "  TTFT median (ms)",
        Some(|m| stat(&m.ttft_ms, |s| s.median)),
    ),
    ("  TTFT p90 (ms)", Some(|m| stat(&m.ttft_ms, |s| s.p90))),
    ("  TTFT p99 (ms)", Some(|m| stat(&m.ttft_ms, |s| s.p99))),
    ("Time per output token (excl. 1st)", None),
    ("  TPOT mean (ms)", Some(|m| stat(&m.tpot_ms, |s| s.mean))),
    (
        "  TPOT median (ms)",
        Some(|m| stat(&m.tpot_ms, |s| s.median)),
    ),
    ("  TPOT p99 (ms)", Some(|m| stat(&m.tpot_ms, |s| s.p99))),
    ("Inter-token latency", None),
    ("  ITL mean (ms)", Some(|m| stat(&m.itl_ms, |s| s.mean))),
    ("  ITL median (ms)", Some(|m| stat(&m.itl_ms, |s| s.median))),
    ("  ITL p90 (ms)", Some(|m| stat(&m.itl_ms, |s| s.p90))),
    ("  ITL p99 (ms)", Some(|m| stat(&m.itl_ms, |s| s.p99))),
    ("End-to-end latency", None),
    ("  E2E mean (ms)", Some(|m| stat(&m.e2e_ms, |s| s.mean))),
    ("  E2E median (ms)", Some(|m| stat(&m.e2e_ms, |s| s.median))),
    ("  E2E p99 (ms)", Some(|m| stat(&m.e2e_ms, |s| s.p99))),
];

fn errors(m: &PointMetrics) -> String {
    if m.errors.is_empty() {
        return "-".into();
    }
    m.errors
        .iter()
        .map(|(status, n)| format!("{status}x{n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The table: settings on top, then one column per point.
pub fn table(settings: &Settings, points: &[PointMetrics]) -> String {
    let mut rows: Vec<(String, Option<Vec<String>>)> = ROWS
        .iter()
        .map(|(label, cell)| {
            (
                (*label).to_owned(),
                cell.map(|f| points.iter().map(f).collect()),
            )
        })
        .collect();
    // Per-turn TTFT (chat mode): later turns resend the history, so this shows what the
    // server's prefix cache saves.
    let turns = points.iter().map(|p| p.per_turn.len()).max().unwrap_or(0);
    if turns > 0 {
        rows.push(("TTFT by conversation turn".into(), None));
        for t in 0..turns {
            let cell = |f: fn(&super::metrics::TurnMetrics) -> String| {
                points
                    .iter()
                    .map(|p| p.per_turn.get(t).map_or_else(|| "-".into(), f))
                    .collect()
            };
            rows.push((
                format!("  turn {} input tokens", t + 1),
                Some(cell(|m| num(m.mean_input_tokens, 1))),
            ));
            rows.push((
                format!("  turn {} TTFT median (ms)", t + 1),
                Some(cell(|m| stat(&m.ttft_ms, |s| s.median))),
            ));
            rows.push((
                format!("  turn {} TTFT p99 (ms)", t + 1),
                Some(cell(|m| stat(&m.ttft_ms, |s| s.p99))),
            ));
        }
    }

    let headers: Vec<String> = points.iter().map(|p| p.label.clone()).collect();
    let label_w = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let col_w: Vec<usize> = (0..points.len())
        .map(|i| {
            rows.iter()
                .filter_map(|(_, cells)| cells.as_ref().map(|c| c[i].len()))
                .chain([headers[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let width = label_w + col_w.iter().map(|w| w + 3).sum::<usize>();

    let mut out = String::new();
    let _ = writeln!(out, "{:=^width$}", " Serving Benchmark Result ");
    let _ = writeln!(
        out,
        "{} ({}), model {}: {} x {} turn(s), input {} tok, output {} tok, range ratio {}, seed {}",
        settings.endpoint,
        settings.mode,
        settings.model,
        settings.num_prompts,
        settings.turns,
        settings.input_len,
        settings.output_len,
        settings.range_ratio,
        settings.seed
    );
    let _ = write!(out, "{:label_w$}", "");
    for (h, w) in headers.iter().zip(&col_w) {
        let _ = write!(out, " | {h:>w$}");
    }
    let _ = writeln!(out, "\n{}", "-".repeat(width));
    for (label, cells) in &rows {
        match cells {
            None => {
                let _ = writeln!(out, "{label}");
            }
            Some(cells) => {
                let _ = write!(out, "{label:label_w$}");
                for (c, w) in cells.iter().zip(&col_w) {
                    let _ = write!(out, " | {c:>w$}");
                }
                out.push('\n');
            }
        }
    }
    let _ = writeln!(out, "{}", "=".repeat(width));
    for p in points {
        for (status, msg) in &p.error_examples {
            let _ = writeln!(out, "{}: first `{status}` failure: {msg}", p.label);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cmd::bench::serve::client::{Failure, Success};
    use crate::cmd::bench::serve::metrics::{compute, PointRun, Record};
    use crate::cmd::bench::serve::Load;

    fn settings() -> Settings {
        Settings {
            tool: "rwkv bench serve",
            endpoint: "http://x".into(),
            model: "m".into(),
            mode: "chat",
            sweep: "request_rate",
            num_prompts: 1,
            turns: 2,
            input_len: 4,
            output_len: 2,
            range_ratio: 0.0,
            input_len_range: (4, 4),
            output_len_range: (2, 2),
            seed: 0,
            prompt_tokens: "approximate",
            started_unix_s: 0,
        }
    }

    #[test]
    fn the_table_has_a_column_per_point_and_per_turn_rows() {
        let ok = Success {
            ttft: Duration::from_millis(5),
            e2e: Duration::from_millis(9),
            completion_tokens: Some(2),
            prompt_tokens: Some(4),
            ..Success::default()
        };
        let runs = [
            PointRun {
                load: Load::Rate(2.0),
                duration: Duration::from_secs(1),
                records: vec![
                    Record {
                        turn: 0,
                        words: 4,
                        result: Ok(ok.clone()),
                    },
                    Record {
                        turn: 1,
                        words: 4,
                        result: Err(Failure::new("503", "no worker is ready")),
                    },
                ],
            },
            PointRun {
                load: Load::Rate(f64::INFINITY),
                duration: Duration::from_secs(1),
                records: vec![Record {
                    turn: 0,
                    words: 4,
                    result: Ok(ok),
                }],
            },
        ];
        let points: Vec<PointMetrics> = runs.iter().map(|r| compute(r, 2)).collect();
        let text = table(&settings(), &points);
        let row = |label: &str| {
            text.lines()
                .find(|l| l.starts_with(label))
                .unwrap_or_else(|| panic!("no `{label}` row in\n{text}"))
                .split('|')
                .skip(1)
                .map(str::trim)
                .collect::<Vec<_>>()
        };
        let header: Vec<&str> = text
            .lines()
            .find(|l| l.contains(" | "))
            .unwrap()
            .split('|')
            .skip(1)
            .map(str::trim)
            .collect();
        assert_eq!(header, ["rate 2", "rate inf"]);
        assert_eq!(row("Successful requests"), ["1", "1"]);
        assert_eq!(row("Failures by status"), ["503x1", "-"]);
        assert_eq!(row("  TTFT mean (ms)"), ["5.00", "5.00"]);
        // Turn 2 has no success anywhere: its statistics are `-`, not 0.
        assert_eq!(row("  turn 2 TTFT median (ms)"), ["-", "-"]);
        assert!(text.contains("rate 2: first `503` failure: no worker is ready"));
        // Every table line of the body has the same width.
        let widths: Vec<usize> = text
            .lines()
            .filter(|l| l.contains(" | "))
            .map(str::len)
            .collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{text}");
    }
}
