//! The packed model directory (`docs/format.md`): what `flash-moe convert` writes and the engine
//! reads with one `pread` per routed expert.
//!
//! ```text
//! manifest.json              format, version, config, every tensor's format, expert layout, checksums
//! dense.safetensors          all non-expert tensors under canonical names (affine ones as
//!                            NAME / NAME.scales / NAME.biases)
//! experts/layer_NNN.bin      expert e of layer NNN at byte e * stride: gate, up, down
//! config.json, tokenizer...  copied verbatim from the source directory
//! ```
//!
//! [`write_packed`] converts any opened model ([`ModelFiles`]) into this layout, streaming tensor by
//! tensor and expert by expert into `OUT.tmp-<pid>` and renaming it to `OUT` only when everything
//! is written and synced. [`open_packed`] reads it back, [`verify_packed`] re-hashes it.

use crate::layout::PackedLayout;
use crate::manifest::{
    CHECKSUM, Component, DenseSection, DenseTensor, ExpertFile, ExpertSection, FORMAT_NAME, FORMAT_VERSION, FileEntry,
    Manifest, PART_ALIGN, RECORD_ALIGN, Span, TensorFormat, Xxh64, hex64,
};
use crate::{Expert, ExpertStore, ModelFiles, StoreError, StoreOptions, Tensor, TensorSource};
use memmap2::Mmap;
use moe_core::format::f32_to_bf16_bits;
use moe_core::quant::{code_bytes, quantize, requantize_q2_from_q4, scale_bytes};
use moe_core::{Bytes, DType, Matrix, ModelConfig, WeightFormat};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// File names inside a packed directory.
pub const MANIFEST_FILE: &str = "manifest.json";
pub const DENSE_FILE: &str = "dense.safetensors";

/// `experts/layer_NNN.bin`.
pub fn expert_file_name(layer: usize) -> String {
    format!("experts/layer_{layer:03}.bin")
}

/// Group size of quantised tensors; [`FALLBACK_GROUP`] where it does not divide the row.
pub const QUANT_GROUP: usize = 64;
pub const FALLBACK_GROUP: usize = 32;

/// Storage of the routed experts in a packed directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertFormat {
    Bf16,
    Q8,
    Q4,
    Q2,
}

/// Storage of the dense 2-D weight matrices (norms, `A_log`, `dt_bias` and `conv1d` always keep
/// their float dtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseFormat {
    Bf16,
    Q8,
}

impl ExpertFormat {
    pub fn name(self) -> &'static str {
        match self {
            ExpertFormat::Bf16 => "bf16",
            ExpertFormat::Q8 => "q8",
            ExpertFormat::Q4 => "q4",
            ExpertFormat::Q2 => "q2",
        }
    }
    /// Bits of the codes; `None` for bf16.
    pub fn bits(self) -> Option<u32> {
        match self {
            ExpertFormat::Bf16 => None,
            ExpertFormat::Q8 => Some(8),
            ExpertFormat::Q4 => Some(4),
            ExpertFormat::Q2 => Some(2),
        }
    }
}

impl DenseFormat {
    pub fn name(self) -> &'static str {
        match self {
            DenseFormat::Bf16 => "bf16",
            DenseFormat::Q8 => "q8",
        }
    }
}

impl FromStr for ExpertFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(ExpertFormat::Bf16),
            "q8" => Ok(ExpertFormat::Q8),
            "q4" => Ok(ExpertFormat::Q4),
            "q2" => Ok(ExpertFormat::Q2),
            _ => Err(format!("unknown expert format {s:?} (expected bf16, q8, q4 or q2)")),
        }
    }
}

impl FromStr for DenseFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(DenseFormat::Bf16),
            "q8" => Ok(DenseFormat::Q8),
            _ => Err(format!("unknown dense format {s:?} (expected bf16 or q8)")),
        }
    }
}

/// The group for `bits`-bit codes of rows of `cols` elements: 64, else 32, else none (keep bf16).
pub fn affine_group(cols: usize, bits: u32) -> Option<usize> {
    [QUANT_GROUP, FALLBACK_GROUP]
        .into_iter()
        .find(|&g| cols.is_multiple_of(g) && (g * bits as usize).is_multiple_of(32))
}

/// Dense tensors that stay in their float dtype whatever the dense format: everything that is not
/// a 2-D `.weight` matrix, and norms, `A_log`, `dt_bias`, `conv1d` by name.
pub fn keeps_float(name: &str, shape: &[usize]) -> bool {
    shape.len() != 2
        || !name.ends_with(".weight")
        || ["norm", "A_log", "dt_bias", "conv1d"].iter().any(|k| name.contains(k))
}

// ------------------------------------------------------------------------------------------------
// Writing

/// Converts the opened model `src` into a packed directory at `out`.
///
/// Streams tensor by tensor and expert by expert (peak memory: a few times one expert plus one
/// block of rows of a dense tensor), into `OUT.tmp-<pid>` next to `out`, renamed to `out` at the
/// end. An existing `out` is refused unless `force`, and never replaced by a partial result; the
/// source is only read. On any error the temporary directory is removed and the error names the
/// path at fault. `progress(done, total)` is called with output bytes after each tensor, expert
/// and file.
///
/// Sources: every tensor `src.tensors.names()` lists and every routed expert. Float sources are
/// converted or quantised; affine sources (MLX 4-bit, or a packed directory) are copied when the
/// target format is theirs, requantised with flash-moe's rule for 4-bit to 2-bit experts, and
/// otherwise dequantised and quantised again.
pub fn write_packed(
    src: &ModelFiles,
    out: &Path,
    experts: ExpertFormat,
    dense: DenseFormat,
    force: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), StoreError> {
    let origin = Origin::of_dir(&src.dir)?;
    write_packed_with(src, &origin, out, experts, dense, force, progress)
}

/// Where a packed directory comes from, apart from the model's tensors: the manifest's `source`,
/// the `config.json` text it embeds, and the small files stored beside the model.
pub(crate) struct Origin {
    pub label: String,
    pub config: String,
    pub files: Vec<ExtraFile>,
}

/// A small file written into the packed directory under `name`.
pub(crate) struct ExtraFile {
    pub name: String,
    pub len: u64,
    pub data: ExtraData,
}

pub(crate) enum ExtraData {
    /// Copied from this file.
    Copy(PathBuf),
    Bytes(Vec<u8>),
}

impl Origin {
    /// A model directory on disk: its `config.json` (or the config a packed directory carries)
    /// and its config, tokenizer, chat template and generation files.
    fn of_dir(dir: &Path) -> Result<Origin, StoreError> {
        Ok(Origin {
            label: fs::canonicalize(dir).unwrap_or(dir.to_path_buf()).to_string_lossy().into_owned(),
            config: source_config(dir)?,
            files: extra_files(dir)?,
        })
    }
}

/// [`write_packed`] with the origin given rather than read from `src.dir` (synthetic models).
pub(crate) fn write_packed_with(
    src: &ModelFiles,
    origin: &Origin,
    out: &Path,
    experts: ExpertFormat,
    dense: DenseFormat,
    force: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), StoreError> {
    let io_err = |path: &Path, source: io::Error| StoreError::Io { path: path.to_path_buf(), source };
    let out_name = out.file_name().ok_or_else(|| {
        io_err(out, io::Error::new(io::ErrorKind::InvalidInput, "the destination must name a directory"))
    })?;
    let exists = fs::symlink_metadata(out).is_ok();
    if exists {
        if !force {
            return Err(io_err(
                out,
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the destination already exists (pass force to replace it)",
                ),
            ));
        }
        if let (Ok(o), Ok(s)) = (fs::canonicalize(out), fs::canonicalize(&src.dir))
            && s.starts_with(&o)
        {
            return Err(io_err(
                out,
                io::Error::new(io::ErrorKind::InvalidInput, "the destination is or contains the source model"),
            ));
        }
    }
    let pid = std::process::id();
    let tmp = out.with_file_name(format!("{}.tmp-{pid}", out_name.to_string_lossy()));
    if fs::symlink_metadata(&tmp).is_ok() {
        // Left by an earlier run of a process with our pid, which can't be running any more.
        fs::remove_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
    }
    fs::create_dir(&tmp).map_err(|e| io_err(&tmp, e))?;
    let mut guard = TempDir { path: tmp.clone(), keep: false };

    Writer { src, origin, dir: &tmp, experts, dense, progress, done: 0, total: 0 }.run()?;

    if exists {
        let old = out.with_file_name(format!("{}.old-{pid}", out_name.to_string_lossy()));
        fs::rename(out, &old).map_err(|e| io_err(out, e))?;
        if let Err(e) = fs::rename(&tmp, out) {
            let _ = fs::rename(&old, out);
            return Err(io_err(out, e));
        }
        guard.keep = true;
        if fs::symlink_metadata(&old).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&old).map_err(|e| io_err(&old, e))?;
        } else {
            fs::remove_file(&old).map_err(|e| io_err(&old, e))?;
        }
    } else {
        fs::rename(&tmp, out).map_err(|e| io_err(out, e))?;
        guard.keep = true;
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Removes the temporary directory unless told to keep it (also on panic).
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// A file being written: buffered, hashed on the way, errors naming the file.
struct HashedFile {
    path: PathBuf,
    out: BufWriter<File>,
    hash: Xxh64,
    bytes: u64,
}

impl HashedFile {
    fn create(path: PathBuf) -> Result<Self, StoreError> {
        let file = File::create(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
        Ok(HashedFile { path, out: BufWriter::with_capacity(1 << 20, file), hash: Xxh64::new(0), bytes: 0 })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), StoreError> {
        self.out.write_all(data).map_err(|source| StoreError::Io { path: self.path.clone(), source })?;
        self.hash.update(data);
        self.bytes += data.len() as u64;
        Ok(())
    }

    /// Flushes and syncs (so that a full disk surfaces here, not after the rename).
    fn finish(self, dir: &Path) -> Result<FileEntry, StoreError> {
        let HashedFile { path, out, hash, bytes } = self;
        let io = |source| StoreError::Io { path: path.clone(), source };
        let file = out.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        let rel = path.strip_prefix(dir).unwrap_or(&path).to_string_lossy().replace('\\', "/");
        Ok(FileEntry { path: rel, bytes, xxh64: hex64(hash.digest()) })
    }
}

/// One dense tensor to write.
struct DensePlan {
    name: String,
    shape: Vec<usize>,
    /// How the source stores it.
    source: WeightFormat,
    target: WeightFormat,
}

impl DensePlan {
    fn rows_cols(&self) -> (usize, usize) {
        (self.shape[0], self.shape[1])
    }

    /// The safetensors entries: (name, dtype, shape, bytes).
    fn entries(&self) -> Vec<(String, &'static str, Vec<usize>, usize)> {
        match self.target {
            WeightFormat::Float(d) => {
                let n: usize = self.shape.iter().product();
                vec![(self.name.clone(), st_dtype(d), self.shape.clone(), n * d.size())]
            }
            WeightFormat::Affine { bits, group } => {
                let (r, c) = self.rows_cols();
                let sb = scale_bytes(r, c, group);
                vec![
                    (self.name.clone(), "U32", vec![r, c * bits as usize / 32], code_bytes(r, c, bits)),
                    (format!("{}.scales", self.name), "BF16", vec![r, c / group], sb),
                    (format!("{}.biases", self.name), "BF16", vec![r, c / group], sb),
                ]
            }
        }
    }

    fn bytes(&self) -> usize {
        self.entries().iter().map(|e| e.3).sum()
    }

    /// Order in the file: 4-byte element types first, so that every u32 and f32 tensor starts
    /// 4-byte aligned (an affine triple is codes, then two bf16 arrays of equal length).
    fn class(&self) -> u8 {
        match self.target {
            WeightFormat::Float(DType::F32) => 0,
            WeightFormat::Affine { .. } => 1,
            WeightFormat::Float(_) => 2,
        }
    }
}

fn st_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

struct Writer<'a> {
    src: &'a ModelFiles,
    origin: &'a Origin,
    dir: &'a Path,
    experts: ExpertFormat,
    dense: DenseFormat,
    progress: &'a mut dyn FnMut(u64, u64),
    done: u64,
    total: u64,
}

/// Elements converted per block when streaming a dense tensor.
const BLOCK_ELEMS: usize = 1 << 20;

impl Writer<'_> {
    fn run(mut self) -> Result<(), StoreError> {
        let cfg = &self.src.config;
        let config: Value = serde_json::from_str(&self.origin.config).map_err(|e| StoreError::Corrupt {
            file: self.src.dir.join("config.json"),
            why: format!("not valid JSON: {e}"),
        })?;
        let plans = self.plan_dense()?;
        let first = self.src.experts.expert(0, 0)?;
        let (comps, record_bytes) = self.expert_layout(&first);
        let stride = record_bytes.max(1).div_ceil(RECORD_ALIGN) * RECORD_ALIGN;

        let dense_bytes: usize = plans.iter().map(DensePlan::bytes).sum();
        let layers = cfg.layers.len();
        self.total = dense_bytes as u64
            + (layers * cfg.experts) as u64 * stride
            + self.origin.files.iter().map(|f| f.len).sum::<u64>();
        (self.progress)(0, self.total);

        let dense_file = self.write_dense(&plans)?;
        fs::create_dir(self.dir.join("experts"))
            .map_err(|source| StoreError::Io { path: self.dir.join("experts"), source })?;
        let mut expert_files = Vec::with_capacity(layers);
        for layer in 0..layers {
            expert_files.push(self.write_layer(layer, &comps, record_bytes, stride)?);
        }
        let mut files = Vec::new();
        for extra in &self.origin.files {
            files.push(self.copy_file(extra)?);
        }

        let [gate, up, down] = comps;
        let manifest = Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            source: self.origin.label.clone(),
            family: cfg.family.name().into(),
            config,
            checksum: CHECKSUM.into(),
            dense: DenseSection {
                file: dense_file,
                format: self.dense.name().into(),
                tensors: plans
                    .iter()
                    .map(|p| DenseTensor {
                        name: p.name.clone(),
                        shape: p.shape.clone(),
                        format: TensorFormat::from_weight_format(p.target),
                    })
                    .collect(),
            },
            experts: ExpertSection {
                format: self.experts.name().into(),
                layers,
                experts: cfg.experts,
                stride,
                record_bytes,
                gate,
                up,
                down,
                files: expert_files,
            },
            files,
        };
        let mut text = serde_json::to_string_pretty(&manifest).expect("the manifest serialises");
        text.push('\n');
        let mut f = HashedFile::create(self.dir.join(MANIFEST_FILE))?;
        f.write(text.as_bytes())?;
        f.finish(self.dir)?;
        if let Ok(d) = File::open(self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn tick(&mut self, bytes: u64) {
        self.done += bytes;
        (self.progress)(self.done, self.total);
    }
}

/// The source's `config.json` text: the file, or the config a packed source carries.
fn source_config(dir: &Path) -> Result<String, StoreError> {
    let path = dir.join("config.json");
    match fs::read_to_string(&path) {
        Ok(text) => return Ok(text),
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(StoreError::Io { path, source: e }),
        Err(_) => {}
    }
    let mpath = dir.join(MANIFEST_FILE);
    if let Ok(text) = fs::read_to_string(&mpath) {
        return Ok(Manifest::parse(&mpath, &text)?.config.to_string());
    }
    Err(StoreError::MissingConfig(dir.to_path_buf()))
}

/// Small files of the source directory the engine may want (config, tokenizer, chat template,
/// generation config), with their sizes.
fn extra_files(dir: &Path) -> Result<Vec<ExtraFile>, StoreError> {
    const EXTENSIONS: [&str; 6] = ["json", "jinja", "txt", "model", "tiktoken", "md"];
    const MAX: u64 = 256 << 20;
    let io = |source| StoreError::Io { path: dir.to_path_buf(), source };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(meta) = fs::metadata(&path) else { continue };
        let wanted = EXTENSIONS.iter().any(|e| name.ends_with(&format!(".{e}")))
            && !name.ends_with(".index.json")
            && name != MANIFEST_FILE
            && !name.starts_with('.');
        if meta.is_file() && wanted && meta.len() <= MAX {
            out.push(ExtraFile { name, len: meta.len(), data: ExtraData::Copy(path) });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

impl Writer<'_> {
    fn plan_dense(&self) -> Result<Vec<DensePlan>, StoreError> {
        let names = self.src.tensors.names();
        let mut plans = Vec::with_capacity(names.len());
        for name in names {
            if name.ends_with(".scales") || name.ends_with(".biases") {
                return Err(StoreError::Corrupt {
                    file: self.src.dir.clone(),
                    why: format!("tensor {name:?} collides with the names packed quantised tensors use"),
                });
            }
            // A quantised source tensor has no float `Tensor`: its data comes through
            // `TensorSource::matrix`.
            let (shape, source) = self.src.tensors.stored_format(&name)?;
            let target = if keeps_float(&name, &shape) {
                source
            } else {
                match self.dense {
                    DenseFormat::Bf16 => WeightFormat::Float(DType::BF16),
                    // A source quantised to at most 8 bits (MLX 4-bit, a packed q8) is copied as
                    // it is, with its own group: requantising could only lose.
                    DenseFormat::Q8 => match (source, affine_group(shape[1], 8)) {
                        (WeightFormat::Affine { bits, group }, _) if bits <= 8 => WeightFormat::Affine { bits, group },
                        (_, Some(group)) => WeightFormat::Affine { bits: 8, group },
                        (_, None) => WeightFormat::Float(DType::BF16),
                    },
                }
            };
            if let WeightFormat::Float(d) = target
                && source != target
                && d != DType::BF16
            {
                return Err(StoreError::Corrupt {
                    file: self.src.dir.clone(),
                    why: format!("tensor {name:?} is {} and can't be stored as {}", source.name(), target.name()),
                });
            }
            plans.push(DensePlan { name, shape, source, target });
        }
        Ok(plans)
    }

    fn write_dense(&mut self, plans: &[DensePlan]) -> Result<FileEntry, StoreError> {
        let mut order: Vec<&DensePlan> = plans.iter().collect();
        order.sort_by_key(|p| p.class());
        let mut header = Map::new();
        header.insert("__metadata__".into(), json!({ "format": FORMAT_NAME, "version": FORMAT_VERSION.to_string() }));
        let mut offset = 0usize;
        for p in &order {
            for (name, dtype, shape, bytes) in p.entries() {
                header
                    .insert(name, json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes] }));
                offset += bytes;
            }
        }
        let mut header = serde_json::to_string(&Value::Object(header)).expect("the header serialises");
        while !header.len().is_multiple_of(8) {
            header.push(' ');
        }
        let mut f = HashedFile::create(self.dir.join(DENSE_FILE))?;
        f.write(&(header.len() as u64).to_le_bytes())?;
        f.write(header.as_bytes())?;
        for p in order {
            let before = f.bytes;
            match p.target {
                WeightFormat::Float(d) => self.write_float(p, d, &mut f)?,
                WeightFormat::Affine { bits, group } => self.write_affine(p, bits, group, &mut f)?,
            }
            debug_assert_eq!((f.bytes - before) as usize, p.bytes(), "{}", p.name);
            self.tick(f.bytes - before);
        }
        f.finish(self.dir)
    }

    fn write_float(&self, p: &DensePlan, dtype: DType, f: &mut HashedFile) -> Result<(), StoreError> {
        if let WeightFormat::Float(sd) = p.source {
            let t = self.src.tensors.tensor(&p.name)?;
            if sd == dtype {
                return f.write(&t.data);
            }
            let mut vals = vec![0f32; BLOCK_ELEMS];
            for chunk in t.data.chunks(BLOCK_ELEMS * sd.size()) {
                let vals = &mut vals[..chunk.len() / sd.size()];
                sd.decode_into(chunk, vals);
                f.write(&bf16_bytes(vals))?;
            }
            return Ok(());
        }
        // A quantised source matrix, dequantised to bf16 block by block.
        let (rows, cols) = p.rows_cols();
        let m = self.src.tensors.matrix(&p.name, rows, cols)?;
        for r0 in (0..rows).step_by((BLOCK_ELEMS / cols).max(1)) {
            let part = m.rows(r0..(r0 + (BLOCK_ELEMS / cols).max(1)).min(rows));
            f.write(&convert(&part, WeightFormat::Float(dtype), || p.name.clone(), &self.src.dir)?.data)?;
        }
        Ok(())
    }

    fn write_affine(&self, p: &DensePlan, bits: u32, group: usize, f: &mut HashedFile) -> Result<(), StoreError> {
        let (rows, cols) = p.rows_cols();
        let m = self.src.tensors.matrix(&p.name, rows, cols)?;
        let target = WeightFormat::Affine { bits, group };
        if m.format == target {
            f.write(&m.data)?;
            f.write(&m.scales)?;
            return f.write(&m.biases);
        }
        let block = (BLOCK_ELEMS / cols).max(1);
        let (mut scales, mut biases) = (Vec::new(), Vec::new());
        for r0 in (0..rows).step_by(block) {
            let part = m.rows(r0..(r0 + block).min(rows));
            let q = convert(&part, target, || format!("tensor {:?}", p.name), &self.src.dir)?;
            f.write(&q.data)?;
            scales.extend_from_slice(&q.scales);
            biases.extend_from_slice(&q.biases);
        }
        f.write(&scales)?;
        f.write(&biases)
    }

    /// The component formats and byte layout of one expert record, from the first expert's
    /// source format and the requested one.
    /// The component formats of one expert record, from the first expert's source formats and
    /// the requested format.
    fn expert_layout(&self, first: &Expert) -> ([Component; 3], u64) {
        let (h, i) = (self.src.config.hidden, self.src.config.expert_inter);
        let target = |m: &Matrix, cols| expert_target(m.format, cols, self.experts);
        record_layout([(target(&first.gate, h), i, h), (target(&first.up, h), i, h), (target(&first.down, i), h, i)])
    }

    fn write_layer(
        &mut self,
        layer: usize,
        comps: &[Component; 3],
        record_bytes: u64,
        stride: u64,
    ) -> Result<ExpertFile, StoreError> {
        let n = self.src.config.experts;
        let mut f = HashedFile::create(self.dir.join(expert_file_name(layer)))?;
        let mut record = vec![0u8; stride as usize];
        let mut hashes = Vec::with_capacity(n);
        for e in 0..n {
            let ex = self.src.experts.expert(layer, e)?;
            record[..record_bytes as usize].fill(0);
            for (comp, m, proj) in
                [(&comps[0], &ex.gate, "gate"), (&comps[1], &ex.up, "up"), (&comps[2], &ex.down, "down")]
            {
                let what = || format!("layer {layer} expert {e} {proj}_proj");
                if (m.rows, m.cols) != (comp.rows, comp.cols) {
                    return Err(StoreError::Corrupt {
                        file: self.src.dir.clone(),
                        why: format!("{} is [{}, {}], expected [{}, {}]", what(), m.rows, m.cols, comp.rows, comp.cols),
                    });
                }
                let c = convert(m, comp.format.weight_format(), what, &self.src.dir)?;
                record[comp.data.range()].copy_from_slice(&c.data);
                if let (Some(s), Some(b)) = (comp.scales, comp.biases) {
                    record[s.range()].copy_from_slice(&c.scales);
                    record[b.range()].copy_from_slice(&c.biases);
                }
            }
            hashes.push(hex64(Xxh64::hash(&record)));
            f.write(&record)?;
            self.tick(stride);
        }
        Ok(ExpertFile { layer, file: f.finish(self.dir)?, expert_xxh64: hashes })
    }

    fn copy_file(&mut self, extra: &ExtraFile) -> Result<FileEntry, StoreError> {
        let read;
        let data = match &extra.data {
            ExtraData::Copy(path) => {
                read = fs::read(path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
                &read
            }
            ExtraData::Bytes(bytes) => bytes,
        };
        let mut f = HashedFile::create(self.dir.join(&extra.name))?;
        f.write(data)?;
        self.tick(data.len() as u64);
        f.finish(self.dir)
    }
}

/// The stored format of an expert component whose source is `src` with rows of `cols`.
fn expert_target(src: WeightFormat, cols: usize, want: ExpertFormat) -> WeightFormat {
    let Some(bits) = want.bits() else { return WeightFormat::Float(DType::BF16) };
    match src {
        // Keep the source's group where its codes carry over (copy, or flash-moe's q4 -> q2).
        WeightFormat::Affine { bits: sb, group } if sb == bits || (sb == 4 && bits == 2) => {
            WeightFormat::Affine { bits, group }
        }
        _ => match affine_group(cols, bits) {
            Some(group) => WeightFormat::Affine { bits, group },
            None => WeightFormat::Float(DType::BF16),
        },
    }
}

/// The byte layout of an expert record holding gate, up and down (`(format, rows, cols)` each):
/// codes (or elements), scales, biases of each in turn, every part starting at a multiple of
/// [`PART_ALIGN`]. Returns the components and the bytes the record uses.
fn record_layout(parts: [(WeightFormat, usize, usize); 3]) -> ([Component; 3], u64) {
    let mut cursor = 0u64;
    let mut span = |bytes: usize| {
        let s = Span { offset: cursor, bytes: bytes as u64 };
        cursor = (cursor + bytes as u64).div_ceil(PART_ALIGN) * PART_ALIGN;
        s
    };
    let comps = parts.map(|(format, rows, cols)| match format {
        WeightFormat::Float(d) => Component {
            rows,
            cols,
            format: TensorFormat::from_weight_format(format),
            data: span(rows * cols * d.size()),
            scales: None,
            biases: None,
        },
        WeightFormat::Affine { bits, group } => Component {
            rows,
            cols,
            format: TensorFormat::from_weight_format(format),
            data: span(code_bytes(rows, cols, bits)),
            scales: Some(span(scale_bytes(rows, cols, group))),
            biases: Some(span(scale_bytes(rows, cols, group))),
        },
    });
    let record = comps.iter().flat_map(|c| [Some(c.data), c.scales, c.biases]).flatten().map(Span::end).max();
    (comps, record.unwrap_or(0))
}

/// `m` in `target` format: copied when it already is, requantised with flash-moe's rule from 4 to
/// 2 bits at the same group, else (de)quantised through f32. Only bf16 is a float target.
fn convert(m: &Matrix, target: WeightFormat, what: impl Fn() -> String, dir: &Path) -> Result<Matrix, StoreError> {
    if m.format == target {
        return Ok(m.clone());
    }
    match (m.format, target) {
        (WeightFormat::Affine { bits: 4, group: g4 }, WeightFormat::Affine { bits: 2, group }) if g4 == group => {
            Ok(requantize_q2_from_q4(m))
        }
        (_, WeightFormat::Float(d)) => {
            assert_eq!(d, DType::BF16, "conversions only ever go to bf16");
            Ok(Matrix::float(DType::BF16, m.rows, m.cols, Bytes::from_vec(bf16_bytes(&m.to_f32()))))
        }
        (_, WeightFormat::Affine { bits, group }) => {
            let vals = m.to_f32();
            if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                return Err(StoreError::Corrupt {
                    file: dir.to_path_buf(),
                    why: format!("{} holds {} at element {i}; refusing to quantise it", what(), vals[i]),
                });
            }
            Ok(quantize(&vals, m.rows, m.cols, bits, group))
        }
    }
}

fn bf16_bytes(vals: &[f32]) -> Vec<u8> {
    vals.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()).collect()
}

// ------------------------------------------------------------------------------------------------
// Reading

fn read_manifest(dir: &Path) -> Result<Manifest, StoreError> {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
    Manifest::parse(&path, &text)
}

/// The config the manifest carries, checked against the layout it describes.
fn manifest_config(dir: &Path, m: &Manifest) -> Result<ModelConfig, StoreError> {
    let path = dir.join(MANIFEST_FILE);
    let config = ModelConfig::from_json(&m.config.to_string())
        .map_err(|source| StoreError::Config { path: path.clone(), source })?;
    let corrupt = |why: String| StoreError::Corrupt { file: path.clone(), why };
    if m.family != config.family.name() {
        return Err(corrupt(format!("family {:?} but the config is {}", m.family, config.family.name())));
    }
    let e = &m.experts;
    if e.layers != config.layers.len() || e.experts != config.experts {
        return Err(corrupt(format!(
            "experts for {} layers x {}, the config has {} x {}",
            e.layers,
            e.experts,
            config.layers.len(),
            config.experts
        )));
    }
    let (h, i) = (config.hidden, config.expert_inter);
    for (name, c, want) in [("gate", &e.gate, (i, h)), ("up", &e.up, (i, h)), ("down", &e.down, (h, i))] {
        if (c.rows, c.cols) != want {
            return Err(corrupt(format!("expert {name} is [{}, {}], the config needs {want:?}", c.rows, c.cols)));
        }
    }
    Ok(config)
}

/// Opens a packed model directory. Checks the manifest, the dense file's header against it and
/// every expert file's size; does not hash (see [`verify_packed`]). Experts are read through an
/// [`ExpertStore`] with the default [`StoreOptions`].
pub fn open_packed(dir: &Path) -> Result<ModelFiles, StoreError> {
    open_packed_with(dir, &StoreOptions::default())
}

/// [`open_packed`] with the expert store set up by `opts`.
pub fn open_packed_with(dir: &Path, opts: &StoreOptions) -> Result<ModelFiles, StoreError> {
    let m = read_manifest(dir)?;
    let config = manifest_config(dir, &m)?;
    let tensors = PackedTensors::open(dir, &m)?;
    let layout = PackedLayout::new(dir, &m.experts)?;
    let experts = ExpertStore::new(Box::new(layout), opts, tensors.dense_bytes() as u64)?;
    Ok(ModelFiles { dir: dir.to_path_buf(), config, tensors: Arc::new(tensors), experts: Arc::new(experts) })
}

enum DenseEntry {
    Float {
        dtype: DType,
        shape: Vec<usize>,
        range: Range<usize>,
    },
    Affine {
        format: WeightFormat,
        rows: usize,
        cols: usize,
        data: Range<usize>,
        scales: Range<usize>,
        biases: Range<usize>,
    },
}

impl DenseEntry {
    fn byte_len(&self) -> usize {
        match self {
            DenseEntry::Float { range, .. } => range.len(),
            DenseEntry::Affine { data, scales, biases, .. } => data.len() + scales.len() + biases.len(),
        }
    }
}

/// The dense tensors of a packed directory, from the memory-mapped `dense.safetensors`.
struct PackedTensors {
    path: PathBuf,
    map: Arc<Mmap>,
    names: Vec<String>,
    entries: HashMap<String, DenseEntry>,
}

impl PackedTensors {
    fn open(dir: &Path, m: &Manifest) -> Result<Self, StoreError> {
        let path = dir.join(&m.dense.file.path);
        let io = |source| StoreError::Io { path: path.clone(), source };
        let corrupt = |why: String| StoreError::Corrupt { file: path.clone(), why };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len != m.dense.file.bytes {
            return Err(corrupt(format!("{len} bytes, the manifest records {}", m.dense.file.bytes)));
        }
        // SAFETY: read-only map; like every reader of mapped weights we rely on the file not
        // being truncated or rewritten while the model is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let (n, meta) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| corrupt(format!("bad header: {e}")))?;
        let base = 8 + n;
        let lookup = |name: &str, dtype: &str, shape: &[usize]| -> Result<Range<usize>, StoreError> {
            let info =
                meta.info(name).ok_or_else(|| corrupt(format!("no tensor {name:?}, which the manifest lists")))?;
            let found = format!("{:?}", info.dtype);
            if found != dtype || info.shape != shape {
                return Err(corrupt(format!(
                    "tensor {name:?} is {found} {:?}, the manifest implies {dtype} {shape:?}",
                    info.shape
                )));
            }
            Ok(base + info.data_offsets.0..base + info.data_offsets.1)
        };
        let mut entries = HashMap::new();
        let mut names = Vec::new();
        for t in &m.dense.tensors {
            let entry = match t.format {
                TensorFormat::Float { dtype } => {
                    let dtype = dtype.dtype();
                    DenseEntry::Float {
                        dtype,
                        shape: t.shape.clone(),
                        range: lookup(&t.name, st_dtype(dtype), &t.shape)?,
                    }
                }
                TensorFormat::Affine { bits, group } => {
                    let &[rows, cols] = t.shape.as_slice() else {
                        return Err(corrupt(format!("affine tensor {:?} has shape {:?}", t.name, t.shape)));
                    };
                    if !matches!(bits, 2 | 4 | 8)
                        || group == 0
                        || !cols.is_multiple_of(group)
                        || !(group * bits as usize).is_multiple_of(32)
                    {
                        return Err(corrupt(format!("tensor {:?}: unsupported q{bits} group {group}", t.name)));
                    }
                    let gs = [rows, cols / group];
                    DenseEntry::Affine {
                        format: WeightFormat::Affine { bits, group },
                        rows,
                        cols,
                        data: lookup(&t.name, "U32", &[rows, cols * bits as usize / 32])?,
                        scales: lookup(&format!("{}.scales", t.name), "BF16", &gs)?,
                        biases: lookup(&format!("{}.biases", t.name), "BF16", &gs)?,
                    }
                }
            };
            if entries.insert(t.name.clone(), entry).is_some() {
                return Err(corrupt(format!("the manifest lists tensor {:?} twice", t.name)));
            }
            names.push(t.name.clone());
        }
        Ok(PackedTensors { path, map: Arc::new(map), names, entries })
    }

    fn bytes(&self, range: &Range<usize>) -> Bytes {
        Bytes::new(self.map.clone(), range.clone())
    }

    fn missing(&self, name: &str) -> StoreError {
        StoreError::MissingTensor {
            tensor: name.to_string(),
            dir: self.path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        }
    }
}

impl TensorSource for PackedTensors {
    fn tensor(&self, name: &str) -> Result<Tensor, StoreError> {
        match self.entries.get(name).ok_or_else(|| self.missing(name))? {
            DenseEntry::Float { dtype, shape, range } => Ok(Tensor {
                name: name.to_string(),
                file: self.path.clone(),
                dtype: *dtype,
                shape: shape.clone(),
                data: self.bytes(range),
            }),
            DenseEntry::Affine { format, .. } => Err(StoreError::DType {
                tensor: name.to_string(),
                file: self.path.clone(),
                dtype: format!("{} (a quantised matrix: read it with TensorSource::matrix)", format.name()),
            }),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn dense_bytes(&self) -> usize {
        self.entries.values().map(DenseEntry::byte_len).sum()
    }

    fn stored_format(&self, name: &str) -> Result<(Vec<usize>, WeightFormat), StoreError> {
        match self.entries.get(name).ok_or_else(|| self.missing(name))? {
            DenseEntry::Float { dtype, shape, .. } => Ok((shape.clone(), WeightFormat::Float(*dtype))),
            DenseEntry::Affine { format, rows, cols, .. } => Ok((vec![*rows, *cols], *format)),
        }
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, StoreError> {
        match self.entries.get(name).ok_or_else(|| self.missing(name))? {
            DenseEntry::Float { .. } => self.tensor(name)?.matrix(rows, cols),
            DenseEntry::Affine { format, rows: r, cols: c, data, scales, biases } => {
                if (*r, *c) != (rows, cols) {
                    return Err(StoreError::Shape {
                        tensor: name.to_string(),
                        file: self.path.clone(),
                        expected: vec![rows, cols],
                        found: vec![*r, *c],
                    });
                }
                Ok(Matrix {
                    format: *format,
                    rows,
                    cols,
                    data: self.bytes(data),
                    scales: self.bytes(scales),
                    biases: self.bytes(biases),
                })
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Verifying

/// Re-hashes every file the manifest lists and compares sizes and XXH64 checksums. The error
/// names the first file that differs and, for an expert file, the first expert whose record
/// differs.
pub fn verify_packed(dir: &Path) -> Result<(), StoreError> {
    let m = read_manifest(dir)?;
    manifest_config(dir, &m)?;
    for f in std::iter::once(&m.dense.file).chain(&m.files) {
        let path = dir.join(&f.path);
        let (len, hash) = hash_file(&path, 8 << 20, |_, _| {})?;
        check_file(&path, f, len, hash, String::new())?;
    }
    let stride = m.experts.stride as usize;
    for f in &m.experts.files {
        let path = dir.join(&f.file.path);
        let mut first_bad = None;
        let records_per_read = ((8 << 20) / stride).max(1);
        let (len, hash) = hash_file(&path, stride * records_per_read, |offset, chunk| {
            for (k, record) in chunk.chunks(stride).enumerate() {
                let e = offset as usize / stride + k;
                let want = f.expert_xxh64.get(e).map(String::as_str);
                if first_bad.is_none() && (record.len() != stride || want != Some(&hex64(Xxh64::hash(record)))) {
                    first_bad = Some(e);
                }
            }
        })?;
        let detail = match first_bad {
            Some(e) => format!("; first damaged expert: {e} (bytes {}..{})", e * stride, (e + 1) * stride),
            None => String::new(),
        };
        check_file(&path, &f.file, len, hash, detail)?;
        if let Some(e) = first_bad {
            return Err(StoreError::Corrupt {
                file: path,
                why: format!("expert {e} does not match its checksum (bytes {}..{})", e * stride, (e + 1) * stride),
            });
        }
    }
    Ok(())
}

fn check_file(path: &Path, f: &FileEntry, len: u64, hash: u64, detail: String) -> Result<(), StoreError> {
    if len != f.bytes {
        let what = if len < f.bytes { "truncated" } else { "longer than recorded" };
        return Err(StoreError::Corrupt {
            file: path.to_path_buf(),
            why: format!("{what}: {len} bytes, the manifest records {}{detail}", f.bytes),
        });
    }
    if hex64(hash) != f.xxh64 {
        return Err(StoreError::Corrupt {
            file: path.to_path_buf(),
            why: format!("checksum mismatch: xxh64 {}, the manifest records {}{detail}", hex64(hash), f.xxh64),
        });
    }
    Ok(())
}

/// Reads `path` in chunks of `chunk` bytes (the last may be short), hashing it whole and passing
/// each chunk with its offset to `each`.
fn hash_file(path: &Path, chunk: usize, mut each: impl FnMut(u64, &[u8])) -> Result<(u64, u64), StoreError> {
    let io = |source| StoreError::Io { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(io)?;
    let mut buf = vec![0u8; chunk];
    let mut hash = Xxh64::new(0);
    let mut offset = 0u64;
    loop {
        let mut filled = 0;
        while filled < chunk {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        if filled == 0 {
            break;
        }
        hash.update(&buf[..filled]);
        each(offset, &buf[..filled]);
        offset += filled as u64;
        if filled < chunk {
            break;
        }
    }
    Ok((offset, hash.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_fall_back_to_32_then_to_bf16() {
        assert_eq!(affine_group(4096, 8), Some(64));
        assert_eq!(affine_group(96, 8), Some(32));
        assert_eq!(affine_group(48, 4), None);
        assert_eq!(
            expert_target(WeightFormat::Float(DType::BF16), 48, ExpertFormat::Q4),
            WeightFormat::Float(DType::BF16)
        );
        assert_eq!(
            expert_target(WeightFormat::Affine { bits: 4, group: 128 }, 4096, ExpertFormat::Q2),
            WeightFormat::Affine { bits: 2, group: 128 }
        );
        assert_eq!(
            expert_target(WeightFormat::Affine { bits: 4, group: 128 }, 4096, ExpertFormat::Q8),
            WeightFormat::Affine { bits: 8, group: 64 }
        );
    }

    #[test]
    fn qwen35_397b_records_match_flash_moe_byte_for_byte() {
        // model-spec.md section 4.3: the 4-bit and 2-bit expert layouts of flash-moe.
        let (h, i) = (4096, 1024);
        let offsets = |bits| {
            let f = WeightFormat::Affine { bits, group: 64 };
            let (c, record) = record_layout([(f, i, h), (f, i, h), (f, h, i)]);
            let o: Vec<u64> =
                c.iter().flat_map(|c| [c.data.offset, c.scales.unwrap().offset, c.biases.unwrap().offset]).collect();
            (o, record)
        };
        let (q4, r4) = offsets(4);
        assert_eq!(q4, [0, 2_097_152, 2_228_224, 2_359_296, 4_456_448, 4_587_520, 4_718_592, 6_815_744, 6_946_816]);
        assert_eq!(r4, 7_077_888);
        let (q2, r2) = offsets(2);
        assert_eq!(q2, [0, 1_048_576, 1_179_648, 1_310_720, 2_359_296, 2_490_368, 2_621_440, 3_670_016, 3_801_088]);
        assert_eq!(r2, 3_932_160);
        // Both are whole multiples of 4 KiB already: the stride adds no padding.
        assert!(r4.is_multiple_of(RECORD_ALIGN) && r2.is_multiple_of(RECORD_ALIGN));
    }

    #[test]
    fn which_dense_tensors_stay_float() {
        assert!(keeps_float("layers.0.input_layernorm.weight", &[64]));
        assert!(keeps_float("layers.0.linear_attn.A_log", &[8]));
        assert!(keeps_float("layers.0.linear_attn.conv1d.weight", &[128, 1, 4]));
        assert!(keeps_float("layers.0.linear_attn.norm.weight", &[16]));
        assert!(!keeps_float("layers.0.mlp.gate.weight", &[8, 64]));
        assert!(!keeps_float("embed_tokens.weight", &[512, 64]));
        assert!(!keeps_float("layers.0.mlp.shared_expert_gate.weight", &[1, 64]));
    }

    #[test]
    fn formats_parse_from_their_names() {
        for f in [ExpertFormat::Bf16, ExpertFormat::Q8, ExpertFormat::Q4, ExpertFormat::Q2] {
            assert_eq!(f.name().parse::<ExpertFormat>(), Ok(f));
        }
        for f in [DenseFormat::Bf16, DenseFormat::Q8] {
            assert_eq!(f.name().parse::<DenseFormat>(), Ok(f));
        }
        assert!("q3".parse::<ExpertFormat>().is_err());
    }
}
