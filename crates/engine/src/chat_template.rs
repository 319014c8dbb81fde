//! Chat templates (Jinja, as shipped in `tokenizer_config.json` / `chat_template.jinja`) rendered
//! with minijinja, configured to match `transformers.apply_chat_template` byte for byte:
//!
//! * `trim_blocks` + `lstrip_blocks` (transformers' `ImmutableSandboxedEnvironment` settings);
//! * Python string methods (`.startswith`, `.split`, `.rstrip`, ...) through minijinja-contrib's
//!   pycompat unknown-method callback;
//! * `raise_exception(msg)` fails the render with `msg`;
//! * `tojson` is Python's `json.dumps(ensure_ascii=False)` (`", "` / `": "` separators, no HTML
//!   escaping), with the `indent`, `separators`, `sort_keys` and `ensure_ascii` keyword arguments;
//! * `none` / `true` / `false` print as Python does (`None`, `True`, `False`) and the `string`
//!   filter uses Python's `str()` for them and for lists / dicts;
//! * maps keep insertion order (`preserve_order` in minijinja and serde_json);
//! * `bos_token` / `eos_token` are passed as variables when known.

use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

/// Errors of [`ChatTemplate`]; the message is the template's own (e.g. its `raise_exception`).
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not compile: {0}")]
    Syntax(String),
    #[error("chat template error: {0}")]
    Render(String),
}

type Result<T, E = ChatTemplateError> = std::result::Result<T, E>;

/// One chat message, in the OpenAI / transformers shape the templates expect.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    /// Text content; `None` is passed to the template as `none` (e.g. an assistant turn that only
    /// calls tools).
    #[serde(default)]
    pub content: Option<String>,
    /// The assistant's reasoning (`<think>` text); omitted from the template context when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// OpenAI-style tool calls: `[{"type": "function", "function": {"name", "arguments": {..}}}]`.
    /// `arguments` must be an object for the Qwen templates (they iterate it with `|items`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: Some(content.into()), ..Default::default() }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }

    pub fn tool(content: impl Into<String>) -> Self {
        Self::new("tool", content)
    }

    pub fn with_reasoning(mut self, reasoning: impl Into<String>) -> Self {
        self.reasoning_content = Some(reasoning.into());
        self
    }

    pub fn with_tool_calls(mut self, tool_calls: serde_json::Value) -> Self {
        self.tool_calls = Some(tool_calls);
        self
    }
}

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

fn error_message(e: &Error) -> String {
    // raise_exception and most template errors: the detail is the message; add the line.
    let mut msg = match e.detail() {
        Some(d) if e.kind() == ErrorKind::InvalidOperation => d.to_owned(),
        _ => e.to_string(),
    };
    if e.detail().is_some()
        && e.kind() == ErrorKind::InvalidOperation
        && let Some(line) = e.line()
    {
        msg.push_str(&format!(" (template line {line})"));
    }
    // One line.
    msg.replace('\n', " ")
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

// ---- Python-compatible printing -------------------------------------------------------------

/// Python `repr()` of a string.
fn py_repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python `str()` (`repr` = false) or `repr()` (`repr` = true) of a template value.
fn py_str(v: &Value, repr: bool, out: &mut String) {
    match v.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Undefined => {}
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::String if repr => py_repr_str(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            if let Ok(iter) = v.try_iter() {
                for (i, item) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_str(&item, true, out);
                }
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            if let Ok(iter) = v.try_iter() {
                for (i, key) in iter.enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    py_str(&key, true, out);
                    out.push_str(": ");
                    py_str(&v.get_item(&key).unwrap_or_default(), true, out);
                }
            }
            out.push('}');
        }
        _ => out.push_str(&v.to_string()),
    }
}

fn needs_python_form(v: &Value) -> bool {
    matches!(v.kind(), ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map | ValueKind::Iterable)
        && !v.is_undefined()
}

/// The `string` filter with Python's `str()` for None / bools / lists / dicts.
fn string_filter(value: &Value) -> std::result::Result<Value, Error> {
    if value.is_undefined() {
        return Ok(Value::from(""));
    }
    if value.kind() == ValueKind::String {
        return Ok(value.clone());
    }
    if needs_python_form(value) && !value.is_safe() {
        let mut s = String::new();
        py_str(value, false, &mut s);
        return Ok(Value::from(s));
    }
    Ok(Value::from(value.to_string()))
}

// ---- tojson = json.dumps ---------------------------------------------------------------------

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

fn write_json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    // serde_json escapes exactly what json.dumps(ensure_ascii=False) escapes.
    let escaped = serde_json::to_string(s).unwrap_or_default();
    if !ensure_ascii {
        out.push_str(&escaped);
        return;
    }
    for c in escaped.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut buf = [0u16; 2];
            for unit in c.encode_utf16(&mut buf) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
}

fn write_json(v: &serde_json::Value, style: &JsonStyle, depth: usize, out: &mut String) {
    use serde_json::Value as J;
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &style.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v {
        J::Null => out.push_str("null"),
        J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        J::Number(n) => out.push_str(&n.to_string()),
        J::String(s) => write_json_str(s, style.ensure_ascii, out),
        J::Array(a) if a.is_empty() => out.push_str("[]"),
        J::Object(o) if o.is_empty() => out.push_str("{}"),
        J::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json(x, style, depth + 1, out);
            }
            newline(out, depth);
            out.push(']');
        }
        J::Object(o) => {
            out.push('{');
            let mut entries: Vec<(&String, &serde_json::Value)> = o.iter().collect();
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            for (i, (k, x)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push_str(&style.item_sep);
                }
                newline(out, depth + 1);
                write_json_str(k, style.ensure_ascii, out);
                out.push_str(&style.key_sep);
                write_json(x, style, depth + 1, out);
            }
            newline(out, depth);
            out.push('}');
        }
    }
}

fn tojson_filter(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::Number => {
            let n =
                i64::try_from(v.clone()).map_err(|_| Error::new(ErrorKind::InvalidOperation, "tojson: bad indent"))?;
            Some(" ".repeat(n.max(0) as usize))
        }
        Some(v) => Some(v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())),
    };
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
    };
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: cannot serialize: {e}")))?;
    let mut out = String::new();
    write_json(&json, &style, 0, &mut out);
    Ok(Value::from(out))
}

// ---- the template ----------------------------------------------------------------------------

impl ChatTemplate {
    /// Compiles `source`. A syntax error comes back as [`ChatTemplateError::Syntax`].
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatTemplateError::Syntax(error_message(&e)))?;
        env.set_syntax(syntax);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson_filter);
        env.add_filter("string", string_filter);
        env.set_formatter(|out, state, value| {
            if needs_python_form(value) {
                let mut s = String::new();
                py_str(value, false, &mut s);
                out.write_str(&s).map_err(Error::from)
            } else {
                minijinja::escape_formatter(out, state, value)
            }
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatTemplateError::Syntax(error_message(&e)))?;
        Ok(Self { env, bos_token: None, eos_token: None })
    }

    /// Sets the `bos_token` / `eos_token` variables (transformers passes the tokenizer's).
    pub fn with_special_tokens(mut self, bos_token: Option<String>, eos_token: Option<String>) -> Self {
        self.bos_token = bos_token;
        self.eos_token = eos_token;
        self
    }

    /// Renders a conversation. `tools` is the OpenAI `tools` array (passed as `none` when absent);
    /// `enable_thinking` is passed only when given, as `apply_chat_template(enable_thinking=...)`.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String> {
        let mut kwargs = serde_json::Map::new();
        if let Some(t) = enable_thinking {
            kwargs.insert("enable_thinking".into(), serde_json::Value::Bool(t));
        }
        self.render_with_kwargs(messages, tools, add_generation_prompt, &kwargs)
    }

    /// [`render`](Self::render) with arbitrary extra template variables (vLLM's
    /// `chat_template_kwargs`: `enable_thinking`, `add_vision_id`, ...).
    pub fn render_with_kwargs(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
        kwargs: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let mut ctx = serde_json::Map::new();
        let messages = serde_json::to_value(messages).map_err(|e| ChatTemplateError::Render(e.to_string()))?;
        ctx.insert("messages".into(), messages);
        ctx.insert("tools".into(), tools.cloned().unwrap_or(serde_json::Value::Null));
        ctx.insert("documents".into(), serde_json::Value::Null);
        ctx.insert("add_generation_prompt".into(), serde_json::Value::Bool(add_generation_prompt));
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token".into(), b.clone().into());
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token".into(), e.clone().into());
        }
        for (k, v) in kwargs {
            ctx.insert(k.clone(), v.clone());
        }
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatTemplateError::Render(error_message(&e)))?;
        tmpl.render(Value::from(Serde(&ctx))).map_err(|e| ChatTemplateError::Render(error_message(&e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: serde_json::Value) -> String {
        let t = ChatTemplate::new(src).unwrap();
        let tmpl = t.env.get_template(TEMPLATE_NAME).unwrap();
        tmpl.render(Value::from(Serde(&ctx))).unwrap()
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let ctx = serde_json::json!({"x": {"b": "< & ' \" é \n", "a": [1, 2.5, true, null], "e": {}}});
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()),
            r#"{"b": "< & ' \" é \n", "a": [1, 2.5, true, null], "e": {}}"#
        );
        assert_eq!(
            render("{{ x | tojson(sort_keys=true) }}", ctx.clone()),
            r#"{"a": [1, 2.5, true, null], "b": "< & ' \" é \n", "e": {}}"#
        );
        assert_eq!(render("{{ x.a | tojson(indent=2) }}", ctx.clone()), "[\n  1,\n  2.5,\n  true,\n  null\n]");
        assert_eq!(render("{{ 'é😀' | tojson(ensure_ascii=true) }}", ctx), r#""\u00e9\ud83d\ude00""#);
    }

    #[test]
    fn python_printing_of_none_and_bools() {
        let ctx = serde_json::json!({"t": true, "n": null, "l": ["a", 1, false, null], "m": {"k": "it's"}});
        assert_eq!(render("{{ t }} {{ n }} {{ t | string }} {{ n | string }}", ctx.clone()), "True None True None");
        assert_eq!(render("{{ l | string }}|{{ m | string }}", ctx), r#"['a', 1, False, None]|{'k': "it's"}"#);
    }

    #[test]
    fn python_methods_and_whitespace() {
        let src = "{% for m in xs %}\n  {{- m.split('/')[-1].rstrip('!') }}{% if m.startswith('a') %}A{% endif %}\n{% endfor %}";
        assert_eq!(render(src, serde_json::json!({"xs": ["a/b!!", "c/d"]})), "bAd");
    }
}
