//! Device-memory throughput of the decode kernels, in GB/s of weight bytes read, next to the
//! device's measured copy bandwidth: the one-token matvec on the Qwen3.5-397B dense shapes (q8 and
//! bf16) and the output head, and one layer's fused routed experts (10 of 512 q4 experts, gate/up
//! then down). Each matrix is cycled through enough copies (>= 1 GiB) that every launch reads
//! device memory, not the 50 MB L2 cache.
//!
//! `cargo run --release -p moe-cuda --example kernel_bench` (needs a GPU).

use moe_core::HostMemory;
use moe_core::format::f32_to_bf16_bits;
use moe_core::{Bytes, DType, Matrix, WeightFormat};
use moe_cuda::{DeviceMatrix, Gpu, MoeExperts, MoeShape, expert_parts, part_offsets};
use std::time::Instant;

fn matrix(format: WeightFormat, rows: usize, cols: usize, seed: u32) -> Matrix {
    let bytes = |n: usize, salt: u32| -> Vec<u8> {
        (0..n).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed ^ salt) >> 13) as u8).collect()
    };
    match format {
        WeightFormat::Float(d) => Matrix::float(d, rows, cols, Bytes::from_vec(bytes(rows * cols * d.size(), 1))),
        WeightFormat::Affine { bits, group } => {
            let groups = rows * cols / group;
            let bf = |v: f32| -> Vec<u8> { (0..groups).flat_map(|_| f32_to_bf16_bits(v).to_le_bytes()).collect() };
            Matrix {
                format,
                rows,
                cols,
                data: Bytes::from_vec(bytes(rows * cols * bits as usize / 8, 2)),
                scales: Bytes::from_vec(bf(0.01)),
                biases: Bytes::from_vec(bf(-0.05)),
            }
        }
    }
}

/// Seconds per call of `f(i)` over `calls` calls, after a warm-up, synchronised at both ends.
fn time(gpu: &Gpu, calls: usize, mut f: impl FnMut(usize)) -> f64 {
    for i in 0..calls.min(8) {
        f(i);
    }
    gpu.synchronize().unwrap();
    let t = Instant::now();
    for i in 0..calls {
        f(i);
    }
    gpu.synchronize().unwrap();
    t.elapsed().as_secs_f64() / calls as f64
}

fn main() {
    let gpu = Gpu::new(0).expect("a CUDA GPU");
    let bw = gpu.bandwidth(1.0).unwrap();
    println!(
        "{}: device copy {:.0} GB/s, pinned host to device {:.1} GB/s",
        gpu.describe(),
        bw.device,
        bw.host_to_device
    );
    // What one launch costs the host: a one-element kernel, back to back.
    let (mut a, b) = (gpu.zeros(1).unwrap(), gpu.zeros(1).unwrap());
    let t = time(&gpu, 20000, |_| gpu.add(&mut a, &b, 1).unwrap());
    println!("launch       one-element kernel back to back: {:.2} us each", t * 1e6);
    let q8 = WeightFormat::Affine { bits: 8, group: 64 };
    let q4 = WeightFormat::Affine { bits: 4, group: 64 };
    let bf16 = WeightFormat::Float(DType::BF16);
    let shapes = [
        ("deltanet in_proj_qkv", q8, 12288, 4096),
        ("deltanet out_proj", q8, 4096, 8192),
        ("shared expert gate", q8, 1024, 4096),
        ("router", q8, 512, 4096),
        ("output head", q8, 248320, 4096),
        ("deltanet in_proj_qkv", bf16, 12288, 4096),
        ("expert gate", q4, 1024, 4096),
    ];
    for (name, format, rows, cols) in shapes {
        let m = matrix(format, rows, cols, 7);
        let copies = ((1usize << 30) / m.byte_len()).clamp(1, 64);
        let ws: Vec<DeviceMatrix> = (0..copies).map(|_| gpu.matrix(&m).unwrap()).collect();
        let x = gpu.upload(&vec![0.5f32; cols]).unwrap();
        let mut out = gpu.zeros(rows).unwrap();
        let calls = (200 * copies).clamp(50, 2000);
        let t = time(&gpu, calls, |i| gpu.matmul(&ws[i % copies], &x, 1, &mut out).unwrap());
        let gbs = m.byte_len() as f64 / t / 1e9;
        println!(
            "matvec {name:22} {:5} {rows:6}x{cols:5}: {:8.1} us  {gbs:7.0} GB/s  {:4.0}% of copy bandwidth",
            format.name(),
            t * 1e6,
            100.0 * gbs / bw.device
        );
    }
    // One layer of routed experts: 10 of 512 (q4, 4096 x 1024), laid out as the GPU tier lays
    // them out (gate, up, down in one buffer each) by uploading through the tier.
    let (hidden, inter, experts, k) = (4096, 1024, 512, 10);
    let tier = gpu.expert_tier(moe_cuda::VramBudget::Bytes(1 << 40)).unwrap();
    let parts = [matrix(q4, inter, hidden, 1), matrix(q4, inter, hidden, 2), matrix(q4, hidden, inter, 3)];
    let handles: Vec<_> = (0..experts).map(|e| tier.upload(0, e, [&parts[0], &parts[1], &parts[2]]).unwrap()).collect();
    let bytes: usize = parts.iter().map(Matrix::byte_len).sum();
    let x = gpu.upload(&vec![0.5f32; hidden]).unwrap();
    let weights = gpu.upload(&[0.1f32; 16]).unwrap();
    let h = std::cell::RefCell::new(gpu.zeros(k * inter).unwrap());
    let out = std::cell::RefCell::new(gpu.zeros(hidden).unwrap());
    let shape = MoeShape::of_host(&[&parts[0], &parts[1], &parts[2]]).unwrap();
    let in_gpu: Vec<[u64; 9]> = handles.iter().map(|h| expert_parts(&gpu, &h.matrices())).collect();
    let fused = |what: &str, calls: usize, sets: &[MoeExperts]| {
        let t = time(&gpu, calls, |i| {
            gpu.moe_token(
                &shape,
                sets[i % sets.len()],
                1,
                &x,
                &weights,
                false,
                &mut h.borrow_mut(),
                None,
                &mut out.borrow_mut(),
            )
            .unwrap()
        });
        let gbs = (k * bytes) as f64 / t / 1e9;
        println!(
            "fused experts {k} x q4 {inter}x{hidden} (gate, up, down), {what}: {:8.1} us  {gbs:7.1} GB/s",
            t * 1e6
        );
        gbs
    };
    // Sets of k distinct experts, cycled so that each launch reads device memory.
    let g = fused("listed", 2000, &in_gpu.chunks_exact(k).map(MoeExperts::Listed).collect::<Vec<_>>());
    println!("{:>62}{:4.0}% of copy bandwidth", "", 100.0 * g / bw.device);
    // As decoding with every expert in GPU memory does: chosen on the device, through the
    // layer's address table.
    let (_, off) = part_offsets(in_gpu[0]);
    let table = gpu.upload_ints(&in_gpu.iter().map(|p| p[0]).collect::<Vec<_>>()).unwrap();
    let id_sets: Vec<_> = (0..experts / k)
        .map(|s| gpu.upload_ints(&(0..k).map(|j| (s * k + j) as i32).collect::<Vec<_>>()).unwrap())
        .collect();
    let by_table: Vec<_> =
        id_sets.iter().map(|ids| MoeExperts::Table { table: &table, ids, slots: k, off, resident: true }).collect();
    let g = fused("by table", 2000, &by_table);
    println!("{:>62}{:4.0}% of copy bandwidth", "", 100.0 * g / bw.device);
    // The same experts read by the kernels straight from page-locked host memory, over the bus:
    // how the tier streams experts it does not keep (VRAM budget 0).
    let pool = gpu.pinned_pool();
    let mut held = Vec::new();
    let in_host: Vec<[u64; 9]> = (0..64)
        .map(|_| {
            let mut a = [0u64; 9];
            for (i, b) in parts.iter().flat_map(|m| [&m.data, &m.scales, &m.biases]).enumerate() {
                let p = pool.alloc(b.len()).expect("pinned memory");
                // SAFETY: `b.len()` writable bytes, just allocated.
                unsafe { p.as_ptr().copy_from_nonoverlapping(b.as_ptr(), b.len()) };
                a[i] = p.as_ptr() as u64;
                held.push((p, b.len()));
            }
            a
        })
        .collect();
    let g = fused("from pinned host memory", 200, &in_host.chunks_exact(k).map(MoeExperts::Listed).collect::<Vec<_>>());
    println!("{:>62}{:4.0}% of pinned host-to-device copies", "", 100.0 * g / bw.host_to_device);
    gpu.synchronize().unwrap();
    for (p, len) in held {
        // SAFETY: from `alloc(len)` above, no kernel reads it any more.
        unsafe { pool.free(p, len) };
    }
}
