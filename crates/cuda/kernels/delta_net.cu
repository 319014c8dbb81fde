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

// Column j of a head's [k_dim, v_dim] state, rows w, w + DN_SLICES, ... of warp w, between `S`
// and the state: loaded (zeros outside it), or stored back when `store`.
__device__ __forceinline__ void dn_column(float* S, float* state, int k_dim, int v_dim, int j, bool valid,
                                          bool store) {
    const int w = threadIdx.x >> 5;
#pragma unroll
    for (int r = 0; r < DN_ROWS; r++) {
        const int i = r * DN_SLICES + w;
        if (store) {
            if (valid && i < k_dim) state[(u64)i * v_dim + j] = S[r];
        } else {
            S[r] = valid && i < k_dim ? state[(u64)i * v_dim + j] : 0.0f;
        }
    }
}

// One token of the delta rule for the state column a thread holds (`S`, rows w, w + DN_SLICES, ...
// of warp w): decay, the correction towards `v`, and the output, whose sum over k_dim (across the
// warps, in `part`) warp 0 returns. `qs` and `ks` (shared) hold the token's normed q and k.
__device__ __forceinline__ float dn_token(float* S, const float* qs, const float* ks, float v, float beta,
                                          float decay, int k_dim, float (*part)[DN_SLICES][32]) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
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
    o = 0.0f;
#pragma unroll
    for (int s = 0; s < DN_SLICES; s++) o += part[1][s][lane];
    return o;
}

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
    grid_release();
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
    dn_column(S, state, k_dim, v_dim, j, valid, false);
    const float neg_a = -expf(a_log[h]);
    const float bias = dt_bias[h];
    // The state (4 MB a layer for Qwen3.5-397B) and the weights above are loaded before waiting
    // for the kernels ahead: none of them writes them. The state's last writer is this layer's
    // own kernel of the previous forward call, which ended before the call's first kernel
    // started: a forward call's kernels all wait in turn, and a recorded step's first kernel
    // (`step_gate`) starts only after all queued before it, and lets nothing start early.
    grid_wait();
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
        const float o = dn_token(S, qs, ks, v, beta, decay, k_dim, part);
        if (w == 0 && valid) out[(u64)t * vw + (u64)h * v_dim + j] = o;
    }
    dn_column(S, state, k_dim, v_dim, j, valid, true);
}

// The causal convolution and SiLU of channel `ch` for one token (`in` its new input), from the
// history `hist` (`[kernel - 1, channels]`, oldest first), which stays as it is. Unrolled to the
// largest kernel, so that all its loads are in flight at once.
__device__ __forceinline__ float dn_conv_token(float in, const float* __restrict__ w, const float* hist, int ch,
                                               int channels, int kernel) {
    float wk[DN_MAX_KERNEL], h[DN_MAX_KERNEL - 1];
#pragma unroll
    for (int j = 0; j < DN_MAX_KERNEL; j++) wk[j] = j < kernel ? w[(u64)ch * kernel + j] : 0.0f;
#pragma unroll
    for (int j = 0; j < DN_MAX_KERNEL - 1; j++) h[j] = j < kernel - 1 ? hist[(u64)j * channels + ch] : 0.0f;
    float last = 0.0f;
#pragma unroll
    for (int j = 0; j < DN_MAX_KERNEL; j++)
        if (j == kernel - 1) last = wk[j];
    float acc = last * in;
#pragma unroll
    for (int j = 0; j < DN_MAX_KERNEL - 1; j++)
        if (j < kernel - 1) acc = fmaf(wk[j], h[j], acc);
    return siluf_(acc);
}

// One token (decode) through the convolution, the q/k norms and the recurrence in one launch:
// grid and warps as `dn_recurrence`, each block convolving the channels it reads (its key head's
// q and k, its value columns) itself. The history moves on in `dn_finish`, after every block has
// read it (a key head's channels are read by the blocks of all its value heads). As separate
// launches, the convolution and the norms took 4 us a layer on an H200 before the recurrence
// could start.
extern "C" __global__ void __launch_bounds__(32 * DN_SLICES)
    dn_step(const float* __restrict__ qkv, const float* __restrict__ conv_w, const float* __restrict__ hist,
            const float* __restrict__ beta_in, const float* __restrict__ a_in, const float* __restrict__ a_log,
            const float* __restrict__ dt_bias, float* __restrict__ ssm, float* __restrict__ out, int channels,
            int k_heads, int v_heads, int k_dim, int v_dim, int kernel, const u32* live) {
    grid_release();
    extern __shared__ float smem[];
    float* qs = smem;          // k_dim
    float* ks = smem + k_dim;  // k_dim
    __shared__ float part[2][DN_SLICES][32];
    __shared__ float norms[2][DN_SLICES];
    __shared__ float vs[32];
    const int h = blockIdx.x;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int j = blockIdx.y * 32 + lane;
    const bool valid = j < v_dim;
    const int kh = h / (v_heads / k_heads);
    const int kw = k_heads * k_dim;
    float* state = ssm + (u64)h * k_dim * v_dim;
    float S[DN_ROWS];
    dn_column(S, state, k_dim, v_dim, j, valid, false);
    const float neg_a = -expf(a_log[h]);
    const float bias = dt_bias[h];
    // As `dn_recurrence`, the state and the weights before waiting.
    grid_wait();
    if (step_skipped(live)) return;
    // The block's q and k channels, then (i >= 2 k_dim) its 32 value columns.
    float sq = 0.0f, sk = 0.0f;
    for (int i = threadIdx.x; i < 2 * k_dim + 32; i += blockDim.x) {
        if (i >= 2 * k_dim) {
            const int col = blockIdx.y * 32 + i - 2 * k_dim, ch = 2 * kw + h * v_dim + col;
            vs[i - 2 * k_dim] = col < v_dim ? dn_conv_token(qkv[ch], conv_w, hist, ch, channels, kernel) : 0.0f;
            continue;
        }
        const int ch = i < k_dim ? kh * k_dim + i : kw + kh * k_dim + i - k_dim;
        const float c = dn_conv_token(qkv[ch], conv_w, hist, ch, channels, kernel);
        if (i < k_dim) {
            qs[i] = c;
            sq = fmaf(c, c, sq);
        } else {
            ks[i - k_dim] = c;
            sk = fmaf(c, c, sk);
        }
    }
    sq = warp_sum(sq);
    sk = warp_sum(sk);
    if (lane == 0) {
        norms[0][w] = sq;
        norms[1][w] = sk;
    }
    __syncthreads();
    sq = 0.0f;
    sk = 0.0f;
#pragma unroll
    for (int s = 0; s < DN_SLICES; s++) {
        sq += norms[0][s];
        sk += norms[1][s];
    }
    // As `dn_qk_norm`: L2-normed, q also scaled by 1/sqrt(k_dim).
    const float inv_q = 1.0f / sqrtf(sq + 1e-6f) * (1.0f / sqrtf((float)k_dim));
    const float inv_k = 1.0f / sqrtf(sk + 1e-6f);
    for (int i = threadIdx.x; i < k_dim; i += blockDim.x) {
        qs[i] *= inv_q;
        ks[i] *= inv_k;
    }
    __syncthreads();
    const float beta = sigmoidf_(beta_in[h]);
    const float decay = expf(neg_a * softplusf_(a_in[h] + bias));
    const float o = dn_token(S, qs, ks, vs[lane], beta, decay, k_dim, part);
    if (w == 0 && valid) out[(u64)h * v_dim + j] = o;
    dn_column(S, state, k_dim, v_dim, j, valid, true);
}

// Chunked prefill of the same rule (the WY form of transformers' torch_chunk_gated_delta_rule),
// DN_CHUNK tokens at a time: with G the running sum of the log decays inside the chunk,
//   A[i][j] = beta_i (k_i . k_j) e^(G_i - G_j) for j < i,   T = (I + A)^-1,
//   U = T (beta v),   W = T (beta e^G k),   v_new = U - W S,
//   o_i = e^(G_i) q_i S + sum_(j <= i) (q_i . k_j) e^(G_i - G_j) v_new_j,
//   S <- e^(G_last) S + sum_j e^(G_last - G_j) k_j v_new_j^T.
// Every exponent is of a difference G_i - G_j <= 0 (or of G_i <= 0), so strong decays underflow
// to 0 instead of overflowing. Grid (v_heads, ceil(v_dim / DN_COLS)), DN_CHUNK_THREADS threads:
// a block keeps its DN_COLS state columns in shared memory; T and W depend only on keys and are
// recomputed by each column block of a head, which is cheaper than a second launch.
#define DN_CHUNK 32
#define DN_COLS 32
#define DN_CHUNK_THREADS 256
#define DN_CHUNK_ROWS (DN_CHUNK * 32 / DN_CHUNK_THREADS)

extern "C" __global__ void __launch_bounds__(DN_CHUNK_THREADS)
    dn_chunk(const float* __restrict__ mixed, const float* __restrict__ beta_in, const float* __restrict__ a_in,
             int stride, const float* __restrict__ a_log, const float* __restrict__ dt_bias, float* __restrict__ ssm,
             float* __restrict__ out, int channels, int k_heads, int v_heads, int k_dim, int v_dim, int tokens) {
    grid_start();
    extern __shared__ float smem[];
    // Rows padded by one float: the (i, j) products read rows i and j of K in the same step.
    const int kp = k_dim + 1;
    float* ks = smem;                 // [DN_CHUNK][kp]
    float* qs = ks + DN_CHUNK * kp;    // [DN_CHUNK][kp]; W once the products with q are done
    float* S = qs + DN_CHUNK * kp;     // [k_dim][DN_COLS]
    __shared__ float vs[DN_CHUNK][DN_COLS + 1];  // this block's value columns, then v_new
    __shared__ float tm[DN_CHUNK][DN_CHUNK + 1];  // A, then T
    __shared__ float pm[DN_CHUNK][DN_CHUNK + 1];  // (q_i . k_j) e^(G_i - G_j), j <= i
    __shared__ float cum[DN_CHUNK], beta[DN_CHUNK], beta_eg[DN_CHUNK], to_last[DN_CHUNK];
    const int h = blockIdx.x, c0 = blockIdx.y * DN_COLS;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int warps = DN_CHUNK_THREADS / 32;
    const bool valid = c0 + lane < v_dim;
    const int kh = h / (v_heads / k_heads);
    const int kw = k_heads * k_dim;
    const u64 vw = (u64)v_heads * v_dim;
    float* state = ssm + (u64)h * k_dim * v_dim + c0;
    for (int m = w; m < k_dim; m += warps) S[m * DN_COLS + lane] = valid ? state[(u64)m * v_dim + lane] : 0.0f;
    const float neg_a = -expf(a_log[h]);
    const float bias = dt_bias[h];
    for (int t0 = 0; t0 < tokens; t0 += DN_CHUNK) {
        const int n = min(DN_CHUNK, tokens - t0);
        // Padding tokens have k = v = beta = 0 and no decay: they change nothing.
        for (int idx = threadIdx.x; idx < DN_CHUNK * k_dim; idx += DN_CHUNK_THREADS) {
            const int i = idx / k_dim, m = idx - i * k_dim;
            const float* row = mixed + (u64)(t0 + i) * channels + kh * k_dim;
            ks[i * kp + m] = i < n ? row[kw + m] : 0.0f;
            qs[i * kp + m] = i < n ? row[m] : 0.0f;
        }
        for (int i = w; i < DN_CHUNK; i += warps)
            vs[i][lane] = i < n && valid ? mixed[(u64)(t0 + i) * channels + 2 * kw + (u64)h * v_dim + c0 + lane] : 0.0f;
        if (w == 0) {
            const u64 at = (u64)(t0 + lane) * stride + h;
            const float b = lane < n ? sigmoidf_(beta_in[at]) : 0.0f;
            float g = lane < n ? neg_a * softplusf_(a_in[at] + bias) : 0.0f;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float up = __shfl_up_sync(0xffffffffu, g, o);
                if (lane >= o) g += up;
            }
            const float last = __shfl_sync(0xffffffffu, g, 31);
            cum[lane] = g;
            beta[lane] = b;
            beta_eg[lane] = b * expf(g);
            to_last[lane] = expf(last - g);
        }
        __syncthreads();
        // A, the q.k products, and the part of the output that the state before the chunk gives.
        for (int p = threadIdx.x; p < DN_CHUNK * DN_CHUNK; p += DN_CHUNK_THREADS) {
            const int i = p / DN_CHUNK, j = p % DN_CHUNK;
            float kk = 0.0f, qk = 0.0f;
            for (int m = 0; m < k_dim; m++) {
                const float kj = ks[j * kp + m];
                kk = fmaf(ks[i * kp + m], kj, kk);
                qk = fmaf(qs[i * kp + m], kj, qk);
            }
            const float decay = j <= i ? expf(cum[i] - cum[j]) : 0.0f;
            tm[i][j] = j < i ? beta[i] * kk * decay : 0.0f;
            pm[i][j] = qk * decay;
        }
        float o[DN_CHUNK_ROWS], u[DN_CHUNK_ROWS];
#pragma unroll
        for (int r = 0; r < DN_CHUNK_ROWS; r++) {
            const int i = w + r * warps;
            float acc = 0.0f;
            for (int m = 0; m < k_dim; m++) acc = fmaf(qs[i * kp + m], S[m * DN_COLS + lane], acc);
            o[r] = expf(cum[i]) * acc;
        }
        __syncthreads();
        // T = (I + A)^-1 by forward substitution, one row at a time, lane j owning column j;
        // rows above i already hold T (diagonal 1), row i still holds A.
        if (w == 0) {
            for (int i = 0; i < DN_CHUNK; i++) {
                float s = 0.0f;
                for (int m = 0; m < i; m++) s = fmaf(tm[i][m], tm[m][lane], s);
                __syncwarp();
                tm[i][lane] = lane < i ? -s : (lane == i ? 1.0f : 0.0f);
                __syncwarp();
            }
        }
        __syncthreads();
        float* W = qs;
        for (int idx = threadIdx.x; idx < DN_CHUNK * k_dim; idx += DN_CHUNK_THREADS) {
            const int i = idx / k_dim, m = idx - i * k_dim;
            float acc = 0.0f;
            for (int j = 0; j <= i; j++) acc = fmaf(tm[i][j] * beta_eg[j], ks[j * kp + m], acc);
            W[i * kp + m] = acc;
        }
#pragma unroll
        for (int r = 0; r < DN_CHUNK_ROWS; r++) {
            const int i = w + r * warps;
            float acc = 0.0f;
            for (int j = 0; j <= i; j++) acc = fmaf(tm[i][j] * beta[j], vs[j][lane], acc);
            u[r] = acc;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < DN_CHUNK_ROWS; r++) {
            const int i = w + r * warps;
            float acc = u[r];
            for (int m = 0; m < k_dim; m++) acc = fmaf(-W[i * kp + m], S[m * DN_COLS + lane], acc);
            vs[i][lane] = acc;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < DN_CHUNK_ROWS; r++) {
            const int i = w + r * warps;
            float acc = o[r];
            for (int j = 0; j <= i; j++) acc = fmaf(pm[i][j], vs[j][lane], acc);
            if (i < n && valid) out[(u64)(t0 + i) * vw + (u64)h * v_dim + c0 + lane] = acc;
        }
        const float keep = expf(cum[DN_CHUNK - 1]);
        for (int m = w; m < k_dim; m += warps) {
            float acc = S[m * DN_COLS + lane] * keep;
            for (int j = 0; j < DN_CHUNK; j++) acc = fmaf(ks[j * kp + m] * to_last[j], vs[j][lane], acc);
            S[m * DN_COLS + lane] = acc;
        }
        __syncthreads();
    }
    for (int m = w; m < k_dim; m += warps)
        if (valid) state[(u64)m * v_dim + lane] = S[m * DN_COLS + lane];
}

// o = rmsnorm(o) * w * silu(z) for the head of `o` (v_dim values) and `z`, in place, by the block.
__device__ __forceinline__ void dn_gated_norm_head(float* o, const float* z, const float* __restrict__ w, int v_dim,
                                                   float eps) {
    __shared__ float red[32];
    float ss = 0.0f;
    for (int i = threadIdx.x; i < v_dim; i += blockDim.x) ss = fmaf(o[i], o[i], ss);
    const float total = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(total / (float)v_dim + eps);
    for (int i = threadIdx.x; i < v_dim; i += blockDim.x) o[i] = o[i] * inv * w[i] * siluf_(z[i]);
}

// Grid (tokens, v_heads): the gated norm of every head, in place.
extern "C" __global__ void dn_gated_norm(float* __restrict__ o, const float* __restrict__ z, int stride,
                                         const float* __restrict__ w, int v_heads, int v_dim, float eps) {
    grid_start();
    dn_gated_norm_head(o + (u64)blockIdx.x * v_heads * v_dim + (u64)blockIdx.y * v_dim,
                       z + (u64)blockIdx.x * stride + (u64)blockIdx.y * v_dim, w, v_dim, eps);
}

// Grid (v_heads), after `dn_step`: the gated norm of every head of the token, and the
// convolution's history moved on by the token's inputs `qkv` (channels spread over the blocks).
extern "C" __global__ void dn_finish(float* __restrict__ o, const float* __restrict__ z,
                                     const float* __restrict__ w, int v_dim, float eps,
                                     const float* __restrict__ qkv, float* __restrict__ hist, int channels,
                                     int kernel, const u32* live) {
    grid_start();
    if (step_skipped(live)) return;
    // The history first: its stores need not wait for the norm's loads.
    for (int ch = blockIdx.x * blockDim.x + threadIdx.x; ch < channels; ch += gridDim.x * blockDim.x) {
        float h[DN_MAX_KERNEL - 1];
#pragma unroll
        for (int j = 0; j < DN_MAX_KERNEL - 1; j++)
            h[j] = j + 1 < kernel - 1 ? hist[(u64)(j + 1) * channels + ch] : j + 1 == kernel - 1 ? qkv[ch] : 0.0f;
#pragma unroll
        for (int j = 0; j < DN_MAX_KERNEL - 1; j++)
            if (j < kernel - 1) hist[(u64)j * channels + ch] = h[j];
    }
    dn_gated_norm_head(o + (u64)blockIdx.x * v_dim, z + (u64)blockIdx.x * v_dim, w, v_dim, eps);
}
