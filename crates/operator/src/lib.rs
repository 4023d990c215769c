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
use tracing::{error, info, warn};

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
    // Follow until leading.
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
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
                    if let Err(e) = result {
                        warn!(error = %monsoon_engine::error_chain(&e), "controller");
                    }
                })
                .await;
        }));
    }

    // Keep leading; stop everything the moment leadership cannot be renewed in time.
    let mut last_renewed = Instant::now();
    let result = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            () = tokio::time::sleep(renew_every) => {}
        }
        match elector.try_acquire_or_renew().await {
            Ok(true) => {
                last_renewed = Instant::now();
                endpoints.beat(true);
            }
            Ok(false) => break Err(Error::LostLeadership(elector.duration())),
            Err(e) => {
                warn!(error = %e, "leader election: renewal failed");
                endpoints.beat(false);
                if last_renewed.elapsed() >= elector.duration() - renew_every {
                    break Err(Error::LostLeadership(elector.duration()));
                }
            }
        }
    };
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
