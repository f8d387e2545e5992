//! Gathering engine events into responses, and formatting tokens for logprobs.

use tokio::sync::mpsc::UnboundedReceiver;

use super::types::{ChatLogprobs, TokenLogprobEntry, TopLogprob};
use super::AppError;
use crate::engine::{Event, FinishReason, Finished, GeneratedToken, TokenLogprob};
use crate::tokenizer::Tokenizer;

pub struct Collected {
    pub tokens: Vec<GeneratedToken>,
    pub text: String,
    pub finished: Finished,
}

impl Collected {
    pub fn token_ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

/// Waits for a whole generation.
pub async fn collect(mut events: UnboundedReceiver<Event>) -> Result<Collected, AppError> {
    let mut tokens = Vec::new();
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(t) => {
                text.push_str(&t.text);
                tokens.push(t);
            }
            Event::Finished(finished) => {
                text.push_str(&finished.trailing_text);
                return Ok(Collected {
                    tokens,
                    text,
                    finished,
                });
            }
            Event::Failed(message) => return Err(AppError::Internal(message)),
        }
    }
    Err(AppError::Unavailable)
}

pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// A token as text (lossy for a lone byte of a multi-byte character) and its exact bytes.
pub fn token_text(tokenizer: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tokenizer.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn top_entry(tokenizer: &Tokenizer, t: &TokenLogprob) -> TopLogprob {
    let (token, bytes) = token_text(tokenizer, t.id);
    TopLogprob {
        token,
        logprob: t.logprob,
        bytes,
    }
}

/// Chat's `logprobs.content` entries for generated tokens.
pub fn chat_logprobs(tokenizer: &Tokenizer, tokens: &[GeneratedToken]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .filter_map(|t| {
                let lp = t.logprob.as_ref()?;
                let top = top_entry(tokenizer, lp);
                Some(TokenLogprobEntry {
                    token: top.token,
                    logprob: top.logprob,
                    bytes: top.bytes,
                    top_logprobs: t.top_logprobs.iter().map(|a| top_entry(tokenizer, a)).collect(),
                })
            })
            .collect(),
    }
}

/// Merges the choices' event streams into server-sent events: `on_event` turns each event of
/// choice `i` into chunks, `on_end` adds the closing chunks once every choice is done, and
/// `[DONE]` ends the stream. Dropping the stream (a client that left) drops the receivers, which
/// cancels the generations.
pub fn sse_stream<S: Send + 'static>(
    receivers: Vec<UnboundedReceiver<Event>>,
    state: S,
    on_event: impl FnMut(&mut S, usize, Event) -> Vec<axum::response::sse::Event> + Send + 'static,
    on_end: impl FnOnce(&mut S) -> Vec<axum::response::sse::Event> + Send + 'static,
) -> impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>> {
    use futures::StreamExt;
    let merged = futures::stream::select_all(receivers.into_iter().enumerate().map(|(i, rx)| {
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |e| (i, e))
    }));
    futures::stream::unfold(
        Some((merged, state, on_event, on_end)),
        |st| async move {
            let (mut merged, mut state, mut on_event, on_end) = st?;
            match merged.next().await {
                Some((i, event)) => {
                    let out = on_event(&mut state, i, event);
                    Some((out, Some((merged, state, on_event, on_end))))
                }
                None => {
                    let mut out = on_end(&mut state);
                    out.push(axum::response::sse::Event::default().data("[DONE]"));
                    Some((out, None))
                }
            }
        },
    )
    .flat_map(futures::stream::iter)
    .map(Ok)
}

/// An error inside a stream, as its own event in OpenAI's error shape.
pub fn sse_error(message: String) -> axum::response::sse::Event {
    axum::response::sse::Event::default()
        .json_data(AppError::Internal(message).body())
        .unwrap_or_default()
}
