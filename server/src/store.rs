//! Durable state of online tuning, in one embedded SQLite database (WAL, `synchronous=FULL`):
//! feedback pairs, uploaded files, fine-tuning jobs and their events and checkpoints, and every
//! adapter version. A write returns only after its transaction commits, so whatever the API
//! acknowledged survives a crash.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::access::Scope;
use crate::dataset::{content_hash, Conversation};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The database refused a second active job for an adapter.
    #[error("`{adapter}` already has an active job: {job}")]
    ActiveJob { adapter: String, job: String },
    #[error("the database at {path} has schema version {found}, newer than this build's {known}")]
    TooNew { path: PathBuf, found: i64, known: i64 },
}

/// Where files wait, under the store's root, for the transaction that records them.
const STAGING_DIR: &str = "staging";

/// The database's file name under the store's root.
const DATABASE_FILE: &str = "tessera.sqlite3";

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: online tuning.
    "CREATE TABLE adapters (
        name TEXT PRIMARY KEY,
        rank INTEGER NOT NULL,
        alpha REAL NOT NULL,
        targets TEXT NOT NULL,
        version INTEGER NOT NULL DEFAULT 0,
        pairs_since_training INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE pairs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        adapter TEXT NOT NULL,
        hash TEXT NOT NULL,
        conversation TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (adapter, hash)
     );
     CREATE TABLE versions (
        adapter TEXT NOT NULL,
        version INTEGER NOT NULL,
        path TEXT NOT NULL,
        job_id TEXT,
        metrics TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (adapter, version)
     );
     CREATE TABLE files (
        id TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        records INTEGER NOT NULL,
        content BLOB NOT NULL,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        adapter TEXT NOT NULL,
        model TEXT NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL,
        fine_tuned_model TEXT,
        error TEXT,
        trained_tokens INTEGER,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
     );
     CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        step INTEGER NOT NULL,
        path TEXT NOT NULL,
        metrics TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );
     CREATE INDEX pairs_by_adapter ON pairs (adapter, id);
     CREATE INDEX events_by_job ON events (job_id, id);",
    // 2: the job state machine in the schema. A status outside it is refused, and at most one
    // job per adapter may be active: the database settles races between requests. Earlier
    // databases may hold two active jobs of one adapter; all but the oldest are cancelled.
    "UPDATE jobs SET status = 'cancelled', error = 'another job of this adapter was already active', finished_at = CAST(strftime('%s') AS INTEGER)
        WHERE status IN ('validating_files', 'queued', 'running')
          AND rowid NOT IN (SELECT MIN(rowid) FROM jobs WHERE status IN ('validating_files', 'queued', 'running') GROUP BY adapter);
     CREATE TABLE jobs_checked (
        id TEXT PRIMARY KEY,
        adapter TEXT NOT NULL,
        model TEXT NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
        fine_tuned_model TEXT,
        error TEXT,
        trained_tokens INTEGER,
        created_at INTEGER NOT NULL,
        finished_at INTEGER
     );
     INSERT INTO jobs_checked SELECT id, adapter, model, spec, status, fine_tuned_model, error, trained_tokens, created_at, finished_at FROM jobs ORDER BY rowid;
     DROP TABLE jobs;
     ALTER TABLE jobs_checked RENAME TO jobs;
     CREATE UNIQUE INDEX one_active_job_per_adapter ON jobs (adapter) WHERE status IN ('validating_files', 'queued', 'running');
     ALTER TABLE events ADD COLUMN kind TEXT NOT NULL DEFAULT 'message' CHECK (kind IN ('message', 'metrics'));
     UPDATE events SET kind = 'metrics' WHERE json_extract(data, '$.learning_rate') IS NOT NULL;",
    // 3: who created each adapter and job, and the adapters the admin opened to tuning. What
    // came before scopes counts as the admin's.
    "ALTER TABLE adapters ADD COLUMN created_by TEXT NOT NULL DEFAULT 'admin' CHECK (created_by IN ('inference', 'tune', 'admin'));
     ALTER TABLE adapters ADD COLUMN open_to_tuning INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE jobs ADD COLUMN created_by TEXT NOT NULL DEFAULT 'admin' CHECK (created_by IN ('inference', 'tune', 'admin'));",
];

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

impl rusqlite::types::ToSql for JobStatus {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for JobStatus {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        let text = value.as_str()?;
        JobStatus::parse(text).ok_or_else(|| rusqlite::types::FromSqlError::Other(format!("unknown job status `{text}`").into()))
    }
}

pub fn unix_time() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

pub struct Store {
    connection: Mutex<Connection>,
    /// `$TESSERA_HOME/tuning`: the database, adapter versions and job checkpoints.
    root: PathBuf,
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

/// What an upload did: new pairs stored, duplicates skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inserted {
    pub stored: usize,
    pub duplicates: usize,
    pub pairs_since_training: usize,
}

/// Stores the pairs of `conversations` not already held for `adapter` (by content hash) and
/// counts them towards its next job, inside the caller's transaction.
fn insert_pairs_in(tx: &rusqlite::Transaction, adapter: &str, conversations: &[Conversation]) -> Result<Inserted, StoreError> {
    let now = unix_time();
    let mut stored = 0;
    {
        let mut insert = tx.prepare("INSERT OR IGNORE INTO pairs (adapter, hash, conversation, created_at) VALUES (?1, ?2, ?3, ?4)")?;
        for conversation in conversations {
            stored += insert.execute(params![adapter, content_hash(conversation), serde_json::to_string(conversation)?, now])?;
        }
    }
    tx.execute(
        "UPDATE adapters SET pairs_since_training = pairs_since_training + ?2 WHERE name = ?1",
        params![adapter, stored as i64],
    )?;
    let pairs_since_training: i64 = tx.query_row("SELECT pairs_since_training FROM adapters WHERE name = ?1", [adapter], |r| r.get(0))?;
    Ok(Inserted {
        stored,
        duplicates: conversations.len() - stored,
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

/// The id of `adapter`'s active job, if any.
fn active_job_in(c: &Connection, adapter: &str) -> rusqlite::Result<Option<String>> {
    c.query_row(
        "SELECT id FROM jobs WHERE adapter = ?1 AND status IN ('validating_files', 'queued', 'running')",
        [adapter],
        |r| r.get(0),
    )
    .optional()
}

fn job_from_row(row: &rusqlite::Row) -> rusqlite::Result<(JobRow, String)> {
    Ok((
        JobRow {
            id: row.get(0)?,
            adapter: row.get(1)?,
            model: row.get(2)?,
            spec: serde_json::Value::Null,
            status: row.get(4)?,
            fine_tuned_model: row.get(5)?,
            error: row.get(6)?,
            trained_tokens: row.get::<_, Option<i64>>(7)?.map(|t| t as u64),
            created_at: row.get(8)?,
            finished_at: row.get(9)?,
            created_by: row.get(10)?,
        },
        row.get::<_, String>(3)?,
    ))
}

const ADAPTER_COLUMNS: &str = "name, rank, alpha, targets, version, pairs_since_training, created_by, open_to_tuning";

const JOB_COLUMNS: &str = "id, adapter, model, spec, status, fine_tuned_model, error, trained_tokens, created_at, finished_at, created_by";

impl Store {
    /// Opens (creating if needed) the store under `root` and brings its schema up to date.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|source| StoreError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let path = root.join(DATABASE_FILE);
        let mut connection = Connection::open(&path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(std::time::Duration::from_secs(10))?;
        let version: i64 = connection.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::TooNew { path, found: version, known });
        }
        for (i, migration) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = connection.transaction()?;
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "store schema migrated");
        }
        // Staged files of a create that was interrupted were never recorded: nothing uses them.
        let _ = std::fs::remove_dir_all(root.join(STAGING_DIR));
        Ok(Self {
            connection: Mutex::new(connection),
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where version `version` of `adapter` lives (a PEFT folder).
    pub fn version_dir(&self, adapter: &str, version: u32) -> PathBuf {
        self.root.join("adapters").join(adapter).join(format!("v{version}"))
    }

    /// A fresh folder name for files written before the transaction that records them.
    pub fn staging_dir(&self) -> PathBuf {
        self.root.join(STAGING_DIR).join(format!("{:016x}", rand::random::<u64>()))
    }

    pub fn job_dir(&self, job: &str) -> PathBuf {
        self.root.join("jobs").join(job)
    }

    fn with<R>(&self, f: impl FnOnce(&mut Connection) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let mut connection = self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut connection)
    }

    fn adapter_from_row(r: &rusqlite::Row) -> rusqlite::Result<AdapterRow> {
        Ok(AdapterRow {
            name: r.get(0)?,
            rank: r.get::<_, i64>(1)? as usize,
            alpha: r.get::<_, f64>(2)? as f32,
            targets: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
            version: r.get::<_, i64>(4)? as u32,
            pairs_since_training: r.get::<_, i64>(5)? as usize,
            created_by: r.get(6)?,
            open_to_tuning: r.get(7)?,
        })
    }

    pub fn adapter(&self, name: &str) -> Result<Option<AdapterRow>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(&format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE name = ?1"), [name], Self::adapter_from_row)
                .optional()?)
        })
    }

    pub fn adapters(&self) -> Result<Vec<AdapterRow>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(&format!("SELECT {ADAPTER_COLUMNS} FROM adapters ORDER BY name"))?;
            let rows = statement.query_map([], Self::adapter_from_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Stores `conversations` for the adapter named `new.name`, creating it at version 0 from
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
        conversations: &[Conversation],
        place_files: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Adoption, StoreError> {
        let v0 = self.version_dir(&new.name, 0);
        let mut placed = false;
        let outcome = self.with(|c| {
            let tx = c.transaction()?;
            let created = tx.execute(
                "INSERT INTO adapters (name, rank, alpha, targets, version, pairs_since_training, created_at, created_by, open_to_tuning)
                 VALUES (?1, ?2, ?3, ?4, 0, 0, ?5, ?6, ?7) ON CONFLICT (name) DO NOTHING",
                params![new.name, new.rank as i64, new.alpha as f64, serde_json::to_string(&new.targets)?, unix_time(), new.created_by, new.open_to_tuning],
            )? == 1;
            if created {
                tx.execute(
                    "INSERT INTO versions (adapter, version, path, job_id, metrics, created_at) VALUES (?1, 0, ?2, NULL, ?3, ?4)",
                    params![new.name, v0.display().to_string(), v0_metrics.to_string(), unix_time()],
                )?;
                placed = true;
                place_files(&v0).map_err(|source| StoreError::Io { path: v0.clone(), source })?;
            }
            let row = tx.query_row(&format!("SELECT {ADAPTER_COLUMNS} FROM adapters WHERE name = ?1"), [&new.name], Self::adapter_from_row)?;
            if !row.may_be_tuned_by(new.created_by) {
                return Ok(Adoption::Refused(row));
            }
            let inserted = insert_pairs_in(&tx, &new.name, conversations)?;
            tx.commit()?;
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
        self.with(|c| {
            let tx = c.transaction()?;
            let inserted = insert_pairs_in(&tx, adapter, conversations)?;
            tx.commit()?;
            Ok(inserted)
        })
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
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT id, hash, conversation, created_at FROM pairs
                 WHERE adapter = ?1 AND id > ?2 AND id <= ?3 ORDER BY id LIMIT ?4",
            )?;
            let rows = statement
                .query_map(params![adapter, after, through, limit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, i64>(3)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, hash, conversation, created_at)| {
                    Ok(StoredPair {
                        id,
                        hash,
                        conversation: serde_json::from_str(&conversation)?,
                        created_at,
                    })
                })
                .collect()
        })
    }

    /// The id of `adapter`'s newest pair (0 when it has none).
    pub fn last_pair_id(&self, adapter: &str) -> Result<i64, StoreError> {
        self.with(|c| {
            Ok(c.query_row("SELECT COALESCE(MAX(id), 0) FROM pairs WHERE adapter = ?1", [adapter], |r| r.get(0))?)
        })
    }

    pub fn count_pairs(&self, adapter: &str) -> Result<usize, StoreError> {
        self.with(|c| Ok(c.query_row("SELECT COUNT(*) FROM pairs WHERE adapter = ?1", [adapter], |r| r.get::<_, i64>(0))? as usize))
    }

    /// Deletes the pairs with the given ids (all of the adapter's when `ids` is None).
    pub fn delete_pairs(&self, adapter: &str, ids: Option<&[i64]>) -> Result<usize, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let deleted = match ids {
                None => tx.execute("DELETE FROM pairs WHERE adapter = ?1", [adapter])?,
                Some(ids) => {
                    let mut n = 0;
                    for id in ids {
                        n += tx.execute("DELETE FROM pairs WHERE adapter = ?1 AND id = ?2", params![adapter, id])?;
                    }
                    n
                }
            };
            tx.commit()?;
            Ok(deleted)
        })
    }

    pub fn versions(&self, adapter: &str) -> Result<Vec<VersionRow>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT version, path, job_id, metrics, created_at FROM versions WHERE adapter = ?1 ORDER BY version",
            )?;
            let rows = statement
                .query_map([adapter], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get::<_, String>(3)?, r.get(4)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(version, path, job_id, metrics, created_at)| {
                    Ok(VersionRow {
                        version: version as u32,
                        path: PathBuf::from(path),
                        job_id,
                        metrics: serde_json::from_str(&metrics)?,
                        created_at,
                    })
                })
                .collect()
        })
    }

    /// Records a version whose files are written and makes it current.
    pub fn promote(&self, adapter: &str, version: u32, job_id: &str, metrics: &serde_json::Value) -> Result<(), StoreError> {
        let path = self.version_dir(adapter, version);
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO versions (adapter, version, path, job_id, metrics, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![adapter, version as i64, path.display().to_string(), job_id, metrics.to_string(), unix_time()],
            )?;
            tx.execute("UPDATE adapters SET version = ?2 WHERE name = ?1", params![adapter, version as i64])?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Makes an existing version current again.
    pub fn set_current_version(&self, adapter: &str, version: u32) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute("UPDATE adapters SET version = ?2 WHERE name = ?1", params![adapter, version as i64])?;
            Ok(())
        })
    }

    pub fn insert_file(&self, row: &FileRow, content: &[u8]) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO files (id, filename, purpose, bytes, records, content, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![row.id, row.filename, row.purpose, row.bytes as i64, row.records as i64, content, row.created_at],
            )?;
            Ok(())
        })
    }

    fn file_from_row(r: &rusqlite::Row) -> rusqlite::Result<FileRow> {
        Ok(FileRow {
            id: r.get(0)?,
            filename: r.get(1)?,
            purpose: r.get(2)?,
            bytes: r.get::<_, i64>(3)? as usize,
            records: r.get::<_, i64>(4)? as usize,
            created_at: r.get(5)?,
        })
    }

    pub fn file(&self, id: &str) -> Result<Option<FileRow>, StoreError> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT id, filename, purpose, bytes, records, created_at FROM files WHERE id = ?1",
                [id],
                Self::file_from_row,
            )
            .optional()?)
        })
    }

    pub fn file_content(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|c| Ok(c.query_row("SELECT content FROM files WHERE id = ?1", [id], |r| r.get(0)).optional()?))
    }

    pub fn files(&self) -> Result<Vec<FileRow>, StoreError> {
        self.with(|c| {
            let mut statement =
                c.prepare("SELECT id, filename, purpose, bytes, records, created_at FROM files ORDER BY created_at DESC, id")?;
            let rows = statement.query_map([], Self::file_from_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Records a new job, and with `reset_pairs` restarts its adapter's count of pairs since
    /// training, in one transaction. A second active job of the same adapter is refused by the
    /// database (`ActiveJob`, naming the one that holds it).
    pub fn insert_job(&self, job: &JobRow, reset_pairs: bool) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let inserted = tx.execute(
                "INSERT INTO jobs (id, adapter, model, spec, status, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![job.id, job.adapter, job.model, job.spec.to_string(), job.status, job.created_at, job.created_by],
            );
            match inserted {
                Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                    let active = active_job_in(&tx, &job.adapter)?;
                    return Err(match active {
                        Some(active) => StoreError::ActiveJob { adapter: job.adapter.clone(), job: active },
                        None => StoreError::Sql(rusqlite::Error::SqliteFailure(e, None)),
                    });
                }
                other => other?,
            };
            if reset_pairs {
                tx.execute("UPDATE adapters SET pairs_since_training = 0 WHERE name = ?1", [&job.adapter])?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Opens an adapter to tuning by every tuning scope, or closes it to all but its creator's.
    pub fn set_open_to_tuning(&self, adapter: &str, open: bool) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("UPDATE adapters SET open_to_tuning = ?2 WHERE name = ?1", params![adapter, open])? > 0))
    }

    /// The adapter's active (queued or running) job, if any.
    pub fn active_job(&self, adapter: &str) -> Result<Option<String>, StoreError> {
        self.with(|c| Ok(active_job_in(c, adapter)?))
    }

    fn parse_jobs(rows: Vec<(JobRow, String)>) -> Result<Vec<JobRow>, StoreError> {
        rows.into_iter()
            .map(|(mut job, spec)| {
                job.spec = serde_json::from_str(&spec)?;
                Ok(job)
            })
            .collect()
    }

    pub fn job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = self.with(|c| {
            Ok(c.query_row(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"), [id], job_from_row)
                .optional()?)
        })?;
        Ok(Self::parse_jobs(row.into_iter().collect())?.pop())
    }

    /// Jobs, newest first, optionally only those of one adapter.
    pub fn jobs(&self, adapter: Option<&str>) -> Result<Vec<JobRow>, StoreError> {
        let rows = self.with(|c| {
            let mut statement = c.prepare(&format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE ?1 IS NULL OR adapter = ?1 ORDER BY created_at DESC, rowid DESC"
            ))?;
            let rows = statement.query_map([adapter], job_from_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })?;
        Self::parse_jobs(rows)
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
        self.with(|c| {
            let changed = c.execute(
                "UPDATE jobs SET status = ?2, fine_tuned_model = COALESCE(?3, fine_tuned_model), error = COALESCE(?4, error),
                    trained_tokens = COALESCE(?5, trained_tokens), finished_at = ?6
                 WHERE id = ?1 AND status NOT IN ('succeeded', 'failed', 'cancelled')",
                params![id, status, fine_tuned_model, error, trained_tokens.map(|t| t as i64), finished],
            )?;
            Ok(changed > 0)
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
        self.with(|c| {
            c.execute(
                "INSERT INTO events (job_id, level, kind, message, data, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![job, level, kind.as_str(), message, data.map(|d| d.to_string()), unix_time()],
            )?;
            Ok(())
        })
    }

    /// Events of a job, newest first, before the event id `before` if given.
    pub fn events(&self, job: &str, before: Option<i64>, limit: usize) -> Result<Vec<EventRow>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT id, level, message, data, created_at, kind FROM events WHERE job_id = ?1 AND (?2 IS NULL OR id < ?2) ORDER BY id DESC LIMIT ?3",
            )?;
            let rows = statement
                .query_map(params![job, before, limit as i64], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, Option<String>>(3)?, r.get(4)?, r.get::<_, String>(5)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, level, message, data, created_at, kind)| {
                    Ok(EventRow {
                        id,
                        level,
                        kind: if kind == "metrics" { EventKind::Metrics } else { EventKind::Message },
                        message,
                        data: data.map(|d| serde_json::from_str(&d)).transpose()?,
                        created_at,
                    })
                })
                .collect()
        })
    }

    pub fn add_checkpoint(&self, job: &str, step: usize, path: &Path, metrics: &serde_json::Value) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO checkpoints (job_id, step, path, metrics, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![job, step as i64, path.display().to_string(), metrics.to_string(), unix_time()],
            )?;
            Ok(())
        })
    }

    /// Checkpoints of a job, newest first.
    pub fn checkpoints(&self, job: &str) -> Result<Vec<CheckpointRow>, StoreError> {
        self.with(|c| {
            let mut statement = c.prepare(
                "SELECT id, job_id, step, path, metrics, created_at FROM checkpoints WHERE job_id = ?1 ORDER BY step DESC",
            )?;
            let rows = statement
                .query_map([job], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?, r.get::<_, String>(4)?, r.get(5)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, job_id, step, path, metrics, created_at)| {
                    Ok(CheckpointRow {
                        id,
                        job_id,
                        step: step as usize,
                        path: PathBuf::from(path),
                        metrics: serde_json::from_str(&metrics)?,
                        created_at,
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Message;

    fn pair(q: &str) -> Conversation {
        Conversation {
            messages: vec![
                Message { role: "user".into(), content: q.into() },
                Message { role: "assistant".into(), content: "a".into() },
            ],
        }
    }

    fn job(id: &str, adapter: &str, status: JobStatus) -> JobRow {
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

    #[test]
    fn the_database_holds_one_active_job_per_adapter_and_only_known_states() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.insert_job(&job("j1", "x", JobStatus::Queued), false).unwrap();
        match store.insert_job(&job("j2", "x", JobStatus::ValidatingFiles), false) {
            Err(StoreError::ActiveJob { adapter, job }) => assert_eq!((adapter.as_str(), job.as_str()), ("x", "j1")),
            other => panic!("a second active job was not refused: {other:?}"),
        }
        store.insert_job(&job("j3", "y", JobStatus::Queued), false).unwrap();
        assert!(store.set_job_status("j1", JobStatus::Cancelled, None, None, None).unwrap());
        store.insert_job(&job("j2", "x", JobStatus::Queued), false).unwrap();
        let refused = store.with(|c| Ok(c.execute("UPDATE jobs SET status = 'paused' WHERE id = 'j2'", [])?));
        assert!(refused.is_err(), "a status outside the state machine is refused");
    }

    #[test]
    fn migrating_an_old_database_keeps_one_active_job_and_types_its_events() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            for (id, status) in [("old", "running"), ("racer", "queued"), ("done", "succeeded")] {
                c.execute(
                    "INSERT INTO jobs (id, adapter, model, spec, status, created_at) VALUES (?1, 'x', 'm', '{}', ?2, 0)",
                    params![id, status],
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
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let row = AdapterRow {
                name: "x".into(),
                rank: 16,
                alpha: 32.0,
                targets: vec!["q_proj".into()],
                version: 0,
                pairs_since_training: 0,
                created_by: Scope::Tune,
                open_to_tuning: false,
            };
            let created = store.insert_or_get_adapter(&row, &serde_json::json!({}), &[], |dir| std::fs::create_dir_all(dir)).unwrap();
            assert!(matches!(created, Adoption::Stored { created: true, .. }));
            let first = store.insert_pairs("x", &[pair("a"), pair("b")]).unwrap();
            assert_eq!((first.stored, first.duplicates), (2, 0));
            let second = store.insert_pairs("x", &[pair("b"), pair("c")]).unwrap();
            assert_eq!((second.stored, second.duplicates, second.pairs_since_training), (1, 1, 3));
        }
        let store = Store::open(dir.path()).unwrap();
        let pairs = store.pairs("x", 0, 10).unwrap();
        assert_eq!(pairs.iter().map(|p| p.conversation.clone()).collect::<Vec<_>>(), vec![pair("a"), pair("b"), pair("c")]);
        assert_eq!(store.adapter("x").unwrap().unwrap().pairs_since_training, 3);
        assert_eq!(store.delete_pairs("x", Some(&[pairs[0].id])).unwrap(), 1);
        assert_eq!(store.count_pairs("x").unwrap(), 2);
    }

    #[test]
    fn a_first_upload_creates_the_adapter_once_and_a_failed_create_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let row = |created_by| AdapterRow {
            name: "new".into(),
            rank: 4,
            alpha: 8.0,
            targets: vec!["q_proj".into()],
            version: 0,
            pairs_since_training: 0,
            created_by,
            open_to_tuning: false,
        };
        let refused = store.insert_or_get_adapter(&row(Scope::Tune), &serde_json::json!({}), &[pair("a")], |v0| {
            std::fs::create_dir_all(v0)?;
            Err(std::io::Error::other("disk full"))
        });
        assert!(refused.is_err());
        assert!(store.adapter("new").unwrap().is_none(), "nothing recorded");
        assert!(!store.version_dir("new", 0).parent().unwrap().exists(), "nothing left on disk");
        assert_eq!(store.count_pairs("new").unwrap(), 0);

        let place = |v0: &Path| std::fs::create_dir_all(v0);
        let first = store.insert_or_get_adapter(&row(Scope::Tune), &serde_json::json!({}), &[pair("a")], place).unwrap();
        assert!(matches!(first, Adoption::Stored { created: true, inserted: Inserted { stored: 1, .. } }));
        let second = store.insert_or_get_adapter(&row(Scope::Tune), &serde_json::json!({}), &[pair("b")], |_| panic!("created twice")).unwrap();
        assert!(matches!(second, Adoption::Stored { created: false, inserted: Inserted { stored: 1, pairs_since_training: 2, .. } }));
        let other = store.insert_or_get_adapter(&row(Scope::Inference), &serde_json::json!({}), &[pair("c")], |_| panic!("created twice")).unwrap();
        assert!(matches!(other, Adoption::Refused(AdapterRow { created_by: Scope::Tune, .. })));
        assert_eq!(store.count_pairs("new").unwrap(), 2, "a refused upload stores nothing");
    }
}
