//! `monsoon worker`: one shard of a pipeline inside a pod created by the operator.
//!
//! The operator hands the worker its pipeline in `MONSOON_PIPELINE` (credentials already
//! turned into environment variables and files by the pod spec) and the shard count in
//! `MONSOON_SHARD_COUNT`; the shard is the pod's StatefulSet ordinal. The lease, renewals
//! and fencing are in [`monsoon_operator::worker`]; this adds the pod's environment, the HTTP
//! endpoints and signals.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use monsoon_api::SyncPipeline;
use monsoon_engine::config::Shard;
use monsoon_engine::http::{self, Endpoints};
use monsoon_engine::metrics::{Health, Metrics};
use monsoon_operator::workload::{checkpoint_name, ENV_PIPELINE, ENV_SHARD_COUNT};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, Instrument};

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
    let validated = monsoon_api::validate(&pipeline, monsoon_engine::check_connection_string).map_err(|errors| {
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
        )
        .instrument(tracing::info_span!("http", pipeline = %name)));
        tokio::spawn(crate::watch_signals(shutdown.clone()).instrument(tracing::info_span!("signals", pipeline = %name)));
        let client = kube::Client::try_default()
            .await
            .context("failed to configure the Kubernetes client (in-cluster service account)")?;
        let api: Api<ConfigMap> = Api::namespaced(client, &namespace);

        let result = monsoon_operator::worker::run(
            api,
            monsoon_operator::worker::Shard {
                engine: engine_config,
                configmap,
                pod,
                lease: LEASE,
                grace,
            },
            metrics,
            health,
            shutdown,
        )
        .await;
        http_stop.cancel();
        match result {
            Ok(()) => {
                info!(pipeline = %name, %shard, "worker stopped cleanly");
                Ok(())
            }
            Err(e) => {
                error!(pipeline = %name, %shard, error = %monsoon_engine::error_chain(&e), "worker stopped");
                Err(anyhow::anyhow!(monsoon_engine::error_chain(&e)))
            }
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
