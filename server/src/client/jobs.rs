//! `tessera train`, `tessera jobs …`: starting fine-tuning jobs and following them with a
//! progress bar fed by the job's events.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use super::{segment, Client, ClientError, Output};

/// Hyperparameters a command line sets (`None`: the server's default).
#[derive(Debug, Clone, Default)]
pub struct Hyperparameters {
    pub epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub learning_rate_multiplier: Option<f64>,
}

impl Hyperparameters {
    fn to_json(&self) -> Value {
        let auto = |v: Option<Value>| v.unwrap_or_else(|| json!("auto"));
        json!({
            "n_epochs": auto(self.epochs.map(Value::from)),
            "batch_size": auto(self.batch_size.map(Value::from)),
            "learning_rate_multiplier": auto(self.learning_rate_multiplier.map(Value::from)),
        })
    }
}

fn job_line(job: &Value) -> String {
    let adapter = job["fine_tuned_model"].as_str().or(job["adapter"].as_str()).unwrap_or("?");
    let error = job["error"]["message"].as_str().map(|e| format!(": {e}")).unwrap_or_default();
    format!("{:<36} {:<16} {adapter}{error}", job["id"].as_str().unwrap_or("?"), job["status"].as_str().unwrap_or("?"))
}

/// Starts a job on `name`'s feedback pairs; with `wait`, follows it to the end.
pub async fn train(client: &Client, name: &str, hyperparameters: &Hyperparameters, wait: bool, output: Output) -> Result<(), ClientError> {
    let job = client.post(&format!("/v1/adapters/{}/train", segment(name)), &json!({"hyperparameters": hyperparameters.to_json()})).await?;
    finish_start(client, job, wait, output).await
}

/// Creates a fine-tuning job from `training` (an uploaded file id, or a local file uploaded
/// first); with `wait`, follows it to the end.
pub async fn create(client: &Client, model: &str, training: &str, suffix: Option<&str>, hyperparameters: &Hyperparameters, wait: bool, output: Output) -> Result<(), ClientError> {
    let training_file = if Path::new(training).is_file() { upload_file(client, Path::new(training)).await? } else { training.to_string() };
    let body = json!({"model": model, "training_file": training_file, "suffix": suffix, "hyperparameters": hyperparameters.to_json()});
    let job = client.post("/v1/fine_tuning/jobs", &body).await?;
    finish_start(client, job, wait, output).await
}

async fn upload_file(client: &Client, path: &Path) -> Result<String, ClientError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("train.jsonl").to_string();
    let part = reqwest::multipart::Part::bytes(std::fs::read(path)?).file_name(name);
    let form = reqwest::multipart::Form::new().text("purpose", "fine-tune").part("file", part);
    let file = client.post_form("/v1/files", form).await?;
    file["id"].as_str().map(str::to_string).ok_or_else(|| ClientError::Invalid(format!("the upload answered without an id: {file}")))
}

async fn finish_start(client: &Client, job: Value, wait: bool, output: Output) -> Result<(), ClientError> {
    let id = job["id"].as_str().unwrap_or_default().to_string();
    if !wait {
        output.print(&job, |j| format!("started {}", job_line(j)));
        return Ok(());
    }
    if output == Output::Human {
        println!("started {}", job_line(&job));
    }
    follow(client, &id, output).await
}

pub async fn list(client: &Client, output: Output) -> Result<(), ClientError> {
    let jobs = client.get("/v1/fine_tuning/jobs").await?;
    output.print(&jobs, |v| v["data"].as_array().into_iter().flatten().map(job_line).collect::<Vec<_>>().join("\n"));
    Ok(())
}

pub async fn show(client: &Client, id: &str, output: Output) -> Result<(), ClientError> {
    let job = client.get(&format!("/v1/fine_tuning/jobs/{}", segment(id))).await?;
    output.print(&job, job_line);
    Ok(())
}

pub async fn cancel(client: &Client, id: &str, output: Output) -> Result<(), ClientError> {
    let job = client.post(&format!("/v1/fine_tuning/jobs/{}/cancel", segment(id)), &json!({})).await?;
    output.print(&job, |j| format!("cancelled {}", job_line(j)));
    Ok(())
}

/// What a job's events have said so far.
#[derive(Default)]
struct Progress {
    /// The newest event seen (events are numbered in order).
    last_event: i64,
    step: u64,
    total_steps: u64,
    train_loss: Option<f64>,
    held_out_loss: Option<f64>,
    /// The promotion decision and its reason, once made.
    decision: Vec<String>,
}

impl Progress {
    fn take(&mut self, event: &Value) {
        let data = &event["data"];
        if let (Some(step), Some(total)) = (data["step"].as_u64(), data["total_steps"].as_u64()) {
            (self.step, self.total_steps) = (step, total);
        }
        if let Some(loss) = data["train_loss"].as_f64() {
            self.train_loss = Some(loss);
        }
        if let Some(loss) = data["held_out_loss"].as_f64() {
            self.held_out_loss = Some(loss);
        }
        let message = event["message"].as_str().unwrap_or_default();
        if message.starts_with("Held-out loss") || message.starts_with("Version ") || message.starts_with("Job failed") {
            self.decision.push(message.to_string());
        }
    }

    fn describe(&self) -> String {
        let loss = self.train_loss.map(|l| format!("loss {l:.4}")).unwrap_or_else(|| "waiting for the first step".into());
        let held_out = self.held_out_loss.map(|l| format!(", held-out {l:.4}")).unwrap_or_default();
        format!("{loss}{held_out}")
    }
}

/// The job's events newer than `after`, oldest first.
async fn new_events(client: &Client, id: &str, after: i64) -> Result<Vec<Value>, ClientError> {
    let page = client.get(&format!("/v1/fine_tuning/jobs/{}/events?limit=1000", segment(id))).await?;
    let number = |e: &Value| e["id"].as_str().and_then(|s| s.trim_start_matches("ftevent-").parse::<i64>().ok()).unwrap_or(0);
    let mut events: Vec<Value> = page["data"].as_array().into_iter().flatten().filter(|e| number(e) > after).cloned().collect();
    events.sort_by_key(number);
    Ok(events)
}

/// Follows a job to its end: a progress bar of steps with the training and held-out loss and an
/// ETA, then the promotion decision. Ctrl-C stops following; the job goes on.
pub async fn follow(client: &Client, id: &str, output: Output) -> Result<(), ClientError> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {msg} (ETA {eta})")
            .map_err(|e| ClientError::Invalid(e.to_string()))?
            .progress_chars("=> "),
    );
    if output == Output::Json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut progress = Progress::default();
    let job = tokio::select! {
        job = poll_until_done(client, id, &bar, &mut progress) => job?,
        _ = tokio::signal::ctrl_c() => {
            bar.abandon_with_message("stopped following; the job goes on on the server");
            return Err(ClientError::Invalid(format!("interrupted: `tessera jobs follow {id}` picks it up again")));
        }
    };
    bar.finish_and_clear();
    output.print(&json!({"job": job, "decision": progress.decision}), |_| {
        let mut lines = vec![format!("{} after {} steps, {}", job_line(&job), progress.step, progress.describe())];
        lines.extend(progress.decision.iter().cloned());
        lines.join("\n")
    });
    match job["status"].as_str() {
        Some("succeeded") => Ok(()),
        status => Err(ClientError::Invalid(format!("the job ended {}", status.unwrap_or("in an unknown state")))),
    }
}

async fn poll_until_done(client: &Client, id: &str, bar: &ProgressBar, progress: &mut Progress) -> Result<Value, ClientError> {
    loop {
        let job = client.get(&format!("/v1/fine_tuning/jobs/{}", segment(id))).await?;
        for event in new_events(client, id, progress.last_event).await? {
            progress.take(&event);
            if let Some(n) = event["id"].as_str().and_then(|s| s.trim_start_matches("ftevent-").parse().ok()) {
                progress.last_event = n;
            }
        }
        bar.set_length(progress.total_steps);
        bar.set_position(progress.step);
        bar.set_message(progress.describe());
        if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
