//! `tessera train`, `tessera jobs …`: starting fine-tuning jobs and following them with a
//! progress bar fed by the job's events.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::progress::JobProgress;
use super::{segment, Client, ClientError, Output};

/// Hyperparameters a command line sets (`None`: the server's default).
#[derive(Debug, Clone, Default)]
pub struct Hyperparameters {
    pub epochs: Option<u32>,
    pub batch_size: Option<u32>,
    pub learning_rate_multiplier: Option<f64>,
    /// The server refuses a name it does not know, listing those it does.
    pub optimizer: Option<String>,
}

impl Hyperparameters {
    fn to_json(&self) -> Value {
        let auto = |v: Option<Value>| v.unwrap_or_else(|| json!("auto"));
        let mut body = json!({
            "n_epochs": auto(self.epochs.map(Value::from)),
            "batch_size": auto(self.batch_size.map(Value::from)),
            "learning_rate_multiplier": auto(self.learning_rate_multiplier.map(Value::from)),
        });
        if let Some(optimizer) = &self.optimizer {
            body["optimizer"] = json!(optimizer);
        }
        body
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

/// The job's events newer than `after`, oldest first.
async fn new_events(client: &Client, id: &str, after: i64) -> Result<Vec<Value>, ClientError> {
    let page = client.get(&format!("/v1/fine_tuning/jobs/{}/events?limit=1000", segment(id))).await?;
    let mut events: Vec<Value> = page["data"].as_array().into_iter().flatten().filter(|e| event_number(e) > after).cloned().collect();
    events.sort_by_key(event_number);
    Ok(events)
}

/// An event's place in its job's order (`ftevent-N`).
fn event_number(event: &Value) -> i64 {
    event["id"].as_str().and_then(|s| s.trim_start_matches("ftevent-").parse().ok()).unwrap_or(0)
}

/// Follows a job to its end: a progress bar of steps with the training and held-out loss and an
/// ETA, then the promotion decision. Ctrl-C stops following; the job goes on.
pub async fn follow(client: &Client, id: &str, output: Output) -> Result<(), ClientError> {
    let mut progress = JobProgress::new(output);
    let job = tokio::select! {
        job = poll_until_done(client, id, &mut progress) => job?,
        _ = tokio::signal::ctrl_c() => {
            progress.abandon("stopped following; the job goes on on the server");
            return Err(ClientError::Invalid(format!("interrupted: `tessera jobs follow {id}` picks it up again")));
        }
    };
    progress.finish();
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

async fn poll_until_done(client: &Client, id: &str, progress: &mut JobProgress) -> Result<Value, ClientError> {
    let mut last_event = 0;
    loop {
        let job = client.get(&format!("/v1/fine_tuning/jobs/{}", segment(id))).await?;
        for event in new_events(client, id, last_event).await? {
            progress.take(event["message"].as_str().unwrap_or_default(), &event["data"]);
            last_event = event_number(&event);
        }
        if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
