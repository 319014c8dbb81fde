// GatedDeltaNet: causal depthwise conv + SiLU, L2-normed q/k, the gated delta rule over the
// device-resident state, gated RMSNorm. The inputs are column ranges of one projection whose
// rows are `stride` floats apart (one matmul produces them all), so each kernel takes a pointer to
// its first column and the row stride.

#define DN_MAX_KERNEL 8

// One thread per channel walks the tokens; `hist` is [kernel - 1, channels], oldest first.
extern "C" __global__ void dn_conv(const float* __restrict__ qkv, int stride, const float* __restrict__ w,
                                   float* __restrict__ hist, float* __restrict__ mixed, int channels, int kernel,
                                   int tokens) {
    const int ch = blockIdx.x * blockDim.x + threadIdx.x;
    // The weights before waiting for the kernel ahead (no kernel writes them).
    float wk[DN_MAX_KERNEL];
#pragma unroll
    for (int j = 0; j < DN_MAX_KERNEL; j++) wk[j] = j < kernel && ch < channels ? w[(u64)ch * kernel + j] : 0.0f;
    grid_start();
    if (ch >= channels) return;
    float h[DN_MAX_KERNEL - 1];
#pragma unroll
    for (int j = 0; j < DN_MAX_KERNEL - 1; j++) h[j] = j < kernel - 1 ? hist[(u64)j * channels + ch] : 0.0f;
    for (int t = 0; t < tokens; t++) {
        const float in = qkv[(u64)t * stride + ch];
        float acc = 0.0f, last = 0.0f;
#pragma unroll
        for (int j = 0; j < DN_MAX_KERNEL; j++)
            if (j == kernel - 1) last = wk[j];
        acc = last * in;
#pragma unroll
        for (int j = 0; j < DN_MAX_KERNEL - 1; j++)
            if (j < kernel - 1) acc = fmaf(wk[j], h[j], acc);
        mixed[(u64)t * channels + ch] = siluf_(acc);
#pragma unroll
        for (int j = 0; j < DN_MAX_KERNEL - 2; j++)
            if (j < kernel - 2) h[j] = h[j + 1];
#pragma unroll
        for (int j = 0; j < DN_MAX_KERNEL - 1; j++)
            if (j == kernel - 2) h[j] = in;
    }
#pragma unroll
    for (int j = 0; j < DN_MAX_KERNEL - 1; j++)
        if (j < kernel - 1) hist[(u64)j * channels + ch] = h[j];
}

// Grid (tokens, 2 * k_heads): L2-normalise each q and k head in place; q heads are also scaled
// by 1/sqrt(k_dim).
extern "C" __global__ void dn_qk_norm(float* __restrict__ mixed, int channels, int k_heads, int k_dim) {
    grid_start();
    __shared__ float red[32];
    const int t = blockIdx.x, head = blockIdx.y;
    float* x = mixed + (u64)t * channels + (u64)head * k_dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < k_dim; i += blockDim.x) ss = fmaf(x[i], x[i], ss);
    const float total = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(total + 1e-6f);
    const float scale = 1.0f / sqrtf((float)k_dim);
    for (int i = threadIdx.x; i < k_dim; i += blockDim.x) {
        float v = x[i] * inv;
        if (head < k_heads) v *= scale;
        x[i] = v;
    }
}

// The k_dim rows of a head's state are split over DN_SLICES warps, DN_ROWS rows at most each
// (DN_MAX_K_DIM in device.rs is their product).
#define DN_SLICES 8
#define DN_ROWS 40

// Grid (v_heads, ceil(v_dim / 32)), DN_SLICES warps: lane l of warp w owns value column
// blockIdx.y * 32 + l of the head's [k_dim, v_dim] state, rows w, w + DN_SLICES, ..., kept in
// registers while the block walks the tokens; the two sums over k_dim per token are completed
// across the warps in shared memory. (One warp per column block, walking all k_dim rows itself,
// left too few warps per SM to hide the latency of its loads and serial sums.)
extern "C" __global__ void __launch_bounds__(32 * DN_SLICES)
    dn_recurrence(const float* __restrict__ mixed, const float* __restrict__ beta_in, const float* __restrict__ a_in,
                  int stride, const float* __restrict__ a_log, const float* __restrict__ dt_bias,
                  float* __restrict__ ssm, float* __restrict__ out, int channels, int k_heads, int v_heads, int k_dim,
                  int v_dim, int tokens) {
    grid_start();
    extern __shared__ float smem[];
    float* qs = smem;         // k_dim
    float* ks = smem + k_dim;  // k_dim
    __shared__ float part[2][DN_SLICES][32];
    const int h = blockIdx.x;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int j = blockIdx.y * 32 + lane;
    const bool valid = j < v_dim;
    const int kh = h / (v_heads / k_heads);
    const int kw = k_heads * k_dim;
    const u64 vw = (u64)v_heads * v_dim;
    float* state = ssm + (u64)h * k_dim * v_dim;
    float S[DN_ROWS];
#pragma unroll
    for (int r = 0; r < DN_ROWS; r++) {
        const int i = r * DN_SLICES + w;
        S[r] = valid && i < k_dim ? state[(u64)i * v_dim + j] : 0.0f;
    }
    const float neg_a = -expf(a_log[h]);
    const float bias = dt_bias[h];
    for (int t = 0; t < tokens; t++) {
        const float* row = mixed + (u64)t * channels;
        __syncthreads();
        for (int i = threadIdx.x; i < k_dim; i += blockDim.x) {
            qs[i] = row[kh * k_dim + i];
            ks[i] = row[kw + kh * k_dim + i];
        }
        __syncthreads();
        const float beta = sigmoidf_(beta_in[(u64)t * stride + h]);
        const float decay = expf(neg_a * softplusf_(a_in[(u64)t * stride + h] + bias));
        const float v = valid ? row[2 * kw + (u64)h * v_dim + j] : 0.0f;
        float kv = 0.0f;
#pragma unroll
        for (int r = 0; r < DN_ROWS; r++) {
            const int i = r * DN_SLICES + w;
            if (i < k_dim) {
                S[r] *= decay;
                kv = fmaf(ks[i], S[r], kv);
            }
        }
        part[0][w][lane] = kv;
        __syncthreads();
        kv = 0.0f;
#pragma unroll
        for (int s = 0; s < DN_SLICES; s++) kv += part[0][s][lane];
        const float delta = (v - kv) * beta;
        float o = 0.0f;
#pragma unroll
        for (int r = 0; r < DN_ROWS; r++) {
            const int i = r * DN_SLICES + w;
            if (i < k_dim) {
                S[r] = fmaf(ks[i], delta, S[r]);
                o = fmaf(qs[i], S[r], o);
            }
        }
        part[1][w][lane] = o;
        __syncthreads();
        if (w == 0 && valid) {
            o = 0.0f;
#pragma unroll
            for (int s = 0; s < DN_SLICES; s++) o += part[1][s][lane];
            out[(u64)t * vw + (u64)h * v_dim + j] = o;
        }
    }
#pragma unroll
    for (int r = 0; r < DN_ROWS; r++) {
        const int i = r * DN_SLICES + w;
        if (valid && i < k_dim) state[(u64)i * v_dim + j] = S[r];
    }
}

// Grid (tokens, v_heads): o = rmsnorm(o) * w * silu(z), in place.
extern "C" __global__ void dn_gated_norm(float* __restrict__ o, const float* __restrict__ z, int stride,
                                         const float* __restrict__ w, int v_heads, int v_dim, float eps) {
    grid_start();
    __shared__ float red[32];
    const u64 base = (u64)blockIdx.x * v_heads * v_dim + (u64)blockIdx.y * v_dim;
    const float* zh = z + (u64)blockIdx.x * stride + (u64)blockIdx.y * v_dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < v_dim; i += blockDim.x) ss = fmaf(o[base + i], o[base + i], ss);
    const float total = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(total / (float)v_dim + eps);
    for (int i = threadIdx.x; i < v_dim; i += blockDim.x) o[base + i] = o[base + i] * inv * w[i] * siluf_(zh[i]);
}
