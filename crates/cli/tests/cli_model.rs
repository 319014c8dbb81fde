//! The `logits` and `inspect` commands end to end, and their errors on bad input.

use assert_cmd::Command;
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn flash_moe() -> Command {
    Command::cargo_bin("flash-moe").unwrap()
}

fn f32s(bytes: &[u8], name: &str) -> Vec<f32> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensor(name).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// A writable copy of a fixture's model files.
fn copy_fixture(name: &str, to: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(f), to.join(f)).unwrap();
    }
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = flash_moe().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "not a one-line error: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{err:?} does not mention {n:?}");
    }
}

#[test]
fn logits_match_the_reference_through_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let reference = std::fs::read(fixture("qwen35_moe").join("reference.safetensors")).unwrap();
    let want = f32s(&reference, "logits");
    let ids: Vec<String> = SafeTensors::deserialize(&reference)
        .unwrap()
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()).to_string())
        .collect();
    let ids = ids[..20].join(",");
    for decode in [false, true] {
        let out = dir.path().join(format!("logits-{decode}.safetensors"));
        let mut cmd = flash_moe();
        cmd.args(["logits", "--model"]).arg(fixture("qwen35_moe")).args(["--tokens", &ids, "--out"]).arg(&out);
        if decode {
            cmd.arg("--decode");
        }
        cmd.assert().success();
        let got = f32s(&std::fs::read(&out).unwrap(), "logits");
        assert_eq!(got.len(), 20 * 512);
        let num: f32 = got.iter().zip(&want).map(|(a, b)| (a - b) * (a - b)).sum();
        let den: f32 = want[..got.len()].iter().map(|b| b * b).sum();
        assert!((num / den).sqrt() < 1e-4, "decode={decode}: relative error {}", (num / den).sqrt());
    }
}

#[test]
fn inspect_describes_the_model() {
    let out = flash_moe().args(["inspect", "--model"]).arg(fixture("qwen3_next")).output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in ["qwen3_next", "DDDA", "8 routed x 32 wide, top-2", "12288 bytes each"] {
        assert!(text.contains(needle), "{text}");
    }
}

#[test]
fn token_ids_out_of_range() {
    let m = fixture("qwen3_moe");
    fails_with(
        &["logits", "--model", m.to_str().unwrap(), "--tokens", "1,512", "--out", "/dev/null"],
        &["512", "out of range"],
    );
}

#[test]
fn missing_config_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("qwen3_moe").join("model.safetensors"), dir.path().join("model.safetensors")).unwrap();
    fails_with(&["inspect", "--model", dir.path().to_str().unwrap()], &["config.json"]);
}

#[test]
fn unknown_model_type() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap().replace("\"qwen3_moe\"", "\"gpt2\"");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    fails_with(&["inspect", "--model", dir.path().to_str().unwrap()], &["config.json", "gpt2"]);
}

#[test]
fn wrong_config_dimension_is_a_shape_error_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"moe_intermediate_size\": 32", "\"moe_intermediate_size\": 48");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    fails_with(
        &["logits", "--model", dir.path().to_str().unwrap(), "--tokens", "1", "--out", "/dev/null"],
        &["model.safetensors", "experts", "shape"],
    );
}

#[test]
fn truncated_weights() {
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", dir.path());
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    fails_with(
        &["logits", "--model", dir.path().to_str().unwrap(), "--tokens", "1", "--out", "/dev/null"],
        &["model.safetensors", "truncated"],
    );
}

#[test]
fn missing_tensor_is_named() {
    // The tied fixture has no lm_head; claiming it is untied must name the missing tensor.
    let dir = tempfile::tempdir().unwrap();
    copy_fixture("qwen3_moe", dir.path());
    let cfg = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"tie_word_embeddings\": true", "\"tie_word_embeddings\": false");
    std::fs::write(dir.path().join("config.json"), cfg).unwrap();
    fails_with(
        &["logits", "--model", dir.path().to_str().unwrap(), "--tokens", "1", "--out", "/dev/null"],
        &["lm_head.weight"],
    );
}

#[test]
fn experts_per_token_out_of_range() {
    let m = fixture("qwen3_moe");
    fails_with(
        &["logits", "--model", m.to_str().unwrap(), "--tokens", "1", "--out", "/dev/null", "--experts-per-token", "9"],
        &["experts-per-token"],
    );
}
