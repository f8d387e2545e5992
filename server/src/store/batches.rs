//! Batches of requests over an uploaded file (`/v1/batches`): the batch's row, claimed by one
//! server at a time as jobs are, and a row per finished line. A line's row is written the
//! moment it finishes and at most once (its key is the batch and the line's number), so a batch
//! resumed after a crash or on another server runs only the lines without one.

use std::collections::HashSet;

use crate::access::Scope;
use crate::sql_params;

use super::database::Row;
use super::{unix_time, Store, StoreError, CLAIM_LEASE_SECS};

/// A batch's state: `validating → in_progress → finalizing → completed`, or `failed`, or
/// `cancelling → cancelled`; stored as OpenAI's names under a CHECK constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchStatus {
    Validating,
    InProgress,
    Finalizing,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    const ALL: [BatchStatus; 7] = [
        BatchStatus::Validating,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Failed,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Failed => "failed",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn has_ended(self) -> bool {
        matches!(self, BatchStatus::Completed | BatchStatus::Failed | BatchStatus::Cancelled)
    }

    /// The column that records when the batch entered this state (validating: `created_at`).
    fn timestamp_column(self) -> &'static str {
        match self {
            BatchStatus::Validating => "created_at",
            BatchStatus::InProgress => "in_progress_at",
            BatchStatus::Finalizing => "finalizing_at",
            BatchStatus::Completed => "completed_at",
            BatchStatus::Failed => "failed_at",
            BatchStatus::Cancelling => "cancelling_at",
            BatchStatus::Cancelled => "cancelled_at",
        }
    }
}

impl std::fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states a server still has work to do in: the ones a claim can take.
const UNFINISHED: &str = "('validating', 'in_progress', 'finalizing', 'cancelling')";

const BATCH_COLUMNS: &str = "id, endpoint, input_file_id, completion_window, metadata, status, total, output_file_id, error_file_id, errors, created_by, created_at, in_progress_at, finalizing_at, completed_at, failed_at, cancelling_at, cancelled_at";

/// When a batch entered each state after `validating` (unix seconds).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchTimes {
    pub in_progress_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    pub id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub metadata: Option<serde_json::Value>,
    pub status: BatchStatus,
    /// Lines in the input file.
    pub total: usize,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Why the batch as a whole failed (OpenAI's `errors.data`).
    pub errors: Option<serde_json::Value>,
    pub created_by: Scope,
    pub created_at: i64,
    pub times: BatchTimes,
}

/// One finished line: its line of the output file (`succeeded`) or of the error file.
#[derive(Debug, Clone, PartialEq)]
pub struct LineResult {
    /// The line's place in the input file, from 0.
    pub line: usize,
    pub custom_id: Option<String>,
    pub succeeded: bool,
    pub result: serde_json::Value,
}

/// A batch claimed by a server: it runs the batch while renewing the claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchClaim {
    pub batch: String,
    pub server: String,
}

fn batch_from_row(r: &Row) -> Result<BatchRow, StoreError> {
    let json = |text: Option<String>| text.map(|t| serde_json::from_str(&t)).transpose();
    let status = r.text(5)?;
    let created_by = r.text(10)?;
    Ok(BatchRow {
        id: r.text(0)?,
        endpoint: r.text(1)?,
        input_file_id: r.text(2)?,
        completion_window: r.text(3)?,
        metadata: json(r.opt_text(4)?)?,
        status: BatchStatus::parse(&status).ok_or(StoreError::Unknown { what: "batch status", value: status })?,
        total: r.int(6)? as usize,
        output_file_id: r.opt_text(7)?,
        error_file_id: r.opt_text(8)?,
        errors: json(r.opt_text(9)?)?,
        created_by: Scope::parse(&created_by).ok_or(StoreError::Unknown { what: "scope", value: created_by })?,
        created_at: r.int(11)?,
        times: BatchTimes {
            in_progress_at: r.opt_int(12)?,
            finalizing_at: r.opt_int(13)?,
            completed_at: r.opt_int(14)?,
            failed_at: r.opt_int(15)?,
            cancelling_at: r.opt_int(16)?,
            cancelled_at: r.opt_int(17)?,
        },
    })
}

impl Store {
    pub fn insert_batch(&self, batch: &BatchRow) -> Result<(), StoreError> {
        let metadata = batch.metadata.as_ref().map(|m| m.to_string());
        self.with(|s| {
            s.execute(
                "INSERT INTO batches (id, endpoint, input_file_id, completion_window, metadata, status, total, created_by, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                sql_params![&batch.id, &batch.endpoint, &batch.input_file_id, &batch.completion_window, metadata, batch.status.as_str(), batch.total as i64, batch.created_by.as_str(), batch.created_at],
            )?;
            Ok(())
        })
    }

    pub fn batch(&self, id: &str) -> Result<Option<BatchRow>, StoreError> {
        self.with(|s| s.query_opt(&format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1"), sql_params![id])?.as_ref().map(batch_from_row).transpose())
    }

    /// Up to `limit` batches, newest first, after the batch `after` in that order.
    pub fn batches(&self, after: Option<&str>, limit: usize) -> Result<Vec<BatchRow>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(|s| {
            s.query(
                &format!(
                    "SELECT {BATCH_COLUMNS} FROM batches
                     WHERE CAST(?1 AS TEXT) IS NULL
                        OR created_at < (SELECT created_at FROM batches WHERE id = ?1)
                        OR (created_at = (SELECT created_at FROM batches WHERE id = ?1) AND id < ?1)
                     ORDER BY created_at DESC, id DESC LIMIT ?2"
                ),
                sql_params![after, limit],
            )?
            .iter()
            .map(batch_from_row)
            .collect()
        })
    }

    /// Lines of the batch finished so far: (succeeded, failed).
    pub fn batch_progress(&self, id: &str) -> Result<(usize, usize), StoreError> {
        self.with(|s| {
            let row = s.query_one(
                "SELECT CAST(COALESCE(SUM(succeeded), 0) AS BIGINT), COUNT(*) FROM batch_lines WHERE batch_id = ?1",
                sql_params![id],
            )?;
            let (succeeded, all) = (row.int(0)? as usize, row.int(1)? as usize);
            Ok((succeeded, all - succeeded))
        })
    }

    /// Moves a batch to `status` (stamping when), if it is in one of `from`; false otherwise.
    pub fn set_batch_status(&self, id: &str, status: BatchStatus, from: &[BatchStatus]) -> Result<bool, StoreError> {
        let from = from.iter().map(|s| format!("'{}'", s.as_str())).collect::<Vec<_>>().join(", ");
        let column = status.timestamp_column();
        self.with(|s| {
            let changed = s.execute(
                &format!("UPDATE batches SET status = ?2, {column} = ?3 WHERE id = ?1 AND status IN ({from})"),
                sql_params![id, status.as_str(), unix_time()],
            )?;
            Ok(changed > 0)
        })
    }

    /// Ends a batch with its output and error files (or why it failed), unless it already ended.
    pub fn end_batch(&self, id: &str, status: BatchStatus, files: (Option<&str>, Option<&str>), errors: Option<&serde_json::Value>) -> Result<bool, StoreError> {
        let column = status.timestamp_column();
        self.with(|s| {
            let changed = s.execute(
                &format!(
                    "UPDATE batches SET status = ?2, {column} = ?3, output_file_id = ?4, error_file_id = ?5, errors = ?6, claimed_by = NULL, lease_until = NULL
                     WHERE id = ?1 AND status IN {UNFINISHED}"
                ),
                sql_params![id, status.as_str(), unix_time(), files.0, files.1, errors.map(|e| e.to_string())],
            )?;
            Ok(changed > 0)
        })
    }

    /// Claims for `server` the oldest unfinished batch no live server holds: unclaimed, or
    /// whose claim expired. On PostgreSQL concurrent claimers skip rows another is locking.
    pub fn claim_batch(&self, server: &str) -> Result<Option<BatchClaim>, StoreError> {
        let lock = self.db.dialect().skip_locked();
        let now = unix_time();
        self.with(|s| {
            let claimed = s.query_opt(
                &format!(
                    "UPDATE batches SET claimed_by = ?1, lease_until = ?2 WHERE id = (
                        SELECT id FROM batches WHERE status IN {UNFINISHED} AND (claimed_by IS NULL OR lease_until < ?3)
                        ORDER BY created_at, id LIMIT 1{lock})
                     RETURNING id"
                ),
                sql_params![server, now + CLAIM_LEASE_SECS, now],
            )?;
            Ok(claimed.map(|r| r.text(0)).transpose()?.map(|batch| BatchClaim { batch, server: server.to_string() }))
        })
    }

    /// Extends a claim and returns the batch's status now; `None` when the batch is no longer
    /// this server's (it ended, or the claim expired and another server took it).
    pub fn renew_batch_claim(&self, claim: &BatchClaim) -> Result<Option<BatchStatus>, StoreError> {
        self.with(|s| {
            let row = s.query_opt(
                &format!("UPDATE batches SET lease_until = ?3 WHERE id = ?1 AND claimed_by = ?2 AND status IN {UNFINISHED} RETURNING status"),
                sql_params![&claim.batch, &claim.server, unix_time() + CLAIM_LEASE_SECS],
            )?;
            Ok(row.map(|r| r.text(0)).transpose()?.and_then(|status| BatchStatus::parse(&status)))
        })
    }

    /// Records a finished line; false when the line already had its result (it is kept).
    pub fn record_batch_line(&self, batch: &str, line: &LineResult) -> Result<bool, StoreError> {
        self.with(|s| {
            let inserted = s.execute(
                "INSERT INTO batch_lines (batch_id, line, custom_id, succeeded, result, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                sql_params![batch, line.line as i64, line.custom_id.as_deref(), line.succeeded, line.result.to_string(), unix_time()],
            )?;
            Ok(inserted > 0)
        })
    }

    /// The numbers of the batch's lines that have their result.
    pub fn finished_batch_lines(&self, batch: &str) -> Result<HashSet<usize>, StoreError> {
        self.with(|s| {
            s.query("SELECT line FROM batch_lines WHERE batch_id = ?1", sql_params![batch])?
                .iter()
                .map(|r| Ok(r.int(0)? as usize))
                .collect()
        })
    }

    /// Every finished line of the batch, in input order.
    pub fn batch_lines(&self, batch: &str) -> Result<Vec<LineResult>, StoreError> {
        self.with(|s| {
            s.query("SELECT line, custom_id, succeeded, result FROM batch_lines WHERE batch_id = ?1 ORDER BY line", sql_params![batch])?
                .iter()
                .map(|r| {
                    Ok(LineResult {
                        line: r.int(0)? as usize,
                        custom_id: r.opt_text(1)?,
                        succeeded: r.int(2)? != 0,
                        result: serde_json::from_str(&r.text(3)?)?,
                    })
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::stores;
    use super::*;

    fn batch(id: &str, created_at: i64) -> BatchRow {
        BatchRow {
            id: id.into(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-1".into(),
            completion_window: "24h".into(),
            metadata: Some(serde_json::json!({"k": "v"})),
            status: BatchStatus::Validating,
            total: 3,
            output_file_id: None,
            error_file_id: None,
            errors: None,
            created_by: Scope::Tune,
            created_at,
            times: BatchTimes::default(),
        }
    }

    fn line(n: usize, succeeded: bool) -> LineResult {
        LineResult { line: n, custom_id: Some(format!("c{n}")), succeeded, result: serde_json::json!({"n": n}) }
    }

    #[test]
    fn batches_page_newest_first_and_record_each_line_once() {
        for (store, location, _dir) in stores() {
            for (id, at) in [("batch_a", 1), ("batch_b", 2), ("batch_c", 2)] {
                store.insert_batch(&batch(id, at)).unwrap();
            }
            let ids = |page: Vec<BatchRow>| page.into_iter().map(|b| b.id).collect::<Vec<_>>();
            assert_eq!(ids(store.batches(None, 2).unwrap()), ["batch_c", "batch_b"], "{location}");
            assert_eq!(ids(store.batches(Some("batch_b"), 10).unwrap()), ["batch_a"], "{location}");
            assert_eq!(store.batch("batch_a").unwrap().unwrap(), batch("batch_a", 1), "{location}");
            assert!(store.record_batch_line("batch_a", &line(0, true)).unwrap());
            assert!(store.record_batch_line("batch_a", &line(2, false)).unwrap());
            assert!(!store.record_batch_line("batch_a", &line(0, false)).unwrap(), "{location}: a finished line keeps its result");
            assert_eq!(store.batch_progress("batch_a").unwrap(), (1, 1), "{location}");
            assert_eq!(store.finished_batch_lines("batch_a").unwrap(), HashSet::from([0, 2]));
            assert_eq!(store.batch_lines("batch_a").unwrap(), [line(0, true), line(2, false)], "{location}");
        }
    }

    #[test]
    fn a_batch_goes_to_one_server_until_its_lease_expires_and_ends_once() {
        for (store, location, _dir) in stores() {
            store.insert_batch(&batch("batch_a", 1)).unwrap();
            let first = store.claim_batch("a").unwrap().expect("the new batch is claimed");
            assert_eq!(store.claim_batch("b").unwrap(), None, "{location}: a held batch is not claimed twice");
            assert!(store.set_batch_status("batch_a", BatchStatus::InProgress, &[BatchStatus::Validating]).unwrap());
            assert_eq!(store.renew_batch_claim(&first).unwrap(), Some(BatchStatus::InProgress), "{location}");
            store.with(|s| Ok(s.execute("UPDATE batches SET lease_until = ?1", sql_params![unix_time() - 1])?)).unwrap();
            let second = store.claim_batch("b").unwrap().expect("an expired claim is taken");
            assert_eq!(store.renew_batch_claim(&first).unwrap(), None, "{location}: the old holder learns it lost the batch");
            assert!(store.end_batch("batch_a", BatchStatus::Completed, (Some("file-out"), None), None).unwrap());
            assert!(!store.end_batch("batch_a", BatchStatus::Failed, (None, None), None).unwrap(), "{location}: it ended once");
            assert_eq!(store.renew_batch_claim(&second).unwrap(), None);
            let ended = store.batch("batch_a").unwrap().unwrap();
            assert_eq!((ended.status, ended.output_file_id.as_deref()), (BatchStatus::Completed, Some("file-out")));
            assert!(ended.times.in_progress_at.is_some() && ended.times.completed_at.is_some());
        }
    }
}
