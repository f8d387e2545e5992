//! Real weights: Qwen2.5-Coder 0.5B Instruct (Q4_K_M) against llama.cpp b11434's outputs on the
//! same file (`data/real/`): tokenizer ids, greedy generation, teacher-forced logprobs and the
//! model's own chat template, under the bounds of that folder's README. The small random-weight
//! models of `families.rs` check the arithmetic; these check it on trained weights, where a
//! logit error moves real choices.

use std::sync::OnceLock;

use tessera::model_store::catalog::QWEN2_5_CODER_0_5B;
use tessera::model_store::ensure_model;
use tessera::LoadedModel;
use tessera_tests::{data_dir, LlamaCppReferences};

const NAME: &str = "qwen2.5-coder-0.5b";

fn references() -> &'static LlamaCppReferences {
    static REFS: OnceLock<LlamaCppReferences> = OnceLock::new();
    REFS.get_or_init(|| LlamaCppReferences::load(&data_dir("real").join(format!("{NAME}.refs.json"))))
}

/// Fetched from the catalog if missing (never skipped), and loaded once per test binary: the
/// tests run at the same time on one copy of the weights.
fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| {
        // The catalog checks the file against its sha256 when it fetches it; that must be the
        // file the references were made from, or every comparison below is meaningless.
        assert_eq!(
            QWEN2_5_CODER_0_5B.sha256,
            references().meta.model_sha256,
            "the catalog's {} is not the file data/real/ was made from",
            QWEN2_5_CODER_0_5B.name
        );
        let path = ensure_model(&QWEN2_5_CODER_0_5B).unwrap_or_else(|e| panic!("fetching {}: {e}", QWEN2_5_CODER_0_5B.name));
        LoadedModel::load(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
    })
}

#[test]
fn tokenization_is_exactly_llama_cpps() {
    references().check_tokenizer(NAME, model());
}

#[test]
fn the_chat_template_renders_llama_cpps_prompts() {
    references().check_chat_templates(NAME, model());
}

#[test]
fn greedy_decoding_follows_llama_cpp_where_it_is_decisive() {
    references().check_greedy(NAME, model());
}

#[test]
fn teacher_forced_logprobs_are_within_tolerance() {
    references().check_teacher_forced(NAME, model());
}
