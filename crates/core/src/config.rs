//! `config.json` of the supported families, parsed into one validated description of the model.

use serde_json::{Map, Value};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config.json is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unsupported model_type {0:?} (supported: qwen3_5_moe, qwen3_5_moe_text, qwen3_next, qwen3_moe)")]
    UnknownModelType(String),
    #[error("config.json has no model_type")]
    NoModelType,
    #[error("config field {0:?} is missing")]
    Missing(&'static str),
    #[error("config field {field:?} is invalid: {why}")]
    Invalid { field: &'static str, why: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Qwen3.5 MoE: hybrid GatedDeltaNet / gated attention, separate GDN projections, shared expert.
    Qwen35Moe,
    /// Qwen3-Next: the same hybrid with fused `in_proj_qkvz` / `in_proj_ba`.
    Qwen3Next,
    /// Qwen3 MoE: plain GQA attention, routed experts only.
    Qwen3Moe,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Qwen35Moe => "qwen3_5_moe",
            Family::Qwen3Next => "qwen3_next",
            Family::Qwen3Moe => "qwen3_moe",
        }
    }

    /// Qwen3.5 and Qwen3-Next store RMSNorm weights as `w` and scale by `1 + w`.
    pub fn norm_offset(self) -> f32 {
        match self {
            Family::Qwen3Moe => 0.0,
            _ => 1.0,
        }
    }

    /// Whether `q_proj` also produces a per-head sigmoid output gate.
    pub fn gated_attention(self) -> bool {
        self != Family::Qwen3Moe
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerKind {
    Attention,
    DeltaNet,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub hidden: usize,
    pub layers: Vec<LayerKind>,
    pub vocab: usize,
    pub rms_eps: f32,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    // full attention
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rotary_dim: usize,
    pub rope_theta: f64,
    // gated delta net
    pub delta_k_heads: usize,
    pub delta_v_heads: usize,
    pub delta_k_dim: usize,
    pub delta_v_dim: usize,
    pub conv_kernel: usize,
    // mixture of experts
    pub experts: usize,
    pub top_k: usize,
    pub expert_inter: usize,
    /// Width of the always-on shared expert, if the family has one.
    pub shared_inter: Option<usize>,
    pub norm_topk: bool,
}

impl ModelConfig {
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(text)?;
        let root = root.as_object().ok_or(ConfigError::Invalid { field: "config", why: "not a JSON object".into() })?;
        let model_type = root.get("model_type").and_then(Value::as_str).ok_or(ConfigError::NoModelType)?;
        let (family, c) = match model_type {
            "qwen3_5_moe" => {
                let text =
                    root.get("text_config").and_then(Value::as_object).ok_or(ConfigError::Missing("text_config"))?;
                (Family::Qwen35Moe, text)
            }
            "qwen3_5_moe_text" => (Family::Qwen35Moe, root),
            "qwen3_next" => (Family::Qwen3Next, root),
            "qwen3_moe" => (Family::Qwen3Moe, root),
            other => return Err(ConfigError::UnknownModelType(other.to_string())),
        };
        let f = Fields { c, root };
        let hidden = f.usize("hidden_size")?;
        let heads = f.usize("num_attention_heads")?;
        let layers_n = f.usize("num_hidden_layers")?;
        let head_dim = f.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1));
        let rope = c.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .or_else(|| c.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let partial = rope
            .and_then(|r| r.get("partial_rotary_factor"))
            .or_else(|| c.get("partial_rotary_factor"))
            .and_then(Value::as_f64)
            .unwrap_or(if family == Family::Qwen3Moe { 1.0 } else { 0.25 });
        let rotary_dim = (head_dim as f64 * partial) as usize;

        let layers = match family {
            Family::Qwen3Moe => vec![LayerKind::Attention; layers_n],
            _ => match c.get("layer_types") {
                Some(Value::Array(types)) => types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("full_attention") => Ok(LayerKind::Attention),
                        Some("linear_attention") => Ok(LayerKind::DeltaNet),
                        _ => Err(ConfigError::Invalid { field: "layer_types", why: format!("unknown layer type {t}") }),
                    })
                    .collect::<Result<Vec<_>, _>>()?,
                _ => {
                    let every = f.opt_usize("full_attention_interval")?.unwrap_or(4).max(1);
                    (0..layers_n)
                        .map(|i| if (i + 1) % every == 0 { LayerKind::Attention } else { LayerKind::DeltaNet })
                        .collect()
                }
            },
        };
        if layers.len() != layers_n {
            return Err(ConfigError::Invalid {
                field: "layer_types",
                why: format!("{} entries for {layers_n} layers", layers.len()),
            });
        }
        // Dense (non-MoE) layers exist in the Qwen3-MoE and Qwen3-Next configs but in none of the
        // released checkpoints; refuse them rather than compute something else.
        if let Some(Value::Array(dense)) = c.get("mlp_only_layers")
            && !dense.is_empty()
        {
            return Err(ConfigError::Invalid {
                field: "mlp_only_layers",
                why: "dense MLP layers are not supported".into(),
            });
        }
        if f.opt_usize("decoder_sparse_step")?.unwrap_or(1) != 1 {
            return Err(ConfigError::Invalid {
                field: "decoder_sparse_step",
                why: "only 1 (every layer MoE) is supported".into(),
            });
        }

        let hybrid = family != Family::Qwen3Moe;
        let cfg = ModelConfig {
            family,
            hidden,
            vocab: f.usize("vocab_size")?,
            rms_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            max_positions: f.opt_usize("max_position_embeddings")?.unwrap_or(32768),
            tie_embeddings: f.bool_either("tie_word_embeddings").unwrap_or(false),
            heads,
            kv_heads: f.opt_usize("num_key_value_heads")?.unwrap_or(heads),
            head_dim,
            rotary_dim,
            rope_theta,
            delta_k_heads: if hybrid { f.usize("linear_num_key_heads")? } else { 0 },
            delta_v_heads: if hybrid { f.usize("linear_num_value_heads")? } else { 0 },
            delta_k_dim: if hybrid { f.usize("linear_key_head_dim")? } else { 0 },
            delta_v_dim: if hybrid { f.usize("linear_value_head_dim")? } else { 0 },
            conv_kernel: if hybrid { f.opt_usize("linear_conv_kernel_dim")?.unwrap_or(4) } else { 0 },
            // Qwen3MoeConfig writes `num_local_experts`; `num_experts` is its alias.
            experts: f
                .opt_usize("num_experts")?
                .or(f.opt_usize("num_local_experts")?)
                .ok_or(ConfigError::Missing("num_experts"))?,
            top_k: f.usize("num_experts_per_tok")?,
            expert_inter: f.usize("moe_intermediate_size")?,
            shared_inter: if hybrid { Some(f.usize("shared_expert_intermediate_size")?) } else { None },
            // transformers always renormalises the Qwen3.5 top-k weights, whatever the flag says.
            norm_topk: family == Family::Qwen35Moe || f.bool_either("norm_topk_prob").unwrap_or(false),
            layers,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, why: String| Err(ConfigError::Invalid { field, why });
        if self.hidden == 0 || self.vocab == 0 || self.layers.is_empty() {
            return bad("hidden_size", "hidden size, vocabulary and layer count must be positive".into());
        }
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(
                "num_key_value_heads",
                format!("{} heads are not a multiple of {} KV heads", self.heads, self.kv_heads),
            );
        }
        if !self.rotary_dim.is_multiple_of(2) || self.rotary_dim > self.head_dim {
            return bad(
                "partial_rotary_factor",
                format!("rotary width {} for head dim {}", self.rotary_dim, self.head_dim),
            );
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return bad("num_experts_per_tok", format!("top-k {} with {} experts", self.top_k, self.experts));
        }
        if self.layers.contains(&LayerKind::DeltaNet) {
            if self.delta_k_heads == 0 || !self.delta_v_heads.is_multiple_of(self.delta_k_heads) {
                return bad(
                    "linear_num_value_heads",
                    format!("{} value heads for {} key heads", self.delta_v_heads, self.delta_k_heads),
                );
            }
            if self.conv_kernel < 1 {
                return bad("linear_conv_kernel_dim", "must be at least 1".into());
            }
        }
        Ok(())
    }

    /// Overrides the number of routed experts per token (`--experts-per-token`).
    pub fn with_top_k(mut self, k: usize) -> Result<Self, ConfigError> {
        if k == 0 || k > self.experts {
            return Err(ConfigError::Invalid {
                field: "experts-per-token",
                why: format!("{k} is not in 1..={}", self.experts),
            });
        }
        self.top_k = k;
        Ok(self)
    }

    pub fn delta_key_dim(&self) -> usize {
        self.delta_k_heads * self.delta_k_dim
    }
    pub fn delta_value_dim(&self) -> usize {
        self.delta_v_heads * self.delta_v_dim
    }
    /// Channels of the causal convolution: q, k and v together.
    pub fn conv_dim(&self) -> usize {
        2 * self.delta_key_dim() + self.delta_value_dim()
    }
    /// Rows of `q_proj`: queries, plus the output gate for gated attention.
    pub fn q_proj_rows(&self) -> usize {
        self.heads * self.head_dim * if self.family.gated_attention() { 2 } else { 1 }
    }
}

struct Fields<'a> {
    c: &'a Map<String, Value>,
    root: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn opt_usize(&self, key: &'static str) -> Result<Option<usize>, ConfigError> {
        match self.c.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or(ConfigError::Invalid { field: key, why: format!("expected a non-negative integer, found {v}") }),
        }
    }
    fn usize(&self, key: &'static str) -> Result<usize, ConfigError> {
        self.opt_usize(key)?.ok_or(ConfigError::Missing(key))
    }
    fn opt_f64(&self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        match self.c.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or(ConfigError::Invalid { field: key, why: format!("expected a number, found {v}") }),
        }
    }
    /// A flag read from the text config, falling back to the multimodal wrapper.
    fn bool_either(&self, key: &str) -> Option<bool> {
        self.c.get(key).or_else(|| self.root.get(key)).and_then(Value::as_bool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QWEN35: &str = r#"{"model_type":"qwen3_5_moe","text_config":{"model_type":"qwen3_5_moe_text",
      "hidden_size":64,"num_hidden_layers":4,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,
      "linear_num_key_heads":2,"linear_num_value_heads":4,"linear_key_head_dim":16,"linear_value_head_dim":16,
      "num_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":32,"shared_expert_intermediate_size":32,
      "vocab_size":512,"rope_parameters":{"rope_theta":1e7,"partial_rotary_factor":0.25}}}"#;

    #[test]
    fn qwen35_wrapper_reads_text_config() {
        let c = ModelConfig::from_json(QWEN35).unwrap();
        assert_eq!(c.family, Family::Qwen35Moe);
        assert_eq!(c.layers, vec![LayerKind::DeltaNet, LayerKind::DeltaNet, LayerKind::DeltaNet, LayerKind::Attention]);
        assert_eq!((c.rotary_dim, c.rope_theta), (8, 1e7));
        assert_eq!(c.conv_dim(), 2 * 32 + 64);
        assert_eq!(c.q_proj_rows(), 256);
        assert!(c.norm_topk);
    }

    #[test]
    fn unknown_model_type_is_named() {
        let e = ModelConfig::from_json(r#"{"model_type":"llama"}"#).unwrap_err();
        assert!(e.to_string().contains("\"llama\""), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = ModelConfig::from_json(&QWEN35.replace("\"num_experts\":8,", "")).unwrap_err();
        assert!(e.to_string().contains("num_experts"), "{e}");
    }

    #[test]
    fn top_k_override_is_checked() {
        let c = ModelConfig::from_json(QWEN35).unwrap();
        assert_eq!(c.clone().with_top_k(1).unwrap().top_k, 1);
        assert!(c.with_top_k(9).is_err());
    }
}
