//! Page-locked host memory for the expert store's buffers ([`PinnedPool`]): disk reads land in it
//! and the copy engine reads it straight into device memory, with no staging copy
//! (`experts.rs`).
//!
//! `cuMemHostAlloc` is slow (it pins page by page), so freed buffers are kept in a free list per
//! size and handed out again: the store's buffers are all of one or a few sizes, and in the steady
//! state nothing is allocated from the driver. Everything goes back to the driver when the pool is
//! dropped, which happens only after every buffer has been freed: each buffer holds the pool.

use crate::Gpu;
use cudarc::driver::{CudaContext, result, sys};
use moe_core::{HOST_MEMORY_ALIGN, HostMemory};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, Weak};

/// Page-locked host memory of one CUDA context, usable from any thread; see the module docs.
pub struct PinnedPool {
    ctx: Arc<CudaContext>,
    state: Mutex<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// Every allocation from the driver, handed out or free: start address -> length.
    all: BTreeMap<usize, usize>,
    /// Free allocations by length.
    free: HashMap<usize, Vec<usize>>,
    free_bytes: usize,
    total_bytes: usize,
}

/// Bytes of a [`PinnedPool`]: from the driver, and free for reuse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinnedStats {
    pub total_bytes: usize,
    pub free_bytes: usize,
}

impl PinnedPool {
    fn new(ctx: Arc<CudaContext>) -> Self {
        PinnedPool { ctx, state: Mutex::new(PoolState::default()) }
    }

    /// Makes the pool's context current on this thread. Unlike `CudaContext::bind_to_thread`, this
    /// leaves cudarc's recorded asynchronous errors for the code that checks them.
    fn bind(&self) -> bool {
        let cu = self.ctx.cu_ctx();
        match result::ctx::get_current() {
            Ok(Some(current)) if current == cu => true,
            // SAFETY: the context is alive (we hold it).
            Ok(_) => unsafe { result::ctx::set_current(cu) }.is_ok(),
            Err(_) => false,
        }
    }

    /// Whether `ptr..ptr + len` lies in one allocation of this pool.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let p = ptr as usize;
        let Some(end) = p.checked_add(len) else { return false };
        let s = self.state.lock().unwrap();
        s.all.range(..=p).next_back().is_some_and(|(&start, &n)| end <= start + n)
    }

    pub fn stats(&self) -> PinnedStats {
        let s = self.state.lock().unwrap();
        PinnedStats { total_bytes: s.total_bytes, free_bytes: s.free_bytes }
    }
}

impl HostMemory for PinnedPool {
    fn alloc(&self, len: usize) -> Option<NonNull<u8>> {
        if len == 0 {
            return None;
        }
        {
            let mut s = self.state.lock().unwrap();
            if let Some(p) = s.free.get_mut(&len).and_then(Vec::pop) {
                s.free_bytes -= len;
                return NonNull::new(p as *mut u8);
            }
        }
        // From the driver, outside the lock (slow). Not write-combined, which would make reading
        // the buffers on the host very slow.
        if !self.bind() {
            return None;
        }
        // SAFETY: a plain allocation; the memory is uninitialised, as `alloc` promises.
        let p = unsafe { result::malloc_host(len, sys::CU_MEMHOSTALLOC_PORTABLE) }.ok()? as *mut u8;
        let ptr = NonNull::new(p)?;
        if !(p as usize).is_multiple_of(HOST_MEMORY_ALIGN) {
            // SAFETY: just allocated by `malloc_host`, never used.
            let _ = unsafe { result::free_host(p.cast()) };
            return None;
        }
        let mut s = self.state.lock().unwrap();
        s.all.insert(p as usize, len);
        s.total_bytes += len;
        Some(ptr)
    }

    unsafe fn free(&self, ptr: NonNull<u8>, len: usize) {
        let p = ptr.as_ptr() as usize;
        let mut s = self.state.lock().unwrap();
        debug_assert_eq!(s.all.get(&p), Some(&len), "freeing memory this pool did not hand out");
        s.free.entry(len).or_default().push(p);
        s.free_bytes += len;
    }
}

impl Drop for PinnedPool {
    fn drop(&mut self) {
        // Every buffer handed out holds the pool, so all of them are free by now.
        let all = std::mem::take(&mut self.state.get_mut().unwrap_or_else(|e| e.into_inner()).all);
        if all.is_empty() || !self.bind() {
            return;
        }
        for &p in all.keys() {
            // SAFETY: allocated by `malloc_host` in `alloc`, freed once, here.
            let _ = unsafe { result::free_host(p as *mut std::ffi::c_void) };
        }
    }
}

impl fmt::Debug for PinnedPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.stats();
        write!(f, "PinnedPool({} bytes pinned, {} free)", s.total_bytes, s.free_bytes)
    }
}

/// The pools alive, one per context (see [`Gpu::pinned_pool`]).
static POOLS: Mutex<Vec<Weak<PinnedPool>>> = Mutex::new(Vec::new());

impl Gpu {
    /// The page-locked host memory pool of this GPU: the same pool on every call while anything
    /// holds it (the expert tier does, so the store's buffers and the tier's checks agree). Pass
    /// it to the expert store as its host memory so that uploads need no staging copy.
    pub fn pinned_pool(&self) -> Arc<PinnedPool> {
        let mut pools = POOLS.lock().unwrap_or_else(|e| e.into_inner());
        pools.retain(|w| w.strong_count() > 0);
        if let Some(p) = pools.iter().filter_map(Weak::upgrade).find(|p| Arc::ptr_eq(&p.ctx, &self.ctx)) {
            return p;
        }
        let p = Arc::new(PinnedPool::new(self.ctx.clone()));
        pools.push(Arc::downgrade(&p));
        p
    }
}
