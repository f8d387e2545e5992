//! The tokenizer a GGUF file describes in its metadata, built with Hugging Face `tokenizers`:
//! SentencePiece BPE (`tokenizer.ggml.model = llama`: Gemma, Llama 2, Mistral; `spm`) or
//! byte-level BPE (`gpt2`: Llama 3, Qwen; `bpe`). Either way:
//! - control pieces are special added tokens, matched in text only when asked;
//! - user-defined pieces are always matched whole (as llama.cpp does);
//! - BOS is prepended when `add_bos_token` says so (by default: SentencePiece and Llama 3 yes,
//!   Qwen no, as llama.cpp decides);
//! - every token that ends a turn (EOS, EOT, `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, …)
//!   stops generation.

mod bpe;
mod spm;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::OnceLock;

use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::gguf::{GgufError, GgufFile, Value};

/// llama.cpp's token types, as stored in `tokenizer.ggml.token_type`.
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// Texts of tokens that end a turn, whichever family uses them (llama.cpp's end-of-generation
/// list).
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "<eos>",
    "</s>",
];

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{path}: tokenizer model `{found}` (`tokenizer.ggml.model`) is not supported (supported: `llama` SentencePiece, `gpt2` byte-level BPE)")]
    UnsupportedModel { path: String, found: String },
    #[error("{path}: pre-tokenizer `{found}` (`tokenizer.ggml.pre`) is not supported (supported: {})", bpe::KNOWN_PRE_TOKENIZERS)]
    UnknownPreTokenizer { path: String, found: String },
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

/// The pieces of a GGUF vocabulary with their llama.cpp token types.
struct Vocabulary {
    pieces: Vec<String>,
    types: Vec<i64>,
}

impl Vocabulary {
    fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let pieces: Vec<String> = gguf
            .get_array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().unwrap_or_default().to_string())
            .collect();
        let types: Vec<i64> = match gguf.get_array("tokenizer.ggml.token_type") {
            Ok(types) => types
                .iter()
                .map(|v| match v {
                    Value::I32(t) => *t as i64,
                    other => other.as_u64().map(|t| t as i64).unwrap_or(1),
                })
                .collect(),
            Err(_) => vec![1; pieces.len()],
        };
        if types.len() != pieces.len() {
            return Err(TokenizerError::Inconsistent {
                path: gguf.path().display().to_string(),
                reason: format!("{} tokens but {} token types", pieces.len(), types.len()),
            });
        }
        Ok(Self { pieces, types })
    }

    /// Piece → id, refusing duplicates.
    fn ids(&self, path: &str) -> Result<HashMap<String, u32>, TokenizerError> {
        let ids: HashMap<String, u32> = self.pieces.iter().enumerate().map(|(id, p)| (p.clone(), id as u32)).collect();
        if ids.len() != self.pieces.len() {
            return Err(TokenizerError::Inconsistent {
                path: path.to_string(),
                reason: "the vocabulary has duplicate pieces".into(),
            });
        }
        Ok(ids)
    }

    fn of_type(&self, kind: i64) -> impl Iterator<Item = (u32, &str)> {
        self.pieces
            .iter()
            .zip(&self.types)
            .enumerate()
            .filter(move |(_, (_, &t))| t == kind)
            .map(|(id, (p, _))| (id as u32, p.as_str()))
    }
}

/// How a piece's text maps back to bytes.
enum PieceText {
    SentencePiece,
    ByteLevel(bpe::ByteDecoder),
}

pub struct Tokenizer {
    /// Splits special-token strings out of the text (`<start_of_turn>` → one id).
    with_special: HfTokenizer,
    /// Treats special-token strings as plain text. Built on first use: serving always parses
    /// special tokens, and a second copy of a 262k-token vocabulary costs tens of MiB.
    plain: OnceLock<HfTokenizer>,
    bos_id: u32,
    add_bos: bool,
    /// `add_eos_token`: special-token encoding also appends EOS.
    add_eos: bool,
    eos_id: u32,
    /// Ids that end a generation.
    stop_ids: Vec<u32>,
    vocab_size: usize,
    control_ids: HashSet<u32>,
    /// Added tokens (control and user-defined) whose text is literal, not byte-level.
    literal_ids: HashSet<u32>,
    piece_text: PieceText,
}

impl Tokenizer {
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let path = gguf.path().display().to_string();
        let vocabulary = Vocabulary::from_gguf(gguf)?;
        let model = gguf.get_str("tokenizer.ggml.model")?;
        let (mut hf, piece_text, default_add_bos) = match model {
            "llama" => (spm::build(gguf, &vocabulary)?, PieceText::SentencePiece, true),
            "gpt2" => {
                let pre = gguf.get_str("tokenizer.ggml.pre").unwrap_or("default");
                let add_bos = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
                (bpe::build(gguf, &vocabulary)?, PieceText::ByteLevel(bpe::ByteDecoder::new()), add_bos)
            }
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    path,
                    found: other.to_string(),
                })
            }
        };
        let added = |kind: i64, special: bool| -> Vec<AddedToken> {
            vocabulary
                .of_type(kind)
                .map(|(_, p)| AddedToken::from(p.to_string(), special).normalized(false))
                .collect()
        };
        hf.add_special_tokens(&added(TOKEN_CONTROL, true));
        hf.add_tokens(&added(TOKEN_USER_DEFINED, false));

        let id_of = |key: &str| -> Result<Option<u32>, TokenizerError> {
            if !gguf.has_key(key) {
                return Ok(None);
            }
            let id = gguf.get_u64(key)? as usize;
            if id >= vocabulary.pieces.len() {
                return Err(TokenizerError::Inconsistent {
                    path: path.clone(),
                    reason: format!("`{key}` = {id} is outside the vocabulary of {}", vocabulary.pieces.len()),
                });
            }
            Ok(Some(id as u32))
        };
        let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_of("tokenizer.ggml.eos_token_id")?.ok_or_else(|| GgufError::Metadata {
            path: gguf.path().to_path_buf(),
            key: "tokenizer.ggml.eos_token_id".into(),
            expected: "an unsigned integer",
        })?;
        let add_bos = gguf
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(default_add_bos)
            && bos_id.is_some();
        let add_eos = gguf.metadata.get("tokenizer.ggml.add_eos_token").and_then(Value::as_bool).unwrap_or(false);

        let control_ids: HashSet<u32> = vocabulary.of_type(TOKEN_CONTROL).map(|(id, _)| id).collect();
        let stop_ids = [id_of("tokenizer.ggml.eot_token_id")?, id_of("tokenizer.ggml.eom_token_id")?, Some(eos_id)]
            .into_iter()
            .flatten()
            .chain(
                vocabulary
                    .of_type(TOKEN_CONTROL)
                    .chain(vocabulary.of_type(TOKEN_USER_DEFINED))
                    .filter(|(_, p)| END_OF_TURN_TEXTS.contains(p))
                    .map(|(id, _)| id),
            )
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let literal_ids = vocabulary
            .of_type(TOKEN_CONTROL)
            .chain(vocabulary.of_type(TOKEN_USER_DEFINED))
            .map(|(id, _)| id)
            .collect();
        Ok(Self {
            with_special: hf,
            plain: OnceLock::new(),
            bos_id: bos_id.unwrap_or(eos_id),
            add_bos,
            add_eos,
            eos_id,
            stop_ids,
            vocab_size: vocabulary.pieces.len(),
            control_ids,
            literal_ids,
            piece_text,
        })
    }

    /// Encodes `text`. With `special`, strings such as `<start_of_turn>` become their control
    /// token; without it they are tokenized as ordinary text. `bos` asks for the model's BOS
    /// token in front, when its metadata adds one (Qwen's does not), and EOS after, when its
    /// metadata says `add_eos_token`.
    pub fn encode(&self, text: &str, special: bool, bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let tok = if special {
            &self.with_special
        } else {
            self.plain.get_or_init(|| {
                let mut plain = self.with_special.clone();
                plain.set_encode_special_tokens(true);
                plain
            })
        };
        let encoding = tok.encode_fast(text, false).map_err(library)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.bos_prefix().filter(|_| bos));
        ids.extend_from_slice(encoding.get_ids());
        ids.extend(Some(self.eos_id).filter(|_| bos && self.add_eos));
        Ok(ids)
    }

    /// The BOS token a sequence starts with, when the model adds one.
    pub fn bos_prefix(&self) -> Option<u32> {
        self.add_bos.then_some(self.bos_id)
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

    /// The bytes a token stands for (a SentencePiece `<0xNN>` piece is that byte and `▁` a
    /// space; a byte-level piece maps back through GPT-2's table).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.id_to_piece(id) else {
            return Vec::new();
        };
        match &self.piece_text {
            _ if self.literal_ids.contains(&id) => piece.into_bytes(),
            PieceText::SentencePiece => spm::piece_bytes(&piece),
            PieceText::ByteLevel(decoder) => decoder.piece_bytes(&piece).unwrap_or_else(|| piece.into_bytes()),
        }
    }

    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.with_special.token_to_id(piece)
    }

    /// Control tokens (`<bos>`, `<|im_start|>`, …) have no text of their own.
    pub fn is_control(&self, id: u32) -> bool {
        self.control_ids.contains(&id)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The text of a token (for the chat template's `bos_token` and `eos_token`).
    pub fn token_text(&self, id: u32) -> String {
        String::from_utf8_lossy(&self.token_bytes(id)).into_owned()
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}
