//! `POST /v1/embeddings`: OpenAI's request and response, with Tessera's `adapters`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AdapterRef;

/// `input`: a string, a list of strings, token ids, or a list of token-id lists.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// How each vector is written: JSON numbers, or base64 of its little-endian float32 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct EmbeddingRequest {
    /// The base, an adapter, or a plugin model (its adapters), as for chat.
    pub model: String,
    pub input: EmbeddingInput,
    /// Defaults to `float`.
    pub encoding_format: Option<EncodingFormat>,
    /// Must be the model's embedding size (see `embeddings.dimensions` in `/v1/models`) when
    /// given: vectors are never truncated.
    pub dimensions: Option<u32>,
    /// Accepted for compatibility; not used.
    pub user: Option<String>,
    /// Extension: more adapters composed with `model`'s, as in chat.
    pub adapters: Option<Vec<AdapterRef>>,
}

/// One vector: numbers, or base64 with `encoding_format: base64`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Embedding {
    /// `embedding`.
    pub object: &'static str,
    /// The input's place in `input`.
    pub index: usize,
    pub embedding: EmbeddingVector,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingList {
    /// `list`.
    pub object: &'static str,
    pub data: Vec<Embedding>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

/// How a model's embeddings are made (in `/v1/models`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EmbeddingInfo {
    /// `mean`: the mean over the input's tokens of the final hidden states, after the final norm.
    pub pooling: &'static str,
    /// Always true: every vector has L2 norm 1.
    pub normalized: bool,
    /// The length of every vector: the model's hidden size.
    pub dimensions: usize,
}
