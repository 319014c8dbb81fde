pub mod chat;
pub mod convert;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod sampling;
pub mod synth;
pub mod verify;

use clap::Args as ClapArgs;
use moe_engine::generate::GenerateStats;
use std::path::PathBuf;

/// The model to run, shared by every command that runs one.
#[derive(ClapArgs, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory: a Hugging Face checkpoint or a packed flash-moe model
    /// (default: the demo model shipped in models/demo).
    #[arg(long, default_value_os_t = default_model())]
    pub model: PathBuf,
    /// Routed experts per token (default: the model's own top-k).
    #[arg(long)]
    pub experts_per_token: Option<usize>,
}

impl ModelArgs {
    pub fn load(&self) -> anyhow::Result<moe_engine::Model<moe_engine::CpuBackend>> {
        moe_engine::load(&self.model, self.experts_per_token, moe_engine::CpuBackend)
    }
}

/// `models/demo` under the working directory, or beside the binary's checkout
/// (`target/release/flash-moe` -> `models/demo`), so `cargo run` works from anywhere in the repo.
fn default_model() -> PathBuf {
    let rel = PathBuf::from("models/demo");
    if rel.is_dir() {
        return rel;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().map(|d| d.join("models/demo")).find(|d| d.is_dir()))
        .unwrap_or(rel)
}

pub fn print_stats<B: moe_engine::Backend>(s: &GenerateStats, model: &moe_engine::Model<B>) {
    eprintln!(
        "[{} prompt tokens in {:.2}s ({:.1} tok/s), first token after {:.2}s, {} generated at {:.2} tok/s, stop: {:?}; backend {}]",
        s.prompt_tokens,
        s.prefill.as_secs_f64(),
        s.prefill_tok_s(),
        s.time_to_first_token.as_secs_f64(),
        s.generated_tokens,
        s.decode_tok_s(),
        s.stop,
        model.backend().name()
    );
}
