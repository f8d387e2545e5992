//! Tessera: one quantized base model, many LoRA adapters, served over the OpenAI API.

pub mod access;
pub mod adapter_files;
pub mod api;
pub mod bench;
pub mod chat_template;
pub mod client;
pub mod config;
pub mod dataset;
pub mod engine;
pub mod metrics;
pub mod generate;
pub mod grammar;
pub mod gguf;
pub mod model;
pub mod model_store;
pub mod plugins;
pub mod registry;
pub mod sampler;
pub mod services;
pub mod store;
pub mod tokenizer;
pub mod tool_calls;
pub mod train;

use std::path::Path;

pub use model::{Decoder, ModelError};
pub use chat_template::ChatTemplate;
pub use tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("{path}: {source}")]
    ChatTemplate {
        path: String,
        source: chat_template::TemplateError,
    },
    #[error("reading the chat template {path}: {source}")]
    ChatTemplateFile { path: String, source: std::io::Error },
}

/// A model file's weights, tokenizer and chat template, read once.
pub struct LoadedModel {
    pub model: Decoder,
    pub tokenizer: Tokenizer,
    pub chat: ChatTemplate,
}

/// DoRA adapters measure their row norms against the served weights.
impl tessera_adapters::peft::BaseWeights for LoadedModel {
    fn row_norms(&self, layer: usize, module: tessera_adapters::TargetModule, delta: &tessera_adapters::LoraDelta) -> Result<Vec<f32>, String> {
        self.model.row_norms(layer, module, delta)
    }
}

/// How to load a model beside its path.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub kernels: model::Kernels,
    /// A Jinja chat template file that replaces the model's own.
    pub chat_template: Option<std::path::PathBuf>,
}

impl LoadedModel {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::load_with(path, &LoadOptions::default())
    }

    pub fn load_with(path: &Path, options: &LoadOptions) -> Result<Self, LoadError> {
        let gguf = gguf::GgufFile::open(path)?;
        // The tokenizer first, and what building it freed handed back to the system before the
        // weights are copied: the peak is then the larger of the two builds, not their sum. It is
        // built on a thread of its own, so that its allocations come from that thread's malloc
        // arena: in the main heap, the holes its build left behind were touched again by every
        // later allocation that fitted them (a 512-token prefill's peak was 29 MB higher).
        let tokenizer = std::thread::scope(|scope| scope.spawn(|| Tokenizer::from_gguf(&gguf)).join())
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        return_freed_memory();
        let model = Decoder::load(&gguf, options.kernels)?;
        let override_file = match &options.chat_template {
            Some(file) => Some((
                file.display().to_string(),
                std::fs::read_to_string(file).map_err(|source| LoadError::ChatTemplateFile {
                    path: file.display().to_string(),
                    source,
                })?,
            )),
            None => None,
        };
        let chat = ChatTemplate::select(
            gguf.metadata.get("tokenizer.chat_template").and_then(|v| v.as_str()),
            override_file,
            model.config().family == model::config::Family::Gemma3,
            tokenizer.token_text(tokenizer.bos_id()),
            tokenizer.token_text(tokenizer.eos_id()),
        )
        .map_err(|source| LoadError::ChatTemplate {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self { model, tokenizer, chat })
    }
}

/// Returns the heap memory freed so far to the system. The allocator keeps freed memory for
/// reuse (the binary raises its trim threshold), which would otherwise count twice at load.
fn return_freed_memory() {
    #[cfg(target_os = "linux")]
    // SAFETY: malloc_trim only releases free heap pages; no allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}
