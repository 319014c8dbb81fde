//! The CPU implementation of [`Backend`]: f32 activations in host memory, weights used in place
//! from their memory maps or read buffers, parallel with rayon.

use crate::backend::*;
use anyhow::Result;
use moe_core::{Matrix, ops};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Tensor = Vec<f32>;
    type Weight = Matrix;
    type ExpertWeights = [Matrix; 3];
    /// Nothing to record: the CPU has no launches to save.
    type Graph = std::convert::Infallible;

    fn name(&self) -> String {
        format!("cpu ({} threads)", moe_cpu::threads())
    }

    fn weight(&self, m: &Matrix) -> Result<Matrix> {
        Ok(m.clone())
    }

    fn expert_weights<F>(&self, _layer: usize, _id: usize, fetch: F) -> Result<[Matrix; 3]>
    where
        F: FnOnce() -> Result<moe_store::Expert>,
    {
        let e = fetch()?;
        Ok([e.gate, e.up, e.down])
    }

    fn tensor(&self, values: &[f32]) -> Vec<f32> {
        values.to_vec()
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn read(&self, t: &Vec<f32>, len: usize) -> Vec<f32> {
        t[..len].to_vec()
    }

    fn resized(&self, t: &Vec<f32>, keep: usize, len: usize) -> Vec<f32> {
        let mut out = vec![0.0; len];
        out[..keep].copy_from_slice(&t[..keep]);
        out
    }

    fn embed(&self, table: &Matrix, tokens: &[u32], out: &mut Vec<f32>) {
        let h = table.cols;
        for (row, &tok) in out.chunks_exact_mut(h).zip(tokens) {
            table.row_f32(tok as usize, row);
        }
    }

    fn matmul(&self, w: &Matrix, x: &Vec<f32>, tokens: usize, out: &mut Vec<f32>) {
        moe_cpu::matmul(w, x, tokens, out);
    }

    fn rms_norm(&self, x: &Vec<f32>, w: &Vec<f32>, offset: f32, eps: f32, rows: usize, out: &mut Vec<f32>) {
        let width = w.len();
        out[..rows * width]
            .par_chunks_mut(width)
            .zip(x[..rows * width].par_chunks(width))
            .for_each(|(o, x)| ops::rms_norm(x, w, offset, eps, o));
    }

    fn add(&self, acc: &mut Vec<f32>, x: &Vec<f32>, len: usize) {
        acc[..len].iter_mut().zip(&x[..len]).for_each(|(a, b)| *a += b);
    }

    fn attention(
        &self,
        s: &AttentionShape,
        q_norm: &Vec<f32>,
        k_norm: &Vec<f32>,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        cache: &mut KvCache<Self>,
        past: usize,
        tokens: usize,
        out: &mut Vec<f32>,
    ) {
        let (hd, kvw, qw) = (s.head_dim, s.kv_width(), s.q_width());
        let per_head = if s.gated { 2 * hd } else { hd };
        // New keys: norm, rotate, append; values go in unchanged.
        for t in 0..tokens {
            let dst = (past + t) * kvw;
            for h in 0..s.kv_heads {
                let src = &k[t * kvw + h * hd..t * kvw + (h + 1) * hd];
                let key = &mut cache.k[dst + h * hd..dst + (h + 1) * hd];
                ops::rms_norm(src, k_norm, s.norm_offset, s.eps, key);
                ops::rope(key, past + t, s.rotary_dim, s.rope_theta);
            }
            cache.v[dst..dst + kvw].copy_from_slice(&v[t * kvw..(t + 1) * kvw]);
        }
        let group = s.heads / s.kv_heads;
        let (keys, values) = (&cache.k, &cache.v);
        out[..tokens * s.out_width()].par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
            let (t, h) = (i / s.heads, i % s.heads);
            let qh = &q[t * qw + h * per_head..t * qw + h * per_head + hd];
            let mut query = vec![0.0; hd];
            ops::rms_norm(qh, q_norm, s.norm_offset, s.eps, &mut query);
            ops::rope(&mut query, past + t, s.rotary_dim, s.rope_theta);
            ops::attend(&query, keys, values, past + t + 1, kvw, (h / group) * hd, o);
            if s.gated {
                let gate = &q[t * qw + h * per_head + hd..t * qw + (h + 1) * per_head];
                o.iter_mut().zip(gate).for_each(|(o, g)| *o *= ops::sigmoid(*g));
            }
        });
    }

    fn delta_net(
        &self,
        s: &DeltaNetShape,
        p: &DeltaNetParams<'_, Self>,
        proj: &Vec<f32>,
        state: &mut DeltaNetState<Self>,
        tokens: usize,
        out: &mut Vec<f32>,
    ) {
        let (cw, kw, vw, kk) = (s.conv_width(), s.key_width(), s.value_width(), s.conv_kernel);
        let (pw, nv) = (s.proj_width(), s.v_heads);
        // Convolution over time, channel by channel; history is `[kernel - 1, channels]`.
        let mut mixed = vec![0.0; tokens * cw];
        let hist = &mut state.conv;
        for t in 0..tokens {
            ops::conv_step(hist, &proj[t * pw..t * pw + cw], p.conv, kk, &mut mixed[t * cw..(t + 1) * cw]);
        }
        // Normalise q and k once per token and key head.
        let scale = 1.0 / (s.k_dim as f32).sqrt();
        for t in 0..tokens {
            let row = &mut mixed[t * cw..t * cw + 2 * kw];
            for (i, head) in row.chunks_exact_mut(s.k_dim).enumerate() {
                ops::l2_norm(head);
                if i < s.k_heads {
                    head.iter_mut().for_each(|v| *v *= scale);
                }
            }
        }
        // Value heads are independent: each runs its own recurrence over all tokens.
        let ratio = s.v_heads / s.k_heads;
        let mut by_head = vec![0.0; s.v_heads * tokens * s.v_dim];
        by_head.par_chunks_mut(tokens * s.v_dim).zip(state.ssm.par_chunks_mut(s.k_dim * s.v_dim)).enumerate().for_each(
            |(h, (o, ssm))| {
                let kh = h / ratio;
                for t in 0..tokens {
                    let row = &mixed[t * cw..(t + 1) * cw];
                    let q = &row[kh * s.k_dim..(kh + 1) * s.k_dim];
                    let k = &row[kw + kh * s.k_dim..kw + (kh + 1) * s.k_dim];
                    let v = &row[2 * kw + h * s.v_dim..2 * kw + (h + 1) * s.v_dim];
                    let (z, ba) = proj[t * pw + cw..(t + 1) * pw].split_at(vw);
                    let beta = ops::sigmoid(ba[h]);
                    let g = -p.a_log[h].exp() * ops::softplus(ba[nv + h] + p.dt_bias[h]);
                    let oh = &mut o[t * s.v_dim..(t + 1) * s.v_dim];
                    ops::delta_step(ssm, q, k, v, beta, g, oh);
                    ops::gated_rms_norm(oh, &z[h * s.v_dim..(h + 1) * s.v_dim], p.norm, s.eps);
                }
            },
        );
        for h in 0..s.v_heads {
            for t in 0..tokens {
                out[t * vw + h * s.v_dim..t * vw + (h + 1) * s.v_dim]
                    .copy_from_slice(&by_head[(h * tokens + t) * s.v_dim..(h * tokens + t + 1) * s.v_dim]);
            }
        }
    }

    fn expert_ffn(
        &self,
        gate: &Matrix,
        up: &Matrix,
        down: &Matrix,
        x: &Vec<f32>,
        rows: &[u32],
        scales: &[f32],
        acc: &mut Vec<f32>,
    ) {
        let (h, inter, n) = (gate.cols, gate.rows, rows.len());
        let mut xs = vec![0.0; n * h];
        for (dst, &r) in xs.chunks_exact_mut(h).zip(rows) {
            dst.copy_from_slice(&x[r as usize * h..(r as usize + 1) * h]);
        }
        let (mut g, mut u, mut y) = (vec![0.0; n * inter], vec![0.0; n * inter], vec![0.0; n * h]);
        moe_cpu::matmul(gate, &xs, n, &mut g);
        moe_cpu::matmul(up, &xs, n, &mut u);
        ops::swiglu(&mut g, &u);
        moe_cpu::matmul(down, &g, n, &mut y);
        for ((&r, &s), y) in rows.iter().zip(scales).zip(y.chunks_exact(h)) {
            acc[r as usize * h..(r as usize + 1) * h].iter_mut().zip(y).for_each(|(a, y)| *a += s * y);
        }
    }
}
