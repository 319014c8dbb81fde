//! `flash-moe`: run Mixture-of-Experts models larger than memory.

mod commands;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "flash-moe",
    version,
    about = "Run Mixture-of-Experts models larger than memory, streaming experts from disk"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write the logits of every position of a token sequence to a safetensors file.
    Logits(commands::logits::Args),
    /// Generate text from a prompt, streaming it as it is produced.
    Generate(commands::generate::Args),
    /// Chat with the model in the terminal; the conversation state is kept across turns.
    Chat(commands::chat::Args),
    /// Serve an OpenAI-compatible HTTP API (chat and text completions, streaming).
    Serve(commands::serve::Args),
    /// Measure decode speed against the machine's disk and memory bandwidth (the roofline).
    Bench(commands::bench::Args),
    /// Describe a model directory: family, dimensions, tensors and bytes.
    Inspect(commands::inspect::Args),
    /// Convert a Hugging Face, MLX or packed model into the packed format (docs/format.md).
    Convert(commands::convert::Args),
    /// Re-check every checksum of a packed model.
    Verify(commands::verify::Args),
    /// Write a packed model with a real model's shapes and random weights, for benchmarks.
    Synth(commands::synth::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Logits(a) => commands::logits::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Generate(a) => commands::generate::run(a),
        Command::Chat(a) => commands::chat::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Verify(a) => commands::verify::run(a),
        Command::Synth(a) => commands::synth::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the line already holds
/// (library errors often print their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}
