//! Decode steps recorded once as CUDA graphs and replayed for later tokens. A step is a few hundred
//! small launches; queued one by one, the GPU idles between the short ones while the host issues
//! the next. A replay is a single launch of the whole step.
//!
//! A replay re-runs the recorded kernels with the recorded arguments, so everything a step touches
//! must keep its address (weights, caches, scratch), and what changes from one step to the next,
//! the token id and its position, is read by the kernels from device memory ([`StepChannel`]).
//! The first kernel of a recorded step (`step_gate`, elementwise.cu) waits until the host has
//! written those values to page-locked memory ([`Gpu::feed_step`]), which may be long after the
//! step was queued: greedy decoding queues step n + 1 before step n's pick is back, so that the
//! device goes from one step to the next without waiting for the host to launch a graph (100 us
//! and more for a few hundred kernels). A step the host lets pass instead (generation stopped)
//! runs with its live flag off, and the kernels that write a recurrent state or a cache then leave
//! it as it was.

use crate::{Context, Gpu, Result};
use cudarc::driver::sys::{self, CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaEvent, CudaGraph, CudaSlice, CudaView, DevicePtr, PinnedHostSlice};
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

/// Input slots in page-locked memory (`STEP_SLOTS` in elementwise.cu): step n reads slot
/// n % STEP_SLOTS, so the host may feed a step before the one ahead of it has read its own.
const STEP_SLOTS: u32 = 4;
/// Words of a slot: token, position, live, sequence number.
const SLOT_WORDS: usize = 4;
/// The page of host memory the channel's slots and picks share: the driver carves smaller
/// page-locked blocks out of shared pages, which would leave later whole-page allocations (the
/// expert store's, for direct I/O) unaligned.
const PAGE_WORDS: usize = 4096 / 8;
/// Where the picks start in the page, in u64 words (after the slots and the acknowledgement).
const PICKS_AT: usize = 16;
/// How long feeding a step waits for its slot to be read by the step STEP_SLOTS ahead of it (at
/// most a step's time in any caller; a stuck device otherwise).
const SLOT_WAIT: Duration = Duration::from_secs(10);

/// How the host and the recorded steps pass values: each step's inputs in, its greedy pick out.
pub struct StepChannel {
    /// One page-locked page mapped into the device's address space: the input slots, then the
    /// sequence number of the last step whose gate read its slot; from [`PICKS_AT`], the picks.
    /// Used through the addresses below (taken once: reading them from the slice waits on an
    /// event, which a recording does not allow).
    _page: PinnedHostSlice<u64>,
    slots_host: usize,
    slots_device: u64,
    /// Token, position, live flag and sequence number of the step that runs (its gate writes
    /// them), and the live flag's address.
    device: CudaSlice<u32>,
    live: u64,
    /// The sequence number of the last step queued.
    queued: AtomicU32,
    /// The greedy pick's key on the device, copied to pick n % 2 for step n, there when
    /// `picked[n % 2]` has passed.
    key: CudaSlice<u64>,
    picks_host: usize,
    picked: [CudaEvent; 2],
}

impl StepChannel {
    /// The token id, on the device (one value).
    pub fn token(&self) -> CudaView<'_, u32> {
        self.device.slice(0..1)
    }

    /// The token's position, on the device (one value).
    pub fn position(&self) -> CudaView<'_, u32> {
        self.device.slice(1..2)
    }

    /// The device address of the step's live flag, for the kernels that write state.
    pub fn live(&self) -> u64 {
        self.live
    }

    fn slot_word(&self, i: usize) -> *mut u32 {
        assert!(i <= STEP_SLOTS as usize * SLOT_WORDS);
        (self.slots_host as *mut u32).wrapping_add(i)
    }

    /// The sequence number of the last step whose gate read its inputs.
    fn acknowledged(&self) -> u32 {
        // SAFETY: the word lies inside `slots` (page-locked, alive as long as `self`); the device
        // writes it, hence the volatile read.
        unsafe { self.slot_word(STEP_SLOTS as usize * SLOT_WORDS).read_volatile() }
    }
}

/// A recorded decode step.
pub struct StepGraph(CudaGraph);

// SAFETY: a graph is used by one thread at a time: the engine's backend replays it under the
// session that owns it, and cudarc's handle holds only driver objects and its stream.
unsafe impl Send for StepGraph {}

impl Gpu {
    pub fn step_channel(&self) -> Result<StepChannel> {
        const { assert!((STEP_SLOTS as usize * SLOT_WORDS + 1).div_ceil(2) <= PICKS_AT) };
        // Cached (not write-combined) memory: the host reads the acknowledgements and picks.
        // SAFETY: u64 accepts any bits; the page is zeroed below before any use.
        let mut page = unsafe { self.ctx.alloc_pinned_with_flags::<u64>(PAGE_WORDS, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .what("allocating pinned memory")?;
        page.as_mut_slice().what("writing pinned memory")?.fill(0);
        let slots_host = page.as_mut_ptr().what("reading pinned memory")? as usize;
        let mut slots_device = 0;
        // SAFETY: the pointer is the start of a mapped page-locked allocation.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut slots_device, slots_host as *mut _, 0) }
            .result()
            .what("mapping pinned memory")?;
        let picks_host = slots_host + PICKS_AT * 8;
        let picked = [self.ctx.new_event(None), self.ctx.new_event(None)];
        let [a, b] = picked;
        let device = self.stream.alloc_zeros::<u32>(SLOT_WORDS).what("allocating")?;
        let live = device.device_ptr(&self.stream).0 + 2 * 4;
        Ok(StepChannel {
            _page: page,
            slots_host,
            slots_device,
            device,
            live,
            queued: AtomicU32::new(0),
            key: self.stream.alloc_zeros::<u64>(1).what("allocating")?,
            picks_host,
            picked: [a.what("creating an event")?, b.what("creating an event")?],
        })
    }

    /// Queues the gate that waits for a step's inputs (the first node of a recording).
    pub fn queue_step_gate(&self, s: &StepChannel) -> Result<()> {
        // Not an early launch: the step's first kernel must start after everything ahead of it.
        let mut b = crate::launch::Launch::new(&self.stream, self.f("step_gate"), false);
        b.arg(&s.slots_device).arg(&s.device);
        let one = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: `slots` holds the slots and the acknowledgement, `device` four words.
        unsafe { b.launch(one) }.what("launching step_gate")
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

    /// Queues a recorded step, which waits on the device for its inputs ([`feed_step`]), and
    /// returns its sequence number. Every step queued must be fed, in order: the ones after it
    /// wait for it.
    ///
    /// [`feed_step`]: Self::feed_step
    pub fn replay(&self, s: &StepChannel, g: &StepGraph) -> Result<u32> {
        g.0.launch().what("launching a recorded step")?;
        Ok(s.queued.fetch_add(1, Ordering::Relaxed).wrapping_add(1))
    }

    /// Gives step `seq` its token and position, or with `None` lets it pass, leaving every state
    /// as it was. Waits only when the step STEP_SLOTS ahead has not read its slot yet.
    pub fn feed_step(&self, s: &StepChannel, seq: u32, inputs: Option<(u32, u32)>) -> Result<()> {
        let start = Instant::now();
        while seq.wrapping_sub(s.acknowledged()) > STEP_SLOTS {
            if start.elapsed() > SLOT_WAIT {
                self.ctx.check_err().what("an earlier asynchronous call")?;
                return Err(crate::Error::Unsupported(format!(
                    "recorded step {seq}: the steps ahead of it did not start within {SLOT_WAIT:?}"
                )));
            }
            std::thread::yield_now();
        }
        let (token, position, live) = match inputs {
            Some((token, position)) => (token, position, 1),
            None => (0, 0, 0),
        };
        let at = (seq % STEP_SLOTS) as usize * SLOT_WORDS;
        // SAFETY: the words lie inside `slots`; the step that last used this slot has read it
        // (acknowledged above), and the gate reads the values only after the sequence number,
        // which is written last, after a fence.
        unsafe {
            s.slot_word(at).write_volatile(token);
            s.slot_word(at + 1).write_volatile(position);
            s.slot_word(at + 2).write_volatile(live);
            fence(Ordering::Release);
            s.slot_word(at + 3).write_volatile(seq);
        }
        Ok(())
    }

    /// Queues the greedy pick over the first `len` values of `t` (the logits of step `seq`), to be
    /// taken by [`take_pick`](Self::take_pick).
    pub fn queue_pick(&self, s: &StepChannel, seq: u32, t: &CudaSlice<f32>, len: usize) -> Result<()> {
        let key = s.key.device_ptr(&self.stream).0;
        self.queue_argmax(t, len, key)?;
        let slot = (seq % 2) as usize;
        // SAFETY: one u64 from the key to a page-locked slot that lives as long as `s`; the host
        // reads it only after the event recorded behind the copy has passed.
        unsafe {
            let dst = std::slice::from_raw_parts_mut((s.picks_host as *mut u64).add(slot), 1);
            cudarc::driver::result::memcpy_dtoh_async(dst, key, self.stream.cu_stream())
        }
        .what("copying to the host")?;
        s.picked[slot].record(&self.stream).what("recording an event")
    }

    /// Waits for the pick queued for step `seq` (the last or the one before it).
    pub fn take_pick(&self, s: &StepChannel, seq: u32) -> Result<u32> {
        let slot = (seq % 2) as usize;
        s.picked[slot].synchronize().what("waiting for a step")?;
        self.ctx.check_err().what("an earlier asynchronous call")?;
        // SAFETY: the slot lies in `picks`; the copy into it has ended (the event passed).
        Ok(crate::device::key_index(unsafe { (s.picks_host as *const u64).add(slot).read_volatile() }))
    }
}
