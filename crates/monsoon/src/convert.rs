//! `monsoon convert`: a Monstache TOML configuration turned into a `SyncPipeline`.
//!
//! [`convert`] is pure: it reads the TOML text and returns the pipeline and one [`Note`] per
//! option it could not carry over (obsolete, replaced by what, or not supported yet), so a
//! Monstache user sees exactly what changes. Credentials are never copied into the output: a
//! connection string or password found in the file is replaced by an environment variable
//! reference, and a note says which to set.

use std::collections::BTreeMap;

use monsoon_api::{
    Aggregation, DropPolicy, ElasticsearchSink, Mapping, MongoSource, OplogTime, ScriptSpec, SyncPipeline, SyncPipelineSpec, ValueFrom, WriteMode,
};
use toml::{Table, Value};

/// Environment variable the converted pipeline reads a credential-bearing MongoDB URI from.
pub const ENV_MONGODB_URI: &str = "MONSOON_MONGODB_URI";
/// Environment variable the converted pipeline reads the Elasticsearch password from.
pub const ENV_ES_PASSWORD: &str = "MONSOON_ES_PASSWORD";

/// Why a Monstache configuration cannot be converted at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not TOML.
    #[error("failed to parse the Monstache configuration as TOML: {0}")]
    Toml(String),
    /// An option has a value of the wrong type.
    #[error("`{option}` must be {expected}")]
    Type {
        /// The option.
        option: String,
        /// What it must be.
        expected: &'static str,
    },
    /// Nothing to sync.
    #[error("no namespaces to sync: set `direct-read-namespaces` or `change-stream-namespaces` (monsoon does not yet follow every database at once)")]
    NoNamespaces,
}

/// An option not carried over as it is, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// The Monstache option (`[[mapping]].type`, `resume`, ...).
    pub option: String,
    /// What happens instead, or why it is left out.
    pub reason: String,
}

/// The result of a conversion.
#[derive(Debug)]
pub struct Conversion {
    /// The pipeline.
    pub pipeline: SyncPipeline,
    /// What was not carried over as it is.
    pub notes: Vec<Note>,
}

/// Options monsoon has no use for, with the reason shown to the user.
const NOT_NEEDED: &[(&str, &str)] = &[
    ("resume", "monsoon always resumes from its own checkpoint (a file with `monsoon run`, a ConfigMap in a cluster)"),
    ("resume-name", "each pipeline has its own checkpoint, named after the pipeline"),
    ("resume-strategy", "monsoon resumes from change stream resume tokens only"),
    ("resume-write-unsafe", "checkpoints are written only after Elasticsearch acknowledged everything before them"),
    ("resume-from-timestamp", "delete the checkpoint to start over with a new snapshot"),
    ("replay", "delete the checkpoint to start over with a new snapshot"),
    ("cluster-name", "in Kubernetes each shard's worker holds a lease; standalone, run one process per pipeline"),
    ("workers", "in Kubernetes, `spec.workers` splits a pipeline into shards by `_id`"),
    ("verbose", "set RUST_LOG (e.g. RUST_LOG=debug)"),
    ("stats", "/stats and /metrics (Prometheus) are always served on --http-addr"),
    ("index-stats", "/stats and /metrics (Prometheus) are always served on --http-addr"),
    ("stats-duration", "/stats and /metrics are served live"),
    ("enable-http-server", "/healthz, /readyz, /metrics and /stats are always served on --http-addr"),
    ("http-server-addr", "use `monsoon run --http-addr`"),
    ("pprof", "not available"),
    ("fail-fast", "monsoon retries what can be retried and dead-letters what cannot; it stops only on errors a person must fix"),
    ("exit-after-direct-reads", "a pipeline with `snapshot: true` snapshots, then follows changes"),
    ("direct-read-split-max", "the snapshot reads each collection in `_id` order, resumable after a crash"),
    ("direct-read-concur", "the snapshot reads collections one after another; bulk requests run `batch.concurrency` at once"),
    ("direct-read-no-timeout", "snapshot reads time out only when MongoDB stops answering, and then resume after the last `_id`"),
    ("elasticsearch-retry", "monsoon always retries retriable failures"),
    ("elasticsearch-client-timeout", "bulk requests time out after 60 s and are retried"),
    ("elasticsearch-healthcheck-timeout", "not needed"),
    ("elasticsearch-healthcheck-timeout-startup", "not needed"),
    ("elasticsearch-version", "the version is read from the server"),
    ("mongo-dial-settings", "set timeouts in the connection string"),
    ("mongo-session-settings", "set timeouts in the connection string"),
    ("gtm-settings", "batching is `spec.batch`"),
    ("env-delimiter", "monsoon reads each secret from its own variable"),
    ("config-database-name", "monsoon keeps no state in MongoDB"),
    ("enable-oplog", "monsoon reads change streams only (MongoDB 4.0+)"),
    ("disable-change-events", "a pipeline always follows changes after its snapshot"),
    ("graylog-addr", "logs go to stderr (text or JSON with --log-format)"),
    ("logs", "logs go to stderr (text or JSON with --log-format)"),
    ("dropped-databases", "a dropped database drops each of its synced collections, per `onDrop`"),
    ("routing-namespaces", "a namespace is routed when its mapping sets `routing` (or an index or `_id` from a field); monsoon then records where each document went"),
    ("delete-strategy", "deletes of routed or re-indexed documents go where monsoon recorded them (index `monsoon-locations`): precise, with no search per delete and no state in MongoDB"),
    ("delete-index-pattern", "deletes go where monsoon recorded each routed document; no index pattern is searched"),
];

/// Options monsoon does not support yet.
const NOT_YET: &[&str] = &[
    "namespace-drop-exclude-regex",
    "index-files",
    "file-namespaces",
    "file-highlighting",
    "relate",
    "relate-threads",
    "relate-buffer",
    "merge-patch-namespaces",
    "time-machine-namespaces",
    "time-machine-index-prefix",
    "time-machine-index-suffix",
    "time-machine-direct-reads",
    "aws-connect",
    "mapper-plugin-path",
    "post-processors",
    "prune-invalid-json",
    "pipe-allow-disk",
    "disable-file-pipeline-put",
];

fn string(table: &Table, key: &str) -> Result<Option<String>, Error> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Error::Type { option: key.into(), expected: "a string" }),
    }
}

fn strings(table: &Table, key: &str) -> Result<Vec<String>, Error> {
    match table.get(key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or(Error::Type { option: key.into(), expected: "a list of strings" }))
            .collect(),
        Some(_) => Err(Error::Type { option: key.into(), expected: "a list of strings" }),
    }
}

fn integer(table: &Table, key: &str) -> Result<Option<i64>, Error> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::Integer(i)) => Ok(Some(*i)),
        Some(_) => Err(Error::Type { option: key.into(), expected: "an integer" }),
    }
}

fn boolean(table: &Table, key: &str) -> Result<Option<bool>, Error> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::Boolean(b)) => Ok(Some(*b)),
        Some(_) => Err(Error::Type { option: key.into(), expected: "true or false" }),
    }
}

/// Whether a connection string carries a password (`user:password@`).
fn has_password(uri: &str) -> bool {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority.rsplit_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// A Monstache namespace as a monsoon pattern: `db.coll` stays, a bare database (allowed in
/// `change-stream-namespaces`) becomes `db.*`.
fn pattern(ns: &str) -> String {
    if ns.contains('.') {
        ns.to_string()
    } else {
        format!("{ns}.*")
    }
}

/// A DNS-label pipeline name from `hint` (a file name): lower-case letters, digits and `-`.
pub fn pipeline_name(hint: &str) -> String {
    let mut name: String = hint
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    name = name.trim_matches('-').to_string();
    name.truncate(63);
    let name = name.trim_end_matches('-').to_string();
    if name.is_empty() {
        "monstache".into()
    } else {
        name
    }
}

/// Convert a Monstache TOML configuration into a pipeline named `name`.
///
/// # Errors
/// [`Error`] when the text is not TOML, an option has the wrong type, or nothing would be
/// synced.
pub fn convert(text: &str, name: &str) -> Result<Conversion, Error> {
    let table: Table = text.parse().map_err(|e: toml::de::Error| Error::Toml(e.message().to_string()))?;
    let mut notes = Vec::new();
    let mut note = |option: &str, reason: String| notes.push(Note { option: option.into(), reason });
    // Every field at the format's own defaults (serde's, which `Default` does not share).
    let mut spec: SyncPipelineSpec =
        serde_json::from_value(serde_json::json!({"mongodb": {}, "elasticsearch": {"urls": []}, "namespaces": []}))
            .map_err(|e| Error::Toml(e.to_string()))?;

    // MongoDB.
    let uri = string(&table, "mongo-url")?.unwrap_or_else(|| "mongodb://localhost:27017".into());
    spec.mongodb = if has_password(&uri) {
        note("mongo-url", format!("holds a password, so it is not copied: set environment variable {ENV_MONGODB_URI} to it (in a cluster, use `uriFrom.secretKeyRef`)"));
        MongoSource { uri_from: Some(ValueFrom { env: Some(ENV_MONGODB_URI.into()), ..ValueFrom::default() }), ..MongoSource::default() }
    } else {
        MongoSource { uri: Some(uri), ..MongoSource::default() }
    };
    if let Some(pem) = string(&table, "mongo-pem-file")? {
        spec.mongodb.ca_from = Some(ValueFrom { file: Some(pem), ..ValueFrom::default() });
    }
    if boolean(&table, "mongo-validate-pem-file")? == Some(false) {
        note("mongo-validate-pem-file", "monsoon verifies MongoDB's certificate; to relax host name checks add `tlsAllowInvalidHostnames=true` to the connection string".into());
    }

    // Elasticsearch.
    let mut urls = strings(&table, "elasticsearch-urls")?;
    if urls.is_empty() {
        urls.push("http://localhost:9200".into());
    }
    spec.elasticsearch = ElasticsearchSink { urls, ..ElasticsearchSink::default() };
    let user = string(&table, "elasticsearch-user")?;
    let password = string(&table, "elasticsearch-password")?;
    if let Some(user) = user {
        spec.elasticsearch.username = Some(user);
        spec.elasticsearch.password_from = Some(ValueFrom { env: Some(ENV_ES_PASSWORD.into()), ..ValueFrom::default() });
        note(
            "elasticsearch-password",
            format!("never copied: set environment variable {ENV_ES_PASSWORD} (in a cluster, use `passwordFrom.secretKeyRef`)"),
        );
    } else if password.is_some() {
        note("elasticsearch-password", "ignored: no `elasticsearch-user` is set".into());
    }
    if let Some(pem) = string(&table, "elasticsearch-pem-file")? {
        spec.elasticsearch.ca_from = Some(ValueFrom { file: Some(pem), ..ValueFrom::default() });
    }
    if boolean(&table, "elasticsearch-validate-pem-file")? == Some(false) {
        note("elasticsearch-validate-pem-file", "monsoon always verifies Elasticsearch's certificate; give its CA with `elasticsearch.caFrom`".into());
    }
    spec.elasticsearch.gzip = boolean(&table, "gzip")?.unwrap_or(false);

    // Batching.
    if let Some(n) = integer(&table, "elasticsearch-max-docs")? {
        spec.batch.max_docs = u32::try_from(n.clamp(1, 100_000)).unwrap_or(1000);
    }
    if let Some(n) = integer(&table, "elasticsearch-max-bytes")? {
        let clamped = n.clamp(64 * 1024, 100 * 1024 * 1024);
        if clamped != n {
            note("elasticsearch-max-bytes", format!("{n} is outside 64 KiB–100 MiB; using {clamped}"));
        }
        spec.batch.max_bytes = u64::try_from(clamped).unwrap_or(8 << 20);
    }
    if let Some(n) = integer(&table, "elasticsearch-max-seconds")? {
        let ms = n.saturating_mul(1000).clamp(1, 60_000);
        spec.batch.flush_interval_ms = u64::try_from(ms).unwrap_or(100);
    }
    if let Some(n) = integer(&table, "elasticsearch-max-conns")? {
        spec.batch.concurrency = u32::try_from(n.clamp(1, 64)).unwrap_or(4);
    }

    // Namespaces.
    let direct = strings(&table, "direct-read-namespaces")?;
    let stream = strings(&table, "change-stream-namespaces")?;
    if direct.iter().chain(&stream).any(String::is_empty) {
        note("change-stream-namespaces", "an empty namespace (the whole deployment) is not supported yet; list the databases or collections".into());
    }
    let mut namespaces: Vec<String> = stream.iter().filter(|n| !n.is_empty()).map(|n| pattern(n)).collect();
    if namespaces.is_empty() {
        if !direct.is_empty() {
            note(
                "change-stream-namespaces",
                "not set: Monstache would follow changes of the whole deployment; monsoon follows the direct-read namespaces only".into(),
            );
        }
        namespaces = direct.iter().filter(|n| !n.is_empty()).map(|n| pattern(n)).collect();
    } else {
        for ns in direct.iter().filter(|n| !n.is_empty()) {
            if !namespaces.iter().any(|p| p == ns || p.strip_suffix(".*").is_some_and(|db| ns.split('.').next() == Some(db))) {
                note("direct-read-namespaces", format!("`{ns}` is not in change-stream-namespaces; monsoon snapshots and follows it"));
                namespaces.push(ns.clone());
            }
        }
    }
    spec.namespace_regex = string(&table, "namespace-regex")?;
    spec.exclude_namespace_regex = string(&table, "namespace-exclude-regex")?;
    if spec.namespace_regex.is_some() && !direct.is_empty() {
        note("namespace-regex", "monsoon snapshots every namespace it syncs, those the expression selects included, not only the direct-read ones".into());
    }
    if namespaces.is_empty() && spec.namespace_regex.is_none() {
        return Err(Error::NoNamespaces);
    }
    namespaces.sort();
    namespaces.dedup();
    spec.snapshot = !direct.is_empty();
    if !spec.snapshot {
        note("direct-read-namespaces", "not set: the pipeline follows changes only (`snapshot: false`)".into());
    }

    // Drops.
    if boolean(&table, "dropped-collections")? == Some(false) {
        spec.on_drop = DropPolicy::Keep;
    }

    // [[mapping]]: index overrides and ingest pipelines.
    let mut mappings_out: BTreeMap<String, Mapping> = BTreeMap::new();
    if let Some(mappings) = table.get("mapping") {
        let Value::Array(mappings) = mappings else {
            return Err(Error::Type { option: "mapping".into(), expected: "an array of tables ([[mapping]])" });
        };
        let mut indexes = BTreeMap::new();
        for m in mappings {
            let Value::Table(m) = m else { continue };
            let Some(ns) = string(m, "namespace")? else {
                note("[[mapping]]", "an entry without `namespace` is ignored".into());
                continue;
            };
            if m.contains_key("type") {
                note("[[mapping]].type", format!("`{ns}`: Elasticsearch 7+ has no mapping types; documents go to `_doc`"));
            }
            if !namespaces.iter().any(|p| p == &ns || p.strip_suffix(".*").is_some_and(|db| ns.split('.').next() == Some(db))) {
                note("[[mapping]]", format!("`{ns}` is not synced by this configuration; its mapping is left out"));
                continue;
            }
            if let Some(index) = string(m, "index")? {
                indexes.insert(ns.clone(), index);
            }
            if let Some(pipeline) = string(m, "pipeline")? {
                mappings_out.entry(ns.clone()).or_insert_with(|| Mapping { namespace: ns.clone(), ..Mapping::default() }).ingest_pipeline = Some(pipeline);
            }
        }
        spec.indexes = indexes;
    }

    // Options of every document: `index-as-update`, `index-oplog-time`.
    let as_update = boolean(&table, "index-as-update")? == Some(true);
    let oplog_time = if boolean(&table, "index-oplog-time")? == Some(true) {
        let mut t = OplogTime::default();
        if let Some(f) = string(&table, "oplog-ts-field-name")? {
            t.ts_field = f;
        }
        if let Some(f) = string(&table, "oplog-date-field-name")? {
            t.date_field = f;
        }
        if let Some(format) = string(&table, "oplog-date-field-format")? {
            if format != "2006/01/02 15:04:05" {
                note("oplog-date-field-format", format!("`{format}` is not carried: monsoon writes the date as `yyyy/MM/dd HH:mm:ss` (Monstache's default); map `{}` as a date with that format, or use the `T` seconds of `{}`", t.date_field, t.ts_field));
            }
        }
        Some(t)
    } else {
        for key in ["oplog-ts-field-name", "oplog-date-field-name", "oplog-date-field-format"] {
            if table.contains_key(key) {
                note(key, "ignored: `index-oplog-time` is not on".into());
            }
        }
        None
    };
    if as_update || oplog_time.is_some() {
        if spec.namespace_regex.is_some() {
            note(
                if as_update { "index-as-update" } else { "index-oplog-time" },
                "applies to the listed namespaces only: monsoon's mappings name namespaces, not the ones `namespace-regex` selects; add a mapping per database (`db.*`) for those".into(),
            );
        }
        for ns in &namespaces {
            mappings_out.entry(ns.clone()).or_insert_with(|| Mapping { namespace: ns.clone(), ..Mapping::default() });
        }
        for m in mappings_out.values_mut() {
            if as_update {
                if m.ingest_pipeline.is_some() {
                    note("index-as-update", format!("`{}` has an ingest pipeline, which partial updates do not run: its documents are indexed whole (as Monstache does)", m.namespace));
                } else {
                    m.write_mode = WriteMode::Update;
                }
            }
            m.oplog_time = oplog_time.clone();
        }
    }
    // [[script]], [[filter]]: carried as they are; [[pipeline]]: run now, its stages declared.
    let synced = |ns: &str| namespaces.iter().any(|p| p == ns || p.strip_suffix(".*").is_some_and(|db| ns.split('.').next() == Some(db)));
    let read_scripts = |key: &str, notes: &mut Vec<Note>| -> Result<Vec<(ScriptSpec, String)>, Error> {
        let Some(entries) = table.get(key) else { return Ok(Vec::new()) };
        let Value::Array(entries) = entries else {
            return Err(Error::Type { option: key.into(), expected: "an array of tables" });
        };
        let mut out = Vec::new();
        for e in entries {
            let Value::Table(e) = e else { continue };
            let namespace = string(e, "namespace")?;
            if let Some(ns) = &namespace {
                if !synced(ns) {
                    notes.push(Note { option: format!("[[{key}]]"), reason: format!("`{ns}` is not synced by this configuration; left out") });
                    continue;
                }
            }
            if e.contains_key("routing") {
                notes.push(Note { option: format!("[[{key}]].routing"), reason: "not needed: monsoon records where every scripted document goes, so deletes and moves reach it".into() });
            }
            let (spec, source) = match (string(e, "script")?, string(e, "path")?) {
                (Some(text), _) => (ScriptSpec { namespace: namespace.clone(), script: Some(text.clone()), script_from: None }, text),
                (None, Some(path)) => {
                    notes.push(Note {
                        option: format!("[[{key}]].path"),
                        reason: format!("`{path}` is read by `monsoon run` from where it runs, as Monstache did; in a cluster put it in a ConfigMap (`kubectl create configmap NAME --from-file={path}`) and use `scriptFrom.configMapKeyRef`"),
                    });
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    (ScriptSpec { namespace: namespace.clone(), script: None, script_from: Some(ValueFrom { file: Some(path), ..ValueFrom::default() }) }, text)
                }
                (None, None) => {
                    notes.push(Note { option: format!("[[{key}]]"), reason: "an entry with neither `script` nor `path` is left out".into() });
                    continue;
                }
            };
            out.push((spec, source));
        }
        Ok(out)
    };
    spec.scripts = read_scripts("script", &mut notes)?.into_iter().map(|(s, _)| s).collect();
    spec.filters = read_scripts("filter", &mut notes)?.into_iter().map(|(s, _)| s).collect();
    let pipelines = read_scripts("pipeline", &mut notes)?;
    if !pipelines.is_empty() {
        declare_pipelines(&pipelines, &namespaces, &mut mappings_out, &mut notes);
    }
    spec.mappings = mappings_out.into_values().collect();

    // Everything else: not needed, not yet supported, or unknown.
    const HANDLED: &[&str] = &[
        "mongo-url", "mongo-pem-file", "mongo-validate-pem-file", "elasticsearch-urls", "elasticsearch-user",
        "elasticsearch-password", "elasticsearch-pem-file", "elasticsearch-validate-pem-file", "gzip",
        "elasticsearch-max-docs", "elasticsearch-max-bytes", "elasticsearch-max-seconds", "elasticsearch-max-conns",
        "direct-read-namespaces", "change-stream-namespaces", "dropped-collections", "mapping",
        "namespace-regex", "namespace-exclude-regex", "index-as-update", "index-oplog-time", "oplog-ts-field-name",
        "oplog-date-field-name", "oplog-date-field-format", "script", "filter", "pipeline",
    ];
    for key in table.keys().filter(|k| !HANDLED.contains(&k.as_str())) {
        let reason = if let Some((_, why)) = NOT_NEEDED.iter().find(|(k, _)| k == key) {
            format!("not needed: {why}")
        } else if NOT_YET.contains(&key.as_str()) {
            "not supported yet".to_string()
        } else {
            "not a Monstache option monsoon knows; ignored".to_string()
        };
        notes.push(Note { option: key.clone(), reason });
    }

    let pipeline = SyncPipeline::new(name, SyncPipelineSpec { namespaces, ..spec });
    Ok(Conversion { pipeline, notes })
}

/// Monstache's `[[pipeline]]` scripts, run now for each namespace they apply to: their stages
/// become `mappings[].aggregation` (snapshot and change stream), which MongoDB then runs.
fn declare_pipelines(pipelines: &[(ScriptSpec, String)], namespaces: &[String], mappings: &mut BTreeMap<String, Mapping>, notes: &mut Vec<Note>) {
    let config = monsoon_script::Config {
        pipelines: pipelines.iter().map(|(s, source)| monsoon_script::ScriptSource { namespace: s.namespace.clone(), source: source.clone(), origin: None }).collect(),
        workers: 1,
        ..monsoon_script::Config::default()
    };
    let scripts = match monsoon_script::Scripts::new(config) {
        Ok(s) => s,
        Err(e) => {
            notes.push(Note { option: "[[pipeline]]".into(), reason: format!("not carried: {e}") });
            return;
        }
    };
    let global = pipelines.iter().any(|(s, _)| s.namespace.is_none());
    let mut targets: Vec<String> = pipelines.iter().filter_map(|(s, _)| s.namespace.clone()).collect();
    if global {
        for ns in namespaces {
            if ns.ends_with(".*") {
                notes.push(Note { option: "[[pipeline]]".into(), reason: format!("the global pipeline is not declared for `{ns}`: monsoon's stages name collections; add a mapping per collection") });
            } else {
                targets.push(ns.clone());
            }
        }
    }
    targets.sort();
    targets.dedup();
    for ns in targets {
        let mut aggregation = Aggregation::default();
        for (change_stream, slot, allowed) in [(false, &mut aggregation.snapshot, monsoon_api::shape::SNAPSHOT_STAGES), (true, &mut aggregation.change_stream, &["$match"][..])] {
            match scripts.pipeline(&ns, change_stream) {
                Ok(stages) => match monsoon_api::shape::stages(&stages, allowed, "monsoon cannot run there") {
                    Ok(_) => *slot = stages,
                    Err(why) => notes.push(Note {
                        option: "[[pipeline]]".into(),
                        reason: format!("`{ns}` {}: {why}; left out", if change_stream { "change stream" } else { "direct reads" }),
                    }),
                },
                Err(e) => notes.push(Note { option: "[[pipeline]]".into(), reason: format!("`{ns}`: {e}; left out") }),
            }
        }
        if !aggregation.snapshot.is_empty() || !aggregation.change_stream.is_empty() {
            mappings.entry(ns.clone()).or_insert_with(|| Mapping { namespace: ns.clone(), ..Mapping::default() }).aggregation = Some(aggregation);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn converted(text: &str) -> Conversion {
        let c = convert(text, "shop").expect("converts");
        // The output always passes validation.
        let yaml = serde_saphyr::to_string(&c.pipeline).expect("yaml");
        monsoon_api::parse_manifest(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        c
    }

    fn noted<'a>(c: &'a Conversion, option: &str) -> Option<&'a str> {
        c.notes.iter().find(|n| n.option == option).map(|n| n.reason.as_str())
    }

    #[test]
    fn connection_namespaces_batching_and_mappings_carry_over() {
        let c = converted(
            r#"
mongo-url = "mongodb://db-0:27017/?replicaSet=rs0"
elasticsearch-urls = ["https://es-1:9200", "https://es-2:9200"]
elasticsearch-pem-file = "/etc/ssl/es-ca.pem"
gzip = true
direct-read-namespaces = ["shop.orders"]
change-stream-namespaces = ["shop.orders", "logs"]
elasticsearch-max-docs = 500
elasticsearch-max-seconds = 2
elasticsearch-max-conns = 8
dropped-collections = false

[[mapping]]
namespace = "shop.orders"
index = "orders"
type = "order"
"#,
        );
        let s = &c.pipeline.spec;
        assert_eq!(s.mongodb.uri.as_deref(), Some("mongodb://db-0:27017/?replicaSet=rs0"));
        assert_eq!(s.elasticsearch.urls, ["https://es-1:9200", "https://es-2:9200"]);
        assert_eq!(s.elasticsearch.ca_from.as_ref().and_then(|v| v.file.as_deref()), Some("/etc/ssl/es-ca.pem"));
        assert!(s.elasticsearch.gzip);
        assert_eq!(s.namespaces, ["logs.*", "shop.orders"]);
        assert!(s.snapshot);
        assert_eq!((s.batch.max_docs, s.batch.flush_interval_ms, s.batch.concurrency), (500, 2000, 8));
        assert_eq!(s.on_drop, DropPolicy::Keep);
        assert_eq!(s.indexes.get("shop.orders").map(String::as_str), Some("orders"));
        assert!(noted(&c, "[[mapping]].type").is_some_and(|r| r.contains("no mapping types")));
    }

    #[test]
    fn credentials_are_never_copied() {
        let c = converted(
            r#"
mongo-url = "mongodb://app:s3cret@db-0:27017/"
elasticsearch-user = "elastic"
elasticsearch-password = "hunter2"
change-stream-namespaces = ["shop.orders"]
"#,
        );
        let yaml = serde_saphyr::to_string(&c.pipeline).expect("yaml");
        assert!(!yaml.contains("s3cret") && !yaml.contains("hunter2"), "{yaml}");
        assert_eq!(c.pipeline.spec.mongodb.uri_from.as_ref().and_then(|v| v.env.as_deref()), Some(ENV_MONGODB_URI));
        assert_eq!(c.pipeline.spec.elasticsearch.password_from.as_ref().and_then(|v| v.env.as_deref()), Some(ENV_ES_PASSWORD));
        assert!(noted(&c, "mongo-url").is_some_and(|r| r.contains(ENV_MONGODB_URI)));
        assert!(!c.pipeline.spec.snapshot, "no direct reads: changes only");
    }

    #[test]
    fn every_option_left_out_is_named_with_a_reason() {
        let c = converted(
            r#"
change-stream-namespaces = ["shop.orders"]
direct-read-namespaces = ["shop.orders", "shop.users"]
resume = true
workers = ["a", "b"]
time-machine-namespaces = ["shop.orders"]
no-such-option = 1

[[script]]
namespace = "shop.orders"
script = "module.exports = function(doc) { return doc; }"
"#,
        );
        assert!(noted(&c, "resume").is_some_and(|r| r.starts_with("not needed")));
        assert!(noted(&c, "workers").is_some_and(|r| r.contains("spec.workers")));
        assert_eq!(noted(&c, "time-machine-namespaces"), Some("not supported yet"));
        assert_eq!(c.pipeline.spec.scripts.len(), 1, "[[script]] is carried");
        assert!(noted(&c, "no-such-option").is_some_and(|r| r.contains("ignored")));
        // A direct-read namespace outside the change streams is synced anyway, and said so.
        assert!(c.pipeline.spec.namespaces.contains(&"shop.users".to_string()));
        assert!(noted(&c, "direct-read-namespaces").is_some_and(|r| r.contains("shop.users")));
    }

    #[test]
    fn index_as_update_oplog_time_and_mapping_pipelines_become_mappings() {
        let c = converted(
            r#"
change-stream-namespaces = ["shop.orders", "logs"]
index-as-update = true
index-oplog-time = true
oplog-ts-field-name = "ts"
oplog-date-field-format = "2006-01-02"
routing-namespaces = ["shop.orders"]
delete-strategy = 1

[[mapping]]
namespace = "logs.app"
index = "app-logs"
pipeline = "parse-logs"
"#,
        );
        let m = &c.pipeline.spec.mappings;
        let by_ns = |ns: &str| m.iter().find(|m| m.namespace == ns).unwrap_or_else(|| panic!("{ns}: {m:?}"));
        let orders = by_ns("shop.orders");
        assert_eq!(orders.write_mode, WriteMode::Update);
        assert_eq!(orders.oplog_time.as_ref().map(|t| (t.ts_field.as_str(), t.date_field.as_str())), Some(("ts", "oplog_date")));
        assert_eq!(by_ns("logs.*").write_mode, WriteMode::Update);
        // Partial updates run no ingest pipeline: indexed whole, as Monstache does, and said so.
        let app = by_ns("logs.app");
        assert_eq!((app.ingest_pipeline.as_deref(), app.write_mode), (Some("parse-logs"), WriteMode::Index));
        assert!(noted(&c, "index-as-update").is_some_and(|r| r.contains("logs.app")));
        assert_eq!(c.pipeline.spec.indexes.get("logs.app").map(String::as_str), Some("app-logs"));
        assert!(noted(&c, "oplog-date-field-format").is_some_and(|r| r.contains("yyyy/MM/dd")));
        assert!(noted(&c, "routing-namespaces").is_some_and(|r| r.starts_with("not needed")));
        assert!(noted(&c, "delete-strategy").is_some_and(|r| r.contains("monsoon-locations")));
    }

    #[test]
    fn scripts_filters_and_pipelines_of_monstaches_docs_carry_over() {
        let dir = std::env::temp_dir().join(format!("monsoon-convert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("transform.js");
        std::fs::write(&path, "module.exports = function(doc) { return doc; }").expect("write");
        let text = format!(
            r#"
change-stream-namespaces = ["test.test", "blog.comments", "anotherdb.anothercollection"]

[[script]]
script = """
module.exports = function(doc, ns, updateDesc) {{
  return _.omit(doc, "password", "secret");
}}
"""

[[script]]
namespace = "blog.comments"
routing = true
script = """
module.exports = function(doc) {{
  doc._meta_monstache = {{ routing: doc.post_id }};
  return doc;
}}
"""

[[script]]
namespace = "anotherdb.anothercollection"
path = "{}"

[[filter]]
namespace = "test.test"
script = "module.exports = function(doc, ns, updateDesc) {{ return !!doc.interesting; }}"

[[pipeline]]
namespace = "test.test"
script = """
module.exports = function(ns, changeStream) {{
  if (changeStream) {{
    return [{{ $match: {{ $or: [{{ "updateDescription": {{$exists: false}} }}, {{ "updateDescription.updatedFields.foo": {{$exists: true}} }}] }} }}];
  }} else {{
    return [];
  }}
}}
"""

[[pipeline]]
namespace = "blog.comments"
script = "module.exports = function(ns, changeStream) {{ return [{{ $group: {{ _id: 1 }} }}]; }}"
"#,
            path.display()
        );
        let c = converted(&text);
        let s = &c.pipeline.spec;
        assert_eq!(s.scripts.len(), 3);
        assert!(s.scripts[0].namespace.is_none() && s.scripts[0].script.as_deref().is_some_and(|t| t.contains("_.omit")));
        assert_eq!(s.scripts[2].script_from.as_ref().and_then(|f| f.file.as_deref()), Some(path.to_str().expect("utf8")));
        assert!(noted(&c, "[[script]].path").is_some_and(|r| r.contains("configMapKeyRef")));
        assert!(noted(&c, "[[script]].routing").is_some_and(|r| r.starts_with("not needed")));
        assert_eq!(s.filters.len(), 1);
        let watch = s.mappings.iter().find(|m| m.namespace == "test.test").and_then(|m| m.aggregation.clone()).expect("declared stages");
        assert!(watch.snapshot.is_empty());
        assert_eq!(watch.change_stream.len(), 1);
        assert!(watch.change_stream[0].to_string().contains("updateDescription.updatedFields.foo"));
        // A stage monsoon cannot run is said so, not carried.
        assert!(c.notes.iter().any(|n| n.option == "[[pipeline]]" && n.reason.contains("`$group`")), "{:?}", c.notes);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn namespace_regular_expressions_carry_over() {
        let c = converted(
            r#"
namespace-regex = "^(shop|logs)\\."
namespace-exclude-regex = "\\.tmp$"
"#,
        );
        assert!(c.pipeline.spec.namespaces.is_empty());
        assert_eq!(c.pipeline.spec.namespace_regex.as_deref(), Some(r"^(shop|logs)\."));
        assert_eq!(c.pipeline.spec.exclude_namespace_regex.as_deref(), Some(r"\.tmp$"));
        assert!(!c.pipeline.spec.snapshot);
    }

    #[test]
    fn unusable_input_is_one_clear_error() {
        assert!(matches!(convert("mongo-url = ", "x"), Err(Error::Toml(_))));
        assert!(matches!(convert("direct-read-namespaces = \"shop.orders\"", "x"), Err(Error::Type { .. })));
        assert!(matches!(convert("mongo-url = \"mongodb://h\"", "x"), Err(Error::NoNamespaces)));
    }

    #[test]
    fn pipeline_names_are_dns_labels() {
        assert_eq!(pipeline_name("Monstache_Prod.Config"), "monstache-prod-config");
        assert_eq!(pipeline_name("___"), "monstache");
    }
}
