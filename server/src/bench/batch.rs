//! `tessera bench batch`: interactive streaming latency with and without a large batch running
//! in the background. The batch's chat lines are spread over several adapters; the interactive
//! clients stream completions from the base. The figure of merit is the interactive
//! inter-token p95 with the batch over the p95 without it, and whether the batch finishes.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::serve::{percentile, run_level, ServeBenchError, ServeLoad, ServeRow};

pub struct BatchLoad {
    /// Lines in the batch.
    pub lines: usize,
    /// Tokens each batch line generates at most.
    pub line_max_tokens: usize,
    pub clients: usize,
    /// What each interactive client streams.
    pub interactive: ServeLoad,
}

pub struct BatchReport {
    /// The interactive clients before the batch, then while it runs, then after it ended.
    pub before: ServeRow,
    pub during: ServeRow,
    pub after: ServeRow,
    /// Batch lines finished when the interactive clients of `during` were done.
    pub lines_during: u64,
    /// From the batch's creation to its end.
    pub batch_wall: Duration,
    /// The batch as it ended.
    pub batch: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum BatchBenchError {
    #[error(transparent)]
    Serve(#[from] ServeBenchError),
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("the server answered {0}")]
    Answer(Value),
    #[error("the batch did not end within {0:?}")]
    Timeout(Duration),
}

async fn json_of(url: &str, response: Result<reqwest::Response, reqwest::Error>) -> Result<Value, BatchBenchError> {
    let value: Value = response.map_err(|source| BatchBenchError::Http { url: url.into(), source })?.json().await.map_err(|source| BatchBenchError::Http { url: url.into(), source })?;
    match value.get("error") {
        Some(_) => Err(BatchBenchError::Answer(value)),
        None => Ok(value),
    }
}

/// Uploads the batch file (line i on `adapters[i % len]`) and creates the batch.
async fn create_batch(client: &reqwest::Client, base: &str, adapters: &[String], load: &BatchLoad) -> Result<Value, BatchBenchError> {
    let lines: Vec<String> = (0..load.lines)
        .map(|i| {
            let body = json!({
                "model": adapters[i % adapters.len()],
                "messages": [{"role": "user", "content": format!("Name a color for item {i}.")}],
                "max_tokens": load.line_max_tokens,
                "temperature": 0,
            });
            json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
        })
        .collect();
    let part = reqwest::multipart::Part::bytes(lines.join("\n").into_bytes()).file_name("bench-batch.jsonl");
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", part);
    let url = format!("{base}/v1/files");
    let file = json_of(&url, client.post(&url).multipart(form).send().await).await?;
    let url = format!("{base}/v1/batches");
    let request = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
    json_of(&url, client.post(&url).json(&request).send().await).await
}

async fn batch_state(client: &reqwest::Client, base: &str, id: &str) -> Result<Value, BatchBenchError> {
    let url = format!("{base}/v1/batches/{id}");
    json_of(&url, client.get(&url).send().await).await
}

/// Runs the three interactive rounds around the batch on the server at `base` (its adapters
/// already loaded), waiting at most `limit` for the batch to end.
pub async fn run(base: &str, adapters: &[String], load: &BatchLoad, limit: Duration) -> Result<BatchReport, BatchBenchError> {
    let base = base.trim_end_matches('/');
    let client = reqwest::Client::new();
    let models = vec!["base".to_string()];
    // Untimed: every timed round then finds its prompts in the prefix cache alike.
    run_level(base, &models, load.clients, &load.interactive).await?;
    let before = run_level(base, &models, load.clients, &load.interactive).await?;
    let started = Instant::now();
    let created = create_batch(&client, base, adapters, load).await?;
    let id = created["id"].as_str().unwrap_or_default().to_string();
    let during = run_level(base, &models, load.clients, &load.interactive).await?;
    let lines_during = batch_state(&client, base, &id).await?["request_counts"]["completed"].as_u64().unwrap_or(0);
    let batch = loop {
        let batch = batch_state(&client, base, &id).await?;
        if matches!(batch["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
            break batch;
        }
        if started.elapsed() > limit {
            return Err(BatchBenchError::Timeout(limit));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let batch_wall = started.elapsed();
    let after = run_level(base, &models, load.clients, &load.interactive).await?;
    Ok(BatchReport { before, during, after, lines_during, batch_wall, batch })
}

/// Writes `count` random rank-8 LoRAs named `bench-batch-NN` under `dir`; returns their names.
pub fn write_adapters(dir: &Path, shape: &tessera_adapters::peft::BaseShape, count: usize) -> std::io::Result<Vec<String>> {
    (0..count)
        .map(|i| {
            let name = format!("bench-batch-{i:02}");
            super::adapters::write_random_adapter(&dir.join(&name), shape, tessera_adapters::AdapterKind::Lora, 8, i as u64)?;
            Ok(name)
        })
        .collect()
}

pub fn format_report(cpu: &str, load: &BatchLoad, adapters: usize, report: &BatchReport) -> String {
    let p95 = |row: &ServeRow| percentile(&row.itl, 0.95) * 1e3;
    let p50 = |row: &ServeRow| percentile(&row.itl, 0.5) * 1e3;
    let without = (p95(&report.before) + p95(&report.after)) / 2.0;
    let counts = &report.batch["request_counts"];
    let mut s = format!(
        "CPU: {cpu}\n{} interactive clients × {} requests × {} tokens; a batch of {} chat lines × {} tokens over {adapters} adapters\n\n",
        load.clients, load.interactive.requests_per_client, load.interactive.max_tokens, load.lines, load.line_max_tokens
    );
    s.push_str("| interactive round | ITL p50 (ms) | ITL p95 (ms) | tok/s |\n|:--|--:|--:|--:|\n");
    for (name, row) in [("before the batch", &report.before), ("while the batch runs", &report.during), ("after the batch", &report.after)] {
        s.push_str(&format!("| {name} | {:.1} | {:.1} | {:.1} |\n", p50(row), p95(row), row.tokens as f64 / row.wall.as_secs_f64()));
    }
    s.push_str(&format!(
        "\nITL p95 with the batch / without (mean of before and after): {:.2}× (target ≤ 1.25×)\n\
         batch: {} in {:.1} s, request_counts {counts}; {} lines finished while the clients streamed\n",
        p95(&report.during) / without,
        report.batch["status"].as_str().unwrap_or("?"),
        report.batch_wall.as_secs_f64(),
        report.lines_during,
    ));
    s
}
