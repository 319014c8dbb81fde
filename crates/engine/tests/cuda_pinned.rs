//! Expert buffers in page-locked memory: the GPU's `PinnedPool` (one per GPU, buffers reused by
//! size, `contains`), uploads copied straight from it (the same device bytes as staged uploads,
//! the host bytes held until the copy is done), and a model whose expert store allocates there
//! computing the same logits as one on the heap.
//!
//! Without a GPU or CUDA driver each test prints "SKIPPED <test>: no CUDA device" to stderr
//! and returns; with `FLASH_MOE_REQUIRE_CUDA=1` a missing device fails instead.

mod common;

use common::{Rng, fixture, gpu, pinned_matrix, q4, rel_l2};
use moe_core::HostMemory;
use moe_cuda::{PinnedPool, VramBudget};
use moe_engine::backend::*;
use moe_engine::cuda_backend::CudaBackend;
use moe_engine::{CpuBackend, Model};
use moe_store::{Budget, Eviction, StoreOptions};
use std::sync::Arc;

#[test]
fn cuda_pinned_pool_reuses_buffers_and_knows_its_memory() {
    let Some(g) = gpu("cuda_pinned_pool_reuses_buffers_and_knows_its_memory", Budget::Bytes(0)) else { return };
    let pool = g.gpu().pinned_pool();
    assert!(Arc::ptr_eq(&pool, &g.gpu().pinned_pool()), "one pool per GPU");
    let before = pool.stats();
    let len = 7 << 20;
    let a = pool.alloc(len).unwrap();
    let p = a.as_ptr();
    assert_eq!(p as usize % 4096, 0);
    // SAFETY: `len` writable bytes, just allocated.
    unsafe { p.write_bytes(0xA5, len) };
    assert!(pool.contains(p, len) && pool.contains(p.wrapping_add(100), 1000) && pool.contains(p, 1));
    assert!(!pool.contains(p.wrapping_add(1), len) && !pool.contains(p.wrapping_sub(1), 2));
    let heap = [0u8; 64];
    assert!(!pool.contains(heap.as_ptr(), heap.len()));
    // SAFETY: from `alloc(len)`, not used again.
    unsafe { pool.free(a, len) };
    let b = pool.alloc(len).unwrap();
    assert_eq!(a, b, "a freed buffer of the same size is handed out again");
    let c = pool.alloc(len).unwrap();
    assert_ne!(b, c);
    let s = pool.stats();
    assert_eq!((s.total_bytes - before.total_bytes, s.free_bytes), (2 * len, before.free_bytes));
    // SAFETY: from `alloc(len)`, not used again.
    unsafe {
        pool.free(b, len);
        pool.free(c, len);
    }
    assert_eq!(pool.stats().free_bytes, before.free_bytes + 2 * len);
}

/// A random q4 expert (`inter x h` gate and up) on the heap, and a copy of it in the pool.
fn heap_and_pinned(
    pool: &Arc<PinnedPool>,
    rng: &mut Rng,
    h: usize,
    inter: usize,
) -> (moe_store::Expert, moe_store::Expert) {
    let heap = moe_store::Expert { gate: q4(rng, inter, h), up: q4(rng, inter, h), down: q4(rng, h, inter) };
    let pin = moe_store::Expert {
        gate: pinned_matrix(pool, &heap.gate),
        up: pinned_matrix(pool, &heap.up),
        down: pinned_matrix(pool, &heap.down),
    };
    (heap, pin)
}

#[test]
fn cuda_pinned_uploads_skip_staging_and_compute_the_same() {
    let test = "cuda_pinned_uploads_skip_staging_and_compute_the_same";
    let Some(g) = gpu(test, Budget::Bytes(0)) else { return };
    let pool = g.gpu().pinned_pool();
    let (h, inter) = (1024, 1536);
    let mut rng = Rng(11);
    let (heap, pin) = heap_and_pinned(&pool, &mut rng, h, inter);
    let tokens = 2;
    let x: Vec<f32> = (0..tokens * h).map(|_| rng.f()).collect();
    let xg = g.tensor(&x);
    let (rows, scales) = ([0u32, 1], [0.6f32, 0.3]);
    let mut want = vec![0.0; tokens * h];
    CpuBackend.expert_ffn(&heap.gate, &heap.up, &heap.down, &x, &rows, &scales, &mut want);

    for budget in [0, 1 << 30] {
        let tier = g.gpu().expert_tier(VramBudget::Bytes(budget)).unwrap();
        let mut outs = Vec::new();
        for (id, e) in [&heap, &pin].into_iter().enumerate() {
            let w = tier.upload(0, id, [&e.gate, &e.up, &e.down]).unwrap();
            assert_eq!(tier.direct_uploads(), id as u64, "budget {budget}: only the pinned expert skips staging");
            let [gw, uw, dw] = w.matrices();
            let mut acc = g.zeros(tokens * h);
            g.expert_ffn(gw, uw, dw, &xg, &rows, &scales, &mut acc);
            drop(w);
            outs.push(g.read(&acc, tokens * h));
        }
        assert_eq!(outs[0], outs[1], "budget {budget}: the direct upload computes other numbers than the staged one");
        let err = rel_l2(&outs[1], &want);
        assert!(err <= 1e-3, "budget {budget}: off the CPU by {err:.3e}");
    }

    // The tier holds the host bytes of a direct copy until a later upload finds it complete.
    let tier = g.gpu().expert_tier(VramBudget::Bytes(0)).unwrap();
    let free = pool.stats().free_bytes;
    drop(tier.upload(0, 1, [&pin.gate, &pin.up, &pin.down]).unwrap());
    let pinned_bytes = pin.byte_len();
    drop(pin);
    assert!(pool.stats().free_bytes < free + pinned_bytes, "host bytes given back while the copy may run");
    g.gpu().synchronize().unwrap();
    drop(tier.upload(0, 0, [&heap.gate, &heap.up, &heap.down]).unwrap());
    assert_eq!(pool.stats().free_bytes, free + pinned_bytes, "host bytes not given back after the copy");
}

/// Logits of a prefill of `n` tokens.
fn logits(model: &Model<CudaBackend>, n: usize) -> Vec<f32> {
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % model.config.vocab as u32).collect();
    model.forward(&mut model.new_session(), &ids, true, false).unwrap().logits
}

#[test]
fn cuda_pinned_store_gives_the_same_logits() {
    let test = "cuda_pinned_store_gives_the_same_logits";
    let dir = fixture("qwen35_moe");
    let opts = StoreOptions {
        ram_budget: Budget::Bytes(1 << 30),
        io_threads: 2,
        eviction: Eviction::Lfru,
        direct_io: false,
        host_memory: None,
    };
    let Some(g) = gpu(test, Budget::Bytes(0)) else { return };
    let heap = moe_engine::load_with(&dir, None, &opts, g).unwrap();
    let want = logits(&heap, 24);
    drop(heap);
    let Some(g) = gpu(test, Budget::Bytes(0)) else { return };
    let pool = g.gpu().pinned_pool();
    let opts = StoreOptions { host_memory: Some(pool.clone()), ..opts };
    let model = moe_engine::load_with(&dir, None, &opts, g).unwrap();
    let got = logits(&model, 24);
    assert_eq!(got, want, "logits differ with the expert store in pinned memory");
    let s = pool.stats();
    let resident = model.experts().stats().resident_bytes as usize;
    assert!(s.total_bytes >= resident && resident > 0, "{s:?}, {resident} bytes resident");
    println!("{test}: pool {s:?}; {}", model.backend().name());
}

/// Prints the rate of back-to-back uploads of a Qwen3.5-397B-sized q4 expert (6.75 MiB) with
/// budget 0, staged and straight from pinned memory, against the copy engine's pinned rate.
#[test]
fn cuda_pinned_upload_rate() {
    let test = "cuda_pinned_upload_rate";
    let Some(g) = gpu(test, Budget::Bytes(0)) else { return };
    let pool = g.gpu().pinned_pool();
    let (h, inter) = (4096, 1024);
    let mut rng = Rng(5);
    let (heap, pin) = heap_and_pinned(&pool, &mut rng, h, inter);
    let tier = g.gpu().expert_tier(VramBudget::Bytes(0)).unwrap();
    let h2d = g.gpu().bandwidth(0.5).unwrap().host_to_device;
    for (name, e) in [("staged", &heap), ("direct", &pin), ("staged", &heap), ("direct", &pin)] {
        let n = 64;
        g.gpu().synchronize().unwrap();
        let start = std::time::Instant::now();
        for i in 0..n {
            drop(tier.upload(0, i, [&e.gate, &e.up, &e.down]).unwrap());
        }
        let issued = start.elapsed().as_secs_f64();
        g.gpu().synchronize().unwrap();
        let s = start.elapsed().as_secs_f64();
        let gbps = (n * e.byte_len()) as f64 / s / 1e9;
        println!(
            "{test}: {name}: {n} uploads of {:.2} MiB in {:.2} ms ({:.1} us each to issue): {gbps:.1} GB/s, {:.0}% of the copy engine's {h2d:.1} GB/s",
            e.byte_len() as f64 / (1 << 20) as f64,
            s * 1e3,
            issued * 1e6 / n as f64,
            100.0 * gbps / h2d
        );
    }
}
