// Norms and the small data-movement kernels.

// The norm weights a thread uses (elements threadIdx.x + i * blockDim.x), loaded before waiting
// for the kernel ahead: weights are never written by kernels, and the load's round trip then
// overlaps the wait instead of following the sum.
#define NORM_HELD 8

__device__ __forceinline__ void load_norm_weights(const float* __restrict__ w, int width, float* held) {
#pragma unroll
    for (int i = 0; i < NORM_HELD; i++) {
        const int j = threadIdx.x + i * blockDim.x;
        held[i] = j < width ? w[j] : 0.0f;
    }
}

// out = x * inv * (offset + w) over a row, with the weights from `load_norm_weights` and the first
// NORM_HELD of the thread's inputs in `vals` (kept from the sum, not read again).
__device__ __forceinline__ void write_normed(const float* __restrict__ x, const float* __restrict__ w,
                                             const float* held, const float* vals, int width, float inv,
                                             float offset, float* __restrict__ out) {
#pragma unroll
    for (int i = 0; i < NORM_HELD; i++) {
        const int j = threadIdx.x + i * blockDim.x;
        if (j < width) out[j] = vals[i] * inv * (offset + held[i]);
    }
    for (int j = threadIdx.x + NORM_HELD * blockDim.x; j < width; j += blockDim.x)
        out[j] = x[j] * inv * (offset + w[j]);
}

// The sum of squares of a row's inputs `v(j)` that the thread takes, the first NORM_HELD of them
// kept in `vals`.
template <typename V>
__device__ __forceinline__ float held_squares(int width, V v, float* vals) {
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < NORM_HELD; i++) {
        const int j = threadIdx.x + i * blockDim.x;
        vals[i] = j < width ? v(j) : 0.0f;
        ss = fmaf(vals[i], vals[i], ss);
    }
    for (int j = threadIdx.x + NORM_HELD * blockDim.x; j < width; j += blockDim.x) {
        const float t = v(j);
        ss = fmaf(t, t, ss);
    }
    return ss;
}

// `out = x / rms(x) * (offset + w)` per row of `width`; one block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w, float* __restrict__ out,
                                    int width, float offset, float eps) {
    __shared__ float red[32];
    float held[NORM_HELD], vals[NORM_HELD];
    load_norm_weights(w, width, held);
    grid_start();
    const u64 base = (u64)blockIdx.x * width;
    const float total = block_sum(held_squares(width, [&](int j) { return x[base + j]; }, vals), red);
    const float inv = 1.0f / sqrtf(total / (float)width + eps);
    write_normed(x + base, w, held, vals, width, inv, offset, out + base);
}

// x += delta, then out = x / rms(x) * (offset + w), per row of `width`: the residual add and the
// next norm in one launch (the same thread mapping as `rms_norm`, so the same sums).
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const float* __restrict__ delta,
                                        const float* __restrict__ w, float* __restrict__ out, int width, float offset,
                                        float eps) {
    __shared__ float red[32];
    float held[NORM_HELD], vals[NORM_HELD];
    load_norm_weights(w, width, held);
    grid_start();
    const u64 base = (u64)blockIdx.x * width;
    const auto add = [&](int j) {
        const float v = x[base + j] + delta[base + j];
        x[base + j] = v;
        return v;
    };
    const float total = block_sum(held_squares(width, add, vals), red);
    const float inv = 1.0f / sqrtf(total / (float)width + eps);
    write_normed(x + base, w, held, vals, width, inv, offset, out + base);
}

extern "C" __global__ void add_inplace(float* __restrict__ acc, const float* __restrict__ x, u64 len) {
    grid_start();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x) acc[i] += x[i];
}

// xs[i] = x[rows[i]] for rows of `width`.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const u32* __restrict__ rows, int width, int n,
                                       float* __restrict__ xs) {
    grid_start();
    const int i = blockIdx.x;
    if (i >= n) return;
    const u64 src = (u64)rows[i] * width, dst = (u64)i * width;
    for (int j = threadIdx.x; j < width; j += blockDim.x) xs[dst + j] = x[src + j];
}

// gate = silu(gate) * up.
extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, u64 len) {
    grid_start();
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < len; i += (u64)gridDim.x * blockDim.x)
        gate[i] = siluf_(gate[i]) * up[i];
}

// acc[rows[i]] += scales[i] * y[i]; the rows are distinct.
extern "C" __global__ void scatter_add(float* __restrict__ acc, const float* __restrict__ y, const u32* __restrict__ rows,
                                       const float* __restrict__ scales, int width, int n) {
    grid_start();
    const int i = blockIdx.x;
    if (i >= n) return;
    const u64 dst = (u64)rows[i] * width, src = (u64)i * width;
    const float s = scales[i];
    for (int j = threadIdx.x; j < width; j += blockDim.x) acc[dst + j] += s * y[src + j];
}

// The argmax of x[0..n), ties to the lowest index, NaNs passed over, as an `order_key`. Every
// block's largest key goes to `key` (zeroed first) by an atomic maximum; 0 means no value
// compared (all NaN, or n = 0).
extern "C" __global__ void argmax_key(const float* __restrict__ x, u64 n, unsigned long long* key) {
    __shared__ unsigned long long best_of[32];
    grid_start();
    unsigned long long best = 0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = x[i];
        if (v != v) continue;
        const unsigned long long k = order_key(v, (u32)i);
        best = k > best ? k : best;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, best, o);
        best = other > best ? other : best;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) best_of[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) best = best_of[w] > best ? best_of[w] : best;
        atomicMax(key, best);
    }
}

// ---- The first kernel of a recorded decode step (graph.rs), one thread. The host writes each
// step's inputs (token, position, live, sequence number) to slot `sequence % STEP_SLOTS` of
// page-locked `slots`, possibly after the step was queued; the gate waits for its step's slot,
// copies it to `step` (token, position, live, sequence), where the step's kernels read it, and
// acknowledges it in the word after the slots. A step's sequence number is one past the last
// one's. It never lets the next kernel start early: nothing of the step may run before its
// inputs are known, nor before everything queued ahead of it has ended.
#define STEP_SLOTS 4

extern "C" __global__ void step_gate(u32* slots, u32* step) {
    const u32 want = step[3] + 1;
    const u32* slot = slots + (want % STEP_SLOTS) * 4;
    u32 seq, token, position, live;
    do {
        asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(seq) : "l"(slot + 3) : "memory");
    } while (seq != want);
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(token) : "l"(slot) : "memory");
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(position) : "l"(slot + 1) : "memory");
    asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(live) : "l"(slot + 2) : "memory");
    step[0] = token;
    step[1] = position;
    step[2] = live;
    step[3] = want;
    asm volatile("st.relaxed.sys.global.u32 [%0], %1;" ::"l"(slots + STEP_SLOTS * 4), "r"(want) : "memory");
}
