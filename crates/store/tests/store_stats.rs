//! The store's statistics: hits, misses, reads, bytes, evictions, prefetches, reset.

#[path = "store_common.rs"]
mod common;

use common::*;
use moe_store::{Eviction, ExpertFormat, ModelFiles, open_with};
use std::time::{Duration, Instant};

fn packed(tmp: &std::path::Path) -> std::path::PathBuf {
    packed_copy("qwen35_moe_fused", tmp, ExpertFormat::Bf16)
}

#[test]
fn stats_count_hits_misses_and_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let m = open_with(&dir, &options(1 << 30, Eviction::Lfru, 2, false)).unwrap();
    let one = m.experts.expert_bytes() as u64;
    assert_eq!(m.experts.stats().requests(), 0);

    m.experts.expert(0, 0).unwrap(); // miss
    m.experts.expert(0, 0).unwrap(); // hit
    m.experts.experts(0, &[0, 1, 2]).unwrap(); // 1 hit, 2 misses
    m.experts.experts(1, &[3, 3]).unwrap(); // a miss, and a request joining its read
    let s = m.experts.stats();
    assert_eq!((s.hits, s.misses, s.joined, s.prefetches), (2, 4, 1, 0), "{s:?}");
    assert_eq!((s.reads, s.bytes_read), (4, 4 * one), "{s:?}");
    assert_eq!((s.resident_experts, s.resident_bytes, s.peak_resident_bytes), (4, 4 * one, 4 * one));
    assert_eq!((s.evictions, s.budget_bytes, s.direct_io), (0, 1 << 30, false));
    assert!(s.read_time > Duration::ZERO && s.busy_time > Duration::ZERO && s.stall_time > Duration::ZERO);
    assert!(s.busy_time <= s.read_time, "overlapping reads count once in busy time: {s:?}");
    assert!(s.read_gbps() > 0.0);
    assert!((s.hit_rate() - 2.0 / 7.0).abs() < 1e-12);
    let text = s.to_string();
    assert!(text.contains("7 requests") && text.contains("hits 2") && text.contains("misses 4"), "{text}");
}

#[test]
fn evictions_are_counted_and_residents_stay_within_the_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let probe = open_with(&dir, &options(0, Eviction::Lru, 0, false)).unwrap();
    let one = probe.experts.expert_bytes() as u64;
    let m = open_with(&dir, &options(2 * one + one / 2, Eviction::Lru, 2, false)).unwrap();
    for e in 0..8 {
        m.experts.expert(0, e).unwrap();
    }
    let s = m.experts.stats();
    assert_eq!((s.misses, s.evictions, s.resident_experts), (8, 6, 2), "{s:?}");
    assert_eq!((s.resident_bytes, s.peak_resident_bytes), (2 * one, 2 * one));
}

/// Polls until `f` holds (prefetches finish in the background).
fn eventually(m: &ModelFiles, f: impl Fn(&moe_store::StoreStats) -> bool) {
    let start = Instant::now();
    while !f(&m.experts.stats()) {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out: {:?}", m.experts.stats());
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn prefetched_experts_are_found_by_later_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let m = open_with(&dir, &options(1 << 30, Eviction::Lfru, 2, true)).unwrap();
    let want = truth(&dir, &m);
    m.experts.prefetch(1, &[4, 5, 6, 99]);
    eventually(&m, |s| s.resident_experts == 3);
    m.experts.prefetch(1, &[4, 5]); // resident already: nothing to do
    for e in [4, 5, 6] {
        assert_eq!(bytes_of(&m.experts.expert(1, e).unwrap()), want[1][e]);
    }
    let s = m.experts.stats();
    assert_eq!((s.prefetches, s.reads, s.hits, s.misses, s.joined), (3, 3, 3, 0, 0), "{s:?}");

    // A request right after a prefetch uses the prefetch's read, whether it finds the read queued
    // (and does it), in flight (and waits) or done.
    m.experts.reset_stats();
    m.experts.prefetch(2, &[0]);
    assert_eq!(bytes_of(&m.experts.expert(2, 0).unwrap()), want[2][0]);
    let s = m.experts.stats();
    assert_eq!((s.prefetches, s.reads, s.misses, s.hits + s.joined), (1, 1, 0, 1), "{s:?}");
}

#[test]
fn reset_zeroes_counters_but_keeps_residents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let m = open_with(&dir, &options(1 << 30, Eviction::Lfru, 1, false)).unwrap();
    let one = m.experts.expert_bytes() as u64;
    m.experts.experts(3, &[0, 1, 2]).unwrap();
    m.experts.reset_stats();
    let s = m.experts.stats();
    assert_eq!((s.requests(), s.reads, s.bytes_read, s.evictions, s.prefetches), (0, 0, 0, 0, 0), "{s:?}");
    assert_eq!((s.read_time, s.busy_time, s.stall_time), (Duration::ZERO, Duration::ZERO, Duration::ZERO));
    assert_eq!((s.resident_experts, s.resident_bytes, s.peak_resident_bytes), (3, 3 * one, 3 * one));
    m.experts.experts(3, &[2, 1, 0]).unwrap();
    let s = m.experts.stats();
    assert_eq!((s.hits, s.misses, s.reads, s.stall_time), (3, 0, 0, Duration::ZERO), "{s:?}");
}

#[test]
fn without_io_threads_everything_is_read_by_the_caller() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let m = open_with(&dir, &options(1 << 30, Eviction::Lfru, 0, true)).unwrap();
    let want = truth(&dir, &m);
    m.experts.prefetch(0, &[1, 2]);
    let ids = [2, 1, 7, 1];
    for (x, &e) in m.experts.experts(0, &ids).unwrap().iter().zip(&ids) {
        assert_eq!(bytes_of(x), want[0][e]);
    }
    let s = m.experts.stats();
    assert_eq!((s.prefetches, s.misses, s.joined, s.reads), (0, 3, 1, 3), "{s:?}");
}

/// A layer's experts handed over whole once the RAM tier holds them all (for an address table of
/// host memory), without a request or a use counted: asked through `experts`, building the table
/// counted every expert of the layer as a hit.
#[test]
fn a_resident_layer_is_handed_over_uncounted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed(tmp.path());
    let m = open_with(&dir, &options(1 << 30, Eviction::Lfru, 2, false)).unwrap();
    let (layers, experts) = (m.config.layers.len(), m.config.experts);
    let all: Vec<usize> = (0..experts).collect();
    m.experts.experts(0, &all[1..]).unwrap();
    assert!(m.experts.layer_in_ram(0).is_none(), "expert 0 of layer 0 is not resident");
    for l in 0..layers {
        m.experts.experts(l, &all).unwrap();
    }
    let before = m.experts.stats();
    for l in 0..layers {
        let held = m.experts.layer_in_ram(l).expect("every expert resident");
        assert_eq!(held.len(), experts);
        for (e, x) in held.iter().enumerate() {
            let want = m.experts.expert(l, e).unwrap();
            assert_eq!(x.down.data.as_ptr(), want.down.data.as_ptr(), "layer {l} expert {e}: the resident copy");
            assert_eq!(x.byte_len(), want.byte_len());
        }
    }
    let after = m.experts.stats();
    let asked = (layers * experts) as u64;
    assert_eq!(after.hits - before.hits, asked, "only the checks' own requests count: {after:?}");
    assert_eq!((after.misses, after.reads), (before.misses, before.reads), "{after:?}");
    assert!(m.experts.layer_in_ram(layers).is_none(), "a layer out of range");
}
