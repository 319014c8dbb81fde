//! Kernel launches through `cuLaunchKernelEx`, so that a kernel may be launched before the one
//! ahead of it in the stream has finished (programmatic dependent launch, compute capability 9.0
//! and later).
//!
//! Decode is a chain of short kernels, each dependent on the last; launched one after another,
//! every boundary costs the launch latency plus the ramp of the next kernel's first memory reads.
//! Launched early, the next kernel's blocks take the SMs the last one's tail leaves idle and may
//! read what does not depend on it (the weights) before they wait. The kernels keep the contract
//! in `common.cuh` (`grid_wait`): every kernel waits for its predecessor before it reads anything
//! the predecessor may write and before it writes anything at all.

use cudarc::driver::sys::{self, CUlaunchAttribute, CUlaunchAttributeID, CUlaunchConfig};
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DriverError, LaunchConfig,
};
use std::ffi::c_void;

/// The most arguments a kernel takes.
const MAX_ARGS: usize = 20;

/// The arguments of one launch: scalars by reference, device buffers by address.
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    func: &'a CudaFunction,
    early: bool,
    /// Device addresses of buffer arguments: `args` points into this, so it never moves.
    addresses: Box<[u64; MAX_ARGS]>,
    args: Vec<*mut c_void>,
}

impl<'a> Launch<'a> {
    /// A launch of `func` on `stream`, allowed to start before its predecessor ends when `early`.
    pub(crate) fn new(stream: &'a CudaStream, func: &'a CudaFunction, early: bool) -> Self {
        Launch { stream, func, early, addresses: Box::new([0; MAX_ARGS]), args: Vec::with_capacity(MAX_ARGS) }
    }

    /// The next argument: a scalar or plain struct by reference, a device buffer by address.
    pub(crate) fn arg(&mut self, a: impl Arg<'a>) -> &mut Self {
        assert!(self.args.len() < MAX_ARGS, "more than {MAX_ARGS} kernel arguments");
        a.push(self);
        self
    }

    fn push_value<T>(&mut self, v: &'a T) {
        self.args.push(v as *const T as *mut c_void);
    }

    fn push_address(&mut self, address: u64) {
        let i = self.args.len();
        self.addresses[i] = address;
        self.args.push((&mut self.addresses[i]) as *mut u64 as *mut c_void);
    }

    /// Queues the kernel.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number, order and type, and the
    /// buffers must be large enough for what the kernel reads and writes.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), DriverError> {
        self.stream.context().bind_to_thread()?;
        // SAFETY: a zeroed attribute is a valid value of the C struct; the fields are set below.
        let mut attr: CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id = CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attr,
            numAttrs: self.early as u32,
        };
        // SAFETY: `config` and `attr` outlive the call; the argument pointers point at values
        // borrowed for 'a or into `addresses`; the caller vouches for their types.
        unsafe { sys::cuLaunchKernelEx(&config, self.func.cu_function(), self.args.as_mut_ptr(), std::ptr::null_mut()) }
            .result()
    }
}

/// What a kernel argument may be.
pub(crate) trait Arg<'a> {
    fn push(self, l: &mut Launch<'a>);
}

macro_rules! value_args {
    ($($t:ty),*) => {$(
        impl<'a> Arg<'a> for &'a $t {
            fn push(self, l: &mut Launch<'a>) {
                l.push_value(self)
            }
        }
    )*};
}
value_args!(i32, u32, u64, f32, f64, crate::device::MoeSlotsArg);

// Event tracking is off (see `Gpu::new`), so the guards of `device_ptr` have nothing to record.
impl<'a, T> Arg<'a> for &CudaSlice<T> {
    fn push(self, l: &mut Launch<'a>) {
        l.push_address(self.device_ptr(l.stream).0)
    }
}

impl<'a, T> Arg<'a> for &mut CudaSlice<T> {
    fn push(self, l: &mut Launch<'a>) {
        l.push_address(self.device_ptr(l.stream).0)
    }
}

impl<'a, T> Arg<'a> for &CudaView<'_, T> {
    fn push(self, l: &mut Launch<'a>) {
        l.push_address(self.device_ptr(l.stream).0)
    }
}

impl<'a, T> Arg<'a> for &mut CudaViewMut<'_, T> {
    fn push(self, l: &mut Launch<'a>) {
        l.push_address(self.device_ptr(l.stream).0)
    }
}
