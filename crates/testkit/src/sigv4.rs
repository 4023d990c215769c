//! A reverse proxy that verifies AWS SigV4 signatures in front of noida-db: the test double of
//! Amazon OpenSearch Service's front door (`py/sigv4_proxy.py`, botocore from PyPI in the
//! project's venv). Requests whose signature botocore does not recompute identically get 403,
//! as from AWS; the others reach noida-db unchanged.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::{project_root, stop_child, venv_bin, TempDir};

/// What the proxy accepts.
#[derive(Clone, Debug)]
pub struct SigV4Options {
    /// Region of the credential scope.
    pub region: String,
    /// `es` or `aoss` (`aoss` also requires a signed `x-amz-content-sha256`).
    pub service: String,
    /// The one access key id it knows.
    pub access_key: String,
    /// Its secret access key.
    pub secret_key: String,
    /// The session token requests must carry, if any.
    pub session_token: Option<String>,
    /// Also serve `/ecs-credentials` (the ECS container credentials endpoint), issuing a new
    /// session token valid this many seconds on each fetch; only issued, unexpired tokens
    /// are then accepted.
    pub ecs_credentials_seconds: Option<u64>,
}

/// A running proxy; stopped on drop.
pub struct SigV4Proxy {
    child: Child,
    /// Port it listens on (127.0.0.1).
    pub port: u16,
    dir: TempDir,
}

impl SigV4Proxy {
    /// Start in front of `upstream` (`http://127.0.0.1:port`).
    pub fn start(upstream: &str, options: &SigV4Options) -> anyhow::Result<Self> {
        let dir = TempDir::new("sigv4");
        let log = std::fs::File::create(dir.path().join("proxy.log"))?;
        let script = project_root().join("crates/testkit/py/sigv4_proxy.py");
        let mut command = Command::new(venv_bin("python"));
        command
            .arg(&script)
            .args(["--upstream", upstream, "--region", &options.region, "--service", &options.service])
            .args(["--access-key", &options.access_key, "--secret-key", &options.secret_key]);
        if let Some(token) = &options.session_token {
            command.args(["--session-token", token]);
        }
        if let Some(seconds) = options.ecs_credentials_seconds {
            command.args(["--ecs-credentials", &seconds.to_string()]);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("failed to start the SigV4 proxy")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        let Some(port) = line.trim().strip_prefix("ready ").and_then(|p| p.parse().ok()) else {
            stop_child(&mut child, true);
            let log = std::fs::read_to_string(dir.path().join("proxy.log")).unwrap_or_default();
            bail!("the SigV4 proxy did not start (is botocore installed? run `make venv`):\n{log}");
        };
        Ok(Self { child, port, dir })
    }

    /// Base URL to give monsoon.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The ECS container credentials endpoint (with `ecs_credentials_seconds`).
    pub fn ecs_credentials_url(&self) -> String {
        format!("{}/ecs-credentials", self.url())
    }

    /// One line per request: `verified …`, `rejected …: why`, `issued …`.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("proxy.log")).unwrap_or_default()
    }
}

impl Drop for SigV4Proxy {
    fn drop(&mut self) {
        stop_child(&mut self.child, true);
    }
}
