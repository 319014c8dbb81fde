use super::ModelArgs;
use anyhow::Result;
use moe_engine::tokenizer::Tokenizer;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

pub fn run(a: Args) -> Result<()> {
    let tokenizer = Tokenizer::from_dir(&a.model.model)?;
    let dir = a.model.model.canonicalize().unwrap_or_else(|_| a.model.model.clone());
    let model_id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let addr = if a.host.contains(':') { format!("[{}]:{}", a.host, a.port) } else { format!("{}:{}", a.host, a.port) };
    super::with_model!(a.model.load()?, m => {
        eprintln!("{}", moe_engine::model::describe(&m.config));
        moe_server::serve_blocking(&m, &tokenizer, &model_id, &addr)
    })
}
