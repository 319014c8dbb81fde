use clap::Args;
use moe_core::sample::SamplingParams;
use moe_engine::generate::GenerateParams;

/// Sampling and stopping flags shared by `generate` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Keep only the K most likely tokens (0: off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches P.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Divide the logits of tokens already seen by this factor (1: off).
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Random seed; the same seed and flags give the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Greedy decoding (same as --temperature 0).
    #[arg(long)]
    pub greedy: bool,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    pub fn params(&self) -> GenerateParams {
        let sampling = SamplingParams {
            temperature: if self.greedy { 0.0 } else { self.temperature },
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
        };
        GenerateParams { max_tokens: self.max_tokens, sampling, stop: self.stop.clone() }
    }
}

/// Qwen3.5's reasoning switch, shared by `generate --chat` and `chat`.
#[derive(Args, Clone, Debug)]
pub struct ThinkingArgs {
    /// Let the model think before answering (Qwen3.5 templates; otherwise the template's default).
    #[arg(long, conflicts_with = "no_think")]
    pub think: bool,
    /// Answer without thinking.
    #[arg(long)]
    pub no_think: bool,
}

impl ThinkingArgs {
    /// The template's `enable_thinking`: `None` leaves the template's default.
    pub fn enable_thinking(&self) -> Option<bool> {
        match (self.think, self.no_think) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}
