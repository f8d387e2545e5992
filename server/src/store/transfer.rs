//! Moving a store between databases (`tessera state export | tessera state import`): a single
//! server's SQLite store into the PostgreSQL database a group of servers will share, or a
//! backup back. The dump is JSON lines: a header with the schema version, then one line per
//! row, `{"table": …, "row": [values in schema::TABLES' column order]}`, integers as JSON
//! integers, reals as JSON reals, blobs as `{"hex": …}`.

use std::io::{BufRead, Write};

use serde_json::{json, Value as Json};

use super::database::{Database, DbError, Row, Session, Dialect, Value};
use super::schema::{self, SERIAL_TABLES, TABLES};

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("reading or writing the dump: {0}")]
    Io(#[from] std::io::Error),
    #[error("dump line {line}: {message}")]
    Dump { line: usize, message: String },
    #[error("the target database already holds {rows} rows in `{table}`: import only into an empty store")]
    NotEmpty { table: &'static str, rows: i64 },
    #[error("the dump has schema version {found}, this build {known}: export and import with the same version of tessera")]
    Version { found: i64, known: i64 },
}

/// What was moved: rows per table, in [`TABLES`] order.
pub type Counts = Vec<(&'static str, usize)>;

/// Writes every row of `database` to `out`. Paths under `root` (absolute in older SQLite
/// stores) are written relative to it, as the store records them now, so that the rows work
/// under whichever folder the files are copied to.
pub fn export(database: &Database, root: &std::path::Path, out: &mut impl Write) -> Result<Counts, TransferError> {
    database.transaction(|s| {
        let version = schema::version(s, database.dialect())?;
        writeln!(out, "{}", json!({ "tessera_state": version }))?;
        let mut counts = Vec::new();
        for &(table, columns) in TABLES {
            let rows = s.query(&format!("SELECT {columns} FROM {table} ORDER BY {}", export_order(table)), &[])?;
            for row in &rows {
                let values: Vec<Json> = row.0.iter().map(|v| to_json(v, root)).collect();
                writeln!(out, "{}", json!({ "table": table, "row": values }))?;
            }
            counts.push((table, rows.len()));
        }
        Ok(counts)
    })
}

/// The order rows are written in: by id, and jobs in the order they were created.
fn export_order(table: &str) -> &'static str {
    match table {
        "adapters" => "name",
        "versions" => "adapter, version",
        "jobs" => "rowid",
        "batches" => "created_at, id",
        "batch_lines" => "batch_id, line",
        _ => "id",
    }
}

fn to_json(value: &Value, root: &std::path::Path) -> Json {
    match value {
        Value::Null => Json::Null,
        Value::Int(i) => json!(i),
        Value::Real(r) => json!(r),
        Value::Text(t) => match std::path::Path::new(t).strip_prefix(root) {
            Ok(relative) if t.starts_with('/') => json!(relative.display().to_string()),
            _ => json!(t),
        },
        Value::Blob(b) => json!({ "hex": b.iter().map(|byte| format!("{byte:02x}")).collect::<String>() }),
    }
}

fn from_json(value: &Json) -> Option<Value> {
    Some(match value {
        Json::Null => Value::Null,
        Json::Number(n) if n.is_i64() => Value::Int(n.as_i64()?),
        Json::Number(n) => Value::Real(n.as_f64()?),
        Json::String(s) => Value::Text(s.clone()),
        Json::Object(o) => {
            let hex = o.get("hex")?.as_str()?;
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| hex.get(i..i + 2).and_then(|pair| u8::from_str_radix(pair, 16).ok()))
                .collect::<Option<Vec<u8>>>()?;
            Value::Blob(bytes)
        }
        _ => return None,
    })
}

/// Reads a dump into `database`, which must be empty (its schema is migrated when opened),
/// in one transaction: all of it or nothing.
pub fn import(database: &Database, input: impl BufRead) -> Result<Counts, TransferError> {
    database.transaction(|s| {
        refuse_non_empty(s)?;
        let mut counts: Counts = TABLES.iter().map(|&(table, _)| (table, 0)).collect();
        for (index, line) in input.lines().enumerate() {
            let line = line?;
            let number = index + 1;
            let bad = |message: String| TransferError::Dump { line: number, message };
            let parsed: Json = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            if index == 0 {
                let found = parsed["tessera_state"].as_i64().ok_or_else(|| bad("not a `tessera state export` dump".into()))?;
                if found != schema::latest() {
                    return Err(TransferError::Version { found, known: schema::latest() });
                }
                continue;
            }
            let table = parsed["table"].as_str().unwrap_or_default();
            let slot = TABLES.iter().position(|&(t, _)| t == table).ok_or_else(|| bad(format!("unknown table `{table}`")))?;
            let columns = TABLES[slot].1;
            let values = parsed["row"]
                .as_array()
                .and_then(|row| row.iter().map(from_json).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad("`row` is not a list of values".into()))?;
            if values.len() != columns.split(',').count() {
                return Err(bad(format!("`{table}` has {} columns, the row {}", columns.split(',').count(), values.len())));
            }
            let placeholders: Vec<String> = (1..=values.len()).map(|i| format!("?{i}")).collect();
            s.execute(&format!("INSERT INTO {table} ({columns}) VALUES ({})", placeholders.join(", ")), &values)?;
            counts[slot].1 += 1;
        }
        if database.dialect() == Dialect::Postgres {
            advance_sequences(s)?;
        }
        Ok(counts)
    })
}

fn refuse_non_empty(s: &mut dyn Session) -> Result<(), TransferError> {
    for &(table, _) in TABLES {
        let rows = s.query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])?.int(0)?;
        if rows > 0 {
            return Err(TransferError::NotEmpty { table, rows });
        }
    }
    Ok(())
}

/// Moves each id sequence past the ids the import wrote, so new rows do not collide with them.
fn advance_sequences(s: &mut dyn Session) -> Result<(), DbError> {
    for table in SERIAL_TABLES {
        s.query(&format!("SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false) FROM {table}"), &[])?;
    }
    Ok(())
}

/// Rows as the dump writes them, for comparing two stores in tests.
pub fn rows(database: &Database) -> Result<Vec<(&'static str, Vec<Row>)>, DbError> {
    database.transaction(|s| {
        TABLES
            .iter()
            .map(|&(table, columns)| {
                let order = if table == "jobs" { "id" } else { export_order(table) };
                Ok((table, s.query(&format!("SELECT {columns} FROM {table} ORDER BY {order}"), &[])?))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Scope;
    use crate::store::tests::{adapter, job, pair};
    use crate::store::{FileRow, JobStatus, StateLocation, Store};

    /// A single server's store with a row in every table.
    fn filled(root: &std::path::Path) -> Store {
        let store = Store::open(root).unwrap();
        let user = crate::dataset::Message { role: "user".into(), content: "q".into() };
        let preference = crate::dataset::preference::Preference { prompt: vec![user], chosen: "yes".into(), rejected: "no".into() };
        let feedback = crate::store::NewFeedback { pairs: &[pair("a"), pair("b")], preferences: &[preference] };
        store.insert_or_get_adapter(&adapter("x", Scope::Tune), &json!({"eval_loss": 1.25}), feedback, |v0| std::fs::create_dir_all(v0)).unwrap();
        let job = job("ftjob-1", "x", JobStatus::Running);
        store.insert_job(&job, true).unwrap();
        store.add_metrics_event("ftjob-1", "Step 1", &json!({"train_loss": 2.5})).unwrap();
        store.add_checkpoint("ftjob-1", 2, &store.job_dir("ftjob-1").join("step-000002"), &json!({"step": 2})).unwrap();
        let file = FileRow { id: "file-1".into(), filename: "f.jsonl".into(), purpose: "fine-tune".into(), bytes: 4, records: 1, created_at: 3 };
        store.insert_file(&file, &[0, 255, 16, 7]).unwrap();
        store.insert_response("resp_1", r#"{"id":"resp_1","object":"response"}"#, r#"[{"role":"user","content":"q"}]"#).unwrap();
        let batch = crate::store::batches::BatchRow {
            id: "batch-1".into(),
            endpoint: "/v1/chat/completions".into(),
            input_file_id: "file-1".into(),
            completion_window: "24h".into(),
            metadata: None,
            status: crate::store::batches::BatchStatus::InProgress,
            total: 2,
            output_file_id: None,
            error_file_id: None,
            errors: None,
            created_by: Scope::Tune,
            created_at: 4,
            times: Default::default(),
        };
        store.insert_batch(&batch).unwrap();
        let line = crate::store::batches::LineResult { line: 1, custom_id: Some("b".into()), succeeded: true, result: json!({"custom_id": "b"}) };
        store.record_batch_line("batch-1", &line).unwrap();
        store
    }

    #[test]
    fn a_sqlite_store_moves_into_postgres_row_for_row_and_keeps_working() {
        let Some(url) = crate::store::testing::fresh_database().unwrap() else { return };
        let (old_root, new_root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let old = filled(old_root.path());
        let mut dump = Vec::new();
        let exported = export(old.database(), old.root(), &mut dump).unwrap();
        assert!(exported.iter().all(|&(_, n)| n > 0), "a row in every table: {exported:?}");

        let new = Store::open_at(&StateLocation::Postgres(url), new_root.path()).unwrap();
        let imported = import(new.database(), dump.as_slice()).unwrap();
        assert_eq!(imported, exported);
        assert_eq!(rows(new.database()).unwrap(), rows(old.database()).unwrap(), "the same rows");
        assert_eq!(new.checkpoints("ftjob-1").unwrap()[0].path, new_root.path().join("jobs/ftjob-1/step-000002"), "paths follow the root");
        assert_eq!(new.file_content("file-1").unwrap(), Some(vec![0, 255, 16, 7]));
        // New rows take ids past the imported ones.
        assert_eq!(new.insert_pairs("x", &[pair("c")]).unwrap().stored, 1);
        assert_eq!(new.pairs("x", 0, 10).unwrap().iter().map(|p| p.id).collect::<Vec<_>>(), [1, 2, 3]);
        new.add_event("ftjob-1", "info", "after", None).unwrap();

        // Importing twice is refused, and leaves the store as it was.
        assert!(matches!(import(new.database(), dump.as_slice()), Err(TransferError::NotEmpty { table: "adapters", rows: 1 })));
    }

    #[test]
    fn a_damaged_dump_names_its_line_and_imports_nothing() {
        let (old_root, new_root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let old = filled(old_root.path());
        let mut dump = Vec::new();
        export(old.database(), old.root(), &mut dump).unwrap();
        let mut text = String::from_utf8(dump).unwrap();
        text.push_str("{\"table\": \"pairs\", \"row\": [1]}\n");
        let new = Store::open(new_root.path()).unwrap();
        let error = import(new.database(), text.as_bytes()).unwrap_err();
        assert!(matches!(error, TransferError::Dump { .. }), "{error}");
        assert!(new.adapters().unwrap().is_empty(), "nothing imported");
    }
}
