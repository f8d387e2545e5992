//! Streamed responses against what `openapi.json` documents for them. An event-stream schema in
//! OpenAPI 3.1 describes each event as a parser reads it (`{data, event}`), which is how
//! schemathesis checks a stream; the streams below must pass that check event by event. The
//! completion's prompt is the case schemathesis found: one special token and a field the API
//! does not know.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};
use tessera_tests::{real_app, REAL_MODEL_ID};
use tower::ServiceExt;

/// The schema `openapi.json` gives one event of `path`'s streamed 200 response, with the
/// document's components beside it so that its references resolve.
fn event_schema(path: &str) -> Value {
    let document: Value = serde_json::from_str(&tessera::api::openapi().to_json().expect("the document serializes")).expect("JSON");
    let schema = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"].clone();
    assert!(!schema.is_null(), "{path} documents no event-stream schema");
    json!({"allOf": [schema], "components": document["components"]})
}

/// The events of an event stream, each as `{data, event}` the way a parser reads it.
fn parse_events(text: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let data: Vec<&str> = block.lines().filter_map(|line| line.strip_prefix("data:")).map(|d| d.strip_prefix(' ').unwrap_or(d)).collect();
            let event = block.lines().find_map(|line| line.strip_prefix("event:")).map_or("message", str::trim);
            json!({"data": data.join("\n"), "event": event})
        })
        .collect()
}

async fn stream(path: &str, body: Value) -> Vec<Value> {
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a well-formed request");
    let response = real_app(512, false).oneshot(request).await.expect("the router answers");
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("the body");
    parse_events(std::str::from_utf8(&bytes).expect("UTF-8 events"))
}

fn check(path: &str, events: &[Value], object: &str) {
    let validator = jsonschema::validator_for(&event_schema(path)).expect("a valid schema");
    assert!(events.len() >= 2, "{events:?}");
    for event in events {
        let errors: Vec<String> = validator.iter_errors(event).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{path}: {event} violates the documented event schema: {errors:?}");
    }
    let (last, chunks) = events.split_last().expect("events");
    assert_eq!(last["data"], "[DONE]");
    for chunk in chunks {
        let chunk: Value = serde_json::from_str(chunk["data"].as_str().unwrap_or_default()).expect("a JSON chunk");
        assert_eq!(chunk["object"], object, "{chunk}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_completions_and_chats_match_their_documented_events() {
    let body = json!({"model": REAL_MODEL_ID, "prompt": "<unused11>", "stream": true, "max_tokens": 4, "not_an_openai_field": [1, 2]});
    check("/v1/completions", &stream("/v1/completions", body).await, "text_completion");
    let body = json!({
        "model": REAL_MODEL_ID, "stream": true, "max_tokens": 4, "logprobs": true, "top_logprobs": 2,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Say hi."}]
    });
    check("/v1/chat/completions", &stream("/v1/chat/completions", body).await, "chat.completion.chunk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_matches_its_documented_events() {
    let body = json!({"model": REAL_MODEL_ID, "stream": true, "max_output_tokens": 4, "input": "Say hi.", "not_an_openai_field": 1});
    let events = stream("/v1/responses", body).await;
    let validator = jsonschema::validator_for(&event_schema("/v1/responses")).expect("a valid schema");
    for event in &events {
        let errors: Vec<String> = validator.iter_errors(event).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{event} violates the documented event schema: {errors:?}");
        let data: Value = serde_json::from_str(event["data"].as_str().unwrap_or_default()).expect("a JSON event");
        assert_eq!(data["type"], event["event"], "each event names its type twice");
    }
    let last = events.last().expect("events")["event"].as_str().unwrap_or_default().to_string();
    assert!(["response.completed", "response.incomplete"].contains(&last.as_str()), "{events:?}");
}
