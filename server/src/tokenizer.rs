//! The SentencePiece BPE tokenizer stored in a GGUF file's metadata, rebuilt as a Hugging Face
//! `tokenizers` BPE the way `convert_slow_tokenizer` (GemmaConverter) does:
//! - merges are derived from the piece scores (`generate_merges`);
//! - byte fallback (`<0xNN>` pieces), no space prefix, spaces normalised to `▁`;
//! - control pieces are special added tokens (matched in text only when asked);
//! - user-defined pieces (runs of spaces and newlines, …) are always matched whole.

use std::collections::HashMap;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, Tokenizer as HfTokenizer};

use crate::gguf::{GgufError, GgufFile, Value};

/// SentencePiece piece types, as stored in `tokenizer.ggml.token_type`.
const PIECE_CONTROL: i64 = 3;
const PIECE_USER_DEFINED: i64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model `{found}` is not supported (expected SentencePiece `llama`)")]
    UnsupportedModel { path: String, found: String },
    #[error("{path}: tokenizer metadata is inconsistent: {reason}")]
    Inconsistent { path: String, reason: String },
    #[error("tokenizer: {0}")]
    Library(String),
    #[error("token id {0} is outside the vocabulary")]
    UnknownId(u32),
}

fn library(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

pub struct Tokenizer {
    /// Splits special-token strings out of the text (`<start_of_turn>` → one id).
    with_special: HfTokenizer,
    /// Treats special-token strings as plain text.
    plain: HfTokenizer,
    bos_id: u32,
    eos_id: u32,
    /// Ids that end a generation: `<eos>` and `<end_of_turn>` when present.
    stop_ids: Vec<u32>,
    vocab_size: usize,
    control_ids: std::collections::HashSet<u32>,
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let path = gguf.path().display().to_string();
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "llama" {
            return Err(TokenizerError::UnsupportedModel {
                path,
                found: model.to_string(),
            });
        }
        let pieces: Vec<&str> = gguf
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().unwrap_or_default())
            .collect();
        let scores: Vec<f32> = gguf
            .get_array("tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.as_f64().unwrap_or(0.0) as f32)
            .collect();
        let types: Vec<i64> = gguf
            .get_array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| match v {
                Value::I32(t) => *t as i64,
                other => other.as_u64().map(|t| t as i64).unwrap_or(1),
            })
            .collect();
        if scores.len() != pieces.len() || types.len() != pieces.len() {
            return Err(TokenizerError::Inconsistent {
                path,
                reason: format!(
                    "{} tokens, {} scores, {} token types",
                    pieces.len(),
                    scores.len(),
                    types.len()
                ),
            });
        }
        let bos_id = gguf.get_u64("tokenizer.ggml.bos_token_id")? as u32;
        let eos_id = gguf.get_u64("tokenizer.ggml.eos_token_id")? as u32;
        let unk_id = gguf.get_u64("tokenizer.ggml.unknown_token_id").unwrap_or(3) as usize;
        let unk = pieces
            .get(unk_id)
            .ok_or_else(|| TokenizerError::Inconsistent {
                path: path.clone(),
                reason: format!("unknown_token_id {unk_id} is outside the vocabulary"),
            })?
            .to_string();

        let vocab: HashMap<String, u32> = pieces
            .iter()
            .enumerate()
            .map(|(id, p)| (p.to_string(), id as u32))
            .collect();
        if vocab.len() != pieces.len() {
            return Err(TokenizerError::Inconsistent {
                path,
                reason: "the vocabulary has duplicate pieces".into(),
            });
        }
        let merges = merges_from_scores(&pieces, &scores, &vocab);

        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<Vocab>(), merges)
            .unk_token(unk)
            .fuse_unk(true)
            .byte_fallback(true)
            .build()
            .map_err(library)?;

        let mut hf = HfTokenizer::new(bpe);
        hf.with_normalizer(Some(NormalizerWrapper::Replace(
            Replace::new(" ", "▁").map_err(library)?,
        )));
        hf.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(vec![
            DecoderWrapper::Replace(Replace::new("▁", " ").map_err(library)?),
            DecoderWrapper::ByteFallback(ByteFallback::default()),
            DecoderWrapper::Fuse(Fuse::default()),
        ]))));

        let added = |kind: i64, special: bool| -> Vec<AddedToken> {
            pieces
                .iter()
                .zip(&types)
                .filter(|(_, &t)| t == kind)
                .map(|(p, _)| AddedToken::from(p.to_string(), special).normalized(false))
                .collect()
        };
        hf.add_special_tokens(&added(PIECE_CONTROL, true));
        hf.add_tokens(&added(PIECE_USER_DEFINED, false));

        let mut plain = hf.clone();
        plain.set_encode_special_tokens(true);

        let stop_ids = ["<eos>", "<end_of_turn>"]
            .iter()
            .filter_map(|s| hf.token_to_id(s))
            .chain(std::iter::once(eos_id))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();

        let control_ids = types
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == PIECE_CONTROL)
            .map(|(id, _)| id as u32)
            .collect();
        Ok(Self {
            with_special: hf,
            plain,
            bos_id,
            eos_id,
            stop_ids,
            vocab_size: pieces.len(),
            control_ids,
        })
    }

    /// Encodes `text`. With `special`, strings such as `<start_of_turn>` become their control
    /// token; without it they are tokenized as ordinary text. `bos` prepends `<bos>`.
    pub fn encode(&self, text: &str, special: bool, bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let tok = if special {
            &self.with_special
        } else {
            &self.plain
        };
        let encoding = tok.encode_fast(text, false).map_err(library)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if bos {
            ids.push(self.bos_id);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text, control tokens included verbatim unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::UnknownId(bad));
        }
        self.with_special.decode(ids, skip_special).map_err(library)
    }

    pub fn id_to_piece(&self, id: u32) -> Option<String> {
        self.with_special.id_to_token(id)
    }

    /// The bytes a token stands for: a byte-fallback piece `<0xNN>` is that byte, `▁` a space.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.id_to_piece(id) else {
            return Vec::new();
        };
        if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>')) {
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                return vec![byte];
            }
        }
        piece.replace('▁', " ").into_bytes()
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.with_special.token_to_id(piece)
    }

    /// Control tokens (`<bos>`, `<start_of_turn>`, …) have no text of their own.
    pub fn is_control(&self, id: u32) -> bool {
        self.control_ids.contains(&id)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// BPE merges from SentencePiece scores, as Hugging Face's `generate_merges` derives them:
/// every split of a piece into two in-vocabulary halves is a merge; merges sort by the piece's
/// score (descending), then by the lengths of the halves, and within a piece by the halves' ids.
fn merges_from_scores(
    pieces: &[&str],
    scores: &[f32],
    vocab: &HashMap<String, u32>,
) -> Vec<(String, String)> {
    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut merges: Vec<Merge> = Vec::new();
    for (piece, &score) in pieces.iter().zip(scores) {
        let mut local: Vec<(u32, u32, Merge)> = Vec::new();
        for (split, _) in piece.char_indices().skip(1) {
            let (left, right) = piece.split_at(split);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                local.push((
                    l,
                    r,
                    Merge {
                        left,
                        right,
                        score,
                        left_chars: left.chars().count(),
                        right_chars: right.chars().count(),
                    },
                ));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local.into_iter().map(|(_, _, m)| m));
    }
    // A stable sort, like Python's `sorted(..., reverse=True)` on (score, len(left), len(right)).
    merges.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_string(), m.right.to_string()))
        .collect()
}
