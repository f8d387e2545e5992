//! Runtime domain plugins on a tiny synthetic model: the workspace's example plugins are built,
//! scanned from the plugins directory and served as models; a wrong-ABI library is refused, a
//! panicking one is contained, and a rebuilt library reloads while requests are in flight.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tessera::api::{ApiSettings, App, PluginsConfig, TuningConfig};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::tiny_gemma3;
use tessera::train::job::TuningSettings;
use tessera::LoadedModel;
use tessera_tests::{build_plugins, http, library_file};
use tower::ServiceExt;

const PLUGINS: [&str; 8] = [
    "tessera-plugin-intent",
    "tessera-plugin-arithmetic",
    "tessera-plugin-extraction",
    "tessera-plugin-test-panicky",
    "tessera-plugin-test-wrong-abi",
    "tessera-plugin-test-embedded",
    "tessera-plugin-test-garbage",
    "tessera-plugin-test-no-root",
];

fn copy_plugin(profile_dir: &Path, package: &str, plugins_dir: &Path) {
    let file = library_file(package);
    // Write then rename: a reload must never read a half-copied library.
    let staging = plugins_dir.join(format!(".{file}.partial"));
    std::fs::copy(profile_dir.join(&file), &staging).unwrap();
    std::fs::rename(&staging, plugins_dir.join(&file)).unwrap();
}

fn start_app(dir: &Path, allow_sha256: Option<Vec<String>>) -> Arc<App> {
    let model_path = dir.join("tiny.gguf");
    tiny_gemma3(5).write(&model_path).unwrap();
    let settings = ApiSettings {
        ctx_len: 1024,
        keys: Default::default(),
        request_timeout: Duration::from_secs(60),
        max_body_bytes: 1 << 20,
        adapters_dir: None,
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        tuning: Some(TuningConfig {
            root: dir.join("tuning"),
            state: None, blobs: None,
            settings: TuningSettings {
                train_after: 100_000,
                ..Default::default()
            },
        }),
        plugins: Some(PluginsConfig {
            dir: dir.join("plugins"),
            allow_sha256,
        }),
    };
    let engine = EngineConfig {
        ctx_len: 1024,
        max_running_seqs: 8,
        max_queue: 32,
        prefill_tokens_per_step: 128,
        ..EngineConfig::default()
    };
    App::start(Arc::new(LoadedModel::load(&model_path).unwrap()), "tiny".into(), settings, engine).unwrap()
}

async fn call(router: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    http(router, method, uri, body.map(|b| b.to_string())).await
}

async fn chat(router: &Router, model: &str, messages: Value, max_tokens: usize) -> (StatusCode, Value) {
    call(
        router,
        "POST",
        "/v1/chat/completions",
        Some(json!({"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})),
    )
    .await
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

fn plugin<'a>(list: &'a Value, name: &str) -> &'a Value {
    list["data"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{name} not listed: {list}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_load_serve_contain_failures_and_reload_under_load() {
    let profile_dir = build_plugins(&PLUGINS, &[]);
    let dir = tempfile::tempdir().unwrap();
    let plugins_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins_dir).unwrap();
    for package in PLUGINS {
        copy_plugin(&profile_dir, package, &plugins_dir);
    }
    // The `embedded` test plugin ships one adapter as files beside its library.
    let shipped = plugins_dir.join("shipped-q");
    std::fs::create_dir_all(&shipped).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/testing/embedded/adapter").join(file);
        std::fs::copy(source, shipped.join(file)).unwrap();
    }
    // Not a library at all.
    std::fs::write(plugins_dir.join("junk.so"), b"not an ELF file").unwrap();
    let app = start_app(dir.path(), None);
    let router = tessera::api::router(app.clone());

    // Scanned at startup: the wrong-ABI library is refused before anything of it runs.
    let (status, list) = call(&router, "GET", "/v1/plugins", None).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    for name in ["intent", "arithmetic", "extraction", "panicky", "embedded"] {
        assert_eq!(plugin(&list, name)["status"], "ready", "{list}");
    }
    let wrong = plugin(&list, "tessera_plugin_test_wrong_abi");
    assert_eq!(wrong["status"], "failed");
    assert!(wrong["error"].as_str().unwrap().contains("ABI version 999"), "{wrong}");
    assert!(plugin(&list, "intent")["version"].as_str().unwrap().ends_with("build.0"));
    let no_root = plugin(&list, "tessera_plugin_test_no_root");
    assert!(no_root["error"].as_str().unwrap().contains("no `tessera_plugin_root` symbol"), "{no_root}");
    let junk = plugin(&list, "junk");
    assert!(junk["error"].as_str().unwrap().contains("not a loadable library"), "{junk}");

    // Only files under the plugins directory load.
    let outside = profile_dir.join(library_file("tessera-plugin-intent"));
    let (status, body) = call(&router, "POST", "/v1/plugins/load", Some(json!({"path": outside}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("only be loaded from under"), "{body}");

    // Each example plugin serves as a model: its hooks shape the prompt and the answer.
    let (status, body) = chat(&router, "intent", user("please freeze my card"), 6).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let label = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(tessera_plugin_intent::LABELS.contains(&label), "{label}");
    assert!(body["system_fingerprint"].as_str().unwrap().starts_with("intent 1.0.0+build.0"));
    let (status, body) = chat(&router, "arithmetic", user("What is 1234 * 56?"), 8).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "1234 * 56 = 69104", "checked by computing it");
    let (status, body) = chat(
        &router,
        "extraction",
        json!([{"role": "system", "content": "fields: person, date"}, {"role": "user", "content": "Ada wrote it in 1843."}]),
        12,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let object: Value = serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    let mut keys: Vec<&String> = object.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["date", "person"], "exactly the requested fields");

    // Adapters embedded in a library and shipped beside it are registered and mixed at the
    // plugin's scales.
    for adapter in ["embedded-q", "shipped-q"] {
        let (status, info) = call(&router, "GET", &format!("/v1/adapters/{adapter}"), None).await;
        assert_eq!((status, info["rank"].as_u64()), (StatusCode::OK, Some(2)), "{info}");
    }
    let req = Request::post("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"model": "embedded", "messages": user("hi"), "max_tokens": 3}).to_string()))
        .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let leased = response.headers()["x-tessera-adapter-generations"].to_str().unwrap().to_string();
    assert!(leased.contains("embedded-q@") && leased.contains("shipped-q@"), "{leased}");

    // Domain records become pairs through the plugin's converter; a bad one names its index.
    let records = [json!({"text": "what's my balance", "intent": "balance"}), json!({"text": "hi", "intent": "weather"})];
    let body = records.iter().map(Value::to_string).collect::<Vec<_>>().join("\n");
    let req = Request::post("/v1/adapters/intent/feedback").body(Body::from(body)).unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let error: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(error["error"]["param"], "records[1]", "{error}");
    let req = Request::post("/v1/adapters/intent/feedback").body(Body::from(records[0].to_string())).unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let receipt: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!((receipt["adapter"].as_str(), receipt["stored"].as_u64()), (Some("intent"), Some(1)), "{receipt}");
    let (_, pairs) = call(&router, "GET", "/v1/adapters/intent/feedback", None).await;
    assert_eq!(pairs["data"][0]["messages"][1]["content"], "balance");

    // A panicking plugin: an OpenAI-shaped error, the plugin marked failed, the rest serving.
    let (status, body) = chat(&router, "panicky", user("hello"), 4).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"]["code"], "plugin_failed");
    assert!(body["error"]["message"].as_str().unwrap().contains("deliberate panic in rewrite_request"), "{body}");
    let (_, list) = call(&router, "GET", "/v1/plugins", None).await;
    assert_eq!(plugin(&list, "panicky")["status"], "failed");
    let (status, body) = chat(&router, "panicky", user("hello"), 4).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::BAD_GATEWAY, Some("plugin_failed")));
    // Garbage output: the same containment.
    let (status, body) = chat(&router, "garbage", user("hello"), 4).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("returned garbage from rewrite_request"), "{body}");
    let (_, list) = call(&router, "GET", "/v1/plugins", None).await;
    assert_eq!(plugin(&list, "garbage")["status"], "failed");
    assert_eq!(chat(&router, "arithmetic", user("2 + 2"), 4).await.0, StatusCode::OK);
    assert_eq!(chat(&router, "tiny", user("hello"), 4).await.0, StatusCode::OK);

    // A rebuilt library reloads while requests run: those admitted before finish on the old
    // generation, new ones get the new build.
    let rebuilt = build_plugins(&["tessera-plugin-intent"], &[("TESSERA_PLUGIN_BUILD", "2")]);
    copy_plugin(&rebuilt, "tessera-plugin-intent", &plugins_dir);
    let in_flight: Vec<_> = (0..6)
        .map(|i| {
            let router = router.clone();
            tokio::spawn(async move {
                // The request's own shape replaces the plugin's label list, which would end the
                // answer within a few tokens.
                let body = json!({"model": "intent", "messages": user(&format!("move money to savings {i}")),
                    "max_tokens": 300, "temperature": 0, "ignore_eos": true, "stream": true, "guided_regex": "[a-z_ ]+"});
                let req = Request::post("/v1/chat/completions")
                    .header(header::CONTENT_TYPE, "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap();
                let response = router.oneshot(req).await.unwrap();
                let status = response.status();
                let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
                (status, String::from_utf8(bytes.to_vec()).unwrap(), Instant::now())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (status, reloaded) = call(&router, "POST", "/v1/plugins/intent/reload", None).await;
    let reloaded_at = Instant::now();
    assert_eq!(status, StatusCode::OK, "{reloaded}");
    assert!(reloaded["version"].as_str().unwrap().ends_with("build.2"), "{reloaded}");
    let mut old_after_reload = 0;
    for task in in_flight {
        let (status, stream, finished) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{stream}");
        assert!(stream.trim_end().ends_with("data: [DONE]"), "{stream}");
        if finished > reloaded_at && stream.contains("\"system_fingerprint\":\"intent 1.0.0+build.0") {
            old_after_reload += 1;
        }
    }
    assert!(old_after_reload > 0, "no request admitted before the reload was still running after it");
    let (_, body) = chat(&router, "intent", user("what's my balance"), 4).await;
    assert!(body["system_fingerprint"].as_str().unwrap().starts_with("intent 1.0.0+build.2"), "{body}");

    let (status, _) = call(&router, "POST", "/v1/plugins/intent/unload", None).await;
    assert_eq!(status, StatusCode::OK);

    // With an allow-list, only the listed digests load.
    let intent_file = plugins_dir.join(library_file("tessera-plugin-intent"));
    let digest = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(std::fs::read(&intent_file).unwrap()));
    let other = tempfile::tempdir().unwrap();
    let other_plugins = other.path().join("plugins");
    std::fs::create_dir_all(&other_plugins).unwrap();
    for package in ["tessera-plugin-intent", "tessera-plugin-arithmetic"] {
        std::fs::copy(plugins_dir.join(library_file(package)), other_plugins.join(library_file(package))).unwrap();
    }
    let strict = tessera::api::router(start_app(other.path(), Some(vec![digest])));
    let (_, list) = call(&strict, "GET", "/v1/plugins", None).await;
    assert_eq!(plugin(&list, "intent")["status"], "ready", "{list}");
    let refused = plugin(&list, "tessera_plugin_arithmetic");
    assert!(refused["error"].as_str().unwrap().contains("not in the allow-list"), "{refused}");
    let (status, _) = call(&router, "POST", "/v1/plugins/arithmetic/unload", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = chat(&router, "nope", user("x"), 2).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_answer_shapes_are_decoded_onto_and_keep_feedback_in_shape_and_abi_1_plugins_still_load() {
    let packages = ["tessera-plugin-test-shaped", "tessera-plugin-test-abi-v1", "tessera-plugin-extraction", "tessera-plugin-arithmetic"];
    let profile_dir = build_plugins(&packages, &[]);
    let dir = tempfile::tempdir().unwrap();
    let plugins_dir = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins_dir).unwrap();
    for package in packages {
        copy_plugin(&profile_dir, package, &plugins_dir);
    }
    let router = tessera::api::router(start_app(dir.path(), None));
    let (_, list) = call(&router, "GET", "/v1/plugins", None).await;
    for name in ["shaped", "old", "extraction", "arithmetic"] {
        assert_eq!(plugin(&list, name)["status"], "ready", "{list}");
    }

    // The tiny random model never says yes or no by itself; the shaped plugin never repairs.
    for i in 0..6 {
        let (status, body) = call(&router, "POST", "/v1/chat/completions", Some(json!({
            "model": "shaped", "messages": user(&format!("is {i} even?")), "max_tokens": 8, "temperature": 1.0, "seed": i,
        }))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let answer = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(answer == "yes" || answer == "no", "{answer}");
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
    }
    // A version-1 plugin serves, unconstrained.
    let (status, body) = chat(&router, "old", user("hello"), 4).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    // A request's narrowed shape (here, the problem as asked, then an integer) compiles and serves.
    let (status, body) = chat(&router, "arithmetic", user("What is 12 + 30?"), 20).await;
    assert_eq!((status, body["choices"][0]["message"]["content"].as_str()), (StatusCode::OK, Some("12 + 30 = 42")), "{body}");

    // Feedback keeps the shape: through the plugin's converter and straight to its adapter.
    let (status, body) = call(&router, "POST", "/v1/adapters/shaped/feedback", Some(json!([
        {"text": "is the sky blue?", "answer": "yes"}, {"text": "is ice hot?", "answer": "maybe"},
    ]))).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("records[1]")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("does not have the shape the plugin `shaped` declares"), "{body}");
    let pair = |answer: &str| json!({"messages": [{"role": "user", "content": "is ice cold?"}, {"role": "assistant", "content": answer}]});
    let (status, body) = call(&router, "POST", "/v1/adapters/shaped-answers/feedback", Some(json!([pair("yes"), pair("no"), pair("Yes.")]))).await;
    assert_eq!((status, body["error"]["param"].as_str()), (StatusCode::BAD_REQUEST, Some("records[2]")), "{body}");
    let (_, pairs) = call(&router, "GET", "/v1/adapters/shaped-answers/feedback", None).await;
    assert_eq!(pairs["data"].as_array().map(Vec::len), Some(0), "a refused upload stores nothing: {pairs}");
    let (status, body) = call(&router, "POST", "/v1/adapters/shaped-answers/feedback", Some(json!([pair("yes"), pair("no")]))).await;
    assert_eq!((status, body["stored"].as_u64()), (StatusCode::OK, Some(2)), "{body}");
    let (status, body) = call(&router, "POST", "/v1/adapters/extraction/feedback", Some(json!({"text": "Ada in 1843", "fields": {"person": "Ada", "date": 1843}}))).await;
    assert_eq!(status, StatusCode::OK, "the converter's repaired object has the shape: {body}");
}
