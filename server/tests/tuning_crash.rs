//! Crash safety: the server binary (tiny model) is killed with SIGKILL while a job trains; after
//! a restart the job resumes from its last checkpoint, and every acknowledged pair is still there.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera::model::synthetic::tiny_gemma3;

mod common;

use common::{free_port, KillOnDrop};

async fn start(dir: &Path, port: u16) -> KillOnDrop {
    let server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .env("TESSERA_HOME", dir)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--ctx-len", "128"])
            .args(["--train-after", "100000", "--checkpoint-every", "2", "--model"])
            .arg(dir.join("tiny.gguf"))
            .arg("--tuning-dir")
            .arg(dir.join("tuning"))
            .spawn()
            .expect("starting tessera serve"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("http://127.0.0.1:{port}/health")).await.is_err() {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server
}

async fn get(port: u16, path: &str) -> Value {
    reqwest::get(format!("http://127.0.0.1:{port}{path}")).await.unwrap().json().await.unwrap()
}

/// The tensor names in a safetensors file's header.
fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_its_job_from_the_last_checkpoint_and_keeps_every_pair() {
    killed_job_resumes("adamw", ".m").await;
}

/// AdaLomo's factored second moments are in the checkpoint, and the resumed job goes on with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_adalomo_job_resumes_with_its_optimizer_state() {
    killed_job_resumes("adalomo", ".rows").await;
}

async fn killed_job_resumes(optimizer: &str, state_suffix: &str) {
    let dir = tempfile::tempdir().unwrap();
    tiny_gemma3(5).write(&dir.path().join("tiny.gguf")).unwrap();
    let port = free_port();
    let client = reqwest::Client::new();
    let mut server = start(dir.path(), port).await;

    let lines: Vec<String> = (0..200)
        .map(|i| json!({"instruction": format!("name item {i}"), "output": "the hat"}).to_string())
        .collect();
    let receipt: Value = client
        .post(format!("http://127.0.0.1:{port}/v1/adapters/crash/feedback"))
        .body(lines.join("\n"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(receipt["stored"], 200, "{receipt}");
    let job: Value = client
        .post(format!("http://127.0.0.1:{port}/v1/adapters/crash/train"))
        .json(&json!({"hyperparameters": {"n_epochs": 3, "optimizer": optimizer}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().expect("a job").to_string();
    assert_eq!(job["hyperparameters"]["optimizer"], optimizer, "{job}");

    // Kill -9 once a checkpoint is recorded, while the job still runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let checkpoints = get(port, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
        if let Some(first) = checkpoints["data"].as_array().unwrap().first() {
            let step = first["step_number"].as_u64().unwrap();
            let state = dir.path().join("tuning").join("jobs").join(&id).join(format!("step-{step:06}")).join("optimizer.safetensors");
            let names = safetensors_names(&state);
            assert!(names.iter().any(|n| n.ends_with(state_suffix)), "{optimizer}: {names:?}");
            assert!(optimizer == "adamw" || !names.iter().any(|n| n.ends_with(".m")), "{optimizer}: {names:?}");
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint within 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);

    let _server = start(dir.path(), port).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    let finished = loop {
        let job = get(port, &format!("/v1/fine_tuning/jobs/{id}")).await;
        if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            break job;
        }
        assert!(Instant::now() < deadline, "the job did not finish after the restart: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let events = get(port, &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000")).await;
    let resumed: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.starts_with("Resumed from the checkpoint at step"))
        .collect();
    assert_eq!(resumed.len(), 1, "{events}");
    let step: usize = resumed[0].rsplit(' ').next().unwrap().parse().unwrap();
    assert!(step >= 2 && step < 150, "resumed at step {step}");
    let info = get(port, "/v1/adapters/crash").await;
    assert_eq!(info["pairs"], 200, "{info}");
    assert!(info["version"].as_u64().is_some());
}
