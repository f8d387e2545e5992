//! Shared helpers for the tests against `../shared/testdata/gemma-3-270m`: where the reference
//! files are, and the real default model (fetched on first use, loaded once per test binary).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use tessera::generate::prefill;
use tessera::model::decoder::SequenceChunk;
use tessera::model::{KvCache, LogitsFor};
use tessera::sampler::log_softmax_at;
use tessera::LoadedModel;
use tessera_adapters::AdapterMix;

pub fn testdata_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/testdata/gemma-3-270m");
    assert!(
        dir.is_dir(),
        "reference data not found at {} (the shared/ folder must sit beside the checkout)",
        dir.display()
    );
    dir
}

pub fn read_json<T: for<'de> Deserialize<'de>>(file: &str) -> T {
    let path = testdata_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The default model, fetched if missing. Tests never skip it.
pub fn real_model() -> &'static Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = tessera::model_store::ensure_default_model()
            .unwrap_or_else(|e| panic!("fetching the default model: {e}"));
        Arc::new(LoadedModel::load(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display())))
    })
}

/// The model id the real-model servers answer to.
pub const REAL_MODEL_ID: &str = "gemma-3-270m-q4_k_m";

/// An in-process server on the real model, with the reference adapters registered when asked.
pub fn real_app(ctx_len: usize, with_adapters: bool) -> axum::Router {
    real_app_with(ctx_len, with_adapters, None, None)
}

/// `real_app`, with online tuning and plugins when given.
pub fn real_app_with(
    ctx_len: usize,
    with_adapters: bool,
    tuning: Option<tessera::api::TuningConfig>,
    plugins: Option<tessera::api::PluginsConfig>,
) -> axum::Router {
    let adapters_dir = with_adapters.then(|| testdata_dir().join("adapters"));
    app_on(real_model().clone(), REAL_MODEL_ID, ctx_len, adapters_dir, tuning, plugins)
}

/// An in-process server on `model`, answering to `model_id`, with registered adapters, online
/// tuning and plugins when given.
pub fn app_on(
    model: Arc<LoadedModel>,
    model_id: &str,
    ctx_len: usize,
    adapters_dir: Option<PathBuf>,
    tuning: Option<tessera::api::TuningConfig>,
    plugins: Option<tessera::api::PluginsConfig>,
) -> axum::Router {
    let app = tessera::api::App::start(
        model,
        model_id.into(),
        tessera::api::ApiSettings {
            ctx_len,
            keys: Default::default(),
            request_timeout: std::time::Duration::from_secs(300),
            max_body_bytes: 1 << 20,
            adapters_dir,
            adapter_roots: Vec::new(),
            max_adapter_memory: None,
            tuning,
            plugins,
        },
        tessera::engine::EngineConfig {
            ctx_len,
            ..tessera::engine::EngineConfig::default()
        },
    )
    .unwrap();
    tessera::api::router(app)
}

#[derive(Debug, Deserialize)]
pub struct TokenizerCases {
    pub cases: Vec<TokenizerCase>,
}

#[derive(Debug, Deserialize)]
pub struct TokenizerCase {
    pub text: String,
    pub ids: Vec<u32>,
    pub ids_with_bos_and_special: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct GenerationCases {
    pub cases: Vec<GenerationCase>,
}

#[derive(Debug, Deserialize)]
pub struct GenerationCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy: Vec<u32>,
    pub text: String,
    pub steps: Vec<Step>,
    /// LoRA cases only: adapter name → composition scale.
    #[serde(default)]
    pub adapters: std::collections::BTreeMap<String, f32>,
}

#[derive(Debug, Deserialize)]
pub struct Step {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl Step {
    /// How far the reference's best token leads its second best, in nats.
    pub fn margin(&self) -> f32 {
        self.top[0].1 - self.top[1].1
    }
}

/// Teacher-forced along the reference tokens: |our logprob − the reference's| of each step's
/// reference token.
pub fn teacher_forced_errors(case: &GenerationCase, adapters: &AdapterMix) -> Vec<f32> {
    teacher_forced_errors_on(&real_model().model, &case.prompt_ids, &case.steps, adapters)
}

/// [`teacher_forced_errors`] on any model, for a prompt and the reference's steps.
pub fn teacher_forced_errors_on(model: &tessera::Decoder, prompt_ids: &[u32], steps: &[Step], adapters: &AdapterMix) -> Vec<f32> {
    let greedy: Vec<u32> = steps.iter().map(|s| s.token).collect();
    let n = greedy.len();
    let mut cache = KvCache::new(model.config(), prompt_ids.len() + n).unwrap();
    // Step 0 scores the prompt; steps 1.. score each reference token after its predecessors.
    let first = prefill(model, &mut cache, prompt_ids, adapters).unwrap();
    let rest = model
        .forward(&mut [SequenceChunk {
            tokens: &greedy[..n - 1],
            cache: &mut cache,
            logits: LogitsFor::All,
            adapters,
        }])
        .unwrap();
    (0..n)
        .map(|i| {
            let logits = if i == 0 { &first[..] } else { rest.row(0, i - 1) };
            (log_softmax_at(logits, [steps[i].token])[0] - steps[i].logprob).abs()
        })
        .collect()
}

/// POSTs a completion to an in-process router and returns its first choice.
pub async fn first_choice(router: &axum::Router, body: serde_json::Value) -> serde_json::Value {
    use tower::ServiceExt;
    let req = axum::http::Request::post("/v1/completions")
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), axum::http::StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["choices"][0].clone()
}

/// Builds the workspace's plugin libraries (`cargo build --release -p …`, with `env` set) into
/// the target directory these tests run from, and returns that profile directory.
pub fn build_plugins(packages: &[&str], env: &[(&str, &str)]) -> PathBuf {
    // The test binary lives in <target>/release/deps.
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("<target>/release").to_path_buf();
    let target_dir = profile_dir.parent().expect("<target>").to_path_buf();
    let mut command = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "--release", "--quiet"])
        .env("CARGO_TARGET_DIR", &target_dir);
    for package in packages {
        command.args(["-p", package]);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let status = command.status().expect("running cargo build for the plugins");
    assert!(status.success(), "building the plugins failed");
    profile_dir
}

/// The file name cargo gives a cdylib package's library on this platform.
/// Builds `packages` and copies their libraries into `<dir>/plugins`, which it returns.
pub fn install_plugins(packages: &[&str], dir: &std::path::Path) -> PathBuf {
    let profile_dir = build_plugins(packages, &[]);
    let plugins_dir = dir.join("plugins");
    std::fs::create_dir_all(&plugins_dir).expect("creating the plugins directory");
    for package in packages {
        let file = library_file(package);
        std::fs::copy(profile_dir.join(&file), plugins_dir.join(&file)).unwrap_or_else(|e| panic!("copying {file}: {e}"));
    }
    plugins_dir
}

pub fn library_file(package: &str) -> String {
    format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        package.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    )
}

/// One request to an in-process router: the status and the JSON body (`Null` if not JSON).
pub async fn http(
    router: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<String>,
) -> (axum::http::StatusCode, serde_json::Value) {
    use tower::ServiceExt;
    let request = axum::http::Request::builder().method(method).uri(uri);
    let request = match body {
        Some(b) => request
            .header(axum::http::header::CONTENT_TYPE, "application/json")
            .body(axum::body::Body::from(b)),
        None => request.body(axum::body::Body::empty()),
    }
    .expect("a well-formed request");
    let response = router.clone().oneshot(request).await.expect("the router answers");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("the body");
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

/// CLINC150 utterances as (text, intent), from `../shared/data/clinc150/{file}`.
pub fn clinc(file: &str) -> Vec<(String, String)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/clinc150").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let field = |key: &str| v[key].as_str().unwrap_or_else(|| panic!("{}: no `{key}`", path.display())).to_string();
            (field("text"), field("intent"))
        })
        .collect()
}

/// Polls a fine-tuning job until it ends (at most `limit`), returning its last state.
pub async fn wait_for_job(router: &axum::Router, job: &str, limit: std::time::Duration) -> serde_json::Value {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let (_, state) = http(router, "GET", &format!("/v1/fine_tuning/jobs/{job}"), None).await;
        if matches!(state["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
            return state;
        }
        assert!(std::time::Instant::now() < deadline, "the job did not end within {limit:?}: {state}");
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// The share of `cases` (user message, expected answer) that `model` answers exactly (greedy,
/// trimmed), sent as many at a time as the engine runs together so none overflows its queue.
pub async fn chat_accuracy(router: &axum::Router, model: &str, cases: &[(String, String)]) -> f64 {
    use futures::stream::{self, StreamExt};
    let answers: Vec<_> = stream::iter(cases.iter().map(|(message, _)| {
        let body = serde_json::json!({"model": model, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": message}]});
        http(router, "POST", "/v1/chat/completions", Some(body.to_string()))
    }))
    .buffered(16)
    .collect()
    .await;
    let correct = answers
        .iter()
        .zip(cases)
        .filter(|((status, body), (_, expected))| {
            assert_eq!(*status, axum::http::StatusCode::OK, "{body}");
            body["choices"][0]["message"]["content"].as_str().map(str::trim) == Some(expected.as_str())
        })
        .count();
    correct as f64 / cases.len() as f64
}
