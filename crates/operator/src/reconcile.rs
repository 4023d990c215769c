//! One reconcile of one `SyncPipeline`: validate → check references → add the finalizer → lay
//! out checkpoints (re-sharding when `workers` changed) → apply the workload → fold the
//! StatefulSet's rollout and the workers' reports into the status ([`crate::status`]).
//!
//! Failures the user must fix (invalid spec, missing Secret) become `Stalled` conditions and
//! Events and leave the running workers alone; they are never errors that crash-loop the
//! operator. Only API failures are errors, retried by the controller with backoff.
//!
//! # Invariants
//! - Old and new shard layouts never run at once: a re-shard first stops every worker and
//!   waits until no worker pod is left, then merges the old checkpoints
//!   ([`Checkpoint::merge_for_reshard`]) before the new workers start.
//! - Deleting a pipeline stops its workers (their final checkpoints written) before the
//!   checkpoints are removed and the finalizer released.
//! - Both waits are bounded: a pod still there [`Context::stuck_pod_after`] past its deletion
//!   deadline is on a node that no longer answers. Its worker cannot renew its lease through a
//!   dead node, so it has stopped writing (fenced) by then; the operator records a
//!   `WorkerStuck` Event and goes on instead of waiting forever.
//! - The finalizer is added only to a pipeline that passed validation, and added and removed
//!   by a merge patch of `metadata.finalizers` carrying the `resourceVersion` it was computed
//!   from (a conflict is retried), never by a whole-object replace that would drop fields an
//!   older operator does not know.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use monsoon_api::{validate_for_cluster, value_sources, CheckpointRetention, SyncPipeline, SyncPipelineStatus};
use monsoon_engine::check_connection_string;
use monsoon_engine::checkpoint::configmap::KEY_CHECKPOINT;
use monsoon_engine::checkpoint::Checkpoint;
use monsoon_engine::config::Shard;
use serde::Serialize;
use tracing::{info, warn};

use crate::status::{self, condition};
use crate::workload::{self, Inputs, WorkerSettings, LABEL_CHECKPOINT, LABEL_PIPELINE, LABEL_SHARD_COUNT};

/// Finalizer that stops the workers before a pipeline goes away.
pub const FINALIZER: &str = "monsoon.dev/stop-workers";
/// Field manager of everything the operator applies.
pub const MANAGER: &str = "monsoon-operator";
/// Annotation: while `"true"`, the operator leaves the pipeline (and its workers) exactly as
/// they are: no apply, no re-shard, no status refresh beyond saying so.
pub const ANNOTATION_PAUSED: &str = "monsoon.dev/paused";
/// How often a healthy pipeline's status is refreshed from its workers' reports (lag and
/// document counts; readiness changes arrive through the StatefulSet and ConfigMap watches).
pub const STATUS_REFRESH: Duration = Duration::from_secs(15);
/// How often to look again for a missing Secret or ConfigMap. The operator may only `get`
/// Secrets (the chart grants no `list` or `watch` on them), so nothing tells it when one
/// appears: it asks again. Measured against a real API server, this is the delay between
/// creating the Secret and the workers' StatefulSet (it was 30 s).
const RECHECK_REFERENCES: Duration = Duration::from_secs(10);
/// How often to look again while waiting for workers to stop.
const WAIT_FOR_STOP: Duration = Duration::from_secs(3);
/// Default of [`Context::stuck_pod_after`]: four worker lease durations (15 s each) past the
/// pod's deletion deadline, by which a worker that cannot reach the API server has fenced
/// itself.
pub const STUCK_POD_AFTER: Duration = Duration::from_secs(60);

/// Event reasons of the operator's own actions.
pub mod event_reason {
    /// Checkpoints merged into the new shard layout.
    pub const RESHARDED: &str = "Resharded";
    /// A worker pod outlived its deletion deadline by [`super::STUCK_POD_AFTER`]; the
    /// operator went on without it.
    pub const WORKER_STUCK: &str = "WorkerStuck";
    /// The `monsoon.dev/restart` annotation changed: the workers roll.
    pub const RESTART: &str = "RestartRequested";
    /// The `monsoon.dev/resnapshot` annotation changed: the workers roll with the new token.
    pub const RESNAPSHOT: &str = "ResnapshotRequested";
    /// A referenced Secret or ConfigMap changed: the workers roll.
    pub const REFERENCES_CHANGED: &str = "ReferencesChanged";
    /// The `monsoon.dev/paused` annotation stopped reconciliation.
    pub const RECONCILE_PAUSED: &str = "ReconcilePaused";
}

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
    /// How long a worker pod may outlive its deletion deadline before deletion or a re-shard
    /// goes on without it ([`STUCK_POD_AFTER`]).
    pub stuck_pod_after: Duration,
    /// Set when the CRD installed in the cluster is older than this operator's: shown as the
    /// `CrdOutdated` condition on every pipeline.
    pub crd_outdated: Option<String>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Reconcile one pipeline.
///
/// # Errors
/// [`Error`] on Kubernetes API failures; the controller retries.
pub async fn reconcile(p: Arc<SyncPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_inner(&p, &ctx).await;
    ctx.metrics.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(p: &SyncPipeline, ctx: &Context) -> Result<Action, Error> {
    ctx.metrics.reconciles.inc();
    let ns = p.namespace().ok_or_else(|| Error::NoNamespace(p.name_any()))?;
    let pipelines: Api<SyncPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    if p.metadata.deletion_timestamp.is_some() {
        return finalize(p, &ns, &pipelines, ctx).await;
    }
    let now = monsoon_engine::time::rfc3339(now_unix());
    let mut status = p.status.clone().unwrap_or_default();
    let generation = p.metadata.generation;
    match &ctx.crd_outdated {
        Some(message) => status::set(&mut status, generation, condition::CRD_OUTDATED, true, "CrdOlderThanOperator", message, &now),
        None => status::set(&mut status, generation, condition::CRD_OUTDATED, false, "CrdCurrent", "the installed CRD matches the operator", &now),
    }

    if p.annotations().get(ANNOTATION_PAUSED).is_some_and(|v| v == "true") {
        let message = format!("annotation {ANNOTATION_PAUSED}=true: the operator leaves this pipeline and its workers as they are");
        let already = status.conditions.iter().any(|c| c.type_ == condition::RECONCILING && c.reason == event_reason::RECONCILE_PAUSED);
        if !already {
            event(ctx, p, EventType::Normal, event_reason::RECONCILE_PAUSED, &message).await;
        }
        status::set(&mut status, generation, condition::RECONCILING, false, event_reason::RECONCILE_PAUSED, &message, &now);
        write_status(&pipelines, p, &status).await?;
        return Ok(Action::await_change());
    }

    // 1. The spec itself.
    if let Err(errors) = validate_for_cluster(p, check_connection_string) {
        let message = errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ");
        status::set(&mut status, generation, condition::INVALID_SPEC, true, condition::INVALID_SPEC, &message, &now);
        status::set(&mut status, generation, condition::DEGRADED, true, condition::INVALID_SPEC, &message, &now);
        status::stall(&mut status, generation, condition::INVALID_SPEC, &message, &now);
        status.phase = Some("Failed".into());
        event(ctx, p, EventType::Warning, condition::INVALID_SPEC, &message).await;
        write_status(&pipelines, p, &status).await?;
        return Ok(Action::await_change());
    }
    status::set(&mut status, generation, condition::INVALID_SPEC, false, "Valid", "the spec is valid", &now);

    // 2. The Secrets and ConfigMaps it references.
    let references = references(p, &ns, &ctx.client).await?;
    if !references.missing.is_empty() {
        let message = references.missing.join("; ");
        status::set(&mut status, generation, condition::CREDENTIALS_MISSING, true, "ReferenceNotFound", &message, &now);
        status::stall(&mut status, generation, condition::CREDENTIALS_MISSING, &message, &now);
        if status.phase.is_none() {
            status.phase = Some("Pending".into());
        }
        event(ctx, p, EventType::Warning, condition::CREDENTIALS_MISSING, &message).await;
        write_status(&pipelines, p, &status).await?;
        return Ok(Action::requeue(RECHECK_REFERENCES));
    }
    status::set(&mut status, generation, condition::CREDENTIALS_MISSING, false, "Found", "every referenced Secret and key exists", &now);

    // 3. From here on the pipeline has workers: they must be stopped before it goes.
    if !p.finalizers().iter().any(|f| f == FINALIZER) {
        update_finalizers(&pipelines, p, |f| f.push(FINALIZER.to_string())).await?;
    }

    // 4. Checkpoint layout.
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
        match reshard(p, &ns, want, &old, &existing, ctx).await? {
            Some(wait) => {
                status::resharding(&mut status, generation, want, &now);
                write_status(&pipelines, p, &status).await?;
                return Ok(Action::requeue(wait));
            }
            None => {
                let message = format!("checkpoints merged into {want} shards; starting the new workers");
                event(ctx, p, EventType::Normal, event_reason::RESHARDED, &message).await;
            }
        }
    }
    ensure_checkpoints(p, &configmaps, want).await?;

    // 5. The workload.
    let replicas = if p.spec.paused { 0 } else { want };
    let sizing = workload::size_scripts(p);
    if let Err(message) = &sizing {
        status::set(&mut status, generation, condition::RESOURCES_DO_NOT_FIT, true, condition::RESOURCES_DO_NOT_FIT, message, &now);
        status::stall(&mut status, generation, condition::RESOURCES_DO_NOT_FIT, message, &now);
        event(ctx, p, EventType::Warning, condition::RESOURCES_DO_NOT_FIT, message).await;
        write_status(&pipelines, p, &status).await?;
        return Ok(Action::await_change());
    }
    status::set(&mut status, generation, condition::RESOURCES_DO_NOT_FIT, false, "Fits", "the script threads fit the worker's memory limit", &now);
    let inputs = Inputs {
        shards: want,
        replicas,
        references_version: Some(references.version),
    };
    let w = workload::build_with(p, &inputs, &ctx.settings);
    let sets: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let before = sets.get_opt(&w.stateful_set.name_any()).await.map_err(api_err("read the worker StatefulSet"))?;
    apply(&ctx.client, &ns, &w.service_account).await?;
    apply(&ctx.client, &ns, &w.role).await?;
    apply(&ctx.client, &ns, &w.role_binding).await?;
    apply(&ctx.client, &ns, &w.service).await?;
    apply(&ctx.client, &ns, &w.disruption_budget).await?;
    let sts = apply(&ctx.client, &ns, &w.stateful_set).await?;
    if let Some(before) = &before {
        for (reason, message) in workload::rollout_causes(before, &sts) {
            event(ctx, p, EventType::Normal, reason, &message).await;
        }
    }
    status.shard_count = Some(want);

    // 6. Status from the rollout and the workers' reports.
    let configmaps_now = configmaps
        .list(&ListParams::default().labels(&format!("{LABEL_PIPELINE}={name},{LABEL_CHECKPOINT}=true,{LABEL_SHARD_COUNT}={want}")))
        .await
        .map_err(api_err("list checkpoint ConfigMaps"))?
        .items;
    status::summarize(&mut status, p, &sts, &configmaps_now, want, now_unix());
    for (type_, event_type, reason) in status::transitions(p.status.as_ref(), &status) {
        let message = status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.message.clone())
            .unwrap_or_default();
        event(ctx, p, event_type, reason, &message).await;
    }
    write_status(&pipelines, p, &status).await?;
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

/// The merge patch that sets `metadata.finalizers` to `finalizers`, valid only while the
/// pipeline is still at `resource_version` (the API server answers 409 otherwise).
pub fn finalizers_patch(finalizers: &[String], resource_version: Option<&str>) -> serde_json::Value {
    serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}})
}

/// Change the finalizer list with a merge patch of `metadata.finalizers` alone, conditional on
/// the `resourceVersion` it was computed from, re-reading and retrying on a conflict. A
/// pipeline that is gone needs no change: against a real API server the controller can run a
/// deleted pipeline's finalizer a second time from its cache (a watch event of the objects it
/// owned, which the garbage collector is removing, arrives after the first run let it go), and
/// that run must not fail on the 404.
async fn update_finalizers(api: &Api<SyncPipeline>, p: &SyncPipeline, change: impl Fn(&mut Vec<String>)) -> Result<(), Error> {
    let name = p.name_any();
    let mut current = (p.metadata.finalizers.clone().unwrap_or_default(), p.metadata.resource_version.clone());
    let mut attempts = 0;
    loop {
        let mut finalizers = current.0.clone();
        change(&mut finalizers);
        if finalizers == current.0 {
            return Ok(());
        }
        let patch = finalizers_patch(&finalizers, current.1.as_deref());
        match api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 && attempts < 5 => attempts += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(api_err("patch the SyncPipeline's finalizers")(e)),
        }
        let Some(fresh) = api.get_opt(&name).await.map_err(api_err("read the SyncPipeline"))? else {
            return Ok(());
        };
        current = (fresh.metadata.finalizers.unwrap_or_default(), fresh.metadata.resource_version);
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

/// What the Secrets and ConfigMaps a pipeline references look like now.
struct References {
    /// Every `secretKeyRef` / `configMapKeyRef` whose object or key does not exist.
    missing: Vec<String>,
    /// The referenced objects' names and `resourceVersion`s, one string: when it changes the
    /// workers must restart to read the new values (see [`workload::ANNOTATION_REFERENCES`]).
    /// Versions, never values: nothing derived from a secret reaches the pod template.
    version: String,
}

async fn references(p: &SyncPipeline, ns: &str, client: &kube::Client) -> Result<References, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut missing = Vec::new();
    let mut versions = std::collections::BTreeSet::new();
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
                    versions.insert(format!("secret/{}@{}", r.name, s.metadata.resource_version.unwrap_or_default()));
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
                    versions.insert(format!("configmap/{}@{}", r.name, c.metadata.resource_version.unwrap_or_default()));
                }
            }
        }
    }
    Ok(References {
        missing,
        version: versions.into_iter().collect::<Vec<_>>().join(","),
    })
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
    if let Some(running) = stop_workers(p, ns, ctx).await? {
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

/// Pods of a pipeline's workers that still hold up a re-shard or deletion, given the time now.
/// A pod marked for deletion longer than `stuck_after` past its deadline (`deletionTimestamp`
/// is when its grace period ends) is stuck behind a node that no longer answers and no longer
/// counts; every other pod does. Returns (pods still counted, pods given up on).
pub fn pods_in_the_way(pods: &[Pod], now: SystemTime, stuck_after: Duration) -> (Vec<String>, Vec<String>) {
    let mut waiting = Vec::new();
    let mut stuck = Vec::new();
    for pod in pods {
        let deadline = pod.metadata.deletion_timestamp.as_ref().map(|t| t.0.as_second());
        let given_up = deadline.is_some_and(|d| {
            let since = now.duration_since(UNIX_EPOCH).map(|n| n.as_secs() as i64).unwrap_or(0) - d;
            since > i64::try_from(stuck_after.as_secs()).unwrap_or(i64::MAX)
        });
        if given_up { stuck.push(pod.name_any()) } else { waiting.push(pod.name_any()) }
    }
    (waiting, stuck)
}

/// Scale a pipeline's workers to zero (when its StatefulSet exists). Returns how many worker
/// pods still run (`Some`), or `None` once none is left but stuck ones, which get a
/// `WorkerStuck` Event. Re-sharding and deletion both wait for `None` before going on.
async fn stop_workers(p: &SyncPipeline, ns: &str, ctx: &Context) -> Result<Option<usize>, Error> {
    let pipeline = p.name_any();
    let sts: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    let worker = workload::worker_name(&pipeline);
    if sts.get_opt(&worker).await.map_err(api_err("read the worker StatefulSet"))?.is_some() {
        let stop = serde_json::json!({"spec": {"replicas": 0}});
        sts.patch(&worker, &PatchParams::default(), &Patch::Merge(&stop))
            .await
            .map_err(api_err("scale the workers to zero"))?;
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let running = pods
        .list(&ListParams::default().labels(&workload::pod_selector(&pipeline)))
        .await
        .map_err(api_err("list worker pods"))?
        .items;
    let (waiting, stuck) = pods_in_the_way(&running, SystemTime::now(), ctx.stuck_pod_after);
    if !waiting.is_empty() {
        return Ok(Some(waiting.len()));
    }
    if !stuck.is_empty() {
        let message = format!(
            "worker pods {} are still terminating {:?} past their deletion deadline (their node no longer answers); going on without them: a worker that cannot renew its lease has stopped writing",
            stuck.join(", "),
            ctx.stuck_pod_after
        );
        warn!(pipeline = %pipeline, pods = ?stuck, "{message}");
        event(ctx, p, EventType::Warning, event_reason::WORKER_STUCK, &message).await;
    }
    Ok(None)
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
    if let Some(running) = stop_workers(p, ns, ctx).await? {
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
    update_finalizers(pipelines, p, |f| f.retain(|x| x != FINALIZER)).await?;
    info!(pipeline = %name, checkpoints = ?p.spec.checkpoints_on_delete, "pipeline deleted: workers stopped");
    Ok(Action::await_change())
}

/// Write the status with a merge patch that also removes what is gone
/// ([`status::status_patch`]); nothing is sent when nothing changed.
async fn write_status(api: &Api<SyncPipeline>, p: &SyncPipeline, status: &SyncPipelineStatus) -> Result<(), Error> {
    if p.status.as_ref() == Some(status) {
        return Ok(());
    }
    let patch = status::status_patch(p.status.as_ref(), status);
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
