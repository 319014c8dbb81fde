//! Kernel sources, their NVRTC compilation and the on-disk PTX cache.

use crate::{Error, Result, loader};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx, compile_ptx_with_opts};
use std::path::{Path, PathBuf};

/// All kernels as one NVRTC program: the shared helpers first, then each family of kernels.
pub(crate) const SOURCE: &str = concat!(
    include_str!("../kernels/common.cuh"),
    "\n",
    include_str!("../kernels/matmul.cu"),
    "\n",
    include_str!("../kernels/elementwise.cu"),
    "\n",
    include_str!("../kernels/attention.cu"),
    "\n",
    include_str!("../kernels/delta_net.cu"),
    "\n",
    include_str!("../kernels/moe.cu"),
);

/// NVRTC options besides the architecture. Part of the cache key.
const OPTIONS: &[&str] = &["--std=c++17"];

/// The virtual architecture for a compute capability, e.g. `compute_90`.
pub(crate) fn arch(major: i32, minor: i32) -> String {
    format!("compute_{major}{minor}")
}

/// 64-bit FNV-1a: stable across builds and Rust versions, unlike `DefaultHasher`.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache file for `source` compiled for `arch`, keyed by a hash of both (and the options).
pub(crate) fn cache_file(dir: &Path, source: &str, arch: &str) -> PathBuf {
    let opts = OPTIONS.join(" ");
    let key = fnv1a(&[source.as_bytes(), arch.as_bytes(), opts.as_bytes()]);
    dir.join(format!("kernels-{arch}-{key:016x}.ptx"))
}

/// `$XDG_CACHE_HOME/flash-moe` or `~/.cache/flash-moe`; `None` when neither is known.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    let non_empty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(xdg) = non_empty("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
        return Some(xdg.join("flash-moe"));
    }
    non_empty("HOME").map(|h| h.join(".cache").join("flash-moe"))
}

/// Compiles the kernels for `arch` with NVRTC.
pub(crate) fn compile(source: &str, arch: &str) -> Result<String> {
    if !loader::nvrtc_present() {
        return Err(Error::NoNvrtc);
    }
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = CompileOptions { options, name: Some("flash_moe_kernels.cu".into()), ..Default::default() };
    match compile_ptx_with_opts(source, opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { log, .. }) => {
            Err(Error::Compile { arch: arch.to_string(), log: log.to_string_lossy().into_owned() })
        }
        Err(e) => Err(Error::Compile { arch: arch.to_string(), log: format!("{e:?}") }),
    }
}

/// Where the PTX came from, so that a stale cache entry can be replaced.
pub(crate) enum Origin {
    Cache(PathBuf),
    Compiled,
}

/// The PTX of `source` for `arch`: from the cache when present, otherwise compiled and stored
/// (best effort: an unwritable cache only costs the next start a compilation).
pub(crate) fn load(source: &str, arch: &str, use_cache: bool) -> Result<(Ptx, Origin)> {
    let file = cache_dir().map(|d| cache_file(&d, source, arch));
    if use_cache
        && let Some(f) = &file
        && let Ok(text) = std::fs::read_to_string(f)
        && text.contains(".entry")
    {
        return Ok((Ptx::from_src(text), Origin::Cache(f.clone())));
    }
    let text = compile(source, arch)?;
    if let Some(f) = &file {
        store(f, &text);
    }
    Ok((Ptx::from_src(text), Origin::Compiled))
}

fn store(file: &Path, text: &str) {
    let Some(dir) = file.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, file).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_depends_on_source_and_arch() {
        let d = Path::new("/c");
        let a = cache_file(d, "x", "compute_90");
        assert_eq!(a, cache_file(d, "x", "compute_90"));
        assert_ne!(a, cache_file(d, "y", "compute_90"));
        assert_ne!(a, cache_file(d, "x", "compute_80"));
        assert!(a.to_str().unwrap().starts_with("/c/kernels-compute_90-"));
    }

    /// Needs only NVRTC (no GPU): every kernel compiles for Hopper and is exported.
    #[test]
    fn kernels_compile_with_nvrtc() {
        if !loader::nvrtc_present() {
            println!("SKIPPED kernels_compile_with_nvrtc: no NVRTC (libnvrtc.so.13)");
            return;
        }
        let ptx = compile(SOURCE, "compute_90").unwrap_or_else(|e| panic!("{e}"));
        for name in crate::device::KERNELS {
            assert!(ptx.contains(&format!(".entry {name}(")), "kernel {name} missing from the PTX");
        }
        if let Some(dir) = std::env::var_os("FLASH_MOE_DUMP_PTX") {
            std::fs::write(PathBuf::from(dir).join("kernels.ptx"), &ptx).unwrap();
        }
    }

    #[test]
    fn compile_errors_carry_the_nvrtc_log() {
        if !loader::nvrtc_present() {
            println!("SKIPPED compile_errors_carry_the_nvrtc_log: no NVRTC (libnvrtc.so.13)");
            return;
        }
        let err = compile("extern \"C\" __global__ void broken() { undeclared_thing = 1; }", "compute_90").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("compute_90") && msg.contains("undeclared_thing"), "{msg}");
    }
}
