//! `tessera bench serve`: concurrent streaming clients against the HTTP API, measuring total
//! throughput, time to first token and inter-token latency.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::json;

use super::median;

/// Starts a server on `model` in this process, on a free local port, for benchmarks, with room
/// for `max_running_seqs` sequences; returns the app and its base URL.
pub async fn start_local(
    model: std::sync::Arc<crate::LoadedModel>,
    model_id: &str,
    adapters_dir: Option<std::path::PathBuf>,
    max_running_seqs: usize,
    tuning: Option<crate::api::TuningConfig>,
) -> std::io::Result<(std::sync::Arc<crate::api::App>, String)> {
    const CTX_LEN: usize = 1024;
    let app = crate::api::App::start(
        model,
        model_id.to_string(),
        crate::api::ApiSettings {
            ctx_len: CTX_LEN,
            keys: Default::default(),
            request_timeout: Duration::from_secs(600),
            max_body_bytes: 1 << 20,
            adapters_dir,
            adapter_roots: Vec::new(),
            max_adapter_memory: None,
            tuning,
            plugins: None,
        },
        crate::engine::EngineConfig {
            ctx_len: CTX_LEN,
            max_running_seqs,
            max_queue: 4 * max_running_seqs,
            ..crate::engine::EngineConfig::default()
        },
    )?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(crate::api::serve(app.clone(), listener, std::future::pending()));
    Ok((app, url))
}

pub struct ServeLoad {
    pub max_tokens: usize,
    pub requests_per_client: usize,
}

pub struct ServeRow {
    pub clients: usize,
    pub tokens: usize,
    pub wall: Duration,
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeBenchError {
    #[error("request to {url} failed: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("the server answered {status}: {body}")]
    Status { status: u16, body: String },
}

/// One streamed completion: the time to its first token and the gaps between tokens.
async fn one_request(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    prompt: &str,
    max_tokens: usize,
) -> Result<(f64, Vec<f64>, usize), ServeBenchError> {
    let started = Instant::now();
    let response = client
        .post(url)
        .json(&json!({
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": true, "stream": true,
        }))
        .send()
        .await
        .map_err(|source| ServeBenchError::Http { url: url.into(), source })?;
    if !response.status().is_success() {
        let status = response.status().as_u16();
        let body = response.text().await.unwrap_or_default();
        return Err(ServeBenchError::Status { status, body });
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut last: Option<Instant> = None;
    let (mut ttft, mut gaps, mut tokens) = (0.0, Vec::new(), 0);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| ServeBenchError::Http { url: url.into(), source })?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else { continue };
            let is_token = serde_json::from_str::<serde_json::Value>(data)
                .map(|v| v["choices"][0]["finish_reason"].is_null() && v["choices"][0]["text"].is_string())
                .unwrap_or(false);
            if !is_token {
                continue;
            }
            let now = Instant::now();
            match last {
                None => ttft = (now - started).as_secs_f64(),
                Some(previous) => gaps.push((now - previous).as_secs_f64()),
            }
            last = Some(now);
            tokens += 1;
        }
    }
    Ok((ttft, gaps, tokens))
}

/// Runs `clients` concurrent clients, each sending `requests_per_client` requests in turn;
/// client c asks for `models[c % models.len()]`.
pub async fn run_level(
    base_url: &str,
    models: &[String],
    clients: usize,
    load: &ServeLoad,
) -> Result<ServeRow, ServeBenchError> {
    // A fresh connection per request: llama.cpp's server closes kept-alive connections after a
    // stream, and a pooled one it has closed fails the next request.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|source| ServeBenchError::Http { url: base_url.into(), source })?;
    let url = format!("{}/v1/completions", base_url.trim_end_matches('/'));
    let started = Instant::now();
    let results = futures::future::join_all((0..clients).map(|c| {
        let (client, url) = (client.clone(), url.clone());
        let model = models[c % models.len()].as_str();
        async move {
            let mut out = Vec::new();
            for r in 0..load.requests_per_client {
                let prompt = format!(
                    "Client {c}, request {r}: write a short story about a lighthouse keeper who"
                );
                out.push(one_request(&client, &url, model, &prompt, load.max_tokens).await?);
            }
            Ok::<_, ServeBenchError>(out)
        }
    }))
    .await;
    let wall = started.elapsed();
    let mut row = ServeRow {
        clients,
        tokens: 0,
        wall,
        ttft: Vec::new(),
        itl: Vec::new(),
    };
    for client_results in results {
        for (ttft, gaps, tokens) in client_results? {
            row.ttft.push(ttft);
            row.itl.extend(gaps);
            row.tokens += tokens;
        }
    }
    Ok(row)
}

pub fn percentile(samples: &[f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    if p == 0.5 {
        return median(samples);
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

pub fn format_table(rows: &[ServeRow]) -> String {
    let mut out = format!(
        "| {:>7} | {:>8} | {:>10} | {:>13} | {:>13} | {:>13} | {:>13} |\n|{:->9}|{:->10}|{:->12}|{:->15}|{:->15}|{:->15}|{:->15}|\n",
        "clients", "tokens", "total tok/s", "TTFT p50 (ms)", "TTFT p95 (ms)", "ITL p50 (ms)", "ITL p95 (ms)",
        "", "", "", "", "", "", ""
    );
    for r in rows {
        out.push_str(&format!(
            "| {:>7} | {:>8} | {:>10.1} | {:>13.1} | {:>13.1} | {:>13.1} | {:>13.1} |\n",
            r.clients,
            r.tokens,
            r.tokens as f64 / r.wall.as_secs_f64(),
            percentile(&r.ttft, 0.5) * 1e3,
            percentile(&r.ttft, 0.95) * 1e3,
            percentile(&r.itl, 0.5) * 1e3,
            percentile(&r.itl, 0.95) * 1e3,
        ));
    }
    out
}
