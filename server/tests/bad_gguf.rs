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
    w.metadata("general.architecture", Value::String("mamba".into()));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "unsupported architecture `mamba` (supported: gemma3, llama, qwen2, qwen3)");

    // A supported architecture whose keys the file lacks: the key is named.
    let mut w = tiny_gemma3(1);
    w.metadata("general.architecture", Value::String("llama".into()));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "metadata `llama.embedding_length` is missing");
}

#[test]
fn shapes_the_decoder_does_not_run() {
    let mut w = tiny_gemma3(1);
    w.metadata("gemma3.attention.head_count", Value::U32(3)).metadata("gemma3.attention.head_count_kv", Value::U32(2));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "architecture `gemma3` is not supported in this shape: `gemma3.attention.head_count_kv` = 2 must divide `gemma3.attention.head_count` = 3");

    let mut w = tiny_gemma3(1);
    w.metadata("gemma3.expert_count", Value::U32(8));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "mixture-of-experts files (`gemma3.expert_count` = 8) are not supported");

    let mut w = tiny_gemma3(1);
    w.metadata("gemma3.rope.dimension_count", Value::U32(129));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "`gemma3.rope.dimension_count` = 129 must be even");
}

#[test]
fn a_missing_tensor_is_named_with_the_architecture() {
    let bytes = tiny_gemma3(1).to_bytes();
    // Rename one tensor in place: same length, so the file stays well-formed.
    let mut patched = bytes.clone();
    let at = bytes.windows(19).position(|w| w == b"blk.2.ffn_up.weight").unwrap();
    patched[at + 10..at + 12].copy_from_slice(b"UP");
    let (err, path) = load_error(&patched);
    assert_names(&err, &path, "architecture `gemma3` is not supported in this shape: tensor `blk.2.ffn_up.weight` is missing");
}

#[test]
fn an_unknown_pre_tokenizer_or_a_broken_chat_template_is_named() {
    let mut w = tiny_gemma3(1);
    w.metadata("tokenizer.ggml.model", Value::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", Value::String("deepseek-coder".into()))
        .metadata("tokenizer.ggml.merges", Value::Array(Vec::new()));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "pre-tokenizer `deepseek-coder` (`tokenizer.ggml.pre`) is not supported");

    let mut w = tiny_gemma3(1);
    w.metadata("tokenizer.ggml.model", Value::String("wordpiece".into()));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "tokenizer model `wordpiece`");

    let mut w = tiny_gemma3(1);
    w.metadata("tokenizer.chat_template", Value::String("{% for m in messages %}{{ m.content }".into()));
    let (err, path) = load_error(&w.to_bytes());
    assert_names(&err, &path, "the chat template (the model's tokenizer.chat_template) does not compile");
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
    assert!(err.contains("architecture `gemma3`"), "{err}");
}
