//! The f32 reference math of every operation, written for clarity. Backends compose or
//! re-implement these; their tests compare against the functions here.

use crate::Matrix;

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// torch's softplus (beta 1, threshold 20).
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

/// `out = x / rms(x) * (offset + w)` over one row. `offset` is 1 for the zero-centred norms of
/// Qwen3.5 / Qwen3-Next and 0 for the plain ones.
pub fn rms_norm(x: &[f32], w: &[f32], offset: f32, eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * (offset + w);
    }
}

/// Gated RMSNorm of a DeltaNet head output: `rmsnorm(o) * w * silu(z)` (plain weight).
pub fn gated_rms_norm(o: &mut [f32], z: &[f32], w: &[f32], eps: f32) {
    let ms = o.iter().map(|v| v * v).sum::<f32>() / o.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, z), w) in o.iter_mut().zip(z).zip(w) {
        *o = *o * inv * w * silu(*z);
    }
}

/// `x * rsqrt(sum(x^2) + 1e-6)`, the q/k normalisation of GatedDeltaNet.
pub fn l2_norm(x: &mut [f32]) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

pub fn softmax(x: &mut [f32]) {
    let max = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

/// Rotary embedding of one head in place: NeoX half-split pairs `(i, i + rot/2)` over the first
/// `rot` dimensions; the rest pass through.
pub fn rope(x: &mut [f32], pos: usize, rot: usize, theta: f64) {
    let half = rot / 2;
    for i in 0..half {
        let inv_freq = 1.0 / theta.powf((2 * i) as f64 / rot as f64);
        let angle = pos as f64 * inv_freq as f32 as f64;
        let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
        let (a, b) = (x[i], x[i + half]);
        x[i] = a * cos - b * sin;
        x[i + half] = b * cos + a * sin;
    }
}

/// Softmax router: probabilities over all experts, the `k` largest (ties to the lower id, as
/// torch.topk), renormalised to sum 1 when `renormalise`.
pub fn route(logits: &[f32], k: usize, renormalise: bool) -> Vec<(usize, f32)> {
    let mut p = logits.to_vec();
    softmax(&mut p);
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let mut picked: Vec<(usize, f32)> = order[..k].iter().map(|&e| (e, p[e])).collect();
    if renormalise {
        let sum: f32 = picked.iter().map(|(_, w)| w).sum();
        picked.iter_mut().for_each(|(_, w)| *w /= sum);
    }
    picked
}

/// `out = W x` for one input vector.
pub fn matvec(w: &Matrix, x: &[f32], out: &mut [f32]) {
    let mut row = vec![0.0; w.cols];
    for (r, o) in out.iter_mut().enumerate().take(w.rows) {
        w.row_f32(r, &mut row);
        *o = dot(&row, x);
    }
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `silu(gate) * up`, elementwise, into `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    gate.iter_mut().zip(up).for_each(|(g, u)| *g = silu(*g) * u);
}

/// One query head attending over `n` cached positions (`keys`/`values` hold `n` rows of
/// `stride` floats; this head's slice starts at `offset`).
pub fn attend(q: &[f32], keys: &[f32], values: &[f32], n: usize, stride: usize, offset: usize, out: &mut [f32]) {
    let d = q.len();
    let scale = 1.0 / (d as f32).sqrt();
    let mut scores: Vec<f32> =
        (0..n).map(|j| dot(q, &keys[j * stride + offset..j * stride + offset + d]) * scale).collect();
    softmax(&mut scores);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (j, p) in scores.iter().enumerate() {
        let v = &values[j * stride + offset..j * stride + offset + d];
        out.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
    }
}

/// One step of the causal depthwise convolution followed by SiLU. `history` holds the previous
/// `k - 1` inputs (oldest first, `channels` each) and is shifted to include `input`;
/// `weight` is `[channels, k]` with the last tap on the current input.
pub fn conv_step(history: &mut [f32], input: &[f32], weight: &[f32], k: usize, out: &mut [f32]) {
    let c = input.len();
    for ch in 0..c {
        let w = &weight[ch * k..(ch + 1) * k];
        let mut acc = w[k - 1] * input[ch];
        for (j, wj) in w[..k - 1].iter().enumerate() {
            acc += wj * history[j * c + ch];
        }
        out[ch] = silu(acc);
    }
    if k > 1 {
        history.copy_within(c.., 0);
        history[(k - 2) * c..].copy_from_slice(input);
    }
}

/// One gated delta rule step for one value head with state `s` of `[dk, dv]`:
/// decay by `exp(g)`, correct towards `v` along `k` with rate `beta`, read out with `q`.
pub fn delta_step(s: &mut [f32], q: &[f32], k: &[f32], v: &[f32], beta: f32, g: f32, out: &mut [f32]) {
    let dv = v.len();
    let decay = g.exp();
    s.iter_mut().for_each(|x| *x *= decay);
    let mut delta = v.to_vec();
    for (i, ki) in k.iter().enumerate() {
        for (d, sv) in delta.iter_mut().zip(&s[i * dv..(i + 1) * dv]) {
            *d -= ki * sv;
        }
    }
    delta.iter_mut().for_each(|d| *d *= beta);
    out.iter_mut().for_each(|o| *o = 0.0);
    for (i, (ki, qi)) in k.iter().zip(q).enumerate() {
        let row = &mut s[i * dv..(i + 1) * dv];
        for ((sv, d), o) in row.iter_mut().zip(&delta).zip(out.iter_mut()) {
            *sv += ki * d;
            *o += qi * *sv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_by_hand() {
        let mut out = [0.0; 2];
        rms_norm(&[3.0, 4.0], &[0.0, 1.0], 1.0, 0.0, &mut out);
        let rms = (12.5f32).sqrt();
        assert!((out[0] - 3.0 / rms).abs() < 1e-6 && (out[1] - 8.0 / rms).abs() < 1e-6);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_the_rest() {
        let mut x = [1.0, 0.0, 0.0, 0.0, 7.0];
        rope(&mut x, 1, 4, 10000.0);
        // Pair (0, 2) at frequency 1 rotates by 1 radian; pair (1, 3) stays zero; dim 4 passes.
        assert!((x[0] - 1f32.cos()).abs() < 1e-6 && (x[2] - 1f32.sin()).abs() < 1e-6);
        assert_eq!((x[1], x[3], x[4]), (0.0, 0.0, 7.0));
    }

    #[test]
    fn route_picks_largest_and_renormalises() {
        let r = route(&[0.0, 2.0, 1.0, 2.0], 2, true);
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 3]);
        assert!((r[0].1 - 0.5).abs() < 1e-6);
        let raw = route(&[0.0, 0.0], 1, false);
        assert!((raw[0].1 - 0.5).abs() < 1e-6);
    }

    #[test]
    fn conv_step_matches_a_causal_convolution() {
        // One channel, kernel 3, weights [1, 2, 3]: y_t = silu(x_{t-2} + 2 x_{t-1} + 3 x_t).
        let (mut hist, w) = (vec![0.0; 2], [1.0, 2.0, 3.0]);
        let xs = [1.0, -1.0, 0.5];
        let mut out = [0.0];
        let mut ys = vec![];
        for x in xs {
            conv_step(&mut hist, &[x], &w, 3, &mut out);
            ys.push(out[0]);
        }
        assert!((ys[0] - silu(3.0)).abs() < 1e-6);
        assert!((ys[1] - silu(2.0 - 3.0)).abs() < 1e-6);
        assert!((ys[2] - silu(1.0 - 2.0 + 1.5)).abs() < 1e-6);
    }

    #[test]
    fn delta_step_by_hand() {
        // dk = dv = 1: s = s*e^g; s += k*beta*(v - k*s); out = q*s.
        let mut s = [2.0];
        let mut out = [0.0];
        delta_step(&mut s, &[3.0], &[0.5], &[1.0], 0.5, 0.0, &mut out);
        let expect = 2.0 + 0.5 * 0.5 * (1.0 - 0.5 * 2.0);
        assert!((s[0] - expect).abs() < 1e-6 && (out[0] - 3.0 * expect).abs() < 1e-6);
    }

    #[test]
    fn attention_weights_sum_to_one() {
        let keys = [1.0, 0.0, 0.0, 1.0];
        let values = [2.0, 0.0, 0.0, 4.0];
        let mut out = [0.0; 2];
        attend(&[0.0, 0.0], &keys, &values, 2, 2, 0, &mut out);
        assert_eq!(out, [1.0, 2.0]);
    }
}
