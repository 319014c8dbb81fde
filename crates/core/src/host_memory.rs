//! Where the expert store's read buffers come from: the heap by default, or an allocator a device
//! backend provides (page-locked memory that the GPU can copy from without staging).
//!
//! The trait lives here, below both the store (which allocates through it) and the CUDA crate
//! (which implements it), so that neither depends on the other.

use std::fmt::Debug;
use std::ptr::NonNull;

/// Alignment every [`HostMemory::alloc`] must give: a page, which is also what `O_DIRECT` reads
/// need of their buffers.
pub const HOST_MEMORY_ALIGN: usize = 4096;

/// An allocator of host memory for expert buffers. Called from any thread (the store's I/O
/// threads allocate, whoever drops the last use of a buffer frees).
pub trait HostMemory: Send + Sync + Debug {
    /// `len` bytes (`len > 0`), uninitialised, aligned to [`HOST_MEMORY_ALIGN`]; `None` when this
    /// allocator can't give them (the caller then uses the heap).
    fn alloc(&self, len: usize) -> Option<NonNull<u8>>;

    /// Gives back memory from [`alloc`](Self::alloc).
    ///
    /// # Safety
    /// `ptr` was returned by `alloc(len)` of this allocator with this same `len`, has not been
    /// freed since, and is not used after this call.
    unsafe fn free(&self, ptr: NonNull<u8>, len: usize);
}
