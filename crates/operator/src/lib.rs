//! The monsoon operator: turns each `SyncPipeline` into its workers and reports their progress.
//!
//! - [`reconcile`]: one pipeline → ServiceAccount, Role, RoleBinding, Service, StatefulSet,
//!   PodDisruptionBudget and checkpoint ConfigMaps; finalizer; re-sharding.
//! - [`status`]: what the status says (conditions, kstatus, `observedGeneration`), decided
//!   as plain functions.
//! - [`workload`]: the objects, built as plain values.
//! - [`leader`]: leader election, so several replicas can run safely.
//! - [`report`]: what each worker writes beside its checkpoint for the operator to read.
//! - [`worker`]: one shard's worker (`monsoon worker`): lease, engine, renewals, fencing.
//! - [`triggers`]: which changes wake the controller (watch streams and their predicates).
//! - [`run`]: the operator's life: check the CRD, wait to lead, run the controllers while
//!   leading.

pub mod leader;
pub mod reconcile;
pub mod report;
pub mod status;
pub mod triggers;
pub mod worker;
pub mod workload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::Store;
use kube::Api;
use monsoon_api::SyncPipeline;
use monsoon_engine::http::{check, Handler, StatusCode, PROMETHEUS_TEXT};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::leader::LeaderElector;
use crate::reconcile::Context;
use crate::workload::WorkerSettings;

/// Default name of the leader-election Lease (the chart names it after the release, so two
/// releases in one namespace do not share it).
pub const LEADER_LEASE: &str = "monsoon-operator";

/// The operator's own metrics.
#[derive(Clone)]
pub struct OperatorMetrics {
    /// Registry of the series below.
    pub registry: Registry,
    /// Reconciles started.
    pub reconciles: IntCounter,
    /// Reconciles that failed (retried).
    pub reconcile_errors: IntCounter,
    /// Time each reconcile took.
    pub reconcile_seconds: Histogram,
    /// SyncPipelines by `status.phase` (`Unknown` before the first status), refreshed while
    /// leading.
    pub pipelines: IntGaugeVec,
    /// 1 while this replica leads.
    pub leader: IntGauge,
}

/// Phases counted by [`OperatorMetrics::pipelines`] (so a phase no pipeline is in reads 0
/// rather than disappearing).
const PHASES: [&str; 6] = ["Pending", "Snapshotting", "Streaming", "Paused", "Failed", "Unknown"];

impl Default for OperatorMetrics {
    fn default() -> Self {
        let registry = Registry::new_custom(Some("monsoon_operator".into()), None).expect("valid registry");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let reconciles = counter("reconciles_total", "Reconciles started");
        let reconcile_errors = counter("reconcile_errors_total", "Reconciles that failed and were retried");
        // A reconcile is a handful of API calls: milliseconds, seconds when the API server is slow.
        let reconcile_seconds = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "Time one reconcile of one SyncPipeline took")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("valid metric");
        registry.register(Box::new(reconcile_seconds.clone())).expect("unique metric");
        let pipelines = IntGaugeVec::new(Opts::new("pipelines", "SyncPipelines by status.phase"), &["phase"]).expect("valid metric");
        registry.register(Box::new(pipelines.clone())).expect("unique metric");
        let leader = IntGauge::new("leader", "1 while this replica is the leader").expect("valid metric");
        registry.register(Box::new(leader.clone())).expect("unique metric");
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_seconds,
            pipelines,
            leader,
        }
    }
}

impl OperatorMetrics {
    /// Count the pipelines of `store` by phase.
    pub fn count_phases<'a>(&self, pipelines: impl IntoIterator<Item = &'a SyncPipeline>) {
        let mut counts: std::collections::BTreeMap<&str, i64> = PHASES.iter().map(|p| (*p, 0)).collect();
        for p in pipelines {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Unknown");
            let key = PHASES.iter().find(|known| **known == phase).copied().unwrap_or("Unknown");
            *counts.entry(key).or_default() += 1;
        }
        for (phase, n) in counts {
            self.pipelines.with_label_values(&[phase]).set(n);
        }
    }
}

/// Health of the operator process, served on `/healthz`, `/readyz` and `/metrics`.
#[derive(Clone)]
pub struct OperatorEndpoints {
    metrics: OperatorMetrics,
    reached_api: Arc<AtomicBool>,
    last_loop: Arc<std::sync::Mutex<Instant>>,
}

impl OperatorEndpoints {
    /// Endpoints over `metrics`.
    pub fn new(metrics: OperatorMetrics) -> Self {
        Self {
            metrics,
            reached_api: Arc::new(AtomicBool::new(false)),
            last_loop: Arc::new(std::sync::Mutex::new(Instant::now())),
        }
    }

    fn beat(&self, reached_api: bool) {
        self.reached_api.store(reached_api, Ordering::Relaxed);
        if let Ok(mut t) = self.last_loop.lock() {
            *t = Instant::now();
        }
    }
}

impl Handler for OperatorEndpoints {
    fn handle(&self, path: &str) -> (StatusCode, &'static str, String) {
        let stalled = self.last_loop.lock().map(|t| t.elapsed() > Duration::from_secs(60)).unwrap_or(true);
        match path {
            "/healthz" => check(if stalled { Err("the election loop has stalled".into()) } else { Ok(()) }),
            "/readyz" => check(if self.reached_api.load(Ordering::Relaxed) {
                Ok(())
            } else {
                Err("the Kubernetes API has not answered yet".into())
            }),
            "/metrics" => {
                let families = self.metrics.registry.gather();
                let mut out = String::new();
                if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&families, &mut out) {
                    return (StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string());
                }
                (StatusCode::OK, PROMETHEUS_TEXT, out)
            }
            _ => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

/// Operator-wide settings.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// Namespaces to watch; empty means every namespace.
    pub watch_namespaces: Vec<String>,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// Namespace of the leader-election Lease (the operator's own).
    pub lease_namespace: String,
    /// Leader election.
    pub election: Election,
    /// How long a worker pod may outlive its deletion deadline before deletion or a re-shard
    /// goes on without it ([`reconcile::STUCK_POD_AFTER`] by default).
    pub stuck_pod_after: Duration,
    /// How workers run.
    pub settings: WorkerSettings,
}

/// Leader-election settings.
#[derive(Clone, Debug)]
pub struct Election {
    /// Name of the Lease.
    pub lease_name: String,
    /// How long leadership lasts without renewal; a standby takes over after it.
    pub lease_duration: Duration,
    /// How often the leader renews (less than `lease_duration`; a third of it by default).
    pub renew_period: Duration,
}

impl Default for Election {
    fn default() -> Self {
        Self {
            lease_name: LEADER_LEASE.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_period: Duration::from_secs(5),
        }
    }
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Leadership could not be renewed in time: another replica may lead now.
    #[error("lost leadership (could not renew its Lease within {0:?}); exiting so a fresh replica takes over")]
    LostLeadership(Duration),
}

/// Renew leadership every renewal period until `shutdown` (`Ok`) or until it cannot be
/// renewed in time (`Err`), reporting each attempt to `beat`.
///
/// Leadership is counted on this process's monotonic clock from when its last successful write
/// was *sent* (the Lease may have been stored at any moment after), less one renewal period of
/// safety margin: past that, another replica may already lead. The deadline is watched beside
/// each renewal call, so a call that hangs ends leadership in time too.
///
/// # Errors
/// [`Error::LostLeadership`].
pub async fn keep_leading(
    elector: &LeaderElector,
    mut deadline: tokio::time::Instant,
    shutdown: &CancellationToken,
    beat: impl Fn(bool),
) -> Result<(), Error> {
    let renew_every = elector.renew_period();
    let lead_for = elector.duration().saturating_sub(renew_every);
    let lost = || Error::LostLeadership(elector.duration());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(renew_every) => {}
            () = tokio::time::sleep_until(deadline) => return Err(lost()),
        }
        let sent = tokio::time::Instant::now();
        let renewed = tokio::select! {
            r = elector.try_acquire_or_renew() => r,
            () = tokio::time::sleep_until(deadline) => return Err(lost()),
        };
        match renewed {
            Ok(true) => {
                deadline = sent + lead_for;
                beat(true);
            }
            Ok(false) => return Err(lost()),
            Err(e) => {
                warn!(error = %e, "leader election: renewal failed; retrying until the lease would run out");
                beat(false);
            }
        }
    }
}

/// Run the operator until `shutdown`: check the installed CRD, wait to lead, then reconcile
/// every `SyncPipeline` while leading.
///
/// # Errors
/// [`Error::LostLeadership`].
pub async fn run(
    client: kube::Client,
    options: OperatorOptions,
    endpoints: OperatorEndpoints,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let crd_outdated = check_crd(&client).await;
    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        &options.election.lease_name,
        &options.identity,
        options.election.lease_duration,
    )
    .with_renew_period(options.election.renew_period);
    let Some(deadline) = wait_to_lead(&elector, &endpoints, &shutdown).await else {
        return Ok(());
    };
    let metrics = endpoints.metrics.clone();
    endpoints.beat(true);
    metrics.leader.set(1);
    info!(identity = %options.identity, lease = %options.election.lease_name, "leading; reconciling SyncPipelines");

    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: options.settings.clone(),
        recorder: Some(Recorder::new(
            client.clone(),
            Reporter {
                controller: reconcile::MANAGER.into(),
                instance: Some(options.identity.clone()),
            },
        )),
        metrics: metrics.clone(),
        stuck_pod_after: options.stuck_pod_after,
        crd_outdated,
    });
    let stop = CancellationToken::new();
    let controllers = spawn_controllers(&client, &options.watch_namespaces, &ctx, &stop);

    let result = keep_leading(&elector, deadline, &shutdown, |ok| endpoints.beat(ok)).await;
    stop.cancel();
    for c in controllers {
        if let Err(e) = c.await {
            error!(error = %e, "controller task failed");
        }
    }
    metrics.leader.set(0);
    if result.is_ok() {
        if let Err(e) = elector.release().await {
            warn!(error = %e, "failed to release the leader Lease; the next leader waits for it to expire");
        }
    }
    result
}

/// Follow until this replica leads; returns the deadline of its leadership, or `None` on
/// shutdown.
async fn wait_to_lead(elector: &LeaderElector, endpoints: &OperatorEndpoints, shutdown: &CancellationToken) -> Option<tokio::time::Instant> {
    let lead_for = elector.duration().saturating_sub(elector.renew_period());
    loop {
        let sent = tokio::time::Instant::now();
        match elector.try_acquire_or_renew().await {
            Ok(true) => return Some(sent + lead_for),
            Ok(false) => endpoints.beat(true),
            Err(e) => {
                warn!(error = %e, "leader election: cannot reach the Lease; retrying");
                endpoints.beat(false);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(elector.renew_period()) => {}
        }
    }
}

/// Compare the CRD installed in the cluster with this operator's. Returns the message of the
/// `CrdOutdated` condition when it is older (the API server would prune the fields it does
/// not know), after saying so in the log.
async fn check_crd(client: &kube::Client) -> Option<String> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(monsoon_api::crd::CRD_NAME).await {
        Ok(Some(crd)) => {
            let message = crd_outdated(&crd);
            if let Some(message) = &message {
                warn!(crd = monsoon_api::crd::CRD_NAME, "{message}");
            }
            message
        }
        Ok(None) => {
            error!(crd = monsoon_api::crd::CRD_NAME, "the CRD is not installed: kubectl apply --server-side -f crds/syncpipeline.yaml");
            None
        }
        Err(e) => {
            warn!(error = %e, "cannot read the installed CRD to compare its revision; grant get on customresourcedefinitions/{}", monsoon_api::crd::CRD_NAME);
            None
        }
    }
}

/// The `CrdOutdated` message for an installed CRD older than this operator's, or `None`.
pub fn crd_outdated(installed: &CustomResourceDefinition) -> Option<String> {
    let expected = monsoon_api::crd::CRD_REVISION;
    match monsoon_api::crd::installed_revision(installed) {
        Some(r) if r >= expected => None,
        found => Some(format!(
            "the installed SyncPipeline CRD is revision {}, this operator expects {expected}: fields it does not know are dropped by the API server. Upgrade it: kubectl apply --server-side -f https://raw.githubusercontent.com/monsoon-dev/monsoon/v{}/crds/syncpipeline.yaml (Helm never upgrades CRDs)",
            found.map_or("1 (unannotated)".to_string(), |r| r.to_string()),
            env!("CARGO_PKG_VERSION"),
        )),
    }
}

/// One controller per watched scope (every namespace, or each of `--watch-namespaces`), and a
/// task keeping the pipelines-by-phase gauge, all stopped by `stop`.
fn spawn_controllers(client: &kube::Client, namespaces: &[String], ctx: &Arc<Context>, stop: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().cloned().map(Some).collect()
    };
    let mut tasks = Vec::new();
    let mut stores: Vec<Store<SyncPipeline>> = Vec::new();
    for scope in scopes {
        let (controller, store) = triggers::controller(client, scope.as_deref());
        stores.push(store);
        let ctx = ctx.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            controller
                .graceful_shutdown_on(async move { stop.cancelled().await })
                .run(reconcile::reconcile, reconcile::error_policy, ctx)
                .for_each(|result| async move {
                    match result {
                        Ok(_) => {}
                        // A change of an owned StatefulSet (the garbage collector deleting it)
                        // arriving after its pipeline left the cache: nothing to do.
                        Err(kube::runtime::controller::Error::ObjectNotFound(object)) => {
                            debug!(%object, "pipeline gone before its reconcile; nothing to do");
                        }
                        Err(e) => warn!(error = %monsoon_engine::error_chain(&e), "controller"),
                    }
                })
                .await;
        }));
    }
    let (metrics, stop) = (ctx.metrics.clone(), stop.clone());
    tasks.push(tokio::spawn(async move {
        loop {
            let all: Vec<Arc<SyncPipeline>> = stores.iter().flat_map(Store::state).collect();
            metrics.count_phases(all.iter().map(|p| p.as_ref()));
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(reconcile::STATUS_REFRESH) => {}
            }
        }
    }));
    tasks
}

#[cfg(test)]
mod crd_tests {
    use super::*;

    #[test]
    fn an_older_crd_is_reported_with_the_upgrade_command() {
        let current = monsoon_api::crd::crd().expect("crd");
        assert_eq!(crd_outdated(&current), None);
        let mut old = current.clone();
        old.metadata.annotations = None;
        let message = crd_outdated(&old).expect("an unannotated CRD is older");
        assert!(message.contains("kubectl apply --server-side"), "{message}");
        assert!(message.contains(&format!("expects {}", monsoon_api::crd::CRD_REVISION)), "{message}");
    }

    #[test]
    fn pipelines_are_counted_by_phase() {
        let metrics = OperatorMetrics::default();
        let with = |phase: Option<&str>| {
            let mut p = SyncPipeline::new("p", monsoon_api::SyncPipelineSpec::default());
            p.status = phase.map(|ph| monsoon_api::SyncPipelineStatus { phase: Some(ph.into()), ..Default::default() });
            p
        };
        let all = [with(Some("Streaming")), with(Some("Streaming")), with(Some("Failed")), with(None)];
        metrics.count_phases(all.iter());
        let get = |phase: &str| metrics.pipelines.with_label_values(&[phase]).get();
        assert_eq!((get("Streaming"), get("Failed"), get("Unknown"), get("Paused")), (2, 1, 1, 0));
    }
}

#[cfg(test)]
mod leading_tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// The API server stops answering while this replica leads: the renewal hangs instead of
    /// failing. Leadership must end on this process's own clock within the lease, not wait for
    /// an answer that never comes while it keeps reconciling.
    #[tokio::test]
    async fn a_leader_whose_renewal_hangs_steps_down_within_its_lease() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let raw = kube_fake_client::ClientBuilder::new().build().await.expect("fake client");
        let hang = Arc::new(AtomicBool::new(false));
        let service = {
            let (raw, hang) = (raw.clone(), hang.clone());
            tower::service_fn(move |request| {
                let (raw, hang) = (raw.clone(), hang.clone());
                async move {
                    if hang.load(Ordering::SeqCst) {
                        std::future::pending::<()>().await;
                    }
                    raw.send(request).await
                }
            })
        };
        let api = Api::<Lease>::namespaced(kube::Client::new(service, "monsoon-system"), "monsoon-system");
        let lease = Duration::from_secs(3);
        let elector = LeaderElector::new(api, LEADER_LEASE, "a", lease);
        let sent = tokio::time::Instant::now();
        assert!(elector.try_acquire_or_renew().await.expect("acquire"), "leads");
        let deadline = sent + lease - lease / 3;
        hang.store(true, Ordering::SeqCst);
        let hung_at = Instant::now();
        let shutdown = CancellationToken::new();
        let result = tokio::time::timeout(lease + Duration::from_secs(5), keep_leading(&elector, deadline, &shutdown, |_| {}))
            .await
            .expect("kept leading with its renewals hung, past its lease");
        assert!(matches!(result, Err(Error::LostLeadership(_))), "{result:?}");
        assert!(hung_at.elapsed() < lease, "stepped down {:?} after the API hung; the lease is {lease:?}", hung_at.elapsed());
    }
}
