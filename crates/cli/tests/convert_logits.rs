//! Converted models compute the same function as their sources, through the engine:
//! * a packed bf16 model gives the logits of its Hugging Face directory (relative L2 <= 1e-6);
//! * a packed q8/q4/q2 model gives the logits of its own weights dequantised and written back as
//!   an f32 Hugging Face directory (relative L2 <= 1e-5), so the quantised kernels compute the
//!   dequantised math;
//! * an MLX 4-bit directory, run directly, gives the logits of its weights dequantised (with the
//!   norms' baked `+1` removed) into a Hugging Face directory, and its q4 packing gives its logits;
//! * synthetic models of every preset's structure load and run.

#[path = "../../store/tests/mlx_common/mod.rs"]
mod mlx_common;

use mlx_common::{fixture, write_mlx};
use moe_core::{Family, WeightFormat};
use moe_engine::CpuBackend;
use moe_store::{DenseFormat, ExpertFormat, ModelFiles, SynthShape, write_packed, write_synthetic};
use safetensors::{Dtype, tensor::TensorView};
use std::path::Path;

const FIXTURES: [&str; 6] =
    ["qwen35_moe", "qwen35_moe_fused", "qwen35_moe_vl", "qwen3_next", "qwen3_moe", "qwen3_moe_untied"];

/// A prefill of 12 tokens then 4 decode steps, all logits concatenated (both kernel paths).
fn logits(dir: &Path) -> Vec<f32> {
    let model = moe_engine::load(dir, None, CpuBackend).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
    let mut s = model.new_session();
    let mut out =
        model.forward(&mut s, &[303, 211, 294, 53, 204, 372, 152, 505, 143, 177, 1, 2], true, false).unwrap().logits;
    for t in [500, 250, 7, 311] {
        out.extend(model.forward(&mut s, &[t], true, false).unwrap().logits);
    }
    assert!(out.iter().all(|v| v.is_finite()), "{}: non-finite logits", dir.display());
    out
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn pack(src: &Path, out: &Path, experts: ExpertFormat, dense: DenseFormat) {
    let files = moe_store::open(src).unwrap();
    write_packed(&files, out, experts, dense, false, &mut |_, _| {}).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `tensors` (name, shape, f32 values) and `config` as a Hugging Face directory.
fn write_hf(dir: &Path, config: &str, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(config).unwrap();
    let o = c.as_object_mut().unwrap();
    o.remove("quantization");
    o.remove("quantization_config");
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, s, v)| (n, s, f32_bytes(&v))).collect();
    let views: Vec<(String, TensorView)> =
        bytes.iter().map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

/// Every weight of `m` dequantised to f32, routed experts as per-expert tensors.
fn dequantised(m: &ModelFiles) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut out = Vec::new();
    for name in m.tensors.names() {
        let (shape, format) = m.tensors.stored_format(&name).unwrap();
        let values = match format {
            WeightFormat::Affine { .. } => m.tensors.matrix(&name, shape[0], shape[1]).unwrap().to_f32(),
            WeightFormat::Float(_) => m.tensors.tensor(&name).unwrap().values(&shape).unwrap(),
        };
        out.push((name, shape, values));
    }
    let c = &m.config;
    for l in 0..c.layers.len() {
        for e in 0..c.experts {
            let x = m.experts.expert(l, e).unwrap();
            for (proj, w) in [("gate_proj", &x.gate), ("up_proj", &x.up), ("down_proj", &x.down)] {
                out.push((format!("layers.{l}.mlp.experts.{e}.{proj}.weight"), vec![w.rows, w.cols], w.to_f32()));
            }
        }
    }
    out
}

#[test]
fn packed_bf16_gives_the_logits_of_its_hugging_face_directory() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let out = tmp.path().join(name);
        pack(&fixture(name), &out, ExpertFormat::Bf16, DenseFormat::Bf16);
        let err = rel_l2(&logits(&out), &logits(&fixture(name)));
        eprintln!("{name} bf16: relative L2 {err:.2e}");
        assert!(err <= 1e-6, "{name}: relative L2 {err:.3e}");
    }
}

#[test]
fn packed_quantised_gives_the_logits_of_its_dequantised_weights() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        for (experts, dense) in [
            (ExpertFormat::Q8, DenseFormat::Q8),
            (ExpertFormat::Q4, DenseFormat::Q8),
            (ExpertFormat::Q2, DenseFormat::Bf16),
        ] {
            let tag = format!("{name}-{}-{}", experts.name(), dense.name());
            let packed = tmp.path().join(&tag);
            pack(&fixture(name), &packed, experts, dense);
            let m = moe_store::open(&packed).unwrap();
            let hf = tmp.path().join(format!("{tag}-dequantised"));
            write_hf(&hf, &std::fs::read_to_string(packed.join("config.json")).unwrap(), dequantised(&m));
            let err = rel_l2(&logits(&packed), &logits(&hf));
            eprintln!("{tag}: relative L2 {err:.2e}");
            assert!(err <= 1e-5, "{tag}: relative L2 {err:.3e}");
        }
    }
}

#[test]
fn mlx_4bit_runs_as_its_dequantised_weights_and_packs_losslessly() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, lm) in [("qwen35_moe", true), ("qwen3_next", false), ("qwen3_moe", false)] {
        let m = write_mlx(&fixture(name), &tmp.path().join(format!("{name}-mlx")), 4, 32, lm);
        // The expected Hugging Face directory, built from what was written (not through the MLX
        // reader): dequantised matrices, norms without the +1, everything else as in the fixture.
        let hf = moe_store::open_hf(&fixture(name)).unwrap();
        let mut tensors = Vec::new();
        for t in hf.tensors.names() {
            let src = hf.tensors.tensor(&t).unwrap();
            let values = match (m.quantised.get(&t), m.unbaked.get(&t)) {
                (Some(q), _) => q.to_f32(),
                (None, Some(v)) => v.clone(),
                (None, None) => src.values(&src.shape).unwrap(),
            };
            tensors.push((t, src.shape.clone(), values));
        }
        for (l, layer) in m.experts.iter().enumerate() {
            for (proj, mats) in ["gate_proj", "up_proj", "down_proj"].into_iter().zip(layer) {
                for (e, w) in mats.iter().enumerate() {
                    tensors.push((
                        format!("layers.{l}.mlp.experts.{e}.{proj}.weight"),
                        vec![w.rows, w.cols],
                        w.to_f32(),
                    ));
                }
            }
        }
        let expected = tmp.path().join(format!("{name}-mlx-dequantised"));
        write_hf(&expected, &std::fs::read_to_string(fixture(name).join("config.json")).unwrap(), tensors);
        let direct = logits(&m.dir);
        let err = rel_l2(&direct, &logits(&expected));
        eprintln!("{name} MLX 4-bit vs its dequantised weights: relative L2 {err:.2e}");
        assert!(err <= 1e-5, "{name}: relative L2 {err:.3e}");
        if hf.config.family != Family::Qwen3Moe {
            assert!(!m.unbaked.is_empty());
        }

        let packed = tmp.path().join(format!("{name}-mlx-q4"));
        pack(&m.dir, &packed, ExpertFormat::Q4, DenseFormat::Q8);
        let err = rel_l2(&logits(&packed), &direct);
        eprintln!("{name} MLX 4-bit packed q4: relative L2 {err:.2e}");
        assert!(err <= 1e-6, "{name}: packed relative L2 {err:.3e}");
    }
}

#[test]
fn synthetic_models_of_every_preset_run() {
    let tmp = tempfile::tempdir().unwrap();
    for preset in SynthShape::PRESETS {
        let real = SynthShape::preset(preset).unwrap();
        let shape = real.miniature(16, real.top_k, 512);
        for (experts, dense) in [(ExpertFormat::Q4, DenseFormat::Q8), (ExpertFormat::Q2, DenseFormat::Bf16)] {
            let out = tmp.path().join(format!("{preset}-{}", experts.name()));
            write_synthetic(&shape, 4, experts, dense, &out, 3, false, &mut |_, _| {}).unwrap();
            let l = logits(&out);
            let spread = l.iter().fold(0f32, |a, v| a.max(v.abs()));
            assert!(spread > 1e-3 && spread < 1e3, "{preset}: logits up to {spread}");
        }
    }
}
