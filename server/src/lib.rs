//! Tessera: one quantized base model, many LoRA adapters, served over the OpenAI API.

pub mod api;
pub mod bench;
pub mod chat_template;
pub mod config;
pub mod dataset;
pub mod engine;
pub mod metrics;
pub mod generate;
pub mod gguf;
pub mod model;
pub mod model_store;
pub mod plugins;
pub mod registry;
pub mod sampler;
pub mod store;
pub mod tokenizer;
pub mod train;

use std::path::Path;

pub use model::{Gemma3, ModelError};
pub use tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
}

/// A model file's weights and tokenizer, read once.
pub struct LoadedModel {
    pub model: Gemma3,
    pub tokenizer: Tokenizer,
}

impl LoadedModel {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_with(path, model::Kernels::Best)
    }

    pub fn load_with(path: &Path, kernels: model::Kernels) -> Result<Self, LoadError> {
        let gguf = gguf::GgufFile::open(path)?;
        let model = Gemma3::load(&gguf, kernels)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        Ok(Self { model, tokenizer })
    }
}
