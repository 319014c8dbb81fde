//! One memory-mapped safetensors file with a validated header.
//!
//! The header is parsed here rather than with `safetensors::SafeTensors::read_metadata` so that
//! every error names the tensor at fault, and so that a dtype we can't compute with (or one the
//! `safetensors` crate doesn't know) only becomes an error when that tensor is asked for.
//!
//! After [`SafetensorsFile::open`] succeeds, every entry's byte range lies inside the map and, for
//! every dtype of known width, has exactly `elements * width` bytes, so slicing never panics.

use crate::{StoreError, Tensor};
use memmap2::Mmap;
use moe_core::{Bytes, DType};
use serde::Deserialize;
use serde_json::Value;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One tensor of the header.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The name as written in the file.
    pub name: String,
    /// The dtype as written in the file (`"BF16"`, `"F8_E4M3"`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

impl Entry {
    pub fn byte_len(&self) -> usize {
        self.range.end - self.range.start
    }
}

pub(crate) struct SafetensorsFile {
    pub path: PathBuf,
    pub map: Arc<Mmap>,
    /// In header order.
    pub entries: Vec<Entry>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(corrupt(path, format!("the file is {len} bytes, too short for a safetensors header")));
        }
        // SAFETY: the map is read-only. Like every reader of memory-mapped weights we rely on the
        // file not being truncated or rewritten while it is open.
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let entries = parse_header(path, &map)?;
        Ok(SafetensorsFile { path: path.to_path_buf(), map: Arc::new(map), entries })
    }

    /// The bytes of `entry`, zero copy. `entry` must be one of this file's entries.
    pub fn bytes(&self, entry: &Entry) -> Bytes {
        Bytes::new(self.map.clone(), entry.range.clone())
    }

    /// `entry` as a [`Tensor`]; an error naming file and tensor if its dtype is not supported.
    pub fn tensor(&self, entry: &Entry) -> Result<Tensor, StoreError> {
        let dtype = dtype_of(&entry.dtype).ok_or_else(|| StoreError::DType {
            tensor: entry.name.clone(),
            file: self.path.clone(),
            dtype: entry.dtype.clone(),
        })?;
        Ok(Tensor {
            name: entry.name.clone(),
            file: self.path.clone(),
            dtype,
            shape: entry.shape.clone(),
            data: self.bytes(entry),
        })
    }
}

/// The dtypes we compute with.
pub(crate) fn dtype_of(name: &str) -> Option<DType> {
    match name {
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        "F32" => Some(DType::F32),
        _ => None,
    }
}

/// Width in bits of every dtype of the safetensors format, to check the header's offsets.
fn dtype_bits(name: &str) -> Option<usize> {
    Some(match name {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ" | "F8_E5M2FNUZ" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

fn corrupt(path: &Path, why: String) -> StoreError {
    StoreError::Corrupt { file: path.to_path_buf(), why }
}

#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

/// Parses and validates the header of the safetensors file `bytes` (the whole file).
pub(crate) fn parse_header(path: &Path, bytes: &[u8]) -> Result<Vec<Entry>, StoreError> {
    let file_len = bytes.len();
    let Some(len_bytes) = bytes.get(..8) else {
        return Err(corrupt(path, format!("the file is {file_len} bytes, too short for a safetensors header")));
    };
    let header_len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
    let data_start =
        usize::try_from(header_len).ok().and_then(|n| n.checked_add(8)).filter(|&end| end <= file_len).ok_or_else(
            || corrupt(path, format!("header of {header_len} bytes runs past the end of the {file_len}-byte file")),
        )?;
    let header =
        std::str::from_utf8(&bytes[8..data_start]).map_err(|e| corrupt(path, format!("header is not UTF-8: {e}")))?;
    let root: serde_json::Map<String, Value> =
        serde_json::from_str(header).map_err(|e| corrupt(path, format!("header is not a JSON object: {e}")))?;

    let data_len = file_len - data_start;
    let mut entries = Vec::with_capacity(root.len());
    for (name, value) in root {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| corrupt(path, format!("header entry of tensor {name:?} is malformed: {e}")))?;
        let (start, end) = raw.data_offsets;
        if start > end || end > data_len {
            return Err(corrupt(
                path,
                format!(
                    "tensor {name:?} has data offsets [{start}, {end}] outside the {data_len} bytes of data \
                     (the file is truncated or the header is corrupt)"
                ),
            ));
        }
        if let Some(bits) = dtype_bits(&raw.dtype) {
            let expected =
                raw.shape.iter().try_fold(bits, |acc, &d| acc.checked_mul(d)).filter(|b| b % 8 == 0).map(|b| b / 8);
            if expected != Some(end - start) {
                return Err(corrupt(
                    path,
                    format!(
                        "tensor {name:?} of dtype {} and shape {:?} has {} bytes of data, expected {}",
                        raw.dtype,
                        raw.shape,
                        end - start,
                        expected.map_or("a whole number".to_string(), |n| n.to_string())
                    ),
                ));
            }
        }
        entries.push(Entry { name, dtype: raw.dtype, shape: raw.shape, range: data_start + start..data_start + end });
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.resize(v.len() + data_len, 0);
        v
    }

    fn err(bytes: &[u8]) -> String {
        parse_header(Path::new("x.safetensors"), bytes).unwrap_err().to_string()
    }

    #[test]
    fn valid_header_gives_absolute_ranges() {
        let h = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[3],"data_offsets":[8,11]}}"#;
        let entries = parse_header(Path::new("x"), &file(h, 11)).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].range, 8 + h.len()..8 + h.len() + 8);
        assert_eq!((entries[1].dtype.as_str(), entries[1].byte_len()), ("I8", 3));
    }

    #[test]
    fn size_mismatch_is_corrupt() {
        let h = r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#;
        let e = err(&file(h, 8));
        assert!(e.contains("\"a\"") && e.contains("expected 12"), "{e}");
    }

    #[test]
    fn offsets_past_the_end_are_corrupt() {
        let h = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
        let e = err(&file(h, 15));
        assert!(e.contains("x.safetensors") && e.contains("\"a\"") && e.contains("truncated"), "{e}");
        let h = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}}"#;
        assert!(err(&file(h, 16)).contains("outside"));
    }

    #[test]
    fn overflowing_shape_is_corrupt_not_a_panic() {
        let h = r#"{"a":{"dtype":"F32","shape":[18446744073709551615,4],"data_offsets":[0,4]}}"#;
        assert!(err(&file(h, 4)).contains("\"a\""));
    }

    #[test]
    fn bad_headers_are_corrupt() {
        assert!(err(&[1, 2, 3]).contains("too short"));
        assert!(err(&u64::MAX.to_le_bytes()).contains("past the end"));
        assert!(err(&file("{not json", 0)).contains("JSON"));
        assert!(err(&file("[]", 0)).contains("JSON"));
        let e = err(&file(r#"{"a":{"dtype":"F32","shape":"x","data_offsets":[0,4]}}"#, 4));
        assert!(e.contains("\"a\"") && e.contains("malformed"), "{e}");
    }

    #[test]
    fn unknown_dtype_is_bounds_checked_only() {
        let h = r#"{"a":{"dtype":"F3_NEW","shape":[5],"data_offsets":[0,2]}}"#;
        assert_eq!(parse_header(Path::new("x"), &file(h, 2)).unwrap()[0].dtype, "F3_NEW");
    }
}
