//! How the expert store is set up: the RAM budget, the I/O threads, the eviction policy and whether
//! packed files are read with `O_DIRECT` ([`StoreOptions`]), and the helpers the command-line
//! flags need ([`parse_bytes`], [`auto_ram_budget`]).

use moe_core::HostMemory;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Room [`Budget::Auto`] leaves for the operating system and everything else on the machine.
pub const OS_RESERVE: u64 = 2 << 30;

/// The I/O threads of a store unless told otherwise. Experts are read in chunks of
/// [`READ_CHUNK`](crate::READ_CHUNK) (1 MiB), and eight chunks in flight (nine with the requesting
/// thread) keep an NVMe drive's queue full through the eight to ten experts a Qwen MoE token routes
/// to per layer, to the last one.
pub const DEFAULT_IO_THREADS: usize = 8;

/// The byte budget of the store's RAM tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Budget {
    /// A fixed number of bytes; `Bytes(0)` caches nothing (every expert is read when asked for).
    Bytes(u64),
    /// `MemAvailable` of `/proc/meminfo`, less the dense weights and [`OS_RESERVE`] (see
    /// [`auto_ram_budget`]).
    #[default]
    Auto,
}

impl Budget {
    /// The budget in bytes, for a model whose dense weights take `dense_bytes`.
    pub fn resolve(self, dense_bytes: u64) -> u64 {
        match self {
            Budget::Bytes(n) => n,
            Budget::Auto => auto_ram_budget(dense_bytes),
        }
    }
}

impl FromStr for Budget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_bytes(s)
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Auto => f.write_str("auto"),
            Budget::Bytes(n) => f.write_str(&format_bytes(*n)),
        }
    }
}

/// Which resident expert the RAM tier drops when it needs room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Eviction {
    /// Frequency-aware: the expert with the fewest uses goes first, ties to the least recently
    /// used. Uses are counted for every expert of the model (resident or not) and all counts are
    /// halved periodically (every `max(1024, 8 x layers x experts)` requests), so that experts that
    /// were popular long ago fade.
    #[default]
    Lfru,
    /// Least recently used.
    Lru,
}

impl Eviction {
    pub fn name(self) -> &'static str {
        match self {
            Eviction::Lfru => "lfru",
            Eviction::Lru => "lru",
        }
    }
}

impl FromStr for Eviction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "lfru" | "lfu" => Ok(Eviction::Lfru),
            "lru" => Ok(Eviction::Lru),
            _ => Err(format!("unknown eviction policy {s:?} (expected lfru or lru)")),
        }
    }
}

impl fmt::Display for Eviction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How [`open_with`](crate::open_with) sets up the expert store.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes of expert buffers the RAM tier may hold. A hard bound on cache-owned memory; see
    /// [`ExpertStore`](crate::ExpertStore) for what it does not count.
    pub ram_budget: Budget,
    /// Threads that read experts in the background: the chunks of a request's misses (alongside
    /// the requesting thread) and prefetches. 0 reads everything on the calling thread and makes
    /// `prefetch` a no-op.
    pub io_threads: usize,
    pub eviction: Eviction,
    /// Read packed expert files with `O_DIRECT` (bypassing the page cache, into 4096-aligned
    /// buffers). Where the filesystem refuses it, the store says so once on stderr and reads
    /// through the page cache. Hugging Face directories are always read through the page cache.
    pub direct_io: bool,
    /// Where expert buffers (the RAM tier, and what reads land in) are allocated: `None` for the
    /// heap; a GPU backend passes page-locked memory, which it copies to the device without
    /// staging. An allocator that refuses a request (`alloc` gives `None`) leaves that buffer to
    /// the heap.
    pub host_memory: Option<Arc<dyn HostMemory>>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            ram_budget: Budget::Auto,
            io_threads: DEFAULT_IO_THREADS,
            eviction: Eviction::Lfru,
            direct_io: true,
            host_memory: None,
        }
    }
}

/// Equal settings; allocators are equal when they are the same object.
impl PartialEq for StoreOptions {
    fn eq(&self, o: &Self) -> bool {
        let same_memory = match (&self.host_memory, &o.host_memory) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b)),
            _ => false,
        };
        self.ram_budget == o.ram_budget
            && self.io_threads == o.io_threads
            && self.eviction == o.eviction
            && self.direct_io == o.direct_io
            && same_memory
    }
}

impl Eq for StoreOptions {}

/// Parses a byte count for the command line: `auto`, a plain number of bytes (`0`, `4096`), or a
/// number (fractions allowed) with a unit: binary `K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`
/// (powers of 1024), decimal `KB`, `MB`, `GB`, `TB` (powers of 1000), or `B`. Units are
/// case-insensitive; a space before the unit is allowed.
pub fn parse_bytes(s: &str) -> Result<Budget, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(Budget::Auto);
    }
    let bad = || format!("invalid byte count {s:?} (expected e.g. 8GiB, 512MiB, 1.5G, 0 or auto)");
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
        return Err(bad());
    }
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(scale).map(Budget::Bytes).ok_or_else(|| format!("byte count {s:?} is too large"));
    }
    let x: f64 = num.parse().map_err(|_| bad())?;
    let bytes = (x * scale as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("byte count {s:?} is too large"));
    }
    Ok(Budget::Bytes(bytes as u64))
}

/// `bytes` the way people read them: `0 B`, `512.0 MiB`, `8.00 GiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = bytes as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{x:.2} {}", UNITS[u]) }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes; `None` where it can't be read.
pub fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_mem_available(&text)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line["MemAvailable:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    match parts.next() {
        Some("kB") | None => n.checked_mul(1024),
        Some(_) => None,
    }
}

/// The budget `auto` means: `MemAvailable` less `dense_bytes` (the dense weights, which stay
/// resident beside the cache) and [`OS_RESERVE`], never below 0. 0 where `/proc/meminfo` can't be
/// read.
pub fn auto_ram_budget(dense_bytes: u64) -> u64 {
    auto_budget_from(mem_available().unwrap_or(0), dense_bytes)
}

fn auto_budget_from(available: u64, dense_bytes: u64) -> u64 {
    available.saturating_sub(dense_bytes).saturating_sub(OS_RESERVE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let text = "MemTotal:       24683656 kB\nMemFree:        17000000 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(parse_mem_available(text), Some(23_000_000 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(auto_budget_from(10 << 30, 3 << 30), 5 << 30);
        assert_eq!(auto_budget_from(1 << 30, 0), 0);
    }

    #[test]
    fn bytes_format() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(512 << 20), "512.00 MiB");
        assert_eq!(Budget::Bytes(8 << 30).to_string(), "8.00 GiB");
    }
}
