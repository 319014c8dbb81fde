//! Storage formats of weights and the exact dequantisation that defines them.
//!
//! Quantised matrices use the MLX affine layout: per row, groups of `group` consecutive input
//! elements share a bf16 scale and bias; codes are packed little-endian into u32 words, least
//! significant bits first; `w = scale * code + bias`.

use crate::Bytes;
use half::{bf16, f16};

/// Element type of an unquantised tensor as stored on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Decodes little-endian elements to f32. `bytes.len()` must be a multiple of the size.
    pub fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        let mut out = vec![0.0; bytes.len() / self.size()];
        self.decode_into(bytes, &mut out);
        out
    }

    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
                }
            }
        }
    }
}

#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Round-to-nearest-even f32 -> bf16, as torch does.
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    bf16::from_f32(x).to_bits()
}

/// How the elements of a weight matrix are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    Float(DType),
    /// MLX affine quantisation with `bits` in {2, 4, 8} and bf16 scales and biases.
    Affine {
        bits: u32,
        group: usize,
    },
}

impl WeightFormat {
    pub fn name(self) -> String {
        match self {
            WeightFormat::Float(d) => d.name().to_string(),
            WeightFormat::Affine { bits, group } => format!("q{bits} (group {group})"),
        }
    }

    /// Bytes of one row of `cols` elements, all three parts (codes, scales, biases) together.
    pub fn row_bytes(self, cols: usize) -> usize {
        match self {
            WeightFormat::Float(d) => cols * d.size(),
            WeightFormat::Affine { bits, group } => cols * bits as usize / 8 + 2 * 2 * (cols / group),
        }
    }
}

/// Matrices that cannot be combined as asked.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MatrixError(String);

/// A weight matrix `[rows, cols]`, row-major, used as `y = W x`.
/// For affine formats `data` holds the codes (`rows * cols * bits / 8` bytes), `scales` and
/// `biases` hold `rows * cols / group` bf16 values each; for float formats they are empty.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    pub data: Bytes,
    pub scales: Bytes,
    pub biases: Bytes,
}

impl Matrix {
    pub fn float(dtype: DType, rows: usize, cols: usize, data: Bytes) -> Self {
        debug_assert_eq!(data.len(), rows * cols * dtype.size());
        Matrix { format: WeightFormat::Float(dtype), rows, cols, data, scales: Bytes::empty(), biases: Bytes::empty() }
    }

    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols);
        Matrix::float(DType::F32, rows, cols, Bytes::from_f32(values))
    }

    /// Rows `range` as a matrix of their own, sharing the bytes.
    pub fn rows(&self, range: std::ops::Range<usize>) -> Matrix {
        let parts = self.row_parts().map(|(bytes, rb)| bytes.slice(range.start * rb..range.end * rb));
        self.with_parts(range.end - range.start, parts)
    }

    /// The matrix whose row `i` is row `order[i]` of this one (a copy). Panics if an index is out
    /// of range.
    pub fn select_rows(&self, order: &[u32]) -> Matrix {
        if let Some(&bad) = order.iter().find(|&&r| r as usize >= self.rows) {
            panic!("select_rows: row {bad} of a matrix of {} rows", self.rows);
        }
        let parts = self.row_parts().map(|(bytes, rb)| {
            let rows = order.iter().map(|&r| &bytes[r as usize * rb..(r as usize + 1) * rb]);
            Bytes::from_vec(rows.collect::<Vec<_>>().concat())
        });
        self.with_parts(order.len(), parts)
    }

    /// The rows of `parts`, one after another, as one matrix (a copy): several projections of
    /// the same input then run as one product. The parts must share their columns and format,
    /// except that affine parts of different bits or groups are first widened to the most bits and
    /// the smallest group (exactly: see [`widened`](Self::widened)), as mixed quantisation recipes
    /// make them.
    pub fn concat_rows(parts: &[&Matrix]) -> Result<Matrix, MatrixError> {
        let Some(first) = parts.first() else {
            return Err(MatrixError("no matrices to concatenate".into()));
        };
        let affine = |m: &&Matrix| match m.format {
            WeightFormat::Affine { bits, group } => Some((bits, group)),
            WeightFormat::Float(_) => None,
        };
        if let Some(formats) = parts.iter().map(affine).collect::<Option<Vec<_>>>()
            && formats.windows(2).any(|w| w[0] != w[1])
        {
            let bits = formats.iter().map(|f| f.0).max().expect("parts");
            let group = formats.iter().map(|f| f.1).min().expect("parts");
            if let Some(wide) = parts.iter().map(|p| p.widened(bits, group)).collect::<Option<Vec<_>>>() {
                return Matrix::concat_rows(&wide.iter().collect::<Vec<_>>());
            }
        }
        for (i, p) in parts.iter().enumerate() {
            if p.cols != first.cols || p.format != first.format {
                return Err(MatrixError(format!(
                    "cannot concatenate rows of different matrices: part {i} is {} with {} columns, part 0 {} with {} columns",
                    p.format.name(),
                    p.cols,
                    first.format.name(),
                    first.cols
                )));
            }
        }
        let joined = |part: usize| {
            let bytes: Vec<&[u8]> = parts.iter().map(|p| &p.row_parts()[part].0[..]).collect();
            Bytes::from_vec(bytes.concat())
        };
        Ok(first.with_parts(parts.iter().map(|p| p.rows).sum(), [joined(0), joined(1), joined(2)]))
    }

    /// This affine matrix with `bits`-bit codes in groups of `group` and exactly the same values:
    /// each code widened, each group's scale and bias repeated over the smaller groups it splits
    /// into. `None` where that is not exact or not a format (fewer bits, a group that does not
    /// divide this one's, a float matrix).
    pub fn widened(&self, bits: u32, group: usize) -> Option<Matrix> {
        let WeightFormat::Affine { bits: b0, group: g0 } = self.format else { return None };
        if !matches!(bits, 2 | 4 | 8) || bits < b0 || group == 0 || g0 % group != 0 {
            return None;
        }
        let (per0, per) = ((32 / b0) as usize, (32 / bits) as usize);
        let (mask0, n) = ((1u32 << b0) - 1, self.rows * self.cols);
        let word = |bytes: &[u8], w: usize| u32::from_le_bytes(bytes[4 * w..4 * w + 4].try_into().expect("4 bytes"));
        let mut codes = vec![0u32; n / per];
        for (i, slot) in (0..n).map(|i| (i, i / per)) {
            let code = (word(&self.data, i / per0) >> (b0 as usize * (i % per0))) & mask0;
            codes[slot] |= code << (bits as usize * (i % per));
        }
        let split = |b: &Bytes| -> Bytes {
            let repeat = g0 / group;
            Bytes::from_vec(
                b.chunks_exact(2).flat_map(|v| std::iter::repeat_n([v[0], v[1]], repeat)).flatten().collect(),
            )
        };
        Some(Matrix {
            format: WeightFormat::Affine { bits, group },
            rows: self.rows,
            cols: self.cols,
            data: Bytes::from_vec(codes.iter().flat_map(|w| w.to_le_bytes()).collect()),
            scales: split(&self.scales),
            biases: split(&self.biases),
        })
    }

    /// `data`, `scales` and `biases` with the bytes each holds per row: every part is row-major,
    /// since quantisation groups run along a row.
    fn row_parts(&self) -> [(&Bytes, usize); 3] {
        let (data, groups) = match self.format {
            WeightFormat::Float(d) => (self.cols * d.size(), 0),
            WeightFormat::Affine { bits, group } => (self.cols * bits as usize / 8, self.cols / group * 2),
        };
        [(&self.data, data), (&self.scales, groups), (&self.biases, groups)]
    }

    fn with_parts(&self, rows: usize, [data, scales, biases]: [Bytes; 3]) -> Matrix {
        Matrix { format: self.format, rows, cols: self.cols, data, scales, biases }
    }

    /// Total bytes of the stored matrix.
    pub fn byte_len(&self) -> usize {
        self.data.len() + self.scales.len() + self.biases.len()
    }

    /// Dequantises row `r` into `out` (`cols` values). The definition every kernel must match.
    pub fn row_f32(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols;
        match self.format {
            WeightFormat::Float(d) => {
                let rb = cols * d.size();
                d.decode_into(&self.data[r * rb..(r + 1) * rb], out);
            }
            WeightFormat::Affine { bits, group } => {
                let per_word = (32 / bits) as usize;
                let mask = (1u32 << bits) - 1;
                let words_per_row = cols / per_word;
                let groups = cols / group;
                let codes = &self.data[r * words_per_row * 4..(r + 1) * words_per_row * 4];
                for g in 0..groups {
                    let si = (r * groups + g) * 2;
                    let scale = bf16_bits_to_f32(u16::from_le_bytes([self.scales[si], self.scales[si + 1]]));
                    let bias = bf16_bits_to_f32(u16::from_le_bytes([self.biases[si], self.biases[si + 1]]));
                    for (i, o) in out.iter_mut().enumerate().take((g + 1) * group).skip(g * group) {
                        let w = i / per_word;
                        let word =
                            u32::from_le_bytes([codes[4 * w], codes[4 * w + 1], codes[4 * w + 2], codes[4 * w + 3]]);
                        let code = (word >> (bits as usize * (i % per_word))) & mask;
                        *o = scale * code as f32 + bias;
                    }
                }
            }
        }
    }

    /// The whole matrix as f32, row-major. For tests and small tensors only.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        for (r, row) in out.chunks_exact_mut(self.cols).enumerate() {
            self.row_f32(r, row);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize;

    #[test]
    fn bf16_decoding_is_a_shift() {
        let bytes = [0x80, 0x3f, 0x00, 0xc0]; // 1.0, -2.0
        assert_eq!(DType::BF16.to_f32(&bytes), vec![1.0, -2.0]);
    }

    #[test]
    fn affine_row_follows_the_formula() {
        // One row of 64 4-bit codes 0,1,..,15,0,1,.. with scale 0.5 and bias -1.
        let mut words = [0u32; 8];
        for i in 0..64 {
            words[i / 8] |= ((i % 16) as u32) << (4 * (i % 8));
        }
        let data = Bytes::from_vec(words.iter().flat_map(|w| w.to_le_bytes()).collect());
        let scales = Bytes::from_vec(f32_to_bf16_bits(0.5).to_le_bytes().to_vec());
        let biases = Bytes::from_vec(f32_to_bf16_bits(-1.0).to_le_bytes().to_vec());
        let m = Matrix { format: WeightFormat::Affine { bits: 4, group: 64 }, rows: 1, cols: 64, data, scales, biases };
        let row = m.to_f32();
        for (i, v) in row.iter().enumerate() {
            assert_eq!(*v, 0.5 * (i % 16) as f32 - 1.0);
        }
    }

    /// The same 6 x 64 values (distinct rows) as f32, bf16 and 8-, 4- and 2-bit affine matrices.
    fn every_format() -> Vec<Matrix> {
        let (rows, cols) = (6, 64);
        let values: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0 + (i / cols) as f32).collect();
        let bf16 = Bytes::from_vec(values.iter().flat_map(|&v| f32_to_bf16_bits(v).to_le_bytes()).collect());
        vec![
            Matrix::from_f32(rows, cols, &values),
            Matrix::float(DType::BF16, rows, cols, bf16),
            quantize(&values, rows, cols, 8, 32),
            quantize(&values, rows, cols, 4, 64),
            quantize(&values, rows, cols, 2, 32),
        ]
    }

    fn row(m: &Matrix, r: usize) -> Vec<f32> {
        let mut out = vec![0.0; m.cols];
        m.row_f32(r, &mut out);
        out
    }

    #[test]
    fn selected_rows_dequantise_as_their_source_rows() {
        let order = [4u32, 0, 5, 5, 2];
        for m in every_format() {
            let s = m.select_rows(&order);
            assert_eq!((s.rows, s.cols, s.format), (order.len(), m.cols, m.format));
            assert_eq!(s.byte_len(), order.len() * m.format.row_bytes(m.cols));
            for (i, &r) in order.iter().enumerate() {
                assert_eq!(row(&s, i), row(&m, r as usize), "{} row {i}", m.format.name());
            }
        }
    }

    #[test]
    fn concatenated_rows_dequantise_as_their_parts() {
        for m in every_format() {
            let (a, b, c) = (m.rows(3..6), m.rows(0..1), m.rows(1..3));
            let cat = Matrix::concat_rows(&[&a, &b, &c]).unwrap();
            assert_eq!((cat.rows, cat.cols, cat.format), (6, m.cols, m.format));
            for (i, r) in [3, 4, 5, 0, 1, 2].into_iter().enumerate() {
                assert_eq!(row(&cat, i), row(&m, r), "{} row {i}", m.format.name());
            }
        }
    }

    #[test]
    fn mixed_affine_parts_are_widened_exactly() {
        let f = every_format();
        // q4 in groups of 64, q8 and q2 in groups of 32: all become q8 in groups of 32.
        let parts = [&f[3], &f[2], &f[4]];
        let cat = Matrix::concat_rows(&parts).unwrap();
        assert_eq!(cat.format, WeightFormat::Affine { bits: 8, group: 32 });
        assert_eq!(cat.byte_len(), 18 * cat.format.row_bytes(64));
        assert_eq!(cat.to_f32(), parts.iter().flat_map(|m| m.to_f32()).collect::<Vec<_>>());
        // Never narrower, never a group that does not split the old one, never from floats.
        assert!(f[2].widened(4, 32).is_none() && f[4].widened(8, 64).is_none() && f[0].widened(8, 32).is_none());
    }

    #[test]
    fn concatenation_needs_one_format_and_width() {
        let f = every_format();
        let err = Matrix::concat_rows(&[&f[3], &f[1]]).unwrap_err().to_string();
        assert!(err.contains("part 1 is bf16") && err.contains("part 0 q4 (group 64)"), "{err}");
        let narrow = Matrix::from_f32(1, 2, &[1.0, 2.0]);
        assert!(Matrix::concat_rows(&[&f[0], &narrow]).is_err());
        assert!(Matrix::concat_rows(&[]).is_err());
    }

    #[test]
    fn row_slices_share_bytes() {
        let m = Matrix::from_f32(3, 2, &[1., 2., 3., 4., 5., 6.]);
        assert_eq!(m.rows(1..3).to_f32(), vec![3., 4., 5., 6.]);
    }
}
