//! The generation loop: prefill a prompt, sample token by token, stream text, stop on the
//! model's end-of-turn ids, user stop strings or a token limit. A [`Conversation`] keeps the
//! session across turns so earlier turns are never processed again.

use crate::chat_template::Message;
use crate::tokenizer::Tokenizer;
use crate::{Backend, Model, Session};
use anyhow::{Result, bail};
use moe_core::sample::{Sampler, SamplingParams};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams { max_tokens: 256, sampling: SamplingParams::default(), stop: Vec::new() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    EndOfText,
    StopString,
    MaxTokens,
    /// The consumer of the text asked to stop (a closed connection, say).
    Cancelled,
    ContextFull,
}

/// What one call of [`Conversation::generate`] did.
#[derive(Clone, Debug)]
pub struct GenerateStats {
    /// Tokens of the prompt that were processed (not those already in the session).
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill: Duration,
    pub time_to_first_token: Duration,
    pub decode: Duration,
    pub stop: StopReason,
}

impl GenerateStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    /// Decode speed over the tokens after the first (the first comes out of the prefill).
    pub fn decode_tok_s(&self) -> f64 {
        self.generated_tokens.saturating_sub(1) as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// A piece of streamed output.
pub struct Piece<'a> {
    pub text: &'a str,
    /// Inside a `<think>` block.
    pub thinking: bool,
}

/// A model, its tokenizer and one running session.
pub struct Conversation<'m, B: Backend> {
    pub model: &'m Model<B>,
    pub tokenizer: &'m Tokenizer,
    session: Session<B>,
    /// Every token the session has processed, in order (the penalties look at them).
    history: Vec<u32>,
    think: Option<(u32, u32)>,
    /// Text that closes an assistant turn in this template (`<|im_end|>\n` for ChatML).
    turn_end: Option<String>,
    turns: usize,
}

impl<'m, B: Backend> Conversation<'m, B> {
    pub fn new(model: &'m Model<B>, tokenizer: &'m Tokenizer) -> Self {
        let think = tokenizer.token_to_id("<think>").zip(tokenizer.token_to_id("</think>"));
        let turn_end = tokenizer.chat_template().ok().and_then(|t| {
            let msgs = [Message::user("\u{1}"), Message::assistant("\u{2}")];
            let text = t.render(&msgs, None, false, Some(false)).ok()?;
            Some(text[text.rfind('\u{2}')? + 1..].to_string())
        });
        Conversation { session: model.new_session(), model, tokenizer, history: Vec::new(), think, turn_end, turns: 0 }
    }

    /// Forgets everything: the next turn starts a new conversation.
    pub fn reset(&mut self) {
        self.session = self.model.new_session();
        self.history.clear();
        self.turns = 0;
    }

    pub fn tokens(&self) -> &[u32] {
        &self.history
    }

    /// Tokens that continue the conversation with `messages` (the new messages of this turn) and
    /// open the assistant's reply. The first turn renders them whole (with the system prompt);
    /// later turns close the previous reply and render only the new messages, so that the
    /// session's earlier tokens stay as they are.
    pub fn chat_prompt(&self, messages: &[Message], enable_thinking: Option<bool>) -> Result<Vec<u32>> {
        let template = self.tokenizer.chat_template()?;
        let mut text = String::new();
        if self.turns > 0 {
            match &self.turn_end {
                Some(end) => text.push_str(end),
                None => bail!("this chat template has no recognisable end of turn; start a new conversation"),
            }
        }
        text.push_str(&template.render(messages, None, true, enable_thinking)?);
        Ok(self.tokenizer.encode(&text, false)?)
    }

    /// Processes `prompt` (appended to the session) and generates a reply, streaming text to
    /// `on_piece`, which returns false to stop early.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        sampler: &mut Sampler,
        on_piece: &mut dyn FnMut(Piece<'_>) -> bool,
    ) -> Result<GenerateStats> {
        if prompt.is_empty() {
            bail!("the prompt is empty");
        }
        let context = self.model.config.max_positions;
        if self.session.position + prompt.len() > context {
            bail!(
                "the prompt needs {} positions but the context holds {context}",
                self.session.position + prompt.len()
            );
        }
        let start = Instant::now();
        // The next token's logits, or (greedy without penalties) the token itself, chosen by the
        // backend where the logits are.
        let mut next = Next::Logits(self.model.forward(&mut self.session, prompt, false, false)?.logits);
        self.history.extend_from_slice(prompt);
        let prefill = start.elapsed();
        self.turns += 1;

        let mut detok = self.tokenizer.detokenizer(false);
        let mut stops = StopMatcher::new(&params.stop);
        let mut thinking = self
            .history
            .iter()
            .rev()
            .find_map(|&t| {
                self.think.and_then(|(open, close)| (t == open).then_some(true).or((t == close).then_some(false)))
            })
            .unwrap_or(false);
        let (mut generated, mut first, decode_start) = (0, Duration::ZERO, Instant::now());
        let stop = loop {
            if generated >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            let token = match &mut next {
                Next::Logits(logits) => sampler.sample(logits, &self.history),
                Next::Token(token) => *token,
            };
            generated += 1;
            if generated == 1 {
                first = start.elapsed();
            }
            if self.tokenizer.is_eos(token) {
                break StopReason::EndOfText;
            }
            let mut text = detok.push(token);
            if let Some((open, close)) = self.think
                && (token == open || token == close)
            {
                let before = std::mem::take(&mut text);
                if !before.is_empty() && !on_piece(Piece { text: &before, thinking }) {
                    break StopReason::Cancelled;
                }
                thinking = token == open;
            }
            let (emit, hit) = stops.push(&text);
            if !emit.is_empty() && !on_piece(Piece { text: &emit, thinking }) {
                break StopReason::Cancelled;
            }
            if hit {
                break StopReason::StopString;
            }
            if self.session.position >= context {
                break StopReason::ContextFull;
            }
            next = if sampler.is_argmax() {
                Next::Token(self.model.forward_greedy(&mut self.session, token)?)
            } else {
                Next::Logits(self.model.forward(&mut self.session, &[token], false, false)?.logits)
            };
            self.history.push(token);
        };
        self.model.settle(&mut self.session)?;
        if !matches!(stop, StopReason::StopString | StopReason::Cancelled) {
            let rest = stops.finish(&detok.finish());
            if !rest.is_empty() {
                on_piece(Piece { text: &rest, thinking });
            }
        }
        Ok(GenerateStats {
            prompt_tokens: prompt.len(),
            generated_tokens: generated,
            prefill,
            time_to_first_token: first,
            decode: decode_start.elapsed(),
            stop,
        })
    }
}

/// Finds user stop strings in streamed text, holding back just enough text that a stop string
/// split across tokens is never half-printed.
struct StopMatcher<'a> {
    stops: &'a [String],
    pending: String,
    hold: usize,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        let hold = stops.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
        StopMatcher { stops, pending: String::new(), hold }
    }

    /// Adds text; returns what may be printed now and whether a stop string was reached.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min() {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let mut cut = self.pending.len().saturating_sub(self.hold);
        while !self.pending.is_char_boundary(cut) {
            cut -= 1;
        }
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    fn finish(&mut self, text: &str) -> String {
        self.pending.push_str(text);
        std::mem::take(&mut self.pending)
    }
}

/// What a decode step hands the sampler.
enum Next {
    Logits(Vec<f32>),
    Token(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_string_split_over_pieces_is_never_printed() {
        let stops = vec!["STOP".to_string()];
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        let mut hit = false;
        for piece in ["Hello S", "TO", "P and more"] {
            let (text, h) = m.push(piece);
            out.push_str(&text);
            hit |= h;
            if h {
                break;
            }
        }
        assert!(hit);
        assert_eq!(out, "Hello ");
    }

    #[test]
    fn text_without_stops_passes_through() {
        let stops = vec!["zz".to_string()];
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for piece in ["é", "a", "b"] {
            out.push_str(&m.push(piece).0);
        }
        out.push_str(&m.finish(""));
        assert_eq!(out, "éab");
    }
}
