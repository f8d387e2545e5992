//! DoRA and IA³ trained online on the tiny model: `?method=` on first feedback creates the kind,
//! a background job trains it through the eval gate and the promoted version serves; a
//! fine-tuning job on the base makes the kind `hyperparameters.adapter` names.

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

fn fixture(dir: &std::path::Path, train_after: usize) -> Router {
    let path = dir.join("tiny.gguf");
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
            root: dir.join("tuning"),
            state: None,
            blobs: None,
            settings: TuningSettings {
                train_after,
                checkpoint_every: 3,
                defaults: Hyperparameters { n_epochs: 3, batch_size: 4, learning_rate: 5e-3, ..Default::default() },
                ..Default::default()
            },
        }),
    };
    let engine = EngineConfig { ctx_len: 128, max_running_seqs: 4, max_queue: 16, prefill_tokens_per_step: 64, ..EngineConfig::default() };
    router(App::start(model, "tiny".into(), settings, engine).unwrap())
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

async fn wait_for_job(router: &Router, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, body) = call(router, "GET", &format!("/v1/fine_tuning/jobs/{job}"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if matches!(body["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return body;
        }
        assert!(Instant::now() < deadline, "job still {} after 300 s", body["status"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pairs that all answer the same: training makes held-out ones likelier too.
fn pairs(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| json!({"instruction": format!("name item {i}"), "input": "", "output": "the hat"}).to_string())
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_with_a_method_trains_and_promotes_an_adapter_of_that_kind() {
    let dir = tempfile::tempdir().unwrap();
    let router = fixture(dir.path(), 12);
    for (uri, param) in [("/v1/adapters/x/feedback?method=prefix", "method"), ("/v1/adapters/x/feedback?method=ia3&rank=4", "rank")] {
        let (status, body) = call(&router, "POST", uri, Some(("application/jsonl", pairs(2)))).await;
        assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some(param)), "{body}");
    }
    for method in ["dora", "ia3"] {
        let name = format!("{method}-hats");
        let (status, receipt) = call(&router, "POST", &format!("/v1/adapters/{name}/feedback?method={method}"), Some(("application/jsonl", pairs(16)))).await;
        assert_eq!(status, StatusCode::OK, "{receipt}");
        let (_, info) = call(&router, "GET", &format!("/v1/adapters/{name}"), None).await;
        assert_eq!((info["kind"].as_str(), info["version"].as_u64()), (Some(method), Some(0)), "{info}");
        let job = receipt["job"].as_str().unwrap_or_else(|| panic!("no job started: {receipt}"));
        let finished = wait_for_job(&router, job).await;
        assert_eq!(finished["status"], "succeeded", "{finished}");
        let (_, info) = call(&router, "GET", &format!("/v1/adapters/{name}"), None).await;
        assert_eq!((info["kind"].as_str(), info["version"].as_u64()), (Some(method), Some(1)), "{method} was not promoted: {info}");
        let metrics = &info["metrics"];
        eprintln!("{method}: {metrics}");
        let request = json!({"model": name, "prompt": "name item 99", "max_tokens": 2, "temperature": 0});
        let (status, body) = call(&router, "POST", "/v1/completions", Some(("application/json", request.to_string().into_bytes()))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        // A PEFT download holds the kind's tensors.
        let (_, models) = call(&router, "GET", "/v1/models", None).await;
        let listed = models["data"].as_array().unwrap().iter().find(|m| m["id"] == name.as_str()).cloned().unwrap();
        assert_eq!(listed["adapter_kind"], method);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fine_tuning_job_makes_the_kind_its_hyperparameters_name() {
    let dir = tempfile::tempdir().unwrap();
    let router = fixture(dir.path(), 1000);
    let lines: Vec<String> = (0..12)
        .map(|i| json!({"messages": [{"role": "user", "content": format!("name item {i}")}, {"role": "assistant", "content": "the hat"}]}).to_string())
        .collect();
    let boundary = "tessera-test-boundary";
    let mut body = Vec::new();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n").as_bytes());
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"train.jsonl\"\r\n\r\n").as_bytes());
    body.extend_from_slice(lines.join("\n").as_bytes());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let (status, file) = call(&router, "POST", "/v1/files", Some((&content_type, body))).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    let job = |adapter: &str| json!({"model": "tiny", "training_file": file["id"], "hyperparameters": {"n_epochs": 1, "adapter": adapter}}).to_string().into_bytes();
    let (status, err) = call(&router, "POST", "/v1/fine_tuning/jobs", Some(("application/json", job("prompt")))).await;
    assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("hyperparameters.adapter")), "{err}");
    let (status, job) = call(&router, "POST", "/v1/fine_tuning/jobs", Some(("application/json", job("dora")))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let finished = wait_for_job(&router, job["id"].as_str().unwrap()).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let model = finished["fine_tuned_model"].as_str().unwrap();
    let (_, info) = call(&router, "GET", &format!("/v1/adapters/{model}"), None).await;
    assert_eq!(info["kind"], "dora", "{info}");
}
