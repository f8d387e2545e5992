//! `/v1/batches` on the tiny model: one batch spanning the base and two adapters answers each
//! line as the same request answers interactively, malformed lines fail alone in the error
//! file, bad batches are refused at creation, a cancel stops a batch, background work waits
//! for interactive work in the engine, and a killed server resumes its batch without running a
//! finished line again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tessera::api::{router, ApiSettings, App, TuningConfig};
use tessera::engine::{Engine, EngineConfig, Event, GenerationRequest};
use tessera::model::synthetic::{self, tiny_gemma3};
use tessera::LoadedModel;
use tower::ServiceExt;

mod common;

use common::{free_port, KillOnDrop};

const MODEL: &str = "tiny";
const CHAT: &str = "/v1/chat/completions";

/// A PEFT LoRA on q_proj and down_proj of every layer, its weights drawn from `seed`.
fn write_adapter(dir: &Path, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj","down_proj"]}"#).unwrap();
    let q_width = synthetic::HEADS * synthetic::HEAD_DIM;
    let mut data = Vec::new();
    for layer in 0..synthetic::LAYERS {
        for (module, block, input, output) in [("q_proj", "self_attn", synthetic::HIDDEN, q_width), ("down_proj", "mlp", synthetic::FFN, synthetic::HIDDEN)] {
            let prefix = format!("base_model.model.model.layers.{layer}.{block}.{module}");
            for (factor, shape) in [("lora_A", vec![2, input]), ("lora_B", vec![output, 2])] {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n).flat_map(|i| ((((i as u32 * seed + 1) % 23) as f32 - 11.0) * 0.05).to_le_bytes()).collect();
                data.push((format!("{prefix}.{factor}.weight"), bytes, shape));
            }
        }
    }
    let views: Vec<(String, TensorView)> = data.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

struct Fixture {
    _dir: tempfile::TempDir,
    router: Router,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&path).unwrap();
    let adapters = dir.path().join("adapters");
    write_adapter(&adapters.join("tiny-a"), 7);
    write_adapter(&adapters.join("tiny-b"), 13);
    let model = Arc::new(LoadedModel::load(&path).unwrap());
    let settings = ApiSettings {
        ctx_len: 128,
        keys: Default::default(),
        request_timeout: Duration::from_secs(60),
        max_body_bytes: 1 << 20,
        adapters_dir: Some(adapters),
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        plugins: None,
        tuning: Some(TuningConfig { root: dir.path().join("tuning"), state: None, blobs: None, settings: Default::default() }),
    };
    let engine = EngineConfig { ctx_len: 128, max_running_seqs: 8, max_queue: 32, prefill_tokens_per_step: 64, ..EngineConfig::default() };
    let app = App::start(model, MODEL.into(), settings, engine).unwrap();
    Fixture { _dir: dir, router: router(app) }
}

async fn call(router: &Router, method: &str, uri: &str, body: Option<(String, Vec<u8>)>) -> (StatusCode, Vec<u8>) {
    let req = Request::builder().method(method).uri(uri);
    let req = match body {
        Some((content_type, bytes)) => req.header(header::CONTENT_TYPE, content_type).body(Body::from(bytes)),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    (status, axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec())
}

async fn json_call(router: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let (status, bytes) = call(router, method, uri, body.map(|b| ("application/json".to_string(), b.to_string().into_bytes()))).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A multipart upload of `content` as a file of `purpose`.
fn multipart(purpose: &str, content: &[u8]) -> (String, Vec<u8>) {
    let boundary = "tessera-batch-test-boundary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n").into_bytes();
    body.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"batch.jsonl\"\r\nContent-Type: application/jsonl\r\n\r\n").into_bytes());
    body.extend_from_slice(content);
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(router: &Router, purpose: &str, lines: &[String]) -> (StatusCode, Value) {
    let (status, bytes) = call(router, "POST", "/v1/files", Some(multipart(purpose, lines.join("\n").as_bytes()))).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn chat_body(model: &str, i: usize, max_tokens: usize) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": format!("tell me about item {i}")}], "max_tokens": max_tokens, "temperature": 0})
}

fn line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}

async fn create(router: &Router, file: &str) -> (StatusCode, Value) {
    json_call(router, "POST", "/v1/batches", Some(json!({"input_file_id": file, "endpoint": CHAT, "completion_window": "24h", "metadata": {"run": "test"}}))).await
}

async fn wait_until_ended(router: &Router, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, batch) = json_call(router, "GET", &format!("/v1/batches/{id}"), None).await;
        assert_eq!(status, StatusCode::OK, "{batch}");
        if matches!(batch["status"].as_str(), Some("completed" | "failed" | "cancelled")) {
            return batch;
        }
        assert!(Instant::now() < deadline, "the batch is still {} after 120 s", batch["status"]);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON lines of a file's content, by custom_id.
async fn file_lines(router: &Router, file: &Value) -> BTreeMap<String, Value> {
    let (status, bytes) = call(router, "GET", &format!("/v1/files/{}/content", file.as_str().expect("a file id")), None).await;
    assert_eq!(status, StatusCode::OK);
    let mut lines = BTreeMap::new();
    for text in String::from_utf8(bytes).unwrap().lines() {
        let value: Value = serde_json::from_str(text).unwrap();
        let key = value["custom_id"].as_str().map_or_else(|| format!("<none {}>", lines.len()), str::to_string);
        assert!(lines.insert(key, value).is_none(), "each custom_id once");
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_the_base_and_two_adapters_answers_each_line_as_an_interactive_request_does() {
    let Fixture { _dir, router } = fixture();
    let models = [MODEL, "tiny-a", "tiny-b"];
    let mut lines: Vec<String> = (0..12).map(|i| line(&format!("line-{i}"), CHAT, chat_body(models[i % 3], i, 12))).collect();
    lines.push("{this is not json".into());
    lines.push(line("wrong-url", "/v1/completions", json!({"model": MODEL, "prompt": "x"})));
    lines.push(line("unknown-model", CHAT, chat_body("nobody", 0, 4)));
    let (status, file) = upload(&router, "batch", &lines).await;
    assert_eq!(status, StatusCode::OK, "{file}");
    assert_eq!(file["purpose"], "batch");
    let (status, created) = create(&router, file["id"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    assert_eq!((created["object"].as_str(), created["status"].as_str()), (Some("batch"), Some("validating")));
    assert_eq!(created["metadata"], json!({"run": "test"}));
    let batch = wait_until_ended(&router, created["id"].as_str().unwrap()).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"], json!({"total": 15, "completed": 12, "failed": 3}));
    assert!(batch["in_progress_at"].is_i64() && batch["finalizing_at"].is_i64() && batch["completed_at"].is_i64(), "{batch}");

    let output = file_lines(&router, &batch["output_file_id"]).await;
    assert_eq!(output.len(), 12);
    for i in 0..12 {
        let answered = &output[&format!("line-{i}")];
        assert_eq!(answered["response"]["status_code"], 200, "{answered}");
        assert!(answered["error"].is_null());
        let (status, interactive) = json_call(&router, "POST", CHAT, Some(chat_body(models[i % 3], i, 12))).await;
        assert_eq!(status, StatusCode::OK, "{interactive}");
        let body = &answered["response"]["body"];
        assert_eq!(body["choices"][0]["message"], interactive["choices"][0]["message"], "line {i} on {}", models[i % 3]);
        assert_eq!(body["usage"]["completion_tokens"], interactive["usage"]["completion_tokens"]);
    }
    let mut differ_from_base = 0;
    for i in (0..12).filter(|i| i % 3 != 0) {
        let (_, base) = json_call(&router, "POST", CHAT, Some(chat_body(MODEL, i, 12))).await;
        let adapted = &output[&format!("line-{i}")]["response"]["body"]["choices"][0]["message"];
        differ_from_base += usize::from(*adapted != base["choices"][0]["message"]);
    }
    assert!(differ_from_base > 0, "the adapters' lines ran through their adapters, not the base");

    let errors = file_lines(&router, &batch["error_file_id"]).await;
    assert_eq!(errors.len(), 3, "{errors:?}");
    let malformed = errors.values().find(|e| e["custom_id"].is_null()).expect("the malformed line, without a custom_id");
    assert_eq!((malformed["error"]["code"].as_str(), malformed["response"].is_null()), (Some("invalid_json"), true));
    assert_eq!(errors["wrong-url"]["error"]["code"], "mismatched_url");
    assert_eq!(errors["unknown-model"]["response"]["status_code"], 404, "an answered error keeps its status and body");
    assert_eq!(errors["unknown-model"]["response"]["body"]["error"]["code"], "model_not_found");
}

/// A `/v1/responses` batch: each line's response, on the base or an adapter, says what the
/// same request says interactively, and is kept like any response (GET by its id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_responses_batch_answers_as_the_responses_endpoint_does() {
    const RESPONSES: &str = "/v1/responses";
    let Fixture { _dir, router } = fixture();
    let body = |model: &str, i: usize| json!({"model": model, "input": format!("tell me about item {i}"), "max_output_tokens": 8, "temperature": 0});
    let models = [MODEL, "tiny-a"];
    let lines: Vec<String> = (0..4).map(|i| line(&format!("r-{i}"), RESPONSES, body(models[i % 2], i))).collect();
    let (_, file) = upload(&router, "batch", &lines).await;
    let request = json!({"input_file_id": file["id"], "endpoint": RESPONSES, "completion_window": "24h"});
    let (status, created) = json_call(&router, "POST", "/v1/batches", Some(request)).await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let batch = wait_until_ended(&router, created["id"].as_str().unwrap()).await;
    assert_eq!(batch["request_counts"], json!({"total": 4, "completed": 4, "failed": 0}), "{batch}");
    let output = file_lines(&router, &batch["output_file_id"]).await;
    for i in 0..4 {
        let answered = &output[&format!("r-{i}")]["response"]["body"];
        assert_eq!(answered["object"], "response", "{answered}");
        let (status, interactive) = json_call(&router, "POST", RESPONSES, Some(body(models[i % 2], i))).await;
        assert_eq!(status, StatusCode::OK, "{interactive}");
        assert_eq!(answered["output"][0]["content"], interactive["output"][0]["content"], "line {i} on {}", models[i % 2]);
        let (status, kept) = json_call(&router, "GET", &format!("{RESPONSES}/{}", answered["id"].as_str().unwrap()), None).await;
        assert_eq!((status, &kept["output"]), (StatusCode::OK, &answered["output"]), "the batch's response is kept");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_at_creation_and_batches_list_in_pages() {
    let Fixture { _dir, router } = fixture();
    let repeated = [line("a", CHAT, chat_body(MODEL, 0, 2)), line("b", CHAT, chat_body(MODEL, 1, 2)), line("a", CHAT, chat_body(MODEL, 2, 2))];
    let (status, error) = upload(&router, "batch", &repeated).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    assert_eq!(error["error"]["message"], "the custom_id `a` appears on lines 1 and 3; each request needs its own");

    let too_many: Vec<String> = (0..50_001).map(|i| format!("{{\"custom_id\":\"{i}\"}}")).collect();
    let (status, error) = upload(&router, "batch", &too_many).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{error}");
    let over_body_limit = vec!["x".repeat(1 << 20)];
    assert_eq!(upload(&router, "batch", &over_body_limit).await.0, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, error) = create(&router, "file-none").await;
    assert_eq!((status, error["error"]["message"].as_str()), (StatusCode::NOT_FOUND, Some("No such file: file-none")));
    let training = [json!({"instruction": "q", "output": "a"}).to_string()];
    let (_, fine_tune) = upload(&router, "fine-tune", &training).await;
    let (status, error) = create(&router, fine_tune["id"].as_str().unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
    let (_, file) = upload(&router, "batch", &[line("a", CHAT, chat_body(MODEL, 0, 2))]).await;
    let file_id = file["id"].as_str().unwrap();
    for (endpoint, window, message) in [("/v1/models", "24h", "unknown endpoint"), (CHAT, "1h", "24h")] {
        let request = json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": window});
        let (status, error) = json_call(&router, "POST", "/v1/batches", Some(request)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
        assert!(error["error"]["message"].as_str().unwrap().contains(message), "{error}");
    }

    let mut ids = Vec::new();
    for _ in 0..3 {
        let (_, batch) = create(&router, file_id).await;
        ids.push(batch["id"].as_str().unwrap().to_string());
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let (status, first) = json_call(&router, "GET", "/v1/batches?limit=2", None).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let page: Vec<&str> = first["data"].as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap()).collect();
    assert_eq!((page, first["has_more"].as_bool()), (vec![ids[2].as_str(), ids[1].as_str()], Some(true)), "newest first");
    let (_, rest) = json_call(&router, "GET", &format!("/v1/batches?limit=2&after={}", first["last_id"].as_str().unwrap()), None).await;
    assert_eq!(rest["data"][0]["id"], ids[0].as_str());
    assert_eq!(rest["has_more"], false);
    assert_eq!(json_call(&router, "GET", "/v1/batches?limit=0", None).await.0, StatusCode::BAD_REQUEST);
    assert_eq!(json_call(&router, "GET", "/v1/batches/batch-none", None).await.0, StatusCode::NOT_FOUND);
    assert_eq!(json_call(&router, "POST", "/v1/batches/batch-none/cancel", None).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_batch_stops_and_keeps_what_finished() {
    let Fixture { _dir, router } = fixture();
    let lines: Vec<String> = (0..400).map(|i| line(&format!("c{i}"), CHAT, json!({"model": MODEL, "messages": [{"role": "user", "content": format!("{i}")}], "max_tokens": 64, "ignore_eos": true}))).collect();
    let (_, file) = upload(&router, "batch", &lines).await;
    let (_, created) = create(&router, file["id"].as_str().unwrap()).await;
    let id = created["id"].as_str().unwrap();
    let (status, cancelling) = json_call(&router, "POST", &format!("/v1/batches/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::OK, "{cancelling}");
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].is_i64());
    let batch = wait_until_ended(&router, id).await;
    assert_eq!(batch["status"], "cancelled", "{batch}");
    let completed = batch["request_counts"]["completed"].as_u64().unwrap() as usize;
    assert!(completed < 400, "the cancel stopped the batch: {batch}");
    if completed > 0 {
        assert_eq!(file_lines(&router, &batch["output_file_id"]).await.len(), completed);
    }
    let (status, error) = json_call(&router, "POST", &format!("/v1/batches/{id}/cancel"), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an ended batch is not cancelled again: {error}");
}

/// A request of `max_tokens` tokens that ignores end-of-text.
fn engine_request(max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: vec![2, 10, 11, 12],
        max_tokens,
        sampling: Default::default(),
        stop_ids: Vec::new(),
        stop_strings: Vec::new(),
        logprobs: None,
        prompt_logprobs: false,
        adapters: Vec::new(),
        constraint: None,
        embed: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_work_waits_while_an_interactive_request_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&path).unwrap();
    let model = Arc::new(LoadedModel::load(&path).unwrap());
    let config = EngineConfig { ctx_len: 256, max_running_seqs: 8, ..EngineConfig::default() };
    let (engine, _thread) = Engine::start(model, config, Arc::new(tessera::metrics::Metrics::new())).unwrap();
    // Interactive first, then background: the background one is admitted beside it but steps
    // only once the interactive one is done.
    let mut interactive = engine.submit(engine_request(60)).unwrap();
    let mut background = engine.background().submit(engine_request(40)).unwrap();
    let (mut interactive_tokens, mut background_meanwhile) = (0, 0);
    loop {
        // Biased: when both have something, the interactive event was sent no later.
        tokio::select! {
            biased;
            event = interactive.recv() => match event {
                Some(Event::Token(_)) => interactive_tokens += 1,
                Some(Event::Finished(_)) => break,
                other => panic!("{other:?}"),
            },
            event = background.recv() => {
                assert!(matches!(event, Some(Event::Token(_))), "{event:?}");
                background_meanwhile += 1;
            }
        }
    }
    assert_eq!((interactive_tokens, background_meanwhile), (60, 0), "background decoded nothing during the interactive request");
    let mut rest = 0;
    while let Some(Event::Token(_)) = background.recv().await {
        rest += 1;
    }
    assert_eq!(rest, 40, "then the background request runs to its end");
}

async fn start_server(dir: &Path, port: u16) -> KillOnDrop {
    let server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .env("TESSERA_HOME", dir)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--ctx-len", "128", "--model"])
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

/// Each finished line's result id, read from the store as the killed server left it.
fn recorded_lines(dir: &Path) -> BTreeMap<i64, String> {
    let db = rusqlite::Connection::open(dir.join("tuning").join("tessera.sqlite3")).unwrap();
    let mut statement = db.prepare("SELECT line, result FROM batch_lines").unwrap();
    let rows = statement.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))).unwrap();
    rows.map(|r| {
        let (line, result) = r.unwrap();
        (line, serde_json::from_str::<Value>(&result).unwrap()["id"].as_str().unwrap().to_string())
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_its_batch_and_runs_no_finished_line_twice() {
    let dir = tempfile::tempdir().unwrap();
    tiny_gemma3(5).write(&dir.path().join("tiny.gguf")).unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let mut server = start_server(dir.path(), port).await;
    let lines: Vec<String> = (0..300).map(|i| line(&format!("r{i}"), CHAT, json!({"model": MODEL, "messages": [{"role": "user", "content": format!("{i}")}], "max_tokens": 48, "ignore_eos": true}))).collect();
    let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", reqwest::multipart::Part::bytes(lines.join("\n").into_bytes()).file_name("b.jsonl"));
    let file: Value = client.post(format!("{base}/v1/files")).multipart(form).send().await.unwrap().json().await.unwrap();
    let created: Value = client
        .post(format!("{base}/v1/batches"))
        .json(&json!({"input_file_id": file["id"], "endpoint": CHAT, "completion_window": "24h"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("a batch").to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let batch: Value = client.get(format!("{base}/v1/batches/{id}")).send().await.unwrap().json().await.unwrap();
        let completed = batch["request_counts"]["completed"].as_u64().unwrap();
        assert!(completed < 300, "the batch finished before the kill; give it more work: {batch}");
        if completed >= 20 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress within 60 s: {batch}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);
    let before = recorded_lines(dir.path());
    assert!(before.len() >= 20 && before.len() < 300, "{} lines recorded before the kill", before.len());

    let _server = start_server(dir.path(), port).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    let batch = loop {
        let batch: Value = client.get(format!("{base}/v1/batches/{id}")).send().await.unwrap().json().await.unwrap();
        if batch["status"] == "completed" {
            break batch;
        }
        assert!(Instant::now() < deadline, "the batch did not finish after the restart: {batch}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(batch["request_counts"], json!({"total": 300, "completed": 300, "failed": 0}));
    let output = client.get(format!("{base}/v1/files/{}/content", batch["output_file_id"].as_str().unwrap())).send().await.unwrap().text().await.unwrap();
    let results: Vec<Value> = output.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let custom_ids: BTreeSet<&str> = results.iter().map(|r| r["custom_id"].as_str().unwrap()).collect();
    assert_eq!((results.len(), custom_ids.len()), (300, 300), "each custom_id exactly once");
    let after = recorded_lines(dir.path());
    for (line, result_id) in &before {
        assert_eq!(&after[line], result_id, "line {line} finished before the kill and was not run again");
        assert!(results.iter().any(|r| r["id"] == result_id.as_str()));
    }
}
