//! mlx-community sources: detection, the reader's Hugging Face view (quantised matrices zero copy,
//! norms without the baked `+1`, conv1d as `[C, 1, K]`), and conversion of MLX 4-bit experts to
//! q4 as a bit-for-bit re-layout (and to q2 by flash-moe's rule).

mod mlx_common;

use mlx_common::{MlxModel, fixture, parts, write_mlx};
use moe_core::quant::requantize_q2_from_q4;
use moe_core::{DType, WeightFormat};
use moe_store::manifest::{Manifest, TensorFormat};
use moe_store::{DenseFormat, ExpertFormat, is_mlx_dir, open, open_hf, verify_packed, write_packed};
use std::path::Path;

/// (fixture, names under `language_model.`?)
const SOURCES: [(&str, bool); 3] = [("qwen35_moe", true), ("qwen3_next", false), ("qwen3_moe", false)];

fn mlx(name: &str, lm: bool, tmp: &Path) -> MlxModel {
    write_mlx(&fixture(name), &tmp.join(format!("{name}-mlx")), 4, 32, lm)
}

fn manifest(dir: &Path) -> Manifest {
    let path = dir.join("manifest.json");
    Manifest::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn mlx_dirs_are_detected_and_read_with_hugging_face_conventions() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, lm) in SOURCES {
        let m = mlx(name, lm, tmp.path());
        assert!(is_mlx_dir(&m.dir), "{name}");
        assert!(!is_mlx_dir(&fixture(name)), "{name}");
        let hf = open_hf(&fixture(name)).unwrap();
        let x = open(&m.dir).unwrap();
        assert_eq!(x.config, hf.config, "{name}");
        assert_eq!(x.tensors.names(), hf.tensors.names(), "{name}: the same logical tensors");
        for t in hf.tensors.names() {
            let (shape, format) = x.tensors.stored_format(&t).unwrap();
            let h = hf.tensors.tensor(&t).unwrap();
            assert_eq!(shape, h.shape, "{name}: {t}");
            if let Some(q) = m.quantised.get(&t) {
                assert_eq!(format, q.format, "{name}: {t}");
                let got = x.tensors.matrix(&t, shape[0], shape[1]).unwrap();
                assert_eq!(parts(&got), parts(q), "{name}: {t} is handed out as written");
                assert!(x.tensors.tensor(&t).is_err(), "{name}: {t} has no float view");
            } else if let Some(want) = m.unbaked.get(&t) {
                assert_eq!(x.tensors.tensor(&t).unwrap().values(&shape).unwrap(), *want, "{name}: {t} unbaked");
                // bf16(w + 1) - 1 is within half a bf16 step of 1 from the original w.
                for (a, b) in want.iter().zip(h.values(&shape).unwrap()) {
                    assert!((a - b).abs() <= 1.0 / 256.0, "{name}: {t}: {a} vs {b}");
                }
            } else {
                let got = x.tensors.tensor(&t).unwrap();
                assert_eq!((got.dtype, &got.data[..]), (h.dtype, &h.data[..]), "{name}: {t} unchanged");
            }
        }
        assert!(x.tensors.names().iter().any(|n| n.ends_with("conv1d.weight")) == (name != "qwen3_moe"));
        assert_eq!(m.unbaked.is_empty(), name == "qwen3_moe", "qwen3_moe norms are plain weights");
        let c = &x.config;
        for (l, layer) in m.experts.iter().enumerate() {
            for (p, mats) in layer.iter().enumerate() {
                assert_eq!(mats.len(), c.experts);
                for (e, want) in mats.iter().enumerate() {
                    let got = x.experts.expert(l, e).unwrap();
                    let got = [&got.gate, &got.up, &got.down][p];
                    assert_eq!(parts(got), parts(want), "{name}: layer {l} expert {e} proj {p}");
                }
            }
        }
        let one = x.experts.expert(0, 0).unwrap().byte_len();
        assert_eq!(x.experts.expert_bytes(), one);
        assert_eq!(x.experts.total_bytes(), one * c.experts * c.layers.len());
    }
}

#[test]
fn mlx_4bit_to_q4_is_a_bit_identical_relayout() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, lm) in SOURCES {
        let m = mlx(name, lm, tmp.path());
        let src = open(&m.dir).unwrap();
        let out = tmp.path().join(format!("{name}-q4"));
        write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Q8, false, &mut |_, _| {}).unwrap();
        verify_packed(&out).unwrap();
        let man = manifest(&out);
        for c in [&man.experts.gate, &man.experts.up, &man.experts.down] {
            assert_eq!(c.format, TensorFormat::Affine { bits: 4, group: 32 }, "{name}: the source's group is kept");
        }
        // The expert files hold the MLX codes, scales and biases byte for byte.
        let stride = man.experts.stride as usize;
        for (l, layer) in m.experts.iter().enumerate() {
            let file = std::fs::read(out.join(&man.experts.files[l].file.path)).unwrap();
            for e in 0..man.experts.experts {
                let record = &file[e * stride..(e + 1) * stride];
                for (p, c) in [&man.experts.gate, &man.experts.up, &man.experts.down].into_iter().enumerate() {
                    let q = &layer[p][e];
                    assert_eq!(&record[c.data.range()], &q.data[..], "{name}: layer {l} expert {e} proj {p} codes");
                    assert_eq!(&record[c.scales.unwrap().range()], &q.scales[..], "{name}: scales");
                    assert_eq!(&record[c.biases.unwrap().range()], &q.biases[..], "{name}: biases");
                }
            }
        }
        // Quantised dense tensors (4-bit, routers 8-bit) are copied as they are under --dense q8;
        // the unbaked norms are stored (exactly, as f32) in the Hugging Face convention.
        let p = open(&out).unwrap();
        for t in &man.dense.tensors {
            if let Some(q) = m.quantised.get(&t.name) {
                assert_eq!(t.format.weight_format(), q.format, "{name}: {}", t.name);
                let got = p.tensors.matrix(&t.name, t.shape[0], t.shape[1]).unwrap();
                assert_eq!(parts(&got), parts(q), "{name}: {}", t.name);
            } else if let Some(want) = m.unbaked.get(&t.name) {
                let got = p.tensors.tensor(&t.name).unwrap();
                assert_eq!(got.dtype, DType::F32);
                assert_eq!(got.values(&t.shape).unwrap(), *want, "{name}: {}", t.name);
            }
        }
        assert!(man.dense.tensors.iter().any(|t| t.format == TensorFormat::Affine { bits: 8, group: 64 }));
        // The copied config still says how the source was quantised; the manifest is what counts.
        assert!(man.config.get("quantization").is_some());
    }
}

#[test]
fn mlx_4bit_to_q2_follows_flash_moe() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mlx("qwen35_moe", true, tmp.path());
    let out = tmp.path().join("q2");
    write_packed(&open(&m.dir).unwrap(), &out, ExpertFormat::Q2, DenseFormat::Bf16, false, &mut |_, _| {}).unwrap();
    let p = open(&out).unwrap();
    for (l, layer) in m.experts.iter().enumerate() {
        for (k, mats) in layer.iter().enumerate() {
            for (e, q4) in mats.iter().enumerate() {
                let got = p.experts.expert(l, e).unwrap();
                let got = [&got.gate, &got.up, &got.down][k];
                assert_eq!(parts(got), parts(&requantize_q2_from_q4(q4)), "layer {l} expert {e} proj {k}");
            }
        }
    }
    // Dense bf16 dequantises the 4-bit matrices.
    let q = &m.quantised["layers.0.linear_attn.in_proj_qkv.weight"];
    let got = p.tensors.matrix("layers.0.linear_attn.in_proj_qkv.weight", q.rows, q.cols).unwrap();
    assert_eq!(got.format, WeightFormat::Float(DType::BF16));
    let (a, b) = (got.to_f32(), q.to_f32());
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= y.abs() / 128.0), "bf16 rounding only");
}

/// A copy of an MLX dir with its config edited by `f`.
fn edited_config(m: &MlxModel, to: &Path, f: impl Fn(&mut serde_json::Value)) {
    std::fs::create_dir(to).unwrap();
    std::fs::copy(m.dir.join("model.safetensors"), to.join("model.safetensors")).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.dir.join("config.json")).unwrap()).unwrap();
    f(&mut c);
    std::fs::write(to.join("config.json"), c.to_string()).unwrap();
}

#[test]
fn quantisation_that_does_not_fit_the_shapes_is_an_error_naming_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let m = mlx("qwen3_moe", false, tmp.path());
    // Without the router override, the 8-bit router does not fit 4-bit codes of group 32.
    let dir = tmp.path().join("no-override");
    edited_config(&m, &dir, |c| {
        let q = c["quantization"].as_object_mut().unwrap();
        q.retain(|k, _| !k.ends_with("mlp.gate"));
        c["quantization_config"] = c["quantization"].clone();
    });
    let e = open(&dir).err().expect("must fail").to_string();
    assert!(e.contains("mlp.gate.weight") && e.contains("4-bit"), "{e}");

    // 3-bit codes exist in MLX but not here: refused, saying so.
    let dir = tmp.path().join("three-bit");
    edited_config(&m, &dir, |c| {
        c["quantization"]["bits"] = 3.into();
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let e = open(&dir).err().expect("must fail").to_string();
    assert!(e.contains("3-bit") && e.contains("supported"), "{e}");

    // Other quantisation modes (mxfp4, ...) are refused by name.
    let dir = tmp.path().join("mxfp4");
    edited_config(&m, &dir, |c| c["quantization"]["mode"] = "mxfp4".into());
    let e = open(&dir).err().expect("must fail").to_string();
    assert!(e.contains("mxfp4"), "{e}");
}

#[test]
fn unsupported_source_formats_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("gguf");
    std::fs::create_dir(&gguf).unwrap();
    std::fs::write(gguf.join("Qwen3-30B-A3B-Q4_K_M.gguf"), b"GGUF\x03\0\0\0").unwrap();
    let e = open(&gguf).err().expect("must fail").to_string();
    assert!(e.contains("GGUF") && e.contains("unsupported"), "{e}");

    let fp8 = tmp.path().join("fp8");
    std::fs::create_dir(&fp8).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("qwen3_moe").join("config.json")).unwrap()).unwrap();
    c["quantization_config"] = serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]});
    std::fs::write(fp8.join("config.json"), c.to_string()).unwrap();
    let e = open(&fp8).err().expect("must fail").to_string();
    assert!(e.contains("\"fp8\"") && e.contains("unsupported"), "{e}");
}
