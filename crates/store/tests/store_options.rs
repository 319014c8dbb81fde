//! Options of the expert store: byte counts for the command line, the `auto` budget, defaults.

#[path = "store_common.rs"]
mod common;

use moe_store::{
    Budget, Eviction, OS_RESERVE, StoreOptions, auto_ram_budget, mem_available, open, open_with, parse_bytes,
};

#[test]
fn parse_bytes_accepts_units_auto_and_zero() {
    let b = |n: u64| Ok(Budget::Bytes(n));
    assert_eq!(parse_bytes("auto"), Ok(Budget::Auto));
    assert_eq!(parse_bytes("AUTO"), Ok(Budget::Auto));
    assert_eq!(parse_bytes("0"), b(0));
    assert_eq!(parse_bytes("4096"), b(4096));
    assert_eq!(parse_bytes("8GiB"), b(8 << 30));
    assert_eq!(parse_bytes("8gib"), b(8 << 30));
    assert_eq!(parse_bytes("8G"), b(8 << 30));
    assert_eq!(parse_bytes("512MiB"), b(512 << 20));
    assert_eq!(parse_bytes("512 MiB"), b(512 << 20));
    assert_eq!(parse_bytes("64K"), b(64 << 10));
    assert_eq!(parse_bytes("1TiB"), b(1 << 40));
    assert_eq!(parse_bytes("1.5GiB"), b(3 << 29));
    assert_eq!(parse_bytes("2GB"), b(2_000_000_000));
    assert_eq!(parse_bytes("100MB"), b(100_000_000));
    assert_eq!(parse_bytes("10B"), b(10));
    assert_eq!(" 1GiB ".parse::<Budget>(), b(1 << 30));
}

#[test]
fn parse_bytes_rejects_nonsense() {
    for bad in ["", "GiB", "-1GiB", "8XB", "1.2.3G", ".5G", "5.G", "eight", "99999999999TiB"] {
        assert!(parse_bytes(bad).is_err(), "{bad:?} was accepted");
    }
    let msg = parse_bytes("8XB").unwrap_err();
    assert!(msg.contains("8XB") && msg.contains("auto"), "{msg}");
}

#[test]
fn eviction_and_budget_parse_and_print() {
    assert_eq!("lru".parse::<Eviction>(), Ok(Eviction::Lru));
    assert_eq!("LFRU".parse::<Eviction>(), Ok(Eviction::Lfru));
    assert!("fifo".parse::<Eviction>().is_err());
    assert_eq!(Eviction::Lfru.to_string(), "lfru");
    assert_eq!(Budget::Auto.to_string(), "auto");
    assert_eq!(Budget::Bytes(512 << 20).to_string(), "512.00 MiB");
}

#[test]
fn auto_budget_leaves_room_for_dense_weights_and_the_os() {
    let avail = mem_available().expect("/proc/meminfo has MemAvailable");
    assert!(avail > 0);
    let dense = 1 << 30;
    let auto = auto_ram_budget(dense);
    // MemAvailable moves between the two reads; allow for it.
    let slack = 256 << 20;
    assert!(auto <= (avail + slack).saturating_sub(dense + OS_RESERVE), "{auto} vs {avail}");
    assert!(auto + slack >= avail.saturating_sub(dense + OS_RESERVE), "{auto} vs {avail}");
    assert_eq!(auto_ram_budget(u64::MAX), 0);
    assert_eq!(Budget::Bytes(5).resolve(dense), 5);
}

#[test]
fn defaults_and_open_use_them() {
    let d = StoreOptions::default();
    assert_eq!((d.ram_budget, d.eviction, d.direct_io), (Budget::Auto, Eviction::Lfru, true));
    assert!((4..=8).contains(&d.io_threads));
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::hf_copy("qwen3_moe", tmp.path());
    let (a, b) = (open(&dir).unwrap(), open_with(&dir, &d).unwrap());
    let dense = a.tensors.dense_bytes() as u64;
    let expected = auto_ram_budget(dense);
    for m in [&a, &b] {
        let got = m.experts.stats().budget_bytes;
        assert!(got.abs_diff(expected) < 512 << 20, "auto budget {got}, expected about {expected}");
    }
}
