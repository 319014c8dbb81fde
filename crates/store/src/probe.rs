//! Measurements of the machine the bounds of a benchmark come from: the disk's read bandwidth at
//! expert-sized reads and the memory's read bandwidth.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const ALIGN: usize = 4096;

/// What a disk probe measured.
#[derive(Clone, Copy, Debug)]
pub struct DiskBandwidth {
    pub gb_per_s: f64,
    /// Whether the reads bypassed the page cache (`O_DIRECT`); buffered reads of cached files
    /// measure memory, not the disk.
    pub direct: bool,
    pub reads: u64,
}

/// Reads random `read_bytes`-sized, 4 KiB-aligned blocks of `files` from `threads` threads for
/// about `time`, with `O_DIRECT` where the filesystem allows it.
pub fn disk_read_bandwidth(
    files: &[PathBuf],
    read_bytes: usize,
    threads: usize,
    time: Duration,
) -> io::Result<DiskBandwidth> {
    let open = |direct: bool| -> io::Result<Vec<(File, u64)>> {
        files
            .iter()
            .map(|p| {
                let mut o = std::fs::OpenOptions::new();
                o.read(true);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                let f = o.open(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                let len = f.metadata()?.len();
                Ok((f, len))
            })
            .filter(|r| !matches!(r, Ok((_, len)) if (*len as usize) < read_bytes))
            .collect()
    };
    let read_bytes = read_bytes.div_ceil(ALIGN) * ALIGN;
    let (handles, direct) = match open(true) {
        Ok(h) => (h, true),
        Err(_) => (open(false)?, false),
    };
    if handles.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no file is as large as one read"));
    }
    let deadline = Instant::now() + time;
    let start = Instant::now();
    let results: Vec<io::Result<u64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads.max(1))
            .map(|t| {
                let handles = &handles;
                s.spawn(move || -> io::Result<u64> {
                    // O_DIRECT wants an aligned destination: take the aligned window of a larger vector.
                    let mut storage = vec![0u8; read_bytes + ALIGN];
                    let skip = storage.as_ptr().align_offset(ALIGN);
                    let buf = &mut storage[skip..skip + read_bytes];
                    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                    let mut reads = 0;
                    while Instant::now() < deadline {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        let (f, len) = &handles[(seed % handles.len() as u64) as usize];
                        let blocks = (len - read_bytes as u64) / ALIGN as u64 + 1;
                        let offset = (seed >> 16) % blocks * ALIGN as u64;
                        f.read_exact_at(buf, offset)?;
                        reads += 1;
                    }
                    Ok(reads)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("probe thread panicked")).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut reads = 0;
    for r in results {
        reads += r?;
    }
    Ok(DiskBandwidth { gb_per_s: (reads * read_bytes as u64) as f64 / elapsed / 1e9, direct, reads })
}

/// Sums a buffer of `bytes` from `threads` threads a few times; the best pass in GB/s.
pub fn memory_read_bandwidth(bytes: usize, threads: usize) -> f64 {
    let words = bytes / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads.max(1));
    let mut best = 0.0f64;
    for _ in 0..4 {
        let start = Instant::now();
        let total: u64 = std::thread::scope(|s| {
            let parts: Vec<_> = data.chunks(chunk).map(|c| s.spawn(move || sum_wide(c))).collect();
            parts.into_iter().map(|p| p.join().unwrap()).fold(0, u64::wrapping_add)
        });
        std::hint::black_box(total);
        best = best.max(bytes as f64 / start.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Eight independent accumulators so the sum is limited by memory, not by one add chain.
fn sum_wide(c: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = c.chunks_exact(8);
    for w in &mut it {
        for (a, x) in acc.iter_mut().zip(w) {
            *a = a.wrapping_add(*x);
        }
    }
    it.remainder().iter().chain(&acc).fold(0, |a, x| a.wrapping_add(*x))
}

/// The files a model's experts are read from: the packed expert files, or the safetensors shards
/// of a Hugging Face directory.
pub fn expert_files(dir: &std::path::Path) -> io::Result<Vec<PathBuf>> {
    let experts = dir.join("experts");
    let (from, ext) = if experts.is_dir() { (experts, "bin") } else { (dir.to_path_buf(), "safetensors") };
    let mut files = Vec::new();
    for e in std::fs::read_dir(&from)? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == ext) {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_probe_reads_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, vec![7u8; 64 * 1024]).unwrap();
        let bw = disk_read_bandwidth(&[path], 8192, 2, Duration::from_millis(50)).unwrap();
        assert!(bw.reads > 0 && bw.gb_per_s > 0.0);
    }

    #[test]
    fn too_small_files_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, [1u8; 100]).unwrap();
        assert!(disk_read_bandwidth(&[path], 8192, 1, Duration::from_millis(10)).is_err());
    }

    #[test]
    fn memory_probe_is_positive() {
        assert!(memory_read_bandwidth(1 << 20, 2) > 0.0);
    }
}
