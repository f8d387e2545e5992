//! `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`: OpenAI's Responses API over the
//! chat path, with responses kept for `previous_response_id` continuations.

mod parse;
mod stream;

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use super::respond::collect;
use super::types::responses::*;
use super::{unix_time, with_generations, ApiJson, App, AppError};
use crate::engine::{FinishReason, Finished};
use crate::services::responses::{self, Item};

/// Creates a model response to the input items, after the conversation of
/// `previous_response_id` when given.
#[utoipa::path(
    post,
    path = "/v1/responses",
    tag = "OpenAI",
    request_body = CreateResponseRequest,
    responses(
        (status = 200, description = "The response, or with `stream` its typed server-sent events ending in `response.completed` (or `response.incomplete`)",
            content((ResponseObject = "application/json"), (ResponseStreamEvent = "text/event-stream"))),
        (status = 400, description = "Invalid parameter, an input item of an unknown type (named as `input[i]`), or the conversation over the context", body = super::error::ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorResponse),
        (status = 404, description = "Unknown model or `previous_response_id`", body = super::error::ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = super::error::ErrorResponse),
    )
)]
pub async fn create_response(State(app): State<Arc<App>>, ApiJson(req): ApiJson<CreateResponseRequest>) -> Result<Response, AppError> {
    let (new, stream) = parse::new_response(&req)?;
    let (temperature, top_p) = (new.generation.sampling.temperature, new.generation.sampling.top_p);
    let mut started = app.responses.create(new).await?;
    let shell = shell(&req, started.id.clone(), temperature, top_p);
    tracing::info!(id = %started.id, prompt_tokens = started.running.prompts[0].len(), stream, "response");
    let leases = std::mem::take(&mut started.running.leases);
    if stream {
        return Ok(with_generations(stream::events(app, started, shell).into_response(), &leases));
    }
    let receiver = started.running.receivers.pop().ok_or_else(|| AppError::Internal("the chat ran no choice".into()))?;
    let collected = collect(receiver).await?;
    let answer = match started.running.plugin.take() {
        Some(turn) => app.inference.check_answers(turn, vec![collected.text.clone()]).await?.pop().unwrap_or_default(),
        None => collected.text.clone(),
    };
    let items = responses::output_items(answer, started.running.tool_syntax, &started.declared);
    let body = finished(shell, render(&items), &collected.finished);
    let stored = serde_json::to_string(&body).map_err(|e| AppError::Internal(e.to_string()))?;
    app.responses.keep(started.pending, &items, stored).await?;
    Ok(with_generations(axum::Json(body).into_response(), &leases))
}

/// Retrieves a stored response.
#[utoipa::path(
    get,
    path = "/v1/responses/{id}",
    tag = "OpenAI",
    params(("id" = String, Path, description = "The response's id")),
    responses(
        (status = 200, description = "The response as it was returned", body = ResponseObject),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorResponse),
        (status = 404, description = "No stored response has this id (or it was created with `store: false`)", body = super::error::ErrorResponse),
    )
)]
pub async fn get_response(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<Response, AppError> {
    let body = app.responses.get(&id).await?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Deletes a stored response.
#[utoipa::path(
    delete,
    path = "/v1/responses/{id}",
    tag = "OpenAI",
    params(("id" = String, Path, description = "The response's id")),
    responses(
        (status = 200, description = "Deleted", body = ResponseDeleted),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorResponse),
        (status = 404, description = "No stored response has this id", body = super::error::ErrorResponse),
    )
)]
pub async fn delete_response(State(app): State<Arc<App>>, Path(id): Path<String>) -> Result<axum::Json<ResponseDeleted>, AppError> {
    app.responses.delete(&id).await?;
    Ok(axum::Json(ResponseDeleted { id, object: "response.deleted".into(), deleted: true }))
}

/// The response before any output: what the request asked for, `in_progress`.
fn shell(req: &CreateResponseRequest, id: String, temperature: f32, top_p: f32) -> ResponseObject {
    let format = req.text.as_ref().and_then(|t| t.format.clone()).unwrap_or_else(|| serde_json::json!({"type": "text"}));
    ResponseObject {
        id,
        object: "response".into(),
        created_at: unix_time(),
        status: "in_progress".into(),
        error: None,
        incomplete_details: None,
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        model: req.model.clone(),
        output: Vec::new(),
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
        previous_response_id: req.previous_response_id.clone(),
        temperature,
        top_p,
        text: TextSettings { format },
        tool_choice: req.tool_choice.clone().unwrap_or_else(|| ResponseToolChoice::Mode("auto".into())),
        tools: req.tools.clone().unwrap_or_default(),
        truncation: "disabled".into(),
        usage: None,
        store: req.store.unwrap_or(true),
        metadata: req.metadata.clone().unwrap_or_default(),
    }
}

/// The response once generation ended: its output, usage, and whether it was cut short.
fn finished(mut body: ResponseObject, output: Vec<OutputItem>, f: &Finished) -> ResponseObject {
    body.output = output;
    body.usage = Some(usage(f.prompt_tokens, f.cached_tokens, f.completion_tokens));
    match f.reason {
        FinishReason::Stop => body.status = "completed".into(),
        FinishReason::Length => {
            body.status = "incomplete".into();
            body.incomplete_details = Some(IncompleteDetails { reason: "max_output_tokens".into() });
        }
    }
    body
}

fn usage(input_tokens: usize, cached_tokens: usize, output_tokens: usize) -> ResponseUsage {
    ResponseUsage {
        input_tokens,
        input_tokens_details: InputTokensDetails { cached_tokens },
        output_tokens,
        output_tokens_details: OutputTokensDetails { reasoning_tokens: 0 },
        total_tokens: input_tokens + output_tokens,
    }
}

/// Output items as the API shows them, each with a new id.
fn render(items: &[Item]) -> Vec<OutputItem> {
    items.iter().filter_map(|item| render_item(item, item_id(item), "completed")).collect()
}

/// An output item as the API shows it, under `id`, with its `status`.
fn render_item(item: &Item, id: String, status: &str) -> Option<OutputItem> {
    match item {
        Item::Message { role, text } => Some(OutputItem::Message {
            id,
            status: status.into(),
            role: role.clone(),
            content: vec![OutputText { r#type: "output_text".into(), text: text.clone(), annotations: Vec::new() }],
        }),
        Item::FunctionCall { call_id, name, arguments } => Some(OutputItem::FunctionCall {
            id,
            call_id: call_id.clone(),
            name: name.clone(),
            arguments: arguments.clone(),
            status: status.into(),
        }),
        Item::FunctionCallOutput { .. } => None,
    }
}

/// A new id for an output item: `msg_…` for a message, `fc_…` for a call.
fn item_id(item: &Item) -> String {
    let prefix = if matches!(item, Item::FunctionCall { .. }) { "fc" } else { "msg" };
    format!("{prefix}_{:032x}", rand::random::<u128>())
}
