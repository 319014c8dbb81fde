// Shared helpers of every flash-moe kernel. The .cu files are concatenated after this one into
// a single NVRTC program (see crates/cuda/src/kernels.rs), so there are no #include lines.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;

// Weight formats, as numbered by the host (`moe_cuda::format_code`).
#define FMT_F32 0
#define FMT_F16 1
#define FMT_BF16 2
#define FMT_Q8 3
#define FMT_Q4 4
#define FMT_Q2 5

// Affine formats quantise groups of 64 inputs with one bf16 scale and bias.
#define GROUP 64

template <int F> struct Fmt;
template <> struct Fmt<FMT_F32> { static const int BITS = 32; static const bool AFFINE = false; };
template <> struct Fmt<FMT_F16> { static const int BITS = 16; static const bool AFFINE = false; };
template <> struct Fmt<FMT_BF16> { static const int BITS = 16; static const bool AFFINE = false; };
template <> struct Fmt<FMT_Q8> { static const int BITS = 8; static const bool AFFINE = true; };
template <> struct Fmt<FMT_Q4> { static const int BITS = 4; static const bool AFFINE = true; };
template <> struct Fmt<FMT_Q2> { static const int BITS = 2; static const bool AFFINE = true; };

// Early launch (programmatic dependent launch, sm_90+; see launch.rs): a kernel may start while
// the one before it in the stream still runs. `grid_wait` returns once that one has finished and
// its writes are visible (and so has every kernel before it, since each waited in turn); every
// kernel calls it before it reads anything an earlier kernel writes and before it writes anything.
// `grid_release` lets the next kernel start once every block of this one has called it or ended.
__device__ __forceinline__ void grid_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void grid_release() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The start of a kernel that reads its inputs at once.
__device__ __forceinline__ void grid_start() {
    grid_release();
    grid_wait();
}

// A recorded step queued before its token was known may be let pass instead (`step_gate`): its
// kernels that write a recurrent state or a cache then leave it as it was. `live` is the step's
// flag (read after `grid_wait`), null outside recorded steps.
__device__ __forceinline__ bool step_skipped(const u32* live) { return live != nullptr && *live == 0; }

#define NEG_INF __int_as_float(0xff800000)

// Value `v` at index `i` as a key that orders as (value, -index): the value's bits made to order as
// unsigned integers (-0 taken as +0, which compares equal; NaN below every number), then the
// index's complement. Every key is non-zero.
__device__ __forceinline__ unsigned long long order_key(float v, u32 i) {
    u32 b = __float_as_uint(v == 0.0f ? 0.0f : v);
    b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
    if (v != v) b = 0;
    return ((unsigned long long)b << 32) | (0xffffffffu - i);
}

// The value of an `order_key` (+0 for -0; NaN for NaN).
__device__ __forceinline__ float key_value(unsigned long long key) {
    const u32 b = (u32)(key >> 32);
    return __uint_as_float((b & 0x80000000u) ? (b & 0x7fffffffu) : ~b);
}

__device__ __forceinline__ float bf16_to_f32(u32 bits) { return __uint_as_float(bits << 16); }

__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float siluf_(float x) { return x * sigmoidf_(x); }
// torch's softplus (beta 1, threshold 20).
__device__ __forceinline__ float softplusf_(float x) { return x > 20.0f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the whole block; every thread gets the total. `red` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < warps ? red[lane] : 0.0f;
    return warp_sum(t);
}

// Element (row, k) of a weight matrix: the scalar definition (`Matrix::row_f32`).
template <int F>
__device__ __forceinline__ float weight_at(const u8* data, const u16* scales, const u16* biases, u64 row, int cols,
                                           int k) {
    if constexpr (F == FMT_F32) return ((const float*)data)[row * cols + k];
    else if constexpr (F == FMT_F16) return f16_to_f32(((const u16*)data)[row * cols + k]);
    else if constexpr (F == FMT_BF16) return bf16_to_f32(((const u16*)data)[row * cols + k]);
    else {
    const int bits = Fmt<F>::BITS;
    const int per_word = 32 / bits;
    const u32 mask = (1u << bits) - 1u;
    const u64 words_per_row = cols / per_word;
    const u32 word = ((const u32*)data)[row * words_per_row + k / per_word];
    const u32 code = (word >> (bits * (k % per_word))) & mask;
    const u64 g = row * (u64)(cols / GROUP) + k / GROUP;
    return fmaf(bf16_to_f32(scales[g]), (float)code, bf16_to_f32(biases[g]));
    }
}

// Decodes one 16-byte chunk of a row: 4 (f32), 8 (f16/bf16), 16 (q8), 32 (q4) or 64 (q2)
// elements, with the affine group's scale `s` and bias `b`.
template <int F> struct Chunk { static const int E = 128 / Fmt<F>::BITS; };

// A byte of `word` as an exact float: placed in the mantissa of 2^23 by one byte permute, then
// 2^23 subtracted (cheaper than an integer-to-float conversion, which runs at a quarter rate).
__device__ __forceinline__ float byte_to_f32(u32 word, int byte) {
    return __uint_as_float(__byte_perm(word, 0x4B000000u, 0x7540u + byte)) - 8388608.0f;
}

// Masks a word of affine codes to the lowest code of each byte (8-bit codes: the whole word).
template <int F>
__device__ __forceinline__ u32 byte_code_mask() {
    return Fmt<F>::BITS == 8 ? 0xffffffffu : (Fmt<F>::BITS == 4 ? 0x0f0f0f0fu : 0x03030303u);
}

// The codes of an affine chunk as exact floats, lowest first: codes of `bits` bits; masking the
// word at shift `sh` leaves in byte `j` the code number `j * per_byte + sh / bits`, which
// `byte_to_f32` turns into a float.
template <int F>
__device__ __forceinline__ void decode_codes(uint4 raw, float* q) {
    const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
    const int bits = Fmt<F>::BITS;
    const int per_byte = 8 / bits;
    const int per_word = 32 / bits;
    const u32 mask = byte_code_mask<F>();
#pragma unroll
    for (int i = 0; i < 4; i++) {
#pragma unroll
        for (int sh = 0; sh < 8; sh += bits) {
            const u32 m = (words[i] >> sh) & mask;
#pragma unroll
            for (int j = 0; j < 4; j++) q[i * per_word + j * per_byte + sh / bits] = byte_to_f32(m, j);
        }
    }
}

template <int F>
__device__ __forceinline__ void decode_chunk(uint4 raw, float s, float b, float* w) {
    const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (F == FMT_F32) {
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = __uint_as_float(words[i]);
    } else if constexpr (F == FMT_BF16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = __uint_as_float(words[i] << 16);
            w[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
        }
    } else if constexpr (F == FMT_F16) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[2 * i] = f16_to_f32((u16)(words[i] & 0xffffu));
            w[2 * i + 1] = f16_to_f32((u16)(words[i] >> 16));
        }
    } else {
        decode_codes<F>(raw, w);
#pragma unroll
        for (int i = 0; i < Chunk<F>::E; i++) w[i] = fmaf(s, w[i], b);
    }
}

// A 16-byte load of weights that are read once: not kept in L1 (which holds the inputs).
// Volatile: the compiler must not hoist it above the bounds checks that guard it (a plain asm is
// taken for a pure function of its operands and may be speculated).
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

// `acc[t] += dot(chunk c of a row, x[t])` for the first `nt` of NT input rows (`xstride` apart).
// `sc`/`bi` are the row's group scales and biases (affine formats).
template <int F, int NT>
__device__ __forceinline__ void chunk_dot(uint4 raw, const u16* __restrict__ sc, const u16* __restrict__ bi, int c,
                                          const float* __restrict__ x, u64 xstride, int nt, float* acc) {
    const int E = Chunk<F>::E;
    float s = 0.0f, b = 0.0f;
    if (Fmt<F>::AFFINE) {
        const int g = (c * E) / GROUP;
        s = bf16_to_f32(__ldg(sc + g));
        b = bf16_to_f32(__ldg(bi + g));
    }
    float w[E];
    decode_chunk<F>(raw, s, b, w);
#pragma unroll
    for (int t = 0; t < NT; t++) {
        if (NT == 1 || t < nt) {
            const float4* xv = (const float4*)(x + (u64)t * xstride + (u64)c * E);
            float a = acc[t];
#pragma unroll
            for (int i = 0; i < E / 4; i++) {
                const float4 v = __ldg(xv + i);
                a = fmaf(w[4 * i], v.x, a);
                a = fmaf(w[4 * i + 1], v.y, a);
                a = fmaf(w[4 * i + 2], v.z, a);
                a = fmaf(w[4 * i + 3], v.w, a);
            }
            acc[t] = a;
        }
    }
}

// ---- One token (decode): a block of DEC_THREADS threads computes DEC_ROWS rows together. Every
// thread takes chunk positions t, t + DEC_THREADS, ... of all the rows, so that it loads each
// input chunk once for DEC_ROWS weight chunks (the input is read from L1 a quarter as often as
// with one row per warp) and has DEC_ROWS loads in flight per position; the partial sums are
// reduced over the block at the end.

#define DEC_ROWS 4
#define DEC_THREADS 128

// Row i of a block's DEC_ROWS (the first `nr` of them real) in rows of `chunks` 16-byte chunks
// and `groups` affine groups: its offset in chunks and in groups from the block's first row. Rows
// past the end (the last block's) read the first row again, and their sums are not stored: the
// loads need no bounds and no 64-bit row products (a tenth of the one-token matvec's
// instructions, 960 -> 864 in its disassembly).
struct RowOffsets {
    int nr, chunks, groups;
    __device__ __forceinline__ int chunk(int i) const { return i < nr ? i * chunks : 0; }
    __device__ __forceinline__ int group(int i) const { return i < nr ? i * groups : 0; }
};

// The E inputs of one chunk, as a one-token kernel holds them for every row it multiplies them
// with. Float formats: the inputs. Affine formats: the inputs as 16-bit integers, two to a word,
// x_i ~ scale * q_i (scale = max |x_i| / 32767 over the chunk), in the order `dot_chunk` pairs
// them with the codes, and the inputs' sum (for the biases).
template <int F, bool A = Fmt<F>::AFFINE> struct XChunk;
template <int F> struct XChunk<F, false> { float v[Chunk<F>::E]; };
template <int F> struct XChunk<F, true> {
    u32 q[Chunk<F>::E / 2];
    float scale, sum;
};

// Input pair p of an affine chunk: the inputs whose codes share the bytes `dot_chunk` hands one
// dp2a: word w of the codes holds 32 / bits codes, code k at bits k * bits; masked at shift
// s * bits (s < 8 / bits), byte j of it is code 8 / bits * j + s; a dp2a takes bytes 0, 1 (lo)
// or 2, 3 (hi). Pairs per word: two per shift.
template <int F>
__device__ __forceinline__ void x_pair(int p, int* a, int* b) {
    const int per_byte = 8 / Fmt<F>::BITS, per_word = 32 / Fmt<F>::BITS;
    const int w = p / (2 * per_byte), r = p % (2 * per_byte), s = r / 2, h = r % 2;
    *a = w * per_word + per_byte * 2 * h + s;
    *b = w * per_word + per_byte * (2 * h + 1) + s;
}

// The low 16 bits of round(v): v + 1.5 * 2^23 holds it in its mantissa's low bits (|v| < 2^22),
// one multiply-add instead of a conversion (which runs at a quarter rate).
__device__ __forceinline__ u32 round_low16(float v) {
    return __float_as_uint(v + 12582912.0f) & 0xffffu;
}

template <int F>
__device__ __forceinline__ XChunk<F> load_x(const float* __restrict__ x, int c) {
    const int E = Chunk<F>::E;
    const float4* xv = (const float4*)(x + (u64)c * E);
    float v[E];
#pragma unroll
    for (int i = 0; i < E / 4; i++) {
        const float4 t = __ldg(xv + i);
        v[4 * i] = t.x;
        v[4 * i + 1] = t.y;
        v[4 * i + 2] = t.z;
        v[4 * i + 3] = t.w;
    }
    XChunk<F> r;
    if constexpr (!Fmt<F>::AFFINE) {
#pragma unroll
        for (int i = 0; i < E; i++) r.v[i] = v[i];
    } else {
        float sum = 0.0f, most = 0.0f;
#pragma unroll
        for (int i = 0; i < E; i++) {
            sum += v[i];
            most = fmaxf(most, fabsf(v[i]));
        }
        // A chunk of zeros (or of non-finite values, which the sum carries on) gets scale 0.
        const float inv = most > 0.0f && most < 3.0e38f ? 32767.0f / most : 0.0f;
#pragma unroll
        for (int p = 0; p < E / 2; p++) {
            int i, j;
            x_pair<F>(p, &i, &j);
            r.q[p] = round_low16(v[i] * inv) | (round_low16(v[j] * inv) << 16);
        }
        r.scale = most / 32767.0f;
        r.sum = sum;
    }
    return r;
}

// The group scale and bias of chunk `c` of a row (`sc`/`bi` point at the row's groups), still in
// bf16: loaded together with the chunk's codes, so that both are in flight at once (loading them
// when the codes arrive costs a second round trip to memory).
template <int F>
__device__ __forceinline__ uint2 load_sb(const u16* __restrict__ sc, const u16* __restrict__ bi, int c) {
    if (!Fmt<F>::AFFINE) return make_uint2(0, 0);
    const int g = (c * Chunk<F>::E) / GROUP;
    return make_uint2(__ldg(sc + g), __ldg(bi + g));
}

// `load_sb` from scales and biases in shared memory (bulk copied).
template <int F>
__device__ __forceinline__ uint2 staged_sb(const u16* sc, const u16* bi, int c) {
    if (!Fmt<F>::AFFINE) return make_uint2(0, 0);
    const int g = (c * Chunk<F>::E) / GROUP;
    return make_uint2(sc[g], bi[g]);
}

// dp2a: c + the dot product of the two signed 16-bit halves of `a` with bytes 0, 1 (lo) or 2, 3
// (hi) of `b`, unsigned.
__device__ __forceinline__ int dp2a_lo(u32 a, u32 b, int c) {
    int d;
    asm("dp2a.lo.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ int dp2a_hi(u32 a, u32 b, int c) {
    int d;
    asm("dp2a.hi.s32.u32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// dot(a chunk of a row, x), with its scale and bias from `load_sb`. Affine formats as
// s * dot(codes, x) + b * sum(x), dot(codes, x) in integers: the codes masked in place (a mask
// and a shift per byte's worth of codes) and multiplied with the 16-bit inputs two at a time by
// dp2a, exact in 32 bits (at most 64 x 255 x 32767 < 2^31), then scaled once. A float decode
// took a byte permute and a multiply-add per code, and those kernels issued about as many
// instructions as device memory delivered bytes. The inputs' rounding to 16 bits (relative to
// the chunk's largest) costs about 2^-16 of the dot product, far below the codes' quantisation.
template <int F>
__device__ __forceinline__ float dot_chunk(uint4 raw, uint2 sb, const XChunk<F>& x) {
    if constexpr (Fmt<F>::AFFINE) {
        const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
        const int bits = Fmt<F>::BITS, per_byte = 8 / bits;
        const u32 mask = byte_code_mask<F>();
        int acc = 0;
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int s = 0; s < per_byte; s++) {
                const u32 m = (words[i] >> (s * bits)) & mask;
                acc = dp2a_lo(x.q[(i * per_byte + s) * 2], m, acc);
                acc = dp2a_hi(x.q[(i * per_byte + s) * 2 + 1], m, acc);
            }
        }
        return fmaf(bf16_to_f32(sb.x) * x.scale, (float)acc, bf16_to_f32(sb.y) * x.sum);
    } else {
        const int E = Chunk<F>::E;
        float w[E];
        decode_chunk<F>(raw, 0.0f, 0.0f, w);
        // Two chains of multiply-adds, so that each waits on its last result half as often.
        float a0 = 0.0f, a1 = 0.0f;
#pragma unroll
        for (int i = 0; i < E; i += 2) {
            a0 = fmaf(w[i], x.v[i], a0);
            a1 = fmaf(w[i + 1], x.v[i + 1], a1);
        }
        return a0 + a1;
    }
}

// ---- Bulk copies (sm_90 TMA): a block's weights brought into shared memory by a few copy
// instructions of one thread, instead of 16-byte loads by every thread into registers. All the
// bytes are in flight at once, no registers hold them while they arrive, and the kernels need
// fewer registers, so more blocks fit an SM. The copies complete on an mbarrier in shared memory.
// Addresses and sizes must be multiples of 16 (the host checks: `Gpu::bulk_rows`).

__device__ __forceinline__ u32 smem_address(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// Readies `bar` for one phase: one arrival (`bulk_expect`) plus the bytes of the copies.
__device__ __forceinline__ void bulk_init(u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_address(bar)) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// The arrival on `bar`, announcing `bytes` of copies.
__device__ __forceinline__ void bulk_expect(u64* bar, u32 bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_address(bar)), "r"(bytes)
                 : "memory");
#endif
}

// Copies `bytes` from global `src` to shared `dst`, completing on `bar`.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, u32 bytes, u64* bar) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                     smem_address(dst)),
                 "l"(src), "r"(bytes), "r"(smem_address(bar))
                 : "memory");
#endif
}

// Waits until the copies on `bar` have landed: of its first phase (parity 0), second (1), third
// (0) ...
__device__ __forceinline__ void bulk_wait(u64* bar, u32 parity = 0) {
#if __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}" ::"r"(smem_address(bar)),
        "r"(parity)
        : "memory");
#endif
}

// A row group in shared memory: the codes of DEC_ROWS rows (`row_bytes` each), then their scales
// and their biases (`groups` each; affine formats), as `stage_rows` copies them (the host sizes
// it: `Gpu::bulk_rows`).
template <int F>
struct StagedRows {
    const u8* base;
    u32 row_bytes;
    int groups;
    // The bytes `stage_rows` copies for `nr` rows.
    __device__ static u32 copied(u32 row_bytes, int groups, int nr) {
        return nr * (row_bytes + (Fmt<F>::AFFINE ? 4 * groups : 0));
    }
    __device__ uint4 chunk(int row, int c) const { return ((const uint4*)(base + row * row_bytes))[c]; }
    __device__ uint2 sb(int row, int c) const {
        const u16* sc = (const u16*)(base + DEC_ROWS * row_bytes);
        return staged_sb<F>(sc + row * groups, sc + DEC_ROWS * groups + row * groups, c);
    }
};

// Bulk-copies rows [r0, r0 + nr) of a matrix (codes, scales, biases) into `dst` in the layout of
// `StagedRows`, completing on `bar`.
template <int F>
__device__ __forceinline__ void stage_rows(u8* dst, const u8* codes, const u16* scales, const u16* biases,
                                           u32 row_bytes, int groups, int r0, int nr, u64* bar) {
    bulk_copy(dst, codes + (u64)r0 * row_bytes, nr * row_bytes, bar);
    if (Fmt<F>::AFFINE) {
        u16* sc = (u16*)(dst + DEC_ROWS * row_bytes);
        bulk_copy(sc, scales + (u64)r0 * groups, nr * groups * 2, bar);
        bulk_copy(sc + DEC_ROWS * groups, biases + (u64)r0 * groups, nr * groups * 2, bar);
    }
}

// The first half of `block_sums`, for blocks of any whole number of warps: every warp's sums of
// v[0..N) into `red` (N floats a warp), then a block barrier.
template <int N>
__device__ __forceinline__ void warp_partials(const float* v, float* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int i = 0; i < N; i++) {
        const float t = warp_sum(v[i]);
        if (lane == 0) red[warp * N + i] = t;
    }
    __syncthreads();
}

// The block's sum i of the N sums of `warp_partials` of `warps` warps.
template <int N>
__device__ __forceinline__ float partial_sum(const float* red, int i, int warps) {
    float t = 0.0f;
#pragma unroll 4
    for (int w = 0; w < warps; w++) t += red[w * N + i];
    return t;
}

// Sums v[0..n) over the block (DEC_THREADS threads); thread i < n gets sum i. `red` holds
// n x DEC_THREADS / 32 floats.
template <int N>
__device__ __forceinline__ void block_sums(float* v, float* red) {
    warp_partials<N>(v, red);
    if (threadIdx.x < N) v[0] = partial_sum<N>(red, threadIdx.x, DEC_THREADS / 32);
}

// One warp's partial dot products of a row of `chunks` 16-byte chunks with `nt` inputs: lane l
// takes chunks l, l + 32, ...; four loads are issued before any is used, so that enough bytes are
// in flight to keep device memory busy. The caller sums `acc` over the warp.
template <int F, int NT>
__device__ __forceinline__ void row_dot(const u8* __restrict__ row, const u16* __restrict__ sc,
                                        const u16* __restrict__ bi, int chunks, const float* __restrict__ x,
                                        u64 xstride, int nt, float* acc) {
    const int lane = threadIdx.x & 31;
    const uint4* w = (const uint4*)row;
    const int U = 4;
    int c = lane;
    for (; c + 32 * (U - 1) < chunks; c += 32 * U) {
        uint4 raw[U];
#pragma unroll
        for (int u = 0; u < U; u++) raw[u] = ld_stream(w + c + 32 * u);
#pragma unroll
        for (int u = 0; u < U; u++) chunk_dot<F, NT>(raw[u], sc, bi, c + 32 * u, x, xstride, nt, acc);
    }
    for (; c < chunks; c += 32) chunk_dot<F, NT>(ld_stream(w + c), sc, bi, c, x, xstride, nt, acc);
}

#define FOR_EACH_FORMAT(X) X(f32, FMT_F32) X(f16, FMT_F16) X(bf16, FMT_BF16) X(q8, FMT_Q8) X(q4, FMT_Q4) X(q2, FMT_Q2)
