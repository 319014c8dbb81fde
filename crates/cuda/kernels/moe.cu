// The mixture of experts of one decoded token: the router's softmax and top-k on the device, then
// every selected expert in two launches (gate and up with SwiGLU for all slots; down for all slots
// summed with the routing weights), so that a layer's experts cost three launches and no copy back
// to the host when every expert is resident.

#define MOE_MAX_SLOTS 16
// Router logits per lane of the top-k warp: experts up to 32 x 32.
#define ROUTE_PER_LANE 32

// Where the parts of each slot's matrices are: part p of slot k lies at `base[k] + off[p]`, or at
// `table[ids[k]] + off[p]` when a table is given (every expert of the layer resident, the ids
// chosen on the device). Parts: gate codes, scales, biases; up ...; down ... (scales and biases
// unused by float formats). Mirrored by `MoeSlots` in device.rs.
struct MoeSlots {
    u64 base[MOE_MAX_SLOTS];
    u64 off[9];
    const u64* table;
    const int* ids;
};

__device__ __forceinline__ const u8* slot_part(const MoeSlots& m, int k, int p) {
    const u64 base = m.table ? m.table[m.ids[k]] : m.base[k];
    return (const u8*)(base + m.off[p]);
}

__device__ __forceinline__ void warp_argmax(float* v, int* e) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, *v, o);
        const int oe = __shfl_xor_sync(0xffffffffu, *e, o);
        if (ov > *v || (ov == *v && oe < *e)) {
            *v = ov;
            *e = oe;
        }
    }
}

// Per token (one warp each): softmax over `experts` router logits, the top `k` (ties to the lower
// id, best first) into `ids[t * k + i]` and their probabilities into `weights`, renormalised to sum
// to 1 when `norm` (as `moe_core::ops::route`).
extern "C" __global__ void __launch_bounds__(32) route_topk(const float* __restrict__ logits, int experts, int k,
                                                            int norm, int* __restrict__ ids,
                                                            float* __restrict__ weights) {
    const int t = blockIdx.x, lane = threadIdx.x;
    const float* l = logits + (u64)t * experts;
    float v[ROUTE_PER_LANE];
    float mx = NEG_INF;
#pragma unroll
    for (int j = 0; j < ROUTE_PER_LANE; j++) {
        const int e = j * 32 + lane;
        v[j] = e < experts ? l[e] : NEG_INF;
        mx = fmaxf(mx, v[j]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < ROUTE_PER_LANE; j++)
        if (j * 32 + lane < experts) sum += expf(v[j] - mx);
    sum = warp_sum(sum);
    float mine = 0.0f, picked = 0.0f;
    int my_id = 0;
    for (int i = 0; i < k; i++) {
        float best = NEG_INF;
        int be = 0x7fffffff;
#pragma unroll
        for (int j = 0; j < ROUTE_PER_LANE; j++) {
            const int e = j * 32 + lane;
            if (e < experts && (v[j] > best || be == 0x7fffffff)) {
                best = v[j];
                be = e;
            }
        }
        warp_argmax(&best, &be);
        // A NaN router output must not send an out-of-range id to the expert kernels.
        if (be >= experts) be = 0;
        if ((be & 31) == lane) {
#pragma unroll
            for (int j = 0; j < ROUTE_PER_LANE; j++)
                if (j == (be >> 5)) v[j] = NEG_INF;
        }
        const float p = expf(best - mx) / sum;
        if (lane == i) {
            mine = p;
            my_id = be;
        }
        picked += p;
    }
    if (lane < k) {
        ids[t * k + lane] = my_id;
        weights[t * k + lane] = norm ? mine / picked : mine;
    }
}

// h[k][r] = silu(gate_k[r] . x) * (up_k[r] . x) for slot k = blockIdx.y and rows r < inter (one
// warp per row); gate and up chunks are loaded together, so that four loads are in flight.
template <int F>
__device__ __forceinline__ void moe_gate_up_impl(const MoeSlots& m, const float* __restrict__ x, int hidden, int inter,
                                                 float* __restrict__ h) {
    const int k = blockIdx.y, lane = threadIdx.x & 31;
    const int r = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (r >= inter) return;
    const u64 row_bytes = (u64)hidden * Fmt<F>::BITS / 8;
    const int chunks = (int)(row_bytes / 16), groups = hidden / GROUP;
    const uint4* gw = (const uint4*)(slot_part(m, k, 0) + r * row_bytes);
    const uint4* uw = (const uint4*)(slot_part(m, k, 3) + r * row_bytes);
    const u16* gs = (const u16*)slot_part(m, k, 1) + (u64)r * groups;
    const u16* gb = (const u16*)slot_part(m, k, 2) + (u64)r * groups;
    const u16* us = (const u16*)slot_part(m, k, 4) + (u64)r * groups;
    const u16* ub = (const u16*)slot_part(m, k, 5) + (u64)r * groups;
    float g = 0.0f, u = 0.0f;
    int c = lane;
    for (; c + 32 < chunks; c += 64) {
        const uint4 g0 = ld_stream(gw + c), u0 = ld_stream(uw + c);
        const uint4 g1 = ld_stream(gw + c + 32), u1 = ld_stream(uw + c + 32);
        chunk_dot<F, 1>(g0, gs, gb, c, x, 0, 1, &g);
        chunk_dot<F, 1>(u0, us, ub, c, x, 0, 1, &u);
        chunk_dot<F, 1>(g1, gs, gb, c + 32, x, 0, 1, &g);
        chunk_dot<F, 1>(u1, us, ub, c + 32, x, 0, 1, &u);
    }
    if (c < chunks) {
        const uint4 g0 = ld_stream(gw + c), u0 = ld_stream(uw + c);
        chunk_dot<F, 1>(g0, gs, gb, c, x, 0, 1, &g);
        chunk_dot<F, 1>(u0, us, ub, c, x, 0, 1, &u);
    }
    g = warp_sum(g);
    u = warp_sum(u);
    if (lane == 0) h[(u64)k * inter + r] = siluf_(g) * u;
}

// out[r] += sum over slots k of w_k * (down_k[r] . h[k]), w_k = weights[k] (or its sigmoid when
// `sigmoid`, for the gated shared expert); one warp per output row, four slots' chunks in flight.
template <int F>
__device__ __forceinline__ void moe_down_impl(const MoeSlots& m, int slots, const float* __restrict__ h, int hidden,
                                              int inter, const float* __restrict__ weights, int sigmoid,
                                              float* __restrict__ out) {
    __shared__ float w[MOE_MAX_SLOTS];
    if (threadIdx.x < slots) {
        const float v = weights[threadIdx.x];
        w[threadIdx.x] = sigmoid ? sigmoidf_(v) : v;
    }
    __syncthreads();
    const int lane = threadIdx.x & 31;
    const int r = blockIdx.x * MV_WARPS + (threadIdx.x >> 5);
    if (r >= hidden) return;
    const u64 row_bytes = (u64)inter * Fmt<F>::BITS / 8;
    const int chunks = (int)(row_bytes / 16), groups = inter / GROUP;
    float total = 0.0f;
    for (int c = lane; c < chunks; c += 32) {
        for (int k0 = 0; k0 < slots; k0 += 4) {
            uint4 raw[4];
#pragma unroll
            for (int i = 0; i < 4; i++)
                if (k0 + i < slots) raw[i] = ld_stream((const uint4*)(slot_part(m, k0 + i, 6) + r * row_bytes) + c);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int k = k0 + i;
                if (k < slots) {
                    const u16* s = (const u16*)slot_part(m, k, 7) + (u64)r * groups;
                    const u16* b = (const u16*)slot_part(m, k, 8) + (u64)r * groups;
                    float a = 0.0f;
                    chunk_dot<F, 1>(raw[i], s, b, c, h + (u64)k * inter, 0, 1, &a);
                    total = fmaf(w[k], a, total);
                }
            }
        }
    }
    total = warp_sum(total);
    if (lane == 0) out[r] += total;
}

#define DEFINE_MOE(NAME, F)                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * MV_WARPS)                                                  \
        moe_gate_up_##NAME(const MoeSlots m, const float* x, int hidden, int inter, float* h) {                   \
        moe_gate_up_impl<F>(m, x, hidden, inter, h);                                                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(32 * MV_WARPS)                                                  \
        moe_down_##NAME(const MoeSlots m, int slots, const float* h, int hidden, int inter, const float* weights, \
                        int sigmoid, float* out) {                                                                \
        moe_down_impl<F>(m, slots, h, hidden, inter, weights, sigmoid, out);                                      \
    }

FOR_EACH_FORMAT(DEFINE_MOE)
