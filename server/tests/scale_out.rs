//! A group of servers as one service: three `tessera serve` processes on the tiny model share
//! one PostgreSQL database (`--state`, the server `.ci/run` starts) and their folders, either one
//! shared tuning folder (the shared-filesystem backend) or an S3 bucket on moto's server, each
//! server then caching in a folder of its own. Feedback posted to one trains on another and is
//! served by the third; a rollback anywhere reaches everyone; a trainer killed with SIGKILL has
//! its job taken over from the checkpoint; racing trainers run each job once, and two servers
//! each batch once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera::model::synthetic::tiny_gemma3;
use tessera::store::testing::fresh_database;

mod common;

use common::{free_port, KillOnDrop};

struct Group {
    dir: tempfile::TempDir,
    state: String,
    /// moto's S3 server and the bucket URL, when the folders live there.
    s3: Option<(KillOnDrop, u16)>,
}

/// Where the group keeps its folders.
#[derive(Clone, Copy, PartialEq)]
enum Folders {
    Shared,
    S3,
}

/// moto's S3 server (`python3 -m moto.server`, installed by `.ci/run`) on a free port, with the
/// bucket `tessera` created. `None` where moto is not installed, except under CI.
async fn start_moto() -> Option<(KillOnDrop, u16)> {
    let installed = Command::new("python3").args(["-c", "import moto.server"]).status().is_ok_and(|s| s.success());
    if !installed {
        assert!(std::env::var_os("CI").is_none(), "moto is not installed: `.ci/run` installs it for these tests");
        eprintln!("moto is not installed (pip install 'moto[server]'): S3 cases not run");
        return None;
    }
    let port = free_port();
    let server = KillOnDrop(
        Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting moto"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    // moto does not check signatures: a plain PUT creates the bucket.
    while !reqwest::Client::new().put(format!("http://127.0.0.1:{port}/tessera")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "moto did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some((server, port))
}

struct Server {
    process: KillOnDrop,
    port: u16,
}

impl Group {
    /// A fresh database and shared folder; `None` where no PostgreSQL test server runs (outside
    /// CI: under CI a missing server fails the test).
    async fn new(folders: Folders) -> Option<Self> {
        let state = fresh_database().unwrap()?;
        let s3 = match folders {
            Folders::Shared => None,
            Folders::S3 => Some(start_moto().await?),
        };
        let dir = tempfile::tempdir().unwrap();
        tiny_gemma3(5).write(&dir.path().join("tiny.gguf")).unwrap();
        Some(Self { dir, state, s3 })
    }

    /// The tuning folder of server `name`: the shared one, or its own cache beside S3.
    fn tuning_dir(&self, name: &str) -> PathBuf {
        match self.s3 {
            None => self.dir.path().join("shared"),
            Some(_) => self.dir.path().join(name).join("cache"),
        }
    }

    fn configure(&self, command: &mut Command) {
        if let Some((_, port)) = &self.s3 {
            command
                .env("TESSERA_BLOBS", "s3://tessera/group")
                .env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing")
                .env("AWS_REGION", "us-east-1")
                .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
                .env("AWS_ALLOW_HTTP", "true");
        }
    }

    /// Starts a server named `name` (its own home folder) in `role`, ready once /health says so.
    async fn start(&self, name: &str, role: &str) -> Server {
        let port = free_port();
        let home = self.dir.path().join(name);
        let mut command = Command::new(env!("CARGO_BIN_EXE_tessera"));
        self.configure(&mut command);
        let process = KillOnDrop(
            command
                .env("TESSERA_HOME", &home)
                .env("RUST_LOG", "info")
                .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--ctx-len", "128"])
                .args(["--train-after", "100000", "--checkpoint-every", "2", "--role", role, "--state", &self.state])
                .arg("--model")
                .arg(self.dir.path().join("tiny.gguf"))
                .arg("--tuning-dir")
                .arg(self.tuning_dir(name))
                .stderr(std::fs::File::create(self.dir.path().join(format!("{name}.log"))).unwrap())
                .spawn()
                .expect("starting tessera serve"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = reqwest::get(format!("http://127.0.0.1:{port}/health")).await;
            if health.is_ok_and(|r| r.status().is_success()) {
                break;
            }
            assert!(Instant::now() < deadline, "{name} did not become ready: {}", self.log(name));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Server { process, port }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn get(&self, path: &str) -> Value {
        reqwest::get(self.url(path)).await.unwrap().json().await.unwrap()
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let response = reqwest::Client::new().post(self.url(path)).json(&body).send().await.unwrap();
        response.json().await.unwrap()
    }

    async fn feedback(&self, adapter: &str, pairs: std::ops::Range<usize>) -> Value {
        let lines: Vec<String> = pairs.map(|i| json!({"instruction": format!("name item {i}"), "output": "the hat"}).to_string()).collect();
        let response = reqwest::Client::new().post(self.url(&format!("/v1/adapters/{adapter}/feedback"))).body(lines.join("\n")).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// The folder this server serves `adapter` from.
    async fn served_path(&self, adapter: &str) -> String {
        self.get(&format!("/v1/adapters/{adapter}")).await["path"].as_str().unwrap_or_default().to_string()
    }

    async fn job_when_ended(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let job = self.get(&format!("/v1/fine_tuning/jobs/{id}")).await;
            if matches!(job["status"].as_str(), Some("succeeded" | "failed" | "cancelled")) {
                return job;
            }
            assert!(Instant::now() < deadline, "the job did not end within {within:?}: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn event_messages(&self, job: &str) -> Vec<Value> {
        self.get(&format!("/v1/fine_tuning/jobs/{job}/events?limit=1000")).await["data"].as_array().cloned().unwrap_or_default()
    }
}

/// Polls until every server serves `adapter` from a folder ending in `suffix`; the seconds each
/// took from the call.
async fn until_served(servers: &[&Server], adapter: &str, suffix: &str, within: Duration) -> Vec<f64> {
    let started = Instant::now();
    let mut took = vec![None; servers.len()];
    while took.iter().any(Option::is_none) {
        for (i, server) in servers.iter().enumerate() {
            if took[i].is_none() && server.served_path(adapter).await.ends_with(suffix) {
                took[i] = Some(started.elapsed().as_secs_f64());
            }
        }
        assert!(started.elapsed() < within, "not every server serves {adapter} {suffix} within {within:?}: {took:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    took.into_iter().flatten().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_shared_folder_feedback_posted_to_one_server_trains_on_another_and_is_served_by_the_third() {
    feedback_trains_elsewhere_and_is_served_everywhere(Folders::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_feedback_posted_to_one_server_trains_on_another_and_is_served_by_the_third() {
    feedback_trains_elsewhere_and_is_served_everywhere(Folders::S3).await;
}

/// Feedback on A trains on B (the one trainer) and is served by C within 2 s of B's promotion;
/// a rollback on C reaches A and B within 2 s.
async fn feedback_trains_elsewhere_and_is_served_everywhere(folders: Folders) {
    let Some(group) = Group::new(folders).await else { return };
    let a = group.start("a", "serve").await;
    let b = group.start("b", "train").await;
    let c = group.start("c", "serve").await;

    let receipt = a.feedback("shop", 0..40).await;
    assert_eq!(receipt["stored"], 40, "{receipt}");
    // The adapter A created is served by all at version 0.
    until_served(&[&a, &b, &c], "shop", "v0", Duration::from_secs(2)).await;
    assert_eq!(c.get("/v1/adapters/shop").await["pairs"], 40, "C reads the pairs A stored");

    let job = a.post("/v1/adapters/shop/train", json!({"hyperparameters": {"n_epochs": 2}})).await;
    let id = job["id"].as_str().unwrap_or_else(|| panic!("no job: {job}")).to_string();
    // Only B trains: it serves version 1 first (it promotes), and C follows within 2 s.
    let took = until_served(&[&b, &c], "shop", "v1", Duration::from_secs(120)).await;
    let lag = took[1] - took[0];
    assert!(lag <= 2.0, "C served version 1 {lag:.2} s after B promoted it");
    let finished = c.job_when_ended(&id, Duration::from_secs(30)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    // C answers with version 1 (loading it, from the bucket on S3), exactly as B does.
    let request = json!({"model": "shop", "prompt": "name item 3", "max_tokens": 6, "temperature": 0});
    let (from_b, from_c) = (b.post("/v1/completions", request.clone()).await, c.post("/v1/completions", request).await);
    assert!(from_c["choices"][0]["text"].is_string(), "{from_c}");
    assert_eq!(from_b["choices"][0]["text"], from_c["choices"][0]["text"], "B and C serve the same version");
    let events = c.event_messages(&id).await;
    let claimed: Vec<&Value> = events.iter().filter(|e| e["message"].as_str().is_some_and(|m| m.starts_with("Claimed by trainer"))).collect();
    assert_eq!(claimed.len(), 1, "one claim: {events:?}");
    let trainer = claimed[0]["data"]["trainer"].as_str().unwrap_or_default();
    assert!(trainer.starts_with(&format!("{}-", b.process.0.id())), "B ({}) ran it, not {trainer}", b.process.0.id());
    until_served(&[&a], "shop", "v1", Duration::from_secs(2)).await;
    if let Some((_, port)) = &group.s3 {
        let listing = reqwest::get(format!("http://127.0.0.1:{port}/tessera?list-type=2&prefix=group/adapters/shop/v1/")).await.unwrap().text().await.unwrap();
        assert!(listing.contains("group/adapters/shop/v1/adapter_model.safetensors"), "version 1 is in the bucket: {listing}");
    }

    // A rollback on C reaches A.
    let rolled = c.post("/v1/adapters/shop/rollback", json!({"version": 0})).await;
    assert_eq!(rolled["version"], 0, "{rolled}");
    let took = until_served(&[&a, &b], "shop", "v0", Duration::from_secs(2)).await;
    println!("promotion reached C in {lag:.3} s; rollback on C reached A and B in {took:?} s");
    let metrics = reqwest::get(a.url("/metrics")).await.unwrap().text().await.unwrap();
    let heard = metrics.lines().find_map(|l| l.strip_prefix("tessera_notification_lag_seconds_count ")).and_then(|n| n.parse::<u64>().ok());
    assert!(heard.is_some_and(|n| n >= 2), "A heard the promotion and the rollback: {heard:?}");
    assert!(metrics.contains("tessera_state_seconds_count{backend=\"postgres\"}"), "the store's latency is measured");

    // An adapter uploaded to A is served by B and C; deleting one on B stops it everywhere.
    let zip = reqwest::get(c.url("/v1/adapters/shop/download?version=1")).await.unwrap().bytes().await.unwrap();
    let form = reqwest::multipart::Form::new()
        .text("name", "copy")
        .part("archive", reqwest::multipart::Part::bytes(zip.to_vec()).file_name("copy.zip"));
    let uploaded = reqwest::Client::new().post(a.url("/v1/adapters")).multipart(form).send().await.unwrap();
    assert!(uploaded.status().is_success(), "{}", uploaded.text().await.unwrap());
    until_served(&[&b, &c], "copy", "v0", Duration::from_secs(2)).await;
    let deleted = reqwest::Client::new().delete(b.url("/v1/adapters/shop")).send().await.unwrap();
    assert!(deleted.status().is_success(), "{}", deleted.text().await.unwrap());
    let started = Instant::now();
    for server in [&a, &c] {
        while reqwest::get(server.url("/v1/adapters/shop")).await.unwrap().status() != reqwest::StatusCode::NOT_FOUND {
            assert!(started.elapsed() < Duration::from_secs(2), "a delete on B did not reach every server within 2 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(a.get("/v1/adapters/copy").await["pairs"], 0, "the upload is the store's, with no pairs yet");

    // A training file uploaded to A trains a job created on C, which B runs.
    let lines: Vec<String> = (0..12).map(|i| json!({"messages": [{"role": "user", "content": format!("item {i}")}, {"role": "assistant", "content": "the hat"}]}).to_string()).collect();
    let form = reqwest::multipart::Form::new()
        .text("purpose", "fine-tune")
        .part("file", reqwest::multipart::Part::bytes(lines.join("\n").into_bytes()).file_name("train.jsonl"));
    let file: Value = reqwest::Client::new().post(a.url("/v1/files")).multipart(form).send().await.unwrap().json().await.unwrap();
    let file_id = file["id"].as_str().unwrap_or_else(|| panic!("no file: {file}")).to_string();
    let job = c.post("/v1/fine_tuning/jobs", json!({"model": "tiny", "training_file": file_id, "hyperparameters": {"n_epochs": 1}})).await;
    let id = job["id"].as_str().unwrap_or_else(|| panic!("no job: {job}")).to_string();
    let finished = a.job_when_ended(&id, Duration::from_secs(60)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    if let Some((_, port)) = &group.s3 {
        let listing = reqwest::get(format!("http://127.0.0.1:{port}/tessera?list-type=2&prefix=group/files/")).await.unwrap().text().await.unwrap();
        assert!(listing.contains(&format!("group/files/{file_id}")), "the file's content is in the bucket: {listing}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_trainer_is_killed_is_resumed_by_another_from_its_checkpoint_and_keeps_every_pair() {
    // On S3, so the second trainer must fetch the first one's checkpoint.
    let Some(group) = Group::new(Folders::S3).await else { return };
    let a = group.start("a", "serve").await;
    let mut b = group.start("b", "train").await;
    assert_eq!(a.feedback("crash", 0..200).await["stored"], 200);
    let job = a.post("/v1/adapters/crash/train", json!({"hyperparameters": {"n_epochs": 3}})).await;
    let id = job["id"].as_str().unwrap_or_else(|| panic!("no job: {job}")).to_string();

    let deadline = Instant::now() + Duration::from_secs(60);
    while a.get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints")).await["data"].as_array().is_none_or(|c| c.is_empty()) {
        assert!(Instant::now() < deadline, "no checkpoint within 60 s: {}", group.log("b"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = group.start("c", "train").await;
    b.process.0.kill().unwrap();
    b.process.0.wait().unwrap();
    let killed = Instant::now();
    // Feedback keeps arriving while the trainer is gone; every acknowledged pair stays.
    assert_eq!(a.feedback("crash", 200..230).await["stored"], 30);

    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed_at = loop {
        let events = a.event_messages(&id).await;
        let resumed = events.iter().find_map(|e| e["message"].as_str().filter(|m| m.starts_with("Resumed from the checkpoint at step")).map(str::to_string));
        if let Some(message) = resumed {
            break message;
        }
        assert!(Instant::now() < deadline, "no trainer resumed the job within 30 s of the kill: {}", group.log("c"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let taken_over = killed.elapsed().as_secs_f64();
    let finished = c.job_when_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(finished["status"], "succeeded", "{finished}");
    let step: usize = resumed_at.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(step >= 2, "resumed at step {step}");
    let trainers: Vec<String> = c
        .event_messages(&id)
        .await
        .iter()
        .filter_map(|e| e["data"]["trainer"].as_str().map(str::to_string))
        .collect();
    assert_eq!(trainers.len(), 2, "claimed by B, then by C: {trainers:?}");
    assert!(trainers.iter().any(|t| t.starts_with(&format!("{}-", c.process.0.id()))), "C took it over: {trainers:?}");
    assert_eq!(c.get("/v1/adapters/crash").await["pairs"], 230, "no acknowledged pair lost");
    println!("the job was taken over {taken_over:.1} s after the kill, {resumed_at}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trainers_racing_for_twenty_queued_jobs_run_each_exactly_once() {
    let Some(group) = Group::new(Folders::Shared).await else { return };
    let a = group.start("a", "serve").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let adapter = format!("race{i}");
        assert_eq!(a.feedback(&adapter, 0..4).await["stored"], 4);
        let job = a.post(&format!("/v1/adapters/{adapter}/train"), json!({"hyperparameters": {"n_epochs": 1}})).await;
        ids.push(job["id"].as_str().unwrap_or_else(|| panic!("no job: {job}")).to_string());
    }
    let (b, c) = (group.start("b", "train").await, group.start("c", "train").await);
    let mut runs_by_trainer: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let job = a.job_when_ended(id, Duration::from_secs(180)).await;
        assert_eq!(job["status"], "succeeded", "{job}");
        let events = a.event_messages(id).await;
        let trainers: Vec<&str> = events.iter().filter_map(|e| e["data"]["trainer"].as_str()).collect();
        assert_eq!(trainers.len(), 1, "{id} claimed once: {events:?}");
        let started = events.iter().filter(|e| e["message"].as_str().is_some_and(|m| m.starts_with("Training on "))).count();
        assert!(started <= 1, "{id} started once: {events:?}");
        let server = if trainers[0].starts_with(&format!("{}-", b.process.0.id())) { "b" } else { "c" };
        *runs_by_trainer.entry(server.to_string()).or_default() += 1;
    }
    println!("jobs run by each trainer: {runs_by_trainer:?}");
    drop(c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_store_run_each_batch_once() {
    let Some(group) = Group::new(Folders::Shared).await else { return };
    let (a, b) = (group.start("a", "serve").await, group.start("b", "serve").await);
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for batch in 0..6 {
        let lines: Vec<String> = (0..20)
            .map(|i| {
                let body = json!({"model": "tiny", "messages": [{"role": "user", "content": format!("{batch} {i}")}], "max_tokens": 8});
                json!({"custom_id": format!("c{i}"), "method": "POST", "url": "/v1/chat/completions", "body": body}).to_string()
            })
            .collect();
        let form = reqwest::multipart::Form::new().text("purpose", "batch").part("file", reqwest::multipart::Part::bytes(lines.join("\n").into_bytes()).file_name("b.jsonl"));
        let file: Value = client.post(a.url("/v1/files")).multipart(form).send().await.unwrap().json().await.unwrap();
        let created = a.post("/v1/batches", json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"})).await;
        ids.push(created["id"].as_str().unwrap_or_else(|| panic!("no batch: {created}")).to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    for id in &ids {
        let batch = loop {
            let batch = b.get(&format!("/v1/batches/{id}")).await;
            if batch["status"] == "completed" {
                break batch;
            }
            assert!(Instant::now() < deadline, "{id} did not complete: {batch}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(batch["request_counts"], json!({"total": 20, "completed": 20, "failed": 0}));
        let output = client.get(a.url(&format!("/v1/files/{}/content", batch["output_file_id"].as_str().unwrap()))).send().await.unwrap().text().await.unwrap();
        let custom_ids: std::collections::BTreeSet<String> = output.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()["custom_id"].as_str().unwrap().to_string()).collect();
        assert_eq!((output.lines().count(), custom_ids.len()), (20, 20), "{id}: each line once");
    }
    let logs = [group.log("a"), group.log("b")];
    let mut by_server = [0, 0];
    for id in &ids {
        let claims: Vec<usize> = logs.iter().map(|log| log.lines().filter(|l| l.contains("batch claimed") && l.contains(id.as_str())).count()).collect();
        assert_eq!(claims.iter().sum::<usize>(), 1, "{id} claimed once across the group: {claims:?}");
        by_server[claims[1]] += 1;
    }
    println!("batches run by server a and b: {by_server:?}");
}

/// Runs `sql` on the test server's maintenance database (a thread of its own: the blocking
/// client starts a runtime, which may not start inside the test's).
fn as_admin(database_url: &str, sql: String) {
    let (server, _) = database_url.rsplit_once('/').unwrap();
    let admin = format!("{server}/postgres");
    std::thread::spawn(move || postgres::Client::connect(&admin, postgres::NoTls).unwrap().batch_execute(&sql).unwrap()).join().unwrap();
}

async fn until_health(server: &Server, status: reqwest::StatusCode, within: Duration) -> Value {
    let started = Instant::now();
    loop {
        let response = reqwest::get(server.url("/health")).await.unwrap();
        if response.status() == status {
            return response.json().await.unwrap();
        }
        assert!(started.elapsed() < within, "/health did not answer {status} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_cannot_reach_its_database_is_not_ready_until_it_reconciles_again() {
    let Some(group) = Group::new(Folders::Shared).await else { return };
    let a = group.start("a", "serve").await;
    let name = group.state.rsplit('/').next().unwrap().to_string();
    as_admin(
        &group.state,
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false; SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}';"),
    );
    let health = until_health(&a, reqwest::StatusCode::SERVICE_UNAVAILABLE, Duration::from_secs(15)).await;
    assert_eq!((health["ready"].as_bool(), health["status"].as_str()), (Some(false), Some("unavailable")), "{health}");
    as_admin(&group.state, format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true;"));
    let health = until_health(&a, reqwest::StatusCode::OK, Duration::from_secs(15)).await;
    assert_eq!(health["ready"], true, "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_servers_store_moves_into_postgres_with_state_export_and_import_and_serves_there() {
    let Some(group) = Group::new(Folders::Shared).await else { return };
    // A single server with its own SQLite store and an adapter with pairs.
    let home = group.dir.path().join("single");
    let single_dir = home.join("tuning");
    let port = free_port();
    let single = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .env("TESSERA_HOME", &home)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--ctx-len", "128", "--train-after", "100000", "--model"])
            .arg(group.dir.path().join("tiny.gguf"))
            .arg("--tuning-dir")
            .arg(&single_dir)
            .spawn()
            .unwrap(),
    );
    let single = Server { process: single, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(single.url("/health")).await.is_err() {
        assert!(Instant::now() < deadline, "the single server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(single.feedback("moved", 0..7).await["stored"], 7);
    drop(single);

    let tessera = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_tessera")).args(args).output().unwrap();
        assert!(output.status.success(), "tessera {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        output
    };
    let dump = group.dir.path().join("dump.jsonl");
    tessera(&["state", "export", "--tuning-dir", single_dir.to_str().unwrap(), "-o", dump.to_str().unwrap()]);
    tessera(&["migrate", "--state", &group.state, "--tuning-dir", group.tuning_dir("a").to_str().unwrap()]);
    tessera(&["state", "import", "--state", &group.state, "--tuning-dir", group.tuning_dir("a").to_str().unwrap(), "-i", dump.to_str().unwrap()]);
    // The folders move by copy, as the README says.
    let copied = Command::new("cp").arg("-r").arg(single_dir.join("adapters")).arg(group.tuning_dir("a")).status().unwrap();
    assert!(copied.success());

    let a = group.start("a", "serve").await;
    let info = a.get("/v1/adapters/moved").await;
    assert_eq!((info["pairs"].as_u64(), info["version"].as_u64()), (Some(7), Some(0)), "{info}");
    let answer = a.post("/v1/completions", json!({"model": "moved", "prompt": "item", "max_tokens": 2})).await;
    assert!(answer["choices"][0]["text"].is_string(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_stored_by_one_server_is_read_continued_and_deleted_by_another() {
    let Some(group) = Group::new(Folders::Shared).await else { return };
    let (a, b) = (group.start("a", "serve").await, group.start("b", "serve").await);
    let first = a.post("/v1/responses", json!({"model": "tiny", "input": "hello", "max_output_tokens": 3, "temperature": 0})).await;
    let id = first["id"].as_str().expect("a response id").to_string();
    assert_eq!(b.get(&format!("/v1/responses/{id}")).await, first, "the group's store holds it");
    let next = b.post("/v1/responses", json!({"model": "tiny", "input": "again", "previous_response_id": id, "max_output_tokens": 2})).await;
    assert!(next["usage"]["input_tokens"].as_u64() > first["usage"]["input_tokens"].as_u64(), "b continued a's conversation: {next}");
    let deleted = reqwest::Client::new().delete(b.url(&format!("/v1/responses/{id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), reqwest::StatusCode::OK);
    let gone = reqwest::get(a.url(&format!("/v1/responses/{id}"))).await.unwrap();
    assert_eq!(gone.status(), reqwest::StatusCode::NOT_FOUND, "deleted for the whole group");
}
