//! AVX2 + FMA + F16C kernels (x86-64). Every function here is compiled for those features and
//! must only run on CPUs that have them; `Kernel::Avx2.is_supported()` is the check.
//!
//! Weights are read with unaligned loads straight from their byte buffers (memory maps or read
//! buffers carry no alignment promise); activations and sums are f32.
//!
//! Few tokens ([`rows`] up to [`DOT_TOKENS`]): a row is streamed once. Affine codes are taken
//! 256 bits (eight u32 words) at a time; for each code position `k` one AND with a constant
//! mask leaves code `k` of all eight words in place (worth `code << bits k`), one conversion
//! makes that f32, and one FMA per token multiplies it with eight activations that
//! [`prepare`] reordered (and pre-scaled by `2^-(bits k)`, exact) to match. No shuffles in the
//! loop: about three vector operations per eight weights, whatever the width of the codes. The
//! scales multiply the partial sums once per block or group, and the biases meet the per-group
//! sums of the activations once per row.
//!
//! More tokens ([`matmul_rows`]): rows are dequantised in natural order (broadcast a word, shift
//! each lane by its own amount, mask) into an f32 buffer and multiplied with a register tile.

use moe_core::{DType, Matrix, WeightFormat};
use std::arch::x86_64::*;

const F32: usize = 0;
const BF16: usize = 1;
const F16: usize = 2;

/// Rows and tokens of the prefill micro-kernel's register tile.
const TILE_ROWS: usize = 4;
const TILE_TOKENS: usize = 3;
/// Activations of one token block should stay in L2 (floats).
const TOKEN_BLOCK_FLOATS: usize = 64 * 1024;

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// One bf16 (little-endian) at `p + 2 i` as f32.
#[inline(always)]
unsafe fn bf16_at(p: *const u8, i: usize) -> f32 {
    let bits = unsafe { (p.add(2 * i) as *const u16).read_unaligned() };
    f32::from_bits((bits as u32) << 16)
}

/// Eight bf16 at `p` as f32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn bf16x8(p: *const u8) -> __m256 {
    let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

/// Eight elements of a float row (`D` = F32/BF16/F16) starting at element `e`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<const D: usize>(row: *const u8, e: usize) -> __m256 {
    unsafe {
        match D {
            F32 => _mm256_loadu_ps((row as *const f32).add(e)),
            BF16 => bf16x8(row.add(2 * e)),
            _ => _mm256_cvtph_ps(_mm_loadu_si128(row.add(2 * e) as *const __m128i)),
        }
    }
}

/// One element of a float row.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load1<const D: usize>(row: *const u8, e: usize) -> f32 {
    unsafe {
        match D {
            F32 => (row as *const f32).add(e).read_unaligned(),
            BF16 => bf16_at(row, e),
            _ => {
                let bits = (row.add(2 * e) as *const u16).read_unaligned();
                _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
            }
        }
    }
}

/// Codes `e..e + 32` of a row of `BITS`-bit codes (packed LSB-first in u32 words) as four
/// vectors of f32, in element order. `e` is a multiple of 32.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn codes32<const BITS: usize>(codes: *const u8, e: usize) -> [__m256; 4] {
    unsafe {
        match BITS {
            4 => {
                let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                let mask = _mm256_set1_epi32(0xf);
                let p = codes.add(e / 2) as *const i32;
                let v = |k: usize| {
                    let word = _mm256_set1_epi32(p.add(k).read_unaligned());
                    _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(word, shifts), mask))
                };
                [v(0), v(1), v(2), v(3)]
            }
            2 => {
                let lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
                let hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
                let mask = _mm256_set1_epi32(0x3);
                let p = codes.add(e / 4) as *const i32;
                let w0 = _mm256_set1_epi32(p.read_unaligned());
                let w1 = _mm256_set1_epi32(p.add(1).read_unaligned());
                let v = |w, s| _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, s), mask));
                [v(w0, lo), v(w0, hi), v(w1, lo), v(w1, hi)]
            }
            _ => {
                let p = codes.add(e);
                let v = |k: usize| {
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8 * k) as *const __m128i)))
                };
                [v(0), v(1), v(2), v(3)]
            }
        }
    }
}

/// Elements per 256-bit block of `bits`-bit codes: 8 words of `32 / bits` codes.
pub(crate) const fn block_len(bits: usize) -> usize {
    8 * (32 / bits)
}

/// Reorders one token's activations for [`affine_dots`]: within each whole block of
/// [`block_len`] elements, position `8 k + i` takes element `(32 / bits) i + k` (code `k` of word
/// `i`), so that masking all eight words of a block at code `k` lines up with eight consecutive
/// activations. Code `k` is left in place by the mask (worth `code * 2^(bits k)`), so its
/// activations are pre-scaled by `2^-(bits k)`: exact, as it is a power of two. The last code
/// of a word is shifted down instead (its mask would set the sign bit) and is not scaled. A
/// partial block at the end keeps the natural order. (Pre-scaling only loses precision for
/// activations under 2^-98, which become subnormal: an absolute error below 2^-120.)
#[target_feature(enable = "avx2,fma,f16c")]
fn permute_x(bits: usize, x: &[f32], out: &mut [f32]) {
    match bits {
        2 => permute_avx2::<16>(x, out),
        4 => permute_avx2::<8>(x, out),
        _ => permute::<4>(x, out),
    }
}

/// `2^-(bits k)` for every code `k` of a word but the last (see [`permute_x`]).
fn factors<const PER_WORD: usize>() -> [f32; PER_WORD] {
    let bits = 32 / PER_WORD;
    let mut factor = [1.0f32; PER_WORD];
    for (k, f) in factor.iter_mut().enumerate().take(PER_WORD - 1) {
        *f = f32::powi(2.0, -((bits * k) as i32));
    }
    factor
}

/// Portable [`permute_x`] (used for q8, whose blocks are too short for the 8x8 transpose).
fn permute<const PER_WORD: usize>(x: &[f32], out: &mut [f32]) {
    let block = 8 * PER_WORD;
    let factor = factors::<PER_WORD>();
    let whole = x.len() / block * block;
    for (o, x) in out[..whole].chunks_exact_mut(block).zip(x[..whole].chunks_exact(block)) {
        for (k, o) in o.chunks_exact_mut(8).enumerate() {
            for (i, o) in o.iter_mut().enumerate() {
                *o = x[PER_WORD * i + k] * factor[k];
            }
        }
    }
    out[whole..x.len()].copy_from_slice(&x[whole..]);
}

/// Transposes eight rows of eight floats.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xee>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xee>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xee>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xee>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

/// [`permute_x`] for q4 and q2 with 8x8 transposes (q2: one per half word).
#[target_feature(enable = "avx2,fma,f16c")]
fn permute_avx2<const PER_WORD: usize>(x: &[f32], out: &mut [f32]) {
    let block = 8 * PER_WORD;
    let factor = factors::<PER_WORD>();
    let whole = x.len() / block * block;
    for (o, x) in out[..whole].chunks_exact_mut(block).zip(x[..whole].chunks_exact(block)) {
        for half in 0..PER_WORD / 8 {
            let mut rows = [_mm256_setzero_ps(); 8];
            for (i, r) in rows.iter_mut().enumerate() {
                // SAFETY: `PER_WORD * i + 8 * half + 8 <= block == x.len()`.
                *r = unsafe { _mm256_loadu_ps(x[PER_WORD * i + 8 * half..].as_ptr()) };
            }
            for (j, c) in transpose8(rows).into_iter().enumerate() {
                let k = 8 * half + j;
                let v = _mm256_mul_ps(c, _mm256_set1_ps(factor[k]));
                // SAFETY: `8 k + 8 <= block == o.len()`.
                unsafe { _mm256_storeu_ps(o[8 * k..].as_mut_ptr(), v) };
            }
        }
    }
    out[whole..x.len()].copy_from_slice(&x[whole..]);
}

/// Per-call preparation of the activations for the few-token kernels ([`DOT_TOKENS`] or fewer).
pub(crate) struct Prepared {
    /// Each token's activations reordered by [`permute_x`] (`[tokens, cols]`; empty for float
    /// weights, which use them as they are).
    x: Vec<f32>,
    /// Each token's per-group sums (`[tokens, cols / group]`; affine weights).
    sums: Vec<f32>,
}

/// Prepares the activations `x` (`[tokens, cols]`) for [`rows`] over `w`: nothing unless the
/// weights are affine and there are at most [`DOT_TOKENS`] tokens.
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn prepare(w: &Matrix, x: &[f32], tokens: usize) -> Prepared {
    let (cols, empty) = (w.cols, Prepared { x: Vec::new(), sums: Vec::new() });
    let WeightFormat::Affine { bits, group } = w.format else { return empty };
    if tokens > DOT_TOKENS {
        return empty;
    }
    let x = &x[..tokens * cols];
    let mut xp = vec![0.0; x.len()];
    for (xp, x) in xp.chunks_exact_mut(cols).zip(x.chunks_exact(cols)) {
        permute_x(bits as usize, x, xp);
    }
    let sums = x
        .chunks_exact(group)
        .map(|g| {
            let mut acc = _mm256_setzero_ps();
            let mut c = g.chunks_exact(8);
            for v in &mut c {
                // SAFETY: `v` holds 8 floats.
                acc = _mm256_add_ps(acc, unsafe { _mm256_loadu_ps(v.as_ptr()) });
            }
            hsum(acc) + c.remainder().iter().sum::<f32>()
        })
        .collect();
    Prepared { x: xp, sums }
}

/// The scales of the eight words of a block whose first group is `g` (each word lies in one
/// group): one broadcast when a group spans the block, else 2 or 4 groups spread over the lanes.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_scales<const BITS: usize>(scales: *const u8, g: usize, group: usize) -> __m256 {
    let block = block_len(BITS);
    unsafe {
        if group >= block {
            return _mm256_set1_ps(bf16_at(scales, g));
        }
        let first = scales.add(2 * g);
        if block / group == 2 {
            let two = _mm_cvtsi32_si128((first as *const i32).read_unaligned());
            let f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(two), 16));
            _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1))
        } else {
            let four = _mm_loadl_epi64(first as *const __m128i);
            let f = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(four), 16));
            _mm256_permutevar8x32_ps(f, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3))
        }
    }
}

/// Independent partial sums per token in the few-token kernels: enough chains in flight to hide
/// the FMA latency with one token, fewer with more tokens (more registers in use; with several
/// tokens the activations come from L2 and loads, not latency, bound the loop).
const fn partials(tokens: usize) -> usize {
    if tokens >= 3 { 1 } else { 4 / tokens }
}

/// Sum of the first `p` partial sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
fn reduce(a: &[__m256; 4], p: usize) -> __m256 {
    match p {
        1 => a[0],
        2 => _mm256_add_ps(a[0], a[1]),
        _ => _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
    }
}

/// `row . x[t]` for a float row of `cols` elements and `T` tokens: each vector of weights is
/// decoded once and used for every token.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_dots<const D: usize, const T: usize>(row: *const u8, x: [*const f32; T], cols: usize) -> [f32; T] {
    let p = partials(T);
    unsafe {
        let mut a = [[_mm256_setzero_ps(); 4]; T];
        let mut e = 0;
        while e + 32 <= cols {
            for j in 0..4 {
                let wv = load8::<D>(row, e + 8 * j);
                for t in 0..T {
                    a[t][j % p] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t].add(e + 8 * j)), a[t][j % p]);
                }
            }
            e += 32;
        }
        while e + 8 <= cols {
            let wv = load8::<D>(row, e);
            for t in 0..T {
                a[t][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[t].add(e)), a[t][0]);
            }
            e += 8;
        }
        let mut out = [0.0; T];
        for t in 0..T {
            out[t] = hsum(reduce(&a[t], p));
            for i in e..cols {
                out[t] += load1::<D>(row, i) * *x[t].add(i);
            }
        }
        out
    }
}

/// Adds block `b` of a row (codes in `codes`, activations `x[t]` as [`permute_x`] leaves them)
/// to the partial sums `a[t]`: one load, then per code position `k` a mask (the last one a
/// shift), a conversion, and one FMA per token.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_dots<const BITS: usize, const T: usize>(
    codes: *const u8,
    x: &[*const f32; T],
    b: usize,
    a: &mut [[__m256; 4]; T],
) {
    let (per_word, p) = (32 / BITS, partials(T));
    unsafe {
        let v = _mm256_loadu_si256(codes.add(32 * b) as *const __m256i);
        let base = b * block_len(BITS);
        for k in 0..per_word {
            let c = if k == per_word - 1 {
                _mm256_srlv_epi32(v, _mm256_set1_epi32((BITS * k) as i32))
            } else {
                _mm256_and_si256(v, _mm256_set1_epi32((((1u32 << BITS) - 1) << (BITS * k)) as i32))
            };
            let c = _mm256_cvtepi32_ps(c);
            for t in 0..T {
                a[t][k % p] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x[t].add(base + 8 * k)), a[t][k % p]);
            }
        }
    }
}

/// `row . x[t]` for an affine row and `T` tokens:
/// `sum_g scale_g * (codes_g . x_g) + bias_g * xsum_g`, with `x[t]` in the order of
/// [`permute_x`] and `xsum[t]` its per-group sums. `group` is a multiple of 32 that divides
/// `cols` and either divides or is a multiple of [`block_len`]. The partial sums are scaled and
/// added to the row totals once per block (or per group when a group spans several blocks).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn affine_dots<const BITS: usize, const T: usize>(
    (codes, scales, biases): (*const u8, *const u8, *const u8),
    x: [*const f32; T],
    xsum: [*const f32; T],
    cols: usize,
    group: usize,
) -> [f32; T] {
    let (block, p) = (block_len(BITS), partials(T));
    // Blocks that share one scale (or one block spanning several groups).
    let unit = block.max(group) / block;
    let groups_per_unit = (unit * block) / group;
    let blocks = cols / block;
    unsafe {
        let mut acc = [_mm256_setzero_ps(); T];
        let (mut b, mut g) = (0, 0);
        if unit == 1 {
            // Kept apart from the general loop: with an inner loop the compiler spills the sums.
            while b < blocks {
                let mut a = [[_mm256_setzero_ps(); 4]; T];
                block_dots::<BITS, T>(codes, &x, b, &mut a);
                let s = block_scales::<BITS>(scales, g, group);
                for t in 0..T {
                    acc[t] = _mm256_fmadd_ps(s, reduce(&a[t], p), acc[t]);
                }
                b += 1;
                g += groups_per_unit;
            }
        } else {
            while b + unit <= blocks {
                let mut a = [[_mm256_setzero_ps(); 4]; T];
                for b in b..b + unit {
                    block_dots::<BITS, T>(codes, &x, b, &mut a);
                }
                let s = _mm256_set1_ps(bf16_at(scales, g));
                for t in 0..T {
                    acc[t] = _mm256_fmadd_ps(s, reduce(&a[t], p), acc[t]);
                }
                b += unit;
                g += 1;
            }
        }
        // A partial block (whole groups, activations in natural order).
        let mut e = b * block;
        while e < cols {
            let g = e / group;
            let mut a = [[_mm256_setzero_ps(); 4]; T];
            while e < (g + 1) * group {
                let c = codes32::<BITS>(codes, e);
                for t in 0..T {
                    for (k, c) in c.iter().enumerate() {
                        a[t][k % p] = _mm256_fmadd_ps(*c, _mm256_loadu_ps(x[t].add(e + 8 * k)), a[t][k % p]);
                    }
                }
                e += 32;
            }
            let s = _mm256_set1_ps(bf16_at(scales, g));
            for t in 0..T {
                acc[t] = _mm256_fmadd_ps(s, reduce(&a[t], p), acc[t]);
            }
        }
        // Biases: sum_g bias_g * xsum_g.
        let groups = cols / group;
        let mut g = 0;
        while g + 8 <= groups {
            let bias = bf16x8(biases.add(2 * g));
            for t in 0..T {
                acc[t] = _mm256_fmadd_ps(bias, _mm256_loadu_ps(xsum[t].add(g)), acc[t]);
            }
            g += 8;
        }
        let mut out = [0.0; T];
        for t in 0..T {
            out[t] = hsum(acc[t]);
            for g in g..groups {
                out[t] += bf16_at(biases, g) * *xsum[t].add(g);
            }
        }
        out
    }
}

/// Dequantises an affine row into `out` (`cols` floats): `scale * code + bias`, which is exact
/// in the product, so the result equals `Matrix::row_f32` bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn affine_row<const BITS: usize>(
    codes: *const u8,
    scales: *const u8,
    biases: *const u8,
    cols: usize,
    group: usize,
    out: *mut f32,
) {
    unsafe {
        for g in 0..cols / group {
            let (scale, bias) = (_mm256_set1_ps(bf16_at(scales, g)), _mm256_set1_ps(bf16_at(biases, g)));
            let mut e = g * group;
            while e < (g + 1) * group {
                let c = codes32::<BITS>(codes, e);
                for (k, c) in c.iter().enumerate() {
                    _mm256_storeu_ps(out.add(e + 8 * k), _mm256_fmadd_ps(*c, scale, bias));
                }
                e += 32;
            }
        }
    }
}

/// Decodes a float row into `out` (`cols` floats).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn float_row<const D: usize>(row: *const u8, cols: usize, out: *mut f32) {
    unsafe {
        let mut e = 0;
        while e + 8 <= cols {
            _mm256_storeu_ps(out.add(e), load8::<D>(row, e));
            e += 8;
        }
        while e < cols {
            *out.add(e) = load1::<D>(row, e);
            e += 1;
        }
    }
}

/// Pointers to row `r`'s parts: codes (or elements), scales, biases.
fn row_parts(w: &Matrix, r: usize) -> (*const u8, *const u8, *const u8) {
    let cols = w.cols;
    match w.format {
        WeightFormat::Float(d) => (w.data[r * cols * d.size()..].as_ptr(), std::ptr::null(), std::ptr::null()),
        WeightFormat::Affine { bits, group } => {
            let g = cols / group;
            (
                w.data[r * cols * bits as usize / 8..].as_ptr(),
                w.scales[r * g * 2..].as_ptr(),
                w.biases[r * g * 2..].as_ptr(),
            )
        }
    }
}

/// `outs[t][i] = row(r0 + i) . x[t]` for every token `t` (`outs.len()` tokens), `prep` being
/// [`prepare`]`(w, x, outs.len())`. Up to [`DOT_TOKENS`] tokens stream each row once through
/// the dot kernels (four tokens at a time, while the row is in L1); more go through dequantised
/// rows and the register-tiled [`matmul_rows`].
///
/// # Safety
/// The CPU supports AVX2, FMA and F16C; `w`'s buffers hold all of its rows (`check_storage`);
/// `Kernel::Avx2.handles(w)`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn rows(
    w: &Matrix,
    x: &[f32],
    prep: &Prepared,
    r0: usize,
    outs: &mut [&mut [f32]],
    buf: &mut Vec<f32>,
) {
    let (tokens, cols) = (outs.len(), w.cols);
    let n = outs.first().map_or(0, |o| o.len());
    assert!(r0 + n <= w.rows && x.len() >= tokens * cols && outs.iter().all(|o| o.len() == n));
    if tokens > DOT_TOKENS {
        return unsafe { matmul_rows(w, x, r0, outs, buf) };
    }
    let (xs, sums) = match w.format {
        WeightFormat::Float(_) => (x, &[][..]),
        WeightFormat::Affine { group, .. } => {
            assert!(prep.x.len() >= tokens * cols && prep.sums.len() >= tokens * (cols / group), "not prepared");
            (&prep.x[..], &prep.sums[..])
        }
    };
    for i in 0..n {
        let mut t0 = 0;
        while t0 < tokens {
            let t = (tokens - t0).min(4);
            let mut res = [0.0; 4];
            unsafe {
                match t {
                    1 => res[..1].copy_from_slice(&row_dots::<1>(w, r0 + i, xs, sums, t0)),
                    2 => res[..2].copy_from_slice(&row_dots::<2>(w, r0 + i, xs, sums, t0)),
                    3 => res[..3].copy_from_slice(&row_dots::<3>(w, r0 + i, xs, sums, t0)),
                    _ => res.copy_from_slice(&row_dots::<4>(w, r0 + i, xs, sums, t0)),
                }
            }
            for (out, v) in outs[t0..t0 + t].iter_mut().zip(res) {
                out[i] = v;
            }
            t0 += t;
        }
    }
}

/// The most tokens [`rows`] handles with the dot kernels.
pub(crate) const DOT_TOKENS: usize = 4;

/// Row `r` dotted with tokens `t0..t0 + T`: `xs` holds the activations of all tokens (prepared
/// ones for affine weights) and `sums` their group sums.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn row_dots<const T: usize>(w: &Matrix, r: usize, xs: &[f32], sums: &[f32], t0: usize) -> [f32; T] {
    let cols = w.cols;
    let mut x = [std::ptr::null(); T];
    for (t, p) in x.iter_mut().enumerate() {
        *p = xs[(t0 + t) * cols..].as_ptr();
    }
    let parts = row_parts(w, r);
    unsafe {
        match w.format {
            WeightFormat::Float(DType::F32) => float_dots::<F32, T>(parts.0, x, cols),
            WeightFormat::Float(DType::BF16) => float_dots::<BF16, T>(parts.0, x, cols),
            WeightFormat::Float(DType::F16) => float_dots::<F16, T>(parts.0, x, cols),
            WeightFormat::Affine { bits, group } => {
                let groups = cols / group;
                let mut s = [std::ptr::null(); T];
                for (t, p) in s.iter_mut().enumerate() {
                    *p = sums[(t0 + t) * groups..].as_ptr();
                }
                match bits {
                    2 => affine_dots::<2, T>(parts, x, s, cols, group),
                    4 => affine_dots::<4, T>(parts, x, s, cols, group),
                    _ => affine_dots::<8, T>(parts, x, s, cols, group),
                }
            }
        }
    }
}

/// Dequantises row `r` into `out[..cols]`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequant_row(w: &Matrix, r: usize, out: &mut [f32]) {
    let cols = w.cols;
    assert!(out.len() >= cols);
    let (c, s, b) = row_parts(w, r);
    let o = out.as_mut_ptr();
    unsafe {
        match w.format {
            WeightFormat::Float(DType::F32) => float_row::<F32>(c, cols, o),
            WeightFormat::Float(DType::BF16) => float_row::<BF16>(c, cols, o),
            WeightFormat::Float(DType::F16) => float_row::<F16>(c, cols, o),
            WeightFormat::Affine { bits: 2, group } => affine_row::<2>(c, s, b, cols, group, o),
            WeightFormat::Affine { bits: 4, group } => affine_row::<4>(c, s, b, cols, group, o),
            WeightFormat::Affine { group, .. } => affine_row::<8>(c, s, b, cols, group, o),
        }
    }
}

/// The register tile: `R` rows (f32, `n` long) times `T` tokens (f32, `n` long).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile<const R: usize, const T: usize>(w: [*const f32; R], x: [*const f32; T], n: usize) -> [[f32; T]; R] {
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        // Small tiles have too few independent sums to hide the FMA latency: give them two sets.
        let mut acc2 = [[_mm256_setzero_ps(); T]; R];
        let mut e = 0;
        if R * T < 8 {
            while e + 16 <= n {
                for r in 0..R {
                    let (w0, w1) = (_mm256_loadu_ps(w[r].add(e)), _mm256_loadu_ps(w[r].add(e + 8)));
                    for t in 0..T {
                        acc[r][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x[t].add(e)), acc[r][t]);
                        acc2[r][t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x[t].add(e + 8)), acc2[r][t]);
                    }
                }
                e += 16;
            }
        }
        while e + 8 <= n {
            let mut xv = [_mm256_setzero_ps(); T];
            for t in 0..T {
                xv[t] = _mm256_loadu_ps(x[t].add(e));
            }
            for r in 0..R {
                let wv = _mm256_loadu_ps(w[r].add(e));
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
                }
            }
            e += 8;
        }
        let mut res = [[0.0; T]; R];
        for r in 0..R {
            for t in 0..T {
                let v = if R * T < 8 { _mm256_add_ps(acc[r][t], acc2[r][t]) } else { acc[r][t] };
                let mut s = hsum(v);
                for i in e..n {
                    s += w[r].add(i).read_unaligned() * *x[t].add(i);
                }
                res[r][t] = s;
            }
        }
        res
    }
}

/// Tiles of up to `T` tokens from `t0..t1` against `R` rows; results go to `outs[t][i..i + R]`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn token_tiles<const R: usize>(
    w: [*const f32; R],
    x: &[f32],
    cols: usize,
    (t0, t1): (usize, usize),
    outs: &mut [&mut [f32]],
    i: usize,
) {
    let xp = |t: usize| x[t * cols..].as_ptr();
    let mut t = t0;
    unsafe {
        while t < t1 {
            match t1 - t {
                1 => {
                    let res = tile::<R, 1>(w, [xp(t)], cols);
                    (0..R).for_each(|r| outs[t][i + r] = res[r][0]);
                    t += 1;
                }
                2 => {
                    let res = tile::<R, 2>(w, [xp(t), xp(t + 1)], cols);
                    for (tt, out) in outs[t..t + 2].iter_mut().enumerate() {
                        (0..R).for_each(|r| out[i + r] = res[r][tt]);
                    }
                    t += 2;
                }
                _ => {
                    let res = tile::<R, TILE_TOKENS>(w, [xp(t), xp(t + 1), xp(t + 2)], cols);
                    for (tt, out) in outs[t..t + TILE_TOKENS].iter_mut().enumerate() {
                        (0..R).for_each(|r| out[i + r] = res[r][tt]);
                    }
                    t += TILE_TOKENS;
                }
            }
        }
    }
}

/// `outs[t][i] = row(r0 + i) . x[t]` for every token `t`: rows are dequantised `TILE_ROWS` at a
/// time into `buf` once per block of tokens (f32 rows are used in place) and multiplied with
/// register tiles of `TILE_TOKENS` tokens. Preconditions as [`rows`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn matmul_rows(w: &Matrix, x: &[f32], r0: usize, outs: &mut [&mut [f32]], buf: &mut Vec<f32>) {
    let (cols, tokens) = (w.cols, outs.len());
    let n = outs.first().map_or(0, |o| o.len());
    debug_assert!(r0 + n <= w.rows && x.len() >= tokens * cols);
    let in_place = w.format == WeightFormat::Float(DType::F32);
    if !in_place {
        buf.resize(TILE_ROWS * cols, 0.0);
    }
    let block = (TOKEN_BLOCK_FLOATS / cols.max(1) / TILE_TOKENS).max(1) * TILE_TOKENS;
    let mut t0 = 0;
    while t0 < tokens {
        let t1 = (t0 + block).min(tokens);
        let mut i = 0;
        while i < n {
            let nr = TILE_ROWS.min(n - i);
            let mut rows = [std::ptr::null::<f32>(); TILE_ROWS];
            for (j, row) in rows.iter_mut().enumerate().take(nr) {
                *row = if in_place {
                    row_parts(w, r0 + i + j).0 as *const f32
                } else {
                    let dst = &mut buf[j * cols..(j + 1) * cols];
                    unsafe { dequant_row(w, r0 + i + j, dst) };
                    dst.as_ptr()
                };
            }
            unsafe {
                if nr == TILE_ROWS {
                    token_tiles::<TILE_ROWS>(rows, x, cols, (t0, t1), outs, i);
                } else {
                    for (j, row) in rows.iter().enumerate().take(nr) {
                        token_tiles::<1>([*row], x, cols, (t0, t1), outs, i + j);
                    }
                }
            }
            i += nr;
        }
        t0 = t1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_core::Bytes;
    use moe_core::format::f32_to_bf16_bits;

    fn avx2() -> bool {
        crate::Kernel::Avx2.is_supported()
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
            .collect()
    }

    #[test]
    fn transposed_permutation_matches_the_portable_one() {
        if !avx2() {
            return;
        }
        // Whole blocks plus a partial one, which stays in natural order.
        for (bits, n) in [(4, 64 * 5 + 32), (2, 128 * 3 + 64), (4, 64), (2, 128)] {
            let x = values(n, bits as u32);
            let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
            unsafe {
                match bits {
                    2 => (permute::<16>(&x, &mut a), permute_avx2::<16>(&x, &mut b)),
                    _ => (permute::<8>(&x, &mut a), permute_avx2::<8>(&x, &mut b)),
                }
            };
            assert_eq!(a, b, "q{bits}, {n} elements");
        }
    }

    #[test]
    fn permutation_places_code_k_of_word_i_at_8k_plus_i() {
        let per_word = 8;
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let mut out = vec![0.0; 64];
        permute::<8>(&x, &mut out);
        for k in 0..per_word {
            for i in 0..8 {
                let scale = if k == per_word - 1 { 1.0 } else { f32::powi(2.0, -4 * k as i32) };
                assert_eq!(out[8 * k + i], (per_word * i + k) as f32 * scale);
            }
        }
    }

    #[test]
    fn dequantised_rows_equal_row_f32_bit_for_bit() {
        if !avx2() {
            return;
        }
        let (rows, cols) = (3, 256);
        let v = values(rows * cols, 7);
        let bf16: Vec<u8> = v.iter().flat_map(|x| f32_to_bf16_bits(*x).to_le_bytes()).collect();
        // f16 bit patterns of normal numbers: sign, exponent 5..=20, any mantissa.
        let f16: Vec<u8> = (0..(rows * cols) as u32)
            .flat_map(|i| {
                let h = i.wrapping_mul(2654435761) >> 7;
                ((((h >> 15) & 1) << 15 | (5 + (h >> 10) % 16) << 10 | (h & 0x3ff)) as u16).to_le_bytes()
            })
            .collect();
        let f32b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut mats = vec![
            Matrix::float(DType::BF16, rows, cols, Bytes::from_vec(bf16)),
            Matrix::float(DType::F16, rows, cols, Bytes::from_vec(f16)),
            Matrix::float(DType::F32, rows, cols, Bytes::from_vec(f32b)),
        ];
        for bits in [2, 4, 8] {
            for group in [32, 64, 128] {
                mats.push(moe_core::quant::quantize(&v, rows, cols, bits, group));
            }
        }
        for m in mats {
            for r in 0..rows {
                let (mut a, mut b) = (vec![0.0; cols], vec![0.0; cols]);
                m.row_f32(r, &mut a);
                unsafe { dequant_row(&m, r, &mut b) };
                let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{} row {r}", m.format.name());
            }
        }
    }
}
