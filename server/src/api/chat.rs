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
use crate::tool_calls::{self, CallStream, ParsedCall, StreamPiece, ToolSyntax};

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
            content((ChatCompletion = "application/json"), (super::types::ServerSentEvent = "text/event-stream"))),
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
    let turns = validate::chat_turns(&req.messages)?;
    let tools = validate::tools(&req, sampling.constraint.as_ref())?;
    let declared: Vec<String> = tools.iter().flat_map(|t| &t.definitions).map(|d| d.name.clone()).collect();
    let generation = validate::generation(&sampling, max_tokens, top_logprobs, false);
    let run = app.inference.chat(req.model.clone(), turns, validate::adapters(&req.sampling), tools, generation).await?;
    let prompt_tokens: usize = run.prompts.iter().map(Vec::len).sum();
    let (adapters, receivers, max_tokens) = (&run.leases, run.receivers, run.max_tokens);
    let tokenizer = app.inference.tokenizer();
    let id = format!("chatcmpl-{:016x}", rand::random::<u64>());
    let created = unix_time();
    tracing::info!(%id, prompt_tokens, max_tokens, n = sampling.n, stream = sampling.stream, "chat completion");

    if sampling.stream && run.plugin.is_none() {
        let calls = run.tool_syntax.map(|syntax| CallStream::new(syntax, declared));
        let stream = chat_stream(app.clone(), receivers, id, created, req.model, &sampling, calls);
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
    for (index, (r, answer)) in results.into_iter().zip(answers).enumerate() {
        let (message, called) = assistant_message(answer, run.tool_syntax, &declared);
        choices.push(ChatChoice {
            index,
            logprobs: top_logprobs.map(|_| chat_logprobs(tokenizer, &r.tokens)),
            finish_reason: if called { "tool_calls" } else { finish_reason(r.finished.reason) },
            message,
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
            delta: ChatDelta { role, content, tool_calls: None },
            logprobs: None,
            finish_reason: finish,
        };
        events.push(chunk(vec![delta(Some("assistant"), Some(String::new()), None)], None));
        events.push(chunk(vec![delta(None, choice.message.content.clone(), None)], None));
        events.push(chunk(vec![delta(None, None, Some(choice.finish_reason))], None));
    }
    if include_usage {
        events.push(chunk(Vec::new(), Some(completion.usage.clone())));
    }
    events.push(Ok(SseEvent::default().data("[DONE]")));
    events
}

/// An answer as the assistant's message: with tools offered (`declared` names them), the calls
/// it wrote are parsed out of its text. Returns whether it made any.
fn assistant_message(answer: String, syntax: Option<ToolSyntax>, declared: &[String]) -> (AssistantMessage, bool) {
    let Some(syntax) = syntax else {
        return (AssistantMessage { role: "assistant", content: Some(answer), tool_calls: None }, false);
    };
    let (content, calls) = tool_calls::parse(syntax, declared, &answer);
    if calls.is_empty() {
        return (AssistantMessage { role: "assistant", content: Some(content), tool_calls: None }, false);
    }
    let calls = calls.into_iter().map(|c| ToolCall { id: call_id(), r#type: "function".into(), function: FunctionCall { name: c.name, arguments: c.arguments } }).collect();
    (AssistantMessage { role: "assistant", content: (!content.is_empty()).then_some(content), tool_calls: Some(calls) }, true)
}

fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// Bytes of `function.arguments` per streamed delta.
const ARGUMENT_PIECE: usize = 16;

/// A parsed call as OpenAI streams one: a delta naming it, then its arguments in pieces.
fn call_deltas(index: usize, call: ParsedCall) -> Vec<ToolCallDelta> {
    let mut deltas = vec![ToolCallDelta {
        index,
        id: Some(call_id()),
        r#type: Some("function"),
        function: FunctionCallDelta { name: Some(call.name), arguments: String::new() },
    }];
    let mut rest = call.arguments.as_str();
    while !rest.is_empty() {
        let mut cut = ARGUMENT_PIECE.min(rest.len());
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        deltas.push(ToolCallDelta { index, id: None, r#type: None, function: FunctionCallDelta { name: None, arguments: rest[..cut].to_string() } });
        rest = &rest[cut..];
    }
    deltas
}

/// Token counts summed over a stream's choices.
#[derive(Default)]
struct Totals {
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

/// One streamed choice: whether its role chunk went out, and with tools, the text-or-calls
/// splitter and how many calls it has sent.
struct ChoiceStream {
    opened: bool,
    calls: Option<CallStream>,
    sent_calls: usize,
}

impl ChoiceStream {
    /// The deltas for a piece of the answer's text.
    fn deltas(&mut self, text: String) -> Vec<ChatDelta> {
        let pieces = match self.calls.as_mut() {
            None => vec![StreamPiece::Content(text)],
            Some(calls) => calls.feed(&text),
        };
        self.to_deltas(pieces)
    }

    /// The deltas for the answer's end.
    fn finish(&mut self, trailing: String) -> Vec<ChatDelta> {
        let mut pieces = match self.calls.as_mut() {
            None => vec![StreamPiece::Content(trailing)],
            Some(calls) => {
                let mut pieces = calls.feed(&trailing);
                pieces.extend(calls.finish());
                pieces
            }
        };
        pieces.retain(|p| !matches!(p, StreamPiece::Content(t) if t.is_empty()));
        self.to_deltas(pieces)
    }

    fn to_deltas(&mut self, pieces: Vec<StreamPiece>) -> Vec<ChatDelta> {
        pieces
            .into_iter()
            .flat_map(|piece| match piece {
                StreamPiece::Content(text) => vec![ChatDelta { role: None, content: Some(text), tool_calls: None }],
                StreamPiece::Call(call) => {
                    self.sent_calls += 1;
                    call_deltas(self.sent_calls - 1, call)
                        .into_iter()
                        .map(|d| ChatDelta { role: None, content: None, tool_calls: Some(vec![d]) })
                        .collect()
                }
            })
            .collect()
    }
}

/// The streamed response: a role chunk per choice, content chunks as tokens arrive (with tools,
/// each call as its own chunks once it is complete), a chunk with each choice's
/// `finish_reason`, the usage chunk if asked, then `[DONE]`. With tools, `calls` is the splitter
/// each choice's text starts in.
fn chat_stream(
    app: Arc<App>,
    receivers: Vec<tokio::sync::mpsc::UnboundedReceiver<Event>>,
    id: String,
    created: u64,
    model: String,
    sampling: &Sampling,
    calls: Option<CallStream>,
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
    let mut choices: Vec<ChoiceStream> = (0..n).map(|_| ChoiceStream { opened: false, calls: calls.clone(), sent_calls: 0 }).collect();
    sse_stream(
        receivers,
        Totals::default(),
        move |totals, index, event| {
            let choice = |delta, logprobs, finish| ChatChunkChoice { index, delta, logprobs, finish_reason: finish };
            let state = &mut choices[index];
            let mut out = Vec::new();
            if !std::mem::replace(&mut state.opened, true) {
                let role = ChatDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
                out.push(chunk(vec![choice(role, None, None)], None));
            }
            match event {
                Event::Token(t) => {
                    let mut logprobs = t.logprob.is_some().then(|| chat_logprobs(app.inference.tokenizer(), std::slice::from_ref(&t)));
                    for delta in state.deltas(t.text) {
                        out.push(chunk(vec![choice(delta, logprobs.take(), None)], None));
                    }
                }
                Event::Finished(f) => {
                    totals.prompt_tokens = f.prompt_tokens;
                    totals.cached_tokens = totals.cached_tokens.max(f.cached_tokens);
                    totals.completion_tokens += f.completion_tokens;
                    for delta in state.finish(f.trailing_text) {
                        out.push(chunk(vec![choice(delta, None, None)], None));
                    }
                    let reason = if state.sent_calls > 0 { "tool_calls" } else { finish_reason(f.reason) };
                    let empty = ChatDelta { role: None, content: None, tool_calls: None };
                    out.push(chunk(vec![choice(empty, None, Some(reason))], None));
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
