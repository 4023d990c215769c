//! Which changes wake the controller, and which do not.
//!
//! - A `SyncPipeline` change wakes it when its generation (the spec), labels, annotations,
//!   finalizers or deletion change, never for a status write: the operator's own status
//!   patches would otherwise each cause another reconcile (about ten API calls).
//! - A worker StatefulSet (only monsoon's own, by label, so the cache holds nothing else) wakes
//!   its pipeline when its spec or rollout state changes: `Ready` follows the last worker
//!   becoming ready at once, not on the next status refresh.
//! - A checkpoint ConfigMap (by label) wakes its pipeline when its holder or what its worker
//!   reports about its health (phase, failure, source and sink reachability) changes; a lease
//!   renewal alone does not (workers renew every few seconds).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, ResourceExt};
use monsoon_api::SyncPipeline;
use monsoon_engine::checkpoint::configmap::{KEY_HOLDER, KEY_STATUS};

use crate::report::WorkerReport;
use crate::workload::{LABEL_CHECKPOINT, LABEL_PIPELINE, SELECTOR_MANAGED};

fn hash(value: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// What of a pipeline deserves a reconcile: everything but its status (and `resourceVersion`,
/// `managedFields`).
pub fn pipeline_changed(p: &SyncPipeline) -> Option<u64> {
    Some(hash((
        p.metadata.generation,
        p.labels(),
        p.annotations(),
        p.finalizers(),
        p.metadata.deletion_timestamp.as_ref().map(|t| t.0.as_second()),
    )))
}

/// What of a worker StatefulSet deserves a reconcile of its pipeline: its spec (someone edited
/// it) and its rollout state.
pub fn statefulset_changed(sts: &StatefulSet) -> Option<u64> {
    let s = sts.status.clone().unwrap_or_default();
    Some(hash((
        sts.metadata.generation,
        sts.metadata.deletion_timestamp.as_ref().map(|t| t.0.as_second()),
        s.observed_generation,
        s.replicas,
        s.ready_replicas,
        s.updated_replicas,
        s.available_replicas,
        s.current_revision,
        s.update_revision,
    )))
}

/// What of a checkpoint ConfigMap deserves a reconcile of its pipeline: who holds the lease
/// and the health its worker reports, not renewals or counters.
pub fn checkpoint_changed(cm: &ConfigMap) -> Option<u64> {
    let data = cm.data.clone().unwrap_or_default();
    let report: Option<WorkerReport> = data.get(KEY_STATUS).and_then(|s| serde_json::from_str(s).ok());
    Some(hash((
        cm.labels(),
        data.get(KEY_HOLDER).cloned(),
        report.map(|r| (r.phase, r.failure, r.source_ok, r.sink_ok)),
    )))
}

/// The pipeline a checkpoint ConfigMap belongs to.
pub fn checkpoint_owner(cm: ConfigMap) -> Option<ObjectRef<SyncPipeline>> {
    let pipeline = cm.labels().get(LABEL_PIPELINE)?.clone();
    let ns = cm.namespace()?;
    Some(ObjectRef::new(&pipeline).within(&ns))
}

/// The controller of the pipelines of `namespace` (every namespace when `None`), with its
/// triggers, and the store of the pipelines it has seen.
pub fn controller(client: &kube::Client, namespace: Option<&str>) -> (Controller<SyncPipeline>, Store<SyncPipeline>) {
    let (pipelines, sets, configmaps): (Api<SyncPipeline>, Api<StatefulSet>, Api<ConfigMap>) = match namespace {
        Some(ns) => (Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns), Api::namespaced(client.clone(), ns)),
        None => (Api::all(client.clone()), Api::all(client.clone()), Api::all(client.clone())),
    };
    let (reader, writer) = reflector::store();
    let trigger = watcher(pipelines, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(pipeline_changed, Default::default());
    let sets = watcher(sets, watcher::Config::default().labels(SELECTOR_MANAGED))
        .default_backoff()
        .touched_objects()
        .predicate_filter(statefulset_changed, Default::default());
    let checkpoints = watcher(configmaps, watcher::Config::default().labels(&format!("{LABEL_CHECKPOINT}=true")))
        .default_backoff()
        .touched_objects()
        .predicate_filter(checkpoint_changed, Default::default());
    let controller = Controller::for_stream(trigger, reader.clone())
        .owns_stream(sets)
        .watches_stream(checkpoints, checkpoint_owner);
    (controller, reader)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_status_write_does_not_wake_the_controller_but_a_spec_or_annotation_change_does() {
        let mut p = SyncPipeline::new("p", monsoon_api::SyncPipelineSpec::default());
        p.metadata.generation = Some(1);
        let before = pipeline_changed(&p);
        p.status = Some(monsoon_api::SyncPipelineStatus { phase: Some("Streaming".into()), ..Default::default() });
        p.metadata.resource_version = Some("42".into());
        assert_eq!(pipeline_changed(&p), before, "status-only change");
        p.metadata.annotations = Some(BTreeMap::from([("monsoon.dev/restart".to_string(), "1".to_string())]));
        assert_ne!(pipeline_changed(&p), before, "annotation change");
        let annotated = pipeline_changed(&p);
        p.metadata.generation = Some(2);
        assert_ne!(pipeline_changed(&p), annotated, "spec change");
    }

    #[test]
    fn a_lease_renewal_does_not_wake_the_controller_but_a_health_change_does() {
        let report = |phase: &str, docs: u64, at: i64| {
            serde_json::to_string(&WorkerReport { phase: phase.into(), source_ok: true, sink_ok: true, documents_synced: docs, reported_unix: at, ..WorkerReport::default() }).expect("json")
        };
        let cm = |holder: &str, status: String, renew: &str| ConfigMap {
            data: Some(BTreeMap::from([
                (KEY_HOLDER.to_string(), holder.to_string()),
                (KEY_STATUS.to_string(), status),
                ("renewTime".to_string(), renew.to_string()),
            ])),
            ..ConfigMap::default()
        };
        let a = checkpoint_changed(&cm("w-0/1", report("Streaming", 10, 100), "100000"));
        assert_eq!(a, checkpoint_changed(&cm("w-0/1", report("Streaming", 99, 105), "105000")), "renewal with new counters");
        assert_ne!(a, checkpoint_changed(&cm("w-0/1", report("Failed", 99, 105), "105000")), "phase change");
        assert_ne!(a, checkpoint_changed(&cm("w-0/2", report("Streaming", 10, 100), "100000")), "new holder");
    }
}
