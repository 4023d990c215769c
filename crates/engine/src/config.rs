//! The engine's own configuration: plain values, secrets already resolved.
//!
//! The binary builds it from a validated `SyncPipeline` spec; tests build it directly. Nothing
//! here knows about Kubernetes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

/// Everything one pipeline run needs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Pipeline name, used in logs, metrics and the dead-letter records.
    pub name: String,
    /// MongoDB connection.
    pub mongodb: MongoConfig,
    /// Elasticsearch / OpenSearch connection.
    pub elasticsearch: ElasticConfig,
    /// Which namespaces are synced and where they go.
    pub routing: Routing,
    /// Index existing documents before following changes (those [`Routing::snapshot_only`]
    /// selects, when it selects any).
    pub snapshot: bool,
    /// Where the change stream of a pipeline without a checkpoint starts; `None`: now.
    pub stream_from: Option<StreamFrom>,
    /// One change stream per collection (`streamScope: Collection`) instead of one for the
    /// pipeline.
    pub collection_streams: bool,
    /// Read a collection estimated to hold at least `.1` documents in `.0` `_id` ranges at
    /// once (`snapshotSplit`); `None`: one pass per collection.
    pub snapshot_split: Option<(u32, u64)>,
    /// GridFS files indexed with their content (`spec.files`).
    pub files: Option<FilesConfig>,
    /// Indexes several namespaces may write (`spec.sharedIndexes`).
    pub shared_indexes: std::collections::BTreeSet<String>,
    /// A re-snapshot requested with this token (`MONSOON_RESNAPSHOT`, set by the operator from
    /// the `monsoon.dev/resnapshot` annotation): done once per token, remembered in the
    /// checkpoint.
    pub resnapshot: Option<String>,
    /// Bulk batching limits.
    pub batch: BatchConfig,
    /// Policy when the resume point has fallen off the oplog.
    pub on_history_lost: HistoryLost,
    /// Delete an index when its collection is dropped.
    pub delete_index_on_drop: bool,
    /// Index receiving documents Elasticsearch refuses.
    pub dead_letter_index: String,
    /// How often the acknowledged position is written to the checkpoint store.
    pub checkpoint_interval: Duration,
    /// Which documents this worker owns (all of them unless the pipeline is sharded).
    pub shard: Shard,
    /// How documents are shaped per namespace (`spec.mappings`, validated).
    pub mappings: Vec<monsoon_api::Mapping>,
    /// Index of location records, used when a mapping takes the index, `_id` or routing from
    /// the document ([`crate::sink::locations`]).
    pub locations_index: String,
    /// JavaScript scripts and filters, sources resolved (`spec.scripts`, `spec.filters`).
    pub scripts: monsoon_script::Config,
    /// Time machines (`spec.timeMachine`, validated): changes also logged into dated indexes.
    pub time_machine: Option<monsoon_api::TimeMachine>,
    /// Merge patches (`spec.mergePatches`, validated): documents keeping their patch history.
    pub merge_patches: Option<monsoon_api::MergePatches>,
    /// Relations (`spec.relate`): changes that re-sync documents of other namespaces.
    pub relate: Vec<monsoon_api::Relate>,
}

/// Where a new pipeline's change stream starts (`spec.streamStart`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamFrom {
    /// At this many seconds since the Unix epoch (increment 0: the whole second).
    Seconds(u32),
    /// At the oldest entry of the oplog.
    Oldest,
}

impl EngineConfig {
    /// Whether the snapshot reads `db.coll` (a synced namespace). After lost history the
    /// re-snapshot reads every synced collection regardless: their changes during the gap are
    /// gone, so reading them again is the only way to lose nothing.
    pub fn snapshots(&self, db: &str, coll: &str) -> bool {
        self.snapshot && self.routing.snapshots(db, coll)
    }

    /// Namespaces with relations (`spec.relate`): their changes trigger re-syncs.
    pub fn relating(&self) -> BTreeSet<String> {
        self.relate.iter().map(|r| r.namespace.clone()).collect()
    }

    /// Namespaces whose changes carry the document before the change (a pre-image), when
    /// MongoDB keeps one: those with a relation from a field other than `_id` (a delete needs
    /// it to know what it related to) and time machine namespaces (each update's own version).
    pub fn pre_images(&self) -> PreImages {
        let relating = self.relate.iter().filter(|r| r.src_field != "_id").map(|r| r.namespace.as_str());
        let logged = self.time_machine.iter().flat_map(|t| t.namespaces.iter().map(String::as_str));
        PreImages(relating.chain(logged).filter_map(NamespacePattern::parse).collect())
    }
}

/// Namespaces whose change events keep their pre-images (`fullDocumentBeforeChange`).
#[derive(Clone, Debug, Default)]
pub struct PreImages(Vec<NamespacePattern>);

impl PreImages {
    /// Whether changes of `db.coll` keep their pre-images.
    pub fn includes(&self, db: &str, coll: &str) -> bool {
        self.0.iter().any(|p| p.matches(db, coll))
    }

    /// No namespace keeps them (the stream does not ask for them).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The patterns.
    pub fn patterns(&self) -> &[NamespacePattern] {
        &self.0
    }
}

/// One shard of a pipeline split over `count` workers. Every document belongs to exactly one
/// shard, chosen by a stable hash of its Elasticsearch `_id` (so MongoDB `_id`s that map to the
/// same Elasticsearch document, such as `1` and `1.0`, always share a shard).
///
/// Each shard reads the whole change stream and snapshot and keeps only its own documents: the
/// MongoDB read cost grows with the shard count, the conversion and indexing cost is divided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shard {
    /// This shard, `0..count`.
    pub index: u32,
    /// Number of shards.
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-of-{}", self.index, self.count)
    }
}

impl Shard {
    /// Whether the pipeline is split at all.
    pub fn is_split(self) -> bool {
        self.count > 1
    }

    /// Whether the document with Elasticsearch `_id` `es_id` (unescaped text) belongs here.
    /// The hash is 64-bit FNV-1a over the UTF-8 bytes, finished with the MurmurHash3 64-bit
    /// mix (FNV's low bits alone split poorly), modulo the shard count. It must never change:
    /// checkpoints depend on it.
    pub fn owns(self, es_id: &str) -> bool {
        if self.count <= 1 {
            return true;
        }
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in es_id.as_bytes() {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 33;
        hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        hash ^= hash >> 33;
        hash % u64::from(self.count) == u64::from(self.index)
    }
}

/// MongoDB connection settings.
#[derive(Clone)]
pub struct MongoConfig {
    /// Connection string, credentials included (never logged).
    pub uri: Secret,
    /// Path of a PEM CA bundle, if any.
    pub ca_file: Option<String>,
    /// Path of a PEM file holding a client certificate and its key, if any.
    pub client_cert_key_file: Option<String>,
    /// How long to wait for a server at start-up before giving up with a clear error.
    pub connect_timeout: Duration,
}

impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            .field("uri", &"<redacted>")
            .field("ca_file", &self.ca_file)
            .field("client_cert_key_file", &self.client_cert_key_file)
            .finish()
    }
}

/// Elasticsearch connection settings.
#[derive(Clone, Debug)]
pub struct ElasticConfig {
    /// Base URLs.
    pub urls: Vec<String>,
    /// Authentication.
    pub auth: ElasticAuth,
    /// PEM CA bundle contents, if any.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate followed by its private key, if any (never logged).
    pub client_identity: Option<Secret>,
    /// Compress request bodies with gzip.
    pub gzip: bool,
    /// Timeout of one bulk request.
    pub request_timeout: Duration,
}

/// How to authenticate to Elasticsearch.
#[derive(Clone, Debug, Default)]
pub enum ElasticAuth {
    /// No authentication.
    #[default]
    None,
    /// HTTP basic authentication.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// Encoded API key (`base64(id:key)`).
    ApiKey(Secret),
    /// AWS Signature Version 4 on every request (Amazon OpenSearch Service and Serverless).
    Aws(AwsAuth),
}

/// AWS request signing: where and for which service, with which credentials.
#[derive(Clone, Debug)]
pub struct AwsAuth {
    /// Region of the domain or collection, e.g. `eu-west-1`.
    pub region: String,
    /// Signing name: `es` (OpenSearch Service) or `aoss` (Serverless).
    pub service: String,
    /// Where the credentials come from.
    pub credentials: AwsCredentials,
}

/// Where AWS credentials come from.
#[derive(Clone, Debug)]
pub enum AwsCredentials {
    /// Keys given in the pipeline (never refreshed).
    Static {
        /// Access key id.
        access_key_id: Secret,
        /// Secret access key.
        secret_access_key: Secret,
        /// Session token of temporary credentials.
        session_token: Option<Secret>,
    },
    /// The default AWS credentials chain (environment, shared files and profile, web
    /// identity, ECS container and EC2 instance metadata), refreshed before expiry.
    DefaultChain,
}

/// A credential: its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Policy for ChangeStreamHistoryLost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryLost {
    /// Stop with an error.
    Fail,
    /// Snapshot again, then delete what the new snapshot did not see.
    Resnapshot,
}

/// Bulk batching limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most documents in one bulk request.
    pub max_docs: usize,
    /// Most bytes in one bulk body.
    pub max_bytes: usize,
    /// Longest wait of a partial batch.
    pub flush_interval: Duration,
    /// Bulk requests in flight at once.
    pub concurrency: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_docs: 1000,
            max_bytes: 8 << 20,
            flush_interval: Duration::from_millis(100),
            concurrency: 4,
        }
    }
}

/// One include or exclude pattern: a database and optionally one collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespacePattern {
    /// Database name.
    pub database: String,
    /// Collection, or every collection of the database when `None`.
    pub collection: Option<String>,
}

impl fmt::Display for NamespacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.collection {
            Some(c) => write!(f, "{}.{c}", self.database),
            None => write!(f, "{}.*", self.database),
        }
    }
}

impl NamespacePattern {
    /// Read `db.collection` or `db.*` (as written by `Display`).
    pub fn parse(text: &str) -> Option<Self> {
        let (db, coll) = text.split_once('.')?;
        Some(Self {
            database: db.to_string(),
            collection: (coll != "*").then(|| coll.to_string()),
        })
    }

    /// Whether collection `coll` of database `db` falls under this pattern. `db.*` leaves out
    /// system collections and GridFS chunks (`fs.chunks`: binary pieces, not documents to
    /// search); naming one exactly still syncs it.
    pub fn matches(&self, db: &str, coll: &str) -> bool {
        self.database == db
            && !coll.starts_with("system.")
            && self.collection.as_deref().map_or(!is_gridfs_chunks(coll), |c| c == coll)
    }
}

/// GridFS keeps a file's binary pieces in `<bucket>.chunks`.
fn is_gridfs_chunks(coll: &str) -> bool {
    coll.ends_with(".chunks")
}

/// Databases MongoDB keeps for itself: never synced.
pub const SYSTEM_DATABASES: [&str; 3] = ["admin", "local", "config"];

/// The namespace patterns whose collections a checkpoint has fully synced.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Coverage {
    /// Included patterns (`db.collection`, `db.*`).
    pub include: Vec<String>,
    /// Excluded patterns.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Included regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_regex: Option<String>,
    /// Excluded regular expression.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclude_regex: Option<String>,
}

/// Which namespaces are synced, and the index of each.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// Namespaces to sync.
    pub include: Vec<NamespacePattern>,
    /// Namespaces to leave out.
    pub exclude: Vec<NamespacePattern>,
    /// Also sync the namespaces (`db.collection`) this matches, in any database.
    pub include_regex: Option<regex::Regex>,
    /// Leave out the namespaces this matches.
    pub exclude_regex: Option<regex::Regex>,
    /// Index overrides by `db.collection`.
    pub indexes: BTreeMap<String, String>,
    /// Snapshot only the synced namespaces these select (`spec.snapshotNamespaces`); empty:
    /// every one. See [`EngineConfig::snapshots`].
    pub snapshot_only: Vec<NamespacePattern>,
}

impl Routing {
    /// Whether the pipeline names `db.coll` exactly (in `namespaces` or `snapshotNamespaces`),
    /// not through `db.*` or a regular expression.
    pub fn names(&self, db: &str, coll: &str) -> bool {
        self.include.iter().chain(&self.snapshot_only).any(|p| p.database == db && p.collection.as_deref() == Some(coll))
    }

    /// Whether `db.coll` is synced. Without regular expressions this allocates nothing (it runs
    /// for every change event).
    pub fn includes(&self, db: &str, coll: &str) -> bool {
        if SYSTEM_DATABASES.contains(&db) || coll.starts_with("system.") {
            return false;
        }
        let ns = || format!("{db}.{coll}");
        let included = self.include.iter().any(|p| p.matches(db, coll))
            || self.include_regex.as_ref().is_some_and(|r| !is_gridfs_chunks(coll) && r.is_match(&ns()));
        included
            && !self.exclude.iter().any(|p| p.matches(db, coll))
            && !self.exclude_regex.as_ref().is_some_and(|r| r.is_match(&ns()))
    }

    /// Whether `snapshot_only` selects `db.coll` (every namespace when it is empty).
    pub fn snapshots(&self, db: &str, coll: &str) -> bool {
        self.snapshot_only.is_empty() || self.snapshot_only.iter().any(|p| p.matches(db, coll))
    }

    /// The index of `db.coll`: the override, or the namespace lower-cased.
    pub fn index_for(&self, db: &str, coll: &str) -> String {
        let ns = format!("{db}.{coll}");
        match self.indexes.get(&ns) {
            Some(index) => index.clone(),
            None => ns.to_lowercase(),
        }
    }

    /// The include and exclude patterns as text, for the checkpoint's snapshot coverage.
    pub fn coverage(&self) -> Coverage {
        Coverage {
            include: self.include.iter().map(ToString::to_string).collect(),
            exclude: self.exclude.iter().map(ToString::to_string).collect(),
            include_regex: self.include_regex.as_ref().map(|r| r.as_str().to_string()),
            exclude_regex: self.exclude_regex.as_ref().map(|r| r.as_str().to_string()),
        }
    }

    /// Routing of a stored coverage (index names do not matter for coverage). A stored
    /// expression that no longer compiles covers nothing (its namespaces are snapshotted again).
    pub fn from_coverage(coverage: &Coverage) -> Self {
        let regex = |r: &Option<String>| r.as_deref().and_then(|r| regex::Regex::new(r).ok());
        Self {
            include: coverage.include.iter().filter_map(|p| NamespacePattern::parse(p)).collect(),
            exclude: coverage.exclude.iter().filter_map(|p| NamespacePattern::parse(p)).collect(),
            include_regex: regex(&coverage.include_regex),
            exclude_regex: regex(&coverage.exclude_regex),
            ..Self::default()
        }
    }

    /// The databases the pipeline reads, sorted and without repeats; `None` when a regular
    /// expression may select any database (every one but the system databases is read).
    pub fn databases(&self) -> Option<Vec<String>> {
        if self.include_regex.is_some() {
            return None;
        }
        let mut dbs: Vec<String> = self.include.iter().map(|p| p.database.clone()).collect();
        dbs.sort();
        dbs.dedup();
        Some(dbs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(db: &str, coll: Option<&str>) -> NamespacePattern {
        NamespacePattern {
            database: db.into(),
            collection: coll.map(Into::into),
        }
    }

    #[test]
    fn every_id_has_exactly_one_shard_and_the_split_is_even() {
        for count in [1u32, 2, 3, 7] {
            let mut per_shard = vec![0u32; count as usize];
            for n in 0..7000 {
                // Both long hex ids and short decimal ones (the weak case for plain FNV).
                let id = if n % 2 == 0 { format!("{n:024x}") } else { n.to_string() };
                let owners: Vec<u32> = (0..count).filter(|&index| Shard { index, count }.owns(&id)).collect();
                assert_eq!(owners.len(), 1, "id {id} with {count} shards: owners {owners:?}");
                per_shard[owners[0] as usize] += 1;
            }
            let even = 7000 / count;
            for n in per_shard {
                assert!(n.abs_diff(even) < even / 5 + 10, "uneven split for {count} shards: {n} vs {even}");
            }
        }
        // Pinned values: checkpoints depend on this hash never changing.
        assert!(Shard { index: 1, count: 2 }.owns("a"));
        assert!(Shard { index: 0, count: 2 }.owns("b"));
        assert_eq!((0..5).find(|&index| Shard { index, count: 5 }.owns("507f1f77bcf86cd799439011")), Some(3));
    }

    #[test]
    fn exclude_wins_over_include_and_indexes_default_to_lower_case_namespace() {
        let routing = Routing {
            include: vec![pattern("Shop", None)],
            exclude: vec![pattern("Shop", Some("audit"))],
            indexes: [("Shop.users".to_string(), "people".to_string())].into(),
            ..Routing::default()
        };
        assert!(routing.includes("Shop", "Orders"));
        assert!(!routing.includes("Shop", "audit"));
        assert!(!routing.includes("Shop", "system.views"));
        assert!(!routing.includes("Other", "Orders"));
        assert_eq!(routing.index_for("Shop", "Orders"), "shop.orders");
        assert_eq!(routing.index_for("Shop", "users"), "people");
    }

    #[test]
    fn coverage_round_trips_through_text() {
        let routing = Routing {
            include: vec![pattern("shop", None), pattern("app", Some("users.v2"))],
            exclude: vec![pattern("shop", Some("audit"))],
            include_regex: regex::Regex::new(r"^logs\.").ok(),
            exclude_regex: regex::Regex::new(r"\.tmp$").ok(),
            ..Routing::default()
        };
        let back = Routing::from_coverage(&routing.coverage());
        assert_eq!(back.include, routing.include);
        assert_eq!(back.exclude, routing.exclude);
        assert_eq!(back.coverage(), routing.coverage());
        assert_eq!(routing.coverage().include, vec!["shop.*", "app.users.v2"]);
        // A coverage stored before regular expressions existed reads as none.
        let old: Coverage = serde_json::from_str(r#"{"include":["shop.*"],"exclude":[]}"#).expect("old coverage");
        assert!(Routing::from_coverage(&old).include_regex.is_none());
    }

    #[test]
    fn regular_expressions_select_any_database_but_system_ones_and_gridfs_chunks() {
        let routing = Routing {
            include: vec![pattern("shop", None), pattern("media", Some("fs.chunks"))],
            include_regex: regex::Regex::new(r"^(logs|metrics)\.").ok(),
            exclude_regex: regex::Regex::new(r"\.tmp_").ok(),
            ..Routing::default()
        };
        assert!(routing.includes("logs", "app"));
        assert!(routing.includes("metrics", "cpu"));
        assert!(!routing.includes("logs", "a.tmp_1"), "the exclude expression wins");
        assert!(!routing.includes("other", "app"));
        assert!(!routing.includes("logs", "system.profile"));
        assert!(!routing.includes("logs", "fs.chunks"), "GridFS chunks are left out of wide matches");
        assert!(!routing.includes("shop", "fs.chunks"), "... and of db.*");
        assert!(routing.includes("shop", "fs.files"));
        assert!(routing.includes("media", "fs.chunks"), "unless named exactly");
        let any = Routing { include_regex: regex::Regex::new(".*").ok(), ..Routing::default() };
        assert!(any.includes("anything", "at.all"));
        assert!(!any.includes("admin", "users") && !any.includes("local", "oplog.rs") && !any.includes("config", "x"));
        assert_eq!(any.databases(), None);
        let named = Routing { include: vec![pattern("b", None), pattern("a", Some("x"))], ..Routing::default() };
        assert_eq!(named.databases(), Some(vec!["a".to_string(), "b".to_string()]));
    }

    #[test]
    fn snapshot_only_selects_what_is_snapshotted_and_empty_means_everything() {
        let all = Routing { include: vec![pattern("shop", None)], ..Routing::default() };
        assert!(all.snapshots("shop", "orders") && all.snapshots("shop", "users"));
        let some = Routing { snapshot_only: vec![pattern("shop", Some("orders")), pattern("logs", None)], ..all };
        assert!(some.snapshots("shop", "orders"));
        assert!(!some.snapshots("shop", "users"), "synced, streamed, not snapshotted");
        assert!(some.snapshots("logs", "app"));
        assert!(!some.snapshots("logs", "fs.chunks"), "db.* leaves GridFS chunks out, as for syncing");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        let m = MongoConfig {
            uri: Secret("mongodb://u:hunter2@h".into()),
            ca_file: None,
            client_cert_key_file: None,
            connect_timeout: Duration::from_secs(1),
        };
        assert!(!format!("{m:?}").contains("hunter2"));
    }
}

/// GridFS files indexed with their content (`spec.files`).
#[derive(Clone, Debug)]
pub struct FilesConfig {
    /// Files collections, `db.<bucket>.files`.
    pub namespaces: Vec<String>,
    /// Larger files are indexed without content.
    pub max_file_size: u64,
    /// Ingest pipeline of the files' documents.
    pub pipeline: String,
    /// Create `pipeline` at start.
    pub create_pipeline: bool,
}

impl FilesConfig {
    /// Whether `db.coll` is a files collection whose files are indexed with their content.
    pub fn indexes_content(&self, db: &str, coll: &str) -> bool {
        self.namespaces.iter().any(|ns| ns.split_once('.').is_some_and(|(d, c)| d == db && c == coll))
    }

    /// The body of the pipeline monsoon creates: extract the text of `file`, then drop the
    /// base64 (the extracted `attachment` holds what search needs).
    pub fn pipeline_body() -> serde_json::Value {
        serde_json::json!({
            "description": "monsoon: the text of GridFS files (the base64 `file` field)",
            "processors": [
                {"attachment": {"field": "file", "ignore_missing": true}},
                {"remove": {"field": "file", "ignore_missing": true}}
            ]
        })
    }
}
