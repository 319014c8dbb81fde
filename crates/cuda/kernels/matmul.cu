// Matrix products `out[t] = W x[t]` over every weight format, and the embedding lookup.
// `x` is [tokens, cols], `out` is [tokens, rows], both row-major f32.

// ---- A few tokens (short batches): one warp per weight row, 16-byte streaming loads several in
// flight, each weight chunk decoded once and used for up to NT tokens.

#define MV_TOKENS 8
#define MV_WARPS 8

template <int F, int NT>
__device__ __forceinline__ void matvec_impl(const u8* __restrict__ data, const u16* __restrict__ scales,
                                            const u16* __restrict__ biases, int rows, int cols,
                                            const float* __restrict__ x, int tokens, float* __restrict__ out,
                                            int vec) {
    grid_start();
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (row >= rows) return;
    const u64 row_bytes = (u64)cols * Fmt<F>::BITS / 8;
    const int groups = cols / GROUP;
    const u16* sc = Fmt<F>::AFFINE ? scales + (u64)row * groups : scales;
    const u16* bi = Fmt<F>::AFFINE ? biases + (u64)row * groups : biases;
    for (int t0 = 0; t0 < tokens; t0 += NT) {
        const int nt = min(NT, tokens - t0);
        float acc[NT];
#pragma unroll
        for (int t = 0; t < NT; t++) acc[t] = 0.0f;
        const float* xt = x + (u64)t0 * cols;
        if (vec) {
            row_dot<F, NT>(data + (u64)row * row_bytes, sc, bi, (int)(row_bytes / 16), xt, cols, nt, acc);
        } else {
            for (int k = lane; k < cols; k += 32) {
                const float w = weight_at<F>(data, scales, biases, row, cols, k);
#pragma unroll
                for (int t = 0; t < NT; t++)
                    if (t < nt) acc[t] = fmaf(w, xt[(u64)t * cols + k], acc[t]);
            }
        }
#pragma unroll
        for (int t = 0; t < NT; t++) {
            if (t < nt) {
                const float v = warp_sum(acc[t]);
                if (lane == 0) out[(u64)(t0 + t) * rows + row] = v;
            }
        }
    }
}

// One token: DEC_ROWS rows per block (see DEC_ROWS in common.cuh); two chunk positions in flight
// per thread (one for 2-bit codes, whose 64 inputs per chunk take many registers).
template <int F>
__device__ __forceinline__ void matvec1_impl(const u8* __restrict__ data, const u16* __restrict__ scales,
                                             const u16* __restrict__ biases, int rows, int cols,
                                             const float* __restrict__ x, float* __restrict__ out, int vec) {
    __shared__ float red[DEC_ROWS * DEC_THREADS / 32];
    // The weights are loaded before waiting for the kernel ahead (they do not depend on it).
    grid_release();
    const int r0 = blockIdx.x * DEC_ROWS;
    const int nr = min(DEC_ROWS, rows - r0);
    const u64 row_bytes = (u64)cols * Fmt<F>::BITS / 8;
    const int groups = cols / GROUP;
    float acc[DEC_ROWS];
#pragma unroll
    for (int i = 0; i < DEC_ROWS; i++) acc[i] = 0.0f;
    if (vec) {
        const int chunks = (int)(row_bytes / 16);
        const int U = Chunk<F>::E >= 64 ? 1 : 2;
        const uint4* w = (const uint4*)(data + (u64)r0 * row_bytes);
        const u16 *sc = scales + (u64)r0 * groups, *bi = biases + (u64)r0 * groups;
        const RowOffsets o{nr, chunks, groups};
        for (int c0 = threadIdx.x; c0 < chunks; c0 += DEC_THREADS * U) {
            uint4 raw[U][DEC_ROWS];
            uint2 sb[U][DEC_ROWS];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * DEC_THREADS;
                if (c < chunks) {
#pragma unroll
                    for (int i = 0; i < DEC_ROWS; i++) {
                        raw[u][i] = ld_stream(w + o.chunk(i) + c);
                        sb[u][i] = load_sb<F>(sc + o.group(i), bi + o.group(i), c);
                    }
                }
            }
            grid_wait();
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int c = c0 + u * DEC_THREADS;
                if (c < chunks) {
                    const XChunk<F> xc = load_x<F>(x, c);
#pragma unroll
                    for (int i = 0; i < DEC_ROWS; i++)
                        if (i < nr) acc[i] += dot_chunk<F>(raw[u][i], sb[u][i], xc);
                }
            }
        }
    } else {
        grid_wait();
        for (int k = threadIdx.x; k < cols; k += DEC_THREADS) {
            const float xv = x[k];
#pragma unroll
            for (int i = 0; i < DEC_ROWS; i++)
                if (i < nr) acc[i] = fmaf(weight_at<F>(data, scales, biases, r0 + i, cols, k), xv, acc[i]);
        }
    }
    grid_wait();  // for threads that had no chunk
    block_sums<DEC_ROWS>(acc, red);
    if (threadIdx.x < nr) out[r0 + threadIdx.x] = acc[0];
}

// One token, a block per DEC_ROWS rows as `matvec1_impl`, the rows' codes, scales and biases
// brought into shared memory by bulk copies (see `bulk_copy`), issued before waiting for the kernel
// ahead. Shared memory: a `StagedRows`.
template <int F>
__device__ __forceinline__ void matvec1_bulk_impl(const u8* __restrict__ data, const u16* __restrict__ scales,
                                                  const u16* __restrict__ biases, int rows, int cols,
                                                  const float* __restrict__ x, float* __restrict__ out) {
    extern __shared__ __align__(128) u8 stage[];
    __shared__ __align__(8) u64 bar;
    __shared__ float red[DEC_ROWS * DEC_THREADS / 32];
    const int r0 = blockIdx.x * DEC_ROWS;
    const int nr = min(DEC_ROWS, rows - r0);
    const StagedRows<F> w{stage, (u32)((u64)cols * Fmt<F>::BITS / 8), cols / GROUP};
    if (threadIdx.x == 0) {
        bulk_init(&bar);
        bulk_expect(&bar, StagedRows<F>::copied(w.row_bytes, w.groups, nr));
        stage_rows<F>(stage, data, scales, biases, w.row_bytes, w.groups, r0, nr, &bar);
    }
    grid_release();
    __syncthreads();  // the barrier is initialised
    grid_wait();
    bulk_wait(&bar);
    float acc[DEC_ROWS];
#pragma unroll
    for (int i = 0; i < DEC_ROWS; i++) acc[i] = 0.0f;
    const int chunks = (int)(w.row_bytes / 16);
    for (int c = threadIdx.x; c < chunks; c += DEC_THREADS) {
        const XChunk<F> xc = load_x<F>(x, c);
#pragma unroll
        for (int i = 0; i < DEC_ROWS; i++)
            if (i < nr) acc[i] += dot_chunk<F>(w.chunk(i, c), w.sb(i, c), xc);
    }
    block_sums<DEC_ROWS>(acc, red);
    if (threadIdx.x < nr) out[r0 + threadIdx.x] = acc[0];
}

// ---- Many tokens: 64 rows x 64 tokens per block, weights dequantised once per tile into
// shared memory, 4x4 outputs per thread, fp32 FMA.

#define TM 64
#define TN 64
#define TK 32
#define TPAD 4

template <int F>
__device__ __forceinline__ void matmul_tiled_impl(const u8* __restrict__ data, const u16* __restrict__ scales,
                                                  const u16* __restrict__ biases, int rows, int cols,
                                                  const float* __restrict__ x, int tokens, float* __restrict__ out) {
    __shared__ __align__(16) float ws[TK][TM + TPAD];
    __shared__ __align__(16) float xs[TK][TN + TPAD];
    grid_start();
    const int tid = threadIdx.x;  // 256 threads
    const int r0 = blockIdx.x * TM, n0 = blockIdx.y * TN;
    const int ty = tid / 16, tx = tid % 16;
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    // Loader roles: 4 threads per row (or token), 8 consecutive k each.
    const int lr = tid / 4, lk = (tid % 4) * 8;
    for (int k0 = 0; k0 < cols; k0 += TK) {
        {
            const int r = r0 + lr;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int k = k0 + lk + i;
                ws[lk + i][lr] = (r < rows && k < cols) ? weight_at<F>(data, scales, biases, r, cols, k) : 0.0f;
            }
            const int n = n0 + lr;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int k = k0 + lk + i;
                xs[lk + i][lr] = (n < tokens && k < cols) ? x[(u64)n * cols + k] : 0.0f;
            }
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < TK; kk++) {
            const float4 a = *(const float4*)&ws[kk][ty * 4];
            const float4 b = *(const float4*)&xs[kk][tx * 4];
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const int n = n0 + tx * 4 + j;
        if (n >= tokens) continue;
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int r = r0 + ty * 4 + i;
            if (r < rows) out[(u64)n * rows + r] = acc[i][j];
        }
    }
}

template <int F>
__device__ __forceinline__ void embed_impl(const u8* data, const u16* scales, const u16* biases, int cols,
                                           const u32* tokens, float* out) {
    grid_start();
    const int t = blockIdx.x;
    const u64 row = tokens[t];
    for (int k = threadIdx.x; k < cols; k += blockDim.x)
        out[(u64)t * cols + k] = weight_at<F>(data, scales, biases, row, cols, k);
}

#define DEFINE_MATMUL(NAME, F)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * MV_WARPS)                                                   \
        matvec_##NAME(const u8* data, const u16* scales, const u16* biases, int rows, int cols, const float* x,  \
                      int tokens, float* out, int vec) {                                                           \
        matvec_impl<F, MV_TOKENS>(data, scales, biases, rows, cols, x, tokens, out, vec);                         \
    }                                                                                                              \
    /* One token (decode): a kernel of its own, so that it gets the registers of one accumulator. */               \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS)                                                     \
        matvec1_##NAME(const u8* data, const u16* scales, const u16* biases, int rows, int cols, const float* x, \
                       int tokens, float* out, int vec) {                                                          \
        matvec1_impl<F>(data, scales, biases, rows, cols, x, out, vec);                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS)                                                     \
        matvec1_bulk_##NAME(const u8* data, const u16* scales, const u16* biases, int rows, int cols, const float* x, \
                            float* out) {                                                                          \
        matvec1_bulk_impl<F>(data, scales, biases, rows, cols, x, out);                                            \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        matmul_##NAME(const u8* data, const u16* scales, const u16* biases, int rows, int cols, const float* x,  \
                      int tokens, float* out) {                                                                    \
        matmul_tiled_impl<F>(data, scales, biases, rows, cols, x, tokens, out);                                    \
    }                                                                                                              \
    extern "C" __global__ void embed_##NAME(const u8* data, const u16* scales, const u16* biases, int cols,      \
                                            const u32* tokens, float* out) {                                       \
        embed_impl<F>(data, scales, biases, cols, tokens, out);                                                    \
    }

FOR_EACH_FORMAT(DEFINE_MATMUL)
