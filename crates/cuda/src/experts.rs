//! The GPU-memory tier of routed experts: uploaded experts kept in device memory under a byte
//! budget, keyed by `(layer, expert)`, evicted least-used first (counts with ageing, ties to the
//! least recent; see `tier.rs`). A hit costs no host-to-device copy.
//!
//! A miss is uploaded on a copy stream of its own into a fresh device buffer (stream-ordered
//! allocation on the copy stream), and the compute stream waits on an event recorded after the
//! copy, so the kernels that use the expert run after it has arrived while the work queued before
//! them (the shared expert, earlier experts) overlaps the copy. When every part of the expert lies
//! in the GPU's [`PinnedPool`] (the expert store allocates its buffers there), each part is copied
//! straight from the store's buffer by one DMA, and the expert's host bytes are held until an event
//! recorded after the copies has completed (checked at later uploads, never waited for on the
//! compute stream). Otherwise the bytes are copied (by several threads) into the next free pinned
//! staging buffer and one DMA moves them.
//!
//! Lifetimes are ordered with events as well: each [`ExpertHandle`] records its entry's `last_use`
//! event on the compute stream when dropped (after the kernels that read it were queued), and an
//! entry, once evicted and unused, makes the copy stream wait on that event before its buffer is
//! freed (on the copy stream), so memory is never reused under a kernel still reading it. A staging
//! buffer is rewritten only after the event of its previous DMA has completed.
//!
//! Budget 0 caches nothing: every use uploads (through the same staging path), and the buffer is
//! freed a few uploads later.

use crate::device::{DeviceMatrix, PartRanges, layout};
use crate::pinned::PinnedPool;
use crate::tier::{Key, Policy};
use crate::{Context, Error, Gpu, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice, sys};
use moe_core::Matrix;
use moe_core::tier::TierStats;
use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Device memory `auto` leaves free besides the experts: activations, KV caches, the PTX module.
pub const VRAM_HEADROOM: u64 = 2 << 30;
/// Pinned staging buffers, used round-robin (so that copying the next expert into staging overlaps
/// the DMA of the previous ones).
const STAGING_BUFFERS: usize = 4;
/// Below this many bytes an expert is copied into staging by one thread.
const PARALLEL_COPY_MIN: usize = 2 << 20;
const MAX_COPY_THREADS: usize = 8;
/// Uploads not kept in the tier (budget 0, or too big) whose buffers outlive their handles.
const RETIRED: usize = 4;

/// The byte budget of the tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VramBudget {
    /// Free device memory at the first upload (after the dense weights), less [`VRAM_HEADROOM`].
    #[default]
    Auto,
    Bytes(u64),
}

/// An uploaded expert.
struct Entry {
    key: Key,
    /// Gate, up, down: views of one device buffer allocated on the copy stream.
    matrices: [DeviceMatrix; 3],
    /// Recorded on the compute stream after the last queued use.
    last_use: CudaEvent,
    copy: Arc<CudaStream>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        // The buffer is freed (stream-ordered, on the copy stream) when the matrices drop after
        // this; first the copy stream must wait for the kernels that read it.
        let ctx = self.copy.context();
        ctx.record_err(self.copy.wait(&self.last_use));
    }
}

/// A routed expert usable by the kernels, from [`ExpertTier::lookup`] or [`ExpertTier::upload`].
/// Drop it once the kernels that read it are queued (it marks the point after which the memory
/// may be reused).
pub struct ExpertHandle {
    entry: Arc<Entry>,
    compute: Arc<CudaStream>,
}

impl ExpertHandle {
    /// Gate, up and down.
    pub fn matrices(&self) -> [&DeviceMatrix; 3] {
        let [g, u, d] = &self.entry.matrices;
        [g, u, d]
    }
}

impl Drop for ExpertHandle {
    fn drop(&mut self) {
        let ctx = self.compute.context();
        ctx.record_err(self.entry.last_use.record(&self.compute));
    }
}

struct State {
    requested: VramBudget,
    /// Created when the budget is resolved.
    cache: Option<Policy<Arc<Entry>>>,
    hits: u64,
    misses: u64,
    bytes_uploaded: u64,
    /// Changes with every upload and budget change: what is resident may have changed.
    generation: u64,
    /// Uploads that were not kept, held until a few later ones (see `upload`).
    retired: VecDeque<Arc<Entry>>,
    /// Whether the caller [`settle`](ExpertTier::settle)s: then the keys kept since the last
    /// call and the entries evicted since are held for it.
    settling: bool,
    kept: Vec<Key>,
    evicted: Vec<Arc<Entry>>,
}

struct Staging {
    buf: Option<PinnedHostSlice<u8>>,
    /// Recorded on the copy stream after the DMA out of `buf`.
    done: CudaEvent,
}

struct Copier {
    staging: Vec<Staging>,
    next: usize,
    /// Recorded on the copy stream after each DMA; the compute stream waits on it.
    ready: CudaEvent,
}

/// Host bytes the device reads: a copy straight from the expert store's pinned buffers, or
/// kernels reading them in place. The parts (which hold their buffers) stay alive until `done`,
/// recorded after the copies (copy stream) or after the kernels (compute stream), has completed.
struct InFlight {
    done: CudaEvent,
    _parts: Vec<Matrix>,
}

/// The GPU-memory tier of one [`Gpu`]; see the module docs.
pub struct ExpertTier {
    ctx: Arc<CudaContext>,
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
    state: Mutex<State>,
    copier: Mutex<Copier>,
    /// Where the expert store's buffers are when they can be copied without staging.
    pool: Arc<PinnedPool>,
    /// Reads of the store's buffers (copies, in-place kernels) not known to be complete, oldest first.
    in_flight: Mutex<VecDeque<InFlight>>,
    /// Uploads copied straight from pinned host memory (no staging).
    direct_uploads: AtomicU64,
}

impl Drop for ExpertTier {
    fn drop(&mut self) {
        // No host buffer goes back to the store's memory while a copy or a kernel may still read it.
        for stream in [&self.copy, &self.compute] {
            let r = stream.synchronize();
            self.ctx.record_err(r);
        }
    }
}

impl Gpu {
    /// A GPU-memory tier for routed experts with its own copy stream.
    pub fn expert_tier(&self, budget: VramBudget) -> Result<ExpertTier> {
        let copy = self.ctx.new_stream().what("creating the copy stream")?;
        let event = || self.ctx.new_event(None).what("creating an event");
        let staging = (0..STAGING_BUFFERS).map(|_| Ok(Staging { buf: None, done: event()? })).collect::<Result<_>>()?;
        let tier = ExpertTier {
            ctx: self.ctx.clone(),
            compute: self.stream.clone(),
            copy,
            state: Mutex::new(State {
                requested: budget,
                cache: None,
                hits: 0,
                misses: 0,
                bytes_uploaded: 0,
                generation: 0,
                retired: VecDeque::new(),
                settling: false,
                kept: Vec::new(),
                evicted: Vec::new(),
            }),
            copier: Mutex::new(Copier { staging, next: 0, ready: event()? }),
            pool: self.pinned_pool(),
            in_flight: Mutex::new(VecDeque::new()),
            direct_uploads: AtomicU64::new(0),
        };
        if let VramBudget::Bytes(b) = budget {
            tier.state.lock().unwrap().cache = Some(Policy::new(b));
        }
        Ok(tier)
    }
}

impl State {
    /// Moves the entries just evicted into `evicted` for `settle`, when the caller settles.
    fn hand_back(&mut self, evicted: &mut Vec<Arc<Entry>>) {
        if self.settling {
            self.evicted.append(evicted);
        }
    }
}

/// An expert the GPU-memory tier has evicted, its device copy held until it is copied out.
pub struct EvictedExpert {
    entry: Arc<Entry>,
    copy: Arc<CudaStream>,
}

impl EvictedExpert {
    /// `(layer, expert)`.
    pub fn key(&self) -> (usize, usize) {
        self.entry.key
    }

    /// Starts copying the expert's nine parts (gate codes, scales, biases, then up's, then
    /// down's) to `parts` of `host` (page-locked memory) on the tier's copy stream, without
    /// waiting: they have landed when the [`wait`](CopyMark::wait) of a later
    /// [`ExpertTier::mark_copies`] returns. Until then the device copy must stay (keep `self`)
    /// and `host` must not be read or reused. False, with nothing left in flight and nothing
    /// usable written, if a part's length differs from its range's or a copy fails.
    pub fn start_copy_to_host(&self, host: &mut [MaybeUninit<u8>], parts: &[Range<usize>; 9]) -> bool {
        let mut spans = Vec::with_capacity(9);
        for m in &self.entry.matrices {
            let (buf, ranges) = m.spans();
            spans.extend(ranges.into_iter().map(|r| (buf, r)));
        }
        if spans.iter().zip(parts).any(|((_, r), p)| r.len() != p.len() || p.end > host.len()) {
            return false;
        }
        let stream = self.copy.cu_stream();
        for ((buf, r), p) in spans.into_iter().zip(parts) {
            if r.is_empty() {
                continue;
            }
            // Event tracking is off (see `Gpu::new`): the guard records nothing.
            let (base, _guard) = buf.device_ptr(&self.copy);
            // SAFETY: `p` lies in `host` (checked above) and `r` in `buf`, both `r.len()` bytes;
            // the caller keeps both until the copies are waited for (see above), and a failure
            // waits for the copies already queued before `host` can be dropped.
            let done = unsafe {
                sys::cuMemcpyDtoHAsync_v2(host[p.clone()].as_mut_ptr().cast(), base + r.start as u64, r.len(), stream)
            };
            if done.result().is_err() {
                let _ = self.copy.synchronize();
                return false;
            }
        }
        true
    }
}

/// A point in the tier's copy stream (see [`ExpertTier::mark_copies`]).
pub struct CopyMark(CudaEvent);

impl CopyMark {
    /// Waits until the copies queued before the mark have landed.
    pub fn wait(&self) -> Result<()> {
        self.0.synchronize().what("waiting for expert copies")
    }
}

impl ExpertTier {
    /// What changed since the last call, for the caller to mirror in the RAM tier so that each
    /// expert lives in one tier: the experts uploaded and kept (resident still), and those
    /// evicted (not resident again), whose device copies stay until the [`EvictedExpert`]s drop.
    /// Until the first call nothing is held.
    pub fn settle(&self) -> (Vec<(usize, usize)>, Vec<EvictedExpert>) {
        let mut s = self.state.lock().unwrap();
        s.settling = true;
        let (kept, evicted) = (std::mem::take(&mut s.kept), std::mem::take(&mut s.evicted));
        let resident = |k: &Key| s.cache.as_ref().is_some_and(|c| c.contains(*k));
        let kept: Vec<Key> = kept.into_iter().filter(|k| resident(k)).collect();
        let (gone, back): (Vec<_>, Vec<_>) = evicted.into_iter().partition(|e| !resident(&e.key));
        drop(s);
        // Evicted and uploaded again since: nothing to hand back.
        drop(back);
        let evicted = gone.into_iter().map(|entry| EvictedExpert { entry, copy: self.copy.clone() }).collect();
        (kept, evicted)
    }

    /// Marks the copies queued on the copy stream so far (the handovers of
    /// [`EvictedExpert::start_copy_to_host`]), for the host to wait for them later. (Uploads, on
    /// the same stream, come after them anyway.)
    pub fn mark_copies(&self) -> Result<CopyMark> {
        Ok(CopyMark(self.copy.record_event(None).what("recording an event")?))
    }

    /// Waits for everything queued on the copy stream.
    pub fn synchronize_copies(&self) -> Result<()> {
        self.copy.synchronize().what("waiting for expert copies")
    }

    /// Sets the budget; an `auto` one is resolved now from free device memory. What no longer
    /// fits is evicted.
    pub fn set_budget(&self, budget: VramBudget) -> Result<()> {
        let bytes = match budget {
            VramBudget::Bytes(b) => b,
            VramBudget::Auto => self.auto_bytes()?,
        };
        let mut evicted = Vec::new();
        {
            let mut s = self.state.lock().unwrap();
            s.requested = budget;
            s.generation += 1;
            match &mut s.cache {
                Some(c) => c.set_budget(bytes, &mut evicted),
                None => s.cache = Some(Policy::new(bytes)),
            }
            s.hand_back(&mut evicted);
        }
        drop(evicted);
        Ok(())
    }

    fn auto_bytes(&self) -> Result<u64> {
        let (free, _) = self.ctx.mem_get_info().what("reading free device memory")?;
        Ok((free as u64).saturating_sub(VRAM_HEADROOM))
    }

    /// Whether expert `id` of `layer` is resident (counts nothing).
    pub fn contains(&self, layer: usize, id: usize) -> bool {
        self.state.lock().unwrap().cache.as_ref().is_some_and(|c| c.contains((layer, id)))
    }

    /// Counts a use of expert `id` of `layer`: a handle if it is resident (a hit), else `None`
    /// (a miss: fetch it and [`upload`](Self::upload) it).
    pub fn lookup(&self, layer: usize, id: usize) -> Option<ExpertHandle> {
        let mut s = self.state.lock().unwrap();
        let found = match &mut s.cache {
            Some(c) => c.touch((layer, id)),
            // An unresolved `auto` budget has nothing resident yet; the use is counted at upload.
            None => None,
        };
        match found {
            Some(entry) => {
                s.hits += 1;
                Some(ExpertHandle { entry, compute: self.compute.clone() })
            }
            None => {
                s.misses += 1;
                None
            }
        }
    }

    /// Uploads expert `id` of `layer` (gate, up, down) after a [`lookup`](Self::lookup) miss and
    /// keeps it if it fits the budget (evicting others first).
    pub fn upload(&self, layer: usize, id: usize, parts: [&Matrix; 3]) -> Result<ExpertHandle> {
        let (ranges, len) = layout(&parts)?;
        let mut evicted = Vec::new();
        let fits = {
            let mut s = self.state.lock().unwrap();
            s.generation += 1;
            if s.cache.is_none() {
                let bytes = match s.requested {
                    VramBudget::Bytes(b) => b,
                    VramBudget::Auto => self.auto_bytes()?,
                };
                let mut c = Policy::new(bytes);
                c.touch((layer, id));
                s.cache = Some(c);
            }
            let fits = s.cache.as_mut().unwrap().make_room(len as u64, &mut evicted);
            s.hand_back(&mut evicted);
            fits
        };
        // Evicted buffers (not held for `settle`) are freed on the copy stream, ahead of the
        // allocation below.
        drop(evicted);
        let buf = Arc::new(self.copy_in(&parts, &ranges, len)?);
        let matrices = [0, 1, 2].map(|i| DeviceMatrix::in_buffer(parts[i], buf.clone(), ranges[i].clone()));
        let last_use = self.ctx.new_event(None).what("creating an event")?;
        let entry = Arc::new(Entry { key: (layer, id), matrices, last_use, copy: self.copy.clone() });
        let mut evicted = Vec::new();
        {
            let mut s = self.state.lock().unwrap();
            s.bytes_uploaded += len as u64;
            let kept = fits && s.cache.as_mut().unwrap().insert((layer, id), entry.clone(), len as u64, &mut evicted);
            s.hand_back(&mut evicted);
            if kept && s.settling {
                s.kept.push((layer, id));
            }
            if !kept {
                // Freed a few uploads later, so that the next copies need not wait for the kernels
                // reading this one (a free is ordered after its last use on the copy stream).
                s.retired.push_back(entry.clone());
                if s.retired.len() > RETIRED {
                    evicted.extend(s.retired.pop_front());
                }
            }
        }
        drop(evicted);
        Ok(ExpertHandle { entry, compute: self.compute.clone() })
    }

    /// Copies the parts into a new device buffer of `len` bytes, straight from the host when
    /// every part lies in the pinned pool, else through a staging buffer; the compute stream waits
    /// for the copy.
    fn copy_in(&self, parts: &[&Matrix; 3], ranges: &[PartRanges], len: usize) -> Result<CudaSlice<u8>> {
        self.reap();
        let mut pieces: Vec<(usize, &[u8])> = Vec::with_capacity(9);
        for (m, (data, scales, biases)) in parts.iter().zip(ranges) {
            pieces.push((data.start, &m.data[..]));
            if let Some(r) = scales {
                pieces.push((r.start, &m.scales[..]));
            }
            if let Some(r) = biases {
                pieces.push((r.start, &m.biases[..]));
            }
        }
        pieces.retain(|(_, bytes)| !bytes.is_empty());
        let pinned = pieces.iter().all(|(_, bytes)| self.pool.contains(bytes.as_ptr(), bytes.len()));
        let mut guard = self.copier.lock().unwrap();
        let Copier { staging, next, ready } = &mut *guard;
        if pinned {
            let mut buf = self.alloc_expert(len)?;
            {
                let (dst, _sync) = buf.device_ptr_mut(&self.copy);
                for &(offset, bytes) in &pieces {
                    // SAFETY: `bytes` is page-locked memory that stays allocated and unchanged until
                    // `done` (recorded after these copies) has completed: the parts holding it are
                    // kept in `in_flight` until then. `offset..offset + bytes.len()` lies in the
                    // `len`-byte buffer (the layout).
                    unsafe {
                        cudarc::driver::result::memcpy_htod_async(dst + offset as u64, bytes, self.copy.cu_stream())
                    }
                    .what("copying an expert to the device")?;
                }
            }
            let done = self.ctx.new_event(None).what("creating an event")?;
            done.record(&self.copy).what("recording an event")?;
            let parts = parts.iter().map(|&m| m.clone()).collect();
            self.in_flight.lock().unwrap().push_back(InFlight { done, _parts: parts });
            self.direct_uploads.fetch_add(1, Ordering::Relaxed);
            ready.record(&self.copy).what("recording an event")?;
            self.compute.wait(ready).what("ordering the compute stream after a copy")?;
            return Ok(buf);
        }
        let Staging { buf: pinned, done } = &mut staging[*next];
        *next = (*next + 1) % STAGING_BUFFERS;
        // Its previous DMA must be done before the host rewrites it.
        done.synchronize().what("waiting for a staging buffer")?;
        if pinned.as_ref().is_none_or(|b| b.len() < len) {
            *pinned = None;
            // SAFETY: the bytes are written below before any is read.
            let fresh = unsafe { self.ctx.alloc_pinned::<u8>(len.max(1)) }.what("allocating pinned staging memory")?;
            *pinned = Some(fresh);
        }
        let host = pinned.as_mut().unwrap().as_mut_slice().what("mapping a staging buffer")?;
        let host = &mut host[..len];
        copy_pieces(host, &pieces);

        let mut buf = self.alloc_expert(len)?;
        {
            let (dst, _sync) = buf.device_ptr_mut(&self.copy);
            // SAFETY: `host` is pinned and stays untouched until `done` (recorded next) completes;
            // `dst` has room for `len` bytes.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, &*host, self.copy.cu_stream()) }
                .what("copying an expert to the device")?;
        }
        done.record(&self.copy).what("recording an event")?;
        ready.record(&self.copy).what("recording an event")?;
        self.compute.wait(ready).what("ordering the compute stream after a copy")?;
        Ok(buf)
    }

    /// Uploads so far that were copied straight from the expert store's pinned buffers, without
    /// staging (the others went through staging).
    pub fn direct_uploads(&self) -> u64 {
        self.direct_uploads.load(Ordering::Relaxed)
    }

    /// A device buffer of `len` bytes for an expert, allocated on the copy stream.
    fn alloc_expert(&self, len: usize) -> Result<CudaSlice<u8>> {
        // SAFETY: every byte the matrices use is written by the copies that follow; padding is
        // never read.
        unsafe { self.copy.alloc::<u8>(len.max(1)) }.map_err(|e| {
            let budget = self.stats().budget.map_or("unresolved".into(), |b| b.to_string());
            Error::OutOfMemory(format!(
                "no room for an expert of {len} bytes ({e:?}) with a VRAM budget of {budget} bytes; \
                 set a smaller --vram-budget"
            ))
        })
    }

    /// Lets go of the host bytes whose readers have completed, oldest first. It stops at the
    /// first incomplete one: an entry behind it (the other stream's) waits for a later reap, which
    /// only delays its release.
    fn reap(&self) {
        let mut finished = Vec::new();
        {
            let mut q = self.in_flight.lock().unwrap();
            while let Some(f) = q.front() {
                match f.done.try_is_complete() {
                    Ok(true) => finished.extend(q.pop_front()),
                    Ok(false) => break,
                    Err(e) => {
                        self.ctx.record_err::<()>(Err(e));
                        break;
                    }
                }
            }
        }
        // Buffers nobody else holds go back to the store's memory here, outside the lock.
        drop(finished);
    }

    pub fn stats(&self) -> TierStats {
        let s = self.state.lock().unwrap();
        let c = s.cache.as_ref();
        TierStats {
            hits: s.hits,
            misses: s.misses,
            bytes_uploaded: s.bytes_uploaded,
            evictions: c.map_or(0, |c| c.evictions()),
            resident_experts: c.map_or(0, |c| c.resident()),
            resident_bytes: c.map_or(0, |c| c.bytes()),
            budget: c.map(|c| c.budget()),
            direct_uploads: self.direct_uploads(),
        }
    }

    /// The part addresses of an expert that the kernels can read straight from page-locked host
    /// memory, over the bus, instead of uploading it: only for a tier that keeps nothing (budget
    /// 0; the expert would be uploaded, used once and freed), and only if every part lies in the
    /// pinned pool with its codes 16-byte aligned. The caller counts each use with
    /// [`count`](Self::count) (the bytes cross the bus either way) and keeps the parts alive, with
    /// [`hold_until_done`](Self::hold_until_done) or for good.
    pub fn host_parts(&self, parts: [&Matrix; 3]) -> Option<[u64; 9]> {
        if self.stats().budget != Some(0) {
            return None;
        }
        let pinned = |b: &moe_core::Bytes| b.is_empty() || self.pool.contains(b.as_ptr(), b.len());
        if !parts.iter().all(|m| pinned(&m.data) && pinned(&m.scales) && pinned(&m.biases)) {
            return None;
        }
        crate::host_parts(&parts)
    }

    /// Keeps `parts` (host memory the kernels read) alive until the work queued on the compute
    /// stream so far has completed.
    pub fn hold_until_done(&self, parts: Vec<Matrix>) -> Result<()> {
        self.reap();
        let done = self.ctx.new_event(None).what("creating an event")?;
        done.record(&self.compute).what("recording an event")?;
        self.in_flight.lock().unwrap().push_back(InFlight { done, _parts: parts });
        Ok(())
    }

    /// A handle on expert `id` of `layer` if it is resident, counting no use.
    pub fn peek(&self, layer: usize, id: usize) -> Option<ExpertHandle> {
        let s = self.state.lock().unwrap();
        let entry = s.cache.as_ref()?.get((layer, id))?;
        Some(ExpertHandle { entry, compute: self.compute.clone() })
    }

    /// Counts uses the tier did not see: `hits` of experts the device found resident by itself
    /// (routing on the device with every expert resident), and `misses` read from host memory in
    /// place, `bytes` in all.
    pub fn count(&self, hits: u64, misses: u64, bytes: u64) {
        let mut s = self.state.lock().unwrap();
        s.hits += hits;
        s.misses += misses;
        s.bytes_uploaded += bytes;
    }

    /// A number that changes whenever what is resident may have changed.
    pub fn generation(&self) -> u64 {
        self.state.lock().unwrap().generation
    }

    /// Zeroes the counters (what is resident stays).
    pub fn reset_stats(&self) {
        let mut s = self.state.lock().unwrap();
        s.hits = 0;
        s.misses = 0;
        s.bytes_uploaded = 0;
        self.direct_uploads.store(0, Ordering::Relaxed);
        if let Some(c) = &mut s.cache {
            c.reset_counters();
        }
    }

    /// The budget as asked for (`auto` or bytes).
    pub fn requested_budget(&self) -> VramBudget {
        self.state.lock().unwrap().requested
    }
}

/// Copies `(offset, bytes)` pieces into `dst`, splitting large copies over threads.
fn copy_pieces(dst: &mut [u8], pieces: &[(usize, &[u8])]) {
    let total: usize = pieces.iter().map(|(_, b)| b.len()).sum();
    let threads = if total < PARALLEL_COPY_MIN {
        1
    } else {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.min(MAX_COPY_THREADS).min(total / (PARALLEL_COPY_MIN / 2)).max(1)
    };
    // Disjoint destination windows, in offset order.
    let mut order: Vec<&(usize, &[u8])> = pieces.iter().collect();
    order.sort_by_key(|(o, _)| *o);
    let mut jobs: Vec<(&mut [u8], &[u8])> = Vec::new();
    let mut rest = dst;
    let mut at = 0;
    for (offset, src) in order {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(offset - at);
        let (window, tail) = tail.split_at_mut(src.len());
        rest = tail;
        at = offset + src.len();
        let chunk = src.len().div_ceil(threads).max(1);
        jobs.extend(window.chunks_mut(chunk).zip(src.chunks(chunk)));
    }
    if threads == 1 {
        jobs.into_iter().for_each(|(d, s)| d.copy_from_slice(s));
        return;
    }
    let mut per_thread: Vec<Vec<(&mut [u8], &[u8])>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        per_thread[i % threads].push(job);
    }
    std::thread::scope(|scope| {
        for work in per_thread {
            scope.spawn(move || work.into_iter().for_each(|(d, s)| d.copy_from_slice(s)));
        }
    });
}

/// Measured bandwidths of a GPU, in GB/s.
#[derive(Clone, Copy, Debug)]
pub struct Bandwidth {
    /// Device memory (bytes read plus written by device-to-device copies).
    pub device: f64,
    /// Pinned host memory to device memory.
    pub host_to_device: f64,
}

impl Gpu {
    /// Measures device-memory and pinned host-to-device bandwidth for about `seconds` in all.
    pub fn bandwidth(&self, seconds: f64) -> Result<Bandwidth> {
        let s = &self.stream;
        let dev_len = 512 << 20;
        let src = s.alloc_zeros::<u8>(dev_len).what("allocating")?;
        let mut dst = s.alloc_zeros::<u8>(dev_len).what("allocating")?;
        let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            f()?;
            self.synchronize()?;
            let (start, mut n) = (Instant::now(), 0u32);
            while start.elapsed().as_secs_f64() < seconds / 2.0 || n < 3 {
                f()?;
                self.synchronize()?;
                n += 1;
            }
            Ok(start.elapsed().as_secs_f64() / n as f64)
        };
        let t = timed(&mut || s.memcpy_dtod(&src, &mut dst).what("copying on the device"))?;
        let device = 2.0 * dev_len as f64 / t / 1e9;
        drop((src, dst));
        let host_len = 256 << 20;
        // SAFETY: the contents are never read.
        let host = unsafe { self.ctx.alloc_pinned::<u8>(host_len) }.what("allocating pinned memory")?;
        let mut dst = s.alloc_zeros::<u8>(host_len).what("allocating")?;
        let t = timed(&mut || s.memcpy_htod(&host, &mut dst).what("copying to the device"))?;
        Ok(Bandwidth { device, host_to_device: host_len as f64 / t / 1e9 })
    }
}
