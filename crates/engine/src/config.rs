//! The engine's own configuration: plain values, secrets already resolved.
//!
//! The binary builds it from a validated `SyncPipeline` spec; tests build it directly. Nothing
//! here knows about Kubernetes.

use std::collections::BTreeMap;
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
    /// Index existing documents before following changes.
    pub snapshot: bool,
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
}

/// MongoDB connection settings.
#[derive(Clone)]
pub struct MongoConfig {
    /// Connection string, credentials included (never logged).
    pub uri: Secret,
    /// Path of a PEM CA bundle, if any.
    pub ca_file: Option<String>,
    /// How long to wait for a server at start-up before giving up with a clear error.
    pub connect_timeout: Duration,
}

impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            .field("uri", &"<redacted>")
            .field("ca_file", &self.ca_file)
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
    /// Ordered lanes, each with at most one bulk request in flight.
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

    /// Whether collection `coll` of database `db` falls under this pattern.
    pub fn matches(&self, db: &str, coll: &str) -> bool {
        self.database == db
            && !coll.starts_with("system.")
            && self.collection.as_deref().is_none_or(|c| c == coll)
    }
}

/// The namespace patterns whose collections a checkpoint has fully synced.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Coverage {
    /// Included patterns (`db.collection`, `db.*`).
    pub include: Vec<String>,
    /// Excluded patterns.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// Which namespaces are synced, and the index of each.
#[derive(Clone, Debug, Default)]
pub struct Routing {
    /// Namespaces to sync.
    pub include: Vec<NamespacePattern>,
    /// Namespaces to leave out.
    pub exclude: Vec<NamespacePattern>,
    /// Index overrides by `db.collection`.
    pub indexes: BTreeMap<String, String>,
}

impl Routing {
    /// Whether `db.coll` is synced.
    pub fn includes(&self, db: &str, coll: &str) -> bool {
        self.include.iter().any(|p| p.matches(db, coll))
            && !self.exclude.iter().any(|p| p.matches(db, coll))
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
        }
    }

    /// Routing of a stored coverage (index names do not matter for coverage).
    pub fn from_coverage(coverage: &Coverage) -> Self {
        Self {
            include: coverage.include.iter().filter_map(|p| NamespacePattern::parse(p)).collect(),
            exclude: coverage.exclude.iter().filter_map(|p| NamespacePattern::parse(p)).collect(),
            indexes: BTreeMap::new(),
        }
    }

    /// The databases any include pattern names, sorted and without repeats.
    pub fn databases(&self) -> Vec<String> {
        let mut dbs: Vec<String> = self.include.iter().map(|p| p.database.clone()).collect();
        dbs.sort();
        dbs.dedup();
        dbs
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
    fn exclude_wins_over_include_and_indexes_default_to_lower_case_namespace() {
        let routing = Routing {
            include: vec![pattern("Shop", None)],
            exclude: vec![pattern("Shop", Some("audit"))],
            indexes: [("Shop.users".to_string(), "people".to_string())].into(),
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
            indexes: BTreeMap::new(),
        };
        let back = Routing::from_coverage(&routing.coverage());
        assert_eq!(back.include, routing.include);
        assert_eq!(back.exclude, routing.exclude);
        assert_eq!(routing.coverage().include, vec!["shop.*", "app.users.v2"]);
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
        let m = MongoConfig {
            uri: Secret("mongodb://u:hunter2@h".into()),
            ca_file: None,
            connect_timeout: Duration::from_secs(1),
        };
        assert!(!format!("{m:?}").contains("hunter2"));
    }
}
