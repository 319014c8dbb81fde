//! Many threads sharing one expert store with a budget of a few experts: single and batch requests
//! and prefetches of random (layer, expert) ids, every expert checked against the file's bytes,
//! the budget checked by a watcher the whole time.

#[path = "store_common.rs"]
mod common;

use common::*;
use moe_store::{Eviction, ExpertFormat, ExpertSource, open_with};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;

fn hammer(dir: &Path, eviction: Eviction, budget_experts: u64, seed: u64) {
    let probe = open_with(dir, &options(0, eviction, 0, true)).unwrap();
    let want = truth(dir, &probe);
    let (layers, experts) = (probe.config.layers.len(), probe.config.experts);
    // With O_DIRECT a read buffer is the record rounded up to 4 KiB; the budget counts buffers.
    let buf = probe.experts.expert_bytes().next_multiple_of(4096) as u64;
    let budget = budget_experts * buf;
    drop(probe);

    let m = open_with(dir, &options(budget, eviction, 3, true)).unwrap();
    let store: Arc<dyn ExpertSource> = m.experts.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (store, stop) = (store.clone(), stop.clone());
        thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let s = store.stats();
                assert!(s.resident_bytes <= budget, "{} resident bytes over the budget of {budget}", s.resident_bytes);
                assert!(s.peak_resident_bytes <= budget, "peak {} over the budget of {budget}", s.peak_resident_bytes);
                samples += 1;
                thread::yield_now();
            }
            samples
        })
    };
    let requested = Arc::new(AtomicU64::new(0));
    let want = Arc::new(want);
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let (store, want, requested) = (store.clone(), want.clone(), requested.clone());
            thread::spawn(move || {
                let mut rng = Rng(seed + 977 * t as u64 + 1);
                // Experts kept a while, so that buffers evicted meanwhile stay in use.
                let mut held = Vec::new();
                for _ in 0..300 {
                    let layer = rng.below(layers);
                    match rng.below(10) {
                        0..5 => {
                            let e = rng.below(experts);
                            let x = store.expert(layer, e).unwrap();
                            assert_eq!(bytes_of(&x), want[layer][e], "layer {layer} expert {e}");
                            requested.fetch_add(1, Ordering::Relaxed);
                            held.push((layer, e, x));
                        }
                        5..8 => {
                            let ids: Vec<usize> = (0..1 + rng.below(5)).map(|_| rng.below(experts)).collect();
                            let xs = store.experts(layer, &ids).unwrap();
                            assert_eq!(xs.len(), ids.len());
                            for (&e, x) in ids.iter().zip(&xs) {
                                assert_eq!(bytes_of(x), want[layer][e], "batch: layer {layer} expert {e}");
                            }
                            requested.fetch_add(ids.len() as u64, Ordering::Relaxed);
                        }
                        _ => {
                            let ids: Vec<usize> = (0..1 + rng.below(4)).map(|_| rng.below(experts)).collect();
                            store.prefetch(layer, &ids);
                        }
                    }
                    if held.len() > 6 {
                        let (l, e, x) = held.remove(rng.below(held.len()));
                        assert_eq!(bytes_of(&x), want[l][e], "held: layer {l} expert {e}");
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.join().unwrap();
    assert!(samples > 0);

    let s = store.stats();
    eprintln!("{}: {eviction}, budget {budget_experts} experts, {samples} budget samples\n{s}", dir.display());
    assert_eq!(s.hits + s.misses + s.joined, requested.load(Ordering::Relaxed), "{s:?}");
    assert!(s.resident_bytes <= budget && s.peak_resident_bytes <= budget, "{s:?}");
    assert!(s.evictions > 0, "a budget of {budget_experts} experts must evict: {s:?}");
    assert!(s.reads >= s.misses, "{s:?}");
    assert_eq!(s.budget_bytes, budget);
}

#[test]
fn many_threads_get_the_file_bytes_and_the_budget_holds_packed() {
    let tmp = tempfile::tempdir().unwrap();
    let bf16 = packed_copy("qwen35_moe_fused", tmp.path(), ExpertFormat::Bf16);
    let q4 = packed_copy("qwen35_moe", tmp.path(), ExpertFormat::Q4);
    hammer(&bf16, Eviction::Lfru, 3, 1);
    hammer(&bf16, Eviction::Lru, 3, 2);
    hammer(&q4, Eviction::Lfru, 2, 3);
}

#[test]
fn many_threads_get_the_file_bytes_and_the_budget_holds_hf() {
    let tmp = tempfile::tempdir().unwrap();
    hammer(&hf_copy("qwen35_moe_fused", tmp.path()), Eviction::Lfru, 3, 4);
    hammer(&hf_copy("qwen35_moe", tmp.path()), Eviction::Lru, 3, 5);
}
