//! Keeps the adapters a server serves in step with the store that a group of servers shares.
//!
//! The store is the truth: each adapter's current version. A server that promotes, rolls back or
//! creates an adapter announces it (PostgreSQL `NOTIFY`, sent when its transaction commits); the
//! others hear it on a `LISTEN` connection and swap to the new version. Notifications are lost
//! while a listener reconnects, so every server also reconciles the whole registry with the
//! store on a timer. A swap makes a new registry generation: requests in flight keep the lease
//! they took at admission.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::registry::Registry;
use crate::store::database::{Database, Dialect};
use crate::store::{unix_millis, Store, StoreError, ADAPTER_CHANNEL};

/// How often a server reconciles all adapters with the store, notifications or not.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(5);

/// Whether this server has reconciled with the store, and what its notifications lag.
pub struct SyncState {
    ready: AtomicBool,
    /// Milliseconds from a notification's commit on one server to its arrival here.
    pub notification_lag: prometheus::Histogram,
}

impl SyncState {
    pub fn new() -> Result<Self, prometheus::Error> {
        let notification_lag = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "tessera_notification_lag_seconds",
                "Seconds from an adapter change committed on one server to its notification here.",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0]),
        )?;
        Ok(Self { ready: AtomicBool::new(false), notification_lag })
    }

    /// The last reconcile succeeded: this server serves what the store says.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn record(&self, outcome: &Result<usize, StoreError>) {
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "adapters not reconciled with the store");
        }
        self.ready.store(outcome.is_ok(), Ordering::SeqCst);
    }
}

/// Brings one adapter in the registry to the store's current version: a loaded adapter is
/// swapped now, one only registered is re-pointed and loads (and, from an object store,
/// downloads) on first use. True if it changed.
pub fn reconcile_adapter(store: &Store, registry: &Registry, name: &str) -> Result<bool, StoreError> {
    let version = store.adapter(name)?.map(|row| row.version);
    follow_version(store, registry, name, version)
}

/// Serves `name` at `version`, the store's current one; `None` when its record is gone.
fn follow_version(store: &Store, registry: &Registry, name: &str, version: Option<u32>) -> Result<bool, StoreError> {
    let Some(version) = version else { return forget(store, registry, name) };
    let current = store.version_dir(name, version);
    let changed = match registry.describe(name) {
        Some((source, _)) if source == current => false,
        Some((_, Some(_))) => install(registry, name, &current),
        _ => registry
            .register(name, &current)
            .map_err(|e| tracing::warn!(adapter = name, error = %e, "stored adapter not registered"))
            .is_ok(),
    };
    if changed {
        tracing::info!(adapter = name, version, "adapter brought to the store's version");
    }
    Ok(changed)
}

/// Whether this server serves `name` from the store's folders.
fn served_from_store(store: &Store, registry: &Registry, name: &str) -> bool {
    registry.describe(name).is_some_and(|(source, _)| source.starts_with(store.root()))
}

/// An adapter whose record is gone (deleted on some server) stops being served here, if this
/// server served it from the store's folders. True if it did.
fn forget(store: &Store, registry: &Registry, name: &str) -> Result<bool, StoreError> {
    if !served_from_store(store, registry, name) {
        return Ok(false);
    }
    let _ = registry.unload(name);
    store.forget_adapter(name)?;
    tracing::info!(adapter = name, "adapter deleted from the store: no longer served");
    Ok(true)
}

fn install(registry: &Registry, name: &str, path: &Path) -> bool {
    registry
        .install(name, path)
        .map_err(|e| tracing::warn!(adapter = name, error = %e, "stored adapter version not installed"))
        .is_ok()
}

/// Reconciles every stored adapter, and every served one that came from the store, against one
/// read of the adapters' rows; how many changed.
pub fn reconcile(store: &Store, registry: &Registry) -> Result<usize, StoreError> {
    let mut versions: std::collections::BTreeMap<String, Option<u32>> =
        store.adapters()?.into_iter().map(|row| (row.name, Some(row.version))).collect();
    for name in registry.names() {
        if served_from_store(store, registry, &name) {
            versions.entry(name).or_insert(None);
        }
    }
    let mut changed = 0;
    for (name, version) in versions {
        changed += usize::from(follow_version(store, registry, &name, version)?);
    }
    Ok(changed)
}

/// Reconciles once now, then keeps this server in step on a thread of its own while `store`
/// lives. Only a shared (PostgreSQL) store can change under a server; a SQLite one is
/// reconciled once.
pub fn start(store: &Arc<Store>, registry: &Arc<Registry>, state: &Arc<SyncState>) -> std::io::Result<()> {
    state.record(&reconcile(store, registry));
    if store.dialect() != Dialect::Postgres {
        return Ok(());
    }
    let (store, registry, state) = (Arc::downgrade(store), Arc::downgrade(registry), state.clone());
    std::thread::Builder::new()
        .name("tessera-sync".into())
        .spawn(move || follow(store, registry, state))
        .map(|_| ())
}

/// Listens for changes and reconciles on a timer until the store is dropped.
fn follow(store: Weak<Store>, registry: Weak<Registry>, state: Arc<SyncState>) {
    let mut listener = None;
    loop {
        let (Some(store), Some(registry)) = (store.upgrade(), registry.upgrade()) else { return };
        if listener.is_none() {
            listener = listen(store.database());
        }
        let heard = match listener.as_mut() {
            Some(client) => drain(client, &store, &registry, &state),
            None => {
                std::thread::sleep(Duration::from_secs(1));
                Ok(())
            }
        };
        if let Err(e) = heard {
            tracing::warn!(error = %e, "adapter notifications lost; listening again");
            listener = None;
        }
        state.record(&reconcile(&store, &registry));
    }
}

fn listen(database: &Database) -> Option<postgres::Client> {
    let Database::Postgres(pool) = database else { return None };
    let listening = pool.connect().map_err(|e| e.to_string()).and_then(|mut client| {
        client.batch_execute(&format!("LISTEN {ADAPTER_CHANNEL}")).map_err(|e| e.to_string())?;
        Ok(client)
    });
    listening.map_err(|e| tracing::warn!(error = %e, "cannot listen for adapter changes")).ok()
}

/// Applies the notifications that arrive until a reconcile is due.
fn drain(client: &mut postgres::Client, store: &Store, registry: &Registry, state: &SyncState) -> Result<(), postgres::Error> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut notifications = client.notifications();
    let mut arriving = notifications.timeout_iter(RECONCILE_EVERY);
    while let Some(notification) = arriving.next()? {
        let (name, sent) = notification.payload().split_once('\t').unwrap_or((notification.payload(), ""));
        if let Ok(sent) = sent.parse::<i64>() {
            state.notification_lag.observe((unix_millis() - sent).max(0) as f64 / 1000.0);
        }
        if let Err(e) = reconcile_adapter(store, registry, name) {
            tracing::warn!(adapter = name, error = %e, "adapter change not applied");
        }
    }
    Ok(())
}
