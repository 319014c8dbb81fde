//! Decode steps recorded once as CUDA graphs and replayed for later tokens. A step is a few hundred
//! small launches; queued one by one, the GPU idles between the short ones while the host issues
//! the next. A replay is a single launch of the whole step.
//!
//! A replay re-runs the recorded kernels with the recorded arguments, so everything a step touches
//! must keep its address (weights, caches, scratch), and what changes from one step to the next,
//! the token id and its position, is read by the kernels from device memory ([`StepInputs`]). The
//! first node of a recorded step copies those two values from page-locked host memory, which each
//! replay rewrites first.

use crate::{Context, Gpu, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaView, DevicePtr, PinnedHostSlice};
use std::sync::Mutex;

/// A decode step's token id and position: where the kernels read them, and the page-locked host
/// memory they are copied from.
pub struct StepInputs {
    host: Mutex<PinnedHostSlice<u32>>,
    /// The host side's address, taken once: reading it from the slice waits on an event, which a
    /// recording does not allow.
    host_addr: usize,
    device: CudaSlice<u32>,
}

impl StepInputs {
    /// The token id, on the device (one value).
    pub fn token(&self) -> CudaView<'_, u32> {
        self.device.slice(0..1)
    }

    /// The token's position, on the device (one value).
    pub fn position(&self) -> CudaView<'_, u32> {
        self.device.slice(1..2)
    }
}

/// A recorded decode step.
pub struct StepGraph(CudaGraph);

// SAFETY: a graph is used by one thread at a time: the engine's backend replays it under the
// session that owns it, and cudarc's handle holds only driver objects and its stream.
unsafe impl Send for StepGraph {}

impl Gpu {
    pub fn step_inputs(&self) -> Result<StepInputs> {
        // SAFETY: u32 accepts any bits; the host side is written before every copy.
        let mut host = unsafe { self.ctx.alloc_pinned::<u32>(2) }.what("allocating pinned memory")?;
        let host_addr = host.as_mut_ptr().what("reading pinned memory")? as usize;
        let device = self.stream.alloc_zeros::<u32>(2).what("allocating")?;
        Ok(StepInputs { host: Mutex::new(host), host_addr, device })
    }

    /// Writes the token and position that the next [`queue_step_inputs`](Self::queue_step_inputs)
    /// (or the replay of a step that recorded it) copies to the device.
    pub fn set_step_inputs(&self, s: &StepInputs, token: u32, position: u32) -> Result<()> {
        // A step queued earlier may not have copied the previous values yet.
        self.synchronize()?;
        let mut host = s.host.lock().unwrap();
        host.as_mut_slice().what("writing pinned memory")?.copy_from_slice(&[token, position]);
        Ok(())
    }

    /// Queues the copy of the step's inputs from host to device memory (a node of a recording).
    pub fn queue_step_inputs(&self, s: &StepInputs) -> Result<()> {
        let (dst, _sync) = s.device.device_ptr(&self.stream);
        // SAFETY: both buffers hold two u32 and outlive the copy (and any graph recording it:
        // they belong to the backend that owns the graphs); the pinned memory is read when the
        // copy runs, so a replay sees the values written just before it. A raw copy, because
        // cudarc's pinned-memory copy waits on the buffer's event, which a recording cannot do.
        unsafe {
            let src = std::slice::from_raw_parts(s.host_addr as *const u32, 2);
            cudarc::driver::result::memcpy_htod_async(dst, src, self.stream.cu_stream())
        }
        .what("copying the step inputs")
    }

    /// Records what `body` queues on the stream as a graph, instead of running it. The graph is
    /// `None` when the recording failed; `body`'s own result is returned as it is.
    pub fn record<T, E>(
        &self,
        body: impl FnOnce() -> std::result::Result<T, E>,
    ) -> Result<(std::result::Result<T, E>, Option<StepGraph>)> {
        // Thread-local: calls that would wait for the device fail on this thread while it records,
        // and the store's I/O threads (pinned allocations) are unaffected.
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .what("starting a recording")?;
        let out = body();
        // Ended even when the body failed, so that the stream runs work again.
        let graph = self.stream.end_capture(CUgraphInstantiate_flags(0));
        let graph = match (&out, graph) {
            (Ok(_), g) => g.what("instantiating a recorded step")?,
            (Err(_), _) => None,
        };
        Ok((out, graph.map(StepGraph)))
    }

    /// Queues a recorded step (its inputs as last [set](Self::set_step_inputs)).
    pub fn replay(&self, g: &StepGraph) -> Result<()> {
        g.0.launch().what("launching a recorded step")
    }
}
