//! Domain plugins: dynamic libraries speaking the `tessera-plugin-api` C ABI, loaded at runtime.
//!
//! Each load copies the library to a unique path before `dlopen` (so a rebuilt file is a new
//! library, not the cached old one) and becomes a new *generation*. Requests lease a generation
//! (an `Arc`) at admission; reloading or unloading only changes what new requests get, and a
//! library is closed when its last lease ends, never while its code may run.
//!
//! Containment: a wrong magic or ABI version, a missing symbol, bad metadata, a panic (caught on
//! the plugin's side of the boundary) or garbage output marks the plugin failed with the reason;
//! the server keeps serving everything else.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tessera_plugin_api as abi;

use crate::grammar::ConstraintSpec;
use crate::registry::valid_name;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{path}: plugins may only be loaded from under {dir}")]
    OutsideDir { path: PathBuf, dir: String },
    #[error("plugin loading is off: the server has no plugins directory")]
    NoDir,
    #[error("{path}: sha256 {sha256} is not in the allow-list")]
    NotAllowed { path: PathBuf, sha256: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a loadable library: {message}")]
    Open { path: PathBuf, message: String },
    #[error("{path}: no `tessera_plugin_root` symbol: not a Tessera plugin")]
    MissingSymbol { path: PathBuf },
    #[error("{path}: wrong magic value {found:#x}: not a Tessera plugin")]
    BadMagic { path: PathBuf, found: u64 },
    #[error("{path}: built for plugin ABI version {found}, this server speaks versions {} to {expected}", abi::MIN_ABI_VERSION)]
    AbiMismatch { path: PathBuf, found: u32, expected: u32 },
    #[error("plugin `{plugin}`: {message}")]
    BadInfo { plugin: String, message: String },
    #[error("plugin `{plugin}` panicked in {hook}: {message}")]
    Panicked { plugin: String, hook: &'static str, message: String },
    #[error("plugin `{plugin}` returned garbage from {hook}: {message}")]
    Garbage { plugin: String, hook: &'static str, message: String },
    /// The plugin refused its input (the caller's error).
    #[error("{0}")]
    Refused(String),
    #[error("the plugin `{0}` does not exist")]
    NotFound(String),
    #[error("the plugin `{name}` failed and serves nothing until it is reloaded: {error}")]
    Failed { name: String, error: String },
}

impl PluginError {
    /// Whether the plugin itself misbehaved (as opposed to refusing bad input).
    pub fn is_plugin_fault(&self) -> bool {
        matches!(self, Self::Panicked { .. } | Self::Garbage { .. })
    }
}

/// One loaded generation of a plugin.
pub struct Plugin {
    pub info: abi::PluginInfo,
    /// The file it was loaded from (not the private copy).
    pub path: PathBuf,
    pub sha256: String,
    pub generation: u64,
    root: *const abi::PluginRoot,
    /// Closed when the last lease of this generation ends.
    _library: libloading::Library,
}

// SAFETY: `root` points at the plugin's immutable static root, valid while `_library` is loaded;
// the ABI's functions are callable from any thread (plugins are `Send + Sync` by contract).
unsafe impl Send for Plugin {}
unsafe impl Sync for Plugin {}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.info.name)
            .field("version", &self.info.version)
            .field("generation", &self.generation)
            .finish()
    }
}

#[derive(Clone, Copy)]
pub enum Hook {
    Rewrite,
    Check,
    Convert,
    AdapterFile,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Rewrite => "rewrite_request",
            Hook::Check => "check_response",
            Hook::Convert => "convert_feedback",
            Hook::AdapterFile => "adapter_file",
        }
    }
}

/// Takes the plugin's output bytes and gives them back to the plugin's allocator.
fn take_output(root: &abi::PluginRoot, output: abi::OutputBytes) -> Vec<u8> {
    let bytes = if output.ptr.is_null() {
        Vec::new()
    } else {
        // SAFETY: the plugin wrote `len` initialised bytes at `ptr`; they stay valid until freed.
        unsafe { std::slice::from_raw_parts(output.ptr, output.len) }.to_vec()
    };
    // SAFETY: the bytes came from this plugin and are freed exactly once, by the plugin.
    unsafe { (root.free_bytes)(output) };
    bytes
}

fn constraint_spec(answer: &abi::AnswerConstraint) -> ConstraintSpec {
    match answer {
        abi::AnswerConstraint::JsonSchema { schema } => ConstraintSpec::JsonSchema(schema.to_string()),
        abi::AnswerConstraint::Choice { choices } => ConstraintSpec::Choice(choices.clone()),
        abi::AnswerConstraint::Regex { pattern } => ConstraintSpec::Regex(pattern.clone()),
    }
}

impl Plugin {
    fn root(&self) -> &abi::PluginRoot {
        // SAFETY: see the `Send`/`Sync` impls.
        unsafe { &*self.root }
    }

    /// The shape the plugin declares for its answers, as a grammar's spec.
    pub fn answer_constraint(&self) -> Option<ConstraintSpec> {
        self.info.answer.as_ref().map(constraint_spec)
    }

    /// Calls a hook with `input` as JSON; its raw output bytes on success.
    pub fn call_raw(&self, hook: Hook, input: &impl Serialize) -> Result<Vec<u8>, PluginError> {
        let root = self.root();
        let input = serde_json::to_vec(input).map_err(|e| PluginError::Refused(e.to_string()))?;
        let f = match hook {
            Hook::Rewrite => root.rewrite_request,
            Hook::Check => root.check_response,
            Hook::Convert => root.convert_feedback,
            Hook::AdapterFile => root.adapter_file,
        };
        let mut output = abi::OutputBytes::EMPTY;
        let bytes = abi::InputBytes {
            ptr: input.as_ptr(),
            len: input.len(),
        };
        // SAFETY: the ABI version was checked at load; the input outlives the call.
        let status = unsafe { f(bytes, &mut output) };
        let out = take_output(root, output);
        let text = || String::from_utf8_lossy(&out).into_owned();
        match status {
            abi::STATUS_OK => Ok(out),
            abi::STATUS_ERROR => Err(PluginError::Refused(text())),
            abi::STATUS_PANIC => Err(PluginError::Panicked {
                plugin: self.info.name.clone(),
                hook: hook.name(),
                message: text(),
            }),
            other => Err(PluginError::Garbage {
                plugin: self.info.name.clone(),
                hook: hook.name(),
                message: format!("unknown status {other}"),
            }),
        }
    }

    /// Calls a hook with JSON in and JSON out.
    pub fn call<O: DeserializeOwned>(&self, hook: Hook, input: &impl Serialize) -> Result<O, PluginError> {
        let out = self.call_raw(hook, input)?;
        serde_json::from_slice(&out).map_err(|e| PluginError::Garbage {
            plugin: self.info.name.clone(),
            hook: hook.name(),
            message: e.to_string(),
        })
    }

    /// The messages the model sees, and this request's answer shape when the plugin narrows
    /// its declared one.
    pub fn rewrite(&self, messages: Vec<abi::Message>) -> Result<(Vec<abi::Message>, Option<ConstraintSpec>), PluginError> {
        let response: abi::RewriteResponse = self.call(Hook::Rewrite, &abi::RewriteRequest { messages })?;
        Ok((response.messages, response.answer.as_ref().map(constraint_spec)))
    }

    pub fn check(&self, messages: &[abi::Message], answer: &str) -> Result<abi::CheckResponse, PluginError> {
        self.call(
            Hook::Check,
            &abi::CheckRequest {
                messages: messages.to_vec(),
                answer: answer.to_string(),
            },
        )
    }

    pub fn convert(&self, record: &serde_json::Value) -> Result<Vec<abi::Conversation>, PluginError> {
        let response: abi::ConvertResponse = self.call(Hook::Convert, &abi::ConvertRequest { record: record.clone() })?;
        Ok(response.conversations)
    }

    /// A name and version for responses: `intent 1.0.0 (generation 3)`.
    pub fn fingerprint(&self) -> String {
        format!("{} {} (generation {})", self.info.name, self.info.version, self.generation)
    }
}

pub enum PluginState {
    Ready(Arc<Plugin>),
    Failed { path: PathBuf, error: String, version: Option<String> },
}

pub struct PluginHost {
    /// Canonical; only files under it load.
    dir: Option<PathBuf>,
    /// sha256 (hex) of the libraries that may load, when set.
    allow: Option<Vec<String>>,
    /// Private copies of loaded libraries and extracted embedded adapters.
    cache: PathBuf,
    plugins: DashMap<String, PluginState>,
    next_generation: AtomicU64,
}

/// Where a plugin host keeps its private copies: a fresh folder under the system's temporary
/// folder, named by process and a random tag. Folders that servers no longer running left
/// behind (after `kill -9`) are removed first.
pub fn private_cache_dir() -> PathBuf {
    const PREFIX: &str = "tessera-plugins-";
    let temp = std::env::temp_dir();
    // Whether a process lives is read from /proc: elsewhere nothing is swept.
    let entries = std::fs::read_dir(&temp).into_iter().flatten().flatten().filter(|_| cfg!(target_os = "linux"));
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    temp.join(format!("{PREFIX}{}-{:016x}", std::process::id(), rand::random::<u64>()))
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.cache);
    }
}

fn is_library(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

impl PluginHost {
    pub fn new(dir: Option<&Path>, allow: Option<Vec<String>>, cache: PathBuf) -> Self {
        Self {
            dir: dir.and_then(|d| d.canonicalize().ok()),
            allow: allow.map(|a| a.into_iter().map(|h| h.to_lowercase()).collect()),
            cache,
            plugins: DashMap::new(),
            next_generation: AtomicU64::new(1),
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The libraries directly in the plugins directory.
    pub fn discover(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.dir else { return Vec::new() };
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_library(p))
            .collect();
        found.sort();
        found
    }

    /// Resolves `path` (absolute, or relative to the plugins directory) and checks it lies
    /// under the plugins directory.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf, PluginError> {
        let dir = self.dir.as_ref().ok_or(PluginError::NoDir)?;
        let joined = if path.is_absolute() { path.to_path_buf() } else { dir.join(path) };
        let canonical = joined.canonicalize().map_err(|source| PluginError::Io { path: joined.clone(), source })?;
        if !canonical.starts_with(dir) {
            return Err(PluginError::OutsideDir {
                path: path.to_path_buf(),
                dir: dir.display().to_string(),
            });
        }
        Ok(canonical)
    }

    /// Opens the library at `path` (already resolved) as a new generation and checks its ABI.
    /// Does not register it: the caller sets up its adapters first, then calls `publish`.
    pub fn open(&self, path: &Path) -> Result<Arc<Plugin>, PluginError> {
        let io = |source| PluginError::Io { path: path.to_path_buf(), source };
        let bytes = std::fs::read(path).map_err(io)?;
        let sha256 = format!("{:x}", Sha256::digest(&bytes));
        if let Some(allow) = &self.allow {
            if !allow.contains(&sha256) {
                return Err(PluginError::NotAllowed { path: path.to_path_buf(), sha256 });
            }
        }
        let generation = self.next_generation.fetch_add(1, Ordering::SeqCst);
        std::fs::create_dir_all(&self.cache).map_err(|source| PluginError::Io { path: self.cache.clone(), source })?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin");
        let extension = path.extension().and_then(|s| s.to_str()).unwrap_or("so");
        let copy = self.cache.join(format!("{stem}-{}-{generation}.{extension}", std::process::id()));
        // The copy is exactly the bytes hashed above.
        std::fs::write(&copy, &bytes).map_err(|source| PluginError::Io { path: copy.clone(), source })?;
        // SAFETY: loading runs the library's initialisers; only allow-listed files under the
        // plugins directory get here.
        let opened = unsafe { libloading::Library::new(&copy) };
        let _ = std::fs::remove_file(&copy);
        let library = opened.map_err(|e| PluginError::Open { path: path.to_path_buf(), message: e.to_string() })?;
        // SAFETY: the symbol's type is the ABI's; it is called once and returns a static.
        let root = unsafe {
            let get: libloading::Symbol<unsafe extern "C" fn() -> *const abi::PluginRoot> = library
                .get(abi::ROOT_SYMBOL)
                .map_err(|_| PluginError::MissingSymbol { path: path.to_path_buf() })?;
            get()
        };
        if root.is_null() {
            return Err(PluginError::MissingSymbol { path: path.to_path_buf() });
        }
        // Only the first two fields are read until they check out: their layout is the one part
        // every ABI version shares.
        // SAFETY: root is non-null and points at the plugin's static root.
        let (magic, abi_version) = unsafe { ((*root).magic, (*root).abi_version) };
        if magic != abi::MAGIC {
            return Err(PluginError::BadMagic { path: path.to_path_buf(), found: magic });
        }
        if !(abi::MIN_ABI_VERSION..=abi::ABI_VERSION).contains(&abi_version) {
            return Err(PluginError::AbiMismatch {
                path: path.to_path_buf(),
                found: abi_version,
                expected: abi::ABI_VERSION,
            });
        }
        // SAFETY: every version from MIN_ABI_VERSION has this root layout.
        let root_ref = unsafe { &*root };
        let mut output = abi::OutputBytes::EMPTY;
        // SAFETY: as above.
        let status = unsafe { (root_ref.info)(&mut output) };
        let out = take_output(root_ref, output);
        let unnamed = path.display().to_string();
        if status != abi::STATUS_OK {
            return Err(PluginError::BadInfo {
                plugin: unnamed,
                message: format!("`info` failed: {}", String::from_utf8_lossy(&out)),
            });
        }
        let info: abi::PluginInfo = serde_json::from_slice(&out).map_err(|e| PluginError::BadInfo {
            plugin: unnamed.clone(),
            message: format!("`info` is not valid metadata: {e}"),
        })?;
        if !valid_name(&info.name) {
            return Err(PluginError::BadInfo {
                plugin: unnamed,
                message: format!("`{}` is not a valid name ([A-Za-z0-9._-]{{1,64}})", info.name),
            });
        }
        for adapter in &info.adapters {
            if !valid_name(&adapter.name) || !adapter.scale.is_finite() {
                return Err(PluginError::BadInfo {
                    plugin: info.name.clone(),
                    message: format!("adapter `{}` has an invalid name or scale", adapter.name),
                });
            }
        }
        Ok(Arc::new(Plugin {
            info,
            path: path.to_path_buf(),
            sha256,
            generation,
            root,
            _library: library,
        }))
    }

    /// Serves `plugin` to new requests under its name.
    pub fn publish(&self, plugin: Arc<Plugin>) {
        tracing::info!(plugin = %plugin.info.name, version = %plugin.info.version, generation = plugin.generation, "plugin loaded");
        self.plugins.insert(plugin.info.name.clone(), PluginState::Ready(plugin));
    }

    /// Records a load that failed, under `name` (the file stem when the name is unknown).
    pub fn record_failure(&self, name: &str, path: &Path, error: &PluginError) {
        tracing::warn!(plugin = name, error = %error, "plugin failed");
        self.plugins.insert(
            name.to_string(),
            PluginState::Failed {
                path: path.to_path_buf(),
                error: error.to_string(),
                version: None,
            },
        );
    }

    /// Marks the generation that misbehaved failed (unless a newer one replaced it meanwhile).
    pub fn mark_failed(&self, plugin: &Plugin, error: &PluginError) {
        if let Some(mut entry) = self.plugins.get_mut(&plugin.info.name) {
            if matches!(&*entry, PluginState::Ready(p) if p.generation == plugin.generation) {
                tracing::warn!(plugin = %plugin.info.name, error = %error, "plugin marked failed");
                *entry = PluginState::Failed {
                    path: plugin.path.clone(),
                    error: error.to_string(),
                    version: Some(plugin.info.version.clone()),
                };
            }
        }
    }

    /// The generation new requests for `name` get; `None` when no plugin has that name.
    pub fn lease(&self, name: &str) -> Option<Result<Arc<Plugin>, PluginError>> {
        self.plugins.get(name).map(|entry| match &*entry {
            PluginState::Ready(plugin) => Ok(plugin.clone()),
            PluginState::Failed { error, .. } => Err(PluginError::Failed {
                name: name.to_string(),
                error: error.clone(),
            }),
        })
    }

    /// Whether a plugin (ready or failed) has this name.
    pub fn contains(&self, name: &str) -> bool {
        self.plugins.contains_key(name)
    }

    /// The file `name` was loaded from.
    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        self.plugins.get(name).map(|entry| match &*entry {
            PluginState::Ready(plugin) => plugin.path.clone(),
            PluginState::Failed { path, .. } => path.clone(),
        })
    }

    /// Stops serving `name`; requests holding a lease finish on it.
    pub fn unload(&self, name: &str) -> Result<(), PluginError> {
        self.plugins
            .remove(name)
            .map(|_| tracing::info!(plugin = name, "plugin unloaded"))
            .ok_or_else(|| PluginError::NotFound(name.to_string()))
    }

    pub fn cache_dir(&self) -> &Path {
        &self.cache
    }

    /// Every plugin by name, with its state.
    pub fn list(&self) -> Vec<(String, Result<Arc<Plugin>, (PathBuf, String, Option<String>)>)> {
        let mut all: Vec<_> = self
            .plugins
            .iter()
            .map(|e| {
                let state = match &*e {
                    PluginState::Ready(p) => Ok(p.clone()),
                    PluginState::Failed { path, error, version } => Err((path.clone(), error.clone(), version.clone())),
                };
                (e.key().clone(), state)
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_copies_go_with_their_host_and_with_dead_servers() {
        let stale = std::env::temp_dir().join("tessera-plugins-999999999-0000000000000000");
        std::fs::create_dir_all(&stale).unwrap();
        let cache = private_cache_dir();
        assert!(!stale.exists(), "a folder of a server that is gone is removed");
        let host = PluginHost::new(None, None, cache.clone());
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("copy.so"), b"x").unwrap();
        drop(host);
        assert!(!cache.exists(), "the host removes its private copies");
    }
}
