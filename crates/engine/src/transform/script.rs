//! JavaScript middleware in the transform stage (`spec.scripts`, `spec.filters`), run by
//! [`monsoon_script`] on its own worker threads, in parallel, each call bounded in time and
//! memory.
//!
//! The transform stage hands the documents of scripted namespaces to the pool a chunk at a time
//! as it places them ([`Call`]: one batch per chunk, one wake-up when the chunk is decided) and
//! finishes the decisions in order, within a bounded window, before the writes go to the sink:
//! documents in the window run at once on every core; the order of writes, the checkpoint and
//! the memory bounds are those of every other write.
//!
//! What a script sees: the document as the namespace's mapping shaped it (fields included,
//! excluded, renamed), as JSON the way monsoon indexes it (ObjectIds as hex strings, dates as
//! ISO text), with its `_id`, and for an update the change's `updateDescription` (third
//! argument; `{}` otherwise). What it decides:
//! - a filter returning a falsy value, or `_meta_monstache.skip`: the change is ignored;
//! - a script returning a falsy value: the document is removed from the index;
//! - `true`: indexed as it was handed in; an object: indexed instead (its `_id` field is
//!   dropped: it is the document's `_id`, or `_meta_monstache.id`);
//! - `_meta_monstache` `index`, `id`, `routing`, `pipeline` choose where it goes. Since a script
//!   may move documents, the documents of a namespace whose script names `_meta_monstache` keep
//!   location records (`sink::locations`; a script that never names it cannot move them, and
//!   its documents skip the records' cost), and an index a script chooses is recorded as the
//!   namespace's (a drop deletes it too).
//!   `version` and `versionType` are ignored: monsoon versions every write by its cluster time.
//!
//! A script that throws, loops past its time limit, exhausts its memory or returns garbage
//! dead-letters its document with the script's error (`error_type` `script_<kind>`, counted in
//! `monsoon_dead_letters_total`). Lookup failures are classed: a query MongoDB refuses (or a
//! result too large for the script's heap) is the document's own error and dead-letters it at
//! once; an unreachable server is waited out (the call is submitted again, backing off up to
//! [`LOOKUP_RETRY_MAX`]), holding the document's place and so the pipeline behind it: an outage
//! never dead-letters anything. A namespace's filter runs first; its map script (and the
//! script's lookups) only for the documents the filter keeps.
//!
//! A document of a GridFS files collection indexed with content (`spec.files`) is given to its
//! scripts without the content: the `file` field is added to the write they decide, after
//! them ([`super::file`] says why).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mongodb::bson::{doc, oid::ObjectId, Bson, Document, RawDocumentBuf};
use monsoon_script::{Decision, Item, LookupKind, LookupRequest, MapOutcome, ScriptError, Scripts};
use serde_json::Value;

use super::file::Attachment;
use crate::convert::{self, ConvertStats};
use crate::sink::{Op, Write};

/// Longest wait between two attempts of a call whose lookups found MongoDB unreachable.
pub const LOOKUP_RETRY_MAX: Duration = Duration::from_secs(5);

/// Lookups (`findId`, `findOne`, `find`, `pipe`) over the pipeline's MongoDB client, run from
/// the script threads (which are not the runtime's: they block on the runtime's handle).
pub struct MongoLookup {
    /// The pipeline's client.
    pub client: mongodb::Client,
    /// The runtime the client runs on.
    pub handle: tokio::runtime::Handle,
    /// Most bytes of documents one lookup returns (the script's heap limit: more could not be
    /// handed to it anyway); a larger result is the query's error.
    pub max_bytes: usize,
}

/// Whether MongoDB refused a lookup for a reason retrying cannot change: a command error (a
/// malformed query, an unknown operator) that is not one of the transient ones a failover or a
/// busy server answers. Network, selection and pool errors are outages, to be waited out.
pub(crate) fn refused_for_good(e: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    // Not primary, shutting down, interrupted, stepped down, host unreachable, network timeout,
    // time limit exceeded: a failover or an overloaded server.
    const TRANSIENT: [i32; 14] = [6, 7, 50, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436, 10058];
    match e.kind.as_ref() {
        ErrorKind::Command(c) => !TRANSIENT.contains(&c.code) && !e.contains_label("RetryableWriteError") && !e.contains_label("TransientTransactionError"),
        ErrorKind::InvalidArgument { .. } | ErrorKind::BsonSerialization(_) | ErrorKind::BsonDeserialization(_) => true,
        _ => false,
    }
}

/// A lookup error as the script crate classes it: [`monsoon_script::QueryError`] for the
/// query's own fault, anything else an outage.
fn lookup_error(e: mongodb::error::Error) -> Box<dyn std::error::Error + Send + Sync> {
    if refused_for_good(&e) {
        Box::new(monsoon_script::QueryError(format!("MongoDB refused the query: {e}")))
    } else {
        Box::new(e)
    }
}

/// The documents of `cursor`, refusing (as the query's fault) a result over `max_bytes`.
async fn collect_bounded(mut cursor: mongodb::Cursor<RawDocumentBuf>, max_bytes: usize) -> Result<Vec<RawDocumentBuf>, Box<dyn std::error::Error + Send + Sync>> {
    use futures_util::TryStreamExt;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(d) = cursor.try_next().await.map_err(lookup_error)? {
        bytes += d.as_bytes().len();
        if bytes > max_bytes {
            return Err(Box::new(monsoon_script::QueryError(format!(
                "the lookup returned more than {} MiB (the script memory limit); narrow it with a limit or a projection",
                max_bytes >> 20
            ))));
        }
        out.push(d);
    }
    Ok(out)
}

/// A 24-hex-digit string as the ObjectId it most likely was before it became JSON (scripts see
/// ObjectIds as hex text, as Monstache's did).
fn object_ids(value: Bson) -> Bson {
    match value {
        Bson::String(s) if s.len() == 24 => ObjectId::parse_str(&s).map_or(Bson::String(s), Bson::ObjectId),
        Bson::Document(d) => Bson::Document(d.into_iter().map(|(k, v)| (k, object_ids(v))).collect()),
        Bson::Array(a) => Bson::Array(a.into_iter().map(object_ids).collect()),
        other => other,
    }
}

fn to_document(value: &Value) -> Result<Document, String> {
    match Bson::try_from(value.clone()) {
        Ok(Bson::Document(d)) => Ok(d),
        Ok(_) => Err("a query must be an object".into()),
        Err(e) => Err(format!("not MongoDB Extended JSON: {e}")),
    }
}

impl MongoLookup {
    async fn run(&self, r: &LookupRequest) -> Result<Vec<RawDocumentBuf>, Box<dyn std::error::Error + Send + Sync>> {
        let query_error = |e: String| -> Box<dyn std::error::Error + Send + Sync> { Box::new(monsoon_script::QueryError(e)) };
        let coll = self.client.database(&r.database).collection::<RawDocumentBuf>(&r.collection);
        let select = (!r.select.is_empty()).then(|| to_document(&Value::Object(r.select.clone()))).transpose().map_err(query_error)?;
        let left = r.deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        match r.kind {
            LookupKind::FindId | LookupKind::FindOne => {
                let mut filter = to_document(&r.query).map_err(query_error)?;
                if r.kind == LookupKind::FindId {
                    // The `_id` as the script saw it (hex text) or as stored (an ObjectId).
                    if let Some(Bson::String(s)) = filter.get("_id").cloned() {
                        if let Ok(oid) = ObjectId::parse_str(&s) {
                            filter = doc! {"_id": {"$in": [s, oid]}};
                        }
                    }
                } else if let Bson::Document(d) = object_ids(Bson::Document(filter)) {
                    filter = d;
                } else {
                    return Err(query_error("a query must be an object".into()));
                }
                let mut find = coll.find_one(filter).max_time(left);
                if let Some(select) = select {
                    find = find.projection(select);
                }
                Ok(find.await.map_err(lookup_error)?.into_iter().collect())
            }
            LookupKind::Find => {
                let Bson::Document(filter) = object_ids(Bson::Document(to_document(&r.query).map_err(query_error)?)) else {
                    return Err(query_error("a query must be an object".into()));
                };
                let sort: Document = r.sort.iter().map(|(k, d)| (k.clone(), Bson::Int32(*d))).collect();
                let mut find = coll.find(filter).max_time(left);
                if let Some(select) = select {
                    find = find.projection(select);
                }
                if !sort.is_empty() {
                    find = find.sort(sort);
                }
                if let Some(limit) = r.limit {
                    find = find.limit(i64::try_from(limit).unwrap_or(i64::MAX));
                }
                collect_bounded(find.await.map_err(lookup_error)?, self.max_bytes).await
            }
            LookupKind::Pipe => {
                let Value::Array(stages) = &r.query else {
                    return Err(query_error("`pipe` takes an array of stages".into()));
                };
                let stages = stages.iter().map(to_document).collect::<Result<Vec<_>, _>>().map_err(query_error)?;
                let cursor = coll.aggregate(stages).max_time(left).await.map_err(lookup_error)?.with_type::<RawDocumentBuf>();
                collect_bounded(cursor, self.max_bytes).await
            }
        }
    }
}

impl monsoon_script::Lookup for MongoLookup {
    fn lookup(&self, r: &LookupRequest) -> Result<Vec<Value>, Box<dyn std::error::Error + Send + Sync>> {
        let left = r.deadline.saturating_duration_since(Instant::now());
        let docs = self
            .handle
            .block_on(async { tokio::time::timeout(left, self.run(r)).await })
            .map_err(|_| format!("no answer from MongoDB within the script's time limit ({left:?} left)"))??;
        let mut stats = ConvertStats::default();
        docs.iter()
            .map(|d| {
                let mut out = Vec::with_capacity(d.as_bytes().len());
                convert::write_document(d, false, &mut out, &mut stats)?;
                Ok(serde_json::from_slice(&out)?)
            })
            .collect()
    }
}

/// What the scripts are given of a document.
pub struct Planned {
    /// Namespace.
    pub ns: String,
    /// The document as JSON, `_id` left out (as indexed).
    pub source: Bytes,
    /// The document's `_id` as JSON (the value, for the script's copy).
    pub id_value: Vec<u8>,
    /// Partial update instead of a whole-document index.
    pub update: bool,
    /// The change's update description as JSON (`updatedFields`, `removedFields`), for an update.
    pub update_desc: Option<String>,
}

/// The document as the script sees it: `{"_id": …, <source's fields>}`.
fn with_id(id_value: &[u8], source: &[u8]) -> String {
    let mut out = Vec::with_capacity(source.len() + id_value.len() + 8);
    out.extend_from_slice(b"{\"_id\":");
    out.extend_from_slice(id_value);
    match source.get(1..) {
        Some(b"}") | None => out.push(b'}'),
        Some(rest) => {
            out.push(b',');
            out.extend_from_slice(rest);
        }
    }
    // Valid UTF-8 (monsoon wrote both halves): kept without a copy.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A document of a scripted namespace, placed and waiting for its scripts: what they are
/// given, and the write (placed as the mapping placed it) whose operation and place they
/// decide. The transform submits the calls of a chunk together ([`Call::item`],
/// `Scripts::submit_decide_batch`: the filter first, the map script only for the documents it
/// keeps, both on one worker) and finishes each in order ([`Call::finish`]).
pub struct Call {
    scripts: Arc<Scripts>,
    plan: Planned,
    write: Write,
    /// A GridFS file's content, added to the decided write after the scripts ([`super::file`]).
    file: Option<Attachment>,
}

impl Call {
    /// A call of `scripts` on `plan`, deciding `write`.
    pub fn new(scripts: Arc<Scripts>, plan: Planned, write: Write, file: Option<Attachment>) -> Self {
        Self { scripts, plan, write, file }
    }

    /// What the script pool is given.
    pub fn item(&self) -> Item {
        Item { namespace: self.plan.ns.clone(), doc: with_id(&self.plan.id_value, &self.plan.source), update_desc: self.plan.update_desc.clone() }
    }

    /// The write the scripts' `decision` makes of this call's, or `None` when the change is
    /// ignored; a failed call dead-letters the document, unless it failed retriably (its
    /// lookups found MongoDB unreachable, or the pool restarted a worker): then it is submitted
    /// again until it answers, and the document holds its place meanwhile.
    pub async fn finish(self, decision: Result<Decision, ScriptError>) -> Option<Write> {
        let decision = match decision {
            Err(e) if e.is_retriable() => retried(&self.plan.ns, &e, || self.scripts.submit_decide(self.item())).await,
            other => other,
        };
        let Call { plan, write, file, .. } = self;
        let mut decided = match decision {
            Ok(Decision::Ignored) => None,
            Ok(Decision::Mapped(MapOutcome::Keep)) => Some(decided(&plan, write, plan.source.clone(), None)),
            Ok(Decision::Mapped(MapOutcome::Drop)) => {
                let mut write = write;
                write.op = Op::Delete;
                write.pipeline = None;
                Some(write)
            }
            Ok(Decision::Mapped(MapOutcome::Replace { doc, meta })) => replaced(&plan, write, &doc, meta),
            Err(e) => Some(rejected(&plan, write, &e)),
        };
        if let (Some(write), Some(file)) = (decided.as_mut(), file) {
            file.attach(write);
        }
        decided
    }
}

/// A document a script returned, placed where its `_meta_monstache` says.
fn replaced(plan: &Planned, write: Write, doc: &str, meta: monsoon_script::Meta) -> Option<Write> {
    if meta.skip {
        return None;
    }
    let source = match without_id(doc) {
        Ok(s) => Bytes::from(s),
        Err(e) => return Some(rejected(plan, write, &ScriptError::Internal(e))),
    };
    if write.origin.is_none() && (meta.index.is_some() || meta.id.is_some() || meta.routing.is_some()) {
        // Documents of a script whose source never names `_meta_monstache` have no location
        // record: a place chosen anyway (a key built at run time) could not be cleaned later.
        let e = ScriptError::Meta {
            script: format!("a script of {}", plan.ns),
            reason: "it chose the document's index, `_id` or routing through a `_meta_monstache` its source does not name; write `_meta_monstache` literally in the script so monsoon records where its documents go".into(),
        };
        return Some(rejected(plan, write, &e));
    }
    if let Some(index) = &meta.index {
        if let Err(why) = monsoon_api::check_index_name(index) {
            let e = ScriptError::Meta { script: format!("a script of {}", plan.ns), reason: format!("index `{index}` {why}") };
            return Some(rejected(plan, write, &e));
        }
    }
    Some(decided(plan, write, source, Some(meta)))
}

/// Submit a call that failed retriably (`first`) again, backing off, until it answers or
/// fails otherwise: an outage is waited out, never dead-lettered.
async fn retried<T, F: Fn() -> monsoon_script::Pending<T>>(ns: &str, first: &ScriptError, again: F) -> Result<T, ScriptError> {
    let waits = |e: &ScriptError, attempt: u32| {
        tracing::warn!(namespace = %ns, error = %e, attempt, "script call failed retriably (MongoDB unreachable?); the document waits and is tried again");
    };
    let mut attempt: u32 = 1;
    waits(first, attempt);
    // No cancellation token reaches here: the transform stage's forced stop ends the wait.
    let pace = crate::retry::Pace::unbounded().capped(LOOKUP_RETRY_MAX);
    crate::retry::retry(pace, again, |e: &ScriptError| {
        if !e.is_retriable() {
            return false;
        }
        attempt += 1;
        waits(e, attempt);
        true
    })
    .await
    .map_err(crate::retry::Stopped::into_inner)
}

fn decided(plan: &Planned, mut write: Write, source: Bytes, meta: Option<monsoon_script::Meta>) -> Write {
    let meta = meta.unwrap_or_default();
    if let Some(id) = &meta.id {
        let mut out = Vec::with_capacity(id.len() + 2);
        crate::convert::write_json_str(id, &mut out);
        write.id_json = String::from_utf8_lossy(&out).into();
    }
    write.op = if plan.update { Op::Update(source) } else { Op::Index(source) };
    if let Some(index) = meta.index {
        write.index = Arc::from(index);
    }
    if let Some(routing) = meta.routing {
        write.routing = Some(routing.into());
    }
    if let Some(pipeline) = meta.pipeline {
        write.pipeline = Some(Arc::from(pipeline));
    }
    write
}

/// `write` dead-lettered with the script's error.
pub fn rejected(plan: &Planned, write: Write, e: &ScriptError) -> Write {
    let error_type = match e.kind() {
        "threw" => "script_threw",
        "timeout" => "script_timeout",
        "out_of_memory" => "script_out_of_memory",
        "bad_return" => "script_bad_return",
        "meta" => "script_meta",
        "lookup" => "script_lookup",
        _ => "script_failed",
    };
    let mut write = write;
    write.op = Op::reject(error_type, e.to_string(), Some(plan.source.clone()));
    write.pipeline = None;
    write
}

/// The returned document without its top-level `_id` (Elasticsearch keeps `_id` out of
/// `_source`). Scripts see the document with `_id` first and mostly keep it there: that case
/// is cut out of the text as it is (the bench measured parsing the whole output into a map for
/// it as the largest cost around a script call); anything else is parsed.
fn without_id(doc: &str) -> Result<Vec<u8>, String> {
    if let Some(rest) = doc.strip_prefix("{\"_id\":") {
        if let Some(n) = json_value_len(rest.as_bytes()) {
            let after = &rest[n..];
            let mut out = Vec::with_capacity(doc.len());
            out.push(b'{');
            out.extend_from_slice(after.strip_prefix(',').unwrap_or(after).as_bytes());
            return Ok(out);
        }
    }
    if !doc.contains("\"_id\"") {
        return Ok(doc.as_bytes().to_vec());
    }
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(doc).map_err(|e| format!("script output is not a JSON object: {e}"))?;
    v.remove("_id");
    serde_json::to_vec(&v).map_err(|e| e.to_string())
}

/// The length of the JSON value at the start of `s` (text a JSON writer produced), up to the
/// `,` or `}` that follows it; `None` when `s` does not hold one.
fn json_value_len(s: &[u8]) -> Option<usize> {
    let (mut depth, mut in_string, mut i) = (0usize, false, 0usize);
    while i < s.len() {
        let c = s[i];
        if in_string {
            match c {
                b'\\' => i += 1,
                b'"' => {
                    in_string = false;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                _ => {}
            }
        } else {
            match c {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' if depth == 0 => return (i > 0).then_some(i),
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                b',' if depth == 0 => return (i > 0).then_some(i),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_see_the_id_first() {
        assert_eq!(with_id(b"7", b"{\"a\":1}"), r#"{"_id":7,"a":1}"#);
        assert_eq!(with_id(b"\"x\"", b"{}"), r#"{"_id":"x"}"#);
    }

    #[test]
    fn hex_strings_become_object_ids_in_queries() {
        let q = object_ids(Bson::Document(doc! {"author": "5a84a8b826993bde57c12893", "n": "short", "in": ["5a84a8b826993bde57c12893"]}));
        let Bson::Document(d) = q else { panic!("doc") };
        assert!(matches!(d.get("author"), Some(Bson::ObjectId(_))));
        assert!(matches!(d.get("n"), Some(Bson::String(_))));
        assert!(matches!(d.get_array("in").map(|a| &a[0]), Ok(Bson::ObjectId(_))));
    }

    #[test]
    fn returned_ids_leave_the_source() {
        let cut = |d: &str| String::from_utf8(without_id(d).expect("ok")).expect("utf8");
        assert_eq!(cut(r#"{"_id":1,"a":2}"#), r#"{"a":2}"#);
        assert_eq!(cut(r#"{"a":2}"#), r#"{"a":2}"#);
        assert_eq!(cut(r#"{"_id":"x"}"#), "{}");
        assert_eq!(cut(r#"{"_id":"a\"},{b","n":{"_id":3}}"#), r#"{"n":{"_id":3}}"#, "quotes, braces and commas inside the id");
        assert_eq!(cut(r#"{"_id":{"k":[1,{"x":"]"}]},"a":[{"_id":1}]}"#), r#"{"a":[{"_id":1}]}"#);
        assert_eq!(cut(r#"{"_id":-1.5e3,"a":true}"#), r#"{"a":true}"#);
        assert_eq!(cut(r#"{"a":1,"_id":2}"#), r#"{"a":1}"#, "not first: parsed");
        // Whatever the fast path cuts, parsing agrees.
        for d in [r#"{"_id":"a\"},{b","n":{"_id":3}}"#, r#"{"_id":[1,2,{"z":"}"}],"q":null}"#] {
            let fast: Value = serde_json::from_slice(&without_id(d).expect("ok")).expect("json");
            let mut slow: serde_json::Map<String, Value> = serde_json::from_str(d).expect("json");
            slow.remove("_id");
            assert_eq!(fast, Value::Object(slow), "{d}");
        }
    }
}
