//! The generation loop on the demo model: greedy decoding is the argmax of the logits, and the
//! model agrees with the reference `transformers` computed when it was trained.

use moe_core::sample::{Sampler, SamplingParams};
use moe_engine::generate::{Conversation, GenerateParams};
use moe_engine::tokenizer::Tokenizer;
use moe_engine::{CpuBackend, Model};
use std::path::PathBuf;

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/demo")
}

#[test]
fn greedy_generation_is_the_argmax_of_the_logits() {
    let model: Model<CpuBackend> = moe_engine::load(&demo(), None, CpuBackend).unwrap();
    let tok = Tokenizer::from_dir(demo()).unwrap();
    let prompt = tok.encode("Now the serpent was more subtil", false).unwrap();
    let mut conv = Conversation::new(&model, &tok);
    let params = GenerateParams { max_tokens: 12, sampling: SamplingParams::greedy(), stop: vec![] };
    conv.generate(&prompt, &params, &mut Sampler::new(params.sampling.clone()), &mut |_| true).unwrap();
    let seen = conv.tokens().to_vec();
    assert!(seen.len() > prompt.len() + 5, "generated too little: {seen:?}");
    let logits = model.forward(&mut model.new_session(), &seen, true, false).unwrap().logits;
    let vocab = model.config.vocab;
    for i in prompt.len() - 1..seen.len() - 1 {
        let row = &logits[i * vocab..(i + 1) * vocab];
        assert_eq!(moe_core::sample::argmax(row), seen[i + 1], "position {i}");
    }
}

#[test]
fn demo_model_matches_its_transformers_reference() {
    // reference_logits.json was computed by transformers in bf16 on the GPU when the model was
    // trained: the token ids must match exactly, the logits only to bf16 accuracy.
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(demo().join("reference_logits.json")).unwrap()).unwrap();
    let tok = Tokenizer::from_dir(demo()).unwrap();
    let ids = tok.encode(reference["prompt"].as_str().unwrap(), false).unwrap();
    let want_ids: Vec<u32> = reference["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want_ids);
    let model: Model<CpuBackend> = moe_engine::load(&demo(), None, CpuBackend).unwrap();
    let logits = model.forward(&mut model.new_session(), &ids, true, false).unwrap().logits;
    let vocab = model.config.vocab;
    for (i, top) in reference["top5_ids"].as_array().unwrap().iter().enumerate() {
        let row = &logits[i * vocab..(i + 1) * vocab];
        assert_eq!(moe_core::sample::argmax(row) as u64, top[0].as_u64().unwrap(), "top-1 at position {i}");
    }
    let last: Vec<f32> =
        reference["last_logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let got = &logits[(ids.len() - 1) * vocab..];
    let num: f32 = got.iter().zip(&last).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f32 = last.iter().map(|b| b * b).sum();
    assert!((num / den).sqrt() < 0.05, "last-position logits off by {}", (num / den).sqrt());
}
