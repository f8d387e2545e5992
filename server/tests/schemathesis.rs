//! Schemathesis against the real server binary on the tiny synthetic model, with the admin key
//! set: every route and every status it returns must match `openapi.json`, and nothing a
//! generated request sends may cause a 5xx. `.ci/run` installs schemathesis (`pip install
//! schemathesis`); this test fails, saying so, where it is missing.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{free_port, KillOnDrop};
use tessera::model::synthetic::tiny_gemma3;

const ADMIN_KEY: &str = "schemathesis-admin";

#[test]
fn generated_requests_find_no_server_error_and_no_undeclared_response() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tiny_gemma3(5).write(&model).unwrap();
    for sub in ["adapters", "plugins"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
    }
    let port = free_port();
    let _server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--ctx-len", "128", "--admin-key", ADMIN_KEY])
            .arg("--model")
            .arg(&model)
            .arg("--adapters-dir")
            .arg(dir.path().join("adapters"))
            .arg("--tuning-dir")
            .arg(dir.path().join("tuning"))
            .arg("--plugins-dir")
            .arg(dir.path().join("plugins"))
            .spawn()
            .expect("starting tessera serve"),
    );
    wait_for_health(port);
    // Run in the temporary folder: schemathesis keeps caches (replayed failures, examples) in
    // its working directory, and each run starts from none.
    let output = Command::new("python3")
        .current_dir(dir.path())
        .args(["-m", "schemathesis.cli", "run", &format!("http://127.0.0.1:{port}/openapi.json")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--header", &format!("Authorization: Bearer {ADMIN_KEY}")])
        .args(["--max-examples", "25", "--seed", "7", "--workers", "2", "--no-color"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .output()
        .expect("running python3 -m schemathesis.cli (install it with `python3 -m pip install schemathesis`)");
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
    assert!(output.status.success(), "schemathesis found failures (see the report above)");
}

fn wait_for_health(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the server did not start listening on port {port}");
}
