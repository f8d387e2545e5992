//! Conversations to training sequences, exactly as the chat endpoint will prompt the model:
//! the chat template's text, with the loss on each assistant answer and the `<end_of_turn>` that
//! closes it (every assistant turn of a multi-turn conversation), and nothing else.
//!
//! Truncation policy: a sequence keeps its first `max_len` tokens. Answer tokens past the cut are
//! not scored; a conversation with no scored token left is skipped (and reported).

use crate::chat_template::{self, Turn};
use crate::dataset::Conversation;
use crate::tokenizer::Tokenizer;
use crate::train::gemma3::Example;
use crate::train::TrainError;

const END_OF_TURN: &str = "<end_of_turn>";

/// Text segments in order, each with whether its tokens are scored.
fn segments(conversation: &Conversation) -> Result<Vec<(String, bool)>, TrainError> {
    let turns: Vec<Turn> = conversation
        .messages
        .iter()
        .map(|m| Turn {
            role: &m.role,
            text: m.content.clone(),
        })
        .collect();
    let mut segments = Vec::new();
    let mut consumed = 0;
    for (i, message) in conversation.messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        // The prompt up to this answer: everything rendered before it, opening the model's turn.
        let prompt = chat_template::render(&turns[..i]).map_err(|e| TrainError::Data(e.to_string()))?;
        let Some(new_text) = prompt.get(consumed..) else {
            return Err(TrainError::Data("the chat template is not a prefix of itself".into()));
        };
        segments.push((new_text.to_string(), false));
        let answer = format!("{}{END_OF_TURN}", message.content.trim());
        consumed = prompt.len() + answer.len();
        segments.push((answer, true));
    }
    Ok(segments)
}

/// The tokens of `conversation` (with `<bos>`) and which next tokens are scored; `None` when
/// truncation to `max_len` leaves nothing to score.
pub fn example(tokenizer: &Tokenizer, conversation: &Conversation, max_len: usize) -> Result<Option<Example>, TrainError> {
    let mut tokens = vec![tokenizer.bos_id()];
    // `is_target[j]`: token j is part of an answer.
    let mut is_target = vec![false];
    for (text, scored) in segments(conversation)? {
        let ids = tokenizer
            .encode(&text, true, false)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        is_target.extend(std::iter::repeat_n(scored, ids.len()));
        tokens.extend(ids);
    }
    tokens.truncate(max_len);
    is_target.truncate(max_len);
    // Position i is scored when it predicts an answer token.
    let scored: Vec<bool> = (0..tokens.len())
        .map(|i| is_target.get(i + 1).copied().unwrap_or(false))
        .collect();
    let example = Example { tokens, scored };
    Ok((example.scored_tokens() > 0).then_some(example))
}
