//! `rwkv forward`: logits of every position and the final state, as safetensors.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use rwkv_model::{Checkpoint, DType, ModelWeights, OutputRows, SeqStep, State, Tensor};

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint (.pth or .safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long)]
    tokens: String,
    /// Initial state (`state.{i}.att_shift`, `state.{i}.wkv`, `state.{i}.ffn_shift`); default:
    /// the model's initial state.
    #[arg(long)]
    state_in: Option<PathBuf>,
    /// Output file: `logits` f32 [T, V] and the final state under the same names as --state-in.
    #[arg(long)]
    output: PathBuf,
    /// Compute backend; the default is the CPU's exact f32 reference numerics.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: super::backend::BackendKind,
    /// Weight precision on the CPU.
    #[arg(long, value_enum, default_value = "f32")]
    cpu_precision: super::backend::CpuPrecision,
    #[command(flatten)]
    gpu: super::backend::GpuArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let tokens = super::parse_ids(&args.tokens)?;
    anyhow::ensure!(!tokens.is_empty(), "--tokens is empty");
    let weights = ModelWeights::load(&args.model)?;
    let mut backend = super::backend::open(
        &weights,
        1,
        args.backend,
        args.gpu.with_cpu(args.cpu_precision),
    )?;
    if let Some(path) = &args.state_in {
        let file = Checkpoint::open(path)
            .with_context(|| format!("reading --state-in {}", path.display()))?;
        let state = State::from_tensors(&weights.config, file.tensors(), "state")
            .with_context(|| format!("--state-in {}", path.display()))?;
        backend.load_state(0, &state)?;
    }
    let logits = backend.forward(&[SeqStep {
        slot: 0,
        tokens: &tokens,
        output: OutputRows::All,
    }])?;
    let mut out: BTreeMap<String, Tensor> = backend.save_state(0)?.to_tensors("state");
    out.insert(
        "logits".into(),
        Tensor::from_f32(DType::F32, vec![tokens.len(), logits.vocab], &logits.data),
    );
    Checkpoint::save_safetensors(&out, &args.output)?;
    Ok(())
}
