//! Inference: between a validated request and the engine's queue. It resolves the model a
//! request names (the base, an adapter, or a plugin), leases the adapters it runs with, renders
//! the chat template (after a plugin's rewrite hook), tokenizes, checks the context, submits to
//! the engine, and passes a plugin model's answers through its check hook.

mod embeddings;

use std::sync::Arc;

use tessera_adapters::AdapterKind;
use tessera_plugin_api::Message as PluginMessage;
use tokio::sync::mpsc::UnboundedReceiver;

pub use embeddings::Embedded;

use super::plugins::Plugins;
use super::{blocking, ServiceError};
use crate::chat_template::Turn;
use crate::engine::{Engine, Event, GenerationRequest};
use crate::grammar::{Constraint, ConstraintSpec, Grammars};
use crate::plugins::Plugin;
use crate::registry::{AdapterGeneration, Registry, RegistryError};
use crate::sampler::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::tool_calls::{self, ToolChoice, ToolDefinition, ToolSyntax};
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

/// One message of a conversation (stored as JSON with the responses that end it).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ChatTurn {
    pub role: String,
    pub content: String,
    /// An assistant message's calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<CallRecord>,
    /// A `tool` message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// A call an assistant made earlier in the conversation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CallRecord {
    pub id: String,
    pub name: String,
    /// JSON text, as OpenAI sends it.
    pub arguments: String,
}

/// The functions a chat offers the model, and whether it must call one.
#[derive(Debug, Clone)]
pub struct Tools {
    pub definitions: Vec<ToolDefinition>,
    pub choice: ToolChoice,
}

/// A shape the client asked the answer to have, with the field that asked.
#[derive(Debug, Clone)]
pub struct RequestedConstraint {
    pub spec: ConstraintSpec,
    /// `response_format`, `guided_choice`, `guided_regex` or `guided_grammar`.
    pub param: &'static str,
}

/// A plugin model's side of a chat request: the plugin generation leased for the whole request,
/// and the messages as its rewrite hook left them (what its check hook is shown).
#[derive(Clone)]
pub struct PluginTurn {
    pub plugin: Arc<Plugin>,
    messages: Vec<PluginMessage>,
    /// The answer's shape: the one the rewrite hook gave this request, else the plugin's.
    answer: Option<ConstraintSpec>,
}

/// A chat request ready for the engine.
struct PreparedChat {
    prompt: Vec<u32>,
    leases: Leases,
    plugin: Option<PluginTurn>,
    constraint: Option<Constraint>,
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
    /// The shape every answer must have.
    pub constraint: Option<RequestedConstraint>,
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
    /// How the answers write tool calls, when the request offered tools.
    pub tool_syntax: Option<ToolSyntax>,
}

/// The inference service.
pub struct Inference {
    engine: Engine,
    model: Arc<LoadedModel>,
    model_id: String,
    ctx_len: usize,
    registry: Arc<Registry>,
    plugins: Arc<Plugins>,
    grammars: Arc<Grammars>,
}

impl Inference {
    pub fn new(engine: Engine, model: Arc<LoadedModel>, model_id: String, ctx_len: usize, registry: Arc<Registry>, plugins: Arc<Plugins>, grammars: Arc<Grammars>) -> Self {
        Self { engine, model, model_id, ctx_len, registry, plugins, grammars }
    }

    /// The id clients pass as `model` for the base.
    /// The same service whose requests run as background work: in engine steps interactive
    /// requests leave idle (batch lines).
    pub fn background(&self) -> Self {
        Self {
            engine: self.engine.background(),
            model: self.model.clone(),
            model_id: self.model_id.clone(),
            ctx_len: self.ctx_len,
            registry: self.registry.clone(),
            plugins: self.plugins.clone(),
            grammars: self.grammars.clone(),
        }
    }

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
    /// Whether what the first requests would otherwise wait for is ready (the grammar
    /// vocabulary: `App::start` waits for it).
    pub fn is_warm(&self) -> bool {
        self.grammars.vocabulary_built()
    }

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
    /// `adapters`; it stops at the model's end-of-turn tokens. With `tools`, the model is shown
    /// them and its calls are parsed (a required call is enforced by grammar).
    pub async fn chat(self: &Arc<Self>, model: String, turns: Vec<ChatTurn>, adapters: Vec<AdapterChoice>, tools: Option<Tools>, mut generation: Generation) -> Result<Running, ServiceError> {
        let requested = generation.constraint.take();
        let chat = self.prepare_chat(model, turns, adapters, tools.clone(), requested).await?;
        let stop_ids = self.model.tokenizer.stop_ids().to_vec();
        let tool_syntax = tools.filter(|t| t.choice != ToolChoice::None).map(|_| self.model.chat.tool_syntax());
        let mut running = self.run(vec![chat.prompt], chat.leases, chat.plugin, generation, "messages", stop_ids, chat.constraint)?;
        running.tool_syntax = tool_syntax;
        Ok(running)
    }

    /// Runs a completion of each prompt on `model` with the request's own `adapters`; it stops
    /// at end-of-text.
    pub async fn complete(self: &Arc<Self>, model: String, adapters: Vec<AdapterChoice>, prompts: Vec<Prompt>, mut generation: Generation) -> Result<Running, ServiceError> {
        let requested = generation.constraint.take();
        let (leases, prompts, constraint) = self.prepare_completion(model, adapters, prompts, requested).await?;
        let stop_ids = vec![self.model.tokenizer.eos_id()];
        self.run(prompts, leases, None, generation, "prompt", stop_ids, constraint)
    }

    /// Checks each prompt against the context and queues `n` choices of it.
    #[allow(clippy::too_many_arguments)]
    fn run(&self, prompts: Vec<Vec<u32>>, leases: Leases, plugin: Option<PluginTurn>, g: Generation, param: &'static str, stop_ids: Vec<u32>, constraint: Option<Constraint>) -> Result<Running, ServiceError> {
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
                    constraint: constraint.clone(),
                    embed: false,
                })?);
            }
        }
        Ok(Running { prompts, leases, plugin, max_tokens, receivers, tool_syntax: None })
    }

    /// Leases, templates and tokenizes a chat, and compiles the shape of its answer. A plugin
    /// model's rewrite hook sees the turns first, and its system prompt is added when the
    /// conversation has none.
    async fn prepare_chat(self: &Arc<Self>, model: String, turns: Vec<ChatTurn>, adapters: Vec<AdapterChoice>, tools: Option<Tools>, requested: Option<RequestedConstraint>) -> Result<PreparedChat, ServiceError> {
        let plugin = self.plugins.lease(&model).transpose()?;
        if plugin.is_some() && tools.is_some() {
            return Err(ServiceError::invalid("tools", format!("`{model}` is a plugin model, which answers in its own shape; it takes no `tools`")));
        }
        let this = self.clone();
        // Plugin hooks, cold adapter loads, the template, tokenizing and grammars are blocking work.
        blocking(move || {
            let (turns, leases, plugin) = match plugin {
                None => (turns, this.lease(&model, &adapters)?, None),
                Some(plugin) => {
                    let (turns, leases, turn) = this.plugin_turns(plugin, turns, &adapters)?;
                    (turns, leases, Some(turn))
                }
            };
            let text = this.render(&turns, true, tools.as_ref())?;
            let forced = tools.as_ref().and_then(|t| tool_calls::forced_call(this.model.chat.tool_syntax(), &t.definitions, &t.choice));
            let forced = forced.map(|spec| RequestedConstraint { spec, param: "tool_choice" });
            let plugin_shape = plugin.as_ref().and_then(|p| p.answer.clone()).map(|spec| RequestedConstraint { spec, param: "model" });
            let constraint = this.compile(requested.or(forced).or(plugin_shape))?;
            Ok(PreparedChat { prompt: this.encode(&text, true)?, leases, plugin, constraint })
        })
        .await
    }

    /// A plugin model's conversation after its rewrite hook (and with its system prompt), and
    /// the adapters it stands for with the request's.
    fn plugin_turns(&self, plugin: Arc<Plugin>, turns: Vec<ChatTurn>, adapters: &[AdapterChoice]) -> Result<(Vec<ChatTurn>, Leases, PluginTurn), ServiceError> {
        let messages = turns.into_iter().map(|t| PluginMessage { role: t.role, content: t.content }).collect();
        let (mut rewritten, answer) = self.plugins.contain(&plugin, plugin.rewrite(messages))?;
        let answer = answer.or_else(|| plugin.answer_constraint());
        if let Some(system) = &plugin.info.system_prompt {
            if !rewritten.iter().any(|m| m.role == "system") {
                rewritten.insert(0, PluginMessage { role: "system".into(), content: system.clone() });
            }
        }
        let turns = rewritten.iter().map(|m| ChatTurn { role: m.role.clone(), content: m.content.clone(), ..Default::default() }).collect();
        let own: Vec<AdapterChoice> = plugin.info.adapters.iter().map(|a| AdapterChoice { name: a.name.clone(), scale: a.scale }).collect();
        let leases = self.lease_mix(&own, adapters)?;
        Ok((turns, leases, PluginTurn { plugin, messages: rewritten, answer }))
    }

    /// Leases the adapters of a completion on `model`, tokenizes its prompts and compiles the
    /// shape of its answers.
    async fn prepare_completion(self: &Arc<Self>, model: String, adapters: Vec<AdapterChoice>, prompts: Vec<Prompt>, requested: Option<RequestedConstraint>) -> Result<(Leases, Vec<Vec<u32>>, Option<Constraint>), ServiceError> {
        if prompts.is_empty() {
            return Err(ServiceError::invalid("prompt", "`prompt` must not be empty"));
        }
        let this = self.clone();
        blocking(move || {
            let leases = this.lease(&model, &adapters)?;
            let ids = prompts.iter().enumerate().map(|(i, p)| this.prompt_ids(i, p)).collect::<Result<_, _>>()?;
            Ok((leases, ids, this.compile(requested)?))
        })
        .await
    }

    /// The compiled grammar of a requested shape; one the engine cannot compile is the field's
    /// fault.
    fn compile(&self, requested: Option<RequestedConstraint>) -> Result<Option<Constraint>, ServiceError> {
        let Some(requested) = requested else { return Ok(None) };
        self.grammars.compile(&requested.spec).map(Some).map_err(|e| match e {
            crate::grammar::GrammarError::Invalid(reason) => {
                ServiceError::Invalid { param: Some(requested.param.to_string()), message: format!("the grammar engine cannot use this constraint: {reason}"), code: Some("invalid_constraint") }
            }
            engine => ServiceError::internal(engine),
        })
    }

    /// Token ids of text, with `<bos>` when `bos` (special tokens are parsed).
    pub async fn tokenize(self: &Arc<Self>, text: String, bos: bool) -> Result<Vec<u32>, ServiceError> {
        let this = self.clone();
        blocking(move || this.encode(&text, bos)).await
    }

    /// Token ids of a conversation rendered through the chat template.
    pub async fn tokenize_chat(self: &Arc<Self>, turns: Vec<ChatTurn>, add_generation_prompt: bool, bos: bool) -> Result<Vec<u32>, ServiceError> {
        let this = self.clone();
        blocking(move || this.encode(&this.render(&turns, add_generation_prompt, None)?, bos)).await
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
    /// errors name their place in `adapters`), and checks that they compose.
    fn lease_mix(&self, own: &[AdapterChoice], extra: &[AdapterChoice]) -> Result<Leases, ServiceError> {
        let mut leases = Vec::with_capacity(own.len() + extra.len());
        for choice in own {
            let generation = self.registry.lease(&choice.name).map_err(|e| match e {
                RegistryError::NotFound(_) => ServiceError::ModelNotFound(choice.name.clone()),
                other => lease_error(other, "model"),
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
                other => lease_error(other, &format!("adapters[{i}].name")),
            })?;
            leases.push((generation, choice.scale));
        }
        check_composition(&leases, own.len())?;
        Ok(leases)
    }

    /// The chat template over the turns and the offered tools (unless `tool_choice` is `none`);
    /// a template that cannot render them is the request's fault. A template that does not
    /// show tools gets them in a fallback system prompt, and the conversation's calls and tool
    /// results as Hermes-syntax text.
    fn render(&self, turns: &[ChatTurn], add_generation_prompt: bool, tools: Option<&Tools>) -> Result<String, ServiceError> {
        let template = &self.model.chat;
        let tools = tools.filter(|t| t.choice != ToolChoice::None).map(|t| t.definitions.as_slice()).unwrap_or_default();
        let has_tool_turns = turns.iter().any(|t| t.role == "tool" || !t.tool_calls.is_empty());
        let rendered = if template.renders_tools() || (tools.is_empty() && !has_tool_turns) {
            let openai: Vec<serde_json::Value> = tools.iter().map(ToolDefinition::to_openai).collect();
            template.render_with_tools(&native_turns(turns), add_generation_prompt, &openai)
        } else {
            template.render(&fallback_turns(turns, tools), add_generation_prompt)
        };
        rendered.map_err(|e| ServiceError::invalid("messages", e.to_string()))
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

/// A lease that failed for a reason other than a missing name: files the server cannot serve
/// are the request's to avoid (named by `param`); anything else is the server's, logged in full
/// and answered without its paths.
fn lease_error(e: RegistryError, param: &str) -> ServiceError {
    match e {
        RegistryError::Unservable { .. } => ServiceError::Invalid { message: e.to_string(), param: Some(param.to_string()), code: Some("adapter_unservable") },
        other => {
            tracing::error!(error = %other, "leasing an adapter failed");
            ServiceError::Internal("reading the adapter's files failed".into())
        }
    }
}

/// DoRA's rescaling of each row does not add linearly to another adapter's change of the same
/// weight: a composition may hold one DoRA adapter, and then no IA³ one (whose scales would
/// rescale the base DoRA measured). `own` leases come first; the rest are `adapters[i]`.
fn check_composition(leases: &Leases, own: usize) -> Result<(), ServiceError> {
    if leases.len() < 2 {
        return Ok(());
    }
    let place = |i: usize| if i < own { "model".to_string() } else { format!("adapters[{}].name", i - own) };
    let of_kind = |kind: AdapterKind| leases.iter().enumerate().filter(move |(_, (g, _))| g.kind() == kind).map(|(i, (g, _))| (i, g.name.clone()));
    let doras: Vec<(usize, String)> = of_kind(AdapterKind::Dora).collect();
    if let [(_, first), (i, second), ..] = doras.as_slice() {
        return Err(ServiceError::invalid(
            &place(*i),
            format!("`{first}` and `{second}` are both DoRA adapters: a composition may hold one DoRA adapter, since DoRA rescales each row of the weight and two rescalings do not add"),
        ));
    }
    if let (Some((_, dora)), Some((i, ia3))) = (doras.first(), of_kind(AdapterKind::Ia3).next()) {
        return Err(ServiceError::invalid(
            &place(i),
            format!("`{ia3}` (IA³) cannot join the DoRA adapter `{dora}`: IA³ rescales the base weight that DoRA's magnitudes are measured against"),
        ));
    }
    Ok(())
}

/// Turns as a tool-aware template takes them: calls in OpenAI's shape with their arguments as
/// objects (templates write them with `tojson`).
fn native_turns(turns: &[ChatTurn]) -> Vec<Turn<'_>> {
    turns
        .iter()
        .map(|t| Turn {
            role: &t.role,
            text: t.content.clone(),
            tool_calls: t
                .tool_calls
                .iter()
                .map(|c| {
                    let arguments = serde_json::from_str(&c.arguments).unwrap_or_else(|_| serde_json::Value::String(c.arguments.clone()));
                    serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": arguments}})
                })
                .collect(),
            tool_call_id: t.tool_call_id.clone(),
        })
        .collect()
}

/// Turns for a template without tools: the tools in the system message, each call as
/// `<tool_call>` text in its assistant turn, and each run of tool results as one user turn.
fn fallback_turns<'a>(turns: &'a [ChatTurn], tools: &[ToolDefinition]) -> Vec<Turn<'a>> {
    let mut out: Vec<Turn<'a>> = Vec::with_capacity(turns.len() + 1);
    if !tools.is_empty() {
        let prompt = tool_calls::fallback_system_prompt(tools);
        match turns.first().filter(|t| t.role == "system" || t.role == "developer") {
            Some(system) => out.push(Turn { role: "system", text: format!("{}\n\n{prompt}", system.content), ..Default::default() }),
            None => out.push(Turn { role: "system", text: prompt, ..Default::default() }),
        }
    }
    let skip = usize::from(!tools.is_empty() && turns.first().is_some_and(|t| t.role == "system" || t.role == "developer"));
    for turn in &turns[skip..] {
        if turn.role == "tool" {
            let response = tool_calls::hermes_response_text(&turn.content);
            match out.last_mut() {
                Some(previous) if previous.role == "user" && previous.text.ends_with("</tool_response>") => {
                    previous.text.push('\n');
                    previous.text.push_str(&response);
                }
                _ => out.push(Turn { role: "user", text: response, ..Default::default() }),
            }
            continue;
        }
        let mut text = turn.content.clone();
        for call in &turn.tool_calls {
            let arguments = serde_json::from_str(&call.arguments).unwrap_or_else(|_| serde_json::Value::String(call.arguments.clone()));
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&tool_calls::hermes_call_text(&call.name, &arguments));
        }
        out.push(Turn { role: &turn.role, text, ..Default::default() });
    }
    out
}
