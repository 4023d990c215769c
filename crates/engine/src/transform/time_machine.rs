//! Time machines (`spec.timeMachine`, Monstache's `time-machine-namespaces`): every insert,
//! update and replace of a logged namespace also becomes an entry in a dated log index,
//! `<prefix>.<index>.<date>`, so every version of a document can be found again.
//!
//! Pure: [`TimeMachine::entry`] turns the write a change became into its log entry, a second
//! write that the stage hands on right after it (before the change's position, so the
//! checkpoint passes the change only once both are acknowledged).
//!
//! # Invariants
//! - An entry's `_id` is the MongoDB `_id` and the change's cluster time
//!   (`<source id>@<seconds>.<increment>`), and its index's date is that cluster time's: a
//!   replay after a crash writes the same entry to the same place again.
//! - Entries are created, never overwritten (`create`: a replayed entry answers 409, which is
//!   success), so the first write of an entry is the one kept.
//! - Log indexes are never in `written`: no drop, sweep or `onDrop` deletes them.
//! - Deletes are not logged (Monstache logs only what it indexes).

use std::sync::Arc;

use bytes::Bytes;
use monsoon_api::shape::DateFormat;
use monsoon_api::NamespacePattern;

use crate::checkpoint::ClusterTime;
use crate::convert;
use crate::sink::patches::PatchChange;
use crate::sink::{Op, Write};

/// Monstache's field names for the change's time in a log entry (`oplog-ts-field-name`,
/// `oplog-date-field-name` defaults).
const TS_FIELD: &str = "oplog_ts";
/// See [`TS_FIELD`].
const DATE_FIELD: &str = "oplog_date";
/// The MongoDB `_id` of the logged document, as Monstache names it.
pub const SOURCE_ID_FIELD: &str = "_source_id";

/// The compiled `spec.timeMachine`.
#[derive(Debug)]
pub struct TimeMachine {
    namespaces: Vec<NamespacePattern>,
    prefix: String,
    suffix: DateFormat,
    snapshot: bool,
}

/// What a change's log entry needs beyond its write.
#[derive(Debug, Clone)]
pub struct Logged {
    /// The MongoDB `_id` as text (an ObjectId in hex), as the default Elasticsearch `_id`.
    pub source_id: Box<str>,
    /// The document already carries the change's time (the mapping's `oplogTime`).
    pub has_time: bool,
}

impl TimeMachine {
    /// Compile a validated `spec.timeMachine`.
    ///
    /// # Errors
    /// A namespace or format that does not parse (validation refuses these first).
    pub fn new(spec: &monsoon_api::TimeMachine) -> Result<Self, String> {
        let namespaces = spec.namespaces.iter().map(|n| NamespacePattern::parse(n)).collect::<Result<Vec<_>, _>>()?;
        let suffix = DateFormat::parse(&spec.index_suffix).map_err(|e| format!("timeMachine.indexSuffix: {e}"))?;
        Ok(Self { namespaces, prefix: spec.index_prefix.to_lowercase(), suffix, snapshot: spec.snapshot })
    }

    /// Whether a change of `db.coll` is logged (a snapshot read only with `snapshot: true`).
    pub fn logs(&self, db: &str, coll: &str, from_snapshot: bool) -> bool {
        (!from_snapshot || self.snapshot) && self.namespaces.iter().any(|p| p.matches(db, coll))
    }

    /// The log index of a write to `index` at cluster time `version`.
    pub fn index_for(&self, index: &str, version: u64) -> String {
        let t = ClusterTime::from_version(version);
        format!("{}.{}.{}", self.prefix, index, self.suffix.format(i64::from(t.t))).to_lowercase()
    }

    /// The log entry of `write` (the write a logged change became), or `None` when the write
    /// indexes nothing (a delete, a refusal).
    ///
    /// A patched document's change ([`Op::Patch`]) carries its entry itself (see
    /// [`TimeMachine::patch_log`]): the sink knows that change's own version only once it has
    /// applied it to the document's history. Only an entry refused here is a write of its own.
    pub fn entry(&self, write: &Write, logged: &Logged) -> Option<Write> {
        let entry = self.entry_of(write, logged)?;
        let carried = matches!(write.op, Op::Patch(_)) && matches!(entry.op, Op::Create(_));
        (!carried).then_some(entry)
    }

    /// Where a patched document's change is logged, and the members its entry adds to the
    /// version the sink rebuilds; `None` when [`TimeMachine::entry`] makes it a write of its own
    /// (refused) or logs nothing.
    pub fn patch_log(&self, write: &Write, logged: &Logged) -> Option<crate::sink::patches::PatchLog> {
        let entry = self.entry_of(write, logged)?;
        if !matches!(entry.op, Op::Create(_)) {
            return None;
        }
        let mut members = Vec::with_capacity(120);
        entry_members(logged, ClusterTime::from_version(write.version), &mut members);
        Some(crate::sink::patches::PatchLog { index: entry.index, id_json: entry.id_json, routing: entry.routing, pipeline: entry.pipeline, members: Bytes::from(members) })
    }

    fn entry_of(&self, write: &Write, logged: &Logged) -> Option<Write> {
        let source = match &write.op {
            Op::Index(s) | Op::Update(s) => s,
            // A patched document's change: the whole document it carries (an update's is the
            // one MongoDB looked up, as for every other update).
            Op::Patch(p) => match &p.change {
                PatchChange::Whole { source, .. } | PatchChange::Update { lookup: Some(source), .. } => source,
                PatchChange::Update { lookup: None, .. } | PatchChange::Delete => return None,
            },
            Op::Create(_) | Op::Delete | Op::Reject(_) => return None,
        };
        let time = ClusterTime::from_version(write.version);
        let index = self.index_for(&write.index, write.version);
        let id = format!("{}@{}.{}", logged.source_id, time.t, time.i);
        let mut id_json = Vec::with_capacity(id.len() + 2);
        convert::write_json_str(&id, &mut id_json);
        let id_json: Box<str> = String::from_utf8_lossy(&id_json).into();
        let op = if let Err(why) = monsoon_api::check_index_name(&index) {
            Op::reject("time_machine_index", format!("time machine index `{index}` {why}"), Some(source.clone()))
        } else if id.len() > 512 {
            let reason = format!("the time machine entry's _id (the MongoDB _id and the change's time) is {} bytes; Elasticsearch takes at most 512", id.len());
            Op::reject("invalid_id", reason, Some(source.clone()))
        } else {
            Op::Create(Bytes::from(entry_source(source, logged, time)))
        };
        let mut entry = Write::new(write.ns.clone(), Arc::from(index), id_json, write.version, op);
        // Routed by the MongoDB `_id`: a document's versions share a shard, and a search with
        // `?routing=<id>` reads only that one.
        entry.routing = Some(logged.source_id.clone());
        entry.pipeline = write.pipeline.clone();
        entry.from_snapshot = write.from_snapshot;
        Some(entry)
    }
}

/// The entry's `_source`: the document as written, with `_source_id` and, unless it has them,
/// the change's time (`oplog_ts`, `oplog_date`, as Monstache adds them).
fn entry_source(source: &[u8], logged: &Logged, time: ClusterTime) -> Vec<u8> {
    let mut out = Vec::with_capacity(source.len() + 120);
    // The converter writes an object: `{...}`, possibly with white space after it.
    let body = source.trim_ascii_end();
    let body = body.strip_suffix(b"}").unwrap_or(body);
    out.extend_from_slice(body);
    if body.trim_ascii() != b"{" {
        out.push(b',');
    }
    entry_members(logged, time, &mut out);
    out.push(b'}');
    out
}

/// The members an entry adds to the document: `_source_id` and, unless it has them, the
/// change's time.
fn entry_members(logged: &Logged, time: ClusterTime, out: &mut Vec<u8>) {
    convert::write_json_str(SOURCE_ID_FIELD, out);
    out.push(b':');
    convert::write_json_str(&logged.source_id, out);
    if !logged.has_time {
        out.push(b',');
        out.extend_from_slice(&super::oplog_members(TS_FIELD, DATE_FIELD, time.into()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(json: serde_json::Value) -> TimeMachine {
        TimeMachine::new(&serde_json::from_value(json).expect("spec")).expect("compiles")
    }

    fn logged(id: &str) -> Logged {
        Logged { source_id: id.into(), has_time: false }
    }

    const T: ClusterTime = ClusterTime { t: 1_700_000_000, i: 3 };

    fn write(op: Op) -> Write {
        Write::new(Arc::from("shop.orders"), Arc::from("orders"), "\"a1\"".into(), T.version(), op)
    }

    #[test]
    fn an_update_becomes_an_entry_in_the_dated_log_index() {
        let tm = machine(serde_json::json!({"namespaces": ["shop.*"]}));
        let mut w = write(Op::Update(Bytes::from_static(b"{\"n\":1}")));
        w.pipeline = Some(Arc::from("enrich"));
        let e = tm.entry(&w, &logged("a1")).expect("entry");
        assert_eq!(&*e.index, "log.orders.2023-11-14");
        assert_eq!(&*e.id_json, "\"a1@1700000000.3\"");
        assert_eq!(e.routing.as_deref(), Some("a1"));
        assert_eq!(e.pipeline.as_deref(), Some("enrich"));
        assert_eq!(e.version, w.version);
        let Op::Create(body) = &e.op else { panic!("{:?}", e.op) };
        let v: serde_json::Value = serde_json::from_slice(body).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"n": 1, "_source_id": "a1", "oplog_ts": {"T": 1_700_000_000u32, "I": 3}, "oplog_date": "2023/11/14 22:13:20"})
        );
    }

    #[test]
    fn a_replay_makes_the_same_entry() {
        let tm = machine(serde_json::json!({"namespaces": ["shop.orders"], "indexPrefix": "hist", "indexSuffix": "%Y.%m"}));
        let a = tm.entry(&write(Op::Index(Bytes::from_static(b"{}"))), &logged("x")).expect("entry");
        let b = tm.entry(&write(Op::Index(Bytes::from_static(b"{}"))), &logged("x")).expect("entry");
        assert_eq!((&*a.index, &*a.id_json), (&*b.index, &*b.id_json));
        assert_eq!(&*a.index, "hist.orders.2023.11");
        let Op::Create(body) = &a.op else { panic!() };
        assert!(body.starts_with(b"{\"_source_id\":\"x\",\"oplog_ts\""), "{}", String::from_utf8_lossy(body));
    }

    #[test]
    fn deletes_and_refusals_are_not_logged_and_snapshots_only_when_asked() {
        let tm = machine(serde_json::json!({"namespaces": ["shop.orders"]}));
        assert!(tm.entry(&write(Op::Delete), &logged("a")).is_none());
        assert!(tm.entry(&write(Op::reject("x", String::new(), None)), &logged("a")).is_none());
        assert!(tm.logs("shop", "orders", false) && !tm.logs("shop", "orders", true) && !tm.logs("shop", "users", false));
        assert!(machine(serde_json::json!({"namespaces": ["shop.*"], "snapshot": true})).logs("shop", "users", true));
    }

    #[test]
    fn a_document_with_its_time_keeps_it_and_oversize_ids_are_refused() {
        let tm = machine(serde_json::json!({"namespaces": ["shop.orders"]}));
        let e = tm.entry(&write(Op::Index(Bytes::from_static(b"{\"oplog_ts\":1}"))), &Logged { source_id: "a".into(), has_time: true }).expect("entry");
        let Op::Create(body) = &e.op else { panic!() };
        assert_eq!(&body[..], b"{\"oplog_ts\":1,\"_source_id\":\"a\"}");
        let long = "x".repeat(500);
        let e = tm.entry(&write(Op::Index(Bytes::from_static(b"{}"))), &logged(&long)).expect("entry");
        assert!(matches!(&e.op, Op::Reject(r) if r.error_type == "invalid_id"));
    }

    /// A patched document's change carries its entry (the sink writes it with the change's own
    /// version): no separate entry write, and the members the entry adds to that version.
    #[test]
    fn a_patched_change_carries_its_entry() {
        use crate::sink::patches::{Patch, PatchChange};
        let tm = machine(serde_json::json!({"namespaces": ["shop.orders"]}));
        let change = PatchChange::Update { description: Bytes::from_static(b"{}"), lookup: Some(Bytes::from_static(b"{\"n\":1}")) };
        let w = write(Op::Patch(Box::new(Patch { attribute: Arc::from("p"), change, log: None })));
        assert!(tm.entry(&w, &logged("a1")).is_none(), "carried by the patch, not a write of its own");
        let log = tm.patch_log(&w, &logged("a1")).expect("logged");
        assert_eq!((&*log.index, &*log.id_json, log.routing.as_deref()), ("log.orders.2023-11-14", "\"a1@1700000000.3\"", Some("a1")));
        let members: serde_json::Value = serde_json::from_slice(&[b"{", &log.members[..], b"}"].concat()).expect("json");
        assert_eq!(members["_source_id"], "a1");
        assert_eq!(members["oplog_ts"], serde_json::json!({"T": 1_700_000_000u32, "I": 3}));
        // A delete logs nothing; an entry refused here stays a write of its own (dead-lettered).
        let deleted = write(Op::Patch(Box::new(Patch { attribute: Arc::from("p"), change: PatchChange::Delete, log: None })));
        assert!(tm.entry(&deleted, &logged("a1")).is_none() && tm.patch_log(&deleted, &logged("a1")).is_none());
        let long = "x".repeat(500);
        assert!(matches!(tm.entry(&w, &logged(&long)).map(|e| e.op), Some(Op::Reject(_))));
        assert!(tm.patch_log(&w, &logged(&long)).is_none());
    }
}
