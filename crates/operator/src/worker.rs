//! One shard's worker: the engine, checkpointing into a ConfigMap that is also its lease.
//!
//! 1. Take the lease on the shard's checkpoint ConfigMap, waiting while another worker holds
//!    it (a rollout's old pod still finishing, or a partitioned one whose lease has not run
//!    out yet).
//! 2. Run the engine with that ConfigMap as its checkpoint store.
//! 3. Renew the lease every third of its duration, writing a [`WorkerReport`] beside it.
//! 4. Stop syncing at once (in-flight bulks abandoned, nothing more written) when the lease
//!    is taken over, or cannot be renewed before it would run out.
//! 5. On shutdown: deliver what was read, write the final checkpoint and report, release
//!    the lease so a successor starts without waiting.
//!
//! `monsoon worker` wraps this with the pod's environment, signals and HTTP endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use monsoon_engine::checkpoint::configmap::{ConfigMapLease, Error as LeaseError};
use monsoon_engine::config::EngineConfig;
use monsoon_engine::metrics::{Health, Metrics};
use monsoon_engine::RunOptions;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::report::WorkerReport;

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The lease was taken over or could not be renewed in time.
    #[error("the checkpoint lease on ConfigMap {0} was lost; stopped without writing anything more")]
    LeaseLost(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] monsoon_engine::Error),
}

/// What one worker runs.
pub struct Shard {
    /// Engine configuration (its `shard` set).
    pub engine: EngineConfig,
    /// Checkpoint ConfigMap (and lease) of the shard.
    pub configmap: String,
    /// This worker's identity (its pod name).
    pub identity: String,
    /// Lease duration; renewed every third of it.
    pub lease: Duration,
    /// Time to deliver what was read after shutdown.
    pub grace: Duration,
}

/// Run one shard until `shutdown`, a fatal engine error or the loss of the lease.
///
/// # Errors
/// [`Error::LeaseLost`] when fenced; [`Error::Engine`] on fatal engine errors.
pub async fn run(
    api: Api<ConfigMap>,
    shard: Shard,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let Shard {
        engine,
        configmap,
        identity,
        lease: duration,
        grace,
    } = shard;
    let lease = loop {
        match ConfigMapLease::acquire(api.clone(), &configmap, &identity, duration).await {
            Ok(lease) => break Arc::new(lease),
            Err(LeaseError::Held { holder, remaining, .. }) => {
                info!(configmap = %configmap, %holder, ?remaining, "shard leased by another worker; waiting");
                let wait = remaining.clamp(Duration::from_millis(200), Duration::from_secs(5));
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(wait) => {}
                }
            }
            Err(e) => {
                warn!(error = %monsoon_engine::error_chain(&e), "cannot take the checkpoint lease; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    info!(pipeline = %engine.name, shard = %engine.shard, configmap = %configmap, "lease held; starting");

    let hard_stop = CancellationToken::new();
    let fenced = Arc::new(AtomicBool::new(false));
    let stop_renewing = CancellationToken::new();
    let renewer = {
        let (lease, metrics, health) = (lease.clone(), metrics.clone(), health.clone());
        let (shutdown, hard_stop, fenced, stop) = (shutdown.clone(), hard_stop.clone(), fenced.clone(), stop_renewing.clone());
        tokio::spawn(async move {
            let every = duration / 3;
            let mut last_ok = Instant::now();
            let fence = |why: &str| {
                error!(why, "stopping at once: the lease is no longer ours");
                fenced.store(true, Ordering::SeqCst);
                hard_stop.cancel();
                shutdown.cancel();
            };
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(every) => {}
                }
                let report = WorkerReport::from_engine(&metrics, &health, monsoon_engine::time::unix_seconds());
                match lease.renew_with_status(&serde_json::to_string(&report).unwrap_or_default()).await {
                    Ok(()) => last_ok = Instant::now(),
                    Err(LeaseError::LeaseLost { holder, .. }) => {
                        fence(&format!("lease taken over by `{holder}`"));
                        return;
                    }
                    Err(e) => {
                        warn!(error = %monsoon_engine::error_chain(&e), "lease renewal failed");
                        if last_ok.elapsed() + every >= duration {
                            fence("the lease could not be renewed before running out");
                            return;
                        }
                    }
                }
            }
        })
    };

    let result = monsoon_engine::run(
        engine,
        lease.clone(),
        metrics.clone(),
        health.clone(),
        shutdown,
        RunOptions {
            shutdown_grace: grace,
            hard_stop,
        },
    )
    .await;
    stop_renewing.cancel();
    let _ = renewer.await;
    // The checkpointer can be the first to find the lease taken (its write is refused).
    if matches!(&result, Err(monsoon_engine::Error::Checkpoint(monsoon_engine::checkpoint::Error::Fenced { .. }))) {
        fenced.store(true, Ordering::SeqCst);
    }
    if fenced.load(Ordering::SeqCst) {
        return Err(Error::LeaseLost(configmap));
    }
    // Last report (a failure stays visible), then let a successor in at once.
    let report = WorkerReport::from_engine(&metrics, &health, monsoon_engine::time::unix_seconds());
    if let Err(e) = lease.renew_with_status(&serde_json::to_string(&report).unwrap_or_default()).await {
        warn!(error = %monsoon_engine::error_chain(&e), "failed to write the final report");
    }
    if let Err(e) = lease.release().await {
        warn!(error = %monsoon_engine::error_chain(&e), "failed to release the lease; the next worker waits for it to expire");
    }
    result.map_err(Error::from)
}
