// Full attention: q/k RMSNorm, partial NeoX RoPE, KV-cache append, causal GQA softmax with an
// optional sigmoid output gate.

#define ATTN_MAX_HEAD_DIM 512

// cos/sin of rotary pair `i` at `pos`, exactly as `moe_core::ops::rope` computes them: the
// inverse frequency in f64 rounded to f32, the angle and its sine and cosine in f64.
__device__ __forceinline__ void rope_cos_sin(int i, int pos, int rot, double theta, float* c, float* s) {
    const double inv = 1.0 / pow(theta, (double)(2 * i) / (double)rot);
    const double angle = (double)pos * (double)(float)inv;
    *c = (float)cos(angle);
    *s = (float)sin(angle);
}

// RMSNorm of `src` (hd values) with weight `w`, then RoPE at `pos`, into `dst`. Uses `buf`
// (hd floats of shared memory) and `red` (32 floats); called by the whole block.
__device__ void norm_rope(const float* src, const float* w, float offset, float eps, int hd, int rot, double theta,
                          int pos, float* buf, float* red, float* dst) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) ss = fmaf(src[i], src[i], ss);
    const float total = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(total / (float)hd + eps);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) buf[i] = src[i] * inv * (offset + w[i]);
    __syncthreads();
    const int half = rot / 2;
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float v;
        if (i < half) {
            float c, s;
            rope_cos_sin(i, pos, rot, theta, &c, &s);
            v = buf[i] * c - buf[i + half] * s;
        } else if (i < rot) {
            float c, s;
            rope_cos_sin(i - half, pos, rot, theta, &c, &s);
            v = buf[i] * c + buf[i - half] * s;
        } else {
            v = buf[i];
        }
        dst[i] = v;
    }
    __syncthreads();
}

// Grid (tokens, kv_heads + heads): blocks y < kv_heads normalise and rotate each new key and
// append it and its value to the cache; the others normalise and rotate a query head into `qr`
// (`[tokens, heads, hd]`), once for all the blocks of `attn_decode` that read it.
extern "C" __global__ void attn_append_kv(const float* __restrict__ q, const float* __restrict__ k,
                                          const float* __restrict__ v, const float* __restrict__ q_norm,
                                          const float* __restrict__ k_norm, float* __restrict__ qr,
                                          float* __restrict__ k_cache, float* __restrict__ v_cache, int heads,
                                          int kv_heads, int hd, int rot, double theta, float offset, float eps,
                                          int gated, const u32* __restrict__ past, const u32* live) {
    grid_start();
    if (step_skipped(live)) return;
    extern __shared__ float smem[];
    __shared__ float red[32];
    const int t = blockIdx.x, h = blockIdx.y;
    const int pos = (int)*past + t;
    if (h >= kv_heads) {
        const int qh = h - kv_heads;
        const u64 per_head = gated ? 2 * hd : hd;
        norm_rope(q + ((u64)t * heads + qh) * per_head, q_norm, offset, eps, hd, rot, theta, pos, smem, red,
                  qr + ((u64)t * heads + qh) * hd);
        return;
    }
    const int kvw = kv_heads * hd;
    const u64 src = (u64)t * kvw + (u64)h * hd;
    const u64 dst = (u64)pos * kvw + (u64)h * hd;
    norm_rope(k + src, k_norm, offset, eps, hd, rot, theta, pos, smem, red, k_cache + dst);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) v_cache[dst + i] = v[src + i];
}

// ---- Attention of one query over the cache, split over blocks (flash decoding): block z of
// grid (tokens, heads, splits) takes the visible positions [z * span, (z + 1) * span). Its warps
// walk them in rounds of ATTN_POS positions per warp: ATTN_LANES lanes share a position's dot
// product (each a strided quarter of the head), so that every lane has all its key loads in flight
// at once, and then all lanes share the head's dimensions for the values of those positions, again
// all loads at once. (One position per warp at a time, as before, waited on memory twice per
// position: 26 us for 32 heads at 30 positions on an H200, and linear in the context.)

#define ATTN_WARPS 8
#define ATTN_LANES 4
#define ATTN_POS (32 / ATTN_LANES)
// Key chunks (16 bytes) a lane loads at once: a whole head of 256 in one round trip.
#define ATTN_KEY_LOADS 16
// Positions of one round of all the warps; a split's span is a multiple of it.
#define ATTN_ROUND (ATTN_WARPS * ATTN_POS)

// exp(a - b) for a running maximum b that may still be -inf (no position seen): 0 then.
__device__ __forceinline__ float exp_from(float a, float b) { return a == NEG_INF ? 0.0f : expf(a - b); }

// Output value e of head `th` (= token * heads + head): the softmax sum `v` over `total`, times
// the sigmoid of the head's gate (the second half of its `q` row) when `gated`.
__device__ __forceinline__ float attn_output(float v, float total, const float* q, u64 th, int hd, int e,
                                             int gated) {
    v /= total;
    return gated ? v * sigmoidf_(q[th * 2 * hd + hd + e]) : v;
}

// The merged softmax state of one query head over a block's positions: its maximum score `m`,
// the sum `l` of exp(score - m) and the unnormalised output `acc` (hd values, in shared memory).
// With one split, `out` gets acc / l, times the sigmoid of the gate when `gated`; else the
// split's (m, l, acc) go to `part` for `attn_combine`.
extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)
    attn_decode(const float* __restrict__ qr, const float* __restrict__ q, const float* __restrict__ k_cache,
                const float* __restrict__ v_cache, float* __restrict__ out, float* __restrict__ part, int heads,
                int kv_heads, int hd, const u32* __restrict__ past, int gated, int span) {
    extern __shared__ __align__(16) float smem[];
    __shared__ float wm[ATTN_WARPS], wl[ATTN_WARPS];
    grid_start();
    float* qs = smem;        // hd
    float* wacc = smem + hd; // ATTN_WARPS x hd
    const int t = blockIdx.x, h = blockIdx.y, z = blockIdx.z, splits = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = (int)*past + t + 1;
    const int start = z * span, end = min(n, start + span);
    const int kvw = kv_heads * hd;
    const u64 off = (u64)(h / (heads / kv_heads)) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    const float4* q4 = (const float4*)(qr + ((u64)t * heads + h) * hd);
    for (int i = threadIdx.x; i < hd / 4; i += blockDim.x) ((float4*)qs)[i] = q4[i];
    __syncthreads();
    const int chunks = hd / 4;                       // float4 chunks of a row
    const int g = lane / ATTN_LANES, sub = lane % ATTN_LANES;
    // Value dimensions of this lane: float4 chunks lane, lane + 32, ... (hd <= 512: at most 4).
    float4 acc[ATTN_MAX_HEAD_DIM / 128];
#pragma unroll
    for (int i = 0; i < ATTN_MAX_HEAD_DIM / 128; i++) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float m = NEG_INF, l = 0.0f;
    for (int j0 = start + warp * ATTN_POS; j0 < end; j0 += ATTN_ROUND) {
        // Scores: position j0 + g, this lane's chunks sub, sub + ATTN_LANES, ...
        const int j = j0 + g;
        float d = 0.0f;
        if (j < end) {
            const float4* kr = (const float4*)(k_cache + (u64)j * kvw + off);
            for (int c0 = sub; c0 < chunks; c0 += ATTN_LANES * ATTN_KEY_LOADS) {
                float4 kv[ATTN_KEY_LOADS];
#pragma unroll
                for (int i = 0; i < ATTN_KEY_LOADS; i++)
                    if (c0 + i * ATTN_LANES < chunks) kv[i] = __ldg(kr + c0 + i * ATTN_LANES);
#pragma unroll
                for (int i = 0; i < ATTN_KEY_LOADS; i++) {
                    if (c0 + i * ATTN_LANES < chunks) {
                        const float4 qv = ((const float4*)qs)[c0 + i * ATTN_LANES];
                        d = fmaf(qv.x, kv[i].x, d);
                        d = fmaf(qv.y, kv[i].y, d);
                        d = fmaf(qv.z, kv[i].z, d);
                        d = fmaf(qv.w, kv[i].w, d);
                    }
                }
            }
        }
#pragma unroll
        for (int o = 1; o < ATTN_LANES; o <<= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        const float s = j < end ? d * scale : NEG_INF;
        float mr = s;
#pragma unroll
        for (int o = ATTN_LANES; o < 32; o <<= 1) mr = fmaxf(mr, __shfl_xor_sync(0xffffffffu, mr, o));
        const float mn = fmaxf(m, mr);  // finite: position j0 is visible
        const float corr = exp_from(m, mn);
        const float p = exp_from(s, mn);
        float ps = p;
#pragma unroll
        for (int o = ATTN_LANES; o < 32; o <<= 1) ps += __shfl_xor_sync(0xffffffffu, ps, o);
        l = l * corr + ps;
        m = mn;
        // Values: every lane its chunks of the round's positions.
        const int np = min(ATTN_POS, end - j0);
#pragma unroll
        for (int i = 0; i < ATTN_MAX_HEAD_DIM / 128; i++) {
            acc[i].x *= corr;
            acc[i].y *= corr;
            acc[i].z *= corr;
            acc[i].w *= corr;
        }
#pragma unroll
        for (int gi = 0; gi < ATTN_POS; gi++) {
            const float pg = __shfl_sync(0xffffffffu, p, gi * ATTN_LANES);
            if (gi < np) {
                const float4* vr = (const float4*)(v_cache + (u64)(j0 + gi) * kvw + off);
#pragma unroll
                for (int i = 0; i < ATTN_MAX_HEAD_DIM / 128; i++) {
                    const int c = lane + 32 * i;
                    if (c < chunks) {
                        const float4 vv = __ldg(vr + c);
                        acc[i].x = fmaf(pg, vv.x, acc[i].x);
                        acc[i].y = fmaf(pg, vv.y, acc[i].y);
                        acc[i].z = fmaf(pg, vv.z, acc[i].z);
                        acc[i].w = fmaf(pg, vv.w, acc[i].w);
                    }
                }
            }
        }
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < ATTN_MAX_HEAD_DIM / 128; i++) {
        const int c = lane + 32 * i;
        if (c < chunks) ((float4*)(wacc + warp * hd))[c] = acc[i];
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int w = 0; w < ATTN_WARPS; w++) mx = fmaxf(mx, wm[w]);
    float total = 0.0f;
    for (int w = 0; w < ATTN_WARPS; w++) total += wl[w] * exp_from(wm[w], mx);
    const u64 th = (u64)t * heads + h;
    float* pz = part + (th * splits + z) * (hd + 2);
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) v += wacc[w * hd + e] * exp_from(wm[w], mx);
        if (splits > 1) {
            pz[2 + e] = v;
        } else {
            out[th * hd + e] = attn_output(v, total, q, th, hd, e, gated);
        }
    }
    if (splits > 1 && threadIdx.x == 0) {
        pz[0] = mx;
        pz[1] = total;
    }
}

// Grid (tokens, heads): the `splits` partial states of `attn_decode` merged into the output.
extern "C" __global__ void attn_combine(const float* __restrict__ part, const float* __restrict__ q,
                                        float* __restrict__ out, int heads, int hd, int splits, int gated) {
    grid_start();
    const int t = blockIdx.x, h = blockIdx.y;
    const u64 th = (u64)t * heads + h;
    const float* p = part + th * splits * (hd + 2);
    float mx = NEG_INF;
    for (int z = 0; z < splits; z++) mx = fmaxf(mx, p[z * (hd + 2)]);
    float total = 0.0f;
    for (int z = 0; z < splits; z++) total += p[z * (hd + 2) + 1] * exp_from(p[z * (hd + 2)], mx);
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float v = 0.0f;
        for (int z = 0; z < splits; z++) v += p[z * (hd + 2) + 2 + e] * exp_from(p[z * (hd + 2)], mx);
        out[th * hd + e] = attn_output(v, total, q, th, hd, e, gated);
    }
}
