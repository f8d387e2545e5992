//! Loading, masking, caching and batching on a tiny synthetic Gemma 3 written by the test itself.

use std::path::PathBuf;

use tessera::generate::{generate, GenerateParams};
use tessera::model::decoder::SequenceChunk;
use tessera::model::synthetic::{self, tiny_gemma3};
use tessera::model::{KvCache, LogitsFor, ModelError};
use tessera::sampler::SamplingParams;
use tessera::LoadedModel;
use tessera_adapters::{AdapterMix, LoraDelta, AdapterWeights, TargetModule};

fn tiny_model() -> (tempfile::TempDir, LoadedModel) {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("tiny.gguf");
    tiny_gemma3(7).write(&path).unwrap();
    let model = LoadedModel::load(&path).unwrap();
    (dir, model)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Tokens cycling through the ordinary pieces of the tiny vocabulary.
fn tokens(n: usize, offset: u32) -> Vec<u32> {
    (0..n as u32).map(|i| 263 + (i * 7 + offset) % 32).collect()
}

const NONE: AdapterMix<'static> = AdapterMix { parts: Vec::new() };

#[test]
fn loads_with_the_architecture_from_the_metadata() {
    let (_dir, m) = tiny_model();
    let c = m.model.config();
    assert_eq!((c.hidden, c.n_layers, c.n_heads, c.n_kv_heads), (320, 7, 2, 1));
    assert_eq!((c.head_dim, c.ffn_hidden, c.sliding_window), (128, 512, Some(4)));
    assert_eq!(c.window(5), None, "every sixth layer is global");
    assert_eq!((c.window(4), c.window(6)), (Some(4), Some(4)));
    assert_eq!(c.family, tessera::model::config::Family::Gemma3);
    assert_eq!(c.rope.style, tessera::model::config::RopeStyle::NeoX);
    assert_eq!(c.embedding_scale, Some((320f64).sqrt()));
}

#[test]
fn tokenizer_comes_from_the_metadata() {
    let (_dir, m) = tiny_model();
    let t = &m.tokenizer;
    // No space prefix: a leading space is part of the text, and merges build `▁the`.
    let ids = t.encode(" the cat", false, false).unwrap();
    assert_eq!(ids[0], t.piece_to_id("▁the").unwrap());
    assert_eq!(t.decode(&ids, false).unwrap(), " the cat");
    let ids = t.encode("the", false, false).unwrap();
    assert_eq!(ids, [t.piece_to_id("t").unwrap(), t.piece_to_id("he").unwrap()]);
    // Byte fallback for characters outside the vocabulary.
    let ids = t.encode("é", false, false).unwrap();
    assert_eq!(ids, vec![7 + 0xC3, 7 + 0xA9]);
    assert_eq!(t.decode(&ids, false).unwrap(), "é");
    let turn = t.encode("<start_of_turn>", true, true).unwrap();
    assert_eq!(turn, vec![2, 4]);
    assert_ne!(t.encode("<start_of_turn>", false, false).unwrap(), vec![4]);
}

/// Runs `chunks` of one sequence one after the other and returns every requested logit row.
fn run_alone(m: &LoadedModel, chunks: &[(&[u32], LogitsFor)], adapters: &AdapterMix) -> Vec<Vec<f32>> {
    let mut cache = KvCache::new(m.model.config(), 128).unwrap();
    let mut rows = Vec::new();
    for &(tokens, logits) in chunks {
        let out = m
            .model
            .forward(&mut [SequenceChunk {
                tokens,
                cache: &mut cache,
                logits,
                adapters,
            }])
            .unwrap();
        rows.extend((0..out.rows(0)).map(|i| out.row(0, i).to_vec()));
    }
    rows
}

#[test]
fn a_batch_at_different_positions_matches_each_sequence_alone() {
    let (_dir, m) = tiny_model();
    let cfg = m.model.config();
    let (a, b, c) = (tokens(6, 0), tokens(40, 3), tokens(15, 5));
    // a: prefilled, then one decode step; b: a fresh 40-token prefill (the dense path);
    // c: 10 tokens cached, then a 5-token chunk past the sliding window with every logit.
    let mut cache_a = KvCache::new(cfg, 128).unwrap();
    let mut cache_b = KvCache::new(cfg, 128).unwrap();
    let mut cache_c = KvCache::new(cfg, 128).unwrap();
    for (cache, prefix) in [(&mut cache_a, &a[..5]), (&mut cache_c, &c[..10])] {
        m.model
            .forward(&mut [SequenceChunk {
                tokens: prefix,
                cache,
                logits: LogitsFor::None,
                adapters: &NONE,
            }])
            .unwrap();
    }
    let batched = m
        .model
        .forward(&mut [
            SequenceChunk {
                tokens: &a[5..],
                cache: &mut cache_a,
                logits: LogitsFor::Last,
                adapters: &NONE,
            },
            SequenceChunk {
                tokens: &b,
                cache: &mut cache_b,
                logits: LogitsFor::Last,
                adapters: &NONE,
            },
            SequenceChunk {
                tokens: &c[10..],
                cache: &mut cache_c,
                logits: LogitsFor::All,
                adapters: &NONE,
            },
        ])
        .unwrap();
    assert_eq!((batched.rows(0), batched.rows(1), batched.rows(2)), (1, 1, 5));
    assert_eq!((cache_a.len(), cache_b.len(), cache_c.len()), (6, 40, 15));

    let alone_a = run_alone(&m, &[(&a[..5], LogitsFor::None), (&a[5..], LogitsFor::Last)], &NONE);
    let alone_b = run_alone(&m, &[(&b, LogitsFor::Last)], &NONE);
    let alone_c = run_alone(&m, &[(&c[..10], LogitsFor::None), (&c[10..], LogitsFor::All)], &NONE);
    let mut worst = max_abs_diff(batched.row(0, 0), &alone_a[0]);
    worst = worst.max(max_abs_diff(batched.row(1, 0), &alone_b[0]));
    for i in 0..5 {
        worst = worst.max(max_abs_diff(batched.row(2, i), &alone_c[i]));
    }
    assert!(worst < 1e-4, "batched logits differ from solo ones by {worst}");
}

#[test]
fn decoding_through_the_cache_matches_one_full_chunk_past_the_window() {
    let (_dir, m) = tiny_model();
    let seq = tokens(20, 1);
    let full = run_alone(&m, &[(&seq, LogitsFor::All)], &NONE);
    let steps: Vec<(&[u32], LogitsFor)> = seq
        .chunks(1)
        .map(|t| (t, LogitsFor::Last))
        .collect();
    let incremental = run_alone(&m, &steps, &NONE);
    assert_eq!(full.len(), 20);
    for (i, (f, s)) in full.iter().zip(&incremental).enumerate() {
        // Different shapes sum in different orders: allow rounding, relative to the logits.
        let scale = f.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = max_abs_diff(f, s);
        assert!(d < 1e-5 * scale, "position {i}: decode differs from prefill by {d} (logits up to {scale})");
    }
}

#[test]
fn the_sliding_window_hides_old_tokens_from_local_layers() {
    // With every layer local (5 layers < the global period of 6), a token 4·5 = 20 positions
    // back cannot reach the last position, but one inside the receptive field does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("local.gguf");
    let mut w = tiny_gemma3(7);
    w.metadata("gemma3.block_count", tessera::gguf::Value::U32(5));
    w.write(&path).unwrap();
    let m = LoadedModel::load(&path).unwrap();
    assert_eq!(m.model.config().n_layers, 5);
    let base = tokens(24, 2);
    let last = |seq: &[u32]| run_alone(&m, &[(seq, LogitsFor::Last)], &NONE).remove(0);
    let reference = last(&base);
    let mut far = base.clone();
    far[0] = 290;
    assert_eq!(max_abs_diff(&reference, &last(&far)), 0.0);
    let mut near = base.clone();
    near[20] = 290;
    assert!(max_abs_diff(&reference, &last(&near)) > 1e-3);
}

fn adapter_on_q(layer: usize, b_value: f32) -> AdapterWeights {
    let (input, output, rank) = (synthetic::HIDDEN, synthetic::HEADS * synthetic::HEAD_DIM, 2);
    let a: Vec<f32> = (0..rank * input).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    let b = vec![b_value; output * rank];
    let mut w = AdapterWeights::default();
    w.insert(
        layer,
        TargetModule::Q,
        LoraDelta::new(layer, TargetModule::Q, (input, output, rank), 2.0, a, b).unwrap(),
    );
    w
}

#[test]
fn lora_deltas_reach_only_their_own_rows() {
    let (_dir, m) = tiny_model();
    let weights = adapter_on_q(1, 0.5);
    let with = AdapterMix {
        parts: vec![(&weights, 1.0)],
    };
    let (x, y) = (tokens(8, 0), tokens(8, 4));
    let cfg = m.model.config();
    let mut cache_x = KvCache::new(cfg, 16).unwrap();
    let mut cache_y = KvCache::new(cfg, 16).unwrap();
    let batched = m
        .model
        .forward(&mut [
            SequenceChunk {
                tokens: &x,
                cache: &mut cache_x,
                logits: LogitsFor::Last,
                adapters: &with,
            },
            SequenceChunk {
                tokens: &y,
                cache: &mut cache_y,
                logits: LogitsFor::Last,
                adapters: &NONE,
            },
        ])
        .unwrap();
    let x_adapted = run_alone(&m, &[(&x, LogitsFor::Last)], &with).remove(0);
    let x_base = run_alone(&m, &[(&x, LogitsFor::Last)], &NONE).remove(0);
    let y_base = run_alone(&m, &[(&y, LogitsFor::Last)], &NONE).remove(0);
    assert!(max_abs_diff(batched.row(0, 0), &x_adapted) < 1e-4);
    assert!(max_abs_diff(batched.row(1, 0), &y_base) < 1e-4);
    assert!(max_abs_diff(&x_adapted, &x_base) > 1e-3, "the adapter changed nothing");

    // A zero B factor is a zero delta: the output is the base model's.
    let zero = adapter_on_q(1, 0.0);
    let zero_mix = AdapterMix {
        parts: vec![(&zero, 1.0)],
    };
    let x_zero = run_alone(&m, &[(&x, LogitsFor::Last)], &zero_mix).remove(0);
    assert!(max_abs_diff(&x_zero, &x_base) < 1e-5);
}

#[test]
fn a_prompt_longer_than_the_context_is_a_clear_error() {
    let (_dir, m) = tiny_model();
    let params = GenerateParams {
        max_tokens: 10,
        sampling: SamplingParams::default(),
        top_logprobs: 0,
        stop_ids: vec![],
    };
    let prompt = tokens(synthetic::CONTEXT, 0);
    let err = generate(&m.model, &prompt, &params, &NONE, |_| {}).unwrap_err();
    assert!(matches!(err, ModelError::ContextLength { needed: 266, limit: 256 }), "{err}");
    assert!(err.to_string().contains("context length exceeded"));

    let mut cache = KvCache::new(m.model.config(), 4).unwrap();
    let err = m
        .model
        .forward(&mut [SequenceChunk {
            tokens: &tokens(5, 0),
            cache: &mut cache,
            logits: LogitsFor::Last,
            adapters: &NONE,
        }])
        .err()
        .unwrap();
    assert!(matches!(err, ModelError::ContextLength { .. }), "{err}");
    let err = m
        .model
        .forward(&mut [SequenceChunk {
            tokens: &[100_000],
            cache: &mut cache,
            logits: LogitsFor::Last,
            adapters: &NONE,
        }])
        .err()
        .unwrap();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
}

#[test]
fn seeded_generation_repeats_and_greedy_is_deterministic() {
    let (_dir, m) = tiny_model();
    let prompt = tokens(5, 0);
    let run = |temperature: f32, seed: u64| {
        let params = GenerateParams {
            max_tokens: 12,
            sampling: SamplingParams {
                temperature,
                top_p: 0.95,
                seed,
                ..SamplingParams::default()
            },
            top_logprobs: 3,
            stop_ids: vec![],
        };
        generate(&m.model, &prompt, &params, &NONE, |_| {}).unwrap()
    };
    let (one, two) = (run(1.0, 11), run(1.0, 11));
    assert_eq!(one.token_ids, two.token_ids);
    assert_eq!(one.top_logprobs.len(), 12);
    assert!(one.top_logprobs.iter().all(|t| t.len() == 3 && t[0].1 >= t[1].1));
    assert_eq!(run(0.0, 1).token_ids, run(0.0, 2).token_ids);
}

#[test]
fn incremental_decoding_rebuilds_multibyte_text_and_survives_invalid_bytes() {
    use tessera::engine::text::IncrementalDecoder;
    let (_dir, m) = tiny_model();
    let t = &m.tokenizer;
    // "é€ the" through byte-fallback tokens and pieces: the deltas add up to the text.
    let ids = t.encode("é€ the", false, false).unwrap();
    let mut decoder = IncrementalDecoder::default();
    let text: String = ids.iter().map(|&id| decoder.push(t, id)).collect();
    assert_eq!(text, "é€ the");
    // Random byte tokens and pieces: never a panic.
    let mut decoder = IncrementalDecoder::default();
    let mut state = 12345u32;
    for _ in 0..2000 {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let id = 7 + (state >> 8) % 288;
        decoder.push(t, id);
    }
}
