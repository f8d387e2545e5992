//! `POST /tokenize` and `POST /detokenize` (vLLM's extensions).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::types::{DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse};
use super::validate;
use super::{ApiJson, App, AppError};

/// Token ids of a prompt, or of chat messages rendered through the chat template.
#[utoipa::path(post, path = "/tokenize", tag = "Extensions", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = super::error::ErrorResponse),
              (status = 404, body = super::error::ErrorResponse)))]
pub async fn tokenize(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, AppError> {
    if let Some(model) = &req.model {
        app.inference.check_model(model)?;
    }
    let bos = req.add_special_tokens.unwrap_or(true);
    let tokens = match (req.prompt, &req.messages) {
        (Some(prompt), None) => app.inference.tokenize(prompt, bos).await?,
        (None, Some(messages)) => {
            let turns = validate::chat_turns(messages)?;
            app.inference.tokenize_chat(turns, req.add_generation_prompt.unwrap_or(true), bos).await?
        }
        _ => return Err(AppError::invalid("prompt", "give exactly one of `prompt` and `messages`")),
    };
    Ok(Json(TokenizeResponse { count: tokens.len(), tokens, max_model_len: app.inference.ctx_len() }))
}

/// The text of token ids (control tokens included verbatim).
#[utoipa::path(post, path = "/detokenize", tag = "Extensions", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = super::error::ErrorResponse),
              (status = 404, description = "Unknown model", body = super::error::ErrorResponse)))]
pub async fn detokenize(
    State(app): State<Arc<App>>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, AppError> {
    if let Some(model) = &req.model {
        app.inference.check_model(model)?;
    }
    let prompt = app.inference.detokenize(&req.tokens)?;
    Ok(Json(DetokenizeResponse { prompt }))
}
