//! The expert store's disk reads: `pread` of a [`ReadPlan`]'s extents into one 4096-aligned buffer,
//! with `O_DIRECT` where the layout and the filesystem allow it and the page cache otherwise.
//!
//! `O_DIRECT` is tried when the store is asked for it and the layout supports it. A filesystem that
//! refuses it (`EINVAL` when opening or reading) turns it off for the whole store, with one notice
//! on stderr; the read that found out is done again through the page cache. A short `O_DIRECT` read
//! (the end of a truncated file) is finished through the page cache, so that the error says the
//! file is truncated rather than that `O_DIRECT` failed.

use crate::StoreError;
use crate::layout::{DIRECT_ALIGN, ReadPlan};
use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

/// An uninitialised heap allocation of `len` bytes aligned to [`DIRECT_ALIGN`].
struct RawBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl RawBuf {
    fn new(len: usize) -> Self {
        if len == 0 {
            // A dangling pointer with the alignment, never dereferenced for a non-empty slice.
            return RawBuf { ptr: NonNull::new(DIRECT_ALIGN as *mut u8).expect("non-null"), len };
        }
        let layout = Layout::from_size_align(len, DIRECT_ALIGN).expect("expert buffer size fits a Layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else { alloc::handle_alloc_error(layout) };
        RawBuf { ptr, len }
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
        if self.len > 0 {
            // SAFETY: allocated in `new` with exactly this layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Layout::from_size_align_unchecked(self.len, DIRECT_ALIGN)) }
        }
    }
}

/// A read buffer of one expert: 4096-aligned, every byte initialised (read from disk or zeroed),
/// immutable once made. Shared as the owner of the [`Bytes`](moe_core::Bytes) windows the expert's
/// matrices are.
pub struct AlignedBuf(RawBuf);

// SAFETY: an owned heap allocation, only read through shared references once built.
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
        // SAFETY: `AlignedBuf` is only made by `Reader::read` once every byte is written.
        unsafe { std::slice::from_raw_parts(self.0.ptr.as_ptr(), self.0.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.0.len)
    }
}

struct ReadFile {
    path: PathBuf,
    buffered: File,
    direct: Option<File>,
}

/// The open files of a layout, and whether `O_DIRECT` is in use.
pub(crate) struct Reader {
    files: Vec<ReadFile>,
    direct: AtomicBool,
    /// Tests: make `O_DIRECT` reads fail with `EINVAL`, as a refusing filesystem does.
    #[cfg(test)]
    pub refuse_direct_reads: AtomicBool,
}

impl Reader {
    /// Opens `paths` for reading; with `O_DIRECT` as well when `direct`.
    pub fn open(paths: &[PathBuf], direct: bool) -> Result<Self, StoreError> {
        let mut files = Vec::with_capacity(paths.len());
        for path in paths {
            let buffered = File::open(path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
            files.push(ReadFile { path: path.clone(), buffered, direct: None });
        }
        let reader = Reader {
            files,
            direct: AtomicBool::new(direct),
            #[cfg(test)]
            refuse_direct_reads: AtomicBool::new(false),
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

    /// Reads `plan` (made for expert `expert` of layer `layer`, with `O_DIRECT` if `direct`) into a
    /// new buffer. A read past the end of a file is a [`StoreError::Corrupt`] naming the file and
    /// the expert. Panics if an extent lies outside the buffer or names no file (a layout bug).
    pub fn read(&self, plan: &ReadPlan, layer: usize, expert: usize, direct: bool) -> Result<AlignedBuf, StoreError> {
        let mut buf = RawBuf::new(plan.buf_len);
        for ext in &plan.extents {
            assert!(
                ext.at.checked_add(ext.len).is_some_and(|end| end <= plan.buf_len) && ext.file < self.files.len(),
                "extent {ext:?} outside a {}-byte buffer or its {} files",
                plan.buf_len,
                self.files.len()
            );
            let file = &self.files[ext.file];
            // SAFETY: in bounds, checked above.
            let dst = unsafe { buf.ptr.as_ptr().add(ext.at) };
            let mut done = 0;
            let aligned = (dst as usize).is_multiple_of(DIRECT_ALIGN)
                && ext.offset.is_multiple_of(DIRECT_ALIGN as u64)
                && ext.len.is_multiple_of(DIRECT_ALIGN);
            if let Some(d) = file.direct.as_ref().filter(|_| direct && aligned && self.direct()) {
                #[cfg(test)]
                let refused = self.refuse_direct_reads.load(Ordering::Relaxed);
                #[cfg(not(test))]
                let refused = false;
                let r = if refused {
                    Err(io::Error::from_raw_os_error(libc::EINVAL))
                } else {
                    // SAFETY: `dst..dst + len` lies in `buf`.
                    unsafe { pread_full(d, dst, ext.len, ext.offset, true) }
                };
                match r {
                    Ok(n) => done = n,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.refuse(&file.path, &e),
                    Err(source) => return Err(StoreError::Io { path: file.path.clone(), source }),
                }
            }
            if done < ext.len {
                // SAFETY: `dst + done..dst + len` lies in `buf`.
                let n = unsafe {
                    pread_full(&file.buffered, dst.add(done), ext.len - done, ext.offset + done as u64, false)
                }
                .map_err(|source| StoreError::Io { path: file.path.clone(), source })?;
                if done + n < ext.len {
                    return Err(StoreError::Corrupt {
                        file: file.path.clone(),
                        why: format!(
                            "truncated: expert {expert} of layer {layer} lies at bytes {}..{}, past the end of the file",
                            ext.offset,
                            ext.offset + ext.len as u64
                        ),
                    });
                }
            }
        }
        // Zero what no extent covered, so that every byte of the buffer is initialised.
        let mut covered: Vec<(usize, usize)> = plan.extents.iter().map(|e| (e.at, e.at + e.len)).collect();
        covered.sort_unstable();
        let mut cursor = 0;
        for (start, end) in covered {
            if start > cursor {
                buf.zero(cursor, start);
            }
            cursor = cursor.max(end);
        }
        buf.zero(cursor, plan.buf_len);
        Ok(AlignedBuf(buf))
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
        let r = Reader::open(&[a, b], false).unwrap();
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
            let r = Reader::open(std::slice::from_ref(&a), direct).unwrap();
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
        let r = Reader::open(std::slice::from_ref(&a), true).unwrap();
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
    fn direct_reads_give_the_file_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, data) = file_with(tmp.path(), "a", 4 * 4096);
        let r = Reader::open(std::slice::from_ref(&a), true).unwrap();
        let plan = ReadPlan { extents: vec![Extent { file: 0, offset: 8192, len: 8192, at: 0 }], buf_len: 8192 };
        assert_eq!(r.read(&plan, 0, 2, true).unwrap().as_ref(), &data[8192..]);
        // An unaligned plan is read through the page cache without turning O_DIRECT off.
        let odd = ReadPlan { extents: vec![Extent { file: 0, offset: 100, len: 5000, at: 0 }], buf_len: 5000 };
        let direct_before = r.direct();
        assert_eq!(r.read(&odd, 0, 0, true).unwrap().as_ref(), &data[100..5100]);
        assert_eq!(r.direct(), direct_before);
    }
}
