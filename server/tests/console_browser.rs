//! The web console in a real browser: `tessera serve` on the tiny synthetic model (with two
//! adapters to mix and online tuning on), and headless Chromium driven over WebDriver by
//! `tests/e2e/console.py` (selenium; `.ci/run` installs Debian's `chromium` and
//! `chromium-driver`). Screenshots of every scenario land in `<target>/tmp/console/`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{free_port, KillOnDrop};

fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the server never listened");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_console_walks_the_feedback_loop_in_a_real_browser() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    tessera::model::synthetic::tiny_gemma3(5).write(&model).unwrap();
    // Two adapters to mix: the tiny model's test adapter, twice.
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/testing/embedded/adapter");
    for name in ["mix-a", "mix-b"] {
        let to = dir.path().join("adapters").join(name);
        std::fs::create_dir_all(&to).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter.join(file), to.join(file)).unwrap();
        }
    }
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    let keyed = serve(&model, dir.path(), &["--admin-key", "console-admin", "--api-key", "console-user"]);
    run_browser(keyed.1, &["console-admin", "console-user"], &shots);
    drop(keyed);
    let open = serve(&model, dir.path(), &[]);
    run_browser(open.1, &["-", "-"], &shots);
}

/// `tessera serve` on `model` with the adapters, tuning and plugins under `dir`, and `keys`.
fn serve(model: &Path, dir: &Path, keys: &[&str]) -> (KillOnDrop, u16) {
    let port = free_port();
    let server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--ctx-len", "1024", "--train-after", "100000"])
            .args(keys)
            .arg("--model")
            .arg(model)
            .arg("--adapters-dir")
            .arg(dir.join("adapters"))
            .arg("--tuning-dir")
            .arg(dir.join("tuning"))
            .arg("--plugins-dir")
            .arg(dir.join("plugins"))
            .spawn()
            .expect("starting tessera serve"),
    );
    wait_healthy(port);
    (server, port)
}

fn run_browser(port: u16, keys: &[&str], shots: &Path) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/e2e/console.py");
    let status = Command::new("python3")
        .arg(&script)
        .arg(format!("http://127.0.0.1:{port}"))
        .args(keys)
        .arg(shots)
        .status()
        .expect("running python3 (selenium comes from `pip install selenium`, Chromium from Debian's chromium and chromium-driver)");
    assert!(status.success(), "the browser checks failed (see the output above; screenshots in {})", shots.display());
}
