//! Whole-model parity on the GPU: the tiny fixtures of every family under `tests/fixtures/`
//! loaded on [`CudaBackend`], logits compared with the `transformers` reference (relative L2
//! <= 1e-3) through batched prefill, token-by-token decode (replayed from recorded graphs) and
//! prefill followed by decode, and with the CPU backend.
//!
//! Without a GPU or CUDA driver each test prints "SKIPPED <test>: no CUDA device" to stderr
//! and returns; with `FLASH_MOE_REQUIRE_CUDA=1` a missing device fails instead. The fixtures are
//! found through `FLASH_MOE_FIXTURES`, else relative to this crate's source, else `tests/fixtures`
//! under the working directory (test binaries carried to another machine).

mod common;

use common::{Reference, argmax, fixture, gpu, reference, rel_l2};
use moe_core::sample::{Sampler, SamplingParams};
use moe_engine::cuda_backend::CudaBackend;
use moe_engine::generate::{Conversation, GenerateParams};
use moe_engine::tokenizer::Tokenizer;
use moe_engine::{CpuBackend, Model};
use moe_store::Budget;

fn check(name: &str, what: &str, got: &[f32], r: &Reference, cpu: &[f32], vocab: usize) {
    let err = rel_l2(got, &r.logits);
    let vs_cpu = rel_l2(got, cpu);
    let n = r.logits.len() / vocab;
    let agree = got.chunks(vocab).zip(r.logits.chunks(vocab)).filter(|(x, y)| argmax(x) == argmax(y)).count();
    println!("{name} {what}: relative L2 vs reference {err:.2e}, vs CPU {vs_cpu:.2e}, top-1 agrees {agree}/{n}");
    assert!(err <= 1e-3, "{name} {what}: relative L2 error {err:.3e} > 1e-3 against the reference");
    assert!(vs_cpu <= 1e-3, "{name} {what}: relative L2 error {vs_cpu:.3e} > 1e-3 against the CPU backend");
    assert_eq!(agree, n, "{name} {what}: top-1 agrees on {agree}/{n} positions");
}

fn run_family(test: &str, name: &str) {
    let Some(g) = gpu(test, Budget::Auto) else { return };
    let dir = fixture(name);
    let model: Model<CudaBackend> = moe_engine::load(&dir, None, g).unwrap();
    let cpu: Model<CpuBackend> = moe_engine::load(&dir, None, CpuBackend).unwrap();
    let r = reference(name);
    let vocab = model.config.vocab;
    let cpu_logits = cpu.forward(&mut cpu.new_session(), &r.ids, true, false).unwrap().logits;

    let mut s = model.new_session();
    let out = model.forward(&mut s, &r.ids, true, true).unwrap();
    let mut cs = cpu.new_session();
    let cpu_out = cpu.forward(&mut cs, &r.ids, true, true).unwrap();
    for (i, (got, want)) in out.hidden.iter().zip(&cpu_out.hidden).enumerate() {
        let err = rel_l2(got, want);
        assert!(err <= 1e-3, "{name}: residual after layer {i} is off the CPU's by {err:.3e}");
    }
    check(name, "prefill", &out.logits, &r, &cpu_logits, vocab);

    let mut s = model.new_session();
    let mut decoded = Vec::new();
    for &tok in &r.ids {
        decoded.extend(model.forward(&mut s, &[tok], true, false).unwrap().logits);
    }
    check(name, "decode", &decoded, &r, &cpu_logits, vocab);
    // Greedy steps (the pick on the device, the logits never read back) choose the reference's
    // top token at every position; from the third on, each step is queued before the last one's
    // pick is back. Midway another session's prefill lets the step queued ahead pass (it is then
    // queued again), and the last positions are plain decode steps after the step queued ahead
    // was let pass: their logits show that it left the states as they were.
    let mut s = model.new_session();
    let (midway, tail) = (r.ids.len() / 2, r.ids.len() - 3);
    let mut after_greedy = Vec::new();
    for (i, &tok) in r.ids.iter().enumerate() {
        if i == midway {
            model.forward(&mut model.new_session(), &r.ids[..5], false, false).unwrap();
        }
        if i >= tail {
            after_greedy.extend(model.forward(&mut s, &[tok], true, false).unwrap().logits);
            continue;
        }
        let want = argmax(&r.logits[i * vocab..(i + 1) * vocab]) as u32;
        assert_eq!(model.forward_greedy(&mut s, tok).unwrap(), want, "{name}: greedy pick at position {i}");
    }
    let err = rel_l2(&after_greedy, &r.logits[tail * vocab..]);
    println!("{name} decode after greedy steps: relative L2 vs reference {err:.2e}");
    assert!(err <= 1e-3, "{name}: decode after greedy steps is off the reference by {err:.3e}");
    // Every expert is resident, so all but the first two steps (one to size the scratch, one to
    // record) and the re-recordings when the KV cache grows replay a recorded graph.
    let replays = model.take_profile().replays;
    println!("{name} decode: {replays} of {} steps replayed", r.ids.len());
    assert!(replays + 8 >= r.ids.len(), "{name}: only {replays} of {} decode steps replayed", r.ids.len());

    let split = 70.min(r.ids.len() - 1);
    let mut s = model.new_session();
    let mut mixed = model.forward(&mut s, &r.ids[..split], true, false).unwrap().logits;
    for &tok in &r.ids[split..] {
        mixed.extend(model.forward(&mut s, &[tok], true, false).unwrap().logits);
    }
    check(name, &format!("prefill {split} + decode"), &mixed, &r, &cpu_logits, vocab);

    // Only the last position's logits (the generation path).
    let mut s = model.new_session();
    let last = model.forward(&mut s, &r.ids, false, false).unwrap().logits;
    let want = &cpu_logits[cpu_logits.len() - vocab..];
    let err = rel_l2(&last, want);
    assert!(err <= 1e-3, "{name} last-position logits off the CPU's by {err:.3e}");

    // A model dropped with a step queued ahead of its token lets it pass (else freeing its
    // memory would wait for the device forever).
    let mut s = model.new_session();
    for &tok in &r.ids[..4] {
        model.forward_greedy(&mut s, tok).unwrap();
    }
    drop(model);
}

#[test]
fn cuda_model_qwen35_moe() {
    run_family("cuda_model_qwen35_moe", "qwen35_moe");
}

#[test]
fn cuda_model_qwen35_moe_fused() {
    run_family("cuda_model_qwen35_moe_fused", "qwen35_moe_fused");
}

#[test]
fn cuda_model_qwen35_moe_vl() {
    run_family("cuda_model_qwen35_moe_vl", "qwen35_moe_vl");
}

#[test]
fn cuda_model_qwen3_next() {
    run_family("cuda_model_qwen3_next", "qwen3_next");
}

#[test]
fn cuda_model_qwen3_moe() {
    run_family("cuda_model_qwen3_moe", "qwen3_moe");
}

#[test]
fn cuda_model_qwen3_moe_untied() {
    run_family("cuda_model_qwen3_moe_untied", "qwen3_moe_untied");
}

/// Greedy generation on the GPU (experts preloaded, routed on the device) produces the CPU's tokens:
/// the demo model, a prompt and 24 new tokens, with every expert in GPU memory and with none (read
/// from the store each time).
#[test]
fn cuda_greedy_generation_equals_the_cpu() {
    let test = "cuda_greedy_generation_equals_the_cpu";
    if gpu(test, Budget::Bytes(0)).is_none() {
        return;
    }
    let demo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo");
    let demo = if demo.is_dir() { demo } else { std::path::PathBuf::from("models/demo") };
    let tok = Tokenizer::from_dir(&demo).unwrap();
    let prompt = tok.encode("In the beginning God created", false).unwrap();
    let params = GenerateParams { max_tokens: 24, sampling: SamplingParams::greedy(), stop: vec![] };
    let cpu_tokens = {
        let model: Model<CpuBackend> = moe_engine::load(&demo, None, CpuBackend).unwrap();
        let mut conv = Conversation::new(&model, &tok);
        conv.generate(&prompt, &params, &mut Sampler::new(params.sampling.clone()), &mut |_| true).unwrap();
        conv.tokens().to_vec()
    };
    for budget in [Budget::Auto, Budget::Bytes(0)] {
        let Some(g) = gpu(test, budget) else { return };
        let model: Model<CudaBackend> = moe_engine::load(&demo, None, g).unwrap();
        let mut conv = Conversation::new(&model, &tok);
        conv.generate(&prompt, &params, &mut Sampler::new(params.sampling.clone()), &mut |_| true).unwrap();
        assert_eq!(conv.tokens(), &cpu_tokens[..], "greedy tokens differ from the CPU's with VRAM budget {budget}");
        assert!(cpu_tokens.len() > prompt.len() + 10, "generated too little: {cpu_tokens:?}");
    }
}

/// Two sessions decoding in turns on one model (the server's case, at different positions) each
/// record and replay their own step, and every step's logits equal, bit for bit, those of the same
/// step queued kernel by kernel on a model without graphs.
#[test]
fn cuda_interleaved_sessions_replay_their_own_graphs() {
    let test = "cuda_interleaved_sessions_replay_their_own_graphs";
    let (Some(g), Some(e)) = (gpu(test, Budget::Auto), gpu(test, Budget::Auto)) else { return };
    e.use_graphs(false);
    let dir = fixture("qwen35_moe");
    let model: Model<CudaBackend> = moe_engine::load(&dir, None, g).unwrap();
    let eager: Model<CudaBackend> = moe_engine::load(&dir, None, e).unwrap();
    let ids = reference("qwen35_moe").ids;
    let lag = 5;
    let (mut a, mut b, mut ea, mut eb) =
        (model.new_session(), model.new_session(), eager.new_session(), eager.new_session());
    for i in 0..ids.len() + lag {
        for (s, es, at, name) in [(&mut a, &mut ea, i, "a"), (&mut b, &mut eb, i.wrapping_sub(lag), "b")] {
            let Some(&tok) = ids.get(at) else { continue };
            let got = model.forward(s, &[tok], false, false).unwrap().logits;
            let want = eager.forward(es, &[tok], false, false).unwrap().logits;
            assert!(got == want, "session {name}, step {at}: replayed logits differ from the direct step's");
        }
    }
    let replays = model.take_profile().replays;
    assert!(replays + 16 >= 2 * ids.len(), "only {replays} of {} steps replayed", 2 * ids.len());
    assert_eq!(eager.take_profile().replays, 0, "the model without graphs replayed steps");
}
