//! Inference: between a validated request and the engine's queue. It resolves the model a
//! request names (the base, an adapter, or a plugin), leases the adapters it runs with, renders
//! the chat template (after a plugin's rewrite hook), tokenizes, checks the context, submits to
//! the engine, and passes a plugin model's answers through its check hook.

use std::sync::Arc;

use tessera_plugin_api::Message as PluginMessage;
use tokio::sync::mpsc::UnboundedReceiver;

use super::plugins::Plugins;
use super::{blocking, ServiceError};
use crate::chat_template::Turn;
use crate::engine::{Engine, Event, GenerationRequest};
use crate::plugins::Plugin;
use crate::registry::{AdapterGeneration, Registry, RegistryError};
use crate::sampler::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::LoadedModel;

/// The adapters one request runs with, leased for its whole life, with their weights.
pub type Leases = Vec<(Arc<AdapterGeneration>, f32)>;

/// One adapter of a request's own composition (`adapters: [{name, scale}]`).
#[derive(Debug, Clone)]
pub struct AdapterChoice {
    pub name: String,
    pub scale: f32,
}

/// A completion prompt: text (tokenized with `<bos>` and special tokens parsed) or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A plugin model's side of a chat request: the plugin generation leased for the whole request,
/// and the messages as its rewrite hook left them (what its check hook is shown).
#[derive(Clone)]
pub struct PluginTurn {
    pub plugin: Arc<Plugin>,
    messages: Vec<PluginMessage>,
}

/// A chat request ready for the engine.
struct PreparedChat {
    prompt: Vec<u32>,
    leases: Leases,
    plugin: Option<PluginTurn>,
}

/// How every choice of a request samples and stops.
#[derive(Debug, Clone)]
pub struct Generation {
    /// `None`: as many as the context leaves after the prompt.
    pub max_tokens: Option<usize>,
    /// Choices per prompt; choice `j` samples with seed `sampling.seed + j`, so each differs and
    /// each repeats for a given request seed.
    pub n: usize,
    pub sampling: SamplingParams,
    pub stop_strings: Vec<String>,
    /// Generate past the end-of-turn and end-of-text tokens.
    pub ignore_eos: bool,
    /// Alternatives reported per generated token, when logprobs are asked for.
    pub logprobs: Option<usize>,
    /// Score the prompt's tokens too.
    pub prompt_logprobs: bool,
}

/// A request the engine is running.
pub struct Running {
    /// Each prompt's token ids.
    pub prompts: Vec<Vec<u32>>,
    pub leases: Leases,
    /// A plugin model's side of a chat, for [`Inference::check_answers`].
    pub plugin: Option<PluginTurn>,
    pub max_tokens: usize,
    /// One per choice: choice `p·n + j` is the `j`-th sample of prompt `p`.
    pub receivers: Vec<UnboundedReceiver<Event>>,
}

/// The inference service.
pub struct Inference {
    engine: Engine,
    model: Arc<LoadedModel>,
    model_id: String,
    ctx_len: usize,
    registry: Arc<Registry>,
    plugins: Arc<Plugins>,
}

impl Inference {
    pub fn new(engine: Engine, model: Arc<LoadedModel>, model_id: String, ctx_len: usize, registry: Arc<Registry>, plugins: Arc<Plugins>) -> Self {
        Self { engine, model, model_id, ctx_len, registry, plugins }
    }

    /// The id clients pass as `model` for the base.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.model.tokenizer
    }

    /// The most tokens (prompt and completion) one sequence may hold.
    pub fn ctx_len(&self) -> usize {
        self.ctx_len
    }

    /// Requests waiting for a place in the running batch.
    pub fn queue_depth(&self) -> usize {
        self.engine.queue_depth()
    }

    /// Whether `requested` names the base, an adapter or a plugin.
    pub fn check_model(&self, requested: &str) -> Result<(), ServiceError> {
        if requested == self.model_id || self.registry.contains(requested) || self.plugins.contains(requested) {
            Ok(())
        } else {
            Err(ServiceError::ModelNotFound(requested.to_string()))
        }
    }

    /// Runs a chat on `model` (the base, an adapter or a plugin) with the request's own
    /// `adapters`; it stops at the model's end-of-turn tokens.
    pub async fn chat(self: &Arc<Self>, model: String, turns: Vec<(String, String)>, adapters: Vec<AdapterChoice>, generation: Generation) -> Result<Running, ServiceError> {
        let chat = self.prepare_chat(model, turns, adapters).await?;
        let stop_ids = self.model.tokenizer.stop_ids().to_vec();
        self.run(vec![chat.prompt], chat.leases, chat.plugin, generation, "messages", stop_ids)
    }

    /// Runs a completion of each prompt on `model` with the request's own `adapters`; it stops
    /// at end-of-text.
    pub async fn complete(self: &Arc<Self>, model: String, adapters: Vec<AdapterChoice>, prompts: Vec<Prompt>, generation: Generation) -> Result<Running, ServiceError> {
        let (leases, prompts) = self.prepare_completion(model, adapters, prompts).await?;
        let stop_ids = vec![self.model.tokenizer.eos_id()];
        self.run(prompts, leases, None, generation, "prompt", stop_ids)
    }

    /// Checks each prompt against the context and queues `n` choices of it.
    fn run(&self, prompts: Vec<Vec<u32>>, leases: Leases, plugin: Option<PluginTurn>, g: Generation, param: &'static str, stop_ids: Vec<u32>) -> Result<Running, ServiceError> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let max_tokens = g.max_tokens.unwrap_or_else(|| self.ctx_len.saturating_sub(longest)).max(1);
        for prompt in &prompts {
            self.check_context(prompt.len(), max_tokens, param)?;
        }
        let stop_ids = if g.ignore_eos { Vec::new() } else { stop_ids };
        let mut receivers = Vec::with_capacity(prompts.len() * g.n);
        for prompt in &prompts {
            for j in 0..g.n {
                receivers.push(self.engine.submit(GenerationRequest {
                    prompt: prompt.clone(),
                    max_tokens,
                    sampling: SamplingParams { seed: g.sampling.seed.wrapping_add(j as u64), ..g.sampling.clone() },
                    stop_ids: stop_ids.clone(),
                    stop_strings: g.stop_strings.clone(),
                    logprobs: g.logprobs,
                    prompt_logprobs: g.prompt_logprobs,
                    adapters: leases.clone(),
                })?);
            }
        }
        Ok(Running { prompts, leases, plugin, max_tokens, receivers })
    }

    /// Leases, templates and tokenizes a chat. A plugin model's rewrite hook sees the turns
    /// first, and its system prompt is added when the conversation has none.
    async fn prepare_chat(self: &Arc<Self>, model: String, turns: Vec<(String, String)>, adapters: Vec<AdapterChoice>) -> Result<PreparedChat, ServiceError> {
        let plugin = self.plugins.lease(&model).transpose()?;
        let this = self.clone();
        // Plugin hooks, cold adapter loads, the template and tokenizing are blocking work.
        blocking(move || {
            let (turns, leases, plugin) = match plugin {
                None => (turns, this.lease(&model, &adapters)?, None),
                Some(plugin) => {
                    let messages = turns.into_iter().map(|(role, content)| PluginMessage { role, content }).collect();
                    let mut rewritten = this.plugins.contain(&plugin, plugin.rewrite(messages))?;
                    if let Some(system) = &plugin.info.system_prompt {
                        if !rewritten.iter().any(|m| m.role == "system") {
                            rewritten.insert(0, PluginMessage { role: "system".into(), content: system.clone() });
                        }
                    }
                    let turns = rewritten.iter().map(|m| (m.role.clone(), m.content.clone())).collect();
                    let own: Vec<AdapterChoice> = plugin.info.adapters.iter().map(|a| AdapterChoice { name: a.name.clone(), scale: a.scale }).collect();
                    (turns, this.lease_mix(&own, &adapters)?, Some(PluginTurn { plugin, messages: rewritten }))
                }
            };
            let text = this.render(&turns, true)?;
            Ok(PreparedChat { prompt: this.encode(&text, true)?, leases, plugin })
        })
        .await
    }

    /// Leases the adapters of a completion on `model` and tokenizes its prompts.
    async fn prepare_completion(self: &Arc<Self>, model: String, adapters: Vec<AdapterChoice>, prompts: Vec<Prompt>) -> Result<(Leases, Vec<Vec<u32>>), ServiceError> {
        if prompts.is_empty() {
            return Err(ServiceError::invalid("prompt", "`prompt` must not be empty"));
        }
        let this = self.clone();
        blocking(move || {
            let leases = this.lease(&model, &adapters)?;
            let ids = prompts.iter().enumerate().map(|(i, p)| this.prompt_ids(i, p)).collect::<Result<_, _>>()?;
            Ok((leases, ids))
        })
        .await
    }

    /// Token ids of text, with `<bos>` when `bos` (special tokens are parsed).
    pub async fn tokenize(self: &Arc<Self>, text: String, bos: bool) -> Result<Vec<u32>, ServiceError> {
        let this = self.clone();
        blocking(move || this.encode(&text, bos)).await
    }

    /// Token ids of a conversation rendered through the chat template.
    pub async fn tokenize_chat(self: &Arc<Self>, turns: Vec<(String, String)>, add_generation_prompt: bool, bos: bool) -> Result<Vec<u32>, ServiceError> {
        let this = self.clone();
        blocking(move || this.encode(&this.render(&turns, add_generation_prompt)?, bos)).await
    }

    /// The text of token ids, control tokens included verbatim.
    pub fn detokenize(&self, ids: &[u32]) -> Result<String, ServiceError> {
        self.model.tokenizer.decode(ids, false).map_err(|e| ServiceError::invalid("tokens", e.to_string()))
    }

    /// Refuses a prompt and completion that together exceed the context.
    fn check_context(&self, prompt: usize, completion: usize, param: &'static str) -> Result<(), ServiceError> {
        if prompt + completion > self.ctx_len {
            return Err(ServiceError::ContextLength { limit: self.ctx_len, requested: prompt + completion, prompt, completion, param });
        }
        Ok(())
    }

    /// Each answer as the plugin's check hook returns it (validated or normalised), on the
    /// generation the request leased.
    pub async fn check_answers(self: &Arc<Self>, turn: PluginTurn, answers: Vec<String>) -> Result<Vec<String>, ServiceError> {
        let this = self.clone();
        blocking(move || {
            answers
                .iter()
                .map(|answer| {
                    let checked = this.plugins.contain(&turn.plugin, turn.plugin.check(&turn.messages, answer))?;
                    if !checked.valid {
                        tracing::info!(plugin = %turn.plugin.info.name, note = ?checked.note, "plugin changed the answer");
                    }
                    Ok(checked.answer)
                })
                .collect()
        })
        .await
    }

    /// The adapters a request on `model` runs with: `model` itself when it names an adapter
    /// (weight 1), then the request's composition.
    fn lease(&self, model: &str, extra: &[AdapterChoice]) -> Result<Leases, ServiceError> {
        let own = if model == self.model_id { Vec::new() } else { vec![AdapterChoice { name: model.to_string(), scale: 1.0 }] };
        self.lease_mix(&own, extra)
    }

    /// Leases `own` (the adapters a model stands for), then `extra` (the request's, whose
    /// errors name their place in `adapters`).
    fn lease_mix(&self, own: &[AdapterChoice], extra: &[AdapterChoice]) -> Result<Leases, ServiceError> {
        let mut leases = Vec::with_capacity(own.len() + extra.len());
        for choice in own {
            let generation = self.registry.lease(&choice.name).map_err(|e| match e {
                RegistryError::NotFound(_) => ServiceError::ModelNotFound(choice.name.clone()),
                other => ServiceError::internal(other),
            })?;
            leases.push((generation, choice.scale));
        }
        for (i, choice) in extra.iter().enumerate() {
            if !choice.scale.is_finite() {
                return Err(ServiceError::invalid(&format!("adapters[{i}].scale"), "the scale must be a finite number"));
            }
            let generation = self.registry.lease(&choice.name).map_err(|e| match e {
                RegistryError::NotFound(name) => ServiceError::Invalid {
                    message: format!("the adapter `{name}` does not exist"),
                    param: Some(format!("adapters[{i}].name")),
                    code: Some("adapter_not_found"),
                },
                other => ServiceError::internal(other),
            })?;
            leases.push((generation, choice.scale));
        }
        Ok(leases)
    }

    /// The chat template over (role, text) turns; a template that cannot render them is the
    /// request's fault.
    fn render(&self, turns: &[(String, String)], add_generation_prompt: bool) -> Result<String, ServiceError> {
        let turns: Vec<Turn> = turns.iter().map(|(role, text)| Turn { role, text: text.clone() }).collect();
        self.model.chat.render(&turns, add_generation_prompt).map_err(|e| ServiceError::invalid("messages", e.to_string()))
    }

    fn encode(&self, text: &str, bos: bool) -> Result<Vec<u32>, ServiceError> {
        self.model.tokenizer.encode(text, true, bos).map_err(ServiceError::internal)
    }

    /// Prompt `i`'s ids: its text tokenized, or its ids checked against the vocabulary.
    fn prompt_ids(&self, i: usize, prompt: &Prompt) -> Result<Vec<u32>, ServiceError> {
        let ids = match prompt {
            Prompt::Text(text) => self.encode(text, true)?,
            Prompt::Tokens(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Err(ServiceError::invalid("prompt", format!("prompt {i} has no tokens")));
        }
        let vocab = self.model.tokenizer.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ServiceError::invalid("prompt", format!("token id {bad} in prompt {i} is outside the vocabulary ({vocab} tokens)")));
        }
        Ok(ids)
    }
}
