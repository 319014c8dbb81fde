//! The CUDA implementation of [`Backend`]: f32 activations in device memory (`CudaSlice<f32>`),
//! weights uploaded once in their stored format (bf16/f16/f32 or affine q8/q4/q2) and
//! dequantised inside the kernels. Every operation is queued on one stream; `read` waits for it.
//!
//! Routed experts go through a GPU-memory tier ([`moe_cuda::ExpertTier`]): a byte budget of
//! uploaded experts (`--vram-budget`, `auto` = free device memory after the dense weights less
//! [`moe_cuda::VRAM_HEADROOM`]), least-used evicted first; a hit reads nothing from the expert
//! store and copies nothing, a miss is uploaded on a copy stream that the compute stream waits on
//! with an event (straight from the store's buffer when it is page-locked, else through pinned
//! staging). All experts are uploaded at load when they fit the budget. With budget 0 nothing is
//! kept: the fused kernels read each expert from the store's page-locked buffer over PCIe (heap
//! buffers are uploaded for the one use).
//!
//! Decoding routes on the device ([`Backend::routed_experts_on_device`]): the router's top-k runs
//! in a kernel, and a layer's selected experts run in two fused launches. When every expert of the
//! model is resident in GPU memory (or, with budget 0, in the store's page-locked RAM), the kernels
//! find the experts through a per-layer table of device (or host) addresses and nothing is copied
//! back to the host until the logits; otherwise the chosen
//! ids are copied back (one small wait per layer), the missing experts are fetched (and uploaded
//! or read in place), and the shared expert is queued before the host waits for the store.
//!
//! A decode step can be recorded as a CUDA graph and replayed ([`Backend::record_step`]) when it
//! never needs the host midway, that is when every expert is resident. While recording, the
//! embedding and attention read the token and position from [`moe_cuda::StepChannel`], and the
//! kernels that write state its live flag; an operation that needs the host instead spoils the
//! recording and queues nothing, and the step then runs directly. A replay may be queued before
//! its token is known ([`Backend::queue_step`]): it waits on the device until it is fed, and
//! anything else queued on the backend first lets it pass.
//!
//! The trait's operations cannot fail, so a device error (out of memory, a faulting kernel) is
//! a panic that names the operation; opening the device is the fallible step.

use crate::backend::*;
use anyhow::Result;
use moe_core::Matrix;
use moe_cuda::{
    CudaSlice, DeviceMatrix, Gpu, MOE_MAX_SLOTS, MOE_MAX_TOKENS, MoeExperts, MoeShape, ROUTE_MAX_EXPERTS, expert_parts,
    part_offsets,
};
use moe_store::{Adopted, Budget, Expert, ExpertSource};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

pub use moe_cuda::Error as CudaError;
pub use moe_cuda::ExpertHandle;

pub struct CudaBackend {
    gpu: Gpu,
    /// A second stream for the shared expert, beside the routed experts.
    side: Gpu,
    /// Operations are queued on `side` (while the shared expert is).
    on_side: AtomicBool,
    tier: moe_cuda::ExpertTier,
    routes: Mutex<Option<RouteBuffers>>,
    /// Scratch of the fused expert launches (`slots x inter` values), one per stream, grown on
    /// demand.
    hidden: Mutex<[Option<CudaSlice<f32>>; 2]>,
    tables: Mutex<ResidentTables>,
    step: moe_cuda::StepChannel,
    /// The recorded step queued ahead of its token ([`Backend::queue_step`]), until fed.
    ahead: Mutex<Option<Ahead>>,
    /// Whether decode steps are recorded and replayed at all.
    graphs: AtomicBool,
    /// A step is being recorded, and whether something in it needed the host.
    recording: AtomicBool,
    spoiled: AtomicBool,
    /// Counts reallocations of the scratch that recorded steps use.
    scratch_epoch: AtomicU64,
    /// The experts evicted at the last settled layer, on their way into the RAM tier (after
    /// `tier`, so that its drop waits for the copies first).
    handover: Mutex<Option<Handover>>,
}

/// Evicted experts of `layer` whose device-to-host copies into the RAM tier's buffers are in
/// flight: the device copies and the buffers are held until `done` has passed. The next layer's
/// settling waits for it, by when the copies have long landed (a layer's work ran meanwhile);
/// so does anything that asks the store for this layer's experts before that (a model of one
/// layer).
struct Handover {
    layer: usize,
    done: moe_cuda::CopyMark,
    held: Vec<(moe_cuda::EvictedExpert, Adopted)>,
}

impl Handover {
    fn land(self) {
        // A failed wait leaves the copies' outcome unknown: their device and host memory stay
        // held (leaked) rather than be reused under a copy that may still run.
        if self.done.wait().is_err() {
            std::mem::forget(self.held);
        }
    }
}

/// A recorded step queued before its token was known.
struct Ahead {
    seq: u32,
    position: u32,
    /// The recording's expert uses, counted when the step is fed.
    uses: [u64; 3],
}

/// A decode step recorded as a graph.
pub struct CudaStepGraph {
    graph: moe_cuda::StepGraph,
    /// The expert tier's generation and the scratch epoch it was recorded under.
    epoch: (u64, u64),
    /// The expert tier's hits, misses and bytes read over the bus in one step, counted again on
    /// each replay.
    uses: [u64; 3],
}

/// The chosen experts of one token, on the device and (when the host needs them) copied back.
struct RouteBuffers {
    ids: CudaSlice<i32>,
    weights: CudaSlice<f32>,
    host_ids: moe_cuda::PinnedHostSlice<i32>,
}

/// Where a chosen expert is read from by the fused kernels.
enum Slot {
    Device(moe_cuda::ExpertHandle),
    /// Page-locked host memory of the expert store, and the parts' addresses in it.
    Host(Box<Expert>, [u64; 9]),
}

impl Slot {
    fn shape(&self) -> moe_cuda::Result<MoeShape> {
        match self {
            Slot::Device(h) => MoeShape::of_device(&h.matrices()),
            Slot::Host(x, _) => MoeShape::of_host(&[&x.gate, &x.up, &x.down]),
        }
    }

    fn parts(&self, gpu: &Gpu) -> [u64; 9] {
        match self {
            Slot::Device(h) => expert_parts(gpu, &h.matrices()),
            Slot::Host(_, p) => *p,
        }
    }
}

/// Per-layer tables of expert addresses, valid while the tier's generation is `generation`.
#[derive(Default)]
struct ResidentTables {
    generation: u64,
    layers: HashMap<usize, LayerTable>,
}

struct LayerTable {
    /// The gate codes' address of every expert of the layer, and where the other parts are
    /// relative to them.
    table: CudaSlice<u64>,
    off: [u64; 9],
    shape: MoeShape,
    /// Bytes one use reads over the bus: 0 for experts in GPU memory.
    host_bytes: u64,
    _held: HeldExperts,
}

/// Keeps a table's experts in memory until the table is dropped.
enum HeldExperts {
    /// In GPU memory: their handles, when dropped, order any later free after the kernels queued
    /// until then.
    Device { _handles: Vec<moe_cuda::ExpertHandle> },
    /// In the store's page-locked memory, read by the kernels over the bus.
    Host { _experts: Vec<Expert> },
}

impl CudaBackend {
    /// Opens GPU `ordinal` with an automatic VRAM budget for experts. Fails with a [`CudaError`]
    /// that says "no CUDA driver found (libcuda.so.1)" or "no GPU" on machines without one (see
    /// [`CudaError::is_unavailable`]), or carries the NVRTC log if the kernels do not compile.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_vram_budget(ordinal, Budget::Auto)
    }

    /// [`new`](Self::new) with `budget` bytes of device memory for routed experts (`auto`: what
    /// is free once the dense weights are loaded, less 2 GiB; 0: keep none).
    pub fn with_vram_budget(ordinal: usize, budget: Budget) -> Result<Self> {
        let gpu = Gpu::new(ordinal)?;
        let tier = gpu.expert_tier(vram_budget(budget))?;
        let step = gpu.step_channel()?;
        let side = gpu.side_stream()?;
        Ok(CudaBackend {
            gpu,
            side,
            on_side: AtomicBool::new(false),
            tier,
            routes: Mutex::default(),
            hidden: Mutex::default(),
            tables: Mutex::default(),
            step,
            ahead: Mutex::new(None),
            graphs: AtomicBool::new(true),
            recording: AtomicBool::new(false),
            spoiled: AtomicBool::new(false),
            scratch_epoch: AtomicU64::new(0),
            handover: Mutex::new(None),
        })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Changes the VRAM budget for experts (evicting what no longer fits); `auto` resolves now.
    pub fn set_vram_budget(&self, budget: Budget) -> Result<()> {
        Ok(self.tier.set_budget(vram_budget(budget))?)
    }

    /// The VRAM tier's hits, misses, bytes uploaded and residents.
    pub fn vram_stats(&self) -> ExpertTierStats {
        self.tier.stats()
    }

    pub fn reset_vram_stats(&self) {
        self.tier.reset_stats()
    }

    /// The stream operations are queued on now. Anything queued lets a step that waits for its
    /// token pass first (it would wait behind it, and anything that waits for the device with it).
    fn queue(&self) -> &Gpu {
        self.let_pass();
        if self.on_side.load(Ordering::Relaxed) { &self.side } else { &self.gpu }
    }

    /// Lets the step queued ahead of its token pass, if there is one: it runs leaving every state
    /// as it was.
    fn let_pass(&self) {
        if let Some(a) = self.ahead.lock().unwrap().take() {
            ok(self.gpu.feed_step(&self.step, a.seq, None), "letting a step pass");
        }
    }

    /// The address of the recorded step's live flag while recording, else 0 (always live).
    fn live(&self) -> u64 {
        if self.recording() { self.step.live() } else { 0 }
    }

    /// Queues `f`'s operations on the side stream, after what the main stream has queued so far;
    /// the main stream must [join](Gpu::join) it before using what `f` writes.
    fn beside(&self, f: impl FnOnce()) -> Result<()> {
        self.gpu.fork(&self.side)?;
        self.on_side.store(true, Ordering::Relaxed);
        f();
        self.on_side.store(false, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `f` with the current stream's scratch for fused launches, at least `len` values.
    fn with_hidden<T>(&self, len: usize, f: impl FnOnce(&mut CudaSlice<f32>) -> T) -> T {
        let mut hidden = self.hidden.lock().unwrap();
        let h = &mut hidden[self.on_side.load(Ordering::Relaxed) as usize];
        if h.as_ref().is_none_or(|h| h.len() < len) {
            // Memory allocated while recording belongs to the graph: use it for this call only.
            if self.spoil_recording() {
                return f(&mut ok(self.queue().uninit(len), "allocation"));
            }
            *h = Some(ok(self.queue().uninit(len), "allocation"));
            self.scratch_epoch.fetch_add(1, Ordering::Relaxed);
        }
        f(h.as_mut().unwrap())
    }

    /// Turns the recording and replay of decode steps on or off (on by default).
    pub fn use_graphs(&self, on: bool) {
        self.graphs.store(on, Ordering::Relaxed);
    }

    fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    /// For operations that need the host: true, having marked the recording spoiled, while a step
    /// is being recorded (the operation then queues nothing: the step will run directly).
    fn spoil_recording(&self) -> bool {
        let recording = self.recording();
        if recording {
            self.spoiled.store(true, Ordering::Relaxed);
        }
        recording
    }

    fn graph_epoch(&self) -> (u64, u64) {
        (self.tier.generation(), self.scratch_epoch.load(Ordering::Relaxed))
    }

    /// Whether the top-k kernel takes this routing (experts, top-k).
    fn routes_on_device(&self, routing: &Routing) -> bool {
        let (experts, k) = (routing.experts, routing.top_k);
        k > 0 && k <= MOE_MAX_SLOTS.min(experts) && experts <= ROUTE_MAX_EXPERTS
    }

    /// Runs `f` with the address table of `layer`'s experts, if every expert of the layer is
    /// resident: in GPU memory, or, with `host`, in that store's page-locked RAM (read in place
    /// over the bus). `None`, having run nothing, if not.
    fn with_table<T>(
        &self,
        layer: usize,
        experts: usize,
        host: Option<&dyn ExpertSource>,
        f: impl FnOnce(&LayerTable) -> Result<T>,
    ) -> Result<Option<T>> {
        let generation = self.tier.generation();
        let mut tables = self.tables.lock().unwrap();
        if tables.generation != generation {
            tables.layers.clear();
            tables.generation = generation;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = tables.layers.entry(layer) {
            if self.recording() {
                return Ok(None);
            }
            let Some(table) = self.layer_table(layer, experts, host)? else { return Ok(None) };
            slot.insert(table);
        }
        f(&tables.layers[&layer]).map(Some)
    }

    /// Queues one token's experts chosen on the device (`route` queues the top-k into `ids`,
    /// `weights`) through the layer's address table ([`with_table`](Self::with_table)), the
    /// shared expert on the side stream beside them. False, having queued nothing, without a
    /// table.
    #[allow(clippy::too_many_arguments)]
    fn table_experts(
        &self,
        layer: usize,
        (experts, k): (usize, usize),
        r: &mut RouteBuffers,
        route: &dyn Fn(&mut RouteBuffers) -> moe_cuda::Result<()>,
        x: &CudaSlice<f32>,
        host: Option<&dyn ExpertSource>,
        shared: &dyn Fn(&mut CudaSlice<f32>),
        acc: &mut CudaSlice<f32>,
    ) -> Result<bool> {
        let queued = self.with_table(layer, experts, host, |t| {
            // The top-k alone, then the shared expert on the side stream: beside the top-k, the
            // shared expert's gate and up took the top-k from 3.5 to 7.7 us a layer (H100), and
            // queued on the main stream the shared expert added 13 us of its own. Forked here it
            // gets SMs as the routed gate and up launch drains and runs beside the routed down;
            // both add to `acc` atomically, so that neither waits for the other.
            route(r)?;
            self.beside(|| shared(acc))?;
            self.with_hidden(k * t.shape.inter, |h| {
                let experts = MoeExperts::Table {
                    table: &t.table,
                    ids: &r.ids,
                    slots: k,
                    off: t.off,
                    resident: t.host_bytes == 0,
                };
                self.gpu.moe_token(&t.shape, experts, 1, x, &r.weights, false, h, Some(&self.side), acc)
            })?;
            let k = k as u64;
            match t.host_bytes {
                0 => self.tier.count(k, 0, 0),
                bytes => self.tier.count(0, k, k * bytes),
            }
            Ok(())
        })?;
        Ok(queued.is_some())
    }

    /// The address table of `layer`'s experts (see [`table_experts`](Self::table_experts)), if
    /// they are all resident and share one shape and layout.
    /// Lands the pending [`Handover`] if it is of `layer` (any with `None`): before the store is
    /// asked for that layer's experts.
    fn land_handover(&self, layer: Option<usize>) {
        let mut pending = self.handover.lock().unwrap();
        if pending.as_ref().is_some_and(|h| layer.is_none_or(|l| l == h.layer))
            && let Some(h) = pending.take()
        {
            h.land();
        }
    }

    fn layer_table(&self, layer: usize, experts: usize, host: Option<&dyn ExpertSource>) -> Result<Option<LayerTable>> {
        if host.is_some() {
            self.land_handover(Some(layer));
        }
        let (parts, shapes, held, host_bytes): (Vec<Option<[u64; 9]>>, Vec<_>, _, _) = match host {
            None => {
                let Some(handles) = (0..experts).map(|e| self.tier.peek(layer, e)).collect::<Option<Vec<_>>>() else {
                    return Ok(None);
                };
                let parts = handles.iter().map(|h| Some(expert_parts(&self.gpu, &h.matrices()))).collect();
                let shapes = handles.iter().map(|h| MoeShape::of_device(&h.matrices()).ok()).collect();
                (parts, shapes, HeldExperts::Device { _handles: handles }, 0)
            }
            Some(store) => {
                let Some(held) = store.layer_in_ram(layer) else { return Ok(None) };
                let parts = held.iter().map(|x| self.tier.host_parts([&x.gate, &x.up, &x.down])).collect();
                let shapes = held.iter().map(|x| MoeShape::of_host(&[&x.gate, &x.up, &x.down]).ok()).collect();
                let bytes = held.first().map_or(0, |x| x.byte_len() as u64);
                (parts, shapes, HeldExperts::Host { _experts: held }, bytes)
            }
        };
        let (Some(Some(shape)), Some(Some(first))) = (shapes.first(), parts.first()) else { return Ok(None) };
        let off = part_offsets(*first).1;
        let same =
            parts.iter().zip(&shapes).all(|(p, s)| *s == Some(*shape) && p.is_some_and(|p| part_offsets(p).1 == off));
        if !same {
            return Ok(None);
        }
        let addresses: Vec<u64> = parts.iter().flatten().map(|p| p[0]).collect();
        let table = self.gpu.upload_ints(&addresses)?;
        Ok(Some(LayerTable { table, off, shape: *shape, host_bytes, _held: held }))
    }
}

impl Drop for CudaBackend {
    /// A step left waiting for its token would hold the stream, and the freeing of device memory
    /// (which waits for the device) with it.
    fn drop(&mut self) {
        if let Some(a) = self.ahead.get_mut().unwrap().take() {
            let _ = self.gpu.feed_step(&self.step, a.seq, None);
        }
    }
}

fn vram_budget(b: Budget) -> moe_cuda::VramBudget {
    match b {
        Budget::Auto => moe_cuda::VramBudget::Auto,
        Budget::Bytes(n) => moe_cuda::VramBudget::Bytes(n),
    }
}

impl ExpertMatrices<DeviceMatrix> for ExpertHandle {
    fn matrices(&self) -> [&DeviceMatrix; 3] {
        ExpertHandle::matrices(self)
    }
}

/// Unwraps a device result inside an infallible trait method.
fn ok<T>(r: moe_cuda::Result<T>, op: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA {op}: {e}"))
}

impl Backend for CudaBackend {
    type Tensor = CudaSlice<f32>;
    type Weight = DeviceMatrix;
    type ExpertWeights = ExpertHandle;
    type Graph = CudaStepGraph;

    fn name(&self) -> String {
        let s = self.tier.stats();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let budget = match (self.tier.requested_budget(), s.budget) {
            (moe_cuda::VramBudget::Auto, None) => "auto".to_string(),
            (moe_cuda::VramBudget::Auto, Some(b)) => format!("auto = {:.2} GiB", gib(b)),
            (moe_cuda::VramBudget::Bytes(b), _) => format!("{:.2} GiB", gib(b)),
        };
        format!(
            "cuda ({}; VRAM experts {budget}: {} resident, {:.2} GiB, {} hits, {} misses, {:.2} GiB uploaded)",
            self.gpu.describe(),
            s.resident_experts,
            gib(s.resident_bytes),
            s.hits,
            s.misses,
            gib(s.bytes_uploaded)
        )
    }

    fn record_step(
        &self,
        routing: &Routing,
        token: u32,
        position: usize,
        body: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Option<CudaStepGraph>> {
        // Whether every expert is resident (so that the step never needs the host) shows while
        // recording: a step that does need it is `NotRecordable`.
        if !(self.graphs.load(Ordering::Relaxed) && self.routes_on_device(routing)) {
            return Ok(None);
        }
        let position = u32::try_from(position)?;
        self.let_pass();
        let before = self.tier.stats();
        self.spoiled.store(false, Ordering::Relaxed);
        self.recording.store(true, Ordering::Relaxed);
        let recorded = self.gpu.record(|| -> Result<()> {
            self.gpu.queue_step_gate(&self.step)?;
            body()
        });
        self.recording.store(false, Ordering::Relaxed);
        let (out, graph) = recorded?;
        if let Err(e) = out {
            return if e.is::<NotRecordable>() { Ok(None) } else { Err(e) };
        }
        let Some(graph) = graph.filter(|_| !self.spoiled.load(Ordering::Relaxed)) else { return Ok(None) };
        let after = self.tier.stats();
        let uses =
            [after.hits - before.hits, after.misses - before.misses, after.bytes_uploaded - before.bytes_uploaded];
        let g = CudaStepGraph { graph, epoch: self.graph_epoch(), uses };
        let seq = self.gpu.replay(&self.step, &g.graph)?;
        self.gpu.feed_step(&self.step, seq, Some((token, position)))?;
        Ok(Some(g))
    }

    fn replay_step(&self, g: &CudaStepGraph, token: u32, position: usize) -> Result<bool> {
        let Some(seq) = self.queue_step(g, None, position)? else { return Ok(false) };
        self.feed_step(seq, Some(token))
    }

    fn queue_step(
        &self,
        g: &CudaStepGraph,
        pick: Option<(&CudaSlice<f32>, usize)>,
        position: usize,
    ) -> Result<Option<u64>> {
        if g.epoch != self.graph_epoch() {
            return Ok(None);
        }
        let position = u32::try_from(position)?;
        self.let_pass();
        let seq = self.gpu.replay(&self.step, &g.graph)?;
        *self.ahead.lock().unwrap() = Some(Ahead { seq, position, uses: g.uses });
        if let Some((logits, len)) = pick {
            self.gpu.queue_pick(&self.step, seq, logits, len)?;
        }
        Ok(Some(seq.into()))
    }

    fn feed_step(&self, step: u64, token: Option<u32>) -> Result<bool> {
        let mut ahead = self.ahead.lock().unwrap();
        let Some(a) = ahead.take_if(|a| u64::from(a.seq) == step) else { return Ok(false) };
        self.gpu.feed_step(&self.step, a.seq, token.map(|t| (t, a.position)))?;
        if token.is_some() {
            let [hits, misses, bytes] = a.uses;
            self.tier.count(hits, misses, bytes);
        }
        Ok(true)
    }

    fn take_pick(&self, step: u64) -> Result<u32> {
        Ok(self.gpu.take_pick(&self.step, u32::try_from(step)?)?)
    }

    fn weight(&self, m: &Matrix) -> Result<DeviceMatrix> {
        Ok(self.gpu.matrix(m)?)
    }

    fn expert_weights<F>(&self, layer: usize, id: usize, fetch: F) -> Result<ExpertHandle>
    where
        F: FnOnce() -> Result<moe_store::Expert>,
    {
        self.land_handover(Some(layer));
        if let Some(h) = self.tier.lookup(layer, id) {
            return Ok(h);
        }
        let e = fetch()?;
        Ok(self.tier.upload(layer, id, [&e.gate, &e.up, &e.down])?)
    }

    fn settle_experts(&self, store: &dyn ExpertSource) {
        self.land_handover(None);
        let (kept, evicted) = self.tier.settle();
        for (layer, e) in kept {
            store.release(layer, e);
        }
        let mut held = Vec::new();
        for x in evicted {
            let (layer, e) = x.key();
            if let Some(a) = store.adopt(layer, e, &mut |host, parts| x.start_copy_to_host(host, parts)) {
                held.push((x, a));
            }
        }
        let Some(layer) = held.first().map(|(x, _)| x.key().0) else { return };
        match self.tier.mark_copies() {
            Ok(done) => *self.handover.lock().unwrap() = Some(Handover { layer, done, held }),
            // No mark: wait for the whole copy stream instead.
            Err(_) => {
                if self.tier.synchronize_copies().is_err() {
                    std::mem::forget(held);
                }
            }
        }
    }

    fn check_memory(&self, dense_bytes: u64) -> Result<()> {
        let (free, _) = self.gpu.memory()?;
        let (free, headroom) = (free as u64, moe_cuda::VRAM_HEADROOM);
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if dense_bytes + headroom > free {
            return Err(CudaError::OutOfMemory(format!(
                "the dense weights take {:.2} GiB and the GPU has {:.2} GiB free ({:.2} GiB kept for activations \
                 and caches): run with --device cpu, or use a model with smaller dense weights",
                gib(dense_bytes),
                gib(free),
                gib(headroom)
            ))
            .into());
        }
        if let moe_cuda::VramBudget::Bytes(b) = self.tier.requested_budget()
            && dense_bytes + headroom + b > free
        {
            return Err(CudaError::OutOfMemory(format!(
                "--vram-budget {:.2} GiB does not fit: the GPU has {:.2} GiB free, the dense weights take {:.2} GiB \
                 and {:.2} GiB is kept for activations and caches; --vram-budget {}MiB would fit (or use auto)",
                gib(b),
                gib(free),
                gib(dense_bytes),
                gib(headroom),
                (free - dense_bytes - headroom) >> 20
            ))
            .into());
        }
        Ok(())
    }

    fn preload_experts(&self, store: &dyn ExpertSource, routing: &Routing) -> Result<()> {
        self.land_handover(None);
        self.tier.set_budget(self.tier.requested_budget())?;
        let budget = self.tier.stats().budget.unwrap_or(0);
        if store.total_bytes() as u64 > budget {
            return Ok(());
        }
        // A few dozen experts per request, so that the store reads them in parallel.
        let ids: Vec<usize> = (0..routing.experts).collect();
        for layer in 0..routing.layers {
            for batch in ids.chunks(32) {
                for (&e, x) in batch.iter().zip(store.experts(layer, batch)?) {
                    if !self.tier.contains(layer, e) {
                        drop(self.tier.upload(layer, e, [&x.gate, &x.up, &x.down])?);
                    }
                    // Held in GPU memory for good: the RAM tier need not keep it too.
                    store.release(layer, e);
                }
            }
        }
        self.tier.reset_stats();
        Ok(())
    }

    fn has_expert(&self, layer: usize, id: usize) -> bool {
        self.tier.contains(layer, id)
    }

    fn expert_tier_stats(&self) -> Option<ExpertTierStats> {
        Some(self.tier.stats())
    }

    fn device_bandwidth(&self, seconds: f64) -> Option<(f64, f64)> {
        self.gpu.bandwidth(seconds).ok().map(|b| (b.device, b.host_to_device))
    }

    fn tensor(&self, values: &[f32]) -> CudaSlice<f32> {
        if self.spoil_recording() {
            return self.scratch(values.len());
        }
        ok(self.queue().upload(values), "upload")
    }

    fn zeros(&self, len: usize) -> CudaSlice<f32> {
        ok(self.queue().zeros(len), "allocation")
    }

    fn scratch(&self, len: usize) -> CudaSlice<f32> {
        ok(self.queue().uninit(len), "allocation")
    }

    fn read(&self, t: &CudaSlice<f32>, len: usize) -> Vec<f32> {
        if self.spoil_recording() {
            return vec![0.0; len];
        }
        ok(self.queue().download(t, len), "read")
    }

    fn argmax(&self, t: &CudaSlice<f32>, len: usize) -> u32 {
        if self.spoil_recording() {
            return 0;
        }
        ok(self.queue().argmax(t, len), "argmax")
    }

    fn resized(&self, t: &CudaSlice<f32>, keep: usize, len: usize) -> CudaSlice<f32> {
        ok(self.queue().resized(t, keep, len), "resize")
    }

    fn embed(&self, table: &DeviceMatrix, tokens: &[u32], out: &mut CudaSlice<f32>) {
        assert!(tokens.iter().all(|&t| (t as usize) < table.rows), "embed: token id out of range");
        if self.recording() {
            assert_eq!(tokens.len(), 1, "a recorded step embeds one token");
            return ok(self.queue().embed(table, &self.step.token(), out), "embed");
        }
        let ids = ok(self.queue().upload_ints(tokens), "upload");
        ok(self.queue().embed(table, &ids.slice(..), out), "embed")
    }

    fn matmul(&self, w: &DeviceMatrix, x: &CudaSlice<f32>, tokens: usize, out: &mut CudaSlice<f32>) {
        ok(self.queue().matmul(w, x, tokens, out), "matmul")
    }

    fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        offset: f32,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) {
        ok(self.queue().rms_norm(x, w, offset, eps, rows, out), "rms_norm")
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaSlice<f32>,
        delta: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        width: usize,
        offset: f32,
        eps: f32,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) {
        assert_eq!(width, w.len(), "add_rms_norm: width of the norm weight");
        ok(self.queue().add_rms_norm(x, delta, w, offset, eps, rows, out), "add_rms_norm")
    }

    fn add(&self, acc: &mut CudaSlice<f32>, x: &CudaSlice<f32>, len: usize) {
        ok(self.queue().add(acc, x, len), "add")
    }

    fn attention(
        &self,
        s: &AttentionShape,
        q_norm: &CudaSlice<f32>,
        k_norm: &CudaSlice<f32>,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cache: &mut KvCache<Self>,
        past: usize,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) {
        assert!(
            past + tokens <= cache.capacity,
            "attention: {} positions exceed the cache's {}",
            past + tokens,
            cache.capacity
        );
        let (kc, vc) = (&mut cache.k, &mut cache.v);
        let live = self.live();
        let r = if self.recording() {
            self.queue().attention(s, q_norm, k_norm, q, k, v, kc, vc, past, &self.step.position(), live, tokens, out)
        } else {
            let past_on_device = ok(self.queue().upload_ints(&[u32::try_from(past).expect("position")]), "upload");
            self.queue().attention(
                s,
                q_norm,
                k_norm,
                q,
                k,
                v,
                kc,
                vc,
                past,
                &past_on_device.slice(..),
                live,
                tokens,
                out,
            )
        };
        ok(r, "attention")
    }

    fn delta_net(
        &self,
        s: &DeltaNetShape,
        params: &DeltaNetParams<'_, Self>,
        proj: &CudaSlice<f32>,
        state: &mut DeltaNetState<Self>,
        tokens: usize,
        out: &mut CudaSlice<f32>,
    ) {
        let r = self.queue().delta_net(
            s,
            params.conv,
            params.a_log,
            params.dt_bias,
            params.norm,
            proj,
            &mut state.conv,
            &mut state.ssm,
            self.live(),
            tokens,
            out,
        );
        ok(r, "delta_net")
    }

    fn expert_ffn(
        &self,
        gate: &DeviceMatrix,
        up: &DeviceMatrix,
        down: &DeviceMatrix,
        x: &CudaSlice<f32>,
        rows: &[u32],
        scales: &[f32],
        acc: &mut CudaSlice<f32>,
    ) {
        if self.spoil_recording() {
            return;
        }
        ok(self.queue().expert_ffn(gate, up, down, x, rows, scales, acc), "expert_ffn")
    }

    fn shared_expert(
        &self,
        gate: &DeviceMatrix,
        up: &DeviceMatrix,
        down: &DeviceMatrix,
        gate_logit: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        tokens: usize,
        acc: &mut CudaSlice<f32>,
    ) {
        if let (true, Ok(shape)) = (tokens <= MOE_MAX_TOKENS, MoeShape::of_device(&[gate, up, down])) {
            let parts = [expert_parts(&self.gpu, &[gate, up, down])];
            let fused = self.with_hidden(tokens * gate.rows, |h| {
                self.queue().moe_token(&shape, MoeExperts::Listed(&parts), tokens, x, gate_logit, true, h, None, acc)
            });
            return ok(fused, "shared expert");
        }
        host_gated_expert(self, [gate, up, down], gate_logit, x, tokens, acc)
    }

    fn routed_experts_on_device(
        &self,
        layer: usize,
        routing: &Routing,
        tokens: usize,
        logits: &CudaSlice<f32>,
        x: &CudaSlice<f32>,
        store: &dyn ExpertSource,
        shared: &dyn Fn(&mut CudaSlice<f32>),
        acc: &mut CudaSlice<f32>,
    ) -> Result<Option<usize>> {
        let (experts, k) = (routing.experts, routing.top_k);
        if !self.routes_on_device(routing) || tokens == 0 || tokens > MOE_MAX_TOKENS {
            return if self.recording() { Err(NotRecordable.into()) } else { Ok(None) };
        }
        // Every expert resident: in GPU memory, or, without a VRAM tier, in the store's RAM.
        // Several tokens (prefill) take the device path only with every expert in GPU memory: the
        // kernels read an expert's rows again for each batch of its tokens (gate and up) or each
        // token (down), which over PCIe would cross the bus each time; the host path uploads each
        // distinct expert once.
        let all = routing.layers * experts;
        let tier = self.tier.stats();
        let resident = if tier.resident_experts >= all {
            Some(None)
        } else if tier.budget == Some(0) && store.stats().resident_experts as usize >= all {
            Some(Some(store))
        } else {
            None
        };
        if tokens > 1 {
            // Prefill: routed and grouped by expert on the device, with every expert in GPU memory.
            if !matches!(resident, Some(None)) {
                return Ok(None);
            }
            let done = self.with_table(layer, experts, None, |t| {
                self.beside(|| shared(acc))?;
                let routed = (experts, k, routing.norm_topk);
                self.gpu.moe_grouped(&t.shape, (&t.table, t.off), routed, logits, x, tokens, Some(&self.side), acc)?;
                self.tier.count((tokens * k) as u64, 0, 0);
                Ok(())
            })?;
            return Ok(done.map(|()| tokens * k));
        }
        let mut routes = self.routes.lock().unwrap();
        if routes.as_ref().is_none_or(|r| r.ids.len() < k) {
            if self.recording() {
                return Err(NotRecordable.into());
            }
            let g = &self.gpu;
            *routes = Some(RouteBuffers { ids: g.zeros_i32(k)?, weights: g.zeros(k)?, host_ids: g.pinned_i32(k)? });
            self.scratch_epoch.fetch_add(1, Ordering::Relaxed);
        }
        let r = routes.as_mut().unwrap();
        let route = |r: &mut RouteBuffers| {
            self.gpu.route_topk(&logits.slice(..), 1, experts, k, routing.norm_topk, &mut r.ids, &mut r.weights)
        };
        if let Some(host) = resident
            && self.table_experts(layer, (experts, k), r, &route, x, host, shared, acc)?
        {
            return Ok(Some(k));
        }
        route(r)?;

        if self.recording() {
            return Err(NotRecordable.into());
        }
        // The host needs the ids: copy them back and wait for that copy only.
        let ids: Vec<usize> = self.gpu.read_ids(&r.ids, k, &mut r.host_ids)?.iter().map(|&i| i as usize).collect();
        let missing: Vec<usize> = ids.iter().copied().filter(|&e| !self.tier.contains(layer, e)).collect();
        self.land_handover(Some(layer));
        store.prefetch(layer, &missing);
        shared(acc);
        let mut fetched: HashMap<usize, Expert> =
            missing.iter().copied().zip(store.experts(layer, &missing)?).collect();
        // Each chosen expert from GPU memory (a hit, or uploaded now), or, where the tier keeps
        // nothing, read by the kernels straight from the store's page-locked buffer.
        let mut slots = Vec::with_capacity(k);
        for &e in &ids {
            if let Some(h) = self.tier.lookup(layer, e) {
                slots.push(Slot::Device(h));
                continue;
            }
            let x = fetched.remove(&e).map_or_else(|| store.expert(layer, e), Ok)?;
            let parts = [&x.gate, &x.up, &x.down];
            match MoeShape::of_host(&parts).ok().and_then(|_| self.tier.host_parts(parts)) {
                Some(addresses) => {
                    self.tier.count(0, 0, x.byte_len() as u64);
                    slots.push(Slot::Host(Box::new(x), addresses))
                }
                None => slots.push(Slot::Device(self.tier.upload(layer, e, parts)?)),
            }
        }
        let shapes: Vec<Option<MoeShape>> = slots.iter().map(|s| s.shape().ok()).collect();
        if shapes.iter().all(Option::is_none) {
            // Shapes the fused kernels do not take: one expert at a time.
            let weights = self.read(&r.weights, k);
            for (slot, w) in slots.iter().zip(weights) {
                let Slot::Device(h) = slot else { unreachable!("host slots need a fused shape") };
                let [g, u, d] = h.matrices();
                self.expert_ffn(g, u, d, x, &[0], &[w], acc);
            }
            return Ok(Some(k));
        }
        let shape = shapes[0]
            .filter(|s| shapes.iter().all(|o| *o == Some(*s)))
            .ok_or_else(|| anyhow::anyhow!("the experts of layer {layer} differ in shape or format: {shapes:?}"))?;
        let parts: Vec<[u64; 9]> = slots.iter().map(|s| s.parts(&self.gpu)).collect();
        self.with_hidden(k * shape.inter, |h| {
            self.gpu.moe_token(&shape, MoeExperts::Listed(&parts), 1, x, &r.weights, false, h, None, acc)
        })?;
        let host: Vec<Matrix> = slots
            .into_iter()
            .filter_map(|s| match s {
                Slot::Host(x, _) => {
                    let Expert { gate, up, down } = *x;
                    Some([gate, up, down])
                }
                Slot::Device(_) => None,
            })
            .flatten()
            .collect();
        if !host.is_empty() {
            self.tier.hold_until_done(host)?;
        }
        Ok(Some(k))
    }
}
