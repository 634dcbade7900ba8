//! `rwkv`: the developer and operator tool of the RWKV-6 serving system.
//!
//! Subcommands are files under `cmd/`. The interfaces of `forward`, `tokenize` and `detokenize`
//! are relied on by other tools and must not change.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "rwkv", version, about = "RWKV-6 inference and serving tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible HTTP API with an in-process worker (CUDA if present, else CPU).
    Serve(cmd::serve::Args),
    /// Run a worker: one model on this machine's devices, registered in etcd.
    Worker(cmd::worker::Args),
    /// Run a router: the HTTP API in front of the workers registered in etcd.
    Router(cmd::router::Args),
    /// Run tokens through a model; write all logits and the final state to a safetensors file.
    Forward(cmd::forward::Args),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(cmd::generate::Args),
    /// Print token ids of a text (or of raw bytes given as hex) as a JSON array.
    Tokenize(cmd::tokenize::TokenizeArgs),
    /// Print the text (or its bytes as hex) of comma-separated token ids.
    Detokenize(cmd::tokenize::DetokenizeArgs),
    /// Print a checkpoint's inferred configuration, parameter count and state size.
    Inspect(cmd::inspect::Args),
    /// Measure prefill and decode throughput of the CPU backend, or write a random-weight model;
    /// `bench serve` load-tests an HTTP endpoint.
    Bench(cmd::bench::Args),
    /// Batched offline evaluation (MMLU), in process or through a cluster; resumable.
    Eval(cmd::eval::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => cmd::serve::run(args),
        Command::Worker(args) => cmd::worker::run(args),
        Command::Router(args) => cmd::router::run(args),
        Command::Forward(args) => cmd::forward::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Tokenize(args) => cmd::tokenize::run_tokenize(args),
        Command::Detokenize(args) => cmd::tokenize::run_detokenize(args),
        Command::Inspect(args) => cmd::inspect::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Eval(args) => cmd::eval::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
