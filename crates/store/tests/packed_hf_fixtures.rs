//! Packing the committed Hugging Face fixtures (`tests/fixtures/qwen*`): bf16 packing reproduces
//! every dense tensor and every routed expert of the HF reader bit for bit, for each family and
//! expert layout; quantised packings open and verify.

use moe_core::quant::quantize;
use moe_store::{DenseFormat, ExpertFormat, open, open_hf, open_packed, verify_packed, write_packed};
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 6] =
    ["qwen35_moe", "qwen35_moe_fused", "qwen35_moe_vl", "qwen3_next", "qwen3_moe", "qwen3_moe_untied"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// The fixture without its `reference.safetensors` (the HF reader takes every `*.safetensors` of
/// an index-less directory as a shard, and the reference's i64 `input_ids` is no weight).
fn model_dir(name: &str, tmp: &Path) -> PathBuf {
    let dir = tmp.join(format!("{name}-hf"));
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "reference.safetensors" {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

#[test]
fn bf16_packing_of_every_fixture_is_bit_exact() {
    let tmp = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let src = open_hf(&model_dir(name, tmp.path())).unwrap();
        let out = tmp.path().join(name);
        write_packed(&src, &out, ExpertFormat::Bf16, DenseFormat::Bf16, false, &mut |_, _| {}).unwrap();
        verify_packed(&out).unwrap();
        let p = open(&out).unwrap();
        assert_eq!(p.config, src.config, "{name}");
        assert_eq!(p.tensors.names(), src.tensors.names(), "{name}");
        assert_eq!(p.tensors.dense_bytes(), src.tensors.dense_bytes(), "{name}");
        for t in src.tensors.names() {
            let (a, b) = (src.tensors.tensor(&t).unwrap(), p.tensors.tensor(&t).unwrap());
            assert_eq!((a.dtype, &a.shape, &a.data[..]), (b.dtype, &b.shape, &b.data[..]), "{name}: {t}");
        }
        for l in 0..src.config.layers.len() {
            for e in 0..src.config.experts {
                let (a, b) = (src.experts.expert(l, e).unwrap(), p.experts.expert(l, e).unwrap());
                for (x, y) in [(&a.gate, &b.gate), (&a.up, &b.up), (&a.down, &b.down)] {
                    assert_eq!((x.format, x.rows, x.cols), (y.format, y.rows, y.cols), "{name} {l}/{e}");
                    assert_eq!(&x.data[..], &y.data[..], "{name} layer {l} expert {e}");
                }
            }
        }
        assert_eq!(
            std::fs::read(out.join("config.json")).unwrap(),
            std::fs::read(fixture(name).join("config.json")).unwrap()
        );
    }
}

#[test]
fn quantised_packing_of_the_fixtures_opens_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["qwen35_moe_vl", "qwen3_next", "qwen3_moe"] {
        let src = open_hf(&model_dir(name, tmp.path())).unwrap();
        let out = tmp.path().join(name);
        write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Q8, false, &mut |_, _| {}).unwrap();
        verify_packed(&out).unwrap();
        let p = open_packed(&out).unwrap();
        let (h, i) = (src.config.hidden, src.config.expert_inter);
        let (a, b) = (src.experts.expert(1, 5).unwrap(), p.experts.expert(1, 5).unwrap());
        assert_eq!(b.gate.data[..], quantize(&a.gate.to_f32(), i, h, 4, 64).data[..], "{name}");
        assert_eq!(b.down.scales[..], quantize(&a.down.to_f32(), h, i, 4, 32).scales[..], "{name}");
        let embed = p.tensors.matrix("embed_tokens.weight", src.config.vocab, h).unwrap();
        let want = quantize(
            &src.tensors.matrix("embed_tokens.weight", src.config.vocab, h).unwrap().to_f32(),
            src.config.vocab,
            h,
            8,
            64,
        );
        assert_eq!(embed.data[..], want.data[..], "{name}");
        assert!(p.tensors.dense_bytes() < src.tensors.dense_bytes());
    }
}
