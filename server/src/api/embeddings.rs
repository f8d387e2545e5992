//! `POST /v1/embeddings`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::types::embeddings::*;
use super::{validate, with_generations, ApiJson, App, AppError};
use crate::services::inference::Prompt;

/// Creates an embedding of each input: the mean of the model's final hidden states over the
/// input's tokens (after the final norm), L2-normalised, through the adapters `model` and
/// `adapters` name.
#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "OpenAI",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "One embedding per input, in input order", body = EmbeddingList),
        (status = 400, description = "Empty or out-of-vocabulary input, an input over the context, or `dimensions` other than the model's", body = super::error::ErrorResponse),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorResponse),
        (status = 404, description = "Unknown model", body = super::error::ErrorResponse),
        (status = 429, description = "Queue full; see Retry-After", body = super::error::ErrorResponse),
    )
)]
pub async fn embeddings(State(app): State<Arc<App>>, ApiJson(req): ApiJson<EmbeddingRequest>) -> Result<Response, AppError> {
    let inputs = match req.input {
        EmbeddingInput::Text(text) => vec![Prompt::Text(text)],
        EmbeddingInput::Texts(texts) => texts.into_iter().map(Prompt::Text).collect(),
        EmbeddingInput::Tokens(ids) => vec![Prompt::Tokens(ids)],
        EmbeddingInput::TokenLists(lists) => lists.into_iter().map(Prompt::Tokens).collect(),
    };
    let adapters = validate::adapter_choices(req.adapters.as_deref().unwrap_or_default());
    let dimensions = req.dimensions.map(|d| d as usize);
    let embedded = app.inference.embed(req.model.clone(), adapters, inputs, dimensions).await?;
    let format = req.encoding_format.unwrap_or_default();
    let data = embedded
        .vectors
        .into_iter()
        .enumerate()
        .map(|(index, vector)| Embedding { object: "embedding", index, embedding: encode(vector, format) })
        .collect();
    let body = EmbeddingList {
        object: "list",
        data,
        model: req.model,
        usage: EmbeddingUsage { prompt_tokens: embedded.prompt_tokens, total_tokens: embedded.prompt_tokens },
    };
    Ok(with_generations(axum::Json(body).into_response(), &embedded.leases))
}

/// OpenAI's base64 form is the vector's little-endian float32 bytes.
fn encode(vector: Vec<f32>, format: EncodingFormat) -> EmbeddingVector {
    match format {
        EncodingFormat::Float => EmbeddingVector::Float(vector),
        EncodingFormat::Base64 => {
            let bytes: Vec<u8> = vector.iter().flat_map(|v| v.to_le_bytes()).collect();
            EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}
