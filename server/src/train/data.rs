//! Conversations to training sequences, exactly as the chat endpoint will prompt the model:
//! the model's chat template, with the loss on each assistant answer up to and including the
//! token that ends its turn (`<end_of_turn>`, `<|im_end|>`, `<|eot_id|>`, …), for every
//! assistant turn of a multi-turn conversation, and nothing else.
//!
//! Each answer is found by rendering twice: the conversation before it with the generation
//! prompt (what the model is prompted with), and through it without (what follows is the
//! answer). Each rendering must extend the one before it.
//!
//! Truncation policy: a sequence keeps its first `max_len` tokens. Answer tokens past the cut are
//! not scored; a conversation with no scored token left is skipped (and reported).

use crate::chat_template::ChatTemplate;
use crate::dataset::Conversation;
use crate::tokenizer::Tokenizer;
use crate::train::decoder::Example;
use crate::train::TrainError;

/// Which assistant turns of a conversation are scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answers {
    /// Every one (instruction tuning).
    Every,
    /// Only the last (a preference's answer: what comes before is its prompt).
    Last,
}

/// Text segments in order, each with whether its tokens are scored answer tokens.
fn segments(template: &ChatTemplate, conversation: &Conversation, answers: Answers) -> Result<Vec<(String, bool)>, TrainError> {
    let turns = conversation.turns();
    let render = |end: usize, generation_prompt: bool| {
        template
            .render(&turns[..end], generation_prompt)
            .map_err(|e| TrainError::Data(e.to_string()))
    };
    let not_a_prefix = || TrainError::Data("the chat template does not render a conversation as a prefix of its continuation".into());
    let mut segments = Vec::new();
    let mut consumed = 0;
    let last = conversation.messages.len().saturating_sub(1);
    for (i, message) in conversation.messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let scored = answers == Answers::Every || i == last;
        let prompt = render(i, true)?;
        let through_answer = render(i + 1, false)?;
        let new_prompt = prompt.get(consumed..).ok_or_else(not_a_prefix)?;
        let answer = through_answer
            .strip_prefix(prompt.as_str())
            .ok_or_else(not_a_prefix)?;
        segments.push((new_prompt.to_string(), false));
        segments.push((answer.to_string(), scored));
        consumed = through_answer.len();
    }
    Ok(segments)
}

/// The tokens of `conversation` (with the model's BOS where it adds one) and which next tokens
/// are scored; `None` when truncation to `max_len` leaves nothing to score.
pub fn example(tokenizer: &Tokenizer, template: &ChatTemplate, conversation: &Conversation, max_len: usize) -> Result<Option<Example>, TrainError> {
    example_scoring(tokenizer, template, conversation, max_len, Answers::Every)
}

/// [`example`] scoring only the conversation's last answer (its final assistant turn): the
/// sequence whose log-probability a preference compares.
pub fn answer_example(tokenizer: &Tokenizer, template: &ChatTemplate, conversation: &Conversation, max_len: usize) -> Result<Option<Example>, TrainError> {
    example_scoring(tokenizer, template, conversation, max_len, Answers::Last)
}

fn example_scoring(tokenizer: &Tokenizer, template: &ChatTemplate, conversation: &Conversation, max_len: usize, answers: Answers) -> Result<Option<Example>, TrainError> {
    let mut tokens: Vec<u32> = tokenizer.bos_prefix().into_iter().collect();
    // `is_target[j]`: token j is part of an answer.
    let mut is_target = vec![false; tokens.len()];
    for (text, answer) in segments(template, conversation, answers)? {
        let ids = tokenizer
            .encode(&text, true, false)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        // An answer is scored through the token that ends its turn; what the template writes
        // after it (a newline) is not the model's to predict.
        let scored = match ids.iter().position(|id| tokenizer.stop_ids().contains(id)) {
            Some(end) if answer => end + 1,
            _ if answer => ids.len(),
            _ => 0,
        };
        is_target.extend((0..ids.len()).map(|j| j < scored));
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

    fn tiny() -> crate::LoadedModel {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        tiny_gemma3(1).write(&path).unwrap();
        crate::LoadedModel::load(&path).unwrap()
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
        let model = tiny();
        let tokenizer = &model.tokenizer;
        let conversation = Conversation {
            messages: vec![
                message("system", "be terse"),
                message("user", "hello there"),
                message("assistant", "the cat"),
                message("user", "and then"),
                message("assistant", "a hat"),
            ],
        };
        let e = example(tokenizer, &model.chat, &conversation, 512).unwrap().unwrap();
        assert_eq!(scored_text(tokenizer, &e), ["the cat<end_of_turn>", "a hat<end_of_turn>"]);
        // Exactly the chat template's text: what the chat endpoint will prompt with.
        let text = tokenizer.decode(&e.tokens, false).unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nbe terse\n\nhello there<end_of_turn>\n<start_of_turn>model\nthe cat<end_of_turn>\n<start_of_turn>user\nand then<end_of_turn>\n<start_of_turn>model\na hat<end_of_turn>\n"
        );
    }

    #[test]
    fn an_answer_example_scores_only_the_last_answer() {
        let model = tiny();
        let tokenizer = &model.tokenizer;
        let conversation = Conversation {
            messages: vec![message("user", "hello there"), message("assistant", "the cat"), message("user", "and then"), message("assistant", "a hat")],
        };
        let every = example(tokenizer, &model.chat, &conversation, 512).unwrap().unwrap();
        let last = answer_example(tokenizer, &model.chat, &conversation, 512).unwrap().unwrap();
        assert_eq!(last.tokens, every.tokens);
        assert_eq!(scored_text(tokenizer, &last), ["a hat<end_of_turn>"]);
    }

    #[test]
    fn truncation_keeps_the_start_and_drops_what_has_nothing_to_score() {
        let model = tiny();
        let (tokenizer, chat) = (&model.tokenizer, &model.chat);
        let conversation = Conversation {
            messages: vec![message("user", "hello there"), message("assistant", "the cat")],
        };
        let full = example(tokenizer, chat, &conversation, 512).unwrap().unwrap();
        let cut = example(tokenizer, chat, &conversation, full.tokens.len() - 3).unwrap().unwrap();
        assert_eq!(cut.tokens, full.tokens[..full.tokens.len() - 3]);
        assert!(cut.scored_tokens() < full.scored_tokens());
        let prompt_only = full.scored.iter().position(|&s| s).unwrap() + 1;
        assert!(example(tokenizer, chat, &conversation, prompt_only).unwrap().is_none());
    }
}
