use super::convert::{progress_bar, refuse_existing, summary};
use anyhow::{Context, Result};
use moe_store::{DenseFormat, ExpertFormat, SynthShape};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// The model whose shapes to use: qwen3.5-397b, qwen3.5-122b, qwen3.5-35b, qwen3-next-80b or
    /// qwen3-30b.
    #[arg(long)]
    shape: SynthShape,
    /// Layers to write (the real models have 40 to 60; any number runs).
    #[arg(long)]
    layers: usize,
    /// Routed experts: q4 or q2 (q8 and bf16 work too).
    #[arg(long, default_value = "q4")]
    experts: ExpertFormat,
    /// Dense weight matrices: q8 or bf16.
    #[arg(long, default_value = "q8")]
    dense: DenseFormat,
    /// The packed directory to write (refused if it exists, unless --force).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Vocabulary size instead of the model's (a small one makes a small test model).
    #[arg(long)]
    vocab: Option<usize>,
    /// Replace an existing destination, once the new model is complete.
    #[arg(long)]
    force: bool,
}

/// Writes a packed model with the real per-layer shapes and random weights, for benchmarks.
pub fn run(a: Args) -> Result<()> {
    refuse_existing(&a.out, a.force)?;
    let mut shape = a.shape.clone();
    if let Some(v) = a.vocab {
        shape.vocab = v;
    }
    eprintln!(
        "writing a synthetic {} ({} of {} layers, random weights, seed {}) to {}: experts {}, dense {}",
        shape.name,
        a.layers,
        shape.layers,
        a.seed,
        a.out.display(),
        a.experts.name(),
        a.dense.name()
    );
    let start = Instant::now();
    let (bar, mut progress) = progress_bar();
    let result =
        moe_store::write_synthetic(&shape, a.layers, a.experts, a.dense, &a.out, a.seed, a.force, &mut progress);
    bar.finish_and_clear();
    result.with_context(|| format!("writing {}", a.out.display()))?;
    summary(&a.out, start)
}
