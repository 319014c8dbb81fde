use super::ModelArgs;
use super::sampling::{SamplingArgs, ThinkingArgs};
use anyhow::{Result, bail};
use moe_core::sample::Sampler;
use moe_engine::chat_template::Message;
use moe_engine::generate::Conversation;
use moe_engine::tokenizer::Tokenizer;
use moe_engine::{Backend, Model};
use std::io::{BufRead, IsTerminal, Write};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// System prompt for the conversation.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    thinking: ThinkingArgs,
    /// Hide the thinking instead of showing it dimmed.
    #[arg(long)]
    hide_thinking: bool,
    /// Print statistics after every reply.
    #[arg(long)]
    stats: bool,
}

const HELP: &str = "commands: /reset (new conversation), /system TEXT (set the system prompt and reset), /stats, /quit";

/// Lines typed by the user: a line editor with history on a terminal, plain lines otherwise.
enum Input {
    Editor(Box<rustyline::DefaultEditor>),
    Plain(std::io::StdinLock<'static>),
}

impl Input {
    fn open() -> Result<Self> {
        if std::io::stdin().is_terminal() {
            Ok(Input::Editor(Box::new(rustyline::DefaultEditor::new()?)))
        } else {
            Ok(Input::Plain(std::io::stdin().lock()))
        }
    }

    fn line(&mut self) -> Result<Option<String>> {
        match self {
            Input::Editor(ed) => match ed.readline("> ") {
                Ok(l) => {
                    let _ = ed.add_history_entry(l.as_str());
                    Ok(Some(l))
                }
                Err(rustyline::error::ReadlineError::Interrupted | rustyline::error::ReadlineError::Eof) => Ok(None),
                Err(e) => Err(e.into()),
            },
            Input::Plain(stdin) => {
                let mut l = String::new();
                Ok(if stdin.read_line(&mut l)? == 0 {
                    None
                } else {
                    Some(l.trim_end_matches(['\n', '\r']).to_string())
                })
            }
        }
    }
}

pub fn run(a: Args) -> Result<()> {
    let tokenizer = Tokenizer::from_dir(&a.model.model)?;
    if tokenizer.chat_template_source().is_none() {
        bail!("{} has no chat template (tokenizer_config.json or chat_template.jinja)", a.model.model.display());
    }
    super::with_model!(a.model.load()?, m => chat(&a, &m, &tokenizer))
}

fn chat<B: Backend>(a: &Args, model: &Model<B>, tokenizer: &Tokenizer) -> Result<()> {
    let mut conv = Conversation::new(model, tokenizer);
    let params = a.sampling.params();
    let mut sampler = Sampler::new(params.sampling.clone());
    let thinking = a.thinking.enable_thinking();
    let mut system = a.system.clone();
    let mut last = None;
    let mut input = Input::open()?;
    let tty = std::io::stdout().is_terminal();
    eprintln!("{} -- {HELP}", moe_engine::model::describe(&model.config));
    while let Some(line) = input.line()? {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
            match name {
                "reset" => {
                    conv.reset();
                    eprintln!("(new conversation)");
                }
                "system" => {
                    system = (!rest.trim().is_empty()).then(|| rest.trim().to_string());
                    conv.reset();
                    eprintln!("(system prompt set; new conversation)");
                }
                "stats" => match &last {
                    Some(s) => super::print_stats(s, model),
                    None => eprintln!("(nothing generated yet)"),
                },
                "quit" | "exit" => break,
                _ => eprintln!("unknown command /{name}; {HELP}"),
            }
            continue;
        }
        let mut msgs = Vec::new();
        if conv.tokens().is_empty()
            && let Some(s) = &system
        {
            msgs.push(Message::system(s.as_str()));
        }
        msgs.push(Message::user(line));
        let prompt = conv.chat_prompt(&msgs, thinking)?;
        let mut out = std::io::stdout().lock();
        let stats = conv.generate(&prompt, &params, &mut sampler, &mut |piece| {
            let r = match (piece.thinking, a.hide_thinking, tty) {
                (true, true, _) => Ok(()),
                (true, false, true) => write!(out, "\x1b[2m{}\x1b[0m", piece.text),
                _ => write!(out, "{}", piece.text),
            };
            r.and_then(|_| out.flush()).is_ok()
        });
        println!();
        let stats = stats?;
        if a.stats {
            super::print_stats(&stats, model);
        }
        last = Some(stats);
    }
    Ok(())
}
