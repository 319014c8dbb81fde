//! The store's reads: `O_DIRECT` (or its fallback) on tmpfs, buffered reads of exact records, and
//! files cut short after opening, which must give errors naming the file and expert, never a panic.
#![allow(clippy::needless_range_loop)] // (layer, expert) loops index the expected bytes

#[path = "store_common.rs"]
mod common;

use common::*;
use moe_store::{Eviction, ExpertFormat, StoreError, open_with};
use std::fs;
use std::path::{Path, PathBuf};

/// A fresh directory on tmpfs (`/dev/shm`), if there is one.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    let shm = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == "/dev/shm" && f[2] == "tmpfs"
    });
    if !shm {
        return None;
    }
    tempfile::tempdir_in("/dev/shm").ok()
}

fn read_everything(dir: &Path, direct: bool) -> moe_store::StoreStats {
    let m = open_with(dir, &options(1 << 30, Eviction::Lfru, 2, direct)).unwrap();
    let want = truth(dir, &m);
    for l in 0..m.config.layers.len() {
        for e in 0..m.config.experts {
            assert_eq!(bytes_of(&m.experts.expert(l, e).unwrap()), want[l][e], "{l}/{e} direct={direct}");
        }
        let all: Vec<usize> = (0..m.config.experts).rev().collect();
        for (x, &e) in m.experts.experts(l, &all).unwrap().iter().zip(&all) {
            assert_eq!(bytes_of(x), want[l][e]);
        }
    }
    m.experts.stats()
}

#[test]
fn o_direct_on_tmpfs_reads_the_file_bytes_or_falls_back() {
    let Some(tmp) = tmpfs_dir() else {
        eprintln!("no tmpfs at /dev/shm: skipped");
        return;
    };
    let dir = packed_copy("qwen35_moe", tmp.path(), ExpertFormat::Q4);
    // Whether this kernel's tmpfs takes O_DIRECT (Linux 6.6 and later do) or refuses it (the
    // store then says so once and reads through the page cache), the bytes are the file's.
    let s = read_everything(&dir, true);
    eprintln!("tmpfs: O_DIRECT {}", if s.direct_io { "accepted" } else { "refused, fell back" });
    if s.direct_io {
        assert_eq!(s.bytes_read % 4096, 0);
    }
    let s = read_everything(&dir, false);
    assert!(!s.direct_io);
}

#[test]
fn direct_reads_are_whole_blocks_buffered_reads_exact_records() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_copy("qwen35_moe", tmp.path(), ExpertFormat::Q4);
    let m = open_with(&dir, &options(0, Eviction::Lru, 0, false)).unwrap();
    let (record, n) = (m.experts.expert_bytes() as u64, (m.config.layers.len() * m.config.experts) as u64);
    assert!(!record.is_multiple_of(4096), "the q4 fixture's records are not whole blocks");
    let s = read_everything(&dir, false);
    assert_eq!((s.reads, s.bytes_read), (n, n * record));
    let s = read_everything(&dir, true);
    if s.direct_io {
        assert_eq!((s.reads, s.bytes_read), (n, n * record.next_multiple_of(4096)));
    }
}

fn truncate(path: &Path, len: u64) {
    fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len).unwrap();
}

fn assert_names(err: &StoreError, file: &str, expert: Option<usize>) {
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
    assert!(msg.contains(file) && msg.contains("truncated"), "{msg}");
    if let Some(e) = expert {
        assert!(msg.contains(&format!("expert {e} ")), "{msg}");
    }
}

#[test]
fn a_truncated_packed_expert_file_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = packed_copy("qwen35_moe_fused", tmp.path(), ExpertFormat::Bf16);
    for direct in [true, false] {
        let m = open_with(&dir, &options(1 << 20, Eviction::Lfru, 2, direct)).unwrap();
        let want = truth(&dir, &m);
        let path: PathBuf = dir.join("experts/layer_002.bin");
        let original = fs::read(&path).unwrap();
        let stride = original.len() as u64 / m.config.experts as u64;
        // Experts 0..3 stay whole, expert 3 is cut in the middle, 4.. are gone.
        truncate(&path, 3 * stride + stride / 2);
        for e in 0..3 {
            assert_eq!(bytes_of(&m.experts.expert(2, e).unwrap()), want[2][e]);
        }
        for e in [3, 7] {
            assert_names(&m.experts.expert(2, e).unwrap_err(), "layer_002.bin", Some(e));
        }
        assert_names(&m.experts.experts(2, &[0, 5, 1]).unwrap_err(), "layer_002.bin", Some(5));
        // A prefetch that fails leaves nothing behind: the request reads again and fails the same.
        m.experts.prefetch(2, &[6]);
        assert_names(&m.experts.expert(2, 6).unwrap_err(), "layer_002.bin", Some(6));
        assert_names(&m.experts.expert(2, 6).unwrap_err(), "layer_002.bin", Some(6));
        // Other layers are unaffected.
        assert_eq!(bytes_of(&m.experts.expert(1, 7).unwrap()), want[1][7]);
        fs::write(&path, &original).unwrap();
    }
}

#[test]
fn a_truncated_hf_shard_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = hf_copy("qwen35_moe_fused", tmp.path());
    let m = open_with(&dir, &options(1 << 20, Eviction::Lru, 2, true)).unwrap();
    let shard = dir.join("model.safetensors");
    let len = fs::metadata(&shard).unwrap().len();
    truncate(&shard, len / 2);
    let (mut ok, mut failed) = (0, 0);
    for l in 0..m.config.layers.len() {
        for e in 0..m.config.experts {
            match m.experts.expert(l, e) {
                Ok(_) => ok += 1,
                Err(err) => {
                    assert_names(&err, "model.safetensors", Some(e));
                    failed += 1;
                }
            }
        }
        if let Err(err) = m.experts.experts(l, &[0, 1, 2]) {
            assert_names(&err, "model.safetensors", None);
        }
    }
    assert!(failed > 0, "half the shard is gone, some experts must fail ({ok} read)");
}
