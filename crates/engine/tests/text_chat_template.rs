//! Chat template parity with `transformers.apply_chat_template(tokenize=False)` on the real Qwen3.5
//! template (tests/fixtures/text/chat_renders.json, made by scripts/make_text_fixtures.py).

use std::fs;
use std::path::{Path, PathBuf};

use moe_engine::chat_template::{ChatTemplate, ChatTemplateError, Message};
use moe_engine::tokenizer::Tokenizer;
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text")
}

fn renders() -> Value {
    serde_json::from_str(&fs::read_to_string(fixture_dir().join("chat_renders.json")).unwrap()).unwrap()
}

fn template() -> ChatTemplate {
    Tokenizer::from_dir(fixture_dir()).unwrap().chat_template().unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).unwrap()
}

fn render_case(t: &ChatTemplate, case: &Value) -> Result<String, ChatTemplateError> {
    let tools = case.get("tools").filter(|v| !v.is_null());
    t.render(
        &messages(&case["messages"]),
        tools,
        case["add_generation_prompt"].as_bool().unwrap(),
        case["enable_thinking"].as_bool(),
    )
}

#[test]
fn renders_match_transformers() {
    let t = template();
    let data = renders();
    let cases = data["renders"].as_array().unwrap();
    assert!(cases.len() >= 6);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let want = case["rendered"].as_str().unwrap();
        let got = render_case(&t, case).unwrap_or_else(|e| panic!("{name}: {e}"));
        if got != want {
            failures.push(format!("--- {name}\nwant: {want:?}\n got: {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn each_fixture_case_is_covered() {
    let data = renders();
    let names: Vec<&str> = data["renders"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in [
        "system_user",
        "multi_turn_reasoning",
        "generation_thinking_on",
        "generation_thinking_off",
        "tools_system",
        "tool_calls_nested_args",
        "tool_calls_then_answer",
    ] {
        assert!(names.contains(&n), "fixture lacks {n}");
    }
}

#[test]
fn generation_prompt_thinking_switch() {
    let t = template();
    let msgs = [Message::user("Hello")];
    let on = t.render(&msgs, None, true, None).unwrap();
    assert!(on.ends_with("<|im_start|>assistant\n<think>\n"), "{on:?}");
    assert_eq!(t.render(&msgs, None, true, Some(true)).unwrap(), on);
    let off = t.render(&msgs, None, true, Some(false)).unwrap();
    assert!(off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"), "{off:?}");
    assert_eq!(t.render(&msgs, None, false, None).unwrap(), "<|im_start|>user\nHello<|im_end|>\n");
}

#[test]
fn template_raise_exception_is_an_error_with_its_message() {
    let t = template();
    let data = renders();
    let case = &data["error_case"];
    let err = t.render(&messages(&case["messages"]), None, true, None).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Render(_)), "{err:?}");
    let msg = err.to_string();
    let python = case["error"].as_str().unwrap();
    assert!(msg.contains(python), "{msg:?} lacks Python's {python:?}");
    assert!(!msg.contains('\n'));
    // An empty conversation and an unknown role are rejected too.
    assert!(t.render(&[], None, true, None).unwrap_err().to_string().contains("No messages provided."));
    let bad_role = [Message::user("hi"), Message::new("narrator", "x")];
    assert!(t.render(&bad_role, None, false, None).unwrap_err().to_string().contains("Unexpected message role."));
}

#[test]
fn render_errors_never_panic() {
    // A runtime type error inside the template (|items on a string: OpenAI-style string arguments).
    let t = template();
    let msgs = [
        Message::user("hi"),
        Message::assistant("").with_tool_calls(serde_json::json!([
            {"type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
        ])),
    ];
    let err = t.render(&msgs, None, false, None).unwrap_err();
    assert!(matches!(err, ChatTemplateError::Render(_)));
    // Other failures.
    let t = ChatTemplate::new("{{ raise_exception('custom failure: ' ~ messages[0].role) }}").unwrap();
    let msg = t.render(&[Message::system("s")], None, false, None).unwrap_err().to_string();
    assert!(msg.contains("custom failure: system"), "{msg}");
    let t = ChatTemplate::new("{{ messages[0].content.nope() }}").unwrap();
    assert!(t.render(&[Message::user("u")], None, false, None).is_err());
    let t = ChatTemplate::new("{{ 1 / 0 }}").unwrap();
    assert!(t.render(&[], None, false, None).is_err());
}

#[test]
fn syntax_error_is_an_error() {
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}").unwrap_err();
    assert!(matches!(err, ChatTemplateError::Syntax(_)), "{err:?}");
    assert!(!err.to_string().contains('\n'));
    assert!(ChatTemplate::new("{{ unclosed").is_err());
}

#[test]
fn special_tokens_are_variables() {
    let t = ChatTemplate::new("[{{ bos_token }}|{{ eos_token }}|{{ enable_thinking is defined }}]").unwrap();
    assert_eq!(t.render(&[], None, false, None).unwrap(), "[||False]");
    let t = t.with_special_tokens(Some("<s>".into()), Some("</s>".into()));
    assert_eq!(t.render(&[], None, false, Some(false)).unwrap(), "[<s>|</s>|True]");
}

#[test]
fn extra_template_kwargs() {
    let t = ChatTemplate::new("{{ add_vision_id }} {{ tools | tojson }} {{ add_generation_prompt }}").unwrap();
    let mut kw = serde_json::Map::new();
    kw.insert("add_vision_id".into(), Value::Bool(true));
    let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "description": "a < b & 'c'"}}]);
    assert_eq!(
        t.render_with_kwargs(&[], Some(&tools), true, &kw).unwrap(),
        r#"True [{"type": "function", "function": {"name": "f", "description": "a < b & 'c'"}}] True"#
    );
}

#[test]
fn message_serde_shape() {
    let m = Message::assistant("a").with_reasoning("r");
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(v, serde_json::json!({"role": "assistant", "content": "a", "reasoning_content": "r"}));
    let back: Message =
        serde_json::from_value(serde_json::json!({"role": "tool", "content": null, "name": "x"})).unwrap();
    assert_eq!(back.role, "tool");
    assert_eq!(back.content, None);
}
