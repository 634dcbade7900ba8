//! `rwkv generate`: prompt in, streamed text out, on the best backend available.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use rwkv_engine::{is_frequency_exempt, Sampler, SamplingParams};
use rwkv_model::{ModelWeights, OutputRows, SeqStep};
use rwkv_tokenizer::{StopChecker, StreamDecoder, Tokenizer};

/// Prompt tokens per forward call: bounds activation memory on long prompts without changing the
/// result (the state carries across calls).
const PREFILL_CHUNK: usize = 512;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint (.pth or .safetensors).
    #[arg(long)]
    model: PathBuf,
    /// `world`, a Hugging Face tokenizer.json, or a World vocabulary .txt.
    #[arg(long, default_value = "world")]
    tokenizer: String,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 100)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus mass; >= 1 disables the nucleus filter (the reference would collapse to greedy).
    #[arg(long, default_value_t = 0.85)]
    top_p: f32,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0.2)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.2)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0.996)]
    penalty_decay: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text is generated (repeatable); it is not printed.
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Token ids that may never be sampled (comma-separated).
    #[arg(long, default_value = "")]
    ban: String,
    /// Compute backend: a GPU when one is usable, else the CPU.
    #[arg(long, value_enum, default_value = "auto")]
    backend: super::backend::BackendKind,
    /// Weight precision on the CPU.
    #[arg(long, value_enum, default_value = "bf16")]
    cpu_precision: super::backend::CpuPrecision,
    #[command(flatten)]
    gpu: super::backend::GpuArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::load(&args.tokenizer)?;
    let weights = ModelWeights::load(&args.model)?;
    let vocab = weights.config.vocab_size;
    let prompt = tokenizer.encode(&args.prompt)?;
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("prompt token {bad} is outside the model's vocabulary ({vocab}): wrong --tokenizer for this model?");
    }
    let mut sampler = Sampler::new(sampling_params(&args, &tokenizer, vocab)?, vocab)?;
    let mut backend = super::backend::open(
        &weights,
        1,
        args.backend,
        args.gpu.with_cpu(args.cpu_precision),
    )?;
    let mut logits = Vec::new();
    for chunk in prompt.chunks(PREFILL_CHUNK) {
        logits = backend.forward(&[step(chunk)])?.data;
    }
    let mut decoder = StreamDecoder::new();
    let mut stops = StopChecker::new(args.stop.iter().cloned());
    let mut out = std::io::stdout().lock();
    for _ in 0..args.max_tokens {
        let token = sampler.sample(&mut logits);
        if sampler.is_stop_token(token) {
            break;
        }
        let bytes = tokenizer.token_bytes(token).unwrap_or_default();
        sampler.record(token, is_frequency_exempt(bytes));
        let outcome = stops.push(&decoder.push(&tokenizer, token)?);
        out.write_all(outcome.emit.as_bytes())?;
        out.flush()?;
        if outcome.stopped {
            writeln!(out)?;
            return Ok(());
        }
        logits = backend.forward(&[step(&[token])])?.data;
    }
    let rest = stops.push(&decoder.finish());
    write!(out, "{}", rest.emit)?;
    if !rest.stopped {
        write!(out, "{}", stops.finish())?;
    }
    writeln!(out)?;
    Ok(())
}

fn step(tokens: &[u32]) -> SeqStep<'_> {
    SeqStep {
        slot: 0,
        tokens,
        output: OutputRows::Last,
    }
}

/// Token 0 (end of text) stops the generation; ids the tokenizer cannot decode (past its
/// vocabulary: World's 65530..65535, and any World id without bytes) are banned, as the
/// reference would fail on them.
fn sampling_params(
    args: &Args,
    tokenizer: &Tokenizer,
    vocab: usize,
) -> anyhow::Result<SamplingParams> {
    let mut token_ban = super::parse_ids(&args.ban).context("--ban")?;
    let known = tokenizer.vocab_size().min(vocab) as u32;
    if matches!(tokenizer, Tokenizer::World(_)) {
        token_ban.extend((1..known).filter(|&t| tokenizer.token_bytes(t).is_none()));
    }
    Ok(SamplingParams {
        sample_below: Some(known),
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        presence_penalty: args.presence_penalty,
        frequency_penalty: args.frequency_penalty,
        penalty_decay: args.penalty_decay,
        token_ban,
        stop_tokens: vec![0],
        end_tokens: Vec::new(),
        stop_strings: args.stop.clone(),
        seed: args.seed,
        max_tokens: args.max_tokens,
    })
}
