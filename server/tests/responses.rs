//! The Responses API on the tiny model: create, retrieve and delete; `store: false`;
//! continuations by `previous_response_id` (found in the prefix cache); the typed stream's
//! events in order; `text.format` json_schema; a function tool round trip; and bad input.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::{json, Value};
use tessera::api::{router, ApiSettings, App, TuningConfig};
use tessera::engine::EngineConfig;
use tessera::model::synthetic::tiny_gemma3;
use tessera::LoadedModel;
use tower::ServiceExt;

const MODEL: &str = "tiny";
/// Room for the tools' fallback prompt and a few turns.
const CTX_LEN: usize = 1024;

/// A server on the tiny model; with `stored`, its responses go to a SQLite state store under
/// the directory, otherwise to memory.
fn fixture(stored: bool) -> (tempfile::TempDir, Router) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&path).unwrap();
    let model = Arc::new(LoadedModel::load(&path).unwrap());
    let router = serve(model, MODEL, CTX_LEN, stored.then(|| dir.path().join("tuning")));
    (dir, router)
}

/// A server on `model`, its responses in a SQLite state store under `store` (else in memory).
fn serve(model: Arc<LoadedModel>, model_id: &str, ctx_len: usize, store: Option<std::path::PathBuf>) -> Router {
    let tuning = store.map(|root| TuningConfig { root, state: None, blobs: None, settings: Default::default() });
    let settings = ApiSettings {
        ctx_len,
        keys: Default::default(),
        request_timeout: Duration::from_secs(60),
        max_body_bytes: 1 << 20,
        adapters_dir: None,
        adapter_roots: Vec::new(),
        max_adapter_memory: None,
        tuning,
        plugins: None,
    };
    let engine = EngineConfig { ctx_len, max_running_seqs: 4, max_queue: 16, prefill_tokens_per_step: 64, ..EngineConfig::default() };
    router(App::start(model, model_id.into(), settings, engine).unwrap())
}

async fn call(router: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, String) {
    let request = Request::builder().method(method).uri(uri);
    let request = match body {
        Some(b) => request.header(header::CONTENT_TYPE, "application/json").body(Body::from(b.to_string())),
        None => request.body(Body::empty()),
    }
    .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn json_call(router: &Router, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
    let (status, text) = call(router, method, uri, body).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates a response and checks it succeeded.
async fn create(router: &Router, body: Value) -> Value {
    let (status, response) = json_call(router, "POST", "/v1/responses", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{response}");
    response
}

/// The text of a response's message items.
fn output_text(response: &Value) -> String {
    let items = response["output"].as_array().cloned().unwrap_or_default();
    items.iter().filter(|i| i["type"] == "message").flat_map(|i| i["content"].as_array().cloned().unwrap_or_default()).filter_map(|c| c["text"].as_str().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_created_retrieved_and_deleted() {
    let (_dir, r) = fixture(true);
    let response = create(&r, json!({"model": MODEL, "input": "Hello there", "instructions": "Be brief.", "max_output_tokens": 6, "temperature": 0, "metadata": {"k": "v"}})).await;
    let id = response["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"), "{response}");
    assert_eq!((response["object"].as_str(), response["model"].as_str(), response["instructions"].as_str()), (Some("response"), Some(MODEL), Some("Be brief.")));
    assert!(["completed", "incomplete"].contains(&response["status"].as_str().unwrap()), "{response}");
    let message = &response["output"][0];
    assert_eq!((message["type"].as_str(), message["role"].as_str(), message["content"][0]["type"].as_str()), (Some("message"), Some("assistant"), Some("output_text")));
    let usage = &response["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0 && usage["output_tokens"].as_u64().unwrap() <= 6, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()));
    assert_eq!(response["metadata"]["k"], "v");

    let (status, fetched) = json_call(&r, "GET", &format!("/v1/responses/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{fetched}");
    assert_eq!(fetched, response, "retrieved as it was returned");
    let (status, deleted) = json_call(&r, "DELETE", &format!("/v1/responses/{id}"), None).await;
    assert_eq!((status, deleted["deleted"].as_bool(), deleted["object"].as_str()), (StatusCode::OK, Some(true), Some("response.deleted")));
    for method in ["GET", "DELETE"] {
        let (status, gone) = json_call(&r, method, &format!("/v1/responses/{id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} after delete: {gone}");
        assert_eq!(gone["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_false_is_not_kept_in_the_store_or_in_memory() {
    for stored in [true, false] {
        let (_dir, r) = fixture(stored);
        let kept = create(&r, json!({"model": MODEL, "input": "hi", "max_output_tokens": 2})).await;
        let (status, _) = call(&r, "GET", &format!("/v1/responses/{}", kept["id"].as_str().unwrap()), None).await;
        assert_eq!(status, StatusCode::OK, "stored: {stored}");
        let unkept = create(&r, json!({"model": MODEL, "input": "hi", "max_output_tokens": 2, "store": false})).await;
        assert_eq!(unkept["store"], false);
        let id = unkept["id"].as_str().unwrap();
        let (status, body) = json_call(&r, "GET", &format!("/v1/responses/{id}"), None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        let (status, body) = json_call(&r, "POST", "/v1/responses", Some(json!({"model": MODEL, "input": "more", "previous_response_id": id}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "an unstored response cannot be continued: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_renders_the_stored_conversation_and_finds_it_cached() {
    let (_dir, r) = fixture(true);
    let long_question = "Tell me about the weather in the mountains in spring. ".repeat(12);
    let first = create(&r, json!({"model": MODEL, "input": long_question, "max_output_tokens": 8, "temperature": 0})).await;
    let first_input = first["usage"]["input_tokens"].as_u64().unwrap();
    let second = create(&r, json!({"model": MODEL, "input": "And in autumn?", "previous_response_id": first["id"], "max_output_tokens": 4, "temperature": 0})).await;
    assert_eq!(second["previous_response_id"], first["id"]);
    let usage = &second["usage"];
    let (input, cached) = (usage["input_tokens"].as_u64().unwrap(), usage["input_tokens_details"]["cached_tokens"].as_u64().unwrap());
    assert!(input > first_input, "the first turn comes before the new input: {usage}");
    assert!(cached > 0 && cached <= first_input, "the first turn's prompt is found in the prefix cache: {usage}");

    // The same conversation sent whole is the same prompt.
    let whole = json!([
        {"role": "user", "content": long_question},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": output_text(&first)}]},
        {"role": "user", "content": "And in autumn?"},
    ]);
    let again = create(&r, json!({"model": MODEL, "input": whole, "max_output_tokens": 4, "temperature": 0})).await;
    assert_eq!(again["usage"]["input_tokens"], usage["input_tokens"], "{again}");
    assert_eq!(output_text(&again), output_text(&second), "the same prompt, the same greedy answer");

    let (status, missing) = json_call(&r, "POST", "/v1/responses", Some(json!({"model": MODEL, "input": "x", "previous_response_id": "resp_nope"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    assert!(missing["error"]["message"].as_str().unwrap().contains("resp_nope"), "{missing}");
}

/// The streamed events of a request, as (event name, data).
async fn stream(router: &Router, body: Value) -> Vec<(String, Value)> {
    let (status, text) = call(router, "POST", "/v1/responses", Some(body)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start().to_string()).unwrap_or_default();
            (field("event:"), serde_json::from_str(&field("data:")).expect("a JSON event"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_sends_the_typed_events_in_order_and_keeps_the_response() {
    let (_dir, r) = fixture(true);
    let events = stream(&r, json!({"model": MODEL, "input": "Count with me", "max_output_tokens": 5, "temperature": 0, "stream": true})).await;
    let kinds: Vec<&str> = events.iter().map(|(kind, _)| kind.as_str()).collect();
    for (i, (kind, data)) in events.iter().enumerate() {
        assert_eq!((data["type"].as_str(), data["sequence_number"].as_u64()), (Some(kind.as_str()), Some(i as u64)), "{data}");
    }
    let deltas = kinds.iter().filter(|k| **k == "response.output_text.delta").count();
    assert!(deltas >= 1, "{kinds:?}");
    let mut expected = vec!["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"];
    expected.extend(std::iter::repeat_n("response.output_text.delta", deltas));
    expected.extend(["response.output_text.done", "response.content_part.done", "response.output_item.done"]);
    let (last, data) = events.last().unwrap();
    assert!(["response.completed", "response.incomplete"].contains(&last.as_str()), "{kinds:?}");
    expected.push(last);
    assert_eq!(kinds, expected);

    let text: String = events.iter().filter(|(k, _)| k == "response.output_text.delta").map(|(_, d)| d["delta"].as_str().unwrap()).collect();
    let done = &events[events.len() - 4].1;
    assert_eq!(done["text"].as_str(), Some(text.as_str()));
    let response = &data["response"];
    assert_eq!(output_text(response), text);
    assert_eq!(response["output"][0]["id"], events[2].1["item"]["id"], "the item keeps its id");
    let output_tokens = response["usage"]["output_tokens"].as_u64().unwrap();
    assert!(output_tokens <= 5 && (last == "response.completed" || output_tokens == 5), "{last}: {output_tokens} tokens");
    let (status, fetched) = json_call(&r, "GET", &format!("/v1/responses/{}", response["id"].as_str().unwrap()), None).await;
    assert_eq!((status, &fetched), (StatusCode::OK, response), "kept before `{last}` was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_schema_format_shapes_the_output() {
    let (_dir, r) = fixture(false);
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 5}, "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": false});
    let format = json!({"format": {"type": "json_schema", "name": "s", "schema": schema, "strict": true}});
    let response = create(&r, json!({"model": MODEL, "input": "Give me JSON", "max_output_tokens": 40, "text": format})).await;
    assert_eq!(response["status"], "completed", "{response}");
    let value: Value = serde_json::from_str(&output_text(&response)).expect("the output parses as JSON");
    assert!(value["n"].as_i64().is_some_and(|n| (-5..=5).contains(&n)) && value["ok"].is_boolean(), "{value}");
    assert_eq!(response["text"]["format"]["type"], "json_schema");
    let streamed = stream(&r, json!({"model": MODEL, "input": "Give me JSON", "max_output_tokens": 40, "text": format, "stream": true})).await;
    let (_, done) = streamed.iter().find(|(k, _)| k == "response.output_text.done").expect("a text");
    let value: Value = serde_json::from_str(done["text"].as_str().unwrap()).expect("the streamed output parses as JSON");
    assert!(value["ok"].is_boolean(), "{value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_tool_round_trip() {
    let (_dir, r) = fixture(true);
    let weather = json!([{"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}]);
    let asked = create(&r, json!({"model": MODEL, "input": "Weather in Paris?", "tools": weather, "tool_choice": "required", "max_output_tokens": 120, "temperature": 0})).await;
    let calls: Vec<&Value> = asked["output"].as_array().unwrap().iter().filter(|i| i["type"] == "function_call").collect();
    assert_eq!(calls.len(), 1, "{asked}");
    let call = calls[0];
    assert_eq!(call["name"], "get_weather");
    assert!(call["call_id"].as_str().unwrap().starts_with("call_") && call["id"].as_str().unwrap().starts_with("fc_"), "{call}");
    let arguments: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(arguments["city"].is_string(), "{arguments}");
    assert_eq!(asked["tools"][0]["name"], "get_weather");

    // The result goes back as a `function_call_output` after the stored call.
    let output = json!([{"type": "function_call_output", "call_id": call["call_id"], "output": "{\"celsius\": 21}"}]);
    let answered = create(&r, json!({"model": MODEL, "input": output, "previous_response_id": asked["id"], "tools": weather, "max_output_tokens": 4, "temperature": 0})).await;
    assert!(answered["usage"]["input_tokens"].as_u64() > asked["usage"]["input_tokens"].as_u64(), "{answered}");
    // Or the whole conversation, the call sent back as it came: the same prompt.
    let whole = json!([{"role": "user", "content": "Weather in Paris?"}, call, output[0]]);
    let resent = create(&r, json!({"model": MODEL, "input": whole, "tools": weather, "max_output_tokens": 4, "temperature": 0})).await;
    assert_eq!(resent["usage"]["input_tokens"], answered["usage"]["input_tokens"], "{resent}");

    // A streamed forced call: its item, its arguments, its end.
    let events = stream(&r, json!({"model": MODEL, "input": "Weather in Paris?", "tools": weather, "tool_choice": "required", "max_output_tokens": 120, "temperature": 0, "stream": true})).await;
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    let at = kinds.iter().position(|k| *k == "response.function_call_arguments.done").expect("a streamed call");
    assert_eq!(events[at].1["arguments"], call["arguments"], "greedy: the same call");
    assert_eq!(kinds[at + 1], "response.output_item.done");
    assert_eq!(events[at + 1].1["item"]["type"], "function_call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_field() {
    let (_dir, r) = fixture(false);
    let refused = [
        (json!({"input": [{"role": "user", "content": "hi"}, {"type": "image_generation_call", "id": "x"}]}), "input[1]", "image_generation_call"),
        (json!({"input": [{"content": "no role, no type"}]}), "input[0]", "type"),
        (json!({"input": [7]}), "input[0]", "type"),
        (json!({"input": [{"type": "function_call", "name": "f"}]}), "input[0]", "function_call"),
        (json!({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}), "input[0].content[0]", "input_image"),
        (json!({"input": [{"role": "tool", "content": "x"}]}), "input[0].role", "tool"),
        (json!({"input": 5}), "input", "string"),
        (json!({"input": []}), "input", "one item"),
        (json!({"input": "hi", "max_output_tokens": 0}), "max_output_tokens", "at least 1"),
        (json!({"input": "hi", "temperature": 3}), "temperature", "between"),
        (json!({"input": "hi", "text": {"format": {"type": "xml"}}}), "text.format", "OpenAI"),
        (json!({"input": "hi", "tools": [{"type": "function", "name": "bad name"}]}), "tools[0].name", "function name"),
        (json!({"input": "hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": [{"type": "function", "name": "f"}]}), "tool_choice", "nope"),
    ];
    for (mut body, param, says) in refused {
        body["model"] = json!(MODEL);
        let (status, error) = json_call(&r, "POST", "/v1/responses", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert_eq!(error["error"]["param"], param, "{body}: {error}");
        assert!(error["error"]["message"].as_str().unwrap().contains(says), "{body}: {error}");
    }
    let (status, error) = json_call(&r, "POST", "/v1/responses", Some(json!({"model": "nope", "input": "hi"}))).await;
    assert_eq!((status, error["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("model_not_found")));
    let (status, error) = json_call(&r, "POST", "/v1/responses", Some(json!({"model": MODEL}))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert!(error["error"]["message"].as_str().unwrap().contains("input"), "{error}");
}

/// Seconds from sending a streamed request to its first `response.output_text.delta`.
async fn time_to_first_token(router: &Router, mut body: Value) -> f64 {
    use futures::StreamExt;
    body["stream"] = json!(true);
    let request = Request::builder().method("POST").uri("/v1/responses").header(header::CONTENT_TYPE, "application/json").body(Body::from(body.to_string())).unwrap();
    let start = std::time::Instant::now();
    let response = router.clone().oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut events = response.into_body().into_data_stream();
    let mut seen = String::new();
    while let Some(chunk) = events.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if seen.contains("event: response.output_text.delta") {
            return start.elapsed().as_secs_f64();
        }
    }
    panic!("no text delta came: {seen}");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The target: a `previous_response_id` continuation of a ~1,000-token conversation reaches its
/// first token in at most 0.2x the time of the same conversation sent whole to a server whose
/// prefix cache does not hold it. On gemma-3-270m, three rounds, each with a conversation of
/// its own; the medians are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures time to first token on gemma-3-270m (downloads it when missing)"]
async fn a_continuation_reaches_its_first_token_in_a_fifth_of_the_time() {
    let path = tessera::model_store::ensure_model(&tessera::model_store::catalog::GEMMA_3_270M).expect("gemma-3-270m");
    let model = Arc::new(LoadedModel::load(&path).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let continuing = serve(model.clone(), "gemma", 2048, Some(dir.path().join("continuing")));
    let cold = serve(model, "gemma", 2048, Some(dir.path().join("cold")));
    let warm_up = json!({"model": "gemma", "input": "Hello", "max_output_tokens": 2, "temperature": 0});
    for router in [&continuing, &cold] {
        time_to_first_token(router, warm_up.clone()).await;
    }
    let question = json!({"role": "user", "content": "Summarise our conversation in one line."});
    let (mut with, mut without, mut prompt_tokens) = (Vec::new(), Vec::new(), 0);
    for round in 0..3 {
        let story = |who: &str| (0..18).map(|i| format!("In round {round}, {who} noted that harbour {i} shipped {} crates of tea and {} of salt. ", 7 * i + round, 3 * i + 11)).collect::<String>();
        let conversation = json!([{"role": "user", "content": story("the captain")}, {"role": "assistant", "content": story("the clerk")}, {"role": "user", "content": "Which harbour shipped the most tea?"}]);
        let first = create(&continuing, json!({"model": "gemma", "input": conversation, "max_output_tokens": 16, "temperature": 0})).await;
        let mut whole = conversation.as_array().unwrap().clone();
        whole.push(json!({"role": "assistant", "content": output_text(&first)}));
        whole.push(question.clone());
        with.push(time_to_first_token(&continuing, json!({"model": "gemma", "input": [question], "previous_response_id": first["id"], "max_output_tokens": 4, "temperature": 0})).await);
        without.push(time_to_first_token(&cold, json!({"model": "gemma", "input": whole, "max_output_tokens": 4, "temperature": 0})).await);
        let counted = create(&cold, json!({"model": "gemma", "input": whole, "max_output_tokens": 1, "store": false})).await;
        prompt_tokens = counted["usage"]["input_tokens"].as_u64().unwrap();
    }
    let (with, without) = (median(with), median(without));
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| info.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())).unwrap_or_default();
    println!("continuation of a ~{prompt_tokens}-token conversation on gemma-3-270m ({cpu}): time to first token {:.1} ms with previous_response_id, {:.1} ms sent whole to a cold prefix cache, ratio {:.3}", with * 1e3, without * 1e3, with / without);
    assert!(with <= 0.2 * without, "{with} s with, {without} s without");
}
