//! Synthetic packed models (`write_synthetic`): real shapes, the requested formats, deterministic
//! random weights, a directory that opens and verifies like any converted model.

use moe_core::{Family, LayerKind, WeightFormat};
use moe_store::manifest::{Manifest, TensorFormat};
use moe_store::{DenseFormat, ExpertFormat, SynthShape, open, verify_packed, write_synthetic};
use std::path::Path;

/// A preset's family and layer structure at toy width, so the tests stay fast.
fn tiny(preset: &str) -> SynthShape {
    SynthShape::preset(preset).unwrap().miniature(8, 2, 256)
}

fn manifest(dir: &Path) -> Manifest {
    let path = dir.join("manifest.json");
    Manifest::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap()
}

#[test]
fn synthetic_models_open_verify_and_have_the_asked_formats() {
    let tmp = tempfile::tempdir().unwrap();
    for preset in SynthShape::PRESETS {
        for (experts, dense, layers) in
            [(ExpertFormat::Q4, DenseFormat::Q8, 5), (ExpertFormat::Q2, DenseFormat::Bf16, 1)]
        {
            let shape = tiny(preset);
            let out = tmp.path().join(format!("{preset}-{}-{}", experts.name(), dense.name()));
            let mut last = (0, 0);
            write_synthetic(&shape, layers, experts, dense, &out, 7, false, &mut |d, t| last = (d, t)).unwrap();
            assert!(last.0 == last.1 && last.0 > 0, "{preset}: progress ends at the total");
            verify_packed(&out).unwrap();
            let m = open(&out).unwrap();
            let c = &m.config;
            assert_eq!((c.family, c.layers.len(), c.hidden, c.experts, c.vocab), (shape.family, layers, 128, 8, 256));
            if shape.family != Family::Qwen3Moe && layers >= 4 {
                assert_eq!(c.layers[3], LayerKind::Attention, "{preset}: every fourth layer is attention");
                assert_eq!(c.layers[4], LayerKind::DeltaNet);
            }
            let man = manifest(&out);
            let bits = experts.bits().unwrap();
            for comp in [&man.experts.gate, &man.experts.up, &man.experts.down] {
                assert_eq!(comp.format, TensorFormat::Affine { bits, group: 64 }, "{preset}");
            }
            for t in &man.dense.tensors {
                let is_matrix = t.shape.len() == 2 && !t.name.contains("norm");
                let want = match (is_matrix, dense) {
                    (true, DenseFormat::Q8) => TensorFormat::Affine { bits: 8, group: 64 },
                    _ if t.name.ends_with("A_log") => {
                        TensorFormat::Float { dtype: moe_store::manifest::FloatDType::F32 }
                    }
                    _ => TensorFormat::Float { dtype: moe_store::manifest::FloatDType::Bf16 },
                };
                assert_eq!(t.format, want, "{preset}: {}", t.name);
            }
            assert_eq!(man.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(), ["config.json"]);
            let config = std::fs::read_to_string(out.join("config.json")).unwrap();
            assert_eq!(serde_json::from_str::<serde_json::Value>(&config).unwrap(), man.config);
            assert!(man.source.contains("synthetic") && man.source.contains(preset));

            // Weights are finite and small, quantised ones zero-mean.
            let e = m.experts.expert(layers - 1, 7).unwrap();
            for w in [&e.gate, &e.up, &e.down] {
                assert!(matches!(w.format, WeightFormat::Affine { .. }));
                let v = w.to_f32();
                let mean = v.iter().sum::<f32>() / v.len() as f32;
                assert!(v.iter().all(|x| x.is_finite() && x.abs() < 1.0) && mean.abs() < 0.02, "{preset}");
            }
        }
    }
}

#[test]
fn the_seed_decides_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let shape = tiny("qwen3.5-35b");
    let write = |name: &str, seed| {
        let out = tmp.path().join(name);
        write_synthetic(&shape, 2, ExpertFormat::Q4, DenseFormat::Q8, &out, seed, false, &mut |_, _| {}).unwrap();
        let files = ["dense.safetensors", "experts/layer_000.bin", "experts/layer_001.bin"];
        files.map(|f| std::fs::read(out.join(f)).unwrap())
    };
    let (a, b, c) = (write("a", 1), write("b", 1), write("c", 2));
    assert_eq!(a, b, "same seed, same bytes");
    for (x, z) in a.iter().zip(&c) {
        assert_ne!(x, z, "another seed, other weights");
    }
    // Experts differ from one another and from layer to layer.
    let stride = manifest(&tmp.path().join("a")).experts.stride as usize;
    assert_ne!(a[1][..stride], a[1][stride..2 * stride]);
    assert_ne!(a[1][..stride], a[2][..stride]);
}

#[test]
fn real_shapes_and_guards() {
    let tmp = tempfile::tempdir().unwrap();
    // The real Qwen3-30B-A3B layer (vocabulary cut down to keep the test small): expert records of
    // gate/up [768, 2048] and down [2048, 768] at 4 bits, group 64.
    let shape = SynthShape { vocab: 512, ..SynthShape::preset("qwen3-30b").unwrap() };
    let out = tmp.path().join("q30");
    write_synthetic(&shape, 1, ExpertFormat::Q4, DenseFormat::Q8, &out, 0, false, &mut |_, _| {}).unwrap();
    let man = manifest(&out);
    let per = |rows: u64, cols: u64| rows * cols / 2 + 2 * rows * cols / 64 * 2;
    assert_eq!(man.experts.record_bytes, 2 * per(768, 2048) + per(2048, 768));
    assert_eq!((man.experts.layers, man.experts.experts), (1, 128));
    let q = man.dense.tensors.iter().find(|t| t.name == "layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape, [32 * 128, 2048]);

    // An existing destination is refused without force and replaced with it.
    let e = write_synthetic(&shape, 1, ExpertFormat::Q4, DenseFormat::Q8, &out, 0, false, &mut |_, _| {});
    assert!(e.unwrap_err().to_string().contains("already exists"));
    write_synthetic(&tiny("qwen3-30b"), 1, ExpertFormat::Q2, DenseFormat::Q8, &out, 0, true, &mut |_, _| {}).unwrap();
    assert_eq!(manifest(&out).experts.experts, 8);
    // No layers: an error, not an empty model.
    assert!(
        write_synthetic(&shape, 0, ExpertFormat::Q4, DenseFormat::Q8, &tmp.path().join("z"), 0, false, &mut |_, _| {})
            .is_err()
    );
    assert!(!tmp.path().join("z").exists());
}
