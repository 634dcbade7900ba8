//! `rwkv eval mmlu`: the MMLU sweep, in this process or through a cluster.
//!
//! Questions are scored `--concurrency` at a time (the engine batches whatever is in flight),
//! each result is appended to the journal as it arrives, and the end writes the report. With
//! few-shot prompts every question of a subject starts with the same long prefix; the first
//! question of the subject scores that prefix alone first (a "warm-up" with a dummy
//! continuation), which leaves its state in the engine's prefix cache, and every question after
//! only prefills its own part.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context};
use futures_util::stream::{self, StreamExt};
use rwkv_tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use super::data::{self, letter, Question};
use super::journal::{self, Journal, Record};
use super::progress::{format_duration, Progress};
use super::prompt::{Prompt, PromptBuilder, SharedPrefix, FORMAT_VERSION};
use super::report;
use super::scorer::{Http, InProcess, Scored, Scorer};
use crate::cmd::backend::{BackendKind, CpuPrecision, GpuPrecision};
use crate::cmd::server::{self, EngineArgs};

#[derive(clap::Args, Debug)]
// Exactly one source of scores.
#[command(group = clap::ArgGroup::new("source").required(true).args(["endpoint", "model"]))]
pub struct Args {
    /// MMLU directory: `test/<subject>_test.csv` and `dev/<subject>_dev.csv`.
    #[arg(long)]
    data: PathBuf,
    /// Score through a running `rwkv serve` or router (e.g. `http://127.0.0.1:8000`) instead of
    /// in this process.
    #[arg(long)]
    endpoint: Option<String>,
    /// Checkpoint to evaluate in this process (.pth or .safetensors).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Solved dev questions in front of each test question (0 or 5 in the literature).
    #[arg(long, default_value_t = 0)]
    shots: usize,
    /// Comma-separated subjects [default: every subject with a test file].
    #[arg(long, value_delimiter = ',')]
    subjects: Vec<String>,
    /// Questions in flight at once; the engine batches them.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Only the first N test questions of each subject.
    #[arg(long)]
    limit: Option<usize>,
    /// Where `journal.jsonl`, `report.json` and `results.csv` go.
    #[arg(long, default_value = "mmlu-eval")]
    output_dir: PathBuf,
    /// Continue the journal in --output-dir: questions it already has results for (with the same
    /// model, prompt format and shots) are skipped.
    #[arg(long)]
    resume: bool,
    /// Prefill every prompt in full: no shared-prefix warm-up, and in-process a cache tenant per
    /// question (for measuring what sharing saves).
    #[arg(long)]
    no_prefix_sharing: bool,
    /// `world`, a Hugging Face tokenizer.json, or a World vocabulary .txt (the same in both modes:
    /// prompts are always tokenized here).
    #[arg(long, default_value = "world")]
    tokenizer: String,
    /// With --endpoint: the model to ask for when the cluster serves several.
    #[arg(long)]
    model_id: Option<String>,
    /// With --endpoint: the API key, sent as `Authorization: Bearer <key>`.
    #[arg(long, env = "RWKV_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// In-process compute backend [default: auto = CUDA if a GPU is usable, else CPU].
    #[arg(long, value_enum)]
    backend: Option<BackendKind>,
    /// In-process CPU weight precision [default: bf16].
    #[arg(long, value_enum)]
    cpu_precision: Option<CpuPrecision>,
    /// In-process CUDA GEMM inputs: split (f32-class) or bf16 (faster) [default: split].
    #[arg(long, value_enum)]
    gpu_precision: Option<GpuPrecision>,
    /// In-process state slots [default: 64 on a GPU, 16 on the CPU].
    #[arg(long)]
    slots: Option<usize>,
    /// In-process prefix-cache memory, MiB [default: 1024].
    #[arg(long)]
    prefix_cache_mb: Option<usize>,
}

/// Cache tenant of shared-prefix requests in process (a cluster uses its own).
const TENANT: &str = "eval-mmlu";

/// One subject's prompts in common.
struct Subject {
    shared: SharedPrefix,
    /// The warm-up's result, once the shared prefix's state is in the cache.
    warm: OnceCell<Scored>,
}

/// A question ready to score.
struct Item {
    subject: usize,
    question: Question,
    prompt: Prompt,
}

/// The questions of a run, read and tokenized before any model is loaded (so bad data fails
/// fast).
struct Work {
    names: Vec<String>,
    subjects: Vec<Subject>,
    items: Vec<Item>,
    choices: [u32; 4],
}

/// What this run did, beyond accuracy (the `run` object of `report.json`).
#[derive(Default, Serialize)]
struct RunStats {
    scored: usize,
    skipped: usize,
    elapsed_s: f64,
    questions_per_s: f64,
    context_tokens: usize,
    /// Context tokens the prefix cache saved, warm-ups excluded.
    cached_tokens: usize,
    /// Questions that reused a cached state.
    cache_hits: usize,
    /// Questions whose tokens start with their subject's shared prefix.
    questions_sharing_prefix: usize,
    warmup_requests: usize,
    warmup_tokens: usize,
}

impl RunStats {
    fn add(&mut self, record: &Record) {
        self.scored += 1;
        self.context_tokens += record.context_tokens;
        self.cached_tokens += record.cached_tokens;
        self.cache_hits += usize::from(record.cached_tokens > 0);
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    // Prompts are tokenized here in both modes, so both score the same token ids.
    let tokenizer = Tokenizer::load(&args.tokenizer)?;
    let work = prepare(&args, &tokenizer)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(endpoint) = &args.endpoint {
        return runtime.block_on(async {
            let scorer =
                Http::connect(endpoint, args.model_id.as_deref(), args.api_key.as_deref()).await?;
            evaluate(&args, &scorer, work).await
        });
    }
    server::init_tracing();
    let engine_args = EngineArgs {
        model: args.model.clone(),
        tokenizer: Some(args.tokenizer.clone()),
        backend: args.backend,
        cpu_precision: args.cpu_precision,
        gpu_precision: args.gpu_precision,
        slots: args.slots,
        prefix_cache_mb: args.prefix_cache_mb,
        ..EngineArgs::default()
    };
    let model = server::load_model(&engine_args)?;
    // Checks the tokenizer against the model's vocabulary.
    let tokenizer = server::load_tokenizer(&engine_args, model.weights.config.vocab_size)?;
    let (engine, identity) = server::start_engine(&engine_args, &model, &tokenizer, "eval")?;
    // Results depend on the weights and the numerics, not on the file's name.
    let scorer_id = format!(
        "weights {} on {}",
        crate::cmd::to_hex(&model.hash),
        identity.backend
    );
    drop(model); // the engine owns what it needs; free the loader's copy for long sweeps
    let scorer = InProcess::new(engine.handle(), scorer_id);
    let result = runtime.block_on(evaluate(&args, &scorer, work));
    engine.shutdown();
    result
}

/// The requested subjects, each checked to have a test file.
fn select_subjects(args: &Args) -> anyhow::Result<Vec<String>> {
    let available = data::list_subjects(&args.data)?;
    if args.subjects.is_empty() {
        return Ok(available);
    }
    let mut chosen = Vec::new();
    for s in &args.subjects {
        let s = s.trim();
        anyhow::ensure!(
            available.iter().any(|a| a == s),
            "unknown subject `{s}`: there is no {}",
            data::split_path(&args.data, "test", s).display()
        );
        if !chosen.iter().any(|c| c == s) {
            chosen.push(s.to_owned());
        }
    }
    Ok(chosen)
}

/// Loads the questions and builds every prompt.
fn prepare(args: &Args, tokenizer: &Tokenizer) -> anyhow::Result<Work> {
    let names = select_subjects(args)?;
    let builder = PromptBuilder::new(tokenizer)?;
    let mut subjects = Vec::new();
    let mut items = Vec::new();
    for name in &names {
        let mut test = data::load_split(&args.data, "test", name)?;
        test.truncate(args.limit.unwrap_or(usize::MAX));
        let mut shots = Vec::new();
        if args.shots > 0 {
            shots = data::load_split(&args.data, "dev", name)?;
            anyhow::ensure!(
                shots.len() >= args.shots,
                "--shots {} needs that many dev questions; {} has {}",
                args.shots,
                data::split_path(&args.data, "dev", name).display(),
                shots.len()
            );
            shots.truncate(args.shots);
        }
        let shared = builder.shared_prefix(name, &shots)?;
        for question in test {
            let prompt = builder.prompt(&question, &shots, &shared)?;
            items.push(Item {
                subject: subjects.len(),
                question,
                prompt,
            });
        }
        subjects.push(Subject {
            shared,
            warm: OnceCell::new(),
        });
    }
    Ok(Work {
        names,
        subjects,
        items,
        choices: builder.choice_tokens,
    })
}

async fn evaluate<S: Scorer>(args: &Args, scorer: &S, work: Work) -> anyhow::Result<()> {
    let Work {
        names,
        subjects,
        items,
        choices,
    } = work;
    let fingerprint = journal::fingerprint(&[
        ("task", "mmlu".to_owned()),
        ("format", FORMAT_VERSION.to_owned()),
        ("shots", args.shots.to_string()),
        ("scorer", scorer.identity().to_owned()),
        ("tokenizer", args.tokenizer.clone()),
    ]);
    let (mut journal, resumed) = Journal::open(&args.output_dir, args.resume, &fingerprint)?;
    if resumed.unreadable > 0 {
        eprintln!(
            "[eval] {} unreadable line(s) in {} ignored (an interrupted write?); those questions \
             are scored again",
            resumed.unreadable,
            journal.path().display()
        );
    }
    let (done, pending): (Vec<&Item>, Vec<&Item>) = items.iter().partition(|i| {
        resumed
            .records
            .contains_key(&(i.question.subject.clone(), i.question.index))
    });
    let sharing = !args.no_prefix_sharing;
    eprintln!(
        "[eval] MMLU {}-shot: {} questions in {} subject(s), {} concurrent, prefix sharing {}; \
         scorer: {} (results fingerprint {fingerprint})",
        args.shots,
        items.len(),
        names.len(),
        args.concurrency,
        if sharing { "on" } else { "off" },
        scorer.identity(),
    );
    if args.resume {
        eprintln!(
            "[eval] resuming {}: skipped {} question(s) already done, {} to go{}",
            journal.path().display(),
            done.len(),
            pending.len(),
            if resumed.other_settings > 0 {
                format!(
                    " ({} results of other settings left alone)",
                    resumed.other_settings
                )
            } else {
                String::new()
            }
        );
    }

    let started = Instant::now();
    let mut progress = Progress::new(pending.len());
    let mut stats = RunStats {
        skipped: done.len(),
        questions_sharing_prefix: pending.iter().filter(|i| i.prompt.shares_prefix).count(),
        ..RunStats::default()
    };
    let mut new_records = Vec::with_capacity(pending.len());
    let mut results = stream::iter(&pending)
        .map(|item| {
            score_item(
                scorer,
                &subjects[item.subject],
                item,
                choices,
                sharing,
                &fingerprint,
            )
        })
        .buffer_unordered(args.concurrency);
    while let Some(result) = results.next().await {
        let record = match result {
            Ok(record) => record,
            Err(err) => {
                progress.finish();
                return Err(err.context(format!(
                    "the finished questions are in {}; --resume continues from there",
                    journal.path().display()
                )));
            }
        };
        journal.append(&record)?;
        progress.tick(record.correct);
        stats.add(&record);
        new_records.push(record);
    }
    drop(results);
    progress.finish();
    stats.elapsed_s = started.elapsed().as_secs_f64();
    stats.questions_per_s = stats.scored as f64 / stats.elapsed_s.max(1e-9);
    let warmups: Vec<&Scored> = subjects.iter().filter_map(|s| s.warm.get()).collect();
    stats.warmup_requests = warmups.len();
    stats.warmup_tokens = warmups.iter().map(|w| w.context_tokens).sum();

    let mut all: Vec<&Record> = done
        .iter()
        .filter_map(|i| {
            resumed
                .records
                .get(&(i.question.subject.clone(), i.question.index))
        })
        .chain(&new_records)
        .collect();
    all.sort_by(|a, b| (&a.subject, a.index).cmp(&(&b.subject, b.index)));
    let (per_subject, overall) = report::tally(all.iter().copied());
    report::print_table(&per_subject, &overall);

    let report = json!({
        "task": "mmlu",
        "settings": settings_json(args, scorer.identity(), &names, &fingerprint),
        "overall": overall,
        "subjects": per_subject,
        "run": stats,
    });
    let dir = &args.output_dir;
    report::write_json(&dir.join("report.json"), &report)?;
    report::write_csv(&dir.join("results.csv"), &all)?;
    eprintln!(
        "[eval] scored {} question(s) in {} ({:.2} q/s), skipped {}; prefix cache: {} of {} \
         context tokens reused ({} hits); wrote {}",
        stats.scored,
        format_duration(stats.elapsed_s),
        stats.questions_per_s,
        stats.skipped,
        stats.cached_tokens,
        stats.context_tokens,
        stats.cache_hits,
        dir.join("report.json").display(),
    );
    Ok(())
}

/// The `settings` object of `report.json`: what produced the results.
fn settings_json(args: &Args, scorer: &str, subjects: &[String], fingerprint: &str) -> Value {
    json!({
        "data": args.data,
        "mode": if args.endpoint.is_some() { "endpoint" } else { "in-process" },
        "endpoint": args.endpoint,
        "scorer": scorer,
        "shots": args.shots,
        "subjects": subjects,
        "limit_per_subject": args.limit,
        "concurrency": args.concurrency,
        "prefix_sharing": !args.no_prefix_sharing,
        "prompt_format": FORMAT_VERSION,
        "tokenizer": args.tokenizer,
        "fingerprint": fingerprint,
    })
}

/// Scores one question: its four answer tokens after its prompt.
async fn score_item<S: Scorer>(
    scorer: &S,
    subject: &Subject,
    item: &Item,
    choices: [u32; 4],
    sharing: bool,
    fingerprint: &str,
) -> anyhow::Result<Record> {
    let q = &item.question;
    let tenant = if sharing {
        if item.prompt.shares_prefix {
            // The first question of the subject puts the shared prefix's state in the cache;
            // the others wait for it, so none of them prefills the prefix again.
            subject
                .warm
                .get_or_try_init(|| {
                    scorer.score(
                        TENANT.to_owned(),
                        subject.shared.tokens.clone(),
                        vec![choices[0]],
                    )
                })
                .await
                .with_context(|| format!("warming up the shared prefix of {}", q.subject))?;
        }
        TENANT.to_owned()
    } else {
        // A tenant of its own: no state cached for another question can be used.
        format!("{TENANT}/{fingerprint}/{}/{}", q.subject, q.index)
    };
    let scored = scorer
        .score(tenant, item.prompt.tokens.clone(), choices.to_vec())
        .await
        .with_context(|| format!("scoring {} question {}", q.subject, q.index))?;
    let logprobs: [f32; 4] = scored
        .logprobs
        .try_into()
        .map_err(|v: Vec<f32>| anyhow!("{} scores for 4 choices", v.len()))?;
    let prediction = argmax(&logprobs);
    Ok(Record {
        fingerprint: fingerprint.to_owned(),
        subject: q.subject.clone(),
        index: q.index,
        answer: letter(q.answer),
        prediction: letter(prediction),
        logprobs,
        correct: prediction == q.answer,
        context_tokens: scored.context_tokens,
        cached_tokens: scored.cached_tokens,
    })
}

/// `torch.argmax`: the first maximum, or the first NaN if there is one.
fn argmax(values: &[f32; 4]) -> usize {
    if let Some(i) = values.iter().position(|v| v.is_nan()) {
        return i;
    }
    (1..4).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

#[cfg(test)]
mod tests {
    #[test]
    fn argmax_is_torchs() {
        assert_eq!(super::argmax(&[-1.0, -0.5, -0.5, -3.0]), 1);
        assert_eq!(super::argmax(&[-1.0, f32::NAN, 0.0, 0.0]), 1);
        assert_eq!(super::argmax(&[0.0; 4]), 0);
    }
}
