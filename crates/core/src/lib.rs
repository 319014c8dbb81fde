//! The pure part of flash-moe: model configuration, weight formats and the f32 reference math.
//! Nothing here touches files, threads or devices; every backend kernel is tested against it.

pub mod bytes;
pub mod config;
pub mod format;
pub mod host_memory;
pub mod ops;
pub mod quant;
pub mod sample;
pub mod shapes;
pub mod tier;

pub use bytes::Bytes;
pub use config::{ConfigError, Family, LayerKind, ModelConfig};
pub use format::{DType, Matrix, MatrixError, WeightFormat};
pub use host_memory::{HOST_MEMORY_ALIGN, HostMemory};
