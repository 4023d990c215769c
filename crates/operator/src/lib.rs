//! The monsoon operator: turns each `SyncPipeline` into its workers and reports their progress.
//!
//! - [`reconcile`]: one pipeline → ServiceAccount, Role, RoleBinding, Service, StatefulSet
//!   and checkpoint ConfigMaps; status conditions; finalizer; re-sharding.
//! - [`workload`]: the objects, built as plain values.
//! - [`leader`]: leader election, so several replicas can run safely.
//! - [`report`]: what each worker writes beside its checkpoint for the operator to read.
//! - [`worker`]: one shard's worker (`monsoon worker`): lease, engine, renewals, fencing.
//! - [`run`]: the controller loop (thin wiring over `kube::runtime::Controller`).

pub mod leader;
pub mod reconcile;
pub mod report;
pub mod worker;
pub mod workload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{watcher, Controller};
use kube::Api;
use monsoon_api::SyncPipeline;
use monsoon_engine::http::{check, Handler, StatusCode, PROMETHEUS_TEXT};
use prometheus::{IntCounter, IntGauge, Registry};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::leader::LeaderElector;
use crate::reconcile::Context;
use crate::workload::WorkerSettings;

/// Name of the leader-election Lease.
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
    /// 1 while this replica leads.
    pub leader: IntGauge,
}

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
        let leader = IntGauge::new("leader", "1 while this replica is the leader").expect("valid metric");
        registry.register(Box::new(leader.clone())).expect("unique metric");
        Self {
            registry,
            reconciles,
            reconcile_errors,
            leader,
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
    /// How workers run.
    pub settings: WorkerSettings,
}

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Leadership could not be renewed in time: another replica may lead now.
    #[error("lost leadership (could not renew Lease {LEADER_LEASE} within {0:?}); exiting so a fresh replica takes over")]
    LostLeadership(Duration),
}

/// Renew leadership every third of the lease until `shutdown` (`Ok`) or until it cannot be
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
    let renew_every = elector.duration() / 3;
    let lead_for = elector.duration() - renew_every;
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

/// Run the operator until `shutdown`: wait to lead, then reconcile every `SyncPipeline`.
///
/// # Errors
/// [`Error::LostLeadership`].
pub async fn run(
    client: kube::Client,
    options: OperatorOptions,
    endpoints: OperatorEndpoints,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let metrics = endpoints.metrics.clone();
    let elector = LeaderElector::new(
        Api::<Lease>::namespaced(client.clone(), &options.lease_namespace),
        LEADER_LEASE,
        &options.identity,
        Duration::from_secs(15),
    );
    let renew_every = elector.duration() / 3;
    let lead_for = elector.duration() - renew_every;
    // Follow until leading.
    let deadline;
    loop {
        let sent = tokio::time::Instant::now();
        match elector.try_acquire_or_renew().await {
            Ok(true) => {
                deadline = sent + lead_for;
                break;
            }
            Ok(false) => endpoints.beat(true),
            Err(e) => {
                warn!(error = %e, "leader election: cannot reach the Lease; retrying");
                endpoints.beat(false);
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(renew_every) => {}
        }
    }
    endpoints.beat(true);
    metrics.leader.set(1);
    info!(identity = %options.identity, "leading; reconciling SyncPipelines");

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "monsoon-operator".into(),
            instance: Some(options.identity.clone()),
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings: options.settings.clone(),
        recorder: Some(recorder),
        metrics: metrics.clone(),
    });
    let stop = CancellationToken::new();
    let scopes: Vec<Option<String>> = if options.watch_namespaces.is_empty() {
        vec![None]
    } else {
        options.watch_namespaces.iter().cloned().map(Some).collect()
    };
    let mut controllers = Vec::new();
    for scope in scopes {
        let (pipelines, sets): (Api<SyncPipeline>, Api<StatefulSet>) = match &scope {
            Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let ctx = ctx.clone();
        let stop = stop.clone();
        controllers.push(tokio::spawn(async move {
            Controller::new(pipelines, watcher::Config::default())
                .owns(sets, watcher::Config::default())
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

#[cfg(test)]
mod leading_tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// The API server stops answering while this replica leads: the renewal hangs instead of
    /// failing. Leadership must end on this process's own clock within the lease, not wait for
    /// an answer that never comes while it keeps reconciling.
    #[tokio::test]
    async fn a_leader_whose_renewal_hangs_steps_down_within_its_lease() {
        let _ = rustls::crypto::ring::default_provider().install_default();
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
