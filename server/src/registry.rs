//! The adapters a server knows, by name. Each load makes a new immutable *generation*; a request
//! leases the generations it uses at admission (an `Arc`), so replacing or unloading an adapter
//! never changes a request in flight, and memory is freed when the last lease ends.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use tessera_adapters::peft::{BaseShape, BaseWeights, CONFIG_FILE};
use tessera_adapters::{AdapterKind, AdapterWeights};

use crate::adapter_files::{self, AdapterFileError};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("adapter names must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' or '-'; got `{0}`")]
    InvalidName(String),
    #[error("`{0}` is the base model's name")]
    ReservedName(String),
    #[error("the adapter `{0}` does not exist")]
    NotFound(String),
    #[error("{path}: adapters may only be loaded from under {roots}")]
    OutsideRoots { path: PathBuf, roots: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The adapter's files cannot be served; `reason` names no server path.
    #[error("the adapter `{name}` cannot be served: {reason}")]
    Unservable { name: String, reason: String },
}

/// One immutable version of an adapter.
#[derive(Debug)]
pub struct AdapterGeneration {
    pub name: String,
    pub generation: u64,
    pub weights: AdapterWeights,
    pub rank: usize,
    pub alpha: f32,
    pub source: PathBuf,
}

impl AdapterGeneration {
    pub fn kind(&self) -> AdapterKind {
        self.weights.kind()
    }
}

enum Entry {
    /// Registered from disk, loaded on first use (again after an eviction); its kind as its
    /// files say, where they say one.
    OnDisk(PathBuf, Option<AdapterKind>),
    /// In memory, with the tick of its last use (for least-recently-used eviction).
    Loaded(Arc<AdapterGeneration>, u64),
}

pub struct Registry {
    base: BaseShape,
    base_name: String,
    entries: DashMap<String, Entry>,
    next_generation: AtomicU64,
    /// Directories (canonical) under which `load` accepts adapter paths.
    roots: Vec<PathBuf>,
    /// Most bytes of adapter weights kept in memory while not in use.
    budget: Option<usize>,
    clock: AtomicU64,
    /// Brings a folder onto this machine before it is read, where the tuning store keeps its
    /// versions in an object store: registered adapters then download on first use too.
    fetch: OnceLock<SourceFetch>,
    /// The base's weights, against which DoRA adapters measure their row norms as they load.
    base_weights: OnceLock<Arc<dyn BaseWeights + Send + Sync>>,
}

/// Makes the folder at a path present locally (a no-op for paths it does not manage).
pub type SourceFetch = Box<dyn Fn(&Path) -> Result<(), String> + Send + Sync>;

/// `[A-Za-z0-9._-]{1,64}`, and not a path component such as `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

impl Registry {
    /// `budget` bounds the bytes of loaded adapters: past it, the least recently used ones that
    /// no request holds go back to disk.
    pub fn new(base: BaseShape, base_name: &str, roots: &[PathBuf], budget: Option<usize>) -> Self {
        Self {
            base,
            base_name: base_name.to_string(),
            entries: DashMap::new(),
            next_generation: AtomicU64::new(1),
            roots: roots.iter().filter_map(|r| r.canonicalize().ok()).collect(),
            budget,
            clock: AtomicU64::new(0),
            fetch: OnceLock::new(),
            base_weights: OnceLock::new(),
        }
    }

    /// Sets the base weights DoRA adapters are measured against (once; later calls are ignored).
    /// Without them a DoRA adapter cannot be served.
    pub fn measure_against(&self, weights: Arc<dyn BaseWeights + Send + Sync>) {
        let _ = self.base_weights.set(weights);
    }

    /// Loads the adapter at `path` as the registry would serve it, or says why it cannot be.
    fn load_files(&self, path: &Path) -> Result<tessera_adapters::peft::PeftAdapter, AdapterFileError> {
        adapter_files::load(path, &self.base, self.base_weights())
    }

    /// Sets how sources are fetched before they are read (once; later calls are ignored).
    pub fn fetch_sources_with(&self, fetch: SourceFetch) {
        let _ = self.fetch.set(fetch);
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// Bytes of adapter weights in memory.
    pub fn loaded_bytes(&self) -> usize {
        self.entries
            .iter()
            .filter_map(|e| match &*e {
                Entry::Loaded(g, _) => Some(g.weights.size_in_bytes()),
                Entry::OnDisk(..) => None,
            })
            .sum()
    }

    /// Evicts least recently used, unleased adapters (other than `keep`) until the loaded bytes
    /// fit the budget. Leased ones stay: memory held by running requests is theirs.
    fn evict(&self, keep: &str) {
        let Some(budget) = self.budget else { return };
        while self.loaded_bytes() > budget {
            let victim = self
                .entries
                .iter()
                .filter_map(|e| match &*e {
                    Entry::Loaded(g, used) if e.key() != keep && Arc::strong_count(g) == 1 => {
                        Some((*used, e.key().clone()))
                    }
                    _ => None,
                })
                .min();
            let Some((_, name)) = victim else { return };
            if let Some(mut entry) = self.entries.get_mut(&name) {
                if let Entry::Loaded(g, _) = &*entry {
                    if Arc::strong_count(g) == 1 {
                        tracing::info!(adapter = %name, "adapter evicted from memory");
                        *entry = Entry::OnDisk(g.source.clone(), Some(g.kind()));
                        continue;
                    }
                }
            }
            return;
        }
    }

    /// Registers every adapter directly under `dir`: PEFT folders (holding `adapter_config.json`)
    /// by their name, GGUF-LoRA files by their name without `.gguf`. Each is read once to check
    /// that it can be served (all but DoRA's row norms, measured at first use) (one that cannot is logged by name and reason, and skipped); their
    /// weights stay on disk until first use. Returns how many were registered. One (or a link) that resolves outside `dir` and
    /// the allowed roots is skipped, as `load` would refuse it.
    pub fn scan(&self, dir: &Path) -> Result<usize, RegistryError> {
        let io = |source| RegistryError::Io {
            path: dir.to_path_buf(),
            source,
        };
        let scanned = dir.canonicalize().map_err(io)?;
        let mut registered = 0;
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            let gguf = path.extension().is_some_and(|e| e == "gguf") && path.is_file();
            let named = if gguf { path.file_stem() } else { path.file_name() };
            let Some(name) = named.and_then(|n| n.to_str()).map(str::to_string) else {
                continue;
            };
            let inside_roots = path.canonicalize().is_ok_and(|resolved| {
                resolved.starts_with(&scanned) || self.roots.iter().any(|root| resolved.starts_with(root))
            });
            let adapter = gguf || path.join(CONFIG_FILE).is_file();
            if adapter && !inside_roots {
                tracing::warn!(path = %path.display(), "skipped: the adapter resolves outside the allowed adapter roots");
            } else if adapter && valid_name(&name) && name != self.base_name {
                // Checked now, so that a folder the server cannot serve is never listed; DoRA's
                // row norms wait for the first use, which keeps the weights it measures.
                match adapter_files::check(&path, &self.base) {
                    Ok(kind) => {
                        self.entries.insert(name, Entry::OnDisk(path, Some(kind)));
                        registered += 1;
                    }
                    Err(e) => tracing::warn!(adapter = %name, reason = %e.reason(), "skipped: the server cannot serve this adapter"),
                }
            } else if path.is_dir() {
                tracing::warn!(path = %path.display(), "skipped: not an adapter folder with a valid name");
            }
        }
        Ok(registered)
    }

    fn check_name(&self, name: &str) -> Result<(), RegistryError> {
        if !valid_name(name) {
            return Err(RegistryError::InvalidName(name.to_string()));
        }
        if name == self.base_name {
            return Err(RegistryError::ReservedName(name.to_string()));
        }
        Ok(())
    }

    fn read(&self, name: &str, path: &Path) -> Result<Arc<AdapterGeneration>, RegistryError> {
        if let Some(fetch) = self.fetch.get() {
            fetch(path).map_err(|e| RegistryError::Io { path: path.to_path_buf(), source: std::io::Error::other(e) })?;
        }
        let adapter = self.load_files(path).map_err(|e| RegistryError::Unservable { name: name.to_string(), reason: e.reason() })?;
        Ok(Arc::new(AdapterGeneration {
            name: name.to_string(),
            generation: self.next_generation.fetch_add(1, Ordering::SeqCst),
            weights: adapter.weights,
            rank: adapter.rank,
            alpha: adapter.alpha,
            source: path.to_path_buf(),
        }))
    }

    /// The current generation of `name`, loading it first if it was only registered.
    pub fn lease(&self, name: &str) -> Result<Arc<AdapterGeneration>, RegistryError> {
        let path = match self.entries.get_mut(name).as_deref_mut() {
            None => return Err(RegistryError::NotFound(name.to_string())),
            Some(Entry::Loaded(generation, used)) => {
                *used = self.tick();
                return Ok(generation.clone());
            }
            Some(Entry::OnDisk(path, _)) => path.clone(),
        };
        // Files gone from under a registered name were deleted meanwhile: the adapter is gone.
        let loaded = self
            .read(name, &path)
            .map_err(|e| if path.exists() { e } else { RegistryError::NotFound(name.to_string()) })?;
        // A concurrent load or unload may have won meanwhile: keep what the map holds then.
        match self.entries.get_mut(name) {
            None => Err(RegistryError::NotFound(name.to_string())),
            Some(mut entry) => {
                if let Entry::Loaded(generation, _) = &*entry {
                    return Ok(generation.clone());
                }
                *entry = Entry::Loaded(loaded.clone(), self.tick());
                drop(entry);
                tracing::info!(adapter = name, generation = loaded.generation, "adapter loaded on first use");
                self.evict(name);
                Ok(loaded)
            }
        }
    }

    /// Loads the adapter at `path` (which must lie under an allowed root) as a new generation of
    /// `name`, replacing any earlier one for new requests.
    pub fn load(&self, name: &str, path: &Path) -> Result<Arc<AdapterGeneration>, RegistryError> {
        self.check_name(name)?;
        let canonical = path.canonicalize().map_err(|source| RegistryError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !self.roots.iter().any(|root| canonical.starts_with(root)) {
            return Err(RegistryError::OutsideRoots {
                path: path.to_path_buf(),
                roots: self
                    .roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let loaded = self.read(name, &canonical)?;
        self.entries
            .insert(name.to_string(), Entry::Loaded(loaded.clone(), self.tick()));
        self.evict(name);
        tracing::info!(adapter = name, generation = loaded.generation, path = %canonical.display(), "adapter loaded");
        Ok(loaded)
    }

    /// Serves the adapter at `path`, written by the server itself (a trained or rolled-back
    /// version), as a new generation of `name`: new requests get it, running ones keep theirs.
    pub fn install(&self, name: &str, path: &Path) -> Result<Arc<AdapterGeneration>, RegistryError> {
        self.check_name(name)?;
        let loaded = self.read(name, path)?;
        self.entries
            .insert(name.to_string(), Entry::Loaded(loaded.clone(), self.tick()));
        self.evict(name);
        tracing::info!(adapter = name, generation = loaded.generation, path = %path.display(), "adapter version installed");
        Ok(loaded)
    }

    /// Registers `name` from `path` without reading it yet.
    pub fn register(&self, name: &str, path: &Path) -> Result<(), RegistryError> {
        self.check_name(name)?;
        self.entries.insert(name.to_string(), Entry::OnDisk(path.to_path_buf(), adapter_files::kind_of(path)));
        Ok(())
    }

    /// Stops new requests from using `name` at once; requests holding a lease finish with it.
    pub fn unload(&self, name: &str) -> Result<(), RegistryError> {
        self.entries
            .remove(name)
            .map(|_| tracing::info!(adapter = name, "adapter unloaded"))
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))
    }

    /// Where `name` was registered from, and its current generation if loaded.
    pub fn describe(&self, name: &str) -> Option<(PathBuf, Option<Arc<AdapterGeneration>>)> {
        self.entries.get(name).map(|entry| match &*entry {
            Entry::OnDisk(path, _) => (path.clone(), None),
            Entry::Loaded(generation, _) => (generation.source.clone(), Some(generation.clone())),
        })
    }

    /// Checks an adapter name for a new adapter.
    pub fn check_new_name(&self, name: &str) -> Result<(), RegistryError> {
        self.check_name(name)
    }

    /// The kind of `name`, as its loaded generation or its files say.
    pub fn kind(&self, name: &str) -> Option<AdapterKind> {
        self.entries.get(name).and_then(|entry| match &*entry {
            Entry::OnDisk(_, kind) => *kind,
            Entry::Loaded(generation, _) => Some(generation.kind()),
        })
    }

    /// The base weights DoRA adapters are measured against, once set.
    pub fn base_weights(&self) -> Option<&dyn BaseWeights> {
        self.base_weights.get().map(|w| w.as_ref() as &dyn BaseWeights)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.entries.iter().map(|e| e.key().clone()).collect();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_allowed_pattern() {
        for good in ["alpha-r8", "a", "x.y_z-1", &"a".repeat(64)] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "..", ".", "a/b", "a b", "é", &"a".repeat(65)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
