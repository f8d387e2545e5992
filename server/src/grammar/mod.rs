//! Constrained decoding: the answer's shape (a JSON Schema, a list of choices, a regular
//! expression or a Lark grammar) enforced token by token while sampling, with `llguidance`.
//!
//! A request's constraint is compiled once into a parser (compiled parsers are cached by their
//! spec); each sequence gets its own [`ConstrainedDecoder`], which computes the mask of allowed
//! tokens for the next step on a grammar thread while the model's forward pass runs, and
//! applies it to the logits before sampling.
//!
//! JSON is generated compact, with `", "` and `": "` as separators and no other whitespace, so
//! a model cannot wander off into blank lines; a schema may choose otherwise with llguidance's
//! `"x-guidance"` options (for example `{"whitespace_flexible": true}`).

mod decoder;
mod vocabulary;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::TokEnv;
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};

pub use decoder::{Accepted, ConstrainedDecoder, Mask};
pub use vocabulary::token_env;

/// The shape an answer must have.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ConstraintSpec {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A value valid under this JSON Schema, as compact JSON text.
    JsonSchema(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A whole-answer match of this regular expression.
    Regex(String),
    /// A grammar in llguidance's Lark dialect (which may embed `%json {…}` schemas).
    Lark(String),
}

/// How a grammar lays out JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Layout {
    /// What the model generates: compact, one space after `,` and `:`.
    Generate,
    /// What a stored answer may look like: any JSON whitespace.
    Check,
}

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    /// The constraint itself is wrong (the client's fault).
    #[error("{0}")]
    Invalid(String),
    /// The grammar engine failed on a constraint it had accepted.
    #[error("the grammar engine failed: {0}")]
    Engine(String),
}

impl ConstraintSpec {
    fn grammar(&self, layout: Layout) -> Result<TopLevelGrammar, GrammarError> {
        Ok(match self {
            ConstraintSpec::JsonObject => TopLevelGrammar::from_json_schema(with_layout(json!({"type": "object"}), layout)),
            ConstraintSpec::JsonSchema(text) => {
                let schema: Value = serde_json::from_str(text).map_err(|e| GrammarError::Invalid(format!("the schema is not JSON: {e}")))?;
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(GrammarError::Invalid("a JSON Schema must be an object".into()));
                }
                TopLevelGrammar::from_json_schema(with_layout(schema, layout))
            }
            ConstraintSpec::Choice(choices) => {
                // Lark string literals share JSON's escapes.
                let alternatives: Vec<String> = choices.iter().map(|c| Value::String(c.clone()).to_string()).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            ConstraintSpec::Regex(regex) => TopLevelGrammar::from_regex(regex),
            ConstraintSpec::Lark(grammar) => TopLevelGrammar::from_lark(grammar.clone()),
        })
    }
}

/// The schema with the layout's separators, unless it chose its own (`"x-guidance"`).
fn with_layout(mut schema: Value, layout: Layout) -> Value {
    if let Some(object) = schema.as_object_mut() {
        if !object.contains_key("x-guidance") {
            let options = match layout {
                Layout::Generate => json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
                Layout::Check => json!({"whitespace_flexible": true}),
            };
            object.insert("x-guidance".into(), options);
        }
    }
    schema
}

/// How many compiled parsers are kept.
const CACHED_PARSERS: usize = 128;

/// Compiled parsers by spec, the least recently used dropped first.
#[derive(Default)]
struct ParserCache {
    entries: HashMap<(ConstraintSpec, Layout), (TokenParser, u64)>,
    clock: u64,
}

impl ParserCache {
    fn get(&mut self, key: &(ConstraintSpec, Layout)) -> Option<TokenParser> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(parser, used)| {
            *used = clock;
            parser.clone()
        })
    }

    fn insert(&mut self, key: (ConstraintSpec, Layout), parser: TokenParser) {
        if self.entries.len() >= CACHED_PARSERS {
            if let Some(oldest) = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone()) {
                self.entries.remove(&oldest);
            }
        }
        self.clock += 1;
        self.entries.insert(key, (parser, self.clock));
    }
}

/// The grammar engine of one model: its vocabulary (built once, on first use or by
/// [`Grammars::warm_up`]), the compiled-parser cache, and the thread masks are computed on.
pub struct Grammars {
    factory: LazyLock<Result<ParserFactory, String>, Box<dyn FnOnce() -> Result<ParserFactory, String> + Send>>,
    cache: Mutex<ParserCache>,
    workers: Arc<rayon::ThreadPool>,
    /// Whether `factory` has been built (`LazyLock` cannot be asked without building it).
    built: AtomicBool,
}

/// The vocabulary being built (see [`Grammars::warm_up`]).
pub struct Warming(Option<std::thread::JoinHandle<()>>);

impl Warming {
    /// Waits until the vocabulary is built (or its thread could not start: then the first
    /// constrained request builds it).
    pub fn finish(self) {
        if let Some(handle) = self.0 {
            if handle.join().is_err() {
                tracing::warn!("building the grammar vocabulary panicked");
            }
        }
    }
}

/// A compiled constraint, ready to start a sequence with.
#[derive(Clone)]
pub struct Constraint {
    parser: TokenParser,
    workers: Arc<rayon::ThreadPool>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Grammars {
    /// `make_env` builds the vocabulary (it walks every token, so it runs once, off the
    /// request path where possible).
    pub fn new(make_env: impl FnOnce() -> TokEnv + Send + 'static) -> std::io::Result<Self> {
        let workers = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "tessera-grammar".into())
            .build()
            .map_err(std::io::Error::other)?;
        let build = move || {
            let started = std::time::Instant::now();
            let mut factory = ParserFactory::new_simple(&make_env()).map_err(|e| e.to_string())?;
            factory.set_stderr_log_level(0);
            tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "grammar vocabulary ready");
            Ok(factory)
        };
        Ok(Self {
            factory: LazyLock::new(Box::new(build)),
            cache: Mutex::new(ParserCache::default()),
            workers: Arc::new(workers),
            built: AtomicBool::new(false),
        })
    }

    /// The grammar engine of a loaded model, its vocabulary the model's logit rows.
    pub fn for_model(model: Arc<crate::LoadedModel>) -> std::io::Result<Self> {
        Self::new(move || {
            let tokenizer = &model.tokenizer;
            token_env(tokenizer, model.model.config().vocab, tokenizer.stop_ids())
        })
    }

    /// Starts building the vocabulary on its own thread, so the rest of startup goes on
    /// meanwhile; the server should [`Warming::finish`] it before it takes requests. Built
    /// lazily instead, it took a core for a second (Gemma 3's 262k tokens) while the first
    /// requests ran, and a burst of them took twice as long to start.
    pub fn warm_up(self: &Arc<Self>) -> Warming {
        let this = self.clone();
        let spawned = std::thread::Builder::new().name("tessera-grammar-init".into()).spawn(move || {
            let _ = this.factory();
        });
        match spawned {
            Ok(handle) => Warming(Some(handle)),
            Err(e) => {
                tracing::warn!(error = %e, "could not build the grammar vocabulary in the background");
                Warming(None)
            }
        }
    }

    fn factory(&self) -> Result<&ParserFactory, GrammarError> {
        let factory = LazyLock::force(&self.factory);
        self.built.store(true, Ordering::Release);
        factory.as_ref().map_err(|e| GrammarError::Engine(e.clone()))
    }

    /// Whether the vocabulary is built, so no request waits for it.
    pub fn vocabulary_built(&self) -> bool {
        self.built.load(Ordering::Acquire)
    }

    /// Compiles `spec` for generation (or takes it from the cache). Blocking: call it off the
    /// async workers.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint, GrammarError> {
        Ok(Constraint { parser: self.parser(spec, Layout::Generate)?, workers: self.workers.clone() })
    }

    /// Whether `text` is a whole answer of the shape `spec` (with any JSON whitespace).
    /// Blocking.
    pub fn accepts(&self, spec: &ConstraintSpec, text: &str) -> Result<bool, GrammarError> {
        let parser = self.parser(spec, Layout::Check)?;
        // The grammar reads bytes, so any spelling of them checks the same.
        let tokens = parser.token_env.tokenize_bytes(text.as_bytes());
        let mut matcher = Matcher::new(Ok(parser));
        let valid = matcher.validate_tokens(&tokens).map_err(|e| GrammarError::Engine(e.to_string()))?;
        if valid < tokens.len() {
            return Ok(false);
        }
        matcher.consume_tokens(&tokens).map_err(|e| GrammarError::Engine(e.to_string()))?;
        matcher.is_accepting().map_err(|e| GrammarError::Engine(e.to_string()))
    }

    fn parser(&self, spec: &ConstraintSpec, layout: Layout) -> Result<TokenParser, GrammarError> {
        let key = (spec.clone(), layout);
        if let Some(parser) = self.lock_cache().get(&key) {
            return Ok(parser);
        }
        let grammar = spec.grammar(layout)?;
        let parser = self.factory()?.create_parser(grammar).map_err(|e| GrammarError::Invalid(e.to_string()))?;
        self.lock_cache().insert(key, parser.clone());
        Ok(parser)
    }

    /// How many compiled parsers the cache holds.
    pub fn cached(&self) -> usize {
        self.lock_cache().entries.len()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, ParserCache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_grammars() -> Grammars {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        crate::model::synthetic::tiny_gemma3(5).write(&path).unwrap();
        Grammars::for_model(Arc::new(crate::LoadedModel::load(&path).unwrap())).unwrap()
    }

    #[test]
    fn a_finished_warm_up_leaves_the_vocabulary_built() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("tiny.gguf");
        crate::model::synthetic::tiny_gemma3(5).write(&path)?;
        let model = Arc::new(crate::LoadedModel::load(&path)?);
        // A slow vocabulary: the warm-up must be waited for, not merely started.
        let grammars = Arc::new(Grammars::new(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            token_env(&model.tokenizer, model.model.config().vocab, model.tokenizer.stop_ids())
        })?);
        let warming = grammars.warm_up();
        assert!(!grammars.vocabulary_built());
        warming.finish();
        assert!(grammars.vocabulary_built());
        grammars.compile(&ConstraintSpec::JsonObject)?;
        Ok(())
    }

    #[test]
    fn parsers_are_compiled_once_per_spec_and_bad_specs_say_why() {
        let grammars = tiny_grammars();
        let schema = ConstraintSpec::JsonSchema(r#"{"type": "object", "properties": {"a": {"type": "integer"}}}"#.into());
        grammars.compile(&schema).unwrap();
        grammars.compile(&schema).unwrap();
        grammars.compile(&ConstraintSpec::Choice(vec!["x".into(), "y".into()])).unwrap();
        assert_eq!(grammars.cached(), 2);
        let Err(GrammarError::Invalid(reason)) = grammars.compile(&ConstraintSpec::Regex("(".into())) else { panic!("an unclosed group compiled") };
        assert!(!reason.is_empty());
        assert!(matches!(grammars.compile(&ConstraintSpec::JsonSchema("[1]".into())), Err(GrammarError::Invalid(_))));
    }

    #[test]
    fn stored_answers_are_checked_whole_with_any_json_whitespace() {
        let grammars = tiny_grammars();
        let schema = ConstraintSpec::JsonSchema(r#"{"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}"#.into());
        assert!(grammars.accepts(&schema, r#"{"n": 3}"#).unwrap());
        assert!(grammars.accepts(&schema, "{\n  \"n\":3\n}").unwrap());
        assert!(!grammars.accepts(&schema, r#"{"n": 30}"#).unwrap());
        assert!(!grammars.accepts(&schema, r#"{"n": 3"#).unwrap(), "a prefix is not an answer");
        let choice = ConstraintSpec::Choice(vec!["yes".into(), "no".into()]);
        assert!(grammars.accepts(&choice, "no").unwrap());
        assert!(!grammars.accepts(&choice, "nope").unwrap());
        assert!(grammars.accepts(&ConstraintSpec::Regex("[0-9]+ apples".into()), "12 apples").unwrap());
    }
}
