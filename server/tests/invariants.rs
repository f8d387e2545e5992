//! The invariants a careless or hostile client must not break, each probed the way it was found
//! broken: concurrent jobs and first uploads on one adapter, archive bombs, unchecked numbers,
//! and keys used beyond their scope. Runs on the tiny synthetic model.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tessera::api::auth::{Keys, Scope};
use tessera::api::{router, ApiSettings, App, TuningConfig};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::tiny_gemma3;
use tessera::train::job::{Hyperparameters, TuningSettings};
use tessera::LoadedModel;
use tower::ServiceExt;

struct Fixture {
    dir: tempfile::TempDir,
    router: Router,
}

const BODY_LIMIT: usize = 1 << 20;

/// An inference key `user`, a tune key `tuner` and an admin key `root`.
fn three_keys() -> Keys {
    Keys::default()
        .with_key(Scope::Inference, Some("user"))
        .with_key(Scope::Tune, Some("tuner"))
        .with_key(Scope::Admin, Some("root"))
}

fn fixture(keys: Keys, train_after: usize) -> Fixture {
    fixture_in(tempfile::tempdir().unwrap(), keys, train_after)
}

fn fixture_in(dir: tempfile::TempDir, keys: Keys, train_after: usize) -> Fixture {
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&path).unwrap();
    let model = Arc::new(LoadedModel::load(&path).unwrap());
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    let settings = ApiSettings {
        ctx_len: 128,
        keys,
        request_timeout: Duration::from_secs(60),
        max_body_bytes: BODY_LIMIT,
        adapters_dir: Some(dir.path().join("adapters")),
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        plugins: None,
        tuning: Some(TuningConfig {
            root: dir.path().join("tuning"),
            state: None, blobs: None,
            settings: TuningSettings {
                train_after,
                // Jobs last long enough that a racing request meets them active.
                defaults: Hyperparameters { n_epochs: 200, batch_size: 4, learning_rate: 1e-3, ..Default::default() },
                ..Default::default()
            },
        }),
    };
    let engine = EngineConfig { ctx_len: 128, max_running_seqs: 4, max_queue: 16, prefill_tokens_per_step: 64, ..EngineConfig::default() };
    let app = App::start(model, "tiny".into(), settings, engine).unwrap();
    Fixture { dir, router: router(app) }
}

async fn call(router: &Router, method: &str, uri: &str, key: Option<&str>, body: Option<(&str, Vec<u8>)>) -> (StatusCode, Value) {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = match body {
        Some((content_type, bytes)) => request.header(header::CONTENT_TYPE, content_type).body(Body::from(bytes)),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn pairs(tag: &str, n: usize) -> (&'static str, Vec<u8>) {
    let records: Vec<Value> = (0..n).map(|i| json!({"instruction": format!("{tag} item {i}"), "input": "", "output": "the hat"})).collect();
    ("application/json", Value::Array(records).to_string().into_bytes())
}

async fn cancel_all(router: &Router) {
    let (_, jobs) = call(router, "GET", "/v1/fine_tuning/jobs?limit=100", None, None).await;
    for job in jobs["data"].as_array().unwrap() {
        if matches!(job["status"].as_str(), Some("queued" | "running" | "validating_files")) {
            call(router, "POST", &format!("/v1/fine_tuning/jobs/{}/cancel", job["id"].as_str().unwrap()), None, None).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_simultaneous_train_calls_start_one_job() {
    let f = fixture(Keys::default(), 100_000);
    for trial in 0..20 {
        let adapter = format!("race{trial}");
        let (status, body) = call(&f.router, "POST", &format!("/v1/adapters/{adapter}/feedback?rank=2"), None, Some(pairs(&adapter, 4))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let uri = format!("/v1/adapters/{adapter}/train");
        let train = || call(&f.router, "POST", &uri, None, Some(("application/json", b"{}".to_vec())));
        let ((a, body_a), (b, body_b)) = tokio::join!(train(), train());
        let mut statuses = [a, b];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT], "trial {trial}: {body_a} {body_b}");
        let (winner, loser) = if a == StatusCode::OK { (body_a, body_b) } else { (body_b, body_a) };
        let job = winner["id"].as_str().unwrap();
        assert!(loser["error"]["message"].as_str().unwrap().contains(job), "the 409 names the running job: {loser}");
        cancel_all(&f.router).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_uploads_crossing_train_after_start_one_job() {
    let f = fixture(Keys::default(), 4);
    for trial in 0..20 {
        let adapter = format!("cross{trial}");
        let (status, _) = call(&f.router, "POST", &format!("/v1/adapters/{adapter}/feedback?rank=2"), None, Some(pairs(&format!("{adapter}-seed"), 1))).await;
        assert_eq!(status, StatusCode::OK);
        let upload = |tag: String| {
            let router = f.router.clone();
            let uri = format!("/v1/adapters/{adapter}/feedback");
            async move { call(&router, "POST", &uri, None, Some(pairs(&tag, 4))).await }
        };
        let ((a, body_a), (b, body_b)) = tokio::join!(upload(format!("{adapter}-a")), upload(format!("{adapter}-b")));
        assert_eq!((a, b), (StatusCode::OK, StatusCode::OK), "{body_a} {body_b}");
        let started = [&body_a, &body_b].iter().filter(|b| b["job"].is_string()).count();
        assert_eq!(started, 1, "trial {trial}: exactly one upload starts a job: {body_a} {body_b}");
        cancel_all(&f.router).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_simultaneous_first_uploads_create_the_adapter_once() {
    let f = fixture(Keys::default(), 100_000);
    for trial in 0..20 {
        let adapter = format!("first{trial}");
        let upload = |tag: String| {
            let router = f.router.clone();
            let uri = format!("/v1/adapters/{adapter}/feedback?rank=2");
            async move { call(&router, "POST", &uri, None, Some(pairs(&tag, 3))).await }
        };
        let ((a, body_a), (b, body_b)) = tokio::join!(upload(format!("{adapter}-a")), upload(format!("{adapter}-b")));
        assert_eq!((a, b), (StatusCode::OK, StatusCode::OK), "trial {trial}: {body_a} {body_b}");
        let (_, info) = call(&f.router, "GET", &format!("/v1/adapters/{adapter}"), None, None).await;
        assert_eq!((info["version"].as_u64(), info["pairs"].as_u64()), (Some(0), Some(6)), "{info}");
    }
}

#[tokio::test]
async fn numbers_out_of_range_are_refused_and_leave_nothing_behind() {
    let f = fixture(Keys::default(), 100_000);
    for (query, param) in [("alpha=NaN", "alpha"), ("alpha=inf", "alpha"), ("alpha=0", "alpha"), ("alpha=-1", "alpha"), ("alpha=2000", "alpha"), ("rank=0", "rank"), ("rank=300", "rank")] {
        let (status, err) = call(&f.router, "POST", &format!("/v1/adapters/bad/feedback?{query}"), None, Some(pairs("x", 1))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {err}");
        assert_eq!(err["error"]["param"], param, "{query}: {err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(!message.contains(f.dir.path().to_str().unwrap()), "{query}: the message shows a server path: {message}");
        assert!(!f.dir.path().join("tuning/adapters/bad").exists(), "{query} left files behind");
    }
}

fn zip_of(members: &[(&str, &[u8])], repeat_first: usize) -> Vec<u8> {
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in members {
        out.start_file(*name, options).unwrap();
        for _ in 0..repeat_first.max(1) {
            out.write_all(data).unwrap();
        }
    }
    out.finish().unwrap().into_inner()
}

fn multipart(name: &str, archive: Vec<u8>) -> (&'static str, Vec<u8>) {
    let boundary = "invariants-boundary";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n").into_bytes();
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"archive\"; filename=\"a.zip\"\r\n\r\n").as_bytes());
    body.extend_from_slice(&archive);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    ("multipart/form-data; boundary=invariants-boundary", body)
}

#[tokio::test]
async fn archive_bombs_are_refused_before_they_are_unpacked() {
    let f = fixture(Keys::default(), 100_000);
    // 64 MiB of zeros deflate to about 64 KiB: far past the 1 MiB body limit once unpacked.
    let bomb = zip_of(&[("adapter_model.safetensors", &[0u8; 1 << 20])], 64);
    assert!(bomb.len() < BODY_LIMIT / 4, "the bomb itself is small: {}", bomb.len());
    let (status, err) = call(&f.router, "POST", "/v1/adapters", None, Some(multipart("bomb", bomb))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["param"], "archive");
    assert!(err["error"]["message"].as_str().unwrap().contains("unpacks to more bytes than the request body limit"), "{err}");

    let names: Vec<String> = (0..65).map(|i| format!("f{i}")).collect();
    let many: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
    let (status, err) = call(&f.router, "POST", "/v1/adapters", None, Some(multipart("many", zip_of(&many, 1)))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("more than 64"), "{err}");
}

#[tokio::test]
async fn an_uploaded_adapter_with_an_absurd_alpha_is_refused() {
    let f = fixture(Keys::default(), 100_000);
    let config = br#"{"peft_type":"LORA","r":2,"lora_alpha":1e30,"target_modules":["q_proj"]}"#;
    let archive = zip_of(&[("adapter_config.json", config), ("adapter_model.safetensors", b"{}")], 1);
    let (status, err) = call(&f.router, "POST", "/v1/adapters", None, Some(multipart("loud", archive))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("lora_alpha"), "{err}");
}

#[tokio::test]
async fn keys_open_their_scope_only_whatever_the_path() {
    let f = fixture(three_keys(), 100_000);
    let r = &f.router;
    // An adapter named like a feedback route is still an admin resource.
    let (status, _) = call(r, "POST", "/v1/adapters/feedback/feedback?rank=2", Some("root"), Some(pairs("f", 2))).await;
    assert_eq!(status, StatusCode::OK);
    for (method, uri) in [("GET", "/v1/adapters/feedback"), ("DELETE", "/v1/adapters/feedback"), ("GET", "/metrics")] {
        for key in ["user", "tuner"] {
            let (status, err) = call(r, method, uri, Some(key), None).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{method} {uri} with {key}: {err}");
            assert_eq!(err["error"]["code"], "admin_key_required");
        }
    }
    // Feedback, training and jobs need the tune scope; inference keys are refused.
    let (status, err) = call(r, "POST", "/v1/adapters/mine/feedback?rank=2", Some("user"), Some(pairs("m", 2))).await;
    assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("tune_key_required")), "{err}");
    let (status, _) = call(r, "POST", "/v1/fine_tuning/jobs/ftjob-x/cancel", Some("user"), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(r, "POST", "/v1/adapters/mine/feedback?rank=2", Some("tuner"), Some(pairs("m", 2))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Inference works with every key; the scheme's case does not matter.
    let chat = json!({"model": "tiny", "prompt": "a", "max_tokens": 1, "temperature": 0}).to_string().into_bytes();
    for auth in ["Bearer user", "bearer tuner", "BEARER root"] {
        let request = Request::post("/v1/completions")
            .header(header::AUTHORIZATION, auth)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(chat.clone()))
            .unwrap();
        assert_eq!(r.clone().oneshot(request).await.unwrap().status(), StatusCode::OK, "{auth}");
    }
}

#[tokio::test]
async fn the_startup_scan_serves_nothing_from_outside_the_adapter_roots() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("elsewhere/evil");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("adapter_config.json"), r#"{"r":2,"lora_alpha":4,"target_modules":["q_proj"]}"#).unwrap();
    std::fs::create_dir_all(dir.path().join("adapters")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.path().join("adapters/evil")).unwrap();
    let f = fixture_in(dir, Keys::default(), 100_000);
    let (status, _) = call(&f.router, "GET", "/v1/adapters/evil", None, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a link out of the adapters directory is not served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_keys_tune_their_own_adapters_and_cancel_their_own_jobs() {
    let f = fixture(three_keys(), 100_000);
    let r = &f.router;
    // The admin's adapter: neither feedback, nor its pairs, nor training for the tune key.
    let (status, _) = call(r, "POST", "/v1/adapters/house/feedback?rank=2", Some("root"), Some(pairs("h", 3))).await;
    assert_eq!(status, StatusCode::OK);
    for (method, uri, body) in [
        ("POST", "/v1/adapters/house/feedback", Some(pairs("t", 1))),
        ("GET", "/v1/adapters/house/feedback", None),
        ("DELETE", "/v1/adapters/house/feedback", None),
        ("POST", "/v1/adapters/house/train", Some(("application/json", b"{}".to_vec()))),
        ("GET", "/v1/adapters/house/download?format=gguf", None),
    ] {
        let (status, err) = call(r, method, uri, Some("tuner"), body).await;
        assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("not_owner")), "{method} {uri}: {err}");
    }
    let (_, info) = call(r, "GET", "/v1/adapters/house", Some("root"), None).await;
    assert_eq!((info["pairs"].as_u64(), info["created_by"].as_str()), (Some(3), Some("admin")), "{info}");

    // The admin's job is the admin's to cancel.
    let (status, job) = call(r, "POST", "/v1/adapters/house/train", Some("root"), Some(("application/json", b"{}".to_vec()))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let cancel = format!("/v1/fine_tuning/jobs/{}/cancel", job["id"].as_str().unwrap());
    let (status, err) = call(r, "POST", &cancel, Some("tuner"), None).await;
    assert_eq!((status, err["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("not_owner")), "{err}");
    let (status, _) = call(r, "POST", &cancel, Some("root"), None).await;
    assert_eq!(status, StatusCode::OK);

    // Opened by the admin, it takes the tune key's feedback; the tune key's own job is its own.
    let (status, info) = call(r, "PUT", "/v1/adapters/house/tuning", Some("root"), Some(("application/json", br#"{"open": true}"#.to_vec()))).await;
    assert_eq!((status, info["open_to_tuning"].as_bool()), (StatusCode::OK, Some(true)), "{info}");
    let (status, _) = call(r, "PUT", "/v1/adapters/house/tuning", Some("tuner"), Some(("application/json", br#"{"open": false}"#.to_vec()))).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "opening and closing is the admin's");
    let (status, body) = call(r, "POST", "/v1/adapters/house/feedback", Some("tuner"), Some(pairs("t", 2))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, job) = call(r, "POST", "/v1/adapters/house/train", Some("tuner"), Some(("application/json", b"{}".to_vec()))).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let (status, _) = call(r, "POST", &format!("/v1/fine_tuning/jobs/{}/cancel", job["id"].as_str().unwrap()), Some("tuner"), None).await;
    assert_eq!(status, StatusCode::OK);

    // An adapter the admin uploaded stays the admin's: the tune key cannot adopt it.
    let (status, _) = call(r, "POST", "/v1/adapters/house-copy/feedback?rank=2", Some("tuner"), Some(pairs("c", 1))).await;
    assert_eq!(status, StatusCode::OK, "a new name is the tune key's to create");
    let (_, info) = call(r, "GET", "/v1/adapters/house-copy", Some("root"), None).await;
    assert_eq!(info["created_by"], "tune");
    // What a tune key may tune, it may take away, in either format and at any version.
    for uri in ["/v1/adapters/house-copy/download?format=gguf&version=0", "/v1/adapters/house/download?format=peft"] {
        let (status, _) = call(r, "GET", uri, Some("tuner"), None).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
    }
    let (status, err) = call(r, "GET", "/v1/adapters/house-copy/download?version=3", Some("tuner"), None).await;
    assert_eq!((status, err["error"]["message"].as_str()), (StatusCode::BAD_REQUEST, Some("`house-copy` has no version 3 (it has 0)")));
}

/// Every route of the spec with every kind of key: each route answers 401 without a valid key
/// and 403 to a key below its scope, and lets every key of its scope or above through. The
/// table is the README's; a route missing from it fails the test.
#[tokio::test]
async fn the_whole_route_and_key_matrix() {
    use std::collections::BTreeSet;
    const PUBLIC: u8 = 0;
    const INFERENCE: u8 = 1;
    const TUNE: u8 = 2;
    const ADMIN: u8 = 3;
    let expected: &[(&str, &str, u8)] = &[
        ("get", "/health", PUBLIC),
        ("get", "/openapi.json", PUBLIC),
        ("get", "/v1/scope", PUBLIC),
        ("post", "/v1/chat/completions", INFERENCE),
        ("post", "/v1/completions", INFERENCE),
        ("post", "/v1/embeddings", INFERENCE),
        ("post", "/v1/responses", INFERENCE),
        ("get", "/v1/responses/{id}", INFERENCE),
        ("delete", "/v1/responses/{id}", INFERENCE),
        ("get", "/v1/models", INFERENCE),
        ("get", "/v1/models/{model}", INFERENCE),
        ("post", "/tokenize", INFERENCE),
        ("post", "/detokenize", INFERENCE),
        ("get", "/v1/adapters/{name}/feedback", TUNE),
        ("post", "/v1/adapters/{name}/feedback", TUNE),
        ("delete", "/v1/adapters/{name}/feedback", TUNE),
        ("get", "/v1/adapters/{name}/preferences", TUNE),
        ("delete", "/v1/adapters/{name}/preferences", TUNE),
        ("post", "/v1/adapters/{name}/train", TUNE),
        ("get", "/v1/adapters/{name}/download", TUNE),
        ("get", "/v1/files", TUNE),
        ("post", "/v1/files", TUNE),
        ("get", "/v1/files/{file_id}", TUNE),
        ("get", "/v1/files/{file_id}/content", TUNE),
        ("get", "/v1/batches", TUNE),
        ("post", "/v1/batches", TUNE),
        ("get", "/v1/batches/{batch_id}", TUNE),
        ("post", "/v1/batches/{batch_id}/cancel", TUNE),
        ("get", "/v1/fine_tuning/jobs", TUNE),
        ("post", "/v1/fine_tuning/jobs", TUNE),
        ("get", "/v1/fine_tuning/jobs/{job_id}", TUNE),
        ("post", "/v1/fine_tuning/jobs/{job_id}/cancel", TUNE),
        ("get", "/v1/fine_tuning/jobs/{job_id}/events", TUNE),
        ("get", "/v1/fine_tuning/jobs/{job_id}/checkpoints", TUNE),
        ("get", "/metrics", ADMIN),
        ("post", "/v1/load_lora_adapter", ADMIN),
        ("post", "/v1/unload_lora_adapter", ADMIN),
        ("get", "/v1/adapters", ADMIN),
        ("post", "/v1/adapters", ADMIN),
        ("get", "/v1/adapters/{name}", ADMIN),
        ("delete", "/v1/adapters/{name}", ADMIN),
        ("post", "/v1/adapters/{name}/rollback", ADMIN),
        ("put", "/v1/adapters/{name}/tuning", ADMIN),
        ("get", "/v1/plugins", ADMIN),
        ("post", "/v1/plugins/load", ADMIN),
        ("post", "/v1/plugins/{name}/reload", ADMIN),
        ("post", "/v1/plugins/{name}/unload", ADMIN),
    ];
    let spec = serde_json::to_value(tessera::api::openapi()).unwrap();
    let mut in_spec = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            in_spec.insert((method.clone(), path.clone()));
        }
    }
    let in_table: BTreeSet<(String, String)> = expected.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    assert_eq!(in_spec, in_table, "every route of the spec has its scope in this table, and no other");

    let f = fixture(three_keys(), 100_000);
    for (method, path, needed) in expected {
        let uri = path
            .replace("{name}", "nobody")
            .replace("{model}", "tiny")
            .replace("{file_id}", "file-none")
            .replace("{job_id}", "ftjob-none")
            .replace("{id}", "resp_none")
            .replace("{batch_id}", "batch-none");
        for (key, held) in [(None, 0), (Some("wrong"), 0), (Some("user"), INFERENCE), (Some("tuner"), TUNE), (Some("root"), ADMIN)] {
            let body = (*method != "get").then(|| ("application/json", b"{}".to_vec()));
            let (status, answer) = call(&f.router, &method.to_uppercase(), &uri, key, body).await;
            let expected_refusal = match (*needed, key) {
                (PUBLIC, _) => None,
                (_, None | Some("wrong")) => Some(StatusCode::UNAUTHORIZED),
                (needed, _) if held < needed => Some(StatusCode::FORBIDDEN),
                _ => None,
            };
            match expected_refusal {
                Some(refusal) => assert_eq!(status, refusal, "{method} {uri} with {key:?}: {answer}"),
                None => assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{method} {uri} with {key:?} was refused: {status} {answer}"
                ),
            }
        }
    }
}
