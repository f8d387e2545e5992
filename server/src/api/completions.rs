//! `POST /v1/completions`.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::respond::{collect, finish_reason, sse_error, sse_stream, token_text};
use super::types::*;
use super::validate;
use super::{unix_time, with_generations, ApiJson, App, AppError};
use crate::services::inference::Prompt;
use crate::engine::{Event, GeneratedToken, TokenLogprob};
use crate::tokenizer::Tokenizer;

/// OpenAI's limit on `logprobs` for completions.
const MAX_LOGPROBS: u32 = 5;
/// Defaults to 16 tokens, as in OpenAI's API.
const DEFAULT_MAX_TOKENS: usize = 16;

/// Creates a completion for the prompt(s).
#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "OpenAI",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or with `stream` a series of `text_completion` server-sent events ending in `[DONE]`",
            content((Completion = "application/json"), (super::types::ServerSentEvent = "text/event-stream"))),
        (status = 400, description = "Invalid parameter, or prompt plus max_tokens over the context", body = super::error::ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::error::ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = super::error::ErrorResponse),
    )
)]
pub async fn completions(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, AppError> {
    let prompts = match &req.prompt {
        PromptInput::Text(text) => vec![Prompt::Text(text.clone())],
        PromptInput::Texts(texts) => texts.iter().cloned().map(Prompt::Text).collect(),
        PromptInput::Tokens(ids) => vec![Prompt::Tokens(ids.clone())],
        PromptInput::TokenLists(lists) => lists.iter().cloned().map(Prompt::Tokens).collect(),
    };
    let sampling = validate::sampling(&req.sampling)?;
    let logprobs = match req.logprobs {
        Some(k) if k > MAX_LOGPROBS => {
            return Err(AppError::invalid("logprobs", format!("`logprobs` must be between 0 and {MAX_LOGPROBS}, got {k}")))
        }
        k => k.map(|k| k as usize),
    };
    let echo = req.echo.unwrap_or(false);
    let return_token_ids = req.return_token_ids.unwrap_or(false);
    let max_tokens = req.max_tokens.map_or(DEFAULT_MAX_TOKENS, |m| m as usize);
    if max_tokens == 0 {
        return Err(AppError::invalid("max_tokens", "`max_tokens` must be at least 1"));
    }
    let generation = validate::generation(&sampling, Some(max_tokens), logprobs, echo && logprobs.is_some());
    let run = app.inference.complete(req.model.clone(), validate::adapters(&req.sampling), prompts, generation).await?;
    let (prompts, adapters, receivers) = (run.prompts, run.leases, run.receivers);
    let tokenizer = app.inference.tokenizer();
    let id = format!("cmpl-{:016x}", rand::random::<u64>());
    let created = unix_time();
    let n = sampling.n;
    tracing::info!(%id, prompts = prompts.len(), max_tokens, n, stream = sampling.stream, "completion");

    if sampling.stream {
        let include_usage = sampling.include_usage;
        let prompt_tokens: usize = prompts.iter().map(Vec::len).sum();
        let app2 = app.clone();
        let model = req.model.clone();
        let chunk = move |choices: Vec<CompletionChoice>, usage: Option<Usage>| {
            SseEvent::default()
                .json_data(Completion {
                    id: id.clone(),
                    object: "text_completion",
                    created,
                    model: model.clone(),
                    choices,
                    usage,
                })
                .unwrap_or_default()
        };
        let end_chunk = chunk.clone();
        let mut opened = vec![false; receivers.len()];
        let mut offsets = vec![0usize; receivers.len()];
        let stream = sse_stream(
            receivers,
            (0usize, vec![0usize; prompts.len()]),
            move |(completion_tokens, cached), index, event| {
                let tokenizer = app2.inference.tokenizer();
                let prompt = &prompts[index / n];
                let mut out = Vec::new();
                if !std::mem::replace(&mut opened[index], true) && (echo || return_token_ids) {
                    let text = if echo { decode(tokenizer, prompt) } else { String::new() };
                    offsets[index] = text.chars().count();
                    out.push(chunk(
                        vec![CompletionChoice {
                            index,
                            text,
                            logprobs: None,
                            finish_reason: None,
                            prompt_token_ids: return_token_ids.then(|| prompt.clone()),
                            token_ids: None,
                        }],
                        None,
                    ));
                }
                match event {
                    Event::Token(t) => {
                        let lp = logprobs.map(|_| {
                            let mut lp = CompletionLogprobs::default();
                            push_token(&mut lp, tokenizer, &t, &mut offsets[index]);
                            lp
                        });
                        out.push(chunk(
                            vec![CompletionChoice {
                                index,
                                text: t.text,
                                logprobs: lp,
                                finish_reason: None,
                                prompt_token_ids: None,
                                token_ids: return_token_ids.then(|| vec![t.id]),
                            }],
                            None,
                        ));
                    }
                    Event::Finished(f) => {
                        *completion_tokens += f.completion_tokens;
                        cached[index / n] = cached[index / n].max(f.cached_tokens);
                        out.push(chunk(
                            vec![CompletionChoice {
                                index,
                                text: f.trailing_text,
                                logprobs: None,
                                finish_reason: Some(finish_reason(f.reason)),
                                prompt_token_ids: None,
                                token_ids: None,
                            }],
                            None,
                        ));
                    }
                    Event::Failed(message) => out.push(sse_error(message)),
                }
                out
            },
            move |(completion_tokens, cached)| {
                if !include_usage {
                    return Vec::new();
                }
                let cached_tokens = cached.iter().sum();
                vec![end_chunk(Vec::new(), Some(Usage::new(prompt_tokens, *completion_tokens, cached_tokens)))]
            },
        );
        return Ok(with_generations(
            Sse::new(stream).keep_alive(KeepAlive::default()).into_response(),
            &adapters,
        ));
    }

    let results = futures::future::try_join_all(receivers.into_iter().map(collect)).await?;
    let mut choices = Vec::with_capacity(results.len());
    let mut completion_tokens = 0;
    // Each prompt counts once, with the most of it any of its choices found cached.
    let mut cached = vec![0usize; prompts.len()];
    for (index, r) in results.into_iter().enumerate() {
        let prompt = &prompts[index / n];
        completion_tokens += r.finished.completion_tokens;
        cached[index / n] = cached[index / n].max(r.finished.cached_tokens);
        let prompt_text = if echo { decode(tokenizer, prompt) } else { String::new() };
        let lp = logprobs.map(|_| {
            let mut lp = CompletionLogprobs::default();
            let mut offset = 0;
            if echo {
                push_prompt(&mut lp, tokenizer, prompt, r.finished.prompt_logprobs.as_deref(), &mut offset);
            }
            for t in &r.tokens {
                push_token(&mut lp, tokenizer, t, &mut offset);
            }
            lp
        });
        choices.push(CompletionChoice {
            index,
            token_ids: return_token_ids.then(|| r.token_ids()),
            prompt_token_ids: return_token_ids.then(|| prompt.clone()),
            text: prompt_text + &r.text,
            logprobs: lp,
            finish_reason: Some(finish_reason(r.finished.reason)),
        });
    }
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let response = axum::Json(Completion {
        id,
        object: "text_completion",
        created,
        model: req.model,
        choices,
        usage: Some(Usage::new(prompt_tokens, completion_tokens, cached.iter().sum())),
    })
    .into_response();
    Ok(with_generations(response, &adapters))
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> String {
    tokenizer.decode(ids, true).unwrap_or_default()
}

fn top_map(tokenizer: &Tokenizer, top: &[TokenLogprob]) -> BTreeMap<String, f32> {
    top.iter()
        .map(|t| (token_text(tokenizer, t.id).0, t.logprob))
        .collect()
}

fn push_token(lp: &mut CompletionLogprobs, tokenizer: &Tokenizer, t: &GeneratedToken, offset: &mut usize) {
    let (text, _) = token_text(tokenizer, t.id);
    lp.text_offset.push(*offset);
    *offset += text.chars().count();
    lp.tokens.push(text);
    lp.token_logprobs.push(t.logprob.as_ref().map(|l| l.logprob));
    lp.top_logprobs.push(Some(top_map(tokenizer, &t.top_logprobs)));
}

/// The echoed prompt's tokens: the first has no logprob (nothing precedes it).
fn push_prompt(
    lp: &mut CompletionLogprobs,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    scored: Option<&[(TokenLogprob, Vec<TokenLogprob>)]>,
    offset: &mut usize,
) {
    for (i, &id) in prompt.iter().enumerate() {
        let (text, _) = token_text(tokenizer, id);
        lp.text_offset.push(*offset);
        if !tokenizer.is_control(id) {
            *offset += text.chars().count();
        }
        lp.tokens.push(text);
        let entry = i.checked_sub(1).and_then(|j| scored.and_then(|s| s.get(j)));
        lp.token_logprobs.push(entry.map(|(t, _)| t.logprob));
        lp.top_logprobs.push(entry.map(|(_, top)| top_map(tokenizer, top)));
    }
}
