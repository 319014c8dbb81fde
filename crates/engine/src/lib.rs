//! The model layer of flash-moe: the [`backend::Backend`] trait, its CPU implementation, and the
//! Qwen MoE model math written once against it.

pub mod backend;
pub mod chat_template;
pub mod cpu_backend;
pub mod cuda_backend;
pub mod generate;
pub mod model;
pub mod tokenizer;

pub use backend::Backend;
pub use cpu_backend::CpuBackend;
pub use model::{Model, Output, Session};

use anyhow::Result;
use std::path::Path;

/// Opens a model directory and loads it on `backend`, optionally overriding the experts per token.
pub fn load<B: Backend>(dir: &Path, experts_per_token: Option<usize>, backend: B) -> Result<Model<B>> {
    load_with(dir, experts_per_token, &moe_store::StoreOptions::default(), backend)
}

/// [`load`] with the expert store set up by `store`.
pub fn load_with<B: Backend>(
    dir: &Path,
    experts_per_token: Option<usize>,
    store: &moe_store::StoreOptions,
    backend: B,
) -> Result<Model<B>> {
    let files = moe_store::open_with(dir, store)?;
    let mut config = files.config.clone();
    if let Some(k) = experts_per_token {
        config = config.with_top_k(k)?;
    }
    Model::load(&files, config, backend)
}
