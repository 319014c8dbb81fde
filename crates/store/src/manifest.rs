//! `manifest.json` of a packed model directory (schema documented in `docs/format.md`) and the
//! checksum it records (XXH64, seed 0).

use crate::StoreError;
use moe_core::{DType, WeightFormat};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{self, Path};

/// The `format` field of every packed manifest.
pub const FORMAT_NAME: &str = "flash-moe-packed";
/// The manifest version this build writes and reads.
pub const FORMAT_VERSION: u64 = 1;
/// The checksum algorithm named in the manifest.
pub const CHECKSUM: &str = "xxh64";
/// Expert records start at multiples of this (so that one expert is one aligned `O_DIRECT` read).
pub const RECORD_ALIGN: u64 = 4096;
/// Components inside an expert record start at multiples of this.
pub const PART_ALIGN: u64 = 64;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u64,
    /// The directory the model was converted from, as an absolute path (informational).
    pub source: String,
    /// `qwen3_5_moe`, `qwen3_next` or `qwen3_moe`.
    pub family: String,
    /// The source `config.json`, as a JSON object (`ModelConfig::from_json` reads it).
    pub config: Value,
    /// Always [`CHECKSUM`].
    pub checksum: String,
    pub dense: DenseSection,
    pub experts: ExpertSection,
    /// Small files copied verbatim from the source directory (config, tokenizer, chat template).
    pub files: Vec<FileEntry>,
}

/// One file of the directory with its size and checksum.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// Relative to the packed directory, `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// XXH64 (seed 0) of the whole file, 16 lowercase hex digits.
    pub xxh64: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DenseSection {
    /// `dense.safetensors`.
    #[serde(flatten)]
    pub file: FileEntry,
    /// The format asked for: `bf16` or `q8`. Each tensor records what it got.
    pub format: String,
    /// Every dense tensor, in file order.
    pub tensors: Vec<DenseTensor>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DenseTensor {
    /// Canonical name (`layers.0.self_attn.q_proj.weight`). An affine tensor is stored as three
    /// safetensors entries: `NAME` (u32 codes), `NAME.scales` and `NAME.biases` (bf16).
    pub name: String,
    /// The logical shape (for an affine tensor `[rows, cols]` of the dequantised matrix).
    pub shape: Vec<usize>,
    pub format: TensorFormat,
}

/// How one tensor or expert component is stored.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TensorFormat {
    /// Plain elements: `dtype` is `bf16`, `f16` or `f32`.
    Float { dtype: FloatDType },
    /// MLX affine: u32 codes, bf16 scales and biases per `group` elements of a row.
    Affine { bits: u32, group: usize },
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FloatDType {
    Bf16,
    F16,
    F32,
}

impl TensorFormat {
    pub fn weight_format(self) -> WeightFormat {
        match self {
            TensorFormat::Float { dtype } => WeightFormat::Float(dtype.dtype()),
            TensorFormat::Affine { bits, group } => WeightFormat::Affine { bits, group },
        }
    }

    pub fn from_weight_format(f: WeightFormat) -> Self {
        match f {
            WeightFormat::Float(d) => TensorFormat::Float { dtype: FloatDType::from_dtype(d) },
            WeightFormat::Affine { bits, group } => TensorFormat::Affine { bits, group },
        }
    }
}

impl FloatDType {
    pub fn dtype(self) -> DType {
        match self {
            FloatDType::Bf16 => DType::BF16,
            FloatDType::F16 => DType::F16,
            FloatDType::F32 => DType::F32,
        }
    }

    pub fn from_dtype(d: DType) -> Self {
        match d {
            DType::BF16 => FloatDType::Bf16,
            DType::F16 => FloatDType::F16,
            DType::F32 => FloatDType::F32,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExpertSection {
    /// The format asked for: `bf16`, `q8`, `q4` or `q2`. Each component records what it got.
    pub format: String,
    pub layers: usize,
    /// Routed experts per layer.
    pub experts: usize,
    /// Bytes from one expert record to the next; a multiple of [`RECORD_ALIGN`].
    pub stride: u64,
    /// Bytes of a record that hold data (the rest of the stride is zero padding).
    pub record_bytes: u64,
    /// `[expert_inter, hidden]`.
    pub gate: Component,
    /// `[expert_inter, hidden]`.
    pub up: Component,
    /// `[hidden, expert_inter]`.
    pub down: Component,
    /// One file per layer, in layer order.
    pub files: Vec<ExpertFile>,
}

/// Where one projection of an expert lies inside its record.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Component {
    pub rows: usize,
    pub cols: usize,
    pub format: TensorFormat,
    /// Codes (affine) or elements (float).
    pub data: Span,
    /// Affine only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scales: Option<Span>,
    /// Affine only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub biases: Option<Span>,
}

/// A byte range relative to the start of an expert record.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub bytes: u64,
}

impl Span {
    pub fn range(self) -> std::ops::Range<usize> {
        self.offset as usize..(self.offset + self.bytes) as usize
    }
    pub fn end(self) -> u64 {
        self.offset + self.bytes
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExpertFile {
    pub layer: usize,
    /// `experts/layer_NNN.bin`, `bytes` = `experts * stride`.
    #[serde(flatten)]
    pub file: FileEntry,
    /// XXH64 of each expert's whole record (`stride` bytes, padding included), by expert index.
    pub expert_xxh64: Vec<String>,
}

impl Component {
    /// Checks the spans against the format and shape; `what` names the component in errors.
    pub fn check(&self, what: &str, record_bytes: u64) -> Result<(), String> {
        let (r, c) = (self.rows as u64, self.cols as u64);
        let mut spans = vec![("data", self.data)];
        match self.format {
            TensorFormat::Float { dtype } => {
                let want = r * c * dtype.dtype().size() as u64;
                if self.data.bytes != want {
                    return Err(format!(
                        "{what}: data is {} bytes, [{r}, {c}] {dtype:?} needs {want}",
                        self.data.bytes
                    ));
                }
                if self.scales.is_some() || self.biases.is_some() {
                    return Err(format!("{what}: a float component has scales or biases"));
                }
            }
            TensorFormat::Affine { bits, group } => {
                if !matches!(bits, 2 | 4 | 8)
                    || group == 0
                    || !c.is_multiple_of(group as u64)
                    || !(group as u64 * bits as u64).is_multiple_of(32)
                {
                    return Err(format!("{what}: unsupported affine format q{bits} group {group} for {c} columns"));
                }
                let codes = r * c * bits as u64 / 8;
                let sb = r * (c / group as u64) * 2;
                let (Some(s), Some(b)) = (self.scales, self.biases) else {
                    return Err(format!("{what}: an affine component without scales or biases"));
                };
                if self.data.bytes != codes || s.bytes != sb || b.bytes != sb {
                    return Err(format!(
                        "{what}: spans of {}/{}/{} bytes, q{bits} group {group} [{r}, {c}] needs {codes}/{sb}/{sb}",
                        self.data.bytes, s.bytes, b.bytes
                    ));
                }
                spans.push(("scales", s));
                spans.push(("biases", b));
            }
        }
        for (name, s) in spans {
            if s.end() > record_bytes {
                return Err(format!("{what}.{name} ends at byte {} of a {record_bytes}-byte record", s.end()));
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Parses `text`, checking the format name and version before anything else so that a
    /// manifest of another format or version fails with a message saying so.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt { file: path.to_path_buf(), why };
        let root: Value = serde_json::from_str(text).map_err(|e| corrupt(format!("not valid JSON: {e}")))?;
        match root.get("format").and_then(Value::as_str) {
            Some(FORMAT_NAME) => {}
            Some(other) => {
                return Err(corrupt(format!(
                    "not a flash-moe packed model: format is {other:?}, expected {FORMAT_NAME:?}"
                )));
            }
            None => return Err(corrupt(format!("not a flash-moe packed model: no \"format\": {FORMAT_NAME:?} field"))),
        }
        match root.get("version").and_then(Value::as_u64) {
            Some(FORMAT_VERSION) => {}
            Some(v) => {
                return Err(corrupt(format!(
                    "unsupported packed format version {v} (this build reads version {FORMAT_VERSION}); \
                     convert the model again with this build"
                )));
            }
            None => return Err(corrupt("no numeric \"version\" field".into())),
        }
        let m: Manifest = serde_json::from_value(root).map_err(|e| corrupt(format!("invalid manifest: {e}")))?;
        if m.checksum != CHECKSUM {
            return Err(corrupt(format!("unknown checksum algorithm {:?} (expected {CHECKSUM:?})", m.checksum)));
        }
        m.check_structure().map_err(corrupt)?;
        Ok(m)
    }

    /// Checks what can be checked without the files: paths, layout arithmetic.
    fn check_structure(&self) -> Result<(), String> {
        let e = &self.experts;
        let mut paths: Vec<&str> = vec![&self.dense.file.path];
        paths.extend(self.files.iter().map(|f| f.path.as_str()));
        paths.extend(e.files.iter().map(|f| f.file.path.as_str()));
        for p in &paths {
            if !is_plain_relative(p) {
                return Err(format!("file path {p:?} is not a plain relative path inside the directory"));
            }
        }
        for f in self.files.iter().map(|f| &f.xxh64).chain([&self.dense.file.xxh64]) {
            parse_hex64(f).ok_or_else(|| format!("checksum {f:?} is not 16 hex digits"))?;
        }
        if e.stride == 0 || !e.stride.is_multiple_of(RECORD_ALIGN) {
            return Err(format!("expert stride {} is not a positive multiple of {RECORD_ALIGN}", e.stride));
        }
        if e.record_bytes > e.stride {
            return Err(format!("expert records of {} bytes do not fit the stride of {}", e.record_bytes, e.stride));
        }
        e.gate.check("gate", e.record_bytes)?;
        e.up.check("up", e.record_bytes)?;
        e.down.check("down", e.record_bytes)?;
        if e.files.len() != e.layers {
            return Err(format!("{} expert files for {} layers", e.files.len(), e.layers));
        }
        for (l, f) in e.files.iter().enumerate() {
            if f.layer != l {
                return Err(format!("expert file {} is listed for layer {} at position {l}", f.file.path, f.layer));
            }
            let want = e.experts as u64 * e.stride;
            if f.file.bytes != want {
                return Err(format!(
                    "{} is listed as {} bytes, {} experts x {} need {want}",
                    f.file.path, f.file.bytes, e.experts, e.stride
                ));
            }
            if f.expert_xxh64.len() != e.experts {
                return Err(format!(
                    "{} has {} expert checksums for {} experts",
                    f.file.path,
                    f.expert_xxh64.len(),
                    e.experts
                ));
            }
            for h in std::iter::once(&f.file.xxh64).chain(&f.expert_xxh64) {
                parse_hex64(h).ok_or_else(|| format!("checksum {h:?} in {} is not 16 hex digits", f.file.path))?;
            }
        }
        Ok(())
    }
}

fn is_plain_relative(p: &str) -> bool {
    !p.is_empty() && Path::new(p).components().all(|c| matches!(c, path::Component::Normal(_)))
}

pub fn hex64(h: u64) -> String {
    format!("{h:016x}")
}

pub fn parse_hex64(s: &str) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// Streaming XXH64 (Yann Collet's xxHash, 64-bit variant): fast (several GB/s), non-cryptographic,
/// byte-for-byte the reference algorithm, so `xxhsum -H1` checks the same files.
#[derive(Clone, Debug)]
pub struct Xxh64 {
    acc: [u64; 4],
    buf: [u8; 32],
    buf_len: usize,
    total: u64,
    seed: u64,
}

#[inline]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}

#[inline]
fn merge(h: u64, acc: u64) -> u64 {
    (h ^ round(0, acc)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline]
fn read_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

impl Default for Xxh64 {
    fn default() -> Self {
        Xxh64::new(0)
    }
}

impl Xxh64 {
    pub fn new(seed: u64) -> Self {
        Xxh64 {
            acc: [seed.wrapping_add(P1).wrapping_add(P2), seed.wrapping_add(P2), seed, seed.wrapping_sub(P1)],
            buf: [0; 32],
            buf_len: 0,
            total: 0,
            seed,
        }
    }

    /// The hash of `data` in one call.
    pub fn hash(data: &[u8]) -> u64 {
        let mut h = Xxh64::new(0);
        h.update(data);
        h.digest()
    }

    #[inline]
    fn stripe(&mut self, s: &[u8]) {
        self.acc[0] = round(self.acc[0], read_u64(&s[0..]));
        self.acc[1] = round(self.acc[1], read_u64(&s[8..]));
        self.acc[2] = round(self.acc[2], read_u64(&s[16..]));
        self.acc[3] = round(self.acc[3], read_u64(&s[24..]));
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let buf = self.buf;
            self.stripe(&buf);
            self.buf_len = 0;
        }
        let mut stripes = data.chunks_exact(32);
        for s in &mut stripes {
            self.stripe(s);
        }
        let rest = stripes.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    pub fn digest(&self) -> u64 {
        let [a1, a2, a3, a4] = self.acc;
        let mut h = if self.total >= 32 {
            let h = a1
                .rotate_left(1)
                .wrapping_add(a2.rotate_left(7))
                .wrapping_add(a3.rotate_left(12))
                .wrapping_add(a4.rotate_left(18));
            merge(merge(merge(merge(h, a1), a2), a3), a4)
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buf_len];
        while rest.len() >= 8 {
            h ^= round(0, read_u64(rest));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            h ^= (u32::from_le_bytes(rest[..4].try_into().unwrap()) as u64).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h ^= (b as u64).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_seeded(data: &[u8], seed: u64) -> u64 {
        let mut h = Xxh64::new(seed);
        h.update(data);
        h.digest()
    }

    /// The sanity buffer of the reference `xxhsum` (`BMK_sanityCheck`).
    fn sanity_buffer() -> Vec<u8> {
        let mut state: u32 = 2_654_435_761;
        (0..101)
            .map(|_| {
                let b = (state >> 24) as u8;
                state = state.wrapping_mul(state);
                b
            })
            .collect()
    }

    #[test]
    fn xxh64_matches_the_reference_vectors() {
        assert_eq!(Xxh64::hash(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(Xxh64::hash(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(Xxh64::hash(b"abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(Xxh64::hash(b"Nobody inspects the spammish repetition"), 0xFBCE_A83C_8A37_8BF1);
        let prime = 2_654_435_761u64;
        let buf = sanity_buffer();
        assert_eq!(hash_seeded(&[], prime), 0xAC75_FDA2_929B_17EF);
        assert_eq!(hash_seeded(&buf[..1], 0), 0x4FCE_394C_C889_52D8);
        assert_eq!(hash_seeded(&buf[..1], prime), 0x7398_40CB_819F_A723);
        assert_eq!(hash_seeded(&buf[..14], 0), 0xCFFA_8DB8_81BC_3A3D);
        assert_eq!(hash_seeded(&buf[..14], prime), 0x5B96_1158_5EFC_C9CB);
        assert_eq!(hash_seeded(&buf, 0), 0x0EAB_5433_84F8_78AD);
        assert_eq!(hash_seeded(&buf, prime), 0xCAA6_5939_306F_1E21);
    }

    #[test]
    fn xxh64_streaming_equals_one_shot_for_any_split() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let whole = Xxh64::hash(&data);
        for step in [1, 3, 7, 31, 32, 33, 64, 999] {
            let mut h = Xxh64::new(0);
            for chunk in data.chunks(step) {
                h.update(chunk);
            }
            assert_eq!(h.digest(), whole, "chunks of {step}");
        }
    }

    #[test]
    fn plain_relative_paths() {
        assert!(is_plain_relative("experts/layer_000.bin"));
        assert!(!is_plain_relative("../x"));
        assert!(!is_plain_relative("/etc/passwd"));
        assert!(!is_plain_relative(""));
        assert!(!is_plain_relative("./x"));
    }
}
