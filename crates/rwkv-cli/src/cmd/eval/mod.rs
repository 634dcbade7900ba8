//! `rwkv eval`: batched offline evaluation against a model in this process or a running cluster.
//!
//! Modules: `data` reads the benchmark files, `prompt` builds and tokenizes prompts, `scorer` is
//! the backend trait with its in-process and HTTP implementations, `journal` records results
//! for `--resume`, `report` and `progress` present them, and `mmlu` runs the sweep.

mod data;
mod journal;
mod mmlu;
mod progress;
mod prompt;
mod report;
mod scorer;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(clap::Subcommand)]
enum Task {
    /// MMLU multiple choice, prompted and scored as RWKV's reference script does; resumable.
    Mmlu(mmlu::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.task {
        Task::Mmlu(args) => mmlu::run(args),
    }
}
