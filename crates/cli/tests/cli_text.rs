//! `generate` and `chat` end to end with the demo model shipped in models/demo, and their
//! errors on bad input.

use assert_cmd::Command;
use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

fn flash_moe() -> Command {
    let mut c = Command::cargo_bin("flash-moe").unwrap();
    c.current_dir(repo("."));
    c
}

fn run_ok(args: &[&str], stdin: Option<&str>) -> (String, String) {
    let mut cmd = flash_moe();
    cmd.args(args);
    if let Some(s) = stdin {
        cmd.write_stdin(s);
    }
    let out = cmd.output().unwrap();
    let (o, e) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap());
    assert!(out.status.success(), "{args:?} failed: {e}");
    (o, e)
}

fn fails_with(args: &[&str], stdin: Option<&str>, needles: &[&str]) {
    let mut cmd = flash_moe();
    cmd.args(args);
    cmd.write_stdin(stdin.unwrap_or(""));
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    let last = err.trim_end().lines().last().unwrap_or("");
    assert!(last.starts_with("error: ") && !err.contains("panicked"), "{err}");
    for n in needles {
        assert!(last.contains(n), "{last:?} does not mention {n:?}");
    }
}

/// A copy of the demo model whose files a test may change.
fn demo_copy(dir: &Path) -> PathBuf {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &to.join(e.file_name()));
            } else {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
    let to = dir.join("demo");
    copy_dir(&repo("models/demo"), &to);
    to
}

#[test]
fn generate_continues_the_prompt_with_the_default_model() {
    let (out, err) = run_ok(&["generate", "--prompt", "In the beginning", "-n", "24", "--stats"], None);
    assert!(out.starts_with("In the beginning"), "{out}");
    assert!(out.trim().len() > "In the beginning".len() + 10, "{out}");
    assert!(err.contains("generated at"), "{err}");
}

#[test]
fn a_seed_makes_sampling_reproducible() {
    let args = ["generate", "--prompt", "And the LORD said", "-n", "30", "--temperature", "0.9", "--seed", "7"];
    assert_eq!(run_ok(&args, None).0, run_ok(&args, None).0);
}

#[test]
fn prompt_from_standard_input() {
    let (out, _) = run_ok(&["generate", "-n", "5", "--greedy"], Some("Blessed are"));
    assert!(out.starts_with("Blessed are"), "{out}");
}

fn prompt_tokens(stats_line: &str) -> (usize, usize) {
    let num_before = |needle: &str| -> usize {
        let at = stats_line.find(needle).unwrap();
        stats_line[..at].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty()).unwrap().parse().unwrap()
    };
    (num_before(" prompt tokens"), num_before(" generated"))
}

#[test]
fn chat_keeps_the_first_turn_and_processes_only_the_new_one() {
    let input = "Who made the heaven and the earth?\nAnd who is the shepherd?\n";
    let (out, err) = run_ok(&["chat", "--stats", "--greedy", "-n", "20"], Some(input));
    let stats: Vec<&str> = err.lines().filter(|l| l.contains("prompt tokens")).collect();
    assert_eq!(stats.len(), 2, "{err}");
    let (first_prompt, first_generated) = prompt_tokens(stats[0]);
    let (second_prompt, _) = prompt_tokens(stats[1]);
    // Re-processing the first turn would cost at least its prompt and its reply again.
    assert!(second_prompt < first_prompt + first_generated - 1, "turn 2 processed {second_prompt} tokens: {err}");
    assert!(second_prompt >= 8, "turn 2 must at least hold the new question: {second_prompt}");
    assert!(!out.trim().is_empty());
}

#[test]
fn chat_reset_starts_over() {
    let input = "Who made the heaven?\n/reset\nWho made the heaven?\n";
    let (_, err) = run_ok(&["chat", "--stats", "--greedy", "-n", "5"], Some(input));
    let stats: Vec<(usize, usize)> = err.lines().filter(|l| l.contains("prompt tokens")).map(prompt_tokens).collect();
    assert_eq!(stats.len(), 2, "{err}");
    assert_eq!(stats[0].0, stats[1].0, "after /reset the same question is a first turn again");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let m = repo("tests/fixtures/qwen3_moe");
    fails_with(&["generate", "--model", m.to_str().unwrap(), "--prompt", "hi"], None, &["tokenizer.json"]);
}

#[test]
fn empty_prompt_is_a_clear_error() {
    fails_with(&["generate", "--prompt", "  "], None, &["prompt is empty"]);
}

#[test]
fn prompt_longer_than_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let m = demo_copy(dir.path());
    // The packed demo model takes its configuration from the manifest.
    let manifest = std::fs::read_to_string(m.join("manifest.json")).unwrap();
    let shrunk = manifest.replace("\"max_position_embeddings\": 4096", "\"max_position_embeddings\": 8");
    assert_ne!(manifest, shrunk);
    std::fs::write(m.join("manifest.json"), shrunk).unwrap();
    let long = "And it came to pass in those days, that there went out a decree";
    fails_with(&["generate", "--model", m.to_str().unwrap(), "--prompt", long], None, &["context"]);
}

#[test]
fn a_template_that_fails_to_render() {
    let dir = tempfile::tempdir().unwrap();
    let m = demo_copy(dir.path());
    std::fs::write(m.join("chat_template.jinja"), "{{ raise_exception('this template refuses') }}").unwrap();
    fails_with(&["chat", "--model", m.to_str().unwrap()], Some("hello\n"), &["this template refuses"]);
}
