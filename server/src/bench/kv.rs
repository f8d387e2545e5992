//! `tessera bench kv`: what the paged KV cache holds and what the prefix cache saves, against
//! what the previous design (f32 keys and values reserved for `prompt + max_tokens` on every
//! layer) reserved for the same work.
//! - 16 concurrent chat requests without `max_tokens` (so each may reach the whole context),
//!   64 tokens each: the most KV bytes the pool held, against 16 full-context reservations.
//! - A 1,000-token shared prefix and a 20-token question: time to first token when the prefix
//!   is cached, against computing it (a new prefix each run).
//! - One sequence at 8,192 positions: the bytes its blocks hold.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_adapters::AdapterMix;

use super::{median, BENCH_TEXT};
use crate::chat_template::Turn;
use crate::engine::{Engine, EngineConfig, Event, GenerationRequest};
use crate::metrics::Metrics;
use crate::model::decoder::SequenceChunk;
use crate::model::{KvCache, KvPool, LogitsFor};
use crate::sampler::SamplingParams;
use crate::LoadedModel;

#[derive(Debug, thiserror::Error)]
pub enum KvBenchError {
    #[error("starting the engine: {0}")]
    Start(#[from] std::io::Error),
    #[error("{0}")]
    Engine(String),
}

pub struct KvRow {
    pub measure: &'static str,
    pub tessera: f64,
    pub before: f64,
    pub unit: &'static str,
    pub target: &'static str,
}

/// f32 keys and values on every layer: what the previous cache reserved per position.
fn reserved_bytes_per_position(model: &LoadedModel) -> usize {
    let c = model.model.config();
    c.n_layers * 2 * c.kv_width() * 4
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        stop_strings: Vec::new(),
        logprobs: None,
        prompt_logprobs: false,
        adapters: Vec::new(),
        constraint: None,
        embed: false,
    }
}

/// Waits for `n` tokens (or the end) of one generation; returns when the first came.
fn take_tokens(events: &mut tokio::sync::mpsc::UnboundedReceiver<Event>, n: usize) -> Result<Option<Instant>, KvBenchError> {
    let mut first = None;
    for _ in 0..n {
        match events.blocking_recv() {
            Some(Event::Token(_)) => {
                first.get_or_insert_with(Instant::now);
            }
            Some(Event::Failed(message)) => return Err(KvBenchError::Engine(message)),
            Some(Event::Finished(_)) | None => break,
        }
    }
    Ok(first)
}

fn start(model: &Arc<LoadedModel>, ctx_len: usize) -> Result<Engine, KvBenchError> {
    let config = EngineConfig { ctx_len, max_running_seqs: 16, ..EngineConfig::default() };
    Ok(Engine::start(model.clone(), config, Arc::new(Metrics::new()))?.0)
}

/// The most KV bytes held while 16 chat requests without `max_tokens` generate 64 tokens each.
pub fn concurrent_chats(model: &Arc<LoadedModel>, ctx_len: usize) -> Result<KvRow, KvBenchError> {
    let engine = start(model, ctx_len)?;
    let mut streams = Vec::new();
    for client in 0..16 {
        let turn = Turn { role: "user", text: format!("Client {client}: write a short story about a lighthouse keeper."), ..Default::default() };
        let text = model.chat.render(&[turn], true).map_err(|e| KvBenchError::Engine(e.to_string()))?;
        let prompt = model.tokenizer.encode(&text, true, true).map_err(|e| KvBenchError::Engine(e.to_string()))?;
        // No max_tokens: the rest of the context is the limit, as the API sets it.
        let max_tokens = ctx_len - prompt.len();
        streams.push(engine.submit(request(prompt, max_tokens)).map_err(|e| KvBenchError::Engine(e.to_string()))?);
    }
    for events in &mut streams {
        take_tokens(events, 64)?;
    }
    let pool = engine.kv_pool();
    let held = pool.peak_blocks() * pool.block_bytes();
    // The previous cache reserved prompt + max_tokens, the whole context, for each of them.
    let before = streams.len() * ctx_len * reserved_bytes_per_position(model);
    Ok(KvRow { measure: "KV bytes, 16 chats without max_tokens (MiB)", tessera: mib(held), before: mib(before), unit: "MiB", target: "≤ 0.05×" })
}

/// Median time to first token after a 1,000-token prefix: cached (second request) and cold.
pub fn shared_prefix_ttft(model: &Arc<LoadedModel>, runs: usize) -> Result<KvRow, KvBenchError> {
    let engine = start(model, 2048)?;
    let words: Vec<&str> = BENCH_TEXT.split_whitespace().collect();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for run in 0..runs {
        // A prefix no earlier run has seen: the words in another order.
        let text: String = (0..2000).map(|i| words[(i * (run + 3) + run) % words.len()]).collect::<Vec<_>>().join(" ");
        let mut prefix = model.tokenizer.encode(&text, false, true).map_err(|e| KvBenchError::Engine(e.to_string()))?;
        prefix.truncate(1000);
        for (question, times) in [(0u32, &mut cold), (1, &mut warm)] {
            let mut prompt = prefix.clone();
            prompt.extend((0..20).map(|i| 1000 + question * 100 + i));
            let submitted = Instant::now();
            let mut events = engine.submit(request(prompt, 1)).map_err(|e| KvBenchError::Engine(e.to_string()))?;
            let first = take_tokens(&mut events, 1)?.unwrap_or_else(Instant::now);
            times.push((first - submitted).as_secs_f64() * 1000.0);
        }
    }
    Ok(KvRow { measure: "TTFT, 1,000-token prefix + 20 (ms)", tessera: median(&warm), before: median(&cold), unit: "ms", target: "≤ 0.15×" })
}

/// Bytes one sequence's blocks hold at `positions` (prefilled in chunks of 256, then a token).
pub fn bytes_per_sequence(model: &Arc<LoadedModel>, positions: usize) -> Result<KvRow, KvBenchError> {
    let decoder = &model.model;
    let config = decoder.config();
    let pool = KvPool::new(config, 1 << 32);
    let mut cache = KvCache::in_pool(&pool, config, positions);
    let ids: Vec<u32> = (0..positions as u32).map(|i| 1000 + (i * 7919) % 20000).collect();
    let none = AdapterMix::default();
    let mut fed = 0;
    while fed < positions {
        let n = if fed + 1 == positions { 1 } else { 256.min(positions - 1 - fed) };
        let chunk = SequenceChunk { tokens: &ids[fed..fed + n], cache: &mut cache, logits: LogitsFor::None, adapters: &none };
        decoder.forward(&mut [chunk]).map_err(|e| KvBenchError::Engine(e.to_string()))?;
        fed += n;
    }
    let held = cache.total_blocks_held() * pool.block_bytes();
    let before = positions * reserved_bytes_per_position(model);
    Ok(KvRow { measure: "KV bytes, one sequence at 8,192 positions (MiB)", tessera: mib(held), before: mib(before), unit: "MiB", target: "≤ 0.2×" })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

pub fn format_table(cpu: &str, rows: &[KvRow], elapsed: Duration) -> String {
    let mut out = format!("CPU: {cpu}; {:.0} s\n\n", elapsed.as_secs_f64());
    out.push_str("| measure | tessera | before (f32, reserved up front; cold prefix) | ratio | target |\n|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!("| {} | {:.1} | {:.1} | {:.3}× | {} |\n", r.measure, r.tessera, r.before, r.tessera / r.before, r.target));
    }
    out
}
