//! The objects a pipeline is reconciled into, built as plain values (no I/O). Each part has
//! one place:
//! - [`pod`]: the worker pod template (container, the pipeline it reads, credentials wiring,
//!   probes, resources and script sizing, the `workerTemplate` scheduling and metadata, the
//!   annotations that roll the workers);
//! - [`rbac`]: the workers' ServiceAccount, Role and RoleBinding;
//! - here: names and labels, the headless Service, the StatefulSet around the pod template
//!   and the PodDisruptionBudget.
//!
//! Per pipeline: pod `N` of the StatefulSet runs shard `N`, stable across restarts and
//! rollouts. The checkpoint ConfigMaps themselves are created by the reconciler and carry no
//! owner reference, so `checkpointsOnDelete: Keep` can keep them.

pub mod pod;
mod rbac;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use monsoon_api::SyncPipeline;

pub use pod::size_scripts;

/// Port of every worker's `/healthz`, `/readyz`, `/metrics` and `/stats`.
pub const WORKER_PORT: i32 = 9464;
/// Label naming the pipeline an object belongs to.
pub const LABEL_PIPELINE: &str = "monsoon.dev/pipeline";
/// Label marking checkpoint ConfigMaps.
pub const LABEL_CHECKPOINT: &str = "monsoon.dev/checkpoint";
/// Label of a checkpoint ConfigMap giving the shard count it was written for.
pub const LABEL_SHARD_COUNT: &str = "monsoon.dev/shard-count";
/// `app.kubernetes.io/managed-by` value of every object the operator makes: its watches of
/// StatefulSets select on it.
pub const MANAGED_BY: &str = "monsoon-operator";
/// Label selector of every object the operator makes.
pub const SELECTOR_MANAGED: &str = "app.kubernetes.io/managed-by=monsoon-operator";
/// Environment variable carrying the pipeline (JSON) to the worker.
pub const ENV_PIPELINE: &str = "MONSOON_PIPELINE";
/// Environment variable carrying the shard count to the worker.
pub const ENV_SHARD_COUNT: &str = "MONSOON_SHARD_COUNT";
/// Pipeline annotation: a new value restarts every worker (copied into the pod template).
pub const ANNOTATION_RESTART: &str = "monsoon.dev/restart";
/// Pipeline annotation: a new value (any token) asks the workers for a fresh snapshot; it
/// reaches them as [`ENV_RESNAPSHOT`] (and rolls them).
pub const ANNOTATION_RESNAPSHOT: &str = "monsoon.dev/resnapshot";
/// Environment variable carrying the `monsoon.dev/resnapshot` token to the workers. A worker
/// honours it only once the engine supports re-snapshot on request (see README).
pub const ENV_RESNAPSHOT: &str = "MONSOON_RESNAPSHOT";
/// Pod template annotation: digest of the referenced Secrets' and ConfigMaps' versions, so a
/// changed credential or CA bundle rolls the workers.
pub const ANNOTATION_REFERENCES: &str = "monsoon.dev/references";

/// How worker pods are run (operator-wide settings).
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Container image of the workers (the operator's own, normally).
    pub image: String,
    /// `text` or `json`.
    pub log_format: String,
    /// Seconds a worker has to deliver what it read after SIGTERM.
    pub shutdown_grace_seconds: u32,
}

/// What the reconciler knows beyond the pipeline itself.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// Shards the checkpoints are laid out for.
    pub shards: u32,
    /// Pods to run: 0 while paused, `shards` otherwise.
    pub replicas: u32,
    /// Versions of the referenced Secrets and ConfigMaps (`None`: not read, as in
    /// `monsoon render`).
    pub references_version: Option<String>,
}

/// Everything applied for one pipeline.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Identity of the workers.
    pub service_account: ServiceAccount,
    /// Access to their own checkpoint ConfigMaps, nothing else.
    pub role: Role,
    /// Binds the Role to the ServiceAccount.
    pub role_binding: RoleBinding,
    /// Headless Service selecting the workers (metrics scraping, stable DNS).
    pub service: Service,
    /// The workers: one pod per shard.
    pub stateful_set: StatefulSet,
    /// At most one worker evicted at a time (node drains, cluster autoscaler).
    pub disruption_budget: PodDisruptionBudget,
}

/// Name of the workers' StatefulSet, Service, ServiceAccount, Role, RoleBinding and PDB.
pub fn worker_name(pipeline: &str) -> String {
    format!("{pipeline}-worker")
}

/// Name of shard `index`'s checkpoint ConfigMap when the pipeline has `count` shards.
pub fn checkpoint_name(pipeline: &str, index: u32, count: u32) -> String {
    format!("{pipeline}-checkpoint-{index}-of-{count}")
}

/// Labels of every object of a pipeline.
pub fn labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "monsoon-worker".to_string()),
        ("app.kubernetes.io/instance".to_string(), pipeline.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
        (LABEL_PIPELINE.to_string(), pipeline.to_string()),
    ])
}

/// Label selector (`k=v,...`) of a pipeline's worker pods.
pub fn pod_selector(pipeline: &str) -> String {
    format!("app.kubernetes.io/name=monsoon-worker,{LABEL_PIPELINE}={pipeline}")
}

fn selector_labels(pipeline: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "monsoon-worker".to_string()),
        (LABEL_PIPELINE.to_string(), pipeline.to_string()),
    ])
}

fn owner(p: &SyncPipeline) -> OwnerReference {
    OwnerReference {
        api_version: SyncPipeline::api_version(&()).to_string(),
        kind: SyncPipeline::kind(&()).to_string(),
        name: p.name_any(),
        uid: p.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn meta(p: &SyncPipeline, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: p.metadata.namespace.clone(),
        labels: Some(labels(&p.name_any())),
        owner_references: Some(vec![owner(p)]),
        ..ObjectMeta::default()
    }
}

/// Build the workload of `p` for `shards` shards; `replicas` is 0 while paused or while
/// shards are being re-laid out, `shards` otherwise. Script threads are sized from the
/// container's resources, falling back to the pipeline's own setting when they cannot fit
/// (the reconciler refuses that case first, with a condition: see [`size_scripts`]).
pub fn build(p: &SyncPipeline, shards: u32, replicas: u32, settings: &WorkerSettings) -> Workload {
    build_with(p, &Inputs { shards, replicas, references_version: None }, settings)
}

/// [`build`] with everything the reconciler knows ([`Inputs`]).
pub fn build_with(p: &SyncPipeline, inputs: &Inputs, settings: &WorkerSettings) -> Workload {
    let threads = size_scripts(p).unwrap_or(None);
    let template = pod::template(p, inputs, settings, threads);
    Workload {
        service_account: rbac::service_account(p),
        role: rbac::role(p, inputs.shards),
        role_binding: rbac::role_binding(p),
        service: service(p),
        stateful_set: stateful_set(p, inputs.replicas, template),
        disruption_budget: disruption_budget(p),
    }
}

/// Headless Service selecting the workers.
fn service(p: &SyncPipeline) -> Service {
    let name = p.name_any();
    Service {
        metadata: meta(p, worker_name(&name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: WORKER_PORT,
                target_port: Some(IntOrString::String("http".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The StatefulSet around the pod template.
fn stateful_set(p: &SyncPipeline, replicas: u32, template: k8s_openapi::api::core::v1::PodTemplateSpec) -> StatefulSet {
    let name = p.name_any();
    let worker = worker_name(&name);
    StatefulSet {
        metadata: meta(p, worker.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            service_name: Some(worker),
            // Shards are independent: start and stop them all at once.
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: None,
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&name)),
                match_expressions: None,
            },
            template,
            ..StatefulSetSpec::default()
        }),
        status: None,
    }
}

/// One worker may be evicted at a time: a drain moves shards one by one, each resuming from
/// its checkpoint, instead of stopping the whole pipeline at once.
fn disruption_budget(p: &SyncPipeline) -> PodDisruptionBudget {
    let name = p.name_any();
    PodDisruptionBudget {
        metadata: meta(p, worker_name(&name)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&name)),
                match_expressions: None,
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    }
}

/// Why applying `after` over `before` rolls the workers, for Events: a new restart token, a
/// new re-snapshot token, or a changed Secret or ConfigMap the pipeline references.
pub fn rollout_causes(before: &StatefulSet, after: &StatefulSet) -> Vec<(&'static str, String)> {
    let annotation = |s: &StatefulSet, key: &str| -> Option<String> {
        s.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get(key).cloned()
    };
    let env = |s: &StatefulSet, key: &str| -> Option<String> {
        s.spec.as_ref()?.template.spec.as_ref()?.containers.first()?.env.as_ref()?.iter().find(|e| e.name == key)?.value.clone()
    };
    let mut causes = Vec::new();
    let restart = annotation(after, ANNOTATION_RESTART);
    if restart.is_some() && restart != annotation(before, ANNOTATION_RESTART) {
        causes.push((crate::reconcile::event_reason::RESTART, format!("annotation {ANNOTATION_RESTART} changed: restarting every worker")));
    }
    let token = env(after, ENV_RESNAPSHOT);
    if token.is_some() && token != env(before, ENV_RESNAPSHOT) {
        causes.push((crate::reconcile::event_reason::RESNAPSHOT, format!(
            "annotation {ANNOTATION_RESNAPSHOT} changed: the workers restart with {ENV_RESNAPSHOT}={}",
            token.unwrap_or_default()
        )));
    }
    let references = annotation(after, ANNOTATION_REFERENCES);
    let was = annotation(before, ANNOTATION_REFERENCES);
    if references.is_some() && was.is_some() && references != was {
        causes.push((crate::reconcile::event_reason::REFERENCES_CHANGED, "a Secret or ConfigMap the pipeline references changed: restarting every worker to read it".to_string()));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::EnvVar;
    use monsoon_api::{SecretKeyRef, SyncPipelineSpec, ValueFrom};

    fn pipeline() -> SyncPipeline {
        let mut p = SyncPipeline::new(
            "shop",
            SyncPipelineSpec {
                namespaces: vec!["shop.orders".into()],
                workers: 2,
                ..SyncPipelineSpec::default()
            },
        );
        p.metadata.namespace = Some("team-a".into());
        p.metadata.uid = Some("uid-1".into());
        p.spec.mongodb.uri_from = Some(ValueFrom {
            secret_key_ref: Some(SecretKeyRef {
                name: "mongo".into(),
                key: "uri".into(),
            }),
            ..ValueFrom::default()
        });
        p.spec.elasticsearch.urls = vec!["https://es:9200".into()];
        p.spec.elasticsearch.ca_from = Some(ValueFrom {
            config_map_key_ref: Some(SecretKeyRef {
                name: "es-ca".into(),
                key: "ca.crt".into(),
            }),
            ..ValueFrom::default()
        });
        p
    }

    /// The pipeline the worker reads (`MONSOON_PIPELINE`), from its container's environment.
    fn worker_spec(env: &[EnvVar]) -> serde_json::Value {
        let text = env.iter().find(|e| e.name == ENV_PIPELINE).and_then(|e| e.value.as_deref()).expect("pipeline env");
        serde_json::from_str(text).expect("json")
    }

    fn settings() -> WorkerSettings {
        WorkerSettings {
            image: "monsoon:test".into(),
            log_format: "json".into(),
            shutdown_grace_seconds: 20,
        }
    }

    #[test]
    fn client_certificates_reach_the_pod_as_mounted_secret_files() {
        let mut p = pipeline();
        let tls = |key: &str| ValueFrom {
            secret_key_ref: Some(SecretKeyRef { name: "es-client".into(), key: key.into() }),
            ..ValueFrom::default()
        };
        p.spec.elasticsearch.client_cert_from = Some(tls("tls.crt"));
        p.spec.elasticsearch.client_key_from = Some(tls("tls.key"));
        let w = build(&p, 2, 2, &settings());
        let pod = w.stateful_set.spec.expect("spec").template.spec.expect("pod");
        let json = worker_spec(pod.containers[0].env.as_ref().expect("env"));
        assert_eq!(json["spec"]["elasticsearch"]["clientCertFrom"], serde_json::json!({"file": "/etc/monsoon/tls/elasticsearch/crt/tls.crt"}));
        assert_eq!(json["spec"]["elasticsearch"]["clientKeyFrom"], serde_json::json!({"file": "/etc/monsoon/tls/elasticsearch/key/tls.key"}));
        let volumes = pod.volumes.as_ref().expect("volumes");
        for (name, key) in [("tls-elasticsearch-crt", "tls.crt"), ("tls-elasticsearch-key", "tls.key")] {
            let secret = volumes.iter().find(|v| v.name == name).and_then(|v| v.secret.as_ref()).expect(name);
            assert_eq!(secret.secret_name.as_deref(), Some("es-client"));
            assert_eq!(secret.items.as_ref().expect("items")[0].key, key);
        }
        let mounts = pod.containers[0].volume_mounts.as_ref().expect("mounts");
        assert!(mounts.iter().any(|m| m.name == "tls-elasticsearch-key" && m.read_only == Some(true)));
    }

    #[test]
    fn scripts_from_config_maps_reach_the_pod_as_mounted_files() {
        let mut p = pipeline();
        p.spec.scripts = vec![
            monsoon_api::ScriptSpec { script: Some("module.exports = function(d) { return d; }".into()), ..Default::default() },
            monsoon_api::ScriptSpec {
                namespace: Some("shop.orders".into()),
                script_from: Some(ValueFrom { config_map_key_ref: Some(SecretKeyRef { name: "js".into(), key: "orders.js".into() }), ..ValueFrom::default() }),
                ..Default::default()
            },
        ];
        let w = build(&p, 2, 2, &settings());
        let pod = w.stateful_set.spec.expect("spec").template.spec.expect("pod");
        let json = worker_spec(pod.containers[0].env.as_ref().expect("env"));
        assert_eq!(json["spec"]["scripts"][1]["scriptFrom"], serde_json::json!({"file": "/etc/monsoon/scripts/scripts-1/script.js"}));
        assert!(json["spec"]["scripts"][0]["script"].is_string(), "inline scripts stay inline");
        let volume = pod.volumes.as_ref().expect("volumes").iter().find(|v| v.name == "script-scripts-1").expect("volume");
        let cm = volume.config_map.as_ref().expect("config map");
        assert_eq!((cm.name.as_str(), cm.items.as_ref().expect("items")[0].key.as_str()), ("js", "orders.js"));
        let mounts = pod.containers[0].volume_mounts.as_ref().expect("mounts");
        assert!(mounts.iter().any(|m| m.name == "script-scripts-1" && m.mount_path == "/etc/monsoon/scripts/scripts-1" && m.read_only == Some(true)));
    }

    #[test]
    fn credentials_reach_the_pod_only_as_secret_references() {
        let w = build(&pipeline(), 2, 2, &settings());
        let pod = w.stateful_set.spec.expect("spec").template.spec.expect("pod");
        let c = &pod.containers[0];
        let env = c.env.as_ref().expect("env");
        let uri = env.iter().find(|e| e.name == "MONSOON_MONGODB_URI").expect("uri env");
        let sel = uri.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("secret ref");
        assert_eq!((sel.name.as_str(), sel.key.as_str()), ("mongo", "uri"));
        let json = worker_spec(env);
        assert_eq!(json["spec"]["mongodb"]["uriFrom"], serde_json::json!({"env": "MONSOON_MONGODB_URI"}));
        assert_eq!(json["spec"]["elasticsearch"]["caFrom"], serde_json::json!({"file": "/etc/monsoon/ca/elasticsearch/ca.pem"}));
        let vol = pod.volumes.as_ref().expect("volumes").iter().find(|v| v.name == "ca-elasticsearch").expect("ca volume");
        assert_eq!(vol.config_map.as_ref().map(|c| c.name.as_str()), Some("es-ca"));
        // The worker's copy parses and validates as a standalone pipeline.
        let back: SyncPipeline = serde_json::from_value(json).expect("pipeline");
        assert!(monsoon_api::validate(&back, monsoon_engine::check_connection_string).is_ok());
    }

    #[test]
    fn aws_keys_reach_the_pod_only_as_secret_references() {
        let mut p = pipeline();
        let secret = |key: &str| Some(ValueFrom { secret_key_ref: Some(SecretKeyRef { name: "aws".into(), key: key.into() }), ..ValueFrom::default() });
        p.spec.elasticsearch.aws = Some(monsoon_api::AwsSigning {
            region: "eu-west-1".into(),
            access_key_id_from: secret("id"),
            secret_access_key_from: secret("secret"),
            session_token_from: secret("token"),
            ..monsoon_api::AwsSigning::default()
        });
        let w = build(&p, 1, 1, &settings());
        let pod = w.stateful_set.spec.expect("spec").template.spec.expect("pod");
        let env = pod.containers[0].env.as_ref().expect("env");
        for (name, key) in [("MONSOON_AWS_ACCESS_KEY_ID", "id"), ("MONSOON_AWS_SECRET_ACCESS_KEY", "secret"), ("MONSOON_AWS_SESSION_TOKEN", "token")] {
            let var = env.iter().find(|e| e.name == name).unwrap_or_else(|| panic!("{name}"));
            let sel = var.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).expect("secret ref");
            assert_eq!((sel.name.as_str(), sel.key.as_str()), ("aws", key));
        }
        let json = worker_spec(env);
        assert_eq!(json["spec"]["elasticsearch"]["aws"]["secretAccessKeyFrom"], serde_json::json!({"env": "MONSOON_AWS_SECRET_ACCESS_KEY"}));
        let back: SyncPipeline = serde_json::from_value(json).expect("pipeline");
        assert!(monsoon_api::validate(&back, monsoon_engine::check_connection_string).is_ok());
    }

    #[test]
    fn workers_run_locked_down_and_may_touch_only_their_checkpoints() {
        let w = build(&pipeline(), 2, 2, &settings());
        let rules = w.role.rules.expect("rules");
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resource_names.as_deref(),
            Some(&["shop-checkpoint-0-of-2".to_string(), "shop-checkpoint-1-of-2".to_string()][..])
        );
        assert!(!rules[0].verbs.iter().any(|v| v == "create" || v == "delete" || v == "list"));
        let sts = w.stateful_set.spec.expect("spec");
        assert_eq!(sts.replicas, Some(2));
        let pod = sts.template.spec.expect("pod");
        let sc = pod.containers[0].security_context.as_ref().expect("security context");
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(pod.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
        let owner = &w.stateful_set.metadata.owner_references.expect("owner")[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("SyncPipeline", "uid-1", Some(true)));
    }

    #[test]
    fn pausing_does_not_change_the_pod_template() {
        let mut paused = pipeline();
        paused.spec.paused = true;
        let a = build(&pipeline(), 2, 2, &settings()).stateful_set.spec.expect("a").template;
        let b = build(&paused, 2, 0, &settings()).stateful_set.spec.expect("b").template;
        assert_eq!(a, b);
    }

    #[test]
    fn the_worker_template_reaches_the_pods_and_their_service_account_without_overriding_ours() {
        let mut p = pipeline();
        let template: monsoon_api::WorkerTemplate = serde_json::from_value(serde_json::json!({
            "labels": {"team": "search", "app.kubernetes.io/name": "hijack", "monsoon.dev/pipeline": "other"},
            "annotations": {"sidecar.istio.io/inject": "false", "prometheus.io/port": "1"},
            "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/monsoon"},
            "imagePullSecrets": [{"name": "registry"}],
            "nodeSelector": {"kubernetes.io/arch": "arm64"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "sync", "effect": "NoSchedule"}],
            "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}],
            "priorityClassName": "sync-critical",
        }))
        .expect("template");
        p.spec.worker_template = Some(template);
        let w = build(&p, 2, 2, &settings());
        assert_eq!(
            w.service_account.metadata.annotations.as_ref().and_then(|a| a.get("eks.amazonaws.com/role-arn")).map(String::as_str),
            Some("arn:aws:iam::123456789012:role/monsoon")
        );
        let sts = w.stateful_set.spec.expect("spec");
        let meta = sts.template.metadata.expect("metadata");
        let labels = meta.labels.expect("labels");
        assert_eq!(labels["team"], "search");
        assert_eq!(labels["app.kubernetes.io/name"], "monsoon-worker", "the selector labels cannot be overridden");
        assert_eq!(labels[LABEL_PIPELINE], "shop");
        let selector = sts.selector.match_labels.expect("selector");
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)), "the StatefulSet must still select its pods");
        let annotations = meta.annotations.expect("annotations");
        assert_eq!(annotations["sidecar.istio.io/inject"], "false");
        assert_eq!(annotations["prometheus.io/port"], WORKER_PORT.to_string());
        let pod = sts.template.spec.expect("pod");
        assert_eq!(pod.image_pull_secrets.expect("pull secrets")[0].name, "registry");
        assert_eq!(pod.node_selector.expect("node selector")["kubernetes.io/arch"], "arm64");
        assert_eq!(pod.tolerations.expect("tolerations")[0].key.as_deref(), Some("dedicated"));
        assert!(pod.affinity.and_then(|a| a.pod_anti_affinity).is_some());
        assert_eq!(pod.priority_class_name.as_deref(), Some("sync-critical"));
        let spread = &pod.topology_spread_constraints.expect("spread")[0];
        assert_eq!(
            spread.label_selector.as_ref().and_then(|s| s.match_labels.clone()),
            Some(selector_labels("shop")),
            "a constraint without a selector spreads this pipeline's workers"
        );
        // The worker's own copy of the pipeline carries none of it.
        let json = worker_spec(pod.containers[0].env.as_ref().expect("env"));
        assert!(json["spec"].get("workerTemplate").is_none());
    }

    #[test]
    fn at_most_one_worker_is_disrupted_at_a_time() {
        let w = build(&pipeline(), 3, 3, &settings());
        let pdb = w.disruption_budget.spec.expect("spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(pdb.selector.and_then(|s| s.match_labels), w.stateful_set.spec.expect("sts").selector.match_labels);
    }

    fn scripted(cpu_limit: Option<&str>, memory_limit: &str, limits: Option<monsoon_api::ScriptLimits>) -> SyncPipeline {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let mut p = pipeline();
        p.spec.scripts = vec![monsoon_api::ScriptSpec { script: Some("module.exports = function(d) { return d; }".into()), ..Default::default() }];
        p.spec.script_limits = limits;
        let mut l = BTreeMap::from([("memory".to_string(), Quantity(memory_limit.into()))]);
        if let Some(cpu) = cpu_limit {
            l.insert("cpu".into(), Quantity(cpu.into()));
        }
        p.spec.resources = Some(k8s_openapi::api::core::v1::ResourceRequirements { limits: Some(l), ..Default::default() });
        p
    }

    #[test]
    fn script_threads_follow_the_cpu_limit_and_fit_the_memory_limit() {
        // 4 CPUs, 1 GiB: 4 threads of 64 MiB + 64 MiB fit.
        assert_eq!(size_scripts(&scripted(Some("4"), "1Gi", None)), Ok(Some(4)));
        // 2.5 CPUs round up.
        assert_eq!(size_scripts(&scripted(Some("2500m"), "1Gi", None)), Ok(Some(3)));
        // 8 CPUs but 256 MiB: only 3 threads fit (64 + 3 × 64 = 256).
        assert_eq!(size_scripts(&scripted(Some("8"), "256Mi", None)), Ok(Some(3)));
        // No CPU limit: one thread, not one per core of the node.
        assert_eq!(size_scripts(&scripted(None, "256Mi", None)), Ok(Some(1)));
        // An explicit count that fits is kept.
        let two = monsoon_api::ScriptLimits { workers: 2, ..Default::default() };
        assert_eq!(size_scripts(&scripted(Some("8"), "256Mi", Some(two))), Ok(Some(2)));
        // No scripts: nothing to size.
        assert_eq!(size_scripts(&pipeline()), Ok(None));
        // What is sized reaches the worker's copy of the pipeline.
        let w = build(&scripted(Some("8"), "256Mi", None), 1, 1, &settings());
        let pod = w.stateful_set.spec.expect("spec").template.spec.expect("pod");
        assert_eq!(worker_spec(pod.containers[0].env.as_ref().expect("env"))["spec"]["scriptLimits"]["workers"], 3);
    }

    #[test]
    fn script_threads_that_cannot_fit_are_refused() {
        let big = monsoon_api::ScriptLimits { memory_mib: 512, ..Default::default() };
        let e = size_scripts(&scripted(Some("1"), "256Mi", Some(big))).expect_err("512 MiB heap in 256 MiB");
        assert!(e.contains("512 MiB") && e.contains("256 MiB"), "{e}");
        let many = monsoon_api::ScriptLimits { workers: 8, ..Default::default() };
        let e = size_scripts(&scripted(Some("8"), "256Mi", Some(many))).expect_err("8 × 64 MiB in 256 MiB");
        assert!(e.contains("8 script threads"), "{e}");
    }

    #[test]
    fn quantities_are_read_as_kubernetes_writes_them() {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        assert_eq!(pod::cpu_cores(&Quantity("500m".into())), Some(0.5));
        assert_eq!(pod::cpu_cores(&Quantity("2".into())), Some(2.0));
        assert_eq!(pod::memory_bytes(&Quantity("256Mi".into())), Some(256 * 1024 * 1024));
        assert_eq!(pod::memory_bytes(&Quantity("1G".into())), Some(1_000_000_000));
        assert_eq!(pod::memory_bytes(&Quantity("134217728".into())), Some(134_217_728));
    }

    #[test]
    fn annotations_restart_and_resnapshot_and_a_changed_reference_rolls_the_workers() {
        let inputs = |version: &str| Inputs { shards: 2, replicas: 2, references_version: Some(version.to_string()) };
        let before = build_with(&pipeline(), &inputs("secret/mongo@1"), &settings()).stateful_set;
        // Nothing changed: the same template (no needless rollout), no cause.
        let same = build_with(&pipeline(), &inputs("secret/mongo@1"), &settings()).stateful_set;
        assert_eq!(before, same);
        assert!(rollout_causes(&before, &same).is_empty());
        // The Secret was edited: a new digest in the template, so the StatefulSet rolls.
        let rotated = build_with(&pipeline(), &inputs("secret/mongo@7"), &settings()).stateful_set;
        assert_ne!(before.spec.as_ref().map(|s| &s.template), rotated.spec.as_ref().map(|s| &s.template));
        let causes: Vec<&str> = rollout_causes(&before, &rotated).iter().map(|(r, _)| *r).collect();
        assert_eq!(causes, vec![crate::reconcile::event_reason::REFERENCES_CHANGED]);
        // The digest is of versions, never of values.
        let annotation = rotated.spec.as_ref().and_then(|s| s.template.metadata.as_ref()).and_then(|m| m.annotations.as_ref()).map(|a| a[ANNOTATION_REFERENCES].clone());
        assert_eq!(annotation.as_deref().map(str::len), Some(16));

        let mut p = pipeline();
        p.metadata.annotations = Some(BTreeMap::from([
            (ANNOTATION_RESTART.to_string(), "2026-12-06T08:00:00Z".to_string()),
            (ANNOTATION_RESNAPSHOT.to_string(), "after-incident-42".to_string()),
        ]));
        let after = build_with(&p, &inputs("secret/mongo@1"), &settings()).stateful_set;
        let causes: Vec<&str> = rollout_causes(&before, &after).iter().map(|(r, _)| *r).collect();
        assert_eq!(causes, vec![crate::reconcile::event_reason::RESTART, crate::reconcile::event_reason::RESNAPSHOT]);
        let pod = after.spec.expect("spec").template;
        assert_eq!(pod.metadata.expect("meta").annotations.expect("annotations")[ANNOTATION_RESTART], "2026-12-06T08:00:00Z");
        let env = pod.spec.expect("pod").containers[0].env.clone().expect("env");
        assert_eq!(env.iter().find(|e| e.name == ENV_RESNAPSHOT).and_then(|e| e.value.as_deref()), Some("after-incident-42"));
    }
}
