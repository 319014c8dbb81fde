//! Builds a tiny mlx-community style directory from a Hugging Face fixture, the way `mlx_lm.convert`
//! lays one out (model-spec.md section 4.2): every 2-D projection affine-quantised with
//! `moe_core::quant::quantize` (default bits / group, routers at 8 bits group 64 through per-module
//! overrides in `config.json["quantization"]`), routed experts stacked into
//! `mlp.switch_mlp.{gate,up,down}_proj.{weight,scales,biases}`, the five zero-centred norms with
//! `+1` baked in (bf16) for Qwen3.5 / Qwen3-Next, `conv1d.weight` as `[C, K, 1]`.
//!
//! Used by the store's MLX tests and, through `#[path]`, by the CLI crate's logits tests.
#![allow(dead_code)]

use moe_core::format::{bf16_bits_to_f32, f32_to_bf16_bits};
use moe_core::quant::quantize;
use moe_core::{Family, Matrix};
use safetensors::{Dtype, tensor::TensorView};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What was written, to compare the reader against.
pub struct MlxModel {
    pub dir: PathBuf,
    pub bits: u32,
    pub group: usize,
    /// Canonical weight name -> the quantised matrix written for it.
    pub quantised: HashMap<String, Matrix>,
    /// `experts[layer][proj][expert]`, proj 0/1/2 = gate/up/down.
    pub experts: Vec<[Vec<Matrix>; 3]>,
    /// Canonical norm name -> the Hugging Face convention value the reader must hand out,
    /// `bf16(w + 1) - 1`.
    pub unbaked: HashMap<String, Vec<f32>>,
}

/// The fixture directory `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn is_router(name: &str) -> bool {
    name.ends_with("mlp.gate.weight") || name.ends_with("shared_expert_gate.weight")
}

fn baked(name: &str) -> bool {
    name == "norm.weight"
        || [".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight"]
            .iter()
            .any(|s| name.ends_with(s))
}

struct Out {
    tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
}

impl Out {
    fn push(&mut self, name: String, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) {
        self.tensors.push((name, dtype, shape, data));
    }

    /// `m` as MLX writes a quantised layer: `base.weight` (u32), `base.scales`, `base.biases`.
    fn quantised(&mut self, base: &str, lead: &[usize], m_rows: usize, m_cols: usize, ms: &[&Matrix]) {
        let (bits, group) = match ms[0].format {
            moe_core::WeightFormat::Affine { bits, group } => (bits, group),
            _ => unreachable!(),
        };
        let shape = |last: usize| [lead, &[m_rows, last]].concat();
        let cat = |f: fn(&Matrix) -> &[u8]| ms.iter().flat_map(|m| f(m).to_vec()).collect::<Vec<u8>>();
        self.push(format!("{base}.weight"), Dtype::U32, shape(m_cols * bits as usize / 32), cat(|m| &m.data));
        self.push(format!("{base}.scales"), Dtype::BF16, shape(m_cols / group), cat(|m| &m.scales));
        self.push(format!("{base}.biases"), Dtype::BF16, shape(m_cols / group), cat(|m| &m.biases));
    }
}

/// Writes the MLX version of the HF directory `src` into `out` (created), with names under
/// `language_model.` (Qwen3.5 VLM style) when `language_model`, else under `model.`.
pub fn write_mlx(src: &Path, out: &Path, bits: u32, group: usize, language_model: bool) -> MlxModel {
    std::fs::create_dir_all(out).unwrap();
    let hf = moe_store::open_hf(src).unwrap();
    let offset = hf.config.family.norm_offset() == 1.0;
    assert_eq!(offset, hf.config.family != Family::Qwen3Moe);
    let file_name = |canonical: &str| match (language_model, canonical) {
        (true, "lm_head.weight") => "language_model.lm_head.weight".to_string(),
        (true, n) => format!("language_model.model.{n}"),
        (false, "lm_head.weight") => "lm_head.weight".to_string(),
        (false, n) => format!("model.{n}"),
    };

    let mut quant = serde_json::Map::new();
    quant.insert("group_size".into(), json!(group));
    quant.insert("bits".into(), json!(bits));
    let mut out_t = Out { tensors: Vec::new() };
    let mut quantised = HashMap::new();
    let mut unbaked = HashMap::new();
    for name in hf.tensors.names() {
        let t = hf.tensors.tensor(&name).unwrap();
        let vals = t.values(&t.shape).unwrap();
        let base = file_name(name.strip_suffix(".weight").unwrap_or(&name));
        if t.shape.len() == 2 && name.ends_with(".weight") && !name.contains("norm") {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let (b, g) = if is_router(&name) { (8, 64) } else { (bits, group) };
            if is_router(&name) {
                quant.insert(base.clone(), json!({ "group_size": 64, "bits": 8 }));
            }
            let m = quantize(&vals, rows, cols, b, g);
            out_t.quantised(&base, &[], rows, cols, &[&m]);
            quantised.insert(name.clone(), m);
        } else if offset && baked(&name) {
            let bits16: Vec<u16> = vals.iter().map(|&w| f32_to_bf16_bits(w + 1.0)).collect();
            unbaked.insert(name.clone(), bits16.iter().map(|&b| bf16_bits_to_f32(b) - 1.0).collect());
            let data = bits16.iter().flat_map(|b| b.to_le_bytes()).collect();
            out_t.push(file_name(&name), Dtype::BF16, t.shape.clone(), data);
        } else {
            let mut shape = t.shape.clone();
            if name.ends_with("conv1d.weight") {
                shape = vec![shape[0], shape[2], shape[1]];
            }
            let dtype = match t.dtype {
                moe_core::DType::BF16 => Dtype::BF16,
                moe_core::DType::F16 => Dtype::F16,
                moe_core::DType::F32 => Dtype::F32,
            };
            out_t.push(file_name(&name), dtype, shape, t.data.to_vec());
        }
    }

    let c = &hf.config;
    let (n, h, i) = (c.experts, c.hidden, c.expert_inter);
    let mut experts = Vec::new();
    for l in 0..c.layers.len() {
        let mut layer: [Vec<Matrix>; 3] = Default::default();
        for e in 0..n {
            let ex = hf.experts.expert(l, e).unwrap();
            for (p, m) in [&ex.gate, &ex.up, &ex.down].into_iter().enumerate() {
                layer[p].push(quantize(&m.to_f32(), m.rows, m.cols, bits, group));
            }
        }
        for (p, (proj, rows, cols)) in
            [("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)].into_iter().enumerate()
        {
            let base = file_name(&format!("layers.{l}.mlp.switch_mlp.{proj}"));
            out_t.quantised(&base, &[n], rows, cols, &layer[p].iter().collect::<Vec<_>>());
        }
        experts.push(layer);
    }

    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["quantization"] = Value::Object(quant.clone());
    config["quantization_config"] = Value::Object(quant);
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let views: Vec<(String, TensorView)> = out_t
        .tensors
        .iter()
        .map(|(name, dtype, shape, data)| (name.clone(), TensorView::new(*dtype, shape.clone(), data).unwrap()))
        .collect();
    let meta = HashMap::from([("format".to_string(), "mlx".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &out.join("model.safetensors")).unwrap();
    MlxModel { dir: out.to_path_buf(), bits, group, quantised, experts, unbaked }
}

/// The bytes of the three parts of an affine matrix, for bit-for-bit comparisons.
pub fn parts(m: &Matrix) -> (moe_core::WeightFormat, Vec<u8>, Vec<u8>, Vec<u8>) {
    (m.format, m.data.to_vec(), m.scales.to_vec(), m.biases.to_vec())
}
