//! Everything flash-moe keeps on disk: Hugging Face safetensors directories, the expert
//! sources the model reads routed experts through, and the packed format (`docs/format.md`).
//!
//! The model code sees two interfaces: [`TensorSource`] for the resident (dense) weights, looked up
//! by canonical name, and [`ExpertSource`] for routed experts, fetched one expert at a time so that
//! a streaming store can stand behind it.

mod cache;
mod error;
mod expert_store;
mod hf;
mod layout;
pub mod manifest;
mod mlx;
mod options;
mod packed;
pub mod probe;
mod reader;
mod safetensors_file;
mod synth;

pub use error::StoreError;
pub use expert_store::{ExpertStore, StoreStats};
pub use hf::{open_hf, open_hf_with};
pub use layout::{DIRECT_ALIGN, ExpertLayout, Extent, ReadPlan};
pub use mlx::{is_mlx_dir, open_mlx};
pub use moe_core::{HOST_MEMORY_ALIGN, HostMemory};
pub use options::{
    Budget, DEFAULT_IO_THREADS, Eviction, OS_RESERVE, StoreOptions, auto_ram_budget, format_bytes, mem_available,
    parse_bytes,
};
pub use packed::{
    DENSE_FILE, DenseFormat, ExpertFormat, MANIFEST_FILE, expert_file_name, open_packed, open_packed_with,
    verify_packed, write_packed,
};
pub use reader::{AlignedBuf, READ_CHUNK};
pub use synth::{SynthShape, write_synthetic};

use moe_core::{Bytes, DType, Matrix, ModelConfig, WeightFormat};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One stored tensor, its bytes still in the file's memory map.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// The name as written in the file.
    pub name: String,
    pub file: PathBuf,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Bytes,
}

impl Tensor {
    /// The tensor as a `[rows, cols]` matrix; any other shape is an error naming file and tensor.
    pub fn matrix(&self, rows: usize, cols: usize) -> Result<Matrix, StoreError> {
        self.expect_shape(&[rows, cols])?;
        Ok(Matrix::float(self.dtype, rows, cols, self.data.clone()))
    }

    /// The tensor as f32 values, checked to have `shape`. For small tensors (norms, gates).
    pub fn values(&self, shape: &[usize]) -> Result<Vec<f32>, StoreError> {
        self.expect_shape(shape)?;
        Ok(self.dtype.to_f32(&self.data))
    }

    pub fn expect_shape(&self, shape: &[usize]) -> Result<(), StoreError> {
        if self.shape != shape {
            return Err(StoreError::Shape {
                tensor: self.name.clone(),
                file: self.file.clone(),
                expected: shape.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }
}

/// Resident weights by canonical name: `embed_tokens.weight`, `norm.weight`, `lm_head.weight`,
/// `layers.N.<module>.weight`, without the `model.` / `model.language_model.` prefixes of the files.
pub trait TensorSource: Send + Sync {
    fn tensor(&self, name: &str) -> Result<Tensor, StoreError>;
    fn contains(&self, name: &str) -> bool;
    /// Canonical names of the dense tensors (routed-expert tensors excluded), in natural order
    /// (`layers.2` before `layers.10`). For `inspect`.
    fn names(&self) -> Vec<String>;
    /// Bytes of all the tensors [`names`](Self::names) lists, as stored.
    fn dense_bytes(&self) -> usize;
    /// A weight matrix `[rows, cols]` in whatever format it is stored (float or quantised).
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, StoreError> {
        self.tensor(name)?.matrix(rows, cols)
    }
    /// The logical shape (`[rows, cols]` for a quantised matrix) and the stored format of a
    /// tensor, without converting anything. Sources of quantised tensors, which
    /// [`tensor`](Self::tensor) can't hand out, override it.
    fn stored_format(&self, name: &str) -> Result<(Vec<usize>, WeightFormat), StoreError> {
        let t = self.tensor(name)?;
        Ok((t.shape, WeightFormat::Float(t.dtype)))
    }
}

/// The three matrices of one routed expert: `gate` and `up` are `[inter, hidden]`, `down` is
/// `[hidden, inter]`.
#[derive(Clone, Debug)]
pub struct Expert {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

impl Expert {
    pub fn byte_len(&self) -> usize {
        self.gate.byte_len() + self.up.byte_len() + self.down.byte_len()
    }
}

/// What [`ExpertSource::adopt`] did with a buffer `fill` wrote: whether the expert was kept in
/// the RAM tier (not if a read of it finished meanwhile), and the buffer itself, whose memory is
/// not reused while `buffer` is held.
pub struct Adopted {
    pub kept: bool,
    pub buffer: std::sync::Arc<dyn std::any::Any + Send + Sync>,
}

/// Writes an expert's parts into a buffer (see [`ExpertSource::adopt`]).
pub type Fill<'a> = dyn FnMut(&mut [std::mem::MaybeUninit<u8>], &[std::ops::Range<usize>; 9]) -> bool + 'a;

/// Routed experts, fetched per use. Implementations must be safe to call from many threads.
pub trait ExpertSource: Send + Sync {
    fn expert(&self, layer: usize, expert: usize) -> Result<Expert, StoreError>;
    /// Several experts of one layer, in the order of `ids`. A store reads the misses in parallel.
    fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<Expert>, StoreError> {
        ids.iter().map(|&e| self.expert(layer, e)).collect()
    }
    /// Starts fetching experts that `expert` will be asked for soon; a hint, free to ignore.
    /// Never blocks on I/O.
    fn prefetch(&self, _layer: usize, _experts: &[usize]) {}
    /// A hint that the caller now keeps expert `expert` of `layer` in a faster tier of its own (GPU
    /// memory) and will not ask for it while it is there: a source with a RAM tier drops its copy,
    /// so that the expert lives in one tier at a time. Expert buffers handed out stay valid. Free
    /// to ignore; ids out of range are ignored.
    fn release(&self, _layer: usize, _expert: usize) {}
    /// Takes expert `expert` of `layer` into the RAM tier from a faster tier that gives it up (GPU
    /// memory evicting it), so that it lives in one tier at a time and comes back without a disk
    /// read: the source makes a buffer laid out as a read of the expert would be, and `fill`
    /// writes the expert's nine parts into it at the ranges it is given (gate codes, scales and
    /// biases, then up's, then down's; a float matrix's scales and biases are empty) and says
    /// whether it did. `None` where `fill` did not run or failed: the source has no RAM tier, its
    /// budget cannot hold the expert, or the expert is resident or being read already. The
    /// default keeps nothing.
    ///
    /// `fill` may leave writes in flight (device-to-host copies) if the caller holds
    /// [`Adopted::buffer`] until they land and asks for the expert only after that.
    fn adopt(&self, _layer: usize, _expert: usize, _fill: &mut Fill<'_>) -> Option<Adopted> {
        None
    }
    /// Whether the expert is resident in the source's RAM tier now (ids out of range are not).
    fn is_resident(&self, _layer: usize, _expert: usize) -> bool {
        false
    }
    /// Every expert of `layer` if the RAM tier holds them all now, without counting requests or
    /// uses: for a table of their addresses that kernels read in place, whose uses the caller
    /// counts itself (asked through `experts`, building the table counted every expert of the
    /// layer as a hit). `None` where one is not resident or the source has no RAM tier.
    fn layer_in_ram(&self, _layer: usize) -> Option<Vec<Expert>> {
        None
    }
    /// A snapshot of the source's counters (zeros for sources that keep none).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    /// Zeroes the counters of [`stats`](Self::stats) (what is resident stays).
    fn reset_stats(&self) {}
    /// Bytes one expert occupies (what one fetch reads).
    fn expert_bytes(&self) -> usize;
    /// Bytes of all routed experts of the model.
    fn total_bytes(&self) -> usize;
}

/// An opened model directory.
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub tensors: Arc<dyn TensorSource>,
    pub experts: Arc<dyn ExpertSource>,
}

/// Opens a model directory of any supported kind: a directory with a `manifest.json` is a packed
/// model, one with MLX quantisation or MLX tensor names an MLX one ([`is_mlx_dir`]), anything
/// else a Hugging Face one. Formats flash-moe can't read (GGUF files, Hugging Face checkpoints
/// quantised with a `quant_method`) are refused with an error saying so.
///
/// Packed and Hugging Face experts are read through an [`ExpertStore`] with the default
/// [`StoreOptions`]; see [`open_with`].
pub fn open(dir: &Path) -> Result<ModelFiles, StoreError> {
    open_with(dir, &StoreOptions::default())
}

/// [`open`] with the expert store set up by `opts`.
pub fn open_with(dir: &Path, opts: &StoreOptions) -> Result<ModelFiles, StoreError> {
    if dir.join(MANIFEST_FILE).is_file() {
        return open_packed_with(dir, opts);
    }
    unsupported_format(dir)?;
    if is_mlx_dir(dir) { open_mlx(dir) } else { open_hf_with(dir, opts) }
}

/// An error for directories of a format flash-moe does not read.
fn unsupported_format(dir: &Path) -> Result<(), StoreError> {
    let refuse = |why: String| {
        Err(StoreError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::Unsupported, why),
        })
    };
    let config = std::fs::read_to_string(dir.join("config.json")).ok();
    if let Some(method) = config
        .as_deref()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|v| v.get("quantization_config")?.get("quant_method")?.as_str().map(str::to_string))
    {
        return refuse(format!(
            "unsupported model format: a Hugging Face checkpoint quantised with {method:?}; \
             use the bf16/f16 checkpoint or an mlx-community 4-bit one"
        ));
    }
    if config.is_none()
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        let gguf: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
            .collect();
        if let Some(first) = gguf.first() {
            return refuse(format!(
                "unsupported model format: GGUF ({first}), which flash-moe does not read; \
                 use the Hugging Face safetensors or mlx-community directory of the model"
            ));
        }
    }
    Ok(())
}
