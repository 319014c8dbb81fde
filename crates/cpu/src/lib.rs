//! CPU kernels: matrix products over any stored weight format, parallel over rows with rayon.
//!
//! [`matmul`] picks the fastest [`Kernel`] the running CPU supports (AVX2+FMA+F16C on x86-64,
//! checked once with `is_x86_feature_detected!`) and falls back to portable scalar code
//! elsewhere, or for shapes the SIMD code does not cover. [`matmul_with`] runs a named kernel,
//! for tests and benchmarks.
//!
//! Activations and accumulation stay f32 throughout (no quantisation of activations), so
//! results match the reference to float rounding. Two paths, both parallel over row chunks:
//! - up to four tokens (decode, memory-bound): each weight row is streamed once, unpacked in
//!   registers and never written out. Affine rows use
//!   `sum_g scale_g * dot(codes_g, x_g) + bias_g * sum(x_g)`, with the per-group sums of `x`
//!   (and a reordering of `x` that makes unpacking a mask per code) computed once per call, so
//!   the inner loop is mask, convert, FMA.
//! - more tokens (prefill): four rows at a time are dequantised into an f32 scratch buffer
//!   (L1/L2) and multiplied with blocks of tokens by a 4x3 register-tiled micro-kernel.
//!
//! See `examples/matvec_bench.rs` for throughput.

mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use moe_core::{Matrix, WeightFormat};
use rayon::prelude::*;

/// An implementation of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Portable Rust: a dequantised row and an 8-lane dot product.
    Scalar,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    pub fn best() -> Kernel {
        if Kernel::Avx2.is_supported() { Kernel::Avx2 } else { Kernel::Scalar }
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Kernel> {
        [Kernel::Scalar, Kernel::Avx2].into_iter().filter(|k| k.is_supported()).collect()
    }

    /// Whether the running CPU has the instructions this kernel needs.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => {
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx2 => false,
        }
    }

    /// Whether this kernel has a specialised path for `w` (otherwise the scalar one runs).
    pub fn handles(self, w: &Matrix) -> bool {
        match self {
            Kernel::Scalar => true,
            Kernel::Avx2 => match w.format {
                WeightFormat::Float(_) => true,
                // Whole 256-bit blocks of codes either within one group or spanning whole groups.
                WeightFormat::Affine { bits, group } => {
                    matches!(bits, 2 | 4 | 8)
                        && group > 0
                        && group.is_multiple_of(32)
                        && w.cols.is_multiple_of(group)
                        && {
                            let block = 8 * 32 / bits as usize;
                            group.is_multiple_of(block) || block.is_multiple_of(group)
                        }
                }
            },
        }
    }
}

/// `out[t] = W x[t]` for `tokens` input rows: `x` is `[tokens, cols]`, `out` is `[tokens, rows]`.
/// Each weight row is read once per call (per block of tokens for long prompts).
pub fn matmul(w: &Matrix, x: &[f32], tokens: usize, out: &mut [f32]) {
    matmul_with(best_kernel(), w, x, tokens, out)
}

fn best_kernel() -> Kernel {
    static BEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *BEST.get_or_init(Kernel::best)
}

/// [`matmul`] with a chosen kernel. Panics if the CPU does not support it.
pub fn matmul_with(kernel: Kernel, w: &Matrix, x: &[f32], tokens: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows, w.cols);
    assert!(x.len() >= tokens * cols && out.len() >= tokens * rows, "matmul: buffers too small");
    assert!(kernel.is_supported(), "matmul: kernel {kernel:?} is not supported by this CPU");
    check_storage(w);
    if rows == 0 || tokens == 0 {
        return;
    }
    let kernel = if kernel.handles(w) { kernel } else { Kernel::Scalar };
    let x = &x[..tokens * cols];
    let prep = avx2_prepare(kernel, w, x, tokens);
    let run = |r0: usize, outs: &mut [&mut [f32]], buf: &mut Vec<f32>| match kernel {
        Kernel::Scalar => scalar::rows(w, x, r0, outs, buf),
        Kernel::Avx2 => avx2_rows(w, x, &prep, r0, outs, buf),
    };

    // Each task owns rows `r0..r0 + chunk` of every token's output: split each token's row once
    // per task so that tasks get disjoint `&mut` slices.
    let tasks = task_count(w, tokens);
    let chunk = rows.div_ceil(tasks).next_multiple_of(4).min(rows);
    let mut per_task: Vec<Vec<&mut [f32]>> = (0..rows.div_ceil(chunk)).map(|_| Vec::with_capacity(tokens)).collect();
    for token_out in out[..tokens * rows].chunks_exact_mut(rows) {
        for (task, part) in per_task.iter_mut().zip(token_out.chunks_mut(chunk)) {
            task.push(part);
        }
    }
    if per_task.len() == 1 {
        run(0, &mut per_task[0], &mut Vec::new());
    } else {
        per_task
            .into_par_iter()
            .enumerate()
            .for_each_init(Vec::new, |buf, (i, mut outs)| run(i * chunk, &mut outs, buf));
    }
}

#[cfg(target_arch = "x86_64")]
type Avx2Prep = Option<x86::Prepared>;
#[cfg(not(target_arch = "x86_64"))]
type Avx2Prep = Option<()>;

#[cfg(target_arch = "x86_64")]
fn avx2_prepare(kernel: Kernel, w: &Matrix, x: &[f32], tokens: usize) -> Avx2Prep {
    // SAFETY: `matmul_with` checked that the CPU supports the kernel.
    (kernel == Kernel::Avx2).then(|| unsafe { x86::prepare(w, x, tokens) })
}

#[cfg(target_arch = "x86_64")]
fn avx2_rows(w: &Matrix, x: &[f32], prep: &Avx2Prep, r0: usize, outs: &mut [&mut [f32]], buf: &mut Vec<f32>) {
    let prep = prep.as_ref().expect("prepared for AVX2");
    // SAFETY: `matmul_with` checked that the CPU supports the kernel and that `w` holds all of its
    // bytes, and `handles` checked the shape.
    unsafe { x86::rows(w, x, prep, r0, outs, buf) }
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_prepare(_: Kernel, _: &Matrix, _: &[f32], _: usize) -> Avx2Prep {
    None
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_rows(_: &Matrix, _: &[f32], _: &Avx2Prep, _: usize, _: &mut [&mut [f32]], _: &mut Vec<f32>) {
    unreachable!("no AVX2 off x86-64")
}

/// Panics unless `w`'s byte buffers hold all of its rows, so that kernels can read without checks.
fn check_storage(w: &Matrix) {
    let (rows, cols) = (w.rows, w.cols);
    match w.format {
        WeightFormat::Float(d) => assert!(w.data.len() >= rows * cols * d.size(), "matmul: weight bytes missing"),
        WeightFormat::Affine { bits, group } => {
            assert!(
                group > 0 && matches!(bits, 1..=8) && 32u32.is_multiple_of(bits),
                "matmul: unsupported {}",
                w.format.name()
            );
            assert!(cols.is_multiple_of(32 / bits as usize), "matmul: {cols} columns do not fill whole words");
            let groups = cols / group;
            assert!(w.data.len() >= rows * cols * bits as usize / 8, "matmul: weight codes missing");
            assert!(
                w.scales.len() >= rows * groups * 2 && w.biases.len() >= rows * groups * 2,
                "matmul: scales missing"
            );
        }
    }
}

/// Estimated single-thread time of the call in ns: the larger of streaming the weights at
/// ~12 GB/s and the FMAs at ~20 per ns (both about what the AVX2 kernels reach on one core).
fn estimated_ns(w: &Matrix, tokens: usize) -> usize {
    (w.byte_len() / 12).max(w.rows * w.cols * tokens / 20)
}

/// How many row chunks to split a call into. A rayon dispatch costs ~11-15 µs on the 2-core dev
/// box, so calls estimated under ~30 µs run on the calling thread; larger ones get at least one
/// chunk per thread and chunks of >= ~40 µs, with a few spare for work stealing.
fn task_count(w: &Matrix, tokens: usize) -> usize {
    let threads = rayon::current_num_threads();
    let ns = estimated_ns(w, tokens);
    if threads == 1 || ns < 30_000 || w.rows < 8 {
        return 1;
    }
    (ns / 40_000).clamp(threads, threads * 4).min(w.rows / 4)
}

/// Runs `f` on each of `n` disjoint chunks of `data` in parallel.
pub fn par_chunks<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    data.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
}

/// Number of worker threads kernels run on.
pub fn threads() -> usize {
    rayon::current_num_threads()
}
