//! What goes wrong with packed directories, and that it is reported clearly: foreign or future
//! manifests, existing destinations, damaged and truncated files, unwritable destinations, source
//! errors half-way (no temporary directory may survive any of them).

mod packed_common;

use moe_store::{DenseFormat, ExpertFormat, MANIFEST_FILE, StoreError, open_packed, verify_packed, write_packed};
use packed_common::*;
use std::fs;
use std::path::{Path, PathBuf};

/// A packed q4 model in a fresh temporary directory: (tempdir, packed dir).
fn packed() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    let out = tmp.path().join("packed");
    write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Q8, false, &mut no_progress()).unwrap();
    (tmp, out)
}

fn edit_manifest(dir: &Path, from: &str, to: &str) {
    let p = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&p).unwrap();
    assert!(text.contains(from), "{from} not in the manifest");
    fs::write(&p, text.replacen(from, to, 1)).unwrap();
}

fn stride(dir: &Path) -> u64 {
    let p = dir.join(MANIFEST_FILE);
    moe_store::manifest::Manifest::parse(&p, &fs::read_to_string(&p).unwrap()).unwrap().experts.stride
}

#[test]
fn unknown_manifest_version_is_rejected() {
    let (_tmp, dir) = packed();
    edit_manifest(&dir, "\"version\": 1,", "\"version\": 2,");
    for err in [open_packed(&dir).err().unwrap(), verify_packed(&dir).unwrap_err()] {
        let msg = err.to_string();
        assert!(msg.contains("version 2") && msg.contains("reads version 1"), "{msg}");
        assert!(msg.contains("manifest.json"), "{msg}");
    }
    // `open` dispatches on the manifest, so it reports the same.
    let msg = moe_store::open(&dir).err().unwrap().to_string();
    assert!(msg.contains("version 2"), "{msg}");
}

#[test]
fn unknown_format_name_is_rejected() {
    let (_tmp, dir) = packed();
    edit_manifest(&dir, "\"format\": \"flash-moe-packed\"", "\"format\": \"something-else\"");
    let msg = open_packed(&dir).err().unwrap().to_string();
    assert!(msg.contains("not a flash-moe packed model") && msg.contains("something-else"), "{msg}");
}

#[test]
fn invalid_manifest_json_is_corrupt() {
    let (_tmp, dir) = packed();
    fs::write(dir.join(MANIFEST_FILE), "{ not json").unwrap();
    let err = open_packed(&dir).err().unwrap();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
}

#[test]
fn existing_destination_is_refused_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    let out = tmp.path().join("packed");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Bf16, false, &mut no_progress()).unwrap_err();
    match &err {
        StoreError::Io { path, source } => {
            assert_eq!(path, &out);
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        other => panic!("{other}"),
    }
    assert_eq!(fs::read_to_string(out.join("keep.txt")).unwrap(), "mine", "the destination is untouched");
    assert!(temp_dirs(tmp.path()).is_empty());

    // With force it is replaced, completely.
    write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Bf16, true, &mut no_progress()).unwrap();
    assert!(!out.join("keep.txt").exists());
    verify_packed(&out).unwrap();
    let names: Vec<_> = fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "only src and packed remain: {names:?}");
}

#[test]
fn force_never_replaces_the_source() {
    let tmp = tempfile::tempdir().unwrap();
    let src_dir = tmp.path().join("src");
    let src = source(&src_dir);
    for out in [src_dir.clone(), tmp.path().to_path_buf()] {
        let err = write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Bf16, true, &mut no_progress()).unwrap_err();
        assert!(err.to_string().contains("source"), "{err}");
    }
    assert_eq!(fs::read_to_string(src_dir.join("config.json")).unwrap(), CONFIG);
}

#[test]
fn corrupting_one_expert_byte_fails_verify_naming_file_and_expert() {
    let (_tmp, dir) = packed();
    verify_packed(&dir).unwrap();
    let path = dir.join("experts/layer_001.bin");
    let mut bytes = fs::read(&path).unwrap();
    let at = (2 * stride(&dir) + 100) as usize; // inside expert 2
    bytes[at] ^= 0x01;
    fs::write(&path, bytes).unwrap();
    let err = verify_packed(&dir).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
    assert!(msg.contains("layer_001.bin") && msg.contains("checksum mismatch"), "{msg}");
    assert!(msg.contains("first damaged expert: 2"), "{msg}");
    // Opening does not hash, so it still works (verify is the check).
    open_packed(&dir).unwrap();
}

#[test]
fn corrupting_the_dense_file_fails_verify_naming_it() {
    let (_tmp, dir) = packed();
    let path = dir.join("dense.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x80;
    fs::write(&path, bytes).unwrap();
    let msg = verify_packed(&dir).unwrap_err().to_string();
    assert!(msg.contains("dense.safetensors") && msg.contains("checksum mismatch"), "{msg}");
}

#[test]
fn truncated_expert_file_fails_open_and_read() {
    let (_tmp, dir) = packed();
    let path = dir.join("experts/layer_000.bin");
    let len = fs::metadata(&path).unwrap().len();

    // Truncated before opening: open refuses, naming the file.
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 10).unwrap();
    let msg = open_packed(&dir).err().unwrap().to_string();
    assert!(msg.contains("layer_000.bin") && msg.contains("truncated"), "{msg}");
    let msg = verify_packed(&dir).unwrap_err().to_string();
    assert!(msg.contains("layer_000.bin") && msg.contains("truncated"), "{msg}");

    // Truncated while open: the read of an expert past the end fails clearly.
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len).unwrap();
    let model = open_packed(&dir).unwrap();
    fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(stride(&dir)).unwrap();
    model.experts.expert(0, 0).unwrap();
    let err = model.experts.expert(0, EXPERTS - 1).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{msg}");
    assert!(msg.contains("layer_000.bin") && msg.contains("truncated") && msg.contains("expert 3"), "{msg}");
}

#[test]
fn missing_expert_file_is_named() {
    let (_tmp, dir) = packed();
    fs::remove_file(dir.join("experts/layer_001.bin")).unwrap();
    let msg = open_packed(&dir).err().unwrap().to_string();
    assert!(msg.contains("layer_001.bin"), "{msg}");
}

#[test]
fn unwritable_destination_errors_and_leaves_no_temp_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source(&tmp.path().join("src"));
    // A file where a directory should be.
    let file = tmp.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let out = file.join("packed");
    let err = write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Bf16, false, &mut no_progress()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Io { .. }) && msg.contains("a-file"), "{msg}");
    assert!(temp_dirs(tmp.path()).is_empty());

    // A missing parent directory.
    let out = tmp.path().join("no/such/dir/packed");
    let msg = write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Bf16, false, &mut no_progress())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("no/such/dir"), "{msg}");

    // A read-only parent (root ignores permissions, so only as a normal user).
    if unsafe { libc::geteuid() } != 0 {
        use std::os::unix::fs::PermissionsExt;
        let ro = tmp.path().join("ro");
        fs::create_dir(&ro).unwrap();
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        let err =
            write_packed(&src, &ro.join("packed"), ExpertFormat::Q4, DenseFormat::Bf16, false, &mut no_progress());
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
        let msg = err.unwrap_err().to_string();
        assert!(msg.contains("ro/packed.tmp-"), "{msg}");
        assert!(temp_dirs(&ro).is_empty());
    }
}

#[test]
fn source_error_half_way_removes_the_temp_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let src = source_failing_at(&tmp.path().join("src"), Some(1));
    let out = tmp.path().join("packed");
    let mut seen = 0;
    let err = write_packed(&src, &out, ExpertFormat::Q4, DenseFormat::Bf16, false, &mut |d, _| seen = d).unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(seen > 0, "it failed part-way, after writing");
    assert!(!out.exists());
    assert!(temp_dirs(tmp.path()).is_empty(), "{:?}", temp_dirs(tmp.path()));
}
