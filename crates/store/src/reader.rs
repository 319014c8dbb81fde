//! The expert store's disk reads: `pread` of a [`ReadPlan`]'s extents into one 4096-aligned buffer,
//! with `O_DIRECT` where the layout and the filesystem allow it and the page cache otherwise.
//!
//! A read is split into chunks of at most [`READ_CHUNK`] bytes ([`PendingRead`]), which several
//! threads may read at the same time (each chunk is one `pread` into its own part of the buffer).
//! The buffer comes from the store's [`HostMemory`] when it has one, else from the heap.
//!
//! `O_DIRECT` is tried when the store is asked for it and the layout supports it. A filesystem that
//! refuses it (`EINVAL` when opening or reading) turns it off for the whole store, with one notice
//! on stderr; the chunk that found out is read again through the page cache. A short `O_DIRECT`
//! read (the end of a truncated file) is finished through the page cache, so that the error says
//! the file is truncated rather than that `O_DIRECT` failed.

use crate::StoreError;
use crate::layout::{DIRECT_ALIGN, ReadPlan};
use moe_core::HostMemory;
use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The most bytes one thread reads of an expert at a time. An expert of a real model is megabytes
/// (7 MB for Qwen3.5-397B at 4 bits); read whole by one thread each, the last experts of a batch
/// leave most I/O threads idle and the disk's queue half empty. In chunks of 1 MiB every thread
/// stays busy to the end of the batch, while each `pread` is still large enough for the disk's
/// full bandwidth. A multiple of [`DIRECT_ALIGN`], so chunks of an `O_DIRECT` extent stay aligned.
pub const READ_CHUNK: usize = 1 << 20;

const _: () = assert!(READ_CHUNK.is_multiple_of(DIRECT_ALIGN) && DIRECT_ALIGN == moe_core::HOST_MEMORY_ALIGN);

/// An uninitialised allocation of `len` bytes aligned to [`DIRECT_ALIGN`], from a [`HostMemory`]
/// or the heap; freed through whichever gave it.
struct RawBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// The allocator it came from; `None` for the heap.
    memory: Option<Arc<dyn HostMemory>>,
}

impl RawBuf {
    fn new(len: usize, memory: Option<&Arc<dyn HostMemory>>) -> Self {
        if len == 0 {
            // A dangling pointer with the alignment, never dereferenced for a non-empty slice.
            return RawBuf { ptr: NonNull::new(DIRECT_ALIGN as *mut u8).expect("non-null"), len, memory: None };
        }
        if let Some(m) = memory
            && let Some(ptr) = m.alloc(len)
        {
            if (ptr.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
                return RawBuf { ptr, len, memory: Some(m.clone()) };
            }
            // A broken allocator: give it back and use the heap.
            // SAFETY: just allocated by `m` with this length, never used.
            unsafe { m.free(ptr, len) };
        }
        let layout = Layout::from_size_align(len, DIRECT_ALIGN).expect("expert buffer size fits a Layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        RawBuf { ptr, len, memory: None }
    }

    /// Sets `range` to zero.
    fn zero(&mut self, start: usize, end: usize) {
        assert!(start <= end && end <= self.len);
        // SAFETY: in bounds (checked above) of our own allocation.
        unsafe { self.ptr.as_ptr().add(start).write_bytes(0, end - start) }
    }
}

impl Drop for RawBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        match &self.memory {
            // SAFETY: allocated in `new` by this allocator with this length; dropped once.
            Some(m) => unsafe { m.free(self.ptr, self.len) },
            // SAFETY: allocated in `new` with exactly this layout.
            None => unsafe {
                alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, DIRECT_ALIGN))
            },
        }
    }
}

/// A read buffer of one expert: 4096-aligned, every byte initialised (read from disk or zeroed),
/// immutable once made. Shared as the owner of the [`Bytes`](moe_core::Bytes) windows the expert's
/// matrices are.
pub struct AlignedBuf(RawBuf);

// SAFETY: an owned allocation, only read through shared references once built (the allocator
// handle is `Send + Sync`).
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; there is no interior mutability.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `AlignedBuf` is only made by `PendingRead::finish` once every byte is written.
        unsafe { std::slice::from_raw_parts(self.0.ptr.as_ptr(), self.0.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.0.len)
    }
}

/// `len` bytes of extent `ext` of a plan, from `skip` bytes into it: what one thread reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk {
    ext: usize,
    skip: usize,
    len: usize,
}

/// One expert's read in progress: the buffer and the chunks the plan splits into. Each chunk
/// writes its own part of the buffer, so different threads may read different chunks at once;
/// [`finish`](Self::finish) makes the buffer once all are read.
pub(crate) struct PendingRead {
    buf: RawBuf,
    plan: ReadPlan,
    chunks: Vec<Chunk>,
    layer: usize,
    expert: usize,
    direct: bool,
}

// SAFETY: the buffer is written only through `Reader::read_chunk`, whose contract gives each chunk
// (a disjoint range of the buffer) to one thread at a time; nothing reads the buffer before
// `finish`, which takes the read by value.
unsafe impl Send for PendingRead {}
// SAFETY: as above.
unsafe impl Sync for PendingRead {}

impl PendingRead {
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    pub fn plan(&self) -> &ReadPlan {
        &self.plan
    }

    /// The buffer, with what no extent covered zeroed, so that every byte is initialised. Call
    /// once every chunk is read.
    pub fn finish(self) -> AlignedBuf {
        let mut buf = self.buf;
        let mut covered: Vec<(usize, usize)> = self.plan.extents.iter().map(|e| (e.at, e.at + e.len)).collect();
        covered.sort_unstable();
        let mut cursor = 0;
        for (start, end) in covered {
            if start > cursor {
                buf.zero(cursor, start);
            }
            cursor = cursor.max(end);
        }
        buf.zero(cursor, self.plan.buf_len);
        AlignedBuf(buf)
    }
}

struct ReadFile {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
}

/// The open files of a layout, whether `O_DIRECT` is in use, and where buffers come from.
pub(crate) struct Reader {
    files: Vec<ReadFile>,
    direct: AtomicBool,
    memory: Option<Arc<dyn HostMemory>>,
    /// Tests: make `O_DIRECT` reads fail with `EINVAL`, as a refusing filesystem does.
    #[cfg(test)]
    pub refuse_direct_reads: AtomicBool,
    /// Tests: sleep this many milliseconds before each chunk, and note which thread read it.
    #[cfg(test)]
    pub chunk_delay_ms: std::sync::atomic::AtomicU64,
    #[cfg(test)]
    pub chunk_threads: std::sync::Mutex<Vec<std::thread::ThreadId>>,
}

impl Reader {
    /// Opens `paths` for reading; with `O_DIRECT` as well when `direct`. Buffers come from
    /// `memory`, or the heap.
    pub fn open(paths: &[PathBuf], direct: bool, memory: Option<Arc<dyn HostMemory>>) -> Result<Self, StoreError> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let buffered = File::open(path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
            files.push(ReadFile { path: path.clone(), buffered, direct: None });
        }
        let reader = Reader {
            files,
            direct: AtomicBool::new(direct),
            memory,
            #[cfg(test)]
            refuse_direct_reads: AtomicBool::new(false),
            #[cfg(test)]
            chunk_delay_ms: Default::default(),
            #[cfg(test)]
            chunk_threads: Default::default(),
        };
        if direct {
            let mut opened = Vec::with_capacity(paths.len());
            for path in paths {
                match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
                    Ok(f) => opened.push(f),
                    Err(e) => {
                        reader.refuse(path, &e);
                        return Ok(reader);
                    }
                }
            }
            let mut reader = reader;
            for (f, d) in reader.files.iter_mut().zip(opened) {
                f.direct = Some(d);
            }
            return Ok(reader);
        }
        Ok(reader)
    }

    /// Whether reads use `O_DIRECT` (asked for, and not refused so far).
    pub fn direct(&self) -> bool {
        self.direct.load(Ordering::Relaxed)
    }

    /// Turns `O_DIRECT` off, saying so the first time.
    fn refuse(&self, path: &Path, e: &io::Error) {
        if self.direct.swap(false, Ordering::Relaxed) {
            eprintln!(
                "flash-moe: the filesystem of {} refuses O_DIRECT ({e}); reading experts through the page cache",
                path.display()
            );
        }
    }

    /// A buffer of `len` bytes, from the same memory as the reads', made from elsewhere than the
    /// disk: `fill` writes the disjoint byte ranges `parts` (it is given the whole buffer), and
    /// every other byte is zeroed. `None` if `fill` fails.
    pub fn filled(
        &self,
        len: usize,
        parts: &[Range<usize>],
        fill: &mut dyn FnMut(&mut [MaybeUninit<u8>]) -> bool,
    ) -> Option<AlignedBuf> {
        let mut buf = RawBuf::new(len, self.memory.as_ref());
        let mut sorted = parts.to_vec();
        sorted.sort_by_key(|r| r.start);
        let mut at = 0;
        for r in sorted.iter().chain(std::iter::once(&(len..len))) {
            assert!(r.start <= r.end && r.end <= len, "part {r:?} outside {len} bytes");
            if r.start > at {
                buf.zero(at, r.start);
            }
            at = at.max(r.end);
        }
        // SAFETY: our own allocation of `len` bytes; `MaybeUninit` needs no initialised bytes.
        let bytes = unsafe { std::slice::from_raw_parts_mut(buf.ptr.as_ptr().cast::<MaybeUninit<u8>>(), len) };
        // The parts are initialised only if `fill` says it wrote them.
        fill(bytes).then_some(AlignedBuf(buf))
    }

    /// Starts reading `plan` (made for expert `expert` of layer `layer`, with `O_DIRECT` if
    /// `direct`): allocates the buffer and splits the extents into chunks of at most `chunk`
    /// bytes (a multiple of [`DIRECT_ALIGN`]). Panics if an extent lies outside the buffer or
    /// names no file (a layout bug).
    pub fn start(&self, plan: ReadPlan, layer: usize, expert: usize, direct: bool, chunk: usize) -> PendingRead {
        assert!(chunk > 0 && chunk.is_multiple_of(DIRECT_ALIGN), "chunk size {chunk}");
        let mut chunks = Vec::new();
        for (i, ext) in plan.extents.iter().enumerate() {
            assert!(
                ext.at.checked_add(ext.len).is_some_and(|end| end <= plan.buf_len) && ext.file < self.files.len(),
                "extent {ext:?} outside a {}-byte buffer or its {} files",
                plan.buf_len,
                self.files.len()
            );
            chunks.extend((0..ext.len).step_by(chunk).map(|skip| Chunk {
                ext: i,
                skip,
                len: chunk.min(ext.len - skip),
            }));
        }
        let buf = RawBuf::new(plan.buf_len, self.memory.as_ref());
        PendingRead { buf, plan, chunks, layer, expert, direct }
    }

    /// Reads chunk `i` of `read`. A read past the end of a file is a [`StoreError::Corrupt`]
    /// naming the file and the expert.
    ///
    /// # Safety
    /// No other thread reads chunk `i` of `read` at the same time.
    pub unsafe fn read_chunk(&self, read: &PendingRead, i: usize) -> Result<(), StoreError> {
        #[cfg(test)]
        {
            let ms = self.chunk_delay_ms.load(Ordering::Relaxed);
            if ms > 0 {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            self.chunk_threads.lock().unwrap().push(std::thread::current().id());
        }
        let c = read.chunks[i];
        let ext = read.plan.extents[c.ext];
        let file = &self.files[ext.file];
        let (offset, len) = (ext.offset + c.skip as u64, c.len);
        // SAFETY: in bounds (checked in `start`); this chunk's bytes are ours alone (the contract).
        let dst = unsafe { read.buf.ptr.as_ptr().add(ext.at + c.skip) };
        let mut done = 0;
        let aligned = (dst as usize).is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64)
            && len.is_multiple_of(DIRECT_ALIGN);
        if let Some(d) = file.direct.as_ref().filter(|_| read.direct && aligned && self.direct()) {
            #[cfg(test)]
            let refused = self.refuse_direct_reads.load(Ordering::Relaxed);
            #[cfg(not(test))]
            let refused = false;
            let r = if refused {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                // SAFETY: `dst..dst + len` lies in the buffer.
                unsafe { pread_full(d, dst, len, offset, true) }
            };
            match r {
                Ok(n) => done = n,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.refuse(&file.path, &e),
                Err(source) => return Err(StoreError::Io { path: file.path.clone(), source }),
            }
        }
        if done < len {
            // SAFETY: `dst + done..dst + len` lies in the buffer.
            let n = unsafe { pread_full(&file.buffered, dst.add(done), len - done, offset + done as u64, false) }
                .map_err(|source| StoreError::Io { path: file.path.clone(), source })?;
            if done + n < len {
                return Err(StoreError::Corrupt {
                    file: file.path.clone(),
                    why: format!(
                        "truncated: expert {} of layer {} lies at bytes {}..{}, past the end of the file",
                        read.expert,
                        read.layer,
                        ext.offset,
                        ext.offset + ext.len as u64
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads `plan` whole on this thread, in chunks of [`READ_CHUNK`].
    #[cfg(test)]
    pub fn read(&self, plan: &ReadPlan, layer: usize, expert: usize, direct: bool) -> Result<AlignedBuf, StoreError> {
        let read = self.start(plan.clone(), layer, expert, direct, READ_CHUNK);
        for i in 0..read.chunks() {
            // SAFETY: one thread reads every chunk, one after the other.
            unsafe { self.read_chunk(&read, i)? };
        }
        Ok(read.finish())
    }
}

/// `pread`s up to `len` bytes at `offset` into `dst`, retrying on `EINTR` and after short reads
/// (unless `stop_short`, for `O_DIRECT`, whose next offset would be unaligned). Returns the bytes
/// read: fewer than `len` only at the end of the file (or after a short read with `stop_short`).
///
/// # Safety
/// `dst..dst + len` must be writable memory.
unsafe fn pread_full(file: &File, dst: *mut u8, len: usize, offset: u64, stop_short: bool) -> io::Result<usize> {
    let fd = file.as_raw_fd();
    let mut done = 0;
    while done < len {
        let want = (len - done).min(1 << 30);
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset out of range"))?;
        // SAFETY: the caller guarantees `dst..dst + len` is writable.
        let r = unsafe { libc::pread(fd, dst.add(done).cast(), want, at) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        done += r as usize;
        if stop_short && (r as usize) < want {
            break;
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Extent;

    fn file_with(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        let path = dir.join(name);
        std::fs::write(&path, &data).unwrap();
        (path, data)
    }

    #[test]
    fn extents_land_where_planned_and_gaps_are_zero() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, da) = file_with(tmp.path(), "a", 10_000);
        let (b, db) = file_with(tmp.path(), "b", 300);
        let r = Reader::open(&[a, b], false, None).unwrap();
        let plan = ReadPlan {
            extents: vec![
                Extent { file: 0, offset: 5, len: 100, at: 0 },
                Extent { file: 1, offset: 200, len: 100, at: 128 },
            ],
            buf_len: 300,
        };
        let buf = r.read(&plan, 0, 0, false).unwrap();
        let v = buf.as_ref();
        assert_eq!(v.as_ptr() as usize % DIRECT_ALIGN, 0);
        assert_eq!(&v[..100], &da[5..105]);
        assert!(v[100..128].iter().all(|&x| x == 0));
        assert_eq!(&v[128..228], &db[200..300]);
        assert!(v[228..].iter().all(|&x| x == 0));
    }

    #[test]
    fn reads_past_the_end_name_file_and_expert() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, _) = file_with(tmp.path(), "layer_000.bin", 3 * 4096);
        for direct in [false, true] {
            let r = Reader::open(std::slice::from_ref(&a), direct, None).unwrap();
            let plan = ReadPlan { extents: vec![Extent { file: 0, offset: 8192, len: 8192, at: 0 }], buf_len: 8192 };
            let msg = r.read(&plan, 4, 2, direct).unwrap_err().to_string();
            assert!(
                msg.contains("layer_000.bin") && msg.contains("truncated") && msg.contains("expert 2 of layer 4"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_refused_direct_read_falls_back_to_the_page_cache_once() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, data) = file_with(tmp.path(), "a", 4 * 4096);
        let r = Reader::open(std::slice::from_ref(&a), true, None).unwrap();
        // Whether or not this filesystem takes O_DIRECT, a refused read must still give the bytes.
        r.refuse_direct_reads.store(true, Ordering::Relaxed);
        let plan = ReadPlan { extents: vec![Extent { file: 0, offset: 4096, len: 8192, at: 0 }], buf_len: 8192 };
        let buf = r.read(&plan, 0, 1, true).unwrap();
        assert_eq!(buf.as_ref(), &data[4096..12288]);
        assert!(!r.direct(), "O_DIRECT stays off after a refusal");
        let buf = r.read(&plan, 0, 1, true).unwrap();
        assert_eq!(buf.as_ref(), &data[4096..12288]);
    }

    #[test]
    fn chunks_split_extents_and_may_be_read_by_any_thread_in_any_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, data) = file_with(tmp.path(), "a", 12 * 4096);
        for direct in [false, true] {
            let r = Reader::open(std::slice::from_ref(&a), direct, None).unwrap();
            // An aligned extent (O_DIRECT-able in whole chunks) and an unaligned one.
            let plan = ReadPlan {
                extents: vec![
                    Extent { file: 0, offset: 4096, len: 5 * 4096, at: 0 },
                    Extent { file: 0, offset: 100, len: 10_000, at: 6 * 4096 },
                ],
                buf_len: 6 * 4096 + 10_000,
            };
            let read = r.start(plan, 0, 0, direct, 2 * 4096);
            let lens: Vec<usize> = read.chunks.iter().map(|c| c.len).collect();
            assert_eq!(lens, [8192, 8192, 4096, 8192, 10_000 - 8192]);
            std::thread::scope(|scope| {
                for i in (0..read.chunks()).rev() {
                    let (r, read) = (&r, &read);
                    // SAFETY: one thread per chunk.
                    scope.spawn(move || unsafe { r.read_chunk(read, i) }.unwrap());
                }
            });
            let buf = read.finish();
            let v = buf.as_ref();
            assert_eq!(&v[..5 * 4096], &data[4096..6 * 4096]);
            assert!(v[5 * 4096..6 * 4096].iter().all(|&x| x == 0));
            assert_eq!(&v[6 * 4096..], &data[100..10_100]);
        }
    }

    /// Counts what it hands out; refuses everything when `refuse`.
    #[derive(Debug, Default)]
    struct Counting {
        refuse: bool,
        live: std::sync::Mutex<Vec<(usize, usize)>>,
    }

    impl HostMemory for Counting {
        fn alloc(&self, len: usize) -> Option<NonNull<u8>> {
            if self.refuse {
                return None;
            }
            let layout = Layout::from_size_align(len, DIRECT_ALIGN).unwrap();
            // SAFETY: `len > 0` by the trait's contract.
            let p = NonNull::new(unsafe { alloc::alloc(layout) })?;
            self.live.lock().unwrap().push((p.as_ptr() as usize, len));
            Some(p)
        }
        unsafe fn free(&self, ptr: NonNull<u8>, len: usize) {
            let mut live = self.live.lock().unwrap();
            let i = live.iter().position(|&x| x == (ptr.as_ptr() as usize, len)).expect("freed once, as allocated");
            live.swap_remove(i);
            // SAFETY: allocated in `alloc` with this layout.
            unsafe { alloc::dealloc(ptr.as_ptr(), Layout::from_size_align(len, DIRECT_ALIGN).unwrap()) }
        }
    }

    #[test]
    fn buffers_come_from_the_host_memory_and_go_back_to_it() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, data) = file_with(tmp.path(), "a", 4 * 4096);
        let plan = ReadPlan { extents: vec![Extent { file: 0, offset: 4096, len: 8192, at: 0 }], buf_len: 8192 };
        let mem = Arc::new(Counting::default());
        let r = Reader::open(std::slice::from_ref(&a), false, Some(mem.clone())).unwrap();
        let buf = r.read(&plan, 0, 1, false).unwrap();
        assert_eq!(buf.as_ref(), &data[4096..12288]);
        assert_eq!(*mem.live.lock().unwrap(), [(buf.as_ref().as_ptr() as usize, 8192)]);
        drop(buf);
        assert!(mem.live.lock().unwrap().is_empty());
        // An allocator that refuses leaves the buffer to the heap.
        let refusing = Arc::new(Counting { refuse: true, ..Default::default() });
        let r = Reader::open(std::slice::from_ref(&a), false, Some(refusing)).unwrap();
        assert_eq!(r.read(&plan, 0, 1, false).unwrap().as_ref(), &data[4096..12288]);
    }

    #[test]
    fn direct_reads_give_the_file_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, data) = file_with(tmp.path(), "a", 4 * 4096);
        let r = Reader::open(std::slice::from_ref(&a), true, None).unwrap();
        let plan = ReadPlan { extents: vec![Extent { file: 0, offset: 8192, len: 8192, at: 0 }], buf_len: 8192 };
        assert_eq!(r.read(&plan, 0, 2, true).unwrap().as_ref(), &data[8192..]);
        // An unaligned plan is read through the page cache without turning O_DIRECT off.
        let odd = ReadPlan { extents: vec![Extent { file: 0, offset: 100, len: 5000, at: 0 }], buf_len: 5000 };
        let direct_before = r.direct();
        assert_eq!(r.read(&odd, 0, 0, true).unwrap().as_ref(), &data[100..5100]);
        assert_eq!(r.direct(), direct_before);
    }
}
