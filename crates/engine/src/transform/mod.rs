//! The transform stage: what each change becomes before it is written.
//!
//! - [`change`]: what the source hands in (changes, in order, through a bounded channel);
//! - [`place`]: what one document change becomes: a [`crate::sink::Write`] (index, `_id`,
//!   routing, ingest pipeline, operation) or nothing;
//! - [`file`]: a GridFS file's content, added to its document's write once the mapping and
//!   scripts decided it (`spec.files`);
//! - this module: the pure core of `spec.mappings`: a namespace's [`Shape`] decides whether a
//!   document is ignored (keep-filter), removed (delete-when) or written, and if written, where,
//!   how (index or partial update) and with which fields ([`fields::FieldPlan`], applied while
//!   converting to JSON);
//! - [`script`]: the JavaScript middleware and its MongoDB lookups (the stage's declared I/O);
//! - [`stage`]: the task: places changes, awaits script decisions in order, keeps `written`, and
//!   hands writes, positions, drops and sweeps to the sink;
//! - [`time_machine`]: the log entry a change of a time machine namespace also becomes;
//! - [`patch`]: what a change of a namespace with merge patches becomes (the sink keeps the
//!   history).
//! - [`update`]: a change's own version of a document, from its pre-image and update
//!   description (time machines);
//! - [`relate`]: the relations' lookups (`spec.relate`): the documents of other namespaces a
//!   change re-syncs, read by a task per change and handed back in order.
//!
//! A namespace without a mapping has the plain shape, for which the stage keeps its direct path
//! (one conversion, nothing else), so a pipeline pays only for what it uses.
//!
//! # Where a document went
//! When the index, `_id` or routing comes from the document, a MongoDB delete (which carries
//! only the `_id`) cannot tell where the indexed copy is, and a change of those fields leaves
//! the old copy behind. Such a shape [`Shape::tracks_location`]: the sink keeps one small
//! location record per document (see `sink::locations`) and reads them in one real-time
//! multi-get per bulk request.

pub mod change;
pub mod fields;
pub mod file;
pub mod patch;
pub mod place;
pub mod query;
pub mod script;
pub mod stage;
pub mod relate;
pub mod time_machine;
pub mod update;

use std::sync::Arc;

use monsoon_api::shape::{FieldPath, IndexPart, IndexTemplate, Query};
use monsoon_api::{Mapping, NamespacePattern, WriteMode};
use mongodb::bson::{RawBsonRef, RawDocument, Timestamp};

use self::fields::{lookup, FieldPlan};
use crate::convert::{self, ConvertStats};

/// What a document becomes.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// The keep-filter refuses it: the change is ignored (nothing is written or deleted).
    Ignore,
    /// `deleteWhen` matches: remove the document from the index, wherever it is.
    Delete,
    /// Write it.
    Write(Shaped),
}

/// A document shaped for writing.
#[derive(Debug, PartialEq)]
pub struct Shaped {
    /// Target index; `None` for the namespace's default.
    pub index: Option<String>,
    /// Elasticsearch `_id` as a JSON string literal; `None` for the one from the MongoDB `_id`.
    pub id_json: Option<Box<str>>,
    /// Routing value.
    pub routing: Option<Box<str>>,
    /// The `_source` JSON.
    pub source: Vec<u8>,
}

/// Why a document could not be shaped: it is dead-lettered with this reason.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShapeError {
    /// A field the mapping takes a value from is missing.
    #[error("field `{path}` (the mapping's `{what}`) is missing from the document")]
    Missing {
        /// Which setting needs it: `index`, `id`.
        what: &'static str,
        /// The field.
        path: String,
    },
    /// A field holds a value that cannot be used.
    #[error("field `{path}` (the mapping's `{what}`) holds {found}, which cannot be used: {need}")]
    Unusable {
        /// Which setting needs it.
        what: &'static str,
        /// The field.
        path: String,
        /// What it holds.
        found: String,
        /// What would work.
        need: &'static str,
    },
    /// The index built from the document is not a valid index name.
    #[error("index `{index}` built from the document {why}")]
    BadIndex {
        /// The name built.
        index: String,
        /// What is wrong with it.
        why: String,
    },
    /// The document could not be converted.
    #[error(transparent)]
    Convert(#[from] convert::Error),
}

impl ShapeError {
    /// Short machine-readable type for dead-letter records and metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            ShapeError::Missing { .. } | ShapeError::Unusable { .. } | ShapeError::BadIndex { .. } => "mapping_failed",
            ShapeError::Convert(convert::Error::IdTooLong(_)) => "invalid_id",
            ShapeError::Convert(_) => "malformed_bson",
        }
    }
}

/// The compiled mapping of one namespace.
#[derive(Debug, Default)]
pub struct Shape {
    index: Option<IndexTemplate>,
    id: Option<FieldPath>,
    routing: Option<FieldPath>,
    /// Ingest pipeline every document goes through.
    pub ingest_pipeline: Option<Arc<str>>,
    fields: FieldPlan,
    keep: Option<Query>,
    delete_when: Option<Query>,
    /// Partial update with upsert instead of a whole-document index.
    pub update: bool,
    oplog_time: Option<(String, String)>,
    /// Aggregation stages of the snapshot reads (after the resume `$match` and `_id` `$sort`).
    pub snapshot_stages: Vec<mongodb::bson::Document>,
    /// `$match` stages on this namespace's change events.
    stream_matches: Vec<mongodb::bson::Document>,
}

impl Shape {
    /// Compile a mapping that passed validation.
    ///
    /// # Errors
    /// The first field that does not parse, named (validation refuses these first).
    pub fn compile(m: &Mapping) -> Result<Self, String> {
        let path = |what: &str, p: &str| FieldPath::parse(p).map_err(|e| format!("mapping `{}` {what}: {e}", m.namespace));
        let paths = |what: &str, list: &[String]| list.iter().map(|p| path(what, p).map(|p| p.segments().to_vec())).collect::<Result<Vec<_>, _>>();
        let renames = m
            .rename
            .iter()
            .map(|(a, b)| Ok((path("rename", a)?.segments().to_vec(), path("rename", b)?.segments().to_vec())))
            .collect::<Result<Vec<_>, String>>()?;
        let query = |what: &str, q: &Option<serde_json::Value>| {
            q.as_ref().map(|q| Query::parse(q).map_err(|e| format!("mapping `{}` {what}: {e}", m.namespace))).transpose()
        };
        let index = m.index.as_deref().map(IndexTemplate::parse).transpose().map_err(|e| format!("mapping `{}` index: {e}", m.namespace))?;
        Ok(Self {
            // A fixed index is the namespace's default index (the binary folds it into
            // `Routing::indexes`); only templates are evaluated per document.
            index: index.filter(|t| t.fixed().is_none()),
            id: m.id.as_deref().map(|p| path("id", p)).transpose()?,
            routing: m.routing.as_deref().map(|p| path("routing", p)).transpose()?,
            ingest_pipeline: m.ingest_pipeline.as_deref().map(Arc::from),
            fields: FieldPlan::new(&paths("include", &m.include)?, &paths("exclude", &m.exclude)?, &renames),
            keep: query("keep", &m.keep)?,
            delete_when: query("deleteWhen", &m.delete_when)?,
            update: m.write_mode == WriteMode::Update,
            oplog_time: m.oplog_time.as_ref().map(|t| (t.ts_field.clone(), t.date_field.clone())),
            snapshot_stages: match &m.aggregation {
                Some(a) => monsoon_api::shape::stages(&a.snapshot, monsoon_api::shape::SNAPSHOT_STAGES, "is not allowed here")?,
                None => Vec::new(),
            },
            stream_matches: match &m.aggregation {
                Some(a) => monsoon_api::shape::stages(&a.change_stream, &["$match"], "is not allowed here")?,
                None => Vec::new(),
            },
        })
    }

    /// Whether the shape changes nothing: the plain, fastest path applies.
    pub fn is_plain(&self) -> bool {
        self.index.is_none()
            && self.id.is_none()
            && self.routing.is_none()
            && self.ingest_pipeline.is_none()
            && self.fields.is_identity()
            && self.keep.is_none()
            && self.delete_when.is_none()
            && !self.update
            && self.oplog_time.is_none()
    }

    /// Whether where a document goes depends on its content, so deletes and moves need the
    /// record of where it went.
    pub fn tracks_location(&self) -> bool {
        self.index.is_some() || self.id.is_some() || self.routing.is_some()
    }

    /// Whether documents carry the change's time (`oplogTime`).
    pub fn has_oplog_time(&self) -> bool {
        self.oplog_time.is_some()
    }

    /// Whether the Elasticsearch `_id` comes from a field rather than the MongoDB `_id`.
    pub fn custom_id(&self) -> bool {
        self.id.is_some()
    }

    /// Decide what `doc` (changed at cluster time `time`) becomes.
    ///
    /// # Errors
    /// A [`ShapeError`] saying what in the document the mapping cannot use.
    pub fn shape(&self, doc: &RawDocument, time: Timestamp, stats: &mut ConvertStats) -> Result<Outcome, ShapeError> {
        if self.keep.as_ref().is_some_and(|q| !query::matches(q, doc)) {
            return Ok(Outcome::Ignore);
        }
        if self.delete_when.as_ref().is_some_and(|q| query::matches(q, doc)) {
            return Ok(Outcome::Delete);
        }
        let index = self.index.as_ref().map(|t| build_index(t, doc)).transpose()?;
        let id_json = match &self.id {
            None => None,
            Some(p) => {
                let value = lookup(doc, p.segments()).ok_or_else(|| ShapeError::Missing { what: "id", path: p.to_string() })?;
                if matches!(value, RawBsonRef::Null | RawBsonRef::Undefined) {
                    return Err(ShapeError::Missing { what: "id", path: p.to_string() });
                }
                let mut out = Vec::new();
                convert::write_es_id(value, &mut out)?;
                Some(String::from_utf8_lossy(&out).into())
            }
        };
        let routing = match &self.routing {
            None => None,
            Some(p) => match lookup(doc, p.segments()) {
                None | Some(RawBsonRef::Null | RawBsonRef::Undefined) => None,
                Some(v) => Some(text_of(v).ok_or_else(|| unusable("routing", p, v, "a string, number or ObjectId"))?.into()),
            },
        };
        let mut source = Vec::new();
        match &self.oplog_time {
            None => self.fields.write(doc, &[], &[], &mut source, stats)?,
            Some((ts, date)) => {
                let extra = oplog_members(ts, date, time);
                self.fields.write(doc, &[ts.as_str(), date.as_str()], &extra, &mut source, stats)?;
            }
        }
        Ok(Outcome::Write(Shaped { index, id_json, routing, source }))
    }
}

fn unusable(what: &'static str, path: &FieldPath, v: RawBsonRef<'_>, need: &'static str) -> ShapeError {
    ShapeError::Unusable { what, path: path.to_string(), found: format!("a {:?} value", v.element_type()), need }
}

/// A scalar as text: strings as they are, numbers in decimal, ObjectIds in hex, booleans.
fn text_of(v: RawBsonRef<'_>) -> Option<String> {
    Some(match v {
        RawBsonRef::String(s) => s.to_owned(),
        RawBsonRef::Int32(i) => i.to_string(),
        RawBsonRef::Int64(i) => i.to_string(),
        RawBsonRef::Double(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.0e15 => format!("{}", f as i64),
        RawBsonRef::Double(f) if f.is_finite() => f.to_string(),
        RawBsonRef::ObjectId(o) => o.to_hex(),
        RawBsonRef::Boolean(b) => b.to_string(),
        _ => return None,
    })
}

fn build_index(t: &IndexTemplate, doc: &RawDocument) -> Result<String, ShapeError> {
    let mut name = String::new();
    for part in &t.0 {
        match part {
            IndexPart::Text(s) => name.push_str(s),
            IndexPart::Field(p) => {
                let v = lookup(doc, p.segments()).ok_or_else(|| ShapeError::Missing { what: "index", path: p.to_string() })?;
                let text = text_of(v).ok_or_else(|| unusable("index", p, v, "a string, number or ObjectId"))?;
                name.push_str(&text.to_lowercase());
            }
        }
    }
    monsoon_api::check_index_name(&name).map_err(|why| ShapeError::BadIndex { index: name.clone(), why })?;
    Ok(name)
}

/// `"ts":{"T":seconds,"I":increment},"date":"yyyy/MM/dd HH:mm:ss"`, as Monstache's
/// `index-oplog-time` writes them (its date format `2006/01/02 15:04:05`, UTC).
pub(crate) fn oplog_members(ts: &str, date: &str, time: Timestamp) -> Vec<u8> {
    let mut out = Vec::with_capacity(80);
    crate::convert::write_json_str(ts, &mut out);
    out.extend_from_slice(format!(":{{\"T\":{},\"I\":{}}},", time.time, time.increment).as_bytes());
    crate::convert::write_json_str(date, &mut out);
    let iso = convert::iso_datetime(i64::from(time.time) * 1000, 0..=9999).unwrap_or(*b"1970-01-01T00:00:00.000Z");
    let iso = String::from_utf8_lossy(&iso);
    out.extend_from_slice(format!(":\"{}/{}/{} {}\"", &iso[0..4], &iso[5..7], &iso[8..10], &iso[11..19]).as_bytes());
    out
}

/// Every namespace's shape.
#[derive(Debug, Default)]
pub struct Shapes {
    entries: Vec<(NamespacePattern, Arc<Shape>)>,
    plain: Arc<Shape>,
}

impl Shapes {
    /// Compile the mappings of a pipeline.
    ///
    /// # Errors
    /// A mapping that does not compile (validation refuses these first).
    pub fn new(mappings: &[Mapping]) -> Result<Self, String> {
        let mut entries = Vec::new();
        for m in mappings {
            let pattern = NamespacePattern::parse(&m.namespace)?;
            entries.push((pattern, Arc::new(Shape::compile(m)?)));
        }
        // Exact names before wildcards, whatever the order written.
        entries.sort_by_key(|(p, _)| p.collection.is_none());
        Ok(Self { entries, plain: Arc::new(Shape::default()) })
    }

    /// The shape of `db.coll`.
    pub fn for_ns(&self, db: &str, coll: &str) -> Arc<Shape> {
        self.entries.iter().find(|(p, _)| p.matches(db, coll)).map_or_else(|| self.plain.clone(), |(_, s)| s.clone())
    }

    /// The change stream's stages for every namespace with `aggregation.changeStream`: each
    /// `$match` applies to that namespace's inserts, updates and replaces only; every other
    /// event (other namespaces, deletes, drops, renames, invalidates) passes it.
    pub fn stream_stages(&self) -> Vec<mongodb::bson::Document> {
        use mongodb::bson::{doc, Bson};
        let mut out = Vec::new();
        for (pattern, shape) in &self.entries {
            for stage in &shape.stream_matches {
                let Ok(query) = stage.get_document("$match") else { continue };
                let mut others = vec![Bson::Document(doc! {"ns.db": {"$ne": &pattern.database}})];
                if let Some(coll) = &pattern.collection {
                    others.push(Bson::Document(doc! {"ns.coll": {"$ne": coll}}));
                } else {
                    // An exact mapping of the same database has its own stages.
                    let exact: Vec<&str> = self.entries.iter().filter(|(p, _)| p.database == pattern.database).filter_map(|(p, _)| p.collection.as_deref()).collect();
                    if !exact.is_empty() {
                        others.push(Bson::Document(doc! {"ns.coll": {"$in": exact}}));
                    }
                }
                others.push(Bson::Document(doc! {"operationType": {"$nin": ["insert", "update", "replace"]}}));
                others.push(Bson::Document(query.clone()));
                out.push(doc! {"$match": {"$or": others}});
            }
        }
        out
    }

    /// Whether any namespace's documents need location records.
    pub fn tracks_any(&self) -> bool {
        self.entries.iter().any(|(_, s)| s.tracks_location())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId, RawDocumentBuf};
    use serde_json::json;

    const T: Timestamp = Timestamp { time: 1_700_000_000, increment: 3 };

    fn mapping(v: serde_json::Value) -> Mapping {
        serde_json::from_value(v).expect("mapping")
    }

    fn run(m: serde_json::Value, d: mongodb::bson::Document) -> Result<Outcome, ShapeError> {
        let shape = Shape::compile(&mapping(m)).expect("compiles");
        shape.shape(&RawDocumentBuf::from_document(&d).expect("raw"), T, &mut ConvertStats::default())
    }

    fn written(o: Result<Outcome, ShapeError>) -> (Shaped, serde_json::Value) {
        match o.expect("shaped") {
            Outcome::Write(s) => {
                let v = serde_json::from_slice(&s.source).expect("json");
                (s, v)
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routing_by_a_field_as_monstaches_comments_example() {
        let (s, src) = written(run(json!({"namespace": "blog.comments", "routing": "post_id"}), doc! {"_id": 1, "title": "t", "post_id": "123"}));
        assert_eq!(s.routing.as_deref(), Some("123"));
        assert_eq!((s.index, s.id_json), (None, None));
        assert_eq!(src, json!({"title": "t", "post_id": "123"}));
        // No routing field: indexed without routing.
        let (s, _) = written(run(json!({"namespace": "blog.comments", "routing": "post_id"}), doc! {"_id": 2}));
        assert_eq!(s.routing, None);
    }

    #[test]
    fn index_and_id_from_fields() {
        let oid = ObjectId::parse_str("5a84a8b826993bde57c12893").expect("oid");
        let (s, _) = written(run(json!({"namespace": "shop.orders", "index": "orders-{region}", "id": "ref"}), doc! {"_id": 1, "region": "EU", "ref": oid}));
        assert_eq!(s.index.as_deref(), Some("orders-eu"));
        assert_eq!(s.id_json.as_deref(), Some("\"5a84a8b826993bde57c12893\""));
        assert_eq!(
            run(json!({"namespace": "shop.orders", "index": "orders-{region}"}), doc! {"_id": 1}),
            Err(ShapeError::Missing { what: "index", path: "region".into() })
        );
        assert!(matches!(
            run(json!({"namespace": "shop.orders", "index": "orders-{region}"}), doc! {"_id": 1, "region": "a/b"}),
            Err(ShapeError::BadIndex { .. })
        ));
        assert!(matches!(run(json!({"namespace": "shop.orders", "routing": "r"}), doc! {"_id": 1, "r": [1]}), Err(ShapeError::Unusable { .. })));
        assert_eq!(run(json!({"namespace": "shop.orders", "id": "ref"}), doc! {"_id": 1}), Err(ShapeError::Missing { what: "id", path: "ref".into() }));
    }

    #[test]
    fn keep_filter_ignores_and_delete_when_removes() {
        let m = json!({"namespace": "d.c", "keep": {"interesting": true}, "deleteWhen": {"deletedAt": {"$exists": true}}});
        assert_eq!(run(m.clone(), doc! {"_id": 1, "interesting": false}).expect("ok"), Outcome::Ignore);
        assert_eq!(run(m.clone(), doc! {"_id": 1, "interesting": true, "deletedAt": 5}).expect("ok"), Outcome::Delete);
        assert!(matches!(run(m, doc! {"_id": 1, "interesting": true}).expect("ok"), Outcome::Write(_)));
    }

    #[test]
    fn fields_and_oplog_time() {
        let m = json!({"namespace": "d.c", "exclude": ["password"], "rename": {"n": "name"}, "oplogTime": {}});
        let (_, src) = written(run(m, doc! {"_id": 1, "n": "x", "password": "p"}));
        assert_eq!(src, json!({"name": "x", "oplog_ts": {"T": 1_700_000_000u32, "I": 3}, "oplog_date": "2023/11/14 22:13:20"}));
    }

    #[test]
    fn only_what_changes_anything_leaves_the_plain_path() {
        assert!(Shape::compile(&mapping(json!({"namespace": "d.c"}))).expect("ok").is_plain());
        assert!(Shape::compile(&mapping(json!({"namespace": "d.c", "index": "fixed"}))).expect("ok").is_plain());
        let routed = Shape::compile(&mapping(json!({"namespace": "d.c", "routing": "r"}))).expect("ok");
        assert!(!routed.is_plain() && routed.tracks_location());
        let trimmed = Shape::compile(&mapping(json!({"namespace": "d.c", "exclude": ["x"]}))).expect("ok");
        assert!(!trimmed.is_plain() && !trimmed.tracks_location());
    }

    #[test]
    fn change_stream_stages_are_scoped_to_their_namespace() {
        let shapes = Shapes::new(&[mapping(json!({"namespace": "test.test", "aggregation": {"changeStream": [{"$match": {"updateDescription.updatedFields.foo": {"$exists": true}}}]}}))]).expect("ok");
        let stages = shapes.stream_stages();
        assert_eq!(stages.len(), 1);
        let text = stages[0].to_string();
        for part in [r#""ns.db": { "$ne": "test" }"#, r#""ns.coll": { "$ne": "test" }"#, r#""$nin": ["insert", "update", "replace"]"#, "updatedFields.foo"] {
            assert!(text.contains(part), "{part} in {text}");
        }
    }

    #[test]
    fn exact_namespaces_win_over_wildcards() {
        let shapes = Shapes::new(&[mapping(json!({"namespace": "d.*", "exclude": ["x"]})), mapping(json!({"namespace": "d.c", "routing": "r"}))]).expect("ok");
        assert!(shapes.for_ns("d", "c").tracks_location());
        assert!(!shapes.for_ns("d", "other").tracks_location());
        assert!(shapes.for_ns("e", "c").is_plain());
        assert!(shapes.tracks_any());
    }
}
