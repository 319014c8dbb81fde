//! A write that fails half-way (here: a file-size limit, standing in for a full disk) must remove
//! the temporary directory and return an error naming the file. Alone in its test binary because
//! the limit applies to the whole process.

mod packed_common;

use moe_store::{DenseFormat, ExpertFormat, StoreError, write_packed};
use packed_common::*;

/// Sets the soft `RLIMIT_FSIZE` and returns the previous limits.
fn limit_file_size(bytes: u64) -> libc::rlimit {
    unsafe {
        // Writes past the limit then fail with EFBIG instead of killing the process.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut old = std::mem::zeroed::<libc::rlimit>();
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut old), 0);
        let new = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: old.rlim_max };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &new), 0);
        old
    }
}

#[test]
fn a_failing_write_removes_the_temp_dir_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    // Measure a good conversion first, then allow files a little larger than the dense file but
    // smaller than an expert file: the dense file goes through and the first expert file fails.
    let (e, d) = (ExpertFormat::Bf16, DenseFormat::Q8);
    let good = tmp.path().join("good");
    write_packed(&src, &good, e, d, false, &mut no_progress()).unwrap();
    let dense = std::fs::metadata(good.join("dense.safetensors")).unwrap().len();
    let experts = std::fs::metadata(good.join("experts/layer_000.bin")).unwrap().len();
    assert!(dense + 8192 < experts, "dense {dense}, experts {experts}");
    std::fs::remove_dir_all(&good).unwrap();

    let out = tmp.path().join("packed");
    let old = limit_file_size(dense + 4096);
    let result = write_packed(&src, &out, e, d, false, &mut no_progress());
    unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &old) };
    match result.unwrap_err() {
        StoreError::Io { path, source } => {
            assert!(path.to_string_lossy().contains("experts/layer_000.bin"), "{}", path.display());
            assert_eq!(source.raw_os_error(), Some(libc::EFBIG), "{source}");
        }
        other => panic!("{other}"),
    }
    assert!(!out.exists());
    assert!(temp_dirs(tmp.path()).is_empty(), "{:?}", temp_dirs(tmp.path()));
}
