//! The expert store: routed experts read from disk on demand through an [`ExpertLayout`], kept in
//! a RAM tier under a byte budget, read ahead on hints, with statistics. One store serves packed
//! and Hugging Face directories alike (`open`, `open_with`).
//!
//! - **Reads.** One read plan per expert (for a packed model one `pread` of the record), into a
//!   fresh 4096-aligned buffer; the expert's matrices are windows of that buffer (zero copy).
//!   `O_DIRECT` for packed files unless turned off or refused ([`crate::reader`]). A pool of
//!   `io_threads` threads runs prefetches and the misses of a batch request; the calling thread
//!   reads too, so a request never waits behind the queue.
//! - **One read per expert at a time.** A request for an expert that is being read waits for that
//!   read (a prefetch, another thread's miss) instead of issuing a second one; a request for an
//!   expert whose prefetch is still queued takes the read over and does it itself.
//! - **RAM tier.** Buffers stay resident until evicted ([`Eviction::Lfru`] by default, or
//!   [`Eviction::Lru`]). The budget bounds the bytes of buffers the cache holds, at all times: an
//!   expert is made resident only after evicting enough to fit, and one larger than the whole
//!   budget is never kept (budget 0 = no caching). What the budget does **not** count: buffers
//!   handed out to callers and evicted meanwhile (freed when the last [`Expert`] using them is
//!   dropped), and reads in flight (at most one buffer per read: the I/O threads, the callers, and
//!   the prefetches queued, which are capped at what the budget can hold).
//! - **Statistics** ([`StoreStats`]): requests served from RAM, by a read of their own or by
//!   waiting on one in flight; bytes and time of disk reads; time callers waited; evictions.

use crate::cache::Cache;
use crate::layout::ExpertLayout;
use crate::options::{Eviction, StoreOptions, format_bytes};
use crate::reader::{AlignedBuf, Reader};
use crate::{Expert, ExpertSource, StoreError};
use moe_core::Bytes;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Disk reads completed (one per expert read), and their bytes.
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
            "RAM tier: {} experts, {} of {} (peak {}), {} evictions",
            self.resident_experts,
            format_bytes(self.resident_bytes),
            format_bytes(self.budget_bytes),
            format_bytes(self.peak_resident_bytes),
            self.evictions
        )
    }
}

/// The outcome of one read, shared by everyone waiting for it.
type ReadResult = Result<Arc<AlignedBuf>, Arc<StoreError>>;

/// One read in flight (or queued): whoever claims it reads, everyone else waits.
struct Slot {
    claimed: AtomicBool,
    result: Mutex<Option<ReadResult>>,
    done: Condvar,
}

impl Slot {
    fn new() -> Arc<Self> {
        Arc::new(Slot { claimed: AtomicBool::new(false), result: Mutex::new(None), done: Condvar::new() })
    }

    /// True for the one caller that is to do the read.
    fn claim(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }

    fn fill(&self, r: ReadResult) {
        *lock(&self.result) = Some(r);
        self.done.notify_all();
    }

    fn wait(&self) -> ReadResult {
        let mut g = lock(&self.result);
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

struct Job {
    key: usize,
    slot: Arc<Slot>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
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

    fn carve(&self, key: usize, buf: Arc<AlignedBuf>) -> Expert {
        let (layer, expert) = self.split(key);
        let len = buf.len();
        self.layout.carve(layer, expert, &Bytes::new(buf, 0..len))
    }

    /// Reads `key` from disk.
    fn read(&self, key: usize) -> Result<AlignedBuf, StoreError> {
        let (layer, expert) = self.split(key);
        let direct = self.reader.direct();
        let plan = self.layout.plan(layer, expert, direct);
        // Busy time is the union of the reads' intervals, measured with the same instants as
        // their durations (so it never exceeds their sum).
        let start = Instant::now();
        {
            let mut b = lock(&self.busy);
            if b.reads == 0 {
                b.since = start;
            }
            b.reads += 1;
        }
        let r = self.reader.read(&plan, layer, expert, direct);
        let end = Instant::now();
        let took = end - start;
        {
            let mut b = lock(&self.busy);
            b.reads -= 1;
            if b.reads == 0 {
                let busy = end.saturating_duration_since(b.since);
                b.total += busy;
            }
        }
        if r.is_ok() {
            let c = &self.counters;
            c.reads.fetch_add(1, Ordering::Relaxed);
            c.bytes_read.fetch_add(plan.read_bytes(), Ordering::Relaxed);
            c.read_ns.fetch_add(nanos(took), Ordering::Relaxed);
        }
        r
    }

    /// Does the read of a claimed slot: reads, makes the buffer resident if it fits, wakes the
    /// waiters.
    fn run(&self, key: usize, slot: &Arc<Slot>) {
        let r = match catch_unwind(AssertUnwindSafe(|| self.read(key))) {
            Ok(r) => r.map(Arc::new).map_err(Arc::new),
            Err(_) => Err(Arc::new(StoreError::Corrupt {
                file: self.layout.dir().to_path_buf(),
                why: format!("reading expert {:?} (layer, expert) panicked", self.split(key)),
            })),
        };
        let mut evicted = Vec::new();
        {
            let mut st = lock(&self.state);
            if st.inflight.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
                st.inflight.remove(&key);
            }
            if let Ok(buf) = &r {
                st.cache.insert(key, buf.clone(), buf.len() as u64, &mut evicted);
            }
        }
        slot.fill(r);
        // Buffers nobody else holds are freed here, outside the lock.
        drop(evicted);
    }

    /// Waits for `slot` (reading it here if nobody has started), as a caller of the store.
    fn finish(&self, key: usize, slot: &Arc<Slot>) -> Result<Arc<AlignedBuf>, StoreError> {
        if slot.claim() {
            self.run(key, slot);
        }
        slot.wait().map_err(|e| clone_error(&e, self.layout.dir()))
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut q = lock(&self.queue);
                loop {
                    if q.shutdown {
                        return;
                    }
                    if let Some(job) = q.jobs.pop_front() {
                        break job;
                    }
                    q = self.work.wait(q).unwrap_or_else(|e| e.into_inner());
                }
            };
            if job.slot.claim() {
                self.run(job.key, &job.slot);
            }
        }
    }

    fn stall(&self, since: Instant) {
        self.counters.stall_ns.fetch_add(nanos(since.elapsed()), Ordering::Relaxed);
    }
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
        let budget = opts.ram_budget.resolve(dense_bytes);
        let direct = opts.direct_io && layout.supports_direct();
        let reader = Reader::open(layout.files(), direct)?;
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

    /// Whether the expert is resident in RAM (out-of-range ids are not).
    pub fn is_resident(&self, layer: usize, expert: usize) -> bool {
        self.shared.key(layer, expert).is_ok_and(|k| lock(&self.shared.state).cache.contains(k))
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
        let slot = Slot::new();
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
            Found::Read(slot, _) => {
                let r = s.finish(key, &slot);
                s.stall(start);
                Ok(s.carve(key, r?))
            }
        }
    }

    /// The misses go to the I/O threads (ahead of queued prefetches) while this thread reads too,
    /// from the other end of the list.
    fn experts(&self, layer: usize, ids: &[usize]) -> Result<Vec<Expert>, StoreError> {
        let s = &self.shared;
        let keys = ids.iter().map(|&e| s.key(layer, e)).collect::<Result<Vec<_>, _>>()?;
        let start = Instant::now();
        let found: Vec<Found> = {
            let mut st = lock(&s.state);
            keys.iter().map(|&k| self.find(&mut st, k)).collect()
        };
        let new: Vec<(usize, &Arc<Slot>)> = keys
            .iter()
            .zip(&found)
            .filter_map(|(&k, f)| match f {
                Found::Read(slot, true) => Some((k, slot)),
                _ => None,
            })
            .collect();
        if s.workers > 0 && new.len() > 1 {
            let mut q = lock(&s.queue);
            // All but the last, which this thread starts on right away, first ids first.
            for &(key, slot) in new[..new.len() - 1].iter().rev() {
                q.jobs.push_front(Job { key, slot: slot.clone() });
            }
            drop(q);
            for _ in 1..new.len() {
                s.work.notify_one();
            }
        }
        // Read whatever nobody has started yet, newest first (the I/O threads take the oldest).
        let mut waited = false;
        for (&key, f) in keys.iter().zip(&found).rev() {
            if let Found::Read(slot, _) = f {
                waited = true;
                if slot.claim() {
                    s.run(key, slot);
                }
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        let mut first_err = None;
        for (key, f) in keys.into_iter().zip(found) {
            let buf = match f {
                Found::Hit(buf) => buf,
                Found::Read(slot, _) => match s.finish(key, &slot) {
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
                let slot = Slot::new();
                st.inflight.insert(key, slot.clone());
                jobs.push(Job { key, slot });
            }
        }
        if jobs.is_empty() {
            return;
        }
        s.counters.prefetches.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let n = jobs.len();
        lock(&s.queue).jobs.extend(jobs);
        for _ in 0..n {
            s.work.notify_one();
        }
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
        for a in [&c.hits, &c.misses, &c.joined, &c.prefetches, &c.reads, &c.bytes_read, &c.read_ns, &c.stall_ns] {
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
