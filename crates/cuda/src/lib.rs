//! The CUDA side of flash-moe: a device context and stream through cudarc's driver API (loaded at
//! run time, so this crate builds and links without CUDA), kernels kept as `.cu` sources in
//! `kernels/`, compiled by NVRTC for the device at start-up and cached on disk as PTX, and typed
//! launchers for every kernel over f32 device buffers.
//!
//! Nothing here knows about models or files: the engine's `CudaBackend` maps its coarse
//! operations onto [`Gpu`]'s methods.

mod device;
mod experts;
mod graph;
mod launch;
mod loader;
mod pinned;
mod ptx;
mod tier;

pub use cudarc::driver::{CudaSlice, CudaView, PinnedHostSlice};
pub use device::{
    BULK_MIN_ROWS, DeviceMatrix, Gpu, MOE_MAX_SLOTS, MOE_MAX_TOKENS, MoeExperts, MoeShape, ROUTE_MAX_EXPERTS,
    expert_parts, host_parts, part_offsets,
};
pub use experts::{Bandwidth, CopyMark, EvictedExpert, ExpertHandle, ExpertTier, VRAM_HEADROOM, VramBudget};
pub use graph::{StepChannel, StepGraph};
pub use pinned::{PinnedPool, PinnedStats};

/// Why a GPU could not be used or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no CUDA driver found (libcuda.so.1)")]
    NoDriver,
    #[error("no GPU: the CUDA driver reports no device")]
    NoDevice,
    #[error("no GPU with ordinal {ordinal}: the CUDA driver reports {count} device(s)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error(
        "no NVRTC found (libnvrtc.so.13), which compiles the kernels: put the CUDA toolkit's lib64 directory on LD_LIBRARY_PATH or set CUDA_HOME"
    )]
    NoNvrtc,
    #[error("NVRTC failed to compile the flash-moe kernels for {arch}:\n{log}")]
    Compile { arch: String, log: String },
    #[error("CUDA driver call failed ({what}): {source:?}")]
    Driver {
        what: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("unsupported on CUDA: {0}")]
    Unsupported(String),
    #[error("out of GPU memory: {0}")]
    OutOfMemory(String),
}

impl Error {
    /// True when the machine simply has no usable GPU (no driver library, no device), as
    /// opposed to a GPU that is there but failed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::NoDriver | Error::NoDevice)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches what was being done to a driver error.
pub(crate) trait Context<T> {
    fn what(self, what: &'static str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn what(self, what: &'static str) -> Result<T> {
        self.map_err(|source| Error::Driver { what, source })
    }
}

/// Compiles the kernels with NVRTC for compute capability `major.minor` and returns the PTX.
/// Needs NVRTC but no GPU or driver; the start-up path uses the cache in front of this.
pub fn compile_kernels(major: i32, minor: i32) -> Result<String> {
    ptx::compile(ptx::SOURCE, &ptx::arch(major, minor))
}

/// Names of the kernels the PTX must define.
pub fn kernel_names() -> &'static [&'static str] {
    device::KERNELS
}

/// Whether the CUDA driver library can be loaded, without initialising it. Never panics.
pub fn driver_present() -> bool {
    loader::driver_present()
}
