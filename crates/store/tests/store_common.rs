//! Helpers of the expert-store tests (`store_*.rs` include this file as a module): the committed
//! Hugging Face fixtures, packed copies of them, and the bytes every expert must have, taken from
//! the files without going through the store.
#![allow(dead_code)]

use moe_store::manifest::Manifest;
use moe_store::{
    Budget, DenseFormat, Eviction, Expert, ExpertFormat, MANIFEST_FILE, ModelFiles, StoreOptions, expert_file_name,
    open_hf_with, write_packed,
};
use std::path::{Path, PathBuf};

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

/// A copy of fixture `name` in `tmp` without its `reference.safetensors` (which an index-less
/// directory would take for a shard).
pub fn hf_copy(name: &str, tmp: &Path) -> PathBuf {
    let dir = tmp.join(format!("{name}-hf"));
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() != "reference.safetensors" {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// Fixture `name` packed with `experts` into `tmp/<name>-<format>`.
pub fn packed_copy(name: &str, tmp: &Path, experts: ExpertFormat) -> PathBuf {
    let src = open_hf_with(&hf_copy(name, tmp), &options(0, Eviction::Lru, 0, false)).unwrap();
    let out = tmp.join(format!("{name}-{}", experts.name()));
    write_packed(&src, &out, experts, DenseFormat::Bf16, false, &mut |_, _| {}).unwrap();
    out
}

pub fn options(budget: u64, eviction: Eviction, io_threads: usize, direct_io: bool) -> StoreOptions {
    StoreOptions { ram_budget: Budget::Bytes(budget), io_threads, eviction, direct_io, host_memory: None }
}

/// The nine byte arrays of an expert: data, scales, biases of gate, up, down.
pub type ExpertBytes = Vec<Vec<u8>>;

pub fn bytes_of(e: &Expert) -> ExpertBytes {
    [&e.gate, &e.up, &e.down].iter().flat_map(|m| [m.data.to_vec(), m.scales.to_vec(), m.biases.to_vec()]).collect()
}

/// Every expert's bytes, `[layer][expert]`, read from the files directly: a packed directory's
/// layer files at the manifest's spans, or a Hugging Face directory's tensors through the
/// dense-weight reader (the memory map), which the expert store does not use.
pub fn truth(dir: &Path, m: &ModelFiles) -> Vec<Vec<ExpertBytes>> {
    let manifest_path = dir.join(MANIFEST_FILE);
    if manifest_path.is_file() {
        let man = Manifest::parse(&manifest_path, &std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
        let x = &man.experts;
        (0..x.layers)
            .map(|l| {
                let file = std::fs::read(dir.join(expert_file_name(l))).unwrap();
                (0..x.experts)
                    .map(|e| {
                        let record = &file[e * x.stride as usize..];
                        [x.gate, x.up, x.down]
                            .iter()
                            .flat_map(|c| {
                                let span = |s: Option<moe_store::manifest::Span>| {
                                    s.map(|s| record[s.range()].to_vec()).unwrap_or_default()
                                };
                                [record[c.data.range()].to_vec(), span(c.scales), span(c.biases)]
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    } else {
        let c = &m.config;
        let (n, h, i) = (c.experts, c.hidden, c.expert_inter);
        (0..c.layers.len())
            .map(|l| {
                let p = format!("layers.{l}.mlp.experts.");
                let t = |name: String| m.tensors.tensor(&name).unwrap();
                if m.tensors.contains(&format!("{p}gate_up_proj")) {
                    let gu = t(format!("{p}gate_up_proj"));
                    let down = t(format!("{p}down_proj"));
                    let half = i * h * gu.dtype.size();
                    let dl = h * i * down.dtype.size();
                    (0..n)
                        .map(|e| {
                            let g = &gu.data[2 * half * e..];
                            vec![
                                g[..half].to_vec(),
                                vec![],
                                vec![],
                                g[half..2 * half].to_vec(),
                                vec![],
                                vec![],
                                down.data[dl * e..dl * (e + 1)].to_vec(),
                                vec![],
                                vec![],
                            ]
                        })
                        .collect()
                } else {
                    (0..n)
                        .map(|e| {
                            ["gate_proj", "up_proj", "down_proj"]
                                .iter()
                                .flat_map(|proj| [t(format!("{p}{e}.{proj}.weight")).data.to_vec(), vec![], vec![]])
                                .collect()
                        })
                        .collect()
                }
            })
            .collect()
    }
}

/// xorshift64*: deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
