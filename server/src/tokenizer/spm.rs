//! `tokenizer.ggml.model = llama`: the SentencePiece BPE stored in a GGUF file's metadata,
//! rebuilt as a Hugging Face `tokenizers` BPE the way `convert_slow_tokenizer` does:
//! - merges are derived from the piece scores (`generate_merges`);
//! - byte fallback (`<0xNN>` pieces), spaces normalised to `▁`;
//! - a `▁` prefixed to each run of text when `add_space_prefix` asks (Llama 2, Mistral; not
//!   Gemma), which `tokenizers` applies after every special token, as llama.cpp does.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::Sequence as NormalizerSequence;
use tokenizers::{DecoderWrapper, NormalizerWrapper, Tokenizer as HfTokenizer};

use crate::gguf::GgufFile;
use crate::tokenizer::{library, TokenizerError, Vocabulary};

/// The SentencePiece model of `vocabulary`, before its added tokens.
pub(super) fn build(gguf: &GgufFile, vocabulary: &Vocabulary) -> Result<HfTokenizer, TokenizerError> {
    let path = gguf.path().display().to_string();
    let scores: Vec<f32> = gguf
        .get_array("tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.as_f64().unwrap_or(0.0) as f32)
        .collect();
    if scores.len() != vocabulary.pieces.len() {
        return Err(TokenizerError::Inconsistent {
            path,
            reason: format!("{} tokens but {} scores", vocabulary.pieces.len(), scores.len()),
        });
    }
    let unk_id = gguf.get_u64("tokenizer.ggml.unknown_token_id").unwrap_or(0) as usize;
    let unk = vocabulary
        .pieces
        .get(unk_id)
        .ok_or_else(|| TokenizerError::Inconsistent {
            path: path.clone(),
            reason: format!("unknown_token_id {unk_id} is outside the vocabulary"),
        })?
        .to_string();
    let vocab = vocabulary.ids(&path)?;
    let pieces: Vec<&str> = vocabulary.pieces.iter().map(String::as_str).collect();
    let merges = merges_from_scores(&pieces, &scores, &vocab);
    let bpe = BPE::builder()
        .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(library)?;

    let mut hf = HfTokenizer::new(bpe);
    let spaces = NormalizerWrapper::Replace(Replace::new(" ", "▁").map_err(library)?);
    let add_space_prefix = gguf
        .metadata
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    hf.with_normalizer(Some(if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new("▁".into())),
            spaces,
        ]))
    } else {
        spaces
    }));
    hf.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(library)?),
        DecoderWrapper::ByteFallback(ByteFallback::default()),
        DecoderWrapper::Fuse(Fuse::default()),
    ]))));
    Ok(hf)
}

/// The bytes of a SentencePiece piece: `<0xNN>` is that byte, `▁` a space.
pub(super) fn piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
        if let Ok(byte) = u8::from_str_radix(hex, 16) {
            return vec![byte];
        }
    }
    piece.replace('▁', " ").into_bytes()
}

/// BPE merges from SentencePiece scores, as Hugging Face's `generate_merges` derives them:
/// every split of a piece into two in-vocabulary halves is a merge; merges sort by the piece's
/// score (descending), then by the lengths of the halves, and within a piece by the halves' ids.
/// A large vocabulary has hundreds of thousands of merges (Gemma's 262k pieces give 515k), so
/// they are sorted as 16-byte keys and become strings only at the end.
fn merges_from_scores(
    pieces: &[&str],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    struct Merge {
        score: f32,
        left_chars: u16,
        right_chars: u16,
        left: u32,
        right: u32,
    }
    let chars = |s: &str| u16::try_from(s.chars().count()).unwrap_or(u16::MAX);
    let mut merges: Vec<Merge> = Vec::new();
    for (piece, &score) in pieces.iter().zip(scores) {
        let first = merges.len();
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                merges.push(Merge { score, left_chars: chars(left), right_chars: chars(right), left: l, right: r });
            }
        }
        merges[first..].sort_by_key(|m| (m.left, m.right));
    }
    // A stable sort, like Python's `sorted(..., reverse=True)` on (score, len(left), len(right)).
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    let text = |id: u32| pieces.get(id as usize).map_or_else(String::new, |p| p.to_string());
    merges.into_iter().map(|m| (text(m.left), text(m.right))).collect()
}
