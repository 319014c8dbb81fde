//! mlx-community directories (what `mlx_lm.convert` writes), read in place: `config.json` with a
//! `quantization` block, and safetensors shards with MLX names and layouts (model-spec.md
//! section 4).
//!
//! * Names: `language_model.model.layers.N.*`, `language_model.model.{embed_tokens,norm}.*`,
//!   `language_model.lm_head.*` (Qwen3.5), or `model.*` / `lm_head.*` (Qwen3-Next, Qwen3-MoE);
//!   made canonical like Hugging Face names. `vision_tower.*` is ignored.
//! * A quantised linear layer `X` is `X.weight` (u32 codes `[out, in * bits / 32]`), `X.scales`
//!   and `X.biases` (bf16 `[out, in / group]`): one affine [`Matrix`], handed out zero copy by
//!   [`TensorSource::matrix`]. Bits and group come from `config.json["quantization"]` (or
//!   `"quantization_config"`): the defaults, overridden per module path (`"language_model.model.
//!   layers.0.mlp.gate": {"bits": 8, "group_size": 64}`), checked against the shapes.
//! * Routed experts are stacked per layer: `layers.N.mlp.switch_mlp.{gate,up,down}_proj.weight`
//!   `[E, out, in * bits / 32]` with `.scales` / `.biases` `[E, out, in / group]` (or float
//!   `[E, out, in]` when not quantised). Expert `e` is a slice of each, so packing to q4 with the
//!   same group copies the codes, scales and biases bit for bit.
//! * Conventions are made Hugging Face's, so that the engine and the packed format see one
//!   meaning: for Qwen3.5 and Qwen3-Next, whose RMSNorms scale by `1 + w`, MLX stores `1 + w`
//!   (the "+1 baked in", model-spec.md section 2.2); this reader hands out `w` (as f32, so
//!   exactly) for `input_layernorm`, `post_attention_layernorm`, `norm`, `q_norm` and `k_norm`,
//!   never for `linear_attn.norm`. `conv1d.weight` `[C, K, 1]` is handed out as `[C, 1, K]`,
//!   the same memory.

use crate::hf::HfTensors;
use crate::safetensors_file::{Entry, SafetensorsFile, dtype_of};
use crate::{Expert, ExpertSource, ModelFiles, StoreError, Tensor, TensorSource};
use moe_core::{Bytes, DType, Matrix, ModelConfig, WeightFormat};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Whether `dir` holds an MLX model: its `config.json` has an MLX `quantization` block, or its
/// tensor names are MLX ones (`language_model.*`, `*.switch_mlp.*`).
pub fn is_mlx_dir(dir: &Path) -> bool {
    if let Ok(text) = std::fs::read_to_string(dir.join("config.json"))
        && let Ok(Value::Object(root)) = serde_json::from_str::<Value>(&text)
        && mlx_quantization(&root).is_some()
    {
        return true;
    }
    tensor_names(dir).iter().any(|n| n.starts_with("language_model.") || n.contains(".switch_mlp."))
}

/// The MLX quantisation block of a config: `quantization`, or a `quantization_config` that is
/// not a Hugging Face one (those name a `quant_method`).
fn mlx_quantization(root: &Map<String, Value>) -> Option<&Map<String, Value>> {
    let q = root.get("quantization").and_then(Value::as_object).or_else(|| {
        root.get("quantization_config").and_then(Value::as_object).filter(|q| !q.contains_key("quant_method"))
    })?;
    (q.contains_key("bits") || q.contains_key("group_size")).then_some(q)
}

/// Tensor names of the directory's safetensors files, from the index or the file headers;
/// empty when there are none or they can't be read (the real open reports why).
fn tensor_names(dir: &Path) -> Vec<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join("model.safetensors.index.json")) {
        return serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("weight_map").and_then(Value::as_object).map(|m| m.keys().cloned().collect()))
            .unwrap_or_default();
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "safetensors")
            && let Ok(file) = SafetensorsFile::open(&path)
        {
            names.extend(file.entries.into_iter().map(|e| e.name));
        }
    }
    names
}

/// Opens an mlx-community model directory.
pub fn open_mlx(dir: &Path) -> Result<ModelFiles, StoreError> {
    if !dir.is_dir() {
        return Err(StoreError::Io {
            path: dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such model directory"),
        });
    }
    let config_path = dir.join("config.json");
    let text = match std::fs::read_to_string(&config_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::MissingConfig(dir.to_path_buf())),
        Err(source) => return Err(StoreError::Io { path: config_path, source }),
    };
    let config =
        ModelConfig::from_json(&text).map_err(|source| StoreError::Config { path: config_path.clone(), source })?;
    let root: Map<String, Value> = serde_json::from_str(&text).unwrap_or_default();
    let quant = Quantization::parse(&root).map_err(|why| StoreError::Corrupt { file: config_path.clone(), why })?;
    let raw = HfTensors::open(dir)?;
    let tensors = MlxTensors::new(dir, raw, &quant, &config)?;
    let experts = MlxExperts::new(&tensors, &quant, &config)?;
    Ok(ModelFiles { dir: dir.to_path_buf(), config, tensors: Arc::new(tensors), experts: Arc::new(experts) })
}

/// Bits and group of one quantised module.
type Affine = (u32, usize);

/// `config.json["quantization"]`: the defaults and the per-module overrides.
#[derive(Debug)]
struct Quantization {
    default: Option<Affine>,
    /// Module path (the file's tensor name without `.weight`) -> its parameters, `None` for a
    /// module left unquantised.
    modules: HashMap<String, Option<Affine>>,
}

impl Quantization {
    fn parse(root: &Map<String, Value>) -> Result<Self, String> {
        let Some(q) = mlx_quantization(root) else {
            return Ok(Quantization { default: None, modules: HashMap::new() });
        };
        if let Some(mode) = q.get("mode").and_then(Value::as_str)
            && mode != "affine"
        {
            return Err(format!("quantization mode {mode:?} is not supported (only MLX \"affine\")"));
        }
        let params = |o: &Map<String, Value>, what: &str| -> Result<Affine, String> {
            let bits = o.get("bits").and_then(Value::as_u64);
            let group = o.get("group_size").and_then(Value::as_u64).or(Some(64));
            match (bits, group) {
                (Some(b), Some(g)) => Ok((b as u32, g as usize)),
                _ => Err(format!("quantization of {what} has no numeric \"bits\"")),
            }
        };
        let default = Some(params(q, "the model")?);
        let mut modules = HashMap::new();
        for (key, value) in q {
            match value {
                Value::Object(o) => {
                    if let Some(mode) = o.get("mode").and_then(Value::as_str)
                        && mode != "affine"
                    {
                        return Err(format!("quantization mode {mode:?} of {key} is not supported (only \"affine\")"));
                    }
                    modules.insert(key.clone(), Some(params(o, key)?));
                }
                Value::Bool(false) => {
                    modules.insert(key.clone(), None);
                }
                _ => {}
            }
        }
        Ok(Quantization { default, modules })
    }

    /// The parameters of the module whose weight is stored as `file_name` (`X.weight` -> `X`).
    fn of(&self, file_name: &str) -> Option<Affine> {
        let module = file_name.strip_suffix(".weight").unwrap_or(file_name);
        match self.modules.get(module) {
            Some(p) => *p,
            None => self.default,
        }
    }
}

/// A quantised tensor: codes in `weight`, bf16 `scales` and `biases`, the logical shape
/// `[.., rows, cols]` (3-D for stacked experts).
#[derive(Clone)]
struct Quantised {
    format: WeightFormat,
    shape: Vec<usize>,
    weight: Tensor,
    scales: Tensor,
    biases: Tensor,
}

/// Whether the canonical `name` is one of the five norms MLX stores with `+1` baked in.
fn baked_norm(name: &str) -> bool {
    name == "norm.weight"
        || [".input_layernorm.weight", ".post_attention_layernorm.weight", ".q_norm.weight", ".k_norm.weight"]
            .iter()
            .any(|s| name.ends_with(s))
}

pub(crate) struct MlxTensors {
    dir: PathBuf,
    raw: HfTensors,
    /// Canonical weight name (`layers.0.mlp.gate.weight`) -> its quantised storage.
    quantised: HashMap<String, Quantised>,
    /// Logical dense names, natural order: no `.scales` / `.biases`, no routed experts.
    names: Vec<String>,
    /// Subtract 1 from the baked norms (Qwen3.5, Qwen3-Next).
    unbake: bool,
}

fn is_routed_expert(name: &str) -> bool {
    name.contains(".switch_mlp.") || name.contains(".mlp.experts.")
}

/// A raw entry as a [`Tensor`] whatever its dtype (u32 codes included), for its bytes and shape.
fn raw_tensor(file: &SafetensorsFile, entry: &Entry) -> Tensor {
    Tensor {
        name: entry.name.clone(),
        file: file.path.clone(),
        dtype: dtype_of(&entry.dtype).unwrap_or(DType::F32),
        shape: entry.shape.clone(),
        data: file.bytes(entry),
    }
}

impl MlxTensors {
    fn new(dir: &Path, raw: HfTensors, quant: &Quantization, config: &ModelConfig) -> Result<Self, StoreError> {
        let all = raw.names();
        let mut quantised = HashMap::new();
        for scales_name in all.iter().filter(|n| n.ends_with(".scales")) {
            let base = scales_name.strip_suffix(".scales").expect("filtered");
            let q = Self::quantised(&raw, base, quant)?;
            quantised.insert(format!("{base}.weight"), q);
        }
        let names = all
            .into_iter()
            .filter(|n| !is_routed_expert(n))
            .filter(|n| {
                let companion = |suffix: &str| {
                    n.strip_suffix(suffix).is_some_and(|b| quantised.contains_key(&format!("{b}.weight")))
                };
                !companion(".scales") && !companion(".biases")
            })
            .collect();
        Ok(MlxTensors { dir: dir.to_path_buf(), raw, quantised, names, unbake: config.family.norm_offset() == 1.0 })
    }

    /// Finds and checks the three parts of the quantised module `base` (canonical name).
    fn quantised(raw: &HfTensors, base: &str, quant: &Quantization) -> Result<Quantised, StoreError> {
        let part = |suffix: &str| {
            let name = format!("{base}.{suffix}");
            match raw.lookup(&name) {
                Some((f, e)) => Ok((raw_tensor(f, e), e.dtype.clone())),
                None => Err(StoreError::MissingTensor { tensor: name, dir: raw.dir().to_path_buf() }),
            }
        };
        let ((weight, wdt), (scales, sdt), (biases, bdt)) = (part("weight")?, part("scales")?, part("biases")?);
        let wf = weight.file.clone();
        let bad = |why: String| StoreError::Corrupt { file: wf.clone(), why };
        if wdt != "U32" {
            return Err(bad(format!("quantised weight {:?} is {wdt}, expected U32 codes", weight.name)));
        }
        if sdt != "BF16" || bdt != "BF16" {
            return Err(StoreError::DType {
                tensor: format!("{base}.scales / .biases"),
                file: scales.file.clone(),
                dtype: format!("{sdt} / {bdt} (quantisation scales and biases must be BF16)"),
            });
        }
        let Some((bits, group)) = quant.of(&weight.name) else {
            return Err(bad(format!(
                "{:?} has scales but config.json's \"quantization\" gives no bits and group for it",
                weight.name
            )));
        };
        if !matches!(bits, 2 | 4 | 8) || group == 0 || !(group * bits as usize).is_multiple_of(32) {
            return Err(StoreError::DType {
                tensor: weight.name.clone(),
                file: wf.clone(),
                dtype: format!("MLX {bits}-bit group {group} (supported: 2, 4 and 8 bits, groups of 32, 64 or 128)"),
            });
        }
        let ws = &weight.shape;
        let n = ws.len();
        let cols = ws.last().copied().unwrap_or(0) * 32 / bits as usize;
        let mut want_scales = ws.clone();
        if let Some(last) = want_scales.last_mut() {
            *last = cols / group;
        }
        if n < 2 || scales.shape != want_scales || biases.shape != want_scales || !cols.is_multiple_of(group) {
            return Err(bad(format!(
                "{:?} {ws:?} with scales {:?} and biases {:?} does not fit {bits}-bit codes in groups of {group} \
                     (check config.json's \"quantization\")",
                weight.name, scales.shape, biases.shape
            )));
        }
        let mut shape = ws.clone();
        shape[n - 1] = cols;
        Ok(Quantised { format: WeightFormat::Affine { bits, group }, shape, weight, scales, biases })
    }

    fn missing(&self, name: &str) -> StoreError {
        StoreError::MissingTensor { tensor: name.to_string(), dir: self.dir.clone() }
    }
}

impl TensorSource for MlxTensors {
    fn tensor(&self, name: &str) -> Result<Tensor, StoreError> {
        if let Some(q) = self.quantised.get(name) {
            return Err(StoreError::DType {
                tensor: name.to_string(),
                file: q.weight.file.clone(),
                dtype: format!("{} (a quantised matrix: read it with TensorSource::matrix)", q.format.name()),
            });
        }
        let mut t = self.raw.tensor(name)?;
        if self.unbake && baked_norm(name) {
            let values: Vec<f32> = t.dtype.to_f32(&t.data).into_iter().map(|w| w - 1.0).collect();
            t.dtype = DType::F32;
            t.data = Bytes::from_f32(&values);
        } else if name.ends_with("conv1d.weight") && t.shape.len() == 3 && t.shape[2] == 1 {
            t.shape = vec![t.shape[0], 1, t.shape[1]];
        }
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        self.quantised.contains_key(name) || self.raw.contains(name)
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn dense_bytes(&self) -> usize {
        self.names
            .iter()
            .map(|n| match self.quantised.get(n) {
                Some(q) => q.weight.data.len() + q.scales.data.len() + q.biases.data.len(),
                None => self.raw.lookup(n).map_or(0, |(_, e)| e.byte_len()),
            })
            .sum()
    }

    fn stored_format(&self, name: &str) -> Result<(Vec<usize>, WeightFormat), StoreError> {
        match self.quantised.get(name) {
            Some(q) => Ok((q.shape.clone(), q.format)),
            None => {
                let t = self.tensor(name)?;
                Ok((t.shape, WeightFormat::Float(t.dtype)))
            }
        }
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, StoreError> {
        let Some(q) = self.quantised.get(name) else {
            if !self.contains(name) {
                return Err(self.missing(name));
            }
            return self.tensor(name)?.matrix(rows, cols);
        };
        if q.shape != [rows, cols] {
            return Err(StoreError::Shape {
                tensor: name.to_string(),
                file: q.weight.file.clone(),
                expected: vec![rows, cols],
                found: q.shape.clone(),
            });
        }
        Ok(Matrix {
            format: q.format,
            rows,
            cols,
            data: q.weight.data.clone(),
            scales: q.scales.data.clone(),
            biases: q.biases.data.clone(),
        })
    }
}

/// One stacked projection of a layer's routed experts: `[E, rows, cols]`, float or quantised.
enum Stacked {
    Float(Tensor),
    Quantised(Box<Quantised>),
}

impl Stacked {
    /// Expert `e` as a `[rows, cols]` matrix, sharing the bytes.
    fn expert(&self, e: usize, rows: usize, cols: usize) -> Matrix {
        match self {
            Stacked::Float(t) => {
                let n = rows * cols * t.dtype.size();
                Matrix::float(t.dtype, rows, cols, t.data.slice(n * e..n * (e + 1)))
            }
            Stacked::Quantised(q) => {
                let (d, s) = (q.weight.data.len() / q.shape[0], q.scales.data.len() / q.shape[0]);
                Matrix {
                    format: q.format,
                    rows,
                    cols,
                    data: q.weight.data.slice(d * e..d * (e + 1)),
                    scales: q.scales.data.slice(s * e..s * (e + 1)),
                    biases: q.biases.data.slice(s * e..s * (e + 1)),
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Stacked::Float(t) => t.data.len(),
            Stacked::Quantised(q) => q.weight.data.len() + q.scales.data.len() + q.biases.data.len(),
        }
    }
}

/// Routed experts read in place from the stacked `switch_mlp` tensors.
pub(crate) struct MlxExperts {
    dir: PathBuf,
    experts: usize,
    hidden: usize,
    inter: usize,
    /// Per layer: gate, up, down.
    layers: Vec<[Stacked; 3]>,
    expert_bytes: usize,
    total_bytes: usize,
}

impl MlxExperts {
    fn new(tensors: &MlxTensors, quant: &Quantization, config: &ModelConfig) -> Result<Self, StoreError> {
        let (n, h, i) = (config.experts, config.hidden, config.expert_inter);
        let mut layers = Vec::with_capacity(config.layers.len());
        let (mut expert_bytes, mut total_bytes) = (0, 0);
        for l in 0..config.layers.len() {
            let stacked = |proj: &str, rows: usize, cols: usize| -> Result<Stacked, StoreError> {
                let base = format!("layers.{l}.mlp.switch_mlp.{proj}");
                let weight = format!("{base}.weight");
                let (s, shape) = if tensors.raw.contains(&format!("{base}.scales")) {
                    let q = MlxTensors::quantised(&tensors.raw, &base, quant)?;
                    let shape = q.shape.clone();
                    (Stacked::Quantised(Box::new(q)), shape)
                } else {
                    let t = tensors.raw.tensor(&weight).map_err(|e| match e {
                        StoreError::MissingTensor { .. } => StoreError::MissingTensor {
                            tensor: format!("{weight} (MLX stacked routed experts)"),
                            dir: tensors.dir.clone(),
                        },
                        e => e,
                    })?;
                    let shape = t.shape.clone();
                    (Stacked::Float(t), shape)
                };
                if shape != [n, rows, cols] {
                    let file = match &s {
                        Stacked::Float(t) => t.file.clone(),
                        Stacked::Quantised(q) => q.weight.file.clone(),
                    };
                    return Err(StoreError::Shape {
                        tensor: weight,
                        file,
                        expected: vec![n, rows, cols],
                        found: shape,
                    });
                }
                Ok(s)
            };
            let projs = [stacked("gate_proj", i, h)?, stacked("up_proj", i, h)?, stacked("down_proj", h, i)?];
            let bytes: usize = projs.iter().map(Stacked::bytes).sum();
            expert_bytes = expert_bytes.max(bytes / n.max(1));
            total_bytes += bytes;
            layers.push(projs);
        }
        Ok(MlxExperts { dir: tensors.dir.clone(), experts: n, hidden: h, inter: i, layers, expert_bytes, total_bytes })
    }
}

impl ExpertSource for MlxExperts {
    fn expert(&self, layer: usize, expert: usize) -> Result<Expert, StoreError> {
        let Some([g, u, d]) = self.layers.get(layer).filter(|_| expert < self.experts) else {
            return Err(StoreError::MissingTensor {
                tensor: format!(
                    "layers.{layer}.mlp.experts.{expert} (the model has {} layers of {} experts)",
                    self.layers.len(),
                    self.experts
                ),
                dir: self.dir.clone(),
            });
        };
        let (h, i) = (self.hidden, self.inter);
        Ok(Expert { gate: g.expert(expert, i, h), up: u.expert(expert, i, h), down: d.expert(expert, h, i) })
    }

    fn expert_bytes(&self) -> usize {
        self.expert_bytes
    }

    fn total_bytes(&self) -> usize {
        self.total_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baked_norms_are_the_five_kinds() {
        for n in [
            "norm.weight",
            "layers.0.input_layernorm.weight",
            "layers.3.post_attention_layernorm.weight",
            "layers.3.self_attn.q_norm.weight",
            "layers.3.self_attn.k_norm.weight",
        ] {
            assert!(baked_norm(n), "{n}");
        }
        for n in ["layers.0.linear_attn.norm.weight", "layers.0.mlp.gate.weight", "embed_tokens.weight"] {
            assert!(!baked_norm(n), "{n}");
        }
    }

    #[test]
    fn quantization_overrides_by_module_path() {
        let root: Map<String, Value> = serde_json::from_str(
            r#"{"quantization": {"group_size": 64, "bits": 4,
                 "language_model.model.layers.0.mlp.gate": {"group_size": 64, "bits": 8},
                 "language_model.model.layers.0.mlp.shared_expert_gate": false}}"#,
        )
        .unwrap();
        let q = Quantization::parse(&root).unwrap();
        assert_eq!(q.of("language_model.model.layers.0.mlp.gate.weight"), Some((8, 64)));
        assert_eq!(q.of("language_model.model.layers.1.mlp.gate.weight"), Some((4, 64)));
        assert_eq!(q.of("language_model.model.layers.0.mlp.shared_expert_gate.weight"), None);
        let hf: Map<String, Value> =
            serde_json::from_str(r#"{"quantization_config": {"quant_method": "fp8", "bits": 8}}"#).unwrap();
        assert!(mlx_quantization(&hf).is_none());
        let bad: Map<String, Value> =
            serde_json::from_str(r#"{"quantization": {"bits": 4, "group_size": 32, "mode": "mxfp4"}}"#).unwrap();
        assert!(Quantization::parse(&bad).unwrap_err().contains("mxfp4"));
    }
}
