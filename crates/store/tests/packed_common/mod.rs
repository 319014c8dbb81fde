//! An in-memory model source for the packed-format tests: a `qwen3_moe` config (hidden 64, expert
//! inter 32, 4 experts, 2 layers) with random weights, served through `TensorSource` and
//! `ExpertSource` without any safetensors reader.
#![allow(dead_code)]

use moe_core::format::f32_to_bf16_bits;
use moe_core::{Bytes, DType, Matrix, ModelConfig};
use moe_store::{Expert, ExpertSource, ModelFiles, StoreError, Tensor, TensorSource};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const CONFIG: &str = r#"{
  "model_type": "qwen3_moe",
  "hidden_size": 64,
  "num_hidden_layers": 2,
  "num_attention_heads": 4,
  "num_key_value_heads": 2,
  "head_dim": 8,
  "num_experts": 4,
  "num_experts_per_tok": 2,
  "moe_intermediate_size": 32,
  "vocab_size": 96,
  "rms_norm_eps": 1e-06,
  "tie_word_embeddings": false
}
"#;

pub const HIDDEN: usize = 64;
pub const INTER: usize = 32;
pub const EXPERTS: usize = 4;
pub const LAYERS: usize = 2;

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Roughly normal-ish in [-0.24, 0.24): a sum of uniforms, like small weights.
    pub fn weight(&mut self) -> f32 {
        let u = |r: &mut Self| (r.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        (u(self) + u(self) + u(self)) * 0.16
    }
}

pub fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| f32_to_bf16_bits(x).to_le_bytes()).collect()
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub struct MemTensors {
    pub dir: PathBuf,
    pub tensors: Vec<Tensor>,
}

impl TensorSource for MemTensors {
    fn tensor(&self, name: &str) -> Result<Tensor, StoreError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .cloned()
            .ok_or_else(|| StoreError::MissingTensor { tensor: name.into(), dir: self.dir.clone() })
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.iter().any(|t| t.name == name)
    }
    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }
    fn dense_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}

pub struct MemExperts {
    pub dir: PathBuf,
    pub layers: Vec<Vec<Expert>>,
    /// Fail when this layer is asked for (to test clean-up after a source error).
    pub fail_at_layer: Option<usize>,
}

impl ExpertSource for MemExperts {
    fn expert(&self, layer: usize, expert: usize) -> Result<Expert, StoreError> {
        if self.fail_at_layer == Some(layer) {
            return Err(StoreError::Corrupt { file: self.dir.join("experts.bin"), why: "injected failure".into() });
        }
        self.layers.get(layer).and_then(|l| l.get(expert)).cloned().ok_or_else(|| StoreError::MissingTensor {
            tensor: format!("layers.{layer}.mlp.experts.{expert}"),
            dir: self.dir.clone(),
        })
    }
    fn expert_bytes(&self) -> usize {
        self.layers[0][0].byte_len()
    }
    fn total_bytes(&self) -> usize {
        self.layers.iter().flatten().map(Expert::byte_len).sum()
    }
}

fn tensor(dir: &Path, name: &str, dtype: DType, shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let vals: Vec<f32> = (0..n).map(|_| rng.weight()).collect();
    let data = match dtype {
        DType::BF16 => bf16_bytes(&vals),
        DType::F32 => f32_bytes(&vals),
        DType::F16 => unimplemented!(),
    };
    Tensor { name: name.into(), file: dir.join("memory"), dtype, shape: shape.to_vec(), data: Bytes::from_vec(data) }
}

fn matrix(rows: usize, cols: usize, rng: &mut Rng) -> Matrix {
    let vals: Vec<f32> = (0..rows * cols).map(|_| rng.weight()).collect();
    Matrix::float(DType::BF16, rows, cols, Bytes::from_vec(bf16_bytes(&vals)))
}

/// The dense tensors of the test model, in source order. Besides the qwen3_moe tensors there is
/// an f32 `A_log` (kept f32 whatever the format) and a `[8, 48]` matrix whose rows no group
/// divides (kept bf16 under q8).
pub fn dense_tensors(dir: &Path, seed: u64) -> Vec<Tensor> {
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    let bf = DType::BF16;
    out.push(tensor(dir, "embed_tokens.weight", bf, &[96, HIDDEN], &mut rng));
    for l in 0..LAYERS {
        let p = |s: &str| format!("layers.{l}.{s}");
        out.push(tensor(dir, &p("input_layernorm.weight"), bf, &[HIDDEN], &mut rng));
        out.push(tensor(dir, &p("self_attn.q_proj.weight"), bf, &[32, HIDDEN], &mut rng));
        out.push(tensor(dir, &p("self_attn.k_proj.weight"), bf, &[16, HIDDEN], &mut rng));
        out.push(tensor(dir, &p("self_attn.v_proj.weight"), bf, &[16, HIDDEN], &mut rng));
        out.push(tensor(dir, &p("self_attn.o_proj.weight"), bf, &[HIDDEN, 32], &mut rng));
        out.push(tensor(dir, &p("self_attn.q_norm.weight"), bf, &[8], &mut rng));
        out.push(tensor(dir, &p("self_attn.k_norm.weight"), bf, &[8], &mut rng));
        out.push(tensor(dir, &p("post_attention_layernorm.weight"), bf, &[HIDDEN], &mut rng));
        out.push(tensor(dir, &p("mlp.gate.weight"), bf, &[EXPERTS, HIDDEN], &mut rng));
    }
    out.push(tensor(dir, "layers.0.linear_attn.A_log", DType::F32, &[4], &mut rng));
    out.push(tensor(dir, "layers.1.odd_proj.weight", bf, &[8, 48], &mut rng));
    out.push(tensor(dir, "norm.weight", bf, &[HIDDEN], &mut rng));
    out.push(tensor(dir, "lm_head.weight", bf, &[96, HIDDEN], &mut rng));
    out
}

pub fn experts(seed: u64) -> Vec<Vec<Expert>> {
    let mut rng = Rng(seed);
    (0..LAYERS)
        .map(|_| {
            (0..EXPERTS)
                .map(|_| Expert {
                    gate: matrix(INTER, HIDDEN, &mut rng),
                    up: matrix(INTER, HIDDEN, &mut rng),
                    down: matrix(HIDDEN, INTER, &mut rng),
                })
                .collect()
        })
        .collect()
}

/// Writes `config.json` (and a small `tokenizer.json`) into `dir` and returns the in-memory model.
pub fn source(dir: &Path) -> ModelFiles {
    source_failing_at(dir, None)
}

pub fn source_failing_at(dir: &Path, fail_at_layer: Option<usize>) -> ModelFiles {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": {}}\n").unwrap();
    ModelFiles {
        dir: dir.to_path_buf(),
        config: ModelConfig::from_json(CONFIG).unwrap(),
        tensors: Arc::new(MemTensors { dir: dir.to_path_buf(), tensors: dense_tensors(dir, 7) }),
        experts: Arc::new(MemExperts { dir: dir.to_path_buf(), layers: experts(11), fail_at_layer }),
    }
}

/// Entries of `dir` whose names contain `.tmp-` (left-over temporary directories).
pub fn temp_dirs(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

pub fn no_progress() -> impl FnMut(u64, u64) {
    |_, _| {}
}
