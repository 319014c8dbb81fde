// Full attention: q/k RMSNorm, partial NeoX RoPE, KV-cache append, causal GQA softmax with an
// optional sigmoid output gate.

#define ATTN_MAX_HEAD_DIM 512
#define ATTN_THREADS 128

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

// Grid (tokens, kv_heads): normalise and rotate each new key, append keys and values to the cache.
extern "C" __global__ void attn_append_kv(const float* __restrict__ k, const float* __restrict__ v,
                                          const float* __restrict__ k_norm, float* __restrict__ k_cache,
                                          float* __restrict__ v_cache, int kv_heads, int hd, int rot, double theta,
                                          float offset, float eps, const u32* __restrict__ past) {
    grid_start();
    extern __shared__ float smem[];
    __shared__ float red[32];
    const int t = blockIdx.x, h = blockIdx.y;
    const int kvw = kv_heads * hd;
    const int pos = (int)*past + t;
    const u64 src = (u64)t * kvw + (u64)h * hd;
    const u64 dst = (u64)pos * kvw + (u64)h * hd;
    norm_rope(k + src, k_norm, offset, eps, hd, rot, theta, pos, smem, red, k_cache + dst);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) v_cache[dst + i] = v[src + i];
}

// Grid (tokens, heads), ATTN_THREADS threads: each warp runs an online softmax over a strided
// subset of the `past + t + 1` visible positions, then the warps merge.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attn_decode(const float* __restrict__ q, const float* __restrict__ q_norm, const float* __restrict__ k_cache,
                const float* __restrict__ v_cache, float* __restrict__ out, int heads, int kv_heads, int hd, int rot,
                double theta, float offset, float eps, const u32* __restrict__ past, int gated) {
    grid_start();
    extern __shared__ float smem[];
    __shared__ float red[32];
    __shared__ float wm[ATTN_THREADS / 32], wl[ATTN_THREADS / 32];
    const int NW = ATTN_THREADS / 32;
    const int PER_LANE = ATTN_MAX_HEAD_DIM / 32;
    float* qs = smem;             // hd
    float* buf = smem + hd;       // hd
    float* wacc = smem + 2 * hd;  // NW * hd
    const int t = blockIdx.x, h = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int per_head = gated ? 2 * hd : hd;
    const u64 qw = (u64)heads * per_head;
    const int kvw = kv_heads * hd;
    const int pos = (int)*past + t;
    const float* qh = q + (u64)t * qw + (u64)h * per_head;
    norm_rope(qh, q_norm, offset, eps, hd, rot, theta, pos, buf, red, qs);

    const int n = pos + 1;
    const u64 off = (u64)(h / (heads / kv_heads)) * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    float m = NEG_INF, l = 0.0f;
    float acc[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) acc[i] = 0.0f;
    for (int j = warp; j < n; j += NW) {
        const float* kr = k_cache + (u64)j * kvw + off;
        const float* vr = v_cache + (u64)j * kvw + off;
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int e = lane + 32 * i;
            if (e < hd) d = fmaf(qs[e], kr[e], d);
        }
        const float s = warp_sum(d) * scale;
        const float mn = fmaxf(m, s);
        const float corr = expf(m - mn);
        const float p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int e = lane + 32 * i;
            if (e < hd) acc[i] = acc[i] * corr + p * vr[e];
        }
        m = mn;
    }
    if (lane == 0) {
        wm[warp] = m;
        wl[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int e = lane + 32 * i;
        if (e < hd) wacc[warp * hd + e] = acc[i];
    }
    __syncthreads();
    float mx = NEG_INF;
    for (int w = 0; w < NW; w++) mx = fmaxf(mx, wm[w]);
    float total = 0.0f;
    for (int w = 0; w < NW; w++) total += wl[w] * expf(wm[w] - mx);
    const float* gate = qh + hd;
    float* o = out + (u64)t * heads * hd + (u64)h * hd;
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float v = 0.0f;
        for (int w = 0; w < NW; w++) v += wacc[w * hd + e] * expf(wm[w] - mx);
        v /= total;
        if (gated) v *= sigmoidf_(gate[e]);
        o[e] = v;
    }
}
