//! Hugging Face tokenizer loading: `tokenizer.json` (through the `tokenizers` crate, pure-Rust
//! `fancy-regex` build), special tokens and the chat template from `tokenizer_config.json` /
//! `chat_template.jinja`, stop ids from `generation_config.json`, plus an incremental
//! detokeniser for streaming output.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::chat_template::{ChatTemplate, ChatTemplateError};

/// Errors of [`Tokenizer`]. Every message is one line and names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer file not found: {}", .0.display())]
    Missing(PathBuf),
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {}: {message}", .path.display())]
    Parse { path: PathBuf, message: String },
    #[error("encode failed: {0}")]
    Encode(String),
    #[error("decode failed: {0}")]
    Decode(String),
    #[error("no chat template in {} (tokenizer_config.json `chat_template` or chat_template.jinja)", .0.display())]
    NoChatTemplate(PathBuf),
    #[error(transparent)]
    ChatTemplate(#[from] ChatTemplateError),
}

type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// A loaded tokenizer with the model's special tokens, stop ids and chat template source.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    eos_token_ids: Vec<u32>,
    chat_template: Option<String>,
    named_chat_templates: Vec<(String, String)>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(TokenizerError::Io { path: path.to_owned(), source }),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Parse { path: path.to_owned(), message: e.to_string() })
}

/// A special token in `tokenizer_config.json`: a string, or the older `{"content": ...}` form.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

impl Tokenizer {
    /// Loads `tokenizer.json` (required), `tokenizer_config.json`, `chat_template.jinja` and
    /// `generation_config.json` (all optional) from a model directory.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(TokenizerError::Missing(tok_path));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| TokenizerError::Parse { path: tok_path.clone(), message: e.to_string() })?;

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?.unwrap_or(Value::Null);
        if !cfg.is_null() && !cfg.is_object() {
            return Err(TokenizerError::Parse { path: cfg_path, message: "expected a JSON object".into() });
        }
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let pad_token = token_string(cfg.get("pad_token"));

        // Chat template: chat_template.jinja wins; else tokenizer_config.json's `chat_template`,
        // a string or a list of {"name", "template"} (the one named "default" is used).
        let mut chat_template = None;
        let mut named_chat_templates = Vec::new();
        match cfg.get("chat_template") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => chat_template = Some(s.clone()),
            Some(Value::Array(list)) => {
                for item in list {
                    let name = item.get("name").and_then(Value::as_str);
                    let template = item.get("template").and_then(Value::as_str);
                    match (name, template) {
                        (Some(n), Some(t)) => named_chat_templates.push((n.to_owned(), t.to_owned())),
                        _ => {
                            return Err(TokenizerError::Parse {
                                path: cfg_path,
                                message: "chat_template list items need string `name` and `template`".into(),
                            });
                        }
                    }
                }
                chat_template = named_chat_templates.iter().find(|(n, _)| n == "default").map(|(_, t)| t.clone());
            }
            Some(_) => {
                return Err(TokenizerError::Parse {
                    path: cfg_path,
                    message: "`chat_template` must be a string or a list of named templates".into(),
                });
            }
        }
        let jinja_path = dir.join("chat_template.jinja");
        match fs::read_to_string(&jinja_path) {
            Ok(t) => chat_template = Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(TokenizerError::Io { path: jinja_path, source }),
        }

        // Stop ids: generation_config.json's eos_token_id (int or list), then the tokenizer's
        // eos_token, then <|im_end|>.
        let mut eos_token_ids = Vec::new();
        let gen_path = dir.join("generation_config.json");
        if let Some(gen_cfg) = read_json(&gen_path)? {
            let bad = || TokenizerError::Parse {
                path: gen_path.clone(),
                message: "`eos_token_id` must be an integer or a list of integers".into(),
            };
            match gen_cfg.get("eos_token_id") {
                None | Some(Value::Null) => {}
                Some(Value::Array(list)) => {
                    for v in list {
                        let id = v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad)?;
                        push_unique(&mut eos_token_ids, id);
                    }
                }
                Some(v) => {
                    push_unique(&mut eos_token_ids, v.as_u64().and_then(|x| u32::try_from(x).ok()).ok_or_else(bad)?)
                }
            }
        }
        for tok in eos_token.as_deref().into_iter().chain(["<|im_end|>"]) {
            if let Some(id) = inner.token_to_id(tok) {
                push_unique(&mut eos_token_ids, id);
            }
        }

        Ok(Self {
            inner,
            dir: dir.to_owned(),
            bos_token,
            eos_token,
            pad_token,
            eos_token_ids,
            chat_template,
            named_chat_templates,
        })
    }

    /// Token ids of `text`. Added tokens (`<|im_start|>`, ...) written in the text are recognised;
    /// `add_special_tokens` runs the post-processor (Qwen's adds nothing).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// Text of `ids`; invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// An incremental detokeniser over this tokenizer.
    pub fn detokenizer(&self, skip_special_tokens: bool) -> Detokenizer<'_> {
        Detokenizer::new(self, skip_special_tokens)
    }

    /// Vocabulary size including added tokens (may be below the model's padded embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Ids that end generation: `generation_config.json` `eos_token_id`, the tokenizer's
    /// `eos_token` and `<|im_end|>`, deduplicated, in that order.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// Source of the default chat template, if the model has one.
    pub fn chat_template_source(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Named templates from the list form of `chat_template` (e.g. `default`, `tool_use`).
    pub fn named_chat_templates(&self) -> &[(String, String)] {
        &self.named_chat_templates
    }

    /// The default chat template, compiled, with this tokenizer's bos/eos tokens.
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        let source = self.chat_template.as_deref().ok_or_else(|| TokenizerError::NoChatTemplate(self.dir.clone()))?;
        Ok(ChatTemplate::new(source)?.with_special_tokens(self.bos_token.clone(), self.eos_token.clone()))
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Streaming detokeniser: feed ids one by one, get the text they complete.
///
/// It decodes a small window of pending ids (the last emitted token for context plus the new
/// ones) and emits the part past what was already emitted, holding text back while it ends in
/// U+FFFD (an incomplete UTF-8 sequence, e.g. half of a CJK character or emoji split over byte-level
/// BPE tokens). The concatenation of every [`push`](Self::push) plus [`finish`](Self::finish)
/// equals [`Tokenizer::decode`] of all ids.
pub struct Detokenizer<'t> {
    tokenizer: &'t Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Start of the context window (already emitted tokens kept for context).
    prefix_offset: usize,
    /// End of what has been emitted.
    read_offset: usize,
}

impl<'t> Detokenizer<'t> {
    pub fn new(tokenizer: &'t Tokenizer, skip_special_tokens: bool) -> Self {
        Self { tokenizer, skip_special_tokens, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    fn decode(&self, ids: &[u32]) -> String {
        // Decoding known ids cannot fail for byte-level BPE; unknown ids decode to nothing.
        self.tokenizer.decode(ids, self.skip_special_tokens).unwrap_or_default()
    }

    /// Adds one id; returns the newly completed text (often empty while a character is incomplete).
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let text = self.decode(&self.ids[self.prefix_offset..]);
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') {
            return String::new();
        }
        let new = match text.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            // The window decoded differently with more context (not the case for byte-level BPE):
            // emit from the first char boundary past the old prefix length.
            None => {
                let mut at = prefix.len();
                while !text.is_char_boundary(at) {
                    at += 1;
                }
                text[at..].to_owned()
            }
        };
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Keep only the context window.
        if self.prefix_offset > 0 {
            self.ids.drain(..self.prefix_offset);
            self.read_offset -= self.prefix_offset;
            self.prefix_offset = 0;
        }
        new
    }

    /// Text still held back (an incomplete character at the end), decoded as is (with U+FFFD).
    /// Call once generation stops.
    pub fn finish(&mut self) -> String {
        if self.read_offset == self.ids.len() {
            return String::new();
        }
        let prefix = self.decode(&self.ids[self.prefix_offset..self.read_offset]);
        let text = self.decode(&self.ids[self.prefix_offset..]);
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        match text.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_owned(),
            None => text.get(prefix.len()..).unwrap_or_default().to_owned(),
        }
    }

    /// Ids pushed since the last emitted text (the held-back tail).
    pub fn pending(&self) -> &[u32] {
        &self.ids[self.read_offset..]
    }
}
