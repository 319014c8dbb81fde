use std::path::PathBuf;
use thiserror::Error;

/// What can go wrong reading a model from disk. Every variant names the file, and the tensor
/// where there is one.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: no config.json in the model directory")]
    MissingConfig(PathBuf),
    #[error("{path}: {source}")]
    Config { path: PathBuf, source: moe_core::ConfigError },
    #[error("tensor {tensor:?} not found in {dir}")]
    MissingTensor { tensor: String, dir: PathBuf },
    #[error("{file}: tensor {tensor:?} has shape {found:?}, expected {expected:?}")]
    Shape { tensor: String, file: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("{file}: tensor {tensor:?} has unsupported dtype {dtype} (supported: bf16, f16, f32)")]
    DType { tensor: String, file: PathBuf, dtype: String },
    #[error("{file}: corrupt or truncated: {why}")]
    Corrupt { file: PathBuf, why: String },
}
