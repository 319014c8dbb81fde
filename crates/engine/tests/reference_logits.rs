//! Whole-model parity with Hugging Face `transformers`: tiny random models of every family,
//! saved in bf16 by `scripts/make_fixtures.py`, with float32 reference logits.

mod common;

use common::{Reference, argmax, fixture, reference, rel_l2};
use moe_engine::{CpuBackend, Model};

fn check(name: &str, a: &[f32], r: &Reference, vocab: usize, what: &str) {
    let err = rel_l2(a, &r.logits);
    let agree = a.chunks(vocab).zip(r.logits.chunks(vocab)).filter(|(x, y)| argmax(x) == argmax(y)).count();
    let n = r.logits.len() / vocab;
    eprintln!("{name} {what}: relative L2 error {err:.2e}, top-1 {agree}/{}", r.logits.len() / vocab);
    assert!(err <= 1e-4, "{name} {what}: relative L2 error {err:.3e} > 1e-4");
    assert_eq!(agree, n, "{name} {what}: top-1 agrees on {agree}/{n} positions");
}

fn run_family(name: &str) {
    let model: Model<CpuBackend> = moe_engine::load(&fixture(name), None, CpuBackend).unwrap();
    let r = reference(name);
    let (vocab, h) = (model.config.vocab, model.config.hidden);

    let mut s = model.new_session();
    let out = model.forward(&mut s, &r.ids, true, true).unwrap();
    // Localise a mismatch: the residual stream after each layer (hidden_states[1..L]; the last
    // entry of transformers' list is after the final norm, so it is not compared).
    let t = r.ids.len();
    for (i, got) in out.hidden.iter().enumerate().take(out.hidden.len() - 1) {
        let want = &r.hidden[(i + 1) * t * h..(i + 2) * t * h];
        let err = rel_l2(got, want);
        assert!(err <= 1e-4, "{name}: residual after layer {i} off by {err:.3e}");
    }
    check(name, &out.logits, &r, vocab, "prefill");

    let mut s = model.new_session();
    let mut decoded = Vec::new();
    for &tok in &r.ids {
        decoded.extend(model.forward(&mut s, &[tok], true, false).unwrap().logits);
    }
    check(name, &decoded, &r, vocab, "decode");
    // Greedy steps choose the reference's top token at every position.
    let mut s = model.new_session();
    for (i, &tok) in r.ids.iter().enumerate() {
        let want = argmax(&r.logits[i * vocab..(i + 1) * vocab]) as u32;
        assert_eq!(model.forward_greedy(&mut s, tok).unwrap(), want, "{name}: greedy pick at position {i}");
    }

    // A prefill followed by decode steps continues the same state.
    let mut s = model.new_session();
    let mut mixed = model.forward(&mut s, &r.ids[..70], true, false).unwrap().logits;
    for &tok in &r.ids[70..] {
        mixed.extend(model.forward(&mut s, &[tok], true, false).unwrap().logits);
    }
    check(name, &mixed, &r, vocab, "prefill 70 + decode");
}

#[test]
fn qwen35_moe_per_expert() {
    run_family("qwen35_moe");
}

#[test]
fn qwen35_moe_fused_experts() {
    run_family("qwen35_moe_fused");
}

#[test]
fn qwen35_moe_multimodal_sharded() {
    run_family("qwen35_moe_vl");
}

#[test]
fn qwen3_next() {
    run_family("qwen3_next");
}

#[test]
fn qwen3_moe_tied() {
    run_family("qwen3_moe");
}

#[test]
fn qwen3_moe_untied() {
    run_family("qwen3_moe_untied");
}

#[test]
fn fewer_experts_per_token_changes_the_output() {
    let full: Model<CpuBackend> = moe_engine::load(&fixture("qwen35_moe"), None, CpuBackend).unwrap();
    let one: Model<CpuBackend> = moe_engine::load(&fixture("qwen35_moe"), Some(1), CpuBackend).unwrap();
    assert_eq!(one.config.top_k, 1);
    let r = reference("qwen35_moe");
    let a = full.forward(&mut full.new_session(), &r.ids[..8], true, false).unwrap().logits;
    let b = one.forward(&mut one.new_session(), &r.ids[..8], true, false).unwrap().logits;
    assert!(rel_l2(&b, &a) > 1e-3, "top-1 routing gave the same logits as top-2");
}
