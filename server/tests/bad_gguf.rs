//! A missing, truncated, corrupt or unsupported GGUF file fails with a message naming the file
//! and the problem, never a panic.

use candle_core::quantized::GgmlDType;
use tessera::gguf::Value;
use tessera::model::synthetic::tiny_gemma3;
use tessera::LoadedModel;

fn load_error(bytes: &[u8]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = LoadedModel::load(&path).err().expect("loading must fail").to_string();
    (err, path.display().to_string())
}

fn assert_names(err: &str, path: &str, problem: &str) {
    assert!(err.contains(path), "error does not name the file: {err}");
    assert!(err.contains(problem), "error does not say `{problem}`: {err}");
}

#[test]
fn missing_file() {
    let err = LoadedModel::load(std::path::Path::new("/nonexistent/model.gguf"))
        .err()
        .unwrap()
        .to_string();
    assert_names(&err, "/nonexistent/model.gguf", "cannot read model file");
}

#[test]
fn truncated_file() {
    let bytes = tiny_gemma3(1).to_bytes();
    for cut in [10, 200, bytes.len() / 2, bytes.len() - 1] {
        let (err, path) = load_error(&bytes[..cut]);
        assert_names(&err, &path, "truncated");
    }
}

#[test]
fn corrupt_file() {
    let mut bytes = tiny_gemma3(1).to_bytes();
    bytes[0] = b'X';
    let (err, path) = load_error(&bytes);
    assert_names(&err, &path, "bad magic");

    // An absurd metadata count must not make the reader allocate or loop over it.
    let mut bytes = tiny_gemma3(1).to_bytes();
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let (err, path) = load_error(&bytes);
    assert_names(&err, &path, "truncated or corrupt: the metadata count (18446744073709551615)");

    let (err, path) = load_error(b"");
    assert_names(&err, &path, "truncated");
}

#[test]
fn unknown_architecture() {
    let mut w = tiny_gemma3(1);
    w.metadata("general.architecture", Value::String("llama".into()));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "unsupported architecture `llama`");
}

#[test]
fn unsupported_tensor_type() {
    let mut w = tiny_gemma3(1);
    // Q8_1 is an activation format that no model file should hold.
    w.tensor("blk.0.attn_q.weight", GgmlDType::Q8_1, &[256, 320], vec![0; 256 * 10 * 36]);
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "blk.0.attn_q.weight");
    assert!(err.contains("unsupported type 9 (Q8_1)"), "{err}");
}

#[test]
fn shape_mismatch() {
    let mut w = tiny_gemma3(1);
    w.tensor("blk.3.ffn_norm.weight", GgmlDType::F32, &[64], vec![0; 64 * 4]);
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "blk.3.ffn_norm.weight");
    assert!(err.contains("has shape [64], expected [320]"), "{err}");
}
