//! `tessera bench`: prefill and decode throughput, load time and peak memory of one model, as
//! medians over several runs, printed as a table. `serve` drives the HTTP API.

pub mod adapters;
pub mod serve;
pub mod train;

use std::path::Path;
use std::time::Instant;

use tessera_adapters::AdapterMix;

use crate::generate::prefill;
use crate::model::decoder::SequenceChunk;
use crate::model::{KvCache, LogitsFor};
use crate::sampler::argmax;
use crate::{LoadError, LoadedModel};

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

/// Runs every measurement `runs` times.
pub fn run(model_path: &Path, runs: usize, decode_tokens: usize) -> Result<Vec<Measurement>, LoadError> {
    let runs = runs.max(1);
    let mut load = Measurement {
        name: "model load".into(),
        unit: "s",
        samples: Vec::new(),
    };
    let mut loaded = None;
    for _ in 0..runs {
        let start = Instant::now();
        let m = LoadedModel::load(model_path)?;
        load.samples.push(start.elapsed().as_secs_f64());
        loaded = Some(m);
    }
    let Some(LoadedModel { model, tokenizer, .. }) = loaded else {
        unreachable!("runs ≥ 1");
    };
    let none = AdapterMix::default();
    let text_ids = tokenizer.encode(&BENCH_TEXT.repeat(40), false, false)?;
    let prompt = |n: usize| -> Vec<u32> {
        tokenizer.bos_prefix().into_iter()
            .chain(text_ids.iter().copied().cycle())
            .take(n)
            .collect()
    };

    let mut out = Vec::new();
    for n in [128usize, 512] {
        let ids = prompt(n);
        let mut m = Measurement {
            name: format!("prefill {n} tokens"),
            unit: "tok/s",
            samples: Vec::new(),
        };
        // One untimed pass warms caches and lets candle repack weights.
        for i in 0..=runs {
            let mut cache = KvCache::new(model.config(), n)?;
            let start = Instant::now();
            prefill(&model, &mut cache, &ids, &none)?;
            if i > 0 {
                m.samples.push(n as f64 / start.elapsed().as_secs_f64());
            }
        }
        out.push(m);
    }

    let mut decode = Measurement {
        name: format!("decode, 1 stream, {decode_tokens} tokens"),
        unit: "tok/s",
        samples: Vec::new(),
    };
    let ids = prompt(16);
    for i in 0..=runs {
        let mut cache = KvCache::new(model.config(), ids.len() + decode_tokens + 1)?;
        let mut token = argmax(&prefill(&model, &mut cache, &ids, &none)?);
        let start = Instant::now();
        for _ in 0..decode_tokens {
            let logits = model.forward(&mut [SequenceChunk {
                tokens: &[token],
                cache: &mut cache,
                logits: LogitsFor::Last,
                adapters: &none,
            }])?;
            token = argmax(logits.row(0, 0));
        }
        if i > 0 {
            decode
                .samples
                .push(decode_tokens as f64 / start.elapsed().as_secs_f64());
        }
    }
    out.insert(0, load);
    out.push(decode);
    if let Some(rss) = peak_rss_mib() {
        out.push(Measurement {
            name: "peak RSS".into(),
            unit: "MiB",
            samples: vec![rss],
        });
    }
    Ok(out)
}

/// The process's peak resident set size (`VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
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
