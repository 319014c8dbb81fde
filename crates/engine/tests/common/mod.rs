//! Helpers shared by the engine's integration tests: the fixtures and their `transformers`
//! references, error measures, a seeded generator, and the GPU (or a clear skip without one).
#![allow(dead_code)] // each test binary uses its own subset

use moe_core::format::f32_to_bf16_bits;
use moe_core::{Bytes, HostMemory, Matrix, WeightFormat};
use moe_cuda::PinnedPool;
use moe_engine::cuda_backend::{CudaBackend, CudaError};
use moe_store::Budget;
use safetensors::SafeTensors;
use std::io::Write;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;

/// The GPU backend, or `None` after printing "SKIPPED <test>: no CUDA device" straight to stderr
/// (past the harness's capture, so CI logs show it). With `FLASH_MOE_REQUIRE_CUDA=1` a missing
/// device fails the test instead.
pub fn gpu(test: &str, budget: Budget) -> Option<CudaBackend> {
    match CudaBackend::with_vram_budget(0, budget) {
        Ok(b) => Some(b),
        Err(e) => {
            let unavailable = e.downcast_ref::<CudaError>().is_some_and(|c| c.is_unavailable());
            if unavailable && std::env::var_os("FLASH_MOE_REQUIRE_CUDA").is_none() {
                let _ = writeln!(std::io::stderr(), "SKIPPED {test}: no CUDA device ({e})");
                None
            } else {
                panic!("{test}: the CUDA backend failed to open: {e:#}");
            }
        }
    }
}

/// `tests/fixtures`: from `FLASH_MOE_FIXTURES`, else beside this crate's source, else under the
/// working directory (test binaries carried to another machine).
pub fn fixture(name: &str) -> PathBuf {
    let root = match std::env::var_os("FLASH_MOE_FIXTURES").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => {
            let here = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
            if here.is_dir() { here } else { PathBuf::from("tests/fixtures") }
        }
    };
    let dir = root.join(name);
    assert!(dir.join("config.json").is_file(), "fixture {} is missing", dir.display());
    dir
}

/// The reference `transformers` computed for a fixture (f32 forward of its bf16 weights).
pub struct Reference {
    pub ids: Vec<u32>,
    /// `[tokens, vocab]`.
    pub logits: Vec<f32>,
    /// `[layers + 1, tokens, hidden]`: embeddings, the residual after each layer, and (last)
    /// the output of the final norm.
    pub hidden: Vec<f32>,
}

pub fn reference(name: &str) -> Reference {
    let bytes = std::fs::read(fixture(name).join("reference.safetensors")).expect("reference.safetensors");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n).unwrap().data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    };
    let ids = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect();
    Reference { ids, logits: f32s("logits"), hidden: f32s("hidden_states") }
}

pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Index of the largest value, ties to the lowest index.
pub fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0))).unwrap().0
}

/// Top-1 agreement of two `[positions, vocab]` logit arrays.
pub fn top1_agreement(a: &[f32], b: &[f32], vocab: usize) -> usize {
    a.chunks(vocab).zip(b.chunks(vocab)).filter(|(x, y)| argmax(x) == argmax(y)).count()
}

/// A small seeded generator (an LCG) for random test data.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 32) as u32
    }
    /// Uniform in [-1, 1).
    pub fn f(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

/// A random q4 matrix (random codes, scales and biases).
pub fn q4(rng: &mut Rng, rows: usize, cols: usize) -> Matrix {
    let data: Vec<u8> = (0..rows * cols / 8).flat_map(|_| rng.next_u32().to_le_bytes()).collect();
    let groups = rows * cols / 64;
    let scales: Vec<u8> =
        (0..groups).flat_map(|_| f32_to_bf16_bits((0.2 + rng.f().abs()) / 15.0).to_le_bytes()).collect();
    let biases: Vec<u8> = (0..groups).flat_map(|_| f32_to_bf16_bits(-0.1 + 0.05 * rng.f()).to_le_bytes()).collect();
    Matrix {
        format: WeightFormat::Affine { bits: 4, group: 64 },
        rows,
        cols,
        data: Bytes::from_vec(data),
        scales: Bytes::from_vec(scales),
        biases: Bytes::from_vec(biases),
    }
}

/// Owns a buffer of the pool, as the expert store's buffers do.
pub struct Pinned {
    pool: Arc<PinnedPool>,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an owned allocation, written once before it is shared.
unsafe impl Send for Pinned {}
// SAFETY: as above.
unsafe impl Sync for Pinned {}

impl AsRef<[u8]> for Pinned {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `len` initialised bytes (written in `pinned`).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: from `alloc(len)`, dropped once.
        unsafe { self.pool.free(self.ptr, self.len) }
    }
}

/// `bytes` copied into the pool.
pub fn pinned(pool: &Arc<PinnedPool>, bytes: &Bytes) -> Bytes {
    if bytes.is_empty() {
        return Bytes::empty();
    }
    // Whole pages: the driver hands out smaller page-locked blocks unaligned, which the pool refuses.
    let len = bytes.len().next_multiple_of(4096);
    let ptr = pool.alloc(len).expect("pinned memory");
    // SAFETY: `len` writable bytes, just allocated; all of them written here.
    unsafe {
        ptr.as_ptr().copy_from_nonoverlapping(bytes.as_ptr(), bytes.len());
        ptr.as_ptr().add(bytes.len()).write_bytes(0, len - bytes.len());
    }
    Bytes::new(Arc::new(Pinned { pool: pool.clone(), ptr, len }), 0..bytes.len())
}

/// An expert copied into one pinned block, its nine parts at offsets that depend only on their
/// sizes (as the store's reads lay them out), so that experts of one shape share a layout.
pub fn pinned_expert(pool: &Arc<PinnedPool>, e: &moe_store::Expert) -> moe_store::Expert {
    let mats = [&e.gate, &e.up, &e.down];
    let parts: Vec<&Bytes> = mats.iter().flat_map(|m| [&m.data, &m.scales, &m.biases]).collect();
    let mut at = Vec::new();
    let mut block = Vec::new();
    for p in &parts {
        at.push(block.len());
        block.extend_from_slice(p);
        block.resize(block.len().next_multiple_of(256), 0);
    }
    let block = pinned(pool, &Bytes::from_vec(block));
    let part = |i: usize| if parts[i].is_empty() { Bytes::empty() } else { block.slice(at[i]..at[i] + parts[i].len()) };
    let matrix =
        |j: usize| Matrix { data: part(3 * j), scales: part(3 * j + 1), biases: part(3 * j + 2), ..mats[j].clone() };
    moe_store::Expert { gate: matrix(0), up: matrix(1), down: matrix(2) }
}

pub fn pinned_matrix(pool: &Arc<PinnedPool>, m: &Matrix) -> Matrix {
    Matrix {
        data: pinned(pool, &m.data),
        scales: pinned(pool, &m.scales),
        biases: pinned(pool, &m.biases),
        ..m.clone()
    }
}
