//! Throughput of `moe_cpu::matmul` in GB/s of weight bytes, for the Qwen3.5-397B expert shapes
//! (gate/up 1024x4096, down 4096x1024), every weight format and every kernel this CPU runs;
//! then GFLOP/s of the prefill path (1024x4096, several token counts).
//!
//! `cargo run --release -p moe-cpu --example matvec_bench [-- --quick] [--simd] [--only q4]`
//! (`--quick`: q4 and bf16 only, shorter runs; `--simd`: skip the scalar kernel; `--only NAME`:
//! formats whose name starts with NAME). `RAYON_NUM_THREADS` sets "all threads".
//!
//! "hot" runs the same matrix again and again (it stays in cache); "cold" cycles through enough
//! copies (>= 256 MB) that every call reads its weights from DRAM, which is what decode sees
//! once the expert set no longer fits in the last-level cache. Each cell gives the best and the
//! median call: on a shared machine the best is the better estimate of what the code can do.

use moe_core::format::{WeightFormat, f32_to_bf16_bits};
use moe_core::{Bytes, DType, Matrix};
use moe_cpu::Kernel;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *seed >> 16
}

fn random_bytes(n: usize, seed: &mut u64) -> Vec<u8> {
    (0..n).map(|_| lcg(seed) as u8).collect()
}

fn bf16_values(n: usize, scale: f32, seed: &mut u64) -> Vec<u8> {
    (0..n)
        .flat_map(|_| {
            let v = ((lcg(seed) % 2001) as f32 / 1000.0 - 1.0) * scale;
            f32_to_bf16_bits(v).to_le_bytes()
        })
        .collect()
}

fn matrix(format: WeightFormat, rows: usize, cols: usize, seed: &mut u64) -> Matrix {
    match format {
        WeightFormat::Float(DType::BF16) => {
            Matrix::float(DType::BF16, rows, cols, Bytes::from_vec(bf16_values(rows * cols, 0.1, seed)))
        }
        WeightFormat::Float(DType::F16) => {
            let bytes = (0..rows * cols)
                // Normal f16 bit patterns of magnitude 2^-10 .. 2^-4, either sign.
                .flat_map(|_| {
                    let h = lcg(seed);
                    ((((h >> 20) & 1) << 15 | (5 + (h >> 10) % 6) << 10 | (h & 0x3ff)) as u16).to_le_bytes()
                })
                .collect();
            Matrix::float(DType::F16, rows, cols, Bytes::from_vec(bytes))
        }
        WeightFormat::Float(DType::F32) => {
            let vals: Vec<f32> = (0..rows * cols).map(|_| (lcg(seed) % 2001) as f32 / 10000.0 - 0.1).collect();
            Matrix::from_f32(rows, cols, &vals)
        }
        WeightFormat::Affine { bits, group } => Matrix {
            format,
            rows,
            cols,
            data: Bytes::from_vec(random_bytes(rows * cols * bits as usize / 8, seed)),
            scales: Bytes::from_vec(bf16_values(rows * cols / group, 0.01, seed)),
            biases: Bytes::from_vec(bf16_values(rows * cols / group, 0.05, seed)),
        },
    }
}

/// Runs `f` repeatedly for about `budget`; returns the fastest and the median seconds per call.
/// The minimum is the better estimate on a shared machine (other jobs only ever add time).
fn time(budget: Duration, mut f: impl FnMut()) -> (f64, f64) {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while start.elapsed() < budget || times.len() < 5 {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    (times[0], times[times.len() / 2])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only NAME`: formats whose name starts with NAME; `--simd`: skip the scalar kernel.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let simd_only = args.iter().any(|a| a == "--simd");
    let budget = Duration::from_millis(if quick { 300 } else { 1000 });
    let threads = moe_cpu::threads();
    let mut kernels = Kernel::available();
    if simd_only {
        kernels.retain(|k| *k != Kernel::Scalar);
    }
    println!("rayon threads: {threads}; kernels: {kernels:?}; best: {:?}", Kernel::best());

    // DRAM read bandwidth as the roofline: sum 256 MB of u64 on all threads.
    {
        use rayon::prelude::*;
        let big = vec![1u64; 32 << 20];
        let (secs, _) = time(budget, || {
            black_box(big.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, b| a ^ b)).reduce(|| 0, |a, b| a ^ b));
        });
        println!("reference: DRAM read (xor 256 MB, {threads} threads): {:.1} GB/s", 256e6 * 1.048576 / secs / 1e9);
    }

    let shapes = [(1024, 4096), (4096, 1024)];
    let formats = [
        WeightFormat::Affine { bits: 4, group: 64 },
        WeightFormat::Float(DType::BF16),
        WeightFormat::Affine { bits: 8, group: 64 },
        WeightFormat::Affine { bits: 2, group: 64 },
        WeightFormat::Affine { bits: 4, group: 32 },
        WeightFormat::Float(DType::F16),
        WeightFormat::Float(DType::F32),
    ];
    let formats: Vec<WeightFormat> = formats
        .into_iter()
        .take(if quick { 2 } else { formats.len() })
        .filter(|f| only.as_ref().is_none_or(|o| f.name().starts_with(o.as_str())))
        .collect();
    let mut seed = 1;
    println!("\ntokens=1 (decode), GB/s of weight bytes: best and median call (µs of the best call)");
    println!(
        "{:<16} {:<9} {:<8} {:>21} {:>21} {:>21}",
        "format", "shape", "kernel", "hot 1 thread", "hot all threads", "cold all threads"
    );
    for format in &formats {
        for &(rows, cols) in &shapes {
            let one = matrix(*format, rows, cols, &mut seed);
            let bytes = one.byte_len();
            let copies = (256 << 20) / bytes + 1;
            let many: Vec<Matrix> = (0..copies).map(|_| matrix(*format, rows, cols, &mut seed)).collect();
            let x: Vec<f32> = (0..cols).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let mut out = vec![0.0; rows];
            for &k in &kernels {
                let single = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                let hot1 = single.install(|| time(budget, || moe_cpu::matmul_with(k, &one, &x, 1, &mut out)));
                let hot = time(budget, || moe_cpu::matmul_with(k, &one, &x, 1, &mut out));
                let mut i = 0;
                let cold = time(budget, || {
                    moe_cpu::matmul_with(k, &many[i % copies], &x, 1, &mut out);
                    i += 1;
                });
                let cell = |(best, median): (f64, f64)| {
                    format!(
                        "{:6.2} {:6.2} ({:6.0})",
                        bytes as f64 / best / 1e9,
                        bytes as f64 / median / 1e9,
                        best * 1e6
                    )
                };
                println!(
                    "{:<16} {:<9} {:<8} {:>21} {:>21} {:>21}",
                    format.name(),
                    format!("{rows}x{cols}"),
                    format!("{k:?}"),
                    cell(hot1),
                    cell(hot),
                    cell(cold)
                );
            }
            black_box(&out);
        }
    }

    println!("\ntokens>1 (prefill), all threads, hot: GFLOP/s of the best and median call (ms of the best)");
    let token_counts: &[usize] = if quick { &[3, 17] } else { &[2, 3, 4, 5, 8, 17, 128] };
    for format in &formats {
        let (rows, cols) = (1024, 4096);
        let m = matrix(*format, rows, cols, &mut seed);
        for &tokens in token_counts {
            let x: Vec<f32> = (0..tokens * cols).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let mut out = vec![0.0; tokens * rows];
            for &k in &kernels {
                let (best, median) = time(budget, || moe_cpu::matmul_with(k, &m, &x, tokens, &mut out));
                let flops = 2.0 * (rows * cols * tokens) as f64;
                println!(
                    "{:<16} {rows}x{cols} tokens={tokens:<4} {:<8} {:6.1} {:6.1} GFLOP/s ({:.3} ms)",
                    format.name(),
                    format!("{k:?}"),
                    flops / best / 1e9,
                    flops / median / 1e9,
                    best * 1e3
                );
            }
        }
    }
}
