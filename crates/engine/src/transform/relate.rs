//! Relations (`spec.relate`, Monstache's `[[relate]]` and its view replication): a change of
//! one namespace re-syncs the documents of another that match it.
//!
//! The lookups are the transform stage's declared I/O. For each change of a namespace with
//! relations, [`Relations::resync`] starts a task that queries MongoDB and hands the related
//! documents back, as they are read, through a small bounded channel: the stage writes them
//! in order after the change itself and before the change's position, so the checkpoint
//! passes the change only once every related write is acknowledged. A full channel holds the
//! task (back-pressure, nothing dropped); the stage's window bounds how many run at once.
//!
//! # Rules (Monstache's, and where monsoon differs)
//! - A namespace's own changes are written only when one of its relations says `keepSrc`.
//! - A relation applies at depth `d` (1 for the change itself) while `maxDepth` is 0 or at
//!   least `d`. A related document whose namespace has relations triggers them at `d + 1`.
//! - A delete, through a relation matching `_id` to `_id`, deletes the related document (and
//!   goes on down such relations). Any other relation re-syncs what it finds: the documents
//!   still exist. (Monstache deletes those too, removing live documents from the index.)
//! - A delete carries only the `_id`: a relation from another field reads what the deleted
//!   document pointed to from the change's pre-image (MongoDB 6.0+, on collections with
//!   `changeStreamPreAndPostImages`). Without one its re-sync is dead-lettered with the reason
//!   instead of skipped in silence (Monstache looks the value up in the index; monsoon's
//!   transform does not read the index).
//! - With a pre-image, an update that changes the source field re-syncs the documents related
//!   to the old value too (they changed as well; Monstache re-syncs only the new ones).
//! - A document is re-synced at most once per change, so cycles end (Monstache loops).
//! - In a sharded pipeline every worker reads every change of a related namespace, and each
//!   writes only the related documents it owns.
//! - Every related write carries the change's cluster time as its version: a replay or an
//!   older change's lookup never overwrites what a later change wrote.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use monsoon_api::{MatchFieldType, Relate};
use mongodb::bson::{doc, Bson, Document, RawBson, RawBsonRef, RawDocumentBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::change::Doc;
use crate::config::Shard;
use crate::convert;
use crate::metrics::Metrics;

/// Related documents a re-sync reads ahead of the stage.
const AHEAD: usize = 64;

/// One relation, compiled.
#[derive(Debug)]
struct Relation {
    with_db: Arc<str>,
    with_coll: Arc<str>,
    src: Vec<String>,
    match_field: String,
    match_type: Option<MatchFieldType>,
    max_depth: u32,
    dot_notation: bool,
}

impl Relation {
    fn is_identity(&self) -> bool {
        self.src == ["_id"] && self.match_field == "_id"
    }

    fn applies_at(&self, depth: u32) -> bool {
        self.max_depth == 0 || depth <= self.max_depth
    }

    fn with_ns(&self) -> String {
        format!("{}.{}", self.with_db, self.with_coll)
    }

    /// The query finding the documents related to `value`.
    fn selector(&self, value: Bson) -> Document {
        if self.dot_notation {
            return doc! { self.match_field.clone(): value };
        }
        // Monstache's nested selector: `a.b` becomes `{a: {b: value}}`.
        let mut parts = self.match_field.rsplit('.');
        let mut sel = doc! { parts.next().unwrap_or_default(): value };
        for part in parts {
            sel = doc! { part: sel };
        }
        sel
    }
}

/// What a re-sync hands the stage.
#[derive(Debug)]
pub enum Related {
    /// A related document, read now (or, `doc: None`, deleted), as a change of its namespace.
    Doc(Doc),
    /// A relation that could not be followed: dead-letter it under the change's namespace and
    /// `_id`.
    Failed {
        /// Why.
        reason: String,
    },
    /// Every related document was handed on.
    Done,
}

/// The pipeline's relations.
pub struct Relations {
    by_ns: HashMap<String, Vec<Relation>>,
    keeps_source: HashSet<String>,
    client: mongodb::Client,
    shard: Shard,
    cancel: CancellationToken,
    metrics: Metrics,
}

/// A document whose relations are followed next: its namespace, `_id`, the document (`None`
/// for a delete), and for the change itself the document before it (a pre-image, when kept).
struct Visit {
    ns: String,
    id: RawBson,
    doc: Option<RawDocumentBuf>,
    before: Option<RawDocumentBuf>,
}

impl Relations {
    /// The relations of `spec` (validated), reading over `client`.
    pub fn new(spec: &[Relate], client: mongodb::Client, shard: Shard, cancel: CancellationToken, metrics: Metrics) -> Self {
        let mut by_ns: HashMap<String, Vec<Relation>> = HashMap::new();
        let mut keeps_source = HashSet::new();
        for r in spec {
            let (with_db, with_coll) = r.with_namespace.split_once('.').unwrap_or((&r.with_namespace, ""));
            by_ns.entry(r.namespace.clone()).or_default().push(Relation {
                with_db: Arc::from(with_db),
                with_coll: Arc::from(with_coll),
                src: r.src_field.split('.').map(str::to_owned).collect(),
                match_field: r.match_field.clone(),
                match_type: r.match_field_type,
                max_depth: r.max_depth,
                dot_notation: r.dot_notation,
            });
            if r.keep_src {
                keeps_source.insert(r.namespace.clone());
            }
        }
        Self { by_ns, keeps_source, client, shard, cancel, metrics }
    }

    /// Whether changes of `ns` re-sync other documents.
    pub fn triggers(&self, ns: &str) -> bool {
        self.by_ns.contains_key(ns)
    }

    /// Whether the changes of `ns` are written themselves (no relation, or one keeping them).
    pub fn writes_own(&self, ns: &str) -> bool {
        !self.by_ns.contains_key(ns) || self.keeps_source.contains(ns)
    }

    /// Start re-syncing what `change` (a change-stream change of a namespace with relations)
    /// relates to; the documents arrive in the order read, then [`Related::Done`]. A channel
    /// that closes without `Done` means the re-sync was stopped (shutdown).
    pub fn resync(self: &Arc<Self>, change: &Doc) -> mpsc::Receiver<Related> {
        let (tx, rx) = mpsc::channel(AHEAD);
        let root = Visit { ns: format!("{}.{}", change.db, change.coll), id: change.id.clone(), doc: change.doc.as_ref().map(|b| b.doc().to_owned()), before: change.before().cloned() };
        let this = self.clone();
        let version = change.version;
        tokio::spawn(async move {
            if this.follow(root, version, &tx).await.is_ok() {
                let _ = tx.send(Related::Done).await;
            }
        });
        rx
    }

    /// Follow the relations from `root`, depth by depth. `Err`: stopped (shutdown, or the
    /// stage is gone).
    async fn follow(&self, root: Visit, version: u64, tx: &mpsc::Sender<Related>) -> Result<(), Stopped> {
        let mut walk = Walk { version, depth: 1, seen: HashSet::new(), next: Vec::new(), tx };
        walk.seen.insert((root.ns.clone(), id_key(&root.id)));
        let mut level = vec![root];
        while !level.is_empty() {
            let mut namespaces: Vec<&str> = level.iter().map(|v| v.ns.as_str()).collect();
            namespaces.sort_unstable();
            namespaces.dedup();
            let depth = walk.depth;
            for ns in namespaces {
                for relation in self.by_ns.get(ns).into_iter().flatten().filter(|r| r.applies_at(depth)) {
                    let mut values = Vec::new();
                    for visit in level.iter().filter(|v| v.ns == ns) {
                        values.extend(self.values_to_match(relation, visit, &mut walk).await?);
                    }
                    self.find_all(relation, values, &mut walk).await?;
                }
            }
            level = std::mem::take(&mut walk.next);
            walk.depth += 1;
        }
        Ok(())
    }

    /// What `relation` matches for `visit`: its source field's value in the document and, when
    /// the change has a pre-image, in the document before it (the documents related to the old
    /// value changed too). A delete through an `_id`-to-`_id` relation is handed on as the
    /// related document's delete here; a delete through another field is followed through its
    /// pre-image, or dead-lettered without one.
    async fn values_to_match(&self, relation: &Relation, visit: &Visit, walk: &mut Walk<'_>) -> Result<Vec<Bson>, Stopped> {
        if relation.is_identity() && !self.owns(&visit.id) {
            // The related document has the same `_id`: the shard owning it follows it.
            return Ok(Vec::new());
        }
        if visit.doc.is_none() && relation.is_identity() {
            self.delete_same_id(relation, visit, walk).await?;
            return Ok(Vec::new());
        }
        if visit.doc.is_none() && relation.src == ["_id"] {
            return Ok(Bson::try_from(visit.id.clone()).ok().into_iter().collect());
        }
        let Some(current) = visit.doc.as_ref().or(visit.before.as_ref()) else {
            let reason = format!(
                "`{}` was deleted: its `{}` (what relation to `{}` matches on) left with it and the delete carried no pre-image, so the related documents could not be re-synced; re-sync them by hand, and enable `changeStreamPreAndPostImages` on the collection (MongoDB 6.0+) so deletes can be followed",
                visit.ns,
                relation.src.join("."),
                relation.with_ns()
            );
            return self.failed(reason, walk).await.map(|()| Vec::new());
        };
        let mut values = Vec::new();
        match source_value(current, &relation.src) {
            Some(value) => values.extend(self.typed(relation, visit, value, walk).await?),
            // Nothing to match: no related document.
            None => self.metrics.events.with_label_values(&["relate_no_source"]).inc(),
        }
        if let (Some(_), Some(before)) = (&visit.doc, &visit.before) {
            if let Some(value) = source_value(before, &relation.src) {
                values.extend(self.typed(relation, visit, value, walk).await?);
            }
        }
        Ok(values)
    }

    /// A delete through an `_id`-to-`_id` relation: the same `_id` in the related namespace
    /// goes too.
    async fn delete_same_id(&self, relation: &Relation, visit: &Visit, walk: &mut Walk<'_>) -> Result<(), Stopped> {
        let with_ns = relation.with_ns();
        if walk.seen.insert((with_ns.clone(), id_key(&visit.id))) {
            self.hand_on(relation, visit.id.clone(), None, walk).await?;
            if self.has_further(&with_ns, walk.depth) {
                walk.next.push(Visit { ns: with_ns, id: visit.id.clone(), doc: None, before: None });
            }
        }
        Ok(())
    }

    /// `value` as `matchFieldType` says (unchanged without one); a value that cannot convert is
    /// dead-lettered.
    async fn typed(&self, relation: &Relation, visit: &Visit, value: Bson, walk: &Walk<'_>) -> Result<Option<Bson>, Stopped> {
        match relation.match_type.map(|t| convert_to(value.clone(), t)).transpose() {
            Ok(v) => Ok(Some(v.unwrap_or(value))),
            Err(why) => self.failed(format!("relation from `{}` to `{}`: `{}` {why}", visit.ns, relation.with_ns(), relation.src.join(".")), walk).await.map(|()| None),
        }
    }

    async fn failed(&self, reason: String, walk: &Walk<'_>) -> Result<(), Stopped> {
        self.metrics.events.with_label_values(&["relate_failed"]).inc();
        send(walk.tx, Related::Failed { reason }).await
    }

    /// Look up every value of one depth: many at once (`$in`, [`IN_BATCH`] values a query)
    /// where that matches the same documents as one query each (a top-level or dot-notation
    /// field, plain values), otherwise one query per value.
    async fn find_all(&self, relation: &Relation, mut values: Vec<Bson>, walk: &mut Walk<'_>) -> Result<(), Stopped> {
        values.sort_by_cached_key(|v| v.clone().into_relaxed_extjson().to_string());
        values.dedup();
        let batchable = (relation.dot_notation || !relation.match_field.contains('.')) && values.iter().all(|v| !matches!(v, Bson::Array(_) | Bson::Document(_) | Bson::RegularExpression(_)));
        if batchable && values.len() > 1 {
            for batch in values.chunks(IN_BATCH) {
                let filter = doc! { relation.match_field.clone(): { "$in": batch.to_vec() } };
                self.find_related(relation, filter, walk).await?;
            }
            return Ok(());
        }
        for value in values {
            self.find_related(relation, relation.selector(value), walk).await?;
        }
        Ok(())
    }

    /// Query `relation`'s namespace with `filter` and hand on each document found (once per
    /// change). A query MongoDB refuses is dead-lettered; an outage is waited out.
    async fn find_related(&self, relation: &Relation, filter: Document, walk: &mut Walk<'_>) -> Result<(), Stopped> {
        let with_ns = relation.with_ns();
        let pace = crate::retry::Pace::until_cancelled(&self.cancel).capped(super::script::LOOKUP_RETRY_MAX);
        // Each attempt borrows what it reads with, and the walk it adds to.
        let mut at = (self, relation, &filter, walk);
        let found = crate::retry::retry_with(pace, &mut at, |(this, relation, filter, walk)| Box::pin(this.find_once(relation, filter, walk)), |e| {
            let retried = !super::script::refused_for_good(e);
            if retried {
                warn!(namespace = %with_ns, error = %e, "relation lookup failed; retrying (documents already found are not handed on twice)");
            }
            retried
        })
        .await;
        match found {
            Ok(done) => done,
            Err(crate::retry::Stopped::Refused(e)) => self.failed(format!("MongoDB refused the query of relation to `{with_ns}` ({filter}): {e}"), at.3).await,
            Err(_) => Err(Stopped),
        }
    }

    /// One query of `relation`'s namespace: hand on each document found that this change has
    /// not handed on yet. `Ok(Err(Stopped))`: the stage stopped taking them.
    async fn find_once(&self, relation: &Relation, filter: &Document, walk: &mut Walk<'_>) -> Result<Result<(), Stopped>, mongodb::error::Error> {
        use futures_util::TryStreamExt;
        let with_ns = relation.with_ns();
        let coll = self.client.database(&relation.with_db).collection::<RawDocumentBuf>(&relation.with_coll);
        let mut cursor = coll.find(filter.clone()).await?;
        while let Some(found) = cursor.try_next().await? {
            let Ok(Some(id)) = found.get("_id") else { continue };
            let id = id.to_raw_bson();
            if !walk.seen.insert((with_ns.clone(), id_key(&id))) {
                continue;
            }
            let kept = self.has_further(&with_ns, walk.depth).then(|| (id.clone(), found.clone()));
            if self.hand_on(relation, id, Some(found), walk).await.is_err() {
                return Ok(Err(Stopped));
            }
            if let Some((id, found)) = kept {
                walk.next.push(Visit { ns: with_ns.clone(), id, doc: Some(found), before: None });
            }
        }
        Ok(Ok(()))
    }

    /// Hand on a related document (or its delete) to be written, when this worker owns it and
    /// its namespace writes its own documents (one whose relations all leave them out is only
    /// followed further).
    async fn hand_on(&self, relation: &Relation, id: RawBson, doc: Option<RawDocumentBuf>, walk: &Walk<'_>) -> Result<(), Stopped> {
        if !self.owns(&id) || !self.writes_own(&relation.with_ns()) {
            return Ok(());
        }
        self.metrics.events.with_label_values(&["related"]).inc();
        let doc = Doc { db: relation.with_db.clone(), coll: relation.with_coll.clone(), id, doc: doc.map(super::change::Body::Own), version: walk.version, from_snapshot: false, owned: true, extra: None };
        send(walk.tx, Related::Doc(doc)).await
    }

    /// Whether this worker owns the document with MongoDB `_id` `id` (as the source decides).
    fn owns(&self, id: &RawBson) -> bool {
        !self.shard.is_split() || convert::es_id_string(id.as_raw_bson_ref()).map_or(self.shard.index == 0, |es_id| self.shard.owns(&es_id))
    }

    /// Whether documents of `ns` found at `depth` have relations to follow at the next depth.
    fn has_further(&self, ns: &str, depth: u32) -> bool {
        self.by_ns.get(ns).is_some_and(|rs| rs.iter().any(|r| r.applies_at(depth + 1)))
    }
}

/// One change's re-sync under way: where it is, and what it has handed on.
struct Walk<'a> {
    /// The change's version, carried by every related write.
    version: u64,
    /// The depth being followed (1: the change's own relations).
    depth: u32,
    /// The documents handed on (namespace, `_id`): each at most once per change.
    seen: HashSet<(String, String)>,
    /// The documents of the next depth.
    next: Vec<Visit>,
    tx: &'a mpsc::Sender<Related>,
}

/// Values one `$in` lookup matches at most.
const IN_BATCH: usize = 256;

/// The re-sync was stopped: shutdown, or the stage stopped listening.
#[derive(Debug)]
struct Stopped;

async fn send(tx: &mpsc::Sender<Related>, related: Related) -> Result<(), Stopped> {
    tx.send(related).await.map_err(|_| Stopped)
}

/// An `_id`'s identity for "seen once": its Extended JSON form.
fn id_key(id: &RawBson) -> String {
    Bson::try_from(id.clone()).map_or_else(|_| format!("{id:?}"), |b| b.into_relaxed_extjson().to_string())
}

/// The value at `path` (through sub-documents), if any and not null.
fn source_value(doc: &RawDocumentBuf, path: &[String]) -> Option<Bson> {
    let (last, parents) = path.split_last()?;
    let mut at = doc.as_ref();
    for part in parents {
        match at.get(part).ok().flatten()? {
            RawBsonRef::Document(d) => at = d,
            _ => return None,
        }
    }
    match at.get(last).ok().flatten()? {
        RawBsonRef::Null | RawBsonRef::Undefined => None,
        v => Bson::try_from(v.to_raw_bson()).ok(),
    }
}

/// `value` as `to` (`matchFieldType`), as Monstache converts it.
fn convert_to(value: Bson, to: MatchFieldType) -> Result<Bson, String> {
    use std::str::FromStr;
    let text = |v: &Bson| match v {
        Bson::String(s) => s.clone(),
        Bson::ObjectId(o) => o.to_hex(),
        Bson::Double(f) => f.to_string(),
        other => other.to_string(),
    };
    match to {
        MatchFieldType::ObjectId => match &value {
            Bson::ObjectId(_) => Ok(value),
            v => mongodb::bson::oid::ObjectId::parse_str(text(v)).map(Bson::ObjectId).map_err(|_| format!("`{}` is not an ObjectId's 24 hex digits (matchFieldType: objectId)", text(v))),
        },
        MatchFieldType::String => Ok(Bson::String(text(&value))),
        MatchFieldType::Int | MatchFieldType::Long => match &value {
            Bson::Int32(n) => Ok(Bson::Int64(i64::from(*n))),
            Bson::Int64(_) => Ok(value),
            Bson::Double(f) if f.is_finite() => Ok(Bson::Int64(*f as i64)),
            Bson::Boolean(b) => Ok(Bson::Int64(i64::from(*b))),
            Bson::String(_) | Bson::Decimal128(_) => text(&value).trim().parse::<i64>().map(Bson::Int64).map_err(|_| format!("`{}` is not an integer (matchFieldType: long)", text(&value))),
            v => Err(format!("holds a {:?}, which has no integer form (matchFieldType: long)", v.element_type())),
        },
        MatchFieldType::Decimal => match &value {
            Bson::Decimal128(_) => Ok(value),
            Bson::Int32(_) | Bson::Int64(_) | Bson::Double(_) | Bson::String(_) => {
                mongodb::bson::Decimal128::from_str(text(&value).trim()).map(Bson::Decimal128).map_err(|_| format!("`{}` is not a decimal number (matchFieldType: decimal)", text(&value)))
            }
            v => Err(format!("holds a {:?}, which has no decimal form (matchFieldType: decimal)", v.element_type())),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(match_field: &str, dot_notation: bool) -> Relation {
        Relation { with_db: Arc::from("db"), with_coll: Arc::from("c"), src: vec!["_id".into()], match_field: match_field.into(), match_type: None, max_depth: 0, dot_notation }
    }

    #[test]
    fn selectors_nest_unless_dot_notation() {
        assert_eq!(relation("a.b", false).selector(Bson::Int32(1)), doc! {"a": {"b": 1}});
        assert_eq!(relation("a.b", true).selector(Bson::Int32(1)), doc! {"a.b": 1});
        assert_eq!(relation("s", false).selector(Bson::Int32(1)), doc! {"s": 1});
    }

    #[test]
    fn source_values_follow_sub_documents_only() {
        let d = RawDocumentBuf::from_document(&doc! {"a": {"b": 7}, "n": null, "arr": [{"b": 1}]}).expect("doc");
        assert_eq!(source_value(&d, &["a".into(), "b".into()]), Some(Bson::Int32(7)));
        assert_eq!(source_value(&d, &["n".into()]), None);
        assert_eq!(source_value(&d, &["arr".into(), "b".into()]), None);
        assert_eq!(source_value(&d, &["missing".into()]), None);
    }

    #[test]
    fn match_field_types_convert_as_monstache_does() {
        let oid = mongodb::bson::oid::ObjectId::new();
        assert_eq!(convert_to(Bson::String(oid.to_hex()), MatchFieldType::ObjectId), Ok(Bson::ObjectId(oid)));
        assert!(convert_to(Bson::String("nope".into()), MatchFieldType::ObjectId).is_err());
        assert_eq!(convert_to(Bson::ObjectId(oid), MatchFieldType::String), Ok(Bson::String(oid.to_hex())));
        assert_eq!(convert_to(Bson::Int32(5), MatchFieldType::String), Ok(Bson::String("5".into())));
        assert_eq!(convert_to(Bson::Double(5.0), MatchFieldType::String), Ok(Bson::String("5".into())));
        assert_eq!(convert_to(Bson::String(" 42".into()), MatchFieldType::Long), Ok(Bson::Int64(42)));
        assert_eq!(convert_to(Bson::Double(3.9), MatchFieldType::Int), Ok(Bson::Int64(3)));
        assert_eq!(convert_to(Bson::Boolean(true), MatchFieldType::Int), Ok(Bson::Int64(1)));
        assert!(convert_to(Bson::Array(vec![]), MatchFieldType::Long).is_err());
        assert_eq!(convert_to(Bson::String("1.50".into()), MatchFieldType::Decimal).map(|b| b.to_string()), Ok("1.50".into()));
    }
}
