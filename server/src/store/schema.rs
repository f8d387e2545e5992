//! The store's schema, as migrations per database. Both databases end at the same tables and
//! columns after the same number of migrations, so a store moves between them row for row
//! (`tessera state export | tessera state import`).

use super::database::{DbError, Dialect, Session};

/// SQLite's migrations, applied in order; `PRAGMA user_version` records how many ran.
pub const SQLITE: &[&str] = &[
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
    // 4: trainers claim jobs. A claim names the trainer and lasts until `lease_until` (unix
    // seconds) unless its heartbeat renews it; an expired claim may be taken by another trainer.
    "ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
     ALTER TABLE jobs ADD COLUMN lease_until INTEGER;",
    // 5: an uploaded file's content may live in the object store (`files/<id>`) rather than
    // in its row, which then holds no bytes.
    "ALTER TABLE files ADD COLUMN stored TEXT NOT NULL DEFAULT 'database' CHECK (stored IN ('database', 'blobs'));",
    // 6: preference feedback, beside the pairs: a conversation ending with the user's turn
    // and the answer preferred to another, deduplicated by content hash per adapter.
    "CREATE TABLE preferences (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        adapter TEXT NOT NULL,
        hash TEXT NOT NULL,
        preference TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        UNIQUE (adapter, hash)
     );
     CREATE INDEX preferences_by_adapter ON preferences (adapter, id);",
    // 7: stored Responses (`POST /v1/responses` unless `store: false`): the response object as
    // served, and the conversation a later `previous_response_id` continues (its input items,
    // those of the responses before it, and its output), both JSON.
    "CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        conversation TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );",
    // 8: batches of requests over an uploaded file. A batch is claimed by one server at a time,
    // as jobs are; each line's result is a row of its own the moment it finishes, so a resumed
    // batch runs only the lines without one and never records a line twice.
    "CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        metadata TEXT,
        status TEXT NOT NULL CHECK (status IN ('validating', 'in_progress', 'finalizing', 'completed', 'failed', 'cancelling', 'cancelled')),
        total INTEGER NOT NULL,
        output_file_id TEXT,
        error_file_id TEXT,
        errors TEXT,
        created_by TEXT NOT NULL CHECK (created_by IN ('inference', 'tune', 'admin')),
        created_at INTEGER NOT NULL,
        in_progress_at INTEGER,
        finalizing_at INTEGER,
        completed_at INTEGER,
        failed_at INTEGER,
        cancelling_at INTEGER,
        cancelled_at INTEGER,
        claimed_by TEXT,
        lease_until INTEGER
     );
     CREATE TABLE batch_lines (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        custom_id TEXT,
        succeeded INTEGER NOT NULL,
        result TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (batch_id, line)
     );
     CREATE INDEX batches_by_age ON batches (created_at, id);",
];


/// PostgreSQL's migrations, numbered as SQLite's. PostgreSQL stores began at SQLite's third
/// schema, so the first migration creates it whole and the next two have nothing left to do.
/// `rowid` is a real column here: the store orders jobs of the same second by it, as SQLite
/// orders by its implicit one.
pub const POSTGRES: &[&str] = &[
    "CREATE TABLE adapters (
        name TEXT PRIMARY KEY,
        rank BIGINT NOT NULL,
        alpha DOUBLE PRECISION NOT NULL,
        targets TEXT NOT NULL,
        version BIGINT NOT NULL DEFAULT 0,
        pairs_since_training BIGINT NOT NULL DEFAULT 0,
        created_at BIGINT NOT NULL,
        created_by TEXT NOT NULL DEFAULT 'admin' CHECK (created_by IN ('inference', 'tune', 'admin')),
        open_to_tuning BIGINT NOT NULL DEFAULT 0
     );
     CREATE TABLE pairs (
        id BIGSERIAL PRIMARY KEY,
        adapter TEXT NOT NULL,
        hash TEXT NOT NULL,
        conversation TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        UNIQUE (adapter, hash)
     );
     CREATE TABLE versions (
        adapter TEXT NOT NULL,
        version BIGINT NOT NULL,
        path TEXT NOT NULL,
        job_id TEXT,
        metrics TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (adapter, version)
     );
     CREATE TABLE files (
        id TEXT PRIMARY KEY,
        filename TEXT NOT NULL,
        purpose TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        records BIGINT NOT NULL,
        content BYTEA NOT NULL,
        created_at BIGINT NOT NULL
     );
     CREATE TABLE jobs (
        rowid BIGSERIAL UNIQUE,
        id TEXT PRIMARY KEY,
        adapter TEXT NOT NULL,
        model TEXT NOT NULL,
        spec TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('validating_files', 'queued', 'running', 'succeeded', 'failed', 'cancelled')),
        fine_tuned_model TEXT,
        error TEXT,
        trained_tokens BIGINT,
        created_at BIGINT NOT NULL,
        finished_at BIGINT,
        created_by TEXT NOT NULL DEFAULT 'admin' CHECK (created_by IN ('inference', 'tune', 'admin'))
     );
     CREATE UNIQUE INDEX one_active_job_per_adapter ON jobs (adapter) WHERE status IN ('validating_files', 'queued', 'running');
     CREATE TABLE events (
        id BIGSERIAL PRIMARY KEY,
        job_id TEXT NOT NULL,
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT,
        created_at BIGINT NOT NULL,
        kind TEXT NOT NULL DEFAULT 'message' CHECK (kind IN ('message', 'metrics'))
     );
     CREATE TABLE checkpoints (
        id BIGSERIAL PRIMARY KEY,
        job_id TEXT NOT NULL,
        step BIGINT NOT NULL,
        path TEXT NOT NULL,
        metrics TEXT NOT NULL,
        created_at BIGINT NOT NULL
     );
     CREATE INDEX pairs_by_adapter ON pairs (adapter, id);
     CREATE INDEX events_by_job ON events (job_id, id);",
    "",
    "",
    "ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
     ALTER TABLE jobs ADD COLUMN lease_until BIGINT;",
    "ALTER TABLE files ADD COLUMN stored TEXT NOT NULL DEFAULT 'database' CHECK (stored IN ('database', 'blobs'));",
    "CREATE TABLE preferences (
        id BIGSERIAL PRIMARY KEY,
        adapter TEXT NOT NULL,
        hash TEXT NOT NULL,
        preference TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        UNIQUE (adapter, hash)
     );
     CREATE INDEX preferences_by_adapter ON preferences (adapter, id);",
    "CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        body TEXT NOT NULL,
        conversation TEXT NOT NULL,
        created_at BIGINT NOT NULL
     );",
    "CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        endpoint TEXT NOT NULL,
        input_file_id TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        metadata TEXT,
        status TEXT NOT NULL CHECK (status IN ('validating', 'in_progress', 'finalizing', 'completed', 'failed', 'cancelling', 'cancelled')),
        total BIGINT NOT NULL,
        output_file_id TEXT,
        error_file_id TEXT,
        errors TEXT,
        created_by TEXT NOT NULL CHECK (created_by IN ('inference', 'tune', 'admin')),
        created_at BIGINT NOT NULL,
        in_progress_at BIGINT,
        finalizing_at BIGINT,
        completed_at BIGINT,
        failed_at BIGINT,
        cancelling_at BIGINT,
        cancelled_at BIGINT,
        claimed_by TEXT,
        lease_until BIGINT
     );
     CREATE TABLE batch_lines (
        batch_id TEXT NOT NULL,
        line BIGINT NOT NULL,
        custom_id TEXT,
        succeeded BIGINT NOT NULL,
        result TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (batch_id, line)
     );
     CREATE INDEX batches_by_age ON batches (created_at, id);",
];

/// The tables and columns both schemas share, in an order where no row refers to a later
/// table: what `state export` writes and `state import` reads.
pub const TABLES: &[(&str, &str)] = &[
    ("adapters", "name, rank, alpha, targets, version, pairs_since_training, created_at, created_by, open_to_tuning"),
    ("pairs", "id, adapter, hash, conversation, created_at"),
    ("preferences", "id, adapter, hash, preference, created_at"),
    ("versions", "adapter, version, path, job_id, metrics, created_at"),
    ("files", "id, filename, purpose, bytes, records, content, created_at, stored"),
    ("jobs", "id, adapter, model, spec, status, fine_tuned_model, error, trained_tokens, created_at, finished_at, created_by, claimed_by, lease_until"),
    ("events", "id, job_id, level, message, data, created_at, kind"),
    ("checkpoints", "id, job_id, step, path, metrics, created_at"),
    ("responses", "id, body, conversation, created_at"),
    ("batches", "id, endpoint, input_file_id, completion_window, metadata, status, total, output_file_id, error_file_id, errors, created_by, created_at, in_progress_at, finalizing_at, completed_at, failed_at, cancelling_at, cancelled_at, claimed_by, lease_until"),
    ("batch_lines", "batch_id, line, custom_id, succeeded, result, created_at"),
];

/// The tables whose `id` a sequence numbers, which an import must move past the ids it wrote.
pub const SERIAL_TABLES: &[&str] = &["pairs", "preferences", "events", "checkpoints"];

pub fn migrations(dialect: Dialect) -> &'static [&'static str] {
    match dialect {
        Dialect::Sqlite => SQLITE,
        Dialect::Postgres => POSTGRES,
    }
}

/// The number of migrations this build knows.
pub fn latest() -> i64 {
    SQLITE.len() as i64
}

/// An arbitrary constant: the advisory lock that serialises servers migrating one database.
const MIGRATION_LOCK: i64 = 0x7465_7373_6572_61;

/// The schema version recorded in the database.
pub fn version(session: &mut dyn Session, dialect: Dialect) -> Result<i64, DbError> {
    match dialect {
        Dialect::Sqlite => session.query_one("PRAGMA user_version", &[])?.int(0),
        Dialect::Postgres => {
            session.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
            Ok(session.query_opt("SELECT version FROM schema_version", &[])?.map(|r| r.int(0)).transpose()?.unwrap_or(0))
        }
    }
}

/// Applies the migrations after `from` in this transaction. On PostgreSQL it first takes a
/// transaction-scoped lock, so two servers starting together migrate one after the other.
pub fn migrate(session: &mut dyn Session, dialect: Dialect) -> Result<(i64, i64), DbError> {
    if dialect == Dialect::Postgres {
        session.execute("SELECT pg_advisory_xact_lock(?1)", crate::sql_params![MIGRATION_LOCK])?;
    }
    let from = version(session, dialect)?;
    for (i, migration) in migrations(dialect).iter().enumerate().skip(from.max(0) as usize) {
        if !migration.is_empty() {
            session.batch(migration)?;
        }
        tracing::info!(version = i + 1, "store schema migrated");
    }
    let to = from.max(latest());
    match dialect {
        Dialect::Sqlite => session.batch(&format!("PRAGMA user_version = {to}"))?,
        Dialect::Postgres => {
            session.execute("DELETE FROM schema_version", &[])?;
            session.execute("INSERT INTO schema_version (version) VALUES (?1)", crate::sql_params![to])?;
        }
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_databases_know_the_same_number_of_migrations() {
        assert_eq!(SQLITE.len(), POSTGRES.len());
    }
}
