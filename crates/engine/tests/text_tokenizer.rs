//! Tokenizer parity with Python `tokenizers` 0.23.2 on the fixture BPE
//! (tests/fixtures/text, made by scripts/make_text_fixtures.py), the incremental detokeniser, and
//! the loader's error and config cases.

use std::fs;
use std::path::{Path, PathBuf};

use moe_engine::tokenizer::{Tokenizer, TokenizerError};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/text")
}

fn load() -> Tokenizer {
    Tokenizer::from_dir(fixture_dir()).expect("fixture tokenizer loads")
}

fn cases() -> Value {
    let text = fs::read_to_string(fixture_dir().join("token_ids.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn encode_matches_python_ids() {
    let tok = load();
    let data = cases();
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, want, "ids differ for {text:?}");
        // add_special_tokens=true adds nothing for Qwen (ByteLevel post-processor).
        assert_eq!(tok.encode(text, true).unwrap(), want, "add_special_tokens changed ids for {text:?}");
    }
}

#[test]
fn decode_matches_python() {
    let tok = load();
    for case in cases()["cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        assert_eq!(tok.decode(&ids, false).unwrap(), case["decoded"].as_str().unwrap());
        assert_eq!(tok.decode(&ids, true).unwrap(), case["decoded_skip_special"].as_str().unwrap());
    }
}

#[test]
fn vocab_and_special_tokens() {
    let tok = load();
    assert_eq!(tok.vocab_size() as u64, cases()["vocab_size"].as_u64().unwrap());
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(tok.id_to_token(im_end).as_deref(), Some("<|im_end|>"));
    for t in
        ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
    {
        assert!(tok.token_to_id(t).is_some(), "{t} missing");
    }
    assert_eq!(tok.bos_token(), None);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.pad_token(), Some("<|endoftext|>"));
    // generation_config.json lists [<|im_end|>, <|endoftext|>]; eos_token / <|im_end|> are already in it.
    assert_eq!(tok.eos_token_ids(), &[im_end, eot]);
    assert!(tok.is_eos(im_end) && tok.is_eos(eot) && !tok.is_eos(0));
    let src = tok.chat_template_source().unwrap();
    assert!(src.starts_with("{%- set image_count = namespace(value=0) %}"));
    assert_eq!(src.len(), 7756);
    assert!(tok.named_chat_templates().is_empty());
}

/// Streams `ids` through a detokeniser; checks each chunk and returns them.
fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
    let mut d = tok.detokenizer(skip_special);
    let mut chunks: Vec<String> = ids.iter().map(|&id| d.push(id)).collect();
    chunks.push(d.finish());
    chunks
}

#[test]
fn detokenizer_concatenation_equals_decode_without_replacement_chars() {
    let tok = load();
    let mut texts: Vec<String> =
        cases()["cases"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_owned()).collect();
    texts.push("混合 text 和 emoji 🧑🏽‍💻 with ñ and 🇯🇵🇫🇷 flags, then 終わり。".into());
    texts.push("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 ∑∫√ and combining: a\u{0301}\u{0323}o\u{0308}".into());
    for text in &texts {
        let ids = tok.encode(text, false).unwrap();
        for skip in [false, true] {
            let chunks = stream(&tok, &ids, skip);
            for c in &chunks {
                assert!(!c.contains('\u{FFFD}'), "chunk {c:?} of {text:?} has U+FFFD");
            }
            assert_eq!(chunks.concat(), tok.decode(&ids, skip).unwrap(), "stream of {text:?} (skip={skip})");
        }
    }
}

#[test]
fn detokenizer_holds_back_split_characters() {
    let tok = load();
    // The fixture vocabulary is tiny: a CJK character / emoji is several byte tokens.
    for text in ["😀", "漢", "👨‍👩‍👧‍👦"] {
        let ids = tok.encode(text, false).unwrap();
        assert!(ids.len() >= 2, "{text:?} should span several tokens, got {ids:?}");
        let mut d = tok.detokenizer(false);
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            let chunk = d.push(id);
            if i == 0 {
                assert_eq!(chunk, "", "first byte of {text:?} must be held back");
            }
            out.push_str(&chunk);
        }
        assert_eq!(d.finish(), "");
        assert_eq!(out, text);
        assert!(d.pending().is_empty());
    }
    // An incomplete character at the end comes out (as U+FFFD) only from finish().
    let ids = tok.encode("ok 🦀", false).unwrap();
    let cut = &ids[..ids.len() - 1];
    let mut d = tok.detokenizer(false);
    let streamed: String = cut.iter().map(|&id| d.push(id)).collect();
    // (" " and the emoji's first byte may share a token, so the space can be held back too.)
    assert!(streamed.starts_with("ok") && !streamed.contains('\u{FFFD}'), "{streamed:?}");
    assert!(!d.pending().is_empty());
    let tail = d.finish();
    assert!(tail.ends_with('\u{FFFD}'));
    assert_eq!(streamed + &tail, tok.decode(cut, false).unwrap());
}

#[test]
fn detokenizer_special_tokens() {
    let tok = load();
    let ids = tok.encode("<|im_start|>assistant\n<think>\nhm\n</think>\n\nDone 🎉<|im_end|>", false).unwrap();
    assert_eq!(stream(&tok, &ids, false).concat(), "<|im_start|>assistant\n<think>\nhm\n</think>\n\nDone 🎉<|im_end|>");
    // <think> is not a special token in Qwen's tokenizer, so skipping keeps it.
    assert_eq!(stream(&tok, &ids, true).concat(), "assistant\n<think>\nhm\n</think>\n\nDone 🎉");
}

fn temp_model_dir(config: Option<&str>, generation: Option<&str>, jinja: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::copy(fixture_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    if let Some(c) = config {
        fs::write(dir.path().join("tokenizer_config.json"), c).unwrap();
    }
    if let Some(g) = generation {
        fs::write(dir.path().join("generation_config.json"), g).unwrap();
    }
    if let Some(j) = jinja {
        fs::write(dir.path().join("chat_template.jinja"), j).unwrap();
    }
    dir
}

#[test]
fn missing_tokenizer_json_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Missing(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("tokenizer.json") && msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(!msg.contains('\n'));
}

#[test]
fn broken_tokenizer_json_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("tokenizer.json"), "{\"version\": ").unwrap();
    let msg = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.starts_with("cannot parse ") && msg.contains("tokenizer.json"), "{msg}");
}

#[test]
fn unparsable_tokenizer_config_is_a_clear_error() {
    let dir = temp_model_dir(Some("{\"eos_token\": \"<|im_end|>\",,}"), None, None);
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Parse { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("tokenizer_config.json") && msg.contains("line 1"), "{msg}");
    assert!(!msg.contains('\n'));

    let dir = temp_model_dir(Some("{\"chat_template\": 5}"), None, None);
    let msg = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("tokenizer_config.json") && msg.contains("chat_template"), "{msg}");
}

#[test]
fn unparsable_generation_config_is_a_clear_error() {
    let dir = temp_model_dir(None, Some("not json"), None);
    let msg = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("generation_config.json"), "{msg}");
    let dir = temp_model_dir(None, Some("{\"eos_token_id\": \"x\"}"), None);
    let msg = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("generation_config.json") && msg.contains("eos_token_id"), "{msg}");
}

#[test]
fn only_tokenizer_json_is_required() {
    let dir = temp_model_dir(None, None, None);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token(), None);
    // <|im_end|> is still a stop token when present.
    assert_eq!(tok.eos_token_ids(), &[tok.token_to_id("<|im_end|>").unwrap()]);
    assert!(tok.chat_template_source().is_none());
    let err = tok.chat_template().unwrap_err();
    assert!(matches!(err, TokenizerError::NoChatTemplate(_)));
}

#[test]
fn eos_ids_from_int_and_special_token_objects() {
    let dir = temp_model_dir(
        Some(r#"{"eos_token": {"content": "<|endoftext|>", "special": true}, "bos_token": "<|im_start|>"}"#),
        Some(r#"{"eos_token_id": 3}"#),
        None,
    );
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(tok.eos_token_ids(), &[3, eot, im_end]);
}

#[test]
fn chat_template_jinja_file_wins_over_config() {
    let dir = temp_model_dir(Some(r#"{"chat_template": "from config"}"#), None, Some("from file {{ eos_token }}"));
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template_source(), Some("from file {{ eos_token }}"));
    let dir = temp_model_dir(Some(r#"{"chat_template": "from config", "eos_token": "<|im_end|>"}"#), None, None);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template_source(), Some("from config"));
    assert_eq!(tok.chat_template().unwrap().render(&[], None, false, None).unwrap(), "from config");
}

#[test]
fn chat_template_list_form_uses_default() {
    let cfg = r#"{"eos_token": "<|im_end|>", "chat_template": [
        {"name": "tool_use", "template": "tools {{ eos_token }}"},
        {"name": "default", "template": "default {{ eos_token }}"}]}"#;
    let dir = temp_model_dir(Some(cfg), None, None);
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.chat_template_source(), Some("default {{ eos_token }}"));
    let names: Vec<&str> = tok.named_chat_templates().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["tool_use", "default"]);
    assert_eq!(tok.chat_template().unwrap().render(&[], None, false, None).unwrap(), "default <|im_end|>");
}
