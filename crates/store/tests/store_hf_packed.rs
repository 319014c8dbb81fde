//! One streaming path for both kinds of directory: the experts of a Hugging Face fixture and of
//! its bf16 packing, both read through the expert store, are the same matrices byte for byte, and
//! the same as the files hold.
#![allow(clippy::needless_range_loop)] // (layer, expert) loops index the expected bytes

#[path = "store_common.rs"]
mod common;

use common::*;
use moe_store::{Eviction, Expert, ExpertFormat, open_with};

fn same(a: &Expert, b: &Expert, what: &str) {
    for (x, y) in [(&a.gate, &b.gate), (&a.up, &b.up), (&a.down, &b.down)] {
        assert_eq!((x.format, x.rows, x.cols), (y.format, y.rows, y.cols), "{what}");
    }
    assert_eq!(bytes_of(a), bytes_of(b), "{what}");
}

#[test]
fn hf_and_packed_give_identical_experts_through_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    // Fused gate_up_proj, per-expert tensors (qwen3.5), per-expert tensors (qwen3).
    for name in ["qwen35_moe_fused", "qwen35_moe", "qwen3_moe"] {
        let hf_dir = hf_copy(name, tmp.path());
        let packed_dir = packed_copy(name, tmp.path(), ExpertFormat::Bf16);
        for (budget, direct) in [(0, true), (3 * 12288, true), (1 << 30, false)] {
            let hf = open_with(&hf_dir, &options(budget, Eviction::Lfru, 2, direct)).unwrap();
            let packed = open_with(&packed_dir, &options(budget, Eviction::Lru, 2, direct)).unwrap();
            assert!(!hf.experts.stats().direct_io, "Hugging Face shards are read through the page cache");
            assert_eq!(hf.experts.expert_bytes(), packed.experts.expert_bytes(), "{name}");
            assert_eq!(hf.experts.total_bytes(), packed.experts.total_bytes(), "{name}");
            let want = truth(&hf_dir, &hf);
            assert_eq!(want, truth(&packed_dir, &packed), "{name}: the files differ");
            let (layers, experts) = (hf.config.layers.len(), hf.config.experts);
            for l in 0..layers {
                for e in 0..experts {
                    let (a, b) = (hf.experts.expert(l, e).unwrap(), packed.experts.expert(l, e).unwrap());
                    same(&a, &b, &format!("{name} {l}/{e}"));
                    assert_eq!(bytes_of(&a), want[l][e], "{name} {l}/{e}");
                }
                let ids: Vec<usize> = (0..experts).rev().chain([0, 0]).collect();
                hf.experts.prefetch(l, &ids[..2]);
                let (xs, ys) = (hf.experts.experts(l, &ids).unwrap(), packed.experts.experts(l, &ids).unwrap());
                for ((x, y), &e) in xs.iter().zip(&ys).zip(&ids) {
                    same(x, y, &format!("{name} batch {l}/{e}"));
                    assert_eq!(bytes_of(x), want[l][e]);
                }
            }
            for m in [&hf, &packed] {
                assert!(m.experts.expert(layers, 0).is_err() && m.experts.expert(0, experts).is_err());
                let err = m.experts.experts(0, &[0, experts]).unwrap_err().to_string();
                assert!(err.contains(&format!("layers.0.mlp.experts.{experts}")), "{err}");
            }
        }
    }
}
