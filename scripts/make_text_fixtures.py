#!/usr/bin/env python3
"""Make the text-side golden fixtures under tests/fixtures/text/.

What it writes:
  tokenizer.json          a small byte-level BPE (vocab 1000) with the Qwen3.5 pre-tokenizer
  tokenizer_config.json   special tokens + the real Qwen3.5 chat template (as a string)
  generation_config.json  eos_token_id list, like the Qwen3.5 checkpoints
  token_ids.json          Python ids / decodes for ~30 tricky strings
  chat_renders.json       transformers.apply_chat_template(tokenize=False) for 7 conversations

Environment (no torch needed):
  python3 -m venv /tmp/tfvenv
  /tmp/tfvenv/bin/pip install tokenizers==0.23.2 transformers jinja2
  /tmp/tfvenv/bin/python scripts/make_text_fixtures.py [--template chat_template.jinja]

The template is the official Qwen3.5 MoE chat_template.jinja (SHA-256 checked below). Without
--template it is taken from the `chat_template` of the existing tests/fixtures/text/
tokenizer_config.json, so regenerating needs no network.
"""

import argparse
import hashlib
import json
import os
import sys

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# model-spec.md section 6: the Qwen3.5 split regex (differs from Qwen2/3 by the \p{M} additions).
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# (content, special). Qwen marks the ChatML control tokens special and the think / tool tags not.
ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
]

# SHA-256 of mlx-community/Qwen3.5-35B-A3B-4bit/chat_template.jinja (the official Qwen3.5 MoE
# template, 7756 bytes, no trailing newline).
TEMPLATE_SHA256 = "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"

CORPUS = [
    """The quick brown fox jumps over the lazy dog. It's a sentence that we've all seen, and
they'll keep using it because it contains every letter. I'm sure you'd agree: the fox isn't lazy.
Numbers like 12345, 3.14159 and 1,000,000 are split into single digits by the pre-tokenizer.""",
    """Mixture-of-experts models route each token to a few experts. The router picks the top-k
experts by softmax probability; the others are skipped. Streaming experts from NVMe means that only
the selected experts have to be read for every layer, which keeps the resident memory small.""",
    """def fibonacci(n: int) -> int:
    if n < 2:
        return n
    a, b = 0, 1
    for _ in range(n - 1):
        a, b = b, a + b
    return b


class Cache:
    def __init__(self):
        self.items = {}

    def get(self, key, default=None):
        return self.items.get(key, default)
""",
    """fn main() {
    let mut total: u64 = 0;
    for i in 0..10 {
        total += i * i;
    }
    println!("total = {total}");
}

impl Sampler {
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        self.argmax(logits)
    }
}
""",
    """{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": [1, 2, 3]}}
<tool_call>
<function=get_weather>
<parameter=city>
Paris
</parameter>
</function>
</tool_call>""",
    "你好，世界！今天天气很好。我们在测试分词器，中文字符通常会被拆成多个字节。",
    "こんにちは、世界。カタカナとひらがなと漢字。",
    "Привет, мир! Это тест токенизатора. Ελληνικά γράμματα. Γειά σου κόσμε.",
    "مرحبا بالعالم. नमस्ते दुनिया, यह एक परीक्षण है। สวัสดีชาวโลก",
    "Emoji: 😀 😃 👍🏽 👨‍👩‍👧‍👦 🇫🇷 🇯🇵 ❤️ ✨ 🚀",
    "Café, naïve, résumé, Ångström, façade, coöperate, Zürich, São Paulo, Œuvre.",
    "   leading spaces, trailing spaces   \n\n\n  multiple\tblank\t\tlines\r\n\r\nand CRLF   ",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nThe user says hello.\n</think>\n\nHi there!<|im_end|>",
    "Markdown: # Title\n\n- item one\n- item two\n\n```python\nprint('hi')\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |",
    "URLs: https://example.com/path?query=1&x=y#frag and mail@example.org; C:\\Windows\\System32",
]

TOKEN_CASES = [
    "",
    "Hello world",
    "Hello, world! How are you?",
    "  leading and trailing  ",
    "a    b\t\tc\n\n\nd",
    "line one\r\nline two\r\n",
    "\n\n\n",
    "   ",
    "I'm sure they'll say it's fine, WE'RE OK, you'd've",
    "12345 3.14159 -42 1,000,000 0x1F",
    "你好，世界！",
    "日本語のテキストと漢字",
    "한국어 텍스트",
    "emoji 😀👍🏽👨‍👩‍👧‍👦🇫🇷",
    "❤️✨🚀 done",
    "e\u0301 vs \u00e9, A\u030a vs \u00c5",  # combining marks (NFC composes them)
    "\u1100\u1161\u11a8",  # decomposed Hangul syllable (NFC composes to one char)
    "नमस्ते दुनिया",  # Devanagari with vowel signs (\p{M})
    "مرحبا بالعالم",
    "ﬁ ligature and ½ fraction and ① circled",
    "def f(x):\n    if x:\n        return x * 2\n    return None\n",
    "fn main() {\n\tlet v = vec![1, 2, 3];\n}\n",
    '{"key": "value", "list": [1, 2, {"nested": true}]}',
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|im_end|>b<|endoftext|>c",
    "<think>\nreasoning\n</think>\n\nanswer",
    "<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
    "not special: <|im_ and |> and <think",
    "tabs\tand\u00a0nbsp\u2003em-space",
    "zero\u200bwidth\u200djoiner",
    "The quick brown fox jumps over the lazy dog.",
    "Mixture-of-experts models route each token to a few experts.",
]

GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather for a city. Use when x < 3 & y > 2, it's 'quoted'.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}

SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {"type": "object", "properties": {"site": {"type": "string"}}},
            },
            "required": ["query"],
        },
    },
}

CONVERSATIONS = [
    {
        "name": "system_user",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        "tools": None,
        "add_generation_prompt": True,
        "enable_thinking": None,
    },
    {
        "name": "multi_turn_reasoning",
        "messages": [
            {"role": "system", "content": "  Be brief.  "},
            {"role": "user", "content": "Name a prime."},
            {"role": "assistant", "content": "7", "reasoning_content": "Small primes: 2, 3, 5, 7."},
            {"role": "user", "content": "Another one, 你好?"},
            {"role": "assistant", "content": "11", "reasoning_content": "\nNext after 7 is 11.\n"},
        ],
        "tools": None,
        "add_generation_prompt": False,
        "enable_thinking": None,
    },
    {
        "name": "generation_thinking_on",
        "messages": [{"role": "user", "content": "Hello"}],
        "tools": None,
        "add_generation_prompt": True,
        "enable_thinking": True,
    },
    {
        "name": "generation_thinking_off",
        "messages": [{"role": "user", "content": "Hello"}],
        "tools": None,
        "add_generation_prompt": True,
        "enable_thinking": False,
    },
    {
        "name": "tools_system",
        "messages": [
            {"role": "system", "content": "You can check the weather."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        "tools": [GET_WEATHER, SEARCH],
        "add_generation_prompt": True,
        "enable_thinking": False,
    },
    {
        "name": "tool_calls_nested_args",
        "messages": [
            {"role": "user", "content": "Weather in Paris and search for umbrellas."},
            {
                "role": "assistant",
                "content": "Let me check.",
                "reasoning_content": "Need two tools.",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                    },
                    {
                        "type": "function",
                        "function": {
                            "name": "search",
                            "arguments": {
                                "query": "umbrella <cheap> & 'good'",
                                "filters": {"site": "example.com", "tags": ["rain", "été"]},
                                "limit": 5,
                                "exact": True,
                                "ratio": 0.5,
                                "none": None,
                            },
                        },
                    },
                ],
            },
            {"role": "tool", "content": '{"temp": 18, "sky": "cloudy"}'},
            {"role": "tool", "content": "Found 3 results: <a>, <b>, <c>"},
        ],
        "tools": [GET_WEATHER, SEARCH],
        "add_generation_prompt": True,
        "enable_thinking": None,
    },
    {
        "name": "tool_calls_then_answer",
        "messages": [
            {"role": "system", "content": "Sys."},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1 <think>should not matter</think>"},
            {"role": "user", "content": "Q2"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "x"}}}],
            },
            {"role": "tool", "content": "r1"},
            {"role": "tool", "content": "r2"},
            {"role": "tool", "content": "r3"},
            {"role": "assistant", "content": "Final answer.", "reasoning_content": "Done."},
        ],
        "tools": [SEARCH],
        "add_generation_prompt": False,
        "enable_thinking": None,
    },
]


def build_tokenizer():
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, continuing_subword_prefix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # Repeat the corpus so that merges of frequent pairs reach min_frequency.
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    # Added tokens go after the BPE vocabulary, as in the Qwen checkpoints.
    tok.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in ADDED_TOKENS if not s])
    tok.add_special_tokens([AddedToken(c, special=s, normalized=False) for c, s in ADDED_TOKENS if s])
    # decoders.ByteLevel() takes no options; write the decoder exactly as Qwen's tokenizer.json has it.
    data = json.loads(tok.to_str())
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return Tokenizer.from_str(json.dumps(data))


def sorted_added(tok):
    # add_tokens / add_special_tokens assigned ids in call order; make the file's order follow ids.
    return sorted(tok.get_added_tokens_decoder().items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--template", help="path of the Qwen3.5 chat_template.jinja (default: the fixture's own)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "text"))
    args = ap.parse_args()

    if args.template:
        template = open(args.template, "rb").read()
    else:
        with open(os.path.join(args.out, "tokenizer_config.json"), encoding="utf-8") as f:
            template = json.load(f)["chat_template"].encode("utf-8")
    digest = hashlib.sha256(template).hexdigest()
    if digest != TEMPLATE_SHA256:
        sys.exit(f"template SHA-256 {digest} != expected {TEMPLATE_SHA256}")
    template = template.decode("utf-8")

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    tok = build_tokenizer()
    tok.save(os.path.join(out, "tokenizer.json"), pretty=False)
    tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))

    added = sorted_added(tok)
    ids = {t.content: i for i, t in added}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in added
        },
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")
    with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
             "pad_token_id": ids["<|endoftext|>"], "temperature": 0.6, "top_k": 20, "top_p": 0.95},
            f, indent=2)
        f.write("\n")

    cases = []
    for text in TOKEN_CASES:
        enc = tok.encode(text, add_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": enc.ids,
                "decoded": tok.decode(enc.ids, skip_special_tokens=False),
                "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True),
            }
        )

    # Cross-check with transformers (what users of the HF stack see) and render the chats.
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(out)
    for c in cases:
        hf_ids = hf.encode(c["text"], add_special_tokens=False)
        if hf_ids != c["ids"]:
            sys.exit(f"transformers ids differ from tokenizers ids for {c['text']!r}")
    with open(os.path.join(out, "token_ids.json"), "w", encoding="utf-8") as f:
        json.dump({"vocab_size": tok.get_vocab_size(with_added_tokens=True), "cases": cases}, f,
                  ensure_ascii=False, indent=1)
        f.write("\n")

    renders = []
    for conv in CONVERSATIONS:
        kwargs = {}
        if conv["enable_thinking"] is not None:
            kwargs["enable_thinking"] = conv["enable_thinking"]
        text = hf.apply_chat_template(
            conv["messages"],
            tools=conv["tools"],
            tokenize=False,
            add_generation_prompt=conv["add_generation_prompt"],
            **kwargs,
        )
        renders.append({**conv, "rendered": text})

    # A conversation the template must reject (raise_exception), recorded for the error test.
    try:
        hf.apply_chat_template([{"role": "system", "content": "only a system turn"}], tokenize=False)
        sys.exit("expected the template to raise for a conversation without a user turn")
    except Exception as e:  # jinja2.exceptions.TemplateError
        error = {"messages": [{"role": "system", "content": "only a system turn"}], "error": str(e)}

    with open(os.path.join(out, "chat_renders.json"), "w", encoding="utf-8") as f:
        json.dump({"renders": renders, "error_case": error}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote fixtures to {out}")


if __name__ == "__main__":
    main()
