//! `tessera bench train`: QLoRA training throughput on the served model (tokens per second of
//! forward + backward + the optimizer's update), the gradient and optimizer-state bytes, and
//! the peak memory, for each optimizer. Two workloads: plain text with
//! every position scored (the most output-layer work a batch can need), and instruction pairs
//! as the tuner trains them, with the loss on the answers only.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::bench::{Measurement, BENCH_TEXT};
use crate::train::decoder::{Example, Trainable};
use crate::train::lora::{AdapterParams, LoraSpec};
use crate::train::job::{new_optimizer, Hyperparameters};
use crate::train::optim::OptimizerKind;
use crate::train::dpo::PreferenceLoss;
use crate::train::step::job_step;
use crate::train::TrainError;
use crate::LoadedModel;

pub struct TrainLoad {
    pub steps: usize,
    pub seq_len: usize,
    pub batch: usize,
    pub spec: LoraSpec,
    /// Instruction pairs to train on as well.
    pub data: Option<std::path::PathBuf>,
    /// Each measured in turn, with its own peak memory.
    pub optimizers: Vec<OptimizerKind>,
}

/// The pairs of `path` as training sequences: any upload format, or Self-Instruct seed tasks
/// (`{instruction, instances: [{input, output}]}`, the first instance of each).
fn instruction_examples(model: &LoadedModel, path: &Path, seq_len: usize) -> Result<Vec<Example>, anyhow::Error> {
    let body = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let records = crate::dataset::parse_records(&body).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut examples = Vec::new();
    for (i, record) in records.iter().enumerate() {
        let record = match record.get("instances").and_then(|instances| instances.get(0)) {
            Some(instance) => serde_json::json!({
                "instruction": record.get("instruction"),
                "input": instance.get("input"),
                "output": instance.get("output"),
            }),
            None => record.clone(),
        };
        let conversation = crate::dataset::parse_record(&record).map_err(|e| anyhow::anyhow!("{}: record {i}: {e}", path.display()))?;
        if let Some(example) = crate::train::data::example(&model.tokenizer, &model.chat, &conversation, seq_len)? {
            examples.push(example);
        }
    }
    if examples.is_empty() {
        anyhow::bail!("{}: no pair has a scored token within {seq_len} tokens", path.display());
    }
    Ok(examples)
}

/// What a run of steps measured: tok/s per timed step, and the most gradient and optimizer-state
/// bytes alive at once.
struct Timed {
    samples: Vec<f64>,
    training_bytes: usize,
}

/// Times `steps` optimizer steps (after one untimed) over `batches` in turn.
fn time_steps(model: &Arc<LoadedModel>, load: &TrainLoad, kind: OptimizerKind, batches: &[Vec<Example>]) -> Result<Timed, anyhow::Error> {
    let lora = AdapterParams::fresh(model, load.spec.clone(), 0)?;
    // A job's optimizer at a small rate: the bench measures, not learns.
    let hyperparameters = Hyperparameters { learning_rate: 1e-4, optimizer: kind, ..Hyperparameters::default() };
    let mut optimizer = new_optimizer(&lora, hyperparameters, load.steps + 1).map_err(|e| anyhow::anyhow!(e))?;
    let (mut samples, mut training_bytes) = (Vec::new(), 0);
    // One untimed step first: allocations and page faults of the first backward pass.
    for (step, batch) in (0..=load.steps).zip(batches.iter().cycle()) {
        let tokens: usize = batch.iter().map(|e| e.tokens.len()).sum();
        let start = Instant::now();
        let stats = job_step(Trainable::new(model, &lora), &mut optimizer, batch, &[], PreferenceLoss::dpo(0.1), batch.len()).map_err(|e: TrainError| anyhow::anyhow!(e))?;
        let seconds = start.elapsed().as_secs_f64();
        let scored = stats.sft.map_or(0, |(_, n)| n);
        eprintln!("{} step {step}: {tokens} tokens ({scored} scored), loss {:.3}, {seconds:.2} s", kind.name(), stats.loss);
        training_bytes = training_bytes.max(stats.gradient_bytes + optimizer.state_bytes());
        if step > 0 {
            samples.push(tokens as f64 / seconds);
        }
    }
    Ok(Timed { samples, training_bytes })
}

/// The bench's rows for one optimizer: throughput on each workload, its training bytes and the
/// peak RSS of its steps alone.
fn optimizer_rows(model: &Arc<LoadedModel>, load: &TrainLoad, kind: OptimizerKind, workloads: &[(String, Vec<Vec<Example>>)]) -> Result<Vec<Measurement>, anyhow::Error> {
    // Each optimizer's peak is its own: the one measured before must not set it.
    crate::metrics::release_free_heap();
    crate::metrics::reset_peak_resident_set();
    let mut rows = Vec::new();
    let mut training_bytes = 0;
    for (name, batches) in workloads {
        let timed = time_steps(model, load, kind, batches)?;
        training_bytes = training_bytes.max(timed.training_bytes);
        rows.push(Measurement { name: format!("{name}, {}", kind.name()), unit: "tok/s", samples: timed.samples });
    }
    rows.push(Measurement { name: format!("gradient + optimizer state, {}", kind.name()), unit: "MiB", samples: vec![training_bytes as f64 / (1 << 20) as f64] });
    if let Some(rss) = crate::bench::peak_rss_mib() {
        rows.push(Measurement { name: format!("peak RSS, {}", kind.name()), unit: "MiB", samples: vec![rss] });
    }
    Ok(rows)
}

pub fn run(model_path: &Path, load: &TrainLoad) -> Result<Vec<Measurement>, anyhow::Error> {
    let model = Arc::new(LoadedModel::load(model_path)?);
    let text = model.tokenizer.encode(&BENCH_TEXT.repeat(20), false, false)?;
    let batch: Vec<Example> = (0..load.batch)
        .map(|i| {
            let tokens: Vec<u32> = model.tokenizer.bos_prefix().into_iter()
                .chain(text.iter().copied().cycle().skip(i * 17))
                .take(load.seq_len)
                .collect();
            Example {
                scored: vec![true; tokens.len()],
                tokens,
            }
        })
        .collect();
    let mut workloads = vec![(format!("train r{} b{}×{}, all scored", load.spec.rank, load.batch, load.seq_len), vec![batch])];
    if let Some(path) = &load.data {
        let examples = instruction_examples(&model, path, load.seq_len)?;
        let batches: Vec<Vec<Example>> = examples.chunks(load.batch.max(1)).map(<[Example]>::to_vec).collect();
        let tokens: usize = examples.iter().map(|e| e.tokens.len()).sum();
        let scored: usize = examples.iter().map(Example::scored_tokens).sum();
        eprintln!(
            "{}: {} pairs, {:.0} tokens a pair, {:.0}% of the tokens scored",
            path.display(),
            examples.len(),
            tokens as f64 / examples.len() as f64,
            100.0 * scored as f64 / tokens as f64
        );
        workloads.push((format!("train r{} b{}×≤{}, pairs", load.spec.rank, load.batch, load.seq_len), batches));
    }
    let mut rows = Vec::new();
    for &kind in &load.optimizers {
        rows.extend(optimizer_rows(&model, load, kind, &workloads)?);
    }
    Ok(rows)
}

/// Serving inter-token latency while idle and while a fine-tuning job runs in the background
/// (the server's own trainer, `train_threads` threads at the lowest priority).
pub fn serving_under_training(
    model_path: &Path,
    clients: usize,
    max_tokens: usize,
    train_threads: usize,
) -> Result<Vec<Measurement>, anyhow::Error> {
    use crate::bench::serve::{percentile, run_level, start_local, ServeLoad};
    let model = Arc::new(LoadedModel::load(model_path)?);
    let tuning_dir = tempfile_dir()?;
    let tuning = crate::api::TuningConfig {
        root: tuning_dir.clone(),
        state: None, blobs: None,
        settings: crate::train::job::TuningSettings {
            train_threads,
            train_after: usize::MAX,
            ..Default::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let rows = runtime.block_on(async move {
        let (_app, url) = start_local(model, "base", None, clients.max(1), Some(tuning)).await?;
        let models = vec!["base".to_string()];
        let load = ServeLoad {
            max_tokens,
            requests_per_client: 2,
        };
        // Warm-up, then idle.
        run_level(&url, &models, clients, &ServeLoad { max_tokens: 4, requests_per_client: 1 }).await?;
        let idle = run_level(&url, &models, clients, &load).await?;

        // A long job on 64 pairs of 128-token sequences.
        let client = reqwest::Client::new();
        let text = BENCH_TEXT.repeat(4);
        let records: Vec<String> = (0..64)
            .map(|i| serde_json::json!({"instruction": format!("{i}: {}", &text[..300]), "output": &text[300..600]}).to_string())
            .collect();
        client.post(format!("{url}/v1/adapters/bench-train/feedback")).body(records.join("\n")).send().await?.error_for_status()?;
        let job: serde_json::Value = client
            .post(format!("{url}/v1/adapters/bench-train/train"))
            .json(&serde_json::json!({"hyperparameters": {"n_epochs": 50}}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let id = job["id"].as_str().unwrap_or_default().to_string();
        loop {
            let job: serde_json::Value = client.get(format!("{url}/v1/fine_tuning/jobs/{id}")).send().await?.json().await?;
            if job["status"] == "running" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let training = run_level(&url, &models, clients, &load).await?;
        client.post(format!("{url}/v1/fine_tuning/jobs/{id}/cancel")).send().await?;
        Ok::<_, anyhow::Error>((idle, training))
    })?;
    let _ = std::fs::remove_dir_all(&tuning_dir);
    let (idle, training) = rows;
    let p95 = |itl: &[f64]| percentile(itl, 0.95) * 1000.0;
    let (idle_p95, training_p95) = (p95(&idle.itl), p95(&training.itl));
    Ok(vec![
        Measurement {
            name: format!("ITL p95, {clients} clients, idle"),
            unit: "ms",
            samples: vec![idle_p95],
        },
        Measurement {
            name: format!("ITL p95, {clients} clients, training"),
            unit: "ms",
            samples: vec![training_p95],
        },
        Measurement {
            name: "ITL p95 training / idle".into(),
            unit: "×",
            samples: vec![training_p95 / idle_p95],
        },
    ])
}

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("tessera-bench-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
