//! A real Kubernetes control plane for tests, in the spirit of controller-runtime's envtest:
//! etcd, kube-apiserver and kube-controller-manager as local processes on free loopback ports,
//! with their own CA, RBAC authorization and service-account tokens, so tests meet real
//! admission, structural and CEL validation, server-side apply, watches, RBAC and garbage
//! collection. There is no kubelet and no scheduler: Pods stay Pending unless a test sets their
//! status.
//!
//! The binaries are built from Go modules by `tools/k8s/build.sh` (`make k8s-bins`) into a cache
//! keyed by their versions, which come from `tools/k8s/go.mod` and `tools/k8s/etcd/go.mod`;
//! `MONSOON_K8S_BIN_DIR` names another directory holding all three. A missing binary fails the
//! test with the fix, never skips it.
//!
//! Every server runs under a small `sh` guard that holds the read end of a pipe from the test
//! process and stops the server when that pipe closes: on [`Drop`], and also when the test
//! process ends without dropping (the [`ControlPlane::shared`] instance, a killed test binary).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::tls::{openssl, Ca};
use crate::{free_port, init_crypto, tail, TempDir};

/// The Kubernetes release the binaries are built from: the `k8s.io/kubernetes` requirement of
/// `tools/k8s/go.mod` (read at compile time, so it cannot drift from what build.sh builds).
pub fn kubernetes_version() -> &'static str {
    required(include_str!("../../../tools/k8s/go.mod"), "k8s.io/kubernetes")
}

/// The etcd release: the `go.etcd.io/etcd/server/v3` requirement of `tools/k8s/etcd/go.mod`.
pub fn etcd_version() -> &'static str {
    required(include_str!("../../../tools/k8s/etcd/go.mod"), "go.etcd.io/etcd/server/v3")
}

/// The version a go.mod requires of `module` (a one-line `require` or one inside a block).
fn required(go_mod: &'static str, module: &str) -> &'static str {
    go_mod
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let first = words.next()?;
            let first = if first == "require" { words.next()? } else { first };
            (first == module).then(|| words.next()).flatten()
        })
        .next()
        .unwrap_or("unknown")
}

/// The binaries tests run.
const BINARIES: [&str; 3] = ["etcd", "kube-apiserver", "kube-controller-manager"];

/// The directory holding etcd, kube-apiserver and kube-controller-manager:
/// `MONSOON_K8S_BIN_DIR`, or the cache `tools/k8s/build.sh` fills
/// (`${MONSOON_K8S_CACHE:-$HOME/.cache/monsoon/k8s}/<kube>-etcd-<etcd>/bin`).
///
/// # Errors
/// When a binary is missing, naming the fix (`make k8s-bins`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("MONSOON_K8S_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = match std::env::var_os("MONSOON_K8S_CACHE") {
                Some(cache) => PathBuf::from(cache),
                None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache/monsoon/k8s"),
            };
            cache.join(format!("{}-etcd-{}", kubernetes_version(), etcd_version())).join("bin")
        }
    };
    for binary in BINARIES {
        if !dir.join(binary).is_file() {
            bail!(
                "the test control plane's `{binary}` is missing from {}: run `make k8s-bins` (builds kube-apiserver and \
                 kube-controller-manager {} and etcd {} from Go modules, minutes when cold, into \
                 ${{MONSOON_K8S_CACHE:-~/.cache/monsoon/k8s}}, where the tests look unless MONSOON_K8S_BIN_DIR names \
                 another directory holding all three)",
                dir.display(),
                kubernetes_version(),
                etcd_version()
            );
        }
    }
    Ok(dir)
}

/// The Service CIDR the API server allocates ClusterIPs from (never routed: no kube-proxy).
const SERVICE_CIDR: &str = "10.0.0.0/24";
/// The `kubernetes` Service's ClusterIP, first of [`SERVICE_CIDR`]; in the serving certificate.
const KUBERNETES_SERVICE_IP: &str = "10.0.0.1";
/// The issuer of service-account tokens, as in a cluster.
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How long a start may take on a busy 2-core machine (the API server alone needs ~5–15 s).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A server process under its stop guard, logging to a file.
struct Server {
    name: &'static str,
    /// The `sh` guard; it exits with the server.
    guard: Child,
    /// Closing this (drop) stops the server.
    stop: Option<ChildStdin>,
    log: PathBuf,
}

/// Runs the server in the background, stops it (SIGTERM, SIGKILL after 3 s) once standard
/// input (fd 3 here: a background list's stdin is /dev/null) reaches end of file, and exits
/// with the server's status. Stopped in order ([`ControlPlane::stop`]) each server exits
/// within a second; stopped all at once (the test process ended), etcd and the API server
/// wait on each other's connections, hence the short grace: their data dies with them anyway.
const GUARD: &str = r#"exec 3<&0
"$0" "$@" </dev/null 3<&- &
pid=$!
(
  read -r _ <&3
  kill -TERM "$pid" 2>/dev/null
  i=0
  while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 30 ]; do sleep 0.1; i=$((i + 1)); done
  kill -KILL "$pid" 2>/dev/null
) </dev/null &
wait "$pid"
"#;

impl Server {
    fn spawn(name: &'static str, bin: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&log).with_context(|| format!("failed to create {}", log.display()))?;
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg(bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("failed to start {name}"))?;
        let stop = guard.stdin.take();
        Ok(Self { name, guard, stop, log })
    }

    /// Fails when the server has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.guard.try_wait()? {
            bail!("{} exited with {status}", self.name);
        }
        Ok(())
    }

    fn stop(&mut self) {
        drop(self.stop.take());
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if self.guard.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.guard.kill();
        let _ = self.guard.wait();
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("--- {} ({}), last {lines} lines:\n{}", self.name, self.log.display(), tail(&text, lines))
    }
}

/// etcd, kube-apiserver and kube-controller-manager on free loopback ports, in a temporary
/// directory holding their certificates, keys, data, kubeconfigs and logs. Dropping it stops
/// all three and removes the directory.
pub struct ControlPlane {
    servers: Vec<Server>,
    /// The API server's secure port on 127.0.0.1.
    pub port: u16,
    /// The CA that signed the serving and client certificates (PEM).
    pub ca_cert: PathBuf,
    admin_kubeconfig: PathBuf,
    dir: TempDir,
}

impl ControlPlane {
    /// Start etcd, kube-apiserver and kube-controller-manager; returns once the API server's
    /// `/readyz` answers `ok` and the controller manager has created the `default`
    /// ServiceAccount of the `default` namespace (its controllers are running).
    ///
    /// # Errors
    /// A missing binary (with the fix), or a server that exits or is not ready within two
    /// minutes (with the tails of every log).
    pub async fn start() -> anyhow::Result<Self> {
        let bins = bin_dir()?;
        init_crypto();
        let dir = TempDir::new("k8s");
        let mut cp = Self {
            servers: Vec::new(),
            port: free_port(),
            ca_cert: PathBuf::new(),
            admin_kubeconfig: dir.path().join("admin.kubeconfig"),
            dir,
        };
        janitor(cp.dir.path())?;
        let started = Instant::now();
        match cp.boot(&bins).await {
            Ok(()) => {
                eprintln!(
                    "test control plane (Kubernetes {}, etcd {}) ready at {} in {:.1?}; files and logs in {}",
                    kubernetes_version(),
                    etcd_version(),
                    cp.server(),
                    started.elapsed(),
                    cp.dir.path().display()
                );
                Ok(cp)
            }
            Err(e) => {
                let logs = cp.log_tails(40);
                cp.stop();
                bail!("the test control plane did not start: {e:#}\n{logs}")
            }
        }
    }

    /// One control plane for the whole test binary, started by the first test that asks and
    /// stopped when the binary exits (statics are never dropped: the servers' guards see the
    /// test process's end of their pipes close). Tests share it, each in its own namespace;
    /// build clients per test ([`ControlPlane::admin_client`]), since a client belongs to the
    /// runtime that made it.
    ///
    /// # Panics
    /// When it cannot start (every test that asks fails with the same message).
    pub fn shared() -> &'static Self {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            // Started on a runtime of its own: the caller's runtime (one per test) ends with its test.
            std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("failed to build a runtime: {e}"))?
                    .block_on(Self::start())
                    .map_err(|e| format!("{e:#}"))
            })
            .join()
            .unwrap_or_else(|_| Err("starting the control plane panicked".to_string()))
        });
        match started {
            Ok(cp) => cp,
            Err(e) => panic!("{e}"),
        }
    }

    async fn boot(&mut self, bins: &Path) -> anyhow::Result<()> {
        let dir = self.dir.path().to_path_buf();
        let path = |name: &str| dir.join(name).display().to_string();

        // Certificates: one CA for serving and client certificates (the API server trusts it
        // for client certificates too), and an RSA key pair signing service-account tokens.
        let ca = Ca::new(&dir, "ca", "/CN=monsoon test cluster CA")?;
        self.ca_cert = ca.cert.clone();
        let sans = format!(
            "subjectAltName=IP:127.0.0.1,IP:{KUBERNETES_SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
             DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n"
        );
        ca.issue("apiserver", "/CN=kube-apiserver", &sans)?;
        let client = "extendedKeyUsage=clientAuth\n";
        // system:masters: the group RBAC lets do anything (as kubeadm's admin.conf).
        ca.issue("admin", "/O=system:masters/CN=monsoon-test-admin", client)?;
        // The user the bootstrap RBAC policy binds to the controller manager's role; its
        // controllers then act as their own ServiceAccounts (--use-service-account-credentials).
        ca.issue("controller-manager", "/CN=system:kube-controller-manager", client)?;
        openssl(&dir, &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key"])?;
        openssl(&dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;

        let server = self.server();
        write_kubeconfig(&self.admin_kubeconfig, &server, &ca.cert, "admin", &format!(
            "    client-certificate: {}\n    client-key: {}\n",
            path("admin.pem"),
            path("admin.key")
        ), None)?;
        let kcm_kubeconfig = dir.join("controller-manager.kubeconfig");
        write_kubeconfig(&kcm_kubeconfig, &server, &ca.cert, "controller-manager", &format!(
            "    client-certificate: {}\n    client-key: {}\n",
            path("controller-manager.pem"),
            path("controller-manager.key")
        ), None)?;

        // etcd: plain HTTP on loopback, no fsync (the data dies with the test).
        let (etcd_client, etcd_peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_args = [
            "--name=monsoon-test".to_string(),
            format!("--data-dir={}", path("etcd")),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=monsoon-test={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ];
        self.servers.push(Server::spawn("etcd", &bins.join("etcd"), &etcd_args, dir.join("etcd.log"))?);
        self.wait_tcp(etcd_client, "etcd").await?;

        let apiserver_args = [
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            // 1.37 refuses a loopback address for the `kubernetes` Service's endpoints (the
            // `lease` reconciler's check); nothing in a test reaches the API server through
            // that Service (no kube-proxy), so nothing maintains them.
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={}", self.port),
            format!("--cert-dir={}", path("apiserver-certs")),
            format!("--tls-cert-file={}", path("apiserver.pem")),
            format!("--tls-private-key-file={}", path("apiserver.key")),
            format!("--client-ca-file={}", ca.cert.display()),
            "--authorization-mode=RBAC".into(),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            format!("--service-account-key-file={}", path("sa.pub")),
            format!("--service-account-signing-key-file={}", path("sa.key")),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        self.servers.push(Server::spawn("kube-apiserver", &bins.join("kube-apiserver"), &apiserver_args, dir.join("kube-apiserver.log"))?);
        let admin = self.admin_client().await?;
        self.wait_ready(&admin).await?;

        let kcm_args = [
            format!("--kubeconfig={}", kcm_kubeconfig.display()),
            // No delegated authentication or authorization for its own HTTPS endpoint (its
            // /healthz is always allowed; nothing else is used): with them it keeps logging that
            // the API server has no front-proxy CA (--requestheader-client-ca-file).
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", free_port()),
            format!("--cert-dir={}", path("controller-manager-certs")),
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", path("sa.key")),
            format!("--root-ca-file={}", ca.cert.display()),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // One controller manager: nothing to elect, and no wait for a lease.
            "--leader-elect=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        self.servers.push(Server::spawn(
            "kube-controller-manager",
            &bins.join("kube-controller-manager"),
            &kcm_args,
            dir.join("kube-controller-manager.log"),
        )?);
        self.wait_controllers(&admin).await
    }

    async fn wait_tcp(&mut self, port: u16, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("{what} did not listen on port {port} within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn wait_ready(&mut self, admin: &kube::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let request = http::Request::get("/readyz").body(Vec::new())?;
            let last = match admin.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => format!("{e}"),
            };
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("kube-apiserver was not ready within {START_TIMEOUT:?}; last /readyz: {last}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_controllers(&mut self, admin: &kube::Client) -> anyhow::Result<()> {
        let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
        let deadline = Instant::now() + START_TIMEOUT;
        while accounts.get_opt("default").await?.is_none() {
            self.check_running()?;
            if Instant::now() > deadline {
                bail!("kube-controller-manager did not create the `default` ServiceAccount within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        self.servers.iter_mut().try_for_each(Server::check_running)
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The temporary directory holding the certificates, data, kubeconfigs and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A kubeconfig for a cluster administrator (client certificate in `system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// A client acting as the cluster administrator.
    ///
    /// # Errors
    /// When the kubeconfig cannot be read or the client built.
    pub async fn admin_client(&self) -> anyhow::Result<kube::Client> {
        client_from(&self.admin_kubeconfig).await
    }

    /// Mint a token for the ServiceAccount `namespace/name` (TokenRequest API, valid one hour)
    /// and write a kubeconfig using it, its context's namespace set to `namespace`; returns its
    /// path. Whatever uses it gets exactly the RBAC permissions bound to that ServiceAccount.
    /// The ServiceAccount must exist.
    ///
    /// # Errors
    /// When the TokenRequest fails (e.g. no such ServiceAccount).
    pub async fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.admin_client().await?, namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                // None: the API server's own audiences (--api-audiences, its issuer by default).
                audiences: Vec::new(),
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            },
            ..TokenRequest::default()
        };
        let minted = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("failed to mint a token for ServiceAccount {namespace}/{name}"))?;
        let token = minted.status.context("TokenRequest answered without a status")?.token;
        let file = self.dir.path().join(format!("sa-{namespace}-{name}.kubeconfig"));
        let user = format!("sa-{namespace}-{name}");
        write_kubeconfig(&file, &self.server(), &self.ca_cert, &user, &format!("    token: {token}\n"), Some(namespace))?;
        Ok(file)
    }

    /// A client acting as the ServiceAccount `namespace/name` through a minted token
    /// ([`ControlPlane::service_account_kubeconfig`]); its default namespace is `namespace`.
    ///
    /// # Errors
    /// As [`ControlPlane::service_account_kubeconfig`].
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> anyhow::Result<kube::Client> {
        client_from(&self.service_account_kubeconfig(namespace, name).await?).await
    }

    /// The last `lines` lines of each server's log.
    pub fn log_tails(&self, lines: usize) -> String {
        self.servers.iter().map(|s| s.log_tail(lines)).collect::<Vec<_>>().join("\n")
    }

    /// Stop every server, the last started first.
    pub fn stop(&mut self) {
        while let Some(mut server) = self.servers.pop() {
            server.stop();
        }
    }
}

/// GET `path` as a `meta.k8s.io/v1` Table, the way `kubectl get` asks for a list: the API
/// server fills the columns from the resource's `additionalPrinterColumns` (for a custom
/// resource) and answers `{"columnDefinitions": [...], "rows": [{"cells": [...]}]}`.
///
/// # Errors
/// When the request fails.
pub async fn table(client: &kube::Client, path: &str) -> anyhow::Result<serde_json::Value> {
    let request = http::Request::get(path)
        .header(http::header::ACCEPT, "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())?;
    Ok(client.request::<serde_json::Value>(request).await?)
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test control plane logs ({}):\n{}", self.dir.path().display(), self.log_tails(30));
        }
        self.stop();
    }
}

/// Remove `dir` once the test process has ended (its end of the pipe closes) and the servers'
/// guards have had time to stop them: for the [`ControlPlane::shared`] instance, which is never
/// dropped. Harmless after an ordinary drop, which removes the directory itself.
fn janitor(dir: &Path) -> anyhow::Result<()> {
    static JANITORS: std::sync::Mutex<Vec<ChildStdin>> = std::sync::Mutex::new(Vec::new());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"read -r _; sleep 5; rm -rf "$0""#)
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("failed to start the control plane's janitor")?;
    if let (Some(stdin), Ok(mut janitors)) = (child.stdin.take(), JANITORS.lock()) {
        janitors.push(stdin);
    }
    Ok(())
}

fn write_kubeconfig(file: &Path, server: &str, ca: &Path, user: &str, credentials: &str, namespace: Option<&str>) -> anyhow::Result<()> {
    let namespace = namespace.map(|ns| format!("    namespace: {ns}\n")).unwrap_or_default();
    let mut f = std::fs::File::create(file).with_context(|| format!("failed to write {}", file.display()))?;
    write!(
        f,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: monsoon-test\n  cluster:\n    server: {server}\n    certificate-authority: {}\n\
         users:\n- name: {user}\n  user:\n{credentials}contexts:\n- name: {user}\n  context:\n    cluster: monsoon-test\n    user: {user}\n{namespace}\
         current-context: {user}\n",
        ca.display()
    )?;
    Ok(())
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    init_crypto();
    let config = Kubeconfig::read_from(kubeconfig).with_context(|| format!("failed to read {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_the_go_modules() {
        assert!(kubernetes_version().starts_with("v1."), "{}", kubernetes_version());
        assert!(etcd_version().starts_with("v3."), "{}", etcd_version());
    }
}
