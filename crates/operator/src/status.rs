//! What a pipeline's status says, decided as plain functions (no I/O): the conditions, the
//! kstatus pair `Reconciling`/`Stalled`, when `observedGeneration` may move, and the merge
//! patch that writes it all.
//!
//! # Invariants
//! - `observedGeneration` names a generation only once its workers are applied and the
//!   StatefulSet's rollout of them is complete, or once that generation is known to be stuck
//!   (`Stalled`). So `Ready=True` with `observedGeneration == metadata.generation` means "this
//!   spec is live and healthy": `kubectl wait --for=condition=Ready` right after an apply does
//!   not return on the previous generation's readiness, and kstatus (Flux) and the Argo CD
//!   health check shipped in the chart read the same thing.
//! - Nothing in the status changes while nothing happens: times instead of ages, and a field
//!   that no longer applies is removed (the merge patch carries an explicit `null`).

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::events::EventType;
use kube::ResourceExt;
use monsoon_api::{Condition, ShardStatus, SyncPipeline, SyncPipelineStatus};
use monsoon_engine::checkpoint::configmap::{holder_pod, KEY_CHECKPOINT, KEY_HOLDER, KEY_RENEW_TIME, KEY_STATUS};
use monsoon_engine::checkpoint::Checkpoint;
use serde_json::Value;

use crate::report::WorkerReport;
use crate::workload;

/// Condition types, each defined once.
pub mod condition {
    /// This generation's workers are rolled out, ready and healthy.
    pub const READY: &str = "Ready";
    /// Workers are starting, rolling out, re-sharding or snapshotting.
    pub const PROGRESSING: &str = "Progressing";
    /// A worker failed, or a source or sink is unavailable.
    pub const DEGRADED: &str = "Degraded";
    /// kstatus: the operator is moving the pipeline toward its spec (rollout, re-shard).
    pub const RECONCILING: &str = "Reconciling";
    /// kstatus: the pipeline cannot go on without a change from a person.
    pub const STALLED: &str = "Stalled";
    /// The spec is refused by validation.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// A referenced Secret or ConfigMap (or key) does not exist.
    pub const CREDENTIALS_MISSING: &str = "CredentialsMissing";
    /// MongoDB is unreachable from some worker.
    pub const SOURCE_UNAVAILABLE: &str = "SourceUnavailable";
    /// Elasticsearch is unreachable or refusing writes from some worker.
    pub const SINK_UNAVAILABLE: &str = "SinkUnavailable";
    /// A shard's resume point fell off the oplog with `onHistoryLost: Fail`.
    pub const HISTORY_LOST: &str = "HistoryLost";
    /// The script threads and heaps cannot fit the worker's memory limit.
    pub const RESOURCES_DO_NOT_FIT: &str = "ResourcesDoNotFit";
    /// The CRD installed in the cluster is older than this operator.
    pub const CRD_OUTDATED: &str = "CrdOutdated";
}

/// Condition reasons (and Event reasons) the operator uses in more than one place.
pub mod reason {
    /// Re-shard under way.
    pub const RESHARDING: &str = "Resharding";
    /// The StatefulSet is rolling out this generation.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// Pods of this generation exist but not all are ready.
    pub const WORKERS_STARTING: &str = "WorkersStarting";
    /// Paused by `spec.paused` or the pause annotation.
    pub const PAUSED: &str = "Paused";
    /// Everything asked for is done.
    pub const UP_TO_DATE: &str = "UpToDate";
    /// Nothing stuck.
    pub const NOT_STALLED: &str = "NotStalled";
}

const STATUS_TRUE: &str = "True";
const STATUS_FALSE: &str = "False";

/// How long a worker report stays current.
const REPORT_STALE_SECS: i64 = 60;

/// Set a condition, keeping its `lastTransitionTime` unless its status changes.
pub fn set(status: &mut SyncPipelineStatus, generation: Option<i64>, type_: &str, on: bool, reason: &str, message: &str, now: &str) {
    let value = if on { STATUS_TRUE } else { STATUS_FALSE };
    let previous = status.conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &status.conditions[i]) {
        Some(c) if c.status == value => c.last_transition_time.clone(),
        _ => Some(now.to_string()),
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

/// Whether condition `type_` is `True`.
pub fn is_on(status: &SyncPipelineStatus, type_: &str) -> bool {
    status.conditions.iter().any(|c| c.type_ == type_ && c.status == STATUS_TRUE)
}

/// The pipeline cannot go on as it is (`reason`): `Stalled`, not `Ready`, not `Reconciling`,
/// and this generation counts as observed (kstatus reports a stalled object only when its
/// `observedGeneration` is current). The running workers, if any, are left alone.
pub fn stall(status: &mut SyncPipelineStatus, generation: Option<i64>, reason: &str, message: &str, now: &str) {
    set(status, generation, condition::STALLED, true, reason, message, now);
    set(status, generation, condition::RECONCILING, false, reason, "waiting for a change to the spec or to what it references", now);
    set(status, generation, condition::READY, false, reason, message, now);
    status.observed_generation = generation;
}

/// The workers are being moved to another shard count: `Reconciling`, not `Ready`, and the
/// generation is not observed yet.
pub fn resharding(status: &mut SyncPipelineStatus, generation: Option<i64>, want: u32, now: &str) {
    let message = format!("stopping every worker before moving to {want} shards");
    set(status, generation, condition::PROGRESSING, true, reason::RESHARDING, &message, now);
    set(status, generation, condition::RECONCILING, true, reason::RESHARDING, &message, now);
    set(status, generation, condition::STALLED, false, reason::NOT_STALLED, "nothing is stuck", now);
    set(status, generation, condition::READY, false, reason::RESHARDING, "workers are stopped while the shard layout changes", now);
    status.phase = Some("Pending".into());
}

/// Where the StatefulSet's rollout of its current spec stands (as `kubectl rollout status`
/// reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rollout {
    /// Replicas asked for.
    pub wanted: u32,
    /// Pods ready.
    pub ready: u32,
    /// The controller has seen the current spec, every pod runs it and is ready, and no
    /// pod of an older revision is left.
    pub complete: bool,
}

/// Read the rollout state of `sts` (as returned by the API server: its `metadata.generation`
/// is the one just applied).
pub fn rollout(sts: &StatefulSet) -> Rollout {
    let wanted = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1).max(0);
    let Some(s) = sts.status.as_ref() else {
        return Rollout { wanted: u32::try_from(wanted).unwrap_or(0), ready: 0, complete: false };
    };
    let ready = s.ready_replicas.unwrap_or(0);
    let observed = match (s.observed_generation, sts.metadata.generation) {
        (Some(seen), Some(current)) => seen >= current,
        (_, None) => true,
        (None, Some(_)) => false,
    };
    let same_revision = match (&s.current_revision, &s.update_revision) {
        (Some(current), Some(update)) => current == update,
        _ => true,
    };
    let complete = observed
        && s.replicas == wanted
        && s.updated_replicas.unwrap_or(0) >= wanted
        && ready >= wanted
        && same_revision;
    Rollout {
        wanted: u32::try_from(wanted).unwrap_or(0),
        ready: u32::try_from(ready).unwrap_or(0),
        complete,
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
        checkpoint_age_seconds: None,
        checkpoint_time: report.as_ref().and_then(|r| r.checkpoint_unix).map(monsoon_engine::time::rfc3339),
        documents_synced: report.as_ref().map(|r| r.documents_synced),
        failure: report.as_ref().and_then(|r| r.failure.clone()),
    };
    (status, report)
}

/// Fold the StatefulSet's rollout and the workers' reports into the status, for a pipeline
/// whose spec is valid, whose references exist and whose checkpoints have `want` shards.
pub fn summarize(
    status: &mut SyncPipelineStatus,
    p: &SyncPipeline,
    sts: &StatefulSet,
    configmaps: &[ConfigMap],
    want: u32,
    now: i64,
) {
    let g = p.metadata.generation;
    let at = monsoon_engine::time::rfc3339(now);
    let at = at.as_str();
    let paused = p.spec.paused;
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
    let rollout = rollout(sts);
    let ready = rollout.ready;
    let live: Vec<&WorkerReport> = reports.iter().flatten().collect();
    let failures: Vec<String> = shards
        .iter()
        .filter_map(|s| s.failure.as_ref().map(|f| format!("shard {}: {f}", s.shard)))
        .collect();
    let running = |r: &&WorkerReport| r.phase == "Snapshotting" || r.phase == "Streaming";
    let down = |ok: fn(&WorkerReport) -> bool| -> Vec<u32> {
        shards
            .iter()
            .zip(&reports)
            .filter(|(_, r)| r.as_ref().is_some_and(|r| running(&r) && !ok(r)))
            .map(|(s, _)| s.shard)
            .collect()
    };
    let source_down = down(|r| r.source_ok);
    let sink_down = down(|r| r.sink_ok);
    let snapshotting = live.iter().any(|r| r.phase == "Snapshotting");
    let all_streaming = live.len() == want as usize && live.iter().all(|r| r.phase == "Streaming");

    status.phase = Some(
        if paused {
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
    status.ready = Some(format!("{ready}/{}", if paused { 0 } else { want }));
    let lag = live.iter().filter_map(|r| r.lag_seconds).fold(None, |m: Option<f64>, l| Some(m.map_or(l, |m| m.max(l))));
    status.lag = lag.map(|l| format!("{l:.1}s"));
    status.documents_synced = (!live.is_empty()).then(|| live.iter().map(|r| r.documents_synced).sum());
    status.shards = shards;

    let history_lost = live.iter().any(|r| r.history_lost());
    set(status, g, condition::HISTORY_LOST, history_lost, if history_lost { "ChangeStreamHistoryLost" } else { "ResumePointAvailable" },
        if history_lost { "the resume point fell off the MongoDB oplog and onHistoryLost is Fail: annotate the pipeline monsoon.dev/resnapshot=<token> (or set onHistoryLost: Resnapshot) to read everything again and remove what was deleted during the gap" } else { "no shard lost its change-stream history" }, at);
    let list = |v: &[u32]| v.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    set(status, g, condition::SOURCE_UNAVAILABLE, !source_down.is_empty(), if source_down.is_empty() { "Reachable" } else { "MongoDBUnreachable" },
        &if source_down.is_empty() { "MongoDB answers every worker".to_string() } else { format!("MongoDB is unreachable or the change stream is backing off (shards {})", list(&source_down)) }, at);
    set(status, g, condition::SINK_UNAVAILABLE, !sink_down.is_empty(), if sink_down.is_empty() { "Reachable" } else { "ElasticsearchUnavailable" },
        &if sink_down.is_empty() { "Elasticsearch accepts every worker's writes".to_string() } else { format!("Elasticsearch is unreachable or refusing writes; workers back off and retry (shards {})", list(&sink_down)) }, at);
    let degraded = !failures.is_empty() || !source_down.is_empty() || !sink_down.is_empty();
    set(status, g, condition::DEGRADED, degraded, if degraded { "WorkersUnhealthy" } else { "Healthy" },
        &if failures.is_empty() { if degraded { "a source or sink is unavailable".to_string() } else { "all workers healthy".to_string() } } else { failures.join("; ") }, at);

    let rolling = !rollout.complete;
    let progressing = !paused && (snapshotting || rolling || ready < want);
    let progress_reason = if paused {
        reason::PAUSED
    } else if rolling && ready >= rollout.wanted {
        reason::ROLLING_OUT
    } else if rolling || ready < want {
        reason::WORKERS_STARTING
    } else if snapshotting {
        "Snapshotting"
    } else {
        "Streaming"
    };
    set(status, g, condition::PROGRESSING, progressing, progress_reason,
        if progressing { "workers are starting, rolling out or snapshotting" } else { "nothing in progress" }, at);
    // kstatus: a rollout (or scale to zero while paused) not yet complete is reconciling; a
    // running snapshot is the pipeline's normal work, not a rollout.
    let reconciling = rolling;
    set(status, g, condition::RECONCILING, reconciling, if reconciling { progress_reason } else { reason::UP_TO_DATE },
        &if reconciling { format!("rolling out generation {}: {ready} of {} workers ready", g.unwrap_or(0), rollout.wanted) } else { "the workers run this generation".to_string() }, at);
    set(status, g, condition::STALLED, history_lost, if history_lost { "ChangeStreamHistoryLost" } else { reason::NOT_STALLED },
        if history_lost { "a shard lost its change-stream history and onHistoryLost is Fail" } else { "nothing is stuck" }, at);
    if rollout.complete {
        status.observed_generation = g;
    }

    let is_ready = !paused && rollout.complete && ready == want && !degraded && (all_streaming || snapshotting) && live.len() == want as usize;
    let (ready_reason, message) = if paused {
        (reason::PAUSED, "paused: workers stopped, checkpoints kept".to_string())
    } else if is_ready {
        ("AllShardsReady", format!("{want} of {want} workers run generation {} and make progress", g.unwrap_or(0)))
    } else if !failures.is_empty() {
        ("WorkerFailed", failures.join("; "))
    } else if rolling {
        (progress_reason, format!("rolling out generation {}: {ready} of {want} workers ready", g.unwrap_or(0)))
    } else {
        ("WorkersNotReady", format!("{ready} of {want} workers ready"))
    };
    set(status, g, condition::READY, is_ready, ready_reason, &message, at);
}

/// Conditions that just turned on and deserve an Event: problems as warnings, readiness as
/// normal news. Returns (condition type, event type, event reason).
pub fn transitions(before: Option<&SyncPipelineStatus>, after: &SyncPipelineStatus) -> Vec<(&'static str, EventType, &'static str)> {
    let was_on = |t: &str| before.is_some_and(|b| is_on(b, t));
    [
        (condition::SOURCE_UNAVAILABLE, EventType::Warning, condition::SOURCE_UNAVAILABLE),
        (condition::SINK_UNAVAILABLE, EventType::Warning, condition::SINK_UNAVAILABLE),
        (condition::HISTORY_LOST, EventType::Warning, condition::HISTORY_LOST),
        (condition::DEGRADED, EventType::Warning, condition::DEGRADED),
        (condition::READY, EventType::Normal, condition::READY),
    ]
    .into_iter()
    .filter(|(t, _, _)| is_on(after, t) && !was_on(t))
    .collect()
}

/// The JSON merge patch turning `before` into `after`: `after` itself, plus an explicit
/// `null` for every field `before` had and `after` has not (a merge patch that merely omits a
/// field keeps its old value: a failed pipeline kept showing its last lag).
pub fn status_patch(before: Option<&SyncPipelineStatus>, after: &SyncPipelineStatus) -> Value {
    let mut new = serde_json::to_value(after).unwrap_or(Value::Null);
    let old = before.and_then(|b| serde_json::to_value(b).ok()).unwrap_or(Value::Null);
    null_removed(&old, &mut new);
    serde_json::json!({ "status": new })
}

fn null_removed(old: &Value, new: &mut Value) {
    let (Value::Object(old), Value::Object(new)) = (old, new) else { return };
    for (key, old_value) in old {
        match new.get_mut(key) {
            None => {
                new.insert(key.clone(), Value::Null);
            }
            Some(new_value) => null_removed(old_value, new_value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};

    fn sts(generation: i64, replicas: i32, status: StatefulSetStatus) -> StatefulSet {
        let mut sts = StatefulSet {
            spec: Some(StatefulSetSpec { replicas: Some(replicas), ..StatefulSetSpec::default() }),
            status: Some(status),
            ..StatefulSet::default()
        };
        sts.metadata.generation = Some(generation);
        sts
    }

    #[test]
    fn a_rollout_is_complete_only_when_every_pod_runs_the_current_spec_and_is_ready() {
        let done = StatefulSetStatus {
            observed_generation: Some(3),
            replicas: 2,
            ready_replicas: Some(2),
            updated_replicas: Some(2),
            current_revision: Some("r2".into()),
            update_revision: Some("r2".into()),
            ..StatefulSetStatus::default()
        };
        assert!(rollout(&sts(3, 2, done.clone())).complete);
        // The StatefulSet controller has not seen the new template yet: the status describes the
        // previous generation, whatever it says about readiness.
        assert!(!rollout(&sts(4, 2, done.clone())).complete);
        // New pods made but one not ready yet.
        assert!(!rollout(&sts(3, 2, StatefulSetStatus { ready_replicas: Some(1), ..done.clone() })).complete);
        // One pod still of the old revision.
        assert!(!rollout(&sts(3, 2, StatefulSetStatus { updated_replicas: Some(1), update_revision: Some("r3".into()), ..done.clone() })).complete);
        // Scaling down: an extra pod still there.
        assert!(!rollout(&sts(3, 1, StatefulSetStatus { updated_replicas: Some(1), ..done.clone() })).complete);
        // Paused: zero of zero.
        let zero = StatefulSetStatus { observed_generation: Some(5), replicas: 0, ready_replicas: None, updated_replicas: None, ..done };
        assert!(rollout(&sts(5, 0, zero)).complete);
        // No status at all (just created).
        assert!(!rollout(&StatefulSet::default()).complete);
    }

    #[test]
    fn a_field_that_is_gone_is_sent_as_null() {
        let before = SyncPipelineStatus {
            lag: Some("3.0s".into()),
            documents_synced: Some(5),
            shards: vec![ShardStatus { shard: 0, lag_seconds: Some(3.0), ..ShardStatus::default() }],
            ..SyncPipelineStatus::default()
        };
        let after = SyncPipelineStatus { phase: Some("Failed".into()), ..SyncPipelineStatus::default() };
        let patch = status_patch(Some(&before), &after);
        assert_eq!(patch["status"]["lag"], Value::Null);
        assert!(patch["status"].as_object().expect("object").contains_key("lag"), "{patch}");
        assert_eq!(patch["status"]["shards"], Value::Null);
        assert_eq!(patch["status"]["phase"], "Failed");
        // Applied as the API server applies a merge patch, the old value is gone.
        let mut stored = serde_json::json!({"status": before});
        merge(&mut stored, &patch);
        let back: SyncPipelineStatus = serde_json::from_value(stored["status"].clone()).expect("status");
        assert_eq!(back, after);
    }

    fn merge(target: &mut Value, patch: &Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
            (t, p) => *t = p.clone(),
        }
    }
}
