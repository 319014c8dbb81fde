//! CPU kernels: matrix products over any stored weight format, parallel over rows with rayon.
//! Plain and correct first; SIMD specialisations plug in behind the same functions.

use moe_core::{Matrix, ops};
use rayon::prelude::*;

/// Rows per parallel task: enough work to amortise a rayon dispatch.
const ROWS_PER_TASK: usize = 16;

/// `out[t] = W x[t]` for `tokens` input rows: `x` is `[tokens, cols]`, `out` is `[tokens, rows]`.
/// Each weight row is dequantised once and used for every token, so prefill reads the weights once.
pub fn matmul(w: &Matrix, x: &[f32], tokens: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    assert!(x.len() >= tokens * cols && out.len() >= tokens * rows, "matmul: buffers too small");
    if tokens == 1 {
        out[..rows].par_chunks_mut(ROWS_PER_TASK).enumerate().for_each_init(
            || vec![0.0; cols],
            |row, (chunk, o)| {
                for (i, o) in o.iter_mut().enumerate() {
                    w.row_f32(chunk * ROWS_PER_TASK + i, row);
                    *o = ops::dot(row, &x[..cols]);
                }
            },
        );
        return;
    }
    // Row-major `[rows, tokens]` first, so that each task owns whole weight rows; then transpose.
    let mut by_row = vec![0.0; rows * tokens];
    by_row.par_chunks_mut(ROWS_PER_TASK * tokens).enumerate().for_each_init(
        || vec![0.0; cols],
        |row, (chunk, o)| {
            for (i, o) in o.chunks_exact_mut(tokens).enumerate() {
                w.row_f32(chunk * ROWS_PER_TASK + i, row);
                for (t, o) in o.iter_mut().enumerate() {
                    *o = ops::dot(row, &x[t * cols..(t + 1) * cols]);
                }
            }
        },
    );
    for (r, vals) in by_row.chunks_exact(tokens).enumerate() {
        for (t, v) in vals.iter().enumerate() {
            out[t * rows + r] = *v;
        }
    }
}

/// Runs `f` on each of `n` disjoint chunks of `data` in parallel.
pub fn par_chunks<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
}

/// Number of worker threads kernels run on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::format::f32_to_bf16_bits;
    use moe_core::{Bytes, DType};

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn matmul_matches_reference_matvec_for_bf16() {
        let (rows, cols, tokens) = (37, 24, 5);
        let mut s = 7;
        let vals: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut s)).collect();
        let bytes: Vec<u8> = vals.iter().flat_map(|v| f32_to_bf16_bits(*v).to_le_bytes()).collect();
        let w = Matrix::float(DType::BF16, rows, cols, Bytes::from_vec(bytes));
        let x: Vec<f32> = (0..tokens * cols).map(|_| lcg(&mut s)).collect();
        for t in [1, tokens] {
            let mut out = vec![0.0; t * rows];
            matmul(&w, &x, t, &mut out);
            for tok in 0..t {
                let mut expect = vec![0.0; rows];
                ops::matvec(&w, &x[tok * cols..(tok + 1) * cols], &mut expect);
                for (a, b) in out[tok * rows..(tok + 1) * rows].iter().zip(&expect) {
                    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
                }
            }
        }
    }
}
