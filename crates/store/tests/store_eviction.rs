//! The RAM tier's policies and budget: LRU and LFRU evict different experts on a pattern made to
//! tell them apart; budgets below one expert (and 0) cache nothing and still serve every expert.
#![allow(clippy::needless_range_loop)] // (layer, expert) loops index the expected bytes

#[path = "store_common.rs"]
mod common;

use common::*;
use moe_store::{Eviction, ExpertFormat, StoreStats, open_with};

/// Runs `requests` (expert ids of layer 0, one request each) on a fresh store; the stats after.
fn run(dir: &std::path::Path, eviction: Eviction, budget: u64, requests: &[usize]) -> (StoreStats, Vec<bool>) {
    let m = open_with(dir, &options(budget, eviction, 2, false)).unwrap();
    let mut hit = Vec::new();
    for &e in requests {
        let before = m.experts.stats().hits;
        m.experts.expert(0, e).unwrap();
        hit.push(m.experts.stats().hits > before);
    }
    (m.experts.stats(), hit)
}

#[test]
fn lru_and_lfru_choose_different_victims() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_copy("qwen35_moe_fused", tmp.path(), ExpertFormat::Bf16);
    let one = open_with(&dir, &options(0, Eviction::Lru, 0, false)).unwrap().experts.expert_bytes() as u64;
    // Room for two experts. Expert 0 is used three times, 1 once, then 2 needs room: LRU drops 0
    // (the least recent), LFRU drops 1 (the least used). Then 0 and 1 are asked for again.
    let pattern = [0, 0, 0, 1, 2, 0, 1];
    let (lru, lru_hits) = run(&dir, Eviction::Lru, 2 * one, &pattern);
    let (lfru, lfru_hits) = run(&dir, Eviction::Lfru, 2 * one, &pattern);
    assert_eq!(lru_hits, [false, true, true, false, false, false, false], "LRU: {lru:?}");
    assert_eq!(lfru_hits, [false, true, true, false, false, true, false], "LFRU: {lfru:?}");
    assert_eq!((lru.hits, lru.misses, lru.evictions), (2, 5, 3));
    assert_eq!((lfru.hits, lfru.misses, lfru.evictions), (3, 4, 2));
    for s in [&lru, &lfru] {
        assert_eq!(s.resident_experts, 2);
        assert!(s.peak_resident_bytes <= 2 * one);
    }
}

#[test]
fn lfru_keeps_the_hot_experts_under_a_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_copy("qwen35_moe_fused", tmp.path(), ExpertFormat::Bf16);
    let one = open_with(&dir, &options(0, Eviction::Lru, 0, false)).unwrap().experts.expert_bytes() as u64;
    // Two hot experts used between the two uses of each cold one of a scan over the other six,
    // with room for three: LFRU keeps the hot pair resident, LRU loses one of them every time.
    let mut pattern = vec![0, 1, 0, 1];
    for cold in 2..8 {
        pattern.extend([cold, 0, cold, 1]);
    }
    let (lru, _) = run(&dir, Eviction::Lru, 3 * one, &pattern);
    let (lfru, _) = run(&dir, Eviction::Lfru, 3 * one, &pattern);
    assert!(lfru.hits > lru.hits, "LFRU {lfru:?} vs LRU {lru:?}");
}

#[test]
fn budgets_below_one_expert_cache_nothing_and_still_serve() {
    let tmp = tempfile::tempdir().unwrap();
    for dir in [packed_copy("qwen3_moe", tmp.path(), ExpertFormat::Q8), hf_copy("qwen3_moe", tmp.path())] {
        let probe = open_with(&dir, &options(0, Eviction::Lfru, 0, true)).unwrap();
        let want = truth(&dir, &probe);
        let one = probe.experts.expert_bytes() as u64;
        for budget in [0, one - 1] {
            let m = open_with(&dir, &options(budget, Eviction::Lfru, 2, true)).unwrap();
            let (layers, experts) = (m.config.layers.len(), m.config.experts);
            for round in 0..2 {
                for l in 0..layers {
                    m.experts.prefetch(l, &(0..experts).collect::<Vec<_>>());
                    for e in 0..experts {
                        assert_eq!(bytes_of(&m.experts.expert(l, e).unwrap()), want[l][e], "{round} {l}/{e}");
                    }
                    let ids = [1, 0, 1, experts - 1];
                    for (x, &e) in m.experts.experts(l, &ids).unwrap().iter().zip(&ids) {
                        assert_eq!(bytes_of(x), want[l][e]);
                    }
                }
            }
            let s = m.experts.stats();
            let n = (2 * layers * (experts + 4)) as u64;
            assert_eq!((s.hits, s.resident_bytes, s.peak_resident_bytes, s.evictions), (0, 0, 0, 0), "{s:?}");
            assert_eq!(s.prefetches, 0, "no prefetch without room for what it reads");
            // Duplicate ids of one batch share a read.
            assert_eq!(s.misses + s.joined, n);
            assert_eq!(s.reads, s.misses, "{s:?}");
        }
    }
}
