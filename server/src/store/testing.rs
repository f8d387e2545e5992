//! PostgreSQL for tests. `.ci/run` starts a throwaway server (`.ci/postgres`) and names it in
//! `TESSERA_TEST_POSTGRES`; each test takes a database of its own on it.

/// The variable naming the test server's URL, without a database name.
pub const SERVER_VARIABLE: &str = "TESSERA_TEST_POSTGRES";

/// A new, empty database on the test server, as a URL. Without a server it is `None`, except
/// under CI (`CI` set), where the tests must not pass without running against PostgreSQL.
pub fn fresh_database() -> Result<Option<String>, String> {
    let Ok(server) = std::env::var(SERVER_VARIABLE) else {
        if std::env::var_os("CI").is_some() {
            return Err(format!("{SERVER_VARIABLE} is not set: `.ci/run` starts PostgreSQL for these tests"));
        }
        eprintln!("{SERVER_VARIABLE} is not set: PostgreSQL cases not run (`.ci/postgres start` starts a server)");
        return Ok(None);
    };
    let server = server.trim_end_matches('/').to_string();
    let name = format!("tessera_test_{:016x}", rand::random::<u64>());
    // The blocking client runs a runtime of its own, which may not start inside an async test's.
    let create = format!("CREATE DATABASE {name}");
    let admin = format!("{server}/postgres");
    std::thread::spawn(move || {
        let mut admin = postgres::Client::connect(&admin, postgres::NoTls).map_err(|e| format!("{admin}: {e}"))?;
        admin.batch_execute(&create).map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "creating the test database panicked".to_string())??;
    Ok(Some(format!("{server}/{name}")))
}
