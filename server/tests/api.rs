//! Every endpoint and every error of the HTTP API, in process, on a tiny synthetic model.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tessera::api::auth::{Keys, Scope};
use tessera::api::{router, with_service_layers, ApiSettings, App};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::tiny_gemma3;
use tessera::LoadedModel;
use tower::ServiceExt;

const MODEL: &str = "tiny";

fn settings() -> ApiSettings {
    ApiSettings {
        ctx_len: 128,
        keys: Default::default(),
        request_timeout: Duration::from_secs(30),
        max_body_bytes: 64 * 1024,
        adapters_dir: None,
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        tuning: None,
        plugins: None,
    }
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        ctx_len: 128,
        max_running_seqs: 8,
        max_queue: 32,
        prefill_tokens_per_step: 64,
        ..EngineConfig::default()
    }
}

fn load_tiny() -> Arc<LoadedModel> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&path).unwrap();
    Arc::new(LoadedModel::load(&path).unwrap())
}

fn app_with(settings: ApiSettings, engine: EngineConfig) -> Arc<App> {
    App::start(load_tiny(), MODEL.into(), settings, engine).unwrap()
}

fn app() -> Arc<App> {
    app_with(settings(), engine_config())
}

async fn send(router: &Router, method: &str, uri: &str, body: Option<Value>, key: Option<&str>) -> (StatusCode, String) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(key) = key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let req = match body {
        Some(b) => req
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let response = router.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post(router: &Router, uri: &str, body: Value) -> (StatusCode, Value) {
    let (status, text) = send(router, "POST", uri, Some(body), None).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The `data:` payloads of a server-sent event stream, `[DONE]` last.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn assert_error(status: StatusCode, body: &Value, expected: StatusCode, param: Option<&str>, code: Option<&str>) {
    assert_eq!(status, expected, "{body}");
    let error = &body["error"];
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    assert!(error["type"].is_string(), "{body}");
    assert_eq!(error["param"].as_str(), param, "{body}");
    assert_eq!(error["code"].as_str(), code, "{body}");
}

fn chat(messages: Value, extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": messages});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test]
async fn models_health_metrics_and_openapi() {
    let app = app();
    assert!(app.inference.is_warm(), "the app started before its grammar vocabulary was built");
    let r = router(app.clone());
    let (status, text) = send(&r, "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let list: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], MODEL);
    let (status, text) = send(&r, "GET", "/v1/models/tiny", None, None).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let (status, text) = send(&r, "GET", "/v1/models/other", None, None).await;
    assert_error(status, &serde_json::from_str(&text).unwrap(), StatusCode::NOT_FOUND, Some("model"), Some("model_not_found"));

    let (status, text) = send(&r, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["status"], "ok");

    // Greedy and past EOS: exactly 3 tokens, whatever the tiny model draws.
    post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 3, "temperature": 0, "ignore_eos": true})).await;
    let (status, text) = send(&r, "GET", "/metrics", None, None).await;
    assert_eq!(status, StatusCode::OK);
    for name in [
        "tessera_requests_total{route=\"/v1/completions\",status=\"200\"} 1",
        "tessera_prompt_tokens_total",
        "tessera_generated_tokens_total 3",
        "tessera_queue_depth",
        "tessera_running_sequences",
        "tessera_time_to_first_token_seconds_bucket",
        "tessera_inter_token_latency_seconds_count 2",
    ] {
        assert!(text.contains(name), "metrics lack `{name}`:\n{text}");
    }

    let (status, text) = send(&r, "GET", "/openapi.json", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let spec: Value = serde_json::from_str(&text).unwrap();
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/models/{model}", "/tokenize", "/detokenize", "/health", "/metrics"] {
        assert!(spec["paths"][path].is_object(), "spec lacks {path}");
    }
    let (status, text) = send(&r, "GET", "/v1/nothing", None, None).await;
    assert_error(status, &serde_json::from_str(&text).unwrap(), StatusCode::NOT_FOUND, None, Some("not_found"));
}

#[tokio::test]
async fn chat_plain_and_streamed_agree() {
    let r = router(app());
    let messages = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]);
    let (status, plain) = post(&r, "/v1/chat/completions", chat(messages.clone(), json!({"max_tokens": 12, "temperature": 0, "ignore_eos": true}))).await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["choices"][0]["message"]["role"], "assistant");
    assert_eq!(plain["choices"][0]["finish_reason"], "length");
    let usage = &plain["usage"];
    assert_eq!(usage["completion_tokens"], 12);
    assert_eq!(usage["total_tokens"], usage["prompt_tokens"].as_u64().unwrap() + 12);

    let (status, text) = send(
        &r,
        "POST",
        "/v1/chat/completions",
        Some(chat(messages, json!({"max_tokens": 12, "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}))),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter_map(|c| c["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, plain["choices"][0]["message"]["content"].as_str().unwrap());
    let finish: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"].get(0)).map(|c| &c["finish_reason"]).filter(|f| !f.is_null()).collect();
    assert_eq!(finish, [&json!("length")]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    for count in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][count], plain["usage"][count], "{count}");
    }
    // The same prompt again: its full blocks (all but the last token's) come from the cache.
    assert_eq!(plain["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt_tokens = plain["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], (prompt_tokens - 1) / 16 * 16);
}

#[tokio::test]
async fn chat_logprobs_n_stop_and_seeds() {
    let r = router(app());
    let user = json!([{"role": "user", "content": "a b c"}]);
    let (status, body) = post(&r, "/v1/chat/completions", chat(user.clone(), json!({"max_tokens": 4, "logprobs": true, "top_logprobs": 3, "n": 2, "seed": 9, "ignore_eos": true}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(body["usage"]["completion_tokens"], 8);
    let content = choices[0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 4);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert!(content[0]["logprob"].as_f64().unwrap() <= 0.0);
    assert!(content[0]["bytes"].is_array());

    // The same seed repeats; the choices of one request differ from each other.
    let (_, again) = post(&r, "/v1/chat/completions", chat(user.clone(), json!({"max_tokens": 4, "logprobs": true, "top_logprobs": 3, "n": 2, "seed": 9, "ignore_eos": true}))).await;
    assert_eq!(again["choices"], body["choices"]);

    // A stop string cuts the text before it.
    let (_, free) = post(&r, "/v1/chat/completions", chat(user.clone(), json!({"max_tokens": 20, "temperature": 0, "ignore_eos": true}))).await;
    let text = free["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    let cut = text.char_indices().nth(6).map(|(i, _)| i).unwrap();
    let stop: String = text[cut..].chars().take(2).collect();
    let (_, stopped) = post(&r, "/v1/chat/completions", chat(user, json!({"max_tokens": 20, "temperature": 0, "ignore_eos": true, "stop": [stop.clone()]}))).await;
    let expected = &text[..text.find(&stop).unwrap()];
    assert_eq!(stopped["choices"][0]["message"]["content"], expected);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn completions_formats() {
    let r = router(app());
    // A list of prompts, n = 2 each: four choices, ordered prompt-major.
    let (status, body) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": ["the", "a b"], "n": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    assert_eq!(choices[0]["text"], choices[1]["text"]);
    assert_eq!(body["usage"]["completion_tokens"], 12);

    // Token-id prompt, echo, logprobs and the token-id extension.
    let (status, body) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": [2, 290, 291, 292], "max_tokens": 4, "temperature": 0, "echo": true, "logprobs": 2, "return_token_ids": true, "ignore_eos": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(choice["prompt_token_ids"], json!([2, 290, 291, 292]));
    let ids = choice["token_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 4);
    let lp = &choice["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 8, "prompt and completion tokens: {lp}");
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["token_logprobs"][1].as_f64().unwrap() <= 0.0);
    assert!(lp["top_logprobs"][0].is_null());
    assert_eq!(lp["top_logprobs"][5].as_object().unwrap().len(), 2);
    let offsets: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    let text = choice["text"].as_str().unwrap();
    let tokens: String = lp["tokens"].as_array().unwrap()[1..].iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(text, tokens, "echoed text is prompt + completion");

    // Streaming with usage.
    let (status, text) = send(&r, "POST", "/v1/completions", Some(json!({"model": MODEL, "prompt": "the", "max_tokens": 5, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true})), None).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 5);
    let (_, plain) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 5, "temperature": 0, "ignore_eos": true})).await;
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| c["choices"].get(0).and_then(|c| c["text"].as_str()).map(str::to_string))
        .collect();
    assert_eq!(streamed, plain["choices"][0]["text"].as_str().unwrap());

    // Extension sampling fields are accepted and top_k 1 is greedy.
    let (status, topk) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 5, "temperature": 1.5, "top_k": 1, "min_p": 0.1, "repetition_penalty": 1.0, "seed": 3, "ignore_eos": true})).await;
    assert_eq!(status, StatusCode::OK, "{topk}");
    assert_eq!(topk["choices"][0]["text"], plain["choices"][0]["text"]);
    let (status, _) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 5, "frequency_penalty": 1.5, "presence_penalty": -0.5, "repetition_penalty": 1.3})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn tokenize_and_detokenize() {
    let r = router(app());
    let (status, body) = post(&r, "/tokenize", json!({"model": MODEL, "prompt": " the cat"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["tokens"][0], 2, "BOS first");
    assert_eq!(body["count"], body["tokens"].as_array().unwrap().len());
    let (_, raw) = post(&r, "/tokenize", json!({"prompt": " the cat", "add_special_tokens": false})).await;
    assert_eq!(raw["count"].as_u64().unwrap() + 1, body["count"].as_u64().unwrap());
    let (status, chat) = post(&r, "/tokenize", json!({"messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(chat["tokens"][1], 4, "<start_of_turn> follows BOS");

    let (status, back) = post(&r, "/detokenize", json!({"tokens": raw["tokens"]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(back["prompt"], " the cat");

    let (status, err) = post(&r, "/detokenize", json!({"tokens": [1_000_000]})).await;
    assert_error(status, &err, StatusCode::BAD_REQUEST, Some("tokens"), None);
    let (status, err) = post(&r, "/tokenize", json!({"prompt": "a", "messages": []})).await;
    assert_error(status, &err, StatusCode::BAD_REQUEST, Some("prompt"), None);
    let (status, err) = post(&r, "/tokenize", json!({"model": "other", "prompt": "a"})).await;
    assert_error(status, &err, StatusCode::NOT_FOUND, Some("model"), Some("model_not_found"));
}

#[tokio::test]
async fn invalid_parameters_name_the_field() {
    let r = router(app());
    let cases = [
        ("/v1/completions", json!({"temperature": 2.5}), "temperature"),
        ("/v1/completions", json!({"top_p": 0}), "top_p"),
        ("/v1/completions", json!({"n": 0}), "n"),
        ("/v1/completions", json!({"n": 50}), "n"),
        ("/v1/completions", json!({"logprobs": 6}), "logprobs"),
        ("/v1/completions", json!({"max_tokens": 0}), "max_tokens"),
        ("/v1/completions", json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        ("/v1/completions", json!({"frequency_penalty": 3}), "frequency_penalty"),
        ("/v1/completions", json!({"presence_penalty": -3}), "presence_penalty"),
        ("/v1/completions", json!({"top_k": -5}), "top_k"),
        ("/v1/completions", json!({"min_p": 2}), "min_p"),
        ("/v1/completions", json!({"repetition_penalty": 0}), "repetition_penalty"),
        ("/v1/completions", json!({"stream_options": {"include_usage": true}}), "stream_options"),
        ("/v1/completions", json!({"prompt": [5, 1_000_000]}), "prompt"),
        ("/v1/completions", json!({"prompt": []}), "prompt"),
        ("/v1/chat/completions", json!({"top_logprobs": 2}), "top_logprobs"),
        ("/v1/chat/completions", json!({"logprobs": true, "top_logprobs": 21}), "top_logprobs"),
        ("/v1/chat/completions", json!({"messages": []}), "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "assistant", "content": "x"}]}), "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), "messages[0].content[0]"),
    ];
    for (uri, overrides, param) in cases {
        let mut body = if uri == "/v1/completions" {
            json!({"model": MODEL, "prompt": "the"})
        } else {
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
        };
        body.as_object_mut().unwrap().extend(overrides.as_object().unwrap().clone());
        let (status, err) = post(&r, uri, body.clone()).await;
        assert_error(status, &err, StatusCode::BAD_REQUEST, Some(param), None);
    }

    // The chat template's own refusal is the client's error, with the template's reason.
    let (status, err) = post(&r, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})).await;
    assert_error(status, &err, StatusCode::BAD_REQUEST, Some("messages"), None);
    assert!(err["error"]["message"].as_str().unwrap().contains("messages[1]: turns alternate user/assistant"), "{err}");

    // Unknown model, context overflow, malformed JSON and wrong types.
    let (status, err) = post(&r, "/v1/chat/completions", json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_error(status, &err, StatusCode::NOT_FOUND, Some("model"), Some("model_not_found"));
    let (status, err) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 500})).await;
    assert_error(status, &err, StatusCode::BAD_REQUEST, Some("prompt"), Some("context_length_exceeded"));
    let (status, err) = post(&r, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500})).await;
    assert_error(status, &err, StatusCode::BAD_REQUEST, Some("messages"), Some("context_length_exceeded"));
    let (status, text) = send(&r, "POST", "/v1/completions", None, None).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(serde_json::from_str::<Value>(&text).unwrap()["error"]["message"].is_string());
    let (status, err) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": "many"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(err["error"]["message"].as_str().unwrap().contains("max_tokens"), "{err}");
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))
        .unwrap();
    let response = r.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // A body over the limit.
    let huge = "x".repeat(100 * 1024);
    let (status, err) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": huge})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(err["error"]["message"].is_string(), "{err}");
}

#[tokio::test]
async fn constraints_and_tools_are_checked_then_enforced_under_every_sampling_setting() {
    // Room for the tools' fallback prompt.
    let r = router(app_with(ApiSettings { ctx_len: 1024, ..settings() }, EngineConfig { ctx_len: 1024, ..engine_config() }));
    let user = json!([{"role": "user", "content": "hi"}]);
    let weather = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]);
    let refused = [
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}}), "response_format", Some("invalid_constraint")),
        (json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}}}), "response_format", Some("invalid_constraint")),
        (json!({"guided_regex": "(unclosed"}), "guided_regex", Some("invalid_constraint")),
        (json!({"guided_grammar": "start: nothing_defined"}), "guided_grammar", Some("invalid_constraint")),
        (json!({"guided_choice": []}), "guided_choice", None),
        (json!({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}), "guided_choice", None),
        (json!({"tools": weather, "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice", None),
        (json!({"tools": weather, "tool_choice": "sometimes"}), "tool_choice", None),
        (json!({"tool_choice": "required"}), "tool_choice", None),
        (json!({"tools": weather, "tool_choice": "required", "guided_regex": "a+"}), "tool_choice", None),
        (json!({"tools": [{"type": "function", "function": {"name": "bad name"}}]}), "tools[0].function.name", None),
        (json!({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}), "tools[0].type", None),
        (json!({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]}), "messages[1].tool_call_id", None),
    ];
    for (extra, param, code) in refused {
        let mut body = chat(user.clone(), extra.clone());
        body.as_object_mut().unwrap().entry("max_tokens").or_insert(json!(4));
        let (status, err) = post(&r, "/v1/chat/completions", body).await;
        assert_error(status, &err, StatusCode::BAD_REQUEST, Some(param), code);
    }
    let (status, err) = post(&r, "/v1/chat/completions", chat(user.clone(), json!({"response_format": {"type": "yaml"}}))).await;
    assert_error(status, &err, StatusCode::BAD_REQUEST, Some("response_format"), None);
    assert!(err["error"]["message"].as_str().unwrap().contains("unknown variant `yaml`"), "{err}");

    // The tiny random model writes noise; every sampling knob still lands on the shape.
    let knobs = [
        json!({"temperature": 0}),
        json!({"temperature": 1.5, "top_k": 3, "seed": 1}),
        json!({"temperature": 1.0, "top_p": 0.3, "min_p": 0.1, "seed": 2}),
        json!({"temperature": 1.0, "frequency_penalty": 2, "presence_penalty": 1, "repetition_penalty": 1.5, "seed": 3}),
    ];
    for knob in knobs {
        let mut body = chat(user.clone(), json!({"guided_choice": ["north", "south", "east west"], "max_tokens": 8}));
        body.as_object_mut().unwrap().extend(knob.as_object().unwrap().clone());
        let (status, answer) = post(&r, "/v1/chat/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(["north", "south", "east west"].contains(&text), "{knob}: {text}");
        let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": false});
        let mut body = json!({"model": MODEL, "prompt": "the", "max_tokens": 40, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}});
        body.as_object_mut().unwrap().extend(knob.as_object().unwrap().clone());
        let (status, answer) = post(&r, "/v1/completions", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let value: Value = serde_json::from_str(answer["choices"][0]["text"].as_str().unwrap()).unwrap();
        assert!(value["n"].as_i64().is_some_and(|n| (-5..=5).contains(&n)) && value["ok"].is_boolean(), "{knob}: {value}");
    }
    let (status, answer) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 30, "guided_regex": "[0-9]{3}-[a-c]{2}"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert!(text.len() == 6 && text.as_bytes()[3] == b'-', "{text}");
    // A Lark grammar, and a grammar cut short by max_tokens: `length`, not a false `stop`.
    let (status, answer) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 20, "guided_grammar": "start: \"(\" num (\",\" num)* \")\"\nnum: /[1-9]/"})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with('(') && text.chars().all(|c| "(),123456789".contains(c)), "{text}");
    let at_least_20 = json!({"type": "json_schema", "json_schema": {"name": "long", "schema": {"type": "array", "minItems": 20, "items": {"type": "integer"}}}});
    let (_, cut) = post(&r, "/v1/completions", json!({"model": MODEL, "prompt": "the", "max_tokens": 3, "response_format": at_least_20})).await;
    assert_eq!(cut["choices"][0]["finish_reason"], "length", "{cut}");

    // Tools on a template without them: the fallback prompt, and a forced call parsed back.
    let (status, answer) = post(&r, "/v1/chat/completions", chat(user.clone(), json!({"tools": weather, "tool_choice": "required", "max_tokens": 120, "temperature": 0}))).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let choice = &answer["choices"][0];
    assert_eq!((choice["finish_reason"].as_str(), choice["message"]["content"].as_str()), (Some("tool_calls"), None), "{answer}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!((call["type"].as_str(), call["function"]["name"].as_str()), (Some("function"), Some("get_weather")));
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    let arguments: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    // `none` hides the tools: nothing is parsed, and the prompt is the plain one.
    let (_, plain) = post(&r, "/v1/chat/completions", chat(user.clone(), json!({"max_tokens": 4, "temperature": 0}))).await;
    let (_, hidden) = post(&r, "/v1/chat/completions", chat(user.clone(), json!({"tools": weather, "tool_choice": "none", "max_tokens": 4, "temperature": 0}))).await;
    assert_eq!(hidden["usage"]["prompt_tokens"], plain["usage"]["prompt_tokens"], "{hidden}");
    assert!(hidden["choices"][0]["message"].get("tool_calls").is_none());
}

#[tokio::test]
async fn keys_guard_inference_and_admin_routes() {
    let r = router(app_with(
        ApiSettings {
            keys: Keys::default().with_key(Scope::Inference, Some("user-key")).with_key(Scope::Admin, Some("admin-key")),
            ..settings()
        },
        engine_config(),
    ));
    let body = json!({"model": MODEL, "prompt": "the", "max_tokens": 1});
    for key in [None, Some("wrong")] {
        let (status, text) = send(&r, "POST", "/v1/completions", Some(body.clone()), key).await;
        assert_error(status, &serde_json::from_str(&text).unwrap(), StatusCode::UNAUTHORIZED, None, Some("invalid_api_key"));
    }
    for key in ["user-key", "admin-key"] {
        let (status, _) = send(&r, "POST", "/v1/completions", Some(body.clone()), Some(key)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, text) = send(&r, "GET", "/metrics", None, Some("user-key")).await;
    assert_error(status, &serde_json::from_str(&text).unwrap(), StatusCode::FORBIDDEN, None, Some("admin_key_required"));
    let (status, _) = send(&r, "GET", "/metrics", None, Some("admin-key")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&r, "GET", "/health", None, None).await;
    assert_eq!(status, StatusCode::OK, "health stays public");
    let (status, _) = send(&r, "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let r = router(app_with(settings(), EngineConfig { max_queue: 0, ..engine_config() }));
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"model": MODEL, "prompt": "the"}).to_string()))
        .unwrap();
    let response = r.clone().oneshot(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()[header::RETRY_AFTER], "1");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    let err: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(err["error"]["code"], "queue_full");
}

#[tokio::test]
async fn panics_and_timeouts_become_openai_errors_and_the_server_keeps_serving() {
    let app = app_with(
        ApiSettings {
            request_timeout: Duration::from_millis(200),
            ..settings()
        },
        engine_config(),
    );
    let routes: Router<Arc<App>> = Router::new()
        .route("/boom", axum::routing::get(|| async { panic!("boom") as &'static str }))
        .route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                "late"
            }),
        );
    let r = with_service_layers(app.clone(), routes);
    let (status, text) = send(&r, "GET", "/boom", None, None).await;
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(err["error"]["message"].as_str().unwrap().contains("boom"));
    let (status, text) = send(&r, "GET", "/slow", None, None).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap()["error"]["code"], "request_timeout");
    let (status, _) = send(&r, "GET", "/boom", None, None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "still serving after a panic");
    let (status, _) = send(&router(app), "GET", "/v1/models", None, None).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn concurrent_greedy_requests_match_running_alone() {
    let r = router(app());
    let prompts = ["the", "a b", " the cat", "in", "he said", "z", "abc abc", "the the the"];
    let request = |p: &str, max: u32| json!({"model": MODEL, "prompt": p, "max_tokens": max, "temperature": 0, "ignore_eos": true, "return_token_ids": true});
    let mut alone = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let (_, body) = post(&r, "/v1/completions", request(p, 10 + i as u32)).await;
        alone.push(body["choices"][0]["token_ids"].clone());
    }
    let together = futures::future::join_all(
        prompts.iter().enumerate().map(|(i, p)| post(&r, "/v1/completions", request(p, 10 + i as u32))),
    )
    .await;
    for (i, (status, body)) in together.into_iter().enumerate() {
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["choices"][0]["token_ids"], alone[i], "prompt {i}");
    }
}

#[tokio::test]
async fn a_client_that_leaves_cancels_its_generation() {
    let app = app();
    let r = router(app.clone());
    let req = Request::post("/v1/completions")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(json!({"model": MODEL, "prompt": "the", "max_tokens": 120, "stream": true, "ignore_eos": true}).to_string()))
        .unwrap();
    let response = r.clone().oneshot(req).await.unwrap();
    let mut body = response.into_body().into_data_stream();
    use futures::StreamExt;
    body.next().await.unwrap().unwrap();
    drop(body);
    // The engine notices at its next step and stops generating.
    let generated = || app.metrics.generated_tokens.get();
    let mut last = generated();
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = generated();
        if now == last && app.metrics.running_sequences.get() == 0 {
            break;
        }
        last = now;
    }
    assert_eq!(app.metrics.running_sequences.get(), 0);
    assert!(generated() < 120, "generation ran to the end: {}", generated());
}

#[tokio::test]
async fn openapi_yaml_is_up_to_date() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../openapi.yaml");
    let generated = tessera::api::openapi().to_yaml().unwrap();
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi.yaml is stale: run `cargo run --release -- openapi > openapi.yaml`"
    );
}

/// A path parameter is a `{name}` of its route, and is required; everything else a handler
/// reads from the URL is a query parameter, optional unless it says so. A client generated from
/// the document would otherwise put `?after=` into the path.
#[test]
fn the_documents_path_parameters_are_the_routes_placeholders() {
    let doc = serde_json::to_value(tessera::api::openapi()).unwrap();
    for (route, operations) in doc["paths"].as_object().unwrap() {
        for (method, operation) in operations.as_object().unwrap() {
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let name = parameter["name"].as_str().unwrap();
                let placeholder = route.contains(&format!("{{{name}}}"));
                assert_eq!(parameter["in"] == "path", placeholder, "{method} {route}: `{name}` is `in: {}`", parameter["in"]);
                if parameter["in"] == "query" {
                    assert_ne!(parameter["required"], true, "{method} {route}: the query parameter `{name}` is required");
                }
            }
        }
    }
}
