//! What one document change becomes: the [`Write`] the sink carries out (index, `_id`,
//! routing, ingest pipeline, operation), or nothing (a keep-filter ignores it).
//!
//! A namespace without mapping or script takes the plain path (one conversion, nothing else);
//! a mapped one goes through its [`Shape`]; a scripted one leaves with its operation still to
//! be decided on the script threads ([`script::Call`]). Nothing here waits or does I/O.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use mongodb::bson::{RawBsonRef, RawDocument, Timestamp};

use super::change::{Doc, FileBody, Unreadable};
use super::file::Attachment;
use super::time_machine::{Logged, TimeMachine};
use super::{script, Outcome, Shape, Shapes};
use crate::checkpoint::ClusterTime;
use crate::config::Routing;
use crate::convert::{self, ConvertStats};
use crate::metrics::Metrics;
use crate::sink::{locations, Op, Write};

/// Where a namespace's writes go by default, and how its documents are shaped.
#[derive(Clone)]
pub struct Target {
    /// `db.collection`.
    pub ns: Arc<str>,
    /// Its default index.
    pub index: Arc<str>,
    /// Its mapping.
    pub shape: Arc<Shape>,
}

/// A namespace's database and collection names, and its target.
type Routed = (Arc<str>, Arc<str>, Target);

/// A document change placed: decided now, or left to the namespace's scripts.
pub enum Placed {
    /// Nothing to write (the keep-filter ignores the change).
    Nothing,
    /// This write.
    Write(Write),
    /// A write whose operation and place the namespace's scripts decide (boxed: a plain
    /// write, the common case, is moved several times on its way and stays small).
    Deferred(Box<script::Call>),
}

/// Places document changes: the pure part of the transform stage, plus handing documents to
/// the script pool.
pub struct Placer {
    /// What is synced where.
    pub routing: Routing,
    /// Every namespace's mapping.
    pub shapes: Arc<Shapes>,
    /// JavaScript middleware, when the pipeline has scripts or filters.
    pub scripts: Option<Arc<monsoon_script::Scripts>>,
    /// Pipeline name (location record ids).
    pub pipeline: Arc<str>,
    /// Metrics.
    pub metrics: Metrics,
    /// The ingest pipeline of GridFS files' documents (`spec.files.pipeline`).
    pub file_pipeline: Option<Arc<str>>,
    /// Indexes several namespaces may write (`spec.sharedIndexes`): documents written there
    /// keep location records, so a drop deletes only its namespace's.
    pub shared: Arc<std::collections::BTreeSet<String>>,
    /// Time machines (`spec.timeMachine`): which changes are also logged, and where.
    pub time_machine: Option<TimeMachine>,
    /// Merge patches (`spec.mergePatches`): which documents keep their patch history.
    pub patches: Option<super::patch::Patches>,
    /// The last namespace routed (consecutive changes mostly share one).
    route_cache: Mutex<Option<Routed>>,
}

impl Placer {
    /// A placer for a pipeline.
    pub fn new(routing: Routing, shapes: Arc<Shapes>, scripts: Option<Arc<monsoon_script::Scripts>>, pipeline: Arc<str>, metrics: Metrics) -> Self {
        Self { routing, shapes, scripts, pipeline, metrics, file_pipeline: None, shared: Arc::default(), time_machine: None, patches: None, route_cache: Mutex::new(None) }
    }

    /// Whether some documents keep location records (mappings placing them by their content,
    /// scripts, shared indexes).
    pub fn tracks_locations(&self) -> bool {
        self.shapes.tracks_any() || self.scripts.is_some() || !self.shared.is_empty()
    }

    /// A logged update's own version (time machines): its pre-image with its update
    /// description applied, in place of the document looked up when the stream read it (which
    /// may already be a later version). Without a pre-image, or one that does not apply, the
    /// looked-up document stays.
    fn own_version(&self, change: &mut Doc) {
        let (Some(tm), Some(before), Some(update)) = (&self.time_machine, change.before(), change.update()) else { return };
        if change.doc.is_none() || !tm.logs(&change.db, &change.coll, change.from_snapshot) {
            return;
        }
        match super::update::apply(before, update) {
            Ok(version) => change.doc = Some(super::change::Body::Own(version)),
            Err(why) => {
                self.metrics.events.with_label_values(&["own_version_failed"]).inc();
                tracing::warn!(namespace = %format!("{}.{}", change.db, change.coll), error = %why, "update description does not apply to the pre-image; logging the looked-up document");
            }
        }
    }

    /// Ready `change` for the time machine, when one logs it: its own version in place of the
    /// looked-up document ([`Placer::own_version`]), and what its entry needs
    /// ([`Placer::logged`]). Without a time machine nothing is looked at (every change passes
    /// here).
    #[inline]
    pub fn for_time_machine(&self, change: &mut Doc) -> Option<Logged> {
        self.time_machine.as_ref()?;
        self.own_version(change);
        self.logged(change)
    }

    /// What the time machine entry of `change` needs, when its namespace's changes are logged.
    fn logged(&self, change: &Doc) -> Option<Logged> {
        let tm = self.time_machine.as_ref()?;
        if !tm.logs(&change.db, &change.coll, change.from_snapshot) {
            return None;
        }
        // An `_id` Elasticsearch cannot take is refused with the write itself.
        let source_id = convert::es_id_string(change.id.as_raw_bson_ref()).ok()?;
        let has_time = self.shapes.for_ns(&change.db, &change.coll).has_oplog_time();
        Some(Logged { source_id: source_id.into(), has_time })
    }

    /// The default index and shape of `db.coll`, cached for the common case of consecutive
    /// changes to one collection.
    pub fn route(&self, db: &Arc<str>, coll: &Arc<str>) -> Target {
        let mut cache = self.route_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((d, c, target)) = cache.as_ref() {
            if (Arc::ptr_eq(d, db) || d == db) && (Arc::ptr_eq(c, coll) || c == coll) {
                return target.clone();
            }
        }
        let target = Target {
            ns: Arc::from(format!("{db}.{coll}")),
            index: Arc::from(self.routing.index_for(db, coll)),
            shape: self.shapes.for_ns(db, coll),
        };
        *cache = Some((db.clone(), coll.clone(), target.clone()));
        target
    }

    /// What `change` becomes. A GridFS file's content is taken out of `change` (moved to the
    /// write, not copied).
    pub fn place(&self, change: &mut Doc, stats: &mut ConvertStats) -> Placed {
        let target = self.route(&change.db, &change.coll);
        let file = change.take_file().map(|body| self.attachment(body));
        self.place_at(target, change, file, stats)
    }

    /// The index namespace `ns` (`db.coll`) writes unless a script chooses another.
    pub fn default_index(&self, ns: &str) -> String {
        ns.split_once('.').map_or_else(String::new, |(db, coll)| self.routing.index_for(db, coll))
    }

    /// A file's content, to add once its document's write is decided ([`super::file`]).
    fn attachment(&self, body: FileBody) -> Attachment {
        Attachment::new(body, self.file_pipeline.clone(), self.metrics.files_too_large.clone())
    }

    fn place_at(&self, target: Target, change: &Doc, file: Option<Attachment>, stats: &mut ConvertStats) -> Placed {
        let view = View::of(change);
        let scripts = self.scripts.as_ref().filter(|s| s.has_map(&target.ns) || s.has_filter(&target.ns));
        // Only a script naming `_meta_monstache` can move documents: only its get records.
        let placing = scripts.is_some_and(|s| s.may_place(&target.ns));
        let mut write = if target.shape.is_plain() && scripts.is_none() {
            plain_write(target.ns, target.index, view, stats)
        } else {
            let shape = target.shape.clone();
            match self.shaped_write(target, placing, view, stats) {
                None => return Placed::Nothing,
                Some(w) => match scripts {
                    Some(scripts) if matches!(w.op, Op::Index(_) | Op::Update(_)) => return self.defer(scripts, &shape, view, w, file, stats),
                    _ => w,
                },
            }
        };
        write.from_snapshot = change.from_snapshot;
        if write.origin.is_none() && self.shared.contains(&*write.index) && !matches!(write.op, Op::Reject(_)) {
            // A shared index: the record names this namespace's documents there.
            if let Ok(mongo_id) = convert::es_id_string(view.id) {
                write.origin = Some(Arc::from(locations::record_id(&self.pipeline, &write.ns, &mongo_id)));
            }
        }
        if let Some(file) = &file {
            file.attach(&mut write);
        }
        if let Some(patches) = self.patches.as_ref().filter(|p| p.applies(&change.db, &change.coll)) {
            let logged = self.time_machine.as_ref().zip(self.logged(change));
            patches.decide(change, &mut write, stats, logged.as_ref().map(|(tm, l)| (*tm, l)));
        }
        Placed::Write(write)
    }

    /// Hand a shaped write's document to the namespace's scripts, which decide its operation on
    /// the script threads while the transform places the next changes; a GridFS file's content
    /// is added to the write they decide, after them.
    fn defer(&self, scripts: &Arc<monsoon_script::Scripts>, shape: &Shape, view: View<'_>, mut write: Write, file: Option<Attachment>, stats: &mut ConvertStats) -> Placed {
        let source = match &write.op {
            // Shared, not copied: the scripts read it, and keep it as it is for `true`.
            Op::Index(s) | Op::Update(s) => s.clone(),
            Op::Create(_) | Op::Delete | Op::Reject(_) | Op::Patch(_) => return Placed::Write(write),
        };
        let mut id_value = Vec::new();
        if convert::write_value(view.id, &mut id_value, stats).is_err() {
            id_value = b"null".to_vec();
        }
        let update_desc = view.update.and_then(|u| {
            let mut out = Vec::new();
            convert::write_document(u, false, &mut out, stats).ok().map(|()| String::from_utf8_lossy(&out).into_owned())
        });
        let plan = script::Planned { ns: write.ns.to_string(), source, id_value, update: shape.update, update_desc };
        write.from_snapshot = view.from_snapshot;
        write.op = Op::Delete; // a placeholder: the scripts decide it
        Placed::Deferred(Box::new(script::Call::new(scripts.clone(), plan, write, file)))
    }

    /// A change through its namespace's mapping ([`crate::transform`]).
    fn shaped_write(&self, target: Target, placing: bool, view: View<'_>, stats: &mut ConvertStats) -> Option<Write> {
        let Target { ns, index, shape } = target;
        let View { id, doc, version, .. } = view;
        let outcome = match doc {
            None => Ok(Outcome::Delete),
            Some(d) => shape.shape(d, Timestamp::from(ClusterTime::from_version(version)), stats),
        };
        // The MongoDB `_id` in Elasticsearch form: the default `_id`, and the document's
        // identity in its location record.
        let Ok(mongo_id) = convert::es_id_string(id) else {
            return Some(plain_write(ns, index, view, stats));
        };
        let mut default_id = Vec::with_capacity(mongo_id.len() + 2);
        convert::write_json_str(&mongo_id, &mut default_id);
        let default_id: Box<str> = String::from_utf8_lossy(&default_id).into();
        // Scripts may choose the index, `_id` or routing: their documents are tracked too.
        let origin = (shape.tracks_location() || placing).then(|| Arc::from(locations::record_id(&self.pipeline, &ns, &mongo_id)));
        let mut write = match outcome {
            Ok(Outcome::Ignore) => {
                self.metrics.events.with_label_values(&["ignored"]).inc();
                return None;
            }
            Ok(Outcome::Delete) => Write::new(ns, index, default_id, version, Op::Delete),
            Ok(Outcome::Write(shaped)) => {
                let index = shaped.index.map_or(index, Arc::from);
                let source = Bytes::from(shaped.source);
                let op = if shape.update { Op::Update(source) } else { Op::Index(source) };
                let mut w = Write::new(ns, index, shaped.id_json.unwrap_or(default_id), version, op);
                w.routing = shaped.routing;
                w.pipeline = shape.ingest_pipeline.clone();
                w
            }
            Err(e) => {
                let mut document = Vec::new();
                let document = doc.and_then(|d| convert::write_document(d, false, &mut document, stats).ok()).map(|()| Bytes::from(document));
                Write::new(ns, index, default_id, version, Op::reject(e.error_type(), e.to_string(), document))
            }
        };
        write.origin = origin;
        Some(write)
    }

    /// A dead-letter write for a change event the source could not read, carrying the whole
    /// event as JSON and, where readable, its namespace, document and cluster time.
    pub fn unreadable(&self, event: &Unreadable, stats: &mut ConvertStats) -> Write {
        let (ns, index) = match &event.ns {
            // The record names the index for reading only: a refusal registers no namespace.
            Some((db, coll)) => (Arc::from(format!("{db}.{coll}")), Arc::from(self.routing.index_for(db, coll))),
            None => (Arc::from("unknown"), Arc::from("")),
        };
        let id_json = event.id.as_ref().map_or_else(|| "null".into(), dead_letter_id);
        let mut document = Vec::new();
        let document = convert::write_document(&event.raw, false, &mut document, stats).is_ok().then(|| Bytes::from(document));
        let version = event.time.map_or(0, |t| ClusterTime::from(t).version());
        Write::new(ns, index, id_json, version, Op::reject("malformed_event", event.why.clone(), document))
    }
}

impl Placer {
    /// The dead letter of a relation that could not be followed from the change of document
    /// `id` in `ns` (`spec.relate`).
    pub fn relation_failed(&self, ns: &Arc<str>, id: &mongodb::bson::RawBson, version: u64, reason: String) -> Write {
        Write::new(ns.clone(), Arc::from(self.default_index(ns)), dead_letter_id(id), version, Op::reject("relate_failed", reason, None))
    }
}

/// The Elasticsearch `_id` (JSON) a dead letter names for MongoDB `_id` `id`; `null` when it
/// has none (too long).
fn dead_letter_id(id: &mongodb::bson::RawBson) -> Box<str> {
    convert::es_id_json(id.as_raw_bson_ref()).unwrap_or_else(|_| "null".into())
}

/// A change, borrowed from its [`Doc`].
#[derive(Clone, Copy)]
struct View<'a> {
    id: RawBsonRef<'a>,
    doc: Option<&'a RawDocument>,
    update: Option<&'a RawDocument>,
    version: u64,
    from_snapshot: bool,
}

impl<'a> View<'a> {
    fn of(d: &'a Doc) -> Self {
        Self { id: d.id.as_raw_bson_ref(), doc: d.doc.as_ref().map(super::change::Body::doc), update: d.update().map(|u| &**u), version: d.version, from_snapshot: d.from_snapshot }
    }
}

/// A change of a namespace without a mapping: the document as it is, at its `_id`.
fn plain_write(ns: Arc<str>, index: Arc<str>, view: View<'_>, stats: &mut ConvertStats) -> Write {
    let View { id, doc, version, .. } = view;
    let mut source = Vec::new();
    let converted = doc.map(|doc| {
        source.reserve(doc.as_bytes().len() + 64);
        convert::write_document(doc, true, &mut source, stats)
    });
    let id_json = match convert::es_id_json(id) {
        Ok(id_json) => id_json,
        Err(e) => {
            // An _id Elasticsearch cannot take (over 512 bytes): dead-letter it, in order.
            let shown = format!("{:?}", id.to_raw_bson());
            let shown: String = shown.chars().take(200).collect();
            return Write::new(ns, index, format!("\"{}\"", shown.replace(['"', '\\'], "'")).into(), version, Op::reject("invalid_id", e.to_string(), matches!(converted, Some(Ok(()))).then(|| Bytes::from(source))));
        }
    };
    let op = match converted {
        Some(Ok(())) => Op::Index(Bytes::from(source)),
        Some(Err(e)) => Op::reject("malformed_bson", e.to_string(), None),
        None => Op::Delete,
    };
    Write::new(ns, index, id_json, version, op)
}
