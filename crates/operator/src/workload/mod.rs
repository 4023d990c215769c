//! The objects a pipeline is reconciled into, built as plain values (no I/O).
//!
//! Per pipeline: a ServiceAccount, a Role that lets it read and update only its own
//! checkpoint ConfigMaps, a RoleBinding, a headless Service for metrics, and a StatefulSet
//! of workers (pod `N` runs shard `N`, stable across restarts and rollouts). The checkpoint
//! ConfigMaps themselves are created by the reconciler and carry no owner reference, so
//! `checkpointsOnDelete: Keep` can keep them.
//!
//! Credentials never enter the pod spec: each `secretKeyRef` becomes an environment
//! variable filled by the kubelet from the Secret, and each CA bundle a mounted file; the
//! pipeline the worker reads names those variables and files instead.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec,
    Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use monsoon_api::{SyncPipeline, SyncPipelineSpec, ValueFrom};

/// Port of every worker's `/healthz`, `/readyz`, `/metrics` and `/stats`.
pub const WORKER_PORT: i32 = 9464;
/// Label naming the pipeline an object belongs to.
pub const LABEL_PIPELINE: &str = "monsoon.dev/pipeline";
/// Label marking checkpoint ConfigMaps.
pub const LABEL_CHECKPOINT: &str = "monsoon.dev/checkpoint";
/// Label of a checkpoint ConfigMap giving the shard count it was written for.
pub const LABEL_SHARD_COUNT: &str = "monsoon.dev/shard-count";
/// Environment variable carrying the pipeline (JSON) to the worker.
pub const ENV_PIPELINE: &str = "MONSOON_PIPELINE";
/// Environment variable carrying the shard count to the worker.
pub const ENV_SHARD_COUNT: &str = "MONSOON_SHARD_COUNT";

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
}

/// Name of the workers' StatefulSet, Service, ServiceAccount, Role and RoleBinding.
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
        ("app.kubernetes.io/managed-by".to_string(), "monsoon-operator".to_string()),
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

/// Where a credential or CA bundle reaches the worker.
struct Wiring {
    env: Vec<EnvVar>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
}

/// Where a `*From` reaches the worker as a file: its volume, directory and file name.
struct FileSlot {
    volume: &'static str,
    dir: &'static str,
    name: &'static str,
}

/// CA bundles and client certificates are files (the MongoDB driver reads paths).
const MONGODB_CA: FileSlot = FileSlot { volume: "ca-mongodb", dir: "/etc/monsoon/ca/mongodb", name: "ca.pem" };
const ELASTICSEARCH_CA: FileSlot = FileSlot { volume: "ca-elasticsearch", dir: "/etc/monsoon/ca/elasticsearch", name: "ca.pem" };
const MONGODB_CERT: FileSlot = FileSlot { volume: "tls-mongodb-crt", dir: "/etc/monsoon/tls/mongodb/crt", name: "tls.crt" };
const MONGODB_KEY: FileSlot = FileSlot { volume: "tls-mongodb-key", dir: "/etc/monsoon/tls/mongodb/key", name: "tls.key" };
const ELASTICSEARCH_CERT: FileSlot = FileSlot { volume: "tls-elasticsearch-crt", dir: "/etc/monsoon/tls/elasticsearch/crt", name: "tls.crt" };
const ELASTICSEARCH_KEY: FileSlot = FileSlot { volume: "tls-elasticsearch-key", dir: "/etc/monsoon/tls/elasticsearch/key", name: "tls.key" };

/// Rewrite one `*From` of the worker's copy of the spec to an env var or (with `file`) a
/// mounted file, and add what the pod needs to fill it.
fn wire(from: &mut Option<ValueFrom>, env_name: &str, file: Option<FileSlot>, w: &mut Wiring) {
    let Some(v) = from.as_mut() else { return };
    if let Some(slot) = file {
        mount(v, slot.volume.to_string(), slot.dir, slot.name, w);
        return;
    }
    if let Some(r) = v.secret_key_ref.take() {
        w.env.push(EnvVar {
            name: env_name.to_string(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: r.name,
                    key: r.key,
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
        *v = ValueFrom {
            env: Some(env_name.to_string()),
            ..ValueFrom::default()
        };
    }
}

/// Scripts from Secrets or ConfigMaps become files mounted at
/// `/etc/monsoon/scripts/<list>-<i>/script.js` (read when the worker starts).
fn wire_scripts(list: &str, scripts: &mut [monsoon_api::ScriptSpec], w: &mut Wiring) {
    for (i, s) in scripts.iter_mut().enumerate() {
        if let Some(v) = s.script_from.as_mut() {
            let dir = format!("/etc/monsoon/scripts/{list}-{i}");
            mount(v, format!("script-{list}-{i}"), &dir, "script.js", w);
        }
    }
}

/// Mount the Secret or ConfigMap key `v` names as `dir/name` and point `v` at that file.
fn mount(v: &mut ValueFrom, volume: String, dir: &str, name: &str, w: &mut Wiring) {
    let (secret, config_map) = (v.secret_key_ref.clone(), v.config_map_key_ref.clone());
    let item = |key: String| {
        Some(vec![KeyToPath {
            key,
            path: name.into(),
            mode: None,
        }])
    };
    let source = match (secret, config_map) {
        (Some(r), _) => Some(Volume {
            name: volume.clone(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(r.name),
                items: item(r.key),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        }),
        (None, Some(r)) => Some(Volume {
            name: volume.clone(),
            config_map: Some(ConfigMapVolumeSource {
                name: r.name,
                items: item(r.key),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }),
        (None, None) => None,
    };
    if let Some(source) = source {
        w.volumes.push(source);
        w.mounts.push(VolumeMount {
            name: volume,
            mount_path: dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        *v = ValueFrom {
            file: Some(format!("{dir}/{name}")),
            ..ValueFrom::default()
        };
    }
}

/// The pipeline as the worker reads it (`MONSOON_PIPELINE`): credentials turned into env
/// vars and files, cluster-only fields dropped so they do not roll the pods needlessly.
fn worker_pipeline(p: &SyncPipeline, w: &mut Wiring) -> serde_json::Value {
    let mut spec: SyncPipelineSpec = p.spec.clone();
    wire(&mut spec.mongodb.uri_from, "MONSOON_MONGODB_URI", None, w);
    wire(&mut spec.mongodb.ca_from, "", Some(MONGODB_CA), w);
    wire(&mut spec.mongodb.client_cert_from, "", Some(MONGODB_CERT), w);
    wire(&mut spec.mongodb.client_key_from, "", Some(MONGODB_KEY), w);
    wire(&mut spec.elasticsearch.password_from, "MONSOON_ES_PASSWORD", None, w);
    wire(&mut spec.elasticsearch.api_key_from, "MONSOON_ES_API_KEY", None, w);
    wire(&mut spec.elasticsearch.ca_from, "", Some(ELASTICSEARCH_CA), w);
    wire(&mut spec.elasticsearch.client_cert_from, "", Some(ELASTICSEARCH_CERT), w);
    wire(&mut spec.elasticsearch.client_key_from, "", Some(ELASTICSEARCH_KEY), w);
    wire_scripts("scripts", &mut spec.scripts, w);
    wire_scripts("filters", &mut spec.filters, w);
    spec.paused = false;
    spec.workers = 1;
    spec.resources = None;
    serde_json::json!({
        "apiVersion": monsoon_api::API_VERSION,
        "kind": monsoon_api::KIND,
        "metadata": {"name": p.name_any(), "namespace": p.namespace()},
        "spec": spec,
    })
}

fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("100m".into())),
            ("memory".to_string(), Quantity("64Mi".into())),
        ])),
        limits: Some(BTreeMap::from([("memory".to_string(), Quantity("256Mi".into()))])),
        ..ResourceRequirements::default()
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

/// Build the workload of `p` for `shards` shards; `replicas` is 0 while paused or while
/// shards are being re-laid out, `shards` otherwise.
pub fn build(p: &SyncPipeline, shards: u32, replicas: u32, settings: &WorkerSettings) -> Workload {
    let name = p.name_any();
    let worker = worker_name(&name);
    let mut wiring = Wiring {
        env: Vec::new(),
        volumes: Vec::new(),
        mounts: Vec::new(),
    };
    let pipeline_json = worker_pipeline(p, &mut wiring);

    let service_account = ServiceAccount {
        metadata: meta(p, worker.clone()),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    };
    let role = Role {
        metadata: meta(p, worker.clone()),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some((0..shards).map(|i| checkpoint_name(&name, i, shards)).collect()),
            verbs: vec!["get".into(), "update".into(), "patch".into()],
            ..PolicyRule::default()
        }]),
    };
    let role_binding = RoleBinding {
        metadata: meta(p, worker.clone()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: worker.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: worker.clone(),
            namespace: p.namespace(),
            ..Subject::default()
        }]),
    };
    let service = Service {
        metadata: meta(p, worker.clone()),
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
    };

    let mut env = vec![
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        EnvVar {
            name: ENV_PIPELINE.into(),
            value: Some(pipeline_json.to_string()),
            ..EnvVar::default()
        },
        EnvVar {
            name: ENV_SHARD_COUNT.into(),
            value: Some(shards.to_string()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "MONSOON_LOG_FORMAT".into(),
            value: Some(settings.log_format.clone()),
            ..EnvVar::default()
        },
    ];
    env.extend(wiring.env);
    let mut mounts = vec![VolumeMount {
        name: "tmp".into(),
        mount_path: "/tmp".into(),
        ..VolumeMount::default()
    }];
    mounts.extend(wiring.mounts);
    let mut volumes = vec![Volume {
        name: "tmp".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("16Mi".into())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    volumes.extend(wiring.volumes);

    let container = Container {
        name: "worker".into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(vec![
            "worker".into(),
            format!("--http-addr=0.0.0.0:{WORKER_PORT}"),
            format!("--shutdown-grace-seconds={}", settings.shutdown_grace_seconds),
        ]),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: WORKER_PORT,
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..probe("/healthz", 10, 3)
        }),
        readiness_probe: Some(probe("/readyz", 5, 2)),
        resources: Some(p.spec.resources.clone().unwrap_or_else(default_resources)),
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pod_labels = labels(&name);
    let stateful_set = StatefulSet {
        metadata: meta(p, worker.clone()),
        spec: Some(StatefulSetSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
            service_name: Some(worker.clone()),
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
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        ("prometheus.io/scrape".to_string(), "true".to_string()),
                        ("prometheus.io/port".to_string(), WORKER_PORT.to_string()),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(worker),
                    // Time to deliver what was read and write the final checkpoint.
                    termination_grace_period_seconds: Some(i64::from(settings.shutdown_grace_seconds) + 10),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        run_as_group: Some(65532),
                        fs_group: Some(65532),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..StatefulSetSpec::default()
        }),
        status: None,
    };
    Workload {
        service_account,
        role,
        role_binding,
        service,
        stateful_set,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use monsoon_api::{SecretKeyRef, SyncPipelineSpec};

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
        assert!(monsoon_api::validate(&back).is_ok());
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
}
