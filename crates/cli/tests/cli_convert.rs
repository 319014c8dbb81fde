//! `flash-moe convert`, `verify` and `synth` end to end: what they write, what they refuse, and that
//! the source is never touched.

use assert_cmd::Command;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn flash_moe() -> Command {
    Command::cargo_bin("flash-moe").unwrap()
}

/// Runs the binary expecting failure with a one-line error mentioning every needle.
fn fails_with(args: &[&str], needles: &[&str]) {
    let err = rejected(args, needles);
    assert!(err.trim_end().lines().count() == 1, "not a one-line error: {err}");
}

/// Runs the binary expecting failure with an error (clap's usage errors span lines) mentioning
/// every needle.
fn rejected(args: &[&str], needles: &[&str]) -> String {
    let out = flash_moe().args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.starts_with("error: "), "not an error: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "{err:?} does not mention {n:?}");
    }
    err
}

/// Every file under `dir` (relative path -> contents), to show a directory did not change.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// A source model: the `qwen35_moe` fixture's weights with the text fixtures' tokenizer files.
fn source(tmp: &Path) -> PathBuf {
    let src = tmp.join("src");
    std::fs::create_dir(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("qwen35_moe").join(f), src.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(fixture("text").join(f), src.join(f)).unwrap();
    }
    src
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn convert_writes_a_verified_model_with_the_tokenizer_and_leaves_the_source_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(tmp.path());
    let before = snapshot(&src);
    let dst = tmp.path().join("packed");
    let out = flash_moe()
        .args(["convert", "--model", s(&src), "--out", s(&dst), "--experts", "q4", "--dense", "q8"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote") && stdout.contains("tokenizer.json"), "{stdout}");
    assert_eq!(snapshot(&src), before, "the source changed");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert_eq!(std::fs::read(dst.join(f)).unwrap(), before[Path::new(f)], "{f} copied verbatim");
    }
    let out = flash_moe().args(["verify", s(&dst)]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The packed model runs.
    let logits = tmp.path().join("logits.safetensors");
    flash_moe().args(["logits", "--model", s(&dst), "--tokens", "1,2,3", "--out", s(&logits)]).assert().success();
    let bytes = std::fs::read(&logits).unwrap();
    assert_eq!(SafeTensors::deserialize(&bytes).unwrap().tensor("logits").unwrap().shape(), [3, 512]);
}

#[test]
fn convert_refuses_an_existing_destination_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(tmp.path());
    let before = snapshot(&src);
    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    std::fs::write(dst.join("keep.txt"), "mine").unwrap();
    fails_with(
        &["convert", "--model", s(&src), "--out", s(&dst), "--experts", "q2"],
        &["already exists", "--force", s(&dst)],
    );
    assert_eq!(std::fs::read_to_string(dst.join("keep.txt")).unwrap(), "mine", "the destination was touched");

    flash_moe()
        .args(["convert", "--model", s(&src), "--out", s(&dst), "--experts", "q2", "--force"])
        .assert()
        .success();
    assert!(dst.join("manifest.json").is_file() && !dst.join("keep.txt").exists(), "replaced");
    flash_moe().args(["verify", s(&dst)]).assert().success();
    assert_eq!(snapshot(&src), before, "the source changed");
    // Nothing temporary is left beside it.
    let names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-") && !n.contains(".old-")), "{names:?}");

    // Converting a model into itself is refused even with --force.
    fails_with(&["convert", "--model", s(&dst), "--out", s(&dst), "--force"], &["is or contains the source"]);
    flash_moe().args(["verify", s(&dst)]).assert().success();
}

#[test]
fn convert_refuses_unsupported_sources_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("dst");

    let gguf = tmp.path().join("gguf");
    std::fs::create_dir(&gguf).unwrap();
    std::fs::write(gguf.join("model-Q4_K_M.gguf"), b"GGUF").unwrap();
    fails_with(&["convert", "--model", s(&gguf), "--out", s(&dst)], &["unsupported model format", "GGUF"]);

    let llama = tmp.path().join("llama");
    std::fs::create_dir(&llama).unwrap();
    std::fs::write(llama.join("config.json"), r#"{"model_type": "llama", "hidden_size": 64}"#).unwrap();
    fails_with(&["convert", "--model", s(&llama), "--out", s(&dst)], &["unsupported model_type", "llama"]);

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails_with(&["convert", "--model", s(&empty), "--out", s(&dst)], &["no config.json"]);

    rejected(&["convert", "--model", s(&gguf), "--out", s(&dst), "--experts", "q3"], &["q3", "q4"]);
    assert!(!dst.exists());
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 3, "nothing else written");
}

#[test]
fn verify_names_the_damaged_file_and_expert() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("packed");
    flash_moe()
        .args(["convert", "--model", s(&fixture("qwen3_moe")), "--out", s(&dst), "--experts", "q4"])
        .assert()
        .success();
    let path = dst.join("experts/layer_001.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let stride = bytes.len() / 8;
    bytes[5 * stride + 17] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    fails_with(&["verify", s(&dst)], &["layer_001.bin", "damaged expert: 5", "checksum"]);
    fails_with(&["verify", s(&fixture("qwen3_moe"))], &["manifest.json"]);
}

#[test]
fn synth_writes_a_real_shaped_model_that_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("q30");
    let out = flash_moe()
        .args(["synth", "--shape", "qwen3-30b", "--layers", "1", "--experts", "q4", "--vocab", "512", "--out", s(&dst)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inspect = flash_moe().args(["inspect", "--model", s(&dst)]).output().unwrap();
    let text = String::from_utf8_lossy(&inspect.stdout);
    for needle in ["hidden 2048", "32 heads / 4 KV heads x 128", "128 routed x 768 wide, top-8", "2654208 bytes each"] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    let logits = tmp.path().join("logits.safetensors");
    flash_moe().args(["logits", "--model", s(&dst), "--tokens", "7", "--out", s(&logits)]).assert().success();
    let bytes = std::fs::read(&logits).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), [1, 512]);
    assert!(t.data().chunks_exact(4).all(|c| f32::from_le_bytes(c.try_into().unwrap()).is_finite()));

    fails_with(
        &["synth", "--shape", "qwen3-30b", "--layers", "1", "--vocab", "512", "--out", s(&dst)],
        &["already exists"],
    );
    rejected(
        &["synth", "--shape", "llama-7b", "--layers", "1", "--out", s(&tmp.path().join("x"))],
        &["llama-7b", "qwen3.5-397b", "qwen3-30b"],
    );
}
