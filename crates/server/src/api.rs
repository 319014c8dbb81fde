//! The HTTP routes: request parsing, validation, and the OpenAI response shapes.

use crate::{EngineHandle, Event, Input, Job, default_sampling};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use moe_engine::chat_template::Message;
use moe_engine::generate::GenerateParams;
use serde::Deserialize;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

struct AppState {
    engine: EngineHandle,
    model_id: String,
    created: u64,
    next_id: AtomicU64,
}

type Shared = Arc<AppState>;

/// The API's routes over an engine that serves `model_id`.
pub fn router(engine: EngineHandle, model_id: String) -> Router {
    let state = Arc::new(AppState { engine, model_id, created: now(), next_id: AtomicU64::new(1) });
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// ---- errors ----------------------------------------------------------------------------------

struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
    fn server(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into() }
    }
    fn body(&self) -> Value {
        let kind = if self.status.is_client_error() { "invalid_request_error" } else { "server_error" };
        json!({"error": {"message": self.message, "type": kind, "param": null, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

// ---- requests --------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Fields shared by both endpoints.
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Value>,
}

#[derive(Deserialize, Default)]
struct TemplateKwargs {
    #[serde(default)]
    enable_thinking: Option<bool>,
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    chat_template_kwargs: Option<TemplateKwargs>,
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Option<Value>,
}

/// Parses a JSON body into `T`, or a 400 in the OpenAI error shape.
fn parse<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    T::deserialize(body).map_err(|e| ApiError::bad(format!("invalid request: {e}")))
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON body: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the request body must be a JSON object"));
    }
    Ok(v)
}

impl Common {
    fn params(&self) -> Result<GenerateParams, ApiError> {
        let mut s = default_sampling();
        if let Some(t) = self.temperature {
            if !t.is_finite() || t < 0.0 {
                return Err(ApiError::bad("temperature must be a number >= 0"));
            }
            s.temperature = t;
        }
        if let Some(p) = self.top_p {
            if p.is_nan() || p <= 0.0 || p > 1.0 {
                return Err(ApiError::bad("top_p must be in (0, 1]"));
            }
            s.top_p = p;
        }
        if let Some(k) = self.top_k {
            // -1 and 0 both mean "off" (vLLM uses -1).
            s.top_k = usize::try_from(k).unwrap_or(0);
        }
        if let Some(p) = self.min_p {
            if p.is_nan() || !(0.0..=1.0).contains(&p) {
                return Err(ApiError::bad("min_p must be in [0, 1]"));
            }
            s.min_p = p;
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if let Some(v) = v
                && (!v.is_finite() || !(-2.0..=2.0).contains(&v))
            {
                return Err(ApiError::bad(format!("{name} must be in [-2, 2]")));
            }
        }
        s.presence_penalty = self.presence_penalty.unwrap_or(0.0);
        s.frequency_penalty = self.frequency_penalty.unwrap_or(0.0);
        if let Some(r) = self.repetition_penalty {
            if !r.is_finite() || r <= 0.0 {
                return Err(ApiError::bad("repetition_penalty must be > 0"));
            }
            s.repetition_penalty = r;
        }
        s.seed = match self.seed {
            Some(seed) => seed as u64,
            None => {
                let n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
                n as u64 ^ (n >> 64) as u64
            }
        };
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => return Err(ApiError::bad("max_tokens must be at least 1")),
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            // Until the end of text or a full context.
            None => usize::MAX,
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok(GenerateParams { max_tokens, sampling: s, stop })
    }

    fn include_usage(&self) -> bool {
        self.stream_options.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
    }
}

fn to_messages(messages: Vec<ChatMessage>) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad("messages must be a non-empty array"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            "tool" => "tool",
            other => {
                return Err(ApiError::bad(format!(
                    "messages[{i}].role must be system, user, assistant or tool, not {other:?}"
                )));
            }
        };
        let content = match m.content {
            None => None,
            Some(Content::Text(t)) => Some(t),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad(format!(
                                "messages[{i}]: only text content is supported, not {kind:?}"
                            )));
                        }
                    }
                }
                Some(text)
            }
        };
        if content.is_none() && m.tool_calls.is_none() {
            return Err(ApiError::bad(format!("messages[{i}] has no content")));
        }
        let mut msg = Message { role: role.to_string(), content, reasoning_content: None, tool_calls: None };
        if let Some(r) = m.reasoning_content {
            msg = msg.with_reasoning(r);
        }
        if let Some(mut t) = m.tool_calls {
            // OpenAI sends `arguments` as a JSON string; the templates iterate an object.
            for call in t.as_array_mut().into_iter().flatten() {
                if let Some(args) = call.pointer_mut("/function/arguments")
                    && let Some(parsed) = args.as_str().and_then(|s| serde_json::from_str::<Value>(s).ok())
                    && parsed.is_object()
                {
                    *args = parsed;
                }
            }
            msg = msg.with_tool_calls(t);
        }
        out.push(msg);
    }
    Ok(out)
}

// ---- handlers --------------------------------------------------------------------------------

async fn health(State(st): State<Shared>) -> Json<Value> {
    let (requests, generated_tokens) = st.engine.counts();
    Json(json!({"status": "ok", "requests_served": requests, "generated_tokens": generated_tokens}))
}

async fn models(State(st): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "created": st.created, "owned_by": "flash-moe"}],
    }))
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(st): State<Shared>, body: Bytes) -> Response {
    match parse_chat(&body) {
        Ok((input, common)) => respond(st, Kind::Chat, input, common).await,
        Err(e) => e.into_response(),
    }
}

fn parse_chat(body: &Bytes) -> Result<(Input, Common), ApiError> {
    let body = parse_body(body)?;
    let req: ChatRequest = parse(&body)?;
    let common: Common = parse(&body)?;
    let messages = to_messages(req.messages.ok_or_else(|| ApiError::bad("missing field `messages`"))?)?;
    let enable_thinking = req.chat_template_kwargs.unwrap_or_default().enable_thinking;
    Ok((Input::Chat { messages, enable_thinking }, common))
}

async fn completions(State(st): State<Shared>, body: Bytes) -> Response {
    match parse_completion(&body) {
        Ok((input, common)) => respond(st, Kind::Completion, input, common).await,
        Err(e) => e.into_response(),
    }
}

fn parse_completion(body: &Bytes) -> Result<(Input, Common), ApiError> {
    let body = parse_body(body)?;
    let req: CompletionRequest = parse(&body)?;
    let common: Common = parse(&body)?;
    let prompt = match req.prompt {
        Some(Value::String(s)) => s,
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => a[0].as_str().unwrap_or_default().to_string(),
        Some(_) => return Err(ApiError::bad("prompt must be a string")),
        None => return Err(ApiError::bad("missing field `prompt`")),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad("prompt must not be empty"));
    }
    Ok((Input::Text(prompt), common))
}

async fn respond(st: Shared, kind: Kind, input: Input, common: Common) -> Response {
    let params = match common.params() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (tx, mut rx) = unbounded_channel();
    if !st.engine.submit(Job { input, params, reply: tx }) {
        return ApiError::server("the engine has stopped").into_response();
    }
    match rx.recv().await {
        Some(Event::Started { .. }) => {}
        Some(Event::Error { message, client: true }) => return ApiError::bad(message).into_response(),
        Some(Event::Error { message, .. }) => return ApiError::server(message).into_response(),
        _ => return ApiError::server("the engine dropped the request").into_response(),
    }
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Completion => format!("cmpl-{n}"),
    };
    let meta = Meta { id, created: now(), model: st.model_id.clone(), kind };
    if common.stream.unwrap_or(false) {
        Sse::new(stream(meta, rx, common.include_usage())).into_response()
    } else {
        collect(meta, rx).await
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn collect(meta: Meta, mut rx: UnboundedReceiver<Event>) -> Response {
    let (mut content, mut reasoning) = (String::new(), String::new());
    loop {
        match rx.recv().await {
            Some(Event::Piece { text, thinking }) => {
                if thinking && meta.kind == Kind::Chat {
                    reasoning.push_str(&text);
                } else {
                    content.push_str(&text);
                }
            }
            Some(Event::Done { prompt_tokens, completion_tokens, finish_reason }) => {
                let usage = usage(prompt_tokens, completion_tokens);
                let body = match meta.kind {
                    Kind::Chat => {
                        let mut message = json!({"role": "assistant", "content": content});
                        if !reasoning.is_empty() {
                            message["reasoning_content"] = Value::String(reasoning);
                        }
                        json!({
                            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
                            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
                            "usage": usage,
                        })
                    }
                    Kind::Completion => json!({
                        "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
                        "choices": [{"index": 0, "text": content, "logprobs": null, "finish_reason": finish_reason}],
                        "usage": usage,
                    }),
                };
                return Json(body).into_response();
            }
            Some(Event::Error { message, .. }) => return ApiError::server(message).into_response(),
            Some(Event::Started { .. }) => {}
            None => return ApiError::server("the engine dropped the request").into_response(),
        }
    }
}

impl Meta {
    /// One streamed chunk: `delta` (chat) or `text` (completions), and a finish reason.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}],
            }),
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(Value::String(String::new())),
                    "logprobs": null, "finish_reason": finish_reason}],
            }),
        }
    }

    fn usage_chunk(&self, usage: Value) -> Value {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage})
    }
}

fn data(v: &Value) -> Result<SseEvent, Infallible> {
    Ok(SseEvent::default().data(v.to_string()))
}

/// The SSE stream of one request: chunks, then `[DONE]`. Dropping it (the client went away)
/// drops `rx`, which stops the generation.
fn stream(
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    include_usage: bool,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let first = (meta.kind == Kind::Chat).then(|| data(&meta.chunk(json!({"role": "assistant", "content": ""}), None)));
    let state = (meta, rx, false);
    let body = futures::stream::unfold(state, move |(meta, mut rx, finished)| async move {
        if finished {
            return None;
        }
        loop {
            match rx.recv().await {
                Some(Event::Piece { text, thinking }) => {
                    if text.is_empty() {
                        continue;
                    }
                    let delta = if thinking && meta.kind == Kind::Chat {
                        json!({"reasoning_content": text})
                    } else {
                        json!({"content": text})
                    };
                    let ev = vec![data(&meta.chunk(delta, None))];
                    return Some((ev, (meta, rx, false)));
                }
                Some(Event::Done { prompt_tokens, completion_tokens, finish_reason }) => {
                    let mut ev = vec![data(&meta.chunk(json!({}), Some(finish_reason)))];
                    if include_usage {
                        ev.push(data(&meta.usage_chunk(usage(prompt_tokens, completion_tokens))));
                    }
                    ev.push(Ok(SseEvent::default().data("[DONE]")));
                    return Some((ev, (meta, rx, true)));
                }
                Some(Event::Error { message, .. }) => {
                    let err = ApiError::server(message).body();
                    let ev = vec![data(&err), Ok(SseEvent::default().data("[DONE]"))];
                    return Some((ev, (meta, rx, true)));
                }
                Some(Event::Started { .. }) => {}
                None => return None,
            }
        }
    });
    futures::stream::iter(first).chain(body.flat_map(futures::stream::iter))
}
