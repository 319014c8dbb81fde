//! The device: context, stream, loaded kernels, and a typed launcher per kernel.

use crate::launch::Launch;
use crate::{Context, Error, Result, loader, ptx};
use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig, PinnedHostSlice,
};
use moe_core::shapes::{AttentionShape, DeltaNetShape};
use moe_core::{DType, Matrix, WeightFormat};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// Every kernel the module must export.
pub(crate) const KERNELS: &[&str] = &[
    "matvec_f32",
    "matvec_f16",
    "matvec_bf16",
    "matvec_q8",
    "matvec_q4",
    "matvec_q2",
    "matvec1_f32",
    "matvec1_f16",
    "matvec1_bf16",
    "matvec1_q8",
    "matvec1_q4",
    "matvec1_q2",
    "matvec1_bulk_f32",
    "matvec1_bulk_f16",
    "matvec1_bulk_bf16",
    "matvec1_bulk_q8",
    "matvec1_bulk_q4",
    "matvec1_bulk_q2",
    "moe_group",
    "moe_gate_up_grouped_f32",
    "moe_gate_up_grouped_f16",
    "moe_gate_up_grouped_bf16",
    "moe_gate_up_grouped_q8",
    "moe_gate_up_grouped_q4",
    "moe_gate_up_grouped_q2",
    "matmul_f32",
    "matmul_f16",
    "matmul_bf16",
    "matmul_q8",
    "matmul_q4",
    "matmul_q2",
    "embed_f32",
    "embed_f16",
    "embed_bf16",
    "embed_q8",
    "embed_q4",
    "embed_q2",
    "rms_norm",
    "add_rms_norm",
    "add_inplace",
    "gather_rows",
    "swiglu",
    "scatter_add",
    "argmax_key",
    "step_gate",
    "attn_append_kv",
    "attn_decode",
    "attn_combine",
    "dn_conv",
    "dn_qk_norm",
    "dn_recurrence",
    "dn_chunk",
    "dn_gated_norm",
    "dn_step",
    "dn_finish",
    "route_topk",
    "moe_gate_up_f32",
    "moe_gate_up_f16",
    "moe_gate_up_bf16",
    "moe_gate_up_q8",
    "moe_gate_up_q4",
    "moe_gate_up_q2",
    "moe_down_f32",
    "moe_down_f16",
    "moe_down_bf16",
    "moe_down_q8",
    "moe_down_q4",
    "moe_down_q2",
    "moe_down_ring_f32",
    "moe_down_ring_f16",
    "moe_down_ring_bf16",
    "moe_down_ring_q8",
    "moe_down_ring_q4",
    "moe_down_ring_q2",
];

/// Up to this many tokens a matrix product runs as warp-per-row matvecs (weights read once per
/// 8 tokens); above it, as the tiled kernel.
const MATVEC_MAX_TOKENS: usize = 8;
const MV_ROWS_PER_BLOCK: u32 = 8;
/// The one-token kernels' blocks: `DEC_ROWS` rows by `DEC_THREADS` threads (common.cuh).
const DEC_ROWS: u32 = 4;
/// The rows of each of gate and up that a `moe_gate_up` block takes (`GATE_UP_ROWS` in moe.cu).
const GATE_UP_ROWS: u32 = 6;
const DEC_THREADS: u32 = 128;
/// The most (token, slot) pairs one grouped MoE launch takes: its scratch (ids, weights, order and
/// the hidden activations) stays small.
const MOE_GROUP_MAX_PAIRS: usize = 4096;
/// The most tokens one fused MoE launch takes (a grid dimension).
pub const MOE_MAX_TOKENS: usize = 65535;
/// The fewest rows a one-token matvec bulk-copies (`bulk_rows`). Measured on an H200: the output
/// head (248320 rows, 62080 blocks) ran 16% faster with bulk copies, while matrices of a few
/// thousand rows ran as fast or slower (4096 x 8192: 21.8 us against 17.2), and so did the fused
/// expert kernels: with few waves of blocks, each block's wait for its copies shows.
pub const BULK_MIN_ROWS: usize = 65536;
/// The stages and threads of a ring kernel's block (`RING_MAX_STAGES`, `RING_MAX_THREADS` in
/// moe.cu).
const RING_MAX_STAGES: usize = 8;
const RING_MAX_THREADS: u32 = 512;

/// The shared memory a ring kernel's block fills with stages: two stages of ten q4 experts'
/// down rows for Qwen3.5-397B (23 KiB each). Larger rings mean fewer blocks an SM, which measured
/// slower (H200, ten q4 experts through rings for gate/up and down: 46.0 us at 32 KiB, 52.3 at
/// 64, 67.0 at 128).
const RING_BYTES: usize = 32 << 10;

/// `argmax_key`'s blocks: enough to read the logits at full speed, few atomics.
const ARGMAX_THREADS: u32 = 256;
const ARGMAX_MAX_BLOCKS: u32 = 264;

/// The most values [`Gpu::download`] copies through its page-locked staging (64 MiB); more go
/// straight to pageable memory.
const STAGING_MAX_VALUES: usize = 16 << 20;
/// The most shared memory a bulk-copy launch takes: the default limit of a block, which needs no
/// opt-in attribute.
const BULK_MAX_BYTES: usize = 48 * 1024;
const TILE: u32 = 64;
/// Limits of the attention and DeltaNet kernels (register arrays, shared memory).
const ATTN_MAX_HEAD_DIM: usize = 512;
/// `attn_decode`'s warps per block, and the positions they take in one round (attention.cu).
const ATTN_WARPS: u32 = 8;
const ATTN_ROUND: usize = 64;
/// Positions per block of one query's attention, about; and the most blocks it is split into
/// (their partial results take `heads x splits x (head_dim + 2)` values of scratch).
const ATTN_SPLIT_POSITIONS: usize = 128;
const ATTN_MAX_SPLITS: usize = 128;
const DN_MAX_KERNEL: usize = 8;
/// The DeltaNet recurrence's warps per block, and the rows of the state each covers at most.
const DN_SLICES: u32 = 8;
const DN_MAX_K_DIM: usize = DN_SLICES as usize * 40;
/// The chunked DeltaNet kernel's tokens per chunk, its state columns per block and its threads
/// (delta_net.cu), and the fewest tokens it takes: below that, the token-by-token kernel, whose
/// cost grows with the tokens from a smaller start.
const DN_CHUNK: usize = 32;
const DN_COLS: usize = 32;
const DN_CHUNK_THREADS: u32 = 256;
const DN_CHUNK_MIN_TOKENS: usize = 16;

/// A weight matrix in device memory, in its stored format: codes (or elements), then the bf16
/// scales and biases of affine formats, each at a `PART_ALIGN`-aligned offset of one buffer.
/// The buffer may be shared, e.g. by the three matrices of a routed expert.
pub struct DeviceMatrix {
    pub format: WeightFormat,
    pub rows: usize,
    pub cols: usize,
    buf: Arc<CudaSlice<u8>>,
    data: Range<usize>,
    /// Scales and biases of affine formats.
    scales: Option<Range<usize>>,
    biases: Option<Range<usize>>,
}

/// Alignment of each part of a [`DeviceMatrix`] in its buffer (the kernels load 16 bytes at once).
pub(crate) const PART_ALIGN: usize = 256;

/// Where the parts of matrices go in one buffer: `(data, scales, biases)` per matrix and the
/// buffer's length. Fails for affine formats the kernels lack.
pub(crate) fn layout(ms: &[&Matrix]) -> Result<(Vec<PartRanges>, usize)> {
    let mut end = 0;
    let mut place = |len: usize| {
        let start = end;
        end = (start + len).next_multiple_of(PART_ALIGN);
        start..start + len
    };
    let mut out = Vec::with_capacity(ms.len());
    for m in ms {
        if !kernels_take(m.format) {
            return Err(Error::Unsupported(format!("weight format {}", m.format.name())));
        }
        let affine = matches!(m.format, WeightFormat::Affine { .. });
        let data = place(m.data.len());
        let (scales, biases) =
            if affine { (Some(place(m.scales.len())), Some(place(m.biases.len()))) } else { (None, None) };
        out.push((data, scales, biases));
    }
    Ok((out, end))
}

pub(crate) type PartRanges = (Range<usize>, Option<Range<usize>>, Option<Range<usize>>);

impl DeviceMatrix {
    /// `m`'s parts at `ranges` of `buf`.
    pub(crate) fn in_buffer(m: &Matrix, buf: Arc<CudaSlice<u8>>, ranges: PartRanges) -> DeviceMatrix {
        let (data, scales, biases) = ranges;
        DeviceMatrix { format: m.format, rows: m.rows, cols: m.cols, buf, data, scales, biases }
    }

    /// The device buffer and where the codes (or elements), scales and biases lie in it (empty
    /// ranges for the scales and biases of float formats).
    pub(crate) fn spans(&self) -> (&CudaSlice<u8>, [Range<usize>; 3]) {
        let part = |r: &Option<Range<usize>>| r.clone().unwrap_or(0..0);
        (&self.buf, [self.data.clone(), part(&self.scales), part(&self.biases)])
    }

    /// Bytes of the matrix on the device (its parts, without alignment padding).
    pub fn byte_len(&self) -> usize {
        self.data.len() + self.scales.as_ref().map_or(0, |s| s.len()) + self.biases.as_ref().map_or(0, |s| s.len())
    }

    fn suffix(&self) -> &'static str {
        format_suffix(self.format)
    }

    /// Whether rows can be read as aligned 16-byte chunks and inputs as float4.
    fn vectorised(&self) -> bool {
        chunked_rows(self.format, self.cols)
    }
}

/// Whether the kernels take weights in format `f`: floats, or affine 2/4/8-bit codes in groups of 64.
fn kernels_take(f: WeightFormat) -> bool {
    match f {
        WeightFormat::Float(_) => true,
        WeightFormat::Affine { bits, group } => matches!(bits, 2 | 4 | 8) && group == 64,
    }
}

/// Whether rows of `cols` values in format `f` are whole 16-byte chunks of codes (scales and
/// biases are stored apart) whose inputs load as float4.
fn chunked_rows(f: WeightFormat, cols: usize) -> bool {
    let bytes = match f {
        WeightFormat::Float(d) => cols * d.size(),
        WeightFormat::Affine { bits, .. } => cols * bits as usize / 8,
    };
    bytes.is_multiple_of(16) && cols.is_multiple_of(4)
}

/// The bytes of one row of `cols` values in format `f` as a `StagedRows` holds them in shared
/// memory: its codes, and its scales and biases (affine formats), where bulk copies take the row:
/// whole 16-byte chunks of codes and a multiple of `groups_multiple` affine groups (so that the
/// scales and biases of the rows a copy takes are whole chunks too).
fn staged_row(f: WeightFormat, cols: usize, groups_multiple: usize) -> Option<(usize, usize)> {
    if !chunked_rows(f, cols) {
        return None;
    }
    match f {
        WeightFormat::Float(d) => Some((cols * d.size(), 0)),
        WeightFormat::Affine { bits, group } => {
            let groups = cols / group;
            groups.is_multiple_of(groups_multiple).then_some((cols * bits as usize / 8, 4 * groups))
        }
    }
}

/// One GPU: its context, the stream every operation is queued on, and the compiled kernels.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    /// The compute stream: every kernel and activation copy.
    pub(crate) stream: Arc<CudaStream>,
    functions: HashMap<&'static str, CudaFunction>,
    /// Stands in for the absent scales and biases of float formats.
    dummy: CudaSlice<u8>,
    name: String,
    capability: (i32, i32),
    /// Kernels may start before the one ahead of them ends (see `launch.rs`).
    early_launch: bool,
    /// One-token kernels bring their weights into shared memory by bulk copies (`bulk_rows`).
    bulk_copies: bool,
    /// The most dynamic shared memory a `dn_chunk` block may take (0: that kernel is off).
    dn_chunk_smem: usize,
    /// The one-token down kernel's ring of stages in shared memory (`ring_launch`).
    ring: Option<RingLimits>,
    /// The device's multiprocessors: a ring launch takes as many blocks as fit them at once.
    sms: u32,
    /// Page-locked memory that [`download`](Self::download) copies through (grown on demand).
    staging: Mutex<Option<PinnedHostSlice<f32>>>,
}

/// Lets `f` take all the shared memory a block may opt in to, and says how much of it is left for
/// its dynamic part (beyond the default 48 KiB, a kernel must ask).
fn opt_in_shared(ctx: &CudaContext, f: &CudaFunction) -> Result<usize> {
    use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
    let most = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .what("reading the shared memory limit")?;
    let fixed = f.get_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES).what("reading a kernel")?;
    let dynamic = (most - fixed).max(0);
    f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, dynamic)
        .what("raising a kernel's shared memory")?;
    Ok(dynamic as usize)
}

/// What sizes the launches of the ring kernels (`moe_down_ring_*`, moe.cu).
#[derive(Clone, Copy)]
struct RingLimits {
    /// The dynamic shared memory a ring block may take (opted in for every ring kernel).
    most: usize,
}

impl RingLimits {
    fn of(ctx: &CudaContext, functions: &HashMap<&'static str, CudaFunction>) -> Result<RingLimits> {
        let mut most = usize::MAX;
        for (name, f) in functions {
            if name.contains("_ring_") {
                most = most.min(opt_in_shared(ctx, f)?);
            }
        }
        Ok(RingLimits { most })
    }
}

/// Lets the device's default memory pool (behind stream-ordered allocation) keep what is freed
/// instead of returning it to the driver at every synchronisation: activations are allocated and
/// freed every step, and evicted experts' memory is reused for the next upload.
fn keep_pool_memory(ctx: &CudaContext) -> Result<()> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut keep = u64::MAX;
    // SAFETY: plain driver calls on the current device with valid out-pointers.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result().what("reading the memory pool")?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
        .result()
        .what("configuring the memory pool")?;
    }
    Ok(())
}

fn grid_1d(len: usize, threads: u32) -> LaunchConfig {
    let blocks = len.div_ceil(threads as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row of `width` values (the norms), and the width as the kernels take it.
fn row_blocks(rows: usize, width: usize) -> (LaunchConfig, i32) {
    let threads = (width.next_power_of_two() as u32).clamp(32, 1024);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    (cfg, i32_of(width, "width"))
}

/// Whether an on-by-default switch is not set to "0".
fn env_on(name: &str) -> bool {
    std::env::var(name).ok().is_none_or(|v| v != "0")
}

/// The index in an `argmax_key` key (elementwise.cu): 0 when nothing compared.
pub(crate) fn key_index(key: u64) -> u32 {
    if key == 0 { 0 } else { u32::MAX - key as u32 }
}

fn i32_of(v: usize, what: &str) -> i32 {
    i32::try_from(v).unwrap_or_else(|_| panic!("{what} = {v} does not fit the kernels' 32-bit sizes"))
}

impl Gpu {
    /// Opens device `ordinal`, compiling the kernels for it (or loading them from the PTX cache).
    pub fn new(ordinal: usize) -> Result<Gpu> {
        if !loader::driver_present() {
            return Err(Error::NoDriver);
        }
        match cudarc::driver::result::init() {
            Ok(()) => {}
            Err(e) if matches!(e.0, CUresult::CUDA_ERROR_NO_DEVICE | CUresult::CUDA_ERROR_INVALID_DEVICE) => {
                return Err(Error::NoDevice);
            }
            Err(e) => return Err(Error::Driver { what: "cuInit", source: e }),
        }
        let count = CudaContext::device_count().what("cuDeviceGetCount")?.max(0) as usize;
        if count == 0 {
            return Err(Error::NoDevice);
        }
        if ordinal >= count {
            return Err(Error::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).what("creating the context")?;
        // One stream orders everything, so cudarc's per-buffer events are pure overhead.
        // SAFETY: no buffer exists yet, and all work goes to the single stream created below.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().what("creating a stream")?;
        keep_pool_memory(&ctx)?;
        let name = ctx.name().what("reading the device name")?;
        let capability = ctx.compute_capability().what("reading the compute capability")?;
        let arch = ptx::arch(capability.0, capability.1);
        let (ptx, origin) = ptx::load(ptx::SOURCE, &arch, true)?;
        let module = match ctx.load_module(ptx) {
            Ok(m) => m,
            Err(e) => match origin {
                // A stale or foreign cache entry: compile afresh (this also rewrites the entry).
                ptx::Origin::Cache(file) => {
                    let _ = std::fs::remove_file(file);
                    let (ptx, _) = ptx::load(ptx::SOURCE, &arch, false)?;
                    ctx.load_module(ptx).what("loading the kernels")?
                }
                ptx::Origin::Compiled => return Err(Error::Driver { what: "loading the kernels", source: e }),
            },
        };
        let mut functions = HashMap::new();
        for &k in KERNELS {
            functions.insert(k, module.load_function(k).what("looking up a kernel")?);
        }
        let dummy = stream.alloc_zeros::<u8>(16).what("allocating")?;
        // FLASH_MOE_EARLY_LAUNCH=0 turns early launches off, to measure what they give.
        let early_launch = capability.0 >= 9 && env_on("FLASH_MOE_EARLY_LAUNCH");
        // FLASH_MOE_BULK=0 keeps the weights of one-token kernels in registers instead.
        let bulk_copies = capability.0 >= 9 && env_on("FLASH_MOE_BULK");
        // FLASH_MOE_DN_CHUNK=0 runs every DeltaNet prefill token by token.
        let dn_chunk_smem = if env_on("FLASH_MOE_DN_CHUNK") { opt_in_shared(&ctx, &functions["dn_chunk"])? } else { 0 };
        // FLASH_MOE_RING=0 keeps the one-token down kernel that loads into registers.
        let ring = if bulk_copies && env_on("FLASH_MOE_RING") { Some(RingLimits::of(&ctx, &functions)?) } else { None };
        let staging = Mutex::new(None);
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .what("reading the multiprocessor count")?
            .max(1) as u32;
        Ok(Gpu {
            ctx,
            stream,
            functions,
            dummy,
            name,
            capability,
            early_launch,
            bulk_copies,
            dn_chunk_smem,
            ring,
            sms,
            staging,
        })
    }

    /// The same device and kernels on a second stream, for work that can run beside this one's:
    /// ordered against it with [`fork`](Self::fork) and [`join`](Self::join) (which a recorded
    /// step keeps as the graph's branches).
    pub fn side_stream(&self) -> Result<Gpu> {
        let stream = self.ctx.new_stream().what("creating a stream")?;
        let dummy = stream.alloc_zeros::<u8>(16).what("allocating")?;
        Ok(Gpu {
            ctx: self.ctx.clone(),
            stream,
            functions: self.functions.clone(),
            dummy,
            name: self.name.clone(),
            capability: self.capability,
            early_launch: self.early_launch,
            bulk_copies: self.bulk_copies,
            dn_chunk_smem: self.dn_chunk_smem,
            ring: self.ring,
            sms: self.sms,
            staging: Mutex::new(None),
        })
    }

    /// Makes the work queued on `side` from now on wait for what is queued here so far.
    pub fn fork(&self, side: &Gpu) -> Result<()> {
        let e = self.stream.record_event(None).what("recording an event")?;
        side.stream.wait(&e).what("ordering a stream after another")
    }

    /// Makes the work queued here from now on wait for what is queued on `side` so far.
    pub fn join(&self, side: &Gpu) -> Result<()> {
        side.fork(self)
    }

    /// The shared memory of a one-token launch that bulk-copies DEC_ROWS rows of `cols` values in
    /// format `f` (codes, scales and biases) into shared memory, where that works: sm_90 copies,
    /// rows of whole 16-byte chunks, scale and bias rows of a multiple of 8 groups (so that every
    /// row group's start and length are multiples of 16 bytes; parts start at [`PART_ALIGN`]), and
    /// at most [`BULK_MAX_BYTES`].
    fn bulk_rows(&self, f: WeightFormat, cols: usize) -> Option<u32> {
        if !self.bulk_copies {
            return None;
        }
        let (codes, scales) = staged_row(f, cols, 8)?;
        let bytes = DEC_ROWS as usize * (codes + scales);
        (bytes <= BULK_MAX_BYTES).then_some(bytes as u32)
    }

    /// The shared memory a ring kernel's stage takes for DEC_ROWS rows of a `rows` x `cols`
    /// matrix in format `f` (a `StagedRows`), and the 16-byte chunks of a row, where the ring
    /// kernels take it: rings on, whole row groups, rows of whole chunks, and an even number of
    /// affine groups a row (so that the scales and biases of a row group are whole chunks too).
    fn ring_rows(&self, f: WeightFormat, rows: usize, cols: usize) -> Option<(usize, usize)> {
        if self.ring.is_none() || !rows.is_multiple_of(DEC_ROWS as usize) {
            return None;
        }
        let (codes, scales) = staged_row(f, cols, 2)?;
        Some((DEC_ROWS as usize * (codes + scales), codes / 16))
    }

    /// The launch of ring kernel `f` over `items` items of `stage_bytes` each, a thread for each of
    /// `positions` input chunks, and its stages: as many stages as fill [`RING_BYTES`] (at least
    /// two), and as many blocks as fit the device at once (each takes items b, b + blocks, ...),
    /// but no more than leave each block two rounds of its stages, so that blocks refill their
    /// stages (one round measured 5% faster for ten q4 experts, 36.8 us against 38.6 with the
    /// gate/up launch, but leaves the refills untried by these shapes and the tests' alike).
    /// `None` when two stages exceed a block's shared memory or the positions a block's threads.
    fn ring_launch(
        &self,
        f: &CudaFunction,
        stage_bytes: usize,
        items: usize,
        positions: usize,
    ) -> Result<Option<(LaunchConfig, i32)>> {
        let Some(limits) = self.ring else { return Ok(None) };
        let stages = (RING_BYTES / stage_bytes).clamp(2, RING_MAX_STAGES);
        let smem = stages * stage_bytes;
        let threads = positions.next_multiple_of(32) as u32;
        if smem > limits.most || threads > RING_MAX_THREADS {
            return Ok(None);
        }
        let per_sm = f.occupancy_max_active_blocks_per_multiprocessor(threads, smem, None).what("sizing a launch")?;
        let blocks = (self.sms * per_sm.max(1)).min(items.div_ceil(2 * stages) as u32).max(1);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem as u32 };
        Ok(Some((cfg, stages as i32)))
    }

    /// A launch of `f` on this stream.
    fn launch<'a>(&'a self, f: &'a CudaFunction) -> Launch<'a> {
        Launch::new(&self.stream, f, self.early_launch)
    }

    /// The device's name and compute capability, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        format!("{} (sm_{}{})", self.name, self.capability.0, self.capability.1)
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.capability
    }

    /// Free and total device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().what("reading memory info")
    }

    /// Waits for all queued work; reports errors of earlier asynchronous calls.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().what("synchronising")?;
        self.ctx.check_err().what("an earlier asynchronous call")
    }

    pub(crate) fn f(&self, name: &'static str) -> &CudaFunction {
        &self.functions[name]
    }

    // ---- Buffers.

    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return self.stream.null().what("allocating");
        }
        self.stream.alloc_zeros(len).what("allocating")
    }

    pub fn upload(&self, values: &[f32]) -> Result<CudaSlice<f32>> {
        if values.is_empty() {
            return self.stream.null().what("allocating");
        }
        self.stream.clone_htod(values).what("copying to the device")
    }

    /// A buffer of `len` values that the next kernel overwrites entirely (no fill).
    pub fn uninit(&self, len: usize) -> Result<CudaSlice<f32>> {
        if len == 0 {
            return self.stream.null().what("allocating");
        }
        // SAFETY: callers write every value before any is read (see `Backend::scratch`).
        unsafe { self.stream.alloc(len) }.what("allocating")
    }

    pub fn zeros_i32(&self, len: usize) -> Result<CudaSlice<i32>> {
        self.stream.alloc_zeros(len.max(1)).what("allocating")
    }

    /// Page-locked host memory, the destination of [`read_ids`](Self::read_ids).
    pub fn pinned_i32(&self, len: usize) -> Result<PinnedHostSlice<i32>> {
        // SAFETY: zero bits are valid i32 values; the contents are only read after a copy.
        unsafe { self.ctx.alloc_pinned(len.max(1)) }.what("allocating pinned memory")
    }

    /// The first `len` values of `ids`, through `host`, waiting for that copy (and the work queued
    /// before it) but not for anything queued later.
    pub fn read_ids<'a>(
        &self,
        ids: &CudaSlice<i32>,
        len: usize,
        host: &'a mut PinnedHostSlice<i32>,
    ) -> Result<&'a [i32]> {
        assert!(len <= ids.len() && len <= host.len(), "read_ids: {len} values");
        self.stream.memcpy_dtoh(&ids.slice(0..len), host).what("copying to the host")?;
        // The pinned slice's own event is not recorded with event tracking off (see `Gpu::new`).
        let copied = self.stream.record_event(None).what("recording an event")?;
        copied.synchronize().what("waiting for a copy to the host")?;
        Ok(&host.as_slice().what("reading pinned memory")?[..len])
    }

    /// Integers (ids, addresses) copied to a new buffer on the device.
    pub fn upload_ints<T: cudarc::driver::DeviceRepr>(&self, values: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(values).what("copying to the device")
    }

    /// The first `len` values of `t`, back on the host.
    pub fn download(&self, t: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
        assert!(len <= t.len(), "download of {len} values from a buffer of {}", t.len());
        if len == 0 {
            return Ok(Vec::new());
        }
        if len > STAGING_MAX_VALUES {
            let v = self.stream.clone_dtoh(&t.slice(0..len)).what("copying to the host")?;
            self.synchronize()?;
            return Ok(v);
        }
        // Through page-locked memory of our own: one DMA (21 us for a step's 1 MB of logits on an
        // H200), where a copy into pageable memory goes through the driver's staging in pieces.
        let mut staging = self.staging.lock().unwrap();
        if staging.as_ref().is_none_or(|s| s.len() < len) {
            // Cached, not write-combined (cudarc's default), which the host reads uncached: a
            // step's 1 MB of logits took 70-100 us to copy out. Whole pages, so that the driver's
            // later page-locked allocations (the expert store's, for direct I/O) stay aligned.
            let values = len.next_power_of_two().max(4096 / 4);
            // SAFETY: f32 accepts any bits; only values the copy below writes are read.
            *staging = Some(unsafe { self.ctx.alloc_pinned_with_flags(values, 0) }.what("allocating pinned memory")?);
        }
        let host = staging.as_mut().expect("allocated above").as_mut_slice().what("writing pinned memory")?;
        let (src, _sync) = t.device_ptr(&self.stream);
        // SAFETY: `host` holds at least `len` values and `t` at least `len` (asserted); the
        // copy has finished when `synchronize` returns. A raw copy: cudarc's copies the whole
        // destination, which may be larger than `t`.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut host[..len], src, self.stream.cu_stream()) }
            .what("copying to the host")?;
        self.synchronize()?;
        Ok(host[..len].to_vec())
    }

    /// The index of the largest of the first `len` values of `t` (ties to the lowest index, NaNs
    /// passed over, 0 when nothing compares), as `moe_core::sample::argmax`: found on the device,
    /// so that only the index crosses the bus, not the values (a step's 1 MB of logits took the
    /// host 70-100 us to copy out of the staging).
    pub fn argmax(&self, t: &CudaSlice<f32>, len: usize) -> Result<u32> {
        // The key (a u64) in two f32 slots, so that it comes back through `download`'s staging.
        let key = self.zeros(2)?;
        self.queue_argmax(t, len, key.device_ptr(&self.stream).0)?;
        let halves = self.download(&key, 2)?;
        Ok(key_index(halves[0].to_bits() as u64 | (halves[1].to_bits() as u64) << 32))
    }

    /// Queues the search for [`argmax`](Self::argmax)'s key, into the u64 at device address `key`.
    pub(crate) fn queue_argmax(&self, t: &CudaSlice<f32>, len: usize, key: u64) -> Result<()> {
        assert!(len <= t.len() && len <= u32::MAX as usize, "argmax of {len} values from {}", t.len());
        // SAFETY: `key` is the address of a u64 of device memory (callers' contract).
        unsafe { cudarc::driver::result::memset_d8_async(key, 0, 8, self.stream.cu_stream()) }
            .what("zeroing on the device")?;
        if len == 0 {
            return Ok(());
        }
        let blocks = (len as u32).div_ceil(ARGMAX_THREADS * 8).min(ARGMAX_MAX_BLOCKS);
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (ARGMAX_THREADS, 1, 1), shared_mem_bytes: 0 };
        let n = len as u64;
        let mut b = self.launch(self.f("argmax_key"));
        b.arg(t).arg(&n).arg(&key);
        unsafe { b.launch(cfg) }.what("launching argmax_key")
    }

    /// A new buffer of `len` zeros starting with the first `keep` values of `t`.
    pub fn resized(&self, t: &CudaSlice<f32>, keep: usize, len: usize) -> Result<CudaSlice<f32>> {
        assert!(keep <= t.len() && keep <= len, "resize keeping {keep} of {} into {len}", t.len());
        let mut out = self.zeros(len)?;
        if keep > 0 {
            self.stream.memcpy_dtod(&t.slice(0..keep), &mut out.slice_mut(0..keep)).what("copying on the device")?;
        }
        Ok(out)
    }

    /// Uploads a weight matrix in its stored format (one buffer for its parts).
    pub fn matrix(&self, m: &Matrix) -> Result<DeviceMatrix> {
        let (mut ranges, len) = layout(&[m])?;
        let ranges = ranges.pop().expect("one matrix");
        if len == 0 {
            let buf = Arc::new(self.stream.null().what("allocating")?);
            return Ok(DeviceMatrix::in_buffer(m, buf, ranges));
        }
        // SAFETY: every part is written below; alignment padding is never read.
        let mut buf = unsafe { self.stream.alloc::<u8>(len) }.what("allocating a weight")?;
        let (data, scales, biases) = &ranges;
        let parts = [(Some(data), &m.data), (scales.as_ref(), &m.scales), (biases.as_ref(), &m.biases)];
        for (r, bytes) in parts {
            if let Some(r) = r.filter(|r| !r.is_empty()) {
                self.stream
                    .memcpy_htod(&bytes[..], &mut buf.slice_mut(r.clone()))
                    .what("copying a weight to the device")?;
            }
        }
        Ok(DeviceMatrix::in_buffer(m, Arc::new(buf), ranges))
    }

    // ---- Kernels. Buffer sizes are checked here, so that no kernel reads or writes out of bounds.

    /// `out[t] = table[tokens[t]]` (`[tokens, cols]`).
    /// Rows `ids` (token ids on the device) of the embedding table into `out`.
    pub fn embed(&self, table: &DeviceMatrix, ids: &CudaView<'_, u32>, out: &mut CudaSlice<f32>) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        assert!(out.len() >= ids.len() * table.cols, "embed: output too small");
        let f = self.f(match table.suffix() {
            "f32" => "embed_f32",
            "f16" => "embed_f16",
            "bf16" => "embed_bf16",
            "q8" => "embed_q8",
            "q4" => "embed_q4",
            _ => "embed_q2",
        });
        let (data, sc, bi) = self.parts(table);
        let cols = i32_of(table.cols, "cols");
        let cfg = LaunchConfig { grid_dim: (ids.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.launch(f);
        b.arg(&data).arg(&sc).arg(&bi).arg(&cols).arg(ids).arg(out);
        unsafe { b.launch(cfg) }.what("launching embed")?;
        Ok(())
    }

    /// Views of a matrix's codes, scales and biases (the dummy buffer for absent parts).
    fn parts<'a>(&'a self, m: &'a DeviceMatrix) -> (CudaView<'a, u8>, CudaView<'a, u8>, CudaView<'a, u8>) {
        let part = |r: &Option<Range<usize>>| match r {
            Some(r) => m.buf.slice(r.clone()),
            None => self.dummy.slice(..),
        };
        (m.buf.slice(m.data.clone()), part(&m.scales), part(&m.biases))
    }

    /// `out[t] = W x[t]` for `tokens` rows: `x` is `[tokens, cols]`, `out` `[tokens, rows]`.
    pub fn matmul(&self, w: &DeviceMatrix, x: &CudaSlice<f32>, tokens: usize, out: &mut CudaSlice<f32>) -> Result<()> {
        if tokens == 0 || w.rows == 0 {
            return Ok(());
        }
        assert!(x.len() >= tokens * w.cols, "matmul: input of {} values < {tokens} x {}", x.len(), w.cols);
        assert!(out.len() >= tokens * w.rows, "matmul: output of {} values < {tokens} x {}", out.len(), w.rows);
        let (rows, cols, n) = (i32_of(w.rows, "rows"), i32_of(w.cols, "cols"), i32_of(tokens, "tokens"));
        let (data, sc, bi) = self.parts(w);
        let sfx = w.suffix();
        let bulk = if tokens == 1 && w.rows >= BULK_MIN_ROWS { self.bulk_rows(w.format, w.cols) } else { None };
        if let Some(smem) = bulk {
            let f = self.f(match sfx {
                "f32" => "matvec1_bulk_f32",
                "f16" => "matvec1_bulk_f16",
                "bf16" => "matvec1_bulk_bf16",
                "q8" => "matvec1_bulk_q8",
                "q4" => "matvec1_bulk_q4",
                _ => "matvec1_bulk_q2",
            });
            let cfg = LaunchConfig {
                grid_dim: ((w.rows as u32).div_ceil(DEC_ROWS), 1, 1),
                block_dim: (DEC_THREADS, 1, 1),
                shared_mem_bytes: smem,
            };
            let mut b = self.launch(f);
            b.arg(&data).arg(&sc).arg(&bi).arg(&rows).arg(&cols).arg(x).arg(out);
            unsafe { b.launch(cfg) }.what("launching matvec")?;
        } else if tokens <= MATVEC_MAX_TOKENS {
            let f = self.f(match (tokens, sfx) {
                (1, "f32") => "matvec1_f32",
                (1, "f16") => "matvec1_f16",
                (1, "bf16") => "matvec1_bf16",
                (1, "q8") => "matvec1_q8",
                (1, "q4") => "matvec1_q4",
                (1, _) => "matvec1_q2",
                (_, "f32") => "matvec_f32",
                (_, "f16") => "matvec_f16",
                (_, "bf16") => "matvec_bf16",
                (_, "q8") => "matvec_q8",
                (_, "q4") => "matvec_q4",
                _ => "matvec_q2",
            });
            let vec = w.vectorised() as i32;
            // One token: DEC_ROWS rows per block of DEC_THREADS; more: one row per warp.
            let (rows_per_block, threads) =
                if tokens == 1 { (DEC_ROWS, DEC_THREADS) } else { (MV_ROWS_PER_BLOCK, 32 * MV_ROWS_PER_BLOCK) };
            let cfg = LaunchConfig {
                grid_dim: ((w.rows as u32).div_ceil(rows_per_block), 1, 1),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.launch(f);
            b.arg(&data).arg(&sc).arg(&bi).arg(&rows).arg(&cols).arg(x).arg(&n).arg(out).arg(&vec);
            unsafe { b.launch(cfg) }.what("launching matvec")?;
        } else {
            let f = self.f(match sfx {
                "f32" => "matmul_f32",
                "f16" => "matmul_f16",
                "bf16" => "matmul_bf16",
                "q8" => "matmul_q8",
                "q4" => "matmul_q4",
                _ => "matmul_q2",
            });
            let cfg = LaunchConfig {
                grid_dim: ((w.rows as u32).div_ceil(TILE), (tokens as u32).div_ceil(TILE), 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.launch(f);
            b.arg(&data).arg(&sc).arg(&bi).arg(&rows).arg(&cols).arg(x).arg(&n).arg(out);
            unsafe { b.launch(cfg) }.what("launching matmul")?;
        }
        Ok(())
    }

    /// RMSNorm of `rows` rows of `w.len()` values: `x / rms(x) * (offset + w)`.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        offset: f32,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let width = w.len();
        if rows == 0 || width == 0 {
            return Ok(());
        }
        assert!(x.len() >= rows * width && out.len() >= rows * width, "rms_norm: buffers too small");
        let (cfg, width_i) = row_blocks(rows, width);
        let mut b = self.launch(self.f("rms_norm"));
        b.arg(x).arg(w).arg(out).arg(&width_i).arg(&offset).arg(&eps);
        unsafe { b.launch(cfg) }.what("launching rms_norm")?;
        Ok(())
    }

    /// `x += delta` over `rows` rows of `w.len()` values, then `out = rms_norm(x)` as
    /// [`rms_norm`](Self::rms_norm): the residual add and the next norm in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn add_rms_norm(
        &self,
        x: &mut CudaSlice<f32>,
        delta: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        offset: f32,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let width = w.len();
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let len = rows * width;
        assert!(x.len() >= len && delta.len() >= len && out.len() >= len, "add_rms_norm: buffers too small");
        let (cfg, width_i) = row_blocks(rows, width);
        let mut b = self.launch(self.f("add_rms_norm"));
        b.arg(x).arg(delta).arg(w).arg(out).arg(&width_i).arg(&offset).arg(&eps);
        unsafe { b.launch(cfg) }.what("launching add_rms_norm")?;
        Ok(())
    }

    /// `acc[..len] += x[..len]`.
    pub fn add(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        assert!(acc.len() >= len && x.len() >= len, "add: buffers too small");
        let n = len as u64;
        let mut b = self.launch(self.f("add_inplace"));
        b.arg(acc).arg(x).arg(&n);
        unsafe { b.launch(grid_1d(len, 256)) }.what("launching add")?;
        Ok(())
    }

    /// Full attention of `tokens` new tokens at positions `past..past + tokens`; see the
    /// engine's `Backend::attention`. The caches hold `capacity` rows of `kv_heads * head_dim`.
    /// The kernels read `past` from `past_on_device` (so that a recorded step can be replayed at
    /// later positions); the host value bounds the cache accesses. `live` is the address of a
    /// recorded step's live flag ([`StepChannel::live`](crate::StepChannel::live)), whose step
    /// leaves the caches as they were when let pass; 0 outside recorded steps.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        p: &AttentionShape,
        q_norm: &CudaSlice<f32>,
        k_norm: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        k_cache: &mut CudaSlice<f32>,
        v_cache: &mut CudaSlice<f32>,
        past: usize,
        past_on_device: &CudaView<'_, u32>,
        live: u64,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let hd = p.head_dim;
        if hd > ATTN_MAX_HEAD_DIM
            || hd == 0
            || !hd.is_multiple_of(4)
            || p.kv_heads == 0
            || !p.heads.is_multiple_of(p.kv_heads)
        {
            return Err(Error::Unsupported(format!(
                "attention with head_dim {hd} (at most {ATTN_MAX_HEAD_DIM}, a multiple of 4), {} heads, {} kv heads",
                p.heads, p.kv_heads
            )));
        }
        let kvw = p.kv_heads * hd;
        let qw = p.heads * hd * if p.gated { 2 } else { 1 };
        assert!(q.len() >= tokens * qw, "attention: q too small");
        assert!(k.len() >= tokens * kvw && v.len() >= tokens * kvw, "attention: k/v too small");
        assert!(
            k_cache.len() >= (past + tokens) * kvw && v_cache.len() >= (past + tokens) * kvw,
            "attention: cache too small"
        );
        assert!(out.len() >= tokens * p.heads * hd, "attention: output too small");
        assert!(q_norm.len() >= hd && k_norm.len() >= hd, "attention: norm weights too small");
        let (heads, kv_heads, hd_i) =
            (i32_of(p.heads, "heads"), i32_of(p.kv_heads, "kv_heads"), i32_of(hd, "head_dim"));
        i32_of(past + tokens, "positions");
        let (rot, gated) = (i32_of(p.rotary_dim, "rotary_dim"), p.gated as i32);
        let (theta, offset, eps) = (p.rope_theta, p.norm_offset, p.eps);
        let threads = (hd.next_power_of_two() as u32).clamp(32, 256);
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, (p.kv_heads + p.heads) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: (hd * 4) as u32,
        };
        let mut qr = self.uninit(tokens * p.heads * hd)?;
        let mut b = self.launch(self.f("attn_append_kv"));
        b.arg(q).arg(k).arg(v).arg(q_norm).arg(k_norm).arg(&mut qr).arg(&mut *k_cache).arg(&mut *v_cache);
        b.arg(&heads).arg(&kv_heads).arg(&hd_i).arg(&rot).arg(&theta).arg(&offset).arg(&eps).arg(&gated);
        b.arg(past_on_device).arg(&live);
        unsafe { b.launch(cfg) }.what("launching attn_append_kv")?;

        // One query splits its positions over blocks (by the cache's capacity, which a recorded
        // step keeps, not by the position, which a replay changes); several tokens keep one block
        // each, for a bounded scratch.
        let capacity = k_cache.len() / kvw;
        let blocks = if tokens == 1 { capacity.div_ceil(ATTN_SPLIT_POSITIONS).clamp(1, ATTN_MAX_SPLITS) } else { 1 };
        // Positions per block, whole rounds of the warps; fewer blocks may then cover the cache.
        let span = capacity.div_ceil(blocks).next_multiple_of(ATTN_ROUND);
        let splits = capacity.div_ceil(span).max(1);
        let mut part = if splits > 1 { Some(self.uninit(tokens * p.heads * splits * (hd + 2))?) } else { None };
        let (span_i, splits_i) = (i32_of(span, "span"), splits as i32);
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, p.heads as u32, splits as u32),
            block_dim: (ATTN_WARPS * 32, 1, 1),
            shared_mem_bytes: ((1 + ATTN_WARPS as usize) * hd * 4) as u32,
        };
        let mut b = self.launch(self.f("attn_decode"));
        b.arg(&qr).arg(q).arg(&*k_cache).arg(&*v_cache).arg(&mut *out);
        match &mut part {
            Some(part) => b.arg(part),
            None => b.arg(&mut qr),
        };
        b.arg(&heads).arg(&kv_heads).arg(&hd_i).arg(past_on_device).arg(&gated).arg(&span_i);
        unsafe { b.launch(cfg) }.what("launching attn_decode")?;
        if let Some(part) = &part {
            let cfg = LaunchConfig {
                grid_dim: (tokens as u32, p.heads as u32, 1),
                block_dim: (threads.min(128), 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.launch(self.f("attn_combine"));
            b.arg(part).arg(q).arg(out).arg(&heads).arg(&hd_i).arg(&splits_i).arg(&gated);
            unsafe { b.launch(cfg) }.what("launching attn_combine")?;
        }
        Ok(())
    }

    /// GatedDeltaNet over `tokens` tokens; see the engine's `Backend::delta_net`.
    /// `conv_w` is `[conv_width, kernel]`; `conv_state` `[kernel - 1, conv_width]`; `ssm`
    /// `[v_heads, k_dim, v_dim]`; `proj` `[tokens, proj_width]` (the layout the engine's
    /// `Backend::delta_net` documents); `out` `[tokens, value_width]`. `live` as in
    /// [`attention`](Self::attention), for the states (only one token's launches read it: a
    /// recorded step decodes one token).
    #[allow(clippy::too_many_arguments)]
    pub fn delta_net(
        &self,
        p: &DeltaNetShape,
        conv_w: &CudaSlice<f32>,
        a_log: &CudaSlice<f32>,
        dt_bias: &CudaSlice<f32>,
        norm: &CudaSlice<f32>,
        proj: &CudaSlice<f32>,
        conv_state: &mut CudaSlice<f32>,
        ssm: &mut CudaSlice<f32>,
        live: u64,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if tokens == 0 {
            return Ok(());
        }
        let (kh, vh, dk, dv, kk) = (p.k_heads, p.v_heads, p.k_dim, p.v_dim, p.conv_kernel);
        if kk == 0 || kk > DN_MAX_KERNEL || dk > DN_MAX_K_DIM || kh == 0 || !vh.is_multiple_of(kh) {
            return Err(Error::Unsupported(format!(
                "DeltaNet with conv kernel {kk} (at most {DN_MAX_KERNEL}), k_dim {dk} (at most {DN_MAX_K_DIM}), {kh} key heads, {vh} value heads"
            )));
        }
        let (cw, vw, pw) = (p.conv_width(), p.value_width(), p.proj_width());
        assert!(proj.len() >= tokens * pw, "delta_net: projection too small");
        assert!(conv_w.len() >= cw * kk && conv_state.len() >= (kk - 1) * cw, "delta_net: conv buffers too small");
        assert!(ssm.len() >= vh * dk * dv && out.len() >= tokens * vw, "delta_net: state/output too small");
        assert!(a_log.len() >= vh && dt_bias.len() >= vh && norm.len() >= dv, "delta_net: parameters too small");
        let (cw_i, kk_i, t_i) = (i32_of(cw, "conv_width"), i32_of(kk, "kernel"), i32_of(tokens, "tokens"));
        let pw_i = i32_of(pw, "proj_width");
        let (z, beta, a) = (proj.slice(cw..), proj.slice(cw + vw..), proj.slice(cw + vw + vh..));
        let (kh_i, vh_i, dk_i, dv_i) =
            (i32_of(kh, "k_heads"), i32_of(vh, "v_heads"), i32_of(dk, "k_dim"), i32_of(dv, "v_dim"));
        let norm_threads = (dv.next_power_of_two() as u32).clamp(32, 256);
        let eps = p.eps;

        if tokens == 1 {
            let cfg = LaunchConfig {
                grid_dim: (vh as u32, dv.div_ceil(32) as u32, 1),
                block_dim: (32 * DN_SLICES, 1, 1),
                shared_mem_bytes: (2 * dk * 4) as u32,
            };
            let mut b = self.launch(self.f("dn_step"));
            b.arg(proj).arg(conv_w).arg(&*conv_state).arg(&beta).arg(&a).arg(a_log).arg(dt_bias).arg(ssm);
            b.arg(&mut *out).arg(&cw_i).arg(&kh_i).arg(&vh_i).arg(&dk_i).arg(&dv_i).arg(&kk_i).arg(&live);
            unsafe { b.launch(cfg) }.what("launching dn_step")?;
            let cfg =
                LaunchConfig { grid_dim: (vh as u32, 1, 1), block_dim: (norm_threads, 1, 1), shared_mem_bytes: 0 };
            let mut b = self.launch(self.f("dn_finish"));
            b.arg(&mut *out).arg(&z).arg(norm).arg(&dv_i).arg(&eps).arg(proj).arg(conv_state).arg(&cw_i);
            b.arg(&kk_i).arg(&live);
            unsafe { b.launch(cfg) }.what("launching dn_finish")?;
            return Ok(());
        }

        let mut mixed = self.uninit(tokens * cw)?;

        let mut b = self.launch(self.f("dn_conv"));
        b.arg(proj).arg(&pw_i).arg(conv_w).arg(conv_state).arg(&mut mixed).arg(&cw_i).arg(&kk_i).arg(&t_i);
        unsafe { b.launch(grid_1d(cw, 128)) }.what("launching dn_conv")?;

        let threads = (dk.next_power_of_two() as u32).clamp(32, 256);
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, 2 * kh as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.launch(self.f("dn_qk_norm"));
        b.arg(&mut mixed).arg(&cw_i).arg(&kh_i).arg(&dk_i);
        unsafe { b.launch(cfg) }.what("launching dn_qk_norm")?;

        // Keys and queries of a chunk (rows padded by one float), then the block's state columns.
        let chunk_smem = (2 * DN_CHUNK * (dk + 1) + dk * DN_COLS) * 4;
        let (name, cfg) = if tokens >= DN_CHUNK_MIN_TOKENS && chunk_smem <= self.dn_chunk_smem {
            let grid_dim = (vh as u32, dv.div_ceil(DN_COLS) as u32, 1);
            (
                "dn_chunk",
                LaunchConfig { grid_dim, block_dim: (DN_CHUNK_THREADS, 1, 1), shared_mem_bytes: chunk_smem as u32 },
            )
        } else {
            let grid_dim = (vh as u32, dv.div_ceil(32) as u32, 1);
            let cfg =
                LaunchConfig { grid_dim, block_dim: (32 * DN_SLICES, 1, 1), shared_mem_bytes: (2 * dk * 4) as u32 };
            ("dn_recurrence", cfg)
        };
        let mut b = self.launch(self.f(name));
        b.arg(&mixed).arg(&beta).arg(&a).arg(&pw_i).arg(a_log).arg(dt_bias).arg(ssm).arg(&mut *out);
        b.arg(&cw_i).arg(&kh_i).arg(&vh_i).arg(&dk_i).arg(&dv_i).arg(&t_i);
        unsafe { b.launch(cfg) }.what("launching the DeltaNet recurrence")?;

        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, vh as u32, 1),
            block_dim: (norm_threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.launch(self.f("dn_gated_norm"));
        b.arg(&mut *out).arg(&z).arg(&pw_i).arg(norm).arg(&vh_i).arg(&dv_i).arg(&eps);
        unsafe { b.launch(cfg) }.what("launching dn_gated_norm")?;
        Ok(())
    }

    /// One SwiGLU expert on rows `rows` of `x` (`[*, hidden]`):
    /// `acc[rows[i]] += scales[i] * down(silu(gate x) * up x)`. The rows must be distinct.
    #[allow(clippy::too_many_arguments)]
    pub fn expert_ffn(
        &self,
        gate: &DeviceMatrix,
        up: &DeviceMatrix,
        down: &DeviceMatrix,
        x: &CudaSlice<f32>,
        rows: &[u32],
        scales: &[f32],
        acc: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = rows.len();
        if n == 0 {
            return Ok(());
        }
        assert_eq!(n, scales.len(), "expert_ffn: one scale per row");
        let (h, inter) = (gate.cols, gate.rows);
        assert!(
            up.rows == inter && up.cols == h && down.rows == h && down.cols == inter,
            "expert_ffn: shapes disagree"
        );
        let max_row = *rows.iter().max().unwrap() as usize;
        assert!(x.len() >= (max_row + 1) * h && acc.len() >= (max_row + 1) * h, "expert_ffn: row out of range");
        let idx = self.upload_ints(rows)?;
        let sc = self.upload(scales)?;
        let (h_i, n_i) = (i32_of(h, "hidden"), i32_of(n, "rows"));
        let row_cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };

        let mut xs = self.uninit(n * h)?;
        let mut b = self.launch(self.f("gather_rows"));
        b.arg(x).arg(&idx).arg(&h_i).arg(&n_i).arg(&mut xs);
        unsafe { b.launch(row_cfg) }.what("launching gather_rows")?;

        let (mut g, mut u, mut y) = (self.uninit(n * inter)?, self.uninit(n * inter)?, self.uninit(n * h)?);
        self.matmul(gate, &xs, n, &mut g)?;
        self.matmul(up, &xs, n, &mut u)?;
        let len = (n * inter) as u64;
        let mut b = self.launch(self.f("swiglu"));
        b.arg(&mut g).arg(&u).arg(&len);
        unsafe { b.launch(grid_1d(n * inter, 256)) }.what("launching swiglu")?;
        self.matmul(down, &g, n, &mut y)?;

        let mut b = self.launch(self.f("scatter_add"));
        b.arg(acc).arg(&y).arg(&idx).arg(&sc).arg(&h_i).arg(&n_i);
        unsafe { b.launch(row_cfg) }.what("launching scatter_add")?;
        Ok(())
    }
}

/// Most experts one fused MoE launch takes (`MOE_MAX_SLOTS` in moe.cu).
pub const MOE_MAX_SLOTS: usize = 16;
/// Most router outputs the device top-k handles (`ROUTE_PER_THREAD` for each of the block's
/// `ROUTE_THREADS`).
pub const ROUTE_MAX_EXPERTS: usize = 4 * ROUTE_THREADS as usize;
const ROUTE_THREADS: u32 = 256;

/// `MoeSlots` of moe.cu: part `p` of slot `k` is at `part[k][p]`, or `table[ids[k]] + off[p]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct MoeSlotsArg {
    part: [[u64; 9]; MOE_MAX_SLOTS],
    off: [u64; 9],
    table: u64,
    ids: u64,
}

// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for MoeSlotsArg {}

/// The shapes and formats of the experts of one fused MoE launch: gate and up `[inter, hidden]`
/// in one format, down `[hidden, inter]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MoeShape {
    pub gate: WeightFormat,
    pub down: WeightFormat,
    pub hidden: usize,
    pub inter: usize,
}

impl MoeShape {
    /// The shape of an expert's gate, up and down (formats, rows, cols), if the fused kernels take
    /// it: gate and up alike, rows of whole 16-byte chunks.
    pub fn of(parts: [(WeightFormat, usize, usize); 3]) -> Result<MoeShape> {
        let [(gf, inter, hidden), (uf, ur, uc), (df, dr, dc)] = parts;
        let chunked = |f: WeightFormat, cols: usize| kernels_take(f) && chunked_rows(f, cols);
        if uf != gf || (ur, uc) != (inter, hidden) || (dr, dc) != (hidden, inter) {
            return Err(Error::Unsupported("expert matrices of different shapes or gate/up formats".into()));
        }
        if !(chunked(gf, hidden) && chunked(df, inter)) {
            return Err(Error::Unsupported(format!("fused experts of shape {inter}x{hidden}")));
        }
        Ok(MoeShape { gate: gf, down: df, hidden, inter })
    }

    pub fn of_device(e: &[&DeviceMatrix; 3]) -> Result<MoeShape> {
        MoeShape::of(e.map(|m| (m.format, m.rows, m.cols)))
    }

    pub fn of_host(e: &[&Matrix; 3]) -> Result<MoeShape> {
        MoeShape::of(e.map(|m| (m.format, m.rows, m.cols)))
    }
}

/// The experts of one fused MoE launch ([`Gpu::moe_token`]).
#[derive(Clone, Copy)]
pub enum MoeExperts<'a> {
    /// Slot `k`'s nine part addresses ([`expert_parts`], [`host_parts`]).
    Listed(&'a [[u64; 9]]),
    /// `slots` experts chosen on the device: slot `k` is expert `ids[k]`, whose gate codes start at
    /// `table[ids[k]]` and its other parts `off` bytes further (every expert of a layer has the same
    /// layout; [`part_offsets`]). `resident`: every address is in GPU memory (not page-locked host
    /// memory, which the kernels would read over the bus).
    Table { table: &'a CudaSlice<u64>, ids: &'a CudaSlice<i32>, slots: usize, off: [u64; 9], resident: bool },
}

impl DeviceMatrix {
    /// Device addresses of the codes, scales and biases (0 for the absent parts of float formats).
    pub fn part_ptrs(&self, gpu: &Gpu) -> [u64; 3] {
        let (base, _sync) = self.buf.device_ptr(&gpu.stream);
        let at = |r: &Option<Range<usize>>| r.as_ref().map_or(0, |r| base + r.start as u64);
        [base + self.data.start as u64, at(&self.scales), at(&self.biases)]
    }
}

/// The addresses of an expert's nine parts in device memory (0 for absent ones).
pub fn expert_parts(gpu: &Gpu, e: &[&DeviceMatrix; 3]) -> [u64; 9] {
    let [g, u, d] = e.map(|m| m.part_ptrs(gpu));
    [g[0], g[1], g[2], u[0], u[1], u[2], d[0], d[1], d[2]]
}

/// The addresses of an expert's nine parts in host memory (0 for absent ones), for kernels that
/// read page-locked memory over the bus; `None` unless the codes are 16-byte aligned.
pub fn host_parts(e: &[&Matrix; 3]) -> Option<[u64; 9]> {
    let at = |b: &moe_core::Bytes| if b.is_empty() { 0 } else { b.as_ptr() as u64 };
    let [g, u, d] = e.map(|m| [at(&m.data), at(&m.scales), at(&m.biases)]);
    let parts = [g[0], g[1], g[2], u[0], u[1], u[2], d[0], d[1], d[2]];
    [parts[0], parts[3], parts[6]].iter().all(|p| p.is_multiple_of(16)).then_some(parts)
}

/// The address of an expert's gate codes, and the addresses of its nine `parts` relative to it
/// (what [`MoeExperts::Table`] needs: a table holds the first, every expert of a layer shares the
/// second).
pub fn part_offsets(parts: [u64; 9]) -> (u64, [u64; 9]) {
    let base = parts[0];
    // Absent parts (float formats) are never read: offset 0, the same for every expert.
    (base, parts.map(|v| if v == 0 { 0 } else { v.wrapping_sub(base) }))
}

impl Gpu {
    /// Router softmax and top-`k` per token on the device: `ids` and `weights` get `[tokens, k]`
    /// (best first, ties to the lower id; weights renormalised when `norm`), as
    /// `moe_core::ops::route`.
    #[allow(clippy::too_many_arguments)]
    pub fn route_topk(
        &self,
        logits: &CudaView<'_, f32>,
        tokens: usize,
        experts: usize,
        k: usize,
        norm: bool,
        ids: &mut CudaSlice<i32>,
        weights: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if experts > ROUTE_MAX_EXPERTS || k == 0 || k > MOE_MAX_SLOTS.min(experts) {
            return Err(Error::Unsupported(format!(
                "device routing of top-{k} of {experts} experts (at most top-{MOE_MAX_SLOTS} of {ROUTE_MAX_EXPERTS})"
            )));
        }
        assert!(logits.len() >= tokens * experts, "route_topk: logits too small");
        assert!(ids.len() >= tokens * k && weights.len() >= tokens * k, "route_topk: outputs too small");
        if tokens == 0 {
            return Ok(());
        }
        let (e, k_i, norm) = (i32_of(experts, "experts"), k as i32, norm as i32);
        let cfg =
            LaunchConfig { grid_dim: (tokens as u32, 1, 1), block_dim: (ROUTE_THREADS, 1, 1), shared_mem_bytes: 0 };
        let mut b = self.launch(self.f("route_topk"));
        b.arg(logits).arg(&e).arg(&k_i).arg(&norm).arg(ids).arg(weights);
        unsafe { b.launch(cfg) }.what("launching route_topk")?;
        Ok(())
    }

    /// SwiGLU experts of `tokens` tokens in two launches: `out[t] += sum_k w_tk * down_k(silu(gate_k
    /// x[t]) * up_k x[t])`, `w_tk = weights[t * slots + k]` (or its sigmoid when `sigmoid`: the
    /// gated shared expert). Listed experts serve every token; a table's `ids` hold each token's
    /// `slots` choices in turn. `h` is scratch of `tokens x slots x inter` values. The stream
    /// then [joins](Self::join) `join`, whose work (the shared expert) may add to `out` beside the
    /// down launch: both add atomically, so that the routed down need not wait for the shared one
    /// (which gets SMs only as the routed gate and up launch drains).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_token(
        &self,
        shape: &MoeShape,
        experts: MoeExperts<'_>,
        tokens: usize,
        x: &CudaSlice<f32>,
        weights: &CudaSlice<f32>,
        sigmoid: bool,
        h: &mut CudaSlice<f32>,
        join: Option<&Gpu>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let mut arg = MoeSlotsArg { part: [[0; 9]; MOE_MAX_SLOTS], off: [0; 9], table: 0, ids: 0 };
        let slots = match &experts {
            MoeExperts::Listed(list) => {
                if list.len() > MOE_MAX_SLOTS {
                    return Err(Error::Unsupported(format!("{} experts in one launch", list.len())));
                }
                arg.part[..list.len()].copy_from_slice(list);
                list.len()
            }
            MoeExperts::Table { table, ids, slots, off, .. } => {
                assert!(ids.len() >= tokens * *slots, "moe_token: fewer ids than tokens x slots");
                arg.off = *off;
                arg.table = table.device_ptr(&self.stream).0;
                arg.ids = ids.device_ptr(&self.stream).0;
                *slots
            }
        };
        if slots == 0 || tokens == 0 {
            return join.map_or(Ok(()), |side| self.join(side));
        }
        if slots > MOE_MAX_SLOTS {
            return Err(Error::Unsupported(format!("{slots} experts in one launch")));
        }
        let MoeShape { gate, down, hidden, inter } = *shape;
        assert!(x.len() >= tokens * hidden && out.len() >= tokens * hidden, "moe_token: x/out too small");
        let pairs = tokens * slots;
        assert!(h.len() >= pairs * inter && weights.len() >= pairs, "moe_token: scratch or weights too small");
        if tokens > MOE_MAX_TOKENS {
            return Err(Error::Unsupported(format!("{tokens} tokens in one MoE launch (at most {MOE_MAX_TOKENS})")));
        }
        let tokens_u = tokens as u32;
        let (hidden_i, inter_i, slots_i, sig) =
            (i32_of(hidden, "hidden"), i32_of(inter, "inter"), slots as i32, sigmoid as i32);
        // One token's experts, all in GPU memory: the down projection through the ring kernel
        // where it takes the shapes.
        let table = matches!(experts, MoeExperts::Table { resident: true, .. }) && tokens == 1;
        let down_ring = match self.ring_rows(down, hidden, inter) {
            Some((stage, chunks)) if table => {
                let f = &self.functions[format!("moe_down_ring_{}", format_suffix(down)).as_str()];
                self.ring_launch(f, slots * stage, hidden / DEC_ROWS as usize, slots * chunks)?.map(|l| (f, l))
            }
            _ => None,
        };
        let name = format!("moe_gate_up_{}", format_suffix(gate));
        let cfg = LaunchConfig {
            grid_dim: ((inter as u32).div_ceil(GATE_UP_ROWS), slots as u32, tokens_u),
            block_dim: (DEC_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.launch(&self.functions[name.as_str()]);
        b.arg(&arg).arg(x).arg(&hidden_i).arg(&inter_i).arg(&mut *h);
        unsafe { b.launch(cfg) }.what("launching moe_gate_up")?;
        if let Some((f, (cfg, stages))) = down_ring {
            let mut b = self.launch(f);
            b.arg(&arg).arg(&slots_i).arg(&*h).arg(&hidden_i).arg(&inter_i).arg(weights).arg(&sig);
            b.arg(&stages).arg(out);
            unsafe { b.launch(cfg) }.what("launching moe_down_ring")?;
        } else {
            let name = format!("moe_down_{}", format_suffix(down));
            let cfg = LaunchConfig {
                grid_dim: ((hidden as u32).div_ceil(DEC_ROWS), tokens_u, 1),
                block_dim: (DEC_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = self.launch(&self.functions[name.as_str()]);
            b.arg(&arg).arg(&slots_i).arg(&*h).arg(&hidden_i).arg(&inter_i).arg(weights).arg(&sig).arg(out);
            unsafe { b.launch(cfg) }.what("launching moe_down")?;
        }
        join.map_or(Ok(()), |side| self.join(side))
    }

    /// The routed experts of `tokens` tokens (prefill) with every expert of the layer in GPU
    /// memory (`table` and `off` as in [`MoeExperts::Table`]): routed on the device (the top-`k`
    /// of each row of `logits`, as [`route_topk`](Self::route_topk)); gate and up grouped by
    /// expert, so that each chosen expert's rows are read from device memory once for all its
    /// tokens; down per token: `out[t] += sum_k w_tk * expert_tk(x[t])`. Works through the tokens
    /// in chunks of at most `MOE_GROUP_MAX_PAIRS / k`, with scratch for one chunk. The first down
    /// launch waits for the work queued on `join` so far (which may add to `out` too).
    #[allow(clippy::too_many_arguments)]
    pub fn moe_grouped(
        &self,
        shape: &MoeShape,
        (table, off): (&CudaSlice<u64>, [u64; 9]),
        (experts, k, norm): (usize, usize, bool),
        logits: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        tokens: usize,
        join: Option<&Gpu>,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let MoeShape { gate, down, hidden, inter } = *shape;
        if tokens == 0 {
            return Ok(());
        }
        assert!(table.len() >= experts, "moe_grouped: table too small");
        assert!(logits.len() >= tokens * experts, "moe_grouped: logits too small");
        assert!(x.len() >= tokens * hidden && out.len() >= tokens * hidden, "moe_grouped: x/out too small");
        let chunk = (MOE_GROUP_MAX_PAIRS / k.max(1)).min(tokens);
        let pairs_max = chunk * k;
        let (mut ids, mut weights) = (self.zeros_i32(pairs_max)?, self.uninit(pairs_max)?);
        let mut order = self.zeros_i32(pairs_max)?;
        let (mut starts, mut distinct) = (self.zeros_i32(experts + 1)?, self.zeros_i32(experts + 1)?);
        let mut h = self.uninit(pairs_max * inter)?;
        let table_ptr = table.device_ptr(&self.stream).0;
        let grouped = MoeSlotsArg { part: [[0; 9]; MOE_MAX_SLOTS], off, table: table_ptr, ids: 0 };
        let per_token = MoeSlotsArg { ids: ids.device_ptr(&self.stream).0, ..grouped };
        let (hidden_i, inter_i, k_i, experts_i) =
            (i32_of(hidden, "hidden"), i32_of(inter, "inter"), k as i32, i32_of(experts, "experts"));
        let rows = |n: usize| (n as u32).div_ceil(DEC_ROWS);
        let block = |grid: (u32, u32, u32)| LaunchConfig {
            grid_dim: grid,
            block_dim: (DEC_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        for t0 in (0..tokens).step_by(chunk) {
            let n = chunk.min(tokens - t0);
            let pairs = i32_of(n * k, "pairs");
            self.route_topk(&logits.slice(t0 * experts..), n, experts, k, norm, &mut ids, &mut weights)?;
            let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
            let mut b = self.launch(self.f("moe_group"));
            b.arg(&ids).arg(&pairs).arg(&experts_i).arg(&mut order).arg(&mut starts).arg(&mut distinct);
            unsafe { b.launch(cfg) }.what("launching moe_group")?;
            // A block row per chosen expert (at most this many; the rest return at once).
            let chosen = (n * k).min(experts) as u32;
            let xs = x.slice(t0 * hidden..);
            let name = format!("moe_gate_up_grouped_{}", format_suffix(gate));
            let mut b = self.launch(&self.functions[name.as_str()]);
            b.arg(&grouped).arg(&order).arg(&starts).arg(&distinct).arg(&k_i).arg(&xs).arg(&hidden_i).arg(&inter_i);
            b.arg(&mut h);
            unsafe { b.launch(block((rows(inter), chosen, 1))) }.what("launching moe_gate_up_grouped")?;
            if let (0, Some(side)) = (t0, join) {
                self.join(side)?;
            }
            let (name, sig) = (format!("moe_down_{}", format_suffix(down)), 0i32);
            let mut o = out.slice_mut(t0 * hidden..);
            let mut b = self.launch(&self.functions[name.as_str()]);
            b.arg(&per_token).arg(&k_i).arg(&h).arg(&hidden_i).arg(&inter_i).arg(&weights).arg(&sig).arg(&mut o);
            unsafe { b.launch(block((rows(hidden), n as u32, 1))) }.what("launching moe_down")?;
        }
        Ok(())
    }
}

/// The kernel-name suffix of a weight format.
fn format_suffix(f: WeightFormat) -> &'static str {
    match f {
        WeightFormat::Float(DType::F32) => "f32",
        WeightFormat::Float(DType::F16) => "f16",
        WeightFormat::Float(DType::BF16) => "bf16",
        WeightFormat::Affine { bits: 8, .. } => "q8",
        WeightFormat::Affine { bits: 4, .. } => "q4",
        WeightFormat::Affine { bits: 2, .. } => "q2",
        WeightFormat::Affine { .. } => unreachable!("checked at upload"),
    }
}
