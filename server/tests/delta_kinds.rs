//! DoRA and IA³ adapters over HTTP on the tiny model, beside LoRA: what the startup scan
//! registers, how each kind is reported, mixed batches, composition rules, uploads that are
//! refused, and exports.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tessera::api::{router, ApiSettings, App};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::{self, tiny_gemma3};
use tessera::LoadedModel;
use tower::ServiceExt;

const MODEL: &str = "tiny";
const Q_WIDTH: usize = synthetic::HEADS * synthetic::HEAD_DIM;
const KV_WIDTH: usize = synthetic::HEAD_DIM;

/// Deterministic small values, different per seed.
fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32 * 7 + seed) % 23) as f32 - 11.0) * scale).collect()
}

fn safetensors_bytes(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> =
        tensors.iter().map(|(n, s, v)| (n.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect(), s.clone())).collect();
    let views: Vec<(String, TensorView)> = data.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}

fn write_folder(dir: &Path, config: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config).unwrap();
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors_bytes(tensors)).unwrap();
}

fn prefix(layer: usize, module: &str) -> String {
    let block = if matches!(module, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("base_model.model.model.layers.{layer}.{block}.{module}")
}

const LORA_CONFIG: &str = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#;
const DORA_CONFIG: &str = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"use_dora":true}"#;
const IA3_CONFIG: &str = r#"{"peft_type":"IA3","target_modules":["k_proj","v_proj","down_proj"],"feedforward_modules":["down_proj"]}"#;

/// LoRA (or DoRA, with magnitudes of `magnitude_len`) on q_proj of every layer.
fn low_rank_tensors(seed: u32, magnitude_len: Option<usize>) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut tensors = Vec::new();
    for layer in 0..synthetic::LAYERS {
        let p = prefix(layer, "q_proj");
        tensors.push((format!("{p}.lora_A.weight"), vec![2, synthetic::HIDDEN], values(2 * synthetic::HIDDEN, seed, 0.02)));
        tensors.push((format!("{p}.lora_B.weight"), vec![Q_WIDTH, 2], values(2 * Q_WIDTH, seed + 1, 0.02)));
        if let Some(len) = magnitude_len {
            let m = values(len, seed + 2, 0.05).iter().map(|v| 1.5 + v).collect();
            tensors.push((format!("{p}.lora_magnitude_vector"), vec![len], m));
        }
    }
    tensors
}

/// IA³ scales near 1 on k, v (outputs) and down (input) of every layer.
fn ia3_tensors(seed: u32) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let near_one = |n, s| values(n, s, 0.03).iter().map(|v| 1.0 + v).collect::<Vec<f32>>();
    let mut tensors = Vec::new();
    for layer in 0..synthetic::LAYERS {
        tensors.push((format!("{}.ia3_l", prefix(layer, "k_proj")), vec![KV_WIDTH, 1], near_one(KV_WIDTH, seed)));
        tensors.push((format!("{}.ia3_l", prefix(layer, "v_proj")), vec![KV_WIDTH, 1], near_one(KV_WIDTH, seed + 1)));
        tensors.push((format!("{}.ia3_l", prefix(layer, "down_proj")), vec![1, synthetic::FFN], near_one(synthetic::FFN, seed + 2)));
    }
    tensors
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    router: Router,
}

/// A server whose adapters directory holds one adapter of each kind, a second DoRA one, and
/// folders it cannot serve.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&model_path).unwrap();
    let adapters = dir.path().join("adapters");
    write_folder(&adapters.join("plain"), LORA_CONFIG, &low_rank_tensors(1, None));
    write_folder(&adapters.join("decomposed"), DORA_CONFIG, &low_rank_tensors(3, Some(Q_WIDTH)));
    write_folder(&adapters.join("decomposed-2"), DORA_CONFIG, &low_rank_tensors(5, Some(Q_WIDTH)));
    write_folder(&adapters.join("scaled"), IA3_CONFIG, &ia3_tensors(7));
    write_folder(&adapters.join("short-magnitude"), DORA_CONFIG, &low_rank_tensors(3, Some(Q_WIDTH - 1)));
    let saves = r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj"],"modules_to_save":["lm_head"]}"#;
    write_folder(&adapters.join("extra-modules"), saves, &low_rank_tensors(1, None));
    let model = Arc::new(LoadedModel::load(&model_path).unwrap());
    let app = App::start(
        model,
        MODEL.into(),
        ApiSettings {
            ctx_len: 128,
            keys: tessera::api::auth::Keys::default(),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            adapters_dir: Some(adapters),
            adapter_roots: Vec::new(),
            max_adapter_memory: None,
            tuning: None,
            plugins: None,
        },
        EngineConfig { ctx_len: 128, max_running_seqs: 8, max_queue: 32, prefill_tokens_per_step: 64, ..EngineConfig::default() },
    )
    .unwrap();
    Fixture { root: dir.path().to_path_buf(), _dir: dir, router: router(app) }
}

async fn send(router: &Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    (status, axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec())
}

async fn call(router: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri);
    let req = match body {
        Some(b) => req.header(header::CONTENT_TYPE, "application/json").body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    };
    let (status, bytes) = send(router, req.unwrap()).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn tokens(router: &Router, model: &str, adapters: Value) -> (StatusCode, Value) {
    let body = json!({"model": model, "prompt": "the cat", "max_tokens": 6, "temperature": 0,
                      "ignore_eos": true, "return_token_ids": true, "logprobs": 1, "adapters": adapters});
    let (status, v) = call(router, "POST", "/v1/completions", Some(body)).await;
    (status, if status == StatusCode::OK { v["choices"][0].clone() } else { v })
}

fn multipart(parts: &[(&str, Vec<u8>)]) -> (String, Vec<u8>) {
    let boundary = "tessera-test-boundary";
    let mut body = Vec::new();
    for (name, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n\r\n").as_bytes());
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

async fn upload(router: &Router, name: &str, config: &str, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> (StatusCode, Value) {
    let (content_type, body) = multipart(&[
        ("name", name.as_bytes().to_vec()),
        ("adapter_config", config.as_bytes().to_vec()),
        ("adapter_model", safetensors_bytes(tensors)),
    ]);
    let req = Request::post("/v1/adapters").header(header::CONTENT_TYPE, content_type).body(Body::from(body)).unwrap();
    let (status, bytes) = send(router, req).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_scan_lists_what_it_can_serve_with_its_kind_and_skips_the_rest() {
    let f = fixture();
    let r = &f.router;
    let (status, list) = call(r, "GET", "/v1/models", None).await;
    assert_eq!(status, StatusCode::OK);
    let kinds: Vec<(&str, Option<&str>)> =
        list["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap(), m["adapter_kind"].as_str())).collect();
    assert_eq!(
        kinds,
        [(MODEL, None), ("decomposed", Some("dora")), ("decomposed-2", Some("dora")), ("plain", Some("lora")), ("scaled", Some("ia3"))]
    );
    for (name, kind, rank) in [("plain", "lora", json!(2)), ("decomposed", "dora", json!(2)), ("scaled", "ia3", Value::Null)] {
        let (status, info) = call(r, "GET", &format!("/v1/adapters/{name}"), None).await;
        assert_eq!((status, info["kind"].as_str()), (StatusCode::OK, Some(kind)), "{info}");
        // Rank shows once loaded, and IA³ has none.
        tokens(r, name, Value::Null).await;
        let (_, info) = call(r, "GET", &format!("/v1/adapters/{name}"), None).await;
        assert_eq!(info["rank"], rank, "{info}");
    }
    let (_, info) = call(r, "GET", "/v1/adapters/scaled", None).await;
    assert_eq!(info["size_bytes"], json!(synthetic::LAYERS * (2 * KV_WIDTH + synthetic::FFN) * 4), "{info}");
    // A skipped folder is not a model: a request naming it is told so, never a 500 with a path.
    for name in ["short-magnitude", "extra-modules"] {
        let (status, err) = tokens(r, name, Value::Null).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
        assert!(!err.to_string().contains(f.root.to_str().unwrap()), "{err}");
    }
}

#[tokio::test]
async fn files_spoiled_after_the_scan_answer_a_clear_error_without_a_path() {
    let f = fixture();
    let r = &f.router;
    // The folder changes on disk after the scan registered it, before its first use.
    write_folder(&f.root.join("adapters/decomposed"), DORA_CONFIG, &low_rank_tensors(3, Some(Q_WIDTH + 2)));
    let (status, err) = tokens(r, "decomposed", Value::Null).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("lora_magnitude_vector") && message.contains("cannot be served"), "{err}");
    assert!(!message.contains(f.root.to_str().unwrap()), "the message shows a server path: {err}");
    assert_eq!(err["error"]["param"], "model");
}

#[tokio::test]
async fn dora_and_ia3_join_mixed_batches_and_each_request_gets_what_it_gets_alone() {
    let f = fixture();
    let r = &f.router;
    let requests = [
        ("plain", Value::Null),
        ("decomposed", Value::Null),
        ("scaled", Value::Null),
        (MODEL, Value::Null),
        (MODEL, json!([{"name": "plain", "scale": 0.5}, {"name": "decomposed", "scale": 1.0}])),
        (MODEL, json!([{"name": "scaled", "scale": 1.0}, {"name": "plain", "scale": 1.0}])),
    ];
    let mut alone = Vec::new();
    for (model, adapters) in &requests {
        let (status, choice) = tokens(r, model, adapters.clone()).await;
        assert_eq!(status, StatusCode::OK, "{choice}");
        alone.push((choice["token_ids"].clone(), choice["logprobs"].clone()));
    }
    let together = futures::future::join_all(requests.iter().map(|(m, a)| tokens(r, m, a.clone()))).await;
    for (i, (status, choice)) in together.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK);
        assert_eq!((choice["token_ids"].clone(), choice["logprobs"].clone()), alone[i], "request {i}");
    }
    for (i, name) in [(0, "plain"), (1, "decomposed"), (2, "scaled")] {
        assert_ne!(alone[i].1, alone[3].1, "{name} changed nothing");
    }
    // Composing at weight 1 is the adapter itself; at 0, the base.
    let (_, composed) = tokens(r, MODEL, json!([{"name": "decomposed", "scale": 1.0}])).await;
    assert_eq!(composed["logprobs"], alone[1].1);
    let (_, off) = tokens(r, MODEL, json!([{"name": "scaled", "scale": 0.0}])).await;
    assert_eq!(off["logprobs"], alone[3].1);
}

#[tokio::test]
async fn a_composition_holds_at_most_one_dora_adapter_and_no_ia3_beside_it() {
    let f = fixture();
    let r = &f.router;
    let (status, err) = tokens(r, "decomposed", json!([{"name": "decomposed-2", "scale": 0.5}])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["param"], "adapters[0].name");
    assert!(err["error"]["message"].as_str().unwrap().contains("one DoRA adapter"), "{err}");
    let (status, err) = tokens(r, MODEL, json!([{"name": "decomposed", "scale": 1.0}, {"name": "scaled", "scale": 1.0}])).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["param"], "adapters[1].name");
    assert!(err["error"]["message"].as_str().unwrap().contains("IA³"), "{err}");
}

#[tokio::test]
async fn bad_dora_and_ia3_uploads_are_refused_by_tensor_and_nothing_is_stored() {
    let f = fixture();
    let r = &f.router;
    let mut nan = ia3_tensors(7);
    nan[4].2[3] = f32::NAN;
    let mut on_q = ia3_tensors(7);
    on_q.push((format!("{}.ia3_l", prefix(0, "q_proj")), vec![Q_WIDTH, 1], vec![1.0; Q_WIDTH]));
    let mut infinite = low_rank_tensors(3, Some(Q_WIDTH));
    infinite[2].2[0] = f32::INFINITY;
    let cases = [
        ("dora-short", DORA_CONFIG, low_rank_tensors(3, Some(Q_WIDTH - 4)), "layers.0.self_attn.q_proj.lora_magnitude_vector"),
        ("dora-infinite", DORA_CONFIG, infinite, "layers.0.self_attn.q_proj.lora_magnitude_vector"),
        ("ia3-nan", IA3_CONFIG, nan, "layers.1.self_attn.v_proj.ia3_l"),
        ("ia3-on-q", IA3_CONFIG, on_q, "layers.0.self_attn.q_proj.ia3_l"),
    ];
    for (name, config, tensors, tensor) in cases {
        let (status, err) = upload(r, name, config, &tensors).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {err}");
        assert_eq!(err["error"]["param"], "adapter_model.safetensors", "{name}: {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(tensor), "{name}: {err}");
        assert!(!f.root.join("adapters").join(name).exists(), "{name} was stored");
    }
    let (status, info) = upload(r, "fresh-ia3", IA3_CONFIG, &ia3_tensors(11)).await;
    assert_eq!((status, info["kind"].as_str()), (StatusCode::OK, Some("ia3")), "{info}");
}

#[tokio::test]
async fn dora_and_ia3_export_as_peft_and_gguf_export_says_why_not() {
    let f = fixture();
    let r = &f.router;
    for (name, kind) in [("decomposed", "DoRA"), ("scaled", "IA³")] {
        let (status, zip) = send(r, Request::get(format!("/v1/adapters/{name}/download")).body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let (status, info) = {
            let (content_type, body) = multipart(&[("name", format!("{name}-again").into_bytes()), ("archive", zip)]);
            let req = Request::post("/v1/adapters").header(header::CONTENT_TYPE, content_type).body(Body::from(body)).unwrap();
            let (status, bytes) = send(r, req).await;
            (status, serde_json::from_slice::<Value>(&bytes).unwrap())
        };
        assert_eq!(status, StatusCode::OK, "{info}");
        assert_eq!(tokens(r, &format!("{name}-again"), Value::Null).await.1["logprobs"], tokens(r, name, Value::Null).await.1["logprobs"]);
        let (status, body) = call(r, "GET", &format!("/v1/adapters/{name}/download?format=gguf"), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["error"]["param"], "format");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(kind) && message.contains("llama.cpp"), "{body}");
    }
}

/// The served model's row norms, counted.
struct CountedBase {
    model: LoadedModel,
    measured: std::sync::atomic::AtomicUsize,
}

impl tessera_adapters::peft::BaseWeights for CountedBase {
    fn row_norms(&self, layer: usize, module: tessera_adapters::TargetModule, delta: &tessera_adapters::LoraDelta) -> Result<Vec<f32>, String> {
        self.measured.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tessera_adapters::peft::BaseWeights::row_norms(&self.model, layer, module, delta)
    }
}

#[test]
fn a_scanned_dora_folder_measures_its_row_norms_once_at_first_use() {
    use std::sync::atomic::Ordering;
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&model_path).unwrap();
    let adapters = dir.path().join("adapters");
    write_folder(&adapters.join("decomposed"), DORA_CONFIG, &low_rank_tensors(3, Some(Q_WIDTH)));
    write_folder(&adapters.join("short-magnitude"), DORA_CONFIG, &low_rank_tensors(3, Some(Q_WIDTH - 1)));
    let base = Arc::new(CountedBase { model: LoadedModel::load(&model_path).unwrap(), measured: Default::default() });
    let registry = tessera::registry::Registry::new(base.model.model.config().adapter_shape(), MODEL, &[], None);
    registry.measure_against(base.clone());
    assert_eq!(registry.scan(&adapters).unwrap(), 1, "the folder with a short magnitude vector is skipped at the scan");
    assert_eq!(registry.kind("decomposed"), Some(tessera_adapters::AdapterKind::Dora));
    assert_eq!(base.measured.load(Ordering::SeqCst), 0, "the scan checks shapes and values, not norms");
    let leased = registry.lease("decomposed").unwrap();
    assert_eq!(base.measured.load(Ordering::SeqCst), synthetic::LAYERS, "one q_proj per layer, measured once");
    registry.lease("decomposed").unwrap();
    assert_eq!(base.measured.load(Ordering::SeqCst), synthetic::LAYERS);
    assert_eq!(leased.kind(), tessera_adapters::AdapterKind::Dora);
}
