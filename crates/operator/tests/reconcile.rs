//! Reconcile steps against kube-fake-client: each test drives `reconcile` the way the
//! controller would (fetch, reconcile, look at what the API server now holds).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use kube_fake_client::{interceptor, ClientBuilder};
use monsoon_api::{
    CheckpointRetention, SecretKeyRef, SyncPipeline, SyncPipelineSpec, SyncPipelineStatus, ValueFrom,
};
use monsoon_engine::checkpoint::configmap::{KEY_CHECKPOINT, KEY_HOLDER, KEY_RENEW_TIME, KEY_STATUS};
use monsoon_engine::checkpoint::{Checkpoint, ClusterTime};
use monsoon_operator::reconcile::{reconcile, Context, FINALIZER, STUCK_POD_AFTER};
use monsoon_operator::status::summarize;
use monsoon_operator::report::WorkerReport;
use monsoon_operator::workload::{WorkerSettings, ENV_PIPELINE, LABEL_SHARD_COUNT};
use monsoon_operator::OperatorMetrics;

const NS: &str = "shop";

fn pipeline(workers: u32) -> SyncPipeline {
    let mut p = SyncPipeline::new(
        "orders",
        SyncPipelineSpec {
            namespaces: vec!["shop.orders".into()],
            workers,
            ..SyncPipelineSpec::default()
        },
    );
    p.metadata.namespace = Some(NS.into());
    p.metadata.uid = Some("uid-orders".into());
    p.metadata.generation = Some(1);
    p.spec.mongodb.uri_from = Some(ValueFrom {
        secret_key_ref: Some(SecretKeyRef {
            name: "mongo".into(),
            key: "uri".into(),
        }),
        ..ValueFrom::default()
    });
    p.spec.elasticsearch.urls = vec!["http://es:9200".into()];
    p
}

fn secret() -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("mongo".into()),
            namespace: Some(NS.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([("uri".to_string(), ByteString(b"mongodb://u:p@db/".to_vec()))])),
        ..Secret::default()
    }
}

fn worker_pod(index: u32) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("orders-worker-{index}")),
            namespace: Some(NS.into()),
            labels: Some(monsoon_operator::workload::labels("orders")),
            ..ObjectMeta::default()
        },
        ..Pod::default()
    }
}

struct Fixture {
    client: kube::Client,
    ctx: Arc<Context>,
}

impl Fixture {
    async fn new(builder: ClientBuilder) -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let client = builder
            .with_resource::<SyncPipeline>()
            .with_status_subresource::<SyncPipeline>()
            .build()
            .await
            .expect("fake client");
        let ctx = Arc::new(Context {
            client: client.clone(),
            settings: WorkerSettings {
                image: "monsoon:test".into(),
                log_format: "json".into(),
                shutdown_grace_seconds: 20,
            },
            recorder: None,
            metrics: OperatorMetrics::default(),
            stuck_pod_after: STUCK_POD_AFTER,
            crd_outdated: None,
        });
        Self { client, ctx }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), NS)
    }

    async fn reconcile(&self) -> Action {
        let p = self.api::<SyncPipeline>().get("orders").await.expect("pipeline");
        reconcile(Arc::new(p), self.ctx.clone()).await.expect("reconcile")
    }

    async fn status(&self) -> SyncPipelineStatus {
        self.api::<SyncPipeline>().get("orders").await.expect("pipeline").status.unwrap_or_default()
    }

    async fn statefulset(&self) -> Option<StatefulSet> {
        self.api::<StatefulSet>().get_opt("orders-worker").await.expect("get")
    }

    /// What the StatefulSet controller reports once every pod of the current template is ready.
    /// (kube-fake-client raises `metadata.generation` at every apply, even one that changes
    /// nothing, unlike the API server: the observed generation is set well ahead so the next
    /// reconcile's no-op apply does not make the rollout look unfinished.)
    async fn roll_out(&self, ready: i32) {
        let sts = self.statefulset().await.expect("sts");
        let status = serde_json::json!({"status": {
            "observedGeneration": sts.metadata.generation.unwrap_or(0) + 100,
            "replicas": ready, "readyReplicas": ready, "updatedReplicas": ready, "availableReplicas": ready,
            "currentRevision": "r", "updateRevision": "r",
        }});
        self.api::<StatefulSet>()
            .patch_status("orders-worker", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&status))
            .await
            .expect("sts status");
    }

    async fn checkpoints(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .api::<ConfigMap>()
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .iter()
            .filter(|c| c.labels().contains_key(LABEL_SHARD_COUNT))
            .map(|c| c.name_any())
            .collect();
        names.sort();
        names
    }
}

fn condition<'a>(s: &'a SyncPipelineStatus, type_: &str) -> &'a monsoon_api::Condition {
    s.conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition in {s:#?}"))
}

#[tokio::test]
async fn create_builds_the_workload_checkpoints_finalizer_and_status() {
    let f = Fixture::new(ClientBuilder::new().with_object(pipeline(2)).with_object(secret())).await;
    let action = f.reconcile().await;
    assert_ne!(action, Action::await_change(), "a running pipeline is looked at again");

    let sts = f.statefulset().await.expect("StatefulSet");
    let spec = sts.spec.expect("spec");
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(sts.metadata.owner_references.expect("owner")[0].name, "orders");
    assert!(f.api::<ServiceAccount>().get_opt("orders-worker").await.expect("get").is_some());
    assert!(f.api::<Service>().get_opt("orders-worker").await.expect("get").is_some());
    assert!(f.api::<RoleBinding>().get_opt("orders-worker").await.expect("get").is_some());
    let role = f.api::<Role>().get("orders-worker").await.expect("role");
    assert_eq!(
        role.rules.expect("rules")[0].resource_names.clone().expect("names"),
        vec!["orders-checkpoint-0-of-2".to_string(), "orders-checkpoint-1-of-2".to_string()]
    );
    assert_eq!(f.checkpoints().await, vec!["orders-checkpoint-0-of-2", "orders-checkpoint-1-of-2"]);
    let cm = f.api::<ConfigMap>().get("orders-checkpoint-0-of-2").await.expect("cm");
    assert!(cm.metadata.owner_references.is_none(), "checkpoints must outlive the pipeline when kept");

    let p = f.api::<SyncPipeline>().get("orders").await.expect("pipeline");
    assert!(p.finalizers().contains(&FINALIZER.to_string()));
    let s = p.status.expect("status");
    assert_eq!(s.shard_count, Some(2));
    assert_eq!(s.ready.as_deref(), Some("0/2"));
    assert_eq!(condition(&s, "InvalidSpec").status, "False");
    assert_eq!(condition(&s, "CredentialsMissing").status, "False");
    assert_eq!(condition(&s, "Ready").status, "False");
    assert_eq!(condition(&s, "Ready").reason, "WorkersStarting");
    assert_eq!(condition(&s, "Reconciling").status, "True");
    assert_eq!(condition(&s, "Stalled").status, "False");
    assert_eq!(s.observed_generation, None, "generation 1 is not rolled out yet: nothing may claim it is observed");
}

#[tokio::test]
async fn a_spec_change_updates_the_pod_template_and_keeps_the_checkpoints() {
    let f = Fixture::new(ClientBuilder::new().with_object(pipeline(1)).with_object(secret())).await;
    f.reconcile().await;
    let before = f.statefulset().await.expect("sts");
    let mut cm = f.api::<ConfigMap>().get("orders-checkpoint-0-of-1").await.expect("cm");
    cm.data = Some(BTreeMap::from([(KEY_CHECKPOINT.to_string(), "{\"format\":1,\"pipeline\":\"orders\"}".to_string())]));
    f.api::<ConfigMap>().replace("orders-checkpoint-0-of-1", &PostParams::default(), &cm).await.expect("worker wrote");

    let mut p = f.api::<SyncPipeline>().get("orders").await.expect("pipeline");
    p.spec.batch.max_docs = 500;
    let edited = f.api::<SyncPipeline>().replace("orders", &PostParams::default(), &p).await.expect("edit");
    f.reconcile().await;

    let after = f.statefulset().await.expect("sts");
    let env = |s: &StatefulSet| {
        s.spec.clone().expect("spec").template.spec.expect("pod").containers[0]
            .env
            .clone()
            .expect("env")
            .into_iter()
            .find(|e| e.name == ENV_PIPELINE)
            .and_then(|e| e.value)
            .expect("pipeline env")
    };
    assert_ne!(env(&before), env(&after), "the template changes, so the StatefulSet rolls the workers");
    assert!(env(&after).contains("\"maxDocs\":500"));
    let kept = f.api::<ConfigMap>().get("orders-checkpoint-0-of-1").await.expect("cm");
    assert!(kept.data.expect("data").contains_key(KEY_CHECKPOINT), "the rollout keeps the worker's place");
    assert_ne!(f.status().await.observed_generation, edited.metadata.generation, "the new template is not rolled out yet");

    // The StatefulSet controller rolls it out: every pod of the new revision is ready.
    f.roll_out(1).await;
    f.reconcile().await;
    let s = f.status().await;
    assert_eq!(s.observed_generation, edited.metadata.generation);
    assert_eq!(condition(&s, "Reconciling").status, "False");
}

#[tokio::test]
async fn pause_stops_the_workers_and_keeps_checkpoints() {
    let f = Fixture::new(ClientBuilder::new().with_object(pipeline(2)).with_object(secret())).await;
    f.reconcile().await;
    let mut p = f.api::<SyncPipeline>().get("orders").await.expect("pipeline");
    p.spec.paused = true;
    f.api::<SyncPipeline>().replace("orders", &PostParams::default(), &p).await.expect("pause");
    f.reconcile().await;
    assert_eq!(f.statefulset().await.expect("sts").spec.expect("spec").replicas, Some(0));
    assert_eq!(f.checkpoints().await.len(), 2);
    let s = f.status().await;
    assert_eq!(s.phase.as_deref(), Some("Paused"));
    assert_eq!(condition(&s, "Ready").reason, "Paused");

    p = f.api::<SyncPipeline>().get("orders").await.expect("pipeline");
    p.spec.paused = false;
    f.api::<SyncPipeline>().replace("orders", &PostParams::default(), &p).await.expect("resume");
    f.reconcile().await;
    assert_eq!(f.statefulset().await.expect("sts").spec.expect("spec").replicas, Some(2));
}

/// A pipeline the API server is deleting (its finalizer holds it), with the workload and
/// checkpoints a previous reconcile made.
fn being_deleted(mut p: SyncPipeline, builder: ClientBuilder) -> ClientBuilder {
    p.metadata.finalizers = Some(vec![FINALIZER.to_string()]);
    p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    let workers = p.spec.workers;
    let settings = WorkerSettings {
        image: "monsoon:test".into(),
        log_format: "json".into(),
        shutdown_grace_seconds: 20,
    };
    let w = monsoon_operator::workload::build(&p, workers, workers, &settings);
    let mut builder = builder.with_object(p).with_object(secret()).with_object(w.stateful_set);
    for i in 0..workers {
        builder = builder.with_object(checkpoint_cm(i, workers, &Checkpoint::new("orders")));
    }
    builder
}

#[tokio::test]
async fn delete_stops_the_workers_before_removing_checkpoints_and_the_finalizer() {
    let mut p = pipeline(2);
    p.spec.checkpoints_on_delete = CheckpointRetention::Delete;
    let f = Fixture::new(being_deleted(p, ClientBuilder::new()).with_object(worker_pod(0)).with_object(worker_pod(1))).await;

    // Workers still running: they are told to stop, and nothing else happens yet.
    let action = f.reconcile().await;
    assert_ne!(action, Action::await_change());
    assert_eq!(f.statefulset().await.expect("sts kept").spec.expect("spec").replicas, Some(0));
    assert_eq!(f.checkpoints().await.len(), 2, "checkpoints stay while workers may still write them");
    let p = f.api::<SyncPipeline>().get("orders").await.expect("still there");
    assert!(p.finalizers().contains(&FINALIZER.to_string()));

    // Workers gone: StatefulSet, checkpoints and finalizer go.
    for i in 0..2 {
        f.api::<Pod>().delete(&format!("orders-worker-{i}"), &DeleteParams::default()).await.expect("pod gone");
    }
    f.reconcile().await;
    assert!(f.statefulset().await.is_none());
    assert!(f.checkpoints().await.is_empty(), "checkpointsOnDelete: Delete");
    let gone = f.api::<SyncPipeline>().get_opt("orders").await.expect("get");
    assert!(gone.is_none_or(|p| !p.finalizers().contains(&FINALIZER.to_string())));
}

#[tokio::test]
async fn delete_keeps_checkpoints_by_default() {
    let f = Fixture::new(being_deleted(pipeline(1), ClientBuilder::new())).await;
    f.reconcile().await;
    assert!(f.statefulset().await.is_none());
    assert_eq!(f.checkpoints().await, vec!["orders-checkpoint-0-of-1"]);
    let gone = f.api::<SyncPipeline>().get_opt("orders").await.expect("get");
    assert!(gone.is_none_or(|p| !p.finalizers().contains(&FINALIZER.to_string())));
}

/// Reconcile `p` and check it was refused as an invalid spec: no workload, `InvalidSpec` true,
/// phase `Failed`. Returns the fixture and the status, for the caller's own checks.
async fn refused_as_invalid(p: SyncPipeline) -> (Fixture, SyncPipelineStatus) {
    let f = Fixture::new(ClientBuilder::new().with_object(p)).await;
    assert_eq!(f.reconcile().await, Action::await_change());
    assert!(f.statefulset().await.is_none());
    let s = f.status().await;
    assert_eq!(condition(&s, "InvalidSpec").status, "True");
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    (f, s)
}

#[tokio::test]
async fn an_invalid_spec_is_a_condition_not_a_workload() {
    let mut p = pipeline(1);
    // `env` works for `monsoon run`, not in a cluster.
    p.spec.mongodb.uri_from = Some(ValueFrom {
        env: Some("MONGO_URI".into()),
        ..ValueFrom::default()
    });
    let (f, s) = refused_as_invalid(p).await;
    let c = condition(&s, "InvalidSpec");
    assert!(c.message.contains("spec.mongodb.uriFrom") && c.message.contains("secretKeyRef"), "{}", c.message);
    // kstatus: Stalled, and this generation counts as observed so Flux reports it as failed.
    assert_eq!(condition(&s, "Stalled").status, "True");
    assert_eq!(condition(&s, "Stalled").reason, "InvalidSpec");
    assert_eq!(condition(&s, "Reconciling").status, "False");
    assert_eq!(s.observed_generation, Some(1));
    // No workers, so nothing to stop on deletion: no finalizer on a pipeline that never ran.
    let p = f.api::<SyncPipeline>().get("orders").await.expect("pipeline");
    assert!(!p.finalizers().contains(&FINALIZER.to_string()), "{:?}", p.finalizers());
}

/// The MongoDB driver's parser (the engine's check) refuses the connection string: the same
/// condition as any invalid spec, naming the field and the fix.
#[tokio::test]
async fn a_connection_string_the_driver_refuses_is_an_invalid_spec() {
    let mut p = pipeline(1);
    p.spec.mongodb.uri_from = None;
    p.spec.mongodb.uri = Some("mongodb://db-0.db:27017/?replicaSet=rs0&authMechanism=GSSAPI".into());
    let (_, s) = refused_as_invalid(p).await;
    let c = condition(&s, "InvalidSpec");
    assert!(c.message.contains("spec.mongodb.uri") && c.message.contains("Kerberos"), "{}", c.message);
}

#[tokio::test]
async fn a_missing_secret_is_a_condition_until_it_appears() {
    let f = Fixture::new(ClientBuilder::new().with_object(pipeline(1))).await;
    f.reconcile().await;
    assert!(f.statefulset().await.is_none());
    let s = f.status().await;
    let c = condition(&s, "CredentialsMissing");
    assert_eq!(c.status, "True");
    assert!(c.message.contains("Secret `mongo` not found"), "{}", c.message);
    assert_eq!(condition(&s, "Stalled").reason, "CredentialsMissing");
    let first_transition = c.last_transition_time.clone();

    // Reconciling again keeps the transition time stable.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    f.reconcile().await;
    assert_eq!(condition(&f.status().await, "CredentialsMissing").last_transition_time, first_transition);

    f.api::<Secret>().create(&PostParams::default(), &secret()).await.expect("secret");
    f.reconcile().await;
    assert!(f.statefulset().await.is_some());
    assert_eq!(condition(&f.status().await, "CredentialsMissing").status, "False");
    assert_eq!(condition(&f.status().await, "Stalled").status, "False");
}

/// The finalizer is added by a merge patch of `metadata.finalizers` alone, conditional on the
/// `resourceVersion` it was computed from; a conflict (another writer got there first) is
/// re-read and retried. Never a whole-object replace, which would drop fields an older
/// operator does not know.
#[tokio::test]
async fn the_finalizer_is_patched_and_conflicts_are_retried() {
    let conflicts = Arc::new(AtomicUsize::new(0));
    let replaced = Arc::new(AtomicUsize::new(0));
    let (seen, puts) = (conflicts.clone(), replaced.clone());
    let patches = Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = patches.clone();
    let builder = ClientBuilder::new()
        .with_object(pipeline(1))
        .with_object(secret())
        .with_interceptor_funcs(
            interceptor::Funcs::new()
                .patch(move |ctx| {
                    if ctx.name == "orders" {
                        recorded.lock().expect("lock").push(ctx.patch.clone());
                        // The first two finalizer patches lose a race with another writer.
                        if seen.fetch_add(1, Ordering::SeqCst) < 2 {
                            return Err(kube_fake_client::Error::Conflict("the object has been modified".into()));
                        }
                    }
                    Ok(None)
                })
                .replace(move |ctx| {
                    if ctx.name == "orders" {
                        puts.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(None)
                }),
        );
    let f = Fixture::new(builder).await;
    f.reconcile().await;
    assert!(conflicts.load(Ordering::SeqCst) >= 3);
    assert_eq!(replaced.load(Ordering::SeqCst), 0, "the pipeline was replaced whole");
    for patch in patches.lock().expect("lock").iter() {
        let metadata = patch["metadata"].as_object().expect("a metadata patch");
        assert_eq!(patch.as_object().map(|o| o.len()), Some(1), "only metadata: {patch}");
        assert_eq!(metadata["finalizers"], serde_json::json!([FINALIZER]), "{patch}");
        assert!(metadata["resourceVersion"].is_string(), "conditional on the version read: {patch}");
    }
    let p = f.api::<SyncPipeline>().get("orders").await.expect("pipeline");
    assert!(p.finalizers().contains(&FINALIZER.to_string()));
    assert!(f.statefulset().await.is_some());
}

/// A worker pod on a node that died stays Terminating forever: deletion waits for it only a
/// bounded time past its deletion deadline (its worker, unable to renew its lease, has fenced
/// itself by then), then goes on.
#[tokio::test]
async fn delete_goes_on_past_a_pod_stuck_on_a_dead_node() {
    let mut stuck = worker_pod(0);
    let long_ago = k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(600);
    stuck.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(long_ago));
    stuck.metadata.finalizers = Some(vec!["test/keep".into()]);
    let mut p = pipeline(1);
    p.spec.checkpoints_on_delete = CheckpointRetention::Delete;
    let f = Fixture::new(being_deleted(p, ClientBuilder::new()).with_object(stuck)).await;
    f.reconcile().await;
    assert!(f.statefulset().await.is_none());
    assert!(f.checkpoints().await.is_empty());
    let gone = f.api::<SyncPipeline>().get_opt("orders").await.expect("get");
    assert!(gone.is_none_or(|p| !p.finalizers().contains(&FINALIZER.to_string())));
}

#[test]
fn only_pods_long_past_their_deletion_deadline_are_given_up_on() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let now = std::time::SystemTime::now();
    let at = |secs_ago: u64| Some(Time(k8s_openapi::jiff::Timestamp::now() - std::time::Duration::from_secs(secs_ago)));
    let mut running = worker_pod(0);
    running.metadata.deletion_timestamp = None;
    let mut terminating = worker_pod(1);
    terminating.metadata.deletion_timestamp = at(10);
    let mut stuck = worker_pod(2);
    stuck.metadata.deletion_timestamp = at(120);
    let (waiting, given_up) = monsoon_operator::reconcile::pods_in_the_way(&[running, terminating, stuck], now, std::time::Duration::from_secs(60));
    assert_eq!(waiting, vec!["orders-worker-0", "orders-worker-1"]);
    assert_eq!(given_up, vec!["orders-worker-2"]);
}

fn checkpoint_cm(index: u32, count: u32, cp: &Checkpoint) -> ConfigMap {
    let mut labels = monsoon_operator::workload::labels("orders");
    labels.insert("monsoon.dev/checkpoint".into(), "true".into());
    labels.insert(LABEL_SHARD_COUNT.into(), count.to_string());
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(format!("orders-checkpoint-{index}-of-{count}")),
            namespace: Some(NS.into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(KEY_CHECKPOINT.to_string(), serde_json::to_string(cp).expect("json"))])),
        ..ConfigMap::default()
    }
}

#[tokio::test]
async fn resharding_stops_every_worker_then_starts_the_new_shards_at_the_earliest_position() {
    let shard_cp = |index: u32, at: u32| {
        let mut cp = Checkpoint::new("orders");
        cp.shard = Some(monsoon_engine::config::Shard { index, count: 2 });
        cp.stream_start = Some(ClusterTime { t: 1_700_000_000, i: 1 });
        cp.stream_time = Some(ClusterTime { t: at, i: 1 });
        cp.resume_token = Some(serde_json::json!({"_data": "token"}));
        cp.snapshot.done = true;
        cp
    };
    let f = Fixture::new(
        ClientBuilder::new()
            .with_object(pipeline(3))
            .with_object(secret())
            .with_object(checkpoint_cm(0, 2, &shard_cp(0, 1_700_000_900)))
            .with_object(checkpoint_cm(1, 2, &shard_cp(1, 1_700_000_500)))
            .with_object(worker_pod(0))
            .with_object(worker_pod(1)),
    )
    .await;
    // Old workers still run: nothing of the new layout may start.
    f.reconcile().await;
    assert_eq!(f.checkpoints().await, vec!["orders-checkpoint-0-of-2", "orders-checkpoint-1-of-2"]);
    assert_eq!(f.status().await.phase.as_deref(), Some("Pending"));
    assert_eq!(condition(&f.status().await, "Progressing").reason, "Resharding");

    for i in 0..2 {
        f.api::<Pod>().delete(&format!("orders-worker-{i}"), &DeleteParams::default()).await.expect("pod gone");
    }
    f.reconcile().await;
    assert_eq!(
        f.checkpoints().await,
        vec!["orders-checkpoint-0-of-3", "orders-checkpoint-1-of-3", "orders-checkpoint-2-of-3"]
    );
    for i in 0..3 {
        let cm = f.api::<ConfigMap>().get(&format!("orders-checkpoint-{i}-of-3")).await.expect("cm");
        let cp: Checkpoint = serde_json::from_str(&cm.data.expect("data")[KEY_CHECKPOINT]).expect("checkpoint");
        assert_eq!(cp.stream_start, Some(ClusterTime { t: 1_700_000_500, i: 1 }), "earliest old position");
        assert_eq!(cp.resume_token, None);
        assert!(cp.snapshot.done);
        assert_eq!(cp.shard, Some(monsoon_engine::config::Shard { index: i, count: 3 }));
    }
    assert_eq!(f.statefulset().await.expect("sts").spec.expect("spec").replicas, Some(3));
    assert_eq!(f.status().await.shard_count, Some(3));
}

#[test]
fn status_folds_worker_reports_into_phase_lag_and_conditions() {
    let p = {
        let mut p = pipeline(2);
        p.metadata.generation = Some(4);
        p
    };
    let now = 1_700_000_100;
    let report = |phase: &str, lag: f64, sink_ok: bool| WorkerReport {
        phase: phase.into(),
        source_ok: true,
        sink_ok,
        documents_synced: 10,
        lag_seconds: Some(lag),
        checkpoint_unix: Some(now - 2),
        reported_unix: now - 1,
        ..WorkerReport::default()
    };
    let cm = |index: u32, r: &WorkerReport| {
        let mut cm = checkpoint_cm(index, 2, &Checkpoint::new("orders"));
        let data = cm.data.get_or_insert_with(BTreeMap::new);
        data.insert(KEY_HOLDER.into(), format!("orders-worker-{index}/5eed{index}"));
        data.insert(KEY_RENEW_TIME.into(), ((now - 1) * 1000).to_string());
        data.insert(KEY_STATUS.into(), serde_json::to_string(r).expect("json"));
        cm
    };
    let sts = StatefulSet {
        spec: Some(k8s_openapi::api::apps::v1::StatefulSetSpec { replicas: Some(2), ..Default::default() }),
        status: Some(k8s_openapi::api::apps::v1::StatefulSetStatus {
            replicas: 2,
            ready_replicas: Some(2),
            updated_replicas: Some(2),
            ..Default::default()
        }),
        ..StatefulSet::default()
    };

    let mut s = SyncPipelineStatus::default();
    summarize(&mut s, &p, &sts, &[cm(0, &report("Streaming", 0.0, true)), cm(1, &report("Streaming", 1.5, true))], 2, now);
    let became = |before: &SyncPipelineStatus, after: &SyncPipelineStatus| -> Vec<&'static str> {
        monsoon_operator::status::transitions(Some(before), after).into_iter().map(|(t, _, _)| t).collect()
    };
    assert_eq!(became(&SyncPipelineStatus::default(), &s), vec!["Ready"], "becoming ready is an Event");
    let ready = s.clone();
    assert_eq!(s.phase.as_deref(), Some("Streaming"));
    assert_eq!(s.lag.as_deref(), Some("1.5s"));
    assert_eq!(s.documents_synced, Some(20));
    assert_eq!(s.ready.as_deref(), Some("2/2"));
    assert_eq!(condition(&s, "Ready").status, "True");
    assert_eq!(condition(&s, "Ready").observed_generation, Some(4));
    assert_eq!(s.shards[1].checkpoint_time.as_deref(), Some(monsoon_engine::time::rfc3339(now - 2).as_str()), "a time, not an age");
    assert_eq!(s.shards[1].checkpoint_age_seconds, None);
    assert_eq!(s.observed_generation, Some(4), "rolled out, so generation 4 is observed");
    // The same reports a minute later: nothing in the status changes (no churn).
    let mut later = s.clone();
    summarize(&mut later, &p, &sts, &[cm(0, &report("Streaming", 0.0, true)), cm(1, &report("Streaming", 1.5, true))], 2, now + 30);
    assert_eq!(later, s, "an idle pipeline's status must not change with time");
    assert_eq!(s.shards[1].holder.as_deref(), Some("orders-worker-1"), "the holder's pod, without its incarnation nonce");

    // Elasticsearch refuses shard 1's writes: SinkUnavailable and Degraded, not Ready.
    summarize(&mut s, &p, &sts, &[cm(0, &report("Streaming", 0.0, true)), cm(1, &report("Streaming", 9.0, false))], 2, now);
    assert_eq!(condition(&s, "SinkUnavailable").status, "True");
    assert!(condition(&s, "SinkUnavailable").message.contains("shards 1"));
    assert_eq!(condition(&s, "Degraded").status, "True");
    assert_eq!(condition(&s, "Ready").status, "False");
    assert_eq!(became(&ready, &s), vec!["SinkUnavailable", "Degraded"], "problems are warning Events, once");
    assert!(became(&s.clone(), &s).is_empty());

    // History lost on shard 0 (policy Fail): Failed with the HistoryLost condition, and the
    // failure stays visible after the worker released its lease.
    let mut failed = report("Failed", 0.0, true);
    failed.failure = Some("MongoDB source failed: ... (ChangeStreamHistoryLost, code 286)".into());
    let mut released = cm(0, &failed);
    released.data.as_mut().expect("data").insert(KEY_HOLDER.into(), String::new());
    summarize(&mut s, &p, &sts, &[released, cm(1, &report("Streaming", 0.0, true))], 2, now);
    assert_eq!(s.phase.as_deref(), Some("Failed"));
    assert_eq!(condition(&s, "HistoryLost").status, "True");
    assert!(s.shards[0].failure.as_deref().is_some_and(|f| f.contains("286")));

    // A worker that stopped reporting long ago no longer counts.
    let stale = WorkerReport {
        reported_unix: now - 600,
        ..report("Streaming", 0.0, true)
    };
    let mut stale_cm = cm(0, &stale);
    stale_cm.data.as_mut().expect("data").insert(KEY_RENEW_TIME.into(), ((now - 600) * 1000).to_string());
    summarize(&mut s, &p, &sts, &[stale_cm, cm(1, &report("Streaming", 0.0, true))], 2, now);
    assert_eq!(s.shards[0].phase.as_deref(), Some("Stopped"));
    assert_eq!(condition(&s, "Ready").status, "False");
}

/// A script pipeline whose script heaps cannot fit the worker's memory limit is refused with a
/// condition (kstatus Stalled) before any worker starts, instead of workers killed for memory.
#[tokio::test]
async fn script_threads_that_cannot_fit_are_a_condition_not_a_workload() {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    let mut p = pipeline(1);
    p.spec.scripts = vec![monsoon_api::ScriptSpec { script: Some("module.exports = function(d) { return d; }".into()), ..Default::default() }];
    p.spec.script_limits = Some(monsoon_api::ScriptLimits { memory_mib: 512, ..Default::default() });
    p.spec.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements {
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
        ..Default::default()
    });
    let f = Fixture::new(ClientBuilder::new().with_object(p).with_object(secret())).await;
    assert_eq!(f.reconcile().await, Action::await_change());
    assert!(f.statefulset().await.is_none(), "workers that cannot fit were started");
    let s = f.status().await;
    assert_eq!(condition(&s, "ResourcesDoNotFit").status, "True");
    assert_eq!(condition(&s, "Stalled").reason, "ResourcesDoNotFit");
    assert!(condition(&s, "ResourcesDoNotFit").message.contains("512 MiB"), "{}", condition(&s, "ResourcesDoNotFit").message);
}

/// A rotated credential rolls the workers: the Secret's new version changes the pod template.
#[tokio::test]
async fn a_changed_secret_rolls_the_workers() {
    let f = Fixture::new(ClientBuilder::new().with_object(pipeline(1)).with_object(secret())).await;
    f.reconcile().await;
    let template = |s: StatefulSet| s.spec.expect("spec").template;
    let before = template(f.statefulset().await.expect("sts"));
    f.reconcile().await;
    assert_eq!(template(f.statefulset().await.expect("sts")), before, "nothing changed, nothing rolls");
    let mut s = f.api::<Secret>().get("mongo").await.expect("secret");
    s.data = Some(BTreeMap::from([("uri".to_string(), ByteString(b"mongodb://u:rotated@db/".to_vec()))]));
    f.api::<Secret>().replace("mongo", &PostParams::default(), &s).await.expect("rotate");
    f.reconcile().await;
    let after = template(f.statefulset().await.expect("sts"));
    let digest = |t: &k8s_openapi::api::core::v1::PodTemplateSpec| {
        t.metadata.as_ref().and_then(|m| m.annotations.as_ref()).and_then(|a| a.get("monsoon.dev/references").cloned())
    };
    assert!(digest(&before).is_some());
    assert_ne!(digest(&before), digest(&after), "the rotated Secret did not change the pod template");
    let text = serde_json::to_string(&after).expect("json");
    assert!(!text.contains("rotated"), "a secret value reached the pod template");
}

/// `monsoon.dev/paused: "true"` stops reconciliation: a spec change is not applied.
#[tokio::test]
async fn the_paused_annotation_leaves_the_workers_alone() {
    let f = Fixture::new(ClientBuilder::new().with_object(pipeline(1)).with_object(secret())).await;
    f.reconcile().await;
    let mut p = f.api::<SyncPipeline>().get("orders").await.expect("pipeline");
    p.metadata.annotations = Some(BTreeMap::from([("monsoon.dev/paused".to_string(), "true".to_string())]));
    p.spec.workers = 3;
    f.api::<SyncPipeline>().replace("orders", &PostParams::default(), &p).await.expect("edit");
    assert_eq!(f.reconcile().await, Action::await_change());
    assert_eq!(f.statefulset().await.expect("sts").spec.expect("spec").replicas, Some(1), "the change was applied");
    assert_eq!(f.checkpoints().await, vec!["orders-checkpoint-0-of-1"], "a re-shard started");
    let s = f.status().await;
    assert_eq!(condition(&s, "Reconciling").reason, "ReconcilePaused");
}
