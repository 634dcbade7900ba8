//! `rwkv bench serve`: a load generator for an OpenAI-compatible HTTP endpoint (`rwkv serve`,
//! `rwkv router`, or any other server of the API), in the style of vLLM's
//! `benchmarks/benchmark_serving.py`.
//!
//! Every request streams (`stream: true`), so time to first token and the gaps between tokens
//! are measured on the wire. Load is open-loop (`--request-rate`: Poisson arrivals, `inf` sends
//! everything at once) or closed-loop (`--concurrency`: N requests always in flight); a comma
//! list runs a sweep, one point per value, each with fresh prompts. `--mode chat` simulates users
//! holding multi-turn conversations through `/v1/chat/completions`, which exercises the server's
//! prefix-state cache, and reports TTFT per turn.
//!
//! Modules: `workload` (prompts, lengths, arrivals), `sse` (event-stream parsing), `client` (one
//! timed request), `runner` (a point's load), `stats` and `metrics` (the numbers), `report` (the
//! table and the JSON) and `plot` (the SVG).

mod client;
mod metrics;
mod plot;
mod report;
mod runner;
mod sse;
mod stats;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use client::{Api, Client};
use runner::Target;
use workload::{LengthDist, WorkloadSpec};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base URL of the server, e.g. `http://127.0.0.1:8000` (the API is under `/v1`).
    #[arg(long)]
    endpoint: String,
    /// Model to request [default: the first id of `GET /v1/models`].
    #[arg(long)]
    model: Option<String>,
    /// `completions`: one prompt per request to /v1/completions. `chat`: each job is a user
    /// holding a `--turns`-turn conversation through /v1/chat/completions.
    #[arg(long, value_enum, default_value = "completions")]
    mode: Mode,
    /// Open loop: Poisson arrivals at R requests/s (conversations/s in chat mode); `inf` sends
    /// every request at once. A comma-separated list (`1,2,4,inf`) is a sweep [default: inf].
    #[arg(long, value_delimiter = ',', value_parser = parse_rate, conflicts_with = "concurrency")]
    request_rate: Vec<f64>,
    /// Closed loop: N requests (users, in chat mode) in flight at all times. A comma-separated
    /// list (`1,4,16`) is a sweep.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(usize))]
    concurrency: Vec<usize>,
    /// Requests per point (conversations per point in chat mode).
    #[arg(long, default_value_t = 100)]
    num_prompts: usize,
    /// Prompt length in tokens (each chat turn's new user message, in chat mode).
    #[arg(long, default_value_t = 128)]
    input_len: usize,
    /// Tokens to generate per request (`max_tokens`).
    #[arg(long, default_value_t = 64)]
    output_len: usize,
    /// Draw each length uniformly from [len*(1-r), len*(1+r)] instead of using it exactly.
    #[arg(long, default_value_t = 0.0)]
    range_ratio: f64,
    /// Turns per conversation (chat mode).
    #[arg(long, default_value_t = 3)]
    turns: usize,
    /// Seed of the prompts, lengths, arrival times and the requests' sampling seeds.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Write the settings and every point's metrics as one JSON object.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw the results as SVG: throughput and latency against the swept value for a sweep,
    /// latency distributions (CDF) for a single point.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Do not send the untimed warm-up request that first checks the endpoint works.
    #[arg(long)]
    no_warmup: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Completions,
    Chat,
}

/// `inf` or a positive number of requests per second.
fn parse_rate(s: &str) -> Result<f64, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("inf") {
        return Ok(f64::INFINITY);
    }
    match s.parse::<f64>() {
        // Below one request a day the gaps no longer fit a Duration (and mean nothing).
        Ok(r) if r >= 1e-5 && r.is_finite() => Ok(r),
        _ => Err(format!(
            "`{s}` is not a rate of at least 0.00001 requests/s, or `inf`"
        )),
    }
}

/// The load of one point of a sweep.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Poisson arrivals per second (`f64::INFINITY`: all at once).
    Rate(f64),
    /// Requests in flight.
    Concurrency(usize),
}

impl Load {
    /// The swept value alone (`4`, `inf`): axis ticks and table headers.
    pub fn value(&self) -> String {
        match *self {
            Load::Rate(r) if r.is_infinite() => "inf".into(),
            Load::Rate(r) => format!("{r}"),
            Load::Concurrency(n) => n.to_string(),
        }
    }

    /// What is swept, for axis titles.
    pub fn axis(&self) -> &'static str {
        match self {
            Load::Rate(_) => "request rate (req/s)",
            Load::Concurrency(_) => "concurrency (requests in flight)",
        }
    }

    pub fn label(&self) -> String {
        match self {
            Load::Rate(_) => format!("rate {}", self.value()),
            Load::Concurrency(_) => format!("concurrency {}", self.value()),
        }
    }

    /// JSON has no infinity: `"inf"` stands for it.
    pub fn rate_json(&self) -> Option<Value> {
        match *self {
            Load::Rate(r) if r.is_infinite() => Some("inf".into()),
            Load::Rate(r) => Some(r.into()),
            Load::Concurrency(_) => None,
        }
    }

    pub fn concurrency(&self) -> Option<usize> {
        match *self {
            Load::Concurrency(n) => Some(n),
            Load::Rate(_) => None,
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.num_prompts > 0, "--num-prompts must be at least 1");
    anyhow::ensure!(args.input_len > 0, "--input-len must be at least 1");
    anyhow::ensure!(args.output_len > 0, "--output-len must be at least 1");
    anyhow::ensure!(
        (0.0..1.0).contains(&args.range_ratio),
        "--range-ratio must be in [0, 1), got {}",
        args.range_ratio
    );
    anyhow::ensure!(args.turns > 0, "--turns must be at least 1");
    anyhow::ensure!(
        args.concurrency.iter().all(|&n| n > 0),
        "--concurrency values must be at least 1"
    );
    if let Some(plot) = &args.plot {
        // PNG would need a font rasterizer (and system font libraries); SVG leaves text to the
        // viewer.
        if plot.extension().and_then(|e| e.to_str()) != Some("svg") {
            bail!("--plot writes SVG only: name the file *.svg");
        }
    }
    let loads: Vec<Load> = if !args.concurrency.is_empty() {
        args.concurrency
            .iter()
            .map(|&n| Load::Concurrency(n))
            .collect()
    } else if !args.request_rate.is_empty() {
        args.request_rate.iter().map(|&r| Load::Rate(r)).collect()
    } else {
        vec![Load::Rate(f64::INFINITY)]
    };
    let (api, turns) = match args.mode {
        Mode::Completions => (Api::Completions, 1),
        Mode::Chat => (Api::Chat, args.turns),
    };
    let spec = WorkloadSpec {
        jobs: args.num_prompts,
        turns,
        input: LengthDist {
            len: args.input_len,
            ratio: args.range_ratio,
        },
        output: LengthDist {
            len: args.output_len,
            ratio: args.range_ratio,
        },
        seed: args.seed,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let client = Client::new(&args.endpoint, Duration::from_secs(args.timeout))?;
    let started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (model, runs) = runtime.block_on(async {
        let model = match &args.model {
            Some(m) => m.clone(),
            None => client
                .models()
                .await?
                .into_iter()
                .next()
                .with_context(|| format!("{}/v1/models lists no model", client.base()))?,
        };
        let target = Target { client, api, model };
        if !args.no_warmup {
            warm_up(&target, &spec).await?;
        }
        let mut runs = Vec::with_capacity(loads.len());
        for (i, &load) in loads.iter().enumerate() {
            eprintln!(
                "[bench serve] point {}/{}: {}, {} {} ...",
                i + 1,
                loads.len(),
                load.label(),
                spec.jobs,
                if turns > 1 {
                    "conversations"
                } else {
                    "requests"
                }
            );
            let jobs = workload::jobs(&spec, i as u64);
            let arrivals = match load {
                Load::Rate(rate) => workload::arrivals(rate, jobs.len(), spec.seed, i as u64),
                Load::Concurrency(_) => Vec::new(),
            };
            let run = runner::run_point(&target, load, jobs, arrivals).await;
            let failed = run.records.iter().filter(|r| r.result.is_err()).count();
            eprintln!(
                "[bench serve]   done in {:.2} s, {} ok, {failed} failed",
                run.duration.as_secs_f64(),
                run.records.len() - failed,
            );
            runs.push(run);
        }
        anyhow::Ok((target.model, runs))
    })?;

    let points: Vec<metrics::PointMetrics> =
        runs.iter().map(|r| metrics::compute(r, turns)).collect();
    let settings = report::Settings {
        tool: "rwkv bench serve",
        endpoint: args.endpoint.clone(),
        model,
        mode: match args.mode {
            Mode::Completions => "completions",
            Mode::Chat => "chat",
        },
        sweep: match loads[0] {
            Load::Rate(_) => "request_rate",
            Load::Concurrency(_) => "concurrency",
        },
        num_prompts: args.num_prompts,
        turns,
        input_len: args.input_len,
        output_len: args.output_len,
        range_ratio: args.range_ratio,
        input_len_range: spec.input.bounds(),
        output_len_range: spec.output.bounds(),
        seed: args.seed,
        prompt_tokens: "approximate: random words, each one World-vocabulary token; reported \
                        counts are the server's usage",
        started_unix_s,
    };
    eprint!("{}", report::table(&settings, &points));
    if let Some(path) = &args.json {
        report::write_json(path, &settings, &points)?;
        eprintln!("[bench serve] wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &settings, &runs, &points)?;
        eprintln!("[bench serve] wrote {}", path.display());
    }
    Ok(())
}

/// One short, untimed request: fails fast with the server's message when the endpoint, model or
/// mode is wrong, and keeps connection setup and first-request work out of the first point.
async fn warm_up(target: &Target, spec: &WorkloadSpec) -> anyhow::Result<()> {
    let probe = WorkloadSpec {
        jobs: 1,
        turns: 1,
        input: LengthDist {
            len: spec.input.len.min(16),
            ratio: 0.0,
        },
        output: LengthDist { len: 2, ratio: 0.0 },
        ..spec.clone()
    };
    let job = &workload::jobs(&probe, u64::MAX / 2)[0];
    for record in runner::run_job(target, job).await {
        if let Err(f) = record.result {
            bail!(
                "the warm-up request to {} failed ({}): {}",
                target.client.base(),
                f.status,
                f.message
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_inf() {
        assert_eq!(parse_rate("inf"), Ok(f64::INFINITY));
        assert_eq!(parse_rate(" 2.5"), Ok(2.5));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
        assert_eq!(Load::Rate(f64::INFINITY).value(), "inf");
        assert_eq!(Load::Rate(4.0).label(), "rate 4");
        assert_eq!(Load::Concurrency(16).rate_json(), None);
    }
}
