//! The HTTP API over a real socket, with the demo model on the CPU backend.

use futures::StreamExt;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::OnceLock;

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo");

/// The base URL of one server shared by every test: the engine on its own thread, the HTTP
/// server on a runtime of its own (each test's runtime ends with the test).
fn server() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let (handle, jobs) = moe_server::engine_channel();
        std::thread::spawn(move || {
            let dir = Path::new(DEMO);
            let tokenizer = moe_engine::tokenizer::Tokenizer::from_dir(dir).expect("demo tokenizer");
            let model = moe_engine::load(dir, None, moe_engine::CpuBackend).expect("demo model");
            moe_server::run_engine(&model, &tokenizer, &jobs);
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(format!("http://{}", listener.local_addr().unwrap())).unwrap();
                axum::serve(listener, moe_server::router(handle, "demo".into())).await.unwrap();
            });
        });
        rx.recv().unwrap()
    })
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

fn chat_request(stream: bool) -> Value {
    json!({
        "model": "demo",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello."},
        ],
        "max_tokens": 8,
        "temperature": 0,
        "seed": 7,
        "stream": stream,
    })
}

async fn post(path: &str, body: &Value) -> reqwest::Response {
    client().post(format!("{}{path}", server())).json(body).send().await.unwrap()
}

/// The `data:` payloads of an SSE body.
async fn sse_events(resp: reqwest::Response) -> Vec<String> {
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("text/event-stream"), "{ct}");
    let mut body = String::new();
    let mut chunks = resp.bytes_stream();
    while let Some(c) = chunks.next().await {
        body.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    body.split("\n\n").filter_map(|ev| ev.trim().strip_prefix("data:")).map(|d| d.trim_start().to_string()).collect()
}

#[tokio::test]
async fn models_lists_the_demo_model() {
    let resp = client().get(format!("{}/v1/models", server())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "demo");
    let health = client().get(format!("{}/health", server())).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn chat_completion_returns_content_and_usage_deterministically() {
    let resp = post("/v1/chat/completions", &chat_request(false)).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap().to_string();
    assert!(!content.is_empty(), "{v}");
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap()), "{v}");
    let usage = &v["usage"];
    let (p, c) = (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    assert!(p > 0 && c > 0 && c <= 8, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);

    let again: Value = post("/v1/chat/completions", &chat_request(false)).await.json().await.unwrap();
    assert_eq!(again["choices"][0]["message"]["content"], content.as_str());
}

#[tokio::test]
async fn streamed_chat_deltas_equal_the_whole_reply() {
    let whole: Value = post("/v1/chat/completions", &chat_request(false)).await.json().await.unwrap();
    let events = sse_events(post("/v1/chat/completions", &chat_request(true)).await).await;
    assert!(events.len() >= 3, "{events:?}");
    assert_eq!(events.last().unwrap(), "[DONE]");
    let mut text = String::new();
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(finish.as_deref(), whole["choices"][0]["finish_reason"].as_str());
}

#[tokio::test]
async fn completions_continue_raw_text() {
    let req = json!({"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0});
    let resp = post("/v1/completions", &req).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 6, "{v}");

    let mut streamed = req.clone();
    streamed["stream"] = json!(true);
    let events = sse_events(post("/v1/completions", &streamed).await).await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(text, v["choices"][0]["text"].as_str().unwrap());
}

async fn assert_bad_request(resp: reqwest::Response) {
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(!v["error"]["message"].as_str().unwrap().is_empty(), "{v}");
}

#[tokio::test]
async fn malformed_json_is_a_400() {
    let resp = client()
        .post(format!("{}/v1/chat/completions", server()))
        .header("content-type", "application/json")
        .body("{\"messages\": [")
        .send()
        .await
        .unwrap();
    assert_bad_request(resp).await;
}

#[tokio::test]
async fn empty_or_mistyped_requests_are_400s() {
    assert_bad_request(post("/v1/chat/completions", &json!({"messages": []})).await).await;
    assert_bad_request(post("/v1/chat/completions", &json!({"max_tokens": 4})).await).await;
    let mut wrong = chat_request(false);
    wrong["temperature"] = json!("hot");
    assert_bad_request(post("/v1/chat/completions", &wrong).await).await;
    let mut role = chat_request(false);
    role["messages"][0]["role"] = json!("wizard");
    assert_bad_request(post("/v1/chat/completions", &role).await).await;
    assert_bad_request(post("/v1/completions", &json!({"prompt": 5})).await).await;
    let long = "hello ".repeat(6_000);
    assert_bad_request(post("/v1/completions", &json!({"prompt": long, "max_tokens": 1})).await).await;
}

#[tokio::test]
async fn a_client_that_disconnects_stops_its_generation() {
    // Thousands of tokens (seconds of work) unless the disconnect stops them.
    let req = json!({"prompt": "The", "max_tokens": 3000, "temperature": 1.0, "seed": 3, "stream": true});
    let resp = post("/v1/completions", &req).await;
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream();
    assert!(chunks.next().await.is_some());
    drop(chunks);
    // The engine serves one job at a time, so this request completes only after the dropped one
    // has ended; the engine's own count then says how far that one got.
    let (_, before) = generated_so_far().await;
    let v: Value = post("/v1/completions", &json!({"prompt": "The", "max_tokens": 2, "temperature": 0}))
        .await
        .json()
        .await
        .unwrap();
    assert!(v["choices"][0]["text"].is_string(), "{v}");
    let (_, after) = generated_so_far().await;
    // Other tests share the server, so allow for their few tokens; uncancelled, it would be 3000.
    assert!(after - before < 1000, "the abandoned stream and the next request made {} tokens", after - before);
}

/// `(requests served, tokens generated)` as `/health` reports them.
async fn generated_so_far() -> (u64, u64) {
    let v: Value = reqwest::get(format!("{}/health", server())).await.unwrap().json().await.unwrap();
    (v["requests_served"].as_u64().unwrap(), v["generated_tokens"].as_u64().unwrap())
}
