//! Adapters over HTTP on the tiny model: registration, selection, composition, runtime load and
//! unload, and mixed batches.

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

/// A PEFT adapter for the tiny model on q_proj and down_proj of every layer.
fn write_adapter(dir: &Path, seed: u32) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["q_proj","down_proj"]}"#,
    )
    .unwrap();
    let q_width = synthetic::HEADS * synthetic::HEAD_DIM;
    let mut data = Vec::new();
    for layer in 0..synthetic::LAYERS {
        for (module, block, input, output) in [
            ("q_proj", "self_attn", synthetic::HIDDEN, q_width),
            ("down_proj", "mlp", synthetic::FFN, synthetic::HIDDEN),
        ] {
            let prefix = format!("base_model.model.model.layers.{layer}.{block}.{module}");
            for (factor, shape) in [("lora_A", vec![2, input]), ("lora_B", vec![output, 2])] {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|i| ((((i as u32 * 7 + seed) % 23) as f32 - 11.0) * 0.02).to_le_bytes())
                    .collect();
                data.push((format!("{prefix}.{factor}.weight"), bytes, shape));
            }
        }
    }
    let views: Vec<(String, TensorView)> = data
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(dir.join("adapter_model.safetensors"), safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The shapes the tiny model's adapters have.
fn tiny_shape() -> tessera_adapters::peft::BaseShape {
    tessera_adapters::peft::BaseShape {
        architecture: "gemma3".into(),
        n_layers: synthetic::LAYERS,
        hidden: synthetic::HIDDEN,
        q_width: synthetic::HEADS * synthetic::HEAD_DIM,
        kv_width: synthetic::HEAD_DIM,
        ffn: synthetic::FFN,
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    app: Arc<App>,
    router: Router,
}

fn fixture(admin_key: Option<&str>) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&model_path).unwrap();
    let adapters = dir.path().join("adapters");
    write_adapter(&adapters.join("tiny-a"), 1);
    let uploads = dir.path().join("uploads");
    write_adapter(&uploads.join("second"), 2);
    write_adapter(&uploads.join("third"), 4);
    write_adapter(&dir.path().join("elsewhere"), 3);
    let model = Arc::new(LoadedModel::load(&model_path).unwrap());
    let app = App::start(
        model,
        MODEL.into(),
        ApiSettings {
            ctx_len: 128,
            keys: tessera::api::auth::Keys::default().with_key(tessera::api::auth::Scope::Admin, admin_key),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            adapters_dir: Some(adapters),
            adapter_roots: vec![uploads],
            max_adapter_memory: None,
            tuning: None,
            plugins: None,
        },
        EngineConfig {
            ctx_len: 128,
            max_running_seqs: 8,
            max_queue: 32,
            prefill_tokens_per_step: 64,
            ..EngineConfig::default()
        },
    )
    .unwrap();
    let router = router(app.clone());
    Fixture {
        root: dir.path().to_path_buf(),
        _dir: dir,
        app,
        router,
    }
}

async fn call(router: &Router, method: &str, uri: &str, body: Option<Value>, key: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
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

async fn tokens(router: &Router, model: &str, adapters: Value) -> (StatusCode, Value) {
    let body = json!({"model": model, "prompt": "the cat", "max_tokens": 8, "temperature": 0,
                      "ignore_eos": true, "return_token_ids": true, "logprobs": 1, "adapters": adapters});
    let (status, v) = call(router, "POST", "/v1/completions", Some(body), None).await;
    (status, v["choices"][0].clone())
}

#[tokio::test]
async fn adapters_are_listed_selected_and_composed() {
    let f = fixture(None);
    let r = &f.router;
    let (status, list) = call(r, "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["tiny", "tiny-a"]);
    assert_eq!(list["data"][1]["parent"], "tiny");
    assert!(list["data"][0]["parent"].is_null());
    let (status, one) = call(r, "GET", "/v1/models/tiny-a", None, None).await;
    assert_eq!((status, one["parent"].as_str()), (StatusCode::OK, Some("tiny")));

    let (_, base) = tokens(r, MODEL, Value::Null).await;
    let (_, adapted) = tokens(r, "tiny-a", Value::Null).await;
    assert_ne!(base["logprobs"], adapted["logprobs"], "the adapter changed nothing");
    // Composition on the base: weight 1 is the adapter itself, weight 0 is the base.
    let (_, composed) = tokens(r, MODEL, json!([{"name": "tiny-a", "scale": 1.0}])).await;
    assert_eq!(composed["logprobs"], adapted["logprobs"]);
    let (_, off) = tokens(r, MODEL, json!([{"name": "tiny-a", "scale": 0.0}])).await;
    assert_eq!(off["token_ids"], base["token_ids"]);

    let (status, err) = call(r, "POST", "/v1/completions", Some(json!({"model": MODEL, "prompt": "a", "adapters": [{"name": "nope"}]})), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["error"]["param"], "adapters[0].name");
    assert_eq!(err["error"]["code"], "adapter_not_found");
    let (status, err) = call(r, "POST", "/v1/completions", Some(json!({"model": "nope", "prompt": "a"})), None).await;
    assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("model_not_found")));
}

#[tokio::test]
async fn a_mixed_batch_gives_each_request_what_it_gets_alone() {
    let f = fixture(None);
    let r = &f.router;
    let (status, _) = call(r, "POST", "/v1/load_lora_adapter",
        Some(json!({"lora_name": "tiny-b", "lora_path": f.root.join("uploads/second")})), None).await;
    assert_eq!(status, StatusCode::OK);
    let requests = [
        ("tiny-a", Value::Null),
        ("tiny-b", Value::Null),
        (MODEL, Value::Null),
        (MODEL, json!([{"name": "tiny-a", "scale": 0.5}, {"name": "tiny-b", "scale": 1.0}])),
    ];
    // Tokens and their logprobs, exactly.
    let mut alone = Vec::new();
    for (model, adapters) in &requests {
        let choice = tokens(r, model, adapters.clone()).await.1;
        alone.push((choice["token_ids"].clone(), choice["logprobs"].clone()));
    }
    let together = futures::future::join_all(requests.iter().map(|(m, a)| tokens(r, m, a.clone()))).await;
    for (i, (status, choice)) in together.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK);
        assert_eq!((choice["token_ids"].clone(), choice["logprobs"].clone()), alone[i], "request {i}");
    }
    assert_ne!(alone[0].1, alone[2].1, "the adapter changed nothing");
    assert_ne!(alone[0].1, alone[1].1, "two adapters gave the same output");
}

#[tokio::test]
async fn load_replace_and_unload_at_runtime_behind_the_admin_key() {
    let f = fixture(Some("admin"));
    let r = &f.router;
    let load = |name: &str, path: std::path::PathBuf| json!({"lora_name": name, "lora_path": path});
    let good = f.root.join("uploads/second");

    let (status, _) = call(r, "POST", "/v1/load_lora_adapter", Some(load("b", good.clone())), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, first) = call(r, "POST", "/v1/load_lora_adapter", Some(load("b", good.clone())), Some("admin")).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let (_, second) = call(r, "POST", "/v1/load_lora_adapter", Some(load("b", good.clone())), Some("admin")).await;
    assert!(second["generation"].as_u64() > first["generation"].as_u64(), "a reload is a new generation");
    let (status, _) = tokens(r, "b", Value::Null).await;
    assert_eq!(status, StatusCode::OK);

    for (body, param) in [
        (load("bad/name", good.clone()), "lora_name"),
        (load(MODEL, good.clone()), "lora_name"),
        (load("c", f.root.join("elsewhere")), "lora_path"),
        (load("c", f.root.join("uploads/missing")), "lora_path"),
        (load("c", f.root.join("uploads/../elsewhere")), "lora_path"),
    ] {
        let (status, err) = call(r, "POST", "/v1/load_lora_adapter", Some(body), Some("admin")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        assert_eq!(err["error"]["param"], param, "{err}");
    }

    let (status, _) = call(r, "POST", "/v1/unload_lora_adapter", Some(json!({"lora_name": "b"})), Some("admin")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = tokens(r, "b", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "unloaded adapters refuse new requests at once");
    let (status, _) = call(r, "POST", "/v1/unload_lora_adapter", Some(json!({"lora_name": "b"})), Some("admin")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(!f.app.adapters.registry().contains("b"));
}

/// A streamed completion from `model`: the generations header and the streamed tokens with
/// their logprobs.
async fn stream(router: &Router, model: &str) -> (StatusCode, String, Vec<(String, f64)>) {
    let body = json!({"model": model, "prompt": "a b c", "max_tokens": 12, "temperature": 0,
                      "ignore_eos": true, "stream": true, "logprobs": 1});
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let generations = response
        .headers()
        .get(tessera::api::ADAPTER_GENERATIONS_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let text = String::from_utf8(bytes.to_vec()).unwrap();
    let tokens = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            let choice = &v["choices"][0];
            let logprob = choice["logprobs"]["token_logprobs"][0].as_f64()?;
            Some((choice["text"].as_str()?.to_string(), logprob))
        })
        .collect();
    (status, generations, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replacing_an_adapter_under_load_never_mixes_generations() {
    let f = fixture(None);
    let r = &f.router;
    let versions = [f.root.join("uploads/second"), f.root.join("uploads/third")];
    let load = |version: usize| {
        let body = json!({"lora_name": "swap", "lora_path": versions[version]});
        async move {
            let (status, v) = call(r, "POST", "/v1/load_lora_adapter", Some(body), None).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            (v["generation"].as_u64().unwrap(), version)
        }
    };
    // What each version answers on its own.
    let mut generation_version = std::collections::HashMap::new();
    let mut expected = Vec::new();
    for version in 0..2 {
        let (generation, v) = load(version).await;
        generation_version.insert(generation, v);
        expected.push(stream(r, "swap").await.2);
    }
    assert_ne!(expected[0], expected[1], "the two versions must answer differently");

    let clients = futures::future::join_all((0..8).map(|_| async {
        let mut responses = Vec::new();
        for _ in 0..5 {
            responses.push(stream(r, "swap").await);
        }
        responses
    }));
    let reloads = async {
        let mut loaded = Vec::new();
        for i in 0..20 {
            loaded.push(load(i % 2).await);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        loaded
    };
    let (responses, loaded) = tokio::join!(clients, reloads);
    generation_version.extend(loaded);
    let mut seen = std::collections::HashSet::new();
    for (status, generations, tokens) in responses.into_iter().flatten() {
        assert_eq!(status, StatusCode::OK);
        let generation: u64 = generations.strip_prefix("swap@").unwrap().parse().unwrap();
        let version = generation_version[&generation];
        assert_eq!(tokens, expected[version], "a response from generation {generation} is not version {version}'s");
        seen.insert(generation);
    }
    assert!(seen.len() > 1, "the load test never saw a swap");
}

/// A multipart/form-data body.
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

async fn upload(router: &Router, parts: &[(&str, Vec<u8>)], key: Option<&str>) -> (StatusCode, Value) {
    let (content_type, body) = multipart(parts);
    let mut req = Request::post("/v1/adapters").header(header::CONTENT_TYPE, content_type);
    if let Some(key) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = router.clone().oneshot(req.body(Body::from(body)).unwrap()).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn upload_list_replace_and_delete_adapters() {
    let f = fixture(Some("admin"));
    let r = &f.router;
    let key = Some("admin");
    let source = f.root.join("uploads/second");
    let config = std::fs::read(source.join("adapter_config.json")).unwrap();
    let weights = std::fs::read(source.join("adapter_model.safetensors")).unwrap();
    let files = |name: &str| {
        vec![
            ("name", name.as_bytes().to_vec()),
            ("adapter_config.json", config.clone()),
            ("adapter_model.safetensors", weights.clone()),
        ]
    };

    let (status, _) = upload(r, &files("up"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, first) = upload(r, &files("up"), key).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!((first["loaded"].as_bool(), first["rank"].as_u64()), (Some(true), Some(2)));
    let stored = f.root.join("adapters/up");
    assert!(stored.join("adapter_model.safetensors").is_file(), "the upload is stored durably");
    let (status, _) = tokens(r, "up", Value::Null).await;
    assert_eq!(status, StatusCode::OK);

    // The same name again, as a zip archive: a new generation.
    let mut zipped = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut zipped);
        for (name, data) in [("adapter_config.json", &config), ("adapter_model.safetensors", &weights)] {
            zip.start_file(format!("my-adapter/{name}"), zip::write::SimpleFileOptions::default()).unwrap();
            std::io::Write::write_all(&mut zip, data).unwrap();
        }
        zip.finish().unwrap();
    }
    let (status, second) = upload(r, &[("name", b"up".to_vec()), ("archive", zipped.into_inner())], key).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    assert!(second["generation"].as_u64() > first["generation"].as_u64());

    // And as a tar archive.
    let mut tarred = tar::Builder::new(Vec::new());
    for (name, data) in [("adapter_config.json", &config), ("adapter_model.safetensors", &weights)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tarred.append_data(&mut header, format!("peft/{name}"), data.as_slice()).unwrap();
    }
    let (status, third) = upload(r, &[("name", b"up".to_vec()), ("archive", tarred.into_inner().unwrap())], key).await;
    assert_eq!(status, StatusCode::OK, "{third}");
    assert!(third["generation"].as_u64() > second["generation"].as_u64());
    let (status, err) = upload(r, &[("name", b"junk".to_vec()), ("archive", b"neither zip nor tar".to_vec())], key).await;
    assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("archive")));

    let (status, list) = call(r, "GET", "/v1/adapters", None, key).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = list["data"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["tiny-a", "up"]);
    assert_eq!(list["data"][0]["loaded"], false, "registered adapters load on first use");
    let (status, one) = call(r, "GET", "/v1/adapters/up", None, key).await;
    assert_eq!((status, one["generation"].clone()), (StatusCode::OK, third["generation"].clone()));

    // A broken upload is refused and installs nothing.
    let mut broken = files("broken");
    broken[2].1.truncate(100);
    let (status, err) = upload(r, &broken, key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(!f.root.join("adapters/broken").exists());
    let (status, err) = upload(r, &files("../escape"), key).await;
    assert_eq!((status, err["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("name")));
    let (status, _) = upload(r, &[("name", b"half".to_vec()), ("adapter_config.json", config.clone())], key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let (status, _) = call(r, "DELETE", "/v1/adapters/up", None, key).await;
    assert_eq!(status, StatusCode::OK);
    assert!(!stored.exists(), "deleting removes the stored files");
    let (status, _) = call(r, "GET", "/v1/adapters/up", None, key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = tokens(r, "up", Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[test]
fn least_recently_used_unleased_adapters_leave_memory_past_the_budget() {
    use tessera::registry::Registry;
    let dir = tempfile::tempdir().unwrap();
    for (name, seed) in [("a", 1), ("b", 2), ("c", 3)] {
        write_adapter(&dir.path().join(name), seed);
    }
    let shape = tiny_shape();
    let one = {
        let probe = Registry::new(shape.clone(), "tiny", &[], None);
        probe.scan(dir.path()).unwrap();
        probe.lease("a").unwrap().weights.size_in_bytes()
    };
    // Room for one adapter, not two.
    let registry = Registry::new(shape, "tiny", &[], Some(one + one / 2));
    assert_eq!(registry.scan(dir.path()).unwrap(), 3);
    let loaded = |name: &str| registry.describe(name).unwrap().1.is_some();

    drop(registry.lease("a").unwrap());
    assert!(loaded("a"));
    let b = registry.lease("b").unwrap();
    assert!(!loaded("a") && loaded("b"), "the unleased `a` made room for `b`");
    // `b` is leased by a running request: loading `c` may not take its memory.
    let c = registry.lease("c").unwrap();
    assert!(loaded("b") && loaded("c"));
    drop(b);
    drop(c);
    // Now both are free; loading `a` again evicts down to the budget.
    let a = registry.lease("a").unwrap();
    assert!(loaded("a") && !loaded("b") && !loaded("c"));
    assert!(registry.loaded_bytes() <= one + one / 2);
    assert!(a.generation > 1, "an evicted adapter comes back as a new generation");
}

#[tokio::test]
async fn thousands_of_adapters_register_without_loading() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&model_path).unwrap();
    let adapters = dir.path().join("adapters");
    write_adapter(&adapters.join("real"), 1);
    let config = std::fs::read(adapters.join("real/adapter_config.json")).unwrap();
    let weights = std::fs::read(adapters.join("real/adapter_model.safetensors")).unwrap();
    for i in 0..2000 {
        let d = adapters.join(format!("a{i:04}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("adapter_config.json"), &config).unwrap();
        std::fs::write(d.join("adapter_model.safetensors"), &weights).unwrap();
    }
    // One the server cannot serve: checked at the scan, and not listed.
    std::fs::create_dir_all(adapters.join("config-only")).unwrap();
    std::fs::write(adapters.join("config-only/adapter_config.json"), &config).unwrap();
    let app = App::start(
        Arc::new(LoadedModel::load(&model_path).unwrap()),
        MODEL.into(),
        ApiSettings {
            ctx_len: 64,
            keys: Default::default(),
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1 << 20,
            adapters_dir: Some(adapters),
            adapter_roots: Vec::new(),
            max_adapter_memory: None,
            tuning: None,
            plugins: None,
        },
        EngineConfig::default(),
    )
    .unwrap();
    assert_eq!(app.adapters.registry().names().len(), 2001);
    assert_eq!(app.adapters.registry().loaded_bytes(), 0, "registering reads no weights");
    let r = router(app.clone());
    let (status, list) = call(&r, "GET", "/v1/models", None, None).await;
    assert_eq!((status, list["data"].as_array().unwrap().len()), (StatusCode::OK, 2002));
    let (status, _) = tokens(&r, "real", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert!(app.adapters.registry().loaded_bytes() > 0);
    // One whose weights go missing after the scan fails clearly when first used, without a
    // server path, and the server goes on.
    std::fs::remove_file(dir.path().join("adapters/a0001/adapter_model.safetensors")).unwrap();
    let (status, err) = call(&r, "POST", "/v1/completions", Some(json!({"model": "a0001", "prompt": "a"})), None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("adapter_model.safetensors") && !message.contains(dir.path().to_str().unwrap()), "{err}");
}

/// `GET uri`'s status, content type and body bytes.
async fn download(router: &Router, uri: &str, key: Option<&str>) -> (StatusCode, String, Vec<u8>) {
    let mut req = Request::get(uri);
    if let Some(key) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let response = router.clone().oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    (status, content_type, axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap().to_vec())
}

#[tokio::test]
async fn adapters_go_out_as_peft_or_gguf_and_come_back_answering_the_same() {
    let f = fixture(Some("admin"));
    let r = &f.router;
    let key = Some("admin");
    let (_, original) = tokens(r, "tiny-a", json!(null)).await;
    assert!(original["token_ids"].as_array().is_some_and(|t| !t.is_empty()), "{original}");

    // PEFT folder → GGUF → uploaded as `from-gguf`; PEFT folder → zip → uploaded as `from-zip`.
    let (status, content_type, gguf) = download(r, "/v1/adapters/tiny-a/download?format=gguf", key).await;
    assert_eq!((status, content_type.as_str()), (StatusCode::OK, "application/octet-stream"));
    assert_eq!(&gguf[..4], b"GGUF");
    let (status, content_type, zip) = download(r, "/v1/adapters/tiny-a/download", key).await;
    assert_eq!((status, content_type.as_str()), (StatusCode::OK, "application/zip"));
    let (status, body) = upload(r, &[("name", b"from-gguf".to_vec()), ("gguf", gguf.clone())], key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = upload(r, &[("name", b"from-zip".to_vec()), ("archive", zip)], key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for name in ["from-gguf", "from-zip"] {
        let (_, again) = tokens(r, name, json!(null)).await;
        assert_eq!(again, original, "{name} answers differently from tiny-a");
    }
    // A GGUF adapter goes out as it is stored, and as PEFT holds the same factors.
    let (_, _, gguf_again) = download(r, "/v1/adapters/from-gguf/download?format=gguf", key).await;
    assert_eq!(gguf_again, gguf, "a stored GGUF file is not sent as it is");
    let (_, _, zip_of_gguf) = download(r, "/v1/adapters/from-gguf/download?format=peft", key).await;
    let (status, body) = upload(r, &[("name", b"from-gguf-zip".to_vec()), ("archive", zip_of_gguf)], key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(tokens(r, "from-gguf-zip", json!(null)).await.1, original);
    // The adapters directory holds the GGUF upload as a file, registered by its name on restart.
    assert!(f.root.join("adapters/from-gguf.gguf").is_file());
    let rescanned = tessera::registry::Registry::new(tiny_shape(), MODEL, &[], None);
    rescanned.scan(&f.root.join("adapters")).unwrap();
    assert!(rescanned.lease("from-gguf").is_ok(), "a restarted server does not serve the GGUF upload");

    // Refusals name their reason.
    let (status, _, body) = download(r, "/v1/adapters/tiny-a/download?format=onnx", key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = download(r, "/v1/adapters/tiny-a/download?version=2", key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(String::from_utf8_lossy(&body).contains("not tuned online"));
    let (status, _, _) = download(r, "/v1/adapters/nobody/download", key).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = upload(r, &[("name", b"bad".to_vec()), ("gguf", b"GGUF-but-not-really".to_vec())], key).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "gguf");
    assert!(!body["error"]["message"].as_str().unwrap().contains(".upload-"), "the message shows a server path: {body}");
    assert!(!f.root.join("adapters/bad.gguf").exists());
}

#[tokio::test]
async fn an_adapter_whose_files_vanish_is_not_found_rather_than_a_server_error() {
    let f = fixture(Some("admin"));
    let r = &f.router;
    let key = Some("admin");
    // A delete that lands between a request finding the adapter and reading its files.
    std::fs::remove_dir_all(f.root.join("adapters/tiny-a")).unwrap();
    for format in ["gguf", "peft"] {
        let (status, _, body) = download(r, &format!("/v1/adapters/tiny-a/download?format={format}"), key).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains("does not exist"), "{}", String::from_utf8_lossy(&body));
    }
    let (status, body) = tokens(r, "tiny-a", json!(null)).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}
