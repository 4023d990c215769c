//! One reconcile of one `SyncPipeline`: validate → check references → lay out checkpoints
//! (re-sharding when `workers` changed) → apply the workload → fold the workers' reports into
//! the status.
//!
//! Failures the user must fix (invalid spec, missing Secret) become conditions and Events and
//! leave the running workers alone; they are never errors that crash-loop the operator. Only
//! API failures are errors, retried by the controller with backoff.
//!
//! # Invariants
//! - Old and new shard layouts never run at once: a re-shard first stops every worker and
//!   waits until no worker pod is left, then merges the old checkpoints
//!   ([`Checkpoint::merge_for_reshard`]) before the new workers start.
//! - Deleting a pipeline stops its workers (their final checkpoints written) before the
//!   checkpoints are removed and the finalizer released.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use monsoon_api::{
    validate_for_cluster, value_sources, CheckpointRetention, Condition, ShardStatus, SyncPipeline,
    SyncPipelineStatus,
};
use monsoon_engine::checkpoint::configmap::{holder_pod, KEY_CHECKPOINT, KEY_HOLDER, KEY_RENEW_TIME, KEY_STATUS};
use monsoon_engine::checkpoint::Checkpoint;
use monsoon_engine::config::Shard;
use serde::Serialize;
use tracing::{info, warn};

use crate::report::WorkerReport;
use crate::workload::{self, WorkerSettings, LABEL_CHECKPOINT, LABEL_PIPELINE, LABEL_SHARD_COUNT};

/// Finalizer that stops the workers before a pipeline goes away.
pub const FINALIZER: &str = "monsoon.dev/stop-workers";
/// Field manager of everything the operator applies.
pub const MANAGER: &str = "monsoon-operator";
/// How often a healthy pipeline's status is refreshed from its workers' reports.
pub const STATUS_REFRESH: Duration = Duration::from_secs(15);
/// How often to look again for a missing Secret or ConfigMap. The operator may only `get`
/// Secrets (the chart grants no `list` or `watch` on them), so nothing tells it when one
/// appears: it asks again. Measured against a real API server, this is the delay between
/// creating the Secret and the workers' StatefulSet (it was 30 s).
const RECHECK_REFERENCES: Duration = Duration::from_secs(10);
/// How often to look again while waiting for workers to stop.
const WAIT_FOR_STOP: Duration = Duration::from_secs(3);
/// How long a worker report stays current.
const REPORT_STALE_SECS: i64 = 60;

/// A failed reconcile (Kubernetes API trouble); retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error("failed to {op}")]
    Api {
        /// What was attempted.
        op: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The object has no namespace (SyncPipelines are namespaced).
    #[error("SyncPipeline {0} has no namespace")]
    NoNamespace(String),
}

fn api_err(op: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let op = op.into();
    move |source| Error::Api { op, source }
}

/// What a reconcile needs.
pub struct Context {
    /// Kubernetes client.
    pub client: kube::Client,
    /// How workers run.
    pub settings: WorkerSettings,
    /// Publishes Kubernetes Events (best effort); `None` in tests without an events API.
    pub recorder: Option<Recorder>,
    /// Operator metrics.
    pub metrics: crate::OperatorMetrics,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn now_rfc3339() -> String {
    monsoon_engine::time::rfc3339(now_unix())
}

/// Reconcile one pipeline.
///
/// # Errors
/// [`Error`] on Kubernetes API failures; the controller retries.
pub async fn reconcile(p: Arc<SyncPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = p.namespace().ok_or_else(|| Error::NoNamespace(p.name_any()))?;
    let pipelines: Api<SyncPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    if p.metadata.deletion_timestamp.is_some() {
        return finalize(&p, &ns, &pipelines, &ctx).await;
    }
    if !p.finalizers().iter().any(|f| f == FINALIZER) {
        update_finalizers(&pipelines, &p.name_any(), |f| f.push(FINALIZER.to_string())).await?;
    }
    let mut status = p.status.clone().unwrap_or_default();
    let generation = p.metadata.generation;
    status.observed_generation = generation;

    // 1. The spec itself.
    if let Err(errors) = validate_for_cluster(&p) {
        let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        set(&mut status, generation, "InvalidSpec", true, "InvalidSpec", &message);
        set(&mut status, generation, "Ready", false, "InvalidSpec", "the spec is invalid; running workers (if any) keep the last valid spec");
        set(&mut status, generation, "Degraded", true, "InvalidSpec", &message);
        status.phase = Some("Failed".into());
        event(&ctx, &p, EventType::Warning, "InvalidSpec", &message).await;
        write_status(&pipelines, &p, &status).await?;
        return Ok(Action::await_change());
    }
    set(&mut status, generation, "InvalidSpec", false, "Valid", "the spec is valid");

    // 2. The Secrets and ConfigMaps it references.
    let missing = missing_references(&p, &ns, &ctx.client).await?;
    if !missing.is_empty() {
        let message = missing.join("; ");
        set(&mut status, generation, "CredentialsMissing", true, "ReferenceNotFound", &message);
        set(&mut status, generation, "Ready", false, "CredentialsMissing", &message);
        if status.phase.is_none() {
            status.phase = Some("Pending".into());
        }
        event(&ctx, &p, EventType::Warning, "CredentialsMissing", &message).await;
        write_status(&pipelines, &p, &status).await?;
        return Ok(Action::requeue(RECHECK_REFERENCES));
    }
    set(&mut status, generation, "CredentialsMissing", false, "Found", "every referenced Secret and key exists");

    // 3. Checkpoint layout.
    let name = p.name_any();
    let want = p.spec.workers.max(1);
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = configmaps
        .list(&ListParams::default().labels(&format!("{LABEL_PIPELINE}={name},{LABEL_CHECKPOINT}=true")))
        .await
        .map_err(api_err("list checkpoint ConfigMaps"))?
        .items;
    let old: Vec<&ConfigMap> = existing.iter().filter(|cm| shard_count_of(cm) != Some(want)).collect();
    if !old.is_empty() {
        match reshard(&p, &ns, want, &old, &existing, &ctx).await? {
            Some(wait) => {
                set(&mut status, generation, "Progressing", true, "Resharding", &format!("stopping every worker before moving to {want} shards"));
                set(&mut status, generation, "Ready", false, "Resharding", "workers are stopped while the shard layout changes");
                status.phase = Some("Pending".into());
                write_status(&pipelines, &p, &status).await?;
                return Ok(Action::requeue(wait));
            }
            None => {
                let message = format!("checkpoints merged into {want} shards; starting the new workers");
                event(&ctx, &p, EventType::Normal, "Resharded", &message).await;
            }
        }
    }
    ensure_checkpoints(&p, &configmaps, want).await?;

    // 4. The workload.
    let replicas = if p.spec.paused { 0 } else { want };
    let w = workload::build(&p, want, replicas, &ctx.settings);
    apply(&ctx.client, &ns, &w.service_account).await?;
    apply(&ctx.client, &ns, &w.role).await?;
    apply(&ctx.client, &ns, &w.role_binding).await?;
    apply(&ctx.client, &ns, &w.service).await?;
    let sts = apply(&ctx.client, &ns, &w.stateful_set).await?;
    status.shard_count = Some(want);

    // 5. Status from the workers' reports.
    let configmaps_now = configmaps
        .list(&ListParams::default().labels(&format!("{LABEL_PIPELINE}={name},{LABEL_CHECKPOINT}=true,{LABEL_SHARD_COUNT}={want}")))
        .await
        .map_err(api_err("list checkpoint ConfigMaps"))?
        .items;
    summarize(&mut status, &p, &sts, &configmaps_now, want, now_unix());
    for (type_, event_type, reason) in transitions(p.status.as_ref(), &status) {
        let message = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        event(&ctx, &p, event_type, reason, &message).await;
    }
    write_status(&pipelines, &p, &status).await?;
    Ok(Action::requeue(STATUS_REFRESH))
}

/// Requeue policy after a failed reconcile.
pub fn error_policy(_p: Arc<SyncPipeline>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_errors.inc();
    warn!(error = %monsoon_engine::error_chain(error), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

fn shard_count_of(cm: &ConfigMap) -> Option<u32> {
    cm.labels().get(LABEL_SHARD_COUNT).and_then(|c| c.parse().ok())
}

fn shard_index_of(cm: &ConfigMap) -> Option<u32> {
    // `<pipeline>-checkpoint-<i>-of-<n>`
    let name = cm.metadata.name.as_deref()?;
    let (head, _) = name.rsplit_once("-of-")?;
    head.rsplit_once('-')?.1.parse().ok()
}

/// Read-modify-replace of the finalizer list, retried on conflicts. A pipeline that is gone
/// needs no change: against a real API server the controller can run a deleted pipeline's
/// finalizer a second time from its cache (a watch event of the objects it owned, which the
/// garbage collector is removing, arrives after the first run let it go), and that run must not
/// fail on the 404.
async fn update_finalizers(
    api: &Api<SyncPipeline>,
    name: &str,
    change: impl Fn(&mut Vec<String>),
) -> Result<(), Error> {
    let mut attempts = 0;
    loop {
        let Some(mut current) = api.get_opt(name).await.map_err(api_err("read the SyncPipeline"))? else {
            return Ok(());
        };
        let mut finalizers = current.metadata.finalizers.clone().unwrap_or_default();
        let before = finalizers.clone();
        change(&mut finalizers);
        if finalizers == before {
            return Ok(());
        }
        current.metadata.finalizers = Some(finalizers);
        match api.replace(name, &PostParams::default(), &current).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < 5 => {
                attempts += 1;
                continue;
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(api_err("update the SyncPipeline's finalizers")(e)),
        }
    }
}

/// Server-side apply of one object owned by the operator.
async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Serialize
        + serde::de::DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    let mut value = serde_json::to_value(obj).map_err(|e| Error::Api {
        op: format!("serialize {} {name}", K::kind(&())),
        source: kube::Error::SerdeError(e),
    })?;
    value["apiVersion"] = K::api_version(&()).into();
    value["kind"] = K::kind(&()).into();
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&value))
        .await
        .map_err(api_err(format!("apply {} {name}", K::kind(&()))))
}

/// Every `secretKeyRef` / `configMapKeyRef` whose object or key does not exist.
async fn missing_references(p: &SyncPipeline, ns: &str, client: &kube::Client) -> Result<Vec<String>, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut missing = Vec::new();
    for (field, from) in value_sources(&p.spec) {
        if let Some(r) = &from.secret_key_ref {
            match secrets.get_opt(&r.name).await.map_err(api_err(format!("read Secret {}", r.name)))? {
                None => missing.push(format!("{field}: Secret `{}` not found in namespace `{ns}`", r.name)),
                Some(s) => {
                    let has = s.data.as_ref().is_some_and(|d| d.contains_key(&r.key))
                        || s.string_data.as_ref().is_some_and(|d| d.contains_key(&r.key));
                    if !has {
                        missing.push(format!("{field}: Secret `{}` has no key `{}`", r.name, r.key));
                    }
                }
            }
        }
        if let Some(r) = &from.config_map_key_ref {
            match configmaps.get_opt(&r.name).await.map_err(api_err(format!("read ConfigMap {}", r.name)))? {
                None => missing.push(format!("{field}: ConfigMap `{}` not found in namespace `{ns}`", r.name)),
                Some(c) => {
                    if !c.data.as_ref().is_some_and(|d| d.contains_key(&r.key)) {
                        missing.push(format!("{field}: ConfigMap `{}` has no key `{}`", r.name, r.key));
                    }
                }
            }
        }
    }
    Ok(missing)
}

fn checkpoint_configmap(p: &SyncPipeline, index: u32, count: u32, checkpoint: Option<&Checkpoint>) -> ConfigMap {
    let name = p.name_any();
    let mut labels = workload::labels(&name);
    labels.insert(LABEL_CHECKPOINT.into(), "true".into());
    labels.insert(LABEL_SHARD_COUNT.into(), count.to_string());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(workload::checkpoint_name(&name, index, count)),
            namespace: p.metadata.namespace.clone(),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        data: checkpoint.map(|cp| {
            BTreeMap::from([(KEY_CHECKPOINT.to_string(), serde_json::to_string(cp).unwrap_or_default())])
        }),
        ..ConfigMap::default()
    }
}

/// Create the checkpoint ConfigMaps of every shard that has none yet (never touching an
/// existing one: its worker owns it).
async fn ensure_checkpoints(p: &SyncPipeline, api: &Api<ConfigMap>, count: u32) -> Result<(), Error> {
    for index in 0..count {
        let cm = checkpoint_configmap(p, index, count, None);
        match api.create(&PostParams::default(), &cm).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(api_err(format!("create checkpoint ConfigMap {}", cm.name_any()))(e)),
        }
    }
    Ok(())
}

/// Move the checkpoints to `want` shards. Returns how long to wait while old workers are
/// still stopping, or `None` once the new layout is written.
async fn reshard(
    p: &SyncPipeline,
    ns: &str,
    want: u32,
    old: &[&ConfigMap],
    all: &[ConfigMap],
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let name = p.name_any();
    // Stop every worker of the old layout.
    let running = stop_workers(&ctx.client, ns, &name).await?;
    if running > 0 {
        info!(pipeline = %name, pods = running, want, "re-shard: waiting for the old workers to stop");
        return Ok(Some(WAIT_FOR_STOP));
    }
    // The old layout: the most common shard count among the old ConfigMaps (normally the only
    // one). A missing shard or one without a checkpoint counts as never started.
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for cm in old {
        if let Some(c) = shard_count_of(cm) {
            *counts.entry(c).or_default() += 1;
        }
    }
    let old_count = counts.iter().max_by_key(|(_, n)| **n).map(|(c, _)| *c).unwrap_or(1);
    let mut old_checkpoints = Vec::new();
    for index in 0..old_count {
        let cp = old
            .iter()
            .find(|cm| shard_count_of(cm) == Some(old_count) && shard_index_of(cm) == Some(index))
            .and_then(|cm| cm.data.as_ref()?.get(KEY_CHECKPOINT).cloned())
            .and_then(|text| serde_json::from_str::<Checkpoint>(&text).ok())
            .unwrap_or_else(|| Checkpoint::new(&name));
        old_checkpoints.push(cp);
    }
    let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    for index in 0..want {
        let merged = Checkpoint::merge_for_reshard(&name, &old_checkpoints, Shard { index, count: want });
        let cm = checkpoint_configmap(p, index, want, Some(&merged));
        let cm_name = cm.name_any();
        // A ConfigMap of the new layout left by an interrupted re-shard is overwritten: no
        // worker of the new layout has run yet.
        match all.iter().find(|c| c.name_any() == cm_name) {
            Some(existing) => {
                let mut replacement = cm;
                replacement.metadata.resource_version = existing.metadata.resource_version.clone();
                configmaps
                    .replace(&cm_name, &PostParams::default(), &replacement)
                    .await
                    .map_err(api_err(format!("write checkpoint ConfigMap {cm_name}")))?;
            }
            None => {
                configmaps
                    .create(&PostParams::default(), &cm)
                    .await
                    .map_err(api_err(format!("create checkpoint ConfigMap {cm_name}")))?;
            }
        }
    }
    for cm in old {
        delete_if_present(&configmaps, &cm.name_any(), "delete an old checkpoint ConfigMap").await?;
    }
    info!(pipeline = %name, from = old_count, to = want, "re-shard: checkpoints merged");
    Ok(None)
}

/// Scale a pipeline's workers to zero (when its StatefulSet exists); returns how many worker
/// pods still run. Re-sharding and deletion both wait for zero before going on.
async fn stop_workers(client: &kube::Client, ns: &str, pipeline: &str) -> Result<usize, Error> {
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let worker = workload::worker_name(pipeline);
    if sts.get_opt(&worker).await.map_err(api_err("read the worker StatefulSet"))?.is_some() {
        let stop = serde_json::json!({"spec": {"replicas": 0}});
        sts.patch(&worker, &PatchParams::default(), &Patch::Merge(&stop))
            .await
            .map_err(api_err("scale the workers to zero"))?;
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let running = pods
        .list(&ListParams::default().labels(&workload::pod_selector(pipeline)))
        .await
        .map_err(api_err("list worker pods"))?
        .items;
    Ok(running.len())
}

/// Delete `name`; one already gone is fine.
async fn delete_if_present<K>(api: &Api<K>, name: &str, op: &str) -> Result<(), Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(api_err(format!("{op} ({name})"))(e)),
    }
}

/// Deletion: stop the workers, then keep or remove the checkpoints, then let go.
async fn finalize(p: &SyncPipeline, ns: &str, pipelines: &Api<SyncPipeline>, ctx: &Context) -> Result<Action, Error> {
    let name = p.name_any();
    if !p.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let running = stop_workers(&ctx.client, ns, &name).await?;
    if running > 0 {
        info!(pipeline = %name, pods = running, "deleting: waiting for the workers to stop");
        return Ok(Action::requeue(WAIT_FOR_STOP));
    }
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    delete_if_present(&sts, &workload::worker_name(&name), "delete the worker StatefulSet").await?;
    if p.spec.checkpoints_on_delete == CheckpointRetention::Delete {
        let configmaps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
        let list = configmaps
            .list(&ListParams::default().labels(&format!("{LABEL_PIPELINE}={name},{LABEL_CHECKPOINT}=true")))
            .await
            .map_err(api_err("list checkpoint ConfigMaps"))?;
        for cm in list.items {
            delete_if_present(&configmaps, &cm.name_any(), "delete a checkpoint ConfigMap").await?;
        }
    }
    update_finalizers(pipelines, &name, |f| f.retain(|x| x != FINALIZER)).await?;
    info!(pipeline = %name, checkpoints = ?p.spec.checkpoints_on_delete, "pipeline deleted: workers stopped");
    Ok(Action::await_change())
}

/// Conditions that just turned on and deserve an Event: problems as warnings, readiness as
/// normal news. Returns (condition type, event type, event reason).
pub fn transitions(before: Option<&SyncPipelineStatus>, after: &SyncPipelineStatus) -> Vec<(&'static str, EventType, &'static str)> {
    let was_on = |t: &str| {
        before.is_some_and(|b| b.conditions.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    let is_on = |t: &str| after.conditions.iter().any(|c| c.type_ == t && c.status == "True");
    [
        ("SourceUnavailable", EventType::Warning, "SourceUnavailable"),
        ("SinkUnavailable", EventType::Warning, "SinkUnavailable"),
        ("HistoryLost", EventType::Warning, "HistoryLost"),
        ("Degraded", EventType::Warning, "Degraded"),
        ("Ready", EventType::Normal, "Ready"),
    ]
    .into_iter()
    .filter(|(t, _, _)| is_on(t) && !was_on(t))
    .collect()
}

/// Set a condition, keeping its `lastTransitionTime` unless its status changes.
pub fn set(status: &mut SyncPipelineStatus, generation: Option<i64>, type_: &str, on: bool, reason: &str, message: &str) {
    let value = if on { "True" } else { "False" };
    let previous = status.conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &status.conditions[i]) {
        Some(c) if c.status == value => c.last_transition_time.clone(),
        _ => Some(now_rfc3339()),
    };
    let condition = Condition {
        type_: type_.to_string(),
        status: value.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time,
        observed_generation: generation,
    };
    match previous {
        Some(i) => status.conditions[i] = condition,
        None => status.conditions.push(condition),
    }
}

/// One shard's lease and report, read from its ConfigMap.
fn shard_status(cm: &ConfigMap, index: u32, now: i64) -> (ShardStatus, Option<WorkerReport>) {
    let data = cm.data.clone().unwrap_or_default();
    // The pod, not the incarnation nonce after it: what `kubectl get pods` shows.
    let holder = data.get(KEY_HOLDER).filter(|h| !h.is_empty()).map(|h| holder_pod(h).to_string());
    let renewed = data.get(KEY_RENEW_TIME).and_then(|t| t.parse::<i64>().ok()).unwrap_or(0) / 1000;
    let report: Option<WorkerReport> = data
        .get(KEY_STATUS)
        .and_then(|s| serde_json::from_str(s).ok())
        // A failure stays visible after its worker stopped; anything else only while fresh.
        .filter(|r: &WorkerReport| r.failure.is_some() || (holder.is_some() && now - r.reported_unix.max(renewed) < REPORT_STALE_SECS));
    let checkpoint: Option<Checkpoint> = data.get(KEY_CHECKPOINT).and_then(|s| serde_json::from_str(s).ok());
    let last_event = checkpoint
        .as_ref()
        .and_then(|c| c.stream_time)
        .map(|t| monsoon_engine::time::rfc3339(i64::from(t.t)));
    let status = ShardStatus {
        shard: index,
        holder,
        phase: Some(report.as_ref().map_or("Stopped".to_string(), |r| r.phase.clone())),
        snapshot_percent: report.as_ref().and_then(|r| r.snapshot_percent),
        last_event_time: last_event,
        lag_seconds: report.as_ref().and_then(|r| r.lag_seconds),
        checkpoint_age_seconds: report
            .as_ref()
            .and_then(|r| r.checkpoint_unix)
            .map(|t| u64::try_from(now - t).unwrap_or(0)),
        documents_synced: report.as_ref().map(|r| r.documents_synced),
        failure: report.as_ref().and_then(|r| r.failure.clone()),
    };
    (status, report)
}

/// Fold the StatefulSet's state and the workers' reports into the status.
pub fn summarize(
    status: &mut SyncPipelineStatus,
    p: &SyncPipeline,
    sts: &StatefulSet,
    configmaps: &[ConfigMap],
    want: u32,
    now: i64,
) {
    let g = p.metadata.generation;
    let mut shards = Vec::new();
    let mut reports = Vec::new();
    for index in 0..want {
        let cm_name = workload::checkpoint_name(&p.name_any(), index, want);
        let (s, r) = match configmaps.iter().find(|c| c.name_any() == cm_name) {
            Some(cm) => shard_status(cm, index, now),
            None => (
                ShardStatus {
                    shard: index,
                    phase: Some("Pending".into()),
                    ..ShardStatus::default()
                },
                None,
            ),
        };
        shards.push(s);
        reports.push(r);
    }
    let sts_status = sts.status.clone().unwrap_or_default();
    let ready = u32::try_from(sts_status.ready_replicas.unwrap_or(0)).unwrap_or(0);
    let rolling = sts_status.updated_replicas.unwrap_or(0) < sts_status.replicas
        || sts_status.observed_generation < sts.metadata.generation;
    let live: Vec<&WorkerReport> = reports.iter().flatten().collect();
    let failures: Vec<String> = shards
        .iter()
        .filter_map(|s| s.failure.as_ref().map(|f| format!("shard {}: {f}", s.shard)))
        .collect();
    let running = |r: &&WorkerReport| r.phase == "Snapshotting" || r.phase == "Streaming";
    let source_down: Vec<u32> = shards
        .iter()
        .zip(&reports)
        .filter(|(_, r)| r.as_ref().is_some_and(|r| running(&r) && !r.source_ok))
        .map(|(s, _)| s.shard)
        .collect();
    let sink_down: Vec<u32> = shards
        .iter()
        .zip(&reports)
        .filter(|(_, r)| r.as_ref().is_some_and(|r| running(&r) && !r.sink_ok))
        .map(|(s, _)| s.shard)
        .collect();
    let snapshotting = live.iter().any(|r| r.phase == "Snapshotting");
    let all_streaming = live.len() == want as usize && live.iter().all(|r| r.phase == "Streaming");

    status.phase = Some(
        if p.spec.paused {
            "Paused"
        } else if !failures.is_empty() {
            "Failed"
        } else if snapshotting {
            "Snapshotting"
        } else if all_streaming {
            "Streaming"
        } else {
            "Pending"
        }
        .to_string(),
    );
    status.ready = Some(format!("{ready}/{}", if p.spec.paused { 0 } else { want }));
    let lag = live.iter().filter_map(|r| r.lag_seconds).fold(None, |m: Option<f64>, l| Some(m.map_or(l, |m| m.max(l))));
    status.lag = lag.map(|l| format!("{l:.1}s"));
    status.documents_synced = Some(live.iter().map(|r| r.documents_synced).sum());
    status.shards = shards;

    let history_lost = live.iter().any(|r| r.history_lost());
    set(status, g, "HistoryLost", history_lost, if history_lost { "ChangeStreamHistoryLost" } else { "ResumePointAvailable" },
        if history_lost { "the resume point fell off the MongoDB oplog and onHistoryLost is Fail: delete the checkpoint ConfigMaps (or set onHistoryLost: Resnapshot) to start over" } else { "no shard lost its change-stream history" });
    let list = |v: &[u32]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    set(status, g, "SourceUnavailable", !source_down.is_empty(), if source_down.is_empty() { "Reachable" } else { "MongoDBUnreachable" },
        &if source_down.is_empty() { "MongoDB answers every worker".to_string() } else { format!("MongoDB is unreachable or the change stream is backing off (shards {})", list(&source_down)) });
    set(status, g, "SinkUnavailable", !sink_down.is_empty(), if sink_down.is_empty() { "Reachable" } else { "ElasticsearchUnavailable" },
        &if sink_down.is_empty() { "Elasticsearch accepts every worker's writes".to_string() } else { format!("Elasticsearch is unreachable or refusing writes; workers back off and retry (shards {})", list(&sink_down)) });
    let degraded = !failures.is_empty() || !source_down.is_empty() || !sink_down.is_empty();
    set(status, g, "Degraded", degraded, if degraded { "WorkersUnhealthy" } else { "Healthy" },
        &if failures.is_empty() { if degraded { "a source or sink is unavailable".to_string() } else { "all workers healthy".to_string() } } else { failures.join("; ") });
    let progressing = !p.spec.paused && (snapshotting || rolling || ready < want);
    set(status, g, "Progressing", progressing,
        if p.spec.paused { "Paused" } else if rolling { "RollingOut" } else if snapshotting { "Snapshotting" } else if ready < want { "WorkersStarting" } else { "Streaming" },
        if progressing { "workers are starting, rolling out or snapshotting" } else { "nothing in progress" });
    let is_ready = !p.spec.paused && ready == want && !degraded && (all_streaming || snapshotting) && live.len() == want as usize;
    let (reason, message) = if p.spec.paused {
        ("Paused", "paused: workers stopped, checkpoints kept".to_string())
    } else if is_ready {
        ("AllShardsReady", format!("{want} of {want} workers hold their lease and make progress"))
    } else if !failures.is_empty() {
        ("WorkerFailed", failures.join("; "))
    } else {
        ("WorkersNotReady", format!("{ready} of {want} workers ready"))
    };
    set(status, g, "Ready", is_ready, reason, &message);
}

async fn write_status(api: &Api<SyncPipeline>, p: &SyncPipeline, status: &SyncPipelineStatus) -> Result<(), Error> {
    if p.status.as_ref() == Some(status) {
        return Ok(());
    }
    let patch = serde_json::json!({"status": status});
    api.patch_status(&p.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api_err("write the SyncPipeline status"))?;
    Ok(())
}

async fn event(ctx: &Context, p: &SyncPipeline, type_: EventType, reason: &str, note: &str) {
    let Some(recorder) = &ctx.recorder else { return };
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &p.object_ref(&())).await {
        warn!(error = %e, reason, "failed to publish an Event");
    }
}
