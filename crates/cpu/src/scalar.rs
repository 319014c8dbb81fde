//! Portable kernels: dequantise a row into f32, then dot it with every token. Written so that
//! the compiler can vectorise the dot product (eight independent partial sums).

use moe_core::format::bf16_bits_to_f32;
use moe_core::{Matrix, WeightFormat};

/// Dot product with eight partial sums (vectorisable, and more accurate than one running sum).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = at.iter().zip(bt).map(|(x, y)| x * y).sum();
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Dequantises row `r` of `w` into `out`, with the exact arithmetic of [`Matrix::row_f32`]
/// (`scale * code + bias` in f32) but a word at a time.
pub(crate) fn dequant_row(w: &Matrix, r: usize, out: &mut [f32]) {
    let cols = w.cols;
    let WeightFormat::Affine { bits, group } = w.format else {
        return w.row_f32(r, out);
    };
    if !group.is_multiple_of(32 / bits as usize) || !cols.is_multiple_of(group) {
        return w.row_f32(r, out);
    }
    let bits = bits as usize;
    let per_word = 32 / bits;
    let mask = (1u32 << bits) - 1;
    let groups = cols / group;
    let row_bytes = cols * bits / 8;
    let codes = &w.data[r * row_bytes..(r + 1) * row_bytes];
    let scales = &w.scales[r * groups * 2..(r + 1) * groups * 2];
    let biases = &w.biases[r * groups * 2..(r + 1) * groups * 2];
    let mut words = codes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    for (g, o) in out[..cols].chunks_exact_mut(group).enumerate() {
        let scale = bf16_bits_to_f32(u16::from_le_bytes([scales[2 * g], scales[2 * g + 1]]));
        let bias = bf16_bits_to_f32(u16::from_le_bytes([biases[2 * g], biases[2 * g + 1]]));
        for o in o.chunks_exact_mut(per_word) {
            let word = words.next().unwrap_or(0);
            for (i, o) in o.iter_mut().enumerate() {
                *o = scale * ((word >> (bits * i)) & mask) as f32 + bias;
            }
        }
    }
}

/// `outs[t][i] = row(r0 + i) . x[t]` for every token `t` (`outs.len()` tokens): each row is
/// dequantised once into `row` and dotted with every token.
pub(crate) fn rows(w: &Matrix, x: &[f32], r0: usize, outs: &mut [&mut [f32]], row: &mut Vec<f32>) {
    let cols = w.cols;
    row.resize(cols, 0.0);
    let n = outs.first().map_or(0, |o| o.len());
    for i in 0..n {
        dequant_row(w, r0 + i, row);
        for (t, o) in outs.iter_mut().enumerate() {
            o[i] = dot(row, &x[t * cols..(t + 1) * cols]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_at_a_time_dequantisation_equals_row_f32_bit_for_bit() {
        let (rows, cols) = (3, 384);
        let v: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        for bits in [2, 4, 8] {
            for group in [32, 64, 128] {
                let m = moe_core::quant::quantize(&v, rows, cols, bits, group);
                for r in 0..rows {
                    let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
                    m.row_f32(r, &mut a);
                    dequant_row(&m, r, &mut b);
                    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "q{bits} g{group} row {r}");
                }
            }
        }
    }

    #[test]
    fn dot_handles_tails() {
        for n in [0, 1, 7, 8, 9, 31] {
            let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let want: f32 = a.iter().map(|v| v * v).sum();
            assert_eq!(dot(&a, &a), want);
        }
    }
}
