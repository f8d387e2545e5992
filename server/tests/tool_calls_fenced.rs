//! Tool calls written as fenced JSON, the way Qwen2.5-Coder writes them in `auto` mode, through
//! `POST /v1/chat/completions` whole and streamed. The tiny synthetic model writes noise, so each
//! answer is pinned with `guided_choice`.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tessera::api::{router, ApiSettings, App};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::tiny_gemma3;
use tessera::LoadedModel;
use tower::ServiceExt;

const MODEL: &str = "tiny";
/// Room for the tools' fallback prompt.
const CTX_LEN: usize = 1024;

const FENCED_CALL: &str = "I'll check.\n```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n```";

fn tiny_router() -> Router {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&path).expect("the tiny model written");
    let model = Arc::new(LoadedModel::load(&path).expect("the tiny model loaded"));
    let settings = ApiSettings {
        ctx_len: CTX_LEN,
        keys: Default::default(),
        request_timeout: Duration::from_secs(30),
        max_body_bytes: 64 * 1024,
        adapters_dir: None,
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        tuning: None,
        plugins: None,
    };
    let engine = EngineConfig { ctx_len: CTX_LEN, max_running_seqs: 4, max_queue: 16, prefill_tokens_per_step: 64, ..EngineConfig::default() };
    router(App::start(model, MODEL.into(), settings, engine).expect("the app started"))
}

/// A chat offering `get_weather` whose answer can only be `answer`.
fn asking(answer: &str, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": "auto",
        "guided_choice": [answer],
        "max_tokens": 200,
        "temperature": 0,
        "stream": stream,
    })
}

async fn post(router: &Router, body: Value) -> (StatusCode, String) {
    let request = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a request");
    let response = router.clone().oneshot(request).await.expect("a response");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("the body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn completion(router: &Router, answer: &str) -> Value {
    let (status, text) = post(router, asking(answer, false)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).expect("a JSON completion")
}

/// A streamed choice put back together: its content, its calls' names and arguments, and its
/// `finish_reason`.
async fn streamed(router: &Router, answer: &str) -> (String, Vec<(String, String)>, String) {
    let (status, text) = post(router, asking(answer, true)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (mut content, mut calls, mut finish) = (String::new(), Vec::<(String, String)>::new(), String::new());
    for data in text.lines().filter_map(|line| line.strip_prefix("data: ")).filter(|data| *data != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).expect("a JSON chunk");
        let choice = &chunk["choices"][0];
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        for delta in choice["delta"]["tool_calls"].as_array().into_iter().flatten() {
            let index = delta["index"].as_u64().expect("a call index") as usize;
            if let Some(name) = delta["function"]["name"].as_str() {
                assert_eq!(index, calls.len(), "{text}");
                assert!(delta["id"].as_str().is_some_and(|id| id.starts_with("call_")), "{text}");
                calls.push((name.to_string(), String::new()));
            }
            calls[index].1.push_str(delta["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (content, calls, finish)
}

#[tokio::test]
async fn a_fenced_call_to_an_offered_tool_is_a_tool_call() {
    let r = tiny_router();
    let answer = completion(&r, FENCED_CALL).await;
    let choice = &answer["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{answer}");
    assert_eq!(choice["message"]["content"], "I'll check.", "{answer}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!((call["type"].as_str(), call["function"]["name"].as_str()), (Some("function"), Some("get_weather")), "{answer}");
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("")).expect("JSON arguments");
    assert_eq!(arguments, json!({"city": "Paris"}));

    let (content, calls, finish) = streamed(&r, FENCED_CALL).await;
    assert_eq!((content.trim(), finish.as_str()), ("I'll check.", "tool_calls"));
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, "get_weather");
    assert_eq!(serde_json::from_str::<Value>(&calls[0].1).expect("JSON arguments"), json!({"city": "Paris"}));
}

#[tokio::test]
async fn json_that_is_not_a_call_to_an_offered_tool_stays_text() {
    let r = tiny_router();
    let answers = [
        "```json\n{\"name\": \"launch_rockets\", \"arguments\": {}}\n```",
        "```python\nprint(\"hi\")\n```",
        "{\"name\": \"get_weather\", \"arguments\": \"Paris\"}",
    ];
    for text in answers {
        let answer = completion(&r, text).await;
        let choice = &answer["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{answer}");
        assert_eq!(choice["message"]["content"], text, "{answer}");
        assert!(choice["message"].get("tool_calls").is_none(), "{answer}");
        assert_eq!(streamed(&r, text).await, (text.to_string(), Vec::new(), "stop".to_string()));
    }
}
