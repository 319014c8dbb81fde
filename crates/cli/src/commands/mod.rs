pub mod inspect;
pub mod logits;

use clap::Args as ClapArgs;
use std::path::PathBuf;

/// The model to run, shared by every command that runs one.
#[derive(ClapArgs, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory: a Hugging Face checkpoint or a packed flash-moe model.
    #[arg(long, default_value = "models/demo")]
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
