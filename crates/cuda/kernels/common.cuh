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

#define NEG_INF __int_as_float(0xff800000)

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
        const int bits = Fmt<F>::BITS;
        const int per_word = 32 / bits;
        const u32 mask = (1u << bits) - 1u;
#pragma unroll
        for (int i = 0; i < 4; i++) {
#pragma unroll
            for (int j = 0; j < per_word; j++) w[i * per_word + j] = fmaf(s, (float)((words[i] >> (bits * j)) & mask), b);
        }
    }
}

#define FOR_EACH_FORMAT(X) X(f32, FMT_F32) X(f16, FMT_F16) X(bf16, FMT_BF16) X(q8, FMT_Q8) X(q4, FMT_Q4) X(q2, FMT_Q2)
