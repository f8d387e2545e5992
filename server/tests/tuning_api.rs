//! Online tuning over HTTP on the tiny synthetic model: all-or-nothing feedback uploads in every
//! format, duplicates, background jobs that promote a version through the eval gate, rollback,
//! OpenAI files and fine-tuning jobs, and cancellation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tessera::api::{router, ApiSettings, App, TuningConfig};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::tiny_gemma3;
use tessera::train::job::{Hyperparameters, TuningSettings};
use tessera::LoadedModel;
use tower::ServiceExt;

struct Fixture {
    _dir: tempfile::TempDir,
    router: Router,
}

fn fixture(train_after: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&path).unwrap();
    let model = Arc::new(LoadedModel::load(&path).unwrap());
    let settings = ApiSettings {
        ctx_len: 128,
        keys: Default::default(),
        request_timeout: Duration::from_secs(60),
        max_body_bytes: 1 << 20,
        adapters_dir: None,
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        plugins: None,
        tuning: Some(TuningConfig {
            root: dir.path().join("tuning"),
            state: None, blobs: None,
            settings: TuningSettings {
                train_after,
                checkpoint_every: 3,
                defaults: Hyperparameters {
                    n_epochs: 3,
                    batch_size: 4,
                    learning_rate: 5e-3,
                    ..Default::default()
                },
                ..Default::default()
            },
        }),
    };
    let engine = EngineConfig {
        ctx_len: 128,
        max_running_seqs: 4,
        max_queue: 16,
        prefill_tokens_per_step: 64,
        ..EngineConfig::default()
    };
    let app = App::start(model, "tiny".into(), settings, engine).unwrap();
    Fixture {
        _dir: dir,
        router: router(app),
    }
}

async fn call(router: &Router, method: &str, uri: &str, body: Option<(&str, Vec<u8>)>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri);
    let req = match body {
        Some((content_type, bytes)) => req.header(header::CONTENT_TYPE, content_type).body(Body::from(bytes)),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn json_call(router: &Router, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
    call(router, method, uri, Some(("application/json", body.to_string().into_bytes()))).await
}

/// Pairs that all answer the same: training makes held-out ones likelier too.
fn alpaca(i: usize) -> Value {
    json!({"instruction": format!("name item {i}"), "input": "", "output": "the hat"})
}

async fn wait_for_job(router: &Router, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = call(router, "GET", &format!("/v1/fine_tuning/jobs/{job}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if matches!(body["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return body;
        }
        assert!(Instant::now() < deadline, "job still {} after 120 s", body["status"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_uploads_are_all_or_nothing_deduplicated_and_train_a_promoted_version() {
    let Fixture { _dir, router } = fixture(12);

    // One bad record among good ones: rejected with its index, nothing stored.
    let mut lines: Vec<String> = (0..5).map(|i| alpaca(i).to_string()).collect();
    lines.insert(3, json!({"instruction": "no answer"}).to_string());
    let (status, body) = call(&router, "POST", "/v1/adapters/hats/feedback", Some(("application/jsonl", lines.join("\n").into_bytes()))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "records[3]");
    assert!(body["error"]["message"].as_str().unwrap().contains("nothing from this upload was stored"));
    let (status, _) = call(&router, "GET", "/v1/adapters/hats/feedback", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Every format, as a JSON list; then the same again: all duplicates.
    let records = json!([
        alpaca(0),
        {"instruction": "name item 1", "context": "", "response": "the hat"},
        {"conversations": [{"from": "human", "value": "name item 2"}, {"from": "gpt", "value": "the hat"}]},
        {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "name item 3"}, {"role": "assistant", "content": "the hat"}]},
    ]);
    let (status, body) = json_call(&router, "POST", "/v1/adapters/hats/feedback?rank=4", records.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["stored"].as_u64(), body["duplicates"].as_u64(), body["job"].as_str()), (Some(4), Some(0), None));
    let (_, body) = json_call(&router, "POST", "/v1/adapters/hats/feedback", records).await;
    assert_eq!((body["stored"].as_u64(), body["duplicates"].as_u64()), (Some(0), Some(4)));

    // A fresh adapter serves at version 0, untrained.
    let (status, info) = call(&router, "GET", "/v1/adapters/hats", None).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!((info["version"].as_u64(), info["training"].as_bool(), info["rank"].as_u64()), (Some(0), Some(false), Some(4)));

    // Reaching train_after (12) starts a job on its own.
    let lines: Vec<String> = (4..40).map(|i| alpaca(i).to_string()).collect();
    let (status, body) = call(&router, "POST", "/v1/adapters/hats/feedback", Some(("application/jsonl", lines.join("\n").into_bytes()))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let job = body["job"].as_str().expect("a job started").to_string();
    let (_, info) = call(&router, "GET", "/v1/adapters/hats", None).await;
    assert_eq!(info["training"], true);
    let (status, body) = json_call(&router, "POST", "/v1/adapters/hats/train", json!({})).await;
    assert_eq!(status, StatusCode::CONFLICT, "one job at a time per adapter: {body}");

    let finished = wait_for_job(&router, &job).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert_eq!(finished["fine_tuned_model"], "hats");
    let (_, events) = call(&router, "GET", &format!("/v1/fine_tuning/jobs/{job}/events?limit=1000"), None).await;
    let messages: Vec<&str> = events["data"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert!(messages.iter().any(|m| m.starts_with("Held-out loss") && m.ends_with("promoting")), "{messages:?}");
    for event in events["data"].as_array().unwrap() {
        let is_step = event["message"].as_str().unwrap().starts_with("Step ");
        assert_eq!(event["type"], if is_step { "metrics" } else { "message" }, "{event}");
    }
    let losses: Vec<f64> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "metrics")
        .map(|e| e["data"]["train_loss"].as_f64().unwrap())
        .collect();
    assert!(losses.first().unwrap() < losses.last().unwrap(), "events are newest first: {losses:?}");
    let (_, checkpoints) = call(&router, "GET", &format!("/v1/fine_tuning/jobs/{job}/checkpoints"), None).await;
    assert!(!checkpoints["data"].as_array().unwrap().is_empty(), "{checkpoints}");

    let (_, info) = call(&router, "GET", "/v1/adapters/hats", None).await;
    assert_eq!((info["version"].as_u64(), info["training"].as_bool(), info["pairs"].as_u64()), (Some(1), Some(false), Some(40)));
    assert!(info["metrics"]["held_out_loss"].as_f64().is_some(), "{info}");
    let generation = info["generation"].as_u64();

    // Each version downloads in either format; the trained one differs from version 0.
    let mut downloads = Vec::new();
    for (version, format, magic) in [(0, "gguf", &b"GGUF"[..]), (1, "gguf", b"GGUF"), (1, "peft", b"PK\x03\x04")] {
        let response = router.clone().oneshot(Request::get(format!("/v1/adapters/hats/download?format={format}&version={version}")).body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        assert!(bytes.starts_with(magic), "version {version} as {format}");
        downloads.push(bytes);
    }
    assert_ne!(downloads[0], downloads[1], "versions 0 and 1 download the same factors");

    // The adapter answers by name, then rolls back to version 0 as a new generation.
    let (status, body) = json_call(&router, "POST", "/v1/chat/completions", json!({"model": "hats", "messages": [{"role": "user", "content": "name item 77"}], "max_tokens": 4, "temperature": 0})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, info) = json_call(&router, "POST", "/v1/adapters/hats/rollback", json!({"version": 0})).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["version"], 0);
    assert_ne!(info["generation"].as_u64(), generation);
    let (status, _) = json_call(&router, "POST", "/v1/adapters/hats/rollback", json!({"version": 9})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Paging and deletion.
    let (_, page) = call(&router, "GET", "/v1/adapters/hats/feedback?limit=10", None).await;
    assert_eq!((page["data"].as_array().unwrap().len(), page["has_more"].as_bool()), (10, Some(true)));
    let first = page["data"][0]["id"].as_i64().unwrap();
    let (_, deleted) = call(&router, "DELETE", &format!("/v1/adapters/hats/feedback?ids={first}"), None).await;
    assert_eq!(deleted["deleted"], 1);
    let (_, deleted) = call(&router, "DELETE", "/v1/adapters/hats/feedback", None).await;
    assert_eq!(deleted["deleted"], 39);
}

fn multipart(parts: &[(&str, &str, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "tessera-test-boundary";
    let mut body = Vec::new();
    for (name, filename, data) in parts {
        let disposition = if filename.is_empty() {
            format!("form-data; name=\"{name}\"")
        } else {
            format!("form-data; name=\"{name}\"; filename=\"{filename}\"")
        };
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload_file(router: &Router, content: &str) -> (StatusCode, Value) {
    let (content_type, body) = multipart(&[("purpose", "", b"fine-tune".to_vec()), ("file", "train.jsonl", content.as_bytes().to_vec())]);
    call(router, "POST", "/v1/files", Some((&content_type, body))).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_files_and_jobs_publish_a_servable_adapter_and_cancel() {
    let Fixture { _dir, router } = fixture(1000);
    let lines: Vec<String> = (0..12)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("name item {i}")}, {"role": "assistant", "content": "the hat"}]}).to_string())
        .collect();
    let (status, bad) = upload_file(&router, "{\"messages\": []}\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    let (status, file) = upload_file(&router, &lines.join("\n")).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let file_id = file["id"].as_str().unwrap().to_string();
    let (_, files) = call(&router, "GET", "/v1/files", None).await;
    assert_eq!(files["data"][0]["id"], file_id.as_str());
    let (status, _) = call(&router, "GET", "/v1/files/file-missing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = json_call(&router, "POST", "/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": "file-missing"})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("training_file")));
    let (status, body) = json_call(&router, "POST", "/v1/fine_tuning/jobs", json!({"model": "nope", "training_file": file_id})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, job) = json_call(
        &router,
        "POST",
        "/v1/fine_tuning/jobs",
        json!({"model": "tiny", "training_file": file_id, "suffix": "hats", "hyperparameters": {"n_epochs": 2, "batch_size": "auto"}}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["object"], "fine_tuning.job");
    let finished = wait_for_job(&router, job["id"].as_str().unwrap()).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    assert!(finished["trained_tokens"].as_u64().unwrap() > 0);
    let model = finished["fine_tuned_model"].as_str().unwrap().to_string();
    assert!(model.starts_with("ft-hats-"), "{model}");
    let (status, body) = json_call(&router, "POST", "/v1/completions", json!({"model": model, "prompt": "the", "max_tokens": 2})).await;
    assert_eq!(status, StatusCode::OK, "the fine-tuned model serves by name: {body}");
    let (_, jobs) = call(&router, "GET", "/v1/fine_tuning/jobs", None).await;
    assert_eq!(jobs["data"][0]["id"], finished["id"]);

    // A long job cancelled while it runs stops and says so.
    let (_, job) = json_call(&router, "POST", "/v1/fine_tuning/jobs", json!({"model": model, "training_file": file_id, "hyperparameters": {"n_epochs": 50}})).await;
    let id = job["id"].as_str().unwrap().to_string();
    let (status, cancelled) = call(&router, "POST", &format!("/v1/fine_tuning/jobs/{id}/cancel"), None).await;
    assert_eq!((status, cancelled["status"].as_str()), (StatusCode::OK, Some("cancelled")), "{cancelled}");
    let (status, _) = call(&router, "POST", &format!("/v1/fine_tuning/jobs/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(wait_for_job(&router, &id).await["status"], "cancelled");
}

/// A preference whose chosen answer is always "the hat" and rejected one "a cat", in TRL's
/// shape (odd `i`) or OpenAI's DPO line (even `i`).
fn preference(i: usize) -> Value {
    let prompt = format!("name thing {i}");
    if i % 2 == 1 {
        json!({"prompt": prompt, "chosen": "the hat", "rejected": "a cat"})
    } else {
        json!({"input": {"messages": [{"role": "user", "content": prompt}]},
               "preferred_output": [{"role": "assistant", "content": "the hat"}],
               "non_preferred_output": [{"role": "assistant", "content": "a cat"}]})
    }
}

fn jsonl(records: impl IntoIterator<Item = Value>) -> Option<(&'static str, Vec<u8>)> {
    let lines: Vec<String> = records.into_iter().map(|r| r.to_string()).collect();
    Some(("application/jsonl", lines.join("\n").into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preference_feedback_is_validated_stored_and_trains_by_dpo_with_pairs() {
    let Fixture { _dir, router } = fixture(1000);

    // Identical answers, an empty one, a conversation that does not end with the user: each
    // refused with its index and why, and nothing stored.
    let identical = json!({"prompt": "q", "chosen": "same", "rejected": "same"});
    let empty = json!({"prompt": "q", "chosen": "", "rejected": "b"});
    let ends_with_assistant = json!({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "b", "rejected": "c"});
    for (bad, reason) in [(identical, "identical"), (empty, "chosen answer is empty"), (ends_with_assistant, "end with the user's turn")] {
        let (status, body) = call(&router, "POST", "/v1/adapters/prefs/feedback?rank=4", jsonl([preference(0), bad])).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["param"], "records[1]");
        assert!(body["error"]["message"].as_str().unwrap().contains(reason), "{body}");
    }
    let (status, _) = call(&router, "GET", "/v1/adapters/prefs/preferences", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing was stored");

    // Both shapes and pairs in one upload; the same again is all duplicates.
    let records: Vec<Value> = (0..30).map(preference).chain((0..10).map(alpaca)).collect();
    let (status, body) = call(&router, "POST", "/v1/adapters/prefs/feedback?rank=4", jsonl(records.clone())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!((body["stored"].as_u64(), body["total_pairs"].as_u64(), body["total_preferences"].as_u64()), (Some(40), Some(10), Some(30)));
    let (_, body) = call(&router, "POST", "/v1/adapters/prefs/feedback", jsonl(records)).await;
    assert_eq!((body["stored"].as_u64(), body["duplicates"].as_u64()), (Some(0), Some(40)));
    let (_, page) = call(&router, "GET", "/v1/adapters/prefs/preferences?limit=4", None).await;
    assert_eq!((page["data"].as_array().unwrap().len(), page["has_more"].as_bool()), (4, Some(true)));
    assert_eq!((page["data"][0]["chosen"].as_str(), page["data"][0]["rejected"].as_str()), (Some("the hat"), Some("a cat")));
    assert_eq!(page["data"][0]["prompt"][0]["content"], "name thing 0");

    // One job trains both: the SFT loss on the pairs, DPO on the preferences.
    let (status, job) = json_call(&router, "POST", "/v1/adapters/prefs/train", json!({})).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!((job["method"]["type"].as_str(), job["method"]["dpo"]["hyperparameters"]["beta"].as_f64()), (Some("dpo"), Some(0.1)));
    let id = job["id"].as_str().unwrap().to_string();
    let finished = wait_for_job(&router, &id).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let (_, events) = call(&router, "GET", &format!("/v1/fine_tuning/jobs/{id}/events?limit=1000"), None).await;
    let events = events["data"].as_array().unwrap();
    let mix = events.iter().find(|e| e["message"].as_str().unwrap().starts_with("Training (dpo, adamw)")).expect("the mix is reported");
    let count = |key: &str| mix["data"][key].as_u64().unwrap();
    assert_eq!((count("pairs") + count("held_out_pairs"), count("preferences") + count("held_out_preferences")), (10, 30), "{mix}");
    assert!(count("held_out_pairs") >= 1 && count("held_out_preferences") >= 1, "{mix}");
    let steps: Vec<&Value> = events.iter().filter(|e| e["type"] == "metrics").collect();
    assert!(steps.iter().all(|e| e["data"]["train_loss"].is_f64()), "OpenAI's train_loss on every step");
    assert!(steps.iter().any(|e| e["data"]["train_reward_accuracy"].is_f64() && e["data"]["sft_loss"].is_f64()), "a step of both kinds");
    // DPO steps report the SFT term on their chosen answers as TRL does.
    assert!(steps.iter().filter(|e| e["data"]["train_reward_accuracy"].is_f64()).all(|e| e["data"]["train_nll_loss"].is_f64()), "{steps:?}");
    let gate = events.iter().find(|e| e["message"].as_str().unwrap().starts_with("Held-out loss")).expect("an eval gate");
    assert!(gate["message"].as_str().unwrap().contains("reward accuracy"), "{gate}");
    assert!(gate["data"]["valid_reward_accuracy"].is_f64() && gate["data"]["full_valid_loss"].is_f64(), "{gate}");

    // Deleting one preference, then the rest.
    let first = page["data"][0]["id"].as_i64().unwrap();
    let (_, deleted) = call(&router, "DELETE", &format!("/v1/adapters/prefs/preferences?ids={first}"), None).await;
    assert_eq!(deleted["deleted"], 1);
    let (status, body) = call(&router, "DELETE", "/v1/adapters/prefs/preferences?ids=x", None).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("ids")));
    let (_, deleted) = call(&router, "DELETE", "/v1/adapters/prefs/preferences", None).await;
    assert_eq!(deleted["deleted"], 29);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpo_jobs_take_preference_files_and_a_beta_in_zero_to_ten() {
    let Fixture { _dir, router } = fixture(1000);
    let lines: Vec<String> = (0..12).map(|i| preference(i).to_string()).collect();
    let (status, file) = upload_file(&router, &lines.join("\n")).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let file_id = file["id"].as_str().unwrap().to_string();
    let dpo = |beta: Value| json!({"model": "tiny", "training_file": file_id, "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": beta, "n_epochs": 2}}}});
    for beta in [json!(0), json!(-1), json!(10.5)] {
        let (status, body) = json_call(&router, "POST", "/v1/fine_tuning/jobs", dpo(beta.clone())).await;
        assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("method.dpo.hyperparameters.beta")), "{beta}: {body}");
    }
    let (status, body) = json_call(&router, "POST", "/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": file_id, "method": {"type": "ppo"}})).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("method.type")), "{body}");

    // A supervised job on preference lines fails, saying why.
    let (_, job) = json_call(&router, "POST", "/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": file_id})).await;
    assert_eq!(job["method"]["type"], "supervised");
    let failed = wait_for_job(&router, job["id"].as_str().unwrap()).await;
    assert_eq!(failed["status"], "failed", "{failed}");

    let (status, job) = json_call(&router, "POST", "/v1/fine_tuning/jobs", dpo(json!(0.5))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!((job["method"]["type"].as_str(), job["method"]["dpo"]["hyperparameters"]["beta"].as_f64()), (Some("dpo"), Some(0.5)));
    assert_eq!(job["method"]["dpo"]["hyperparameters"]["n_epochs"], 2);
    let finished = wait_for_job(&router, job["id"].as_str().unwrap()).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let model = finished["fine_tuned_model"].as_str().unwrap().to_string();
    let (status, body) = json_call(&router, "POST", "/v1/chat/completions", json!({"model": model, "messages": [{"role": "user", "content": "name thing 99"}], "max_tokens": 3})).await;
    assert_eq!(status, StatusCode::OK, "the DPO-tuned model serves by name: {body}");
}

/// The step events of a finished job, as the events endpoint gives them.
async fn step_events(router: &Router, job: &str) -> Vec<Value> {
    let (_, events) = json_call(router, "GET", &format!("/v1/fine_tuning/jobs/{job}/events?limit=1000"), Value::Null).await;
    events["data"].as_array().unwrap().iter().filter(|e| e["type"] == "metrics").map(|e| e["data"].clone()).collect()
}

#[tokio::test]
async fn adalomo_trains_sft_and_dpo_jobs_with_a_fraction_of_adamws_state_and_unknown_optimizers_are_refused() {
    let Fixture { _dir, router } = fixture(1000);
    let lines: Vec<String> = (0..12).map(|i| preference(i).to_string()).chain((0..12).map(|i| alpaca(i).to_string())).collect();
    let (status, file) = upload_file(&router, &lines[12..].join("\n")).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let pairs_file = file["id"].as_str().unwrap().to_string();
    let (_, file) = upload_file(&router, &lines[..12].join("\n")).await;
    let preferences_file = file["id"].as_str().unwrap().to_string();

    for (name, route, body) in [
        ("sgd", "/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": pairs_file, "hyperparameters": {"optimizer": "sgd"}})),
        ("lion", "/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": pairs_file, "hyperparameters": {"optimizer": "lion"}, "method": {"type": "supervised"}})),
    ] {
        let (status, body) = json_call(&router, "POST", route, body).await;
        assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("hyperparameters.optimizer")), "{name}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(name) && message.contains("adamw") && message.contains("adalomo"), "{message}");
    }

    let mut state = Vec::new();
    for optimizer in ["adamw", "adalomo"] {
        let (status, job) = json_call(&router, "POST", "/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": pairs_file, "hyperparameters": {"optimizer": optimizer, "n_epochs": 2}})).await;
        assert_eq!(status, StatusCode::OK, "{job}");
        assert_eq!(job["hyperparameters"]["optimizer"], optimizer, "{job}");
        let id = job["id"].as_str().unwrap().to_string();
        let finished = wait_for_job(&router, &id).await;
        assert_eq!(finished["status"], "succeeded", "{optimizer}: {finished}");
        let steps = step_events(&router, &id).await;
        assert!(!steps.is_empty());
        for step in &steps {
            assert!(step["train_loss"].as_f64().is_some_and(f64::is_finite), "{step}");
            assert!(step["tokens_per_second"].as_f64().is_some_and(|t| t > 0.0), "{step}");
            assert!(step["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0), "{step}");
        }
        state.push((steps[0]["optimizer_state_bytes"].as_u64().unwrap(), steps[0]["gradient_bytes"].as_u64().unwrap()));
    }
    let ((adamw_state, adamw_gradient), (adalomo_state, adalomo_gradient)) = (state[0], state[1]);
    assert!(adalomo_state * 10 < adamw_state, "AdaLomo keeps {adalomo_state} bytes of state against AdamW's {adamw_state}");
    assert!(adalomo_gradient < adamw_gradient, "AdaLomo holds {adalomo_gradient} gradient bytes against AdamW's {adamw_gradient}");

    let dpo = json!({"model": "tiny", "training_file": preferences_file, "hyperparameters": {"optimizer": "adalomo"}, "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2}}}});
    let (status, job) = json_call(&router, "POST", "/v1/fine_tuning/jobs", dpo).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let finished = wait_for_job(&router, job["id"].as_str().unwrap()).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let steps = step_events(&router, job["id"].as_str().unwrap()).await;
    assert!(!steps.is_empty() && steps.iter().all(|s| s["train_reward_accuracy"].is_number() && s["train_dpo_loss"].as_f64().is_some_and(f64::is_finite)), "{steps:?}");
}
