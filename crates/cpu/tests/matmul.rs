//! `matmul` against the reference (`Matrix::row_f32` + a dot product in f64, and
//! `moe_core::ops::matvec`), for every weight format, token count and kernel.
//!
//! Error measure: `|got - want| <= 1e-5 * sum_i |w_i x_i|` (relative to the magnitude of the
//! terms, which is what f32 accumulation in a different order can promise even when the sum
//! itself cancels to near zero).

use moe_core::format::{WeightFormat, f32_to_bf16_bits};
use moe_core::{Bytes, DType, Matrix, ops};
use moe_cpu::{Kernel, matmul, matmul_with};
use proptest::prelude::*;

const TOL: f64 = 1e-5;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 11
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 29) as f32 / (1u64 << 23) as f32 * 2.0 - 1.0
    }
    /// A normal f16 of either sign with magnitude in [2^-10, 2): sign, exponent 5..=15, mantissa.
    fn f16_bits(&mut self) -> u16 {
        let h = self.next();
        (((h >> 20) & 1) << 15 | (5 + (h >> 10) % 11) << 10 | (h & 0x3ff)) as u16
    }
}

/// `bytes` at an odd address when `misalign` (weights come from mmaps at any offset).
fn buffer(bytes: Vec<u8>, misalign: bool) -> Bytes {
    if misalign {
        let mut v = vec![0xAB];
        v.extend_from_slice(&bytes);
        let n = v.len();
        Bytes::from_vec(v).slice(1..n)
    } else {
        Bytes::from_vec(bytes)
    }
}

fn bf16s(n: usize, scale: f32, rng: &mut Rng) -> Vec<u8> {
    (0..n).flat_map(|_| f32_to_bf16_bits(rng.f() * scale).to_le_bytes()).collect()
}

fn random_matrix(format: WeightFormat, rows: usize, cols: usize, seed: u64, misalign: bool) -> Matrix {
    let rng = &mut Rng(seed);
    match format {
        WeightFormat::Float(DType::F32) => {
            let bytes = (0..rows * cols).flat_map(|_| rng.f().to_le_bytes()).collect();
            Matrix::float(DType::F32, rows, cols, buffer(bytes, misalign))
        }
        WeightFormat::Float(DType::F16) => {
            let bytes = (0..rows * cols).flat_map(|_| rng.f16_bits().to_le_bytes()).collect();
            Matrix::float(DType::F16, rows, cols, buffer(bytes, misalign))
        }
        WeightFormat::Float(DType::BF16) => {
            Matrix::float(DType::BF16, rows, cols, buffer(bf16s(rows * cols, 1.0, rng), misalign))
        }
        WeightFormat::Affine { bits, group } => {
            let codes = (0..rows * cols * bits as usize / 8).map(|_| rng.next() as u8).collect();
            let g = rows * cols / group;
            // Biases of both signs and about the size of the coded range, as MLX produces.
            let span = (1u32 << bits) as f32;
            Matrix {
                format,
                rows,
                cols,
                data: buffer(codes, misalign),
                scales: buffer(bf16s(g, 1.0 / span, rng), misalign),
                biases: buffer(bf16s(g, 0.5, rng), misalign),
            }
        }
    }
}

fn random_x(n: usize, seed: u64) -> Vec<f32> {
    let rng = &mut Rng(seed ^ 0x5eed);
    (0..n).map(|_| rng.f()).collect()
}

/// Checks `out` (`[tokens, rows]`) against the references; returns the worst relative error.
fn check(w: &Matrix, x: &[f32], tokens: usize, out: &[f32], what: &str) -> f64 {
    let (rows, cols) = (w.rows, w.cols);
    let mut worst = 0.0f64;
    let mut row = vec![0.0; cols];
    let mut by_ops = vec![0.0; rows];
    for t in 0..tokens {
        let xt = &x[t * cols..(t + 1) * cols];
        ops::matvec(w, xt, &mut by_ops);
        for r in 0..rows {
            w.row_f32(r, &mut row);
            let exact: f64 = row.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mass: f64 = row.iter().zip(xt).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum::<f64>().max(1e-30);
            let got = out[t * rows + r] as f64;
            let err = (got - exact).abs() / mass;
            let err_ops = (got - by_ops[r] as f64).abs() / mass;
            assert!(
                err <= TOL && err_ops <= TOL,
                "{what}: token {t} row {r}: got {got}, exact {exact}, ops::matvec {}, relative error {err:e} / {err_ops:e}",
                by_ops[r]
            );
            worst = worst.max(err);
        }
    }
    worst
}

fn run_and_check(kernel: Kernel, w: &Matrix, tokens: usize, seed: u64, what: &str) -> f64 {
    let x = random_x(tokens * w.cols, seed);
    // NaN-filled output: every element must be written.
    let mut out = vec![f32::NAN; tokens * w.rows];
    matmul_with(kernel, w, &x, tokens, &mut out);
    check(w, &x, tokens, &out, what)
}

const FORMATS: [WeightFormat; 11] = [
    WeightFormat::Float(DType::F32),
    WeightFormat::Float(DType::F16),
    WeightFormat::Float(DType::BF16),
    WeightFormat::Affine { bits: 8, group: 64 },
    WeightFormat::Affine { bits: 4, group: 64 },
    WeightFormat::Affine { bits: 2, group: 64 },
    WeightFormat::Affine { bits: 8, group: 32 },
    WeightFormat::Affine { bits: 4, group: 32 },
    WeightFormat::Affine { bits: 2, group: 32 },
    WeightFormat::Affine { bits: 4, group: 128 },
    // Not a multiple of 32: the AVX2 kernel hands it to the scalar path.
    WeightFormat::Affine { bits: 4, group: 16 },
];

/// Column counts to try: odd ones for float rows (vector tails), whole groups for affine.
fn col_counts(format: WeightFormat) -> Vec<usize> {
    match format {
        WeightFormat::Float(_) => vec![1, 7, 8, 33, 100, 257, 1024],
        WeightFormat::Affine { group, .. } => vec![group, 3 * group, 1024],
    }
}

/// Every format x tokens {1, 3, 17} (and 2, 4, 5: the edges between the few-token kernels and
/// the tiled one) x odd row counts (1, 7, 33, 131 and one matrix large enough to be split across
/// threads), aligned and not.
fn grid(kernel: Kernel) {
    let mut seed = 1;
    for format in FORMATS {
        let mut worst = 0.0f64;
        for cols in col_counts(format) {
            for rows in [1, 7, 33, 131] {
                for tokens in [1, 2, 3, 4, 5, 17] {
                    seed += 1;
                    let w = random_matrix(format, rows, cols, seed, seed % 2 == 0);
                    let what = format!("{kernel:?} {} {rows}x{cols} tokens={tokens}", format.name());
                    worst = worst.max(run_and_check(kernel, &w, tokens, seed, &what));
                }
            }
        }
        // Big enough for several rayon tasks at every token count.
        let big = match format {
            WeightFormat::Float(_) => (517, 1000),
            WeightFormat::Affine { group, .. } => (517, 16 * group.max(64)),
        };
        for tokens in [1, 3, 17] {
            seed += 1;
            let w = random_matrix(format, big.0, big.1, seed, true);
            let what = format!("{kernel:?} {} {}x{} tokens={tokens}", format.name(), big.0, big.1);
            worst = worst.max(run_and_check(kernel, &w, tokens, seed, &what));
        }
        eprintln!("{kernel:?} {:<16} worst relative error {worst:.2e}", format.name());
    }
}

#[test]
fn scalar_kernel_matches_reference_for_every_format() {
    grid(Kernel::Scalar);
}

#[test]
fn avx2_kernel_matches_reference_for_every_format() {
    if !Kernel::Avx2.is_supported() {
        eprintln!("skipped: this CPU has no AVX2+FMA+F16C");
        return;
    }
    grid(Kernel::Avx2);
}

#[test]
fn matmul_uses_the_best_kernel_and_matches_reference() {
    assert!(Kernel::available().contains(&Kernel::best()));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        assert_eq!(Kernel::best(), Kernel::Avx2);
    }
    for (i, format) in FORMATS.into_iter().enumerate() {
        let w = random_matrix(format, 65, 256, i as u64, false);
        for tokens in [1, 3, 17] {
            let x = random_x(tokens * w.cols, i as u64);
            let mut out = vec![f32::NAN; tokens * w.rows];
            matmul(&w, &x, tokens, &mut out);
            check(&w, &x, tokens, &out, &format!("matmul {}", format.name()));
        }
    }
}

#[test]
fn kernels_agree_on_row_slices_of_shared_buffers() {
    // `Matrix::rows` windows start mid-buffer: codes, scales and biases all at offsets.
    for format in FORMATS {
        let w = random_matrix(format, 99, 512, 3, true).rows(13..86);
        for kernel in Kernel::available() {
            for tokens in [1, 3, 17] {
                run_and_check(kernel, &w, tokens, 4, &format!("{kernel:?} {} rows 13..86", format.name()));
            }
        }
    }
}

#[test]
fn quantized_matrices_from_moe_core_match_reference() {
    // Realistic codes: quantise smooth f32 weights with moe-core's MLX-style quantiser.
    let (rows, cols) = (37, 768);
    let values: Vec<f32> = (0..rows * cols).map(|i| ((i as f32) * 0.37).sin() * 0.05).collect();
    for bits in [2, 4, 8] {
        for group in [32, 64] {
            let w = moe_core::quant::quantize(&values, rows, cols, bits, group);
            for kernel in Kernel::available() {
                for tokens in [1, 3, 17] {
                    run_and_check(kernel, &w, tokens, 9, &format!("{kernel:?} quantised q{bits} g{group}"));
                }
            }
        }
    }
}

#[test]
fn empty_calls_leave_output_untouched() {
    let w = random_matrix(WeightFormat::Affine { bits: 4, group: 64 }, 5, 128, 1, false);
    for kernel in Kernel::available() {
        let mut out = vec![7.0; 5];
        matmul_with(kernel, &w, &[], 0, &mut out);
        assert_eq!(out, vec![7.0; 5]);
    }
}

#[test]
#[should_panic(expected = "buffers too small")]
fn short_output_is_rejected() {
    let w = random_matrix(WeightFormat::Float(DType::BF16), 5, 16, 1, false);
    matmul(&w, &[0.0; 32], 2, &mut [0.0; 9]);
}

fn format_strategy() -> impl Strategy<Value = WeightFormat> {
    prop::sample::select(FORMATS.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_shapes_match_reference(
        format in format_strategy(),
        rows in 1usize..80,
        units in 1usize..12,
        tokens in 1usize..20,
        misalign in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let cols = match format {
            WeightFormat::Float(_) => units * 13,
            WeightFormat::Affine { group, .. } => units * group,
        };
        let w = random_matrix(format, rows, cols, seed, misalign);
        for kernel in Kernel::available() {
            run_and_check(kernel, &w, tokens, seed, &format!("{kernel:?} {} {rows}x{cols} tokens={tokens}", format.name()));
        }
    }
}
