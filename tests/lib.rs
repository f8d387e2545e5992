//! Shared helpers for the tests: where the test data is (`tests/data/`, carried by the repository),
//! Gemma 3 270M (fetched on first use, loaded once per test binary), and the checks against
//! llama.cpp's reference outputs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use tessera::chat_template::Turn;
use tessera::dataset::Message;
use tessera::generate::{generate, prefill, GenerateParams};
use tessera::model::decoder::SequenceChunk;
use tessera::model::{KvCache, LogitsFor};
use tessera::sampler::{argmax, log_softmax_at, SamplingParams};
use tessera::LoadedModel;
use tessera_adapters::AdapterMix;

/// `tests/data/{folder}`: every file the tests read lives there, so a bare clone runs them.
pub fn data_dir(folder: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data").join(folder);
    assert!(dir.is_dir(), "test data not found at {} (it is part of the repository)", dir.display());
    dir
}

/// The Gemma 3 270M references (llama.cpp's outputs on that model, and the test adapters).
pub fn testdata_dir() -> PathBuf {
    data_dir("gemma-3-270m")
}

/// A JSON file of the Gemma 3 270M references.
pub fn read_json<T: for<'de> Deserialize<'de>>(file: &str) -> T {
    read_json_at(&testdata_dir().join(file))
}

pub fn read_json_at<T: for<'de> Deserialize<'de>>(path: &Path) -> T {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Gemma 3 270M, the model of the fast reference tests, fetched if missing. Tests never skip it.
pub fn real_model() -> &'static Arc<LoadedModel> {
    static MODEL: OnceLock<Arc<LoadedModel>> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = tessera::model_store::ensure_model(&tessera::model_store::catalog::GEMMA_3_270M)
            .unwrap_or_else(|e| panic!("fetching gemma-3-270m: {e}"));
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
    teacher_forced(&real_model().model, &case.prompt_ids, &case.steps, adapters)
        .iter()
        .map(|step| step.error)
        .collect()
}

/// A step of a teacher-forced pass: how far our logprob of the reference's token is from the
/// reference's, and the token we would have picked there.
struct ForcedStep {
    error: f32,
    ours: u32,
}

/// Scores each reference token after the prompt and the reference tokens before it.
fn teacher_forced(model: &tessera::Decoder, prompt_ids: &[u32], steps: &[Step], adapters: &AdapterMix) -> Vec<ForcedStep> {
    let greedy: Vec<u32> = steps.iter().map(|s| s.token).collect();
    let n = greedy.len();
    let mut cache = KvCache::new(model.config(), prompt_ids.len() + n).expect("a KV cache for the case");
    // Step 0 scores the prompt; steps 1.. score each reference token after its predecessors.
    let first = prefill(model, &mut cache, prompt_ids, adapters).expect("prefilling the prompt");
    let rest = model
        .forward(&mut [SequenceChunk {
            tokens: &greedy[..n - 1],
            cache: &mut cache,
            logits: LogitsFor::All,
            adapters,
        }])
        .expect("the forward pass over the reference tokens");
    (0..n)
        .map(|i| {
            let logits = if i == 0 { &first[..] } else { rest.row(0, i - 1) };
            ForcedStep {
                error: (log_softmax_at(logits, [steps[i].token])[0] - steps[i].logprob).abs(),
                ours: argmax(logits),
            }
        })
        .collect()
}

/// Bounds of `data/families/README.md` and `data/real/README.md`, calibrated on an independent
/// f32 forward pass: greedy choices agree, up to the first divergence, wherever the reference's
/// top-1 leads its top-2 by this many nats (the f32 pass flips only below 0.26)…
const REFERENCE_GREEDY_MARGIN: f32 = 0.4;
/// …and teacher-forced, the reference token's logprob is this close at every step…
const REFERENCE_MAX_LOGPROB_ERROR: f32 = 0.8;
/// …and this close on average over a case.
const REFERENCE_MAX_MEAN_LOGPROB_ERROR: f32 = 0.2;

/// llama.cpp's outputs on one model file (`data/families/*.refs.json`, `data/real/*.refs.json`;
/// the fields are described in `data/families/README.md`).
#[derive(Debug, Deserialize)]
pub struct LlamaCppReferences {
    pub meta: ReferenceMeta,
    pub tokenizer: Vec<TokenizerCase>,
    pub generation: Vec<GenerationCase>,
    pub chat: Vec<ChatCase>,
}

#[derive(Debug, Deserialize)]
pub struct ReferenceMeta {
    /// The file the references were made from.
    pub model_sha256: String,
    /// End-of-generation tokens that llama.cpp masked (it ran with `ignore_eos`), where the file
    /// lists them.
    #[serde(default)]
    pub eog: Vec<u32>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCase {
    pub messages: Vec<Message>,
    pub add_generation_prompt: bool,
    pub prompt_text: String,
    pub prompt_ids: Vec<u32>,
    pub steps: Vec<Step>,
}

impl LlamaCppReferences {
    pub fn load(path: &Path) -> Self {
        read_json_at(path)
    }

    /// Every (label, prompt ids, reference steps) of the file: its generations and its chat cases.
    fn scored_cases(&self) -> Vec<(String, &[u32], &[Step])> {
        let generations = self.generation.iter().map(|c| (format!("{:?}", c.prompt), &c.prompt_ids[..], &c.steps[..]));
        let chats = self.chat.iter().map(|c| (format!("chat {:?}", c.prompt_text), &c.prompt_ids[..], &c.steps[..]));
        generations.chain(chats).collect()
    }

    /// How many of our picks have a counterpart in the reference: llama.cpp masked the
    /// end-of-generation tokens, so from the first one we pick on, it went elsewhere.
    fn comparable(&self, ours: impl IntoIterator<Item = u32>) -> usize {
        ours.into_iter().take_while(|token| !self.meta.eog.contains(token)).count()
    }

    /// The tokenizer cases, and the generation prompts, tokenize exactly as llama.cpp's did.
    pub fn check_tokenizer(&self, name: &str, model: &LoadedModel) {
        let encode = |text: &str, bos: bool, special: bool| {
            model.tokenizer.encode(text, bos, special).unwrap_or_else(|e| panic!("{name}: encoding {text:?}: {e}"))
        };
        for case in &self.tokenizer {
            assert_eq!(encode(&case.text, false, false), case.ids, "{name}: {:?} without BOS or special tokens", case.text);
            assert_eq!(encode(&case.text, true, true), case.ids_with_bos_and_special, "{name}: {:?} with BOS and special tokens", case.text);
        }
        for case in &self.generation {
            assert_eq!(encode(&case.prompt, true, true), case.prompt_ids, "{name}: prompt {:?}", case.prompt);
        }
        eprintln!("{name}: {} tokenizer cases and {} prompts exact", self.tokenizer.len(), self.generation.len());
    }

    /// Greedy decoding picks llama.cpp's tokens, up to the first divergence, wherever llama.cpp's
    /// choice was decisive.
    pub fn check_greedy(&self, name: &str, model: &LoadedModel) {
        for (label, prompt_ids, steps) in self.scored_cases() {
            let params = GenerateParams {
                max_tokens: steps.len(),
                sampling: SamplingParams::default(),
                top_logprobs: 0,
                stop_ids: Vec::new(),
            };
            let out = generate(&model.model, prompt_ids, &params, &AdapterMix::default(), |_| {})
                .unwrap_or_else(|e| panic!("{name} {label}: generating: {e}"));
            let compared = self.comparable(out.token_ids.iter().copied());
            let first_divergence = out.token_ids[..compared].iter().zip(steps).position(|(ours, step)| *ours != step.token);
            if let Some(i) = first_divergence {
                let margin = steps[i].margin();
                assert!(
                    margin < REFERENCE_GREEDY_MARGIN,
                    "{name} {label}: step {i} chose {} but llama.cpp chose {} with a margin of {margin:.3} (from {REFERENCE_GREEDY_MARGIN} on, choices must agree)",
                    out.token_ids[i],
                    steps[i].token
                );
            }
            let agreement = match first_divergence {
                Some(i) => format!("first divergence at step {i} (margin {:.3})", steps[i].margin()),
                None => format!("{compared} of {} agree", steps.len()),
            };
            let ended = if compared < steps.len() { format!(", then end of generation {}", out.token_ids[compared]) } else { String::new() };
            eprintln!("{name} {label}: {agreement}{ended}");
        }
    }

    /// Teacher-forced along llama.cpp's tokens, the logprob of each is within the bounds at every
    /// step and on average over each case (the steps before we would pick an end of generation).
    pub fn check_teacher_forced(&self, name: &str, model: &LoadedModel) {
        let (mut cases, mut steps_compared, mut total) = (0, 0, 0f32);
        let (mut worst_step, mut worst_case_mean) = (0f32, 0f32);
        for (label, prompt_ids, steps) in self.scored_cases() {
            let forced = teacher_forced(&model.model, prompt_ids, steps, &AdapterMix::default());
            let compared = self.comparable(forced.iter().map(|step| step.ours));
            let errors: Vec<f32> = forced[..compared].iter().map(|step| step.error).collect();
            assert!(!errors.is_empty(), "{name} {label}: we pick an end of generation ({}) at the first step, which llama.cpp masked: nothing to compare", forced[0].ours);
            let max = errors.iter().copied().fold(0f32, f32::max);
            let mean = errors.iter().sum::<f32>() / errors.len() as f32;
            assert!(
                max <= REFERENCE_MAX_LOGPROB_ERROR && mean <= REFERENCE_MAX_MEAN_LOGPROB_ERROR,
                "{name} {label}: max error {max:.3} (limit {REFERENCE_MAX_LOGPROB_ERROR}), mean {mean:.3} (limit {REFERENCE_MAX_MEAN_LOGPROB_ERROR}); per step {errors:?}"
            );
            eprintln!("{name} {label}: {compared} of {} steps, max error {max:.4}, mean {mean:.4}", steps.len());
            cases += 1;
            steps_compared += errors.len();
            total += errors.iter().sum::<f32>();
            worst_step = worst_step.max(max);
            worst_case_mean = worst_case_mean.max(mean);
        }
        let mean = total / steps_compared as f32;
        eprintln!("{name}: {cases} cases, {steps_compared} steps: worst step {worst_step:.4}, worst case mean {worst_case_mean:.4}, mean {mean:.4}");
    }

    /// The model's own chat template renders each conversation as llama.cpp's did, and the text
    /// tokenizes to llama.cpp's ids.
    pub fn check_chat_templates(&self, name: &str, model: &LoadedModel) {
        for case in &self.chat {
            let turns: Vec<Turn> = case.messages.iter().map(|m| Turn { role: &m.role, text: m.content.clone(), ..Default::default() }).collect();
            let text = model
                .chat
                .render(&turns, case.add_generation_prompt)
                .unwrap_or_else(|e| panic!("{name}: rendering {:?}: {e}", case.messages));
            assert_eq!(text, case.prompt_text, "{name}: {:?}", case.messages);
            let ids = model.tokenizer.encode(&text, true, true).unwrap_or_else(|e| panic!("{name}: encoding {text:?}: {e}"));
            assert_eq!(ids, case.prompt_ids, "{name}: {:?}", case.messages);
        }
        eprintln!("{name}: {} chat cases rendered as llama.cpp renders them", self.chat.len());
    }
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

/// CLINC150 utterances as (text, intent), from `data/clinc150/{file}` (the intents the tests use).
pub fn clinc(file: &str) -> Vec<(String, String)> {
    let path = data_dir("clinc150").join(file);
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
