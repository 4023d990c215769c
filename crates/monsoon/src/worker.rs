//! `monsoon worker`: one shard of a pipeline inside a pod created by the operator.
//!
//! The operator hands the worker its pipeline in `MONSOON_PIPELINE` (credentials already
//! turned into environment variables and files by the pod spec) and the shard count in
//! `MONSOON_SHARD_COUNT`; the shard is the pod's StatefulSet ordinal. The worker:
//! 1. takes the lease on its checkpoint ConfigMap, waiting while another pod holds it;
//! 2. runs the engine with that ConfigMap as its checkpoint store;
//! 3. renews the lease every third of its duration, writing a progress report beside it;
//! 4. stops syncing at once (in-flight bulks abandoned) when the lease is lost or cannot be
//!    renewed before it would expire;
//! 5. on SIGTERM delivers what it read, writes the final checkpoint and releases the lease.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use monsoon_api::SyncPipeline;
use monsoon_engine::checkpoint::configmap::{ConfigMapLease, Error as LeaseError};
use monsoon_engine::config::Shard;
use monsoon_engine::http::{self, Endpoints};
use monsoon_engine::metrics::{Health, Metrics};
use monsoon_engine::RunOptions;
use monsoon_operator::report::WorkerReport;
use monsoon_operator::workload::{checkpoint_name, ENV_PIPELINE, ENV_SHARD_COUNT};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long a worker's lease lasts without renewal.
const LEASE: Duration = Duration::from_secs(15);

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).with_context(|| {
        format!("environment variable {name} is not set; `monsoon worker` runs in pods created by `monsoon operator` (use `monsoon run -f` outside Kubernetes)")
    })
}

/// The shard of pod `pod` (`<statefulset>-<ordinal>`).
fn shard_of(pod: &str, count: u32) -> anyhow::Result<Shard> {
    let index: u32 = pod
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .with_context(|| format!("POD_NAME `{pod}` does not end in a StatefulSet ordinal"))?;
    if index >= count {
        bail!("pod `{pod}` is ordinal {index}, but the pipeline has {count} shards; it will be removed by the rollout");
    }
    Ok(Shard { index, count })
}

/// Run the worker until SIGTERM, a fatal error or the loss of its lease.
pub fn worker(http_addr: SocketAddr, grace: Duration) -> anyhow::Result<()> {
    let text = env(ENV_PIPELINE)?;
    let pipeline: SyncPipeline = serde_json::from_str(&text).context("MONSOON_PIPELINE is not a SyncPipeline")?;
    let validated = monsoon_api::validate(&pipeline).map_err(|errors| {
        anyhow::anyhow!(
            "invalid pipeline: {}",
            errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
        )
    })?;
    let count: u32 = env(ENV_SHARD_COUNT)?.parse().context("MONSOON_SHARD_COUNT is not a number")?;
    let pod = env("POD_NAME")?;
    let namespace = env("POD_NAMESPACE")?;
    let shard = shard_of(&pod, count.max(1))?;
    let mut engine_config = crate::config::engine_config(&validated)?;
    engine_config.shard = shard;
    let name = validated.name.clone();
    let configmap = checkpoint_name(&name, shard.index, shard.count);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async move {
        let metrics = Metrics::new(&name);
        let health = Arc::new(Health::new(Duration::from_secs(120)));
        let shutdown = CancellationToken::new();
        let listener = http::bind(http_addr)
            .await
            .with_context(|| format!("failed to listen on --http-addr {http_addr}"))?;
        let http_stop = CancellationToken::new();
        tokio::spawn(http::serve(
            listener,
            Endpoints {
                pipeline: name.clone(),
                metrics: metrics.clone(),
                health: health.clone(),
            },
            http_stop.clone(),
        ));
        tokio::spawn(crate::watch_signals(shutdown.clone()));
        let client = kube::Client::try_default()
            .await
            .context("failed to configure the Kubernetes client (in-cluster service account)")?;
        let api: Api<ConfigMap> = Api::namespaced(client, &namespace);

        // 1. The lease.
        let lease = loop {
            match ConfigMapLease::acquire(api.clone(), &configmap, &pod, LEASE).await {
                Ok(lease) => break Arc::new(lease),
                Err(LeaseError::Held { holder, remaining, .. }) => {
                    info!(configmap = %configmap, %holder, ?remaining, "shard leased by another worker; waiting");
                    let wait = remaining.clamp(Duration::from_secs(1), Duration::from_secs(5));
                    tokio::select! {
                        () = shutdown.cancelled() => { http_stop.cancel(); return Ok(()); }
                        () = tokio::time::sleep(wait) => {}
                    }
                }
                Err(e) => {
                    warn!(error = %monsoon_engine::error_chain(&e), "cannot take the checkpoint lease; retrying");
                    tokio::select! {
                        () = shutdown.cancelled() => { http_stop.cancel(); return Ok(()); }
                        () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        };
        info!(pipeline = %name, %shard, configmap = %configmap, "lease held; starting");

        // 2. Renewals (with progress reports) beside the engine.
        let hard_stop = CancellationToken::new();
        let fenced = Arc::new(AtomicBool::new(false));
        let stop_renewing = CancellationToken::new();
        let renewer = {
            let (lease, metrics, health) = (lease.clone(), metrics.clone(), health.clone());
            let (shutdown, hard_stop, fenced, stop) = (shutdown.clone(), hard_stop.clone(), fenced.clone(), stop_renewing.clone());
            tokio::spawn(async move {
                let every = LEASE / 3;
                let mut last_ok = Instant::now();
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(every) => {}
                    }
                    let report = WorkerReport::from_engine(&metrics, &health, monsoon_engine::time::unix_seconds());
                    let text = serde_json::to_string(&report).unwrap_or_default();
                    match lease.renew_with_status(&text).await {
                        Ok(()) => last_ok = Instant::now(),
                        Err(e @ LeaseError::LeaseLost { .. }) => {
                            error!(error = %e, "lease lost: stopping at once");
                            fenced.store(true, Ordering::SeqCst);
                            hard_stop.cancel();
                            shutdown.cancel();
                            return;
                        }
                        Err(e) => {
                            warn!(error = %monsoon_engine::error_chain(&e), "lease renewal failed");
                            if last_ok.elapsed() + every >= LEASE {
                                error!("lease could not be renewed before it expires: stopping at once");
                                fenced.store(true, Ordering::SeqCst);
                                hard_stop.cancel();
                                shutdown.cancel();
                                return;
                            }
                        }
                    }
                }
            })
        };

        // 3. The engine.
        let result = monsoon_engine::run(
            engine_config,
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
        if fenced.load(Ordering::SeqCst) {
            http_stop.cancel();
            bail!("the checkpoint lease on ConfigMap {configmap} was lost; stopped without writing anything more");
        }
        // 4. Last report (a failure stays visible), then let a successor in at once.
        let report = WorkerReport::from_engine(&metrics, &health, monsoon_engine::time::unix_seconds());
        if let Err(e) = lease.renew_with_status(&serde_json::to_string(&report).unwrap_or_default()).await {
            warn!(error = %monsoon_engine::error_chain(&e), "failed to write the final report");
        }
        if let Err(e) = lease.release().await {
            warn!(error = %monsoon_engine::error_chain(&e), "failed to release the lease; the next worker waits for it to expire");
        }
        http_stop.cancel();
        match result {
            Ok(()) => {
                info!(pipeline = %name, %shard, "worker stopped cleanly");
                Ok(())
            }
            Err(e) => Err(anyhow::anyhow!(monsoon_engine::error_chain(&e))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_is_the_pod_ordinal() {
        assert_eq!(shard_of("shop-worker-2", 3).expect("ok"), Shard { index: 2, count: 3 });
        assert!(shard_of("shop-worker-3", 3).is_err(), "beyond the shard count");
        assert!(shard_of("shop-worker", 3).is_err(), "no ordinal");
    }
}
