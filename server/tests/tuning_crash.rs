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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_its_job_from_the_last_checkpoint_and_keeps_every_pair() {
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
        .json(&json!({"hyperparameters": {"n_epochs": 3}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().expect("a job").to_string();

    // Kill -9 once a checkpoint is recorded, while the job still runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let checkpoints = get(port, &format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await;
        if !checkpoints["data"].as_array().unwrap().is_empty() {
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
