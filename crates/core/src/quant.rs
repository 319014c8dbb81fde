//! Affine quantisation in the MLX layout (see [`crate::format`]): producing quantised matrices from
//! f32 values, and flash-moe's 4-bit to 2-bit requantisation.
//!
//! Dequantisation is defined once, by [`Matrix::row_f32`]: `w = scale * code + bias`, with codes
//! packed least-significant bits first into little-endian u32 words and one bf16 scale and bias
//! per `group` consecutive elements of a row.

use crate::format::bf16_bits_to_f32;
use crate::{Bytes, Matrix, WeightFormat};

/// Quantises the row-major `[rows, cols]` `values` to `bits` (2, 4 or 8) with one scale and bias
/// per `group` elements of a row: MLX's affine rule `bias = min`, `scale = (max - min) / (2^bits - 1)`,
/// `code = clamp(round((w - bias) / scale), 0, 2^bits - 1)` (round half to even).
///
/// Scale and bias are stored as bf16, rounded so that the error stays bounded: the bias is the
/// largest bf16 not above the group's minimum and the scale the smallest bf16 with
/// `bias + (2^bits - 1) * scale >= max`, so the grid covers the whole group and every dequantised
/// element lies within `scale / 2` of its input (plus f32 rounding). Codes are computed against
/// the stored (bf16) scale and bias. A group whose values all equal one bf16 value gets scale 0
/// and dequantises exactly.
///
/// Panics if `bits` is not 2, 4 or 8, if `group` does not divide `cols`, if a group's codes do not
/// fill whole u32 words (groups of 32, 64 and 128 always do), or if `values` is not `rows * cols` long. Values must be finite.
pub fn quantize(values: &[f32], rows: usize, cols: usize, bits: u32, group: usize) -> Matrix {
    check_shape(cols, bits, group);
    assert_eq!(values.len(), rows * cols, "quantize: {} values for a [{rows}, {cols}] matrix", values.len());
    let top = ((1u32 << bits) - 1) as f32;
    let groups = rows * cols / group;
    let mut codes = vec![0u8; rows * cols * bits as usize / 8];
    let mut scales = Vec::with_capacity(groups * 2);
    let mut biases = Vec::with_capacity(groups * 2);
    let mut q = vec![0u32; group];
    for (g, chunk) in values.chunks_exact(group).enumerate() {
        let (lo, hi) = min_max(chunk);
        let bias_bits = bf16_floor(lo);
        let bias = bf16_bits_to_f32(bias_bits);
        let range = hi - bias;
        let scale_bits = if range > 0.0 { bf16_ceil(range / top) } else { 0 };
        let scale = bf16_bits_to_f32(scale_bits);
        for (c, &w) in q.iter_mut().zip(chunk) {
            *c = if scale > 0.0 { ((w - bias) / scale).round_ties_even().clamp(0.0, top) as u32 } else { 0 };
        }
        pack_codes(&q, bits, g * group, &mut codes);
        scales.extend_from_slice(&scale_bits.to_le_bytes());
        biases.extend_from_slice(&bias_bits.to_le_bytes());
    }
    Matrix {
        format: WeightFormat::Affine { bits, group },
        rows,
        cols,
        data: Bytes::from_vec(codes),
        scales: Bytes::from_vec(scales),
        biases: Bytes::from_vec(biases),
    }
}

/// flash-moe's 4-bit to 2-bit requantisation (`repack_experts_2bit.py`), bit for bit: per group
/// (group size unchanged) dequantise the 4-bit codes in f32, `S2 = (max - min) / 3`, `B2 = min`,
/// `q2 = clamp(round_half_even((f - B2) / S2), 0, 3)` with divisor 1 when `S2 == 0`, and store
/// `S2`, `B2` as bf16 by truncation (the high 16 bits of the f32, no rounding).
///
/// Panics if `m` is not a 4-bit affine matrix or a group's 2-bit codes don't fill whole words.
pub fn requantize_q2_from_q4(m: &Matrix) -> Matrix {
    let WeightFormat::Affine { bits: 4, group } = m.format else {
        panic!("requantize_q2_from_q4: the matrix is {}, not 4-bit affine", m.format.name());
    };
    check_shape(m.cols, 2, group);
    let groups_per_row = m.cols / group;
    let mut codes = vec![0u8; m.rows * m.cols / 4];
    let mut scales = Vec::with_capacity(m.rows * groups_per_row * 2);
    let mut biases = Vec::with_capacity(m.rows * groups_per_row * 2);
    let mut row = vec![0f32; m.cols];
    let mut q = vec![0u32; group];
    for r in 0..m.rows {
        m.row_f32(r, &mut row);
        for (g, f) in row.chunks_exact(group).enumerate() {
            let (lo, hi) = min_max(f);
            let s2 = (hi - lo) / 3.0;
            let b2 = lo;
            let div = if s2 == 0.0 { 1.0 } else { s2 };
            for (c, &w) in q.iter_mut().zip(f) {
                *c = ((w - b2) / div).round_ties_even().clamp(0.0, 3.0) as u32;
            }
            pack_codes(&q, 2, r * m.cols + g * group, &mut codes);
            scales.extend_from_slice(&((s2.to_bits() >> 16) as u16).to_le_bytes());
            biases.extend_from_slice(&((b2.to_bits() >> 16) as u16).to_le_bytes());
        }
    }
    Matrix {
        format: WeightFormat::Affine { bits: 2, group },
        rows: m.rows,
        cols: m.cols,
        data: Bytes::from_vec(codes),
        scales: Bytes::from_vec(scales),
        biases: Bytes::from_vec(biases),
    }
}

/// The matrix as f32 values, row-major (the definition in [`Matrix::row_f32`]).
pub fn dequantize(m: &Matrix) -> Vec<f32> {
    m.to_f32()
}

/// Bytes of the codes of a `[rows, cols]` matrix at `bits`.
pub fn code_bytes(rows: usize, cols: usize, bits: u32) -> usize {
    rows * cols * bits as usize / 8
}

/// Bytes of the scales (and, equally, of the biases) of a `[rows, cols]` matrix with `group`.
pub fn scale_bytes(rows: usize, cols: usize, group: usize) -> usize {
    rows * (cols / group) * 2
}

fn check_shape(cols: usize, bits: u32, group: usize) {
    assert!(matches!(bits, 2 | 4 | 8), "affine quantisation supports 2, 4 and 8 bits, not {bits}");
    assert!(group > 0 && cols.is_multiple_of(group), "group {group} does not divide {cols} columns");
    assert!(
        (group * bits as usize).is_multiple_of(32),
        "groups of {group} {bits}-bit codes do not fill whole u32 words"
    );
}

fn min_max(v: &[f32]) -> (f32, f32) {
    v.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

/// Writes `codes` (each below `2^bits`) as the elements starting at flat element index `first`
/// of a row-major code array, LSB first in little-endian u32 words. `first` must start a word;
/// a trailing partial word is written with zero high bits.
fn pack_codes(codes: &[u32], bits: u32, first: usize, out: &mut [u8]) {
    let per_word = (32 / bits) as usize;
    debug_assert!(first.is_multiple_of(per_word));
    let base = first / per_word * 4;
    for (w, chunk) in codes.chunks(per_word).enumerate() {
        let mut word = 0u32;
        for (j, &c) in chunk.iter().enumerate() {
            word |= c << (bits as usize * j);
        }
        out[base + 4 * w..base + 4 * w + 4].copy_from_slice(&word.to_le_bytes());
    }
}

/// The largest bf16 not above `x` (for finite `x`).
fn bf16_floor(x: f32) -> u16 {
    let bits = x.to_bits();
    let trunc = (bits >> 16) as u16;
    if bits & 0xffff == 0 || x >= 0.0 { trunc } else { trunc + 1 }
}

/// The smallest bf16 not below `x` (for finite, non-negative `x`).
fn bf16_ceil(x: f32) -> u16 {
    debug_assert!(x >= 0.0);
    let bits = x.to_bits();
    let trunc = (bits >> 16) as u16;
    if bits & 0xffff == 0 { trunc } else { trunc + 1 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::f32_to_bf16_bits;

    /// A small deterministic generator (xorshift64*), so the tests need no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        /// Uniform in [-1, 1).
        fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    fn bf16s(v: &[f32]) -> Bytes {
        Bytes::from_vec(v.iter().flat_map(|&x| f32_to_bf16_bits(x).to_le_bytes()).collect())
    }

    fn unpack(m: &Matrix) -> Vec<u32> {
        let WeightFormat::Affine { bits, .. } = m.format else { panic!() };
        let per_word = 32 / bits as usize;
        (0..m.rows * m.cols)
            .map(|i| {
                let w = i / per_word;
                let word = u32::from_le_bytes(m.data[4 * w..4 * w + 4].try_into().unwrap());
                (word >> (bits as usize * (i % per_word))) & ((1 << bits) - 1)
            })
            .collect()
    }

    #[test]
    fn codes_on_the_grid_round_trip_exactly() {
        for bits in [2u32, 4, 8] {
            let (rows, cols, group) = (3, 128, 64);
            let top = (1u32 << bits) - 1;
            let mut rng = Rng(0x1234 + bits as u64);
            let (scale, bias) = (0.25f32, -3.0f32);
            // Every group holds code 0 and code `top`, so min and max pin the grid.
            let codes: Vec<u32> = (0..rows * cols)
                .map(|i| match i % group {
                    0 => 0,
                    1 => top,
                    _ => (rng.next() % (top as u64 + 1)) as u32,
                })
                .collect();
            let values: Vec<f32> = codes.iter().map(|&q| scale * q as f32 + bias).collect();
            let m = quantize(&values, rows, cols, bits, group);
            assert_eq!(unpack(&m), codes, "{bits}-bit codes");
            assert_eq!(dequantize(&m), values, "{bits}-bit values");
            assert_eq!(m.data.len(), code_bytes(rows, cols, bits));
            assert_eq!(m.scales.len(), scale_bytes(rows, cols, group));
            assert_eq!(m.biases.len(), scale_bytes(rows, cols, group));
        }
    }

    #[test]
    fn packing_is_lsb_first_little_endian() {
        // 2-bit codes 1, 2, 3, 0, ... : word = 0b..._00_11_10_01.
        let values: Vec<f32> = (0..32).map(|i| [1.0, 2.0, 3.0, 0.0][i % 4]).collect();
        let m = quantize(&values, 1, 32, 2, 32);
        let word = u32::from_le_bytes(m.data[0..4].try_into().unwrap());
        assert_eq!(word & 0xff, 0b00_11_10_01);
        assert_eq!(word, 0x3939_3939);
        assert_eq!(bf16_bits_to_f32(u16::from_le_bytes([m.scales[0], m.scales[1]])), 1.0);
        assert_eq!(bf16_bits_to_f32(u16::from_le_bytes([m.biases[0], m.biases[1]])), 0.0);
    }

    #[test]
    fn dequant_follows_the_formula_on_hand_built_matrices() {
        for bits in [2u32, 4, 8] {
            let per_word = 32 / bits as usize;
            let (cols, group) = (64usize, 32usize);
            let top = (1u32 << bits) - 1;
            let codes: Vec<u32> = (0..2 * cols).map(|i| (i as u32 * 7 + 3) % (top + 1)).collect();
            let mut words = vec![0u32; 2 * cols / per_word];
            for (i, &c) in codes.iter().enumerate() {
                words[i / per_word] |= c << (bits as usize * (i % per_word));
            }
            let scales = [0.5f32, -0.125, 3.0, 0.0];
            let biases = [-1.0f32, 2.5, 0.0, 7.0];
            let m = Matrix {
                format: WeightFormat::Affine { bits, group },
                rows: 2,
                cols,
                data: Bytes::from_vec(words.iter().flat_map(|w| w.to_le_bytes()).collect()),
                scales: bf16s(&scales),
                biases: bf16s(&biases),
            };
            let got = dequantize(&m);
            for (i, (&v, &q)) in got.iter().zip(&codes).enumerate() {
                let g = i / group;
                assert_eq!(v, scales[g] * q as f32 + biases[g], "{bits}-bit element {i}");
            }
        }
    }

    #[test]
    fn error_is_bounded_by_half_a_scale_on_random_data() {
        let mut rng = Rng(42);
        for bits in [2u32, 4, 8] {
            for (rows, cols, group) in [(5, 256, 64), (4, 96, 32)] {
                // Mix magnitudes and offsets: plain, shifted away from zero, tiny, large.
                for (mul, add) in [(1.0f32, 0.0f32), (0.01, 5.0), (1e-4, 0.0), (300.0, -1000.0)] {
                    let values: Vec<f32> = (0..rows * cols).map(|_| rng.unit() * mul + add).collect();
                    let m = quantize(&values, rows, cols, bits, group);
                    let back = dequantize(&m);
                    for (i, (&w, &d)) in values.iter().zip(&back).enumerate() {
                        let si = 2 * (i / group);
                        let s = bf16_bits_to_f32(u16::from_le_bytes([m.scales[si], m.scales[si + 1]]));
                        let slack = 4.0 * f32::EPSILON * (w.abs() + s * ((1 << bits) as f32));
                        assert!(
                            (w - d).abs() <= s / 2.0 + slack,
                            "{bits}-bit [{rows},{cols}] g{group} x{mul}+{add} element {i}: {w} -> {d}, scale {s}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn constant_groups_dequantise_exactly() {
        let mut values = vec![0.0f32; 128];
        values[..64].fill(-2.375); // bf16-exact
        values[64..].fill(0.0);
        for bits in [2u32, 4, 8] {
            let m = quantize(&values, 1, 128, bits, 64);
            assert_eq!(dequantize(&m), values);
            assert!(m.scales.iter().all(|&b| b == 0), "constant groups get scale 0");
        }
    }

    #[test]
    fn q2_requantisation_follows_flash_moe_on_a_hand_case() {
        // One row, one group of 64 4-bit codes; scale 0.1 (bf16 0.10009765625), bias -0.5.
        let s4 = f32_to_bf16_bits(0.1);
        let b4 = f32_to_bf16_bits(-0.5);
        let (s4f, b4f) = (bf16_bits_to_f32(s4), bf16_bits_to_f32(b4));
        let codes: Vec<u32> = (0..64).map(|i| [0, 15, 5, 10, 2, 7, 8, 12][i % 8]).collect();
        let mut words = [0u32; 8];
        for (i, &c) in codes.iter().enumerate() {
            words[i / 8] |= c << (4 * (i % 8));
        }
        let m4 = Matrix {
            format: WeightFormat::Affine { bits: 4, group: 64 },
            rows: 1,
            cols: 64,
            data: Bytes::from_vec(words.iter().flat_map(|w| w.to_le_bytes()).collect()),
            scales: Bytes::from_vec(s4.to_le_bytes().to_vec()),
            biases: Bytes::from_vec(b4.to_le_bytes().to_vec()),
        };
        let m2 = requantize_q2_from_q4(&m4);
        assert_eq!(m2.format, WeightFormat::Affine { bits: 2, group: 64 });
        assert_eq!(m2.data.len(), 16);

        // The rule written out by hand.
        let f: Vec<f32> = codes.iter().map(|&q| q as f32 * s4f + b4f).collect();
        let (lo, hi) = (b4f, 15.0 * s4f + b4f);
        let s2 = (hi - lo) / 3.0;
        assert_eq!(u16::from_le_bytes([m2.scales[0], m2.scales[1]]), (s2.to_bits() >> 16) as u16);
        assert_eq!(u16::from_le_bytes([m2.biases[0], m2.biases[1]]), (lo.to_bits() >> 16) as u16);
        // Truncation, not rounding: S2 = 0.5004883 has low f32 bits set.
        assert_ne!(s2.to_bits() & 0xffff, 0);
        let want: Vec<u32> = f.iter().map(|&x| ((x - lo) / s2).round_ties_even().clamp(0.0, 3.0) as u32).collect();
        // Codes 0,15,5,10,2,7,8,12 -> (q*s4)/(5*s4) = q/5 -> 0, 3, 1, 2, 0 (0.4), 1 (1.4), 2 (1.6), 2 (2.4).
        assert_eq!(&want[..8], &[0, 3, 1, 2, 0, 1, 2, 2]);
        assert_eq!(unpack(&m2), want);
    }

    #[test]
    fn q2_rounds_half_to_even_and_handles_constant_groups() {
        // Values 0, 1.5, 3 (x2 via scale): codes (f - 0) / 1 -> 0, 1.5 -> 2 (even), 3.
        // Built as 4-bit: scale 0.5, codes 0, 3, 6 ... and a constant second row.
        let row0: Vec<u32> = (0..64).map(|i| [0, 3, 6, 1][i % 4]).collect();
        let row1: Vec<u32> = vec![9; 64];
        let mut words = [0u32; 16];
        for (i, &c) in row0.iter().chain(&row1).enumerate() {
            words[i / 8] |= c << (4 * (i % 8));
        }
        let m4 = Matrix {
            format: WeightFormat::Affine { bits: 4, group: 64 },
            rows: 2,
            cols: 64,
            data: Bytes::from_vec(words.iter().flat_map(|w| w.to_le_bytes()).collect()),
            scales: bf16s(&[0.5, 0.25]),
            biases: bf16s(&[0.0, 1.0]),
        };
        let m2 = requantize_q2_from_q4(&m4);
        let codes = unpack(&m2);
        // Row 0: f = 0, 1.5, 3, 0.5; S2 = 1: 0, 2 (1.5 half to even), 3, 0 (0.5 half to even).
        assert_eq!(&codes[..4], &[0, 2, 3, 0]);
        // Row 1: constant 3.25: S2 = 0, divisor 1, codes 0, bias 3.25, dequant exact.
        assert!(codes[64..].iter().all(|&c| c == 0));
        assert_eq!(&dequantize(&m2)[64..], &[3.25; 64][..]);
    }

    #[test]
    fn bf16_directed_rounding() {
        let x = 1.0f32 + f32::EPSILON; // not bf16-exact
        assert_eq!(bf16_bits_to_f32(bf16_floor(x)), 1.0);
        assert!(bf16_bits_to_f32(bf16_ceil(x)) > 1.0);
        assert_eq!(bf16_bits_to_f32(bf16_floor(-x)), -bf16_bits_to_f32(bf16_ceil(x)));
        assert_eq!(bf16_floor(-2.0), f32_to_bf16_bits(-2.0));
        assert_eq!(bf16_ceil(0.0), 0);
    }
}
