//! Where the bytes of each routed expert lie on disk, and how the [`Expert`] matrices are cut out of
//! the buffer they are read into: the part of the expert store that knows file formats.
//!
//! A layout answers two questions for an expert `(layer, expert)`: which byte ranges of which files
//! to read into one buffer ([`ExpertLayout::plan`]), and how that buffer splits into `gate`, `up`
//! and `down` ([`ExpertLayout::carve`], zero copy: the matrices are windows of the buffer). The
//! [`ExpertStore`](crate::ExpertStore) does the reading, caching and bookkeeping for any layout.
//!
//! - [`PackedLayout`]: one record per expert in `experts/layer_NNN.bin` (`docs/format.md`), one
//!   extent; with `O_DIRECT` the read is rounded up to whole 4 KiB blocks (the record's padding).
//! - [`HfLayout`]: an unconverted Hugging Face directory, three tensors per expert (`gate`, `up`,
//!   `down`) at their safetensors offsets, in either expert layout; parts that lie back to back in
//!   one file (`gate` and `up` of a fused `gate_up_proj`, often all three of a per-expert layout)
//!   are read as one extent.

use crate::hf::HfTensors;
use crate::manifest::{Component, ExpertSection, Span};
use crate::{Expert, StoreError, TensorSource};
use moe_core::{Bytes, DType, Matrix, ModelConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Alignment of `O_DIRECT` reads: buffer address, file offset and length are multiples of this.
pub const DIRECT_ALIGN: usize = 4096;

/// Alignment of the parts of a Hugging Face expert inside its buffer.
const PART_ALIGN: usize = 64;

/// Read `len` bytes of file `file` (an index into [`ExpertLayout::files`]) at `offset` into the
/// expert's buffer at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub file: usize,
    pub offset: u64,
    pub len: usize,
    pub at: usize,
}

/// Everything to read for one expert: the extents and the length of the buffer they go into.
/// Bytes of the buffer no extent covers are zeroed by the reader.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadPlan {
    pub extents: Vec<Extent>,
    pub buf_len: usize,
}

impl ReadPlan {
    /// Bytes read from disk.
    pub fn read_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.len as u64).sum()
    }
}

/// Where the routed experts of one model lie on disk. Implementations must be cheap to query
/// (called on every read) and consistent: [`carve`](Self::carve) must only use bytes that
/// [`plan`](Self::plan) reads.
pub trait ExpertLayout: Send + Sync + 'static {
    /// The model directory (for error messages).
    fn dir(&self) -> &Path;
    /// The files extents refer to, by index.
    fn files(&self) -> &[PathBuf];
    fn layers(&self) -> usize;
    /// Routed experts per layer.
    fn experts(&self) -> usize;
    /// Whether [`plan`](Self::plan) with `direct` gives `O_DIRECT`-able extents (offsets, lengths
    /// and buffer positions multiples of [`DIRECT_ALIGN`]).
    fn supports_direct(&self) -> bool {
        false
    }
    /// What to read for expert `expert` of layer `layer` (both in range); `direct` asks for an
    /// `O_DIRECT` plan where [`supports_direct`](Self::supports_direct).
    fn plan(&self, layer: usize, expert: usize, direct: bool) -> ReadPlan;
    /// The expert's matrices as windows of `buf`, the whole buffer a plan for it was read into.
    fn carve(&self, layer: usize, expert: usize, buf: &Bytes) -> Expert;
    /// Bytes of one expert's matrices (the largest, where they differ).
    fn expert_bytes(&self) -> usize;
    /// Bytes of all routed experts.
    fn total_bytes(&self) -> usize;
}

// ------------------------------------------------------------------------------------------------
// Packed

/// Experts of a packed directory: expert `e` of layer `l` is bytes `[e * stride, e * stride +
/// record_bytes)` of `experts/layer_LLL.bin`.
pub(crate) struct PackedLayout {
    dir: PathBuf,
    files: Vec<PathBuf>,
    experts: usize,
    stride: u64,
    record_bytes: usize,
    comps: [Component; 3],
}

impl PackedLayout {
    /// The layout the manifest's expert section describes, after checking that every expert file
    /// has the recorded size (so that a truncated file is reported at open, naming it).
    pub fn new(dir: &Path, e: &ExpertSection) -> Result<Self, StoreError> {
        let mut files = Vec::with_capacity(e.files.len());
        for f in &e.files {
            let path = dir.join(&f.file.path);
            let len = std::fs::metadata(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?.len();
            if len != f.file.bytes {
                let what = if len < f.file.bytes { "truncated" } else { "longer than recorded" };
                return Err(StoreError::Corrupt {
                    file: path,
                    why: format!(
                        "{what}: {len} bytes, expected {} ({} experts x {}-byte records)",
                        f.file.bytes, e.experts, e.stride
                    ),
                });
            }
            files.push(path);
        }
        Ok(PackedLayout {
            dir: dir.to_path_buf(),
            files,
            experts: e.experts,
            stride: e.stride,
            record_bytes: e.record_bytes as usize,
            comps: [e.gate, e.up, e.down],
        })
    }
}

fn component_matrix(c: &Component, record: &Bytes) -> Matrix {
    let slice = |s: Option<Span>| s.map(|s| record.slice(s.range())).unwrap_or_else(Bytes::empty);
    Matrix {
        format: c.format.weight_format(),
        rows: c.rows,
        cols: c.cols,
        data: record.slice(c.data.range()),
        scales: slice(c.scales),
        biases: slice(c.biases),
    }
}

impl ExpertLayout for PackedLayout {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn layers(&self) -> usize {
        self.files.len()
    }

    fn experts(&self) -> usize {
        self.experts
    }

    fn supports_direct(&self) -> bool {
        // The manifest guarantees a stride of whole 4 KiB blocks, and the rounded-up record never
        // goes past it.
        self.stride.is_multiple_of(DIRECT_ALIGN as u64)
    }

    fn plan(&self, layer: usize, expert: usize, direct: bool) -> ReadPlan {
        let len = if direct && self.supports_direct() {
            self.record_bytes.next_multiple_of(DIRECT_ALIGN)
        } else {
            self.record_bytes
        };
        ReadPlan {
            extents: vec![Extent { file: layer, offset: expert as u64 * self.stride, len, at: 0 }],
            buf_len: len,
        }
    }

    fn carve(&self, _layer: usize, _expert: usize, buf: &Bytes) -> Expert {
        let [g, u, d] = &self.comps;
        Expert { gate: component_matrix(g, buf), up: component_matrix(u, buf), down: component_matrix(d, buf) }
    }

    fn expert_bytes(&self) -> usize {
        self.record_bytes
    }

    fn total_bytes(&self) -> usize {
        self.record_bytes * self.experts * self.files.len()
    }
}

// ------------------------------------------------------------------------------------------------
// Hugging Face

/// One projection of one expert in a safetensors shard.
#[derive(Clone, Copy, Debug)]
struct Part {
    file: usize,
    /// Absolute offset in the file.
    offset: u64,
    len: usize,
    dtype: DType,
}

/// A tensor holding the same projection of every expert of a layer, expert after expert.
#[derive(Clone, Copy, Debug)]
struct Stacked {
    file: usize,
    offset: u64,
    dtype: DType,
}

enum HfLayer {
    /// `gate_up_proj` `[E, 2I, H]` and `down_proj` `[E, H, I]`.
    Fused { gate_up: Stacked, down: Stacked },
    /// `experts.E.{gate,up,down}_proj.weight`, by expert.
    PerExpert(Vec<[Part; 3]>),
}

/// Experts of an unconverted Hugging Face directory, read from the shards by offset.
pub(crate) struct HfLayout {
    dir: PathBuf,
    files: Vec<PathBuf>,
    experts: usize,
    hidden: usize,
    inter: usize,
    layers: Vec<HfLayer>,
    expert_bytes: usize,
    total_bytes: usize,
}

impl HfLayout {
    /// Finds and checks the routed experts of every layer (all layers of the supported families
    /// are MoE): shapes, dtypes, and where they lie.
    pub fn new(dir: &Path, tensors: &HfTensors, config: &ModelConfig) -> Result<Self, StoreError> {
        let (n, h, i) = (config.experts, config.hidden, config.expert_inter);
        let mut files: Vec<PathBuf> = Vec::new();
        let mut file_index: HashMap<PathBuf, usize> = HashMap::new();
        // (file index, absolute offset) of a tensor already checked to exist.
        let mut locate = |name: &str| -> (usize, u64) {
            let (file, entry) = tensors.lookup(name).expect("the tensor was found by name just before");
            let fi = *file_index.entry(file.path.clone()).or_insert_with(|| {
                files.push(file.path.clone());
                files.len() - 1
            });
            (fi, entry.range.start as u64)
        };
        let mut layers = Vec::with_capacity(config.layers.len());
        let (mut expert_bytes, mut total_bytes) = (0, 0);
        for l in 0..config.layers.len() {
            let prefix = format!("layers.{l}.mlp.experts.");
            let fused = |part: &str| format!("{prefix}{part}");
            let layer = if tensors.contains(&fused("gate_up_proj")) || tensors.contains(&fused("down_proj")) {
                let gate_up = tensors.tensor(&fused("gate_up_proj"))?;
                gate_up.expect_shape(&[n, 2 * i, h])?;
                let down = tensors.tensor(&fused("down_proj"))?;
                down.expect_shape(&[n, h, i])?;
                let one = (gate_up.data.len() + down.data.len()) / n.max(1);
                expert_bytes = expert_bytes.max(one);
                total_bytes += gate_up.data.len() + down.data.len();
                let (gf, go) = locate(&fused("gate_up_proj"));
                let (df, d_off) = locate(&fused("down_proj"));
                HfLayer::Fused {
                    gate_up: Stacked { file: gf, offset: go, dtype: gate_up.dtype },
                    down: Stacked { file: df, offset: d_off, dtype: down.dtype },
                }
            } else {
                let mut experts = Vec::with_capacity(n);
                for e in 0..n {
                    let mut part = |proj: &str, rows, cols| -> Result<Part, StoreError> {
                        let name = format!("{prefix}{e}.{proj}.weight");
                        let t = tensors.tensor(&name)?;
                        t.expect_shape(&[rows, cols])?;
                        let (file, offset) = locate(&name);
                        Ok(Part { file, offset, len: t.data.len(), dtype: t.dtype })
                    };
                    let parts = [part("gate_proj", i, h)?, part("up_proj", i, h)?, part("down_proj", h, i)?];
                    let bytes: usize = parts.iter().map(|p| p.len).sum();
                    expert_bytes = expert_bytes.max(bytes);
                    total_bytes += bytes;
                    experts.push(parts);
                }
                HfLayer::PerExpert(experts)
            };
            layers.push(layer);
        }
        Ok(HfLayout {
            dir: dir.to_path_buf(),
            files,
            experts: n,
            hidden: h,
            inter: i,
            layers,
            expert_bytes,
            total_bytes,
        })
    }

    /// Gate, up, down of one expert.
    fn parts(&self, layer: usize, expert: usize) -> [Part; 3] {
        match &self.layers[layer] {
            HfLayer::PerExpert(experts) => experts[expert],
            HfLayer::Fused { gate_up, down } => {
                let (h, i) = (self.hidden, self.inter);
                let half = i * h * gate_up.dtype.size();
                let down_len = h * i * down.dtype.size();
                let gate_at = gate_up.offset + (2 * half * expert) as u64;
                [
                    Part { file: gate_up.file, offset: gate_at, len: half, dtype: gate_up.dtype },
                    Part { file: gate_up.file, offset: gate_at + half as u64, len: half, dtype: gate_up.dtype },
                    Part {
                        file: down.file,
                        offset: down.offset + (down_len * expert) as u64,
                        len: down_len,
                        dtype: down.dtype,
                    },
                ]
            }
        }
    }
}

/// Buffer positions of the parts: a part that follows the previous one in the same file follows
/// it in the buffer too (so the two are one read), any other starts at the next multiple of
/// [`PART_ALIGN`]. Returns the positions and the buffer length.
fn place(parts: &[Part; 3]) -> ([usize; 3], usize) {
    let mut at = [0; 3];
    let mut end: usize = 0;
    for (k, p) in parts.iter().enumerate() {
        at[k] = if k > 0 && p.file == parts[k - 1].file && p.offset == parts[k - 1].offset + parts[k - 1].len as u64 {
            end
        } else {
            end.next_multiple_of(PART_ALIGN)
        };
        end = at[k] + p.len;
    }
    (at, end)
}

impl ExpertLayout for HfLayout {
    fn dir(&self) -> &Path {
        &self.dir
    }

    fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn layers(&self) -> usize {
        self.layers.len()
    }

    fn experts(&self) -> usize {
        self.experts
    }

    fn plan(&self, layer: usize, expert: usize, _direct: bool) -> ReadPlan {
        let parts = self.parts(layer, expert);
        let (at, buf_len) = place(&parts);
        let mut extents: Vec<Extent> = Vec::with_capacity(3);
        for (p, at) in parts.iter().zip(at) {
            match extents.last_mut() {
                Some(last)
                    if last.file == p.file && last.offset + last.len as u64 == p.offset && last.at + last.len == at =>
                {
                    last.len += p.len
                }
                _ => extents.push(Extent { file: p.file, offset: p.offset, len: p.len, at }),
            }
        }
        ReadPlan { extents, buf_len }
    }

    fn carve(&self, layer: usize, expert: usize, buf: &Bytes) -> Expert {
        let parts = self.parts(layer, expert);
        let (at, _) = place(&parts);
        let (h, i) = (self.hidden, self.inter);
        let m = |k: usize, rows, cols| {
            let p = parts[k];
            Matrix::float(p.dtype, rows, cols, buf.slice(at[k]..at[k] + p.len))
        };
        Expert { gate: m(0, i, h), up: m(1, i, h), down: m(2, h, i) }
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

    fn part(file: usize, offset: u64, len: usize) -> Part {
        Part { file, offset, len, dtype: DType::BF16 }
    }

    #[test]
    fn adjacent_parts_are_one_read_others_are_aligned() {
        // gate and up back to back (fused gate_up_proj), down elsewhere.
        let parts = [part(0, 1000, 100), part(0, 1100, 100), part(1, 8, 50)];
        assert_eq!(place(&parts), ([0, 100, 256], 306));
        // All three back to back: one extent, no gaps.
        let parts = [part(2, 8, 10), part(2, 18, 10), part(2, 28, 10)];
        assert_eq!(place(&parts), ([0, 10, 20], 30));
        // Same file, not adjacent.
        let parts = [part(0, 0, 10), part(0, 20, 10), part(0, 30, 10)];
        assert_eq!(place(&parts), ([0, 64, 74], 84));
    }
}
