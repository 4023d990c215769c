//! Test-only support: start the stand-in servers on free ports, seed data, check convergence.
//!
//! The stand-ins are third-party servers speaking the real protocols, installed by
//! `make venv` into the project's `.venv`: SecantusDB (MongoDB wire protocol) and noida-db
//! (Elasticsearch REST API). They are driven here with the real `mongodb` and
//! `elasticsearch` crates. A missing stand-in makes the test fail loudly, never skip.

pub mod control_plane;
pub mod crd_cases;
pub mod dns;
pub mod opensearch;
pub mod proxy;
pub mod sigv4;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use elasticsearch::http::transport::Transport;
use elasticsearch::indices::IndicesRefreshParts;
use elasticsearch::{CountParts, Elasticsearch, MgetParts};
use mongodb::bson::{doc, Bson, Document};
use serde_json::{json, Value};

/// Install the process-wide rustls crypto provider once: aws-lc-rs, as `monsoon` does (test
/// builds also compile ring, through kube-fake-client's default kube features and reqwest).
pub fn init_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The project's root directory.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of an executable of the stand-ins' venv. Panics with the fix when missing.
pub fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("MONSOON_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join(".venv"));
    let path = venv.join("bin").join(name);
    assert!(
        path.exists(),
        "stand-in `{}` is missing: run `make venv` (installs SecantusDB and noida-db into .venv)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1, never one this process handed out before: tests of one
/// binary run at once, and the kernel may give two of them the same just-released port, so
/// two stand-ins would race for it (seen: SecantusDB exiting with "Address already in use"
/// while the test talked to another test's server).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A fresh temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Create `<tmp>/monsoon-test-<label>-<pid>-<n>`.
    pub fn new(label: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("monsoon-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_port(port: u16, timeout: Duration, child: &mut Child, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            // Another process listening there would answer too: make sure ours still runs.
            std::thread::sleep(Duration::from_millis(100));
            if let Some(status) = child.try_wait()? {
                bail!("{what} exited with {status}; port {port} answers, so another process holds it");
            }
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited with {status} before listening on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} did not listen on port {port} within {timeout:?}")
}

/// Send SIGTERM (or SIGKILL when `kill`) and wait for the process.
pub fn stop_child(child: &mut Child, kill: bool) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let signal = if kill { "-KILL" } else { "-TERM" };
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A SecantusDB server (MongoDB wire protocol, single-node replica set).
pub struct Mongo {
    /// Port it listens on.
    pub port: u16,
    storage: TempDir,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl Mongo {
    /// Start on a free port with its own storage directory. `extra_args` go to
    /// `secantusd-py` (e.g. `--oplog-max-entries 500000`).
    pub fn start(extra_args: &[&str]) -> anyhow::Result<Self> {
        let mut m = Self {
            port: free_port(),
            storage: TempDir::new("mongo"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.storage.path().join("server.log"))?;
        let mut child = Command::new(venv_bin("secantusd-py"))
            .arg("--port")
            .arg(self.port.to_string())
            .arg("--storage-path")
            .arg(self.storage.path().join("data"))
            // failpoints for the failure tests; a no-op heartbeat so idle streams' resume
            // tokens advance as they do on mongod (10 s there).
            .args(["--enable-test-commands", "--noop-heartbeat-seconds", "1"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start secantusd-py")?;
        wait_port(self.port, Duration::from_secs(60), &mut child, "secantusd-py")?;
        self.child = Some(child);
        Ok(())
    }

    /// Connection string for this server.
    pub fn uri(&self) -> String {
        format!("mongodb://127.0.0.1:{}/?directConnection=true", self.port)
    }

    /// A client of this server.
    pub async fn client(&self) -> anyhow::Result<mongodb::Client> {
        init_crypto();
        let mut opts = mongodb::options::ClientOptions::parse(self.uri()).await?;
        opts.server_selection_timeout = Some(Duration::from_secs(30));
        Ok(mongodb::Client::with_options(opts)?)
    }

    /// Process id of the server, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop the server (SIGTERM, or SIGKILL when `kill`), keeping its storage.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, kill);
        }
    }

    /// Start again on the same port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop(false);
        self.spawn()
    }

    /// Start again on the same port and storage with more server flags (e.g. `--auth`).
    pub fn restart_with(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.extra_args.extend(extra.iter().map(|s| s.to_string()));
        self.restart()
    }
}

impl Drop for Mongo {
    fn drop(&mut self) {
        report_unexpected_exit(&mut self.child, "secantusd-py", self.port, &self.storage.path().join("server.log"));
        self.stop(true);
    }
}

/// A stand-in that exited on its own while a test used it shows up in the test only as
/// "connection refused": say so on stderr, with the end of its log, before its files go.
fn report_unexpected_exit(child: &mut Option<Child>, what: &str, port: u16, log: &Path) {
    if let Some(c) = child.as_mut() {
        if let Ok(Some(status)) = c.try_wait() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            eprintln!("{what} on port {port} exited unexpectedly ({status}); the end of its log:\n{}", tail(&text, 40));
        }
    }
}

/// A noida-db server speaking the Elasticsearch REST API.
pub struct Elastic {
    /// Port it listens on.
    pub port: u16,
    data: TempDir,
    child: Option<Child>,
}

impl Elastic {
    /// Start on a free port with its own data directory.
    pub fn start() -> anyhow::Result<Self> {
        let mut e = Self {
            port: free_port(),
            data: TempDir::new("es"),
            child: None,
        };
        e.spawn()?;
        Ok(e)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("server.log"))?;
        let mut child = Command::new(venv_bin("noida-db"))
            .args(["start", "--only", "elasticsearch", "--elasticsearch-port"])
            .arg(self.port.to_string())
            .arg("--data-dir")
            .arg(self.data.path().join("data"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start noida-db")?;
        wait_port(self.port, Duration::from_secs(60), &mut child, "noida-db")?;
        self.child = Some(child);
        Ok(())
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client of this server.
    pub fn client(&self) -> anyhow::Result<Elasticsearch> {
        init_crypto();
        Ok(Elasticsearch::new(Transport::single_node(&self.url())?))
    }

    /// Stop the server, keeping its data. `noida-db start` is a wrapper whose native child
    /// serves the port and survives a SIGTERM to the wrapper, so stop it the documented way.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new(venv_bin("noida-db"))
                .arg("down")
                .arg("--data-dir")
                .arg(self.data.path().join("data"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            stop_child(&mut c, false);
        }
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Elastic {
    fn drop(&mut self) {
        report_unexpected_exit(&mut self.child, "noida-db", self.port, &self.data.path().join("server.log"));
        self.stop();
    }
}

/// The Elasticsearch `_id` monsoon gives a MongoDB `_id` of the types tests use.
pub fn es_id(id: &Bson) -> String {
    match id {
        Bson::ObjectId(o) => o.to_hex(),
        Bson::String(s) => s.clone(),
        Bson::Int32(i) => i.to_string(),
        Bson::Int64(i) => i.to_string(),
        other => other.clone().into_relaxed_extjson().to_string(),
    }
}

/// What a comparison of a collection with its index found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Documents in MongoDB.
    pub mongo: usize,
    /// Documents in MongoDB but not in the index.
    pub lost: Vec<String>,
    /// Documents whose indexed copy differs.
    pub stale: Vec<String>,
    /// Documents in the index but not in MongoDB.
    pub extra: usize,
}

impl Report {
    /// Nothing lost, stale or extra.
    pub fn converged(&self) -> bool {
        self.lost.is_empty() && self.stale.is_empty() && self.extra == 0
    }
}

/// Expected `_source` of a MongoDB document (test data uses types whose relaxed extended
/// JSON is plain JSON: strings, 32/64-bit integers, doubles, booleans, nulls, documents,
/// arrays).
pub fn expected_source(doc: &Document) -> Value {
    let mut d = doc.clone();
    d.remove("_id");
    Bson::Document(d).into_relaxed_extjson()
}

/// Compare every document of `db.coll` with its copy in `index`.
pub async fn compare(
    mongo: &mongodb::Client,
    es: &Elasticsearch,
    db: &str,
    coll: &str,
    index: &str,
) -> anyhow::Result<Report> {
    use futures_util_shim::TryStreamExt;
    let _ = es
        .indices()
        .refresh(IndicesRefreshParts::Index(&[index]))
        .send()
        .await?;
    let docs: Vec<Document> = mongo
        .database(db)
        .collection::<Document>(coll)
        .find(doc! {})
        .await?
        .try_collect()
        .await?;
    let mut report = Report {
        mongo: docs.len(),
        ..Report::default()
    };
    let mut found = 0usize;
    for chunk in docs.chunks(1000) {
        let ids: Vec<String> = chunk
            .iter()
            .map(|d| es_id(d.get("_id").unwrap_or(&Bson::Null)))
            .collect();
        let response = es
            .mget(MgetParts::Index(index))
            .body(json!({ "ids": ids }))
            .send()
            .await?;
        let status = response.status_code().as_u16();
        let body: Value = response.json().await?;
        if status == 404 {
            report.lost.extend(ids);
            continue;
        }
        let empty = Vec::new();
        let got = body["docs"].as_array().unwrap_or(&empty);
        for (d, (id, hit)) in chunk.iter().zip(ids.iter().zip(got)) {
            if hit["found"] != json!(true) {
                report.lost.push(id.clone());
                continue;
            }
            found += 1;
            if hit["_source"] != expected_source(d) {
                report.stale.push(id.clone());
            }
        }
    }
    report.extra = count(es, index).await?.saturating_sub(found);
    Ok(report)
}

/// Every hit (up to 2000) of the indexes `pattern` matches, after a refresh; none when they do
/// not exist.
pub async fn hits(es: &Elasticsearch, pattern: &str) -> anyhow::Result<Vec<Value>> {
    let _ = es.indices().refresh(IndicesRefreshParts::Index(&[pattern])).send().await?;
    let r = es
        .search(elasticsearch::SearchParts::Index(&[pattern]))
        .body(json!({"size": 2000, "query": {"match_all": {}}}))
        .send()
        .await?;
    if r.status_code().as_u16() == 404 {
        return Ok(Vec::new());
    }
    let body: Value = r.json().await?;
    Ok(body["hits"]["hits"].as_array().cloned().unwrap_or_default())
}

/// Documents in `index` (0 when it does not exist), after a refresh.
pub async fn count(es: &Elasticsearch, index: &str) -> anyhow::Result<usize> {
    let _ = es
        .indices()
        .refresh(IndicesRefreshParts::Index(&[index]))
        .send()
        .await?;
    let response = es.count(CountParts::Index(&[index])).send().await?;
    if response.status_code().as_u16() == 404 {
        return Ok(0);
    }
    let body: Value = response.json().await?;
    Ok(body["count"].as_u64().unwrap_or(0) as usize)
}

/// The records of the default dead-letter index (`monsoon-deadletter`), refreshed first.
pub async fn dead_letters(es: &Elasticsearch) -> anyhow::Result<Vec<Value>> {
    let _ = es.indices().refresh(IndicesRefreshParts::Index(&["monsoon-deadletter"])).send().await;
    let r = es
        .search(elasticsearch::SearchParts::Index(&["monsoon-deadletter"]))
        .body(json!({"size": 100, "query": {"match_all": {}}}))
        .send()
        .await?;
    let body: Value = r.json().await?;
    Ok(body["hits"]["hits"].as_array().cloned().unwrap_or_default().into_iter().map(|h| h["_source"].clone()).collect())
}

/// Poll [`compare`] until converged or `timeout`; returns the last report.
pub async fn wait_converged(
    mongo: &mongodb::Client,
    es: &Elasticsearch,
    db: &str,
    coll: &str,
    index: &str,
    timeout: Duration,
) -> anyhow::Result<Report> {
    let deadline = Instant::now() + timeout;
    loop {
        let report = compare(mongo, es, db, coll, index).await?;
        if report.converged() || Instant::now() > deadline {
            return Ok(report);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Small documents (~300 bytes of JSON) with integer `_id`s `start..start+n`.
pub fn sample_docs(start: i64, n: i64) -> Vec<Document> {
    (start..start + n)
        .map(|i| {
            doc! {
                "_id": i,
                "sku": format!("SKU-{i:08}"),
                "customer": format!("customer-{}", i % 997),
                "status": if i % 3 == 0 { "shipped" } else { "pending" },
                "total": (i as f64) * 1.25,
                "quantity": (i % 17) as i32,
                "paid": i % 2 == 0,
                "address": {"street": format!("{} Long Street", i % 1000), "city": "Springfield", "zip": format!("{:05}", i % 99999)},
                "tags": ["alpha", "beta", format!("t{}", i % 10)],
                "note": "The quick brown fox jumps over the lazy dog again and again.",
            }
        })
        .collect()
}

/// Create collection `name` of `db` keeping pre-images for change streams
/// (`changeStreamPreAndPostImages`, MongoDB 6.0+), and return it.
pub async fn with_pre_images(db: &mongodb::Database, name: &str) -> anyhow::Result<mongodb::Collection<Document>> {
    db.create_collection(name).await?;
    db.run_command(mongodb::bson::doc! {"collMod": name, "changeStreamPreAndPostImages": {"enabled": true}}).await?;
    Ok(db.collection(name))
}

/// Insert `docs` in batches of 1000.
pub async fn insert_all(coll: &mongodb::Collection<Document>, docs: Vec<Document>) -> anyhow::Result<()> {
    for chunk in docs.chunks(1000) {
        coll.insert_many(chunk.to_vec()).await?;
    }
    Ok(())
}

/// A `SyncPipeline` manifest for tests.
pub fn pipeline_yaml(name: &str, mongo_uri: &str, es_url: &str, namespaces: &[&str], extra_spec: &str) -> String {
    let ns: Vec<String> = namespaces.iter().map(|n| format!("    - {n}")).collect();
    format!(
        "apiVersion: monsoon.dev/v1alpha1\nkind: SyncPipeline\nmetadata:\n  name: {name}\nspec:\n  mongodb:\n    uri: \"{mongo_uri}\"\n  elasticsearch:\n    urls: [\"{es_url}\"]\n  namespaces:\n{}\n{extra_spec}",
        ns.join("\n")
    )
}

/// Re-export so tests need no direct dependency for cursors.
pub mod futures_util_shim {
    pub use futures_util::TryStreamExt;
}

/// A `monsoon` process under test.
pub struct Monsoon {
    child: Option<Child>,
    /// Port of its HTTP endpoints.
    pub http_port: u16,
    /// Its state directory (checkpoint file).
    pub state_dir: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Monsoon {
    /// Run `bin run -f <state_dir>/pipeline.yaml --state-dir <state_dir>` with `yaml`.
    pub fn start(bin: &Path, yaml: &str, state_dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(bin, yaml, state_dir, &[], &[])
    }

    /// [`Monsoon::start`] with extra arguments for `monsoon run` and environment variables.
    pub fn start_with(
        bin: &Path,
        yaml: &str,
        state_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(state_dir)?;
        let file = state_dir.join("pipeline.yaml");
        std::fs::write(&file, yaml)?;
        let http_port = free_port();
        let mut m = Self {
            child: None,
            http_port,
            state_dir: state_dir.to_path_buf(),
            log: state_dir.join("monsoon.log"),
            bin: bin.to_path_buf(),
            args: vec![
                "run".into(),
                "-f".into(),
                file.display().to_string(),
                "--state-dir".into(),
                state_dir.display().to_string(),
                "--http-addr".into(),
                format!("127.0.0.1:{http_port}"),
            ]
            .into_iter()
            .chain(extra.iter().map(|a| a.to_string()))
            .collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        m.spawn()?;
        Ok(m)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", "info,monsoon_engine=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("failed to start monsoon")?;
        self.child = Some(child);
        Ok(())
    }

    /// Start the same command again (after a kill or exit).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, true);
        }
        self.spawn()
    }

    /// Process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until its log contains `text`.
    ///
    /// # Errors
    /// When it does not within `timeout` (the log's tail in the message).
    pub fn wait_log(&self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(text) {
            anyhow::ensure!(Instant::now() < deadline, "no `{text}` in the log within {timeout:?}:\n{}", tail(&self.log(), 30));
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// GET a path of its HTTP endpoint: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    }

    /// The `/stats` document.
    pub fn stats(&self) -> Option<Value> {
        self.get("/stats").and_then(|(_, b)| serde_json::from_str(&b).ok())
    }

    /// Wait until `/stats` satisfies `pred`.
    pub fn wait_stats(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.stats() {
                if pred(&s) {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!("stats condition not met within {timeout:?}; last stats: {:?}\nlog tail:\n{}", self.stats(), tail(&self.log(), 30));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the checkpoint file of `pipeline` satisfies `pred` (it is committed every
    /// interval, so the index can converge before the checkpoint says so).
    pub fn wait_checkpoint(&self, pipeline: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(cp) = self.checkpoint(pipeline) {
                if pred(&cp) {
                    return Ok(cp);
                }
            }
            if Instant::now() > deadline {
                bail!("checkpoint condition not met within {timeout:?}; last checkpoint: {:?}", self.checkpoint(pipeline));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, true);
        }
    }

    /// SIGTERM and wait; returns the exit code and how long it took.
    pub fn terminate(&mut self) -> anyhow::Result<(Option<i32>, Duration)> {
        let mut c = self.child.take().context("not running")?;
        let started = Instant::now();
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let deadline = started + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok((status.code(), started.elapsed()));
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("monsoon did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the process to exit by itself; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<i32>> {
        let c = self.child.as_mut().context("not running")?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("monsoon still running after {timeout:?}\nlog tail:\n{}", tail(&self.log(), 30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The checkpoint file's JSON.
    pub fn checkpoint(&self, pipeline: &str) -> Option<Value> {
        let text = std::fs::read_to_string(self.state_dir.join(format!("{pipeline}.checkpoint.json"))).ok()?;
        serde_json::from_str(&text).ok()
    }
}

impl Drop for Monsoon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The usual test setup: both stand-ins and a client of each.
pub struct Stack {
    /// SecantusDB.
    pub mongo: Mongo,
    /// noida-db.
    pub es: Elastic,
    /// MongoDB client.
    pub client: mongodb::Client,
    /// Elasticsearch client.
    pub esc: Elasticsearch,
}

impl Stack {
    /// Start both stand-ins (`mongo_args` go to `secantusd-py`).
    pub async fn start(mongo_args: &[&str]) -> anyhow::Result<Self> {
        let mongo = Mongo::start(mongo_args)?;
        let es = Elastic::start()?;
        let client = mongo.client().await?;
        let esc = es.client()?;
        Ok(Self { mongo, es, client, esc })
    }

    /// A pipeline manifest pointing at these stand-ins.
    pub fn pipeline(&self, name: &str, namespaces: &[&str], extra_spec: &str) -> String {
        pipeline_yaml(name, &self.mongo.uri(), &self.es.url(), namespaces, extra_spec)
    }

    /// Wait (up to 90 s) until `db.coll` and `index` agree; the last report.
    pub async fn converged(&self, db: &str, coll: &str, index: &str) -> anyhow::Result<Report> {
        wait_converged(&self.client, &self.esc, db, coll, index, Duration::from_secs(90)).await
    }
}

/// Either search server the tests run against, behind one interface: the fault matrix runs
/// each case on noida-db and on a real OpenSearch node (which keeps shards, routing and
/// delete tombstones as Elasticsearch does; noida-db keeps no tombstones).
pub enum SearchServer {
    /// noida-db.
    Noida(Elastic),
    /// A real OpenSearch node.
    OpenSearch(opensearch::OpenSearch),
}

/// Which search server a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SearchKind {
    /// noida-db.
    Noida,
    /// A real OpenSearch node.
    OpenSearch,
}

impl SearchServer {
    /// Start one of `kind`.
    pub fn start(kind: SearchKind) -> anyhow::Result<Self> {
        Ok(match kind {
            SearchKind::Noida => Self::Noida(Elastic::start()?),
            SearchKind::OpenSearch => Self::OpenSearch(opensearch::OpenSearch::start()?),
        })
    }

    /// Base URL.
    pub fn url(&self) -> String {
        match self {
            Self::Noida(e) => e.url(),
            Self::OpenSearch(o) => o.url(),
        }
    }

    /// A client of this server.
    pub fn client(&self) -> anyhow::Result<Elasticsearch> {
        match self {
            Self::Noida(e) => e.client(),
            Self::OpenSearch(o) => o.client(),
        }
    }

    /// Stop it gracefully (SIGTERM), keeping its data: an outage.
    pub fn stop(&mut self) {
        match self {
            Self::Noida(e) => e.stop(),
            Self::OpenSearch(o) => o.stop(),
        }
    }

    /// Start it again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        match self {
            Self::Noida(e) => e.restart(),
            Self::OpenSearch(o) => o.restart(),
        }
    }
}
