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
//! - a write to a place no record names yet (a first write, a move) records it first, with the
//!   places it leaves (`stale`), before any copy lands there: replays are not deterministic (an
//!   update's document is looked up again, and may go elsewhere than before the crash), so a
//!   copy must never exist that no record names;
//! - the copies left behind are deleted (unversioned: such a copy may be newer than the change
//!   now replayed), and a delete goes where the record says the document is (or to the default
//!   place when there is no record: a document indexed before the mapping existed);
//! - once those writes are final, the record is written again (version bumped, `stale`
//!   cleared). A deleted document keeps a `gone` record, which stops an older replayed change
//!   from resurrecting it.
//!
//! Cost: one multi-get per bulk request that has tracked writes, one extra (small) write per
//! tracked write, and for a move one more (the intent) and a delete of the old copy;
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
    /// The document was deleted (kept as a tombstone against older replays).
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
}

impl Place {
    fn of(w: &Write) -> Self {
        Place { index: w.index.to_string(), id: w.id_json.to_string(), routing: w.routing.as_deref().map(str::to_owned) }
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
    for mut w in batch {
        let Some(origin) = w.origin.clone() else {
            plan.writes.push(w);
            continue;
        };
        if matches!(w.op, Op::Reject { .. }) {
            plan.writes.push(w);
            continue;
        }
        let before = found.get(&*origin);
        if before.is_some_and(|f| f.version > w.version) {
            plan.stale += 1;
            continue;
        }
        // Every place a copy may be: the recorded one and those a move left (a tombstone
        // record still lists the places its delete may not have reached).
        let mut places: Vec<Place> = Vec::new();
        if let Some(f) = before {
            if !f.record.gone {
                places.push(Place { index: f.record.index.clone(), id: f.record.id.clone(), routing: f.record.routing.clone() });
            }
            places.extend(f.record.stale.iter().cloned());
        }
        let record_id = {
            let mut id_json = Vec::with_capacity(origin.len() + 2);
            super::elasticsearch::request::write_json_str(&origin, &mut id_json);
            String::from_utf8_lossy(&id_json).into_owned()
        };
        let record = |source: Vec<u8>| {
            let mut rec = Write::new(w.ns.clone(), index.clone(), record_id.clone().into(), w.version, Op::Index(Bytes::from(source)));
            rec.aux = true;
            rec.seq = w.seq;
            rec
        };
        let deleting = matches!(w.op, Op::Delete);
        let here = (!deleting).then(|| Place::of(&w));
        let leaving: Vec<Place> = places.into_iter().filter(|p| Some(p) != here.as_ref()).collect();
        // A copy about to land somewhere no record names: record the place (and the places
        // left) first, so a crash before the final record cannot orphan it. (Replays are not
        // deterministic: an update's document is looked up again and may go elsewhere.)
        let new_place = !deleting && (before.is_none_or(|f| f.record.gone) || !leaving.is_empty());
        let places_left = leaving.len();
        if new_place {
            plan.intents.push(record(record_json(&w.ns, &w.index, &w.id_json, w.routing.as_deref(), false, &leaving)));
        }
        if deleting {
            // The delete goes to the recorded place; the others are deleted beside it.
            let mut targets = leaving.into_iter();
            if let Some(first) = targets.next() {
                w.index = Arc::from(first.index.as_str());
                w.id_json = first.id.into();
                w.routing = first.routing.map(Into::into);
            }
            for other in targets {
                plan.writes.push(stale_copy(&w, other));
            }
        } else {
            for old in leaving {
                plan.writes.push(stale_copy(&w, old));
            }
        }
        // The final record (version bumped, places left cleared), unless the intent already
        // said all of it (a first write).
        if !(new_place && places_left == 0) {
            plan.records.push(record(record_json(&w.ns, &w.index, &w.id_json, w.routing.as_deref(), deleting, &[])));
        }
        plan.writes.push(w);
    }
    plan
}

/// A delete of a copy its document left behind. Unversioned: the copy may carry a version
/// newer than the change now replayed (written before a crash, its record not yet), and it is
/// not the document's place whatever its version; the document's writes are serialized and
/// its record stops older replays, so nothing newer can be there.
fn stale_copy(w: &Write, place: Place) -> Write {
    let mut old = Write::new(w.ns.clone(), Arc::from(place.index.as_str()), place.id.into(), w.version, Op::Delete);
    old.routing = place.routing.map(Into::into);
    old.aux = true;
    old.unversioned = true;
    old.seq = w.seq;
    old
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
        Place { index: index.into(), id: format!("\"{id}\""), routing: routing.map(Into::into) }
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
    fn a_move_records_both_places_then_deletes_the_old_copy_unversioned() {
        let found: HashMap<_, _> = [("o".to_string(), found(5, place("c", "1", Some("r1")), false, vec![]))].into();
        let w = tracked("o", "c", "1", Some("r2"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &found, &index());
        assert_eq!(record_of(&p.intents[0]).stale, vec![place("c", "1", Some("r1"))], "the place left is named until the move is done");
        assert_eq!(p.writes.len(), 2);
        assert!(matches!(p.writes[0].op, Op::Delete) && p.writes[0].aux && p.writes[0].unversioned);
        assert_eq!(p.writes[0].routing.as_deref(), Some("r1"));
        assert_eq!(p.writes[1].routing.as_deref(), Some("r2"));
        assert!(record_of(&p.records[0]).stale.is_empty(), "the final record clears it");
        // Same place: no intent, no delete.
        let w = tracked("o", "c", "1", Some("r1"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &found, &index());
        assert_eq!((p.intents.len(), p.writes.len(), p.records.len()), (0, 1, 1));
    }

    #[test]
    fn places_a_crash_left_in_a_record_are_all_deleted_by_the_next_write() {
        // A move to r2 was recorded (r1 left) but never finished; the replay now goes to r3.
        let found: HashMap<_, _> = [("o".to_string(), found(10, place("c", "1", Some("r2")), false, vec![place("c", "1", Some("r1"))]))].into();
        let w = tracked("o", "c", "1", Some("r3"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &found, &index());
        let deleted: Vec<Option<&str>> = p.writes.iter().filter(|w| w.aux).map(|w| w.routing.as_deref()).collect();
        assert_eq!(deleted, vec![Some("r2"), Some("r1")]);
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
        assert!(!main.unversioned, "the document's own delete is versioned");
        assert_eq!(p.writes.len(), 2, "and the place a move left");
        assert!(record_of(&p.records[0]).gone);
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
    fn long_ids_are_hashed_within_elasticsearchs_limit() {
        let long = "x".repeat(600);
        let id = record_id("p", "d.c", &long);
        assert!(id.len() <= 512 && id.starts_with("p/sha256/"));
        assert_eq!(record_id("p", "d.c", "1"), "p/d.c/1");
    }
}
