//! Spec and status types of `SyncPipeline` (group `monsoon.dev`, version `v1alpha1`).
//!
//! Every field is camelCase in YAML. Defaults are applied by serde (`#[serde(default)]`) so a
//! manifest only names what differs from them; the same defaults appear in the CRD schema.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Keeps Elasticsearch/OpenSearch indexes in sync with MongoDB collections: an initial snapshot
/// of the existing documents, then every change from MongoDB change streams.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "monsoon.dev",
    version = "v1alpha1",
    kind = "SyncPipeline",
    namespaced,
    status = "SyncPipelineStatus",
    shortname = "sp",
    derive = "Default",
    category = "all",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.ready","description":"Workers ready / workers wanted"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Lag","type":"string","jsonPath":".status.lag","description":"Largest replication lag of any shard"}"#,
    printcolumn = r#"{"name":"Synced","type":"integer","jsonPath":".status.documentsSynced","description":"Documents indexed or deleted so far"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "(has(self.namespaces) && size(self.namespaces) > 0) || has(self.namespaceRegex)", "message": "set `namespaces` (at least one) or `namespaceRegex`"}
]))]
pub struct SyncPipelineSpec {
    /// Where the data comes from.
    pub mongodb: MongoSource,
    /// Where the data goes.
    pub elasticsearch: ElasticsearchSink,
    /// MongoDB namespaces to sync: `db.collection`, or `db.*` for every collection of a
    /// database. Each namespace is indexed into the index of the same name, lower-cased,
    /// unless `indexes` names another. At least one namespace or a `namespaceRegex` is needed.
    #[serde(default)]
    #[schemars(length(max = 1000), inner(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.(\*|[^$*]+)$"#)))]
    pub namespaces: Vec<String>,
    /// Also sync every namespace (`db.collection`) this regular expression matches, in any
    /// database but `admin`, `local` and `config` (Monstache's `namespace-regex`; RE2 syntax,
    /// unanchored: `^shop\.` for every collection of `shop`, `.*` for every database). System
    /// collections and GridFS chunks (`*.chunks`) are left out unless named in `namespaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub namespace_regex: Option<String>,
    /// Leave out every namespace this regular expression matches (Monstache's
    /// `namespace-exclude-regex`), whichever way it was selected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub exclude_namespace_regex: Option<String>,
    /// Namespaces to leave out even when `namespaces` matches them (`db.collection` or `db.*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.(\*|[^$*]+)$"#)))]
    pub exclude_namespaces: Vec<String>,
    /// Target index per namespace, overriding the default (the namespace, lower-cased).
    /// Example: `{"shop.orders": "orders"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("additionalProperties" = {"type": "string", "pattern": r#"^[^-_+A-Z\\/*?"<>| ,#:][^A-Z\\/*?"<>| ,#:]{0,254}$"#}))]
    pub indexes: BTreeMap<String, String>,
    /// How documents of a namespace are shaped and where they go, beyond the defaults
    /// (Monstache's `[[mapping]]` and more): index (static or from document fields), `_id`
    /// and routing from fields, an ingest pipeline, fields to include, exclude or rename, a
    /// keep-filter, soft deletes and partial updates. The first entry whose `namespace`
    /// matches applies; entries for namespaces the pipeline does not sync are refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub mappings: Vec<Mapping>,
    /// JavaScript mapping scripts, as Monstache's `[[script]]`: `module.exports =
    /// function(doc, ns, updateDesc)` returning the document to index (an object), `true` to
    /// index it as it is, or a falsy value to remove it from the index. A script without
    /// `namespace` runs for every namespace, before the namespace's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub scripts: Vec<ScriptSpec>,
    /// JavaScript filters, as Monstache's `[[filter]]`: same signature; a falsy result ignores
    /// the change (nothing is written or deleted). Inserts, updates and replaces only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 200))]
    pub filters: Vec<ScriptSpec>,
    /// Bounds on each script call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_limits: Option<ScriptLimits>,
    /// Index the documents that already exist before following changes. When false, only
    /// changes made after the pipeline first starts are synced.
    #[serde(default = "default_true")]
    pub snapshot: bool,
    /// Snapshot only these namespaces (`db.collection` or `db.*`, each synced by the
    /// pipeline); the others are followed from the pipeline's start without reading what they
    /// already hold (Monstache snapshots only its `direct-read-namespaces`). Empty (the
    /// default): every synced namespace is snapshotted when `snapshot` is true. After lost
    /// history with `onHistoryLost: Resnapshot`, every namespace is read again regardless.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.(\*|[^$*]+)$"#)))]
    pub snapshot_namespaces: Vec<String>,
    /// Read big collections' snapshots in `_id` ranges at once (Monstache's
    /// `direct-read-split-max`). Unset: each collection is read in one `_id`-ordered pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_split: Option<SnapshotSplit>,
    /// Indexes several namespaces may write (by `indexes` or `mappings[].index`), as
    /// Monstache's view replication maps a collection and its view to one index. Without this,
    /// two namespaces writing one index are refused: dropping one collection deletes its index.
    /// A namespace writing a shared index keeps a location record per document, and its drop
    /// (or a drop found after lost history) deletes only its own documents from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub shared_indexes: Vec<String>,
    /// Index GridFS files with their content (Monstache's `index-files`, `file-namespaces`,
    /// `max-file-size`): each file's document of a files collection gets its raw content,
    /// base64, in a `file` field, through an ingest pipeline that extracts the text. Scripts
    /// and filters of a files collection see the file's document without its content, which
    /// is added to the write they decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<FilesSpec>,
    /// Where the change stream starts when the pipeline has no checkpoint yet (ignored once
    /// it has one): `timestamp` (seconds since the Unix epoch, Monstache's
    /// `resume-from-timestamp`) or `oldest: true` (the oldest entry MongoDB's oplog still
    /// holds, Monstache's `replay`; replica sets only). Default: the moment the pipeline first
    /// starts. A start the oplog no longer holds is lost history (see `onHistoryLost`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_start: Option<StreamStart>,
    /// Keep every version of some namespaces' documents (Monstache's time machines): each
    /// insert, update and replace of these namespaces is also appended to a dated log index,
    /// `<indexPrefix>.<index>.<date>` (`log.shop.orders.2026-12-06`), routed by the MongoDB
    /// `_id`, with `_source_id` (that `_id`), `oplog_ts` and `oplog_date` (the change's time) in
    /// the entry. Deletes are not logged (as in Monstache). Log indexes are never deleted by
    /// monsoon (not by a drop, `onDrop` or the re-snapshot sweep).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_machine: Option<TimeMachine>,
    /// Keep every version of some namespaces' documents in the documents themselves
    /// (Monstache's `enable-patches`, `patch-namespaces`, `merge-patch-attribute`): each insert,
    /// update and replace appends an RFC 7396 merge patch to the document's history (the
    /// `attribute` field), so any version can be rebuilt from `{}`. Each change is applied
    /// exactly, from its update description, so every version is there once, across restarts
    /// and replays. See the README's "Merge patches".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_patches: Option<crate::patches::MergePatches>,
    /// Re-sync documents of another namespace when a document changes (Monstache's
    /// `[[relate]]`, and with a view as `withNamespace`, its view replication): a change in
    /// `namespace` finds the documents of `withNamespace` whose `matchField` equals the changed
    /// document's `srcField`, reads them (through the view, for a view) and writes them as
    /// changes of `withNamespace`, in order with the change, before its position is
    /// checkpointed. Change-stream changes only (a snapshot reads each namespace itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100))]
    pub relate: Vec<Relate>,
    /// Batching and concurrency of bulk requests.
    #[serde(default)]
    pub batch: BatchSpec,
    /// What to do when the stored resume point has fallen off the MongoDB oplog (error 286,
    /// ChangeStreamHistoryLost): `Fail` stops with a clear error and a status condition;
    /// `Resnapshot` reads every collection again and then deletes the indexed documents the
    /// new snapshot did not see (deleted during the gap), then streams from the new start.
    #[serde(default)]
    pub on_history_lost: HistoryLostPolicy,
    /// What to do with the index when its collection (or database) is dropped in MongoDB:
    /// `DeleteIndex` deletes the index, `Keep` leaves it untouched.
    #[serde(default)]
    pub on_drop: DropPolicy,
    /// Where documents that Elasticsearch refuses (mapping conflicts, oversize documents) are
    /// recorded, with the reason, instead of blocking the stream.
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    /// Number of worker pods (shards), 1–64. Every document belongs to exactly one shard (by a
    /// stable hash of its `_id`); each shard has its own checkpoint and lease. Each worker
    /// reads the whole change stream and keeps its share, so more workers divide the
    /// conversion and indexing work, not the MongoDB reads. Changing it stops every worker,
    /// merges their checkpoints and starts the new shards from the earliest position any old
    /// shard had reached: nothing is skipped. Ignored by `monsoon run`.
    #[serde(default = "default_workers")]
    #[schemars(range(min = 1, max = 64))]
    pub workers: u32,
    /// Stop every worker and keep their checkpoints; set back to `false` to resume where they
    /// stopped. Ignored by `monsoon run`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub paused: bool,
    /// CPU and memory of each worker container. Defaults: requests 100m CPU / 64Mi, limit
    /// 256Mi. Ignored by `monsoon run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,
    /// What deleting the pipeline does with its checkpoints (the synced indexes are always
    /// kept): `Keep` leaves the checkpoint ConfigMaps, so a pipeline created again under the
    /// same name resumes where this one stopped; `Delete` removes them.
    #[serde(default)]
    pub checkpoints_on_delete: CheckpointRetention,
    /// Where and how the worker pods run, beyond `resources`: scheduling (node selector,
    /// tolerations, affinity, topology spread, priority class), image pull Secrets, extra pod
    /// labels and annotations, and annotations on the workers' ServiceAccount (IRSA, GKE
    /// workload identity). Ignored by `monsoon run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_template: Option<WorkerTemplate>,
}

/// The worker pods' template, as Strimzi and ECK offer it. Every field is optional; the
/// operator's own labels, selectors, security context and containers always win.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerTemplate {
    /// Extra labels on the worker pods. The operator's own labels (`app.kubernetes.io/*`,
    /// `monsoon.dev/*`) cannot be overridden.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra annotations on the worker pods (for example a service mesh's).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Annotations on the workers' ServiceAccount, e.g.
    /// `eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/monsoon` (IRSA) or
    /// `iam.gke.io/gcp-service-account: monsoon@project.iam.gserviceaccount.com`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_account_annotations: BTreeMap<String, String>,
    /// Secrets for pulling the worker image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<k8s_openapi::api::core::v1::LocalObjectReference>,
    /// Node labels a worker's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the workers tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    /// Node and pod affinity of the workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    /// How the workers spread over zones or nodes. A constraint without `labelSelector`
    /// selects this pipeline's workers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint>,
    /// PriorityClass of the worker pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,
}

/// One JavaScript script: inline (`script`) or from a file or ConfigMap (`scriptFrom`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.script) != has(self.scriptFrom)", "message": "set exactly one of `script` and `scriptFrom`"}
]))]
pub struct ScriptSpec {
    /// `db.collection` the script applies to; without it, every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.[^$*]+$"#))]
    pub namespace: Option<String>,
    /// The JavaScript source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 262144))]
    pub script: Option<String>,
    /// The source from a file (`monsoon run`) or, in a cluster, a ConfigMap key
    /// (`configMapKeyRef`), mounted into the workers (read when they start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script_from: Option<ValueFrom>,
}

/// Where a new pipeline's change stream starts. Exactly one field is set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.timestamp) != (has(self.oldest) && self.oldest)", "message": "set exactly one of `timestamp` and `oldest: true`"}
]))]
pub struct StreamStart {
    /// Start at this cluster time, in seconds since the Unix epoch (changes at or after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timestamp: Option<u32>,
    /// Start at the oldest entry of the oplog (read from `local.oplog.rs`, so a replica set,
    /// not a sharded cluster's router).
    #[serde(default, skip_serializing_if = "is_false")]
    pub oldest: bool,
}

/// One relation (`spec.relate[]`, Monstache's `[[relate]]`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Relate {
    /// The namespace whose changes trigger the re-sync (`db.collection`, synced by the
    /// pipeline so its changes are followed).
    #[schemars(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.[^$*]+$"#))]
    pub namespace: String,
    /// The namespace whose documents are re-synced (`db.collection`, or a view: read through
    /// it). Its documents go where its own changes would (its index, mapping and scripts).
    #[schemars(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.[^$*]+$"#))]
    pub with_namespace: String,
    /// The changed document's field whose value is looked for (dotted path). Default `_id`.
    /// Another field follows deletes (and the old value of a changed field) through MongoDB
    /// 6.0+ pre-images: enable `changeStreamPreAndPostImages` on the collection.
    #[serde(default = "default_relate_field")]
    #[schemars(length(min = 1, max = 1024))]
    pub src_field: String,
    /// The field of `withNamespace`'s documents that must equal it (dotted path). Default
    /// `_id`.
    #[serde(default = "default_relate_field")]
    #[schemars(length(min = 1, max = 1024))]
    pub match_field: String,
    /// Convert the value before matching: `objectId` (from its hex text), `string`, `int` or
    /// `long` (64-bit integer), `decimal` (128-bit decimal). Unset: matched as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_field_type: Option<MatchFieldType>,
    /// Also write the changed document itself (as any change of `namespace`). When no
    /// relation of a namespace keeps its source, its changes only trigger re-syncs (as in
    /// Monstache, whose `keep-src` defaults to false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub keep_src: bool,
    /// How many relations deep a change re-syncs (a re-synced document whose namespace has
    /// relations of its own triggers them in turn): 1 = this relation only. 0 (the default):
    /// no limit; a document is never re-synced twice for one change, so cycles end.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(max = 100))]
    pub max_depth: u32,
    /// Match `matchField` as a dotted path (`{"a.b": value}`: any document whose `a.b` equals
    /// the value). False (Monstache's default): a nested selector (`{"a": {"b": value}}`,
    /// which matches only when `a` is exactly that sub-document). No difference for a
    /// top-level field.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dot_notation: bool,
}

fn default_relate_field() -> String {
    "_id".to_string()
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How a relation converts the value it matches (`spec.relate[].matchFieldType`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MatchFieldType {
    /// An ObjectId, from its 24-digit hex text (or as it is).
    ObjectId,
    /// Text (an ObjectId as its hex digits).
    String,
    /// A 64-bit integer.
    Int,
    /// A 64-bit integer.
    Long,
    /// A 128-bit decimal.
    Decimal,
}

/// Time machines: a log of every version of some namespaces' documents, in dated indexes.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeMachine {
    /// Namespaces whose changes are logged (`db.collection` or `db.*`, each synced by the
    /// pipeline; Monstache's `time-machine-namespaces`). Each update logs its own version when
    /// the collection keeps pre-images (`changeStreamPreAndPostImages`, MongoDB 6.0+),
    /// otherwise the document as looked up when the change is read.
    #[schemars(length(min = 1, max = 1000), inner(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.(\*|[^$*]+)$"#)))]
    pub namespaces: Vec<String>,
    /// First part of each log index's name (Monstache's `time-machine-index-prefix`):
    /// lower-case, without `\ / * ? " < > | , # :` or spaces.
    #[serde(default = "default_time_machine_prefix")]
    #[schemars(regex(pattern = r#"^[^-_+A-Z\\/*?"<>| ,#:][^A-Z\\/*?"<>| ,#:]{0,99}$"#))]
    pub index_prefix: String,
    /// Last part of each log index's name: the date of the change (its cluster time, UTC) in
    /// this format (Monstache's `time-machine-index-suffix`, which takes Go's layout
    /// `2006-01-02`): `%Y` year, `%y` two-digit year, `%m` month, `%d` day, `%j` day of the
    /// year, `%H` hour, `%%` a percent sign; other text is kept as written. `%Y-%m` makes
    /// monthly indexes.
    #[serde(default = "default_time_machine_suffix")]
    #[schemars(length(min = 1, max = 100))]
    pub index_suffix: String,
    /// Also log the documents the snapshot reads (Monstache's `time-machine-direct-reads`),
    /// dated at the snapshot's start.
    #[serde(default, skip_serializing_if = "is_false")]
    pub snapshot: bool,
}

fn default_time_machine_prefix() -> String {
    "log".to_string()
}

fn default_time_machine_suffix() -> String {
    "%Y-%m-%d".to_string()
}

impl Default for TimeMachine {
    fn default() -> Self {
        Self { namespaces: Vec::new(), index_prefix: default_time_machine_prefix(), index_suffix: default_time_machine_suffix(), snapshot: false }
    }
}

/// Bounds on each script call (all the scripts and filters that apply to one document).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScriptLimits {
    /// Longest time one call may run, lookups included, in milliseconds (1–60000); a call
    /// still running is interrupted and its document dead-lettered.
    #[serde(default = "default_script_timeout_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub timeout_ms: u64,
    /// Heap of each script worker's JavaScript runtime, in MiB (8–4096).
    #[serde(default = "default_script_memory_mib")]
    #[schemars(range(min = 8, max = 4096))]
    pub memory_mib: u32,
    /// Script worker threads; 0 (default) means one per core: with `monsoon run`, the
    /// machine's; in a cluster, the worker container's CPU limit (or request; one without
    /// either), fewer if their heaps would not fit its memory limit.
    #[serde(default)]
    #[schemars(range(max = 256))]
    pub workers: u32,
}

fn default_script_timeout_ms() -> u64 {
    1000
}

fn default_script_memory_mib() -> u32 {
    64
}

impl Default for ScriptLimits {
    fn default() -> Self {
        Self { timeout_ms: default_script_timeout_ms(), memory_mib: default_script_memory_mib(), workers: 0 }
    }
}

/// How the documents of one namespace (or `db.*`) are shaped and where they go. Every field
/// is optional. Field paths are dotted (`author.name`) and do not reach into arrays.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mapping {
    /// `db.collection`, or `db.*` for every collection of a database it syncs.
    #[schemars(regex(pattern = r#"^[^/\\. "$*<>:|?]{1,64}\.(\*|[^$*]+)$"#))]
    pub namespace: String,
    /// Target index. Text in braces is taken from the document: `orders-{region}` indexes a
    /// document with `region: "eu"` into `orders-eu` (values are lower-cased; a document
    /// without the field is dead-lettered). Without braces, a fixed name (like `spec.indexes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub index: Option<String>,
    /// Take the Elasticsearch `_id` from this field instead of `_id` (a document without it
    /// is dead-lettered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub id: Option<String>,
    /// Route each document by the value of this field (parent/child joins, shard locality). A
    /// document without the field is indexed without routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub routing: Option<String>,
    /// Name of an Elasticsearch ingest pipeline every document of the namespace goes through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub ingest_pipeline: Option<String>,
    /// Index only these fields (and their sub-fields), plus any renamed ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub include: Vec<String>,
    /// Leave these fields (and their sub-fields) out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub exclude: Vec<String>,
    /// Index a field under another name: `{"user.mail": "email"}` moves `user.mail` to a
    /// top-level `email`, replacing any field already there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rename: BTreeMap<String, String>,
    /// Sync only the documents matching this MongoDB query (`{"status": "published"}`,
    /// `{"score": {"$gte": 10}}`); changes to other documents are ignored, nothing is deleted
    /// (Monstache's `[[filter]]`). Operators: `$eq $ne $gt $gte $lt $lte $in $nin $exists
    /// $not $and $or $nor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("type" = "object", "x-kubernetes-preserve-unknown-fields" = true))]
    pub keep: Option<serde_json::Value>,
    /// Soft deletes: a document matching this MongoDB query (`{"deletedAt": {"$exists":
    /// true}}`) is removed from the index, and indexed again when it stops matching.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("type" = "object", "x-kubernetes-preserve-unknown-fields" = true))]
    pub delete_when: Option<serde_json::Value>,
    /// `Index` (default) replaces the whole indexed document at each change; `Update` merges
    /// the document into what is indexed (partial update with upsert, Monstache's
    /// `index-as-update`), keeping fields other writers added. Updates carry no version, so
    /// stale-write protection rests on monsoon's per-document ordering alone.
    #[serde(default)]
    pub write_mode: WriteMode,
    /// Add the change's time to each document (Monstache's `index-oplog-time`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oplog_time: Option<OplogTime>,
    /// MongoDB aggregation stages run by the server (Monstache's `[[pipeline]]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<Aggregation>,
}

/// Aggregation stages MongoDB runs for a namespace, on the snapshot reads and on the change
/// stream.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Aggregation {
    /// Stages for the snapshot reads, after monsoon's own resume `$match` and `_id` `$sort`:
    /// `$match $project $addFields $set $unset $lookup $graphLookup $redact` (they must keep
    /// `_id`). Example: `[{"$lookup": {"from": "users", "localField": "author", "foreignField":
    /// "_id", "as": "author"}}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "stage_list")]
    pub snapshot: Vec<serde_json::Value>,
    /// `$match` stages on the change events of this namespace (the document is under
    /// `fullDocument`, the changed fields under `updateDescription.updatedFields`): watch only
    /// some fields, or only some documents. Deletes, drops and renames always pass. Example:
    /// `[{"$match": {"$or": [{"updateDescription": {"$exists": false}},
    /// {"updateDescription.updatedFields.price": {"$exists": true}}]}}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "stage_list")]
    pub change_stream: Vec<serde_json::Value>,
}

/// A list of aggregation stages: objects of any shape (checked by validation).
fn stage_list(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "maxItems": 100,
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
    })
}

/// GridFS files indexed with their content (`spec.files`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FilesSpec {
    /// The files collections whose files are indexed with their content: `db.fs.files`, or
    /// `db.<bucket>.files` for a bucket of another name. Each must be synced.
    #[schemars(length(min = 1, max = 100))]
    pub namespaces: Vec<String>,
    /// Files larger than this many bytes are indexed without their content (counted in
    /// `monsoon_files_too_large_total`). At most 100 MiB, Elasticsearch's default request limit.
    #[serde(default = "default_max_file_size")]
    #[schemars(range(min = 1, max = 104_857_600))]
    pub max_file_size: u64,
    /// The ingest pipeline the files' documents go through, unless a script
    /// (`_meta_monstache.pipeline`) or mapping (`ingestPipeline`) names another, which then
    /// gets `file` and must extract the text itself.
    #[serde(default = "default_file_pipeline")]
    #[schemars(length(min = 1, max = 255))]
    pub pipeline: String,
    /// Create (or update) `pipeline` at start as an `attachment` processor on `file`, which
    /// needs Elasticsearch 8.4+ or the `ingest-attachment` plugin (OpenSearch, older
    /// Elasticsearch). `false`: the pipeline is yours and must exist.
    #[serde(default = "default_true")]
    pub create_pipeline: bool,
}

fn default_max_file_size() -> u64 {
    16 << 20
}

fn default_file_pipeline() -> String {
    "attachment".into()
}

/// How a big collection's snapshot is split (`spec.snapshotSplit`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSplit {
    /// `_id` ranges read at once, each resumable on its own after a crash.
    #[schemars(range(min = 2, max = 64))]
    pub ranges: u32,
    /// Split only collections estimated to hold at least this many documents.
    #[serde(default = "default_split_min_documents")]
    #[schemars(range(min = 1))]
    pub min_documents: u64,
}

fn default_split_min_documents() -> u64 {
    100_000
}

/// Which change streams a pipeline follows (`spec.mongodb.streamScope`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum StreamScope {
    /// One stream for the pipeline: database-level or deployment-level.
    #[default]
    Auto,
    /// One stream per synced collection.
    Collection,
}

/// How a document is written.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WriteMode {
    /// Replace the indexed document (external versions: stale writes lose).
    #[default]
    Index,
    /// Merge into the indexed document, creating it when missing.
    Update,
}

/// Fields receiving the time of the change that produced each document version.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OplogTime {
    /// Field receiving the cluster time as `{"T": seconds, "I": increment}`.
    #[serde(default = "default_oplog_ts_field")]
    #[schemars(length(min = 1))]
    pub ts_field: String,
    /// Field receiving the time as text `yyyy/MM/dd HH:mm:ss` (UTC).
    #[serde(default = "default_oplog_date_field")]
    #[schemars(length(min = 1))]
    pub date_field: String,
}

fn default_oplog_ts_field() -> String {
    "oplog_ts".to_string()
}

fn default_oplog_date_field() -> String {
    "oplog_date".to_string()
}

impl Default for OplogTime {
    fn default() -> Self {
        Self { ts_field: default_oplog_ts_field(), date_field: default_oplog_date_field() }
    }
}

fn default_workers() -> u32 {
    1
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What happens to checkpoints when their pipeline is deleted.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CheckpointRetention {
    /// Keep the checkpoint ConfigMaps.
    #[default]
    Keep,
    /// Delete the checkpoint ConfigMaps after the workers have stopped.
    Delete,
}

fn default_true() -> bool {
    true
}

/// A MongoDB deployment: replica set or sharded cluster (4.0 or later).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.uri) != has(self.uriFrom)", "message": "set exactly one of `uri` and `uriFrom`"},
    {"rule": "!has(self.uri) || self.uri.matches('^mongodb(\\\\+srv)?://')", "fieldPath": ".uri", "reason": "FieldValueInvalid", "message": "`uri` must start with `mongodb://` or `mongodb+srv://`"},
    {"rule": "!has(self.uri) || !self.uri.matches('^mongodb(\\\\+srv)?://[^/?@]*:[^/?]*@')", "fieldPath": ".uri", "reason": "FieldValueInvalid", "message": "`uri` holds a password (the value is not repeated here); move the whole connection string to a Secret and reference it with `uriFrom.secretKeyRef`"},
    {"rule": "!has(self.uriFrom) || !has(self.uriFrom.configMapKeyRef)", "message": "`uriFrom.configMapKeyRef` is only for CA bundles; keep the connection string in a Secret (`secretKeyRef`)"},
    {"rule": "has(self.clientCertFrom) == has(self.clientKeyFrom)", "message": "`clientCertFrom` and `clientKeyFrom` go together"},
    {"rule": "!has(self.clientKeyFrom) || !has(self.clientKeyFrom.configMapKeyRef)", "message": "`clientKeyFrom.configMapKeyRef` is only for CA bundles; keep the private key in a Secret (`secretKeyRef`)"}
]))]
pub struct MongoSource {
    /// Connection string without credentials, e.g.
    /// `mongodb://db-0.db:27017,db-1.db:27017/?replicaSet=rs0`. Use `uriFrom` when the string
    /// holds a user name and password.
    ///
    /// The CRD refuses a string with a password through CEL rules (`x-kubernetes-validations`)
    /// whose messages never repeat the value, so the password does not end up in `kubectl`
    /// output, CI logs or GitOps events (a schema `pattern` would echo it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub uri: Option<String>,
    /// Read the whole connection string (credentials included) from an environment variable,
    /// a file or a Secret. Exactly one of `uri` and `uriFrom` must be set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_from: Option<ValueFrom>,
    /// PEM bundle of certificate authorities to trust for TLS connections to MongoDB. It adds
    /// to the connection string's TLS options (and turns TLS on when the string does not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_from: Option<ValueFrom>,
    /// PEM client certificate for TLS connections to MongoDB (mutual TLS, and X.509
    /// authentication with `authMechanism=MONGODB-X509`), with `clientKeyFrom`. For a Secret of
    /// type `kubernetes.io/tls`: key `tls.crt`. The connection string's own
    /// `tlsCertificateKeyFile` works too (a path the worker can read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_from: Option<ValueFrom>,
    /// PEM private key of `clientCertFrom` (unencrypted; key `tls.key` of a `kubernetes.io/tls`
    /// Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_from: Option<ValueFrom>,
    /// Which change streams to follow. `Auto` (default): one stream for the whole pipeline,
    /// database-level when every namespace is in one database, deployment-level otherwise.
    /// `Collection`: one stream per synced collection, each resumed from its own token, for
    /// servers that only stream collections (Amazon DocumentDB); collections created later are
    /// found by listing the databases every few seconds.
    #[serde(default, skip_serializing_if = "is_default")]
    pub stream_scope: StreamScope,
}

/// An Elasticsearch 7.x/8.x/9.x or OpenSearch 2.x cluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.username) == has(self.passwordFrom)", "message": "`username` and `passwordFrom` go together"},
    {"rule": "!(has(self.apiKeyFrom) && has(self.username))", "message": "set either `apiKeyFrom` or `username`/`passwordFrom`, not both"},
    {"rule": "!has(self.passwordFrom) || !has(self.passwordFrom.configMapKeyRef)", "message": "`passwordFrom.configMapKeyRef` is only for CA bundles; keep the password in a Secret (`secretKeyRef`)"},
    {"rule": "!has(self.apiKeyFrom) || !has(self.apiKeyFrom.configMapKeyRef)", "message": "`apiKeyFrom.configMapKeyRef` is only for CA bundles; keep the API key in a Secret (`secretKeyRef`)"},
    {"rule": "has(self.clientCertFrom) == has(self.clientKeyFrom)", "message": "`clientCertFrom` and `clientKeyFrom` go together"},
    {"rule": "!has(self.clientKeyFrom) || !has(self.clientKeyFrom.configMapKeyRef)", "message": "`clientKeyFrom.configMapKeyRef` is only for CA bundles; keep the private key in a Secret (`secretKeyRef`)"},
    {"rule": "!has(self.aws) || !(has(self.username) || has(self.apiKeyFrom))", "message": "`aws` signs every request with AWS credentials; remove `username`/`passwordFrom` and `apiKeyFrom`"},
    {"rule": "!has(self.aws) || size(self.urls) == 1", "message": "`aws` needs exactly one URL: the domain or collection endpoint"}
]))]
pub struct ElasticsearchSink {
    /// Base URLs of the cluster, e.g. `["https://es.example:9200"]`. Requests are spread over
    /// them round-robin.
    #[schemars(length(min = 1, max = 32), inner(regex(pattern = r"^https?://[^@/?#\s]+(/[^\s]*)?$")))]
    pub urls: Vec<String>,
    /// User name for basic authentication (the password comes from `passwordFrom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Password for basic authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_from: Option<ValueFrom>,
    /// API key (the base64 `id:key` form Elasticsearch returns as `encoded`), instead of a
    /// user name and password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_from: Option<ValueFrom>,
    /// PEM bundle of certificate authorities to trust for HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_from: Option<ValueFrom>,
    /// PEM client certificate for HTTPS (mutual TLS, Elasticsearch's PKI realm), with
    /// `clientKeyFrom`. It can be combined with `username`/`passwordFrom` or `apiKeyFrom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_from: Option<ValueFrom>,
    /// PEM private key of `clientCertFrom` (unencrypted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_from: Option<ValueFrom>,
    /// Compress bulk request bodies with gzip (`Content-Encoding: gzip`): less network for a
    /// little CPU, worth it when Elasticsearch is across a slow or metered link.
    #[serde(default, skip_serializing_if = "is_false")]
    pub gzip: bool,
    /// Sign every request with AWS Signature Version 4, for Amazon OpenSearch Service (`es`)
    /// and OpenSearch Serverless (`aoss`). Replaces `username`/`passwordFrom` and `apiKeyFrom`,
    /// and needs exactly one URL (the domain or collection endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsSigning>,
}

/// AWS request signing (SigV4). Credentials come from `accessKeyIdFrom` and
/// `secretAccessKeyFrom` (and `sessionTokenFrom` for temporary keys), or, when those are not
/// set, from the default AWS credentials chain: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`,
/// the shared credentials file and profile (`AWS_PROFILE`), web identity (IRSA on EKS:
/// annotate the worker ServiceAccount with `eks.amazonaws.com/role-arn`), ECS container
/// credentials and EC2 instance metadata. Credentials from the chain are refreshed before they
/// expire.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.accessKeyIdFrom) == has(self.secretAccessKeyFrom)", "message": "`accessKeyIdFrom` and `secretAccessKeyFrom` go together"},
    {"rule": "!has(self.sessionTokenFrom) || has(self.accessKeyIdFrom)", "message": "`sessionTokenFrom` needs `accessKeyIdFrom` and `secretAccessKeyFrom`"},
    {"rule": "!has(self.secretAccessKeyFrom) || !has(self.secretAccessKeyFrom.configMapKeyRef)", "message": "`secretAccessKeyFrom.configMapKeyRef` is only for CA bundles; keep the secret key in a Secret (`secretKeyRef`)"},
    {"rule": "!has(self.sessionTokenFrom) || !has(self.sessionTokenFrom.configMapKeyRef)", "message": "`sessionTokenFrom.configMapKeyRef` is only for CA bundles; keep the session token in a Secret (`secretKeyRef`)"}
]))]
pub struct AwsSigning {
    /// AWS region of the domain or collection, e.g. `eu-west-1`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[a-z0-9-]+$"))]
    pub region: String,
    /// `es` for Amazon OpenSearch Service (the default), `aoss` for OpenSearch Serverless.
    #[serde(default)]
    pub service: AwsService,
    /// Access key id of static credentials (with `secretAccessKeyFrom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id_from: Option<ValueFrom>,
    /// Secret access key of static credentials (with `accessKeyIdFrom`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key_from: Option<ValueFrom>,
    /// Session token of temporary static credentials. They are not refreshed: once the token
    /// expires, requests are refused; use the default chain for credentials that rotate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token_from: Option<ValueFrom>,
}

/// The AWS service name requests are signed for.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AwsService {
    /// Amazon OpenSearch Service (managed domains, also Elasticsearch 7.x domains).
    #[default]
    #[serde(rename = "es")]
    Es,
    /// Amazon OpenSearch Serverless collections.
    #[serde(rename = "aoss")]
    Aoss,
}

impl AwsService {
    /// The name in the signature's credential scope.
    pub fn signing_name(self) -> &'static str {
        match self {
            Self::Es => "es",
            Self::Aoss => "aoss",
        }
    }
}

/// Where a secret value comes from. Exactly one field must be set. `env` and `file` are for
/// `monsoon run`; in a cluster use `secretKeyRef` (or `configMapKeyRef` for a CA bundle): the
/// CRD refuses `env` and `file`, since `monsoon run` reads its manifest without the CRD's rules.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "[has(self.env), has(self.file), has(self.secretKeyRef), has(self.configMapKeyRef)].filter(x, x).size() == 1", "message": "set exactly one of `env`, `file`, `secretKeyRef` and `configMapKeyRef`"},
    {"rule": "!has(self.env) && !has(self.file)", "message": "`env` and `file` only work with `monsoon run`; in a cluster use `secretKeyRef` (a Secret in the pipeline's namespace; `configMapKeyRef` also works for a CA bundle)"}
]))]
pub struct ValueFrom {
    /// Name of an environment variable holding the value (`monsoon run` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[^=]+$"))]
    pub env: Option<String>,
    /// Path of a file holding the value, trailing newlines trimmed (`monsoon run` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// A key of a Secret in the pipeline's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
    /// A key of a ConfigMap in the pipeline's namespace (for CA bundles, which are not
    /// secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<SecretKeyRef>,
}

/// A key of a Secret (or ConfigMap) in the pipeline's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret or ConfigMap.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key within its data.
    #[schemars(length(min = 1))]
    pub key: String,
}

/// Batching and concurrency of bulk requests. A batch is sent when it reaches `maxDocs`
/// documents or `maxBytes` bytes, or `flushIntervalMs` after its first document arrived while
/// no other partial batch is in flight.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchSpec {
    /// Most documents in one bulk request (1–100000).
    #[serde(default = "default_max_docs")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_docs: u32,
    /// Most bytes in one bulk request body (64 KiB–100 MiB). Elasticsearch refuses requests
    /// over `http.max_content_length` (100 MiB by default).
    #[serde(default = "default_max_bytes")]
    #[schemars(range(min = 65536, max = 104857600))]
    pub max_bytes: u64,
    /// Longest time a change waits in a partial batch while no other partial batch is in
    /// flight, in milliseconds (1–60000).
    #[serde(default = "default_flush_interval_ms")]
    #[schemars(range(min = 1, max = 60000))]
    pub flush_interval_ms: u64,
    /// Bulk requests in flight at once (1–64). A document is never in two of them: its next
    /// write waits until the request holding it returns.
    #[serde(default = "default_concurrency")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: u32,
}

fn default_max_docs() -> u32 {
    1000
}
fn default_max_bytes() -> u64 {
    8 * 1024 * 1024
}
fn default_flush_interval_ms() -> u64 {
    100
}
fn default_concurrency() -> u32 {
    4
}

impl Default for BatchSpec {
    fn default() -> Self {
        Self {
            max_docs: default_max_docs(),
            max_bytes: default_max_bytes(),
            flush_interval_ms: default_flush_interval_ms(),
            concurrency: default_concurrency(),
        }
    }
}

/// What to do when the resume point is no longer in the oplog.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum HistoryLostPolicy {
    /// Stop with a clear error; an operator decides.
    #[default]
    Fail,
    /// Rebuild the index from a new snapshot and remove documents deleted during the gap.
    Resnapshot,
}

/// What to do with an index when its collection or database is dropped.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DropPolicy {
    /// Delete the index.
    #[default]
    DeleteIndex,
    /// Keep the index and its documents.
    Keep,
}

/// Dead-letter settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterSpec {
    /// Index that receives one record per refused document: its namespace, `_id`, target
    /// index, the error type and reason, the time, and the document itself as a string.
    #[serde(default = "default_dead_letter_index")]
    #[schemars(regex(pattern = r#"^[^-_+A-Z\\/*?"<>| ,#:][^A-Z\\/*?"<>| ,#:]{0,254}$"#))]
    pub index: String,
}

fn default_dead_letter_index() -> String {
    "monsoon-deadletter".to_string()
}

impl Default for DeadLetterSpec {
    fn default() -> Self {
        Self {
            index: default_dead_letter_index(),
        }
    }
}

/// Observed state of a pipeline, written by the operator from its workers' reports.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncPipelineStatus {
    /// `Pending`, `Snapshotting`, `Streaming`, `Paused` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The `metadata.generation` this status describes: set once that generation's workers
    /// are applied and rolled out (or once it is known to be stuck: `Stalled`), so that
    /// `observedGeneration == metadata.generation` with `Ready` means "this spec is live".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Workers ready out of workers wanted, e.g. `2/2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Largest lag of any shard, e.g. `1.2s` (see `shards[].lagSeconds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<String>,
    /// Documents indexed or deleted by the current workers since they started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents_synced: Option<u64>,
    /// Number of shards the checkpoints are laid out for. Differs from `spec.workers` only
    /// while a re-shard is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_count: Option<u32>,
    /// Progress of each shard, as its worker last reported it in its checkpoint ConfigMap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardStatus>,
    /// Standard conditions: `Ready` (this generation's workers are rolled out, ready and
    /// healthy), `Progressing`, `Degraded`; the kstatus pair `Reconciling` (a rollout or
    /// re-shard is under way) and `Stalled` (it cannot go on without a change from you: an
    /// invalid spec, a missing Secret, lost change-stream history, resources that cannot fit);
    /// and the specific failures `InvalidSpec`, `CredentialsMissing`, `SourceUnavailable`,
    /// `SinkUnavailable`, `HistoryLost`, `ResourcesDoNotFit`, `CrdOutdated`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Progress of one shard.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardStatus {
    /// Shard number, `0..workers`.
    pub shard: u32,
    /// Worker holding the shard's lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// `Starting`, `Snapshotting`, `Streaming`, `Failed` or `Stopped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Share of the snapshot read so far (estimated from collection sizes), 0–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_percent: Option<u32>,
    /// Cluster time of the last acknowledged change (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<String>,
    /// Seconds between the last acknowledged change and now; 0 when the worker has read
    /// everything and has nothing in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// Deprecated and no longer written (an age changes at every refresh): see
    /// `checkpointTime`. Kept so that statuses written by older operators still parse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_age_seconds: Option<u64>,
    /// When the shard's checkpoint was last written (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_time: Option<String>,
    /// Documents indexed or deleted by this worker since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documents_synced: Option<u64>,
    /// Why the worker stopped, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// A status condition, shaped like Kubernetes' own `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason in CamelCase.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The generation this condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
