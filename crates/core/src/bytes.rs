//! A cheap-to-clone window into shared bytes: a memory map, a read buffer or a plain vector.
//! Weights are handed around as `Bytes` so that nothing is copied between the file and a kernel.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

type Owner = Arc<dyn AsRef<[u8]> + Send + Sync>;

#[derive(Clone)]
pub struct Bytes {
    owner: Owner,
    start: usize,
    len: usize,
}

impl Bytes {
    /// Wraps `range` of `owner`. Panics if the range lies outside the owner, which is a caller bug
    /// (the callers validate offsets from file headers before they get here).
    pub fn new(owner: Owner, range: Range<usize>) -> Self {
        let total = (*owner).as_ref().len();
        assert!(range.start <= range.end && range.end <= total, "byte range {range:?} outside {total} bytes");
        Bytes { owner, start: range.start, len: range.end - range.start }
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        Bytes::new(Arc::new(v), 0..len)
    }

    pub fn from_f32(v: &[f32]) -> Self {
        Bytes::from_vec(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }

    pub fn empty() -> Self {
        Bytes::from_vec(Vec::new())
    }

    /// Where this window starts in its owner's bytes.
    pub fn offset(&self) -> usize {
        self.start
    }

    /// A sub-window, relative to this one.
    pub fn slice(&self, range: Range<usize>) -> Self {
        assert!(range.start <= range.end && range.end <= self.len, "slice {range:?} outside {} bytes", self.len);
        Bytes { owner: self.owner.clone(), start: self.start + range.start, len: range.end - range.start }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.start..self.start + self.len]
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len)
    }
}
