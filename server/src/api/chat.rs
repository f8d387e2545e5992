//! `POST /v1/chat/completions`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;

use super::respond::{chat_logprobs, collect, finish_reason, sse_error, sse_stream};
use super::types::*;
use super::validate::{self, Sampling};
use super::{unix_time, with_generations, ApiJson, App, AppError};
use crate::engine::Event;

/// The most alternatives `top_logprobs` may ask for.
const MAX_TOP_LOGPROBS: u32 = 20;

/// Creates a model response for the given chat conversation.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "OpenAI",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream` a series of `chat.completion.chunk` server-sent events ending in `[DONE]`",
            content((ChatCompletion = "application/json"), (String = "text/event-stream"))),
        (status = 400, description = "Invalid parameter, or prompt plus max_tokens over the context", body = super::error::ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::error::ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = super::error::ErrorResponse),
    )
)]
pub async fn chat_completions(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, AppError> {
    let sampling = validate::sampling(&req.sampling)?;
    let top_logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(AppError::invalid("top_logprobs", "`top_logprobs` needs `logprobs: true`"))
        }
        (true, Some(k)) if k > MAX_TOP_LOGPROBS => {
            return Err(AppError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}, got {k}"),
            ))
        }
        (true, k) => Some(k.unwrap_or(0) as usize),
        (false, None) => None,
    };
    if req.messages.is_empty() {
        return Err(AppError::invalid("messages", "`messages` must not be empty"));
    }
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(0), _) => return Err(AppError::invalid("max_completion_tokens", "`max_completion_tokens` must be at least 1")),
        (None, Some(0)) => return Err(AppError::invalid("max_tokens", "`max_tokens` must be at least 1")),
        (m, t) => m.or(t).map(|m| m as usize),
    };
    let turns = validate::message_texts(&req.messages)?;
    let generation = validate::generation(&sampling, max_tokens, top_logprobs, false);
    let run = app.inference.chat(req.model.clone(), turns, validate::adapters(&req.sampling), generation).await?;
    let prompt_tokens: usize = run.prompts.iter().map(Vec::len).sum();
    let (adapters, receivers, max_tokens) = (&run.leases, run.receivers, run.max_tokens);
    let tokenizer = app.inference.tokenizer();
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = unix_time();
    tracing::info!(%id, prompt_tokens, max_tokens, n = sampling.n, stream = sampling.stream, "chat completion");

    if sampling.stream && run.plugin.is_none() {
        let stream = chat_stream(app.clone(), receivers, id, created, req.model, &sampling);
        return Ok(with_generations(Sse::new(stream).keep_alive(KeepAlive::default()).into_response(), adapters));
    }

    let results = futures::future::try_join_all(receivers.into_iter().map(collect)).await?;
    let completion_tokens = results.iter().map(|r| r.finished.completion_tokens).sum();
    // The prompt is counted once, so is what of it was cached (the most any choice found).
    let cached_tokens = results.iter().map(|r| r.finished.cached_tokens).max().unwrap_or(0);
    // A plugin validates or normalises each answer.
    let texts: Vec<String> = results.iter().map(|r| r.text.clone()).collect();
    let answers = match &run.plugin {
        Some(turn) => app.inference.check_answers(turn.clone(), texts).await?,
        None => texts,
    };
    let mut choices = Vec::with_capacity(results.len());
    for (index, (r, content)) in results.into_iter().zip(answers).enumerate() {
        choices.push(ChatChoice {
            index,
            logprobs: top_logprobs.map(|_| chat_logprobs(tokenizer, &r.tokens)),
            finish_reason: finish_reason(r.finished.reason),
            message: AssistantMessage {
                role: "assistant",
                content,
            },
        });
    }
    let completion = ChatCompletion {
        id,
        object: "chat.completion",
        created,
        model: req.model,
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens, cached_tokens),
        system_fingerprint: run.plugin.as_ref().map(|turn| turn.plugin.fingerprint()),
    };
    let response = if sampling.stream {
        Sse::new(futures::stream::iter(whole_answer_events(completion, sampling.include_usage))).into_response()
    } else {
        axum::Json(completion).into_response()
    };
    Ok(with_generations(response, adapters))
}

/// A finished completion as a chat stream: for plugin models, whose answers are only final once
/// the plugin has checked them, each choice's whole answer arrives as one content chunk.
fn whole_answer_events(completion: ChatCompletion, include_usage: bool) -> Vec<Result<SseEvent, Infallible>> {
    let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| {
        let body = ChatCompletionChunk {
            id: completion.id.clone(),
            object: "chat.completion.chunk",
            created: completion.created,
            model: completion.model.clone(),
            choices,
            usage,
            system_fingerprint: completion.system_fingerprint.clone(),
        };
        Ok(SseEvent::default().json_data(body).unwrap_or_default())
    };
    let mut events = Vec::new();
    for choice in &completion.choices {
        let delta = |role, content: Option<String>, finish| ChatChunkChoice {
            index: choice.index,
            delta: ChatDelta { role, content },
            logprobs: None,
            finish_reason: finish,
        };
        events.push(chunk(vec![delta(Some("assistant"), Some(String::new()), None)], None));
        events.push(chunk(vec![delta(None, Some(choice.message.content.clone()), None)], None));
        events.push(chunk(vec![delta(None, None, Some(choice.finish_reason))], None));
    }
    if include_usage {
        events.push(chunk(Vec::new(), Some(completion.usage.clone())));
    }
    events.push(Ok(SseEvent::default().data("[DONE]")));
    events
}

/// Token counts summed over a stream's choices.
#[derive(Default)]
struct Totals {
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

/// The streamed response: a role chunk per choice, content chunks as tokens arrive, a chunk with
/// each choice's `finish_reason`, the usage chunk if asked, then `[DONE]`.
fn chat_stream(
    app: Arc<App>,
    receivers: Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>,
    id: String,
    created: u64,
    model: String,
    sampling: &Sampling,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let n = receivers.len();
    let include_usage = sampling.include_usage;
    let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| {
        let body = ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model.clone(),
            choices,
            usage,
            system_fingerprint: None,
        };
        SseEvent::default().json_data(body).unwrap_or_default()
    };
    let end_chunk = chunk.clone();
    let mut opened = vec![false; n];
    sse_stream(
        receivers,
        Totals::default(),
        move |totals, index, event| {
            let choice = |role, content: String, logprobs, finish| ChatChunkChoice {
                index,
                delta: ChatDelta {
                    role,
                    content: Some(content),
                },
                logprobs,
                finish_reason: finish,
            };
            let mut out = Vec::new();
            if !std::mem::replace(&mut opened[index], true) {
                out.push(chunk(vec![choice(Some("assistant"), String::new(), None, None)], None));
            }
            match event {
                Event::Token(t) => {
                    let logprobs = t
                        .logprob
                        .is_some()
                        .then(|| chat_logprobs(app.inference.tokenizer(), std::slice::from_ref(&t)));
                    out.push(chunk(vec![choice(None, t.text, logprobs, None)], None));
                }
                Event::Finished(f) => {
                    totals.prompt_tokens = f.prompt_tokens;
                    totals.cached_tokens = totals.cached_tokens.max(f.cached_tokens);
                    totals.completion_tokens += f.completion_tokens;
                    let reason = Some(finish_reason(f.reason));
                    out.push(chunk(vec![choice(None, f.trailing_text, None, reason)], None));
                }
                Event::Failed(message) => out.push(sse_error(message)),
            }
            out
        },
        move |totals| {
            if !include_usage {
                return Vec::new();
            }
            vec![end_chunk(
                Vec::new(),
                Some(Usage::new(totals.prompt_tokens, totals.completion_tokens, totals.cached_tokens)),
            )]
        },
    )
}
