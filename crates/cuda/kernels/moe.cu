// The mixture of experts of one decoded token: the router's softmax and top-k on the device, then
// every selected expert in two launches (gate and up with SwiGLU for all slots; down for all slots
// summed with the routing weights), so that a layer's experts cost three launches and no copy back
// to the host when every expert is resident. Blocks of DEC_THREADS threads share a few rows, as
// the one-token matvec does.

#define MOE_MAX_SLOTS 16
// Rows of each of gate and up per `moe_gate_up` block (GATE_UP_ROWS in device.rs).
#define GATE_UP_ROWS 6
// The top-k block: experts up to ROUTE_THREADS x ROUTE_PER_THREAD (ROUTE_MAX_EXPERTS in device.rs).
#define ROUTE_THREADS 256
#define ROUTE_PER_THREAD 4

// Where the parts of each slot's matrices are: part p of slot k lies at `part[k][p]`, or at
// `table[ids[k]] + off[p]` when a table is given (every expert of the layer resident in GPU memory,
// the ids chosen on the device). Parts: gate codes, scales, biases; up ...; down ... (scales and
// biases unused by float formats). An address may be page-locked host memory, which the kernels
// then read over the bus. Mirrored by `MoeSlotsArg` in device.rs.
struct MoeSlots {
    u64 part[MOE_MAX_SLOTS][9];
    u64 off[9];
    const u64* table;
    const int* ids;
};

// Part p of slot k of a token whose chosen ids are `ids` (unused without a table: every token
// takes the listed experts).
__device__ __forceinline__ const u8* slot_part(const MoeSlots& m, const int* ids, int k, int p) {
    return (const u8*)(m.table ? m.table[ids[k]] + m.off[p] : m.part[k][p]);
}

// The largest of a warp's keys, in every lane: the largest high word, then the largest low word
// among the lanes that hold it (two warp reductions instead of five rounds of shuffles of both
// words).
__device__ __forceinline__ unsigned long long warp_max_key(unsigned long long key) {
    const u32 hi = __reduce_max_sync(0xffffffffu, (u32)(key >> 32));
    const u32 lo = __reduce_max_sync(0xffffffffu, (u32)(key >> 32) == hi ? (u32)key : 0u);
    return ((unsigned long long)hi << 32) | lo;
}

// Takes the warp's largest of `keys` (N per lane, distinct where non-zero) out of them: zeroed in
// the lane that held it, returned in every lane.
template <int N>
__device__ __forceinline__ unsigned long long warp_take_max(unsigned long long* keys) {
    unsigned long long best = keys[0];
#pragma unroll
    for (int j = 1; j < N; j++) best = keys[j] > best ? keys[j] : best;
    const unsigned long long top = warp_max_key(best);
#pragma unroll
    for (int j = 0; j < N; j++)
        if (keys[j] == top) keys[j] = 0;
    return top;
}

// Per token (one block of ROUTE_THREADS each, ROUTE_PER_THREAD logits per thread): the top `k`
// of `experts` router logits (ties to the lower id, best first; NaN below every number) into
// `ids[t * k + i]` and their softmax probabilities into `weights`, renormalised to sum to 1 when
// `norm` (as `moe_core::ops::route`). Each logit is an `order_key` with its id, so that a
// comparison of keys is the whole order. Every warp takes its own top k in k rounds of warp
// maxima (no block barrier), then warp 0 takes the top k of those. The softmax needs only the
// picked logits and, without `norm`, the sum over all. (Rounds over the whole block, each ending
// in a block barrier, took 8-9 us for the top 10 of 512 on an H200.)
extern "C" __global__ void __launch_bounds__(ROUTE_THREADS) route_topk(const float* __restrict__ logits, int experts,
                                                                       int k, int norm, int* __restrict__ ids,
                                                                       float* __restrict__ weights) {
    const int NW = ROUTE_THREADS / 32;
    const int CAND = (NW * MOE_MAX_SLOTS + 31) / 32;
    __shared__ float red[32];
    __shared__ unsigned long long cand[NW * MOE_MAX_SLOTS];
    __shared__ float top;
    grid_start();
    const int t = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float* l = logits + (u64)t * experts;
    float v[ROUTE_PER_THREAD];
    unsigned long long keys[ROUTE_PER_THREAD];
#pragma unroll
    for (int j = 0; j < ROUTE_PER_THREAD; j++) {
        const int e = j * ROUTE_THREADS + tid;
        v[j] = e < experts ? l[e] : NEG_INF;
        keys[j] = e < experts ? order_key(v[j], e) : 0;
    }
    for (int i = 0; i < k; i++) {
        const unsigned long long best = warp_take_max<ROUTE_PER_THREAD>(keys);
        if (lane == 0) cand[warp * k + i] = best;
    }
    __syncthreads();
    float p = 0.0f;
    int e = 0;
    if (warp == 0) {
        unsigned long long c[CAND];
#pragma unroll
        for (int j = 0; j < CAND; j++) c[j] = j * 32 + lane < NW * k ? cand[j * 32 + lane] : 0;
        unsigned long long mine = 0;
        for (int i = 0; i < k; i++) {
            const unsigned long long best = warp_take_max<CAND>(c);
            if (lane == i) mine = best;
        }
        // A key's id is the complement of its low word; a NaN router output must not send an
        // out-of-range id to the expert kernels.
        e = (int)(0xffffffffu - (u32)mine);
        if (lane >= k || e >= experts) e = 0;
        const float v = key_value(mine);
        const float mx = __shfl_sync(0xffffffffu, v, 0);
        p = lane < k ? expf(v - mx) : 0.0f;
        if (lane == 0) top = mx;
    }
    float sum = 0.0f;
    if (!norm) {
        __syncthreads();
        float rest = 0.0f;
#pragma unroll
        for (int j = 0; j < ROUTE_PER_THREAD; j++) rest += expf(v[j] - top);
        sum = block_sum(rest, red);
    }
    if (warp == 0) {
        float picked = p;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) picked += __shfl_xor_sync(0xffffffffu, picked, o);
        if (lane < k) {
            ids[t * k + lane] = e;
            weights[t * k + lane] = p / (norm ? picked : sum);
        }
    }
}

// One expert's gate and up matrices: codes, bf16 scales and biases (parts 0-5 of `slot_part`).
struct GateUp {
    const u8 *gw, *uw;
    const u16 *gs, *gb, *us, *ub;
};

__device__ __forceinline__ GateUp gate_up_of(const MoeSlots& m, const int* ids, int k) {
    // The table entry read once for the six parts (the compiler keeps six pairs of loads else).
    u64 p[6];
#pragma unroll
    for (int i = 0; i < 6; i++) p[i] = m.part[k][i];
    if (m.table) {
        const u64 base = m.table[ids[k]];
#pragma unroll
        for (int i = 0; i < 6; i++) p[i] = base + m.off[i];
    }
    return GateUp{(const u8*)p[0],  (const u8*)p[3],  (const u16*)p[1],
                  (const u16*)p[2], (const u16*)p[4], (const u16*)p[5]};
}

// Chunk c of gate rows r0..r0+R into raw[0..R) and of up rows into raw[R..), with their scales and
// biases, all loads in flight together (`w` points at row r0 of each matrix).
template <int F, int R>
__device__ __forceinline__ void load_gate_up(const GateUp& w, const RowOffsets& o, int c, uint4* raw, uint2* sb) {
#pragma unroll
    for (int i = 0; i < R; i++) {
        raw[i] = ld_stream((const uint4*)w.gw + o.chunk(i) + c);
        raw[R + i] = ld_stream((const uint4*)w.uw + o.chunk(i) + c);
        sb[i] = load_sb<F>(w.gs + o.group(i), w.gb + o.group(i), c);
        sb[R + i] = load_sb<F>(w.us + o.group(i), w.ub + o.group(i), c);
    }
}

// `w` moved to row r of each of its matrices.
__device__ __forceinline__ GateUp gate_up_at(GateUp w, int r, u64 row_bytes, int groups) {
    const u64 b = (u64)r * row_bytes, g = (u64)r * groups;
    return GateUp{w.gw + b, w.uw + b, w.gs + g, w.gb + g, w.us + g, w.ub + g};
}

// h[t][k][r] = silu(gate_k[r] . x[t]) * (up_k[r] . x[t]) for token t = blockIdx.z, slot
// k = blockIdx.y and GATE_UP_ROWS rows r per block (`ids`, when a table is given, holds each token's
// gridDim.y chosen experts): each thread loads an input chunk once for GATE_UP_ROWS gate and
// GATE_UP_ROWS up chunks. The block's loads in flight bound the launch (registers allow three
// blocks an SM): ten q4 experts' gate, up and down took 39.7 us with 4 rows, 37.6 with 6 and 37.5
// with 8 (which spills) on an H100; two rows measured 4% slower than four there before.
template <int F>
__device__ __forceinline__ void moe_gate_up_impl(const MoeSlots& m, const float* __restrict__ x, int hidden, int inter,
                                                 float* __restrict__ h) {
    __shared__ float red[2 * GATE_UP_ROWS * DEC_THREADS / 32];
    __shared__ float sums[2 * GATE_UP_ROWS];
    grid_start();
    const int k = blockIdx.y, r0 = blockIdx.x * GATE_UP_ROWS, slots = gridDim.y, t = blockIdx.z;
    const int nr = min(GATE_UP_ROWS, inter - r0);
    const int* ids = m.table ? m.ids + t * slots : nullptr;
    x += (u64)t * hidden;
    h += (u64)t * slots * inter;
    const u64 row_bytes = (u64)hidden * Fmt<F>::BITS / 8;
    const int chunks = (int)(row_bytes / 16), groups = hidden / GROUP;
    const GateUp w = gate_up_at(gate_up_of(m, ids, k), r0, row_bytes, groups);
    const RowOffsets o{nr, chunks, groups};
    float acc[2 * GATE_UP_ROWS];
#pragma unroll
    for (int i = 0; i < 2 * GATE_UP_ROWS; i++) acc[i] = 0.0f;
    for (int c = threadIdx.x; c < chunks; c += DEC_THREADS) {
        uint4 raw[2 * GATE_UP_ROWS];
        uint2 sb[2 * GATE_UP_ROWS];
        load_gate_up<F, GATE_UP_ROWS>(w, o, c, raw, sb);
        const XChunk<F> xc = load_x<F>(x, c);
#pragma unroll
        for (int i = 0; i < GATE_UP_ROWS; i++) {
            if (i < nr) {
                acc[i] += dot_chunk<F>(raw[i], sb[i], xc);
                acc[GATE_UP_ROWS + i] += dot_chunk<F>(raw[GATE_UP_ROWS + i], sb[GATE_UP_ROWS + i], xc);
            }
        }
    }
    block_sums<2 * GATE_UP_ROWS>(acc, red);
    if (threadIdx.x < 2 * GATE_UP_ROWS) sums[threadIdx.x] = acc[0];
    __syncthreads();
    if (threadIdx.x < nr) h[(u64)k * inter + r0 + threadIdx.x] = siluf_(sums[threadIdx.x]) * sums[GATE_UP_ROWS + threadIdx.x];
}

// out[t][r] += sum over slots k of w_k * (down_k[r] . h[t][k]), w_k = weights[t][k] (or its
// sigmoid when `sigmoid`, for the gated shared expert), added atomically (the routed experts' and
// the shared expert's down launches run side by side), for token t = blockIdx.y and DEC_ROWS rows
// r per block. The block's threads share the (slot, chunk) pairs; each loads a chunk of h[k] once
// for DEC_ROWS rows, two pairs in flight. Each slot's row pointers are looked up once per block
// (into shared memory), not per pair: in a table's case that is two dependent loads (the id, then
// the table entry) ahead of every weight load.
template <int F>
__device__ __forceinline__ void moe_down_impl(const MoeSlots& m, int slots, const float* __restrict__ h, int hidden,
                                              int inter, const float* __restrict__ weights, int sigmoid,
                                              float* __restrict__ out) {
    __shared__ float w[MOE_MAX_SLOTS];
    __shared__ const uint4* codes[MOE_MAX_SLOTS];
    __shared__ const u16* scales[MOE_MAX_SLOTS];
    __shared__ const u16* biases[MOE_MAX_SLOTS];
    __shared__ float red[DEC_ROWS * DEC_THREADS / 32];
    grid_start();
    const int t = blockIdx.y;
    const int* ids = m.table ? m.ids + t * slots : nullptr;
    h += (u64)t * slots * inter;
    weights += t * slots;
    out += (u64)t * hidden;
    const int r0 = blockIdx.x * DEC_ROWS;
    const int nr = min(DEC_ROWS, hidden - r0);
    const u64 row_bytes = (u64)inter * Fmt<F>::BITS / 8;
    const int chunks = (int)(row_bytes / 16), groups = inter / GROUP;
    if (threadIdx.x < slots) {
        const int k = threadIdx.x;
        const float v = weights[k];
        w[k] = sigmoid ? sigmoidf_(v) : v;
        codes[k] = (const uint4*)(slot_part(m, ids, k, 6) + (u64)r0 * row_bytes);
        scales[k] = (const u16*)slot_part(m, ids, k, 7) + (u64)r0 * groups;
        biases[k] = (const u16*)slot_part(m, ids, k, 8) + (u64)r0 * groups;
    }
    __syncthreads();
    const int items = slots * chunks;
    const int U = Chunk<F>::E >= 64 ? 1 : 2;
    const RowOffsets o{nr, chunks, groups};
    // it / chunks as a multiply-high: exact, as it * chunks < 2^32 (at most 16 slots of 1024).
    const u32 per_chunks = 0xffffffffu / (u32)chunks + 1u;
    float acc[DEC_ROWS];
#pragma unroll
    for (int i = 0; i < DEC_ROWS; i++) acc[i] = 0.0f;
    for (int it0 = threadIdx.x; it0 < items; it0 += U * DEC_THREADS) {
        uint4 raw[U][DEC_ROWS];
        uint2 sb[U][DEC_ROWS];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int it = it0 + u * DEC_THREADS;
            if (it < items) {
                const int k = __umulhi(it, per_chunks), c = it - k * chunks;
                const uint4* d = codes[k];
                const u16 *sc = scales[k], *bi = biases[k];
#pragma unroll
                for (int i = 0; i < DEC_ROWS; i++) {
                    raw[u][i] = ld_stream(d + o.chunk(i) + c);
                    sb[u][i] = load_sb<F>(sc + o.group(i), bi + o.group(i), c);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int it = it0 + u * DEC_THREADS;
            if (it < items) {
                const int k = __umulhi(it, per_chunks), c = it - k * chunks;
                const XChunk<F> xc = load_x<F>(h + (u64)k * inter, c);
#pragma unroll
                for (int i = 0; i < DEC_ROWS; i++)
                    if (i < nr) acc[i] = fmaf(w[k], dot_chunk<F>(raw[u][i], sb[u][i], xc), acc[i]);
            }
        }
    }
    block_sums<DEC_ROWS>(acc, red);
    if (threadIdx.x < nr) atomicAdd(&out[r0 + threadIdx.x], acc[0]);
}

// ---- One token, every chosen expert in GPU memory: the down projection through a ring of stages
// in shared memory. `moe_down` loads each block's weights once into registers, computes, reduces
// and exits, so an SM's loads come in bursts between its blocks' phases (its ten q4 experts ran
// at a quarter of copy bandwidth). Here a few blocks per SM each take a share of the items (row
// groups) and keep `stages` of them in flight: bulk copies (see `bulk_copy`) bring item
// j + stages into shared memory while the block computes item j, and no registers hold bytes in
// flight. Each thread takes one input chunk (position) for every item, so it loads its inputs
// once, into registers (read per item, they came from L2: the stages leave L1 little room). The
// host sizes the block to the positions (at most RING_MAX_THREADS). The same ring for the gate
// and up projections measured slower than `moe_gate_up` (ten q4 experts on an H200, both
// launches: 41.4 us with it, 36.8 with the ring for the down launch alone), so it was not kept.

#define RING_MAX_STAGES 8
#define RING_MAX_THREADS 512

// The ring of one block: `stages` stages of `stage_bytes` at `base`, each completing on its own
// barrier; the block's j-th item lives in stage j % stages, in that stage's (j / stages)-th phase.
struct Ring {
    u8* base;
    u32 stage_bytes;
    int stages;
    u64* full;
    __device__ u8* stage(int j) const { return base + (u32)(j % stages) * stage_bytes; }
    __device__ u64* bar(int j) const { return &full[j % stages]; }
    __device__ void wait(int j) const { bulk_wait(bar(j), (j / stages) & 1); }
};

// The ring's barriers readied by thread 0, then the block barrier that publishes them.
__device__ __forceinline__ Ring ring_init(u8* base, u32 stage_bytes, int stages, u64* full) {
    if (threadIdx.x == 0)
        for (int s = 0; s < stages; s++) bulk_init(&full[s]);
    __syncthreads();
    return Ring{base, stage_bytes, stages, full};
}

// How many of `items` block b of the grid takes: items b, b + gridDim.x, ...
__device__ __forceinline__ int items_of_block(int items) {
    return items > (int)blockIdx.x ? (items - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
}

// The bytes `StagedRows` of DEC_ROWS rows take in a stage.
template <int F>
__device__ __forceinline__ u32 staged_bytes(u32 row_bytes, int groups) {
    return DEC_ROWS * (row_bytes + (Fmt<F>::AFFINE ? 4 * groups : 0));
}

// out[r] += sum over slots k of w_k * (down_k[r] . h[k]) for one token, as `moe_down_impl`: item i
// is rows i * DEC_ROWS.. of every slot's down (a stage holds a `StagedRows` per slot); thread p
// takes the (slot, chunk) pair p of every item (a block of at least slots x chunks threads). The
// slots' copies are issued by the lanes of warp 0. `hidden` is a multiple of DEC_ROWS.
template <int F>
__device__ __forceinline__ void moe_down_ring_impl(const MoeSlots& m, int slots, const float* __restrict__ h,
                                                   int hidden, int inter, const float* __restrict__ weights,
                                                   int sigmoid, int stages, float* __restrict__ out) {
    extern __shared__ __align__(128) u8 ring_smem[];
    __shared__ __align__(8) u64 full[RING_MAX_STAGES];
    __shared__ float red[2][DEC_ROWS * RING_MAX_THREADS / 32];
    const u32 row_bytes = (u32)((u64)inter * Fmt<F>::BITS / 8);
    const int groups = inter / GROUP, chunks = (int)(row_bytes / 16);
    const u32 part = staged_bytes<F>(row_bytes, groups);
    grid_release();
    grid_wait();  // the chosen ids, their weights and h
    // Lane k < slots of warp 0 issues slot k's copies: its addresses looked up once, here.
    const u8 *codes = nullptr, *scales = nullptr, *biases = nullptr;
    if (threadIdx.x < slots) {
        codes = slot_part(m, m.ids, threadIdx.x, 6);
        scales = slot_part(m, m.ids, threadIdx.x, 7);
        biases = slot_part(m, m.ids, threadIdx.x, 8);
    }
    const Ring ring = ring_init(ring_smem, slots * part, stages, full);
    const int mine = items_of_block(hidden / DEC_ROWS);
    auto issue = [&](int j) {
        const int lane = threadIdx.x;
        if (lane == 0) bulk_expect(ring.bar(j), slots * StagedRows<F>::copied(row_bytes, groups, DEC_ROWS));
        __syncwarp();
        if (lane < slots)
            stage_rows<F>(ring.stage(j) + lane * part, codes, (const u16*)scales, (const u16*)biases, row_bytes,
                          groups, (blockIdx.x + j * gridDim.x) * DEC_ROWS, DEC_ROWS, ring.bar(j));
    };
    if (threadIdx.x < 32)
        for (int j = 0; j < min(stages, mine); j++) issue(j);
    const int k = threadIdx.x / chunks, c = threadIdx.x % chunks;
    const bool active = k < slots;
    XChunk<F> xc{};
    float wk = 0.0f;
    if (active) {
        xc = load_x<F>(h + (u64)k * inter, c);
        wk = sigmoid ? sigmoidf_(weights[k]) : weights[k];
    }
    for (int j = 0; j < mine; j++) {
        ring.wait(j);
        float acc[DEC_ROWS];
#pragma unroll
        for (int i = 0; i < DEC_ROWS; i++) acc[i] = 0.0f;
        if (active) {
            const StagedRows<F> d{ring.stage(j) + k * part, row_bytes, groups};
#pragma unroll
            for (int i = 0; i < DEC_ROWS; i++) acc[i] = wk * dot_chunk<F>(d.chunk(i, c), d.sb(i, c), xc);
        }
        warp_partials<DEC_ROWS>(acc, red[j & 1]);
        if (threadIdx.x < 32 && j + stages < mine) issue(j + stages);
        if (threadIdx.x < DEC_ROWS)
            atomicAdd(&out[(blockIdx.x + j * gridDim.x) * DEC_ROWS + threadIdx.x],
                      partial_sum<DEC_ROWS>(red[j & 1], threadIdx.x, blockDim.x >> 5));
    }
}

// ---- Several tokens (prefill): gate and up grouped by expert, so that each expert's rows are
// read from device memory once for all the tokens that chose it, instead of once per token.

// The (token, slot) pairs p = t * k + slot of `pairs` pairs, grouped by their expert `ids[p]`:
// `order` gets the pairs (in no fixed order within an expert: each pair's result is computed
// alone), `starts[e]` where expert e's begin (`starts[experts]` = pairs), `distinct[0]` the number
// of experts chosen and `distinct[1..]` those experts, lowest first. One block of 1024 threads; at
// most ROUTE_MAX_EXPERTS experts.
extern "C" __global__ void __launch_bounds__(1024) moe_group(const int* __restrict__ ids, int pairs, int experts,
                                                             int* __restrict__ order, int* __restrict__ starts,
                                                             int* __restrict__ distinct) {
    __shared__ int count[ROUTE_THREADS * ROUTE_PER_THREAD];
    __shared__ int cursor[ROUTE_THREADS * ROUTE_PER_THREAD];
    grid_start();
    for (int e = threadIdx.x; e < experts; e += blockDim.x) count[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) atomicAdd(&count[ids[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int s = 0, d = 0;
        for (int e = 0; e < experts; e++) {
            cursor[e] = s;
            starts[e] = s;
            if (count[e] > 0) distinct[1 + d++] = e;
            s += count[e];
        }
        starts[experts] = s;
        distinct[0] = d;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) order[atomicAdd(&cursor[ids[p]], 1)] = p;
}

// Pairs per pass of `moe_gate_up_grouped`: the weights a thread loads serve this many inputs.
#define MOE_GROUP_BATCH 4

// h[p][r] = silu(gate_e[r] . x[t]) * (up_e[r] . x[t]) for every pair p = t * k + slot of the
// blockIdx.y-th chosen expert e (`order[starts[e]..starts[e + 1]]`), DEC_ROWS rows r per block: in
// passes of MOE_GROUP_BATCH pairs, each thread loads its chunks of the block's gate and up rows
// once per pass (from device memory the first time, from L2 after) and multiplies them with every
// pair's input chunk. `h` has the layout the per-token down kernel reads.
template <int F>
__device__ __forceinline__ void moe_gate_up_grouped_impl(const MoeSlots& m, const int* __restrict__ order,
                                                         const int* __restrict__ starts,
                                                         const int* __restrict__ distinct, int k,
                                                         const float* __restrict__ x, int hidden, int inter,
                                                         float* __restrict__ h) {
    const int B = MOE_GROUP_BATCH, N = 2 * DEC_ROWS * MOE_GROUP_BATCH;
    __shared__ float red[N * DEC_THREADS / 32];
    __shared__ float sums[N];
    __shared__ int pair[MOE_GROUP_BATCH];
    grid_start();
    const int i = blockIdx.y;
    if (i >= distinct[0]) return;
    const int e = distinct[1 + i], first = starts[e], end = starts[e + 1];
    const int r0 = blockIdx.x * DEC_ROWS, nr = min(DEC_ROWS, inter - r0);
    const u64 row_bytes = (u64)hidden * Fmt<F>::BITS / 8;
    const int chunks = (int)(row_bytes / 16), groups = hidden / GROUP;
    const GateUp w = gate_up_at(gate_up_of(m, &e, 0), r0, row_bytes, groups);
    const RowOffsets o{nr, chunks, groups};
    for (int s0 = first; s0 < end; s0 += B) {
        const int nb = min(B, end - s0);
        if (threadIdx.x < nb) pair[threadIdx.x] = order[s0 + threadIdx.x];
        __syncthreads();
        float acc[N];
#pragma unroll
        for (int j = 0; j < N; j++) acc[j] = 0.0f;
        for (int c = threadIdx.x; c < chunks; c += DEC_THREADS) {
            uint4 raw[2 * DEC_ROWS];
            uint2 sb[2 * DEC_ROWS];
            load_gate_up<F, DEC_ROWS>(w, o, c, raw, sb);
#pragma unroll
            for (int b = 0; b < B; b++) {
                if (b < nb) {
                    const XChunk<F> xc = load_x<F>(x + (u64)(pair[b] / k) * hidden, c);
#pragma unroll
                    for (int r = 0; r < DEC_ROWS; r++) {
                        if (r < nr) {
                            acc[b * 2 * DEC_ROWS + r] += dot_chunk<F>(raw[r], sb[r], xc);
                            acc[b * 2 * DEC_ROWS + DEC_ROWS + r] +=
                                dot_chunk<F>(raw[DEC_ROWS + r], sb[DEC_ROWS + r], xc);
                        }
                    }
                }
            }
        }
        block_sums<N>(acc, red);
        if (threadIdx.x < N) sums[threadIdx.x] = acc[0];
        __syncthreads();
        if (threadIdx.x < nb * DEC_ROWS) {
            const int b = threadIdx.x / DEC_ROWS, r = threadIdx.x % DEC_ROWS;
            if (r < nr)
                h[(u64)pair[b] * inter + r0 + r] =
                    siluf_(sums[b * 2 * DEC_ROWS + r]) * sums[b * 2 * DEC_ROWS + DEC_ROWS + r];
        }
        __syncthreads();  // `pair`, `sums` and `red` are rewritten by the next pass
    }
}

#define DEFINE_MOE(NAME, F)                                                                                        \
    /* Three blocks per SM (168 registers), which 2-bit codes cannot have without spilling. */                 \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, Fmt<F>::BITS == 2 ? 2 : 3)                        \
        moe_gate_up_##NAME(const MoeSlots m, const float* x, int hidden, int inter, float* h) {                   \
        moe_gate_up_impl<F>(m, x, hidden, inter, h);                                                              \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS)                                                    \
        moe_down_##NAME(const MoeSlots m, int slots, const float* h, int hidden, int inter, const float* weights, \
                        int sigmoid, float* out) {                                                                \
        moe_down_impl<F>(m, slots, h, hidden, inter, weights, sigmoid, out);                                      \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(RING_MAX_THREADS)                                               \
        moe_down_ring_##NAME(const MoeSlots m, int slots, const float* h, int hidden, int inter,                  \
                             const float* weights, int sigmoid, int stages, float* out) {                         \
        moe_down_ring_impl<F>(m, slots, h, hidden, inter, weights, sigmoid, stages, out);                         \
    }                                                                                                             \
    /* Three blocks per SM (168 registers): unbounded, the row offsets kept across the passes */              \
    /* took 243 registers and left two. */                                                                     \
    extern "C" __global__ void __launch_bounds__(DEC_THREADS, 3)                                                 \
        moe_gate_up_grouped_##NAME(const MoeSlots m, const int* order, const int* starts, const int* distinct,    \
                                   int k, const float* x, int hidden, int inter, float* h) {                      \
        moe_gate_up_grouped_impl<F>(m, order, starts, distinct, k, x, hidden, inter, h);                          \
    }

FOR_EACH_FORMAT(DEFINE_MOE)
