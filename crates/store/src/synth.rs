//! Synthetic packed models: the real per-layer shapes of a Qwen MoE model with random weights and
//! any number of layers, so that speed can be measured at real sizes without the real weights
//! (`flash-moe synth`).
//!
//! The model is a [`ModelFiles`] whose tensors and experts are generated on demand from a seed,
//! written by the packed writer like any other source: dense tensors one at a time, experts one at
//! a time (so memory stays at one dense tensor plus a few expert records), already in the target
//! formats so that the writer only copies. Weights are uniform and zero-mean with a spread of
//! `sqrt(3 / cols)` (unit gain per matrix), quantised ones drawn directly as random codes with a
//! per-group bf16 scale around `2 * sqrt(3 / cols) / (2^bits - 1)` and bias `-scale * (2^bits -
//! 1) / 2`, so activations stay finite through any number of layers. Norms are near their
//! identity value, `A_log` is `ln U(1, 16)`.

use crate::packed::{ExtraData, ExtraFile, Origin, affine_group, keeps_float, write_packed_with};
use crate::{DenseFormat, Expert, ExpertFormat, ExpertSource, ModelFiles, StoreError, Tensor, TensorSource};
use moe_core::format::f32_to_bf16_bits;
use moe_core::quant::code_bytes;
use moe_core::{Bytes, DType, Family, Matrix, ModelConfig, WeightFormat};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// The dimensions of a model family member (model-spec.md section 1.3).
#[derive(Clone, Debug, PartialEq)]
pub struct SynthShape {
    /// The preset's name (`qwen3.5-397b`, ...), recorded in the config.
    pub name: String,
    pub family: Family,
    pub hidden: usize,
    /// Layers of the real model (a synthetic one may have fewer).
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// GatedDeltaNet key and value heads and their widths (hybrid families; 0 otherwise).
    pub delta_k_heads: usize,
    pub delta_v_heads: usize,
    pub delta_k_dim: usize,
    pub delta_v_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub expert_inter: usize,
    pub shared_inter: Option<usize>,
    pub vocab: usize,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
}

impl SynthShape {
    /// The names [`SynthShape::preset`] knows.
    pub const PRESETS: [&'static str; 5] =
        ["qwen3.5-397b", "qwen3.5-122b", "qwen3.5-35b", "qwen3-next-80b", "qwen3-30b"];

    /// The same family and layer structure at toy sizes (hidden 128, 4/2 heads of 32, DeltaNet
    /// 2/4 heads of 32, experts 64 wide), for tests and smoke runs.
    pub fn miniature(&self, experts: usize, top_k: usize, vocab: usize) -> SynthShape {
        let hybrid = self.family != Family::Qwen3Moe;
        let if_hybrid = |n: usize| if hybrid { n } else { 0 };
        SynthShape {
            hidden: 128,
            heads: 4,
            kv_heads: 2,
            head_dim: 32,
            delta_k_heads: if_hybrid(2),
            delta_v_heads: if_hybrid(4),
            delta_k_dim: if_hybrid(32),
            delta_v_dim: if_hybrid(32),
            experts,
            top_k,
            expert_inter: 64,
            shared_inter: self.shared_inter.map(|_| 64),
            vocab,
            ..self.clone()
        }
    }

    /// Qwen3.5-397B-A17B, Qwen3.5-122B-A10B, Qwen3.5-35B-A3B, Qwen3-Next-80B-A3B or Qwen3-30B-A3B.
    pub fn preset(name: &str) -> Option<SynthShape> {
        #[rustfmt::skip]
        let (family, hidden, layers, heads, kv_heads, head_dim, dk, dv, experts, top_k, inter, shared, vocab, theta) = match name {
            "qwen3.5-397b" => (Family::Qwen35Moe, 4096, 60, 32, 2, 256, 16, 64, 512, 10, 1024, Some(1024), 248_320, 1e7),
            "qwen3.5-122b" => (Family::Qwen35Moe, 3072, 48, 32, 2, 256, 16, 64, 256, 8, 1024, Some(1024), 248_320, 1e7),
            "qwen3.5-35b" => (Family::Qwen35Moe, 2048, 40, 16, 2, 256, 16, 32, 256, 8, 512, Some(512), 248_320, 1e7),
            "qwen3-next-80b" => (Family::Qwen3Next, 2048, 48, 16, 2, 256, 16, 32, 512, 10, 512, Some(512), 151_936, 1e7),
            "qwen3-30b" => (Family::Qwen3Moe, 2048, 48, 32, 4, 128, 0, 0, 128, 8, 768, None, 151_936, 1e6),
            _ => return None,
        };
        let hybrid = family != Family::Qwen3Moe;
        Some(SynthShape {
            name: name.to_string(),
            family,
            hidden,
            layers,
            heads,
            kv_heads,
            head_dim,
            delta_k_heads: dk,
            delta_v_heads: dv,
            delta_k_dim: if hybrid { 128 } else { 0 },
            delta_v_dim: if hybrid { 128 } else { 0 },
            experts,
            top_k,
            expert_inter: inter,
            shared_inter: shared,
            vocab,
            rope_theta: theta,
            tie_embeddings: false,
        })
    }

    /// The `config.json` of this shape with `layers` layers (every fourth one full attention in
    /// the hybrid families, as in the real models).
    pub fn config_json(&self, layers: usize, seed: u64) -> String {
        let synthetic = json!({ "shape": self.name, "seed": seed, "real_layers": self.layers });
        let mut c = match self.family {
            Family::Qwen3Moe => json!({
                "architectures": ["Qwen3MoeForCausalLM"],
                "model_type": "qwen3_moe",
                "hidden_size": self.hidden,
                "num_hidden_layers": layers,
                "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim,
                "num_experts": self.experts,
                "num_experts_per_tok": self.top_k,
                "moe_intermediate_size": self.expert_inter,
                "norm_topk_prob": true,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "vocab_size": self.vocab,
                "rms_norm_eps": 1e-6,
                "rope_theta": self.rope_theta,
                "max_position_embeddings": 40960,
                "tie_word_embeddings": self.tie_embeddings,
                "dtype": "bfloat16",
            }),
            Family::Qwen35Moe | Family::Qwen3Next => {
                let types: Vec<&str> =
                    (0..layers).map(|i| if (i + 1) % 4 == 0 { "full_attention" } else { "linear_attention" }).collect();
                let (arch, model_type) = if self.family == Family::Qwen3Next {
                    ("Qwen3NextForCausalLM", "qwen3_next")
                } else {
                    ("Qwen3_5MoeForCausalLM", "qwen3_5_moe_text")
                };
                json!({
                    "architectures": [arch],
                    "model_type": model_type,
                    "hidden_size": self.hidden,
                    "num_hidden_layers": layers,
                    "layer_types": types,
                    "full_attention_interval": 4,
                    "num_attention_heads": self.heads,
                    "num_key_value_heads": self.kv_heads,
                    "head_dim": self.head_dim,
                    "linear_num_key_heads": self.delta_k_heads,
                    "linear_num_value_heads": self.delta_v_heads,
                    "linear_key_head_dim": self.delta_k_dim,
                    "linear_value_head_dim": self.delta_v_dim,
                    "linear_conv_kernel_dim": 4,
                    "num_experts": self.experts,
                    "num_experts_per_tok": self.top_k,
                    "moe_intermediate_size": self.expert_inter,
                    "shared_expert_intermediate_size": self.shared_inter.unwrap_or(0),
                    "norm_topk_prob": true,
                    "decoder_sparse_step": 1,
                    "mlp_only_layers": [],
                    "vocab_size": self.vocab,
                    "rms_norm_eps": 1e-6,
                    "max_position_embeddings": 262144,
                    "tie_word_embeddings": self.tie_embeddings,
                    "rope_parameters": {
                        "rope_type": "default",
                        "rope_theta": self.rope_theta,
                        "partial_rotary_factor": 0.25
                    },
                    "dtype": "bfloat16",
                })
            }
        };
        c["flash_moe_synthetic"] = synthetic;
        let mut text = serde_json::to_string_pretty(&c).expect("the config serialises");
        text.push('\n');
        text
    }
}

impl FromStr for SynthShape {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SynthShape::preset(s)
            .ok_or_else(|| format!("unknown shape {s:?} (expected one of {})", SynthShape::PRESETS.join(", ")))
    }
}

/// Writes a packed model of `shape` with `layers` layers and random weights (from `seed`) to
/// `out`, experts in `experts` format and dense matrices in `dense` format, with the same
/// guarantees as [`crate::write_packed`] (temporary directory renamed at the end, `force` to
/// replace an existing `out`). No tokenizer is written. `progress(done, total)` counts output
/// bytes.
#[allow(clippy::too_many_arguments)]
pub fn write_synthetic(
    shape: &SynthShape,
    layers: usize,
    experts: ExpertFormat,
    dense: DenseFormat,
    out: &Path,
    seed: u64,
    force: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), StoreError> {
    let config_text = shape.config_json(layers.max(1), seed);
    let dir = PathBuf::from(format!("<synthetic {}>", shape.name));
    let config = ModelConfig::from_json(&config_text)
        .map_err(|source| StoreError::Config { path: dir.join("config.json"), source })?;
    if layers == 0 {
        return Err(StoreError::Corrupt { file: dir, why: "a model needs at least one layer".into() });
    }
    let tensors = SynthTensors::new(shape, &config, dense, seed);
    let src_experts = SynthExperts::new(&config, experts, seed);
    let src = ModelFiles { dir, config, tensors: Arc::new(tensors), experts: Arc::new(src_experts) };
    let origin = Origin {
        label: format!("synthetic {} ({layers} layers, random weights, seed {seed})", shape.name),
        config: config_text.clone(),
        files: vec![ExtraFile {
            name: "config.json".into(),
            len: config_text.len() as u64,
            data: ExtraData::Bytes(config_text.into_bytes()),
        }],
    };
    write_packed_with(&src, &origin, out, experts, dense, force, progress)
}

// ------------------------------------------------------------------------------------------------
// Random data

/// xorshift64*: fast and good enough for weights nobody reads.
struct Rng(u64);

impl Rng {
    /// A generator for the stream named by `parts` under `seed` (splitmix64 over the parts).
    fn new(seed: u64, parts: &[u64]) -> Rng {
        let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
        for &p in parts {
            x = splitmix(x ^ p);
        }
        Rng(splitmix(x) | 1)
    }

    #[inline]
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    #[inline]
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [-a, a).
    #[inline]
    fn sym(&mut self, a: f32) -> f32 {
        (2.0 * self.unit() - 1.0) * a
    }

    fn fill(&mut self, out: &mut [u8]) {
        let mut chunks = out.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of a tensor name, to seed its stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01B3))
}

/// Spread of a random matrix with rows of `cols` elements: unit gain (`var = 1 / cols`).
fn spread(cols: usize) -> f32 {
    (3.0 / cols as f32).sqrt()
}

/// A random `[rows, cols]` matrix in `format` (bf16 or affine).
fn random_matrix(format: WeightFormat, rows: usize, cols: usize, rng: &mut Rng) -> Matrix {
    let a = spread(cols);
    match format {
        WeightFormat::Float(_) => {
            let mut data = vec![0u8; rows * cols * 2];
            for c in data.chunks_exact_mut(2) {
                c.copy_from_slice(&((rng.sym(a).to_bits() >> 16) as u16).to_le_bytes());
            }
            Matrix::float(DType::BF16, rows, cols, Bytes::from_vec(data))
        }
        WeightFormat::Affine { bits, group } => {
            let mut codes = vec![0u8; code_bytes(rows, cols, bits)];
            rng.fill(&mut codes);
            let groups = rows * cols / group;
            let top = ((1u32 << bits) - 1) as f32;
            let (mut scales, mut biases) = (Vec::with_capacity(2 * groups), Vec::with_capacity(2 * groups));
            for _ in 0..groups {
                let s = 2.0 * a / top * (0.75 + 0.5 * rng.unit());
                let s_bits = f32_to_bf16_bits(s);
                let s = f32::from_bits((s_bits as u32) << 16);
                scales.extend_from_slice(&s_bits.to_le_bytes());
                biases.extend_from_slice(&f32_to_bf16_bits(-s * top / 2.0).to_le_bytes());
            }
            Matrix {
                format,
                rows,
                cols,
                data: Bytes::from_vec(codes),
                scales: Bytes::from_vec(scales),
                biases: Bytes::from_vec(biases),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The synthetic source

#[derive(Clone, Copy, Debug)]
enum Fill {
    /// A weight matrix (random, unit gain).
    Matrix,
    /// Values around `center`, within `center ± spread`.
    Around { center: f32, spread: f32 },
    /// `ln U(1, 16)`, like `A_log`.
    LogUniform,
}

struct Spec {
    shape: Vec<usize>,
    format: WeightFormat,
    fill: Fill,
}

struct SynthTensors {
    dir: PathBuf,
    seed: u64,
    names: Vec<String>,
    specs: HashMap<String, Spec>,
}

impl SynthTensors {
    fn new(shape: &SynthShape, c: &ModelConfig, dense: DenseFormat, seed: u64) -> Self {
        let mut list: Vec<(String, Vec<usize>, Fill)> = Vec::new();
        let h = c.hidden;
        let norm = Fill::Around { center: 1.0 - c.family.norm_offset(), spread: 0.05 };
        let plain_norm = Fill::Around { center: 1.0, spread: 0.05 };
        let m = Fill::Matrix;
        list.push(("embed_tokens.weight".into(), vec![c.vocab, h], m));
        for (l, kind) in c.layers.iter().enumerate() {
            let mut layer: Vec<(String, Vec<usize>, Fill)> = Vec::new();
            let mut add = |name: &str, shape: &[usize], fill: Fill| {
                layer.push((format!("layers.{l}.{name}"), shape.to_vec(), fill))
            };
            add("input_layernorm.weight", &[h], norm);
            add("post_attention_layernorm.weight", &[h], norm);
            match kind {
                moe_core::LayerKind::Attention => {
                    let (qd, kvd) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
                    add("self_attn.q_proj.weight", &[c.q_proj_rows(), h], m);
                    add("self_attn.k_proj.weight", &[kvd, h], m);
                    add("self_attn.v_proj.weight", &[kvd, h], m);
                    add("self_attn.o_proj.weight", &[h, qd], m);
                    add("self_attn.q_norm.weight", &[c.head_dim], norm);
                    add("self_attn.k_norm.weight", &[c.head_dim], norm);
                }
                moe_core::LayerKind::DeltaNet => {
                    let (cd, vd, nv) = (c.conv_dim(), c.delta_value_dim(), c.delta_v_heads);
                    if c.family == Family::Qwen3Next {
                        add("linear_attn.in_proj_qkvz.weight", &[cd + vd, h], m);
                        add("linear_attn.in_proj_ba.weight", &[2 * nv, h], m);
                    } else {
                        add("linear_attn.in_proj_qkv.weight", &[cd, h], m);
                        add("linear_attn.in_proj_z.weight", &[vd, h], m);
                        add("linear_attn.in_proj_b.weight", &[nv, h], m);
                        add("linear_attn.in_proj_a.weight", &[nv, h], m);
                    }
                    add(
                        "linear_attn.conv1d.weight",
                        &[cd, 1, c.conv_kernel],
                        Fill::Around { center: 0.0, spread: 0.5 },
                    );
                    add("linear_attn.dt_bias", &[nv], Fill::Around { center: 0.0, spread: 0.5 });
                    add("linear_attn.A_log", &[nv], Fill::LogUniform);
                    add("linear_attn.norm.weight", &[c.delta_v_dim], plain_norm);
                    add("linear_attn.out_proj.weight", &[h, vd], m);
                }
            }
            add("mlp.gate.weight", &[c.experts, h], m);
            if let Some(si) = c.shared_inter {
                add("mlp.shared_expert.gate_proj.weight", &[si, h], m);
                add("mlp.shared_expert.up_proj.weight", &[si, h], m);
                add("mlp.shared_expert.down_proj.weight", &[h, si], m);
                add("mlp.shared_expert_gate.weight", &[1, h], m);
            }
            layer.sort_by(|a, b| a.0.cmp(&b.0));
            list.extend(layer);
        }
        if !c.tie_embeddings {
            list.push(("lm_head.weight".into(), vec![c.vocab, h], m));
        }
        list.push(("norm.weight".into(), vec![h], norm));

        let mut names = Vec::with_capacity(list.len());
        let mut specs = HashMap::with_capacity(list.len());
        for (name, shape, fill) in list {
            let format = if matches!(fill, Fill::Matrix) && !keeps_float(&name, &shape) {
                match dense {
                    DenseFormat::Bf16 => WeightFormat::Float(DType::BF16),
                    DenseFormat::Q8 => match affine_group(shape[1], 8) {
                        Some(group) => WeightFormat::Affine { bits: 8, group },
                        None => WeightFormat::Float(DType::BF16),
                    },
                }
            } else if matches!(fill, Fill::LogUniform) {
                WeightFormat::Float(DType::F32)
            } else {
                WeightFormat::Float(DType::BF16)
            };
            names.push(name.clone());
            specs.insert(name, Spec { shape, format, fill });
        }
        SynthTensors { dir: PathBuf::from(format!("<synthetic {}>", shape.name)), seed, names, specs }
    }

    fn spec(&self, name: &str) -> Result<&Spec, StoreError> {
        self.specs
            .get(name)
            .ok_or_else(|| StoreError::MissingTensor { tensor: name.to_string(), dir: self.dir.clone() })
    }

    fn rng(&self, name: &str) -> Rng {
        Rng::new(self.seed, &[name_hash(name)])
    }
}

impl TensorSource for SynthTensors {
    fn tensor(&self, name: &str) -> Result<Tensor, StoreError> {
        let spec = self.spec(name)?;
        let WeightFormat::Float(dtype) = spec.format else {
            return Err(StoreError::DType {
                tensor: name.to_string(),
                file: self.dir.clone(),
                dtype: format!("{} (a quantised matrix: read it with TensorSource::matrix)", spec.format.name()),
            });
        };
        let n: usize = spec.shape.iter().product();
        let mut rng = self.rng(name);
        let data = match spec.fill {
            Fill::Matrix => random_matrix(spec.format, spec.shape[0], n / spec.shape[0], &mut rng).data,
            Fill::Around { center, spread } => {
                let vals: Vec<f32> = (0..n).map(|_| center + rng.sym(spread)).collect();
                encode(dtype, &vals)
            }
            Fill::LogUniform => {
                let vals: Vec<f32> = (0..n).map(|_| (1.0 + 15.0 * rng.unit()).ln()).collect();
                encode(dtype, &vals)
            }
        };
        Ok(Tensor { name: name.to_string(), file: self.dir.clone(), dtype, shape: spec.shape.clone(), data })
    }

    fn contains(&self, name: &str) -> bool {
        self.specs.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn dense_bytes(&self) -> usize {
        self.specs
            .values()
            .map(|s| {
                let cols = s.shape.last().copied().unwrap_or(1);
                s.format.row_bytes(cols) * s.shape.iter().product::<usize>() / cols.max(1)
            })
            .sum()
    }

    fn stored_format(&self, name: &str) -> Result<(Vec<usize>, WeightFormat), StoreError> {
        let spec = self.spec(name)?;
        Ok((spec.shape.clone(), spec.format))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, StoreError> {
        let spec = self.spec(name)?;
        if spec.shape != [rows, cols] {
            return Err(StoreError::Shape {
                tensor: name.to_string(),
                file: self.dir.clone(),
                expected: vec![rows, cols],
                found: spec.shape.clone(),
            });
        }
        match spec.fill {
            Fill::Matrix => Ok(random_matrix(spec.format, rows, cols, &mut self.rng(name))),
            _ => self.tensor(name)?.matrix(rows, cols),
        }
    }
}

fn encode(dtype: DType, vals: &[f32]) -> Bytes {
    match dtype {
        DType::F32 => Bytes::from_f32(vals),
        _ => Bytes::from_vec(vals.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()).collect()),
    }
}

/// Routed experts generated one at a time, already in the target format.
struct SynthExperts {
    seed: u64,
    layers: usize,
    experts: usize,
    hidden: usize,
    inter: usize,
    /// Formats of gate/up (`cols = hidden`) and down (`cols = inter`).
    formats: [WeightFormat; 2],
}

impl SynthExperts {
    fn new(c: &ModelConfig, format: ExpertFormat, seed: u64) -> Self {
        let f = |cols| match format.bits() {
            None => WeightFormat::Float(DType::BF16),
            Some(bits) => match affine_group(cols, bits) {
                Some(group) => WeightFormat::Affine { bits, group },
                None => WeightFormat::Float(DType::BF16),
            },
        };
        SynthExperts {
            seed,
            layers: c.layers.len(),
            experts: c.experts,
            hidden: c.hidden,
            inter: c.expert_inter,
            formats: [f(c.hidden), f(c.expert_inter)],
        }
    }
}

impl ExpertSource for SynthExperts {
    fn expert(&self, layer: usize, expert: usize) -> Result<Expert, StoreError> {
        if layer >= self.layers || expert >= self.experts {
            return Err(StoreError::MissingTensor {
                tensor: format!("layers.{layer}.mlp.experts.{expert}"),
                dir: PathBuf::from("<synthetic>"),
            });
        }
        let mut rng = Rng::new(self.seed, &[0xE4_9E47, layer as u64, expert as u64]);
        let (h, i) = (self.hidden, self.inter);
        Ok(Expert {
            gate: random_matrix(self.formats[0], i, h, &mut rng),
            up: random_matrix(self.formats[0], i, h, &mut rng),
            down: random_matrix(self.formats[1], h, i, &mut rng),
        })
    }

    fn expert_bytes(&self) -> usize {
        2 * self.inter * self.formats[0].row_bytes(self.hidden) + self.hidden * self.formats[1].row_bytes(self.inter)
    }

    fn total_bytes(&self) -> usize {
        self.expert_bytes() * self.experts * self.layers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_into_valid_configs() {
        for name in SynthShape::PRESETS {
            let s: SynthShape = name.parse().unwrap();
            for layers in [1, 4, s.layers] {
                let c = ModelConfig::from_json(&s.config_json(layers, 0)).unwrap();
                assert_eq!((c.family, c.hidden, c.layers.len(), c.experts), (s.family, s.hidden, layers, s.experts));
                assert_eq!(
                    (c.expert_inter, c.shared_inter, c.vocab, c.top_k),
                    (s.expert_inter, s.shared_inter, s.vocab, s.top_k)
                );
            }
        }
        assert!("qwen9".parse::<SynthShape>().is_err());
    }

    #[test]
    fn qwen3_30b_is_the_real_shape() {
        let c = ModelConfig::from_json(&SynthShape::preset("qwen3-30b").unwrap().config_json(48, 0)).unwrap();
        assert_eq!((c.hidden, c.heads, c.kv_heads, c.head_dim, c.experts, c.top_k), (2048, 32, 4, 128, 128, 8));
        assert_eq!((c.expert_inter, c.vocab, c.rope_theta, c.tie_embeddings), (768, 151_936, 1e6, false));
        assert!(c.shared_inter.is_none() && c.norm_topk);
    }

    #[test]
    fn random_quantised_weights_are_zero_mean_and_small() {
        let mut rng = Rng::new(1, &[2]);
        for bits in [2, 4, 8] {
            let m = random_matrix(WeightFormat::Affine { bits, group: 64 }, 16, 1024, &mut rng);
            let v = m.to_f32();
            let mean = v.iter().sum::<f32>() / v.len() as f32;
            let max = v.iter().fold(0f32, |a, x| a.max(x.abs()));
            assert!(mean.abs() < 0.01 && max <= 1.3 * spread(1024), "{bits}: mean {mean}, max {max}");
        }
    }
}
