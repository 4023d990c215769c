//! One shard's worker: the engine, checkpointing into a ConfigMap that is also its lease.
//!
//! 1. Take the lease on the shard's checkpoint ConfigMap as this process's
//!    [incarnation](configmap::incarnation) (pod name plus a nonce, so a replacement pod and a
//!    zombie of the same name are told apart), waiting while another worker holds it: a
//!    rollout's old pod still finishing, or a partitioned one. A held lease counts as abandoned
//!    only once this worker has seen it unchanged for its whole duration, on its own clock.
//! 2. Run the engine with that ConfigMap as its checkpoint store.
//! 3. Renew the lease every third of its duration, writing a [`WorkerReport`] beside it.
//! 4. Stop syncing at once (in-flight bulks abandoned, nothing more written) when the lease
//!    is taken over, or when no renewal has succeeded by its local deadline: a monotonic
//!    deadline watched beside the renewal, so a renewal that hangs cannot keep a zombie
//!    writing past its lease.
//! 5. On shutdown: deliver what was read, write the final checkpoint and report, release
//!    the lease so a successor starts without waiting.
//!
//! `monsoon worker` wraps this with the pod's environment, signals and HTTP endpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use monsoon_engine::checkpoint::configmap::{self, Candidate, ConfigMapLease, Error as LeaseError};
use monsoon_engine::config::EngineConfig;
use monsoon_engine::metrics::{Health, Metrics};
use monsoon_engine::RunOptions;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

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
    /// The pod's name. The lease holder is this plus a nonce drawn by [`run`], so each call
    /// (each process start) is a holder of its own.
    pub pod: String,
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
        pod,
        lease: duration,
        grace,
    } = shard;
    let identity = configmap::incarnation(&pod);
    let mut candidate = Candidate::new(api, &configmap, &identity, duration);
    let lease = loop {
        match candidate.try_acquire().await {
            Ok(lease) => break Arc::new(lease),
            Err(LeaseError::Held { holder, remaining, .. }) => {
                info!(configmap = %configmap, %holder, ?remaining, "shard leased by another worker; waiting until it is released or left unrenewed for its duration");
                // Look again at least every third of a duration: a renewal seen late only
                // delays the takeover, never hastens it.
                let wait = remaining.clamp(Duration::from_millis(200), (duration / 3).max(Duration::from_millis(200)));
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
    info!(pipeline = %engine.name, shard = %engine.shard, configmap = %configmap, holder = %identity, "lease held; starting");

    let hard_stop = CancellationToken::new();
    let fenced = Arc::new(AtomicBool::new(false));
    let stop_renewing = CancellationToken::new();
    let renewer = {
        let span = info_span!("lease", pipeline = %engine.name, shard = %engine.shard, configmap = %configmap);
        let fence = {
            let (fenced, hard_stop, shutdown) = (fenced.clone(), hard_stop.clone(), shutdown.clone());
            move |why: &str| {
                error!(why, "stopping at once: the lease is no longer ours");
                fenced.store(true, Ordering::SeqCst);
                hard_stop.cancel();
                shutdown.cancel();
            }
        };
        tokio::spawn(renew(lease.clone(), metrics.clone(), health.clone(), stop_renewing.clone(), fence).instrument(span))
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
            exit_after_snapshot: false,
        },
    )
    .await;
    stop_renewing.cancel();
    let _ = renewer.await;
    // The checkpointer can be the first to find the lease taken (its write is refused) or run
    // out (its write is not sent).
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

/// Renew the lease every third of its duration until `stop`, calling `fence` when it is taken
/// over or runs out.
///
/// The local deadline ([`ConfigMapLease::expired`]) is watched beside the renewal, not checked
/// after it returns: a renewal that hangs (API server stalled, network path black-holed) is
/// abandoned and the worker fenced when the deadline passes, before a standby that saw the last
/// renewal may take the lease. A renewal that fails or takes longer than a renewal period is
/// retried sooner, so one lost request does not cost the lease.
async fn renew(lease: Arc<ConfigMapLease>, metrics: Metrics, health: Arc<Health>, stop: CancellationToken, fence: impl Fn(&str)) {
    let every = lease.duration() / 3;
    // After a failure: several more tries before the deadline (4/5 of the duration).
    let retry = every / 4;
    let mut wait = every;
    loop {
        let attempt = async {
            tokio::time::sleep(wait).await;
            let report = WorkerReport::from_engine(&metrics, &health, monsoon_engine::time::unix_seconds());
            tokio::time::timeout(every, lease.renew_with_status(&serde_json::to_string(&report).unwrap_or_default())).await
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = lease.expired() => {
                fence("no renewal succeeded within the lease duration (on this worker's clock); a standby may take it over");
                return;
            }
            outcome = attempt => match outcome {
                Ok(Ok(())) => wait = every,
                Ok(Err(LeaseError::LeaseLost { holder, .. })) => {
                    fence(&format!("lease taken over by `{holder}`"));
                    return;
                }
                Ok(Err(LeaseError::Expired { .. })) => {
                    fence("no renewal succeeded within the lease duration (on this worker's clock); a standby may take it over");
                    return;
                }
                Ok(Err(e)) => {
                    warn!(error = %monsoon_engine::error_chain(&e), "lease renewal failed; retrying");
                    wait = retry;
                }
                Err(_) => {
                    warn!(timeout = ?every, "lease renewal did not answer in time; retrying");
                    wait = retry;
                }
            },
        }
    }
}
