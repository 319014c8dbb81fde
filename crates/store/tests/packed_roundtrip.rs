//! Packing an in-memory model and reading it back: bit-exact bf16, quantised experts and dense
//! tensors equal to `quantize` of the source, the manifest, `store::open` dispatch.

mod packed_common;

use moe_core::quant::{quantize, requantize_q2_from_q4};
use moe_core::{DType, Matrix, ModelConfig, WeightFormat};
use moe_store::manifest::{Manifest, TensorFormat};
use moe_store::{DenseFormat, ExpertFormat, MANIFEST_FILE, ModelFiles, open, open_packed, verify_packed, write_packed};
use packed_common::*;
use std::path::Path;

fn pack(src: &ModelFiles, out: &Path, e: ExpertFormat, d: DenseFormat) -> ModelFiles {
    write_packed(src, out, e, d, false, &mut no_progress()).unwrap();
    verify_packed(out).unwrap();
    open_packed(out).unwrap()
}

fn manifest(dir: &Path) -> Manifest {
    let p = dir.join(MANIFEST_FILE);
    Manifest::parse(&p, &std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn assert_same_matrix(a: &Matrix, b: &Matrix, what: &str) {
    assert_eq!(a.format, b.format, "{what}: format");
    assert_eq!((a.rows, a.cols), (b.rows, b.cols), "{what}: shape");
    assert_eq!(&a.data[..], &b.data[..], "{what}: data");
    assert_eq!(&a.scales[..], &b.scales[..], "{what}: scales");
    assert_eq!(&a.biases[..], &b.biases[..], "{what}: biases");
}

#[test]
fn bf16_packing_round_trips_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    let out = tmp.path().join("packed");
    let p = pack(&src, &out, ExpertFormat::Bf16, DenseFormat::Bf16);

    assert_eq!(p.config, src.config);
    assert_eq!(p.tensors.names(), src.tensors.names());
    assert_eq!(p.tensors.dense_bytes(), src.tensors.dense_bytes());
    for name in src.tensors.names() {
        let (a, b) = (src.tensors.tensor(&name).unwrap(), p.tensors.tensor(&name).unwrap());
        assert_eq!((a.dtype, &a.shape), (b.dtype, &b.shape), "{name}");
        assert_eq!(&a.data[..], &b.data[..], "{name}");
        assert!(p.tensors.contains(&name));
    }
    assert!(!p.tensors.contains("layers.0.mlp.experts.0.gate_proj.weight"));
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            let (a, b) = (src.experts.expert(l, e).unwrap(), p.experts.expert(l, e).unwrap());
            assert_same_matrix(&a.gate, &b.gate, "gate");
            assert_same_matrix(&a.up, &b.up, "up");
            assert_same_matrix(&a.down, &b.down, "down");
        }
    }
    assert_eq!(p.experts.expert_bytes(), 3 * INTER * HIDDEN * 2);
    assert_eq!(p.experts.total_bytes(), LAYERS * EXPERTS * 3 * INTER * HIDDEN * 2);
    assert!(p.experts.expert(LAYERS, 0).is_err());
    assert!(p.experts.expert(0, EXPERTS).is_err());

    // The config travels verbatim, both as a file and inside the manifest.
    assert_eq!(std::fs::read_to_string(out.join("config.json")).unwrap(), CONFIG);
    assert!(out.join("tokenizer.json").is_file());
    let m = manifest(&out);
    assert_eq!(ModelConfig::from_json(&m.config.to_string()).unwrap(), src.config);
    assert_eq!((m.format.as_str(), m.version, m.family.as_str()), ("flash-moe-packed", 1, "qwen3_moe"));
    assert!(m.experts.stride.is_multiple_of(4096));
    assert_eq!(m.experts.files[1].file.path, "experts/layer_001.bin");
    assert_eq!(std::fs::metadata(out.join("experts/layer_001.bin")).unwrap().len(), EXPERTS as u64 * m.experts.stride);

    // `open` picks the packed reader when there is a manifest.
    let again = open(&out).unwrap();
    assert_eq!(again.tensors.names(), src.tensors.names());
    assert_eq!(tmp.path().read_dir().unwrap().count(), 2, "no temporary directory left behind");
}

#[test]
fn quantised_experts_equal_quantize_of_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    for (fmt, bits) in [(ExpertFormat::Q8, 8), (ExpertFormat::Q4, 4), (ExpertFormat::Q2, 2)] {
        let out = tmp.path().join(format!("packed-{bits}"));
        let p = pack(&src, &out, fmt, DenseFormat::Bf16);
        // gate/up rows are 64 wide (group 64); down rows 32 wide fall back to group 32.
        let m = manifest(&out);
        assert_eq!(m.experts.gate.format, TensorFormat::Affine { bits, group: 64 });
        assert_eq!(m.experts.down.format, TensorFormat::Affine { bits, group: 32 });
        for l in 0..LAYERS {
            for e in 0..EXPERTS {
                let (a, b) = (src.experts.expert(l, e).unwrap(), p.experts.expert(l, e).unwrap());
                for (x, y, group, what) in
                    [(&a.gate, &b.gate, 64, "gate"), (&a.up, &b.up, 64, "up"), (&a.down, &b.down, 32, "down")]
                {
                    let want = quantize(&x.to_f32(), x.rows, x.cols, bits, group);
                    assert_same_matrix(y, &want, &format!("q{bits} layer {l} expert {e} {what}"));
                }
            }
        }
        // Dense tensors untouched by the expert format.
        let t = p.tensors.tensor("layers.1.self_attn.q_proj.weight").unwrap();
        assert_eq!(&t.data[..], &src.tensors.tensor("layers.1.self_attn.q_proj.weight").unwrap().data[..]);
    }
}

#[test]
fn dense_q8_equals_quantize_of_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    let out = tmp.path().join("packed");
    let p = pack(&src, &out, ExpertFormat::Q4, DenseFormat::Q8);
    let m = manifest(&out);
    assert_eq!(m.dense.format, "q8");
    for name in src.tensors.names() {
        let a = src.tensors.tensor(&name).unwrap();
        let format = m.dense.tensors.iter().find(|t| t.name == name).unwrap().format;
        let keeps = name.contains("norm") || name.contains("A_log") || name == "layers.1.odd_proj.weight";
        if keeps {
            // Norms and A_log keep their dtype; a matrix no group divides stays bf16.
            let b = p.tensors.tensor(&name).unwrap();
            assert_eq!((b.dtype, &b.data[..]), (a.dtype, &a.data[..]), "{name}");
            assert!(matches!(format, TensorFormat::Float { .. }), "{name}");
            continue;
        }
        let (rows, cols) = (a.shape[0], a.shape[1]);
        let group = if cols.is_multiple_of(64) { 64 } else { 32 };
        assert_eq!(format, TensorFormat::Affine { bits: 8, group }, "{name}");
        let got = p.tensors.matrix(&name, rows, cols).unwrap();
        let want = quantize(&a.matrix(rows, cols).unwrap().to_f32(), rows, cols, 8, group);
        assert_same_matrix(&got, &want, &name);
        let err = p.tensors.tensor(&name).unwrap_err().to_string();
        assert!(err.contains("matrix"), "{err}");
        assert!(p.tensors.matrix(&name, rows + 1, cols).is_err());
    }
    assert_eq!(
        m.dense.tensors.iter().find(|t| t.name == "layers.0.linear_attn.A_log").unwrap().format,
        TensorFormat::Float { dtype: moe_store::manifest::FloatDType::F32 }
    );
    assert_eq!(p.tensors.tensor("layers.0.linear_attn.A_log").unwrap().dtype, DType::F32);
    // Float matrices still come through `matrix` too.
    let norm = p.tensors.matrix("layers.1.odd_proj.weight", 8, 48).unwrap();
    assert_eq!(norm.format, WeightFormat::Float(DType::BF16));
    // The dense file is smaller than the source's bf16.
    assert!(p.tensors.dense_bytes() < src.tensors.dense_bytes());
}

#[test]
fn q2_from_a_q4_source_follows_the_flash_moe_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    let q4_dir = tmp.path().join("q4");
    let q4 = pack(&src, &q4_dir, ExpertFormat::Q4, DenseFormat::Q8);
    // Re-pack the packed q4 model (its experts and dense matrices are affine) to q2.
    let q2_dir = tmp.path().join("q2");
    let q2 = pack(&q4, &q2_dir, ExpertFormat::Q2, DenseFormat::Q8);
    for l in 0..LAYERS {
        for e in 0..EXPERTS {
            let (a, b) = (q4.experts.expert(l, e).unwrap(), q2.experts.expert(l, e).unwrap());
            assert_same_matrix(&b.gate, &requantize_q2_from_q4(&a.gate), "gate");
            assert_same_matrix(&b.up, &requantize_q2_from_q4(&a.up), "up");
            assert_same_matrix(&b.down, &requantize_q2_from_q4(&a.down), "down");
        }
    }
    // Already-q8 dense matrices are copied as they are.
    let (a, b) = (
        q4.tensors.matrix("lm_head.weight", 96, HIDDEN).unwrap(),
        q2.tensors.matrix("lm_head.weight", 96, HIDDEN).unwrap(),
    );
    assert_same_matrix(&a, &b, "lm_head");
    // The config comes from the packed source's manifest (and its copied config.json).
    assert_eq!(q2.config, src.config);
}

#[test]
fn progress_counts_up_to_the_total() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    let mut calls = Vec::new();
    write_packed(&src, &tmp.path().join("packed"), ExpertFormat::Q4, DenseFormat::Bf16, false, &mut |d, t| {
        calls.push((d, t))
    })
    .unwrap();
    let total = calls[0].1;
    assert!(calls.len() > LAYERS * EXPERTS);
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0 && w[1].1 == total));
    assert_eq!(calls.last().unwrap().0, total);
}
