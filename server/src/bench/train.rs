//! `tessera bench train`: QLoRA training throughput on the served model (tokens per second of
//! forward + backward + AdamW, every position scored) and the process's peak memory.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::bench::{Measurement, BENCH_TEXT};
use crate::train::gemma3::Example;
use crate::train::lora::{LoraParams, LoraSpec};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::{train_step, TrainError};
use crate::LoadedModel;

pub struct TrainLoad {
    pub steps: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub spec: LoraSpec,
}

pub fn run(model_path: &Path, load: &TrainLoad) -> Result<Vec<Measurement>, anyhow::Error> {
    let model = Arc::new(LoadedModel::load(model_path)?);
    let text = model.tokenizer.encode(&BENCH_TEXT.repeat(20), false, false)?;
    let batch: Vec<Example> = (0..load.batch)
        .map(|i| {
            let tokens: Vec<u32> = std::iter::once(model.tokenizer.bos_id())
                .chain(text.iter().copied().cycle().skip(i * 17))
                .take(load.seq_len)
                .collect();
            Example {
                scored: vec![true; tokens.len()],
                tokens,
            }
        })
        .collect();
    let lora = LoraParams::fresh(&model.model.config().adapter_shape(), load.spec.clone(), 0)?;
    let vars: Vec<_> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    let mut optimizer = AdamW::new(
        AdamWConfig {
            learning_rate: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            warmup_steps: 0,
            total_steps: load.steps + 1,
        },
        &vars,
    )?;
    let mut throughput = Measurement {
        name: format!("train r{} b{}×{}", load.spec.rank, load.batch, load.seq_len),
        unit: "tok/s",
        samples: Vec::new(),
    };
    // One untimed step first: allocations and page faults of the first backward pass.
    for step in 0..=load.steps {
        let start = Instant::now();
        let stats = train_step(&model, &lora, &mut optimizer, &[&batch]).map_err(|e: TrainError| anyhow::anyhow!(e))?;
        let seconds = start.elapsed().as_secs_f64();
        eprintln!("step {step}: loss {:.3}, {:.2} s", stats.loss, seconds);
        if step > 0 {
            throughput.samples.push((load.batch * load.seq_len) as f64 / seconds);
        }
    }
    let mut rows = vec![throughput];
    if let Some(rss) = crate::bench::peak_rss_mib() {
        rows.push(Measurement {
            name: "peak RSS".into(),
            unit: "MiB",
            samples: vec![rss],
        });
    }
    Ok(rows)
}
