//! A DNS server for `mongodb+srv://` tests, and a launcher that gives one process its own
//! `/etc/resolv.conf` pointing at it (a private mount namespace: `unshare -m` plus a bind
//! mount, so nothing changes for the rest of the machine).
//!
//! The server is `py/srv_dns.py` (dnslib, from PyPI, in the project's venv); it listens on
//! port 53 of a loopback address of its own, since resolv.conf cannot name a port. Both need
//! root, as the tests have here and in CI; a machine without it fails the test with the
//! reason, never skips it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::{project_root, stop_child, venv_bin};

/// A running DNS server; stopped on drop.
pub struct SrvDns {
    child: Child,
    /// Loopback address it answers on (port 53).
    pub addr: String,
}

impl SrvDns {
    /// Serve `zone` (see `py/srv_dns.py`: `{"srv": {...}, "txt": {...}, "a": {...}}`).
    pub fn start(zone: &serde_json::Value) -> anyhow::Result<Self> {
        let script = project_root().join("crates/testkit/py/srv_dns.py");
        // One address per test process, so parallel test binaries never share port 53.
        let addr = format!("127.0.{}.53", 10 + std::process::id() % 240);
        let mut child = Command::new(venv_bin("python"))
            .arg(&script)
            .args(["--addr", &addr, "--port", "53", "--zone", &zone.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("failed to start the test DNS server")?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            BufReader::new(out).read_line(&mut line)?;
        }
        if line.trim() != "ready" {
            stop_child(&mut child, true);
            bail!("the test DNS server did not start on {addr}:53 (it needs root to bind port 53)");
        }
        Ok(Self { child, addr })
    }

    /// A launcher script in `dir` that runs `bin` with its arguments in a private mount
    /// namespace whose `/etc/resolv.conf` names only this server. The process keeps the
    /// launcher's pid (every step `exec`s), so signals reach it directly.
    pub fn launcher(&self, dir: &Path, bin: &Path) -> anyhow::Result<PathBuf> {
        let resolv = dir.join("resolv.conf");
        std::fs::write(&resolv, format!("nameserver {}\noptions timeout:1 attempts:2\n", self.addr))?;
        let script = dir.join("with-test-dns.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec unshare --mount --propagation private sh -c 'mount --bind \"$0\" /etc/resolv.conf && exec \"$@\"' '{}' '{}' \"$@\"\n",
                resolv.display(),
                bin.display()
            ),
        )?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(script)
    }
}

impl Drop for SrvDns {
    fn drop(&mut self) {
        stop_child(&mut self.child, true);
    }
}
