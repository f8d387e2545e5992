//! `tessera bench scale-out`: servers sharing one PostgreSQL database and one tuning folder, each
//! a process of this binary on one kernel thread. It measures what a server costs the others
//! (each server's throughput under its own clients as servers are added, against the share of
//! the cores it can expect), and how long a change made on one server takes to be served by the
//! rest (rollbacks on the first server, timed until every other serves the new version).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::serve::{percentile, run_level, ServeLoad, ServeBenchError};

pub struct ScaleOutOptions {
    /// This binary, started once per server.
    pub binary: PathBuf,
    pub model: PathBuf,
    /// The `postgres://` database the servers share.
    pub state: String,
    pub servers: usize,
    pub clients_per_server: usize,
    pub max_tokens: usize,
    pub rollbacks: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ScaleOutError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Load(#[from] ServeBenchError),
    #[error("{0}")]
    Server(String),
}

/// A server process, killed when dropped.
struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each server's throughput with `servers` of them under load at once.
pub struct ThroughputRow {
    pub servers: usize,
    pub per_server: Vec<f64>,
}

pub struct ScaleOutReport {
    pub cores: usize,
    pub rows: Vec<ThroughputRow>,
    /// Seconds from a rollback's answer on the first server until every other server served it.
    pub lags: Vec<f64>,
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start(options: &ScaleOutOptions, work: &Path, index: usize) -> Result<Server, ScaleOutError> {
    let port = free_port()?;
    let child = Command::new(&options.binary)
        .env("TESSERA_HOME", work.join(format!("home-{index}")))
        .args(["--threads", "1", "serve", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--train-after", "1000000", "--state", &options.state, "--role", if index == 0 { "both" } else { "serve" }])
        .arg("--model")
        .arg(&options.model)
        .arg("--tuning-dir")
        .arg(work.join("shared"))
        .stderr(std::fs::File::create(work.join(format!("server-{index}.log")))?)
        .spawn()?;
    let server = Server { child, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !reqwest::get(format!("{}/health", server.url)).await.is_ok_and(|r| r.status().is_success()) {
        if Instant::now() > deadline {
            return Err(ScaleOutError::Server(format!("server {index} did not become ready; see {}", work.join(format!("server-{index}.log")).display())));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(server)
}

async fn post(url: String, body: Value) -> Result<Value, ScaleOutError> {
    let response = reqwest::Client::new().post(&url).json(&body).send().await.map_err(|e| ScaleOutError::Server(format!("{url}: {e}")))?;
    response.json().await.map_err(|e| ScaleOutError::Server(format!("{url}: {e}")))
}

async fn get(url: String) -> Result<Value, ScaleOutError> {
    let response = reqwest::get(&url).await.map_err(|e| ScaleOutError::Server(format!("{url}: {e}")))?;
    response.json().await.map_err(|e| ScaleOutError::Server(format!("{url}: {e}")))
}

/// Loads servers 0..k at once, each with its own clients; each one's tok/s.
async fn throughput(servers: &[Server], k: usize, options: &ScaleOutOptions, model: &str) -> Result<Vec<f64>, ScaleOutError> {
    let load = ServeLoad { max_tokens: options.max_tokens, requests_per_client: 2 };
    let models = [model.to_string()];
    let rows = futures::future::join_all(servers[..k].iter().map(|s| run_level(&s.url, &models, options.clients_per_server, &load))).await;
    rows.into_iter().map(|row| row.map(|r| r.tokens as f64 / r.wall.as_secs_f64()).map_err(ScaleOutError::from)).collect()
}

/// An adapter with two versions, trained on the first server, for rollbacks to switch between.
async fn adapter_with_two_versions(first: &Server) -> Result<(), ScaleOutError> {
    let lines: Vec<String> = (0..24).map(|i| json!({"instruction": format!("Name item {i}."), "output": "The hat."}).to_string()).collect();
    let client = reqwest::Client::new();
    client
        .post(format!("{}/v1/adapters/bench-sync/feedback", first.url))
        .body(lines.join("\n"))
        .send()
        .await
        .map_err(|e| ScaleOutError::Server(e.to_string()))?;
    let job = post(format!("{}/v1/adapters/bench-sync/train", first.url), json!({"hyperparameters": {"n_epochs": 3}})).await?;
    let id = job["id"].as_str().ok_or_else(|| ScaleOutError::Server(format!("no job: {job}")))?.to_string();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let job = get(format!("{}/v1/fine_tuning/jobs/{id}", first.url)).await?;
        match job["status"].as_str() {
            Some("succeeded") => break,
            Some("failed" | "cancelled") => return Err(ScaleOutError::Server(format!("the job to make a second version ended: {job}"))),
            _ if Instant::now() > deadline => return Err(ScaleOutError::Server("the job to make a second version took over 10 minutes".into())),
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let info = get(format!("{}/v1/adapters/bench-sync", first.url)).await?;
    if info["versions"].as_array().is_none_or(|v| v.len() < 2) {
        return Err(ScaleOutError::Server(format!("training did not promote a second version: {info}")));
    }
    Ok(())
}

/// Rolls `bench-sync` back and forth on the first server; per change, the seconds until every
/// other server serves it.
async fn rollback_lags(servers: &[Server], rollbacks: usize) -> Result<Vec<f64>, ScaleOutError> {
    let mut lags = Vec::with_capacity(rollbacks);
    for i in 0..rollbacks {
        let version = (i + 1) % 2;
        let suffix = format!("v{version}");
        post(format!("{}/v1/adapters/bench-sync/rollback", servers[0].url), json!({"version": version})).await?;
        let changed = Instant::now();
        for other in &servers[1..] {
            loop {
                let info = get(format!("{}/v1/adapters/bench-sync", other.url)).await?;
                if info["path"].as_str().is_some_and(|p| p.ends_with(&suffix)) {
                    break;
                }
                if changed.elapsed() > Duration::from_secs(30) {
                    return Err(ScaleOutError::Server(format!("{} did not serve {suffix} within 30 s", other.url)));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        lags.push(changed.elapsed().as_secs_f64());
    }
    Ok(lags)
}

pub async fn run(options: &ScaleOutOptions, work: &Path) -> Result<ScaleOutReport, ScaleOutError> {
    let mut servers = Vec::with_capacity(options.servers);
    for index in 0..options.servers {
        servers.push(start(options, work, index).await?);
        eprintln!("server {index} ready at {}", servers[index].url);
    }
    let model = get(format!("{}/v1/models", servers[0].url)).await?["data"][0]["id"].as_str().unwrap_or_default().to_string();
    // One short request per server first, so that no measurement pays for cold caches.
    for server in &servers {
        run_level(&server.url, std::slice::from_ref(&model), 1, &ServeLoad { max_tokens: 4, requests_per_client: 1 }).await?;
    }
    let mut rows = Vec::new();
    for k in 1..=options.servers {
        rows.push(ThroughputRow { servers: k, per_server: throughput(&servers, k, options, &model).await? });
        eprintln!("{k} server(s) under load measured");
    }
    eprintln!("training a second version of an adapter to roll back and forth…");
    adapter_with_two_versions(&servers[0]).await?;
    let lags = rollback_lags(&servers, options.rollbacks).await?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(ScaleOutReport { cores, rows, lags })
}

pub fn format_report(report: &ScaleOutReport) -> String {
    let alone = report.rows.first().and_then(|r| r.per_server.first()).copied().unwrap_or(f64::NAN);
    let mut out = format!(
        "| servers | server 1 tok/s | mean tok/s per server | total tok/s | share of the cores each may expect | per server vs alone | ratio to that share |\n|{:->9}|{:->16}|{:->24}|{:->13}|{:->36}|{:->21}|{:->21}|\n",
        "", "", "", "", "", "", ""
    );
    for row in &report.rows {
        let mean = row.per_server.iter().sum::<f64>() / row.per_server.len() as f64;
        let share = (report.cores as f64 / row.servers as f64).min(1.0);
        out.push_str(&format!(
            "| {:>7} | {:>14.1} | {:>22.1} | {:>11.1} | {:>34.2} | {:>19.2} | {:>19.2} |\n",
            row.servers,
            row.per_server[0],
            mean,
            row.per_server.iter().sum::<f64>(),
            share,
            mean / alone,
            mean / alone / share,
        ));
    }
    out.push_str(&format!(
        "\nA rollback on server 1 served by all the others ({} changes): p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms\n",
        report.lags.len(),
        percentile(&report.lags, 0.5) * 1e3,
        percentile(&report.lags, 0.95) * 1e3,
        report.lags.iter().copied().fold(0.0, f64::max) * 1e3,
    ));
    out
}
