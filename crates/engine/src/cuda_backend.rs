//! The CUDA implementation of [`Backend`]: f32 activations in device memory (`CudaSlice<f32>`),
//! weights uploaded once in their stored format (bf16/f16/f32 or affine q8/q4/q2) and
//! dequantised inside the kernels. Every operation is queued on one stream; `read` waits for it.
//!
//! The trait's operations cannot fail, so a device error (out of memory, a faulting kernel) is
//! a panic that names the operation; opening the device is the fallible step.

use crate::backend::*;
use anyhow::Result;
use moe_core::Matrix;
use moe_cuda::{AttentionParams, CudaSlice, DeltaNetParams as DeltaNetDims, DeviceMatrix, Gpu};

pub use moe_cuda::Error as CudaError;

pub struct CudaBackend {
    gpu: Gpu,
}

impl CudaBackend {
    /// Opens GPU `ordinal`. Fails with a [`CudaError`] that says "no CUDA driver found
    /// (libcuda.so.1)" or "no GPU" on machines without one (see [`CudaError::is_unavailable`]),
    /// or carries the NVRTC log if the kernels do not compile.
    pub fn new(ordinal: usize) -> Result<Self> {
        Ok(CudaBackend { gpu: Gpu::new(ordinal)? })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
}

/// Unwraps a device result inside an infallible trait method.
fn ok<T>(r: moe_cuda::Result<T>, op: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {op}: {e}"))
}

impl Backend for CudaBackend {
    type Tensor = CudaSlice<f32>;
    type Weight = DeviceMatrix;

    fn name(&self) -> String {
        format!("cuda ({})", self.gpu.describe())
    }

    fn weight(&self, m: &Matrix) -> Result<DeviceMatrix> {
        Ok(self.gpu.matrix(m)?)
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
        let p = AttentionParams {
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.head_dim,
            rotary_dim: s.rotary_dim,
            rope_theta: s.rope_theta,
            gated: s.gated,
            norm_offset: s.norm_offset,
            eps: s.eps,
        };
        let r = self.gpu.attention(&p, q_norm, k_norm, q, k, v, &mut cache.k, &mut cache.v, past, tokens, out);
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
        let p = DeltaNetDims {
            k_heads: s.k_heads,
            v_heads: s.v_heads,
            k_dim: s.k_dim,
            v_dim: s.v_dim,
            conv_kernel: s.conv_kernel,
            eps: s.eps,
        };
        let r = self.gpu.delta_net(
            &p,
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
