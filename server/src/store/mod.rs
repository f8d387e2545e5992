//! Durable state of online tuning: feedback pairs, uploaded files, fine-tuning jobs and their
//! events and checkpoints, and every adapter version. Rows live in one server's SQLite file (WAL,
//! `synchronous=FULL`) or in a PostgreSQL database a group of servers shares (`database.rs`);
//! version and checkpoint folders live under the root, or in an object store (`blobs.rs`). A
//! write returns only after its transaction commits, so whatever the API acknowledged survives
//! a crash.

use std::path::{Path, PathBuf};

use crate::sql_params;

use crate::access::Scope;
use crate::dataset::preference::Preference;
use crate::dataset::{content_hash, Conversation};

pub mod batches;
pub mod blobs;
pub mod database;
pub mod preferences;
pub mod responses;
pub mod schema;
pub mod testing;
pub mod transfer;

use blobs::{BlobError, Blobs};
use database::{Database, DbError, Dialect, Row, Session};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] DbError),
    #[error("stored JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The database refused a second active job for an adapter.
    #[error("`{adapter}` already has an active job: {job}")]
    ActiveJob { adapter: String, job: String },
    #[error("the {location} database has schema version {found}, newer than this build's {known}")]
    TooNew { location: String, found: i64, known: i64 },
    #[error(transparent)]
    Blob(#[from] BlobError),
    #[error("metric: {0}")]
    Metric(#[from] prometheus::Error),
    #[error("stored {what} `{value}` is unknown to this build")]
    Unknown { what: &'static str, value: String },
}

/// Where files wait, under the store's root, for the transaction that records them.
const STAGING_DIR: &str = "staging";

/// The database's file name under the store's root.
const DATABASE_FILE: &str = "tessera.sqlite3";

/// What a job event is: OpenAI's `message` or `metrics` (a step's losses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Message,
    Metrics,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Message => "message",
            EventKind::Metrics => "metrics",
        }
    }
}

/// A fine-tuning job's state: `validating_files → queued → running → succeeded | failed |
/// cancelled`, stored as its OpenAI name under a CHECK constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    const ALL: [JobStatus; 6] = [
        JobStatus::ValidatingFiles,
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Queued or running: the adapter's one active job.
    pub fn is_active(self) -> bool {
        !self.has_ended()
    }

    pub fn has_ended(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

pub fn unix_time() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub struct Store {
    db: Database,
    /// `$TESSERA_HOME/tuning` or `--blobs file:DIR`: adapter versions and job checkpoints, and
    /// the SQLite database unless `--state` puts it elsewhere.
    root: PathBuf,
    /// This server's prefix for staged files under a root several servers may share.
    staging: String,
    /// Seconds each store call took, database round trips included.
    latency: prometheus::Histogram,
    /// Where the root's folders are published and fetched from (nothing to do in place).
    blobs: Blobs,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterRow {
    pub name: String,
    pub rank: usize,
    pub alpha: f32,
    pub targets: Vec<String>,
    pub version: u32,
    pub pairs_since_training: usize,
    /// The scope of the key that created it.
    pub created_by: Scope,
    /// Whether keys of other scopes than its creator's (below admin) may tune it.
    pub open_to_tuning: bool,
}

impl AdapterRow {
    /// Whether `scope` may add feedback to, train or read the feedback of this adapter: the
    /// admin always, its creator's scope, and anyone once the admin opened it.
    pub fn may_be_tuned_by(&self, scope: Scope) -> bool {
        scope == Scope::Admin || scope == self.created_by || self.open_to_tuning
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredPair {
    pub id: i64,
    pub hash: String,
    pub conversation: Conversation,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VersionRow {
    pub version: u32,
    pub path: PathBuf,
    pub job_id: Option<String>,
    pub metrics: serde_json::Value,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub id: String,
    pub filename: String,
    pub purpose: String,
    pub bytes: usize,
    pub records: usize,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub adapter: String,
    pub model: String,
    /// What the job trains on and how (`train::job::JobSpec`, as JSON).
    pub spec: serde_json::Value,
    pub status: JobStatus,
    pub fine_tuned_model: Option<String>,
    pub error: Option<String>,
    pub trained_tokens: Option<u64>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// The scope of the key that created it: only that scope or the admin may cancel it.
    pub created_by: Scope,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub id: i64,
    pub level: String,
    pub kind: EventKind,
    pub message: String,
    pub data: Option<serde_json::Value>,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub id: i64,
    pub job_id: String,
    pub step: usize,
    pub path: PathBuf,
    pub metrics: serde_json::Value,
    pub created_at: i64,
}

/// What an upload did: new records (pairs and preferences) stored, duplicates skipped, and
/// the records gathered towards the adapter's next job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub stored: usize,
    pub duplicates: usize,
    pub pairs_since_training: usize,
}

/// The records of one upload: pairs to imitate and preferences between answers.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewFeedback<'a> {
    pub pairs: &'a [Conversation],
    pub preferences: &'a [Preference],
}

impl<'a> NewFeedback<'a> {
    pub fn pairs(pairs: &'a [Conversation]) -> Self {
        Self { pairs, preferences: &[] }
    }

    fn len(&self) -> usize {
        self.pairs.len() + self.preferences.len()
    }
}

/// Stores the records of `feedback` not already held for `adapter` (by content hash) and
/// counts them towards its next job, inside the caller's transaction.
fn insert_feedback_in(s: &mut dyn Session, adapter: &str, feedback: NewFeedback<'_>) -> Result<Inserted, StoreError> {
    let now = unix_time();
    let mut stored = preferences::insert_preferences_in(s, adapter, feedback.preferences)?;
    for conversation in feedback.pairs {
        stored += s.execute(
            "INSERT INTO pairs (adapter, hash, conversation, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            sql_params![adapter, content_hash(conversation), serde_json::to_string(conversation)?, now],
        )?;
    }
    let pairs_since_training = s
        .query_one(
            "UPDATE adapters SET pairs_since_training = pairs_since_training + ?2 WHERE name = ?1 RETURNING pairs_since_training",
            sql_params![adapter, stored as i64],
        )?
        .int(0)?;
    Ok(Inserted {
        stored,
        duplicates: feedback.len() - stored,
        pairs_since_training: pairs_since_training as usize,
    })
}

/// What [`Store::insert_or_get_adapter`] did.
#[derive(Debug)]
pub enum Adoption {
    /// The pairs are stored; `created` when this call created the adapter.
    Stored { created: bool, inserted: Inserted },
    /// The adapter exists and the caller's scope may not tune it; nothing was stored.
    Refused(AdapterRow),
}

/// A job claimed by a trainer: it runs the job while its heartbeat renews the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub job: String,
    pub trainer: String,
}

/// The id of `adapter`'s active job, if any.
fn active_job_in(s: &mut dyn Session, adapter: &str) -> Result<Option<String>, StoreError> {
    let row = s.query_opt(
        &format!("SELECT id FROM jobs WHERE adapter = ?1 AND status IN {ACTIVE}"),
        sql_params![adapter],
    )?;
    Ok(row.map(|r| r.text(0)).transpose()?)
}

fn scope_from(text: String) -> Result<Scope, StoreError> {
    Scope::parse(&text).ok_or(StoreError::Unknown { what: "scope", value: text })
}

fn job_from_row(row: &Row) -> Result<JobRow, StoreError> {
    let status = row.text(4)?;
    Ok(JobRow {
        id: row.text(0)?,
        adapter: row.text(1)?,
        model: row.text(2)?,
        spec: serde_json::from_str(&row.text(3)?)?,
        status: JobStatus::parse(&status).ok_or(StoreError::Unknown { what: "job status", value: status })?,
        fine_tuned_model: row.opt_text(5)?,
        error: row.opt_text(6)?,
        trained_tokens: row.opt_int(7)?.map(|t| t as u64),
        created_at: row.int(8)?,
        finished_at: row.opt_int(9)?,
        created_by: scope_from(row.text(10)?)?,
    })
}

fn adapter_from_row(r: &Row) -> Result<AdapterRow, StoreError> {
    Ok(AdapterRow {
        name: r.text(0)?,
        rank: r.int(1)? as usize,
        alpha: r.real(2)? as f32,
        targets: serde_json::from_str(&r.text(3)?)?,
        version: r.int(4)? as u32,
        pairs_since_training: r.int(5)? as usize,
        created_by: scope_from(r.text(6)?)?,
        open_to_tuning: r.int(7)? != 0,
    })
}

fn file_from_row(r: &Row) -> Result<FileRow, StoreError> {
    Ok(FileRow {
        id: r.text(0)?,
        filename: r.text(1)?,
        purpose: r.text(2)?,
        bytes: r.int(3)? as usize,
        records: r.int(4)? as usize,
        created_at: r.int(5)?,
    })
}

const ADAPTER_COLUMNS: &str = "name, rank, alpha, targets, version, pairs_since_training, created_by, open_to_tuning";

const JOB_COLUMNS: &str = "id, adapter, model, spec, status, fine_tuned_model, error, trained_tokens, created_at, finished_at, created_by";

const ACTIVE: &str = "('validating_files', 'queued', 'running')";

/// Where a store keeps its state (`--state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateLocation {
    /// One server's embedded database file.
    Sqlite(PathBuf),
    /// A PostgreSQL database that a group of servers shares (a `postgres://` URL).
    Postgres(String),
}

impl std::str::FromStr for StateLocation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(StateLocation::Postgres(text.to_string()))
        } else if let Some(path) = text.strip_prefix("sqlite:") {
            Ok(StateLocation::Sqlite(PathBuf::from(path)))
        } else {
            Err(format!("`{text}` is neither `sqlite:PATH` nor a `postgres://` URL"))
        }
    }
}

impl std::fmt::Display for StateLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StateLocation::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            // The URL may hold a password: name the backend only.
            StateLocation::Postgres(_) => f.write_str("postgres"),
        }
    }
}

impl StateLocation {
    /// The default: `tessera.sqlite3` under the store's root.
    pub fn sqlite_under(root: &Path) -> Self {
        StateLocation::Sqlite(root.join(DATABASE_FILE))
    }

    /// Opens the database and brings its schema up to date.
    pub fn open(&self) -> Result<Database, StoreError> {
        let database = match self {
            StateLocation::Sqlite(path) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|source| StoreError::Io { path: parent.to_path_buf(), source })?;
                }
                Database::open_sqlite(path)?
            }
            StateLocation::Postgres(url) => Database::open_postgres(url)?,
        };
        let (from, _) = database.transaction(|s| Ok::<_, StoreError>(schema::migrate(s, database.dialect())?))?;
        if from > schema::latest() {
            return Err(StoreError::TooNew { location: self.to_string(), found: from, known: schema::latest() });
        }
        Ok(database)
    }
}

/// How long a trainer's claim on a job lasts without a heartbeat. A trainer killed mid-job
/// leaves its job to another within this (and a poll).
pub const CLAIM_LEASE_SECS: i64 = 15;

impl Store {
    /// Opens (creating if needed) a single server's store under `root`, its database in
    /// `root/tessera.sqlite3`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Self::open_at(&StateLocation::sqlite_under(root), root)
    }

    /// Opens the store whose rows live at `state` and whose files (adapter versions,
    /// checkpoints) live under `root`, and brings its schema up to date.
    pub fn open_at(state: &StateLocation, root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|source| StoreError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let db = state.open()?;
        if db.dialect() == Dialect::Sqlite {
            // One process owns a SQLite store: claims of an earlier process died with it.
            db.transaction(|s| {
                s.execute("UPDATE jobs SET claimed_by = NULL, lease_until = NULL", &[])?;
                s.execute("UPDATE batches SET claimed_by = NULL, lease_until = NULL", &[])
            })?;
        }
        let latency = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("tessera_state_seconds", "Seconds per call to the state backend (one transaction).")
                .const_label("backend", db.dialect().name())
                .buckets(vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0]),
        )?;
        let store = Self {
            db,
            root: root.to_path_buf(),
            staging: format!("{:016x}", rand::random::<u64>()),
            latency,
            blobs: Blobs::local(),
        };
        // Staged files of a create that was interrupted were never recorded: nothing uses them.
        // Several servers share a root beside PostgreSQL, so there each stages under its own name.
        if store.db.dialect() == Dialect::Sqlite {
            let _ = std::fs::remove_dir_all(root.join(STAGING_DIR));
        }
        Ok(store)
    }

    /// The store with its folders in `blobs` (an object store); its root is then a cache.
    pub fn with_blobs(self, blobs: Blobs) -> Self {
        Self { blobs, ..self }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder at `path` (a version or checkpoint folder under the root, as the store
    /// names them), fetched from the object store first if this server lacks it.
    pub fn fetch(&self, path: &Path) -> Result<PathBuf, StoreError> {
        match path.strip_prefix(&self.root) {
            Ok(key) => Ok(self.blobs.fetch(&self.root, key)?),
            Err(_) => Ok(path.to_path_buf()),
        }
    }

    /// Puts the folder at `path` under the root into the object store, before the database
    /// records it, so that no server reads a row whose files are not there yet.
    fn publish(&self, path: &Path) -> Result<(), StoreError> {
        match path.strip_prefix(&self.root) {
            Ok(key) => Ok(self.blobs.publish(&self.root, key)?),
            Err(_) => Ok(()),
        }
    }

    pub fn dialect(&self) -> Dialect {
        self.db.dialect()
    }

    /// Whether a group of servers shares this store (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.db.dialect() == Dialect::Postgres
    }

    /// The histogram of store call latencies, for `/metrics`.
    pub fn latency(&self) -> &prometheus::Histogram {
        &self.latency
    }

    /// The database, for what runs beside the store (listeners, export and import).
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// Where version `version` of `adapter` lives (a PEFT folder).
    pub fn version_dir(&self, adapter: &str, version: u32) -> PathBuf {
        self.root.join(version_key(adapter, version))
    }

    /// Version `version` of `adapter`, fetched from the object store first if this server
    /// lacks it.
    pub fn fetch_version(&self, adapter: &str, version: u32) -> Result<PathBuf, StoreError> {
        self.fetch(&self.version_dir(adapter, version))
    }

    /// A fresh folder name for files written before the transaction that records them.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(STAGING_DIR).join(format!("{}-{:016x}", self.staging, rand::random::<u64>()))
    }

    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.root.join("jobs").join(job)
    }

    /// A path the database recorded, relative to the root (absolute in stores made before).
    fn resolve(&self, recorded: &str) -> PathBuf {
        self.root.join(recorded)
    }

    /// A path under the root as the database records it: relative, so that servers that
    /// mount one shared root at different places agree.
    fn record(&self, path: &Path) -> String {
        path.strip_prefix(&self.root).unwrap_or(path).display().to_string()
    }

    fn with<R>(&self, f: impl FnOnce(&mut dyn Session) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let started = std::time::Instant::now();
        let result = self.db.transaction(f);
        self.latency.observe(started.elapsed().as_secs_f64());
        result
    }

    /// Tells the other servers sharing this database that `adapter` changed, when the
    /// transaction commits (PostgreSQL `NOTIFY`; a SQLite store has no one to tell).
    fn notify_adapter(&self, s: &mut dyn Session, adapter: &str) -> Result<(), StoreError> {
        if self.db.dialect() == Dialect::Postgres {
            let payload = format!("{adapter}\t{}", unix_millis());
            s.execute("SELECT pg_notify(?1, ?2)", sql_params![ADAPTER_CHANNEL, payload])?;
        }
        Ok(())
    }

    pub fn adapter(&self, name: &str) -> Result<Option<AdapterRow>, StoreError> {
        self.with(|s| {
            s.query_opt(&format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE name = ?1"), sql_params![name])?
                .as_ref()
                .map(adapter_from_row)
                .transpose()
        })
    }

    pub fn adapters(&self) -> Result<Vec<AdapterRow>, StoreError> {
        self.with(|s| s.query(&format!("SELECT {ADAPTER_COLUMNS} FROM adapters ORDER BY name"), &[])?.iter().map(adapter_from_row).collect())
    }

    /// Stores `feedback` for the adapter named `new.name`, creating it at version 0 from
    /// `new` when the name is free, all in one transaction: of concurrent first uploads one
    /// creates and the rest store their pairs on its adapter. `place_files` runs inside the
    /// transaction, only for the call that creates; it puts version 0's files at
    /// [`Store::version_dir`], and if it or the commit fails nothing is recorded and the
    /// adapter's folder is removed. An existing adapter that `new.created_by` may not tune is
    /// returned untouched.
    pub fn insert_or_get_adapter(
        &self,
        new: &AdapterRow,
        v0_metrics: &serde_json::Value,
        feedback: NewFeedback<'_>,
        place_files: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Adoption, StoreError> {
        let v0 = self.version_dir(&new.name, 0);
        let mut placed = false;
        let outcome = self.with(|s| {
            let created = s.execute(
                "INSERT INTO adapters (name, rank, alpha, targets, version, pairs_since_training, created_at, created_by, open_to_tuning)
                 VALUES (?1, ?2, ?3, ?4, 0, 0, ?5, ?6, ?7) ON CONFLICT (name) DO NOTHING",
                sql_params![&new.name, new.rank as i64, new.alpha as f64, serde_json::to_string(&new.targets)?, unix_time(), new.created_by.as_str(), new.open_to_tuning],
            )? == 1;
            if created {
                s.execute(
                    "INSERT INTO versions (adapter, version, path, job_id, metrics, created_at) VALUES (?1, 0, ?2, NULL, ?3, ?4)",
                    sql_params![&new.name, self.record(&v0), v0_metrics.to_string(), unix_time()],
                )?;
                placed = true;
                place_files(&v0).map_err(|source| StoreError::Io { path: v0.clone(), source })?;
                self.publish(&v0)?;
                self.notify_adapter(s, &new.name)?;
            }
            let row = adapter_from_row(&s.query_one(&format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE name = ?1"), sql_params![&new.name])?)?;
            if !row.may_be_tuned_by(new.created_by) {
                return Ok(Adoption::Refused(row));
            }
            let inserted = insert_feedback_in(s, &new.name, feedback)?;
            Ok(Adoption::Stored { created, inserted })
        });
        if outcome.is_err() && placed {
            if let Some(folder) = v0.parent() {
                let _ = std::fs::remove_dir_all(folder);
            }
        }
        outcome
    }

    /// Stores the pairs not already held for `adapter`, in one transaction.
    pub fn insert_pairs(&self, adapter: &str, conversations: &[Conversation]) -> Result<Inserted, StoreError> {
        self.insert_feedback(adapter, NewFeedback::pairs(conversations))
    }

    /// Stores the pairs and preferences not already held for `adapter`, in one transaction.
    pub fn insert_feedback(&self, adapter: &str, feedback: NewFeedback<'_>) -> Result<Inserted, StoreError> {
        self.with(|s| insert_feedback_in(s, adapter, feedback))
    }

    /// Up to `limit` pairs of `adapter` with ids above `after`, oldest first.
    pub fn pairs(&self, adapter: &str, after: i64, limit: usize) -> Result<Vec<StoredPair>, StoreError> {
        self.pairs_in(adapter, after, i64::MAX, limit)
    }

    /// The pairs of `adapter` with ids up to `last_id`, oldest first (a job's data snapshot).
    pub fn pairs_through(&self, adapter: &str, last_id: i64) -> Result<Vec<StoredPair>, StoreError> {
        self.pairs_in(adapter, 0, last_id, usize::MAX)
    }

    /// Pairs with `after < id ≤ through`, oldest first, at most `limit`.
    fn pairs_in(&self, adapter: &str, after: i64, through: i64, limit: usize) -> Result<Vec<StoredPair>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|s| {
            s.query(
                "SELECT id, hash, conversation, created_at FROM pairs
                 WHERE adapter = ?1 AND id > ?2 AND id <= ?3 ORDER BY id LIMIT ?4",
                sql_params![adapter, after, through, limit],
            )?
            .iter()
            .map(|r| {
                Ok(StoredPair {
                    id: r.int(0)?,
                    hash: r.text(1)?,
                    conversation: serde_json::from_str(&r.text(2)?)?,
                    created_at: r.int(3)?,
                })
            })
            .collect()
        })
    }

    /// The id of `adapter`'s newest pair (0 when it has none).
    pub fn last_pair_id(&self, adapter: &str) -> Result<i64, StoreError> {
        self.with(|s| Ok(s.query_one("SELECT COALESCE(MAX(id), 0) FROM pairs WHERE adapter = ?1", sql_params![adapter])?.int(0)?))
    }

    pub fn count_pairs(&self, adapter: &str) -> Result<usize, StoreError> {
        self.with(|s| Ok(s.query_one("SELECT COUNT(*) FROM pairs WHERE adapter = ?1", sql_params![adapter])?.int(0)? as usize))
    }

    /// Deletes the pairs with the given ids (all of the adapter's when `ids` is None).
    pub fn delete_pairs(&self, adapter: &str, ids: Option<&[i64]>) -> Result<usize, StoreError> {
        self.with(|s| {
            let deleted = match ids {
                None => s.execute("DELETE FROM pairs WHERE adapter = ?1", sql_params![adapter])?,
                Some(ids) => {
                    let mut n = 0;
                    for id in ids {
                        n += s.execute("DELETE FROM pairs WHERE adapter = ?1 AND id = ?2", sql_params![adapter, *id])?;
                    }
                    n
                }
            };
            Ok(deleted)
        })
    }

    pub fn versions(&self, adapter: &str) -> Result<Vec<VersionRow>, StoreError> {
        self.with(|s| {
            s.query(
                "SELECT version, path, job_id, metrics, created_at FROM versions WHERE adapter = ?1 ORDER BY version",
                sql_params![adapter],
            )?
            .iter()
            .map(|r| {
                Ok(VersionRow {
                    version: r.int(0)? as u32,
                    path: self.resolve(&r.text(1)?),
                    job_id: r.opt_text(2)?,
                    metrics: serde_json::from_str(&r.text(3)?)?,
                    created_at: r.int(4)?,
                })
            })
            .collect()
        })
    }

    /// Records a version whose files are written and makes it current.
    pub fn promote(&self, adapter: &str, version: u32, job_id: &str, metrics: &serde_json::Value) -> Result<(), StoreError> {
        let path = self.version_dir(adapter, version);
        self.publish(&path)?;
        self.with(|s| {
            s.execute(
                "INSERT INTO versions (adapter, version, path, job_id, metrics, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                sql_params![adapter, version as i64, self.record(&path), job_id, metrics.to_string(), unix_time()],
            )?;
            s.execute("UPDATE adapters SET version = ?2 WHERE name = ?1", sql_params![adapter, version as i64])?;
            self.notify_adapter(s, adapter)
        })
    }

    /// Deletes a tuned adapter's record: its versions and pairs (its jobs stay, as history), and
    /// then its folders. Refused while a job of it is active. False if there was none.
    pub fn delete_adapter(&self, adapter: &str) -> Result<bool, StoreError> {
        let deleted = self.with(|s| {
            if let Some(job) = active_job_in(s, adapter)? {
                return Err(StoreError::ActiveJob { adapter: adapter.to_string(), job });
            }
            s.execute("DELETE FROM pairs WHERE adapter = ?1", sql_params![adapter])?;
            s.execute("DELETE FROM preferences WHERE adapter = ?1", sql_params![adapter])?;
            s.execute("DELETE FROM versions WHERE adapter = ?1", sql_params![adapter])?;
            let deleted = s.execute("DELETE FROM adapters WHERE name = ?1", sql_params![adapter])? > 0;
            if deleted {
                self.notify_adapter(s, adapter)?;
            }
            Ok(deleted)
        })?;
        if deleted {
            self.blobs.remove(&self.root, &adapter_key(adapter))?;
        }
        Ok(deleted)
    }

    /// Drops this server's copy of a deleted adapter's folders (another server deleted it).
    pub fn forget_adapter(&self, adapter: &str) -> Result<(), StoreError> {
        Ok(self.blobs.forget(&self.root, &adapter_key(adapter))?)
    }

    /// Makes an existing version current again.
    pub fn set_current_version(&self, adapter: &str, version: u32) -> Result<(), StoreError> {
        self.with(|s| {
            s.execute("UPDATE adapters SET version = ?2 WHERE name = ?1", sql_params![adapter, version as i64])?;
            self.notify_adapter(s, adapter)
        })
    }

    /// Records an uploaded file. Its content goes where the folders go: into the object store
    /// when there is one (put before the row that names it), else into its row.
    pub fn insert_file(&self, row: &FileRow, content: &[u8]) -> Result<(), StoreError> {
        let in_blobs = self.blobs.put_object(&file_key(&row.id), content)?;
        let (stored, kept): (&str, &[u8]) = if in_blobs { ("blobs", &[]) } else { ("database", content) };
        self.with(|s| {
            s.execute(
                "INSERT INTO files (id, filename, purpose, bytes, records, content, created_at, stored) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                sql_params![&row.id, &row.filename, &row.purpose, row.bytes as i64, row.records as i64, kept, row.created_at, stored],
            )?;
            Ok(())
        })
    }

    pub fn file(&self, id: &str) -> Result<Option<FileRow>, StoreError> {
        self.with(|s| {
            s.query_opt("SELECT id, filename, purpose, bytes, records, created_at FROM files WHERE id = ?1", sql_params![id])?
                .as_ref()
                .map(file_from_row)
                .transpose()
        })
    }

    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let row = self.with(|s| Ok(s.query_opt("SELECT content, stored FROM files WHERE id = ?1", sql_params![id])?))?;
        let Some(row) = row else { return Ok(None) };
        match row.text(1)?.as_str() {
            "blobs" => Ok(Some(self.blobs.get_object(&file_key(id))?)),
            _ => Ok(Some(row.into_blob(0)?)),
        }
    }

    pub fn files(&self) -> Result<Vec<FileRow>, StoreError> {
        self.with(|s| {
            s.query("SELECT id, filename, purpose, bytes, records, created_at FROM files ORDER BY created_at DESC, id", &[])?
                .iter()
                .map(file_from_row)
                .collect()
        })
    }

    /// Records a new job, and with `reset_pairs` restarts its adapter's count of pairs since
    /// training, in one transaction. A second active job of the same adapter is refused by the
    /// database (`ActiveJob`, naming the one that holds it).
    pub fn insert_job(&self, job: &JobRow, reset_pairs: bool) -> Result<(), StoreError> {
        let inserted = self.with(|s| {
            s.execute(
                "INSERT INTO jobs (id, adapter, model, spec, status, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                sql_params![&job.id, &job.adapter, &job.model, job.spec.to_string(), job.status.as_str(), job.created_at, job.created_by.as_str()],
            )?;
            if reset_pairs {
                s.execute("UPDATE adapters SET pairs_since_training = 0 WHERE name = ?1", sql_params![&job.adapter])?;
            }
            Ok(())
        });
        match inserted {
            // A refused statement ends a PostgreSQL transaction: look for the holder in a new one.
            Err(StoreError::Sql(e)) if e.is_constraint_violation() => match self.active_job(&job.adapter)? {
                Some(active) => Err(StoreError::ActiveJob { adapter: job.adapter.clone(), job: active }),
                None => Err(StoreError::Sql(e)),
            },
            other => other,
        }
    }

    /// Opens an adapter to tuning by every tuning scope, or closes it to all but its creator's.
    pub fn set_open_to_tuning(&self, adapter: &str, open: bool) -> Result<bool, StoreError> {
        self.with(|s| Ok(s.execute("UPDATE adapters SET open_to_tuning = ?2 WHERE name = ?1", sql_params![adapter, open])? > 0))
    }

    /// The adapter's active (queued or running) job, if any.
    pub fn active_job(&self, adapter: &str) -> Result<Option<String>, StoreError> {
        self.with(|s| active_job_in(s, adapter))
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        self.with(|s| s.query_opt(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), sql_params![id])?.as_ref().map(job_from_row).transpose())
    }

    /// Jobs, newest first, optionally only those of one adapter.
    pub fn jobs(&self, adapter: Option<&str>) -> Result<Vec<JobRow>, StoreError> {
        self.with(|s| {
            s.query(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE CAST(?1 AS TEXT) IS NULL OR adapter = ?1 ORDER BY created_at DESC, rowid DESC"),
                sql_params![adapter],
            )?
            .iter()
            .map(job_from_row)
            .collect()
        })
    }

    /// Sets a job's status (and, when it ends, its outcome), unless it already ended.
    pub fn set_job_status(
        &self,
        id: &str,
        status: JobStatus,
        fine_tuned_model: Option<&str>,
        error: Option<&str>,
        trained_tokens: Option<u64>,
    ) -> Result<bool, StoreError> {
        let finished = status.has_ended().then(unix_time);
        self.with(|s| {
            let changed = s.execute(
                "UPDATE jobs SET status = ?2, fine_tuned_model = COALESCE(?3, fine_tuned_model), error = COALESCE(?4, error),
                    trained_tokens = COALESCE(?5, trained_tokens), finished_at = ?6
                 WHERE id = ?1 AND status NOT IN ('succeeded', 'failed', 'cancelled')",
                sql_params![id, status.as_str(), fine_tuned_model, error, trained_tokens.map(|t| t as i64), finished],
            )?;
            Ok(changed > 0)
        })
    }

    /// Claims for `trainer` the oldest active job that no live trainer holds: unclaimed, or
    /// whose claim expired because its trainer stopped renewing it. On PostgreSQL concurrent
    /// claimers skip the rows another is locking, so each job goes to exactly one.
    pub fn claim_job(&self, trainer: &str) -> Result<Option<Claim>, StoreError> {
        let lock = self.db.dialect().skip_locked();
        let now = unix_time();
        self.with(|s| {
            let claimed = s.query_opt(
                &format!(
                    "UPDATE jobs SET claimed_by = ?1, lease_until = ?2 WHERE id = (
                        SELECT id FROM jobs WHERE status IN {ACTIVE} AND (claimed_by IS NULL OR lease_until < ?3)
                        ORDER BY created_at, rowid LIMIT 1{lock})
                     RETURNING id"
                ),
                sql_params![trainer, now + CLAIM_LEASE_SECS, now],
            )?;
            Ok(claimed.map(|r| r.text(0)).transpose()?.map(|job| Claim { job, trainer: trainer.to_string() }))
        })
    }

    /// Extends a claim; false when the job is no longer this trainer's to run (it ended,
    /// was cancelled from another server, or the claim expired and another trainer took it).
    pub fn renew_claim(&self, claim: &Claim) -> Result<bool, StoreError> {
        self.with(|s| {
            let renewed = s.execute(
                &format!("UPDATE jobs SET lease_until = ?3 WHERE id = ?1 AND claimed_by = ?2 AND status IN {ACTIVE}"),
                sql_params![&claim.job, &claim.trainer, unix_time() + CLAIM_LEASE_SECS],
            )?;
            Ok(renewed > 0)
        })
    }

    /// A job event of kind `message` (what happened, with optional data).
    pub fn add_event(&self, job: &str, level: &str, message: &str, data: Option<&serde_json::Value>) -> Result<(), StoreError> {
        self.insert_event(job, level, EventKind::Message, message, data)
    }

    /// A job event of kind `metrics`: one optimizer step's losses.
    pub fn add_metrics_event(&self, job: &str, message: &str, data: &serde_json::Value) -> Result<(), StoreError> {
        self.insert_event(job, "info", EventKind::Metrics, message, Some(data))
    }

    fn insert_event(&self, job: &str, level: &str, kind: EventKind, message: &str, data: Option<&serde_json::Value>) -> Result<(), StoreError> {
        self.with(|s| {
            s.execute(
                "INSERT INTO events (job_id, level, kind, message, data, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                sql_params![job, level, kind.as_str(), message, data.map(|d| d.to_string()), unix_time()],
            )?;
            Ok(())
        })
    }

    /// Events of a job, newest first, before the event id `before` if given.
    pub fn events(&self, job: &str, before: Option<i64>, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        self.with(|s| {
            s.query(
                "SELECT id, level, message, data, created_at, kind FROM events WHERE job_id = ?1 AND (CAST(?2 AS BIGINT) IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3",
                sql_params![job, before, limit as i64],
            )?
            .iter()
            .map(|r| {
                Ok(EventRow {
                    id: r.int(0)?,
                    level: r.text(1)?,
                    kind: if r.text(5)? == "metrics" { EventKind::Metrics } else { EventKind::Message },
                    message: r.text(2)?,
                    data: r.opt_text(3)?.map(|d| serde_json::from_str(&d)).transpose()?,
                    created_at: r.int(4)?,
                })
            })
            .collect()
        })
    }

    pub fn add_checkpoint(&self, job: &str, step: usize, path: &Path, metrics: &serde_json::Value) -> Result<(), StoreError> {
        self.publish(path)?;
        self.with(|s| {
            s.execute(
                "INSERT INTO checkpoints (job_id, step, path, metrics, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                sql_params![job, step as i64, self.record(path), metrics.to_string(), unix_time()],
            )?;
            Ok(())
        })
    }

    /// Checkpoints of a job, newest first.
    pub fn checkpoints(&self, job: &str) -> Result<Vec<CheckpointRow>, StoreError> {
        self.with(|s| {
            s.query(
                "SELECT id, job_id, step, path, metrics, created_at FROM checkpoints WHERE job_id = ?1 ORDER BY step DESC",
                sql_params![job],
            )?
            .iter()
            .map(|r| {
                Ok(CheckpointRow {
                    id: r.int(0)?,
                    job_id: r.text(1)?,
                    step: r.int(2)? as usize,
                    path: self.resolve(&r.text(3)?),
                    metrics: serde_json::from_str(&r.text(4)?)?,
                    created_at: r.int(5)?,
                })
            })
            .collect()
        })
    }
}

/// The object-store key of an uploaded file's content.
fn file_key(id: &str) -> String {
    format!("files/{id}")
}

/// Where `adapter`'s versions live under a store's root.
fn adapter_key(adapter: &str) -> PathBuf {
    Path::new("adapters").join(adapter)
}

/// Where version `version` of `adapter` lives under a store's root.
fn version_key(adapter: &str, version: u32) -> PathBuf {
    adapter_key(adapter).join(format!("v{version}"))
}

/// The PostgreSQL channel on which servers announce adapter changes; the payload is the
/// adapter's name, a tab, and when it was sent (unix milliseconds).
pub const ADAPTER_CHANNEL: &str = "tessera_adapters";

pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Message;

    pub(super) fn pair(q: &str) -> Conversation {
        Conversation {
            messages: vec![
                Message { role: "user".into(), content: q.into() },
                Message { role: "assistant".into(), content: "a".into() },
            ],
        }
    }

    /// A fresh r4 adapter's record.
    pub(super) fn adapter(name: &str, created_by: Scope) -> AdapterRow {
        AdapterRow {
            name: name.into(),
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into()],
            version: 0,
            pairs_since_training: 0,
            created_by,
            open_to_tuning: false,
        }
    }

    pub(super) fn job(id: &str, adapter: &str, status: JobStatus) -> JobRow {
        JobRow {
            id: id.into(),
            adapter: adapter.into(),
            model: "m".into(),
            spec: serde_json::json!({}),
            status,
            fine_tuned_model: None,
            error: None,
            trained_tokens: None,
            created_at: 0,
            finished_at: None,
            created_by: Scope::Admin,
        }
    }

    /// A SQLite store and, where a test server runs, a PostgreSQL one, each with a root of its own.
    pub(super) fn stores() -> Vec<(Store, StateLocation, tempfile::TempDir)> {
        let mut locations = vec![None];
        locations.extend(testing::fresh_database().unwrap().map(|url| Some(StateLocation::Postgres(url))));
        locations
            .into_iter()
            .map(|location| {
                let dir = tempfile::tempdir().unwrap();
                let location = location.unwrap_or_else(|| StateLocation::sqlite_under(dir.path()));
                (Store::open_at(&location, dir.path()).unwrap(), location, dir)
            })
            .collect()
    }

    #[test]
    fn the_database_holds_one_active_job_per_adapter_and_only_known_states() {
        for (store, location, _dir) in stores() {
            store.insert_job(&job("j1", "x", JobStatus::Queued), false).unwrap();
            match store.insert_job(&job("j2", "x", JobStatus::ValidatingFiles), false) {
                Err(StoreError::ActiveJob { adapter, job }) => assert_eq!((adapter.as_str(), job.as_str()), ("x", "j1"), "{location}"),
                other => panic!("{location}: a second active job was not refused: {other:?}"),
            }
            store.insert_job(&job("j3", "y", JobStatus::Queued), false).unwrap();
            assert!(store.set_job_status("j1", JobStatus::Cancelled, None, None, None).unwrap());
            store.insert_job(&job("j2", "x", JobStatus::Queued), false).unwrap();
            let refused = store.with(|s| Ok(s.execute("UPDATE jobs SET status = 'paused' WHERE id = 'j2'", &[])?));
            assert!(refused.is_err(), "{location}: a status outside the state machine is refused");
        }
    }

    #[test]
    fn jobs_events_files_versions_and_checkpoints_round_trip() {
        for (store, location, dir) in stores() {
            store.insert_job(&job("j1", "x", JobStatus::Queued), false).unwrap();
            store.insert_job(&job("j2", "y", JobStatus::Queued), false).unwrap();
            assert_eq!(store.jobs(None).unwrap().len(), 2, "{location}");
            assert_eq!(store.jobs(Some("y")).unwrap()[0].id, "j2", "{location}");
            store.add_event("j1", "info", "first", None).unwrap();
            store.add_metrics_event("j1", "Step 1", &serde_json::json!({"train_loss": 1.5})).unwrap();
            let events = store.events("j1", None, 10).unwrap();
            assert_eq!(events.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["Step 1", "first"], "{location}");
            assert_eq!(store.events("j1", Some(events[0].id), 10).unwrap().len(), 1, "{location}");
            let file = FileRow { id: "file-1".into(), filename: "a.jsonl".into(), purpose: "fine-tune".into(), bytes: 3, records: 1, created_at: 7 };
            store.insert_file(&file, b"abc").unwrap();
            assert_eq!((store.file("file-1").unwrap(), store.file_content("file-1").unwrap()), (Some(file), Some(b"abc".to_vec())), "{location}");
            let checkpoint = dir.path().join("jobs/j1/step-000002");
            store.add_checkpoint("j1", 2, &checkpoint, &serde_json::json!({"step": 2})).unwrap();
            assert_eq!(store.checkpoints("j1").unwrap()[0].path, checkpoint, "{location}: recorded relative, read back whole");
            assert!(store.set_job_status("j1", JobStatus::Succeeded, Some("x:v1"), None, Some(99)).unwrap());
            let done = store.job("j1").unwrap().unwrap();
            assert_eq!((done.fine_tuned_model.as_deref(), done.trained_tokens, done.finished_at.is_some()), (Some("x:v1"), Some(99), true), "{location}");
        }
    }

    #[test]
    fn a_claimed_job_goes_to_one_trainer_until_its_lease_expires() {
        for (store, location, _dir) in stores() {
            store.insert_job(&job("j1", "x", JobStatus::Queued), false).unwrap();
            let first = store.claim_job("a").unwrap().expect("the queued job is claimed");
            assert_eq!(first.job, "j1");
            assert_eq!(store.claim_job("b").unwrap(), None, "{location}: a held job is not claimed twice");
            assert!(store.renew_claim(&first).unwrap());
            let stolen = Claim { job: "j1".into(), trainer: "b".into() };
            assert!(!store.renew_claim(&stolen).unwrap(), "{location}: only the holder renews");
            // The holder stops renewing (killed): once the lease is past, another trainer takes it.
            store.with(|s| Ok(s.execute("UPDATE jobs SET lease_until = ?1", sql_params![unix_time() - 1])?)).unwrap();
            assert_eq!(store.claim_job("b").unwrap(), Some(stolen), "{location}");
            assert!(!store.renew_claim(&first).unwrap(), "{location}: the old holder learns it lost the job");
            store.set_job_status("j1", JobStatus::Cancelled, None, None, None).unwrap();
            assert!(!store.renew_claim(&Claim { job: "j1".into(), trainer: "b".into() }).unwrap(), "{location}: a cancelled job stops");
        }
    }

    #[test]
    fn racing_trainers_claim_each_of_twenty_jobs_exactly_once() {
        for (store, location, dir) in stores() {
            for i in 0..20 {
                store.insert_job(&job(&format!("j{i:02}"), &format!("a{i}"), JobStatus::Queued), false).unwrap();
            }
            // Each trainer has a store of its own, as each server does, all open before any claims.
            let own: Vec<Store> = (0..4).map(|_| Store::open_at(&location, dir.path()).unwrap()).collect();
            let trainers: Vec<_> = own
                .into_iter()
                .enumerate()
                .map(|(t, own)| {
                    std::thread::spawn(move || {
                        let mut claimed = Vec::new();
                        while let Some(claim) = own.claim_job(&format!("t{t}")).unwrap() {
                            claimed.push(claim.job);
                        }
                        claimed
                    })
                })
                .collect();
            let mut claimed: Vec<String> = trainers.into_iter().flat_map(|t| t.join().unwrap()).collect();
            claimed.sort();
            let expected: Vec<String> = (0..20).map(|i| format!("j{i:02}")).collect();
            assert_eq!(claimed, expected, "{location}: every job once");
            drop(store);
        }
    }

    #[test]
    fn migrating_an_old_database_keeps_one_active_job_and_types_its_events() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = rusqlite::Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            c.execute_batch(schema::SQLITE[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            for (id, status) in [("old", "running"), ("racer", "queued"), ("done", "succeeded")] {
                c.execute(
                    "INSERT INTO jobs (id, adapter, model, spec, status, created_at) VALUES (?1, 'x', 'm', '{}', ?2, 0)",
                    rusqlite::params![id, status],
                )
                .unwrap();
            }
            c.execute("INSERT INTO events (job_id, level, message, data, created_at) VALUES ('old', 'info', 'Step 1', '{\"train_loss\": 1.0, \"learning_rate\": 0.1}', 0)", []).unwrap();
            c.execute("INSERT INTO events (job_id, level, message, data, created_at) VALUES ('old', 'info', 'Checkpoint', '{\"train_loss\": 1.0}', 0)", []).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let status = |id: &str| store.job(id).unwrap().unwrap().status;
        assert_eq!((status("old"), status("racer"), status("done")), (JobStatus::Running, JobStatus::Cancelled, JobStatus::Succeeded));
        let kinds: Vec<EventKind> = store.events("old", None, 10).unwrap().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Message, EventKind::Metrics], "newest first: the checkpoint, then the step");
    }

    #[test]
    fn pairs_survive_reopening_and_duplicates_are_skipped() {
        for (store, location, dir) in stores() {
            let row = adapter("x", Scope::Tune);
            let created = store.insert_or_get_adapter(&row, &serde_json::json!({}), NewFeedback::default(), |dir| std::fs::create_dir_all(dir)).unwrap();
            assert!(matches!(created, Adoption::Stored { created: true, .. }));
            let first = store.insert_pairs("x", &[pair("a"), pair("b")]).unwrap();
            assert_eq!((first.stored, first.duplicates), (2, 0));
            let second = store.insert_pairs("x", &[pair("b"), pair("c")]).unwrap();
            assert_eq!((second.stored, second.duplicates, second.pairs_since_training), (1, 1, 3));
            drop(store);
            let store = Store::open_at(&location, dir.path()).unwrap();
            let pairs = store.pairs("x", 0, 10).unwrap();
            assert_eq!(pairs.iter().map(|p| p.conversation.clone()).collect::<Vec<_>>(), vec![pair("a"), pair("b"), pair("c")], "{location}");
            assert_eq!(store.adapter("x").unwrap().unwrap().pairs_since_training, 3);
            assert_eq!(store.delete_pairs("x", Some(&[pairs[0].id])).unwrap(), 1);
            assert_eq!(store.count_pairs("x").unwrap(), 2);
        }
    }

    #[test]
    fn a_first_upload_creates_the_adapter_once_and_a_failed_create_leaves_nothing() {
        for (store, location, _dir) in stores() {
            let row = |created_by| adapter("new", created_by);
            let refused = store.insert_or_get_adapter(&row(Scope::Tune), &serde_json::json!({}), NewFeedback::pairs(&[pair("a")]), |v0| {
                std::fs::create_dir_all(v0)?;
                Err(std::io::Error::other("disk full"))
            });
            assert!(refused.is_err());
            assert!(store.adapter("new").unwrap().is_none(), "nothing recorded");
            assert!(!store.version_dir("new", 0).parent().unwrap().exists(), "nothing left on disk");
            assert_eq!(store.count_pairs("new").unwrap(), 0);

            let place = |v0: &Path| std::fs::create_dir_all(v0);
            let first = store.insert_or_get_adapter(&row(Scope::Tune), &serde_json::json!({}), NewFeedback::pairs(&[pair("a")]), place).unwrap();
            assert!(matches!(first, Adoption::Stored { created: true, inserted: Inserted { stored: 1, .. } }));
            let second = store.insert_or_get_adapter(&row(Scope::Tune), &serde_json::json!({}), NewFeedback::pairs(&[pair("b")]), |_| panic!("created twice")).unwrap();
            assert!(matches!(second, Adoption::Stored { created: false, inserted: Inserted { stored: 1, pairs_since_training: 2, .. } }));
            let other = store.insert_or_get_adapter(&row(Scope::Inference), &serde_json::json!({}), NewFeedback::pairs(&[pair("c")]), |_| panic!("created twice")).unwrap();
            assert!(matches!(other, Adoption::Refused(AdapterRow { created_by: Scope::Tune, .. })));
            assert_eq!(store.count_pairs("new").unwrap(), 2, "{location}: a refused upload stores nothing");
        }
    }
}
