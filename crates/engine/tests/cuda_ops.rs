//! Every CUDA operation against the CPU backend on random inputs (relative error <= 1e-3).
//!
//! Without a GPU or CUDA driver each test prints "SKIPPED <test>: no CUDA device" to stderr
//! and returns; with `FLASH_MOE_REQUIRE_CUDA=1` (set by `scripts/gpu-check.sh`) a missing
//! device fails the test instead.

mod common;

use common::{Rng, gpu, pinned_expert, pinned_matrix};
use moe_core::format::f32_to_bf16_bits;
use moe_core::{Bytes, DType, Matrix, WeightFormat};
use moe_engine::backend::*;
use moe_engine::cuda_backend::CudaBackend;
use moe_engine::{Backend, CpuBackend};
use moe_store::{Budget, Expert, ExpertSource, StoreError};

const FORMATS: [WeightFormat; 6] = [
    WeightFormat::Float(DType::F32),
    WeightFormat::Float(DType::F16),
    WeightFormat::Float(DType::BF16),
    WeightFormat::Affine { bits: 8, group: 64 },
    WeightFormat::Affine { bits: 4, group: 64 },
    WeightFormat::Affine { bits: 2, group: 64 },
];

/// A random matrix stored in `format` (affine: random codes, scales and biases).
fn random_matrix(rng: &mut Rng, format: WeightFormat, rows: usize, cols: usize) -> Matrix {
    match format {
        WeightFormat::Float(d) => {
            let vals = rng.vec(rows * cols, 0.5);
            let bytes: Vec<u8> = match d {
                DType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                // Random f16 bit patterns: magnitudes 2^-7..1, some subnormals.
                DType::F16 => (0..vals.len())
                    .flat_map(|_| {
                        let r = rng.next_u32();
                        let exp = if r.is_multiple_of(17) { 0 } else { 8 + (r >> 5) % 7 };
                        (((r >> 31) << 15 | exp << 10 | (r >> 8) & 0x3ff) as u16).to_le_bytes()
                    })
                    .collect(),
                DType::BF16 => vals.iter().flat_map(|v| f32_to_bf16_bits(*v).to_le_bytes()).collect(),
            };
            Matrix::float(d, rows, cols, Bytes::from_vec(bytes))
        }
        WeightFormat::Affine { bits, group } => {
            let words = rows * cols * bits as usize / 32;
            let data: Vec<u8> = (0..words).flat_map(|_| rng.next_u32().to_le_bytes()).collect();
            let groups = rows * cols / group;
            let levels = ((1u32 << bits) - 1) as f32;
            let scales: Vec<u8> =
                (0..groups).flat_map(|_| f32_to_bf16_bits((0.2 + rng.f().abs()) / levels).to_le_bytes()).collect();
            let biases: Vec<u8> =
                (0..groups).flat_map(|_| f32_to_bf16_bits(-0.1 + 0.05 * rng.f()).to_le_bytes()).collect();
            Matrix {
                format,
                rows,
                cols,
                data: Bytes::from_vec(data),
                scales: Bytes::from_vec(scales),
                biases: Bytes::from_vec(biases),
            }
        }
    }
}

/// Largest absolute difference relative to the reference's largest magnitude, and the
/// relative L2 error.
fn errors(got: &[f32], want: &[f32]) -> (f64, f64) {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
    let max = got.iter().zip(want).fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
    (max / scale, (num / den).sqrt())
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert!(got.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let (max_rel, l2) = errors(got, want);
    println!("{what}: max error {max_rel:.2e} (relative to max |ref|), relative L2 {l2:.2e}");
    assert!(max_rel <= tol && l2 <= tol, "{what}: max error {max_rel:.3e}, relative L2 {l2:.3e} > {tol:e}");
}

const TOL: f64 = 1e-3;

#[test]
fn cuda_matmul_every_format() {
    let Some(g) = gpu("cuda_matmul_every_format", Budget::Auto) else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(1);
    // (rows, cols): aligned shapes take the vectorised path, odd float shapes the scalar one.
    // 4160 columns run the decode kernel's four-loads-in-flight loop and its tail.
    let shapes = [(130usize, 256usize), (1000, 512), (40, 4160), (7, 64), (33, 22), (5, 3)];
    for format in FORMATS {
        for &(rows, cols) in &shapes {
            if matches!(format, WeightFormat::Affine { .. }) && cols % 64 != 0 {
                continue;
            }
            let m = random_matrix(&mut rng, format, rows, cols);
            let (wc, wg) = (cpu.weight(&m).unwrap(), g.weight(&m).unwrap());
            for tokens in [1usize, 3, 8, 9, 70] {
                let x = rng.vec(tokens * cols, 1.0);
                let mut oc = cpu.zeros(tokens * rows);
                cpu.matmul(&wc, &x, tokens, &mut oc);
                let mut og = g.zeros(tokens * rows);
                g.matmul(&wg, &g.tensor(&x), tokens, &mut og);
                let what = format!("matmul {} {rows}x{cols} tokens {tokens}", format.name());
                assert_close(&what, &g.read(&og, tokens * rows), &oc, TOL);
            }
        }
    }
}

/// One token through a matrix tall enough for the bulk-copy kernel (on sm_90 its rows are copied
/// into shared memory; see `moe_cuda::BULK_MIN_ROWS`), with a last row group of one row.
#[test]
fn cuda_matvec_tall_matrix() {
    let Some(g) = gpu("cuda_matvec_tall_matrix", Budget::Auto) else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(2);
    let (rows, cols) = (moe_cuda::BULK_MIN_ROWS + 1, 512);
    for format in FORMATS {
        let m = random_matrix(&mut rng, format, rows, cols);
        let (wc, wg) = (cpu.weight(&m).unwrap(), g.weight(&m).unwrap());
        let x = rng.vec(cols, 1.0);
        let mut oc = cpu.zeros(rows);
        cpu.matmul(&wc, &x, 1, &mut oc);
        let mut og = g.zeros(rows);
        g.matmul(&wg, &g.tensor(&x), 1, &mut og);
        let what = format!("matvec {} {rows}x{cols}", format.name());
        assert_close(&what, &g.read(&og, rows), &oc, TOL);
    }
}

#[test]
fn cuda_embed_every_format() {
    let Some(g) = gpu("cuda_embed_every_format", Budget::Auto) else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(2);
    for format in FORMATS {
        let (rows, cols) = (50, 128);
        let m = random_matrix(&mut rng, format, rows, cols);
        let tokens = [0u32, 49, 7, 7, 23];
        let mut oc = cpu.zeros(tokens.len() * cols);
        cpu.embed(&cpu.weight(&m).unwrap(), &tokens, &mut oc);
        let mut og = g.zeros(tokens.len() * cols);
        g.embed(&g.weight(&m).unwrap(), &tokens, &mut og);
        let got = g.read(&og, tokens.len() * cols);
        assert_eq!(got, oc, "embed {} is not exact", format.name());
    }
}

#[test]
fn cuda_rms_norm_add() {
    let Some(g) = gpu("cuda_rms_norm_add", Budget::Auto) else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(3);
    for (width, rows, offset) in [(64usize, 5usize, 1.0f32), (4096, 3, 0.0), (17, 9, 1.0)] {
        let x = rng.vec(rows * width, 2.0);
        let w = rng.vec(width, 0.3);
        let mut oc = cpu.zeros(rows * width);
        cpu.rms_norm(&x, &w, offset, 1e-6, rows, &mut oc);
        let mut og = g.zeros(rows * width);
        g.rms_norm(&g.tensor(&x), &g.tensor(&w), offset, 1e-6, rows, &mut og);
        assert_close(&format!("rms_norm width {width} offset {offset}"), &g.read(&og, rows * width), &oc, TOL);

        // The residual add and the norm in one launch: the same sum as `add`, the same norm.
        let delta = rng.vec(rows * width, 1.0);
        let (mut xc, mut xg) = (x.clone(), g.tensor(&x));
        cpu.add_rms_norm(&mut xc, &delta, &w, width, offset, 1e-6, rows, &mut oc);
        g.add_rms_norm(&mut xg, &g.tensor(&delta), &g.tensor(&w), width, offset, 1e-6, rows, &mut og);
        assert_eq!(g.read(&xg, rows * width), xc, "add_rms_norm: the residual");
        assert_close(&format!("add_rms_norm width {width}"), &g.read(&og, rows * width), &oc, TOL);
    }

    let (a, b) = (rng.vec(1001, 1.0), rng.vec(1001, 1.0));
    let mut ac = a.clone();
    cpu.add(&mut ac, &b, 1000);
    let mut ag = g.tensor(&a);
    g.add(&mut ag, &g.tensor(&b), 1000);
    assert_eq!(g.read(&ag, 1001), ac, "add");
}

/// The greedy pick on the device (a key per block, merged by an atomic maximum) against the host's
/// argmax: ties to the lowest index, NaNs passed over, -0 equal to +0, nothing comparable -> 0.
#[test]
fn cuda_argmax() {
    let Some(g) = gpu("cuda_argmax", Budget::Auto) else { return };
    let mut rng = Rng(7);
    let mut cases: Vec<(String, Vec<f32>)> = Vec::new();
    for n in [1usize, 31, 1000, 248_320] {
        cases.push((format!("random {n}"), rng.vec(n, 30.0)));
    }
    let mut tied = rng.vec(248_320, 1.0);
    for i in [200_000, 7_000, 150_000] {
        tied[i] = 5.0;
    }
    cases.push(("ties far apart".into(), tied));
    let mut nan = rng.vec(5000, 1.0);
    nan[0] = f32::NAN;
    nan[4321] = f32::NAN;
    nan[17] = 3.0;
    cases.push(("NaNs".into(), nan));
    cases.push(("all NaN".into(), vec![f32::NAN; 300]));
    cases.push(("all -inf".into(), vec![f32::NEG_INFINITY; 300]));
    let mut zeros = vec![-1.0f32; 600];
    zeros[400] = 0.0;
    zeros[90] = -0.0;
    cases.push(("-0 before +0".into(), zeros));
    let mut inf = rng.vec(70_000, 1.0);
    inf[69_999] = f32::INFINITY;
    inf[3] = f32::INFINITY;
    cases.push(("+inf twice".into(), inf));
    for (what, v) in &cases {
        let want = moe_core::sample::argmax(v);
        // A longer buffer than the values: only the first `len` count.
        let mut padded = v.clone();
        padded.push(f32::INFINITY);
        assert_eq!(g.argmax(&g.tensor(&padded), v.len()), want, "argmax: {what}");
    }
}

/// Runs the same attention calls (chunks of new tokens) on both backends, with caches of `spare`
/// positions more than they take, and compares the outputs and the caches after each call.
fn attention_case(g: &CudaBackend, s: AttentionShape, chunks: &[usize], spare: usize, seed: u64) {
    let cpu = CpuBackend;
    let mut rng = Rng(seed);
    let total: usize = chunks.iter().sum();
    let (qw, kvw, ow) = (s.q_width(), s.kv_width(), s.out_width());
    let cap = total + spare;
    let (qn, kn) = (rng.vec(s.head_dim, 0.3), rng.vec(s.head_dim, 0.3));
    let mut cc = KvCache::<CpuBackend> { k: cpu.zeros(cap * kvw), v: cpu.zeros(cap * kvw), capacity: cap };
    let mut cg = KvCache::<CudaBackend> { k: g.zeros(cap * kvw), v: g.zeros(cap * kvw), capacity: cap };
    let (qng, kng) = (g.tensor(&qn), g.tensor(&kn));
    let mut past = 0;
    for &n in chunks {
        let (q, k, v) = (rng.vec(n * qw, 2.0), rng.vec(n * kvw, 2.0), rng.vec(n * kvw, 1.0));
        let mut oc = cpu.zeros(n * ow);
        cpu.attention(&s, &qn, &kn, &q, &k, &v, &mut cc, past, n, &mut oc);
        let mut og = g.zeros(n * ow);
        g.attention(&s, &qng, &kng, &g.tensor(&q), &g.tensor(&k), &g.tensor(&v), &mut cg, past, n, &mut og);
        let what = format!(
            "attention hd {} rot {} heads {}/{} gated {} past {past} tokens {n}",
            s.head_dim, s.rotary_dim, s.heads, s.kv_heads, s.gated
        );
        assert_close(&what, &g.read(&og, n * ow), &oc, TOL);
        past += n;
        assert_close(&format!("{what}: key cache"), &g.read(&cg.k, past * kvw), &cc.k[..past * kvw], TOL);
        assert_eq!(g.read(&cg.v, past * kvw), cc.v[..past * kvw], "{what}: value cache");
    }
}

#[test]
fn cuda_attention() {
    let Some(g) = gpu("cuda_attention", Budget::Auto) else { return };
    let shape = |heads, kv_heads, head_dim, rotary_dim, gated, norm_offset| AttentionShape {
        heads,
        kv_heads,
        head_dim,
        rotary_dim,
        rope_theta: 10_000_000.0,
        gated,
        norm_offset,
        eps: 1e-6,
    };
    // The fixtures' shapes: Qwen3.5 (gated, partial rotary, 1 + w norms) and Qwen3 (plain).
    attention_case(&g, shape(4, 2, 32, 8, true, 1.0), &[5, 1, 1, 4, 1], 3, 10);
    attention_case(&g, shape(4, 2, 16, 16, false, 0.0), &[7, 1, 3], 3, 11);
    // Real head sizes, a long prefill that spreads positions over all warps, then decode split
    // over blocks (the last one partly filled).
    attention_case(&g, shape(16, 2, 256, 64, true, 1.0), &[150, 1, 1], 3, 12);
    attention_case(&g, shape(8, 4, 128, 128, false, 0.0), &[300, 2], 3, 13);
    // Decode in a cache far larger than the context (blocks with no position, whose partial
    // results must not count), and the largest head.
    attention_case(&g, shape(16, 2, 256, 64, true, 1.0), &[600, 1, 1], 1500, 14);
    attention_case(&g, shape(4, 1, 512, 128, true, 1.0), &[70, 1, 1], 200, 15);
}

fn delta_case(g: &CudaBackend, s: DeltaNetShape, chunks: &[usize], seed: u64) {
    let cpu = CpuBackend;
    let mut rng = Rng(seed);
    let (cw, vw, nv, kk) = (s.conv_width(), s.value_width(), s.v_heads, s.conv_kernel);
    let conv = rng.vec(cw * kk, 0.5);
    let a_log: Vec<f32> = (0..nv).map(|_| rng.f() * 0.5).collect();
    let dt_bias = rng.vec(nv, 0.5);
    let norm = rng.vec(s.v_dim, 1.0);
    let (convg, alg, dtg, normg) = (g.tensor(&conv), g.tensor(&a_log), g.tensor(&dt_bias), g.tensor(&norm));
    let init_conv = rng.vec((kk - 1) * cw, 1.0);
    let init_ssm = rng.vec(s.state_len(), 0.1);
    let mut sc = DeltaNetState::<CpuBackend> { conv: init_conv.clone(), ssm: init_ssm.clone() };
    let mut sg = DeltaNetState::<CudaBackend> { conv: g.tensor(&init_conv), ssm: g.tensor(&init_ssm) };
    for &n in chunks {
        // Rows of q, k, v channels, z, then b and a.
        let proj: Vec<f32> =
            (0..n).flat_map(|_| [rng.vec(cw, 1.5), rng.vec(vw, 2.0), rng.vec(2 * nv, 2.0)].concat()).collect();
        let pc = DeltaNetParams::<CpuBackend> { conv: &conv, a_log: &a_log, dt_bias: &dt_bias, norm: &norm };
        let mut oc = cpu.zeros(n * vw);
        cpu.delta_net(&s, &pc, &proj, &mut sc, n, &mut oc);
        let pg = DeltaNetParams::<CudaBackend> { conv: &convg, a_log: &alg, dt_bias: &dtg, norm: &normg };
        let mut og = g.zeros(n * vw);
        g.delta_net(&s, &pg, &g.tensor(&proj), &mut sg, n, &mut og);
        let what = format!("delta_net k {}x{} v {}x{} tokens {n}", s.k_heads, s.k_dim, s.v_heads, s.v_dim);
        assert_close(&what, &g.read(&og, n * vw), &oc, TOL);
        assert_close(&format!("{what}: state"), &g.read(&sg.ssm, s.state_len()), &sc.ssm, TOL);
        assert_close(&format!("{what}: conv state"), &g.read(&sg.conv, (kk - 1) * cw), &sc.conv, TOL);
    }
}

#[test]
fn cuda_delta_net() {
    let Some(g) = gpu("cuda_delta_net", Budget::Auto) else { return };
    let shape = |k_heads, v_heads, k_dim, v_dim, conv_kernel| DeltaNetShape {
        k_heads,
        v_heads,
        k_dim,
        v_dim,
        conv_kernel,
        eps: 1e-6,
    };
    // The fixtures' shape, then real sizes (Qwen3.5: 128-dim heads, twice as many value heads).
    // From 16 tokens on, the chunked kernel runs: whole chunks of 32 and a partial last one,
    // value columns in partial blocks (72), key sizes off the warp width (40), and decays strong
    // enough over a chunk to underflow.
    delta_case(&g, shape(2, 4, 16, 16, 4), &[7, 1, 1, 3, 70, 1], 20);
    delta_case(&g, shape(2, 4, 128, 128, 4), &[20, 1, 2, 100, 1], 21);
    delta_case(&g, shape(1, 1, 40, 72, 2), &[5, 1, 33, 16], 22);
}

#[test]
fn cuda_expert_ffn() {
    let Some(g) = gpu("cuda_expert_ffn", Budget::Auto) else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(30);
    for format in [
        WeightFormat::Float(DType::BF16),
        WeightFormat::Affine { bits: 4, group: 64 },
        WeightFormat::Affine { bits: 2, group: 64 },
    ] {
        let (h, inter) = (128, 64);
        let (gate, up, down) = (
            random_matrix(&mut rng, format, inter, h),
            random_matrix(&mut rng, format, inter, h),
            random_matrix(&mut rng, format, h, inter),
        );
        let (gc, uc, dc) = (cpu.weight(&gate).unwrap(), cpu.weight(&up).unwrap(), cpu.weight(&down).unwrap());
        let (gg, ug, dg) = (g.weight(&gate).unwrap(), g.weight(&up).unwrap(), g.weight(&down).unwrap());
        for (tokens, rows) in [(1usize, vec![0u32]), (6, vec![0, 3, 4]), (20, (0..20).rev().collect::<Vec<u32>>())] {
            let x = rng.vec(tokens * h, 1.0);
            let acc0 = rng.vec(tokens * h, 1.0);
            let scales: Vec<f32> = rows.iter().map(|_| rng.f().abs()).collect();
            let mut ac = acc0.clone();
            cpu.expert_ffn(&gc, &uc, &dc, &x, &rows, &scales, &mut ac);
            let mut ag = g.tensor(&acc0);
            g.expert_ffn(&gg, &ug, &dg, &g.tensor(&x), &rows, &scales, &mut ag);
            let what = format!("expert_ffn {} tokens {tokens} rows {}", format.name(), rows.len());
            assert_close(&what, &g.read(&ag, tokens * h), &ac, TOL);
        }
    }
}

#[test]
fn cuda_buffers_and_errors() {
    let Some(g) = gpu("cuda_buffers_and_errors", Budget::Auto) else { return };
    let t = g.tensor(&[1.0, 2.0, 3.0]);
    assert_eq!(g.read(&t, 2), vec![1.0, 2.0]);
    let r = g.resized(&t, 2, 5);
    assert_eq!(g.read(&r, 5), vec![1.0, 2.0, 0.0, 0.0, 0.0]);
    assert_eq!(g.read(&g.zeros(0), 0), Vec::<f32>::new());
    let empty = g.resized(&g.zeros(0), 0, 4);
    assert_eq!(g.read(&empty, 4), vec![0.0; 4]);
    let err = CudaBackend::new(999).err().expect("ordinal 999 opened");
    assert!(err.to_string().contains("no GPU with ordinal 999"), "{err}");
    println!("{}", g.name());
}

/// Routed experts held in memory, as the model's expert store would give them: `in_ram` reports
/// them all resident (as a store's warmed RAM tier does), and `fetches` counts the experts asked
/// for.
struct MemoryExperts(Vec<Vec<Expert>>, bool, std::sync::atomic::AtomicUsize);

impl ExpertSource for MemoryExperts {
    fn expert(&self, layer: usize, expert: usize) -> Result<Expert, StoreError> {
        self.2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.0[layer][expert].clone())
    }
    fn layer_in_ram(&self, layer: usize) -> Option<Vec<Expert>> {
        self.1.then(|| self.0[layer].clone())
    }
    fn stats(&self) -> moe_store::StoreStats {
        let all = self.0.iter().map(Vec::len).sum::<usize>() as u64;
        moe_store::StoreStats { resident_experts: if self.1 { all } else { 0 }, ..Default::default() }
    }
    fn expert_bytes(&self) -> usize {
        self.0[0][0].byte_len()
    }
    fn total_bytes(&self) -> usize {
        self.0.iter().flatten().map(Expert::byte_len).sum()
    }
}

/// The decode path that routes on the device (top-k kernel, fused expert launches, shared expert),
/// against the host routing and per-expert CPU computation, for every format: with budget 0 (ids
/// copied back, every expert uploaded), with budget 0 and the experts in page-locked memory (read
/// by the kernels over the bus, nothing uploaded), the same with every expert in the store's RAM
/// (read through an address table of host memory, no expert asked for), and with every
/// expert resident in GPU memory (the address-table path); tied router logits go to the lower id
/// as on the host.
#[test]
fn cuda_routed_experts_on_device() {
    let cpu = CpuBackend;
    let mut rng = Rng(40);
    let (layers, experts, k, h, inter) = (2usize, 40usize, 6usize, 256usize, 128usize);
    for format in FORMATS {
        let store = MemoryExperts(
            (0..layers)
                .map(|_| {
                    (0..experts)
                        .map(|_| Expert {
                            gate: random_matrix(&mut rng, format, inter, h),
                            up: random_matrix(&mut rng, format, inter, h),
                            down: random_matrix(&mut rng, format, h, inter),
                        })
                        .collect()
                })
                .collect(),
            false,
            Default::default(),
        );
        for (budget, resident, in_pool, in_ram) in [
            (Budget::Bytes(0), false, false, false),
            (Budget::Bytes(0), false, true, false),
            (Budget::Bytes(0), false, true, true),
            (Budget::Auto, true, false, false),
        ] {
            let test = "cuda_routed_experts_on_device";
            let Some(g) = gpu(test, budget) else { return };
            let pool = g.gpu().pinned_pool();
            let pinned = |e: &Expert| Expert {
                gate: pinned_matrix(&pool, &e.gate),
                up: pinned_matrix(&pool, &e.up),
                down: pinned_matrix(&pool, &e.down),
            };
            let held;
            let store = if in_pool {
                let copy = |e: &Expert| if in_ram { pinned_expert(&pool, e) } else { pinned(e) };
                held = MemoryExperts(
                    store.0.iter().map(|l| l.iter().map(copy).collect()).collect(),
                    in_ram,
                    Default::default(),
                );
                &held
            } else {
                &store
            };
            if resident {
                for (l, layer) in store.0.iter().enumerate() {
                    for (e, ex) in layer.iter().enumerate() {
                        drop(g.expert_weights(l, e, || Ok(ex.clone())).unwrap());
                    }
                }
            }
            for norm in [true, false] {
                let routing = Routing { experts, top_k: k, norm_topk: norm, layers };
                for (layer, trial) in [(0usize, 0), (1, 1), (1, 2)] {
                    let mut logits = rng.vec(experts, 2.0);
                    if trial == 2 {
                        // A tie at the top: both go, the lower id first.
                        logits[17] = 9.0;
                        logits[5] = 9.0;
                    }
                    let x = rng.vec(h, 1.0);
                    let acc0 = rng.vec(h, 1.0);
                    let mut want = acc0.clone();
                    for (e, w) in moe_core::ops::route(&logits, k, norm) {
                        let ex = &store.0[layer][e];
                        let [gc, uc, dc] = [&ex.gate, &ex.up, &ex.down].map(|m| cpu.weight(m).unwrap());
                        cpu.expert_ffn(&gc, &uc, &dc, &x, &[0], &[w], &mut want);
                    }
                    let mut acc = g.tensor(&acc0);
                    let (gl, gx) = (g.tensor(&logits), g.tensor(&x));
                    let calls = std::cell::Cell::new(0);
                    let shared = |_: &mut _| calls.set(calls.get() + 1);
                    let before = g.vram_stats();
                    let fetched = store.2.load(std::sync::atomic::Ordering::Relaxed);
                    let used =
                        g.routed_experts_on_device(layer, &routing, 1, &gl, &gx, store, &shared, &mut acc).unwrap();
                    if in_ram {
                        let asked = store.2.load(std::sync::atomic::Ordering::Relaxed) - fetched;
                        assert_eq!(asked, 0, "experts in RAM: read through the layer's table, none asked for");
                    }
                    assert_eq!((used, calls.get()), (Some(k), 1), "experts used, shared expert queued once");
                    let after = g.vram_stats();
                    let hits = after.hits - before.hits;
                    assert_eq!(hits, if resident { k as u64 } else { 0 }, "{:?}", after);
                    // Pinned experts are read in place (their bytes cross the bus, nothing is uploaded);
                    // heap ones are uploaded through staging (with alignment padding).
                    let direct = after.direct_uploads - before.direct_uploads;
                    let crossed = after.bytes_uploaded - before.bytes_uploaded;
                    let bytes = (k * store.expert_bytes()) as u64;
                    assert_eq!(direct, 0, "no upload straight from pinned memory: read in place or staged");
                    match (resident, in_pool) {
                        (true, _) => assert_eq!(crossed, 0),
                        (false, true) => assert_eq!(crossed, bytes, "bytes read over the bus"),
                        (false, false) => assert!(crossed >= bytes, "{crossed} bytes uploaded < {bytes}"),
                    }
                    let what = format!(
                        "routed experts {} resident {resident} pinned {in_pool} norm {norm} trial {trial}",
                        format.name()
                    );
                    assert_close(&what, &g.read(&acc, h), &want, TOL);
                }
                // Several tokens (prefill): on the device only with every expert in GPU memory, routed
                // and grouped by expert there in chunks of at most 4096 (token, slot) pairs: 700
                // tokens take two.
                let tokens = if resident { 700 } else { 3 };
                let logits = rng.vec(tokens * experts, 2.0);
                let x = rng.vec(tokens * h, 1.0);
                let acc0 = rng.vec(tokens * h, 1.0);
                let mut want = acc0.clone();
                for t in 0..tokens {
                    for (e, w) in moe_core::ops::route(&logits[t * experts..(t + 1) * experts], k, norm) {
                        let ex = &store.0[1][e];
                        let [gc, uc, dc] = [&ex.gate, &ex.up, &ex.down].map(|m| cpu.weight(m).unwrap());
                        cpu.expert_ffn(&gc, &uc, &dc, &x, &[t as u32], &[w], &mut want);
                    }
                }
                let mut acc = g.tensor(&acc0);
                let calls = std::cell::Cell::new(0);
                let shared = |_: &mut _| calls.set(calls.get() + 1);
                let (gl, gx) = (g.tensor(&logits), g.tensor(&x));
                let used = g.routed_experts_on_device(1, &routing, tokens, &gl, &gx, store, &shared, &mut acc).unwrap();
                let what = format!(
                    "routed experts {} resident {resident} in RAM {in_ram} norm {norm}, {tokens} tokens",
                    format.name()
                );
                if resident {
                    assert_eq!((used, calls.get()), (Some(tokens * k), 1), "{what}: expert uses, shared expert once");
                    assert_close(&what, &g.read(&acc, tokens * h), &want, TOL);
                } else {
                    assert_eq!((used, calls.get()), (None, 0), "{what}: left to the host, nothing queued");
                }
            }
        }
    }
}

/// The gated shared expert (fused launches on the GPU) against the CPU. The wide shape gives the
/// gate/up launch more items than blocks and rows of several chunks per thread, for every format.
#[test]
fn cuda_shared_expert() {
    let Some(g) = gpu("cuda_shared_expert", Budget::Auto) else { return };
    let cpu = CpuBackend;
    let mut rng = Rng(41);
    for (format, (h, inter)) in FORMATS.into_iter().flat_map(|f| [(f, (192, 320)), (f, (2112, 1088))]) {
        let ms = [
            random_matrix(&mut rng, format, inter, h),
            random_matrix(&mut rng, format, inter, h),
            random_matrix(&mut rng, format, h, inter),
        ];
        let [gc, uc, dc] = ms.each_ref().map(|m| cpu.weight(m).unwrap());
        let [gg, ug, dg] = ms.each_ref().map(|m| g.weight(m).unwrap());
        for tokens in [1usize, 3] {
            let x = rng.vec(tokens * h, 1.0);
            let logit = rng.vec(tokens, 2.0);
            let acc0 = rng.vec(tokens * h, 1.0);
            let mut want = acc0.clone();
            cpu.shared_expert(&gc, &uc, &dc, &logit, &x, tokens, &mut want);
            let mut acc = g.tensor(&acc0);
            g.shared_expert(&gg, &ug, &dg, &g.tensor(&logit), &g.tensor(&x), tokens, &mut acc);
            let what = format!("shared expert {} {h}x{inter} tokens {tokens}", format.name());
            assert_close(&what, &g.read(&acc, tokens * h), &want, TOL);
        }
    }
}
