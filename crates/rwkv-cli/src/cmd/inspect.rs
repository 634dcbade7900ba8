//! `rwkv inspect`: what the loader inferred from a checkpoint.

use std::path::PathBuf;

use rwkv_model::ModelWeights;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint (.pth or .safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Loading all weights (not only the config) validates every tensor's presence and shape.
    let weights = ModelWeights::load(&args.model)?;
    let c = &weights.config;
    let info = serde_json::json!({
        "path": args.model.display().to_string(),
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "head_size": c.head_size,
        "dim_ffn": c.dim_ffn,
        "vocab_size": c.vocab_size,
        "maa_lora": c.maa_lora,
        "decay_lora": c.decay_lora,
        "weight_dtype": c.weight_dtype.to_string(),
        "time_state": c.has_time_state,
        "params": c.param_count(),
        "state_bytes": c.state_bytes(),
    });
    if args.json {
        println!("{info}");
        return Ok(());
    }
    println!("model        {}", args.model.display());
    println!("n_embd (C)   {}", c.n_embd);
    println!("n_layer (L)  {}", c.n_layer);
    println!("heads (H)    {} x head size {}", c.n_head, c.head_size);
    println!("dim_ffn (F)  {}", c.dim_ffn);
    println!("vocab (V)    {}", c.vocab_size);
    println!("LoRA ranks   maa {} / decay {}", c.maa_lora, c.decay_lora);
    println!("weights      {}", c.weight_dtype);
    println!(
        "time_state   {}",
        if c.has_time_state {
            "yes (state-tuned)"
        } else {
            "no"
        }
    );
    println!(
        "parameters   {} ({:.1} M)",
        c.param_count(),
        c.param_count() as f64 / 1e6
    );
    println!("state        {} bytes per sequence (f32)", c.state_bytes());
    Ok(())
}
