//! `tessera bench`: prefill and decode throughput, load time and peak memory of one model, as
//! medians over several runs, printed as a table. `serve` drives the HTTP API.

pub mod adapters;
pub mod batch;
pub mod bound;
pub mod compare;
pub mod embeddings;
pub mod kv;
pub mod scale_out;
pub mod serve;
pub mod structured;
pub mod train;

use std::path::Path;
use std::time::Instant;

use tessera_adapters::AdapterMix;

use crate::generate::prefill;
use crate::model::decoder::SequenceChunk;
use crate::model::{KvCache, LogitsFor};
use crate::sampler::argmax;
use crate::{LoadError, LoadOptions, LoadedModel};

pub(crate) const BENCH_TEXT: &str = "Instruction tuning adapts a pretrained language model to follow \
    natural-language instructions by training it on pairs of instructions and desired outputs. \
    Low-rank adapters keep the base weights frozen and learn a small update for each layer. ";

pub struct Measurement {
    pub name: String,
    pub unit: &'static str,
    pub samples: Vec<f64>,
}

impl Measurement {
    pub fn median(&self) -> f64 {
        median(&self.samples)
    }
}

pub fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// A loaded model and the prompts the throughput measurements use.
pub(crate) struct Bench {
    model: LoadedModel,
    text_ids: Vec<u32>,
}

impl Bench {
    pub(crate) fn new(model: LoadedModel) -> Result<Self, LoadError> {
        let text_ids = model.tokenizer.encode(&BENCH_TEXT.repeat(40), true, false)?;
        Ok(Self { model, text_ids })
    }

    fn prompt(&self, n: usize) -> Vec<u32> {
        self.model.tokenizer.bos_prefix().into_iter().chain(self.text_ids.iter().copied().cycle()).take(n).collect()
    }

    /// Prefill of an `n`-token prompt into a fresh cache, in tokens per second.
    pub(crate) fn prefill(&self, n: usize) -> Result<f64, LoadError> {
        let ids = self.prompt(n);
        let model = &self.model.model;
        let mut cache = KvCache::new(model.config(), n)?;
        let start = Instant::now();
        prefill(model, &mut cache, &ids, &AdapterMix::default())?;
        Ok(n as f64 / start.elapsed().as_secs_f64())
    }

    /// Greedy decoding of `tokens` tokens after a 16-token prompt, one at a time, in tokens
    /// per second.
    pub(crate) fn decode(&self, tokens: usize) -> Result<f64, LoadError> {
        let (ids, none) = (self.prompt(16), AdapterMix::default());
        let model = &self.model.model;
        let mut cache = KvCache::new(model.config(), ids.len() + tokens + 1)?;
        let mut token = argmax(&prefill(model, &mut cache, &ids, &none)?);
        let start = Instant::now();
        for _ in 0..tokens {
            let logits = model.forward(&mut [SequenceChunk { tokens: &[token], cache: &mut cache, logits: LogitsFor::Last, adapters: &none }])?;
            token = argmax(logits.row(0, 0));
        }
        Ok(tokens as f64 / start.elapsed().as_secs_f64())
    }
}

/// The prompt lengths the prefill measurements use.
pub(crate) const PREFILL_LENGTHS: [usize; 2] = [128, 512];

/// Loads the model once (timed), prefills one 512-token prompt and reads the peak memory of
/// that alone; then the remaining loads are timed one model at a time.
pub(crate) fn load_and_measure_memory(model_path: &Path, options: &LoadOptions, runs: usize) -> Result<(Bench, Measurement, Option<f64>), LoadError> {
    let mut load = Measurement { name: "model load".into(), unit: "s", samples: Vec::new() };
    let start = Instant::now();
    let bench = Bench::new(LoadedModel::load_with(model_path, options)?)?;
    load.samples.push(start.elapsed().as_secs_f64());
    bench.prefill(512)?;
    let rss = peak_rss_mib();
    for _ in 1..runs {
        let start = Instant::now();
        drop(LoadedModel::load_with(model_path, options)?);
        load.samples.push(start.elapsed().as_secs_f64());
    }
    Ok((bench, load, rss))
}

/// Runs every measurement `runs` times (after one untimed warm-up each).
pub fn run(model_path: &Path, options: &LoadOptions, runs: usize, decode_tokens: usize) -> Result<Vec<Measurement>, LoadError> {
    let runs = runs.max(1);
    let (bench, load, rss) = load_and_measure_memory(model_path, options, runs)?;
    let mut out = vec![load];
    for n in PREFILL_LENGTHS {
        bench.prefill(n)?;
        let samples = (0..runs).map(|_| bench.prefill(n)).collect::<Result<_, _>>()?;
        out.push(Measurement { name: format!("prefill {n} tokens"), unit: "tok/s", samples });
    }
    bench.decode(decode_tokens)?;
    let samples = (0..runs).map(|_| bench.decode(decode_tokens)).collect::<Result<_, _>>()?;
    out.push(Measurement { name: format!("decode, 1 stream, {decode_tokens} tokens"), unit: "tok/s", samples });
    if let Some(rss) = rss {
        out.push(Measurement { name: "peak RSS, model + one 512-token prompt".into(), unit: "MiB", samples: vec![rss] });
    }
    Ok(out)
}

/// The process's peak resident set size (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    crate::metrics::process_status_bytes("VmHWM").map(|bytes| bytes as f64 / (1 << 20) as f64)
}

pub fn format_table(rows: &[Measurement]) -> String {
    let mut s = format!(
        "| {:<32} | {:>10} | {:<6} | {:<40} |\n|{:-<34}|{:->12}|{:-<8}|{:-<42}|\n",
        "measurement", "median", "unit", "all runs", "", "", "", ""
    );
    for r in rows {
        let all: Vec<String> = r.samples.iter().map(|v| format!("{v:.2}")).collect();
        s.push_str(&format!(
            "| {:<32} | {:>10.2} | {:<6} | {:<40} |\n",
            r.name,
            r.median(),
            r.unit,
            all.join(", ")
        ));
    }
    s
}
