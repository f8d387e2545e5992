//! Adapters as a whole: what the registry serves, joined with what the tuning store knows of
//! the ones tuned online.

use std::path::PathBuf;

use crate::access::Scope;
use crate::registry::Registry;
use crate::train::job::Tuner;

/// One adapter, as the registry and the tuning store know it.
#[derive(Debug, Clone)]
pub struct AdapterDescription {
    pub name: String,
    pub path: PathBuf,
    /// The generation in memory, when it is loaded.
    pub generation: Option<u64>,
    pub rank: Option<usize>,
    pub alpha: Option<f32>,
    pub size_bytes: Option<usize>,
    /// For adapters tuned online.
    pub tuning: Option<TuningState>,
}

/// What the tuning store knows of a tuned adapter.
#[derive(Debug, Clone)]
pub struct TuningState {
    /// The served version (0 until a first promotion).
    pub version: u32,
    /// Whether a job is queued or running for it.
    pub training: Option<bool>,
    pub pairs: Option<usize>,
    /// The served version's metrics.
    pub metrics: Option<serde_json::Value>,
    /// The versions on disk.
    pub versions: Vec<u32>,
    pub rank: usize,
    pub alpha: f32,
    pub created_by: Scope,
    pub open_to_tuning: bool,
}

/// `name` as the registry serves it, with its tuning state where it is tuned online; `None`
/// when the registry does not hold it. Reads the store: call it off the async workers.
pub fn describe(registry: &Registry, tuner: Option<&Tuner>, name: &str) -> Option<AdapterDescription> {
    let (path, generation) = registry.describe(name)?;
    Some(AdapterDescription {
        name: name.to_string(),
        path,
        generation: generation.as_ref().map(|g| g.generation),
        rank: generation.as_ref().map(|g| g.rank),
        alpha: generation.as_ref().map(|g| g.alpha),
        size_bytes: generation.as_ref().map(|g| g.weights.size_in_bytes()),
        tuning: tuner.and_then(|t| tuning_state(t, name)),
    })
}

/// Every adapter the registry holds, by name.
pub fn describe_all(registry: &Registry, tuner: Option<&Tuner>) -> Vec<AdapterDescription> {
    registry.names().iter().filter_map(|name| describe(registry, tuner, name)).collect()
}

fn tuning_state(tuner: &Tuner, name: &str) -> Option<TuningState> {
    let row = tuner.store.adapter(name).ok()??;
    let versions = tuner.store.versions(name).unwrap_or_default();
    Some(TuningState {
        version: row.version,
        training: tuner.is_training(name).ok(),
        pairs: tuner.store.count_pairs(name).ok(),
        metrics: versions.iter().find(|v| v.version == row.version).map(|v| v.metrics.clone()),
        versions: versions.iter().map(|v| v.version).collect(),
        rank: row.rank,
        alpha: row.alpha,
        created_by: row.created_by,
        open_to_tuning: row.open_to_tuning,
    })
}
