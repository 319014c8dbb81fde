//! Finding the CUDA libraries at run time. cudarc loads them by soname on first use and panics
//! when they are missing, so every entry point probes first and turns absence into an error.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Whether `libcuda` can be loaded (cudarc tries `libcuda.so`, `libcuda.so.1`, ...).
pub(crate) fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the candidate names and closes them again.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Whether NVRTC can be loaded. When it is not on the loader path, looks in the usual CUDA
/// toolkit directories and pre-loads it from there by absolute path (with its builtins library),
/// so that cudarc's later load by soname finds the library already in the process.
pub(crate) fn nvrtc_present() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: as above.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return true;
        }
        for dir in toolkit_dirs() {
            if preload_nvrtc(&dir) {
                // SAFETY: as above.
                return unsafe { cudarc::nvrtc::sys::is_culib_present() };
            }
        }
        false
    })
}

fn toolkit_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            let root = PathBuf::from(v);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    if let Ok(entries) = std::fs::read_dir("/usr/local") {
        let mut versioned: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("cuda-")))
            .map(|p| p.join("lib64"))
            .collect();
        versioned.sort();
        dirs.extend(versioned.into_iter().rev());
    }
    dirs
}

fn preload_nvrtc(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let names: Vec<String> = entries.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
    let pick = |prefix: &str| -> Option<&String> {
        let mut found: Vec<&String> = names.iter().filter(|n| n.starts_with(prefix)).collect();
        found.sort();
        found.last().copied()
    };
    let Some(nvrtc) = pick("libnvrtc.so.13").or_else(|| pick("libnvrtc.so.1")).or_else(|| pick("libnvrtc.so")) else {
        return false;
    };
    if let Some(builtins) = pick("libnvrtc-builtins.so") {
        dlopen_global(&dir.join(builtins));
    }
    dlopen_global(&dir.join(nvrtc))
}

/// Loads a library for the life of the process.
fn dlopen_global(path: &Path) -> bool {
    let Some(c) = path.to_str().and_then(|s| CString::new(s).ok()) else { return false };
    // SAFETY: a plain dlopen of a shared library by path; the handle is intentionally leaked.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}
