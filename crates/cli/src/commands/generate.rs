use super::ModelArgs;
use super::sampling::{SamplingArgs, ThinkingArgs};
use anyhow::{Context, Result, bail};
use moe_core::sample::Sampler;
use moe_engine::chat_template::Message;
use moe_engine::generate::Conversation;
use moe_engine::tokenizer::Tokenizer;
use moe_engine::{Backend, Model};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt (otherwise --prompt-file, otherwise standard input).
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    #[arg(long, conflicts_with = "prompt")]
    prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// System prompt for --chat.
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[command(flatten)]
    thinking: ThinkingArgs,
    /// Print timing and expert statistics at the end.
    #[arg(long)]
    stats: bool,
}

pub fn run(a: Args) -> Result<()> {
    if !a.chat && a.thinking.enable_thinking().is_some() {
        bail!("--think and --no-think apply to --chat prompts");
    }
    let prompt = match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        (None, None) => {
            if std::io::stdin().is_terminal() {
                bail!("no prompt: pass --prompt TEXT, --prompt-file FILE or pipe it on standard input");
            }
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).context("reading the prompt from standard input")?;
            s
        }
    };
    if prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let tokenizer = Tokenizer::from_dir(&a.model.model)?;
    super::with_model!(a.model.load()?, m => generate(&a, &m, &tokenizer, &prompt))
}

fn generate<B: Backend>(a: &Args, model: &Model<B>, tokenizer: &Tokenizer, prompt: &str) -> Result<()> {
    let mut conv = Conversation::new(model, tokenizer);
    let ids = if a.chat {
        let mut msgs: Vec<Message> = a.system.iter().map(Message::system).collect();
        msgs.push(Message::user(prompt));
        conv.chat_prompt(&msgs, a.thinking.enable_thinking())?
    } else {
        print!("{prompt}");
        tokenizer.encode(prompt, false)?
    };
    let params = a.sampling.params();
    let mut sampler = Sampler::new(params.sampling.clone());
    let mut out = std::io::stdout().lock();
    let stats = conv.generate(&ids, &params, &mut sampler, &mut |piece| {
        out.write_all(piece.text.as_bytes()).and_then(|_| out.flush()).is_ok()
    })?;
    println!();
    if a.stats {
        super::print_stats(&stats, model);
    }
    Ok(())
}
