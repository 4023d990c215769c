//! The worker pod template: one container running `monsoon worker`, the pipeline it reads
//! (`MONSOON_PIPELINE`, credentials rewired to env vars and mounted files), probes, resources
//! and the locked-down security context, with the scheduling and metadata of the pipeline's
//! `workerTemplate` around it.
//!
//! Credentials never enter the pod spec: each `secretKeyRef` becomes an environment
//! variable filled by the kubelet from the Secret, and each CA bundle a mounted file; the
//! pipeline the worker reads names those variables and files instead.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use monsoon_api::{SyncPipeline, SyncPipelineSpec, ValueFrom};

use super::{
    labels, selector_labels, worker_name, Inputs, WorkerSettings, ANNOTATION_REFERENCES, ANNOTATION_RESTART,
    ANNOTATION_RESNAPSHOT, ENV_PIPELINE, ENV_RESNAPSHOT, ENV_SHARD_COUNT, WORKER_PORT,
};

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
fn worker_pipeline(p: &SyncPipeline, script_threads: Option<u32>, w: &mut Wiring) -> serde_json::Value {
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
    if let Some(aws) = spec.elasticsearch.aws.as_mut() {
        // Not the AWS_* names: those would also feed the default chain of other AWS clients.
        wire(&mut aws.access_key_id_from, "MONSOON_AWS_ACCESS_KEY_ID", None, w);
        wire(&mut aws.secret_access_key_from, "MONSOON_AWS_SECRET_ACCESS_KEY", None, w);
        wire(&mut aws.session_token_from, "MONSOON_AWS_SESSION_TOKEN", None, w);
    }
    wire_scripts("scripts", &mut spec.scripts, w);
    wire_scripts("filters", &mut spec.filters, w);
    spec.paused = false;
    spec.workers = 1;
    spec.resources = None;
    spec.worker_template = None;
    if let Some(threads) = script_threads {
        spec.script_limits.get_or_insert_with(monsoon_api::ScriptLimits::default).workers = threads;
    }
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


/// Memory the worker needs besides its script heaps: the engine's buffers (bounded queues and
/// bulk bodies of the default batch) and the binary's pages, as measured with `make bench`
/// (peak RSS 16–17 MiB streaming) with room for the snapshot's larger batches.
const ENGINE_MEMORY_MIB: u64 = 64;

/// The worker container's resources: the pipeline's, or the defaults.
pub(super) fn resources(p: &SyncPipeline) -> ResourceRequirements {
    p.spec.resources.clone().unwrap_or_else(default_resources)
}

/// CPU cores in a Kubernetes quantity (`500m`, `2`, `1.5`), or `None` when unreadable.
pub fn cpu_cores(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().ok().map(|m| m / 1000.0),
        None => s.parse::<f64>().ok(),
    }
}

/// Bytes in a Kubernetes memory quantity (`256Mi`, `1Gi`, `512M`, `1e9`, `134217728`).
pub fn memory_bytes(q: &Quantity) -> Option<u64> {
    let s = q.0.trim();
    let units: [(&str, f64); 12] = [
        ("Ki", 1024.0), ("Mi", 1024f64.powi(2)), ("Gi", 1024f64.powi(3)), ("Ti", 1024f64.powi(4)), ("Pi", 1024f64.powi(5)), ("Ei", 1024f64.powi(6)),
        ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12), ("P", 1e15), ("E", 1e18),
    ];
    for (suffix, factor) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| (n * factor) as u64);
        }
    }
    s.parse::<f64>().ok().map(|n| n as u64)
}

/// Script threads for the worker of `p`, sized from its container's resources: `None` when the
/// pipeline has no scripts or filters (nothing to size). With `scriptLimits.workers: 0` (the
/// default, "one per core") the threads follow the CPU limit (or request; a core visible on
/// the node is not one the pod may use) and shrink to what fits the memory limit; an explicit
/// count is kept.
///
/// # Errors
/// A message for the `ResourcesDoNotFit` condition when even the threads asked for (or one)
/// cannot fit: each takes `scriptLimits.memoryMib` of heap besides the engine's own memory.
pub fn size_scripts(p: &SyncPipeline) -> Result<Option<u32>, String> {
    if p.spec.scripts.is_empty() && p.spec.filters.is_empty() {
        return Ok(None);
    }
    let limits = p.spec.script_limits.clone().unwrap_or_default();
    let resources = resources(p);
    let cpu = |m: &Option<BTreeMap<String, Quantity>>| m.as_ref().and_then(|m| m.get("cpu")).and_then(cpu_cores);
    let memory = resources.limits.as_ref().and_then(|m| m.get("memory")).and_then(memory_bytes);
    let cores = cpu(&resources.limits).or_else(|| cpu(&resources.requests)).unwrap_or(1.0);
    let by_cpu = (cores.ceil() as u32).max(1);
    let heap = u64::from(limits.memory_mib) * 1024 * 1024;
    let engine = ENGINE_MEMORY_MIB * 1024 * 1024;
    let fits = |threads: u32| memory.is_none_or(|m| engine + u64::from(threads) * heap <= m);
    let mib = |b: u64| b / (1024 * 1024);
    if limits.workers > 0 {
        if !fits(limits.workers) {
            return Err(format!(
                "scriptLimits: {} script threads × {} MiB of heap + {ENGINE_MEMORY_MIB} MiB for the engine exceed the worker's memory limit of {} MiB; lower scriptLimits.workers or memoryMib, or raise resources.limits.memory",
                limits.workers, limits.memory_mib, mib(memory.unwrap_or(0))
            ));
        }
        return Ok(Some(limits.workers));
    }
    let threads = (1..=by_cpu).rev().find(|t| fits(*t));
    threads.map(Some).ok_or_else(|| {
        format!(
            "scriptLimits: one script thread of {} MiB of heap + {ENGINE_MEMORY_MIB} MiB for the engine exceeds the worker's memory limit of {} MiB; lower scriptLimits.memoryMib or raise resources.limits.memory",
            limits.memory_mib, mib(memory.unwrap_or(0))
        )
    })
}

/// The worker pods' template.
pub(super) fn template(p: &SyncPipeline, inputs: &Inputs, settings: &WorkerSettings, script_threads: Option<u32>) -> PodTemplateSpec {
    let name = p.name_any();
    let extra = p.spec.worker_template.clone().unwrap_or_default();
    let mut wiring = Wiring {
        env: Vec::new(),
        volumes: Vec::new(),
        mounts: Vec::new(),
    };
    let pipeline_json = worker_pipeline(p, script_threads, &mut wiring);

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
            value: Some(inputs.shards.to_string()),
            ..EnvVar::default()
        },
        EnvVar {
            name: "MONSOON_LOG_FORMAT".into(),
            value: Some(settings.log_format.clone()),
            ..EnvVar::default()
        },
    ];
    if let Some(token) = p.annotations().get(ANNOTATION_RESNAPSHOT) {
        env.push(EnvVar {
            name: ENV_RESNAPSHOT.into(),
            value: Some(token.clone()),
            ..EnvVar::default()
        });
    }
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
        resources: Some(resources(p)),
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

    // The template's own labels and annotations are set last: they cannot be overridden.
    let mut pod_labels = extra.labels.clone();
    pod_labels.extend(labels(&name));
    let mut annotations = extra.annotations.clone();
    annotations.insert("prometheus.io/scrape".to_string(), "true".to_string());
    annotations.insert("prometheus.io/port".to_string(), WORKER_PORT.to_string());
    if let Some(value) = p.annotations().get(ANNOTATION_RESTART) {
        annotations.insert(ANNOTATION_RESTART.to_string(), value.clone());
    }
    if let Some(version) = &inputs.references_version {
        annotations.insert(ANNOTATION_REFERENCES.to_string(), references_hash(version));
    }
    let spread = extra
        .topology_spread_constraints
        .into_iter()
        .map(|mut c| {
            if c.label_selector.is_none() {
                c.label_selector = Some(LabelSelector {
                    match_labels: Some(selector_labels(&name)),
                    match_expressions: None,
                });
            }
            c
        })
        .collect::<Vec<_>>();
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            service_account_name: Some(worker_name(&name)),
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
            image_pull_secrets: (!extra.image_pull_secrets.is_empty()).then_some(extra.image_pull_secrets),
            node_selector: (!extra.node_selector.is_empty()).then_some(extra.node_selector),
            tolerations: (!extra.tolerations.is_empty()).then_some(extra.tolerations),
            affinity: extra.affinity,
            topology_spread_constraints: (!spread.is_empty()).then_some(spread),
            priority_class_name: extra.priority_class_name,
            ..PodSpec::default()
        }),
    }
}

/// A short digest of the referenced objects' versions for the pod template annotation.
pub(super) fn references_hash(version: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(version.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}
