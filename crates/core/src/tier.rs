//! Counters of a device-memory tier of routed experts (the GPU tier of the CUDA backend).

/// Counters of the tier since it was created or last reset, and what is resident now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierStats {
    pub hits: u64,
    pub misses: u64,
    /// Bytes copied to the device for misses (with alignment padding).
    pub bytes_uploaded: u64,
    pub evictions: u64,
    pub resident_experts: usize,
    pub resident_bytes: u64,
    /// The budget in bytes; `None` while an automatic budget is not yet resolved (no upload yet).
    pub budget: Option<u64>,
    /// Misses copied straight from page-locked host memory (the expert store's buffers), without
    /// a staging copy.
    pub direct_uploads: u64,
}

impl TierStats {
    pub fn requests(&self) -> u64 {
        self.hits + self.misses
    }

    pub fn hit_rate(&self) -> f64 {
        if self.requests() == 0 { 0.0 } else { self.hits as f64 / self.requests() as f64 }
    }
}
