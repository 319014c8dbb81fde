//! The CUDA implementation of [`Backend`]: f32 activations in device memory (`CudaSlice<f32>`),
//! weights uploaded once in their stored format (bf16/f16/f32 or affine q8/q4/q2) and
//! dequantised inside the kernels. Every operation is queued on one stream; `read` waits for it.
//!
//! Routed experts go through a GPU-memory tier ([`moe_cuda::ExpertTier`]): a byte budget of
//! uploaded experts (`--vram-budget`, `auto` = free device memory after the dense weights less
//! [`moe_cuda::VRAM_HEADROOM`]), least-used evicted first; a hit reads nothing from the expert
//! store and copies nothing, a miss is uploaded through pinned staging on a copy stream that the
//! compute stream waits on with an event. Budget 0 uploads every use.
//!
//! The trait's operations cannot fail, so a device error (out of memory, a faulting kernel) is
//! a panic that names the operation; opening the device is the fallible step.

use crate::backend::*;
use anyhow::Result;
use moe_core::Matrix;
use moe_cuda::{CudaSlice, DeviceMatrix, Gpu};
use moe_store::Budget;

pub use moe_cuda::Error as CudaError;
pub use moe_cuda::ExpertHandle;

pub struct CudaBackend {
    gpu: Gpu,
    tier: moe_cuda::ExpertTier,
}

impl CudaBackend {
    /// Opens GPU `ordinal` with an automatic VRAM budget for experts. Fails with a [`CudaError`]
    /// that says "no CUDA driver found (libcuda.so.1)" or "no GPU" on machines without one (see
    /// [`CudaError::is_unavailable`]), or carries the NVRTC log if the kernels do not compile.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_vram_budget(ordinal, Budget::Auto)
    }

    /// [`new`](Self::new) with `budget` bytes of device memory for routed experts (`auto`: what
    /// is free once the dense weights are loaded, less 2 GiB; 0: upload every use).
    pub fn with_vram_budget(ordinal: usize, budget: Budget) -> Result<Self> {
        let gpu = Gpu::new(ordinal)?;
        let tier = gpu.expert_tier(vram_budget(budget))?;
        Ok(CudaBackend { gpu, tier })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Changes the VRAM budget for experts (evicting what no longer fits); `auto` resolves now.
    pub fn set_vram_budget(&self, budget: Budget) -> Result<()> {
        Ok(self.tier.set_budget(vram_budget(budget))?)
    }

    /// The VRAM tier's hits, misses, bytes uploaded and residents.
    pub fn vram_stats(&self) -> ExpertTierStats {
        self.tier.stats()
    }

    pub fn reset_vram_stats(&self) {
        self.tier.reset_stats()
    }
}

fn vram_budget(b: Budget) -> moe_cuda::VramBudget {
    match b {
        Budget::Auto => moe_cuda::VramBudget::Auto,
        Budget::Bytes(n) => moe_cuda::VramBudget::Bytes(n),
    }
}

impl ExpertMatrices<DeviceMatrix> for ExpertHandle {
    fn matrices(&self) -> [&DeviceMatrix; 3] {
        ExpertHandle::matrices(self)
    }
}

/// Unwraps a device result inside an infallible trait method.
fn ok<T>(r: moe_cuda::Result<T>, op: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {op}: {e}"))
}

impl Backend for CudaBackend {
    type Tensor = CudaSlice<f32>;
    type Weight = DeviceMatrix;
    type ExpertWeights = ExpertHandle;

    fn name(&self) -> String {
        let s = self.tier.stats();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let budget = match (self.tier.requested_budget(), s.budget) {
            (moe_cuda::VramBudget::Auto, None) => "auto".to_string(),
            (moe_cuda::VramBudget::Auto, Some(b)) => format!("auto = {:.2} GiB", gib(b)),
            (moe_cuda::VramBudget::Bytes(b), _) => format!("{:.2} GiB", gib(b)),
        };
        format!(
            "cuda ({}; VRAM experts {budget}: {} resident, {:.2} GiB, {} hits, {} misses, {:.2} GiB uploaded)",
            self.gpu.describe(),
            s.resident_experts,
            gib(s.resident_bytes),
            s.hits,
            s.misses,
            gib(s.bytes_uploaded)
        )
    }

    fn weight(&self, m: &Matrix) -> Result<DeviceMatrix> {
        Ok(self.gpu.matrix(m)?)
    }

    fn expert_weights<F>(&self, layer: usize, id: usize, fetch: F) -> Result<ExpertHandle>
    where
        F: FnOnce() -> Result<moe_store::Expert>,
    {
        if let Some(h) = self.tier.lookup(layer, id) {
            return Ok(h);
        }
        let e = fetch()?;
        Ok(self.tier.upload(layer, id, [&e.gate, &e.up, &e.down])?)
    }

    fn has_expert(&self, layer: usize, id: usize) -> bool {
        self.tier.contains(layer, id)
    }

    fn expert_tier_stats(&self) -> Option<ExpertTierStats> {
        Some(self.tier.stats())
    }

    fn device_bandwidth(&self, seconds: f64) -> Option<(f64, f64)> {
        self.gpu.bandwidth(seconds).ok().map(|b| (b.device, b.host_to_device))
    }

    fn tensor(&self, values: &[f32]) -> CudaSlice<f32> {
        ok(self.gpu.upload(values), "upload")
    }

    fn zeros(&self, len: usize) -> CudaSlice<f32> {
        ok(self.gpu.zeros(len), "allocation")
    }

    fn read(&self, t: &CudaSlice<f32>, len: usize) -> Vec<f32> {
        ok(self.gpu.download(t, len), "read")
    }

    fn resized(&self, t: &CudaSlice<f32>, keep: usize, len: usize) -> CudaSlice<f32> {
        ok(self.gpu.resized(t, keep, len), "resize")
    }

    fn embed(&self, table: &DeviceMatrix, tokens: &[u32], out: &mut CudaSlice<f32>) {
        ok(self.gpu.embed(table, tokens, out), "embed")
    }

    fn matmul(&self, w: &DeviceMatrix, x: &CudaSlice<f32>, tokens: usize, out: &mut CudaSlice<f32>) {
        ok(self.gpu.matmul(w, x, tokens, out), "matmul")
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        offset: f32,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) {
        ok(self.gpu.rms_norm(x, w, offset, eps, rows, out), "rms_norm")
    }

    fn add(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) {
        ok(self.gpu.add(acc, x, len), "add")
    }

    fn select_columns(&self, x: &CudaSlice<f32>, width: usize, cols: &[u32], tokens: usize, out: &mut CudaSlice<f32>) {
        ok(self.gpu.select_columns(x, width, cols, tokens, out), "select_columns")
    }

    fn attention(
        &self,
        s: &AttentionShape,
        q_norm: &CudaSlice<f32>,
        k_norm: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut KvCache<Self>,
        past: usize,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) {
        assert!(
            past + tokens <= cache.capacity,
            "attention: {} positions exceed the cache's {}",
            past + tokens,
            cache.capacity
        );
        let r = self.gpu.attention(s, q_norm, k_norm, q, k, v, &mut cache.k, &mut cache.v, past, tokens, out);
        ok(r, "attention")
    }

    fn delta_net(
        &self,
        s: &DeltaNetShape,
        params: &DeltaNetParams<'_, Self>,
        inputs: &DeltaNetInputs<'_, Self>,
        state: &mut DeltaNetState<Self>,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) {
        let r = self.gpu.delta_net(
            s,
            params.conv,
            params.a_log,
            params.dt_bias,
            params.norm,
            inputs.qkv,
            inputs.z,
            inputs.b,
            inputs.a,
            &mut state.conv,
            &mut state.ssm,
            tokens,
            out,
        );
        ok(r, "delta_net")
    }

    fn expert_ffn(
        &self,
        gate: &DeviceMatrix,
        up: &DeviceMatrix,
        down: &DeviceMatrix,
        x: &CudaSlice<f32>,
        rows: &[u32],
        scales: &[f32],
        acc: &mut CudaSlice<f32>,
    ) {
        ok(self.gpu.expert_ffn(gate, up, down, x, rows, scales, acc), "expert_ffn")
    }
}
