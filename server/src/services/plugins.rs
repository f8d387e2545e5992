//! Domain plugins: loading (with the adapters each declares), reloading, unloading, and calls on
//! behalf of requests, which mark a misbehaving plugin failed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tessera_plugin_api::AdapterSource;

use super::{blocking, ServiceError};
use crate::grammar::ConstraintSpec;
use crate::plugins::{Hook, Plugin, PluginError, PluginHost};
use crate::registry::Registry;
use crate::train::job::Tuner;

/// A plugin as `list` reports it: ready, or failed with its path, reason and version.
pub type PluginState = Result<Arc<Plugin>, (PathBuf, String, Option<String>)>;

/// The plugins service.
pub struct Plugins {
    host: PluginHost,
    registry: Arc<Registry>,
    tuner: Option<Arc<Tuner>>,
}

impl Plugins {
    pub fn new(host: PluginHost, registry: Arc<Registry>, tuner: Option<Arc<Tuner>>) -> Self {
        Self { host, registry, tuner }
    }

    /// Loads every library in the plugins directory; failures are recorded, not fatal.
    pub fn load_dir(&self) {
        for path in self.host.discover() {
            let _ = self.load_now(&path);
        }
    }

    /// Loads (or reloads) the plugin at `path` and serves it to new requests.
    pub async fn load(self: &Arc<Self>, path: PathBuf) -> Result<Arc<Plugin>, ServiceError> {
        let this = self.clone();
        blocking(move || Ok(this.load_now(&path)?)).await
    }

    /// Loads the plugin's file again: a rebuilt library becomes a new generation; requests in
    /// flight finish on the old one.
    pub async fn reload(self: &Arc<Self>, name: String) -> Result<Arc<Plugin>, ServiceError> {
        let path = self.host.path_of(&name).ok_or(PluginError::NotFound(name))?;
        self.load(path).await
    }

    /// Stops serving a plugin; requests in flight finish on it, then its library is closed.
    pub fn unload(&self, name: &str) -> Result<(), ServiceError> {
        Ok(self.host.unload(name)?)
    }

    /// Every plugin, ready or failed, by name.
    pub fn list(&self) -> Vec<(String, PluginState)> {
        self.host.list()
    }

    /// The plugin serving `name` now, leased for a request; `None` when `name` is no plugin.
    pub fn lease(&self, name: &str) -> Option<Result<Arc<Plugin>, ServiceError>> {
        self.host.lease(name).map(|leased| leased.map_err(ServiceError::from))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.host.contains(name)
    }

    /// The answer shape a ready plugin declares for the adapter it tunes online, with the
    /// plugin's name: feedback for that adapter must keep it.
    pub fn shape_of_tuned(&self, adapter: &str) -> Option<(String, ConstraintSpec)> {
        self.list().into_iter().find_map(|(name, state)| {
            let plugin = state.ok()?;
            let tunes = plugin.info.adapters.iter().any(|a| a.name == adapter && a.source == AdapterSource::Tuned);
            Some((name, plugin.answer_constraint().filter(|_| tunes)?))
        })
    }

    /// The outcome of a call to `plugin` on behalf of a request: a plugin at fault (it panicked
    /// or returned garbage) is marked failed and serves nothing until reloaded.
    pub fn contain<T>(&self, plugin: &Plugin, result: Result<T, PluginError>) -> Result<T, ServiceError> {
        result.map_err(|e| self.fault(plugin, e))
    }

    /// The request's error for `e` from `plugin`; a plugin at fault is marked failed first.
    pub fn fault(&self, plugin: &Plugin, e: PluginError) -> ServiceError {
        if e.is_plugin_fault() {
            self.host.mark_failed(plugin, &e);
        }
        ServiceError::from(e)
    }

    /// Loads the plugin at `path`, sets up its adapters and publishes it; a failure is recorded
    /// against the plugin and returned.
    fn load_now(&self, path: &Path) -> Result<Arc<Plugin>, PluginError> {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("plugin").to_string();
        let resolved = self.host.resolve(path)?;
        let plugin = match self.host.open(&resolved) {
            Ok(plugin) => plugin,
            Err(e) => {
                self.host.record_failure(stem.trim_start_matches("lib"), &resolved, &e);
                return Err(e);
            }
        };
        match self.install_adapters(&plugin) {
            Ok(()) => {
                self.host.publish(plugin.clone());
                Ok(plugin)
            }
            Err(e) => {
                self.host.record_failure(&plugin.info.name, &resolved, &e);
                Err(e)
            }
        }
    }

    /// Registers the adapters a plugin declares: shipped beside it, embedded in it, or tuned
    /// online (created fresh when new, and open to every tuning scope: its users' feedback
    /// tunes it).
    fn install_adapters(&self, plugin: &Plugin) -> Result<(), PluginError> {
        let bad = |message: String| PluginError::BadInfo { plugin: plugin.info.name.clone(), message };
        for adapter in &plugin.info.adapters {
            match &adapter.source {
                AdapterSource::Tuned => {
                    let tuner = self
                        .tuner
                        .as_ref()
                        .ok_or_else(|| bad(format!("adapter `{}` is tuned online, which is off on this server", adapter.name)))?;
                    tuner.set_open_to_tuning(&adapter.name, true).map_err(|e| bad(e.to_string()))?;
                }
                AdapterSource::Files { dir } => {
                    let base = plugin.path.parent().unwrap_or(Path::new("."));
                    self.registry.install(&adapter.name, &base.join(dir)).map_err(|e| bad(e.to_string()))?;
                }
                AdapterSource::Embedded => {
                    let dir = self.extract_embedded(plugin, &adapter.name)?;
                    self.registry.install(&adapter.name, &dir).map_err(|e| bad(e.to_string()))?;
                }
            }
        }
        Ok(())
    }

    /// Writes an adapter embedded in the plugin's library to the host's private cache, as a
    /// PEFT folder.
    fn extract_embedded(&self, plugin: &Plugin, adapter: &str) -> Result<PathBuf, PluginError> {
        let dir = self.host.cache_dir().join(format!("{}-{}", plugin.info.name, plugin.generation)).join(adapter);
        let io = |path: &Path, e: std::io::Error| PluginError::BadInfo { plugin: plugin.info.name.clone(), message: format!("{}: {e}", path.display()) };
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
        for file in [tessera_adapters::peft::CONFIG_FILE, tessera_adapters::peft::WEIGHTS_FILE] {
            let request = tessera_plugin_api::AdapterFileRequest { adapter: adapter.to_string(), file: file.to_string() };
            let bytes = plugin.call_raw(Hook::AdapterFile, &request)?;
            std::fs::write(dir.join(file), bytes).map_err(|e| io(&dir.join(file), e))?;
        }
        Ok(dir)
    }
}
