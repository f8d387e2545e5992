//! `tessera serve` settings: command-line flags, each with an environment variable, over an
//! optional TOML file (the same keys, snake_case), over defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::blobs::BlobLocation;
use crate::store::StateLocation;

#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeOptions {
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long, env = "TESSERA_HOST")]
    pub host: Option<String>,
    /// Port to listen on [default: 8080].
    #[arg(long, env = "TESSERA_PORT")]
    pub port: Option<u16>,
    /// A catalog name (`tessera model list`; fetched when missing) or a GGUF file's path
    /// [default: qwen2.5-coder-0.5b-instruct].
    #[arg(long, env = "TESSERA_MODEL")]
    pub model: Option<PathBuf>,
    /// The id clients send as `model` [default: the catalog name the model was given by, else
    /// the model file's name without `.gguf`].
    #[arg(long, env = "TESSERA_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// A Jinja chat template file that replaces the model's own `tokenizer.chat_template`
    /// [default: the model's; Gemma's for a Gemma file without one; otherwise ChatML].
    #[arg(long, env = "TESSERA_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Longest prompt plus completion, in tokens [default and most: the model's context length].
    #[arg(long, env = "TESSERA_CTX_LEN")]
    pub ctx_len: Option<usize>,
    /// Which vector instructions the model's kernels use: `best` for this CPU, or `avx2` or
    /// `portable` to serve as a CPU without AVX-512 (or AVX2) would [default: best].
    #[arg(long, value_enum, env = "TESSERA_KERNELS")]
    pub kernels: Option<crate::model::Kernels>,
    /// Sequences decoded together in one step [default: 16].
    #[arg(long, env = "TESSERA_MAX_RUNNING_SEQS")]
    pub max_running_seqs: Option<usize>,
    /// Requests that may wait for a place; more get 429 [default: 64].
    #[arg(long, env = "TESSERA_MAX_QUEUE")]
    pub max_queue: Option<usize>,
    /// Most bytes of keys and values held at once, running sequences and prefix cache together.
    /// Taken in 16-token blocks as sequences grow; when it runs out the newest sequence waits
    /// and is recomputed later [default: a quarter of the memory available at startup].
    #[arg(long, env = "TESSERA_KV_CACHE_BYTES")]
    pub kv_cache_bytes: Option<usize>,
    /// Do not share the keys and values of common prompt prefixes between requests.
    #[arg(long, env = "TESSERA_NO_PREFIX_CACHE")]
    #[serde(default)]
    pub no_prefix_cache: bool,
    /// Key of the `inference` scope: chat, completions, models, tokenize
    /// (`Authorization: Bearer …`) [default: none; with no key at all the server is open].
    #[arg(long, env = "TESSERA_API_KEY")]
    pub api_key: Option<String>,
    /// Key of the `tune` scope: inference, plus feedback, files, fine-tuning jobs and training
    /// on the adapters this scope created or the admin opened to tuning [default: none].
    #[arg(long, env = "TESSERA_TUNE_KEY")]
    pub tune_key: Option<String>,
    /// Key of the `admin` scope: every route [default: none].
    #[arg(long, env = "TESSERA_ADMIN_KEY")]
    pub admin_key: Option<String>,
    /// More keys, one `<inference|tune|admin> <sha256 of the key>` a line (digests only: the
    /// file holds no key) [default: none].
    #[arg(long, env = "TESSERA_KEYS_FILE")]
    pub keys_file: Option<PathBuf>,
    /// Longest wait for a response to start, in seconds [default: 300].
    #[arg(long, env = "TESSERA_REQUEST_TIMEOUT")]
    pub request_timeout: Option<u64>,
    /// Largest request body, in bytes, adapter uploads included [default: 64 MiB].
    #[arg(long, env = "TESSERA_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Adapters (PEFT folders and GGUF-LoRA files) registered at startup; `load_lora_adapter` may read from here
    /// [default: $TESSERA_HOME/adapters].
    #[arg(long, env = "TESSERA_ADAPTERS_DIR")]
    pub adapters_dir: Option<PathBuf>,
    /// More directories `load_lora_adapter` may read from (comma-separated).
    #[arg(long, env = "TESSERA_ADAPTER_ROOTS", value_delimiter = ',')]
    pub adapter_roots: Option<Vec<PathBuf>>,
    /// Bytes of adapter weights kept in memory; past it the least recently used adapters that no
    /// request holds are evicted (they reload on next use) [default: 1 GiB].
    #[arg(long, env = "TESSERA_MAX_ADAPTER_MEMORY")]
    pub max_adapter_memory: Option<usize>,
    /// Online tuning's store: feedback pairs, files, jobs, checkpoints and adapter versions
    /// [default: $TESSERA_HOME/tuning].
    #[arg(long, env = "TESSERA_TUNING_DIR")]
    pub tuning_dir: Option<PathBuf>,
    /// Where online tuning's rows live: `sqlite:PATH`, one server's own file, or a
    /// `postgres://user:password@host/db` URL that a group of servers shares; those servers
    /// then share their adapter versions and checkpoints too (`--blobs`)
    /// [default: sqlite:TUNING_DIR/tessera.sqlite3].
    #[arg(long, env = "TESSERA_STATE")]
    pub state: Option<String>,
    /// Where adapter versions and checkpoints live: `file:DIR` (a folder, shared by a group of
    /// servers) or `s3://bucket/prefix` (an S3-compatible store; endpoint and credentials from
    /// the AWS_* environment variables, `--tuning-dir` then being this server's cache)
    /// [default: file:TUNING_DIR].
    #[arg(long, env = "TESSERA_BLOBS")]
    pub blobs: Option<String>,
    /// `both` serves and runs fine-tuning jobs; `serve` leaves jobs to other servers sharing
    /// its `--state`; `train` is a server meant for jobs (it answers requests too) [default: both].
    #[arg(long, env = "TESSERA_ROLE")]
    pub role: Option<Role>,
    /// Threads the background trainer uses; serving keeps the others [default: 1].
    #[arg(long, env = "TESSERA_TRAIN_THREADS")]
    pub train_threads: Option<usize>,
    /// New feedback pairs on an adapter that start a training job on their own [default: 32].
    #[arg(long, env = "TESSERA_TRAIN_AFTER")]
    pub train_after: Option<usize>,
    /// Longest training sequence in tokens; longer ones keep their start [default: 512].
    #[arg(long, env = "TESSERA_TRAIN_MAX_SEQ_LEN")]
    pub train_max_seq_len: Option<usize>,
    /// Optimizer steps between a job's checkpoints [default: 10].
    #[arg(long, env = "TESSERA_CHECKPOINT_EVERY")]
    pub checkpoint_every: Option<usize>,
    /// Domain plugins (dynamic libraries) loaded at startup; `POST /v1/plugins/load` accepts
    /// only files under it [default: $TESSERA_HOME/plugins].
    #[arg(long, env = "TESSERA_PLUGINS_DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// sha256 digests (hex, comma-separated) of the only plugin libraries allowed to load
    /// [default: any under the plugins directory].
    #[arg(long, env = "TESSERA_PLUGIN_SHA256", value_delimiter = ',')]
    pub plugin_sha256: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("`{key}` must be at least 1")]
    Zero { key: &'static str },
    #[error("`{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// What a server does among a group sharing one store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Serve requests and run fine-tuning jobs.
    #[default]
    Both,
    /// Serve requests only.
    Serve,
    /// Run fine-tuning jobs (and answer requests).
    Train,
}

impl Role {
    pub fn trains(self) -> bool {
        self != Role::Serve
    }
}

/// Settings with every default filled in.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    pub model: Option<PathBuf>,
    pub served_model_name: Option<String>,
    pub chat_template: Option<PathBuf>,
    /// `None`: the model's own context length.
    pub ctx_len: Option<usize>,
    pub kernels: crate::model::Kernels,
    pub max_running_seqs: usize,
    pub max_queue: usize,
    pub kv_cache_bytes: usize,
    pub prefix_cache: bool,
    pub api_key: Option<String>,
    pub tune_key: Option<String>,
    pub admin_key: Option<String>,
    pub keys_file: Option<PathBuf>,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    pub adapters_dir: Option<PathBuf>,
    pub adapter_roots: Vec<PathBuf>,
    pub max_adapter_memory: usize,
    pub tuning_dir: Option<PathBuf>,
    pub state: Option<StateLocation>,
    pub blobs: Option<BlobLocation>,
    pub role: Role,
    pub train_threads: usize,
    pub train_after: usize,
    pub train_max_seq_len: usize,
    pub checkpoint_every: usize,
    pub plugins_dir: Option<PathBuf>,
    pub plugin_sha256: Option<Vec<String>>,
}

impl ServeOptions {
    /// Fields set here win over `other`'s.
    fn or(self, other: Self) -> Self {
        Self {
            host: self.host.or(other.host),
            port: self.port.or(other.port),
            model: self.model.or(other.model),
            served_model_name: self.served_model_name.or(other.served_model_name),
            chat_template: self.chat_template.or(other.chat_template),
            ctx_len: self.ctx_len.or(other.ctx_len),
            kernels: self.kernels.or(other.kernels),
            max_running_seqs: self.max_running_seqs.or(other.max_running_seqs),
            max_queue: self.max_queue.or(other.max_queue),
            kv_cache_bytes: self.kv_cache_bytes.or(other.kv_cache_bytes),
            no_prefix_cache: self.no_prefix_cache || other.no_prefix_cache,
            api_key: self.api_key.or(other.api_key),
            admin_key: self.admin_key.or(other.admin_key),
            tune_key: self.tune_key.or(other.tune_key),
            keys_file: self.keys_file.or(other.keys_file),
            request_timeout: self.request_timeout.or(other.request_timeout),
            max_body_bytes: self.max_body_bytes.or(other.max_body_bytes),
            adapters_dir: self.adapters_dir.or(other.adapters_dir),
            adapter_roots: self.adapter_roots.or(other.adapter_roots),
            max_adapter_memory: self.max_adapter_memory.or(other.max_adapter_memory),
            tuning_dir: self.tuning_dir.or(other.tuning_dir),
            state: self.state.or(other.state),
            blobs: self.blobs.or(other.blobs),
            role: self.role.or(other.role),
            train_threads: self.train_threads.or(other.train_threads),
            train_after: self.train_after.or(other.train_after),
            train_max_seq_len: self.train_max_seq_len.or(other.train_max_seq_len),
            checkpoint_every: self.checkpoint_every.or(other.checkpoint_every),
            plugins_dir: self.plugins_dir.or(other.plugins_dir),
            plugin_sha256: self.plugin_sha256.or(other.plugin_sha256),
        }
    }

    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }
}

impl ServeConfig {
    /// The context a model of `model_context` positions is served with: what was asked, at most
    /// the model's, and the model's own when nothing was asked (the KV budget, not this, bounds
    /// how many such sequences run at once).
    pub fn context_for(&self, model_context: usize) -> usize {
        self.ctx_len.map_or(model_context, |asked| asked.min(model_context))
    }

    /// `cli` (flags and environment) over the TOML `file`, over defaults.
    pub fn resolve(cli: ServeOptions, file: Option<&Path>) -> Result<Self, ConfigError> {
        let merged = match file {
            Some(path) => cli.or(ServeOptions::from_toml_file(path)?),
            None => cli,
        };
        let positive = |value: Option<usize>, default: usize, key| match value.unwrap_or(default) {
            0 => Err(ConfigError::Zero { key }),
            v => Ok(v),
        };
        Ok(Self {
            host: merged.host.unwrap_or_else(|| "127.0.0.1".into()),
            port: merged.port.unwrap_or(8080),
            model: merged.model,
            served_model_name: merged.served_model_name,
            chat_template: merged.chat_template,
            ctx_len: merged.ctx_len.map(|n| positive(Some(n), n, "ctx_len")).transpose()?,
            kernels: merged.kernels.unwrap_or_default(),
            max_running_seqs: positive(merged.max_running_seqs, 16, "max_running_seqs")?,
            max_queue: positive(merged.max_queue, 64, "max_queue")?,
            kv_cache_bytes: positive(merged.kv_cache_bytes, crate::engine::default_kv_cache_bytes(), "kv_cache_bytes")?,
            prefix_cache: !merged.no_prefix_cache,
            api_key: merged.api_key.filter(|k| !k.is_empty()),
            admin_key: merged.admin_key.filter(|k| !k.is_empty()),
            tune_key: merged.tune_key.filter(|k| !k.is_empty()),
            keys_file: merged.keys_file,
            request_timeout: Duration::from_secs(merged.request_timeout.unwrap_or(300).max(1)),
            max_body_bytes: positive(merged.max_body_bytes, 64 << 20, "max_body_bytes")?,
            adapters_dir: merged.adapters_dir,
            adapter_roots: merged.adapter_roots.unwrap_or_default(),
            max_adapter_memory: merged.max_adapter_memory.unwrap_or(1 << 30),
            tuning_dir: merged.tuning_dir,
            state: merged.state.map(|s| s.parse().map_err(|message| ConfigError::Invalid { key: "state", message })).transpose()?,
            blobs: merged.blobs.map(|s| s.parse().map_err(|message| ConfigError::Invalid { key: "blobs", message })).transpose()?,
            role: merged.role.unwrap_or_default(),
            train_threads: positive(merged.train_threads, 1, "train_threads")?,
            train_after: positive(merged.train_after, 32, "train_after")?,
            train_max_seq_len: positive(merged.train_max_seq_len, 512, "train_max_seq_len")?,
            checkpoint_every: positive(merged.checkpoint_every, 10, "checkpoint_every")?,
            plugins_dir: merged.plugins_dir,
            plugin_sha256: merged.plugin_sha256.filter(|list| !list.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tessera.toml");
        std::fs::write(&file, "port = 9000\nmax_queue = 5\napi_key = \"from-file\"\n").unwrap();
        let cli = ServeOptions {
            port: Some(7000),
            ..ServeOptions::default()
        };
        let c = ServeConfig::resolve(cli, Some(&file)).unwrap();
        assert_eq!((c.port, c.max_queue), (7000, 5));
        assert_eq!(c.api_key.as_deref(), Some("from-file"));
        assert_eq!((c.host.as_str(), c.max_running_seqs), ("127.0.0.1", 16));
    }

    #[test]
    fn unknown_keys_and_zero_limits_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tessera.toml");
        std::fs::write(&file, "prot = 1\n").unwrap();
        let err = ServeConfig::resolve(ServeOptions::default(), Some(&file)).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
        let zero = ServeOptions {
            max_queue: Some(0),
            ..ServeOptions::default()
        };
        assert!(ServeConfig::resolve(zero, None).is_err());
    }

    #[test]
    fn the_context_is_the_models_unless_a_shorter_one_is_asked() {
        let default = ServeConfig::resolve(ServeOptions::default(), None).unwrap();
        assert_eq!(default.context_for(32_768), 32_768);
        let asked = |n| ServeConfig::resolve(ServeOptions { ctx_len: Some(n), ..ServeOptions::default() }, None).unwrap();
        assert_eq!(asked(1024).context_for(32_768), 1024);
        assert_eq!(asked(65_536).context_for(32_768), 32_768);
        assert!(ServeConfig::resolve(ServeOptions { ctx_len: Some(0), ..ServeOptions::default() }, None).is_err());
    }

    #[test]
    fn the_kernels_are_the_best_unless_a_file_or_flag_names_others() {
        use crate::model::Kernels;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tessera.toml");
        std::fs::write(&file, "kernels = \"avx2\"\n").unwrap();
        assert_eq!(ServeConfig::resolve(ServeOptions::default(), None).unwrap().kernels, Kernels::Best);
        assert_eq!(ServeConfig::resolve(ServeOptions::default(), Some(&file)).unwrap().kernels, Kernels::Avx2);
        let flag = ServeOptions { kernels: Some(Kernels::Portable), ..ServeOptions::default() };
        assert_eq!(ServeConfig::resolve(flag, Some(&file)).unwrap().kernels, Kernels::Portable);
        std::fs::write(&file, "kernels = \"avx1024\"\n").unwrap();
        assert!(ServeConfig::resolve(ServeOptions::default(), Some(&file)).is_err());
    }
}
