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
//! (`monsoon-locations`): `{ns, index, id, routing, gone}`, versioned with the change's
//! cluster time. Per bulk request the sink reads the records of its tracked writes with one
//! multi-get (real-time: it sees writes not yet refreshed), and then:
//!
//! - a write whose record is newer is stale (a replay after a restart): it is skipped;
//! - a write that moves the document (new index, `_id` or routing) first deletes the old copy;
//! - a delete goes where the record says the document is (or to the default place when there
//!   is no record: a document indexed before the mapping existed);
//! - once the bulk request's writes are final, the records are written (second phase), so a
//!   crash in between replays the change and finds the old record again: nothing is left
//!   behind. A deleted document keeps a `gone` record, which stops an older replayed change
//!   from resurrecting it.
//!
//! Cost: one multi-get per bulk request that has tracked writes, and one extra (small) write
//! per tracked write; namespaces without such mappings pay nothing.

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
    /// What to send first: the batch's writes (deletes aimed where their documents are) and
    /// deletes of old copies, in order.
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
        let before = before.filter(|f| !f.record.gone).map(|f| &f.record);
        let deleting = matches!(w.op, Op::Delete);
        if deleting {
            if let Some(b) = before {
                // Aim the delete where the document is.
                w.index = Arc::from(b.index.as_str());
                w.id_json = b.id.clone().into();
                w.routing = b.routing.clone().map(Into::into);
            }
        } else if let Some(b) = before {
            let moved = *b.index != *w.index || *b.id != *w.id_json || b.routing.as_deref() != w.routing.as_deref();
            if moved {
                let mut old = Write::new(w.ns.clone(), Arc::from(b.index.as_str()), b.id.clone().into(), w.version, Op::Delete);
                old.routing = b.routing.clone().map(Into::into);
                old.aux = true;
                old.seq = w.seq;
                plan.writes.push(old);
            }
        }
        let source = record_json(&w.ns, &w.index, &w.id_json, w.routing.as_deref(), deleting);
        let mut id_json = Vec::with_capacity(origin.len() + 2);
        super::elasticsearch::request::write_json_str(&origin, &mut id_json);
        let mut rec = Write::new(w.ns.clone(), index.clone(), String::from_utf8_lossy(&id_json).into(), w.version, Op::Index(Bytes::from(source)));
        rec.aux = true;
        rec.seq = w.seq;
        plan.records.push(rec);
        plan.writes.push(w);
    }
    plan
}

/// A [`Record`] as JSON, written directly (one per tracked write, on the hot path).
fn record_json(ns: &str, index: &str, id: &str, routing: Option<&str>, gone: bool) -> Vec<u8> {
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

    fn found(version: u64, index: &str, id: &str, routing: Option<&str>, gone: bool) -> Found {
        Found { version, record: Record { ns: "blog.comments".into(), index: index.into(), id: format!("\"{id}\""), routing: routing.map(Into::into), gone } }
    }

    fn index() -> Arc<str> {
        Arc::from(DEFAULT_INDEX)
    }

    #[test]
    fn a_first_write_is_sent_with_its_record_to_follow() {
        let w = tracked("p/blog.comments/1", "c", "1", Some("r1"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &HashMap::new(), &index());
        assert_eq!(p.writes.len(), 1);
        assert_eq!(p.records.len(), 1);
        let rec: Record = match &p.records[0].op {
            Op::Index(b) => serde_json::from_slice(b).expect("record"),
            other => panic!("{other:?}"),
        };
        assert_eq!(rec, Record { ns: "blog.comments".into(), index: "c".into(), id: "\"1\"".into(), routing: Some("r1".into()), gone: false });
        assert_eq!(&*p.records[0].id_json, "\"p/blog.comments/1\"");
        assert!(p.records[0].aux && p.records[0].version == 10);
    }

    #[test]
    fn a_moved_document_deletes_its_old_copy_first() {
        let found: HashMap<_, _> = [("o".to_string(), found(5, "c", "1", Some("r1"), false))].into();
        let w = tracked("o", "c", "1", Some("r2"), 10, Op::Index(Bytes::from_static(b"{}")));
        let p = plan(vec![w], &found, &index());
        assert_eq!(p.writes.len(), 2);
        assert!(matches!(p.writes[0].op, Op::Delete) && p.writes[0].aux);
        assert_eq!(p.writes[0].routing.as_deref(), Some("r1"));
        assert_eq!(p.writes[0].version, 10);
        assert_eq!(p.writes[1].routing.as_deref(), Some("r2"));
        // Same place: no delete.
        let w = tracked("o", "c", "1", Some("r1"), 10, Op::Index(Bytes::from_static(b"{}")));
        assert_eq!(plan(vec![w], &found, &index()).writes.len(), 1);
    }

    #[test]
    fn a_delete_goes_where_the_document_is_and_leaves_a_tombstone() {
        let found: HashMap<_, _> = [("o".to_string(), found(5, "c-eu", "x", Some("r1"), false))].into();
        let w = tracked("o", "default", "1", None, 10, Op::Delete);
        let p = plan(vec![w], &found, &index());
        assert_eq!((&*p.writes[0].index, &*p.writes[0].id_json, p.writes[0].routing.as_deref()), ("c-eu", "\"x\"", Some("r1")));
        let rec: Record = match &p.records[0].op {
            Op::Index(b) => serde_json::from_slice(b).expect("record"),
            other => panic!("{other:?}"),
        };
        assert!(rec.gone);
        // No record: the default place.
        let w = tracked("n", "default", "1", None, 10, Op::Delete);
        let p = plan(vec![w], &HashMap::new(), &index());
        assert_eq!(&*p.writes[0].index, "default");
    }

    #[test]
    fn a_write_older_than_its_record_is_a_stale_replay() {
        let found: HashMap<_, _> = [("o".to_string(), found(20, "c", "1", Some("r9"), false)), ("g".to_string(), found(20, "c", "2", None, true))].into();
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
    fn records_written_by_hand_read_back() {
        for (routing, gone) in [(Some("r\"1"), false), (None, true)] {
            let json = record_json("d.c", "i", "\"x\\y\"", routing, gone);
            let back: Record = serde_json::from_slice(&json).expect("reads back");
            assert_eq!(back, Record { ns: "d.c".into(), index: "i".into(), id: "\"x\\y\"".into(), routing: routing.map(Into::into), gone });
        }
    }

    #[test]
    fn untracked_writes_pass_through() {
        let w = Write::new(Arc::from("a.b"), Arc::from("a.b"), "\"1\"".into(), 1, Op::Delete);
        let p = plan(vec![w], &HashMap::new(), &index());
        assert_eq!((p.writes.len(), p.records.len()), (1, 0));
    }

    #[test]
    fn long_ids_are_hashed_within_elasticsearchs_limit() {
        let long = "x".repeat(600);
        let id = record_id("p", "d.c", &long);
        assert!(id.len() <= 512 && id.starts_with("p/sha256/"));
        assert_eq!(record_id("p", "d.c", "1"), "p/d.c/1");
    }
}
