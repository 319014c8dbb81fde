//! The GPU-memory tier of routed experts (`--vram-budget`): whole-model logits are identical
//! whatever the budget (0: upload every use; three experts: constant eviction; 1 GiB: everything
//! stays; a prefill with every expert resident runs on the device, equal up to rounding); each
//! expert lives in one tier (GPU memory or RAM, evicted ones copied back to RAM); and hits, misses
//! and evictions follow the policy (least used first, ties to the least recent) on a crafted
//! sequence, with every handle's matrices computing what the CPU computes.
//!
//! Without a GPU or CUDA driver each test prints "SKIPPED <test>: no CUDA device" to stderr
//! and returns; with `FLASH_MOE_REQUIRE_CUDA=1` a missing device fails instead. The fixtures are
//! found through `FLASH_MOE_FIXTURES`, else relative to this crate's source, else `tests/fixtures`
//! under the working directory (test binaries carried to another machine).

mod common;

use common::{Rng, fixture, gpu, q4, rel_l2};
use moe_engine::backend::*;
use moe_engine::cuda_backend::CudaBackend;
use moe_engine::{CpuBackend, Model};
use moe_store::Budget;
use std::cell::Cell;

/// Token ids of a fixed pseudo-random sequence.
fn tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 7919 + 13) % vocab as u32).collect()
}

/// Logits of: a prefill of all `ids`, decoding them one at a time, and the prefill again;
/// with the expert uses of each of the three passes.
fn passes(model: &Model<CudaBackend>, ids: &[u32]) -> (Vec<Vec<f32>>, [usize; 3], [VramCounts; 3]) {
    let mut logits = Vec::new();
    let mut uses = [0; 3];
    let mut counts = [VramCounts::default(); 3];
    for pass in 0..3 {
        let before = VramCounts::of(model);
        let mut s = model.new_session();
        if pass == 1 {
            let mut all = Vec::new();
            for &t in ids {
                all.extend(model.forward(&mut s, &[t], true, false).unwrap().logits);
            }
            logits.push(all);
        } else {
            logits.push(model.forward(&mut s, ids, true, false).unwrap().logits);
        }
        uses[pass] = model.take_profile().expert_uses;
        counts[pass] = VramCounts::of(model).minus(before);
    }
    (logits, uses, counts)
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct VramCounts {
    hits: u64,
    misses: u64,
    uploaded: u64,
}

impl VramCounts {
    fn of(m: &Model<CudaBackend>) -> Self {
        let s = m.backend().vram_stats();
        VramCounts { hits: s.hits, misses: s.misses, uploaded: s.bytes_uploaded }
    }
    fn minus(self, o: Self) -> Self {
        VramCounts { hits: self.hits - o.hits, misses: self.misses - o.misses, uploaded: self.uploaded - o.uploaded }
    }
}

fn identical_across_budgets(test: &str, name: &str) {
    let Some(g) = gpu(test, Budget::Bytes(0)) else { return };
    let dir = fixture(name);
    let model: Model<CudaBackend> = moe_engine::load(&dir, None, g).unwrap();
    let ids = tokens(40, model.config.vocab);

    // Budget 0: every use a miss, nothing kept.
    let (base, uses, counts) = passes(&model, &ids);
    for (c, &u) in counts.iter().zip(&uses) {
        assert_eq!((c.hits, c.misses), (0, u as u64), "{name}: budget 0 must upload every use");
    }
    let s = model.backend().vram_stats();
    assert_eq!((s.resident_experts, s.resident_bytes, s.budget), (0, 0, Some(0)));
    let expert_bytes = counts[0].uploaded / counts[0].misses;
    let cpu: Model<CpuBackend> = moe_engine::load(&dir, None, CpuBackend).unwrap();
    let want = cpu.forward(&mut cpu.new_session(), &ids, true, false).unwrap().logits;
    let err = rel_l2(&base[0], &want);
    assert!(err <= 1e-3, "{name}: budget-0 logits off the CPU's by {err:.3e}");

    // Three experts: constant eviction; the same logits to the bit.
    let tiny = 3 * expert_bytes;
    model.backend().set_vram_budget(Budget::Bytes(tiny)).unwrap();
    let (got, _, counts) = passes(&model, &ids);
    assert_eq!(got, base, "{name}: logits with a VRAM budget of three experts differ from budget 0");
    let s = model.backend().vram_stats();
    assert!(s.resident_experts <= 3 && s.resident_bytes <= tiny, "{name}: {s:?} over the budget");
    assert!(s.evictions > 0, "{name}: a budget of three experts evicted nothing: {s:?}");
    assert!(counts.iter().all(|c| c.misses > 0), "{name}: {counts:?}");
    println!("{name}: tiny budget ({tiny} bytes): {counts:?}, {s:?}");
    // Each expert in one tier: those in GPU memory were released from RAM, the evicted ones came
    // back to RAM from the device (and, read back from there, gave the same logits above).
    let (ram, c) = (model.experts().stats(), &model.config);
    assert!(ram.released > 0 && ram.adopted > 0, "{name}: {ram:?}");
    for l in 0..c.layers.len() {
        for e in 0..c.experts {
            let (vram, in_ram) = (model.backend().has_expert(l, e), model.experts().is_resident(l, e));
            assert!(!(vram && in_ram), "{name}: expert {e} of layer {l} in GPU memory and in RAM");
        }
    }

    // 1 GiB: the first pass uploads each (layer, expert) once, the third pass (the first again)
    // hits every time.
    model.backend().set_vram_budget(Budget::Bytes(0)).unwrap();
    model.backend().set_vram_budget(Budget::Bytes(1 << 30)).unwrap();
    model.backend().reset_vram_stats();
    let (got, uses, counts) = passes(&model, &ids);
    assert_eq!(got[..2], base[..2], "{name}: logits with a 1 GiB VRAM budget differ from budget 0");
    // The third pass finds every expert resident if the model has few enough, and its prefill
    // then routes on the device (fused kernels per token: the same values, summed in another
    // order) instead of on the host.
    let err = rel_l2(&got[2], &base[2]);
    assert!(err <= 1e-5, "{name}: prefill with every expert resident off budget 0's by {err:.3e}");
    let s = model.backend().vram_stats();
    assert_eq!(counts[0], VramCounts { hits: 0, misses: uses[0] as u64, uploaded: uses[0] as u64 * expert_bytes });
    assert_eq!(counts[2], VramCounts { hits: uses[2] as u64, misses: 0, uploaded: 0 }, "{name}: replay must hit");
    assert_eq!(s.evictions, 0);
    assert_eq!(s.resident_bytes, s.resident_experts as u64 * expert_bytes);
    let layers = model.config.layers.len();
    assert!(s.resident_experts <= layers * model.config.experts);
    for l in 0..layers {
        let resident = (0..model.config.experts).filter(|&e| model.backend().has_expert(l, e)).count();
        assert!(resident > 0, "{name}: nothing of layer {l} resident");
    }
    println!("{name}: 1 GiB budget: {counts:?}, {s:?}; {}", model.backend().name());
}

#[test]
fn cuda_vram_logits_identical_qwen35_moe() {
    identical_across_budgets("cuda_vram_logits_identical_qwen35_moe", "qwen35_moe");
}

#[test]
fn cuda_vram_logits_identical_qwen3_moe() {
    identical_across_budgets("cuda_vram_logits_identical_qwen3_moe", "qwen3_moe");
}

#[test]
fn cuda_vram_hits_misses_and_evictions() {
    let test = "cuda_vram_hits_misses_and_evictions";
    let Some(g) = gpu(test, Budget::Bytes(0)) else { return };
    // Experts of 2.5 MiB (q4, hidden 1024, intermediate 1536): staging copies go over threads.
    let (h, inter) = (1024, 1536);
    let mut rng = Rng(7);
    let keys = [(0, 0), (0, 1), (1, 0), (1, 1)];
    let experts: Vec<moe_store::Expert> = keys
        .iter()
        .map(|_| moe_store::Expert {
            gate: q4(&mut rng, inter, h),
            up: q4(&mut rng, inter, h),
            down: q4(&mut rng, h, inter),
        })
        .collect();
    let bytes = experts[0].byte_len() as u64;
    assert_eq!(bytes % 256, 0, "parts without alignment padding, so uploaded bytes are exact");
    g.set_vram_budget(Budget::Bytes(3 * bytes)).unwrap();

    let tokens = 3;
    let x: Vec<f32> = (0..tokens * h).map(|_| rng.f()).collect();
    let xg = g.tensor(&x);
    let rows = [0u32, 2];
    let scales = [0.7f32, 0.4];
    let fetches = Cell::new(0);
    // a a a b c d b a d c, with a..d = keys 0..3 and room for three.
    let sequence = [0usize, 0, 0, 1, 2, 3, 1, 0, 3, 2];
    let expect_hit = [false, true, true, false, false, false, false, true, true, false];
    for (step, (&k, &hit)) in sequence.iter().zip(&expect_hit).enumerate() {
        let (layer, id) = keys[k];
        assert_eq!(g.has_expert(layer, id), hit, "step {step}: residency of key {k}");
        let before = g.vram_stats();
        let w = g
            .expert_weights(layer, id, || {
                fetches.set(fetches.get() + 1);
                Ok(experts[k].clone())
            })
            .unwrap();
        let after = g.vram_stats();
        assert_eq!(after.hits - before.hits, hit as u64, "step {step}: key {k} hit?");
        assert_eq!(after.bytes_uploaded - before.bytes_uploaded, if hit { 0 } else { bytes }, "step {step}");
        // The handle's matrices compute what the CPU computes with the expert it was asked for.
        let [gw, uw, dw] = w.matrices();
        let mut acc = g.zeros(tokens * h);
        g.expert_ffn(gw, uw, dw, &xg, &rows, &scales, &mut acc);
        drop(w);
        let e = &experts[k];
        let mut want = vec![0.0; tokens * h];
        CpuBackend.expert_ffn(&e.gate, &e.up, &e.down, &x, &rows, &scales, &mut want);
        let err = rel_l2(&g.read(&acc, tokens * h), &want);
        assert!(err <= 1e-3, "step {step}: key {k}'s expert computes off the CPU by {err:.3e}");
    }
    let s = g.vram_stats();
    assert_eq!((s.hits, s.misses, s.evictions), (4, 6, 3), "{s:?}");
    assert_eq!(fetches.get(), 6, "a hit must not fetch from the store");
    assert_eq!((s.resident_experts, s.resident_bytes, s.bytes_uploaded), (3, 3 * bytes, 6 * bytes));
    let resident: Vec<bool> = keys.iter().map(|&(l, e)| g.has_expert(l, e)).collect();
    assert_eq!(resident, [true, false, true, true], "a, c, d stay (b: fewest uses, least recent)");

    // Shrinking evicts; budget 0 keeps nothing and still computes.
    g.set_vram_budget(Budget::Bytes(bytes)).unwrap();
    let s = g.vram_stats();
    assert_eq!((s.resident_experts, s.evictions), (1, 5));
    assert!(g.has_expert(0, 0), "the most used stays");
    g.set_vram_budget(Budget::Bytes(0)).unwrap();
    assert_eq!(g.vram_stats().resident_experts, 0);
    g.reset_vram_stats();
    for _ in 0..2 {
        let w = g.expert_weights(0, 0, || Ok(experts[0].clone())).unwrap();
        let [gw, uw, dw] = w.matrices();
        let mut acc = g.zeros(tokens * h);
        g.expert_ffn(gw, uw, dw, &xg, &rows, &scales, &mut acc);
        drop(w);
        let mut want = vec![0.0; tokens * h];
        let e = &experts[0];
        CpuBackend.expert_ffn(&e.gate, &e.up, &e.down, &x, &rows, &scales, &mut want);
        assert!(rel_l2(&g.read(&acc, tokens * h), &want) <= 1e-3);
    }
    let s = g.vram_stats();
    assert_eq!((s.hits, s.misses, s.bytes_uploaded, s.resident_experts), (0, 2, 2 * bytes, 0));

    // `auto` resolves to free memory less the headroom.
    g.set_vram_budget(Budget::Auto).unwrap();
    let (free, _) = g.gpu().memory().unwrap();
    let auto = g.vram_stats().budget.unwrap();
    assert!(auto + moe_cuda::VRAM_HEADROOM <= free as u64 + (64 << 20), "auto {auto} vs free {free}");
    println!("{test}: auto budget {auto} bytes of {free} free; {}", g.name());
}

/// A VRAM budget larger than the GPU fails at load with the budget that would fit, which then
/// loads.
#[test]
fn cuda_vram_budget_too_big_says_what_fits() {
    let test = "cuda_vram_budget_too_big_says_what_fits";
    let Some(g) = gpu(test, Budget::Bytes(1 << 50)) else { return };
    let dir = fixture("qwen35_moe");
    let err = moe_engine::load(&dir, None, g).err().expect("a 1 PiB budget loaded").to_string();
    assert!(err.contains("out of GPU memory") && err.contains("would fit"), "{err}");
    let fits: Budget = err.split("--vram-budget ").nth(2).and_then(|s| s.split(' ').next()).unwrap().parse().unwrap();
    let Some(g) = gpu(test, fits) else { return };
    moe_engine::load(&dir, None, g).unwrap_or_else(|e| panic!("the suggested budget {fits} failed: {e:#}"));
}
