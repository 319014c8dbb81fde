//! Where expert buffers live and how they are read: a pluggable host-memory allocator (every
//! buffer from it, every one given back), experts of several read chunks (read by all I/O threads,
//! the same bytes, the same errors), and `release` (an expert kept by a faster tier leaves RAM).
#![allow(clippy::needless_range_loop)] // (layer, expert) loops index the expected bytes

#[path = "store_common.rs"]
mod common;

use common::*;
use moe_store::{
    DenseFormat, Eviction, ExpertFormat, HostMemory, READ_CHUNK, StoreOptions, SynthShape, open_with, write_synthetic,
};
use std::alloc::{Layout, alloc, dealloc};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Heap memory that remembers what it handed out; refuses every request when `refuse`.
#[derive(Debug, Default)]
struct Counting {
    refuse: bool,
    /// Live allocations: address -> length.
    live: Mutex<BTreeMap<usize, usize>>,
    allocs: Mutex<(u64, u64)>,
}

impl Counting {
    fn live(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// (allocations, frees) so far.
    fn counts(&self) -> (u64, u64) {
        *self.allocs.lock().unwrap()
    }

    /// Whether `bytes` lies in one live allocation.
    fn holds(&self, bytes: &[u8]) -> bool {
        let p = bytes.as_ptr() as usize;
        let live = self.live.lock().unwrap();
        live.range(..=p).next_back().is_some_and(|(&start, &len)| p + bytes.len() <= start + len)
    }
}

impl HostMemory for Counting {
    fn alloc(&self, len: usize) -> Option<NonNull<u8>> {
        if self.refuse {
            return None;
        }
        // SAFETY: `len > 0` by the trait's contract.
        let p = NonNull::new(unsafe { alloc(Layout::from_size_align(len, 4096).unwrap()) })?;
        assert!(self.live.lock().unwrap().insert(p.as_ptr() as usize, len).is_none());
        self.allocs.lock().unwrap().0 += 1;
        Some(p)
    }

    unsafe fn free(&self, ptr: NonNull<u8>, len: usize) {
        assert_eq!(self.live.lock().unwrap().remove(&(ptr.as_ptr() as usize)), Some(len), "freed as allocated, once");
        self.allocs.lock().unwrap().1 += 1;
        // SAFETY: allocated in `alloc` with this layout.
        unsafe { dealloc(ptr.as_ptr(), Layout::from_size_align(len, 4096).unwrap()) }
    }
}

fn with_memory(budget: u64, io_threads: usize, direct: bool, memory: &Arc<Counting>) -> StoreOptions {
    StoreOptions { host_memory: Some(memory.clone()), ..options(budget, Eviction::Lfru, io_threads, direct) }
}

/// Reads every expert of `dir` (singly and in batches, with prefetches) through a store whose
/// buffers come from a counting allocator; checks the bytes, that they lie in its memory, and that
/// all of it is given back once the store and the experts are gone.
fn every_buffer_from_the_allocator(dir: &Path, budget_experts: u64, direct: bool) {
    let mem = Arc::new(Counting::default());
    let probe = open_with(dir, &options(0, Eviction::Lru, 0, false)).unwrap();
    let budget = budget_experts * probe.experts.expert_bytes().next_multiple_of(4096) as u64;
    let want = truth(dir, &probe);
    let m = open_with(dir, &with_memory(budget, 3, direct, &mem)).unwrap();
    let mut held = Vec::new();
    for l in 0..m.config.layers.len() {
        m.experts.prefetch(l, &[1, 2]);
        let ids: Vec<usize> = (0..m.config.experts).rev().collect();
        for (x, &e) in m.experts.experts(l, &ids).unwrap().iter().zip(&ids) {
            assert_eq!(bytes_of(x), want[l][e]);
            assert!(
                mem.holds(&x.gate.data) && mem.holds(&x.down.data),
                "layer {l} expert {e} not in the allocator's memory"
            );
        }
        let x = m.experts.expert(l, 0).unwrap();
        assert_eq!(bytes_of(&x), want[l][0]);
        held.push(x);
    }
    let s = m.experts.stats();
    assert!(s.evictions > 0, "a budget of {budget_experts} experts must evict: {s:?}");
    let (allocs, frees) = mem.counts();
    assert!(allocs >= s.reads && allocs > 0, "{allocs} allocations for {} reads", s.reads);
    assert!(frees > 0, "evicted buffers nobody holds go back to the allocator");
    assert!(mem.live() as u64 <= s.resident_experts + held.len() as u64 + 2, "{} live: {s:?}", mem.live());
    drop(m);
    // The experts handed out keep their buffers (and the allocator) alive after the store is gone.
    for (l, x) in held.iter().enumerate() {
        assert_eq!(bytes_of(x), want[l][0]);
    }
    drop(held);
    let (allocs, frees) = mem.counts();
    assert_eq!((mem.live(), allocs), (0, frees), "every buffer is given back");
    assert_eq!(Arc::strong_count(&mem), 1, "nothing keeps the allocator");
}

#[test]
fn expert_buffers_come_from_the_host_memory_and_all_go_back() {
    let tmp = tempfile::tempdir().unwrap();
    let q4 = packed_copy("qwen35_moe", tmp.path(), ExpertFormat::Q4);
    every_buffer_from_the_allocator(&q4, 3, true);
    every_buffer_from_the_allocator(&q4, 3, false);
    every_buffer_from_the_allocator(&hf_copy("qwen35_moe_fused", tmp.path()), 2, false);
}

#[test]
fn an_allocator_that_refuses_leaves_buffers_to_the_heap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_copy("qwen35_moe", tmp.path(), ExpertFormat::Q4);
    let mem = Arc::new(Counting { refuse: true, ..Default::default() });
    let m = open_with(&dir, &with_memory(1 << 30, 2, true, &mem)).unwrap();
    let want = truth(&dir, &m);
    for (x, e) in m.experts.experts(1, &[0, 1, 2]).unwrap().iter().zip(0..) {
        assert_eq!(bytes_of(x), want[1][e]);
    }
    assert_eq!((mem.counts(), mem.live()), ((0, 0), 0));
}

#[test]
fn released_experts_leave_ram_without_counting_as_evictions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_copy("qwen35_moe_fused", tmp.path(), ExpertFormat::Bf16);
    let mem = Arc::new(Counting::default());
    let m = open_with(&dir, &with_memory(1 << 30, 2, false, &mem)).unwrap();
    let want = truth(&dir, &m);
    let one = m.experts.expert_bytes() as u64;
    let xs = m.experts.experts(0, &[0, 1, 2]).unwrap();
    assert_eq!(mem.live(), 3);
    m.experts.release(0, 1);
    m.experts.release(0, 5); // not resident
    m.experts.release(99, 0); // out of range
    let s = m.experts.stats();
    assert_eq!((s.resident_experts, s.resident_bytes, s.released, s.evictions), (2, 2 * one, 1, 0), "{s:?}");
    assert!(s.to_string().contains("1 released"), "{s}");
    // The caller's copy stays valid; its buffer goes back when the caller drops it.
    assert_eq!(bytes_of(&xs[1]), want[0][1]);
    assert_eq!(mem.live(), 3);
    drop(xs);
    assert_eq!(mem.live(), 2);
    // Asked for again (the faster tier dropped it), it is read again.
    assert_eq!(bytes_of(&m.experts.expert(0, 1).unwrap()), want[0][1]);
    let s = m.experts.stats();
    assert_eq!((s.hits, s.misses, s.reads, s.resident_experts), (0, 4, 4, 3), "{s:?}");
    m.experts.reset_stats();
    assert_eq!(m.experts.stats().released, 0);
    // A source without a RAM tier ignores the hint.
    let none = open_with(&dir, &options(0, Eviction::Lru, 0, false)).unwrap();
    none.experts.release(0, 0);
    assert_eq!(none.experts.stats().released, 0);
}

/// A packed model whose bf16 experts are 3 MiB (three read chunks), `layers` layers of 4.
fn big_experts(tmp: &Path) -> PathBuf {
    let mut shape = SynthShape::preset("qwen3-30b").unwrap().miniature(4, 2, 256);
    shape.expert_inter = 4096;
    let out = tmp.join("big");
    write_synthetic(&shape, 2, ExpertFormat::Bf16, DenseFormat::Bf16, &out, 3, false, &mut |_, _| {}).unwrap();
    out
}

#[test]
fn experts_of_several_chunks_read_right_with_any_threads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = big_experts(tmp.path());
    let probe = open_with(&dir, &options(0, Eviction::Lru, 0, false)).unwrap();
    let record = probe.experts.expert_bytes() as u64;
    assert!(record > 2 * READ_CHUNK as u64, "{record}-byte experts are not several chunks");
    let want = truth(&dir, &probe);
    for (threads, direct) in [(0, false), (4, false), (4, true), (1, true)] {
        let m = open_with(&dir, &options(1 << 30, Eviction::Lfru, threads, direct)).unwrap();
        for l in 0..2 {
            for (x, e) in m.experts.experts(l, &[3, 0, 2]).unwrap().iter().zip([3, 0, 2]) {
                assert_eq!(bytes_of(x), want[l][e], "threads {threads} direct {direct}: {l}/{e}");
            }
            assert_eq!(bytes_of(&m.experts.expert(l, 1).unwrap()), want[l][1]);
        }
        let s = m.experts.stats();
        let read = if s.direct_io { record.next_multiple_of(4096) } else { record };
        assert_eq!((s.reads, s.bytes_read, s.misses), (8, 8 * read, 8), "{s:?}");
        assert!(s.busy_time <= s.read_time, "{s:?}");
    }
    // Cut layer 1's file in the middle of expert 2's second chunk: its read fails, naming it.
    let path = dir.join(moe_store::expert_file_name(1));
    let len = std::fs::metadata(&path).unwrap().len();
    let stride = len / 4;
    for direct in [false, true] {
        let m = open_with(&dir, &options(1 << 30, Eviction::Lfru, 3, direct)).unwrap();
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(2 * stride + (3 << 19)).unwrap();
        let err = m.experts.experts(1, &[0, 2, 1]).unwrap_err().to_string();
        assert!(err.contains("truncated") && err.contains("expert 2 of layer 1"), "{err}");
        assert_eq!(bytes_of(&m.experts.expert(1, 1).unwrap()), want[1][1]);
        assert!(!m.experts.expert(1, 3).unwrap_err().to_string().is_empty());
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len).unwrap();
    }
}
