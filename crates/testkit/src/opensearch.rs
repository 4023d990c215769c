//! A real OpenSearch node for the tests, beside the noida-db stand-in.
//!
//! `make opensearch` (tools/opensearch/build.sh) builds it once per OpenSearch version into
//! `${MONSOON_OPENSEARCH_CACHE:-~/.cache/monsoon/opensearch}/<version>/`: the server and module
//! jars from Maven Central and a small Java main of ours that starts an in-process `Node`
//! (single-node discovery, loopback only). [`OpenSearch::start`] runs one on a free port with
//! its own home directory, the way [`crate::Elastic`] runs noida-db. A missing build fails the
//! test with the fix; it never skips.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use elasticsearch::http::transport::Transport;
use elasticsearch::Elasticsearch;

use crate::{free_port, init_crypto, project_root, stop_child, tail, TempDir};

/// What the node prints once it serves requests (tools/opensearch, `TestNode.READY`).
const READY: &str = "monsoon-opensearch ready ";

/// How long a start may take. About 3 s here with the class-data archive on a loaded 2-core
/// machine; generous for a cold JIT on a slower one.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The OpenSearch version tools/opensearch/pom.xml pins (the cache is keyed by it).
pub fn version() -> anyhow::Result<String> {
    let pom = project_root().join("tools/opensearch/pom.xml");
    let text = std::fs::read_to_string(&pom).with_context(|| format!("failed to read {}", pom.display()))?;
    let start = text.find("<opensearch.version>").context("no <opensearch.version> in pom.xml")? + "<opensearch.version>".len();
    let len = text[start..].find('<').context("unterminated <opensearch.version>")?;
    Ok(text[start..start + len].trim().to_string())
}

/// The built node's directory, or an error saying how to build it.
pub fn node_dir() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("MONSOON_OPENSEARCH_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/monsoon/opensearch")))
        .context("neither MONSOON_OPENSEARCH_CACHE nor HOME is set")?;
    let version = version()?;
    let dir = cache.join(&version);
    // build.sh writes .stamp last: without it the build is missing or was cut short.
    if !dir.join(".stamp").exists() || !dir.join("bin/opensearch-node").exists() {
        bail!(
            "the OpenSearch {version} test node is not built ({} missing): run `make opensearch` \
             (needs Java 17 and Maven; downloads ~80 MB from Maven Central once)",
            dir.display()
        );
    }
    Ok(dir)
}

/// A real OpenSearch node (one per test), stopped on drop.
pub struct OpenSearch {
    /// Port of its HTTP API.
    pub port: u16,
    home: TempDir,
    settings: Vec<String>,
    child: Option<Child>,
}

impl OpenSearch {
    /// Start on a free port with its own home (and data) directory.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[])
    }

    /// [`OpenSearch::start`] with node settings as `key=value` (e.g.
    /// `http.max_content_length=1mb`), as `-E` gives them to the real launcher.
    pub fn start_with(settings: &[&str]) -> anyhow::Result<Self> {
        let mut node = Self {
            port: free_port(),
            home: TempDir::new("opensearch"),
            settings: settings.iter().map(|s| format!("-E{s}")).collect(),
            child: None,
        };
        node.spawn()?;
        Ok(node)
    }

    fn log_path(&self) -> PathBuf {
        self.home.path().join("server.log")
    }

    /// Everything the node logged so far (all its starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let launcher = node_dir()?.join("bin/opensearch-node");
        let readies = self.log().matches(READY).count();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let mut child = Command::new(&launcher)
            .arg("--home")
            .arg(self.home.path().join("node"))
            .arg("--http-port")
            .arg(self.port.to_string())
            .args(&self.settings)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("failed to start {}", launcher.display()))?;
        // The HTTP port opens before the cluster state (and a restarted node's indices) is
        // recovered; the ready line comes after.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.log().matches(READY).count() > readies {
                break;
            }
            if let Some(status) = child.try_wait()? {
                bail!("OpenSearch exited with {status} before it was ready:\n{}", tail(&self.log(), 40));
            }
            if Instant::now() > deadline {
                stop_child(&mut child, true);
                bail!("OpenSearch was not ready within {START_TIMEOUT:?}:\n{}", tail(&self.log(), 40));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child = Some(child);
        Ok(())
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client of this node (the `elasticsearch` crate sends plain `application/json`,
    /// which OpenSearch accepts).
    pub fn client(&self) -> anyhow::Result<Elasticsearch> {
        init_crypto();
        Ok(Elasticsearch::new(Transport::single_node(&self.url())?))
    }

    /// Process id of the node (its launcher execs the JVM), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop the node (SIGTERM: it closes its indices and exits), keeping its data.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, false);
        }
    }

    /// SIGKILL: a crash, no chance to flush (the translog makes acknowledged writes durable).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, true);
        }
    }

    /// Start again on the same port and data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for OpenSearch {
    fn drop(&mut self) {
        self.stop();
    }
}
