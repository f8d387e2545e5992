//! Embeddings: each input prefilled through the engine, batched with everything else it runs,
//! on the adapters `model` and the request's composition stand for, and pooled there (the mean
//! of the final hidden states after the output norm, L2-normalised).

use std::sync::Arc;

use super::{AdapterChoice, Inference, Leases, Prompt};
use crate::engine::{Event, GenerationRequest};
use crate::sampler::SamplingParams;
use crate::services::{blocking, ServiceError};

/// Every input's embedding, in the order given.
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    /// Tokens of all inputs together.
    pub prompt_tokens: usize,
    pub leases: Leases,
}

impl Inference {
    /// The length of every embedding: the model's hidden size.
    pub fn embedding_dimensions(&self) -> usize {
        self.model.model.config().hidden
    }

    /// Embeds each input on `model` (the base, an adapter, or a plugin model's adapters) with
    /// the request's own `adapters`. `dimensions`, when given, must be the model's own: the
    /// hidden states are not truncated or projected.
    pub async fn embed(self: &Arc<Self>, model: String, adapters: Vec<AdapterChoice>, inputs: Vec<Prompt>, dimensions: Option<usize>) -> Result<Embedded, ServiceError> {
        let own = self.embedding_dimensions();
        if let Some(asked) = dimensions.filter(|&d| d != own) {
            return Err(ServiceError::invalid("dimensions", format!("`dimensions` must be {own}, this model's embedding size, or left out; got {asked}")));
        }
        if inputs.is_empty() {
            return Err(ServiceError::invalid("input", "`input` must not be empty"));
        }
        let (leases, prompts) = self.prepare_embedding(model, adapters, inputs).await?;
        let receivers = prompts
            .iter()
            .map(|prompt| self.engine.submit(embedding_request(prompt.clone(), &leases)))
            .collect::<Result<Vec<_>, _>>()?;
        let vectors = futures::future::try_join_all(receivers.into_iter().map(wait_for_embedding)).await?;
        Ok(Embedded { vectors, prompt_tokens: prompts.iter().map(Vec::len).sum(), leases })
    }

    /// Leases the adapters and tokenizes the inputs, off the async workers.
    async fn prepare_embedding(self: &Arc<Self>, model: String, adapters: Vec<AdapterChoice>, inputs: Vec<Prompt>) -> Result<(Leases, Vec<Vec<u32>>), ServiceError> {
        let plugin = self.plugins.lease(&model).transpose()?;
        let this = self.clone();
        blocking(move || {
            let leases = match plugin {
                None => this.lease(&model, &adapters)?,
                Some(plugin) => {
                    let own: Vec<AdapterChoice> = plugin.info.adapters.iter().map(|a| AdapterChoice { name: a.name.clone(), scale: a.scale }).collect();
                    this.lease_mix(&own, &adapters)?
                }
            };
            let prompts = inputs.iter().enumerate().map(|(i, input)| this.input_ids(i, input)).collect::<Result<_, _>>()?;
            Ok((leases, prompts))
        })
        .await
    }

    /// Input `i`'s ids: its text tokenized (with `<bos>`), or its ids checked against the
    /// vocabulary and the context.
    fn input_ids(&self, i: usize, input: &Prompt) -> Result<Vec<u32>, ServiceError> {
        let ids = match input {
            Prompt::Text(text) if text.is_empty() => return Err(ServiceError::invalid("input", format!("input {i} is an empty string"))),
            Prompt::Text(text) => self.encode(text, true)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(ServiceError::invalid("input", format!("input {i} has no tokens")));
        }
        let vocab = self.model.tokenizer.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ServiceError::invalid("input", format!("token id {bad} in input {i} is outside the vocabulary ({vocab} tokens)")));
        }
        if ids.len() > self.ctx_len {
            return Err(ServiceError::invalid("input", format!("input {i} has {} tokens; this model's maximum context length is {}", ids.len(), self.ctx_len)));
        }
        Ok(ids)
    }
}

fn embedding_request(prompt: Vec<u32>, leases: &Leases) -> GenerationRequest {
    GenerationRequest {
        prompt,
        max_tokens: 0,
        sampling: SamplingParams::default(),
        stop_ids: Vec::new(),
        stop_strings: Vec::new(),
        logprobs: None,
        prompt_logprobs: false,
        adapters: leases.clone(),
        constraint: None,
        embed: true,
    }
}

async fn wait_for_embedding(mut events: tokio::sync::mpsc::UnboundedReceiver<Event>) -> Result<Vec<f32>, ServiceError> {
    while let Some(event) = events.recv().await {
        match event {
            Event::Token(_) => {}
            Event::Finished(finished) => {
                return finished.embedding.ok_or_else(|| ServiceError::Internal("the engine finished an embedding without one".into()));
            }
            Event::Failed(message) => return Err(ServiceError::Internal(message)),
        }
    }
    Err(ServiceError::Internal("the engine stopped before the embedding was ready".into()))
}
