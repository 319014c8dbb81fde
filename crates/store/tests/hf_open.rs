//! `open_hf` on tiny hand-built Hugging Face directories: names, both expert layouts, shards, and
//! one test per kind of bad input.

use moe_core::{DType, Matrix};
use moe_store::{StoreError, open_hf};
use safetensors::{Dtype, serialize_to_file, tensor::TensorView};
use std::collections::BTreeMap;
use std::path::Path;
use tempfile::TempDir;

const HIDDEN: usize = 8;
const INTER: usize = 4;
const EXPERTS: usize = 4;
const LAYERS: usize = 2;
const VOCAB: usize = 16;

fn config(model_type: &str) -> String {
    format!(
        r#"{{"model_type":"{model_type}","hidden_size":{HIDDEN},"num_hidden_layers":{LAYERS},
        "num_attention_heads":2,"num_key_value_heads":1,"head_dim":4,"num_experts":{EXPERTS},
        "num_experts_per_tok":2,"moe_intermediate_size":{INTER},"vocab_size":{VOCAB},"norm_topk_prob":true}}"#
    )
}

/// Tensors as (dtype, shape, little-endian bytes), by name as written in the file.
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn f32s(shape: &[usize], seed: f32) -> (Dtype, Vec<usize>, Vec<u8>) {
    let n: usize = shape.iter().product();
    let bytes = (0..n).flat_map(|k| (seed + k as f32 * 0.25).to_le_bytes()).collect();
    (Dtype::F32, shape.to_vec(), bytes)
}

fn write(path: &Path, tensors: &Tensors) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, (dtype, shape, data))| (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    serialize_to_file(views, None, path).unwrap();
}

/// Per-expert values: expert `e` of layer `l`, projection `p` gets a distinct seed.
fn seed(l: usize, e: usize, p: usize) -> f32 {
    (l * 100 + e * 10 + p) as f32
}

/// Dense tensors and per-expert routed experts, with `prefix` (`model.` or `model.language_model.`).
fn per_expert_model(prefix: &str) -> Tensors {
    let mut t = Tensors::new();
    t.insert(format!("{prefix}embed_tokens.weight"), f32s(&[VOCAB, HIDDEN], 0.5));
    t.insert(format!("{prefix}norm.weight"), f32s(&[HIDDEN], 1.0));
    t.insert("lm_head.weight".into(), f32s(&[VOCAB, HIDDEN], -3.0));
    for l in 0..LAYERS {
        let p = format!("{prefix}layers.{l}.");
        t.insert(format!("{p}input_layernorm.weight"), f32s(&[HIDDEN], 2.0));
        t.insert(format!("{p}mlp.gate.weight"), f32s(&[EXPERTS, HIDDEN], l as f32));
        for e in 0..EXPERTS {
            t.insert(format!("{p}mlp.experts.{e}.gate_proj.weight"), f32s(&[INTER, HIDDEN], seed(l, e, 0)));
            t.insert(format!("{p}mlp.experts.{e}.up_proj.weight"), f32s(&[INTER, HIDDEN], seed(l, e, 1)));
            t.insert(format!("{p}mlp.experts.{e}.down_proj.weight"), f32s(&[HIDDEN, INTER], seed(l, e, 2)));
        }
    }
    t
}

/// The same model with the experts of every layer fused the way the hub stores them.
fn fused_model(prefix: &str) -> Tensors {
    let mut t: Tensors =
        per_expert_model(prefix).into_iter().filter(|(name, _)| !name.contains(".mlp.experts.")).collect();
    for l in 0..LAYERS {
        let (mut gate_up, mut down) = (Vec::new(), Vec::new());
        for e in 0..EXPERTS {
            gate_up.extend(f32s(&[INTER, HIDDEN], seed(l, e, 0)).2);
            gate_up.extend(f32s(&[INTER, HIDDEN], seed(l, e, 1)).2);
            down.extend(f32s(&[HIDDEN, INTER], seed(l, e, 2)).2);
        }
        let p = format!("{prefix}layers.{l}.mlp.experts.");
        t.insert(format!("{p}gate_up_proj"), (Dtype::F32, vec![EXPERTS, 2 * INTER, HIDDEN], gate_up));
        t.insert(format!("{p}down_proj"), (Dtype::F32, vec![EXPERTS, HIDDEN, INTER], down));
    }
    t
}

fn model_dir(tensors: &Tensors) -> TempDir {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("config.json"), config("qwen3_moe")).unwrap();
    write(&dir.path().join("model.safetensors"), tensors);
    dir
}

fn open_error(dir: &Path) -> StoreError {
    match open_hf(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e,
    }
}

fn open_err(dir: &Path) -> String {
    open_error(dir).to_string()
}

fn matrices_equal(a: &Matrix, b: &Matrix) {
    assert_eq!((a.format, a.rows, a.cols), (b.format, b.rows, b.cols));
    assert_eq!(a.to_f32(), b.to_f32());
}

#[test]
fn opens_a_valid_dir_and_reads_values() {
    let dir = model_dir(&per_expert_model("model."));
    let m = open_hf(dir.path()).unwrap();
    assert_eq!((m.config.hidden, m.config.experts, m.config.layers.len()), (HIDDEN, EXPERTS, LAYERS));
    let norm = m.tensors.tensor("norm.weight").unwrap();
    assert_eq!(norm.name, "model.norm.weight");
    assert_eq!(norm.file, dir.path().join("model.safetensors"));
    assert_eq!(norm.dtype, DType::F32);
    assert_eq!(norm.values(&[HIDDEN]).unwrap(), (0..HIDDEN).map(|k| 1.0 + k as f32 * 0.25).collect::<Vec<_>>());
    let gate = m.tensors.tensor("layers.1.mlp.gate.weight").unwrap().matrix(EXPERTS, HIDDEN).unwrap();
    assert_eq!(gate.to_f32()[..3], [1.0, 1.25, 1.5]);

    let e = m.experts.expert(1, 2).unwrap();
    assert_eq!((e.gate.rows, e.gate.cols, e.down.rows, e.down.cols), (INTER, HIDDEN, HIDDEN, INTER));
    assert_eq!(e.up.to_f32()[0], seed(1, 2, 1));
    assert_eq!(e.down.to_f32()[1], seed(1, 2, 2) + 0.25);
    let one = 3 * INTER * HIDDEN * 4;
    assert_eq!(m.experts.expert_bytes(), one);
    assert_eq!(m.experts.total_bytes(), LAYERS * EXPERTS * one);
}

#[test]
fn names_and_dense_bytes_exclude_routed_experts() {
    let dir = model_dir(&fused_model("model.language_model."));
    let m = open_hf(dir.path()).unwrap();
    let names = m.tensors.names();
    assert_eq!(
        names,
        [
            "embed_tokens.weight",
            "layers.0.input_layernorm.weight",
            "layers.0.mlp.gate.weight",
            "layers.1.input_layernorm.weight",
            "layers.1.mlp.gate.weight",
            "lm_head.weight",
            "norm.weight",
        ]
    );
    let bytes = 4 * (2 * VOCAB * HIDDEN + HIDDEN + LAYERS * (HIDDEN + EXPERTS * HIDDEN));
    assert_eq!(m.tensors.dense_bytes(), bytes);
    // Expert tensors stay reachable by name.
    assert!(m.tensors.contains("layers.0.mlp.experts.gate_up_proj"));
}

#[test]
fn both_prefixes_are_dropped_and_ignored_parts_skipped() {
    for prefix in ["model.", "model.language_model."] {
        let mut t = per_expert_model(prefix);
        t.insert("model.visual.blocks.0.attn.qkv.weight".into(), f32s(&[2, 2], 0.0));
        t.insert("mtp.fc.weight".into(), f32s(&[2, 2], 0.0));
        let dir = model_dir(&t);
        let m = open_hf(dir.path()).unwrap();
        let gate = m.tensors.tensor("layers.0.mlp.gate.weight").unwrap();
        assert_eq!(gate.name, format!("{prefix}layers.0.mlp.gate.weight"));
        // The name as written also resolves.
        assert!(m.tensors.contains(&format!("{prefix}layers.0.mlp.gate.weight")));
        assert_eq!(m.tensors.tensor("lm_head.weight").unwrap().values(&[VOCAB, HIDDEN]).unwrap()[0], -3.0);
        assert!(!m.tensors.contains("mtp.fc.weight"));
        assert!(!m.tensors.contains("visual.blocks.0.attn.qkv.weight"));
        assert!(!m.tensors.names().iter().any(|n| n.contains("visual") || n.contains("mtp")));
    }
}

#[test]
fn both_expert_layouts_give_the_same_experts() {
    let split = model_dir(&per_expert_model("model."));
    let fused = model_dir(&fused_model("model.language_model."));
    let (a, b) = (open_hf(split.path()).unwrap(), open_hf(fused.path()).unwrap());
    assert_eq!(a.experts.expert_bytes(), b.experts.expert_bytes());
    assert_eq!(a.experts.total_bytes(), b.experts.total_bytes());
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            let (x, y) = (a.experts.expert(l, e).unwrap(), b.experts.expert(l, e).unwrap());
            matrices_equal(&x.gate, &y.gate);
            matrices_equal(&x.up, &y.up);
            matrices_equal(&x.down, &y.down);
            assert_eq!(y.gate.to_f32()[0], seed(l, e, 0));
            assert_eq!(y.up.to_f32()[0], seed(l, e, 1));
        }
    }
}

#[test]
fn expert_ids_out_of_range_are_errors() {
    let dir = model_dir(&fused_model("model."));
    let m = open_hf(dir.path()).unwrap();
    for (l, e) in [(LAYERS, 0), (0, EXPERTS), (usize::MAX, usize::MAX)] {
        let err = m.experts.expert(l, e).unwrap_err().to_string();
        assert!(err.contains(&format!("layers.{l}.mlp.experts.{e}")), "{err}");
    }
}

#[test]
fn sharded_dir_with_index() {
    let all = fused_model("model.language_model.");
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("config.json"), config("qwen3_moe")).unwrap();
    let (mut one, mut two) = (Tensors::new(), Tensors::new());
    let mut weight_map = serde_json::Map::new();
    for (k, (name, t)) in all.into_iter().enumerate() {
        let shard = if k % 2 == 0 { "model-00001-of-00002.safetensors" } else { "model-00002-of-00002.safetensors" };
        weight_map.insert(name.clone(), shard.into());
        if k % 2 == 0 {
            one.insert(name, t)
        } else {
            two.insert(name, t)
        };
    }
    // A shard holding only the vision tower may be left out of a text-only download.
    weight_map.insert("model.visual.patch_embed.weight".into(), "model-00003-of-00003.safetensors".into());
    write(&dir.path().join("model-00001-of-00002.safetensors"), &one);
    write(&dir.path().join("model-00002-of-00002.safetensors"), &two);
    // A stray file the index does not name is not read.
    std::fs::write(dir.path().join("stray.safetensors"), b"garbage").unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();

    let m = open_hf(dir.path()).unwrap();
    let reference = model_dir(&fused_model("model."));
    let r = open_hf(reference.path()).unwrap();
    assert_eq!(m.tensors.names(), r.tensors.names());
    assert_eq!(m.tensors.dense_bytes(), r.tensors.dense_bytes());
    for name in r.tensors.names() {
        let (x, y) = (m.tensors.tensor(&name).unwrap(), r.tensors.tensor(&name).unwrap());
        assert_eq!((&x.shape, &*x.data), (&y.shape, &*y.data), "{name}");
    }
    let files: std::collections::HashSet<_> =
        r.tensors.names().iter().map(|n| m.tensors.tensor(n).unwrap().file).collect();
    assert_eq!(files.len(), 2);
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            matrices_equal(&m.experts.expert(l, e).unwrap().down, &r.experts.expert(l, e).unwrap().down);
        }
    }
}

#[test]
fn missing_config() {
    let dir = TempDir::new().unwrap();
    write(&dir.path().join("model.safetensors"), &per_expert_model("model."));
    let e = open_error(dir.path());
    assert!(matches!(e, StoreError::MissingConfig(_)), "{e:?}");
    assert!(e.to_string().contains(&dir.path().display().to_string()) && e.to_string().contains("config.json"));
}

#[test]
fn unknown_model_type() {
    let dir = model_dir(&per_expert_model("model."));
    std::fs::write(dir.path().join("config.json"), config("llama")).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("config.json") && e.contains("\"llama\""), "{e}");
}

#[test]
fn missing_tensor() {
    let dir = model_dir(&per_expert_model("model."));
    let m = open_hf(dir.path()).unwrap();
    let e = m.tensors.tensor("layers.0.self_attn.q_proj.weight").unwrap_err();
    assert!(matches!(e, StoreError::MissingTensor { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("\"layers.0.self_attn.q_proj.weight\"") && e.contains(&dir.path().display().to_string()), "{e}");
}

#[test]
fn missing_expert_fails_at_open() {
    let mut t = per_expert_model("model.");
    t.remove("model.layers.1.mlp.experts.3.up_proj.weight");
    let e = open_err(model_dir(&t).path());
    assert!(e.contains("\"layers.1.mlp.experts.3.up_proj.weight\"") && e.contains("not found"), "{e}");

    let mut t = fused_model("model.");
    t.remove("model.layers.0.mlp.experts.down_proj");
    let e = open_err(model_dir(&t).path());
    assert!(e.contains("\"layers.0.mlp.experts.down_proj\""), "{e}");

    let t: Tensors =
        per_expert_model("model.").into_iter().filter(|(n, _)| !n.contains("layers.1.mlp.experts")).collect();
    let e = open_err(model_dir(&t).path());
    assert!(e.contains("layers.1.mlp.experts.0.gate_proj.weight"), "{e}");
}

#[test]
fn wrong_shape() {
    let dir = model_dir(&per_expert_model("model."));
    let m = open_hf(dir.path()).unwrap();
    let e = m.tensors.tensor("norm.weight").unwrap().matrix(2, 4).unwrap_err();
    assert!(matches!(e, StoreError::Shape { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("model.safetensors") && e.contains("\"model.norm.weight\"") && e.contains("[2, 4]"), "{e}");

    // A misshapen expert is an open-time error.
    let mut t = fused_model("model.");
    t.insert("model.layers.1.mlp.experts.down_proj".into(), f32s(&[EXPERTS, INTER, HIDDEN], 0.0));
    let e = open_err(model_dir(&t).path());
    assert!(e.contains("model.safetensors") && e.contains("\"model.layers.1.mlp.experts.down_proj\""), "{e}");
    assert!(e.contains(&format!("{:?}", [EXPERTS, HIDDEN, INTER])), "{e}");

    let mut t = per_expert_model("model.");
    t.insert("model.layers.0.mlp.experts.2.gate_proj.weight".into(), f32s(&[HIDDEN, INTER], 0.0));
    let e = open_err(model_dir(&t).path());
    assert!(e.contains("\"model.layers.0.mlp.experts.2.gate_proj.weight\""), "{e}");
}

#[test]
fn unsupported_dtype_is_an_error_only_when_requested() {
    let mut t = per_expert_model("model.");
    t.insert("model.layers.0.self_attn.q_proj.weight".into(), (Dtype::I8, vec![4, 8], vec![1; 32]));
    t.insert("model.layers.0.self_attn.k_proj.weight".into(), (Dtype::F8_E4M3, vec![4, 8], vec![1; 32]));
    let dir = model_dir(&t);
    let m = open_hf(dir.path()).unwrap();
    assert!(m.tensors.names().contains(&"layers.0.self_attn.q_proj.weight".to_string()));
    for (name, dtype) in [("q_proj", "I8"), ("k_proj", "F8_E4M3")] {
        let e = m.tensors.tensor(&format!("layers.0.self_attn.{name}.weight")).unwrap_err();
        assert!(matches!(e, StoreError::DType { .. }), "{e:?}");
        let e = e.to_string();
        assert!(
            e.contains("model.safetensors") && e.contains(&format!("\"model.layers.0.self_attn.{name}.weight\"")),
            "{e}"
        );
        assert!(e.contains(dtype), "{e}");
    }
    // The other tensors still read.
    assert!(m.tensors.tensor("norm.weight").is_ok());

    // An expert of an unsupported dtype fails the open.
    let mut t = fused_model("model.");
    t.insert(
        "model.layers.1.mlp.experts.gate_up_proj".into(),
        (Dtype::U8, vec![EXPERTS, 2 * INTER, HIDDEN], vec![0; 256]),
    );
    let e = open_err(model_dir(&t).path());
    assert!(e.contains("\"model.layers.1.mlp.experts.gate_up_proj\"") && e.contains("U8"), "{e}");
}

#[test]
fn half_precision_experts() {
    // bf16 fused experts: the matrices keep the dtype and the sub-ranges are right.
    let mut t = fused_model("model.");
    for l in 0..LAYERS {
        for part in ["gate_up_proj", "down_proj"] {
            let (_, shape, data) = t.remove(&format!("model.layers.{l}.mlp.experts.{part}")).unwrap();
            let bf: Vec<u8> = data
                .chunks_exact(4)
                .flat_map(|c| (u32::from_le_bytes(c.try_into().unwrap()) >> 16).to_le_bytes()[..2].to_vec())
                .collect();
            t.insert(format!("model.layers.{l}.mlp.experts.{part}"), (Dtype::BF16, shape, bf));
        }
    }
    let m = open_hf(model_dir(&t).path()).unwrap();
    assert_eq!(m.experts.expert_bytes(), 3 * INTER * HIDDEN * 2);
    let e = m.experts.expert(1, 3).unwrap();
    assert_eq!(e.gate.format, moe_core::WeightFormat::Float(DType::BF16));
    assert_eq!(e.up.to_f32()[0], seed(1, 3, 1));
    assert_eq!(e.down.to_f32()[0], seed(1, 3, 2));
}

#[test]
fn truncated_safetensors_file() {
    let dir = model_dir(&per_expert_model("model."));
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    // Cut in the data, past the header.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = open_error(dir.path());
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    // Cut inside the header, and shorter than the header length.
    for len in [100, 5, 0] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        let e = open_err(dir.path());
        assert!(e.contains("model.safetensors") && e.contains("corrupt or truncated"), "{e}");
    }
}

#[test]
fn corrupt_header() {
    let dir = model_dir(&per_expert_model("model."));
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, b"this is not a safetensors file, just some garbage bytes").unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("past the end"), "{e}");

    // A plausible header length over garbage JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{\"a\": garbage!!}");
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("JSON"), "{e}");

    // Offsets that disagree with shape and dtype.
    let header = r#"{"model.norm.weight":{"dtype":"F32","shape":[8],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&path, &bytes).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("\"model.norm.weight\"") && e.contains("expected 32"), "{e}");
}

#[test]
fn shard_listed_in_index_but_missing() {
    let dir = model_dir(&fused_model("model."));
    let mut weight_map = serde_json::Map::new();
    weight_map.insert("model.norm.weight".into(), "model.safetensors".into());
    weight_map.insert("model.layers.0.mlp.gate.weight".into(), "model-00002-of-00002.safetensors".into());
    let index = serde_json::json!({"weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = open_error(dir.path());
    assert!(matches!(e, StoreError::Io { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains(&dir.path().join("model-00002-of-00002.safetensors").display().to_string()), "{e}");
}

#[test]
fn index_naming_the_wrong_shard() {
    let dir = model_dir(&fused_model("model."));
    write(&dir.path().join("other.safetensors"), &[("x".to_string(), f32s(&[2], 0.0))].into_iter().collect());
    let index = serde_json::json!({"weight_map": {
        "model.norm.weight": "model.safetensors",
        "model.embed_tokens.weight": "other.safetensors",
    }});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors.index.json") && e.contains("model.embed_tokens.weight"), "{e}");
    assert!(e.contains("other.safetensors"), "{e}");

    std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"weight_map":{"a":"../x.safetensors"}}"#)
        .unwrap();
    let e = open_err(dir.path());
    assert!(e.contains("model.safetensors.index.json") && e.contains("../x.safetensors"), "{e}");
}

#[test]
fn duplicate_names_after_prefix_stripping() {
    let mut t = per_expert_model("model.");
    t.insert("model.language_model.norm.weight".into(), f32s(&[HIDDEN], 0.0));
    let e = open_err(model_dir(&t).path());
    assert!(e.contains("model.safetensors") && e.contains("norm.weight") && e.contains("second time"), "{e}");
}

#[test]
fn dir_without_safetensors() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("config.json"), config("qwen3_moe")).unwrap();
    let e = open_err(dir.path());
    assert!(e.contains(&dir.path().display().to_string()) && e.contains("no *.safetensors"), "{e}");
    let e = open_err(&dir.path().join("nope"));
    assert!(e.contains("nope"), "{e}");
}
