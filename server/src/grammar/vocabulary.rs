//! The model's vocabulary as llguidance sees it: every token id with the bytes it stands for,
//! in a trie, and a way to tokenize bytes.
//!
//! Control tokens (`<eos>`, `<|im_end|>`, …) are written as llguidance's special-token marker
//! (0xFF) followed by their name, so no grammar over text can ever produce one; the trie marks
//! the end-of-sequence token, which a mask allows exactly when the grammar may end.

use std::sync::Arc;

use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::tokenizer::Tokenizer;

struct ModelVocabulary {
    trie: TokTrie,
}

impl TokenizerEnv for ModelVocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        // llguidance spells the bytes a grammar forces with this, so it must give exactly those
        // bytes: the model's tokenizer would not (a SentencePiece one puts a space before the
        // text), while the trie's longest matches always do, every byte having a token.
        self.trie.greedy_tokenize(bytes)
    }
}

/// The trie of `tokenizer`'s `n_vocab` ids (the model's logit rows may be longer than the
/// tokenizer's list: ids past it stand for no bytes and are never allowed). `stop_ids` are the
/// ends of a chat turn; the first that is not `<eos>` is the trie's end-of-turn token.
pub fn token_env(tokenizer: &Tokenizer, n_vocab: usize, stop_ids: &[u32]) -> TokEnv {
    let words: Vec<Vec<u8>> = (0..n_vocab as u32)
        .map(|id| {
            if id as usize >= tokenizer.vocab_size() {
                Vec::new()
            } else if tokenizer.is_control(id) {
                let mut word = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                word.extend_from_slice(tokenizer.id_to_piece(id).unwrap_or_default().as_bytes());
                word
            } else {
                tokenizer.token_bytes(id)
            }
        })
        .collect();
    let mut info = TokRxInfo::new(n_vocab as u32, tokenizer.eos_id());
    info.tok_bos = Some(tokenizer.bos_id());
    info.tok_end_of_turn = stop_ids.iter().copied().find(|&id| id != tokenizer.eos_id());
    Arc::new(ModelVocabulary { trie: TokTrie::from(&info, &words) })
}
