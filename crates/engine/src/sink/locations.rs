//! Where each document went, for namespaces whose index, `_id` or routing comes from the
//! document (`spec.mappings`).
//!
//! A MongoDB delete carries only the `_id`: with custom routing or a per-document index, a
//! delete sent to the default place would miss the indexed copy (Elasticsearch answers 404,
//! which looks like "already gone"), and a document whose routing or index changes would
//! leave its old copy behind. Monstache's default answer is one search per delete, which
//! misses documents indexed within the last refresh interval.
//!
//! monsoon keeps one small location record per such document in a locations index
//! (`monsoon-locations`): `{ns, index, id, routing, gone, stale}`, versioned with the change's
//! cluster time. Per bulk request the sink reads the records of its tracked writes with one
//! multi-get (real-time: it sees writes not yet refreshed), and then:
//!
//! - a write whose record is newer is stale (a replay after a restart): it is skipped;
//! - every write is recorded first (an *intent*: its place, and the places it leaves in
//!   `stale`, each with the version of the last copy written there), before its copy lands:
//!   replays are not deterministic (an update's document is looked up again, and may go
//!   elsewhere than before the crash), so a copy must never exist that no record names, and
//!   a record's version bounds every copy it names;
//! - the copies left behind are deleted with the version of the copy they are meant to
//!   remove (`external_gte`): such a delete removes this document's copy (or an older one),
//!   never the newer copy of another document that has since taken the same `_id` (an
//!   application swapping keys). Until 2026-12 these deletes were unversioned, and a
//!   document leaving key `k` deleted the document that had just taken `k` whenever its
//!   delete ran after that write (another bulk request, or a coalesced batch);
//! - a delete goes where the record says the document is (or to the default place when there
//!   is no record: a document indexed before the mapping existed);
//! - once every delete of a move is final, the record is written again (`stale` cleared); a
//!   delete refused for good keeps its place in `stale`, so the next write tries again, and a
//!   refused intent stops its document's write (it is dead-lettered instead);
//! - a deleted document's record is deleted once its copies are (versioned, so the record of a
//!   newer insert stays): the locations index holds live documents only, whatever the insert
//!   and delete traffic. (Records written before 2026-12 kept `gone` tombstones forever; those
//!   still read as deleted documents.)
//!
//! Cost: one multi-get per bulk request that has tracked writes, one extra (small) write per
//! tracked write, and for a move one more (the final record) and a delete of the old copy;
//! namespaces without such mappings pay nothing.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Op, Write};

/// Default name of the locations index.
pub const DEFAULT_INDEX: &str = "monsoon-locations";

/// Settings and mapping of the locations index: records are only fetched by id, never
/// searched, so nothing is indexed.
pub fn index_body() -> serde_json::Value {
    serde_json::json!({
        "settings": {"index": {"number_of_shards": 1, "auto_expand_replicas": "0-1"}},
        "mappings": {"dynamic": false, "properties": {}}
    })
}

/// The id of a document's location record: pipeline, namespace and the document's
/// Elasticsearch form of its MongoDB `_id`. Ids over Elasticsearch's 512 bytes are hashed.
pub fn record_id(pipeline: &str, ns: &str, mongo_id_text: &str) -> String {
    let id = format!("{pipeline}/{ns}/{mongo_id_text}");
    if id.len() <= crate::convert::MAX_ES_ID_BYTES {
        return id;
    }
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{pipeline}/sha256/{hex}")
}

/// A location record as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Namespace, for people reading the index.
    #[serde(default)]
    pub ns: String,
    /// Index of the indexed copy.
    pub index: String,
    /// Its `_id` as a JSON string literal.
    pub id: String,
    /// Its routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<String>,
    /// The document was deleted (a tombstone of an older monsoon; records of deleted
    /// documents are now deleted with them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gone: bool,
    /// Other places that may still hold a copy (a move in progress): deleted by the next write.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale: Vec<Place>,
}

/// Where one copy of a document is: index, `_id` (JSON string literal) and routing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Index.
    pub index: String,
    /// `_id` as a JSON string literal.
    pub id: String,
    /// Routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<String>,
    /// The version of the last copy written there (records written before monsoon kept it
    /// have none: the record's own version stands in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u64>,
}

impl Place {
    fn of(w: &Write) -> Self {
        Place { index: w.index.to_string(), id: w.id_json.to_string(), routing: w.routing.as_deref().map(str::to_owned), v: Some(w.version) }
    }

    /// The same place (index, `_id`, routing), whatever version each names.
    fn same(&self, other: &Place) -> bool {
        self.index == other.index && self.id == other.id && self.routing == other.routing
    }
}

/// A record as read, with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// External version of the record: the cluster time of the change that wrote it.
    pub version: u64,
    /// The record.
    pub record: Record,
}

/// The outcome of planning a batch against its records.
#[derive(Debug, Default)]
pub struct Plan {
    /// Location records to write before the documents: a document's new place (a first write
    /// or a move) is recorded, with the places it leaves, before any copy lands there.
    pub intents: Vec<Write>,
    /// Then the batch's writes (deletes aimed where their documents are) and deletes of the
    /// copies a move leaves, in order.
    pub writes: Vec<Write>,
    /// Location records to write once those are final.
    pub records: Vec<Write>,
    /// Tracked writes skipped because their record is newer (stale replays).
    pub stale: u64,
}

/// Plan `batch` given the location records found for its tracked writes (`found`, by
/// record id). Untracked writes pass through unchanged.
pub fn plan(batch: Vec<Write>, found: &HashMap<String, Found>, index: &Arc<str>) -> Plan {
    let mut plan = Plan::default();
    for w in batch {
        let Some(origin) = w.origin.clone() else {
            plan.writes.push(w);
            continue;
        };
        if matches!(w.op, Op::Reject(_)) {
            plan.writes.push(w);
            continue;
        }
        let before = found.get(&*origin);
        if before.is_some_and(|f| f.version > w.version) {
            plan.stale += 1;
            continue;
        }
        plan_one(w, &origin, before, index, &mut plan);
    }
    plan
}

/// Every place a copy of a document may be, with the version of the last copy written there:
/// the recorded one (unless deleted) and those a move left (a tombstone still lists the places
/// its delete may not have reached).
fn recorded_places(before: Option<&Found>) -> Vec<Place> {
    let Some(f) = before else { return Vec::new() };
    let mut places = Vec::with_capacity(1 + f.record.stale.len());
    if !f.record.gone {
        places.push(Place { index: f.record.index.clone(), id: f.record.id.clone(), routing: f.record.routing.clone(), v: Some(f.version) });
    }
    places.extend(f.record.stale.iter().map(|p| Place { v: p.v.or(Some(f.version)), ..p.clone() }));
    places
}

/// Plan one tracked write: its intent, the write (a delete aimed where the document is), the
/// deletes of the copies it leaves, and its final record.
fn plan_one(mut w: Write, origin: &str, before: Option<&Found>, index: &Arc<str>, plan: &mut Plan) {
    let record_id: Box<str> = {
        let mut id_json = Vec::with_capacity(origin.len() + 2);
        super::elasticsearch::request::write_json_str(origin, &mut id_json);
        String::from_utf8_lossy(&id_json).into()
    };
    let record = |w: &Write, source: Vec<u8>| {
        let mut rec = Write::new(w.ns.clone(), index.clone(), record_id.clone(), w.version, Op::Index(Bytes::from(source)));
        rec.aux = true;
        rec.seq = w.seq;
        rec
    };
    let deleting = matches!(w.op, Op::Delete);
    let places = recorded_places(before);
    if deleting {
        // The delete goes to the recorded place (versioned with the change, as every write of
        // the document); the places a move left are deleted beside it.
        let mut targets = places.into_iter();
        if let Some(first) = targets.next() {
            w.index = Arc::from(first.index.as_str());
            w.id_json = first.id.into();
            w.routing = first.routing.map(Into::into);
        }
        for other in targets {
            plan.writes.push(left_copy(&w, other));
        }
        // Once every copy is deleted the record goes too (versioned: a record of a newer
        // change, the document inserted again, stays), so deleted documents leave nothing
        // behind. A replay after a crash may then index an older change of the document again
        // for a moment, until it replays the delete, as for any document whose delete
        // Elasticsearch forgot (`index.gc_deletes`); while a delete is refused, the record
        // stays, naming the copy that is still there.
        let mut forget = Write::new(w.ns.clone(), index.clone(), record_id.clone(), w.version, Op::Delete);
        forget.aux = true;
        forget.seq = w.seq;
        plan.records.push(forget);
        plan.writes.push(w);
        return;
    }
    let here = Place::of(&w);
    let leaving: Vec<Place> = places.into_iter().filter(|p| !p.same(&here)).collect();
    // Recorded before the copy lands, with the version it lands with: a crash after it cannot
    // leave a copy that no record names, nor one newer than its record says.
    plan.intents.push(record(&w, record_json(&w.ns, &w.index, &w.id_json, w.routing.as_deref(), false, &leaving)));
    if !leaving.is_empty() {
        for old in leaving {
            plan.writes.push(left_copy(&w, old));
        }
        // The final record clears the places left, once their deletes are final.
        plan.records.push(record(&w, record_json(&w.ns, &w.index, &w.id_json, w.routing.as_deref(), false, &[])));
    }
    plan.writes.push(w);
}

/// A delete of a copy its document left behind, versioned with the version of the last copy
/// this document wrote there (`external_gte`): it removes that copy (or an older one), and
/// loses against the newer copy of a document that has since taken the same place.
fn left_copy(w: &Write, place: Place) -> Write {
    let version = place.v.unwrap_or(w.version);
    let mut old = Write::new(w.ns.clone(), Arc::from(place.index.as_str()), place.id.into(), version, Op::Delete);
    old.routing = place.routing.map(Into::into);
    old.aux = true;
    old.seq = w.seq;
    old
}

/// A location record found by the re-snapshot sweep that names a document deleted during lost
/// history: the places to delete (each with `version = below - 1`, `external_gte`, so a copy
/// written since stays) and then the record itself.
#[derive(Debug, PartialEq, Eq)]
pub struct Swept {
    /// The record's id.
    pub record_id: String,
    /// Every place a copy may be.
    pub places: Vec<Place>,
}

/// Which of the location records `hits` (`(record id, version, record)`) belong to documents of
/// `pipeline` that this shard owns (`owns`, given the MongoDB `_id` in Elasticsearch form) and
/// were not written again by the re-snapshot (`version < below`): they were deleted during the
/// lost history. Ownership is read from the record id (`pipeline/namespace/_id`), since the
/// document's Elasticsearch `_id` may come from one of its fields; a record whose id was hashed
/// (an `_id` over ~500 bytes) names no owner and is left to the unsharded sweep (counted in the
/// second value).
pub fn swept(hits: &[(String, u64, Record)], pipeline: &str, below: u64, scope: &Scope<'_>) -> (Vec<Swept>, u64) {
    let mut out = Vec::new();
    let mut ownerless = 0;
    for (id, version, record) in hits {
        if *version >= below || scope.ns.is_some_and(|ns| ns != record.ns) {
            continue;
        }
        let Some(rest) = id.strip_prefix(pipeline).and_then(|r| r.strip_prefix('/')) else { continue };
        match rest.strip_prefix(record.ns.as_str()).and_then(|r| r.strip_prefix('/')) {
            Some(mongo_id) if (scope.owns)(mongo_id) => {}
            Some(_) => continue,
            None if !rest.starts_with("sha256/") => continue,
            // A hashed id names no owner: only an unsharded pipeline owns it.
            None if scope.sharded => {
                ownerless += 1;
                continue;
            }
            None => {}
        }
        let mut places = Vec::with_capacity(1 + record.stale.len());
        if !record.gone {
            places.push(Place { index: record.index.clone(), id: record.id.clone(), routing: record.routing.clone(), v: None });
        }
        places.extend(record.stale.iter().cloned());
        out.push(Swept { record_id: id.clone(), places });
    }
    (out, ownerless)
}

/// Which location records a sweep reads.
pub struct Scope<'a> {
    /// Only this namespace's (a drop), or every namespace's (the re-snapshot sweep).
    pub ns: Option<&'a str>,
    /// Whether the pipeline is split over several workers: then records whose id was hashed
    /// (an `_id` over ~500 bytes) name no owner and are left alone (counted).
    pub sharded: bool,
    /// Whether this worker owns the document with this MongoDB `_id` (Elasticsearch form).
    pub owns: &'a (dyn Fn(&str) -> bool + Sync),
}

/// A [`Record`] as JSON, written directly (one per tracked write, on the hot path).
fn record_json(ns: &str, index: &str, id: &str, routing: Option<&str>, gone: bool, stale: &[Place]) -> Vec<u8> {
    use super::elasticsearch::request::write_json_str;
    let mut out = Vec::with_capacity(ns.len() + index.len() + id.len() + routing.map_or(0, str::len) + 48);
    out.extend_from_slice(b"{\"ns\":");
    write_json_str(ns, &mut out);
    out.extend_from_slice(b",\"index\":");
    write_json_str(index, &mut out);
    out.extend_from_slice(b",\"id\":");
    write_json_str(id, &mut out);
    if let Some(r) = routing {
        out.extend_from_slice(b",\"routing\":");
        write_json_str(r, &mut out);
    }
    if gone {
        out.extend_from_slice(b",\"gone\":true");
    }
    if !stale.is_empty() {
        out.extend_from_slice(b",\"stale\":");
        out.extend_from_slice(&serde_json::to_vec(stale).unwrap_or_else(|_| b"[]".to_vec()));
    }
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracked(origin: &str, index: &str, id: &str, routing: Option<&str>, version: u64, op: Op) -> Write {
        let mut w = Write::new(Arc::from("blog.comments"), Arc::from(index), format!("\"{id}\"").into(), version, op);
        w.routing = routing.map(Into::into);
        w.origin = Some(Arc::from(origin));
        w
    }

    fn place(index: &str, id: &str, routing: Option<&str>) -> Place {
        Place { index: index.into(), id: format!("\"{id}\""), routing: routing.map(Into::into), v: None }
    }

    fn at(version: u64, p: Place) -> Place {
        Place { v: Some(version), ..p }
    }

    fn found(version: u64, at: Place, gone: bool, stale: Vec<Place>) -> Found {
        Found { version, record: Record { ns: "blog.comments".into(), index: at.index, id: at.id, routing: at.routing, gone, stale } }
    }

    fn record_of(w: &Write) -> Record {
        match &w.op {
            Op::Index(b) => serde_json::from_slice(b).expect("record"),
            other => panic!("{other:?}"),
        }
    }

    fn index() -> Arc<str> {
        Arc::from(DEFAULT_INDEX)
    }

    #[test]
    fn a_first_write_is_recorded_before_it_lands() {
        let w = tracked("p/blog.comments/1", "c", "1", Some("r1"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &HashMap::new(), &index());
        assert_eq!(p.intents.len(), 1, "the place is recorded first");
        assert_eq!(record_of(&p.intents[0]), Record { ns: "blog.comments".into(), index: "c".into(), id: "\"1\"".into(), routing: Some("r1".into()), gone: false, stale: vec![] });
        assert_eq!(&*p.intents[0].id_json, "\"p/blog.comments/1\"");
        assert!(p.intents[0].aux && p.intents[0].version == 10);
        assert_eq!((p.writes.len(), p.records.len()), (1, 0), "the intent was the whole record");
    }

    #[test]
    fn a_move_records_both_places_then_deletes_the_old_copy_with_its_version() {
        let found: HashMap<_, _> = [("o".to_string(), found(5, place("c", "1", Some("r1")), false, vec![]))].into();
        let w = tracked("o", "c", "1", Some("r2"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &found, &index());
        assert_eq!(record_of(&p.intents[0]).stale, vec![at(5, place("c", "1", Some("r1")))], "the place left is named, with its copy's version, until the move is done");
        assert_eq!(p.writes.len(), 2);
        assert!(matches!(p.writes[0].op, Op::Delete) && p.writes[0].aux);
        assert_eq!(p.writes[0].version, 5, "the delete loses against any copy newer than the one this document left");
        assert_eq!(p.writes[0].routing.as_deref(), Some("r1"));
        assert_eq!(p.writes[1].routing.as_deref(), Some("r2"));
        assert!(record_of(&p.records[0]).stale.is_empty(), "the final record clears it");
        // Same place: recorded first (with the new version), nothing to delete or clear.
        let w = tracked("o", "c", "1", Some("r1"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &found, &index());
        assert_eq!((p.intents.len(), p.writes.len(), p.records.len()), (1, 1, 0));
        assert_eq!(p.intents[0].version, 10);
    }

    #[test]
    fn a_document_taking_a_key_another_just_left_survives_that_ones_delete() {
        // A leaves key "1" (its copy there written at 5) for "2"; B takes "1" at 7. Whatever
        // order the two plans' writes reach Elasticsearch in, A's delete of "1" is versioned
        // 5 and so loses against B's copy at 7.
        let found: HashMap<_, _> = [
            ("a".to_string(), found(5, place("items", "1", None), false, vec![])),
            ("b".to_string(), found(6, place("items", "2", None), false, vec![])),
        ]
        .into();
        let b = tracked("b", "items", "1", None, 7, Op::Index(Bytes::from_static(b"{}")));
        let a = tracked("a", "items", "2", None, 8, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![b, a], &found, &index());
        let deletes: Vec<(&str, u64)> = p.writes.iter().filter(|w| matches!(w.op, Op::Delete)).map(|w| (&*w.id_json, w.version)).collect();
        assert_eq!(deletes, vec![("\"2\"", 6), ("\"1\"", 5)]);
        let writes: Vec<(&str, u64)> = p.writes.iter().filter(|w| matches!(w.op, Op::Index(_))).map(|w| (&*w.id_json, w.version)).collect();
        assert_eq!(writes, vec![("\"1\"", 7), ("\"2\"", 8)]);
    }

    #[test]
    fn places_a_crash_left_in_a_record_are_all_deleted_by_the_next_write() {
        // A move to r2 was recorded (r1 left) but never finished; the replay now goes to r3.
        let found: HashMap<_, _> = [("o".to_string(), found(10, place("c", "1", Some("r2")), false, vec![place("c", "1", Some("r1"))]))].into();
        let w = tracked("o", "c", "1", Some("r3"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &found, &index());
        let deleted: Vec<(Option<&str>, u64)> = p.writes.iter().filter(|w| w.aux).map(|w| (w.routing.as_deref(), w.version)).collect();
        assert_eq!(deleted, vec![(Some("r2"), 10), (Some("r1"), 10)], "a place recorded without a version takes the record's");
        assert_eq!(record_of(&p.intents[0]).stale.len(), 2);
    }

    #[test]
    fn a_delete_goes_where_the_document_is_and_leaves_a_tombstone() {
        let found: HashMap<_, _> = [("o".to_string(), found(5, place("c-eu", "x", Some("r1")), false, vec![place("c-us", "x", None)]))].into();
        let w = tracked("o", "default", "1", None, 10, Op::Delete);
        let p = plan(vec![w], &found, &index());
        assert!(p.intents.is_empty());
        let main = p.writes.last().expect("the delete");
        assert_eq!((&*main.index, &*main.id_json, main.routing.as_deref()), ("c-eu", "\"x\"", Some("r1")));
        assert_eq!(main.version, 10, "the document's own delete is versioned with its change");
        assert_eq!(p.writes.len(), 2, "and the place a move left");
        let forget = &p.records[0];
        assert!(matches!(forget.op, Op::Delete) && forget.aux, "then the record itself goes: no tombstone grows the locations index");
        assert_eq!((&*forget.id_json, forget.version), ("\"o\"", 10), "versioned: a newer record stays");
        // No record: the default place.
        let w = tracked("n", "default", "1", None, 10, Op::Delete);
        let p = plan(vec![w], &HashMap::new(), &index());
        assert_eq!(&*p.writes[0].index, "default");
    }

    #[test]
    fn a_write_older_than_its_record_is_a_stale_replay() {
        let found: HashMap<_, _> = [("o".to_string(), found(20, place("c", "1", Some("r9")), false, vec![])), ("g".to_string(), found(20, place("c", "2", None), true, vec![]))].into();
        let p = plan(
            vec![
                tracked("o", "c", "1", Some("r1"), 10, Op::Index(Bytes::from_static(b"{}"))),
                tracked("g", "c", "2", None, 10, Op::Index(Bytes::from_static(b"{}"))),
                tracked("o", "c", "1", Some("r9"), 20, Op::Index(Bytes::from_static(b"{}"))),
            ],
            &found,
            &index(),
        );
        assert_eq!(p.stale, 2, "the older write and the resurrection of a deleted document");
        assert_eq!(p.writes.len(), 1, "the replay of the record's own change goes through");
    }

    #[test]
    fn untracked_writes_pass_through() {
        let w = Write::new(Arc::from("a.b"), Arc::from("a.b"), "\"1\"".into(), 1, Op::Delete);
        let p = plan(vec![w], &HashMap::new(), &index());
        assert_eq!((p.intents.len(), p.writes.len(), p.records.len()), (0, 1, 0));
    }

    #[test]
    fn records_written_by_hand_read_back() {
        for (routing, gone, stale) in [(Some("r\"1"), false, vec![place("i", "y", Some("r0"))]), (None, true, vec![])] {
            let json = record_json("d.c", "i", "\"x\\y\"", routing, gone, &stale);
            let back: Record = serde_json::from_slice(&json).expect("reads back");
            assert_eq!(back, Record { ns: "d.c".into(), index: "i".into(), id: "\"x\\y\"".into(), routing: routing.map(Into::into), gone, stale });
        }
    }

    #[test]
    fn the_sharded_sweep_owns_documents_by_their_mongodb_id_not_their_elasticsearch_id() {
        let rec = |index: &str, id: &str| Record { ns: "shop.items".into(), index: index.into(), id: format!("\"{id}\""), routing: None, gone: false, stale: vec![] };
        let hits = vec![
            // Custom `_id`s (from `sku`): the owner is the MongoDB `_id` in the record id.
            ("p/shop.items/1".to_string(), 5, rec("shop.items", "sku-b")),
            ("p/shop.items/2".to_string(), 5, rec("shop.items", "sku-a")),
            // Rewritten by the re-snapshot: live.
            ("p/shop.items/3".to_string(), 50, rec("shop.items", "sku-c")),
            // Another pipeline's, and one with a hashed id.
            ("q/shop.items/1".to_string(), 5, rec("shop.items", "sku-z")),
            ("p/sha256/abc".to_string(), 5, rec("shop.items", "sku-y")),
        ];
        let owns = |mongo_id: &str| mongo_id == "1" || mongo_id == "3";
        let (swept, ownerless) = swept(&hits, "p", 10, &Scope { ns: None, sharded: true, owns: &owns });
        assert_eq!(swept, vec![Swept { record_id: "p/shop.items/1".into(), places: vec![Place { index: "shop.items".into(), id: "\"sku-b\"".into(), routing: None, v: None }] }]);
        assert_eq!(ownerless, 1);
    }

    #[test]
    fn long_ids_are_hashed_within_elasticsearchs_limit() {
        let long = "x".repeat(600);
        let id = record_id("p", "d.c", &long);
        assert!(id.len() <= 512 && id.starts_with("p/sha256/"));
        assert_eq!(record_id("p", "d.c", "1"), "p/d.c/1");
    }
}
