//! The expert store: routed experts read from disk on demand through an [`ExpertLayout`], kept in
//! a RAM tier under a byte budget, read ahead on hints, with statistics. One store serves packed
//! and Hugging Face directories alike (`open`, `open_with`).
//!
//! - **Reads.** One read plan per expert (for a packed model one extent, the record), into a
//!   fresh 4096-aligned buffer from the store's [`HostMemory`](crate::HostMemory) or the heap; the
//!   expert's matrices are windows of that buffer (zero copy). `O_DIRECT` for packed files unless
//!   turned off or refused ([`crate::reader`]). A read is split into chunks of at most
//!   [`READ_CHUNK`](crate::READ_CHUNK) bytes, each one `pread`. A pool of `io_threads` threads
//!   reads the chunks of queued reads (the misses of requests first, then prefetches), oldest read
//!   first, several threads on one read when it has several chunks, so that a batch of experts
//!   keeps every thread (and the disk's queue) busy to its end. The requesting thread reads chunks
//!   of its own reads too, so a request never waits behind the queue; without I/O threads it
//!   reads everything itself.
//! - **One read per expert at a time.** A request for an expert that is being read joins that read
//!   (a prefetch, another thread's miss) instead of issuing a second one: it reads the chunks
//!   nobody has claimed yet, then waits for the rest.
//! - **RAM tier.** Buffers stay resident until evicted ([`Eviction::Lfru`] by default, or
//!   [`Eviction::Lru`]). The budget bounds the bytes of buffers the cache holds, at all times: an
//!   expert is made resident only after evicting enough to fit, and one larger than the whole
//!   budget is never kept (budget 0 = no caching). What the budget does **not** count: buffers
//!   handed out to callers and evicted meanwhile (freed when the last [`Expert`] using them is
//!   dropped), and reads in flight (at most one buffer per read: the I/O threads, the callers, and
//!   the prefetches queued, which are capped at what the budget can hold).
//! - **Release.** [`ExpertSource::release`] drops a resident expert that the caller now keeps in a
//!   faster tier (GPU memory), so that it is not held twice. Counted as `released`, not as an
//!   eviction.
//! - **Statistics** ([`StoreStats`]): requests served from RAM, by a read of their own or by
//!   joining one in flight; bytes and time of disk reads; time callers waited; evictions and
//!   releases.

use crate::cache::Cache;
use crate::layout::ExpertLayout;
use crate::options::{Eviction, StoreOptions, format_bytes};
use crate::reader::{AlignedBuf, PendingRead, READ_CHUNK, Reader};
use crate::{Adopted, Expert, ExpertSource, Fill, StoreError};
use moe_core::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A snapshot of an expert store's counters (see [`ExpertSource::stats`]). Counters run from the
/// store's opening or the last [`ExpertSource::reset_stats`]; `resident_*` and `budget_bytes`
/// describe the moment of the snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Requests served from RAM, without waiting.
    pub hits: u64,
    /// Requests that read their expert from disk.
    pub misses: u64,
    /// Requests that found a read of their expert in flight or queued (a prefetch, another
    /// caller's miss) and used it rather than reading again (waiting for it, or doing a queued
    /// read themselves).
    pub joined: u64,
    /// Reads started by `prefetch`.
    pub prefetches: u64,
    /// Disk reads completed (one per expert read, however many chunks), and their bytes.
    pub reads: u64,
    pub bytes_read: u64,
    /// Sum of the durations of the reads (overlapping reads all count).
    pub read_time: Duration,
    /// Wall time during which at least one read was in flight.
    pub busy_time: Duration,
    /// Time callers of `expert`/`experts` spent waiting for disk reads (their own or others').
    pub stall_time: Duration,
    /// Experts dropped from RAM to make room.
    pub evictions: u64,
    /// Experts dropped from RAM by [`ExpertSource::release`] because the caller keeps them in a
    /// faster tier now (not counted in `evictions`).
    pub released: u64,
    /// Experts taken into RAM by [`ExpertSource::adopt`] from a faster tier that gave them up.
    pub adopted: u64,
    /// Bytes and count of the experts resident in RAM now.
    pub resident_bytes: u64,
    pub resident_experts: u64,
    /// The most bytes resident at once (never above `budget_bytes`).
    pub peak_resident_bytes: u64,
    pub budget_bytes: u64,
    /// Whether reads use `O_DIRECT`.
    pub direct_io: bool,
}

impl StoreStats {
    /// Requests for experts (`hits + misses + joined`).
    pub fn requests(&self) -> u64 {
        self.hits + self.misses + self.joined
    }

    /// Fraction of requests served from RAM without waiting.
    pub fn hit_rate(&self) -> f64 {
        if self.requests() == 0 { 0.0 } else { self.hits as f64 / self.requests() as f64 }
    }

    /// Achieved disk bandwidth in GB/s (1e9 bytes): bytes read over the time reads were in flight.
    pub fn read_gbps(&self) -> f64 {
        let s = self.busy_time.as_secs_f64();
        if s == 0.0 { 0.0 } else { self.bytes_read as f64 / s / 1e9 }
    }
}

impl fmt::Display for StoreStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "experts: {} requests, {:.1}% from RAM (hits {}, misses {}, joined in-flight reads {}, prefetched {})",
            self.requests(),
            100.0 * self.hit_rate(),
            self.hits,
            self.misses,
            self.joined,
            self.prefetches
        )?;
        writeln!(
            f,
            "disk: {} in {} reads, {:.2} GB/s ({:.3} s busy, {:.3} s summed over reads), O_DIRECT {}",
            format_bytes(self.bytes_read),
            self.reads,
            self.read_gbps(),
            self.busy_time.as_secs_f64(),
            self.read_time.as_secs_f64(),
            if self.direct_io { "on" } else { "off" }
        )?;
        writeln!(f, "waited on I/O: {:.3} s", self.stall_time.as_secs_f64())?;
        write!(
            f,
            "RAM tier: {} experts, {} of {} (peak {}), {} evictions, {} released to a faster tier, {} taken back",
            self.resident_experts,
            format_bytes(self.resident_bytes),
            format_bytes(self.budget_bytes),
            format_bytes(self.peak_resident_bytes),
            self.evictions,
            self.released,
            self.adopted
        )
    }
}

/// The outcome of one read, shared by everyone waiting for it.
type ReadResult = Result<Arc<AlignedBuf>, Arc<StoreError>>;

/// Where one read stands.
enum Work {
    /// Registered (queued, or about to be started by its requester); no buffer yet.
    Queued,
    Reading(Reading),
    /// Every chunk is read; whoever read the last one is completing the read.
    Finishing,
    Done(ReadResult),
}

struct Reading {
    read: Arc<PendingRead>,
    /// The first chunk nobody has claimed.
    next: usize,
    /// Chunks claimed and not read yet.
    running: usize,
    /// The first chunk's error; no chunk is claimed after one.
    error: Option<StoreError>,
    start: Instant,
}

/// One read in flight (or queued). Whoever comes (an I/O thread, a requester of the expert) reads
/// chunks nobody has claimed; whoever reads the last one completes the read; everyone waits for it.
struct Slot {
    key: usize,
    work: Mutex<Work>,
    done: Condvar,
}

impl Slot {
    fn new(key: usize) -> Arc<Self> {
        Arc::new(Slot { key, work: Mutex::new(Work::Queued), done: Condvar::new() })
    }

    fn wait(&self) -> ReadResult {
        let mut w = lock(&self.work);
        loop {
            if let Work::Done(r) = &*w {
                return r.clone();
            }
            w = self.done.wait(w).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Reads with chunks to read, oldest first.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Arc<Slot>>,
    shutdown: bool,
}

struct State {
    cache: Cache<Arc<AlignedBuf>>,
    inflight: HashMap<usize, Arc<Slot>>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    joined: AtomicU64,
    prefetches: AtomicU64,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    read_ns: AtomicU64,
    stall_ns: AtomicU64,
    released: AtomicU64,
    adopted: AtomicU64,
}

/// Reads in flight and the wall time with at least one.
struct Busy {
    reads: usize,
    since: Instant,
    total: Duration,
}

struct Shared {
    layout: Box<dyn ExpertLayout>,
    reader: Reader,
    state: Mutex<State>,
    queue: Mutex<Queue>,
    work: Condvar,
    counters: Counters,
    busy: Mutex<Busy>,
    /// How many prefetched buffers the budget can hold.
    prefetch_cap: usize,
    workers: usize,
    /// Bytes of a read chunk ([`READ_CHUNK`]; smaller in tests).
    chunk: usize,
    /// Chunks of the largest expert, to know how many I/O threads a read can keep busy.
    expert_chunks: usize,
    eviction: Eviction,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves consistent data behind (every update is
    // completed before anything that can panic), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A copy of `e` for the second and later waiters of a failed read (`StoreError` is not `Clone`).
fn clone_error(e: &StoreError, dir: &std::path::Path) -> StoreError {
    match e {
        StoreError::Io { path, source } => {
            StoreError::Io { path: path.clone(), source: std::io::Error::new(source.kind(), source.to_string()) }
        }
        StoreError::Corrupt { file, why } => StoreError::Corrupt { file: file.clone(), why: why.clone() },
        StoreError::MissingTensor { tensor, dir } => {
            StoreError::MissingTensor { tensor: tensor.clone(), dir: dir.clone() }
        }
        other => StoreError::Corrupt { file: dir.to_path_buf(), why: other.to_string() },
    }
}

impl Shared {
    fn key(&self, layer: usize, expert: usize) -> Result<usize, StoreError> {
        let (layers, experts) = (self.layout.layers(), self.layout.experts());
        if layer >= layers || expert >= experts {
            return Err(StoreError::MissingTensor {
                tensor: format!(
                    "layers.{layer}.mlp.experts.{expert} (the model has {layers} layers of {experts} experts)"
                ),
                dir: self.layout.dir().to_path_buf(),
            });
        }
        Ok(layer * experts + expert)
    }

    fn split(&self, key: usize) -> (usize, usize) {
        (key / self.layout.experts(), key % self.layout.experts())
    }

    /// Where the nine parts of an expert (`adopt`'s order) lie in a buffer of `len` bytes: carved
    /// from a zeroed vector, whose pages a large allocation never touches.
    fn part_ranges(&self, layer: usize, expert: usize, len: usize) -> [Range<usize>; 9] {
        let x = self.layout.carve(layer, expert, &Bytes::from_vec(vec![0; len]));
        let [g, u, d] = [&x.gate, &x.up, &x.down];
        let parts = [&g.data, &g.scales, &g.biases, &u.data, &u.scales, &u.biases, &d.data, &d.scales, &d.biases];
        parts.map(|b| b.offset()..b.offset() + b.len())
    }

    fn carve(&self, key: usize, buf: Arc<AlignedBuf>) -> Expert {
        let (layer, expert) = self.split(key);
        let len = buf.len();
        self.layout.carve(layer, expert, &Bytes::new(buf, 0..len))
    }

    /// Starts reading `key`: the plan, the buffer, and the busy time.
    fn begin(&self, key: usize) -> Reading {
        let (layer, expert) = self.split(key);
        let direct = self.reader.direct();
        let plan = self.layout.plan(layer, expert, direct);
        // Busy time is the union of the reads' intervals, measured with the same instants as
        // their durations (so it never exceeds their sum).
        let start = Instant::now();
        let read = self.reader.start(plan, layer, expert, direct, self.chunk);
        let mut b = lock(&self.busy);
        if b.reads == 0 {
            b.since = start;
        }
        b.reads += 1;
        Reading { read: Arc::new(read), next: 0, running: 0, error: None, start }
    }

    /// Ends a read whose chunks are all done: its buffer, or its first error.
    fn end(&self, r: Reading) -> Result<AlignedBuf, StoreError> {
        let end = Instant::now();
        {
            let mut b = lock(&self.busy);
            b.reads -= 1;
            if b.reads == 0 {
                let busy = end.saturating_duration_since(b.since);
                b.total += busy;
            }
        }
        let Ok(read) = Arc::try_unwrap(r.read) else {
            unreachable!("every chunk reader drops its handle before counting its chunk done")
        };
        if let Some(e) = r.error {
            return Err(e);
        }
        let c = &self.counters;
        c.reads.fetch_add(1, Ordering::Relaxed);
        c.bytes_read.fetch_add(read.plan().read_bytes(), Ordering::Relaxed);
        c.read_ns.fetch_add(nanos(end - r.start), Ordering::Relaxed);
        Ok(read.finish())
    }

    fn panicked(&self, key: usize) -> StoreError {
        StoreError::Corrupt {
            file: self.layout.dir().to_path_buf(),
            why: format!("reading expert {:?} (layer, expert) panicked", self.split(key)),
        }
    }

    /// Reads one chunk of `slot`'s expert that nobody has claimed, starting the read if nobody
    /// has, and completes the read if that was the last chunk. False when no chunk is left to
    /// claim (the read is done, or others are reading its last chunks).
    fn help(&self, slot: &Slot) -> bool {
        let mut w = lock(&slot.work);
        if matches!(*w, Work::Queued) {
            match catch_unwind(AssertUnwindSafe(|| self.begin(slot.key))) {
                Ok(r) => *w = Work::Reading(r),
                Err(_) => {
                    *w = Work::Finishing;
                    drop(w);
                    self.complete(slot, Err(self.panicked(slot.key)));
                    return true;
                }
            }
        }
        let (read, i) = match &mut *w {
            Work::Reading(r) if r.next < r.read.chunks() => {
                r.next += 1;
                r.running += 1;
                (r.read.clone(), r.next - 1)
            }
            // A plan without chunks (nothing to read) is complete at once.
            Work::Reading(r) if r.read.chunks() == 0 => {
                self.settle(slot, w);
                return true;
            }
            _ => return false,
        };
        drop(w);
        // SAFETY: chunk `i` was claimed above, by this thread alone.
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { self.reader.read_chunk(&read, i) }))
            .unwrap_or_else(|_| Err(self.panicked(slot.key)));
        drop(read);
        let mut w = lock(&slot.work);
        let Work::Reading(reading) = &mut *w else { unreachable!("a read with a chunk running is not complete") };
        reading.running -= 1;
        if let Err(e) = r {
            reading.error.get_or_insert(e);
            reading.next = reading.read.chunks();
        }
        self.settle(slot, w);
        true
    }

    /// Completes the read of `slot` (guarded by `w`) if every chunk is done.
    fn settle(&self, slot: &Slot, mut w: MutexGuard<'_, Work>) {
        match &*w {
            Work::Reading(r) if r.running == 0 && r.next == r.read.chunks() => {}
            _ => return,
        }
        let Work::Reading(r) = std::mem::replace(&mut *w, Work::Finishing) else { unreachable!() };
        drop(w);
        let r = self.end(r);
        self.complete(slot, r);
    }

    /// Makes the buffer resident if it fits, and wakes the waiters.
    fn complete(&self, slot: &Slot, r: Result<AlignedBuf, StoreError>) {
        let r: ReadResult = r.map(Arc::new).map_err(Arc::new);
        let mut evicted = Vec::new();
        {
            let mut st = lock(&self.state);
            if st.inflight.get(&slot.key).is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), slot)) {
                st.inflight.remove(&slot.key);
            }
            if let Ok(buf) = &r {
                st.cache.insert(slot.key, buf.clone(), buf.len() as u64, &mut evicted);
            }
        }
        *lock(&slot.work) = Work::Done(r);
        slot.done.notify_all();
        // Out of the queue (if a requester finished it before the I/O threads got to it), so that
        // nothing but its waiters holds the buffer.
        lock(&self.queue).jobs.retain(|s| !std::ptr::eq(Arc::as_ptr(s), slot));
        // Buffers nobody else holds are freed here, outside the locks.
        drop(evicted);
    }

    /// Reads what is left of `slot`'s chunks and waits for the others, as a requester.
    fn finish(&self, slot: &Slot) -> Result<Arc<AlignedBuf>, StoreError> {
        while self.help(slot) {}
        slot.wait().map_err(|e| clone_error(&e, self.layout.dir()))
    }

    /// Queues `slots` ahead of everything queued (`front`) or behind it, and wakes as many I/O
    /// threads as their chunks can keep busy, less the one the caller is.
    fn enqueue(&self, slots: &[&Arc<Slot>], front: bool, caller_reads: bool) {
        let wake = (slots.len() * self.expert_chunks).saturating_sub(usize::from(caller_reads)).min(self.workers);
        if wake == 0 {
            return;
        }
        {
            let mut q = lock(&self.queue);
            if front {
                for &slot in slots.iter().rev() {
                    q.jobs.push_front(slot.clone());
                }
            } else {
                q.jobs.extend(slots.iter().map(|&s| s.clone()));
            }
        }
        for _ in 0..wake {
            self.work.notify_one();
        }
    }

    fn worker(&self) {
        loop {
            let slot = {
                let mut q = lock(&self.queue);
                loop {
                    if q.shutdown {
                        return;
                    }
                    if let Some(slot) = q.jobs.front() {
                        break slot.clone();
                    }
                    q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            if !self.help(&slot) {
                // Every chunk of the oldest read is claimed: on to the next one.
                let mut q = lock(&self.queue);
                if q.jobs.front().is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    q.jobs.pop_front();
                }
            }
        }
    }

    fn stall(&self, since: Instant) {
        self.counters.stall_ns.fetch_add(nanos(since.elapsed()), Ordering::Relaxed);
    }
}

/// Chunks of `len` bytes at `chunk` bytes each (at least 1).
fn expert_chunks(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk).max(1)
}

/// Where a request stands after looking at the cache.
enum Found {
    Hit(Arc<AlignedBuf>),
    /// A read in flight or queued; `true` if this request created it.
    Read(Arc<Slot>, bool),
}

/// The expert store over any [`ExpertLayout`]; see the module documentation. Cheap to share
/// (`Arc`); dropping it stops its I/O threads (queued prefetches are dropped).
pub struct ExpertStore {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl ExpertStore {
    /// A store over `layout` with `opts`; `dense_bytes` (the model's resident weights) only
    /// matters for [`Budget::Auto`](crate::Budget::Auto).
    pub fn new(
        layout: Box<dyn ExpertLayout>,
        opts: &StoreOptions,
        dense_bytes: u64,
    ) -> Result<ExpertStore, StoreError> {
        Self::with_chunk(layout, opts, dense_bytes, READ_CHUNK)
    }

    /// [`new`](Self::new) reading in chunks of `chunk` bytes (tests use small ones).
    fn with_chunk(
        layout: Box<dyn ExpertLayout>,
        opts: &StoreOptions,
        dense_bytes: u64,
        chunk: usize,
    ) -> Result<ExpertStore, StoreError> {
        let budget = opts.ram_budget.resolve(dense_bytes);
        let direct = opts.direct_io && layout.supports_direct();
        let reader = Reader::open(layout.files(), direct, opts.host_memory.clone())?;
        let keys = layout.layers().checked_mul(layout.experts()).expect("layers x experts fits usize");
        let one = if keys == 0 { 0 } else { layout.plan(0, 0, direct).buf_len as u64 };
        let prefetch_cap = budget.checked_div(one).map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let age_period = (8 * keys as u64).max(1024);
        let shared = Arc::new(Shared {
            layout,
            reader,
            state: Mutex::new(State {
                cache: Cache::new(keys, budget, opts.eviction, age_period),
                inflight: HashMap::new(),
            }),
            queue: Mutex::new(Queue::default()),
            work: Condvar::new(),
            counters: Counters::default(),
            busy: Mutex::new(Busy { reads: 0, since: Instant::now(), total: Duration::ZERO }),
            prefetch_cap,
            workers: opts.io_threads,
            chunk,
            expert_chunks: expert_chunks(one as usize, chunk),
            eviction: opts.eviction,
        });
        let mut threads = Vec::with_capacity(opts.io_threads);
        for k in 0..opts.io_threads {
            let s = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("expert-io-{k}"))
                .spawn(move || s.worker())
                .map_err(|source| StoreError::Io { path: shared.layout.dir().to_path_buf(), source });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Stop the threads already started before giving up.
                    drop(ExpertStore { shared, threads });
                    return Err(e);
                }
            }
        }
        Ok(ExpertStore { shared, threads })
    }

    /// The RAM budget in bytes (resolved, for `auto`).
    pub fn budget(&self) -> u64 {
        lock(&self.shared.state).cache.budget()
    }

    pub fn eviction(&self) -> Eviction {
        self.shared.eviction
    }

    pub fn io_threads(&self) -> usize {
        self.shared.workers
    }

    /// Whether reads use `O_DIRECT` now (asked for, supported by the layout, not refused).
    pub fn direct_io(&self) -> bool {
        self.shared.reader.direct()
    }

    /// Counts the request and finds the expert in RAM, in flight, or registers a read for it.
    fn find(&self, st: &mut State, key: usize) -> Found {
        let c = &self.shared.counters;
        if let Some(buf) = st.cache.touch(key) {
            c.hits.fetch_add(1, Ordering::Relaxed);
            return Found::Hit(buf);
        }
        if let Some(slot) = st.inflight.get(&key) {
            c.joined.fetch_add(1, Ordering::Relaxed);
            return Found::Read(slot.clone(), false);
        }
        c.misses.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::new(key);
        st.inflight.insert(key, slot.clone());
        Found::Read(slot, true)
    }
}

impl Drop for ExpertStore {
    fn drop(&mut self) {
        {
            let mut q = lock(&self.shared.queue);
            q.shutdown = true;
            q.jobs.clear();
        }
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl ExpertSource for ExpertStore {
    fn expert(&self, layer: usize, expert: usize) -> Result<Expert, StoreError> {
        let s = &self.shared;
        let key = s.key(layer, expert)?;
        let start = Instant::now();
        let found = self.find(&mut lock(&s.state), key);
        match found {
            Found::Hit(buf) => Ok(s.carve(key, buf)),
            Found::Read(slot, new) => {
                if new {
                    s.enqueue(&[&slot], true, true);
                }
                let r = s.finish(&slot);
                s.stall(start);
                Ok(s.carve(key, r?))
            }
        }
    }

    /// The misses go to the I/O threads (ahead of queued prefetches) while this thread reads
    /// chunks of them too, in the same order.
    fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<Expert>, StoreError> {
        let s = &self.shared;
        let keys = ids.iter().map(|&e| s.key(layer, e)).collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        let found: Vec<Found> = {
            let mut st = lock(&s.state);
            keys.iter().map(|&k| self.find(&mut st, k)).collect()
        };
        let new: Vec<&Arc<Slot>> = found
            .iter()
            .filter_map(|f| match f {
                Found::Read(slot, true) => Some(slot),
                _ => None,
            })
            .collect();
        s.enqueue(&new, true, true);
        // Read what nobody has claimed yet of every read this request needs, first ids first.
        let mut waited = false;
        for f in &found {
            if let Found::Read(slot, _) = f {
                waited = true;
                while s.help(slot) {}
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        let mut first_err = None;
        for (key, f) in keys.into_iter().zip(found) {
            let buf = match f {
                Found::Hit(buf) => buf,
                Found::Read(slot, _) => match s.finish(&slot) {
                    Ok(buf) => buf,
                    Err(e) => {
                        first_err.get_or_insert(e);
                        continue;
                    }
                },
            };
            out.push(s.carve(key, buf));
        }
        if waited {
            s.stall(start);
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Queues reads of the experts that are neither resident nor being read, behind any demand
    /// reads, at most as many as the budget can hold. Not a use of the experts (their counts for
    /// eviction change when they are asked for). A no-op without I/O threads or with a budget
    /// smaller than one expert; ids out of range are ignored.
    fn prefetch(&self, layer: usize, experts: &[usize]) {
        let s = &self.shared;
        if s.workers == 0 || s.prefetch_cap == 0 {
            return;
        }
        let mut jobs = Vec::new();
        {
            let mut st = lock(&s.state);
            for &e in experts {
                if jobs.len() >= s.prefetch_cap {
                    break;
                }
                let Ok(key) = s.key(layer, e) else { continue };
                if st.cache.contains(key) || st.inflight.contains_key(&key) {
                    continue;
                }
                let slot = Slot::new(key);
                st.inflight.insert(key, slot.clone());
                jobs.push(slot);
            }
        }
        s.counters.prefetches.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        s.enqueue(&jobs.iter().collect::<Vec<_>>(), false, false);
    }

    /// Drops the expert from the RAM tier (the caller keeps it in a faster tier now). Buffers
    /// handed out stay valid until their last user drops them; a read in flight is not stopped.
    /// Counted in `released`, not `evictions`; the expert's use history stays. Ids out of range
    /// are ignored.
    fn release(&self, layer: usize, expert: usize) {
        let s = &self.shared;
        let Ok(key) = s.key(layer, expert) else { return };
        let dropped = lock(&s.state).cache.remove(key);
        if dropped.is_some() {
            s.counters.released.fetch_add(1, Ordering::Relaxed);
        }
        // Freed (if nobody else holds it) outside the lock.
        drop(dropped);
    }

    fn adopt(&self, layer: usize, expert: usize, fill: &mut Fill<'_>) -> Option<Adopted> {
        let s = &self.shared;
        let key = s.key(layer, expert).ok()?;
        let len = s.layout.plan(layer, expert, s.reader.direct()).buf_len;
        let taken = |st: &State| st.cache.contains(key) || st.inflight.contains_key(&key);
        {
            let st = lock(&s.state);
            if len as u64 > st.cache.budget() || taken(&st) {
                return None;
            }
        }
        let parts = s.part_ranges(layer, expert, len);
        let buf = Arc::new(s.reader.filled(len, &parts, &mut |b| fill(b, &parts))?);
        let mut evicted = Vec::new();
        let kept = {
            let mut st = lock(&s.state);
            // Read meanwhile on someone's request: that copy stands.
            !taken(&st) && st.cache.insert(key, buf.clone(), len as u64, &mut evicted)
        };
        // Freed outside the lock.
        drop(evicted);
        if kept {
            s.counters.adopted.fetch_add(1, Ordering::Relaxed);
        }
        Some(Adopted { kept, buffer: buf })
    }

    fn is_resident(&self, layer: usize, expert: usize) -> bool {
        self.shared.key(layer, expert).is_ok_and(|k| lock(&self.shared.state).cache.contains(k))
    }

    fn layer_in_ram(&self, layer: usize) -> Option<Vec<Expert>> {
        let s = &self.shared;
        let keys = (0..s.layout.experts()).map(|e| s.key(layer, e).ok()).collect::<Option<Vec<_>>>()?;
        let bufs = {
            let st = lock(&s.state);
            keys.iter().map(|&k| st.cache.get(k)).collect::<Option<Vec<_>>>()?
        };
        Some(keys.into_iter().zip(bufs).map(|(k, buf)| s.carve(k, buf)).collect())
    }

    fn stats(&self) -> StoreStats {
        let s = &self.shared;
        let c = &s.counters;
        let ns = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        let busy_time = {
            let b = lock(&s.busy);
            if b.reads > 0 { b.total + b.since.elapsed() } else { b.total }
        };
        let st = lock(&s.state);
        StoreStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            joined: c.joined.load(Ordering::Relaxed),
            prefetches: c.prefetches.load(Ordering::Relaxed),
            reads: c.reads.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            read_time: ns(&c.read_ns),
            busy_time,
            stall_time: ns(&c.stall_ns),
            evictions: st.cache.evictions(),
            released: c.released.load(Ordering::Relaxed),
            adopted: c.adopted.load(Ordering::Relaxed),
            resident_bytes: st.cache.bytes(),
            resident_experts: st.cache.resident() as u64,
            peak_resident_bytes: st.cache.peak(),
            budget_bytes: st.cache.budget(),
            direct_io: s.reader.direct(),
        }
    }

    fn reset_stats(&self) {
        let s = &self.shared;
        let c = &s.counters;
        for a in [
            &c.hits,
            &c.misses,
            &c.joined,
            &c.prefetches,
            &c.reads,
            &c.bytes_read,
            &c.read_ns,
            &c.stall_ns,
            &c.released,
            &c.adopted,
        ] {
            a.store(0, Ordering::Relaxed);
        }
        {
            let mut b = lock(&s.busy);
            b.total = Duration::ZERO;
            b.since = Instant::now();
        }
        lock(&s.state).cache.reset_counters();
    }

    fn expert_bytes(&self) -> usize {
        self.shared.layout.expert_bytes()
    }

    fn total_bytes(&self) -> usize {
        self.shared.layout.total_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Extent, ReadPlan};
    use crate::options::Budget;
    use moe_core::{DType, Matrix};
    use std::mem::MaybeUninit;
    use std::path::{Path, PathBuf};

    /// `experts` experts of `len` bytes back to back in one file; gate is the whole record (as
    /// bf16 `[len / 2, 1]`), up and down are empty.
    struct Flat {
        dir: PathBuf,
        files: Vec<PathBuf>,
        experts: usize,
        len: usize,
    }

    impl ExpertLayout for Flat {
        fn dir(&self) -> &Path {
            &self.dir
        }
        fn files(&self) -> &[PathBuf] {
            &self.files
        }
        fn layers(&self) -> usize {
            1
        }
        fn experts(&self) -> usize {
            self.experts
        }
        fn supports_direct(&self) -> bool {
            true
        }
        fn plan(&self, _layer: usize, expert: usize, _direct: bool) -> ReadPlan {
            let ext = Extent { file: 0, offset: (expert * self.len) as u64, len: self.len, at: 0 };
            ReadPlan { extents: vec![ext], buf_len: self.len }
        }
        fn carve(&self, _layer: usize, _expert: usize, buf: &Bytes) -> Expert {
            let empty = || Matrix::float(DType::BF16, 0, 0, Bytes::empty());
            Expert { gate: Matrix::float(DType::BF16, self.len / 2, 1, buf.clone()), up: empty(), down: empty() }
        }
        fn expert_bytes(&self) -> usize {
            self.len
        }
        fn total_bytes(&self) -> usize {
            self.len * self.experts
        }
    }

    const CHUNK: usize = 4096;

    /// A store over `experts` experts of `chunks` chunks each, and the file's bytes.
    fn flat(tmp: &Path, experts: usize, chunks: usize, io_threads: usize) -> (ExpertStore, Vec<u8>) {
        let len = chunks * CHUNK;
        let data: Vec<u8> = (0..experts * len).map(|i| (i * 31 + i / 4096) as u8).collect();
        let path = tmp.join("experts.bin");
        std::fs::write(&path, &data).unwrap();
        let layout = Flat { dir: tmp.to_path_buf(), files: vec![path], experts, len };
        let opts =
            StoreOptions { ram_budget: Budget::Bytes(1 << 30), io_threads, direct_io: false, ..Default::default() };
        (ExpertStore::with_chunk(Box::new(layout), &opts, 0, CHUNK).unwrap(), data)
    }

    fn bytes_of(e: &Expert) -> &[u8] {
        &e.gate.data
    }

    #[test]
    fn the_chunks_of_one_expert_are_read_by_several_threads() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, data) = flat(tmp.path(), 2, 16, 3);
        let len = 16 * CHUNK;
        // Slow chunks, so that the woken I/O threads find chunks left to read.
        store.shared.reader.chunk_delay_ms.store(5, Ordering::Relaxed);
        let e = store.expert(0, 1).unwrap();
        assert_eq!(bytes_of(&e), &data[len..2 * len]);
        let threads = std::mem::take(&mut *store.shared.reader.chunk_threads.lock().unwrap());
        assert_eq!(threads.len(), 16, "every chunk is read once");
        let mut distinct = threads.clone();
        distinct.sort_by_key(|t| format!("{t:?}"));
        distinct.dedup();
        assert!(distinct.len() > 1, "one expert's chunks were all read by one thread: {threads:?}");
        let s = store.stats();
        assert_eq!((s.reads, s.bytes_read, s.misses), (1, len as u64, 1), "{s:?}");
        assert!(s.busy_time <= s.read_time && s.read_time > Duration::ZERO, "{s:?}");
    }

    #[test]
    fn without_io_threads_the_caller_reads_every_chunk() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, data) = flat(tmp.path(), 4, 5, 0);
        let len = 5 * CHUNK;
        let xs = store.experts(0, &[3, 0, 2]).unwrap();
        for (x, e) in xs.iter().zip([3, 0, 2]) {
            assert_eq!(bytes_of(x), &data[e * len..(e + 1) * len]);
        }
        let threads = store.shared.reader.chunk_threads.lock().unwrap().clone();
        assert_eq!(threads.len(), 15);
        assert!(threads.iter().all(|&t| t == std::thread::current().id()));
        let s = store.stats();
        assert_eq!((s.reads, s.bytes_read), (3, 3 * len as u64), "{s:?}");
    }

    #[test]
    fn a_batch_in_chunks_gives_every_expert_its_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, data) = flat(tmp.path(), 12, 7, 4);
        let len = 7 * CHUNK;
        let ids = [5, 1, 11, 1, 0, 7, 3, 9];
        store.prefetch(0, &[2, 3]);
        for (x, &e) in store.experts(0, &ids).unwrap().iter().zip(&ids) {
            assert_eq!(bytes_of(x), &data[e * len..(e + 1) * len], "expert {e}");
        }
        // Every read is complete once the batch returns; prefetches may still be running.
        let s = store.stats();
        assert_eq!(s.misses + s.joined + s.hits, ids.len() as u64, "{s:?}");
        let start = Instant::now();
        while store.stats().reads < 8 {
            assert!(start.elapsed() < Duration::from_secs(20), "{:?}", store.stats());
            std::thread::sleep(Duration::from_millis(1));
        }
        for e in 0..12 {
            let x = store.expert(0, e).unwrap();
            assert_eq!(bytes_of(&x), &data[e * len..(e + 1) * len], "expert {e}");
        }
        let s = store.stats();
        assert_eq!((s.reads, s.bytes_read), (12, 12 * len as u64), "{s:?}");
    }

    #[test]
    fn a_chunk_past_the_end_fails_the_whole_read() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, data) = flat(tmp.path(), 3, 6, 2);
        let len = 6 * CHUNK;
        // Expert 2 loses its last two chunks.
        let path = tmp.path().join("experts.bin");
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len((3 * len - 2 * CHUNK) as u64).unwrap();
        for _ in 0..2 {
            let msg = store.experts(0, &[0, 2]).unwrap_err().to_string();
            assert!(msg.contains("truncated") && msg.contains("expert 2 of layer 0"), "{msg}");
        }
        assert!(!store.is_resident(0, 2));
        assert_eq!(bytes_of(&store.expert(0, 1).unwrap()), &data[len..2 * len]);
        let s = store.stats();
        assert_eq!((s.reads, s.bytes_read, s.resident_experts), (2, 2 * len as u64, 2), "{s:?}");
    }

    /// An expert handed back from a faster tier lands in RAM as a read of it would (the same
    /// bytes, a hit next time, nothing read); one resident already, out of range, or whose fill
    /// fails is not taken.
    #[test]
    fn adopted_experts_are_hits_with_their_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (store, data) = flat(tmp.path(), 4, 3, 2);
        let len = 3 * CHUNK;
        let from = |e: usize| {
            let src = data[e * len..(e + 1) * len].to_vec();
            move |host: &mut [MaybeUninit<u8>], parts: &[Range<usize>; 9]| {
                for p in parts.iter().filter(|p| !p.is_empty()) {
                    for (d, &b) in host[p.clone()].iter_mut().zip(&src[p.clone()]) {
                        d.write(b);
                    }
                }
                true
            }
        };
        assert!(store.adopt(0, 2, &mut from(2)).is_some_and(|a| a.kept));
        assert!(store.is_resident(0, 2));
        assert_eq!(bytes_of(&store.expert(0, 2).unwrap()), &data[2 * len..3 * len]);
        let s = store.stats();
        assert_eq!((s.adopted, s.hits, s.reads, s.resident_experts), (1, 1, 0, 1), "{s:?}");

        assert!(store.adopt(0, 2, &mut from(2)).is_none(), "resident already");
        assert!(store.adopt(0, 9, &mut from(1)).is_none(), "out of range");
        assert!(store.adopt(0, 1, &mut |_, _| false).is_none(), "a failed fill");
        assert!(!store.is_resident(0, 1));
        assert_eq!(bytes_of(&store.expert(0, 1).unwrap()), &data[len..2 * len]);
        assert_eq!(store.stats().adopted, 1);
    }
}
