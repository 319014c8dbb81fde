use super::ModelArgs;
use anyhow::{Context, Result, bail};
use moe_engine::{Backend, Model};
use safetensors::{Dtype, tensor::TensorView};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    tokens: Vec<u32>,
    /// Output safetensors file; receives one f32 tensor `logits` of shape [tokens, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Feed the tokens one at a time (the decode path) instead of as one batch (prefill).
    #[arg(long)]
    decode: bool,
    /// Print the expert store's statistics at the end.
    #[arg(long)]
    stats: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.tokens.is_empty() {
        bail!("--tokens is empty");
    }
    super::with_model!(a.model.load()?, m => write_logits(&a, &m))
}

fn write_logits<B: Backend>(a: &Args, model: &Model<B>) -> Result<()> {
    let mut session = model.new_session();
    let logits: Vec<f32> = if a.decode {
        let mut all = Vec::with_capacity(a.tokens.len() * model.config.vocab);
        for &t in &a.tokens {
            all.extend(model.forward(&mut session, &[t], true, false)?.logits);
        }
        all
    } else {
        model.forward(&mut session, &a.tokens, true, false)?.logits
    };
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![a.tokens.len(), model.config.vocab], &bytes)?;
    safetensors::serialize_to_file([("logits", view)], None, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    if a.stats {
        eprintln!("{}", super::store_stats(model));
    }
    Ok(())
}
