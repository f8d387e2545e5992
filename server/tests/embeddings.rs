//! `POST /v1/embeddings` on the tiny model: vectors through adapters and compositions, both
//! encodings, batching with other requests, and the errors of bad input.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use base64::Engine as _;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use tessera::api::{router, ApiSettings, App};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::{self, tiny_gemma3};
use tessera::LoadedModel;
use tower::ServiceExt;

const MODEL: &str = "tiny";

/// A PEFT LoRA for the tiny model on q_proj and down_proj of every layer.
fn write_adapter(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj","down_proj"]}"#).unwrap();
    let q_width = synthetic::HEADS * synthetic::HEAD_DIM;
    let mut data = Vec::new();
    for layer in 0..synthetic::LAYERS {
        for (module, block, input, output) in [("q_proj", "self_attn", synthetic::HIDDEN, q_width), ("down_proj", "mlp", synthetic::FFN, synthetic::HIDDEN)] {
            let prefix = format!("base_model.model.model.layers.{layer}.{block}.{module}");
            for (factor, shape) in [("lora_A", vec![2, input]), ("lora_B", vec![output, 2])] {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n).flat_map(|i| ((((i as u32 * 7 + 1) % 23) as f32 - 11.0) * 0.02).to_le_bytes()).collect();
                data.push((format!("{prefix}.{factor}.weight"), bytes, shape));
            }
        }
    }
    let views: Vec<(String, TensorView)> = data.iter().map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

fn fixture() -> (tempfile::TempDir, Router) {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&model_path).unwrap();
    let adapters = dir.path().join("adapters");
    write_adapter(&adapters.join("tiny-a"));
    let model = Arc::new(LoadedModel::load(&model_path).unwrap());
    let settings = ApiSettings {
        ctx_len: 128,
        keys: tessera::api::auth::Keys::default(),
        request_timeout: Duration::from_secs(30),
        max_body_bytes: 1 << 20,
        adapters_dir: Some(adapters),
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        tuning: None,
        plugins: None,
    };
    // A small prefill budget, so that long inputs take several chunks and several steps.
    let engine = EngineConfig { ctx_len: 128, max_running_seqs: 8, max_queue: 32, prefill_tokens_per_step: 16, ..EngineConfig::default() };
    let app = App::start(model, MODEL.into(), settings, engine).unwrap();
    (dir, router(app))
}

async fn call(router: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let req = Request::builder().method(method).uri(uri);
    let req = match body {
        Some(b) => req.header(header::CONTENT_TYPE, "application/json").body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn embed(router: &Router, body: Value) -> Value {
    let (status, answer) = call(router, "POST", "/v1/embeddings", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

fn vector(answer: &Value, index: usize) -> Vec<f32> {
    answer["data"][index]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

const TEXT: &str = "the cat sat on the mat and looked at the dog";

#[tokio::test]
async fn an_adapter_changes_the_embedding_and_the_base_does_not() {
    let (_dir, r) = fixture();
    let base = vector(&embed(&r, json!({"model": MODEL, "input": TEXT})).await, 0);
    assert_eq!(base.len(), synthetic::HIDDEN);
    let norm = base.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "the vector is not L2-normalised: {norm}");

    let again = vector(&embed(&r, json!({"model": MODEL, "input": TEXT})).await, 0);
    assert_eq!(again, base, "the same input gave another vector");
    let adapted = vector(&embed(&r, json!({"model": "tiny-a", "input": TEXT})).await, 0);
    assert!(max_difference(&adapted, &base) > 1e-3, "the adapter changed nothing");
    let composed = vector(&embed(&r, json!({"model": MODEL, "input": TEXT, "adapters": [{"name": "tiny-a"}]})).await, 0);
    assert!(max_difference(&composed, &adapted) < 1e-5, "composing the adapter at weight 1 is not the adapter");
    let off = vector(&embed(&r, json!({"model": MODEL, "input": TEXT, "adapters": [{"name": "tiny-a", "scale": 0.0}]})).await, 0);
    assert!(max_difference(&off, &base) < 1e-5, "the adapter at weight 0 is not the base");
}

#[tokio::test]
async fn every_input_shape_and_base64_give_the_same_vectors() {
    let (_dir, r) = fixture();
    let (_, tokenized) = call(&r, "POST", "/tokenize", Some(json!({"model": MODEL, "prompt": TEXT}))).await;
    let ids = tokenized["tokens"].clone();
    let one = embed(&r, json!({"model": MODEL, "input": TEXT})).await;
    assert_eq!((one["object"].as_str(), one["data"][0]["object"].as_str(), one["model"].as_str()), (Some("list"), Some("embedding"), Some(MODEL)));
    assert_eq!(one["usage"]["prompt_tokens"], ids.as_array().unwrap().len());
    assert_eq!(one["usage"]["total_tokens"], one["usage"]["prompt_tokens"]);
    let expected = vector(&one, 0);

    let from_ids = embed(&r, json!({"model": MODEL, "input": ids})).await;
    assert!(max_difference(&vector(&from_ids, 0), &expected) < 1e-5, "token ids and their text differ");
    let lists = embed(&r, json!({"model": MODEL, "input": [ids, [2, 270, 271]], "dimensions": synthetic::HIDDEN})).await;
    assert!(max_difference(&vector(&lists, 0), &expected) < 1e-5);
    let texts = embed(&r, json!({"model": MODEL, "input": ["a dog", TEXT]})).await;
    assert_eq!(texts["data"][1]["index"], 1);
    assert!(max_difference(&vector(&texts, 1), &expected) < 1e-5, "an input embedded beside another changed");

    let encoded = embed(&r, json!({"model": MODEL, "input": TEXT, "encoding_format": "base64"})).await;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(decoded, expected, "base64 holds other floats than the JSON numbers");
}

/// An embedding goes through the engine beside a running generation: both finish, and the
/// vector is the one it has alone.
#[tokio::test]
async fn embeddings_share_the_batch_with_generations() {
    let (_dir, r) = fixture();
    let long: Vec<u32> = (0..100).map(|i| 100 + i).collect();
    let alone = vector(&embed(&r, json!({"model": MODEL, "input": long})).await, 0);
    let completion = call(&r, "POST", "/v1/completions", Some(json!({"model": "tiny-a", "prompt": "the cat", "max_tokens": 20, "ignore_eos": true})));
    let embedding = call(&r, "POST", "/v1/embeddings", Some(json!({"model": MODEL, "input": [long.clone(), long]})));
    let ((completed, text), (embedded, vectors)) = tokio::join!(completion, embedding);
    assert_eq!(completed, StatusCode::OK, "{text}");
    assert_eq!(embedded, StatusCode::OK, "{vectors}");
    assert_eq!(text["usage"]["completion_tokens"], 20);
    for i in 0..2 {
        assert!(max_difference(&vector(&vectors, i), &alone) < 1e-5, "input {i} differs in a shared batch");
    }
}

#[tokio::test]
async fn models_say_how_embeddings_are_made() {
    let (_dir, r) = fixture();
    let (_, list) = call(&r, "GET", "/v1/models", None).await;
    for model in list["data"].as_array().unwrap() {
        assert_eq!(model["embeddings"], json!({"pooling": "mean", "normalized": true, "dimensions": synthetic::HIDDEN}), "{model}");
    }
}

#[tokio::test]
async fn bad_input_is_refused_in_openai_shape_naming_the_field() {
    let (_dir, r) = fixture();
    let refusals = [
        (json!({"model": MODEL, "input": []}), StatusCode::BAD_REQUEST, "input"),
        (json!({"model": MODEL, "input": ""}), StatusCode::BAD_REQUEST, "input"),
        (json!({"model": MODEL, "input": [[]]}), StatusCode::BAD_REQUEST, "input"),
        (json!({"model": MODEL, "input": [1_000_000]}), StatusCode::BAD_REQUEST, "input"),
        (json!({"model": MODEL, "input": vec![200; 129]}), StatusCode::BAD_REQUEST, "input"),
        (json!({"model": MODEL, "input": "a", "dimensions": 7}), StatusCode::BAD_REQUEST, "dimensions"),
        (json!({"model": MODEL, "input": "a", "adapters": [{"name": "nope"}]}), StatusCode::BAD_REQUEST, "adapters[0].name"),
    ];
    for (body, status, param) in refusals {
        let (got, err) = call(&r, "POST", "/v1/embeddings", Some(body.clone())).await;
        assert_eq!((got, err["error"]["param"].as_str()), (status, Some(param)), "{body}: {err}");
        assert!(err["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{err}");
    }
    let (status, err) = call(&r, "POST", "/v1/embeddings", Some(json!({"model": MODEL, "input": "a", "dimensions": 7}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(err["error"]["message"].as_str().unwrap().contains("dimensions"), "{err}");
    let (status, err) = call(&r, "POST", "/v1/embeddings", Some(json!({"model": "nope", "input": "a"}))).await;
    assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("model_not_found")), "{err}");
    let (status, err) = call(&r, "POST", "/v1/embeddings", Some(json!({"model": MODEL, "input": "a", "encoding_format": "int8"}))).await;
    assert!(status.is_client_error() && err["error"]["message"].as_str().is_some_and(|m| m.contains("encoding_format")), "{status} {err}");
}
