//! Hugging Face model directories, read in place: `config.json` plus the safetensors shards,
//! memory-mapped, every tensor handed out zero copy.
//!
//! Shards come from `model.safetensors.index.json` when there is one, else from every
//! `*.safetensors` file of the directory. Names are made canonical by dropping the
//! `model.language_model.` / `model.` prefixes; the vision tower (`model.visual.*`, `visual.*`) and
//! the multi-token-prediction head (`mtp.*`) are ignored. Routed experts are validated for every
//! layer at open time, in either the per-expert layout
//! (`layers.N.mlp.experts.E.{gate,up,down}_proj.weight`) or the fused one
//! (`layers.N.mlp.experts.gate_up_proj` `[E, 2I, H]` + `layers.N.mlp.experts.down_proj` `[E, H, I]`),
//! and read through the expert store by their offsets in the shards (buffered `pread`, not the map).

use crate::layout::HfLayout;
use crate::safetensors_file::{Entry, SafetensorsFile};
use crate::{ExpertStore, ModelFiles, StoreError, StoreOptions, Tensor, TensorSource};
use moe_core::ModelConfig;
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

const INDEX: &str = "model.safetensors.index.json";

/// Opens an unconverted Hugging Face model directory (expert store with default options).
pub fn open_hf(dir: &Path) -> Result<ModelFiles, StoreError> {
    open_hf_with(dir, &StoreOptions::default())
}

/// Opens an unconverted Hugging Face model directory; its routed experts are read from the shards
/// by offset through an [`ExpertStore`] set up by `opts`.
pub fn open_hf_with(dir: &Path, opts: &StoreOptions) -> Result<ModelFiles, StoreError> {
    if !dir.is_dir() {
        return Err(StoreError::Io {
            path: dir.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such model directory"),
        });
    }
    let config = read_config(dir)?;
    let tensors = HfTensors::open(dir)?;
    let layout = HfLayout::new(dir, &tensors, &config)?;
    let experts = ExpertStore::new(Box::new(layout), opts, tensors.dense_bytes() as u64)?;
    Ok(ModelFiles { dir: dir.to_path_buf(), config, tensors: Arc::new(tensors), experts: Arc::new(experts) })
}

fn read_config(dir: &Path) -> Result<ModelConfig, StoreError> {
    let path = dir.join("config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::MissingConfig(dir.to_path_buf())),
        Err(source) => return Err(StoreError::Io { path, source }),
    };
    ModelConfig::from_json(&text).map_err(|source| StoreError::Config { path, source })
}

/// The canonical name of a tensor name as written in a file; `None` for tensors text inference
/// ignores. MLX names (`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`)
/// map the same way.
pub(crate) fn canonical(name: &str) -> Option<&str> {
    if ["model.visual.", "visual.", "mtp.", "vision_tower.", "language_model.vision_tower."]
        .iter()
        .any(|p| name.starts_with(p))
    {
        return None;
    }
    Some(
        ["model.language_model.", "language_model.model.", "language_model.", "model."]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name),
    )
}

/// Whether a canonical name belongs to a routed expert (`layers.N.mlp.experts.*`; the shared
/// expert is `mlp.shared_expert.*`).
fn is_routed_expert(name: &str) -> bool {
    name.starts_with("layers.") && name.contains(".mlp.experts.")
}

/// Orders dotted names with numeric parts compared as numbers: `layers.2` before `layers.10`.
fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut x, mut y) = (a.split('.'), b.split('.'));
    loop {
        let order = match (x.next(), y.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(p), Some(q)) => match (p.parse::<u64>(), q.parse::<u64>()) {
                (Ok(m), Ok(n)) => m.cmp(&n).then_with(|| p.cmp(q)),
                _ => p.cmp(q),
            },
        };
        if order != Ordering::Equal {
            return order;
        }
    }
}

/// All tensors of the directory's shards, by canonical name.
pub(crate) struct HfTensors {
    dir: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Canonical name -> (file, entry).
    by_name: HashMap<String, (usize, usize)>,
}

impl HfTensors {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let index_path = dir.join(INDEX);
        let weight_map = match std::fs::read_to_string(&index_path) {
            Ok(text) => Some(parse_index(&index_path, &text)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(StoreError::Io { path: index_path, source }),
        };
        let shards: Vec<PathBuf> = match &weight_map {
            Some(map) => {
                // Shards holding only ignored tensors (vision tower, MTP) need not be present.
                let mut shards: Vec<PathBuf> = Vec::new();
                for (tensor, shard) in map {
                    if canonical(tensor).is_some() && !shards.iter().any(|s| s == Path::new(shard)) {
                        shards.push(PathBuf::from(shard));
                    }
                }
                shards.into_iter().map(|s| dir.join(s)).collect()
            }
            None => list_safetensors(dir)?,
        };
        let files = shards.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>, _>>()?;

        let mut by_name: HashMap<String, (usize, usize)> = HashMap::new();
        for (fi, file) in files.iter().enumerate() {
            for (ei, entry) in file.entries.iter().enumerate() {
                let Some(name) = canonical(&entry.name) else { continue };
                if let Some((pf, pe)) = by_name.insert(name.to_string(), (fi, ei)) {
                    return Err(StoreError::Corrupt {
                        file: file.path.clone(),
                        why: format!(
                            "tensor {:?} is stored a second time, as {:?} in {}",
                            entry.name,
                            files[pf].entries[pe].name,
                            files[pf].path.display()
                        ),
                    });
                }
            }
        }

        if let Some(map) = &weight_map {
            for (tensor, shard) in map {
                let Some(name) = canonical(tensor) else { continue };
                let found = by_name
                    .get(name)
                    .filter(|&&(fi, ei)| files[fi].path == dir.join(shard) && files[fi].entries[ei].name == *tensor);
                if found.is_none() {
                    return Err(StoreError::Corrupt {
                        file: index_path.clone(),
                        why: format!("the index places tensor {tensor:?} in {shard}, which does not hold it"),
                    });
                }
            }
        }
        Ok(HfTensors { dir: dir.to_path_buf(), files, by_name })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file and header entry of a tensor, by canonical or file name, whatever its dtype.
    pub(crate) fn lookup(&self, name: &str) -> Option<(&SafetensorsFile, &Entry)> {
        let &(fi, ei) = self.by_name.get(canonical(name)?)?;
        let file = &self.files[fi];
        Some((file, &file.entries[ei]))
    }

    fn dense(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.by_name
            .iter()
            .filter(|(name, _)| !is_routed_expert(name))
            .map(|(name, &(fi, ei))| (name, &self.files[fi].entries[ei]))
    }
}

impl TensorSource for HfTensors {
    fn tensor(&self, name: &str) -> Result<Tensor, StoreError> {
        let (file, entry) = self.lookup(name).ok_or_else(|| StoreError::MissingTensor {
            tensor: canonical(name).unwrap_or(name).to_string(),
            dir: self.dir.clone(),
        })?;
        file.tensor(entry)
    }

    fn contains(&self, name: &str) -> bool {
        self.lookup(name).is_some()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.dense().map(|(name, _)| name.clone()).collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }

    fn dense_bytes(&self) -> usize {
        self.dense().map(|(_, entry)| entry.byte_len()).sum()
    }
}

/// The `weight_map` of an index file, as (tensor, shard file) pairs.
fn parse_index(path: &Path, text: &str) -> Result<Vec<(String, String)>, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { file: path.to_path_buf(), why };
    let root: Value = serde_json::from_str(text).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
    let map =
        root.get("weight_map").and_then(Value::as_object).ok_or_else(|| corrupt("no weight_map object".into()))?;
    map.iter()
        .map(|(tensor, shard)| {
            let shard =
                shard.as_str().ok_or_else(|| corrupt(format!("weight_map entry {tensor:?} is not a file name")))?;
            let plain = Path::new(shard).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if shard.is_empty() || !plain {
                return Err(corrupt(format!("weight_map names shard {shard:?}, which is not a file of the directory")));
            }
            Ok((tensor.clone(), shard.to_string()))
        })
        .collect()
}

/// The weight files of an unindexed directory: `model.safetensors` where it exists (so that
/// other safetensors files beside it, reference outputs say, are not taken for weights),
/// otherwise every `*.safetensors` file, sorted by name.
fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
            paths.push(path);
        }
    }
    if paths.is_empty() {
        return Err(io(io::Error::new(io::ErrorKind::NotFound, format!("no {INDEX} and no *.safetensors files"))));
    }
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names() {
        assert_eq!(canonical("model.language_model.layers.0.mlp.gate.weight"), Some("layers.0.mlp.gate.weight"));
        assert_eq!(canonical("model.layers.0.mlp.gate.weight"), Some("layers.0.mlp.gate.weight"));
        assert_eq!(canonical("layers.0.mlp.gate.weight"), Some("layers.0.mlp.gate.weight"));
        assert_eq!(canonical("lm_head.weight"), Some("lm_head.weight"));
        assert_eq!(canonical("model.visual.blocks.0.attn.qkv.weight"), None);
        assert_eq!(canonical("visual.merger.weight"), None);
        assert_eq!(canonical("mtp.fc.weight"), None);
        assert_eq!(canonical("language_model.model.layers.0.mlp.gate.scales"), Some("layers.0.mlp.gate.scales"));
        assert_eq!(canonical("language_model.lm_head.weight"), Some("lm_head.weight"));
        assert_eq!(canonical("vision_tower.blocks.0.attn.qkv.weight"), None);
    }

    #[test]
    fn routed_experts_are_told_apart_from_the_shared_expert() {
        assert!(is_routed_expert("layers.3.mlp.experts.gate_up_proj"));
        assert!(is_routed_expert("layers.3.mlp.experts.7.down_proj.weight"));
        assert!(!is_routed_expert("layers.3.mlp.shared_expert.down_proj.weight"));
        assert!(!is_routed_expert("layers.3.mlp.gate.weight"));
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["layers.10.a", "norm.weight", "layers.2.b", "layers.2.a", "embed_tokens.weight"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["embed_tokens.weight", "layers.2.a", "layers.2.b", "layers.10.a", "norm.weight"]);
    }
}
