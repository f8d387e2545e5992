//! The `tessera` client subcommands against a real server on the tiny model: feedback, a real
//! training job followed to its promotion, adapters out and back in, jobs, chat, and the exit
//! codes and messages of errors.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tessera::api::auth::{Keys, Scope};
use tessera::api::{ApiSettings, App, TuningConfig};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::tiny_gemma3;
use tessera::train::job::{Hyperparameters, TuningSettings};
use tessera::LoadedModel;

const ADMIN: &str = "root";

/// Starts a server with tuning on the tiny model; returns its URL. It stops with the runtime.
async fn start_server(dir: &Path) -> String {
    let path = dir.join("tiny.gguf");
    tiny_gemma3(5).write(&path).unwrap();
    let model = Arc::new(LoadedModel::load(&path).unwrap());
    let tuning = TuningSettings {
        train_after: 1000,
        checkpoint_every: 3,
        defaults: Hyperparameters { n_epochs: 2, batch_size: 4, learning_rate: 5e-3, ..Default::default() },
        ..Default::default()
    };
    let settings = ApiSettings {
        ctx_len: 128,
        keys: Keys::default().with_key(Scope::Admin, Some(ADMIN)),
        request_timeout: Duration::from_secs(60),
        max_body_bytes: 1 << 20,
        adapters_dir: Some(dir.join("adapters")),
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        plugins: None,
        tuning: Some(TuningConfig { root: dir.join("tuning"), state: None, blobs: None, settings: tuning }),
    };
    std::fs::create_dir_all(dir.join("adapters")).unwrap();
    let engine = EngineConfig { ctx_len: 128, max_running_seqs: 4, max_queue: 16, prefill_tokens_per_step: 64, ..EngineConfig::default() };
    let app = App::start(model, "tiny".into(), settings, engine).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tessera::api::serve(app, listener, std::future::pending()));
    url
}

/// Runs `tessera ARGS` against `url` with the admin key, feeding `stdin`.
async fn tessera(url: &str, args: &[&str], stdin: &str) -> Output {
    let (url, args, stdin) = (url.to_string(), args.iter().map(|a| a.to_string()).collect::<Vec<_>>(), stdin.to_string());
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(&args)
            .env("TESSERA_URL", &url)
            .env("TESSERA_ADMIN_KEY", ADMIN)
            .env_remove("TESSERA_API_KEY")
            .env_remove("TESSERA_TUNE_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// `tessera ARGS`, which must succeed; its standard output.
async fn ok(url: &str, args: &[&str]) -> String {
    let out = tessera(url, args, "").await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "tessera {args:?} failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

fn pairs(dir: &Path, n: usize) -> String {
    let path = dir.join(format!("pairs-{n}.jsonl"));
    let lines: Vec<String> = (0..n).map(|i| json!({"instruction": format!("name item {i}"), "output": "the hat"}).to_string()).collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_drives_feedback_training_adapters_jobs_and_chat() {
    let dir = tempfile::tempdir().unwrap();
    let url = start_server(dir.path()).await;
    let file = pairs(dir.path(), 40);

    let stored = ok(&url, &["feedback", "add", "hats", &file, "--rank", "4"]).await;
    assert!(stored.contains("stored 40 pairs, skipped 0 duplicates"), "{stored}");
    let again = tessera(&url, &["feedback", "add", "hats", "-", "--json"], &std::fs::read_to_string(&file).unwrap()).await;
    let receipt: Value = serde_json::from_slice(&again.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&again.stderr)));
    assert_eq!((receipt["stored"].as_u64(), receipt["duplicates"].as_u64()), (Some(0), Some(40)), "the same pairs from stdin are duplicates");

    // A real job, followed to its promotion decision.
    let followed = ok(&url, &["train", "hats", "--wait", "--epochs", "2"]).await;
    assert!(followed.contains("succeeded") && followed.contains("Version 1 of hats is now served"), "{followed}");
    assert!(followed.contains("Held-out loss"), "the promotion's reason is missing: {followed}");

    let listed: Value = serde_json::from_str(&ok(&url, &["adapters", "list", "--json"]).await).unwrap();
    let hats = listed["data"].as_array().unwrap().iter().find(|a| a["name"] == "hats").cloned().unwrap();
    assert_eq!((hats["version"].as_u64(), hats["pairs"].as_u64()), (Some(1), Some(40)), "{hats}");

    // Out as GGUF, back in under another name, answering the same.
    let gguf = dir.path().join("hats.gguf");
    ok(&url, &["adapters", "download", "hats", "--format", "gguf", "-o", gguf.to_str().unwrap()]).await;
    assert!(std::fs::read(&gguf).unwrap().starts_with(b"GGUF"));
    ok(&url, &["adapters", "upload", "hats-copy", gguf.to_str().unwrap()]).await;
    assert!(ok(&url, &["adapters", "show", "hats-copy"]).await.contains("hats-copy"));
    let chat = |model: &str| {
        let (url, model) = (url.clone(), model.to_string());
        async move { tessera(&url, &["chat", "--model", &model, "--temperature", "0", "--max-tokens", "6"], "name item 3\n").await }
    };
    let (original, copy) = (chat("hats").await, chat("hats-copy").await);
    assert!(original.status.success(), "{}", String::from_utf8_lossy(&original.stderr));
    assert!(!original.stdout.is_empty());
    assert_eq!(original.stdout, copy.stdout, "the downloaded adapter answers differently");

    let jobs = ok(&url, &["jobs", "list"]).await;
    let id = jobs.split_whitespace().next().unwrap().to_string();
    assert!(id.starts_with("ftjob-") && jobs.contains("succeeded"), "{jobs}");
    assert!(ok(&url, &["jobs", "follow", &id]).await.contains("Version 1 of hats is now served"));
    assert!(ok(&url, &["adapters", "rollback", "hats", "0"]).await.contains("serving version 0"));

    // Errors: non-zero exits with the server's message.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"instruction\": \"x\"}\n").unwrap();
    for (args, message) in [
        (vec!["feedback", "add", "hats", bad.to_str().unwrap()], "record 0: an `instruction` record needs an `output`"),
        (vec!["jobs", "show", "ftjob-none"], "No such fine-tuning job"),
        (vec!["adapters", "rollback", "hats", "9"], "no version 9"),
        (vec!["adapters", "list", "--api-key", "wrong"], "Incorrect or missing API key"),
        (vec!["adapters", "list", "--url", "http://127.0.0.1:9"], "cannot reach"),
    ] {
        let out = tessera(&url, &args, "").await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "tessera {args:?}: {stderr}");
        assert!(stderr.contains(message), "tessera {args:?} said {stderr:?}, not {message:?}");
    }
}

#[test]
fn train_local_lowers_the_loss_and_writes_peft_and_gguf() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&model).unwrap();
    let data = pairs(dir.path(), 24);
    let out = dir.path().join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train-local", "--model", model.to_str().unwrap(), "--data", &data, "--out", out.to_str().unwrap()])
        .args(["--rank", "4", "--epochs", "3", "--learning-rate", "5e-3", "--json"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let result: Value = serde_json::from_slice(&run.stdout).unwrap();
    let (first, last) = (result["first_loss"].as_f64().unwrap(), result["last_loss"].as_f64().unwrap());
    assert!(last < first, "the loss did not go down: {result}");
    let (examples, held_out) = (result["examples"].as_u64().unwrap(), result["held_out"].as_u64().unwrap());
    assert!(examples + held_out == 24 && held_out >= 1, "{result}");
    assert!(result["decision"].to_string().contains("is now served"), "{result}");
    let shape = LoadedModel::load(&model).unwrap().model.config().adapter_shape();
    let peft = tessera::adapter_files::read(&out.join("peft"), &shape).unwrap();
    let gguf = tessera::adapter_files::read(&out.join("adapter.gguf"), &shape).unwrap();
    assert_eq!(peft, gguf, "the two forms hold different factors");
    assert!(!out.join(".train-local").exists(), "the scratch store stays behind");
    let bad = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["train-local", "--model", model.to_str().unwrap(), "--data", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("the data"), "{}", String::from_utf8_lossy(&bad.stderr));
}
