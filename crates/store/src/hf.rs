//! Hugging Face model directories (implementation pending).
use crate::{ModelFiles, StoreError};
use std::path::Path;

pub fn open_hf(dir: &Path) -> Result<ModelFiles, StoreError> {
    Err(StoreError::MissingConfig(dir.join("config.json")))
}
