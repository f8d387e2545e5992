//! A tiny random model shaped like Gemma 3: the same tensor names, the same quantized types
//! (Q8_0 embedding, Q5_0 q/k/gate/up, Q8_0 v, Q4_K o, Q6_K down, F32 norms) and a SentencePiece
//! vocabulary in the metadata. Loading, masks, the KV cache and batching can then be tested in
//! milliseconds.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::gguf::writer::GgufWriter;
use crate::gguf::Value;

pub const HIDDEN: usize = 320;
pub const HEADS: usize = 2;
pub const HEAD_DIM: usize = 128;
pub const FFN: usize = 512;
pub const LAYERS: usize = 7;
/// Small enough that short test sequences already slide past it.
pub const SLIDING_WINDOW: usize = 4;
pub const CONTEXT: usize = 256;

/// The vocabulary: control tokens, one user-defined newline, 256 byte pieces, letters and a few
/// merged pieces, as (piece, score, SentencePiece type).
fn vocabulary() -> Vec<(String, f32, i32)> {
    let mut v: Vec<(String, f32, i32)> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .iter()
    .map(|s| (s.to_string(), 0.0, 3))
    .collect();
    v.push(("\n".into(), 0.0, 4));
    v.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    let normal: Vec<String> = std::iter::once("▁".to_string())
        .chain(('a'..='z').map(String::from))
        .chain(["▁t", "he", "▁the", "in", "▁a"].map(String::from))
        .collect();
    for (i, piece) in normal.into_iter().enumerate() {
        v.push((piece, -(i as f32), 1));
    }
    v
}

fn random_tensor(rng: &mut StdRng, dims: &[usize], range: f32, center: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| center + rng.random_range(-range..range))
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).expect("sizes match")
}

fn quantized(rng: &mut StdRng, dims: &[usize], dtype: GgmlDType) -> Vec<u8> {
    let t = random_tensor(rng, dims, 0.08, 0.0);
    QTensor::quantize(&t, dtype)
        .and_then(|q| q.data().map(|d| d.into_owned()))
        .expect("synthetic shapes fit their block sizes")
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 tensor")
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// The writer for a tiny Gemma 3 with weights drawn from `seed`; tests may alter it before
/// writing.
pub fn tiny_gemma3(seed: u64) -> GgufWriter {
    let mut rng = StdRng::seed_from_u64(seed);
    let vocab = vocabulary();
    let mut w = GgufWriter::default();
    let s = |v: &str| Value::String(v.to_string());
    w.metadata("general.architecture", s("gemma3"))
        .metadata("general.name", s("tiny synthetic gemma3"))
        .metadata("gemma3.context_length", Value::U32(CONTEXT as u32))
        .metadata("gemma3.embedding_length", Value::U32(HIDDEN as u32))
        .metadata("gemma3.block_count", Value::U32(LAYERS as u32))
        .metadata("gemma3.feed_forward_length", Value::U32(FFN as u32))
        .metadata("gemma3.attention.head_count", Value::U32(HEADS as u32))
        .metadata("gemma3.attention.head_count_kv", Value::U32(1))
        .metadata("gemma3.attention.key_length", Value::U32(HEAD_DIM as u32))
        .metadata("gemma3.attention.value_length", Value::U32(HEAD_DIM as u32))
        .metadata("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6))
        .metadata("gemma3.attention.sliding_window", Value::U32(SLIDING_WINDOW as u32))
        .metadata("gemma3.rope.freq_base", Value::F32(1_000_000.0))
        .metadata("tokenizer.ggml.model", s("llama"))
        // As Gemma's own files say: no `▁` before the text.
        .metadata("tokenizer.ggml.add_space_prefix", Value::Bool(false))
        .metadata(
            "tokenizer.ggml.tokens",
            Value::Array(vocab.iter().map(|t| s(&t.0)).collect()),
        )
        .metadata(
            "tokenizer.ggml.scores",
            Value::Array(vocab.iter().map(|t| Value::F32(t.1)).collect()),
        )
        .metadata(
            "tokenizer.ggml.token_type",
            Value::Array(vocab.iter().map(|t| Value::I32(t.2)).collect()),
        )
        .metadata("tokenizer.ggml.bos_token_id", Value::U32(2))
        .metadata("tokenizer.ggml.eos_token_id", Value::U32(1))
        .metadata("tokenizer.ggml.unknown_token_id", Value::U32(3))
        .metadata("tokenizer.ggml.padding_token_id", Value::U32(0));

    let norm = |w: &mut GgufWriter, name: &str, len: usize, rng: &mut StdRng| {
        w.tensor(name, GgmlDType::F32, &[len], f32_bytes(&random_tensor(rng, &[len], 0.2, 1.0)));
    };
    let vocab_size = vocab.len();
    let embd = quantized(&mut rng, &[vocab_size, HIDDEN], GgmlDType::Q8_0);
    w.tensor("token_embd.weight", GgmlDType::Q8_0, &[vocab_size, HIDDEN], embd);
    norm(&mut w, "output_norm.weight", HIDDEN, &mut rng);
    let q_width = HEADS * HEAD_DIM;
    for layer in 0..LAYERS {
        let name = |t: &str| format!("blk.{layer}.{t}.weight");
        for (t, dtype, dims) in [
            ("attn_q", GgmlDType::Q5_0, [q_width, HIDDEN]),
            ("attn_k", GgmlDType::Q5_0, [HEAD_DIM, HIDDEN]),
            ("attn_v", GgmlDType::Q8_0, [HEAD_DIM, HIDDEN]),
            ("attn_output", GgmlDType::Q4K, [HIDDEN, q_width]),
            ("ffn_gate", GgmlDType::Q5_0, [FFN, HIDDEN]),
            ("ffn_up", GgmlDType::Q5_0, [FFN, HIDDEN]),
            ("ffn_down", GgmlDType::Q6K, [HIDDEN, FFN]),
        ] {
            let data = quantized(&mut rng, &dims, dtype);
            w.tensor(&name(t), dtype, &dims, data);
        }
        for (t, len) in [
            ("attn_norm", HIDDEN),
            ("attn_q_norm", HEAD_DIM),
            ("attn_k_norm", HEAD_DIM),
            ("post_attention_norm", HIDDEN),
            ("ffn_norm", HIDDEN),
            ("post_ffw_norm", HIDDEN),
        ] {
            norm(&mut w, &name(t), len, &mut rng);
        }
    }
    w
}

/// The tiny model's configuration, read back from a written file, for unit tests that reshape
/// it.
#[cfg(test)]
pub(crate) fn tiny_config() -> crate::model::Config {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(1).write(&path).expect("the tiny model is written");
    let gguf = crate::gguf::GgufFile::open(&path).expect("the tiny model reads back");
    crate::model::Config::from_gguf(&gguf).expect("the tiny model's metadata is complete")
}
