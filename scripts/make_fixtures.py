#!/usr/bin/env python3
"""Build tiny random-weight Qwen MoE checkpoints with Hugging Face `transformers` and dump
reference activations for flash-moe's parity tests.

Usage:  python3 scripts/make_fixtures.py --out tests/fixtures

Needs torch + transformers (written against transformers 5.17.0, torch 2.11.0) and safetensors.
Everything runs on the CPU in float32 (the models are tiny), so no GPU is needed and TF32 never
comes into play.

For every fixture <name> it writes <out>/<name>/:
  config.json                      exactly as written by `save_pretrained`
  model.safetensors                bfloat16 weights (or model-0000k-of-0000n.safetensors + index)
  reference.safetensors            input_ids  int64 [1, T]
                                   logits     f32   [T, vocab]       (use_cache=False, full sequence)
                                   hidden_states f32 [L+1, T, H]     (output_hidden_states=True)
The reference is computed from the *saved* bf16 checkpoint reloaded in float32 with the eager
attention / eager experts paths, so it is exactly what a loader of these files should reproduce.

Parameter randomisation (model-spec.md section 7.1, with one refinement): A_log = log(U(0.01, 16)),
dt_bias = randn*0.5, other parameters = randn*0.08, and every parameter with "norm" in its name =
init + randn*0.1, where init is the module's default (0 for the zero-centred "1+w" RMSNorms of
Qwen3.5 / Qwen3-Next, 1 for plain-weight norms: Qwen3-MoE's RMSNorms and the gated GDN
`linear_attn.norm`).  Plain-weight norms therefore get scales around 1 instead of around 0, which
keeps attention scores and the GDN output non-degenerate.
"""

import argparse
import gc
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

SEQ_LEN = 80
PREFILL = 70
INPUT_SEED = 1234
VOCAB = 512
HIDDEN = 64


# ------------------------------------------------------------------------------------------------
# configs


def qwen35_text_kwargs():
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )


def make_qwen35_moe():
    cfg = transformers.Qwen3_5MoeTextConfig(**qwen35_text_kwargs())
    return transformers.Qwen3_5MoeForCausalLM(cfg)


def make_qwen35_moe_vl():
    vision = dict(
        depth=1,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=HIDDEN,
        num_position_embeddings=16,
    )
    cfg = transformers.Qwen3_5MoeConfig(
        text_config=qwen35_text_kwargs(),
        vision_config=vision,
        # the real ids (248053..248057) are outside the tiny vocab; keep them in range and out of
        # the way (text-only inputs are drawn from [0, 512), so they may occur but are never
        # treated specially without pixel_values).
        image_token_id=VOCAB - 4,
        video_token_id=VOCAB - 3,
        vision_start_token_id=VOCAB - 2,
        vision_end_token_id=VOCAB - 1,
        tie_word_embeddings=False,
    )
    return transformers.Qwen3_5MoeForConditionalGeneration(cfg)


def make_qwen3_next():
    cfg = transformers.Qwen3NextConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,  # only used by dense (mlp_only) layers; there are none
        num_hidden_layers=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        norm_topk_prob=True,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    )
    return transformers.Qwen3NextForCausalLM(cfg)


def qwen3_moe_kwargs(layers, tied, norm_topk):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,  # dense layers only; there are none
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=norm_topk,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )


def make_qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(**qwen3_moe_kwargs(3, True, False))
    return transformers.Qwen3MoeForCausalLM(cfg)


def make_qwen3_moe_untied():
    cfg = transformers.Qwen3MoeConfig(**qwen3_moe_kwargs(2, False, True))
    return transformers.Qwen3MoeForCausalLM(cfg)


# name, builder, seed, save kwargs, model class used to reload
FIXTURES = [
    ("qwen35_moe", make_qwen35_moe, 0, {}, "causal"),
    # qwen35_moe_fused: same weights as qwen35_moe, saved with save_original_format=False (below)
    # hub-like: VL wrapper names (model.language_model.*, model.visual.*), fused experts, sharded
    ("qwen35_moe_vl", make_qwen35_moe_vl, 1, {"max_shard_size": "300KB", "save_original_format": False}, "vl"),
    ("qwen3_next", make_qwen3_next, 2, {}, "causal"),
    ("qwen3_moe", make_qwen3_moe, 3, {}, "causal"),
    ("qwen3_moe_untied", make_qwen3_moe_untied, 4, {}, "causal"),
]


# ------------------------------------------------------------------------------------------------


def randomise(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty_like(p).uniform_(0.01, 16).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "norm" in name:
                base = 1.0 if bool(torch.all(p == 1)) else 0.0
                if base == 0.0 and not bool(torch.all(p == 0)):
                    raise RuntimeError(f"unexpected init for norm parameter {name}")
                p.copy_(base + torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) * 0.08)


def load_kwargs():
    return dict(dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")


def reload(path, kind):
    cls = transformers.Qwen3_5MoeForConditionalGeneration if kind == "vl" else transformers.AutoModelForCausalLM
    try:
        m = cls.from_pretrained(path, **load_kwargs())
    except TypeError as e:  # experts_implementation not accepted
        print("  reload without experts_implementation:", e)
        kw = load_kwargs()
        kw.pop("experts_implementation")
        m = cls.from_pretrained(path, **kw)
    return m.eval()


def input_ids():
    return torch.randint(0, VOCAB, (1, SEQ_LEN), generator=torch.Generator().manual_seed(INPUT_SEED))


def final_norm(model):
    base = model.model
    if hasattr(base, "language_model"):
        base = base.language_model
    return base.norm


@torch.no_grad()
def reference(model):
    ids = input_ids()
    full = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    logits = full.logits[0].float().contiguous()
    hs = torch.stack([h[0] for h in full.hidden_states]).float().contiguous()

    out = model(input_ids=ids[:, :PREFILL], use_cache=True)
    cache, steps = out.past_key_values, [out.logits]
    for t in range(PREFILL, SEQ_LEN):
        o = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        steps.append(o.logits)
    inc = torch.cat(steps, 1)[0]
    d_inc = (logits - inc).abs().max().item()
    d_prefill = (logits[:PREFILL] - inc[:PREFILL]).abs().max().item()
    d_decode = (logits[PREFILL:] - inc[PREFILL:]).abs().max().item()

    # Is hidden_states[-1] taken after the final norm?  Check against lm_head directly.
    head = model.lm_head.weight.float()
    d_last_is_normed = (hs[-1] @ head.T - logits).abs().max().item()
    d_last_then_norm = (final_norm(model)(hs[-1]) @ head.T - logits).abs().max().item()
    info = {
        "max|full-incremental|": d_inc,
        "  prefill part": d_prefill,
        "  decode part": d_decode,
        "hidden_states": list(hs.shape),
        "hs[-1]@lm_head vs logits": d_last_is_normed,
        "norm(hs[-1])@lm_head vs logits": d_last_then_norm,
        "logits[0,:4]": [round(x, 5) for x in logits[0, :4].tolist()],
        "logit std": logits.std().item(),
        "ids[:10]": ids[0, :10].tolist(),
    }
    return {"input_ids": ids.contiguous(), "logits": logits, "hidden_states": hs}, info


def tensor_listing(d):
    rows = []
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors") and fn != "reference.safetensors":
            with safe_open(os.path.join(d, fn), "pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    rows.append((k, sl.get_dtype(), sl.get_shape(), fn))
    return sorted(rows)


def summarize_dir(d):
    total = 0
    for fn in sorted(os.listdir(d)):
        sz = os.path.getsize(os.path.join(d, fn))
        total += sz
        print(f"    {fn:45s} {sz:>10d}")
    print(f"    {'TOTAL':45s} {total:>10d}")
    return total


def print_tensors(d, interesting):
    rows = tensor_listing(d)
    print(f"  {len(rows)} tensors; showing {interesting} (routed experts: only expert 0) and non-layer tensors:")
    for k, dt, shape, fn in rows:
        if ".mlp.experts." in k and ".mlp.experts.0." not in k and not k.endswith("_proj"):
            continue
        if any(s in k for s in interesting) or ".layers." not in k:
            print(f"    {k:70s} {dt:5s} {shape}  [{fn}]")


@torch.no_grad()
def check_roundtrip(model_bf16, reloaded):
    """Every parameter of the reloaded fp32 model must equal the bf16 one that was saved
    (catches keys silently re-initialised on load)."""
    src = {k: v.float() for k, v in model_bf16.named_parameters()}
    dst = dict(reloaded.named_parameters())
    assert src.keys() == dst.keys(), (sorted(src.keys() ^ dst.keys()))[:10]
    bad = [k for k in src if not torch.equal(src[k], dst[k])]
    assert not bad, f"reloaded parameters differ: {bad[:10]}"
    dtypes = sorted({str(v.dtype) for v in model_bf16.parameters()})
    print(f"  round trip: {len(src)} parameters identical after bf16 save + fp32 reload; saved dtypes {dtypes}")


def save(model, d, **kw):
    if os.path.exists(d):
        shutil.rmtree(d)
    model.to(torch.bfloat16).save_pretrained(d, **kw)
    for junk in ("generation_config.json",):
        p = os.path.join(d, junk)
        if os.path.exists(p):
            os.remove(p)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--only", nargs="*", help="subset of fixture names")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    print(f"python {sys.version.split()[0]}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"seq_len {SEQ_LEN} prefill {PREFILL} input seed {INPUT_SEED}; compute: CPU float32, eager")

    grand = 0
    summary = {}
    for name, builder, seed, save_kw, kind in FIXTURES:
        if args.only and name not in args.only and not (name == "qwen35_moe" and "qwen35_moe_fused" in args.only):
            continue
        print("=" * 100)
        print(f"[{name}] seed {seed}")
        torch.manual_seed(seed)
        model = builder().eval()
        randomise(model)
        cfg = model.config
        print("  config:", type(cfg).__name__, cfg.model_type, "/", type(model).__name__)
        d = os.path.join(args.out, name)
        save(model, d, **save_kw)  # casts model to bf16 in place
        if name == "qwen35_moe":
            dfused = os.path.join(args.out, "qwen35_moe_fused")
            save(model, dfused, save_original_format=False)

        with open(os.path.join(d, "config.json")) as f:
            cj = json.load(f)
        print("  config.json:", json.dumps(cj, sort_keys=True))

        m = reload(d, kind)
        print("  reloaded:", type(m).__name__, "attn", m.config._attn_implementation,
              "experts", getattr(m.config, "_experts_implementation", None))
        check_roundtrip(model, m)
        ref, info = reference(m)
        for k, v in info.items():
            print(f"  {k}: {v}")
        save_file(ref, os.path.join(d, "reference.safetensors"))
        summary[name] = info["max|full-incremental|"]
        del m
        gc.collect()

        print_tensors(d, [".layers.0.", ".layers.3.", ".layers.2."] if "qwen3_moe" in name else [".layers.0.", ".layers.3."])
        grand += summarize_dir(d)

        if name == "qwen35_moe":
            print("=" * 100)
            print("[qwen35_moe_fused] same weights, save_original_format=False")
            m = reload(dfused, "causal")
            check_roundtrip(model, m)
            ref2, info2 = reference(m)
            d12 = (ref2["logits"] - ref["logits"]).abs().max().item()
            dh12 = (ref2["hidden_states"] - ref["hidden_states"]).abs().max().item()
            print(f"  max|fused - per-expert| logits {d12} hidden {dh12}")
            print(f"  max|full-incremental|: {info2['max|full-incremental|']}")
            if d12 != 0.0:
                print("  WARNING: fused reload differs from per-expert reload")
            # the reference is the per-expert one (identical weights)
            shutil.copyfile(os.path.join(d, "reference.safetensors"), os.path.join(dfused, "reference.safetensors"))
            summary["qwen35_moe_fused"] = info2["max|full-incremental|"]
            del m
            gc.collect()
            with open(os.path.join(dfused, "config.json")) as f:
                cj2 = json.load(f)
            print("  config.json identical to qwen35_moe:", cj2 == cj)
            print_tensors(dfused, [".layers.0.", ".layers.3."])
            grand += summarize_dir(dfused)
        del model
        gc.collect()

    print("=" * 100)
    for k, v in summary.items():
        print(f"  {k:20s} max|full-incremental| = {v:.3e}")
    print(f"total fixture bytes: {grand}")


if __name__ == "__main__":
    main()
