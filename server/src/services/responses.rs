//! Responses (`/v1/responses`): a conversation of items run as a chat, kept for a later
//! request to continue by `previous_response_id`. Input items become chat turns, generation is
//! the inference service's chat, and a kept response stores its whole conversation (the turns
//! before it, its input and its output) so that a continuation renders the same prefix and the
//! prefix cache finds it. Kept responses live in the state store; a server without one keeps
//! its most recent ones in memory.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::inference::{AdapterChoice, CallRecord, ChatTurn, Generation, Inference, Running, Tools};
use super::{blocking, ServiceError};
use crate::store::Store;
use crate::tool_calls::{self, ToolSyntax};

/// How many responses a server without a state store keeps (the oldest go first).
const KEPT_IN_MEMORY: usize = 1024;

/// One item of a response's input or output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Item {
    /// `system`, `developer`, `user` or `assistant` text.
    Message { role: String, text: String },
    /// A call the model made.
    FunctionCall { call_id: String, name: String, arguments: String },
    /// The caller's result of a call.
    FunctionCallOutput { call_id: String, output: String },
}

/// A request for a response.
pub struct NewResponse {
    /// The base, an adapter or a plugin.
    pub model: String,
    /// The request's own composition.
    pub adapters: Vec<AdapterChoice>,
    /// A system message for this response only (a continuation does not inherit it).
    pub instructions: Option<String>,
    pub input: Vec<Item>,
    pub previous_response_id: Option<String>,
    pub tools: Option<Tools>,
    pub generation: Generation,
    /// Keep the response for `GET` and continuations.
    pub store: bool,
}

/// A response being generated, and what keeping it needs.
pub struct Started {
    pub id: String,
    pub running: Running,
    /// What the chat template's tool calls are declared as, when tools were offered.
    pub declared: Vec<String>,
    /// What [`Responses::keep`] needs once the output is known.
    pub pending: Pending,
}

/// A started response's conversation so far, to store with its output.
pub struct Pending {
    id: String,
    conversation: Vec<ChatTurn>,
    store: bool,
}

/// Where kept responses live.
enum Keeping {
    Database(Arc<Store>),
    Memory(Mutex<Memory>),
}

/// Responses kept in memory: body and conversation (JSON) by id, and the ids newest last, for
/// eviction.
type Memory = (HashMap<String, (String, String)>, VecDeque<String>);

fn lock(memory: &Mutex<Memory>) -> Result<std::sync::MutexGuard<'_, Memory>, ServiceError> {
    memory.lock().map_err(|_| ServiceError::Internal("the response memory was poisoned".into()))
}

/// A kept response: the object as served (JSON), and its conversation.
struct Kept {
    body: String,
    conversation: Vec<ChatTurn>,
}

pub struct Responses {
    inference: Arc<Inference>,
    keeping: Arc<Keeping>,
}

impl Responses {
    /// Keeps responses in `store`, or (without one) in memory.
    pub fn new(inference: Arc<Inference>, store: Option<Arc<Store>>) -> Self {
        let keeping = match store {
            Some(store) => Keeping::Database(store),
            None => Keeping::Memory(Mutex::default()),
        };
        Self { inference, keeping: Arc::new(keeping) }
    }

    /// The same responses, generated through `inference` (a batch's background submissions).
    pub fn through(&self, inference: Arc<Inference>) -> Self {
        Self { inference, keeping: self.keeping.clone() }
    }

    /// Starts a response: the conversation it continues, then its input as chat turns, run on
    /// the chat path (the `instructions` as a system message first).
    pub async fn create(self: &Arc<Self>, new: NewResponse) -> Result<Started, ServiceError> {
        let mut conversation = match &new.previous_response_id {
            None => Vec::new(),
            Some(previous) => self.load(previous).await?.ok_or_else(|| ServiceError::NotFound(format!("Previous response with id '{previous}' not found.")))?.conversation,
        };
        conversation.extend(turns_of(&new.input));
        let mut prompt = Vec::with_capacity(conversation.len() + 1);
        if let Some(instructions) = new.instructions {
            prompt.push(ChatTurn { role: "system".into(), content: instructions, ..Default::default() });
        }
        prompt.extend(conversation.iter().cloned());
        let declared = new.tools.iter().flat_map(|t| &t.definitions).map(|d| d.name.clone()).collect();
        let running = self.inference.chat(new.model, prompt, new.adapters, new.tools, new.generation).await?;
        let id = format!("resp_{:032x}", rand::random::<u128>());
        let pending = Pending { id: id.clone(), conversation, store: new.store };
        Ok(Started { id, running, declared, pending })
    }

    /// Stores a finished response (unless it asked not to be), its `body` as served and its
    /// conversation ending with `output`. Returns once it is durable.
    pub async fn keep(self: &Arc<Self>, pending: Pending, output: &[Item], body: String) -> Result<(), ServiceError> {
        if !pending.store {
            return Ok(());
        }
        let mut conversation = pending.conversation;
        conversation.extend(turns_of(output));
        let conversation = serde_json::to_string(&conversation).map_err(ServiceError::internal)?;
        match &*self.keeping {
            Keeping::Database(store) => {
                let store = store.clone();
                blocking(move || Ok(store.insert_response(&pending.id, &body, &conversation)?)).await
            }
            Keeping::Memory(kept) => {
                let mut kept = lock(kept)?;
                let (by_id, order) = &mut *kept;
                by_id.insert(pending.id.clone(), (body, conversation));
                order.push_back(pending.id);
                while order.len() > KEPT_IN_MEMORY {
                    if let Some(oldest) = order.pop_front() {
                        by_id.remove(&oldest);
                    }
                }
                Ok(())
            }
        }
    }

    /// The kept response `id` as it was served (JSON text).
    pub async fn get(self: &Arc<Self>, id: &str) -> Result<String, ServiceError> {
        Ok(self.load(id).await?.ok_or_else(|| not_found(id))?.body)
    }

    /// Forgets the kept response `id`.
    pub async fn delete(self: &Arc<Self>, id: &str) -> Result<(), ServiceError> {
        let deleted = match &*self.keeping {
            Keeping::Database(store) => {
                let (store, id) = (store.clone(), id.to_string());
                blocking(move || Ok(store.delete_response(&id)?)).await?
            }
            Keeping::Memory(kept) => {
                let mut kept = lock(kept)?;
                let (by_id, order) = &mut *kept;
                order.retain(|kept| kept != id);
                by_id.remove(id).is_some()
            }
        };
        if deleted {
            Ok(())
        } else {
            Err(not_found(id))
        }
    }

    async fn load(self: &Arc<Self>, id: &str) -> Result<Option<Kept>, ServiceError> {
        let (body, conversation) = match &*self.keeping {
            Keeping::Database(store) => {
                let (store, id) = (store.clone(), id.to_string());
                match blocking(move || Ok(store.response(&id)?)).await? {
                    Some(stored) => (stored.body, stored.conversation),
                    None => return Ok(None),
                }
            }
            Keeping::Memory(kept) => {
                let kept = lock(kept)?;
                match kept.0.get(id) {
                    Some(found) => found.clone(),
                    None => return Ok(None),
                }
            }
        };
        let conversation = serde_json::from_str(&conversation).map_err(ServiceError::internal)?;
        Ok(Some(Kept { body, conversation }))
    }
}

fn not_found(id: &str) -> ServiceError {
    ServiceError::NotFound(format!("No response with id '{id}' found."))
}

/// An answer as output items: its text as a message, and with tools offered (`declared`
/// names them), each call it wrote as a `function_call`.
pub fn output_items(answer: String, syntax: Option<ToolSyntax>, declared: &[String]) -> Vec<Item> {
    let (text, calls) = match syntax {
        None => (answer, Vec::new()),
        Some(syntax) => tool_calls::parse(syntax, declared, &answer),
    };
    let mut items = Vec::with_capacity(calls.len() + 1);
    if !text.is_empty() || calls.is_empty() {
        items.push(Item::Message { role: "assistant".into(), text });
    }
    items.extend(calls.into_iter().map(|c| Item::FunctionCall { call_id: call_id(), name: c.name, arguments: c.arguments }));
    items
}

/// A new `call_id`, as OpenAI's look.
pub fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// Items as chat turns: a function call joins the assistant turn before it (or opens one), its
/// output is a `tool` turn.
fn turns_of(items: &[Item]) -> Vec<ChatTurn> {
    let mut turns: Vec<ChatTurn> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Item::Message { role, text } => turns.push(ChatTurn { role: role.clone(), content: text.clone(), ..Default::default() }),
            Item::FunctionCall { call_id, name, arguments } => {
                let call = CallRecord { id: call_id.clone(), name: name.clone(), arguments: arguments.clone() };
                match turns.last_mut() {
                    Some(turn) if turn.role == "assistant" => turn.tool_calls.push(call),
                    _ => turns.push(ChatTurn { role: "assistant".into(), tool_calls: vec![call], ..Default::default() }),
                }
            }
            Item::FunctionCallOutput { call_id, output } => {
                turns.push(ChatTurn { role: "tool".into(), content: output.clone(), tool_call_id: Some(call_id.clone()), ..Default::default() })
            }
        }
    }
    turns
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_join_the_assistant_turn_before_them_and_outputs_are_tool_turns() {
        let items = [
            Item::Message { role: "user".into(), text: "weather?".into() },
            Item::Message { role: "assistant".into(), text: "Let me look.".into() },
            Item::FunctionCall { call_id: "c1".into(), name: "weather".into(), arguments: "{}".into() },
            Item::FunctionCall { call_id: "c2".into(), name: "time".into(), arguments: "{}".into() },
            Item::FunctionCallOutput { call_id: "c1".into(), output: "sunny".into() },
            Item::FunctionCall { call_id: "c3".into(), name: "time".into(), arguments: "{}".into() },
        ];
        let turns = turns_of(&items);
        let shape: Vec<(&str, usize, Option<&str>)> = turns.iter().map(|t| (t.role.as_str(), t.tool_calls.len(), t.tool_call_id.as_deref())).collect();
        assert_eq!(shape, [("user", 0, None), ("assistant", 2, None), ("tool", 0, Some("c1")), ("assistant", 1, None)]);
        assert_eq!(turns[1].content, "Let me look.");
    }

    #[test]
    fn an_answer_without_tools_is_one_message_even_when_empty() {
        assert_eq!(output_items(String::new(), None, &[]), [Item::Message { role: "assistant".into(), text: String::new() }]);
    }
}
