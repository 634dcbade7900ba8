//! `rwkv bench`: prefill and decode throughput of the CPU backend on a checkpoint, a generator
//! for random-weight benchmark models (`--make-model C,L,V OUT`), and `rwkv bench serve`, a load
//! generator for the HTTP API (module `serve`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use rwkv_cpu::{CpuBackend, CpuOptions, Isa, Precision};
use rwkv_model::synthetic::{random_checkpoint, SyntheticSpec};
use rwkv_model::{Backend, Checkpoint, ModelWeights, OutputRows, SeqStep};

// The HTTP load generator has several modules of its own; it lives in `cmd/bench_serve/`.
#[path = "bench_serve/mod.rs"]
pub mod serve;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// Checkpoint to benchmark (.pth or .safetensors).
    #[arg(long, required_unless_present = "make_model")]
    model: Option<PathBuf>,
    /// Write a random-weight model of shape `C,L,V` (width, layers, vocabulary) to OUT instead.
    #[arg(long, value_name = "C,L,V", requires = "out")]
    make_model: Option<String>,
    /// Output file of --make-model (.safetensors).
    #[arg(value_name = "OUT")]
    out: Option<PathBuf>,
    /// Seed of --make-model.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Sequences decoded together (each also prefilled).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt length per sequence.
    #[arg(long, default_value_t = 256)]
    prompt_tokens: usize,
    /// Tokens generated per sequence (greedy).
    #[arg(long, default_value_t = 32)]
    gen_tokens: usize,
    /// Weight precision: f32 (the reference), bf16, int8.
    #[arg(long, default_value = "bf16")]
    precision: Precision,
    /// Threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Kernel set: portable, avx2, avx512 (default: the best this CPU supports).
    #[arg(long)]
    isa: Option<String>,
    /// Prefill chunk: tokens of one sequence per forward call (0 = the whole prompt).
    #[arg(long, default_value_t = 0)]
    chunk: usize,
    /// Also run the prompt through the f32 reference and report how far this precision's logits
    /// are from it (relative L2, top-1 agreement over every prompt position).
    #[arg(long)]
    compare_f32: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Subcommand)]
enum BenchCommand {
    /// Load-test an OpenAI-compatible HTTP endpoint (`rwkv serve`, `rwkv router`, ...): TTFT,
    /// inter-token latency and throughput at request rates or concurrencies (vLLM-style).
    Serve(serve::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(BenchCommand::Serve(serve_args)) = args.command {
        return serve::run(serve_args);
    }
    if let Some(shape) = &args.make_model {
        let out = args
            .out
            .as_ref()
            .context("--make-model needs an OUT path")?;
        return make_model(shape, args.seed, out);
    }
    let path = args.model.as_ref().context("--model is required")?;
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(args.prompt_tokens > 0, "--prompt-tokens must be at least 1");
    let t0 = Instant::now();
    let weights = ModelWeights::load(path)?;
    let opts = CpuOptions {
        precision: args.precision,
        threads: args.threads,
        isa: match args.isa.as_deref() {
            None => None,
            Some("portable") => Some(Isa::Portable),
            Some("avx2") => Some(Isa::Avx2),
            Some("avx512") => Some(Isa::Avx512),
            Some(other) => bail!("unknown --isa `{other}` (portable, avx2, avx512)"),
        },
    };
    if let Some(isa) = opts.isa {
        anyhow::ensure!(
            Isa::available().contains(&isa),
            "this CPU cannot run the {isa:?} kernels"
        );
    }
    let mut cpu = CpuBackend::with_options(&weights, args.batch, opts);
    let load_s = t0.elapsed().as_secs_f64();
    let vocab = weights.config.vocab_size as u32;
    // The same prompt formula as shared/tools/ref_bench.py, shifted per sequence.
    let prompts: Vec<Vec<u32>> = (0..args.batch)
        .map(|b| {
            (0..args.prompt_tokens)
                .map(|i| (((i + 31 * b) * 7919) % 60000 + 1) as u32 % vocab)
                .collect()
        })
        .collect();

    // Warm-up (page in the weights, start the workers), then back to a clean state.
    cpu.forward(&[step(
        0,
        &prompts[0][..prompts[0].len().min(16)],
        OutputRows::Last,
    )])?;
    cpu.reset_state(0)?;

    let chunk = if args.chunk == 0 {
        args.prompt_tokens
    } else {
        args.chunk
    };
    let t0 = Instant::now();
    let mut next = vec![0u32; args.batch];
    for (b, prompt) in prompts.iter().enumerate() {
        let pieces: Vec<&[u32]> = prompt.chunks(chunk).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let output = if i + 1 == pieces.len() {
                OutputRows::Last
            } else {
                OutputRows::None
            };
            let logits = cpu.forward(&[step(b, piece, output)])?;
            if logits.rows() == 1 {
                next[b] = argmax(logits.row(0));
            }
        }
    }
    let prefill_s = t0.elapsed().as_secs_f64();

    let mut step_ms = Vec::with_capacity(args.gen_tokens);
    let t0 = Instant::now();
    for _ in 0..args.gen_tokens {
        let ts = Instant::now();
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let steps: Vec<SeqStep<'_>> = toks
            .iter()
            .enumerate()
            .map(|(b, t)| step(b, t, OutputRows::Last))
            .collect();
        let logits = cpu.forward(&steps)?;
        for (b, t) in next.iter_mut().enumerate() {
            *t = argmax(logits.row(b));
        }
        step_ms.push(ts.elapsed().as_secs_f64() * 1e3);
    }
    let decode_s = t0.elapsed().as_secs_f64();
    step_ms.sort_by(f64::total_cmp);

    let mut report = serde_json::json!({
        "model": path.display().to_string(),
        "backend": cpu.name(),
        "precision": format!("{:?}", args.precision).to_lowercase(),
        "isa": format!("{:?}", cpu.isa()).to_lowercase(),
        "threads": if args.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            args.threads
        },
        "n_embd": weights.config.n_embd,
        "n_layer": weights.config.n_layer,
        "vocab_size": weights.config.vocab_size,
        "weight_bytes": cpu.weight_bytes(),
        "load_s": load_s,
        "batch": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "prefill_chunk": chunk,
        "gen_tokens": args.gen_tokens,
        "prefill_tok_s": (args.batch * args.prompt_tokens) as f64 / prefill_s,
        "decode_tok_s": (args.batch * args.gen_tokens) as f64 / decode_s,
        "decode_step_ms_p50": step_ms.get(step_ms.len() / 2).copied(),
        "decode_step_ms_min": step_ms.first().copied(),
    });
    if args.compare_f32 {
        let (rel, top1) = compare_f32(&weights, &mut cpu, &prompts[0])?;
        report["vs_f32_logits_rel_l2"] = rel.into();
        report["vs_f32_top1_agreement"] = top1.into();
    }
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// Logits of every prompt position from this backend and from the f32 reference.
fn compare_f32(
    weights: &ModelWeights,
    cpu: &mut CpuBackend,
    prompt: &[u32],
) -> anyhow::Result<(f64, f64)> {
    cpu.reset_state(0)?;
    let got = cpu.forward(&[step(0, prompt, OutputRows::All)])?;
    let mut reference = CpuBackend::new(weights, 1);
    let want = reference.forward(&[step(0, prompt, OutputRows::All)])?;
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (a, b) in got.data.iter().zip(&want.data) {
        diff += f64::from(a - b).powi(2);
        norm += f64::from(*b).powi(2);
    }
    let agree = (0..want.rows())
        .filter(|&r| argmax(got.row(r)) == argmax(want.row(r)))
        .count();
    Ok((
        (diff / norm.max(1e-30)).sqrt(),
        agree as f64 / want.rows() as f64,
    ))
}

fn make_model(shape: &str, seed: u64, out: &Path) -> anyhow::Result<()> {
    let dims = super::parse_ids(shape).context("--make-model wants C,L,V")?;
    let [c, l, v] = dims[..] else {
        bail!("--make-model wants three numbers C,L,V, got `{shape}`");
    };
    let (c, l, v) = (c as usize, l as usize, v as usize);
    anyhow::ensure!(
        c >= 16 && c % 16 == 0 && l >= 1 && v >= 1,
        "--make-model: C must be a positive multiple of 16, L and V positive"
    );
    let spec = SyntheticSpec {
        seed,
        ..SyntheticSpec::new(c, l, v)
    };
    anyhow::ensure!(
        c % spec.head_size == 0,
        "C must be a multiple of the head size 64"
    );
    let tensors = random_checkpoint(&spec);
    Checkpoint::save_safetensors(&tensors, out)?;
    let params: usize = tensors.values().map(|t| t.len()).sum();
    eprintln!(
        "wrote {} ({params} parameters, C={c} L={l} V={v}, seed {seed})",
        out.display()
    );
    Ok(())
}

fn step(slot: usize, tokens: &[u32], output: OutputRows) -> SeqStep<'_> {
    SeqStep {
        slot,
        tokens,
        output,
    }
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}
