//! One relational interface over the two databases the store runs on: an embedded SQLite file
//! for a single server, and PostgreSQL for a group of servers. The store writes its SQL once, in
//! the dialect both accept (`?N` parameters, `ON CONFLICT … DO NOTHING`, `RETURNING`), and runs
//! every call inside a transaction that commits only when the closure succeeds.

use std::sync::Mutex;
use std::time::Duration;

use rusqlite::types::ValueRef;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("{}", postgres_message(.0))]
    Postgres(#[from] postgres::Error),
    #[error("column {column}: expected {expected}, found {found}")]
    Type { column: usize, expected: &'static str, found: &'static str },
}

/// PostgreSQL's own message where the server sent one (the error's Display says only "db error").
fn postgres_message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

impl DbError {
    /// A UNIQUE or CHECK constraint refused the write.
    pub fn is_constraint_violation(&self) -> bool {
        match self {
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => e.code == rusqlite::ErrorCode::ConstraintViolation,
            DbError::Postgres(e) => e.code().is_some_and(|code| code.code().starts_with("23")),
            _ => false,
        }
    }
}

/// A parameter or column value, in the types both databases share.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Real(_) => "a real",
            Value::Text(_) => "text",
            Value::Blob(_) => "a blob",
        }
    }
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v.into())
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Parameters of one statement, each converted into a [`Value`].
#[macro_export]
macro_rules! sql_params {
    ($($value:expr),* $(,)?) => {
        &[$($crate::store::database::Value::from($value)),*][..]
    };
}

/// One result row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, column: usize) -> &Value {
        self.0.get(column).unwrap_or(&Value::Null)
    }

    fn mismatch(&self, column: usize, expected: &'static str) -> DbError {
        DbError::Type { column, expected, found: self.at(column).kind() }
    }

    pub fn int(&self, column: usize) -> Result<i64, DbError> {
        self.opt_int(column)?.ok_or_else(|| self.mismatch(column, "an integer"))
    }

    pub fn opt_int(&self, column: usize) -> Result<Option<i64>, DbError> {
        match self.at(column) {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            _ => Err(self.mismatch(column, "an integer")),
        }
    }

    pub fn real(&self, column: usize) -> Result<f64, DbError> {
        match self.at(column) {
            Value::Real(v) => Ok(*v),
            Value::Int(v) => Ok(*v as f64),
            _ => Err(self.mismatch(column, "a real")),
        }
    }

    pub fn text(&self, column: usize) -> Result<String, DbError> {
        self.opt_text(column)?.ok_or_else(|| self.mismatch(column, "text"))
    }

    pub fn opt_text(&self, column: usize) -> Result<Option<String>, DbError> {
        match self.at(column) {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Err(self.mismatch(column, "text")),
        }
    }

    /// The blob in `column`, taken out of the row (a file's content is not copied).
    pub fn into_blob(mut self, column: usize) -> Result<Vec<u8>, DbError> {
        match self.0.get_mut(column) {
            Some(Value::Blob(v)) => Ok(std::mem::take(v)),
            _ => Err(self.mismatch(column, "a blob")),
        }
    }
}

/// Statements inside one open transaction.
pub trait Session {
    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, DbError>;
    /// Runs a query; all its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
    /// Runs several statements without parameters (a migration).
    fn batch(&mut self, sql: &str) -> Result<(), DbError>;

    fn query_opt(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, params)?.into_iter().next())
    }

    fn query_one(&mut self, sql: &str, params: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, params)?
            .ok_or(DbError::Type { column: 0, expected: "a row", found: "none" })
    }
}

/// Which SQL dialect a database speaks, where the store must say something differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// What a claim's inner `SELECT … LIMIT 1` ends with, so that concurrent claimers on
    /// PostgreSQL skip the rows another is locking and each row goes to exactly one of them.
    /// SQLite serialises writers already.
    pub fn skip_locked(self) -> &'static str {
        match self {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }

    /// `sqlite` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }
}

pub enum Database {
    Sqlite(Mutex<rusqlite::Connection>),
    Postgres(PostgresPool),
}

impl Database {
    pub fn open_sqlite(path: &std::path::Path) -> Result<Self, DbError> {
        let connection = rusqlite::Connection::open(path)?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(Duration::from_secs(10))?;
        Ok(Database::Sqlite(Mutex::new(connection)))
    }

    pub fn open_postgres(url: &str) -> Result<Self, DbError> {
        let config: postgres::Config = url.parse()?;
        let pool = PostgresPool { config, idle: Mutex::new(Vec::new()) };
        // Connect once now, so that a wrong URL fails at start and not at the first request.
        let client = pool.take()?;
        pool.give_back(client);
        Ok(Database::Postgres(pool))
    }

    pub fn dialect(&self) -> Dialect {
        match self {
            Database::Sqlite(_) => Dialect::Sqlite,
            Database::Postgres(_) => Dialect::Postgres,
        }
    }

    /// Runs `f` in a transaction, committed when it returns `Ok` and rolled back otherwise.
    pub fn transaction<R, E: From<DbError>>(&self, f: impl FnOnce(&mut dyn Session) -> Result<R, E>) -> Result<R, E> {
        match self {
            Database::Sqlite(connection) => {
                let mut connection = connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                // Immediate: a transaction that reads and then writes would otherwise fail at once
                // ("database is locked") when another connection wrote meanwhile.
                let tx = connection
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(DbError::from)?;
                let mut session = SqliteSession(tx);
                let result = f(&mut session)?;
                session.0.commit().map_err(DbError::from)?;
                Ok(result)
            }
            Database::Postgres(pool) => {
                let mut client = pool.take()?;
                let result = postgres_transaction(&mut client, f);
                pool.give_back(client);
                result
            }
        }
    }
}

fn postgres_transaction<R, E: From<DbError>>(
    client: &mut postgres::Client,
    f: impl FnOnce(&mut dyn Session) -> Result<R, E>,
) -> Result<R, E> {
    let tx = client.transaction().map_err(DbError::from)?;
    let mut session = PostgresSession(tx);
    let result = f(&mut session)?;
    session.0.commit().map_err(DbError::from)?;
    Ok(result)
}

struct SqliteSession<'c>(rusqlite::Transaction<'c>);

/// Parameters bind to SQLite borrowed, without copying a text or blob.
impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(r) => ValueRef::Real(*r),
            Value::Text(t) => ValueRef::Text(t.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_value(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Int(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl Session for SqliteSession<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, DbError> {
        let mut statement = self.0.prepare_cached(sql)?;
        Ok(statement.execute(rusqlite::params_from_iter(params))?)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let mut statement = self.0.prepare_cached(sql)?;
        let columns = statement.column_count();
        let rows = statement
            .query_map(rusqlite::params_from_iter(params), |r| {
                (0..columns).map(|i| Ok(sqlite_value(r.get_ref(i)?))).collect::<rusqlite::Result<Vec<_>>>().map(Row)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.0.execute_batch(sql)?)
    }
}

/// Idle PostgreSQL connections, reused by the blocking threads that run store calls; one is
/// opened whenever none is idle, and a broken one is dropped rather than returned.
pub struct PostgresPool {
    config: postgres::Config,
    idle: Mutex<Vec<postgres::Client>>,
}

/// How many idle connections a server keeps open.
const MAX_IDLE_CONNECTIONS: usize = 8;

impl PostgresPool {
    fn take(&self) -> Result<postgres::Client, DbError> {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match idle {
            Some(client) if !client.is_closed() => Ok(client),
            _ => Ok(self.config.connect(postgres::NoTls)?),
        }
    }

    fn give_back(&self, client: postgres::Client) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if !client.is_closed() && idle.len() < MAX_IDLE_CONNECTIONS {
            idle.push(client);
        }
    }

    /// A connection of its own, outside the pool (a `LISTEN`er).
    pub fn connect(&self) -> Result<postgres::Client, DbError> {
        Ok(self.config.connect(postgres::NoTls)?)
    }
}

/// `?N` parameters as PostgreSQL's `$N`. The store's SQL has no `?` inside string literals.
fn postgres_sql(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

struct PostgresSession<'c>(postgres::Transaction<'c>);

impl Session for PostgresSession<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, DbError> {
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        Ok(self.0.execute(postgres_sql(sql).as_str(), &params)? as usize)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let params: Vec<&(dyn postgres::types::ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        self.0.query(postgres_sql(sql).as_str(), &params)?.iter().map(postgres_row).collect()
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.0.batch_execute(sql)?)
    }
}

fn postgres_row(row: &postgres::Row) -> Result<Row, DbError> {
    use postgres::types::Type;
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(i)?.into()
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(i)?.map(i64::from).into()
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(i)?.map(i64::from).into()
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(i)?.into()
        } else if *ty == Type::FLOAT8 {
            row.try_get::<_, Option<f64>>(i)?.into()
        } else if *ty == Type::FLOAT4 {
            row.try_get::<_, Option<f32>>(i)?.map(f64::from).into()
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(i)?.map_or(Value::Null, Value::Blob)
        } else {
            row.try_get::<_, Option<String>>(i)?.into()
        };
        values.push(value);
    }
    Ok(Row(values))
}

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            Value::Int(v) if *ty == Type::BOOL => (*v != 0).to_sql(ty, out),
            Value::Int(v) if *ty == Type::FLOAT8 => (*v as f64).to_sql(ty, out),
            Value::Int(v) => v.to_sql(ty, out),
            Value::Real(v) if *ty == Type::FLOAT4 => (*v as f32).to_sql(ty, out),
            Value::Real(v) => v.to_sql(ty, out),
            Value::Text(v) => v.to_sql(ty, out),
            Value::Blob(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_renumbered_for_postgres() {
        assert_eq!(postgres_sql("SELECT a FROM t WHERE b = ?1 AND (?2 IS NULL OR c < ?2)"), "SELECT a FROM t WHERE b = $1 AND ($2 IS NULL OR c < $2)");
    }
}
