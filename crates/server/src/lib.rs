//! An OpenAI-compatible HTTP API over the flash-moe engine.
//!
//! One engine thread owns the model and serves requests one at a time ([`run_engine`]); the
//! HTTP side ([`router`]) turns each request into a [`Job`], sends it over a channel, and streams
//! the pieces of text that come back on a per-request channel. A client that goes away drops its
//! receiver, the next piece fails to send, and generation stops.

mod api;

use anyhow::{Context, Result};
use moe_core::sample::{Sampler, SamplingParams};
use moe_engine::chat_template::Message;
use moe_engine::generate::{Conversation, GenerateParams, StopReason};
use moe_engine::tokenizer::Tokenizer;
use moe_engine::{Backend, Model};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use tokio::sync::mpsc::UnboundedSender;

pub use api::router;

/// What to generate from.
#[derive(Clone, Debug)]
pub enum Input {
    /// Messages rendered with the model's chat template (with the generation prompt).
    Chat { messages: Vec<Message>, enable_thinking: Option<bool> },
    /// Raw text.
    Text(String),
}

/// One request for the engine thread.
pub struct Job {
    pub input: Input,
    pub params: GenerateParams,
    /// Where the job's [`Event`]s go.
    pub reply: UnboundedSender<Event>,
}

/// What the engine sends back for a job: `Started` or `Error` first, then pieces, then `Done`
/// (or `Error`).
#[derive(Clone, Debug)]
pub enum Event {
    Started { prompt_tokens: usize },
    Piece { text: String, thinking: bool },
    Done { prompt_tokens: usize, completion_tokens: usize, finish_reason: &'static str },
    Error { message: String, client: bool },
}

/// The sending side of the engine's job queue, cloned into every request handler.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    counters: Arc<Counters>,
}

impl EngineHandle {
    /// Queues a job; false when the engine has stopped.
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }

    /// Jobs finished and tokens generated since the engine started (for `/health`).
    pub fn counts(&self) -> (u64, u64) {
        (self.counters.jobs.load(Ordering::Relaxed), self.counters.generated_tokens.load(Ordering::Relaxed))
    }
}

#[derive(Default)]
struct Counters {
    jobs: AtomicU64,
    generated_tokens: AtomicU64,
}

/// The engine's side of the job queue.
pub struct EngineQueue {
    jobs: mpsc::Receiver<Job>,
    counters: Arc<Counters>,
}

/// A job queue: the handle for the HTTP side, the queue for [`run_engine`].
pub fn engine_channel() -> (EngineHandle, EngineQueue) {
    let (tx, rx) = mpsc::channel();
    let counters = Arc::new(Counters::default());
    (EngineHandle { jobs: tx, counters: counters.clone() }, EngineQueue { jobs: rx, counters })
}

/// Serves jobs one at a time until every [`EngineHandle`] is dropped.
pub fn run_engine<B: Backend>(model: &Model<B>, tokenizer: &Tokenizer, queue: &EngineQueue) {
    while let Ok(job) = queue.jobs.recv() {
        let generated = run_job(model, tokenizer, job);
        queue.counters.generated_tokens.fetch_add(generated as u64, Ordering::Relaxed);
        queue.counters.jobs.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs one job; the number of tokens it generated.
fn run_job<B: Backend>(model: &Model<B>, tokenizer: &Tokenizer, job: Job) -> usize {
    let reply = job.reply;
    let fail = |message: String, client: bool| {
        let _ = reply.send(Event::Error { message, client });
    };
    let prompt = match encode(tokenizer, &job.input) {
        Ok(p) => p,
        Err(e) => {
            fail(e, true);
            return 0;
        }
    };
    let context = model.config.max_positions;
    if prompt.is_empty() {
        fail("the prompt is empty".into(), true);
        return 0;
    }
    if prompt.len() >= context {
        fail(format!("the prompt is {} tokens long but the model's context holds {context}", prompt.len()), true);
        return 0;
    }
    if reply.send(Event::Started { prompt_tokens: prompt.len() }).is_err() {
        return 0;
    }
    let mut conv = Conversation::new(model, tokenizer);
    let mut sampler = Sampler::new(job.params.sampling.clone());
    let result = conv.generate(&prompt, &job.params, &mut sampler, &mut |piece| {
        reply.send(Event::Piece { text: piece.text.to_string(), thinking: piece.thinking }).is_ok()
    });
    match result {
        Ok(stats) => {
            let finish_reason = match stats.stop {
                StopReason::MaxTokens | StopReason::ContextFull => "length",
                _ => "stop",
            };
            // The end-of-text token is sampled but not part of the reply.
            let completion_tokens = if stats.stop == StopReason::EndOfText {
                stats.generated_tokens.saturating_sub(1)
            } else {
                stats.generated_tokens
            };
            let _ = reply.send(Event::Done { prompt_tokens: prompt.len(), completion_tokens, finish_reason });
            stats.generated_tokens
        }
        Err(e) => {
            fail(format!("generation failed: {e:#}"), false);
            0
        }
    }
}

/// The prompt's tokens, or a message for the client.
fn encode(tokenizer: &Tokenizer, input: &Input) -> std::result::Result<Vec<u32>, String> {
    match input {
        Input::Chat { messages, enable_thinking } => {
            let template = tokenizer.chat_template().map_err(|e| format!("{e:#}"))?;
            let text = template
                .render(messages, None, true, *enable_thinking)
                .map_err(|e| format!("the chat template failed to render: {e:#}"))?;
            tokenizer.encode(&text, false).map_err(|e| format!("{e:#}"))
        }
        Input::Text(text) => tokenizer.encode(text, false).map_err(|e| format!("{e:#}")),
    }
}

/// Default sampling when a request names no field: OpenAI's (temperature 1, no filters).
pub fn default_sampling() -> SamplingParams {
    SamplingParams { temperature: 1.0, ..SamplingParams::default() }
}

/// Serves the API on `addr` until Ctrl-C, running the engine on the calling thread (so the model
/// need not be `Send`).
pub fn serve_blocking<B: Backend>(model: &Model<B>, tokenizer: &Tokenizer, model_id: &str, addr: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| format!("binding {addr}"))?;
    eprintln!("serving {model_id} on http://{}/v1 (Ctrl-C to stop)", listener.local_addr()?);
    let (handle, jobs) = engine_channel();
    let app = router(handle, model_id.to_string());
    let server = std::thread::spawn(move || {
        rt.block_on(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await
        })
    });
    run_engine(model, tokenizer, &jobs);
    match server.join() {
        Ok(r) => r.context("serving HTTP"),
        Err(_) => anyhow::bail!("the HTTP server panicked"),
    }
}
