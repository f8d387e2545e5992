//! `tokenizer.ggml.model = gpt2`: byte-level BPE (Llama 3, Qwen 2/2.5/3) from the file's
//! `tokens` and `merges`. Text is first split by the regular expressions of the pre-tokenizer
//! that `tokenizer.ggml.pre` names (the same ones llama.cpp and the models' own
//! `tokenizer.json` use), each piece is mapped byte by byte to GPT-2's printable alphabet, then
//! merged.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::gguf::GgufFile;
use crate::tokenizer::{library, TokenizerError, Vocabulary};

/// Contractions, letters with one leading non-letter, numbers in runs of at most three,
/// punctuation with trailing newlines, newlines, and spaces not before a word (Llama 3).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's, with every digit on its own (Qwen 2, 2.5 and 3).
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// llama.cpp's `default` BPE pre-tokenizer: four splits, each of the pieces the one before left.
const DEFAULT: [&str; 4] = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// The pre-tokenizers this tokenizer knows, by their `tokenizer.ggml.pre` names.
pub const KNOWN_PRE_TOKENIZERS: &str = "llama-bpe (llama3, llama-v3), qwen2, gpt-2, default";

/// Whether a pre-tokenizer keeps a word whole when the vocabulary has it, merges or not
/// (Llama 3's `ignore_merges`).
fn pre_tokenizer(name: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match name {
        "llama-bpe" | "llama3" | "llama-v3" => (vec![LLAMA3], true),
        "qwen2" => (vec![QWEN2], false),
        "gpt-2" | "gpt2" => (vec![GPT2], false),
        "default" | "" => (DEFAULT.to_vec(), false),
        _ => return None,
    })
}

/// The byte-level BPE model of `vocabulary`, before its added tokens.
pub(super) fn build(gguf: &GgufFile, vocabulary: &Vocabulary) -> Result<HfTokenizer, TokenizerError> {
    let path = gguf.path().display().to_string();
    let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
    let (patterns, ignore_merges) = pre_tokenizer(pre).ok_or_else(|| TokenizerError::UnknownPreTokenizer {
        path: path.clone(),
        found: pre.to_string(),
    })?;
    let merges = gguf
        .get_array("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.as_str()
                .and_then(|m| m.split_once(' '))
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| TokenizerError::Inconsistent {
                    path: path.clone(),
                    reason: format!("`tokenizer.ggml.merges[{i}]` is not two pieces separated by a space"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vocab = vocabulary.ids(&path)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(library)?;
    let mut hf = HfTokenizer::new(bpe);
    let mut steps = patterns
        .into_iter()
        .map(|pattern| {
            Split::new(SplitPattern::Regex(pattern.into()), SplitDelimiterBehavior::Isolated, false)
                .map(PreTokenizerWrapper::Split)
                .map_err(library)
        })
        .collect::<Result<Vec<_>, _>>()?;
    steps.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)));
    hf.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(Sequence::new(steps))));
    hf.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    Ok(hf)
}

/// GPT-2's byte ↔ printable character table: printable Latin-1 bytes stand for themselves,
/// the others (controls, space, …) for 256, 257, … in byte order.
fn byte_of_char() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                b as char
            } else {
                next += 1;
                char::from_u32(next - 1).unwrap_or('\u{FFFD}')
            };
            (c, b)
        })
        .collect()
}

/// Decodes byte-level pieces to their bytes.
pub(super) struct ByteDecoder {
    table: std::collections::HashMap<char, u8>,
}

impl ByteDecoder {
    pub fn new() -> Self {
        Self { table: byte_of_char() }
    }

    /// The bytes a byte-level piece stands for; `None` when it is not one (an added token
    /// stored as its plain text).
    pub fn piece_bytes(&self, piece: &str) -> Option<Vec<u8>> {
        piece.chars().map(|c| self.table.get(&c).copied()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_table_is_gpt2s() {
        let d = ByteDecoder::new();
        assert_eq!(d.piece_bytes("Ġworld"), Some(b" world".to_vec()));
        assert_eq!(d.piece_bytes("Ċ"), Some(b"\n".to_vec()));
        assert_eq!(d.piece_bytes("Ã©"), Some("é".as_bytes().to_vec()));
        assert_eq!(d.table.len(), 256);
    }

    #[test]
    fn unknown_pre_tokenizers_are_named() {
        assert!(pre_tokenizer("qwen2").is_some());
        assert!(pre_tokenizer("deepseek-coder").is_none());
    }
}
