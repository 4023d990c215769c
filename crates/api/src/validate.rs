//! Parsing of pipeline manifests and the cross-field rules of a `SyncPipeline`.
//!
//! [`parse_manifest`] turns YAML into a [`SyncPipeline`], refusing unknown fields and naming
//! the path of every type error. [`validate`] applies every rule the engine relies on and
//! returns all violations at once, each naming the field and the fix.
//!
//! This crate carries no MongoDB driver (it is the types every crate shares): how the driver
//! reads a connection string is a [`ConnectionStringCheck`] the caller passes in, the engine's
//! `monsoon_engine::check_connection_string`, so `validate` refuses what `run` would.

use std::collections::BTreeMap;
use std::fmt;

use crate::spec::*;
use crate::{API_VERSION, KIND};

/// One rule a pipeline breaks: the field's path (`spec.namespaces[1]`) and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the offending field, as in `kubectl explain`.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not YAML at all.
    #[error("failed to parse YAML: {0}")]
    Yaml(String),
    /// YAML, but not a `SyncPipeline`.
    #[error("{field}: {message}")]
    Shape {
        /// Path of the offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A `SyncPipeline` that breaks rules.
    #[error("invalid pipeline:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// Whether the MongoDB driver accepts a connection string, as `monsoon run` and the workers
/// will read it (options, their values, auth mechanisms and the credentials each needs),
/// without resolving `mongodb+srv` names or connecting.
///
/// `Err` says what is wrong and the fix, and never repeats the connection string (it may hold
/// credentials when it came from a Secret or file). The engine supplies the one used outside
/// tests, `monsoon_engine::check_connection_string`, so this crate builds without the driver.
pub type ConnectionStringCheck = fn(&str) -> Result<(), String>;

/// A pipeline that passed [`validate`]: the engine may take it as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedPipeline {
    /// `metadata.name`.
    pub name: String,
    /// The spec, unchanged.
    pub spec: SyncPipelineSpec,
}

/// Read a `SyncPipeline` manifest from YAML and validate it, connection string included
/// (`uri_check`).
///
/// # Errors
/// [`ManifestError::Invalid`] listing every unknown or mistyped field and every rule broken
/// (a required field that cannot be read at all is a [`ManifestError::Shape`]).
pub fn parse_manifest(yaml: &str, uri_check: ConnectionStringCheck) -> Result<ValidatedPipeline, ManifestError> {
    let value: serde_json::Value =
        serde_saphyr::from_str(yaml).map_err(|e| ManifestError::Yaml(e.to_string()))?;
    let api_version = value.get("apiVersion").and_then(|v| v.as_str());
    if api_version != Some(API_VERSION) {
        return Err(ManifestError::Shape {
            field: "apiVersion".into(),
            message: format!("must be `{API_VERSION}` (found {api_version:?})"),
        });
    }
    let kind = value.get("kind").and_then(|v| v.as_str());
    if kind != Some(KIND) {
        return Err(ManifestError::Shape {
            field: "kind".into(),
            message: format!("must be `{KIND}` (found {kind:?})"),
        });
    }
    let (pipeline, mut problems) = deserialize_leniently(value)?;
    match validate(&pipeline, uri_check) {
        Ok(valid) if problems.is_empty() => Ok(valid),
        Ok(_) => Err(ManifestError::Invalid(problems)),
        Err(errors) => {
            // A field set aside as unreadable may then break a rule (a required list now
            // empty): its shape problem already says what is wrong.
            let fresh: Vec<FieldError> = errors.into_iter().filter(|e| !problems.iter().any(|p| p.field == e.field)).collect();
            problems.extend(fresh);
            Err(ManifestError::Invalid(problems))
        }
    }
}

/// Most fields set aside while reading one manifest: far more than any real manifest has,
/// and a bound on the work a hostile one can cause.
const MAX_SHAPE_PROBLEMS: usize = 64;

/// Deserialize a manifest, reporting every unknown field and every value of the wrong type
/// or outside its enum, not only the first: each offending field is noted, set aside, and the
/// rest read again, so the rules can then be checked on what remains.
///
/// # Errors
/// [`ManifestError::Shape`] when a required field itself is unusable (nothing sensible is
/// left to check).
fn deserialize_leniently(mut value: serde_json::Value) -> Result<(SyncPipeline, Vec<FieldError>), ManifestError> {
    let mut problems = Vec::new();
    let mut removed: Vec<String> = Vec::new();
    loop {
        let mut unknown = Vec::new();
        let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
        let ignoring = serde_ignored::Deserializer::new(&value, &mut note_unknown);
        match serde_path_to_error::deserialize::<_, SyncPipeline>(ignoring) {
            Ok(pipeline) => {
                problems.extend(
                    unknown
                        .into_iter()
                        .filter(|p| !(p == "apiVersion" || p == "kind" || p.starts_with("metadata")))
                        .map(|field| FieldError {
                            field,
                            message: "unknown field; check its spelling against `monsoon crd` or the README".into(),
                        }),
                );
                problems.sort_by(|a, b| a.field.cmp(&b.field));
                return Ok((pipeline, problems));
            }
            Err(e) => {
                let field = e.path().to_string();
                let message = e.inner().to_string();
                // A required field set aside above now reads as missing: already reported.
                if removed.iter().any(|r| message == format!("missing field `{}`", r.rsplit('.').next().unwrap_or(r))) {
                    return Err(ManifestError::Invalid(problems));
                }
                let usable = problems.len() < MAX_SHAPE_PROBLEMS && remove_path(&mut value, &field);
                let problem = FieldError { field: field.clone(), message };
                if !usable {
                    // Nothing more can be read: report this with what came before.
                    if problems.is_empty() {
                        return Err(ManifestError::Shape { field, message: problem.message });
                    }
                    problems.push(problem);
                    return Err(ManifestError::Invalid(problems));
                }
                problems.push(problem);
                removed.push(field);
            }
        }
    }
}

/// Remove the object field at a `serde_path_to_error` path (`spec.batch.maxDocs`); whether
/// one was removed. List elements (`spec.namespaces[2]`) are never removed, since that would
/// shift the positions of the problems reported after them: a problem inside a list ends the
/// lenient reading.
fn remove_path(value: &mut serde_json::Value, path: &str) -> bool {
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else { return false };
    if last.contains('[') || path.is_empty() || path == "?" {
        return false;
    }
    let mut node = value;
    for part in parts {
        match node.get_mut(part) {
            Some(next) => node = next,
            None => return false,
        }
    }
    node.as_object_mut().is_some_and(|o| o.remove(last).is_some())
}

/// Check every rule of a pipeline; return all violations. An inline `spec.mongodb.uri` is
/// also read by `uri_check`, the driver's parser (a `uriFrom` value is read when the engine
/// starts: it is not known here).
///
/// # Errors
/// Every [`FieldError`] found, in field order.
pub fn validate(pipeline: &SyncPipeline, uri_check: ConnectionStringCheck) -> Result<ValidatedPipeline, Vec<FieldError>> {
    let mut errs = Errors::default();
    let name = pipeline.metadata.name.clone().unwrap_or_default();
    if !is_dns_label(&name) {
        errs.push(
            "metadata.name",
            "must be 1-63 lower-case letters, digits or '-', starting and ending with a letter or digit",
        );
    }
    let spec = &pipeline.spec;
    validate_mongodb(&spec.mongodb, uri_check, &mut errs);
    validate_elasticsearch(&spec.elasticsearch, &mut errs);

    if spec.namespaces.is_empty() && spec.namespace_regex.is_none() {
        errs.push(
            "spec.namespaces",
            "must list at least one namespace, e.g. `shop.orders` or `shop.*` (or set `namespaceRegex`)",
        );
    }
    for (field, regex) in [("spec.namespaceRegex", &spec.namespace_regex), ("spec.excludeNamespaceRegex", &spec.exclude_namespace_regex)] {
        if let Some(Err(e)) = regex.as_deref().map(namespace_regex) {
            errs.push(field, format!("is not a regular expression monsoon reads (RE2 syntax): {e}"));
        }
    }
    for (i, ns) in spec.namespaces.iter().enumerate() {
        if let Err(m) = NamespacePattern::parse(ns) {
            errs.push(format!("spec.namespaces[{i}]"), m);
        }
    }
    for (i, ns) in spec.exclude_namespaces.iter().enumerate() {
        if let Err(m) = NamespacePattern::parse(ns) {
            errs.push(format!("spec.excludeNamespaces[{i}]"), m);
        }
    }
    let patterns: Vec<NamespacePattern> = spec
        .namespaces
        .iter()
        .filter_map(|n| NamespacePattern::parse(n).ok())
        .collect();
    for (ns, index) in &spec.indexes {
        let field = format!("spec.indexes[{ns:?}]");
        match NamespacePattern::parse(ns) {
            Ok(NamespacePattern {
                collection: Some(_),
                ..
            }) => {
                if !patterns.iter().any(|p| p.matches_ns(ns)) {
                    errs.push(
                        field.clone(),
                        "names a namespace that `spec.namespaces` does not include; add it there or remove this entry",
                    );
                }
            }
            Ok(_) => errs.push(
                field.clone(),
                "must name one collection (`db.collection`), not a wildcard",
            ),
            Err(m) => errs.push(field.clone(), m),
        }
        if let Err(m) = check_index_name(index) {
            errs.push(field, m);
        }
    }
    for p in &patterns {
        if let Some(coll) = &p.collection {
            let ns = format!("{}.{coll}", p.database);
            if !spec.indexes.contains_key(&ns) {
                if let Err(m) = check_index_name(&ns.to_lowercase()) {
                    errs.push(
                        "spec.namespaces",
                        format!("`{ns}` gives the index name `{}`, which {m}; map it to a valid name in `spec.indexes`", ns.to_lowercase()),
                    );
                }
            }
        }
    }

    validate_snapshot_namespaces(spec, &patterns, &mut errs);
    validate_time_machine(spec, &patterns, &mut errs);
    let regex = spec.namespace_regex.as_deref().and_then(|r| namespace_regex(r).ok());
    crate::patches::validate(spec, |p| is_synced(p, &patterns, regex.as_ref()), &mut errs.0);
    validate_relate(spec, &patterns, &mut errs);
    if let Some(start) = &spec.stream_start {
        match (start.timestamp, start.oldest) {
            (Some(0), _) => errs.push("spec.streamStart.timestamp", "must be seconds since the Unix epoch (1 or more)"),
            (Some(_), true) | (None, false) => errs.push("spec.streamStart", "set exactly one of `timestamp` (seconds since the Unix epoch) and `oldest: true`"),
            _ => {}
        }
    }
    check_shared_indexes(spec, &patterns, &mut errs);
    for (i, index) in spec.shared_indexes.iter().enumerate() {
        if let Err(why) = crate::check_index_name(index) {
            errs.push(format!("spec.sharedIndexes[{i}]"), format!("`{index}` {why}"));
        }
    }
    validate_mappings(spec, &patterns, &mut errs);
    validate_scripts(spec, &patterns, &mut errs);

    let b = &spec.batch;
    if !(1..=100_000).contains(&b.max_docs) {
        errs.push("spec.batch.maxDocs", "must be between 1 and 100000");
    }
    if !(64 * 1024..=100 * 1024 * 1024).contains(&b.max_bytes) {
        errs.push(
            "spec.batch.maxBytes",
            "must be between 65536 (64 KiB) and 104857600 (100 MiB)",
        );
    }
    if !(1..=60_000).contains(&b.flush_interval_ms) {
        errs.push("spec.batch.flushIntervalMs", "must be between 1 and 60000");
    }
    if !(1..=64).contains(&b.concurrency) {
        errs.push("spec.batch.concurrency", "must be between 1 and 64");
    }
    if let Err(m) = check_index_name(&spec.dead_letter.index) {
        errs.push("spec.deadLetter.index", m);
    }
    if !(1..=64).contains(&spec.workers) {
        errs.push("spec.workers", "must be between 1 and 64");
    }

    if errs.0.is_empty() {
        Ok(ValidatedPipeline {
            name,
            spec: spec.clone(),
        })
    } else {
        Err(errs.0)
    }
}

/// The rules a pipeline must also follow in a cluster, beyond [`validate`]: values come from
/// Secrets (or, for CA bundles, ConfigMaps) in the pipeline's namespace, never from the
/// operator's environment or files.
///
/// # Errors
/// Every [`FieldError`] found.
pub fn validate_for_cluster(pipeline: &SyncPipeline, uri_check: ConnectionStringCheck) -> Result<ValidatedPipeline, Vec<FieldError>> {
    let validated = validate(pipeline, uri_check);
    let mut errs = match &validated {
        Ok(_) => Errors::default(),
        Err(e) => Errors(e.clone()),
    };
    for (field, from) in value_sources(&pipeline.spec) {
        if from.env.is_some() || from.file.is_some() {
            errs.push(
                field,
                "`env` and `file` only work with `monsoon run`; in a cluster use `secretKeyRef` (a Secret in the pipeline's namespace; `configMapKeyRef` also works for a CA bundle)",
            );
        }
    }
    if errs.0.is_empty() {
        validated
    } else {
        Err(errs.0)
    }
}

/// Every `*From` field of a spec that is set, with its path.
pub fn value_sources(spec: &SyncPipelineSpec) -> Vec<(String, &ValueFrom)> {
    let fixed = [
        ("spec.mongodb.uriFrom", spec.mongodb.uri_from.as_ref()),
        ("spec.mongodb.caFrom", spec.mongodb.ca_from.as_ref()),
        ("spec.mongodb.clientCertFrom", spec.mongodb.client_cert_from.as_ref()),
        ("spec.mongodb.clientKeyFrom", spec.mongodb.client_key_from.as_ref()),
        ("spec.elasticsearch.passwordFrom", spec.elasticsearch.password_from.as_ref()),
        ("spec.elasticsearch.apiKeyFrom", spec.elasticsearch.api_key_from.as_ref()),
        ("spec.elasticsearch.caFrom", spec.elasticsearch.ca_from.as_ref()),
        ("spec.elasticsearch.clientCertFrom", spec.elasticsearch.client_cert_from.as_ref()),
        ("spec.elasticsearch.clientKeyFrom", spec.elasticsearch.client_key_from.as_ref()),
        ("spec.elasticsearch.aws.accessKeyIdFrom", spec.elasticsearch.aws.as_ref().and_then(|a| a.access_key_id_from.as_ref())),
        ("spec.elasticsearch.aws.secretAccessKeyFrom", spec.elasticsearch.aws.as_ref().and_then(|a| a.secret_access_key_from.as_ref())),
        ("spec.elasticsearch.aws.sessionTokenFrom", spec.elasticsearch.aws.as_ref().and_then(|a| a.session_token_from.as_ref())),
    ];
    let scripts = [("scripts", &spec.scripts), ("filters", &spec.filters)]
        .into_iter()
        .flat_map(|(list, items)| items.iter().enumerate().filter_map(move |(i, s)| s.script_from.as_ref().map(|v| (format!("spec.{list}[{i}].scriptFrom"), v))));
    fixed.into_iter().filter_map(|(f, v)| v.map(|v| (f.to_string(), v))).chain(scripts).collect()
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

fn validate_mongodb(m: &MongoSource, uri_check: ConnectionStringCheck, errs: &mut Errors) {
    match (&m.uri, &m.uri_from) {
        (None, None) => errs.push(
            "spec.mongodb.uri",
            "set `uri` (no credentials) or `uriFrom` (env, file or secretKeyRef)",
        ),
        (Some(_), Some(_)) => errs.push(
            "spec.mongodb.uriFrom",
            "set only one of `uri` and `uriFrom`",
        ),
        (Some(uri), None) => {
            if !(uri.starts_with("mongodb://") || uri.starts_with("mongodb+srv://")) {
                errs.push(
                    "spec.mongodb.uri",
                    "must start with `mongodb://` or `mongodb+srv://`",
                );
            } else if uri_has_password(uri) {
                errs.push(
                    "spec.mongodb.uri",
                    "holds a password; move the whole connection string to a Secret or file and reference it with `uriFrom`",
                );
            } else if let Err(e) = uri_check(uri) {
                errs.push("spec.mongodb.uri", e);
            }
        }
        (None, Some(from)) => validate_value_from(from, "spec.mongodb.uriFrom", errs),
    }
    if let Some(ca) = &m.ca_from {
        validate_value_from(ca, "spec.mongodb.caFrom", errs);
    }
    validate_client_certificate("spec.mongodb", &m.client_cert_from, &m.client_key_from, errs);
}

/// A client certificate and its key: both or neither, each from a valid source.
fn validate_client_certificate(parent: &str, cert: &Option<ValueFrom>, key: &Option<ValueFrom>, errs: &mut Errors) {
    match (cert, key) {
        (Some(_), None) => errs.push(format!("{parent}.clientKeyFrom"), "is required when `clientCertFrom` is set"),
        (None, Some(_)) => errs.push(format!("{parent}.clientCertFrom"), "is required when `clientKeyFrom` is set"),
        _ => {}
    }
    for (name, from) in [("clientCertFrom", cert), ("clientKeyFrom", key)] {
        if let Some(from) = from {
            validate_value_from(from, &format!("{parent}.{name}"), errs);
        }
    }
}

/// Compile a namespace regular expression as the engine will (RE2 syntax, unanchored, matched
/// against `db.collection`); the size limit keeps a hostile pattern from costing much.
///
/// # Errors
/// The parser's message.
pub fn namespace_regex(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(pattern).size_limit(1 << 20).build()
}

/// Whether the pipeline syncs what `p` names (a collection, or every collection of a database
/// for `db.*`): a pattern of `spec.namespaces` covers it, or `namespaceRegex` may select it.
fn is_synced(p: &NamespacePattern, patterns: &[NamespacePattern], regex: Option<&regex::Regex>) -> bool {
    match &p.collection {
        Some(c) => patterns.iter().any(|q| q.matches(&p.database, c)) || regex.is_some_and(|r| r.is_match(&format!("{}.{c}", p.database))),
        None => patterns.iter().any(|q| q.database == p.database) || regex.is_some(),
    }
}

/// `spec.snapshotNamespaces`: patterns of namespaces the pipeline syncs, with `snapshot` on.
fn validate_snapshot_namespaces(spec: &SyncPipelineSpec, patterns: &[NamespacePattern], errs: &mut Errors) {
    let regex = spec.namespace_regex.as_deref().and_then(|r| namespace_regex(r).ok());
    for (i, ns) in spec.snapshot_namespaces.iter().enumerate() {
        let field = format!("spec.snapshotNamespaces[{i}]");
        match NamespacePattern::parse(ns) {
            Ok(p) if !is_synced(&p, patterns, regex.as_ref()) => {
                errs.push(field, format!("`{ns}` is not synced by this pipeline; add it to `spec.namespaces` or remove it here"));
            }
            Ok(_) => {}
            Err(m) => errs.push(field, m),
        }
    }
    if let Some(files) = &spec.files {
        for (i, ns) in files.namespaces.iter().enumerate() {
            let field = format!("spec.files.namespaces[{i}]");
            match ns.split_once('.') {
                Some((db, coll)) if coll.ends_with(".files") && coll.len() > ".files".len() && !db.is_empty() => {
                    let exact = NamespacePattern { database: db.to_string(), collection: Some(coll.to_string()) };
                    // Scripts and filters may shape and drop files: they see the files
                    // collection's document, and the content is added after them.
                    if !is_synced(&exact, patterns, regex.as_ref()) {
                        errs.push(field, format!("`{ns}` is not synced: add it (or its database) to `namespaces`"));
                    }
                }
                _ => errs.push(field, format!("`{ns}` is not a GridFS files collection: write `db.fs.files`, or `db.<bucket>.files`")),
            }
        }
        if !(1..=100 << 20).contains(&files.max_file_size) {
            errs.push("spec.files.maxFileSize", format!("{} bytes: use 1 to 104857600 (100 MiB, Elasticsearch's default request limit)", files.max_file_size));
        }
        if files.pipeline.is_empty() {
            errs.push("spec.files.pipeline", "name the ingest pipeline (default `attachment`)".to_string());
        }
    }
    if let Some(split) = &spec.snapshot_split {
        if !(2..=64).contains(&split.ranges) {
            errs.push("spec.snapshotSplit.ranges", format!("{} ranges: use 2 to 64 (leave `snapshotSplit` out to read each collection in one pass)", split.ranges));
        }
        if split.min_documents == 0 {
            errs.push("spec.snapshotSplit.minDocuments", "must be at least 1".to_string());
        }
    }
    if !spec.snapshot && !spec.snapshot_namespaces.is_empty() {
        errs.push("spec.snapshotNamespaces", "has no effect with `snapshot: false`; set `snapshot: true`, or remove it");
    }
}

/// `spec.timeMachine`: namespaces the pipeline syncs, a prefix and a date format that make
/// valid index names.
fn validate_time_machine(spec: &SyncPipelineSpec, patterns: &[NamespacePattern], errs: &mut Errors) {
    let Some(tm) = &spec.time_machine else { return };
    let regex = spec.namespace_regex.as_deref().and_then(|r| namespace_regex(r).ok());
    if tm.namespaces.is_empty() {
        errs.push("spec.timeMachine.namespaces", "must list at least one namespace (`db.collection` or `db.*`) whose changes are logged");
    }
    for (i, ns) in tm.namespaces.iter().enumerate() {
        let field = format!("spec.timeMachine.namespaces[{i}]");
        match NamespacePattern::parse(ns) {
            Ok(p) if !is_synced(&p, patterns, regex.as_ref()) => {
                errs.push(field, format!("`{ns}` is not synced by this pipeline; add it to `spec.namespaces` or remove it here"));
            }
            Ok(_) => {}
            Err(m) => errs.push(field, m),
        }
    }
    if let Err(m) = check_index_name(&tm.index_prefix) {
        errs.push("spec.timeMachine.indexPrefix", m);
    } else if tm.index_prefix.len() > 100 {
        errs.push("spec.timeMachine.indexPrefix", "must be at most 100 bytes long");
    }
    if let Err(m) = crate::shape::DateFormat::parse(&tm.index_suffix) {
        errs.push("spec.timeMachine.indexSuffix", m);
    }
    if tm.snapshot && !spec.snapshot {
        errs.push("spec.timeMachine.snapshot", "has no effect with `snapshot: false`; set `snapshot: true`, or remove it");
    }
}

/// `spec.relate`: each relation joins a namespace the pipeline follows to an exact namespace,
/// through field paths that parse.
fn validate_relate(spec: &SyncPipelineSpec, patterns: &[NamespacePattern], errs: &mut Errors) {
    let regex = spec.namespace_regex.as_deref().and_then(|r| namespace_regex(r).ok());
    let patched = |ns: &str| {
        spec.merge_patches.as_ref().is_some_and(|m| m.namespaces.iter().filter_map(|n| NamespacePattern::parse(n).ok()).any(|p| p.matches_ns(ns)))
    };
    for (i, r) in spec.relate.iter().enumerate() {
        let at = |field: &str| format!("spec.relate[{i}].{field}");
        match NamespacePattern::parse(&r.namespace) {
            Ok(p) if p.collection.is_none() => errs.push(at("namespace"), format!("`{}` names no collection: a relation starts from one collection; write `db.collection`", r.namespace)),
            Ok(p) if !is_synced(&p, patterns, regex.as_ref()) => errs.push(
                at("namespace"),
                format!("`{}` is not synced by this pipeline, so its changes are never read; add it to `spec.namespaces`", r.namespace),
            ),
            Ok(_) => {}
            Err(m) => errs.push(at("namespace"), m),
        }
        match NamespacePattern::parse(&r.with_namespace) {
            Ok(p) if p.collection.is_none() => errs.push(at("withNamespace"), format!("`{}` names no collection: write `db.collection` (a collection or a view)", r.with_namespace)),
            Ok(_) if patched(&r.with_namespace) => errs.push(
                at("withNamespace"),
                format!("`{}` keeps merge patches (`spec.mergePatches`), whose versions come from change events, not lookups: relate into a namespace without merge patches", r.with_namespace),
            ),
            Ok(_) => {}
            Err(m) => errs.push(at("withNamespace"), m),
        }
        for (field, path) in [("srcField", &r.src_field), ("matchField", &r.match_field)] {
            if let Err(m) = crate::shape::FieldPath::parse(path) {
                errs.push(at(field), m);
            }
        }
    }
}

/// `spec.mappings`: each entry names a namespace the pipeline syncs, once, and every field
/// parses (templates, paths, queries), with combinations that cannot work refused.
fn validate_mappings(spec: &SyncPipelineSpec, patterns: &[NamespacePattern], errs: &mut Errors) {
    use crate::shape::{FieldPath, IndexTemplate, Query};
    let regex = spec.namespace_regex.as_deref().and_then(|r| namespace_regex(r).ok());
    let mut seen = std::collections::BTreeSet::new();
    for (i, m) in spec.mappings.iter().enumerate() {
        let at = |field: &str| format!("spec.mappings[{i}].{field}");
        match NamespacePattern::parse(&m.namespace) {
            Ok(p) => {
                if !is_synced(&p, patterns, regex.as_ref()) {
                    errs.push(at("namespace"), format!("`{}` is not synced by this pipeline; add it to `spec.namespaces` or remove this mapping", m.namespace));
                }
                if p.collection.is_some() && m.index.is_some() && spec.indexes.contains_key(&m.namespace) {
                    errs.push(at("index"), format!("`spec.indexes` also names an index for `{}`; keep one of the two", m.namespace));
                }
                if p.collection.is_none() && m.index.as_deref().is_some_and(|t| IndexTemplate::parse(t).ok().is_some_and(|t| t.fixed().is_some())) {
                    errs.push(at("index"), "a fixed index for every collection of a database would mix their documents in one index; use a template with a field, e.g. `{category}`, or one mapping per collection");
                }
            }
            Err(msg) => errs.push(at("namespace"), msg),
        }
        if !seen.insert(m.namespace.clone()) {
            errs.push(at("namespace"), format!("`{}` has another mapping before this one; merge the two", m.namespace));
        }
        if let Some(t) = &m.index {
            if let Err(msg) = IndexTemplate::parse(t) {
                errs.push(at("index"), msg);
            }
        }
        for (field, path) in [("id", &m.id), ("routing", &m.routing)] {
            if let Some(Err(msg)) = path.as_deref().map(FieldPath::parse) {
                errs.push(at(field), msg);
            }
        }
        if let Some(p) = &m.ingest_pipeline {
            if p.starts_with('_') || p.contains(['/', ' ', '*', ',', '?', '#']) {
                errs.push(at("ingestPipeline"), format!("`{p}` is not an ingest pipeline name (no leading `_`, no `/ * , ? #` or spaces)"));
            }
            if m.write_mode == crate::WriteMode::Update {
                errs.push(at("ingestPipeline"), "partial updates (`writeMode: Update`) do not run ingest pipelines in Elasticsearch; use `writeMode: Index`, or drop the pipeline");
            }
        }
        for (j, f) in m.include.iter().enumerate() {
            if let Err(msg) = FieldPath::parse(f) {
                errs.push(at(&format!("include[{j}]")), msg);
            }
        }
        for (j, f) in m.exclude.iter().enumerate() {
            if let Err(msg) = FieldPath::parse(f) {
                errs.push(at(&format!("exclude[{j}]")), msg);
            }
        }
        let mut targets = std::collections::BTreeSet::new();
        for (from, to) in &m.rename {
            let field = at(&format!("rename[{from:?}]"));
            if let Err(msg) = FieldPath::parse(from).and_then(|_| FieldPath::parse(to)) {
                errs.push(field.clone(), msg);
            }
            if to == "_id" || to.starts_with("_id.") {
                errs.push(field.clone(), "`_id` is Elasticsearch's metadata field; to choose the document id use `id`");
            }
            if !targets.insert(to.clone()) {
                errs.push(field, format!("another field is renamed to `{to}` too"));
            }
        }
        for (field, q) in [("keep", &m.keep), ("deleteWhen", &m.delete_when)] {
            if let Some(Err(msg)) = q.as_ref().map(Query::parse) {
                errs.push(at(field), msg);
            }
        }
        if let Some(t) = &m.oplog_time {
            for (field, name) in [("oplogTime.tsField", &t.ts_field), ("oplogTime.dateField", &t.date_field)] {
                if name.is_empty() || name.contains('.') || name.starts_with('_') {
                    errs.push(at(field), format!("`{name}` must be a top-level field name (no dots, not starting with `_`)"));
                }
            }
        }
        if let Some(a) = &m.aggregation {
            if let Err(msg) = crate::shape::stages(&a.snapshot, crate::shape::SNAPSHOT_STAGES, "could drop `_id` or change the `_id` order the snapshot resumes by") {
                errs.push(at("aggregation.snapshot"), msg);
            }
            if let Err(msg) = crate::shape::stages(&a.change_stream, &["$match"], "cannot be applied to one namespace of a stream that serves several (shape fields with `include`/`exclude`/`rename`)") {
                errs.push(at("aggregation.changeStream"), msg);
            }
        }
        if m.id.is_some() && spec.workers > 1 {
            errs.push(at("id"), "a sharded pipeline (`workers` > 1) splits documents by their MongoDB `_id`, which a custom `id` hides from the re-snapshot sweep; use `workers: 1` with a custom `id`");
        }
    }
}

/// `spec.scripts` and `spec.filters`: one source each, a namespace the pipeline syncs, at most
/// one script of each kind per namespace (and one global).
fn validate_scripts(spec: &SyncPipelineSpec, patterns: &[NamespacePattern], errs: &mut Errors) {
    let regex = spec.namespace_regex.as_deref().and_then(|r| namespace_regex(r).ok());
    for (list, items) in [("scripts", &spec.scripts), ("filters", &spec.filters)] {
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in items.iter().enumerate() {
            let at = |f: &str| format!("spec.{list}[{i}].{f}");
            if s.script.is_some() == s.script_from.is_some() {
                errs.push(at("script"), "set exactly one of `script` (inline) and `scriptFrom` (a file, or a ConfigMap key in a cluster)");
            }
            if let Some(from) = &s.script_from {
                validate_value_from(from, &at("scriptFrom"), errs);
            }
            if let Some(ns) = &s.namespace {
                match NamespacePattern::parse(ns) {
                    Ok(NamespacePattern { collection: Some(c), database }) => {
                        if !patterns.iter().any(|p| p.matches(&database, &c)) && !regex.as_ref().is_some_and(|r| r.is_match(ns)) {
                            errs.push(at("namespace"), format!("`{ns}` is not synced by this pipeline; add it to `spec.namespaces` or remove this entry"));
                        }
                    }
                    Ok(_) => errs.push(at("namespace"), "must name one collection (`db.collection`); leave it out for every namespace"),
                    Err(m) => errs.push(at("namespace"), m),
                }
            }
            if !seen.insert(s.namespace.clone()) {
                let which = s.namespace.as_deref().map_or("every namespace (no `namespace`)".to_string(), |n| format!("`{n}`"));
                errs.push(at("namespace"), format!("{which} has another entry before this one; put both into one script"));
            }
        }
    }
    if let Some(l) = &spec.script_limits {
        if !(1..=60_000).contains(&l.timeout_ms) {
            errs.push("spec.scriptLimits.timeoutMs", "must be between 1 and 60000");
        }
        if !(8..=4096).contains(&l.memory_mib) {
            errs.push("spec.scriptLimits.memoryMib", "must be between 8 and 4096");
        }
        if l.workers > 256 {
            errs.push("spec.scriptLimits.workers", "must be at most 256 (0: one per core)");
        }
    }
}

/// Two namespaces must never write one index: dropping either (which deletes its index) would
/// take the other's documents with it. Refuses overrides naming one index twice, and
/// overrides naming the index another included namespace gets by default.
fn check_shared_indexes(spec: &SyncPipelineSpec, patterns: &[NamespacePattern], errs: &mut Errors) {
    // index -> the namespace known to write it (exact names only).
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    // `spec.indexes` and the fixed indexes of `spec.mappings` together.
    let mut indexes = spec.indexes.clone();
    for m in &spec.mappings {
        if let Some(fixed) = m.index.as_deref().and_then(|t| crate::shape::IndexTemplate::parse(t).ok()).and_then(|t| t.fixed().map(str::to_owned)) {
            indexes.entry(m.namespace.clone()).or_insert(fixed);
        }
    }
    let exact = patterns.iter().filter_map(|p| p.collection.as_ref().map(|c| format!("{}.{c}", p.database)));
    let defaults = exact.filter(|ns| !indexes.contains_key(ns)).map(|ns| (ns.to_lowercase(), ns));
    for (index, ns) in defaults.chain(indexes.iter().map(|(ns, i)| (i.clone(), ns.clone()))) {
        if spec.shared_indexes.contains(&index) {
            continue;
        }
        match owner.get(&index) {
            Some(first) if *first != ns => errs.push(
                format!("spec.indexes[{ns:?}]"),
                format!("index `{index}` is also written by `{first}`: dropping one collection would delete the other's documents; give each namespace its own index, or list it in `spec.sharedIndexes`"),
            ),
            _ => {
                owner.insert(index.clone(), ns.clone());
            }
        }
    }
    // A wildcard's collections get `db.collection` lower-cased: an override naming such an index
    // collides with the collection of that name, whenever it exists.
    for (ns, index) in indexes.iter().filter(|(_, i)| !spec.shared_indexes.contains(i)) {
        let wild = patterns.iter().find(|p| p.collection.is_none() && index.starts_with(&format!("{}.", p.database.to_lowercase())));
        if let Some(p) = wild {
            if *index != ns.to_lowercase() {
                errs.push(
                    format!("spec.indexes[{ns:?}]"),
                    format!("index `{index}` is the default index of a collection `{}.*` includes: the two would share it; pick another index name", p.database),
                );
            }
        }
    }
}

fn uri_has_password(uri: &str) -> bool {
    let rest = uri.split_once("://").map(|(_, r)| r).unwrap_or(uri);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((userinfo, _)) => userinfo.contains(':'),
        None => false,
    }
}

fn validate_elasticsearch(e: &ElasticsearchSink, errs: &mut Errors) {
    if e.urls.is_empty() {
        errs.push(
            "spec.elasticsearch.urls",
            "must list at least one URL, e.g. `http://127.0.0.1:9200`",
        );
    }
    for (i, url) in e.urls.iter().enumerate() {
        let field = format!("spec.elasticsearch.urls[{i}]");
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            errs.push(field, "must start with `http://` or `https://`");
        } else if url_has_userinfo(url) {
            errs.push(
                field,
                "holds credentials; use `username` with `passwordFrom`, or `apiKeyFrom`",
            );
        }
    }
    if e.password_from.is_some() && e.username.is_none() {
        errs.push(
            "spec.elasticsearch.username",
            "is required when `passwordFrom` is set",
        );
    }
    if e.username.is_some() && e.password_from.is_none() {
        errs.push(
            "spec.elasticsearch.passwordFrom",
            "is required when `username` is set",
        );
    }
    if e.api_key_from.is_some() && e.username.is_some() {
        errs.push(
            "spec.elasticsearch.apiKeyFrom",
            "set either `apiKeyFrom` or `username`/`passwordFrom`, not both",
        );
    }
    for (field, from) in [
        ("spec.elasticsearch.passwordFrom", &e.password_from),
        ("spec.elasticsearch.apiKeyFrom", &e.api_key_from),
        ("spec.elasticsearch.caFrom", &e.ca_from),
    ] {
        if let Some(from) = from {
            validate_value_from(from, field, errs);
        }
    }
    validate_client_certificate("spec.elasticsearch", &e.client_cert_from, &e.client_key_from, errs);
    if let Some(aws) = &e.aws {
        validate_aws(e, aws, errs);
    }
}

/// `spec.elasticsearch.aws`: the one way to authenticate when set, to one endpoint, with static
/// keys given as a pair (or none, for the default credentials chain).
fn validate_aws(e: &ElasticsearchSink, aws: &AwsSigning, errs: &mut Errors) {
    if e.username.is_some() || e.password_from.is_some() || e.api_key_from.is_some() {
        errs.push(
            "spec.elasticsearch.aws",
            "signs every request with AWS credentials; remove `username`/`passwordFrom` and `apiKeyFrom` (Amazon OpenSearch Service's fine-grained access control maps the IAM identity to its users)",
        );
    }
    if e.urls.len() > 1 {
        errs.push(
            "spec.elasticsearch.urls",
            "must be exactly one URL with `aws`: the domain or collection endpoint, e.g. `https://search-shop-abc123.eu-west-1.es.amazonaws.com`",
        );
    }
    if aws.region.is_empty() || aws.region.len() > 64 || !aws.region.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        errs.push(
            "spec.elasticsearch.aws.region",
            "must be an AWS region name such as `eu-west-1` (lower-case letters, digits and '-')",
        );
    }
    match (&aws.access_key_id_from, &aws.secret_access_key_from) {
        (Some(_), None) => errs.push("spec.elasticsearch.aws.secretAccessKeyFrom", "is required when `accessKeyIdFrom` is set (or remove both to use the default AWS credentials chain)"),
        (None, Some(_)) => errs.push("spec.elasticsearch.aws.accessKeyIdFrom", "is required when `secretAccessKeyFrom` is set (or remove both to use the default AWS credentials chain)"),
        _ => {}
    }
    if aws.session_token_from.is_some() && aws.access_key_id_from.is_none() {
        errs.push(
            "spec.elasticsearch.aws.sessionTokenFrom",
            "goes with `accessKeyIdFrom` and `secretAccessKeyFrom`; the default credentials chain finds its own session token",
        );
    }
    for (field, from) in [
        ("spec.elasticsearch.aws.accessKeyIdFrom", &aws.access_key_id_from),
        ("spec.elasticsearch.aws.secretAccessKeyFrom", &aws.secret_access_key_from),
        ("spec.elasticsearch.aws.sessionTokenFrom", &aws.session_token_from),
    ] {
        if let Some(from) = from {
            validate_value_from(from, field, errs);
        }
    }
}

fn url_has_userinfo(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    rest.split(['/', '?']).next().unwrap_or("").contains('@')
}

fn validate_value_from(v: &ValueFrom, field: &str, errs: &mut Errors) {
    let set = [
        v.env.is_some(),
        v.file.is_some(),
        v.secret_key_ref.is_some(),
        v.config_map_key_ref.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set != 1 {
        errs.push(
            field,
            "set exactly one of `env`, `file`, `secretKeyRef` and `configMapKeyRef`",
        );
    }
    // Certificates are public; credentials and private keys are not.
    if v.config_map_key_ref.is_some() && !(field.ends_with("caFrom") || field.ends_with("clientCertFrom") || field.ends_with("scriptFrom")) {
        errs.push(
            format!("{field}.configMapKeyRef"),
            "is only for CA bundles, certificates and scripts; keep credentials and private keys in a Secret (`secretKeyRef`)",
        );
    }
    if let Some(env) = &v.env {
        if env.is_empty() || env.contains('=') {
            errs.push(format!("{field}.env"), "must be an environment variable name");
        }
    }
    for (name, r) in [("secretKeyRef", &v.secret_key_ref), ("configMapKeyRef", &v.config_map_key_ref)] {
        if let Some(r) = r {
            if r.name.is_empty() || r.key.is_empty() {
                errs.push(format!("{field}.{name}"), "needs both `name` and `key`");
            }
        }
    }
}

/// A parsed entry of `spec.namespaces`: `db.collection` or `db.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePattern {
    /// Database name.
    pub database: String,
    /// Collection name, or `None` for every collection of the database.
    pub collection: Option<String>,
}

impl NamespacePattern {
    /// Parse `db.collection` or `db.*`.
    ///
    /// # Errors
    /// A message saying what is wrong with the text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let Some((db, coll)) = text.split_once('.') else {
            return Err(format!(
                "`{text}` must be `database.collection` or `database.*`"
            ));
        };
        if db.is_empty()
            || db.len() > 64
            || db
                .chars()
                .any(|c| matches!(c, '/' | '\\' | '.' | ' ' | '"' | '$' | '*' | '<' | '>' | ':' | '|' | '?'))
        {
            return Err(format!("`{db}` is not a valid MongoDB database name"));
        }
        if matches!(db, "admin" | "local" | "config") {
            return Err(format!(
                "`{db}` is a MongoDB system database and cannot be synced"
            ));
        }
        if coll == "*" {
            return Ok(Self {
                database: db.into(),
                collection: None,
            });
        }
        if coll.is_empty() || coll.contains('$') || coll.contains('*') || coll.starts_with("system.") {
            return Err(format!(
                "`{coll}` is not a collection name that can be synced (empty, `$`, `*` or `system.`)"
            ));
        }
        Ok(Self {
            database: db.into(),
            collection: Some(coll.into()),
        })
    }

    /// Whether the namespace `db.collection` falls under this pattern.
    pub fn matches_ns(&self, ns: &str) -> bool {
        match ns.split_once('.') {
            Some((db, coll)) => self.matches(db, coll),
            None => false,
        }
    }

    /// Whether collection `coll` of database `db` falls under this pattern.
    pub fn matches(&self, db: &str, coll: &str) -> bool {
        self.database == db
            && !coll.starts_with("system.")
            && self.collection.as_deref().is_none_or(|c| c == coll)
    }
}

/// Elasticsearch's rules for index names.
///
/// # Errors
/// What is wrong with the name, as a phrase ("must be lower-case").
pub fn check_index_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err("must be 1-255 bytes long".into());
    }
    if name != name.to_lowercase() {
        return Err("must be lower-case".into());
    }
    if name.starts_with(['-', '_', '+']) || name == "." || name == ".." {
        return Err("must not start with `-`, `_` or `+`, nor be `.` or `..`".into());
    }
    if name
        .chars()
        .any(|c| matches!(c, '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'))
    {
        return Err("must not contain `\\ / * ? \" < > | , # :` or spaces".into());
    }
    Ok(())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver's parser lives in the engine; these rules do not depend on its answer.
    fn any_uri(_: &str) -> Result<(), String> {
        Ok(())
    }

    fn parse_manifest(yaml: &str) -> Result<ValidatedPipeline, ManifestError> {
        super::parse_manifest(yaml, any_uri)
    }

    fn validate_for_cluster(p: &SyncPipeline) -> Result<ValidatedPipeline, Vec<FieldError>> {
        super::validate_for_cluster(p, any_uri)
    }

    const MINIMAL: &str = r#"
apiVersion: monsoon.dev/v1alpha1
kind: SyncPipeline
metadata:
  name: shop
spec:
  mongodb:
    uri: "mongodb://127.0.0.1:27017/?directConnection=true"
  elasticsearch:
    urls: ["http://127.0.0.1:9200"]
  namespaces:
    - shop.orders        # "db.collection"; "db.*" for every collection of a database
  snapshot: true
"#;

    fn errors_of(yaml: &str) -> Vec<FieldError> {
        match parse_manifest(yaml) {
            Err(ManifestError::Invalid(e)) => e,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn minimal_manifest_from_the_issue_is_valid_with_defaults() {
        let p = parse_manifest(MINIMAL).expect("valid");
        assert_eq!(p.name, "shop");
        assert_eq!(p.spec.namespaces, vec!["shop.orders"]);
        assert!(p.spec.snapshot);
        assert_eq!(p.spec.batch, BatchSpec::default());
        assert_eq!(p.spec.on_history_lost, HistoryLostPolicy::Fail);
        assert_eq!(p.spec.on_drop, DropPolicy::DeleteIndex);
        assert_eq!(p.spec.dead_letter.index, "monsoon-deadletter");
    }

    #[test]
    fn unknown_field_is_named() {
        let yaml = MINIMAL.replace("snapshot: true", "snapshott: true");
        let errs = errors_of(&yaml);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.snapshott");
    }

    #[test]
    fn mistyped_field_is_named_with_its_path() {
        let yaml = MINIMAL.replace("snapshot: true", "batch:\n    maxDocs: lots");
        let errs = errors_of(&yaml);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.batch.maxDocs");
    }

    #[test]
    fn unknown_fields_bad_values_and_broken_rules_are_reported_together() {
        let yaml = MINIMAL
            .replace("snapshot: true", "snapshott: true\n  onDrop: Delete\n  batch:\n    maxDocs: 0\n    concurency: 2\n  onHistoryLost: Later")
            .replace("http://127.0.0.1:9200", "127.0.0.1:9200");
        let fields: Vec<String> = errors_of(&yaml).into_iter().map(|e| e.field).collect();
        for want in ["spec.snapshott", "spec.onDrop", "spec.batch.concurency", "spec.onHistoryLost", "spec.batch.maxDocs", "spec.elasticsearch.urls[0]"] {
            assert!(fields.iter().any(|f| f == want), "{want} missing from {fields:?}");
        }
    }

    #[test]
    fn a_required_field_of_the_wrong_type_is_reported_once() {
        let yaml = MINIMAL
            .replace("  namespaces:\n    - shop.orders        # \"db.collection\"; \"db.*\" for every collection of a database\n", "  namespaces: 5\n");
        let errs = errors_of(&yaml);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.namespaces"], "{errs:?}");
        assert!(!errs.iter().any(|e| e.message.contains("missing field")), "{errs:?}");
    }

    #[test]
    fn wrong_kind_is_refused() {
        let yaml = MINIMAL.replace("kind: SyncPipeline", "kind: Deployment");
        assert!(matches!(
            parse_manifest(&yaml),
            Err(ManifestError::Shape { field, .. }) if field == "kind"
        ));
    }

    #[test]
    fn bad_namespace_and_urls_are_all_reported() {
        let yaml = MINIMAL
            .replace("- shop.orders ", "- shoporders ")
            .replace("http://127.0.0.1:9200", "127.0.0.1:9200");
        let errs = errors_of(&yaml);
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["spec.elasticsearch.urls[0]", "spec.namespaces[0]"]
        );
    }

    #[test]
    fn inline_password_in_uri_is_refused() {
        let yaml = MINIMAL.replace("mongodb://127.0.0.1", "mongodb://app:secret@127.0.0.1");
        let errs = errors_of(&yaml);
        assert_eq!(errs[0].field, "spec.mongodb.uri");
        assert!(errs[0].message.contains("uriFrom"));
        assert!(!errs[0].message.contains("secret@"), "message must not echo credentials");
    }

    #[test]
    fn what_the_connection_string_check_refuses_is_refused_naming_the_field() {
        // The engine's check is the driver's parser (tested there); here, a stand-in that
        // refuses one option shows where its answer lands.
        fn refuse_wtimeout(uri: &str) -> Result<(), String> {
            if uri.contains("wtimeoutMS=x") {
                return Err("the MongoDB driver refuses this connection string: wtimeoutms must be an integer".into());
            }
            Ok(())
        }
        let yaml = MINIMAL.replace("directConnection=true", "replicaSet=rs0&wtimeoutMS=x");
        let errs = match super::parse_manifest(&yaml, refuse_wtimeout) {
            Err(ManifestError::Invalid(e)) => e,
            other => panic!("expected Invalid, got {other:?}"),
        };
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.mongodb.uri");
        assert!(errs[0].message.contains("wtimeoutms"), "{}", errs[0].message);
        assert!(super::parse_manifest(MINIMAL, refuse_wtimeout).is_ok());
    }

    #[test]
    fn a_uri_refused_before_parsing_never_reaches_the_connection_string_check() {
        fn must_not_run(uri: &str) -> Result<(), String> {
            panic!("checked a URI already refused: {}", uri.len())
        }
        for uri in ["mongodb://app:secret@127.0.0.1:27017/", "http://127.0.0.1:27017/"] {
            let yaml = MINIMAL.replace("mongodb://127.0.0.1:27017/?directConnection=true", uri);
            let errs = match super::parse_manifest(&yaml, must_not_run) {
                Err(ManifestError::Invalid(e)) => e,
                other => panic!("expected Invalid, got {other:?}"),
            };
            assert_eq!(errs[0].field, "spec.mongodb.uri", "{errs:?}");
        }
    }

    #[test]
    fn two_namespaces_writing_one_index_are_refused_naming_the_index() {
        let yaml = MINIMAL.replace("- shop.orders ", "- shop.orders\n    - shop.archive ")
            .replace("snapshot: true", "snapshot: true\n  indexes:\n    shop.orders: merged\n    shop.archive: merged");
        let errs = errors_of(&yaml);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].field.starts_with("spec.indexes["), "{errs:?}");
        assert!(errs[0].message.contains("`merged`"), "{}", errs[0].message);
        // An override onto another included namespace's default index.
        let yaml = MINIMAL.replace("- shop.orders ", "- shop.orders\n    - shop.archive ")
            .replace("snapshot: true", "snapshot: true\n  indexes:\n    shop.archive: shop.orders");
        let errs = errors_of(&yaml);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("shop.orders"), "{}", errs[0].message);
        // An override onto a name a wildcard gives.
        let yaml = MINIMAL.replace("- shop.orders ", "- shop.orders\n    - logs.* ")
            .replace("snapshot: true", "snapshot: true\n  indexes:\n    shop.orders: logs.app");
        let errs = errors_of(&yaml);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].message.contains("logs.*"), "{}", errs[0].message);
        // Distinct indexes are fine.
        let yaml = MINIMAL.replace("- shop.orders ", "- shop.orders\n    - shop.archive ")
            .replace("snapshot: true", "snapshot: true\n  indexes:\n    shop.archive: archive");
        assert!(parse_manifest(&yaml).is_ok(), "{:?}", parse_manifest(&yaml).err());
    }

    #[test]
    fn a_namespace_regex_can_stand_in_for_namespaces_and_must_compile() {
        let only_regex = MINIMAL
            .replace("  namespaces:\n    - shop.orders        # \"db.collection\"; \"db.*\" for every collection of a database\n", "  namespaceRegex: '^shop\\.'\n");
        let p = parse_manifest(&only_regex).unwrap_or_else(|e| panic!("{e}\n{only_regex}"));
        assert!(p.spec.namespaces.is_empty());
        let bad = only_regex.replace("'^shop\\.'", "'^(shop'").replace("snapshot: true", "snapshot: true\n  excludeNamespaceRegex: '[z-a]'");
        let fields: Vec<String> = errors_of(&bad).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["spec.namespaceRegex", "spec.excludeNamespaceRegex"]);
        let neither = MINIMAL.replace("  namespaces:\n    - shop.orders        # \"db.collection\"; \"db.*\" for every collection of a database\n", "");
        assert_eq!(errors_of(&neither)[0].field, "spec.namespaces");
    }

    #[test]
    fn snapshot_namespaces_and_stream_start_are_checked() {
        let ok = MINIMAL.replace("snapshot: true", "snapshot: true\n  snapshotNamespaces: [shop.orders]\n  streamStart: {timestamp: 1700000000}");
        let p = parse_manifest(&ok).unwrap_or_else(|e| panic!("{e}\n{ok}"));
        assert_eq!(p.spec.snapshot_namespaces, ["shop.orders"]);
        assert_eq!(p.spec.stream_start, Some(StreamStart { timestamp: Some(1_700_000_000), oldest: false }));
        // `.*` follows the whole deployment: any pattern is synced.
        let all = MINIMAL
            .replace("  namespaces:\n    - shop.orders        # \"db.collection\"; \"db.*\" for every collection of a database\n", "  namespaceRegex: '.*'\n")
            .replace("snapshot: true", "snapshot: true\n  snapshotNamespaces: [shop.orders, logs.*]\n  streamStart: {oldest: true}");
        parse_manifest(&all).unwrap_or_else(|e| panic!("{e}\n{all}"));
        let bad = MINIMAL.replace("snapshot: true", "snapshot: false\n  snapshotNamespaces: [shop.users, admin.x]\n  streamStart: {timestamp: 5, oldest: true}");
        let fields: Vec<String> = errors_of(&bad).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, ["spec.snapshotNamespaces[0]", "spec.snapshotNamespaces[1]", "spec.snapshotNamespaces", "spec.streamStart"]);
    }

    #[test]
    fn time_machine_is_checked() {
        let ok = MINIMAL.replace("snapshot: true", "snapshot: true\n  timeMachine: {namespaces: [shop.orders], snapshot: true}");
        let p = parse_manifest(&ok).unwrap_or_else(|e| panic!("{e}\n{ok}"));
        let tm = p.spec.time_machine.expect("time machine");
        assert_eq!((tm.index_prefix.as_str(), tm.index_suffix.as_str(), tm.snapshot), ("log", "%Y-%m-%d", true));
        let bad = MINIMAL.replace(
            "snapshot: true",
            "snapshot: false\n  timeMachine: {namespaces: [shop.users, 'bad'], indexPrefix: Log, indexSuffix: '%Y-%b', snapshot: true}",
        );
        let fields: Vec<String> = errors_of(&bad).into_iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "spec.timeMachine.namespaces[0]",
                "spec.timeMachine.namespaces[1]",
                "spec.timeMachine.indexPrefix",
                "spec.timeMachine.indexSuffix",
                "spec.timeMachine.snapshot"
            ]
        );
        let empty = MINIMAL.replace("snapshot: true", "snapshot: true\n  timeMachine: {namespaces: []}");
        assert_eq!(errors_of(&empty)[0].field, "spec.timeMachine.namespaces");
    }

    #[test]
    fn user_without_password_source_is_refused() {
        let yaml = MINIMAL.replace(
            "urls: [\"http://127.0.0.1:9200\"]",
            "urls: [\"http://127.0.0.1:9200\"]\n    username: elastic",
        );
        assert_eq!(errors_of(&yaml)[0].field, "spec.elasticsearch.passwordFrom");
    }

    #[test]
    fn value_from_needs_exactly_one_source() {
        let yaml = MINIMAL.replace(
            "uri: \"mongodb://127.0.0.1:27017/?directConnection=true\"",
            "uriFrom: {env: A, file: /b}",
        );
        assert_eq!(errors_of(&yaml)[0].field, "spec.mongodb.uriFrom");
    }

    #[test]
    fn system_databases_and_wildcard_collections_parse_as_expected() {
        assert!(NamespacePattern::parse("admin.x").is_err());
        assert!(NamespacePattern::parse("shop.system.views").is_err());
        let all = NamespacePattern::parse("shop.*").expect("wildcard");
        assert!(all.matches("shop", "orders"));
        assert!(!all.matches("shop", "system.profile"));
        assert!(!all.matches("other", "orders"));
        let one = NamespacePattern::parse("shop.a.b").expect("dotted collection");
        assert_eq!(one.collection.as_deref(), Some("a.b"));
    }

    #[test]
    fn a_full_mapping_is_accepted() {
        let yaml = MINIMAL.replace(
            "snapshot: true",
            r#"mappings:
    - namespace: shop.orders
      index: "orders-{region}"
      id: ref
      routing: customer.id
      ingestPipeline: enrich
      include: [a, b.c]
      exclude: [b.c.secret]
      rename: {a: alpha}
      keep: {status: {$in: [paid, shipped]}}
      deleteWhen: {deletedAt: {$exists: true}}
      oplogTime: {}"#,
        );
        let p = parse_manifest(&yaml).expect("valid");
        let m = &p.spec.mappings[0];
        assert_eq!(m.oplog_time.as_ref().map(|t| t.ts_field.as_str()), Some("oplog_ts"));
        assert_eq!(m.write_mode, crate::WriteMode::Index);
    }

    #[test]
    fn mappings_name_each_problem_with_its_field() {
        let yaml = MINIMAL.replace(
            "snapshot: true",
            r#"workers: 2
  indexes:
    shop.orders: orders
  mappings:
    - namespace: shop.users
    - namespace: shop.orders
      index: "Orders-{x"
      id: "a..b"
      writeMode: Update
      ingestPipeline: p
      rename: {a: _id, b: _id}
      keep: {a: {$regex: x}}
      deleteWhen: [1]
      oplogTime: {tsField: a.b}
    - namespace: shop.orders"#,
        );
        let errs = errors_of(&yaml);
        let has = |field: &str, says: &str| errs.iter().any(|e| e.field == field && e.message.contains(says));
        assert!(has("spec.mappings[0].namespace", "not synced"), "{errs:#?}");
        assert!(has("spec.mappings[1].index", "`spec.indexes` also names"), "{errs:#?}");
        assert!(has("spec.mappings[1].index", "without its"), "{errs:#?}");
        assert!(has("spec.mappings[1].id", "empty segment"), "{errs:#?}");
        assert!(has("spec.mappings[1].id", "workers"), "{errs:#?}");
        assert!(has("spec.mappings[1].ingestPipeline", "writeMode: Index"), "{errs:#?}");
        assert!(has("spec.mappings[1].rename[\"a\"]", "use `id`"), "{errs:#?}");
        assert!(has("spec.mappings[1].rename[\"b\"]", "renamed to `_id` too"), "{errs:#?}");
        assert!(has("spec.mappings[1].keep", "`$regex` is not supported"), "{errs:#?}");
        assert!(has("spec.mappings[1].oplogTime.tsField", "top-level"), "{errs:#?}");
        assert!(has("spec.mappings[2].namespace", "another mapping"), "{errs:#?}");
    }

    #[test]
    fn a_mapped_fixed_index_counts_as_an_index_override() {
        let yaml = MINIMAL
            .replace("    - shop.orders        #", "    - shop.users\n    - shop.orders        #")
            .replace("snapshot: true", "mappings:\n    - namespace: shop.users\n      index: shop.orders");
        let errs = errors_of(&yaml);
        assert!(errs.iter().any(|e| e.message.contains("also written by") && e.message.contains("sharedIndexes")), "{errs:#?}");
        // Declared shared, the same pipeline is accepted.
        parse_manifest(&yaml.replace("mappings:", "sharedIndexes: [shop.orders]\n  mappings:")).expect("a declared shared index is accepted");
    }

    #[test]
    fn index_overrides_must_name_included_namespaces_and_valid_indexes() {
        let yaml = MINIMAL.replace(
            "snapshot: true",
            "indexes:\n    shop.orders: Orders\n    shop.users: users",
        );
        let errs = errors_of(&yaml);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|e| e.message.contains("lower-case")));
        assert!(errs.iter().any(|e| e.message.contains("does not include")));
    }

    #[test]
    fn batch_limits_are_checked() {
        let yaml = MINIMAL.replace(
            "snapshot: true",
            "batch:\n    maxDocs: 0\n    concurrency: 65",
        );
        let fields: Vec<_> = errors_of(&yaml).into_iter().map(|e| e.field).collect();
        assert_eq!(fields, vec!["spec.batch.maxDocs", "spec.batch.concurrency"]);
    }

    #[test]
    fn index_name_rules() {
        assert!(check_index_name("shop.orders").is_ok());
        assert!(check_index_name("_x").is_err());
        assert!(check_index_name("a b").is_err());
        assert!(check_index_name("A").is_err());
        assert!(check_index_name(&"a".repeat(256)).is_err());
    }

    /// The CRD's schema patterns must refuse what validation refuses (so `kubectl apply`
    /// fails early) and never refuse what it accepts.
    #[test]
    fn crd_patterns_agree_with_validation() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(SyncPipeline::crd()).expect("crd json");
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let pattern = |v: &serde_json::Value| regex::Regex::new(v.as_str().expect("pattern")).expect("valid regex");
        let namespaces = pattern(&spec["namespaces"]["items"]["pattern"]);
        for ns in ["shop.orders", "shop.*", "a.b.c", "Shop.Orders", "db.coll-1", "x.y z", "", "shop", ".orders", "shop.", "sh op.x", "sh$op.x", "shop.ord$ers", "shop.o*", "a/b.c"] {
            // The system databases and `system.` collections are refused by validation only.
            let valid = NamespacePattern::parse(ns).is_ok();
            assert_eq!(namespaces.is_match(ns), valid, "namespace {ns:?}: schema and validation disagree");
        }
        let index = pattern(&spec["deadLetter"]["properties"]["index"]["pattern"]);
        let mapped = pattern(&spec["indexes"]["additionalProperties"]["pattern"]);
        for name in ["orders", "monsoon-deadletter", "a.b", "Orders", "-x", "_x", "+x", "a b", "a,b", "a#b", "a:b", "a*b", "a?b", "a\\b", "a/b", "a|b", "", "x1"] {
            let valid = check_index_name(name).is_ok();
            assert_eq!(index.is_match(name), valid, "index {name:?}: schema and validation disagree");
            assert_eq!(mapped.is_match(name), valid, "mapped index {name:?}");
        }
        let urls = pattern(&spec["elasticsearch"]["properties"]["urls"]["items"]["pattern"]);
        for (url, ok) in [("http://es:9200", true), ("https://es.example:9200/prefix", true), ("ftp://es", false), ("http://user:pw@es:9200", false), ("es:9200", false)] {
            assert_eq!(urls.is_match(url), ok, "url {url:?}");
        }
    }

    const AWS: &str = "    urls: [\"http://127.0.0.1:9200\"]\n    aws:\n      region: eu-west-1\n";

    #[test]
    fn aws_signing_with_the_default_chain_or_static_keys_is_valid() {
        let p = parse_manifest(&MINIMAL.replace("    urls: [\"http://127.0.0.1:9200\"]\n", AWS)).expect("default chain");
        let aws = p.spec.elasticsearch.aws.expect("aws");
        assert_eq!((aws.region.as_str(), aws.service), ("eu-west-1", AwsService::Es));
        let keys = format!("{AWS}      service: aoss\n      accessKeyIdFrom: {{env: AKID}}\n      secretAccessKeyFrom: {{file: /run/secret}}\n      sessionTokenFrom: {{env: TOKEN}}\n");
        let p = parse_manifest(&MINIMAL.replace("    urls: [\"http://127.0.0.1:9200\"]\n", &keys)).expect("static keys");
        assert_eq!(p.spec.elasticsearch.aws.expect("aws").service, AwsService::Aoss);
    }

    #[test]
    fn aws_signing_is_refused_with_other_credentials_half_keys_or_several_urls() {
        let with = |extra: &str, urls: &str| MINIMAL.replace("    urls: [\"http://127.0.0.1:9200\"]\n", &format!("    urls: [{urls}]\n{extra}    aws:\n      region: eu-west-1\n"));
        let one = "\"https://search-x.eu-west-1.es.amazonaws.com\"";
        let errs = errors_of(&with("    username: elastic\n    passwordFrom: {env: PW}\n", one));
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.aws" && e.message.contains("remove `username`/`passwordFrom` and `apiKeyFrom`")), "{errs:?}");
        let errs = errors_of(&with("    apiKeyFrom: {env: KEY}\n", one));
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.aws"), "{errs:?}");
        let errs = errors_of(&with("", "\"https://a:443\", \"https://b:443\""));
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.urls" && e.message.contains("exactly one URL")), "{errs:?}");

        let aws = |body: &str| MINIMAL.replace("    urls: [\"http://127.0.0.1:9200\"]\n", &format!("    urls: [\"http://127.0.0.1:9200\"]\n    aws:\n{body}"));
        let errs = errors_of(&aws("      region: EU West\n"));
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.aws.region" && e.message.contains("eu-west-1")), "{errs:?}");
        let errs = errors_of(&aws("      region: eu-west-1\n      accessKeyIdFrom: {env: AKID}\n"));
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.aws.secretAccessKeyFrom" && e.message.contains("default AWS credentials chain")), "{errs:?}");
        let errs = errors_of(&aws("      region: eu-west-1\n      sessionTokenFrom: {env: TOKEN}\n"));
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.aws.sessionTokenFrom"), "{errs:?}");
        let errs = errors_of(&aws("      region: eu-west-1\n      accessKeyIdFrom: {env: AKID}\n      secretAccessKeyFrom: {configMapKeyRef: {name: c, key: k}}\n"));
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.aws.secretAccessKeyFrom.configMapKeyRef"), "{errs:?}");
        let errs = errors_of(&aws("      region: eu-west-1\n      service: opensearch\n"));
        assert!(errs.iter().any(|e| e.field.starts_with("spec.elasticsearch.aws.service")), "{errs:?}");
    }

    #[test]
    fn aws_keys_from_env_are_refused_in_a_cluster() {
        let keys = format!("{AWS}      accessKeyIdFrom: {{env: AKID}}\n      secretAccessKeyFrom: {{secretKeyRef: {{name: aws, key: secret}}}}\n");
        let p: SyncPipeline = serde_saphyr::from_str(&MINIMAL.replace("    urls: [\"http://127.0.0.1:9200\"]\n", &keys)).expect("yaml");
        let errs = validate_for_cluster(&p).expect_err("env refused");
        assert!(errs.iter().any(|e| e.field == "spec.elasticsearch.aws.accessKeyIdFrom"), "{errs:?}");
        assert!(!errs.iter().any(|e| e.field == "spec.elasticsearch.aws.secretAccessKeyFrom"), "{errs:?}");
    }

    #[test]
    fn a_gridfs_files_collection_may_have_scripts_and_filters_but_no_merge_patches() {
        let files = "  files:\n    namespaces: [docs.fs.files]\n";
        let script = "  scripts:\n    - namespace: docs.fs.files\n      script: 'module.exports = function(doc) { return doc; }'\n    - script: 'module.exports = function(doc) { return true; }'\n  filters:\n    - namespace: docs.fs.files\n      script: 'module.exports = function(doc) { return true; }'\n";
        let yaml = MINIMAL.replace("    - shop.orders ", "    - docs.fs.files\n    - shop.orders ");
        let p = parse_manifest(&format!("{yaml}{files}{script}")).expect("a files collection with scripts and a filter is valid");
        assert_eq!(p.spec.files.as_ref().map(|f| f.namespaces.clone()), Some(vec!["docs.fs.files".to_string()]));
        // The other refusals stay.
        let errs = errors_of(&format!("{yaml}{files}{script}  mergePatches:\n    namespaces: [docs.fs.files]\n"));
        assert!(errs.iter().any(|e| e.field == "spec.mergePatches.namespaces[0]" && e.message.contains("GridFS files collection")), "{errs:?}");
        let errs = errors_of(&format!("{yaml}  files:\n    namespaces: [docs.fs.chunks, shop.files]\n    maxFileSize: 0\n"));
        for field in ["spec.files.namespaces[0]", "spec.files.namespaces[1]", "spec.files.maxFileSize"] {
            assert!(errs.iter().any(|e| e.field == field), "{field} missing from {errs:?}");
        }
        let errs = errors_of(&format!("{MINIMAL}{files}"));
        assert!(errs.iter().any(|e| e.field == "spec.files.namespaces[0]" && e.message.contains("is not synced")), "{errs:?}");
    }
}
