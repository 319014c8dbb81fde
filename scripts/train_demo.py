#!/usr/bin/env python3
"""Trains the demo model shipped in models/demo: a tiny Qwen3.5-MoE (`qwen3_5_moe_text`) on the King James Bible.

Three steps (the README of models/demo gives the exact commands used):

  scripts/demo_corpus.sh DATA                      # train/valid/test.txt from Debian's bible-kjv
  python3 scripts/train_demo.py tokenizer DATA     # byte-level BPE tokenizer.json + token ids (CPU, seconds)
  python3 scripts/train_demo.py train DATA OUT     # trains on one GPU for --minutes, saves OUT in bf16

`tokenizer` needs the Python packages `tokenizers` and `numpy`; `train` needs `torch` and `transformers` (5.x).
"""

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time

# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer

# The pre-tokenizer regex of Qwen3.5's tokenizer.json.
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB = 4096
# (content, special) in id order after the BPE vocabulary, as in Qwen's tokenizers (where <think> is not special).
ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False), ("</think>", False)]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def read_books(path):
    """Books of a corpus file (verses one a line, books separated by an empty line) as texts ending in a newline."""
    with open(path, encoding="utf-8") as f:
        blocks = f.read().split("\n\n")
    return [b.strip("\n") + "\n" for b in blocks if b.strip()]


def cmd_tokenizer(args):
    import numpy as np
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    data = args.data
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - len(ADDED),
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train([os.path.join(data, "train.txt")], trainer)
    assert tok.get_vocab_size() == VOCAB - len(ADDED), tok.get_vocab_size()
    tok.add_tokens([AddedToken(c, special=s, normalized=False, lstrip=False, rstrip=False, single_word=False) for c, s in ADDED])
    assert tok.get_vocab_size() == VOCAB
    tok.save(os.path.join(data, "tokenizer.json"))
    # Write the ByteLevel decoder exactly as Qwen's tokenizer.json has it (the Python binding fills in other flags,
    # which the decoder ignores).
    with open(os.path.join(data, "tokenizer.json"), encoding="utf-8") as f:
        j = json.load(f)
    j["decoder"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    with open(os.path.join(data, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(j, f, indent=2, ensure_ascii=False)

    ids = {c: tok.token_to_id(c) for c, _ in ADDED}
    decoder = {
        str(ids[c]): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": s}
        for c, s in ADDED
    }
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(data, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # Token streams: each book's verses, newline-terminated, then <|endoftext|>.
    eot = ids["<|endoftext|>"]
    meta = {"vocab_size": VOCAB, "special_ids": ids}
    for split in ("train", "valid", "test"):
        books = read_books(os.path.join(data, f"{split}.txt"))
        stream = []
        for enc in tok.encode_batch(books, add_special_tokens=False):
            stream.extend(enc.ids)
            stream.append(eot)
        np.save(os.path.join(data, f"{split}_ids.npy"), np.asarray(stream, dtype=np.uint16))
        nbytes = sum(len(b.encode("utf-8")) for b in books)
        meta[split] = {"books": len(books), "tokens": len(stream), "bytes": nbytes, "bytes_per_token": nbytes / len(stream)}
        print(f"{split}: {len(books)} books, {len(stream)} tokens, {nbytes} bytes, {nbytes / len(stream):.3f} bytes/token")
    with open(os.path.join(data, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    sample = "In the beginning God created the heaven and the earth.\n"
    print(sample.strip(), "->", tok.encode(sample).tokens)
    assert tok.decode(tok.encode(sample).ids) == sample


# ---------------------------------------------------------------------------------------------------------------------
# Model

MODEL = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    num_hidden_layers=8,
    layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
    # gated full attention: 4 query heads, 2 KV heads, head dim 64, rotary on a quarter of it
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    # Gated DeltaNet: 2 key heads, 4 value heads, head dims 64
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=64,
    linear_value_head_dim=64,
    linear_conv_kernel_dim=4,
    # MoE: 32 routed experts of width 64, top-4, plus a shared expert of width 128
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=128,
    router_aux_loss_coef=0.01,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)


def cmd_train(args):
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    t_start = time.time()

    # A hard stop: whatever happens, the process ends before --hard-limit seconds.
    def on_alarm(*_):
        print(f"hard limit of {args.hard_limit} s reached, exiting", flush=True)
        os._exit(3)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.hard_limit))

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device(args.device)
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else dev.type
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {dev_name}", flush=True)

    # torch's grouped_mm is not autocast-aware: under autocast run the routed experts' grouped GEMMs in bf16 too
    # (transformers would otherwise cast the bf16 activations up to the fp32 master weights).
    import transformers.integrations.moe as moe

    plain_grouped_mm = moe._grouped_mm

    def grouped_mm_autocast(input, weight, offs):
        if torch.is_autocast_enabled(input.device.type):
            return plain_grouped_mm(input.to(torch.bfloat16), weight.to(torch.bfloat16), offs)
        return plain_grouped_mm(input, weight, offs)

    moe._grouped_mm = grouped_mm_autocast

    data = args.data
    meta = json.load(open(os.path.join(data, "meta.json")))
    tok = Tokenizer.from_file(os.path.join(data, "tokenizer.json"))
    ids = meta["special_ids"]
    train = torch.from_numpy(np.load(os.path.join(data, "train_ids.npy")).astype(np.int64)).to(dev)
    valid = torch.from_numpy(np.load(os.path.join(data, "valid_ids.npy")).astype(np.int64)).to(dev)
    test = torch.from_numpy(np.load(os.path.join(data, "test_ids.npy")).astype(np.int64)).to(dev)
    print(f"tokens: train {train.numel()}, valid {valid.numel()}, test {test.numel()}", flush=True)
    if args.tiny:  # dry run: score only the first 1000 held-out tokens (the per-byte figures are then meaningless)
        valid, test = valid[:1000], test[:1000]
    amp = dev.type == "cuda"  # bf16 autocast on the GPU; plain fp32 elsewhere

    shape = dict(MODEL)
    if args.tiny:
        shape.update(num_hidden_layers=4, layer_types=shape["layer_types"][:4], num_experts=8)
    config = Qwen3_5MoeTextConfig(
        **shape,
        bos_token_id=None,
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    model = Qwen3_5MoeForCausalLM(config).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    print(f"parameters: {n_params} ({n_expert} in routed experts); experts: {config._experts_implementation}", flush=True)

    # Dropout on the residual branches while training (hooks, so the architecture is untouched).
    drop = args.dropout

    def branch_dropout(module, inputs, output):
        if not module.training or drop == 0:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], drop, True),) + tuple(output[1:])
        return F.dropout(output, drop, True)

    for layer in model.model.layers:
        (layer.linear_attn if hasattr(layer, "linear_attn") else layer.self_attn).register_forward_hook(branch_dropout)
        layer.mlp.register_forward_hook(branch_dropout)

    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n or n.endswith("A_log") or n.endswith("dt_bias") else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=dev.type == "cuda",
    )

    T, B = args.seq, args.batch

    def batch():
        starts = torch.randint(0, train.numel() - T - 1, (B,), device=dev)
        return train[starts[:, None] + torch.arange(T, device=dev)[None, :]]

    def lr_at(frac, step):
        warm = min(1.0, (step + 1) / args.warmup)
        return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    @torch.no_grad()
    def evaluate(stream, window=None, stride=None, autocast=True):
        """Mean NLL (nats/token) of every token of the stream after the first. Windows of `window` tokens; each
        window after the first scores only its last `stride` tokens, so every target has >= window - stride of context."""
        window = window or T
        stride = stride or window // 2
        was = model.training
        model.eval()
        n = stream.numel()
        total, count, done, begin = 0.0, 0, 1, 0  # `done`: position of the next target to score
        while done < n:
            end = min(begin + window, n)
            x = stream[begin:end][None]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast and amp):
                logits = model(input_ids=x).logits.float()
            nll = F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="none")[done - begin - 1 :]
            total += nll.sum().item()
            count += nll.numel()
            done = end
            begin = max(0, min(done - (window - stride), n - window))
        model.train(was)
        assert count == n - 1, (count, n)
        return total / count

    # Experts: grouped_mm by default; fall back to eager if a first step fails.
    model.train()

    def step(x, lr):
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=x, labels=x, output_router_logits=True)
        out.loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach(), out.aux_loss.detach(), gn

    try:
        step(batch(), 0.0)
    except Exception as e:  # noqa: BLE001
        print(f"grouped_mm experts failed ({type(e).__name__}: {e}); using eager experts", flush=True)
        opt.zero_grad(set_to_none=True)
        model.set_experts_implementation("eager")
        step(batch(), 0.0)
    sync()
    # throughput probe
    t0 = time.time()
    for _ in range(5):
        step(batch(), 0.0)
    sync()
    dt = (time.time() - t0) / 5
    print(f"step time {dt * 1000:.1f} ms ({B * T / dt / 1e3:.0f}k tok/s); setup took {time.time() - t_start:.1f} s", flush=True)

    budget = args.minutes * 60
    t_train = time.time()
    best = (float("inf"), -1, None)
    history = []
    s = 0
    coef = config.router_aux_loss_coef
    log_loss = []
    while True:
        elapsed = time.time() - t_train
        if elapsed >= budget:
            break
        x = batch()
        loss, aux, gn = step(x, lr_at(elapsed / budget, s))
        log_loss.append((loss - coef * aux))
        s += 1
        if s % args.log_every == 0:
            ce = torch.stack(log_loss).mean().item()
            log_loss = []
            print(
                f"step {s:5d}  t {elapsed:6.1f}s  lr {lr_at(elapsed / budget, s):.2e}  train CE {ce:.4f}  aux {aux.item():.3f}  gnorm {gn.item():.2f}",
                flush=True,
            )
            history.append({"step": s, "time_s": round(elapsed, 1), "train_ce": ce})
        if s % args.eval_every == 0:
            v = evaluate(valid)
            print(f"step {s:5d}  valid NLL {v:.4f} (ppl {math.exp(v):.2f})", flush=True)
            history.append({"step": s, "valid_nll": v})
            if v < best[0]:
                best = (v, s, {k: t.detach().clone() for k, t in model.state_dict().items()})
    train_time = time.time() - t_train
    v = evaluate(valid)
    print(f"final step {s}: valid NLL {v:.4f}; best {best[0]:.4f} at step {best[1]}", flush=True)
    if v <= best[0]:
        best = (v, s, None)
    else:
        model.load_state_dict(best[2])
    best_step = best[1]
    # train CE of the chosen weights, without dropout, on fresh random batches
    model.eval()
    final_train = 0.0
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        for _ in range(8):
            x = batch()
            final_train += model(input_ids=x, labels=x).loss.item() / 8

    results = {"steps": s, "chosen_step": best_step, "train_time_s": round(train_time, 1), "step_ms": round(dt * 1000, 1)}
    results["batch"] = B
    results["seq"] = T
    results["tokens_seen"] = s * B * T
    results["epochs"] = s * B * T / train.numel()
    results["train_ce_eval_mode"] = final_train
    for name, stream, split in (("valid", valid, "valid"), ("test", test, "test")):
        nll = evaluate(stream)
        tokens = stream.numel() - 1
        nats = nll * tokens
        nbytes = meta[split]["bytes"]
        results[name] = {
            "nll_per_token": nll,
            "ppl_per_token": math.exp(nll),
            "bits_per_byte": nats / math.log(2) / nbytes,
            "ppl_per_byte": math.exp(nats / nbytes),
            "tokens": tokens,
            "bytes": nbytes,
        }
        print(f"{name}: {results[name]}", flush=True)

    # Save in bf16, the default (per-expert) layout.
    out = args.out
    os.makedirs(out, exist_ok=True)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=None,
        eos_token_id=[ids["<|endoftext|>"], ids["<|im_end|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=50,
    )
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(data, f), os.path.join(out, f))

    # Reload from disk and check it: held-out loss of the bf16 weights, and samples.
    del model
    model = Qwen3_5MoeForCausalLM.from_pretrained(out, dtype=torch.bfloat16).to(dev).eval()
    nll = evaluate(test, autocast=False)
    nats = nll * (test.numel() - 1)
    results["test_bf16_reloaded"] = {
        "nll_per_token": nll,
        "ppl_per_token": math.exp(nll),
        "bits_per_byte": nats / math.log(2) / meta["test"]["bytes"],
    }
    print(f"test (bf16, reloaded): {results['test_bf16_reloaded']}", flush=True)

    prompts = ["In the beginning", "And Jesus said unto them,", "The LORD is my shepherd;", "Blessed are the", "And it came to pass"]
    samples = []
    torch.manual_seed(args.seed)
    for p in prompts:
        x = torch.tensor([tok.encode(p).ids], device=dev)
        for mode in ("greedy", "sampled"):
            kw = dict(do_sample=False) if mode == "greedy" else dict(do_sample=True, temperature=0.8, top_p=0.95, top_k=50)
            with torch.no_grad():
                y = model.generate(x, max_new_tokens=args.sample_tokens, **kw)
            text = tok.decode(y[0].tolist(), skip_special_tokens=False)
            samples.append({"prompt": p, "mode": mode, "text": text, "ids": y[0].tolist()})
            print(f"--- {mode}: {text!r}", flush=True)
    # Reference next-token logits of the reloaded bf16 model for a fixed prompt (for engine tests).
    ref_prompt = "In the beginning God created the heaven and the earth."
    x = torch.tensor([tok.encode(ref_prompt).ids], device=dev)
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    top = logits.topk(5, dim=-1)
    reference = {
        "prompt": ref_prompt,
        "ids": x[0].tolist(),
        "top5_ids": top.indices.tolist(),
        "top5_logits": [[round(v, 4) for v in r] for r in top.values.tolist()],
        "last_logits": [round(v, 4) for v in logits[-1].tolist()],
    }
    results["total_time_s"] = round(time.time() - t_start, 1)
    results["parameters"] = n_params
    results["routed_expert_parameters"] = n_expert
    results["experts_implementation"] = config._experts_implementation
    results["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    results["device"] = dev_name
    results["args"] = vars(args)
    extra = args.extra or out
    os.makedirs(extra, exist_ok=True)
    json.dump({"results": results, "history": history}, open(os.path.join(extra, "train_results.json"), "w"), indent=2)
    json.dump(samples, open(os.path.join(extra, "samples.json"), "w"), indent=2)
    json.dump(reference, open(os.path.join(extra, "reference_logits.json"), "w"))
    print(json.dumps(results, indent=2), flush=True)
    print(f"done in {time.time() - t_start:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train tokenizer.json on DATA/train.txt and tokenize the splits")
    t.add_argument("data")
    r = sub.add_parser("train", help="train on one GPU and save the model in bf16")
    r.add_argument("data")
    r.add_argument("out")
    r.add_argument("--extra", help="folder for train_results.json, samples.json, reference_logits.json (default OUT)")
    r.add_argument("--minutes", type=float, default=4.5, help="training wall time")
    r.add_argument("--hard-limit", type=float, default=540, help="seconds after which the process exits regardless")
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--seq", type=int, default=512)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--warmup", type=int, default=100)
    r.add_argument("--weight-decay", type=float, default=0.1)
    r.add_argument("--dropout", type=float, default=0.1)
    r.add_argument("--log-every", type=int, default=25)
    r.add_argument("--eval-every", type=int, default=200)
    r.add_argument("--sample-tokens", type=int, default=80)
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--device", default="cuda")
    r.add_argument("--tiny", action="store_true", help="a 2-layer model, for a dry run of the script on CPU")
    args = ap.parse_args()
    {"tokenizer": cmd_tokenizer, "train": cmd_train}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
