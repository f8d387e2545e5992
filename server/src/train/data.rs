//! Conversations to training sequences, exactly as the chat endpoint will prompt the model:
//! the chat template's text, with the loss on each assistant answer and the `<end_of_turn>` that
//! closes it (every assistant turn of a multi-turn conversation), and nothing else.
//!
//! Truncation policy: a sequence keeps its first `max_len` tokens. Answer tokens past the cut are
//! not scored; a conversation with no scored token left is skipped (and reported).

use crate::chat_template;
use crate::dataset::Conversation;
use crate::tokenizer::Tokenizer;
use crate::train::gemma3::Example;
use crate::train::TrainError;

const END_OF_TURN: &str = "<end_of_turn>";

/// Text segments in order, each with whether its tokens are scored.
fn segments(conversation: &Conversation) -> Result<Vec<(String, bool)>, TrainError> {
    let turns = conversation.turns();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Message;
    use crate::model::synthetic::tiny_gemma3;

    fn tokenizer() -> Tokenizer {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        tiny_gemma3(1).write(&path).unwrap();
        Tokenizer::from_gguf(&crate::gguf::GgufFile::open(&path).unwrap()).unwrap()
    }

    fn message(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    /// The text of the scored next tokens, run by run.
    fn scored_text(tokenizer: &Tokenizer, e: &Example) -> Vec<String> {
        let mut runs: Vec<Vec<u32>> = Vec::new();
        let mut previous = false;
        for (i, &scored) in e.scored.iter().enumerate() {
            if scored {
                if !previous {
                    runs.push(Vec::new());
                }
                runs.last_mut().unwrap().push(e.tokens[i + 1]);
            }
            previous = scored;
        }
        runs.iter().map(|r| tokenizer.decode(r, false).unwrap()).collect()
    }

    #[test]
    fn every_assistant_turn_and_only_those_is_scored() {
        let tokenizer = tokenizer();
        let conversation = Conversation {
            messages: vec![
                message("system", "be terse"),
                message("user", "hello there"),
                message("assistant", "the cat"),
                message("user", "and then"),
                message("assistant", "a hat"),
            ],
        };
        let e = example(&tokenizer, &conversation, 512).unwrap().unwrap();
        assert_eq!(scored_text(&tokenizer, &e), ["the cat<end_of_turn>", "a hat<end_of_turn>"]);
        // Exactly the chat template's text: what the chat endpoint will prompt with.
        let text = tokenizer.decode(&e.tokens, false).unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nbe terse\n\nhello there<end_of_turn>\n<start_of_turn>model\nthe cat<end_of_turn>\n<start_of_turn>user\nand then<end_of_turn>\n<start_of_turn>model\na hat<end_of_turn>"
        );
    }

    #[test]
    fn truncation_keeps_the_start_and_drops_what_has_nothing_to_score() {
        let tokenizer = tokenizer();
        let conversation = Conversation {
            messages: vec![message("user", "hello there"), message("assistant", "the cat")],
        };
        let full = example(&tokenizer, &conversation, 512).unwrap().unwrap();
        let cut = example(&tokenizer, &conversation, full.tokens.len() - 2).unwrap().unwrap();
        assert_eq!(cut.tokens, full.tokens[..full.tokens.len() - 2]);
        assert!(cut.scored_tokens() < full.scored_tokens());
        let prompt_only = full.scored.iter().position(|&s| s).unwrap() + 1;
        assert!(example(&tokenizer, &conversation, prompt_only).unwrap().is_none());
    }
}
