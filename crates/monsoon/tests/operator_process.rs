//! `monsoon operator` and `monsoon worker` as processes against a real Kubernetes control plane
//! (etcd, kube-apiserver, kube-controller-manager from `make k8s-bins`; see
//! `monsoon_testkit::control_plane`), with real watches, admission, RBAC and garbage collection.
//!
//! - The operator runs with exactly the chart's RBAC: each test installs its own release of
//!   `charts/monsoon` (rendered by `charts/render.py`, release namespace `<test>-system`,
//!   `watchNamespaces: [<test>]`, so tests running at once never share a pipeline or a leader
//!   Lease) and runs the Deployment's container arguments and environment as a local process,
//!   with a token minted for the chart's ServiceAccount.
//! - There is no kubelet or scheduler, so [`Kubelet`] stands in for both: it registers a Node
//!   (heartbeats included), binds each worker pod the StatefulSet controller creates to it, and
//!   runs `monsoon worker` with the pod's own arguments and environment (Secrets resolved as a
//!   kubelet does) and a token minted for the pod's ServiceAccount, so the Role the operator
//!   made is all a worker gets. It reports the pod Running, Ready as the worker's `/readyz`
//!   answers, restarts a worker that exits, and on a pod's graceful deletion sends SIGTERM
//!   (SIGKILL after the grace period) and lets the pod go only once the worker has exited, as
//!   a kubelet does: so "no worker pod left" means what it means in a cluster. The image in the
//!   pod spec is ignored: the image is this build's `monsoon`.
//! - MongoDB and Elasticsearch are the stand-ins (SecantusDB, noida-db).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::GroupVersionKind;
use kube::ResourceExt;
use mongodb::bson::Document;
use monsoon_api::{SyncPipeline, SyncPipelineStatus};
use monsoon_testkit::control_plane::{table, ControlPlane};
use monsoon_testkit::futures_util_shim::TryStreamExt;
use monsoon_testkit::{free_port, insert_all, project_root, sample_docs, tail, venv_bin, Stack, TempDir};
use serde_json::{json, Value};

const CRD: &str = include_str!("../../../crds/syncpipeline.yaml");
/// Field manager of what the tests themselves apply (the operator's is `monsoon-operator`).
const MANAGER: &str = "monsoon-tests";
/// Label selecting every worker pod (`workload::pod_selector` without the pipeline).
const WORKER_PODS: &str = "app.kubernetes.io/name=monsoon-worker";

fn monsoon_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_monsoon"))
}

/// Poll `check` every 200 ms until it gives a value or `timeout` passes; panics with `what`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kind_of(api_version: &str, kind: &str) -> GroupVersionKind {
    match api_version.split_once('/') {
        Some((g, v)) => GroupVersionKind::gvk(g, v, kind),
        None => GroupVersionKind::gvk("", api_version, kind),
    }
}

/// Server-side apply of any object (as `kubectl apply --server-side`).
async fn apply_object(client: &kube::Client, doc: &Value) {
    let kind = doc["kind"].as_str().expect("kind");
    let gvk = kind_of(doc["apiVersion"].as_str().expect("apiVersion"), kind);
    let (ar, caps) = kube::discovery::pinned_kind(client, &gvk).await.unwrap_or_else(|e| panic!("{kind} is not served: {e}"));
    let name = doc["metadata"]["name"].as_str().expect("name");
    let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
        Api::namespaced_with(client.clone(), doc["metadata"]["namespace"].as_str().unwrap_or("default"), &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    };
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(doc))
        .await
        .unwrap_or_else(|e| panic!("{kind} {name} refused: {e}"));
}

/// The CRD, applied (idempotent: every test calls it) and Established.
async fn install_crd(client: &kube::Client) {
    let crd: Value = serde_saphyr::from_str(CRD).expect("crds/syncpipeline.yaml parses");
    apply_object(client, &crd).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd["metadata"]["name"].as_str().expect("name").to_string();
    wait_for("the CRD is Established", Duration::from_secs(30), || {
        let (crds, name) = (crds.clone(), name.clone());
        async move {
            let crd = crds.get(&name).await.ok()?;
            let established = crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;
}

async fn create_namespace(client: &kube::Client, name: &str) {
    apply_object(client, &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})).await;
}

/// One install of `charts/monsoon`: release `<test>-op` in `<test>-system`, watching `<test>`.
struct Release {
    /// Release (and ServiceAccount) name.
    name: String,
    /// Release namespace: the operator's ServiceAccount and leader Lease.
    namespace: String,
    /// The one namespace it watches, where the tests' pipelines live.
    watched: String,
    /// The chart's operator Deployment (its pods are the processes the tests start).
    deployment: Value,
    dir: TempDir,
}

/// Render the chart as `helm template` would and apply every object but the Deployment (whose
/// pods, with no kubelet here, are the operator processes the tests start from its spec).
async fn install(cp: &ControlPlane, test: &str) -> Release {
    let admin = cp.admin_client().await.expect("admin client");
    install_crd(&admin).await;
    let release = Release {
        name: format!("{test}-op"),
        namespace: format!("{test}-system"),
        watched: test.to_string(),
        deployment: Value::Null,
        dir: TempDir::new(test),
    };
    create_namespace(&admin, &release.namespace).await;
    create_namespace(&admin, &release.watched).await;
    let values = release.dir.path().join("values.yaml");
    std::fs::write(&values, format!("watchNamespaces: [{}]\n", release.watched)).expect("values file");
    let rendered = Command::new(venv_bin("python"))
        .arg(project_root().join("charts/render.py"))
        .args(["--stdout", "--release", &release.name, "--namespace", &release.namespace, "-f"])
        .arg(&values)
        .output()
        .expect("charts/render.py runs (make venv)");
    assert!(rendered.status.success(), "charts/render.py: {}", String::from_utf8_lossy(&rendered.stderr));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&String::from_utf8_lossy(&rendered.stdout)).expect("rendered YAML");
    let mut deployment = None;
    let mut kinds = Vec::new();
    for doc in docs.into_iter().filter(Value::is_object) {
        kinds.push(doc["kind"].as_str().unwrap_or_default().to_string());
        if doc["kind"] == "Deployment" {
            deployment = Some(doc);
        } else {
            apply_object(&admin, &doc).await;
        }
    }
    for kind in ["ServiceAccount", "Role", "RoleBinding"] {
        assert!(kinds.iter().any(|k| k == kind), "the chart rendered no {kind}: {kinds:?}");
    }
    Release {
        deployment: deployment.expect("the chart renders a Deployment"),
        ..release
    }
}

/// A process under test: `monsoon operator` or `monsoon worker`.
struct Process {
    child: Option<Child>,
    log: PathBuf,
    http_port: u16,
    what: String,
}

impl Process {
    fn spawn(what: &str, args: &[String], env: &[(String, String)], log: PathBuf, http_port: u16) -> Self {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        // Only what the pod would have: its environment, plus where its token is.
        let child = Command::new(monsoon_bin())
            .env_clear()
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .expect("monsoon starts");
        Self {
            child: Some(child),
            log,
            http_port,
            what: what.to_string(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.pid().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    /// Exited yet? (its status, once).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "{} still running after {timeout:?}\n{}", self.what, tail(&self.log(), 30));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// GET `path` of its HTTP endpoint: (status, body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let status = text.split(' ').nth(1)?.parse().ok()?;
        Some((status, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} ({}), last 40 lines:\n{}", self.what, self.log.display(), tail(&self.log(), 40));
        }
        if let Some(child) = self.child.as_mut() {
            if matches!(child.try_wait(), Ok(None)) {
                // A stopped zombie is resumed first, so that it dies now rather than when resumed.
                let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).stderr(Stdio::null()).status();
            }
        }
        self.kill();
    }
}

impl Release {
    /// Start one replica of the operator the way the chart's Deployment runs it: its container
    /// arguments (the HTTP port moved to a free one) and environment (`POD_NAME` is
    /// `identity`), authenticated with a token of the chart's ServiceAccount.
    async fn start_operator(&self, cp: &ControlPlane, identity: &str) -> Process {
        self.start_operator_with(cp, identity, &[]).await
    }

    /// [`Release::start_operator`] with `extra` arguments after the chart's.
    async fn start_operator_with(&self, cp: &ControlPlane, identity: &str, extra: &[&str]) -> Process {
        let pod = &self.deployment["spec"]["template"]["spec"];
        let account = pod["serviceAccountName"].as_str().expect("serviceAccountName");
        let kubeconfig = cp.service_account_kubeconfig(&self.namespace, account).await.expect("operator token");
        let container = &pod["containers"][0];
        let port = free_port();
        let args: Vec<String> = container["args"]
            .as_array()
            .expect("args")
            .iter()
            .map(|a| a.as_str().expect("string arg"))
            .map(|a| if a.starts_with("--http-addr=") { format!("--http-addr=127.0.0.1:{port}") } else { a.to_string() })
            .chain(extra.iter().map(ToString::to_string))
            .collect();
        let mut env = vec![("KUBECONFIG".to_string(), kubeconfig.display().to_string())];
        for e in container["env"].as_array().cloned().unwrap_or_default() {
            let name = e["name"].as_str().expect("env name").to_string();
            let value = match (&e["value"], e["valueFrom"]["fieldRef"]["fieldPath"].as_str()) {
                (Value::String(v), _) => v.clone(),
                (_, Some("metadata.name")) => identity.to_string(),
                (_, Some("metadata.namespace")) => self.namespace.clone(),
                _ => panic!("the operator Deployment's env {e} is not something this test can fill in"),
            };
            env.push((name, value));
        }
        Process::spawn(&format!("operator {identity}"), &args, &env, self.dir.path().join(format!("{identity}.log")), port)
    }
}

/// A worker pod's container as the local kubelet runs it.
struct Container {
    uid: String,
    process: Process,
    restarts: u32,
    ready: Option<bool>,
    /// When the pod's deletion was seen and its worker sent SIGTERM.
    terminating: Option<Instant>,
}

/// Stands in for the kubelet of the worker pods of one namespace (see the module docs).
struct Kubelet {
    state: Arc<tokio::sync::Mutex<KubeletState>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct KubeletState {
    containers: BTreeMap<String, Container>,
    /// Pods (by uid) on a partitioned node: the kubelet neither runs nor stops them.
    partitioned: BTreeSet<String>,
}

impl Kubelet {
    /// Registers a Node `<namespace>-node` and runs the worker pods of `namespace` on it.
    async fn start(cp: &'static ControlPlane, admin: kube::Client, namespace: &str, dir: &Path) -> Self {
        let node = format!("{namespace}-node");
        apply_object(&admin, &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})).await;
        let state = Arc::new(tokio::sync::Mutex::new(KubeletState::default()));
        let (ns, dir, st) = (namespace.to_string(), dir.to_path_buf(), state.clone());
        let task = tokio::spawn(async move {
            let mut heartbeat = Instant::now() - Duration::from_secs(60);
            loop {
                if heartbeat.elapsed() > Duration::from_secs(10) && node_heartbeat(&admin, &node).await {
                    heartbeat = Instant::now();
                }
                sync_pods(cp, &admin, &ns, &node, &dir, &st).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { state, task }
    }

    /// SIGKILL the container of `pod` (the kubelet then restarts it, as `restartPolicy: Always`).
    async fn kill(&self, pod: &str) {
        let mut state = self.state.lock().await;
        let c = state.containers.get_mut(pod).expect("a container of that pod");
        c.process.signal("-KILL");
    }

    /// The node of `pod` is cut off: its worker is frozen (SIGSTOP) and this kubelet forgets
    /// it. Returns the process, to be resumed (SIGCONT) as a zombie.
    async fn partition(&self, pod: &str) -> Process {
        let mut state = self.state.lock().await;
        let c = state.containers.remove(pod).expect("a container of that pod");
        state.partitioned.insert(c.uid);
        c.process.signal("-STOP");
        c.process
    }

    async fn restarts(&self, pod: &str) -> u32 {
        self.state.lock().await.containers.get(pod).map_or(0, |c| c.restarts)
    }

    async fn logs(&self) -> String {
        assert!(!self.task.is_finished(), "the test kubelet stopped (its panic is above)");
        let state = self.state.lock().await;
        state.containers.iter().map(|(pod, c)| format!("--- {pod}:\n{}", tail(&c.process.log(), 30))).collect()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Node's Ready condition, as a kubelet posts it (else the node lifecycle controller
/// marks the node unreachable and its pods not ready).
async fn node_heartbeat(admin: &kube::Client, node: &str) -> bool {
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let status = json!({"status": {"conditions": [{
        "type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the test's kubelet",
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    }]}});
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(admin.clone());
    nodes.patch_status(node, &PatchParams::default(), &Patch::Merge(&status)).await.is_ok()
}

/// One pass of the stand-in kubelet.
async fn sync_pods(cp: &ControlPlane, admin: &kube::Client, ns: &str, node: &str, dir: &Path, state: &tokio::sync::Mutex<KubeletState>) {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let Ok(list) = pods.list(&ListParams::default().labels(WORKER_PODS)).await else { return };
    let live: BTreeMap<String, Pod> = list.items.into_iter().map(|p| (p.name_any(), p)).collect();
    // Scheduling: every new worker pod goes to this node. A pod on a node is deleted
    // gracefully: it stays, marked, until its kubelet has stopped its container.
    for (name, pod) in &live {
        if pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_none() && pod.metadata.deletion_timestamp.is_none() {
            let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name}, "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
            let _ = pods.create_subresource::<_, Value>("binding", name, &PostParams::default(), &binding).await;
        }
    }
    let mut state = state.lock().await;
    // Pods being deleted: SIGTERM, SIGKILL after their grace period, and once the worker has
    // exited, the pod is let go (deleted at once, as a kubelet does).
    let gone_now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    for (name, pod) in &live {
        if pod.metadata.deletion_timestamp.is_none() {
            continue;
        }
        let Some(c) = state.containers.get_mut(name) else {
            // Never started here: nothing to stop.
            if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node) {
                let _ = pods.delete(name, &gone_now).await;
            }
            continue;
        };
        let grace = Duration::from_secs(u64::try_from(pod.metadata.deletion_grace_period_seconds.unwrap_or(30)).unwrap_or(30));
        match c.terminating {
            _ if c.process.exited().is_some() => {
                if pods.delete(name, &gone_now).await.is_ok() {
                    state.containers.remove(name);
                }
            }
            None => {
                c.process.signal("-TERM");
                c.terminating = Some(Instant::now());
            }
            Some(since) if since.elapsed() > grace => c.process.signal("-KILL"),
            Some(_) => {}
        }
    }
    // Pods gone (force-deleted, or replaced by a new pod of the same name): stop their containers.
    let gone: Vec<String> = state
        .containers
        .iter()
        .filter(|(name, c)| live.get(*name).and_then(|p| p.metadata.uid.as_deref()) != Some(c.uid.as_str()))
        .map(|(name, _)| name.clone())
        .collect();
    for name in gone {
        if let Some(mut c) = state.containers.remove(&name) {
            if c.process.exited().is_none() {
                c.process.signal("-TERM");
            }
            // Reaped in the background: it has its grace period to finish.
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(60), c.process.wait_exit(Duration::from_secs(60))).await;
            });
        }
    }
    for (name, pod) in &live {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        if !bound || pod.metadata.deletion_timestamp.is_some() || state.partitioned.contains(&uid) {
            continue;
        }
        let restart = match state.containers.get_mut(name) {
            None => Some(0),
            Some(c) => c.process.exited().map(|_| c.restarts + 1),
        };
        if let Some(restarts) = restart {
            let process = run_worker(cp, admin, pod, dir).await;
            state.containers.insert(name.clone(), Container { uid: uid.clone(), process, restarts, ready: None, terminating: None });
        }
        let Some(c) = state.containers.get_mut(name) else { continue };
        let ready = c.process.exited().is_none() && c.process.get("/readyz").is_some_and(|(code, _)| code == 200);
        if c.ready != Some(ready) {
            let truth = if ready { "True" } else { "False" };
            let status = json!({"status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": truth}, {"type": "ContainersReady", "status": truth}],
            }});
            if pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await.is_ok() {
                c.ready = Some(ready);
            }
        }
    }
}

/// `monsoon worker` as pod `pod` would run it: the container's arguments (the HTTP port
/// moved to a free one) and environment (downward API and `secretKeyRef`s filled in as a
/// kubelet does), and a token minted for the pod's ServiceAccount.
async fn run_worker(cp: &ControlPlane, admin: &kube::Client, pod: &Pod, dir: &Path) -> Process {
    let name = pod.name_any();
    let ns = pod.namespace().expect("namespace");
    let spec = pod.spec.as_ref().expect("pod spec");
    let account = spec.service_account_name.as_deref().expect("serviceAccountName");
    let kubeconfig = cp.service_account_kubeconfig(&ns, account).await.expect("worker token");
    let container = &spec.containers[0];
    // The ServiceAccount admission plugin adds the projected token volume
    // (`kube-api-access-*`): the minted token given through KUBECONFIG stands for it.
    for mount in container.volume_mounts.iter().flatten() {
        assert!(
            mount.name == "tmp" || mount.name.starts_with("kube-api-access-"),
            "the test kubelet mounts no volumes but /tmp (an emptyDir) and the token; {name} wants {}",
            mount.name
        );
    }
    let port = free_port();
    let args: Vec<String> = container
        .args
        .iter()
        .flatten()
        .map(|a| if a.starts_with("--http-addr=") { format!("--http-addr=127.0.0.1:{port}") } else { a.clone() })
        .collect();
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    let mut env = vec![("KUBECONFIG".to_string(), kubeconfig.display().to_string())];
    for e in container.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                if let Some(field) = &from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.name" => name.clone(),
                        "metadata.namespace" => ns.clone(),
                        other => panic!("the test kubelet does not fill fieldRef {other}"),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    let secret = secrets.get(&r.name).await.unwrap_or_else(|e| panic!("Secret {} of pod {name}: {e}", r.name));
                    let bytes = secret.data.and_then(|d| d.get(&r.key).cloned()).unwrap_or_else(|| panic!("key {} of Secret {}", r.key, r.name));
                    String::from_utf8(bytes.0).expect("UTF-8 secret")
                } else {
                    panic!("the test kubelet does not fill env {}", e.name)
                }
            }
            (None, None) => String::new(),
        };
        env.push((e.name.clone(), value));
    }
    let log = dir.join(format!("{name}-{}.log", &pod.metadata.uid.clone().unwrap_or_default()[..8]));
    Process::spawn(&format!("worker {name}"), &args, &env, log, port)
}

/// Nothing went wrong on the operator's side: no reconcile failed or was retried, no
/// permission was missing (it logs those as WARN or ERROR).
fn assert_quiet(operator: &Process) {
    let log = operator.log();
    let complaints: Vec<&str> = log.lines().filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\"")).collect();
    assert!(complaints.is_empty(), "{} complained:\n{}", operator.what, complaints.join("\n"));
}

fn condition<'a>(status: &'a SyncPipelineStatus, type_: &str) -> Option<&'a monsoon_api::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

fn is_on(status: &SyncPipelineStatus, type_: &str) -> bool {
    condition(status, type_).is_some_and(|c| c.status == "True")
}

fn is_off(status: &SyncPipelineStatus, type_: &str) -> bool {
    condition(status, type_).is_some_and(|c| c.status == "False")
}

/// The pipeline's status once `check` holds.
async fn wait_status(api: &Api<SyncPipeline>, name: &str, what: &str, timeout: Duration, check: impl Fn(&SyncPipeline) -> bool) -> SyncPipeline {
    let last = std::sync::Mutex::new(None);
    let found = tokio::time::timeout(timeout, async {
        loop {
            if let Ok(p) = api.get(name).await {
                if check(&p) {
                    return p;
                }
                *last.lock().expect("lock") = Some(p.status);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{name}: {what}, not within {timeout:?}; last status: {:#?}", last.lock().expect("lock")))
}

fn status_of(p: &SyncPipeline) -> SyncPipelineStatus {
    p.status.clone().unwrap_or_default()
}

/// Events about pipeline `name` with `reason`.
async fn wait_event(client: &kube::Client, ns: &str, name: &str, reason: &str) -> Event {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("an Event {reason} about {name}"), Duration::from_secs(30), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some(reason) && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
        }
    })
    .await
}

fn pipeline(name: &str, mongodb: Value, es_url: &str, extra: Value) -> SyncPipeline {
    let mut spec = json!({
        "mongodb": mongodb,
        "elasticsearch": {"urls": [es_url]},
        "namespaces": ["shop.orders"],
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(json!({
        "apiVersion": "monsoon.dev/v1alpha1",
        "kind": "SyncPipeline",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .expect("a SyncPipeline")
}

fn from_secret() -> Value {
    json!({"uriFrom": {"secretKeyRef": {"name": "mongo", "key": "uri"}}})
}

async fn create_secret(client: &kube::Client, ns: &str, uri: &str) {
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "mongo"}, "stringData": {"uri": uri}})).expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns).create(&PostParams::default(), &secret).await.expect("Secret created");
}

fn worker_env<'a>(sts: &'a StatefulSet, name: &str) -> Option<&'a k8s_openapi::api::core::v1::EnvVar> {
    sts.spec.as_ref()?.template.spec.as_ref()?.containers[0].env.iter().flatten().find(|e| e.name == name)
}

fn pipeline_env(sts: &StatefulSet) -> Value {
    serde_json::from_str(worker_env(sts, "MONSOON_PIPELINE").and_then(|e| e.value.as_deref()).unwrap_or("null")).expect("MONSOON_PIPELINE is JSON")
}

fn replicas(sts: &StatefulSet) -> i32 {
    sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(-1)
}

async fn checkpoint_names(cms: &Api<ConfigMap>, pipeline: &str) -> BTreeSet<String> {
    let list = cms
        .list(&ListParams::default().labels(&format!("monsoon.dev/pipeline={pipeline},monsoon.dev/checkpoint=true")))
        .await
        .expect("list ConfigMaps");
    list.items.iter().map(ResourceExt::name_any).collect()
}

fn names(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(ToString::to_string).collect()
}

/// The operator process, with the chart's RBAC, against the real API server: an invalid spec
/// and a missing Secret as conditions and Events; the workload (StatefulSet, ServiceAccount,
/// Role, RoleBinding, Service, checkpoint ConfigMaps) once the Secret exists; a spec change;
/// an invalid change that leaves the workers alone; pause and resume; a re-shard; deletion
/// through the finalizer with both retention policies (the garbage collector removes what the
/// pipeline owned). No worker runs here (pods stay Pending).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_process_takes_a_pipeline_through_its_life() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.expect("admin client");
    let release = install(cp, "life").await;
    let operator = release.start_operator(cp, "life-op-0").await;
    let ns = release.watched.as_str();
    let pipelines: Api<SyncPipeline> = Api::namespaced(admin.clone(), ns);
    let sets: Api<StatefulSet> = Api::namespaced(admin.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let started = Instant::now();

    // An invalid spec (one the CRD cannot refuse): a condition and an Event, no workload.
    let broken = pipeline("broken", json!({"uri": "mongodb://127.0.0.1:9/"}), "http://127.0.0.1:9", json!({"namespaces": ["admin.users"]}));
    pipelines.create(&PostParams::default(), &broken).await.expect("the CRD takes it");
    let p = wait_status(&pipelines, "broken", "InvalidSpec", Duration::from_secs(30), |p| is_on(&status_of(p), "InvalidSpec")).await;
    let status = status_of(&p);
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert!(is_off(&status, "Ready"), "{status:#?}");
    assert!(condition(&status, "InvalidSpec").expect("condition").message.contains("namespaces"), "{status:#?}");
    // kstatus: Stalled, with this generation observed (Flux reports it as failed, not pending).
    assert!(is_on(&status, "Stalled") && is_off(&status, "Reconciling"), "{status:#?}");
    assert_eq!(status.observed_generation, p.metadata.generation);
    assert!(p.finalizers().is_empty(), "a pipeline that never ran needs no finalizer: {:?}", p.finalizers());
    wait_event(&admin, ns, "broken", "InvalidSpec").await;
    assert!(sets.get_opt("broken-worker").await.expect("get").is_none(), "an invalid pipeline got workers");
    eprintln!("invalid spec shown after {:.1?}", started.elapsed());

    // A missing Secret: a condition and an Event until it exists; then the workload.
    let orders = pipeline("orders", from_secret(), "http://127.0.0.1:9", json!({}));
    pipelines.create(&PostParams::default(), &orders).await.expect("created");
    let p = wait_status(&pipelines, "orders", "CredentialsMissing", Duration::from_secs(30), |p| is_on(&status_of(p), "CredentialsMissing")).await;
    let message = condition(&status_of(&p), "CredentialsMissing").expect("condition").message.clone();
    assert!(message.contains("Secret `mongo` not found"), "{message}");
    assert_eq!(condition(&status_of(&p), "Stalled").map(|c| c.reason.as_str()), Some("CredentialsMissing"));
    wait_event(&admin, ns, "orders", "CredentialsMissing").await;
    assert!(sets.get_opt("orders-worker").await.expect("get").is_none(), "workers started without their Secret");
    create_secret(&admin, ns, "mongodb://127.0.0.1:9/").await;
    let secret_at = Instant::now();
    let p = wait_status(&pipelines, "orders", "CredentialsMissing cleared", Duration::from_secs(60), |p| is_off(&status_of(p), "CredentialsMissing")).await;
    eprintln!("the Secret's creation was noticed after {:.1?}", secret_at.elapsed());
    let uid = p.metadata.uid.clone().expect("uid");
    assert!(p.finalizers().iter().any(|f| f == "monsoon.dev/stop-workers"), "{:?}", p.finalizers());

    let sts = wait_for("the worker StatefulSet", Duration::from_secs(30), || {
        let sets = sets.clone();
        async move { sets.get_opt("orders-worker").await.ok().flatten() }
    })
    .await;
    assert_eq!(replicas(&sts), 1);
    let owned_by_pipeline = |owners: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
        owners.is_some_and(|o| o.iter().any(|r| r.uid == uid && r.controller == Some(true)))
    };
    assert!(owned_by_pipeline(sts.metadata.owner_references.as_ref()));
    // The URI reaches the worker from the Secret, never through the pod spec.
    let uri = worker_env(&sts, "MONSOON_MONGODB_URI").expect("MONSOON_MONGODB_URI");
    assert!(uri.value.is_none() && uri.value_from.as_ref().and_then(|f| f.secret_key_ref.as_ref()).is_some_and(|r| r.name == "mongo"), "{uri:?}");
    let account = Api::<ServiceAccount>::namespaced(admin.clone(), ns).get("orders-worker").await.expect("ServiceAccount");
    assert!(owned_by_pipeline(account.metadata.owner_references.as_ref()));
    let role = Api::<Role>::namespaced(admin.clone(), ns).get("orders-worker").await.expect("Role");
    let rules = role.rules.clone().unwrap_or_default();
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(rules[0].resource_names.clone().unwrap_or_default(), vec!["orders-checkpoint-0-of-1".to_string()]);
    Api::<RoleBinding>::namespaced(admin.clone(), ns).get("orders-worker").await.expect("RoleBinding");
    let service = Api::<Service>::namespaced(admin.clone(), ns).get("orders-worker").await.expect("Service");
    assert_eq!(service.spec.and_then(|s| s.cluster_ip).as_deref(), Some("None"));
    let cm = cms.get("orders-checkpoint-0-of-1").await.expect("checkpoint ConfigMap");
    assert!(cm.metadata.owner_references.is_none(), "checkpoints must outlive their pipeline with checkpointsOnDelete: Keep");
    wait_for("the StatefulSet controller creates orders-worker-0", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { pods.get_opt("orders-worker-0").await.ok().flatten() }
    })
    .await;
    let p = wait_status(&pipelines, "orders", "status for the workload", Duration::from_secs(30), |p| status_of(p).shard_count == Some(1)).await;
    let status = status_of(&p);
    // No kubelet runs these pods: the workload is applied but never rolled out. (Generation 1
    // counts as observed since it was Stalled on the missing Secret; kstatus reads
    // Reconciling=True as in progress all the same. Below, a new generation's observedGeneration
    // stays behind until its rollout.)
    assert!(is_on(&status, "Reconciling") && is_off(&status, "Stalled"), "{status:#?}");
    assert_eq!(status.ready.as_deref(), Some("0/1"), "no kubelet, so no ready worker: {status:#?}");
    assert!(is_off(&status, "Ready"), "{status:#?}");

    // A spec change rolls the pod template.
    pipelines
        .patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"batch": {"maxDocs": 500}}})))
        .await
        .expect("spec change");
    wait_for("the pod template carries the new spec", Duration::from_secs(30), || {
        let sets = sets.clone();
        async move {
            let sts = sets.get("orders-worker").await.ok()?;
            (pipeline_env(&sts)["spec"]["batch"]["maxDocs"] == 500).then_some(())
        }
    })
    .await;
    let p = wait_status(&pipelines, "orders", "Reconciling the new generation", Duration::from_secs(30), |p| {
        condition(&status_of(p), "Reconciling").is_some_and(|c| c.status == "True" && c.observed_generation == p.metadata.generation)
    })
    .await;
    assert_ne!(status_of(&p).observed_generation, p.metadata.generation, "observedGeneration moved before the rollout");

    // At most one worker evicted at a time.
    let pdb = Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(admin.clone(), ns).get("orders-worker").await.expect("PodDisruptionBudget");
    assert_eq!(pdb.spec.and_then(|s| s.max_unavailable), Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1)));

    // Operations by annotation and by rotation, each rolling the pod template with an Event.
    let template_annotation = |sts: &StatefulSet, key: &str| -> Option<String> {
        sts.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get(key).cloned()
    };
    pipelines
        .patch("orders", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"monsoon.dev/restart": "r1"}}})))
        .await
        .expect("annotate");
    wait_for("the restart token in the pod template", Duration::from_secs(30), || {
        let sets = sets.clone();
        async move { (template_annotation(&sets.get("orders-worker").await.ok()?, "monsoon.dev/restart").as_deref() == Some("r1")).then_some(()) }
    })
    .await;
    wait_event(&admin, ns, "orders", "RestartRequested").await;
    let digest = template_annotation(&sets.get("orders-worker").await.expect("sts"), "monsoon.dev/references").expect("references digest");
    let rotated: Secret = serde_json::from_value(json!({"metadata": {"name": "mongo"}, "stringData": {"uri": "mongodb://127.0.0.1:19/"}})).expect("secret");
    Api::<Secret>::namespaced(admin.clone(), ns).replace("mongo", &PostParams::default(), &rotated).await.expect("rotate the Secret");
    let rotated_at = Instant::now();
    wait_for("the rotated Secret rolls the pod template", Duration::from_secs(40), || {
        let (sets, digest) = (sets.clone(), digest.clone());
        async move {
            let now = template_annotation(&sets.get("orders-worker").await.ok()?, "monsoon.dev/references")?;
            (now != digest).then_some(())
        }
    })
    .await;
    wait_event(&admin, ns, "orders", "ReferencesChanged").await;
    eprintln!("Secret rotated → workers rolling in {:.1?}", rotated_at.elapsed());

    // An invalid change: a condition; the workers keep the last valid spec.
    pipelines
        .patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"namespaces": ["admin.users"]}})))
        .await
        .expect("the CRD takes it");
    wait_status(&pipelines, "orders", "InvalidSpec after an invalid change", Duration::from_secs(30), |p| is_on(&status_of(p), "InvalidSpec")).await;
    let sts = sets.get("orders-worker").await.expect("sts");
    assert_eq!(pipeline_env(&sts)["spec"]["namespaces"], json!(["shop.orders"]), "the workers lost their last valid spec");
    assert_eq!(replicas(&sts), 1);
    pipelines
        .patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"namespaces": ["shop.orders"]}})))
        .await
        .expect("fixed");
    wait_status(&pipelines, "orders", "InvalidSpec cleared", Duration::from_secs(30), |p| is_off(&status_of(p), "InvalidSpec")).await;

    // Pause and resume.
    pipelines.patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"paused": true}}))).await.expect("pause");
    wait_status(&pipelines, "orders", "Paused", Duration::from_secs(30), |p| status_of(p).phase.as_deref() == Some("Paused")).await;
    assert_eq!(replicas(&sets.get("orders-worker").await.expect("sts")), 0);
    wait_for("the StatefulSet controller removes the paused worker pod", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { pods.get_opt("orders-worker-0").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert!(cms.get_opt("orders-checkpoint-0-of-1").await.expect("get").is_some(), "pausing lost the checkpoint");
    pipelines.patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"paused": false}}))).await.expect("resume");
    wait_for("resumed: one replica", Duration::from_secs(30), || {
        let sets = sets.clone();
        async move { (replicas(&sets.get("orders-worker").await.ok()?) == 1).then_some(()) }
    })
    .await;

    // Re-shard to 2: every old worker stops, the checkpoints move, the new layout starts.
    pipelines.patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"workers": 2}}))).await.expect("re-shard");
    wait_for("two shards' checkpoints and no old one", Duration::from_secs(60), || {
        let cms = cms.clone();
        async move { (checkpoint_names(&cms, "orders").await == names(&["orders-checkpoint-0-of-2", "orders-checkpoint-1-of-2"])).then_some(()) }
    })
    .await;
    wait_event(&admin, ns, "orders", "Resharded").await;
    wait_for("two replicas", Duration::from_secs(30), || {
        let sets = sets.clone();
        async move { (replicas(&sets.get("orders-worker").await.ok()?) == 2).then_some(()) }
    })
    .await;
    let role = Api::<Role>::namespaced(admin.clone(), ns).get("orders-worker").await.expect("Role");
    let allowed: BTreeSet<String> = role.rules.unwrap_or_default().iter().flat_map(|r| r.resource_names.clone().unwrap_or_default()).collect();
    assert_eq!(allowed, names(&["orders-checkpoint-0-of-2", "orders-checkpoint-1-of-2"]));
    wait_status(&pipelines, "orders", "two shards in the status", Duration::from_secs(30), |p| status_of(p).shard_count == Some(2) && status_of(p).shards.len() == 2).await;

    // Delete (checkpointsOnDelete: Keep, the default): the finalizer stops the workers and lets
    // go; the garbage collector removes what the pipeline owned; the checkpoints stay.
    pipelines.delete("orders", &DeleteParams::default()).await.expect("delete");
    wait_for("the pipeline is gone", Duration::from_secs(60), || {
        let pipelines = pipelines.clone();
        async move { pipelines.get_opt("orders").await.ok()?.is_none().then_some(()) }
    })
    .await;
    wait_for("the garbage collector removes the ServiceAccount, Role, RoleBinding and Service", Duration::from_secs(60), || {
        let admin = admin.clone();
        async move {
            let gone = Api::<ServiceAccount>::namespaced(admin.clone(), ns).get_opt("orders-worker").await.ok()?.is_none()
                && Api::<Role>::namespaced(admin.clone(), ns).get_opt("orders-worker").await.ok()?.is_none()
                && Api::<RoleBinding>::namespaced(admin.clone(), ns).get_opt("orders-worker").await.ok()?.is_none()
                && Api::<Service>::namespaced(admin.clone(), ns).get_opt("orders-worker").await.ok()?.is_none();
            gone.then_some(())
        }
    })
    .await;
    assert!(sets.get_opt("orders-worker").await.expect("get").is_none());
    assert!(pods.list(&ListParams::default().labels("monsoon.dev/pipeline=orders")).await.expect("list").items.is_empty());
    assert_eq!(checkpoint_names(&cms, "orders").await, names(&["orders-checkpoint-0-of-2", "orders-checkpoint-1-of-2"]), "Keep kept them");

    // Delete with checkpointsOnDelete: Delete.
    let gone = pipeline("gone", from_secret(), "http://127.0.0.1:9", json!({"checkpointsOnDelete": "Delete"}));
    pipelines.create(&PostParams::default(), &gone).await.expect("created");
    wait_for("gone's workload", Duration::from_secs(30), || {
        let (sets, cms) = (sets.clone(), cms.clone());
        async move {
            let ready = sets.get_opt("gone-worker").await.ok()?.is_some() && !checkpoint_names(&cms, "gone").await.is_empty();
            ready.then_some(())
        }
    })
    .await;
    pipelines.delete("gone", &DeleteParams::default()).await.expect("delete");
    wait_for("gone is gone with its checkpoints", Duration::from_secs(60), || {
        let (pipelines, cms) = (pipelines.clone(), cms.clone());
        async move { (pipelines.get_opt("gone").await.ok()?.is_none() && checkpoint_names(&cms, "gone").await.is_empty()).then_some(()) }
    })
    .await;
    eprintln!("life of a pipeline: {:.1?}", started.elapsed());
    assert_quiet(&operator);
}

/// A worker pod that never goes away (its node died with its kubelet; here a finalizer keeps
/// it Terminating, which is what the API server shows in that case): deleting the pipeline
/// waits for it only a bounded time past its deletion deadline, records a `WorkerStuck` Event
/// and goes on, instead of holding the pipeline forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_goes_on_past_a_worker_pod_stuck_on_a_dead_node() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.expect("admin client");
    let release = install(cp, "stuck").await;
    let _operator = release.start_operator_with(cp, "stuck-op-0", &["--worker-stuck-after-seconds=5"]).await;
    let ns = release.watched.as_str();
    let pipelines: Api<SyncPipeline> = Api::namespaced(admin.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    create_secret(&admin, ns, "mongodb://127.0.0.1:9/").await;
    pipelines.create(&PostParams::default(), &pipeline("held", from_secret(), "http://127.0.0.1:9", json!({}))).await.expect("created");
    wait_for("the worker pod", Duration::from_secs(60), || {
        let pods = pods.clone();
        async move { pods.get_opt("held-worker-0").await.ok().flatten() }
    })
    .await;
    let hold = json!({"metadata": {"finalizers": ["monsoon.dev/test-dead-node"]}});
    pods.patch("held-worker-0", &PatchParams::default(), &Patch::Merge(&hold)).await.expect("hold the pod");
    pipelines.delete("held", &DeleteParams::default()).await.expect("delete");
    let deleting = Instant::now();
    wait_for("the pipeline is gone despite its stuck worker pod", Duration::from_secs(60), || {
        let pipelines = pipelines.clone();
        async move { pipelines.get_opt("held").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let took = deleting.elapsed();
    let stuck = pods.get("held-worker-0").await.expect("the stuck pod is still there");
    assert!(stuck.metadata.deletion_timestamp.is_some(), "the pod was not being deleted");
    let event = wait_event(&admin, ns, "held", "WorkerStuck").await;
    assert!(event.note.as_deref().is_some_and(|n| n.contains("held-worker-0")), "{event:?}");
    assert!(took >= Duration::from_secs(5), "did not wait at all: {took:?}");
    eprintln!("deleted past a stuck worker pod in {took:.1?}");
    pods.patch("held-worker-0", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"finalizers": null}}))).await.expect("release the pod");

}

/// Two operator processes: exactly one leads (holds the Lease, reconciles); SIGKILL the leader
/// and the other takes over within a lease duration and reconciles what comes next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operators_one_leader_and_a_takeover_when_it_is_killed() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.expect("admin client");
    let release = install(cp, "lead").await;
    let ns = release.watched.as_str();
    let mut a = release.start_operator(cp, "lead-op-a").await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &release.namespace);
    let holder = |leases: Api<Lease>| async move {
        leases.get_opt("lead-op").await.ok().flatten().and_then(|l| l.spec?.holder_identity)
    };
    wait_for("a leads", Duration::from_secs(30), || {
        let leases = leases.clone();
        async move { (holder(leases).await.as_deref() == Some("lead-op-a")).then_some(()) }
    })
    .await;
    let b = release.start_operator(cp, "lead-op-b").await;
    let leader_gauge = |p: &Process| {
        p.get("/metrics").and_then(|(_, body)| {
            body.lines().find(|l| l.starts_with("monsoon_operator_leader ")).and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
    };
    wait_for("b is up and follows", Duration::from_secs(30), || {
        let v = leader_gauge(&b);
        async move { (v.as_deref() == Some("0")).then_some(()) }
    })
    .await;
    assert_eq!(leader_gauge(&a).as_deref(), Some("1"));

    // Only the leader reconciles: the Event about a pipeline without its Secret comes from a.
    let pipelines: Api<SyncPipeline> = Api::namespaced(admin.clone(), ns);
    pipelines.create(&PostParams::default(), &pipeline("first", from_secret(), "http://127.0.0.1:9", json!({}))).await.expect("created");
    wait_status(&pipelines, "first", "CredentialsMissing", Duration::from_secs(30), |p| is_on(&status_of(p), "CredentialsMissing")).await;
    wait_event(&admin, ns, "first", "CredentialsMissing").await;
    let events: Vec<Event> = Api::<Event>::namespaced(admin.clone(), ns).list(&ListParams::default()).await.expect("events").items;
    let instances: BTreeSet<String> = events.iter().filter_map(|e| e.reporting_instance.clone()).collect();
    assert_eq!(instances, names(&["lead-op-a"]), "Events from {instances:?}");
    assert!(!b.log().contains("leading; reconciling"), "b led while a held the Lease:\n{}", b.log());
    assert_eq!(leader_gauge(&b).as_deref(), Some("0"));
    create_secret(&admin, ns, "mongodb://127.0.0.1:9/").await;

    let before = leases.get("lead-op").await.expect("lease").spec.expect("spec").lease_transitions.unwrap_or(0);
    a.kill();
    let killed = Instant::now();
    wait_for("b takes over", Duration::from_secs(60), || {
        let leases = leases.clone();
        async move { (holder(leases).await.as_deref() == Some("lead-op-b")).then_some(()) }
    })
    .await;
    let took = killed.elapsed();
    let lease = leases.get("lead-op").await.expect("lease").spec.expect("spec");
    assert_eq!(lease.lease_transitions, Some(before + 1));
    let duration = Duration::from_secs(u64::try_from(lease.lease_duration_seconds.unwrap_or(15)).unwrap_or(15));
    assert!(took <= duration + duration / 3 + Duration::from_secs(3), "took over {took:?} after the kill; lease {duration:?}");
    eprintln!("b took over {took:.1?} after a was killed (lease {duration:?})");

    pipelines.create(&PostParams::default(), &pipeline("second", from_secret(), "http://127.0.0.1:9", json!({}))).await.expect("created");
    wait_status(&pipelines, "second", "reconciled by the new leader", Duration::from_secs(30), |p| status_of(p).shard_count == Some(1)).await;
    // And what a left waiting: the Secret exists now.
    wait_status(&pipelines, "first", "first's workload", Duration::from_secs(60), |p| status_of(p).shard_count == Some(1)).await;
    assert!(Api::<StatefulSet>::namespaced(admin.clone(), ns).get_opt("second-worker").await.expect("get").is_some());
    assert_eq!(leader_gauge(&b).as_deref(), Some("1"));
    assert_quiet(&b);
}

/// Workers as the pods run them, with their pipeline's token: leases and checkpoints in real
/// ConfigMaps, the stand-ins synced, the status and `kubectl get sp` showing it; a worker killed
/// and restarted; a partitioned worker (the zombie) that comes back after its replacement took
/// the lease and writes nothing more; a re-shard while the workers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_sync_with_their_pipelines_token_and_a_zombie_is_fenced() {
    let cp = ControlPlane::shared();
    let admin = cp.admin_client().await.expect("admin client");
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 300)).await.expect("seed");
    let release = install(cp, "sync").await;
    let ns = release.watched.clone();
    let operator = release.start_operator(cp, "sync-op-0").await;
    let kubelet = Kubelet::start(cp, admin.clone(), &ns, release.dir.path()).await;
    let pipelines: Api<SyncPipeline> = Api::namespaced(admin.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
    create_secret(&admin, &ns, &stack.mongo.uri()).await;
    let started = Instant::now();
    pipelines
        .create(&PostParams::default(), &pipeline("orders", from_secret(), &stack.es.url(), json!({})))
        .await
        .expect("created");

    let report = stack.converged("shop", "orders", "shop.orders").await.expect("compare");
    assert!(report.converged(), "not converged: {report:?}\n{}", kubelet.logs().await);
    eprintln!("created → converged (300 documents) in {:.1?}", started.elapsed());
    let cm = cms.get("orders-checkpoint-0-of-1").await.expect("checkpoint ConfigMap");
    let data = cm.data.clone().unwrap_or_default();
    let first_holder = data.get("holder").cloned().unwrap_or_default();
    assert!(first_holder.starts_with("orders-worker-0/"), "{data:?}");
    let p = wait_status(&pipelines, "orders", "Streaming, 1/1 ready, all documents counted", Duration::from_secs(60), |p| {
        let s = status_of(p);
        s.phase.as_deref() == Some("Streaming") && s.ready.as_deref() == Some("1/1") && s.documents_synced >= Some(300) && is_on(&s, "Ready")
    })
    .await;
    let status = status_of(&p);
    assert_eq!(status.shards[0].holder.as_deref(), Some("orders-worker-0"), "{status:#?}");
    assert!(data.contains_key("checkpoint"), "no checkpoint in {data:?}");
    eprintln!("created → Ready in {:.1?}", started.elapsed());

    assert_eq!(status.observed_generation, p.metadata.generation, "Ready and rolled out: this generation is observed");


    // `kubectl get sp`: the CRD's printer columns, read through the API as kubectl reads them.
    let t = table(&admin, &format!("/apis/monsoon.dev/v1alpha1/namespaces/{ns}/syncpipelines")).await.expect("Table");
    let columns: Vec<&str> = t["columnDefinitions"].as_array().expect("columns").iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(columns, ["Name", "Ready", "Phase", "Lag", "Synced", "Age"], "{t}");
    let row = t["rows"].as_array().expect("rows").iter().find(|r| r["cells"][0] == "orders").expect("a row for orders");
    assert_eq!(row["cells"][1], "1/1", "{row}");
    assert_eq!(row["cells"][2], "Streaming", "{row}");
    assert!(row["cells"][3].as_str().is_some_and(|l| l.ends_with('s')), "lag: {row}");
    assert!(row["cells"][4].as_u64().is_some_and(|n| n >= 300), "synced: {row}");

    // `kubectl apply` of a change, then `kubectl wait --for=condition=Ready` (which reads a
    // condition only when its observedGeneration is the object's generation): Ready must not
    // be True for the new generation before the StatefulSet has replaced the worker pod with
    // one of the new template and that pod is ready.
    let sets: Api<StatefulSet> = Api::namespaced(admin.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let applied = pipelines
        .patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"batch": {"maxDocs": 500}}})))
        .await
        .expect("spec change");
    let applied_at = Instant::now();
    let generation = applied.metadata.generation;
    let ready_for = |p: &SyncPipeline| condition(&status_of(p), "Ready").is_some_and(|c| c.status == "True" && c.observed_generation == generation);
    let p = wait_status(&pipelines, "orders", "Ready for the new generation", Duration::from_secs(90), ready_for).await;
    let sts = sets.get("orders-worker").await.expect("sts");
    let pod = pods.get("orders-worker-0").await.expect("worker pod");
    let update_revision = sts.status.as_ref().and_then(|s| s.update_revision.clone()).expect("updateRevision");
    assert_eq!(pod.labels().get("controller-revision-hash"), Some(&update_revision), "Ready while the pod runs an older template");
    assert_eq!(pipeline_env(&sts)["spec"]["batch"]["maxDocs"], 500);
    let pod_ready = pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    assert!(pod_ready, "Ready before the new pod is: {:?}", pod.status);
    assert_eq!(status_of(&p).observed_generation, generation);
    assert!(is_off(&status_of(&p), "Reconciling"), "{:#?}", status_of(&p));
    eprintln!("apply → Ready for the new generation (pod replaced and ready) in {:.1?}", applied_at.elapsed());

    // The worker's token can do what its Role says, nothing more.
    let worker = cp.service_account_client(&ns, "orders-worker").await.expect("worker token");
    let as_worker: Api<ConfigMap> = Api::namespaced(worker.clone(), &ns);
    as_worker.get("orders-checkpoint-0-of-1").await.expect("its own checkpoint");
    cms.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "other"}})).expect("cm")).await.expect("other");
    for (what, result) in [
        ("get another ConfigMap", as_worker.get("other").await.map(|_| ())),
        ("list ConfigMaps", as_worker.list(&ListParams::default()).await.map(|_| ())),
        ("read the Secret", Api::<Secret>::namespaced(worker.clone(), &ns).get("mongo").await.map(|_| ())),
        ("read the pipeline", Api::<SyncPipeline>::namespaced(worker.clone(), &ns).get("orders").await.map(|_| ())),
    ] {
        assert!(matches!(&result, Err(kube::Error::Api(s)) if s.code == 403), "a worker could {what}: {result:?}");
    }

    // SIGKILL: the kubelet restarts the container; the new process (a new holder) waits for
    // the lease its predecessor never released, then resumes from the checkpoint.
    // The holder now: the spec change above replaced the first worker.
    let first_holder = cms.get("orders-checkpoint-0-of-1").await.expect("cm").data.and_then(|d| d.get("holder").cloned()).unwrap_or_default();
    kubelet.kill("orders-worker-0").await;
    let killed = Instant::now();
    insert_all(&orders, sample_docs(300, 100)).await.expect("insert");
    let second_holder = wait_for("the restarted worker takes the lease", Duration::from_secs(60), || {
        let (cms, first) = (cms.clone(), first_holder.clone());
        async move {
            let holder = cms.get("orders-checkpoint-0-of-1").await.ok()?.data?.get("holder").cloned()?;
            (!holder.is_empty() && holder != first).then_some(holder)
        }
    })
    .await;
    assert_eq!(kubelet.restarts("orders-worker-0").await, 1);
    let report = stack.converged("shop", "orders", "shop.orders").await.expect("compare");
    assert!(report.converged(), "after the kill: {report:?}\n{}", kubelet.logs().await);
    eprintln!("killed → lease retaken and converged in {:.1?}", killed.elapsed());

    // The zombie: the worker's node is cut off (SIGSTOP); the pod is force-deleted, the
    // StatefulSet makes a new one, and its worker takes the lease once it has seen it
    // unrenewed for a lease duration.
    let mut zombie = kubelet.partition("orders-worker-0").await;
    let stale = cms.get("orders-checkpoint-0-of-1").await.expect("cm");
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    pods.delete("orders-worker-0", &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() }).await.expect("force delete");
    let partitioned = Instant::now();
    let third_holder = wait_for("the replacement takes the lease", Duration::from_secs(60), || {
        let (cms, second) = (cms.clone(), second_holder.clone());
        async move {
            let holder = cms.get("orders-checkpoint-0-of-1").await.ok()?.data?.get("holder").cloned()?;
            (!holder.is_empty() && holder != second).then_some(holder)
        }
    })
    .await;
    eprintln!("partitioned → replacement holds the lease in {:.1?}", partitioned.elapsed());
    insert_all(&orders, sample_docs(400, 100)).await.expect("insert");

    // The zombie wakes up. Watch every write to the ConfigMap from now on: none may be its.
    let rv = cms.get("orders-checkpoint-0-of-1").await.expect("cm").metadata.resource_version.expect("rv");
    let watch = cms
        .watch(&WatchParams::default().fields("metadata.name=orders-checkpoint-0-of-1").timeout(20), &rv)
        .await
        .expect("watch");
    let writes = tokio::spawn(async move {
        let mut watch = Box::pin(watch);
        let mut holders = Vec::new();
        while let Ok(Some(event)) = watch.try_next().await {
            if let WatchEvent::Modified(cm) = event {
                holders.push(cm.data.and_then(|d| d.get("holder").cloned()).unwrap_or_default());
            }
        }
        holders
    });
    zombie.signal("-CONT");
    let exit = zombie.wait_exit(Duration::from_secs(20)).await;
    assert!(!exit.success(), "the zombie exited cleanly: {exit:?}\n{}", zombie.log());
    let log = zombie.log();
    assert!(log.contains("lease"), "the zombie did not say it lost its lease:\n{}", tail(&log, 20));
    let report = stack.converged("shop", "orders", "shop.orders").await.expect("compare");
    assert!(report.converged(), "after the zombie: {report:?}\n{}", kubelet.logs().await);
    let holders = writes.await.expect("watch task");
    assert!(!holders.is_empty(), "the replacement renewed nothing in 20 s");
    assert!(holders.iter().all(|h| *h == third_holder), "a write by someone else than {third_holder}: {holders:?}");
    // Had it sent one, the server would have refused it: the zombie's version of the
    // ConfigMap, written with its own token, is a conflict.
    let zombie_token = cp.service_account_client(&ns, "orders-worker").await.expect("worker token");
    let mut replay = stale.clone();
    replay.data.get_or_insert_with(BTreeMap::new).insert("renewTime".into(), "0".into());
    match Api::<ConfigMap>::namespaced(zombie_token, &ns).replace("orders-checkpoint-0-of-1", &PostParams::default(), &replay).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 409, "{s:?}"),
        other => panic!("the zombie's stale write was not refused: {other:?}"),
    }

    // Re-shard with the workers running: the operator stops the old worker and waits until its
    // pod is gone (the kubelet lets it go once the worker has written its final checkpoint and
    // exited), merges the checkpoints, and the two new workers resume from them.
    pipelines.patch("orders", &PatchParams::default(), &Patch::Merge(json!({"spec": {"workers": 2}}))).await.expect("re-shard");
    let resharding = Instant::now();
    insert_all(&orders, sample_docs(500, 100)).await.expect("insert");
    let shards = ["orders-checkpoint-0-of-2", "orders-checkpoint-1-of-2"];
    wait_for("both new shards leased", Duration::from_secs(90), || {
        let cms = cms.clone();
        async move {
            if checkpoint_names(&cms, "orders").await != names(&shards) {
                return None;
            }
            for (i, shard) in shards.iter().enumerate() {
                let holder = cms.get(shard).await.ok()?.data?.get("holder").cloned()?;
                if !holder.starts_with(&format!("orders-worker-{i}/")) {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    let report = stack.converged("shop", "orders", "shop.orders").await.expect("compare");
    assert!(report.converged(), "after the re-shard: {report:?}\n{}", kubelet.logs().await);
    wait_event(&admin, &ns, "orders", "Resharded").await;
    wait_status(&pipelines, "orders", "2/2 Streaming", Duration::from_secs(60), |p| {
        let s = status_of(p);
        s.ready.as_deref() == Some("2/2") && s.phase.as_deref() == Some("Streaming")
    })
    .await;
    eprintln!("re-shard 1 → 2 with live workers, converged and 2/2 Streaming in {:.1?}", resharding.elapsed());

    // Delete while the workers run: the finalizer lets the pipeline go only once both workers
    // have stopped, so their final checkpoints are written and their leases released.
    pipelines.delete("orders", &DeleteParams::default()).await.expect("delete");
    let deleting = Instant::now();
    wait_for("the pipeline is gone", Duration::from_secs(60), || {
        let pipelines = pipelines.clone();
        async move { pipelines.get_opt("orders").await.ok()?.is_none().then_some(()) }
    })
    .await;
    for shard in shards {
        let data = cms.get(shard).await.expect("kept checkpoint").data.unwrap_or_default();
        assert_eq!(data.get("holder").map(String::as_str), Some(""), "{shard}: lease not released: {data:?}");
        assert!(data.contains_key("checkpoint"), "{shard}: no checkpoint: {data:?}");
    }
    assert!(pods.list(&ListParams::default().labels(WORKER_PODS)).await.expect("pods").items.is_empty());
    eprintln!("deleted with live workers in {:.1?}", deleting.elapsed());
    assert_quiet(&operator);
    drop(kubelet);
    eprintln!("whole worker story: {:.1?}", started.elapsed());
}
