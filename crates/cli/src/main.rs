//! `flash-moe`: run Mixture-of-Experts models larger than memory.

mod commands;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "flash-moe", version, about = "Run Mixture-of-Experts models larger than memory, streaming experts from disk")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of every position of a token sequence to a safetensors file.
    Logits(commands::logits::Args),
    /// Describe a model directory: family, dimensions, tensors and bytes.
    Inspect(commands::inspect::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(a) => commands::logits::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
