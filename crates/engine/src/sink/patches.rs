//! Merge patches (`spec.mergePatches`, Monstache's `enable-patches`): each document of a
//! patched namespace carries its own history, an array of RFC 7396 merge patches under one
//! attribute, `{"p": "<patch as JSON text>", "ts": <seconds>, "i": <increment>, "v": <n>}`;
//! applying them in order to `{}` rebuilds every version.
//!
//! The transform decides what a change does ([`Patch`]: the whole document, an update
//! description, or a delete); this module carries it out against the index, the only
//! read-modify-write of the sink:
//! 1. read the documents (one real-time multi-get per round) with their `_version`;
//! 2. for each document, fold its changes of the batch, in order, into its [`History`]: the
//!    previous version is the one the history rebuilds, the change is applied exactly (its
//!    update description: `updatedFields` with dotted and array-index paths, `removedFields`,
//!    `truncatedArrays`; or the whole document an insert, replace or snapshot read carries),
//!    and the patch appended is the diff of the two versions;
//! 3. write each changed document back versioned by its newest change's cluster time
//!    (`external_gte`, as every write of the engine), and go back to 1 for those that lost
//!    (409: a newer version is there) or failed retriably.
//!
//! # Why external versions, not `if_seq_no`
//! A compare-and-set on `_seq_no` would need internal versions, which the re-snapshot sweep
//! (it deletes documents versioned below the new snapshot) and the other writes of the engine
//! (deletes, external versions) cannot live with. The sink never has two writes of one
//! document in flight, so a competing writer is another process (a worker that lost its
//! lease, a shard being handed over) folding the same changes in the same order into the same
//! history: the writer with the newer change wins, an older one gets 409, reads again and
//! finds its changes there.
//!
//! # Invariants
//! - Every change is in its document's history exactly once: a change at or before the last
//!   entry's cluster time (`ts`, `i`) is a replay and adds nothing (the one at the same time is
//!   applied again, which changes nothing unless a transaction changed the document twice).
//! - A write never regresses a document: it carries its newest change's cluster time as an
//!   `external_gte` version, so an older write (a replay, a worker that lost its lease) loses
//!   with 409 and is read again; the `_version` of a document is its last entry's time.
//! - A request is at most `batch.maxBytes` (one document alone after a 413); a document too
//!   large alone is dead-lettered, never retried forever.
//! - Writes of a patched document are never coalesced (each is a version) and, as every write,
//!   never in flight twice (the batcher's rule).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::warn;

use super::dead_letter::Refusal;
use super::elasticsearch::request;
use super::elasticsearch::response::{Answer, ItemOutcome};
use super::{Op, Write};
use crate::checkpoint::ClusterTime;

/// What a change of a patched namespace does to its document (decided by the transform).
#[derive(Debug, Clone)]
pub struct Patch {
    /// The field holding the history.
    pub attribute: Arc<str>,
    /// The change.
    pub change: PatchChange,
    /// Its time machine entry (`spec.timeMachine` logs the namespace), written with the
    /// change's own version once the sink knows it.
    pub log: Option<PatchLog>,
}

/// Where a patched document's change is logged (a time machine entry, `create`d once).
#[derive(Debug, Clone)]
pub struct PatchLog {
    /// The log index.
    pub index: Arc<str>,
    /// The entry's `_id` as a JSON string literal.
    pub id_json: Box<str>,
    /// Routing (the MongoDB `_id`).
    pub routing: Option<Box<str>>,
    /// Ingest pipeline.
    pub pipeline: Option<Arc<str>>,
    /// The members the entry adds to the version (`"_source_id":…,"oplog_ts":…`).
    pub members: Bytes,
}

impl PatchLog {
    /// The entry's `_source`: `version` with the entry's members.
    fn source(&self, version: &Value) -> Vec<u8> {
        let mut out = serde_json::to_vec(version).unwrap_or_else(|_| b"{}".to_vec());
        if out.last() == Some(&b'}') {
            out.pop();
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(&self.members);
            out.push(b'}');
        }
        out
    }
}

/// A change of a patched document.
#[derive(Debug, Clone)]
pub enum PatchChange {
    /// An insert, a replace or a snapshot read: the whole document (JSON, `_id` left out).
    Whole {
        /// The document.
        source: Bytes,
        /// Read by a snapshot: a version only when it differs from the last one.
        snapshot: bool,
    },
    /// An update: its update description as JSON, and the document MongoDB looked up (used
    /// only when the index holds no version to apply the description to).
    Update {
        /// `{"updatedFields": …, "removedFields": …, "truncatedArrays": …}`.
        description: Bytes,
        /// `fullDocument`, when the event carried it.
        lookup: Option<Bytes>,
    },
    /// A delete: the document and its history go.
    Delete,
}

impl PatchChange {
    /// Bytes it holds (batch limits, memory budget).
    pub fn len(&self) -> usize {
        match self {
            Self::Whole { source, .. } => source.len(),
            Self::Update { description, lookup } => description.len() + lookup.as_ref().map_or(0, Bytes::len),
            Self::Delete => 0,
        }
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A document as the index holds it now, for a read-modify-write.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    /// `_version`: the cluster time of the newest change written.
    pub version: u64,
    /// `_source`.
    pub source: Value,
}

/// One entry of a history. `i` is monsoon's (Monstache writes `ts`, `p`, `v`): with `ts` it is
/// the change's full cluster time, which tells a replayed change from a new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The merge patch, as JSON text.
    pub p: String,
    /// Seconds of the change's cluster time.
    pub ts: u32,
    /// Increment of the change's cluster time (0 in entries Monstache wrote).
    #[serde(default)]
    pub i: u32,
    /// The version this patch makes, from 1.
    pub v: u64,
}

impl Entry {
    fn time(&self) -> (u32, u32) {
        (self.ts, self.i)
    }
}

/// RFC 7396: apply merge patch `patch` to `target`.
pub fn merge_apply(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else { return };
    for (k, v) in members {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_apply(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merge patch that turns `prev` into `next` (both objects): `merge_apply(prev, patch)`
/// gives `next` but for members holding `null`, which RFC 7396 cannot set (a `null` in a patch
/// removes the member). Arrays are replaced whole.
pub fn merge_diff(prev: &Value, next: &Value) -> Value {
    let (Value::Object(a), Value::Object(b)) = (prev, next) else {
        return without_null_members(next);
    };
    let mut patch = Map::new();
    for k in a.keys() {
        if !b.contains_key(k) {
            patch.insert(k.clone(), Value::Null);
        }
    }
    for (k, nv) in b {
        match (a.get(k), nv) {
            (None, Value::Null) => {}
            (Some(_), Value::Null) => {
                patch.insert(k.clone(), Value::Null);
            }
            (Some(pv @ Value::Object(_)), Value::Object(_)) => {
                let sub = merge_diff(pv, nv);
                if sub.as_object().is_some_and(|m| !m.is_empty()) {
                    patch.insert(k.clone(), sub);
                }
            }
            (Some(pv), nv) if pv == nv => {}
            (_, nv) => {
                patch.insert(k.clone(), without_null_members(nv));
            }
        }
    }
    Value::Object(patch)
}

/// `v` with `null` object members removed (what a merge patch makes of it); arrays as they are.
fn without_null_members(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_null_members(v))).collect()),
        other => other.clone(),
    }
}

/// Apply a MongoDB update description to `doc`: `removedFields`, then `truncatedArrays`,
/// then `updatedFields`, each a dotted path whose numeric parts index arrays (setting past an
/// array's end pads it with `null`, as MongoDB does).
///
/// # Errors
/// A description that does not read as one, or a path through a value that is neither an
/// object nor an array (MongoDB refuses such updates, so the history would be wrong).
pub fn apply_update(doc: &mut Value, description: &Value) -> Result<(), String> {
    let paths = |name: &str| -> Result<Vec<Value>, String> {
        match description.get(name) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => Ok(a.clone()),
            Some(other) => Err(format!("`{name}` is not an array: {other}")),
        }
    };
    for removed in paths("removedFields")? {
        let path = removed.as_str().ok_or_else(|| format!("`removedFields` holds {removed}, not a path"))?;
        let (parent, last) = walk(doc, path, false)?;
        match parent {
            Some(Value::Object(m)) => {
                m.remove(last);
            }
            // `$unset` of an array element sets it to null.
            Some(Value::Array(a)) => {
                if let Some(slot) = last.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                    *slot = Value::Null;
                }
            }
            _ => {}
        }
    }
    for truncated in paths("truncatedArrays")? {
        let (Some(path), Some(size)) = (truncated["field"].as_str(), truncated["newSize"].as_u64()) else {
            return Err(format!("`truncatedArrays` holds {truncated}, not a field and a newSize"));
        };
        let (parent, last) = walk(doc, path, false)?;
        if let Some(Value::Array(a)) = parent.and_then(|p| child(p, last)) {
            a.truncate(usize::try_from(size).unwrap_or(usize::MAX));
        }
    }
    match description.get("updatedFields") {
        None | Some(Value::Null) => {}
        Some(Value::Object(set)) => {
            for (path, value) in set {
                let (parent, last) = walk(doc, path, true)?;
                match parent {
                    Some(Value::Object(m)) => {
                        m.insert(last.to_string(), value.clone());
                    }
                    Some(Value::Array(a)) => {
                        let i: usize = last.parse().map_err(|_| format!("`{path}`: `{last}` is not an index of the array there"))?;
                        if a.len() <= i {
                            a.resize(i + 1, Value::Null);
                        }
                        a[i] = value.clone();
                    }
                    _ => return Err(format!("`{path}` goes through a value that is not an object or array")),
                }
            }
        }
        Some(other) => return Err(format!("`updatedFields` is not an object: {other}")),
    }
    Ok(())
}

/// The member `key` of an object, or element `key` of an array.
fn child<'a>(v: &'a mut Value, key: &str) -> Option<&'a mut Value> {
    match v {
        Value::Object(m) => m.get_mut(key),
        Value::Array(a) => key.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
        _ => None,
    }
}

/// The container of `path`'s last part, and that part. With `create`, missing objects on the
/// way are created (as `$set` does); without, a missing part gives no container.
fn walk<'a, 'p>(doc: &'a mut Value, path: &'p str, create: bool) -> Result<(Option<&'a mut Value>, &'p str), String> {
    let mut parts = path.split('.');
    let mut last = parts.next().unwrap_or("");
    let mut at = doc;
    for next in parts {
        let here = last;
        last = next;
        at = match at {
            Value::Object(m) => {
                if !m.contains_key(here) {
                    if !create {
                        return Ok((None, last));
                    }
                    m.insert(here.to_string(), Value::Object(Map::new()));
                }
                m.get_mut(here).ok_or_else(|| format!("`{path}`: missing `{here}`"))?
            }
            Value::Array(a) => {
                let i: usize = here.parse().map_err(|_| format!("`{path}`: `{here}` is not an index of the array there"))?;
                if a.len() <= i {
                    if !create {
                        return Ok((None, last));
                    }
                    a.resize(i + 1, Value::Null);
                }
                if create && a[i].is_null() {
                    a[i] = Value::Object(Map::new());
                }
                &mut a[i]
            }
            _ if !create => return Ok((None, last)),
            _ => return Err(format!("`{path}` goes through `{here}`, which is not an object or array")),
        };
    }
    Ok((Some(at), last))
}

/// What applying one change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A version was added (its number).
    Version(u64),
    /// The document and its history were deleted.
    Deleted,
    /// The history already holds this change (a replay), or a snapshot read saw the last
    /// version again: nothing changed.
    AlreadyThere,
}

/// One document's history, folded change by change.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// A document indexed without a history (before patches were on): the cluster time of
    /// its version, at or before which changes are in it already.
    indexed_at: Option<(u32, u32)>,
    /// The current version as MongoDB has it (`null` members kept); `None`: no document.
    doc: Option<Value>,
    /// The version the entries rebuild (what the next patch is a diff from).
    rebuilt: Value,
    entries: Vec<Entry>,
    /// Something changed since the read.
    changed: bool,
}

impl History {
    /// The history of a document as read (`None`: not in the index), and its `_version`.
    pub fn read(source: Option<&Value>, version: u64, attribute: &str) -> Self {
        let Some(source) = source else {
            return Self { indexed_at: None, doc: None, rebuilt: Value::Object(Map::new()), entries: Vec::new(), changed: false };
        };
        let t = ClusterTime::from_version(version);
        let indexed_at = Some((t.t, t.i));
        let mut doc = source.clone();
        let stored = doc.as_object_mut().and_then(|m| m.remove(attribute));
        let entries: Vec<Entry> = match stored.map(serde_json::from_value::<Vec<Entry>>) {
            Some(Ok(e)) => e,
            Some(Err(e)) => {
                warn!(attribute, error = %e, "a document's patch history does not read as one; it starts again from the document");
                Vec::new()
            }
            None => Vec::new(),
        };
        match rebuild(&entries) {
            Ok(rebuilt) => {
                // The stored document is the exact last version (with its `null` members) when
                // it agrees with the history; otherwise the history is what holds.
                let doc = if entries.is_empty() || without_null_members(&doc) == rebuilt { doc } else { rebuilt.clone() };
                Self { indexed_at, doc: Some(doc), rebuilt, entries, changed: false }
            }
            Err(e) => {
                warn!(attribute, error = %e, "a document's patch history does not rebuild; it starts again from the document");
                Self { indexed_at, doc: Some(doc), rebuilt: Value::Object(Map::new()), entries: Vec::new(), changed: false }
            }
        }
    }

    /// The entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether anything changed since the read.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// The current version (`None`: deleted or never there).
    pub fn document(&self) -> Option<&Value> {
        self.doc.as_ref()
    }

    /// Apply the change at cluster time `time`.
    ///
    /// # Errors
    /// A change that does not read (the document's JSON, its update description): the
    /// history is left as it was.
    pub fn apply(&mut self, time: ClusterTime, change: &PatchChange) -> Result<Applied, String> {
        let at = (time.t, time.i);
        let last = self.entries.last().map(Entry::time).or(self.indexed_at.filter(|_| self.doc.is_some()));
        if self.doc.is_some() && last.is_some_and(|l| l > at) {
            return Ok(Applied::AlreadyThere);
        }
        let replay_of_last = last == Some(at);
        let next = match change {
            PatchChange::Delete => {
                if self.doc.is_none() {
                    return Ok(Applied::AlreadyThere);
                }
                *self = Self { indexed_at: None, doc: None, rebuilt: Value::Object(Map::new()), entries: Vec::new(), changed: true };
                return Ok(Applied::Deleted);
            }
            PatchChange::Whole { source, snapshot } => {
                let next: Value = serde_json::from_slice(source).map_err(|e| format!("the document does not read as JSON: {e}"))?;
                if (*snapshot || replay_of_last) && self.doc.as_ref().is_some_and(|d| *d == next) {
                    return Ok(Applied::AlreadyThere);
                }
                next
            }
            PatchChange::Update { description, lookup } => {
                let description: Value = serde_json::from_slice(description).map_err(|e| format!("the update description does not read as JSON: {e}"))?;
                match &self.doc {
                    Some(prev) => {
                        let mut next = prev.clone();
                        apply_update(&mut next, &description)?;
                        if replay_of_last && next == *prev {
                            return Ok(Applied::AlreadyThere);
                        }
                        next
                    }
                    // No version to apply it to (the document was never indexed): start from
                    // what MongoDB looked up, or from the description alone.
                    None => match lookup {
                        Some(l) => serde_json::from_slice(l).map_err(|e| format!("the looked-up document does not read as JSON: {e}"))?,
                        None => {
                            let mut next = Value::Object(Map::new());
                            apply_update(&mut next, &description)?;
                            next
                        }
                    },
                }
            }
        };
        let patch = merge_diff(&self.rebuilt, &next);
        let v = self.entries.last().map_or(1, |e| e.v + 1);
        merge_apply(&mut self.rebuilt, &patch);
        self.entries.push(Entry { p: patch.to_string(), ts: time.t, i: time.i, v });
        self.doc = Some(next);
        self.changed = true;
        Ok(Applied::Version(v))
    }

    /// The version the change at `time` made, when the history holds it (rebuilt from its
    /// patches: `null` members are left out, see [`merge_diff`]); the current version when it is
    /// the last.
    pub fn version_at(&self, time: ClusterTime) -> Option<Value> {
        let at = self.entries.iter().rposition(|e| e.time() == (time.t, time.i))?;
        if at + 1 == self.entries.len() {
            return self.doc.clone();
        }
        rebuild(&self.entries[..=at]).ok()
    }

    /// The `_source` to index: the current version with the history under `attribute`.
    pub fn source(&self, attribute: &str) -> Option<Vec<u8>> {
        let mut doc = self.doc.clone()?;
        if let Value::Object(m) = &mut doc {
            m.insert(attribute.to_string(), serde_json::to_value(&self.entries).unwrap_or(Value::Null));
        }
        serde_json::to_vec(&doc).ok()
    }
}

/// The version `entries` make from `{}`.
///
/// # Errors
/// A patch that does not read as JSON.
pub fn rebuild(entries: &[Entry]) -> Result<Value, String> {
    let mut doc = Value::Object(Map::new());
    for e in entries {
        let patch: Value = serde_json::from_str(&e.p).map_err(|err| format!("patch v{} does not read as JSON: {err}", e.v))?;
        merge_apply(&mut doc, &patch);
    }
    Ok(doc)
}

/// The writes of one document in a delivery, in order.
struct DocWrites {
    index: Arc<str>,
    id_json: Box<str>,
    routing: Option<Box<str>>,
    writes: Vec<Write>,
}

/// What one document's round of a read-modify-write sends.
enum Action {
    /// Nothing changed.
    Nothing,
    /// Index this `_source`, versioned by the newest change applied.
    Index(Vec<u8>, u64),
    /// Delete, versioned by the delete's change.
    Delete(u64),
}

impl super::Deliverer {
    /// Carry out the writes of patched documents ([`Op::Patch`]) until each is done or
    /// refused (added to `rejected`): read, fold, write conditionally, again for the documents
    /// that conflicted or failed retriably.
    ///
    /// # Errors
    /// [`crate::retry::Cancelled`] when the sink is stopped first: nothing unfinished is
    /// acknowledged.
    pub(super) async fn deliver_patches(&self, writes: Vec<Write>, rejected: &mut Vec<(Write, Refusal)>) -> Result<(), crate::retry::Cancelled> {
        let mut docs: Vec<DocWrites> = Vec::new();
        let mut at: HashMap<(Arc<str>, Box<str>), usize> = HashMap::new();
        for w in writes {
            let key = (w.index.clone(), w.id_json.clone());
            let i = *at.entry(key).or_insert_with(|| {
                docs.push(DocWrites { index: w.index.clone(), id_json: w.id_json.clone(), routing: w.routing.clone(), writes: Vec::new() });
                docs.len() - 1
            });
            docs[i].writes.push(w);
        }
        // Send each document in a request of its own (after one was refused whole).
        let mut alone = false;
        while !docs.is_empty() {
            let mut state = (&mut docs, &mut alone, &mut *rejected);
            self.until_done(&mut state, |(docs, alone, rejected)| Box::pin(self.patch_round(docs, alone, rejected))).await?;
        }
        Ok(())
    }

    /// One round of the read-modify-write of `docs`: read them, fold their changes into their
    /// histories, write. `Err`: documents went back to `docs` to be read again after a
    /// back-off (the read failed, a write conflicted or failed retriably); `Ok` with `docs` not
    /// empty: a request was refused whole, and `alone` now sends them one by one.
    async fn patch_round(&self, docs: &mut Vec<DocWrites>, alone: &mut bool, rejected: &mut Vec<(Write, Refusal)>) -> Result<(), ()> {
        let asked: Vec<(&str, &str, Option<&str>)> = docs.iter().map(|d| (&*d.index, &*d.id_json, d.routing.as_deref())).collect();
        let current = match self.es.current_documents(&asked).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), documents = docs.len(), "reading documents for their patch history failed; retrying");
                return Err(());
            }
        };
        let sent: Vec<Round> = docs.drain(..).zip(current).filter_map(|(d, cur)| self.fold(d, cur, rejected)).collect();
        let (mut again, mut split) = (0, false);
        for request in self.requests(sent, *alone) {
            let (retry, whole) = self.send_round(request, docs, rejected).await;
            again += retry;
            split |= whole;
        }
        *alone |= split;
        if again > 0 {
            self.shared.metrics.retried_items.inc_by(again);
            return Err(());
        }
        self.shared.health.sink_beat(true);
        Ok(())
    }

    /// Requests of rounds within the batch byte limit (one per document when `alone`); a
    /// document too large alone is refused when sent.
    fn requests(&self, sent: Vec<Round>, alone: bool) -> Vec<Vec<Round>> {
        let mut requests: Vec<Vec<Round>> = Vec::new();
        let mut bytes = 0;
        for r in sent {
            let fits = requests.last().is_some_and(|_| !alone && bytes + r.lines.len() <= self.settings.batch.max_bytes);
            if !fits {
                requests.push(Vec::new());
                bytes = 0;
            }
            bytes += r.lines.len();
            if let Some(q) = requests.last_mut() {
                q.push(r);
            }
        }
        requests
    }

    /// Fold document `d`'s changes into its patch history as `cur` holds it: the round to send,
    /// or `None` when nothing changed (replays only). A change the history cannot take is
    /// refused into `rejected`.
    fn fold(&self, mut d: DocWrites, cur: Option<Current>, rejected: &mut Vec<(Write, Refusal)>) -> Option<Round> {
        let m = &self.shared.metrics;
        let attribute = d.writes.iter().find_map(|w| match &w.op {
            Op::Patch(p) => Some(p.attribute.clone()),
            _ => None,
        });
        let attribute = attribute.unwrap_or_else(|| Arc::from(monsoon_api::patches::DEFAULT_ATTRIBUTE));
        let mut history = History::read(cur.as_ref().map(|c| &c.source), cur.as_ref().map_or(0, |c| c.version), &attribute);
        // The newest change applied: the version written.
        let mut newest = 0;
        // [versions added, deletes, replays]
        let mut counts = [0u64; 3];
        let mut logs: Vec<(PatchLog, Vec<u8>, u64)> = Vec::new();
        let mut kept = Vec::with_capacity(d.writes.len());
        for w in d.writes.drain(..) {
            let Op::Patch(p) = &w.op else {
                kept.push(w);
                continue;
            };
            let time = ClusterTime::from_version(w.version);
            let applied = match history.apply(time, &p.change) {
                Ok(a) => a,
                Err(reason) => {
                    rejected.push((w, Refusal { status: 0, error_type: "patch_failed".into(), reason: format!("the change cannot be applied to the document's patch history: {reason}") }));
                    continue;
                }
            };
            counts[match applied {
                Applied::Version(_) => 0,
                Applied::Deleted => 1,
                Applied::AlreadyThere => 2,
            }] += 1;
            if applied != Applied::AlreadyThere {
                newest = newest.max(w.version);
            }
            // The entry holds this change's own version: the one just made, or, for a
            // replay, the one the history holds for its time (created again, a 409 if
            // it is there already).
            if let Some(log) = &p.log {
                let version = match applied {
                    Applied::Version(_) => history.document().cloned(),
                    Applied::AlreadyThere => history.version_at(time),
                    Applied::Deleted => None,
                };
                if let Some(v) = version {
                    logs.push((log.clone(), log.source(&v), w.version));
                }
            }
            kept.push(w);
        }
        d.writes = kept;
        let action = match (history.changed(), history.source(&attribute)) {
            (false, _) => Action::Nothing,
            (true, Some(source)) => Action::Index(source, newest),
            (true, None) if cur.is_some() => Action::Delete(newest),
            (true, None) => Action::Nothing,
        };
        if matches!(action, Action::Nothing) && logs.is_empty() {
            m.hot.stale.inc_by(counts[2]);
            self.shared.note_outcomes(0, counts[2]);
            return None;
        }
        let mut lines = Vec::new();
        encode(&d, &action, &mut lines);
        for (log, source, _) in &logs {
            encode_entry(log, source, &mut lines);
        }
        let is_delete = match action {
            Action::Nothing => None,
            Action::Delete(_) => Some(true),
            Action::Index(..) => Some(false),
        };
        Some(Round { doc: d, is_delete, counts, logs, lines })
    }

    /// Send one request of documents' writes and sort its answers: documents to read again go
    /// back to `docs`, refusals to `rejected`. Returns how many go back, and whether the request
    /// was refused whole for holding several documents (send them one by one).
    async fn send_round(&self, sent: Vec<Round>, docs: &mut Vec<DocWrites>, rejected: &mut Vec<(Write, Refusal)>) -> (u64, bool) {
        let m = &self.shared.metrics;
        let body: Vec<u8> = sent.iter().flat_map(|r| r.lines.iter().copied()).collect();
        let is_delete: Vec<bool> = sent.iter().flat_map(|r| r.is_delete.into_iter().chain(r.logs.iter().map(|_| false))).collect();
        let outcomes = match self.es.bulk_answer(body, &is_delete).await {
                Answer::Items(outcomes) => Ok(outcomes),
                Answer::Refused { status, reason } if sent.len() == 1 => {
                    let reason = format!("the document with its patch history was refused ({status}): {}", super::dead_letter::truncated(&reason, 300));
                    for r in sent {
                        for w in r.doc.writes {
                            rejected.push((w, Refusal { status, error_type: format!("http_{status}"), reason: reason.clone() }));
                        }
                    }
                    return (0, false);
                }
                Answer::Refused { status, .. } => {
                    warn!(status, documents = sent.len(), "a request of patched documents was refused whole; sending them one by one");
                    docs.extend(sent.into_iter().map(|r| r.doc));
                    return (0, true);
                }
                Answer::Again(why) => Err(why),
            };
            let outcomes = match outcomes {
                Ok(o) => o,
                Err(reason) => {
                    warn!(reason = %reason, documents = sent.len(), "writing patched documents failed; reading them again and retrying");
                    self.shared.health.sink_beat(false);
                    let n = sent.len() as u64;
                    docs.extend(sent.into_iter().map(|r| r.doc));
                    return (n, false);
                }
            };
            let mut outcomes = outcomes.into_iter();
            let mut again = 0;
            for r in sent {
                let doc_outcome = r.is_delete.map(|_| outcomes.next().unwrap_or(ItemOutcome::Retry { status: 0, reason: "no answer".into() }));
                let mut retry = false;
                let mut refused = None;
                match doc_outcome {
                    None | Some(ItemOutcome::Done | ItemOutcome::AlreadyGone) => {}
                    // 409: written since the read (or created meanwhile): read it again.
                    Some(ItemOutcome::Stale | ItemOutcome::Retry { .. }) => retry = true,
                    Some(ItemOutcome::Reject { status, error_type, reason }) => refused = Some(Refusal { status, error_type, reason }),
                }
                for (log, source, version) in r.logs {
                    match outcomes.next().unwrap_or(ItemOutcome::Retry { status: 0, reason: "no answer".into() }) {
                        // 409: the entry is there (a replay): the first copy stays.
                        ItemOutcome::Done | ItemOutcome::Stale | ItemOutcome::AlreadyGone => {}
                        ItemOutcome::Retry { .. } => retry = true,
                        ItemOutcome::Reject { status, error_type, reason } => {
                            let ns = r.doc.writes.first().map_or_else(|| Arc::from("unknown"), |w| w.ns.clone());
                            let mut entry = Write::new(ns, log.index.clone(), log.id_json.clone(), version, Op::Create(Bytes::from(source)));
                            entry.routing = log.routing.clone();
                            rejected.push((entry, Refusal { status, error_type, reason }));
                        }
                    }
                }
                if let Some(why) = refused {
                    for w in r.doc.writes {
                        rejected.push((w, why.clone()));
                    }
                } else if retry {
                    again += 1;
                    docs.push(r.doc);
                } else {
                    m.hot.indexed.inc_by(r.counts[0]);
                    m.hot.deleted.inc_by(r.counts[1]);
                    m.hot.stale.inc_by(r.counts[2]);
                    self.shared.note_outcomes(r.counts[0] + r.counts[1], r.counts[2]);
                }
            }
            (again, false)
    }
}

/// One document's part of a round's bulk request.
struct Round {
    doc: DocWrites,
    /// The document's own write, when it has one: whether it is a delete.
    is_delete: Option<bool>,
    /// [versions added, deletes, replays].
    counts: [u64; 3],
    /// Its time machine entries: where, the entry, the change's version.
    logs: Vec<(PatchLog, Vec<u8>, u64)>,
    /// Its bulk lines.
    lines: Vec<u8>,
}

/// The bulk lines creating a time machine entry (a replayed one answers 409: the first stays).
fn encode_entry(log: &PatchLog, source: &[u8], body: &mut Vec<u8>) {
    request::open_action("create", &log.index, &log.id_json, log.routing.as_deref(), body);
    request::add_pipeline(log.pipeline.as_deref(), body);
    body.extend_from_slice(b"}}\n");
    request::push_source(source, body);
}

/// The bulk lines of one document's versioned write.
fn encode(d: &DocWrites, action: &Action, body: &mut Vec<u8>) {
    let (verb, version) = match action {
        Action::Nothing => return,
        Action::Index(_, v) => ("index", *v),
        Action::Delete(v) => ("delete", *v),
    };
    request::open_action(verb, &d.index, &d.id_json, d.routing.as_deref(), body);
    request::close_versioned(version, body);
    if let Action::Index(source, _) = action {
        request::push_source(source, body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ATTR: &str = "json-merge-patches";

    /// Seconds after `T0`: cluster times as versions start in 2020.
    const T0: u32 = 1_700_000_000;

    fn t(t: u32, i: u32) -> ClusterTime {
        ClusterTime { t: T0 + t, i }
    }

    fn whole(v: Value) -> PatchChange {
        PatchChange::Whole { source: Bytes::from(v.to_string()), snapshot: false }
    }

    fn update(v: Value) -> PatchChange {
        PatchChange::Update { description: Bytes::from(v.to_string()), lookup: None }
    }

    /// Every version the history rebuilds, in order.
    fn versions(h: &History) -> Vec<Value> {
        (1..=h.entries().len()).map(|n| rebuild(&h.entries()[..n]).expect("rebuilds")).collect()
    }

    #[test]
    fn merge_patches_follow_rfc_7396() {
        // The RFC's own example (section 3).
        let mut target = json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"}, "tags": ["example", "sample"], "content": "This will be unchanged"});
        let patch = json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890", "author": {"familyName": null}, "tags": ["example"]});
        merge_apply(&mut target, &patch);
        assert_eq!(target, json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"], "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"}));
        // A non-object patch replaces; an object patch on a scalar starts from `{}`.
        let mut v = json!({"a": 1});
        merge_apply(&mut v, &json!([1]));
        assert_eq!(v, json!([1]));
        merge_apply(&mut v, &json!({"b": {"c": null, "d": 1}}));
        assert_eq!(v, json!({"b": {"d": 1}}));
    }

    #[test]
    fn a_diff_applied_to_its_base_gives_the_next_version() {
        let cases = [
            (json!({}), json!({"a": 1, "b": {"c": [1, 2]}})),
            (json!({"a": 1, "b": {"c": 1, "d": 2}, "e": [1]}), json!({"b": {"c": 1, "d": 3, "x": {"y": 1}}, "e": [1, 2], "f": "s"})),
            (json!({"a": {"b": 1}}), json!({"a": 5})),
            (json!({"a": 5}), json!({"a": {"b": 1}})),
            (json!({"a": [{"x": 1}]}), json!({"a": [{"x": 1, "y": null}]})),
        ];
        for (prev, next) in cases {
            let patch = merge_diff(&prev, &next);
            let mut got = prev.clone();
            merge_apply(&mut got, &patch);
            assert_eq!(got, next, "{prev} + {patch}");
        }
        // Only what changed is in the patch; a removed member is `null`.
        assert_eq!(merge_diff(&json!({"a": 1, "b": {"c": 1, "d": 2}}), &json!({"a": 1, "b": {"c": 1}})), json!({"b": {"d": null}}));
        assert_eq!(merge_diff(&json!({"a": 1}), &json!({"a": 1})), json!({}));
        // RFC 7396 cannot set `null`: such a member is left out (absent in the rebuilt version).
        assert_eq!(merge_diff(&json!({}), &json!({"a": null, "b": {"c": null, "d": 1}})), json!({"b": {"d": 1}}));
    }

    #[test]
    fn update_descriptions_apply_as_mongodb_does() {
        let mut doc = json!({"a": {"b": 1, "c": [1, 2, 3, 4]}, "arr": [{"x": 1}, {"x": 2}], "gone": 5, "keep": true});
        apply_update(&mut doc, &json!({"updatedFields": {"a.b": 2, "arr.1.x": 9, "new": {"deep": 1}, "n.m": 3}, "removedFields": ["gone", "missing.x"], "truncatedArrays": []})).expect("applies");
        assert_eq!(doc, json!({"a": {"b": 2, "c": [1, 2, 3, 4]}, "arr": [{"x": 1}, {"x": 9}], "keep": true, "new": {"deep": 1}, "n": {"m": 3}}));
        // `$pop` / `$pull` on a delta: a truncation, then the elements that changed.
        apply_update(&mut doc, &json!({"updatedFields": {"a.c.1": 3}, "removedFields": [], "truncatedArrays": [{"field": "a.c", "newSize": 2}]})).expect("applies");
        assert_eq!(doc["a"]["c"], json!([1, 3]));
        // Setting past an array's end pads with null; unsetting an element nulls it.
        apply_update(&mut doc, &json!({"updatedFields": {"arr.4": 7}, "removedFields": ["arr.0"]})).expect("applies");
        assert_eq!(doc["arr"], json!([null, {"x": 9}, null, null, 7]));
        // A path through a scalar is refused, not guessed.
        assert!(apply_update(&mut doc, &json!({"updatedFields": {"keep.x": 1}})).is_err());
    }

    /// Three quick updates of one document (Monstache's test case): each is a version of its
    /// own, whatever MongoDB's lookup returned by the time the stream read it.
    #[test]
    fn every_change_is_one_version_and_every_version_rebuilds() {
        let mut h = History::read(None, 0, ATTR);
        assert_eq!(h.apply(t(10, 1), &whole(json!({"name": "Joe", "age": 16, "friends": [1, 2, 3]}))), Ok(Applied::Version(1)));
        assert_eq!(h.apply(t(10, 2), &update(json!({"updatedFields": {"age": 21, "friends": [1, 3]}, "removedFields": []}))), Ok(Applied::Version(2)));
        assert_eq!(h.apply(t(11, 1), &update(json!({"updatedFields": {"age": 22}, "removedFields": ["name"]}))), Ok(Applied::Version(3)));
        assert_eq!(h.apply(t(11, 2), &whole(json!({"replaced": true}))), Ok(Applied::Version(4)));
        assert_eq!(
            versions(&h),
            [
                json!({"name": "Joe", "age": 16, "friends": [1, 2, 3]}),
                json!({"name": "Joe", "age": 21, "friends": [1, 3]}),
                json!({"age": 22, "friends": [1, 3]}),
                json!({"replaced": true}),
            ]
        );
        let e = &h.entries()[1];
        assert_eq!((e.ts, e.i, e.v), (T0 + 10, 2, 2));
        assert_eq!(serde_json::from_str::<Value>(&e.p).expect("json"), json!({"age": 21, "friends": [1, 3]}));
        // The indexed document is the last version with its history.
        let source: Value = serde_json::from_slice(&h.source(ATTR).expect("source")).expect("json");
        assert_eq!(source["replaced"], true);
        assert_eq!(source[ATTR].as_array().map(Vec::len), Some(4));
        assert_eq!(source[ATTR][0]["ts"], T0 + 10);
    }

    /// A replay after a crash finds its changes in the history: nothing is added, in whatever
    /// batches the replay comes, and the history read back from the index goes on from there.
    #[test]
    fn replayed_changes_add_nothing() {
        let changes = [
            (t(10, 1), whole(json!({"n": 0}))),
            (t(10, 2), update(json!({"updatedFields": {"n": 1}, "removedFields": []}))),
            (t(10, 3), update(json!({"updatedFields": {"n": 2}, "removedFields": []}))),
        ];
        let mut h = History::read(None, 0, ATTR);
        for (time, c) in &changes {
            h.apply(*time, c).expect("applies");
        }
        let stored: Value = serde_json::from_slice(&h.source(ATTR).expect("source")).expect("json");
        let mut again = History::read(Some(&stored), t(10, 3).version(), ATTR);
        for (time, c) in &changes {
            assert_eq!(again.apply(*time, c), Ok(Applied::AlreadyThere), "{time:?}");
        }
        assert!(!again.changed());
        assert_eq!(again.apply(t(10, 4), &update(json!({"updatedFields": {"n": 3}}))), Ok(Applied::Version(4)));
        assert_eq!(versions(&again).iter().map(|v| v["n"].clone()).collect::<Vec<_>>(), [0, 1, 2, 3]);
    }

    #[test]
    fn deletes_end_the_history_and_an_insert_starts_a_new_one() {
        let mut h = History::read(None, 0, ATTR);
        h.apply(t(5, 1), &whole(json!({"a": 1}))).expect("applies");
        h.apply(t(5, 2), &update(json!({"updatedFields": {"a": 2}}))).expect("applies");
        // A stale delete (before the last version) is a replay.
        assert_eq!(h.apply(t(5, 1), &PatchChange::Delete), Ok(Applied::AlreadyThere));
        assert_eq!(h.apply(t(6, 1), &PatchChange::Delete), Ok(Applied::Deleted));
        assert_eq!(h.source(ATTR), None);
        assert_eq!(h.apply(t(6, 1), &PatchChange::Delete), Ok(Applied::AlreadyThere));
        assert_eq!(h.apply(t(7, 1), &whole(json!({"a": 3}))), Ok(Applied::Version(1)));
        assert_eq!(versions(&h), [json!({"a": 3})]);
    }

    #[test]
    fn snapshot_reads_start_a_history_or_add_a_version_only_when_different() {
        let snap = |v: Value| PatchChange::Whole { source: Bytes::from(v.to_string()), snapshot: true };
        let mut h = History::read(None, 0, ATTR);
        assert_eq!(h.apply(t(1, 0), &snap(json!({"a": 1}))), Ok(Applied::Version(1)));
        assert_eq!(h.apply(t(2, 0), &snap(json!({"a": 1}))), Ok(Applied::AlreadyThere));
        assert_eq!(h.apply(t(2, 0), &snap(json!({"a": 2}))), Ok(Applied::Version(2)));
        // A document indexed before patches were on: its history starts with what it is.
        let mut old = History::read(Some(&json!({"a": 1, "b": null})), t(2, 0).version(), ATTR);
        assert_eq!(old.apply(t(2, 0), &update(json!({"updatedFields": {"a": 1}}))), Ok(Applied::AlreadyThere), "older than the document");
        assert_eq!(old.apply(t(3, 0), &update(json!({"updatedFields": {"c": 1}}))), Ok(Applied::Version(1)));
        assert_eq!(old.document(), Some(&json!({"a": 1, "b": null, "c": 1})));
        assert_eq!(versions(&old), [json!({"a": 1, "c": 1})]);
    }

    #[test]
    fn monstaches_entries_read_and_unreadable_changes_are_refused() {
        let stored = json!({"a": 2, ATTR: [{"p": "{\"a\":1}", "ts": 7, "v": 1}, {"p": "{\"a\":2}", "ts": 8, "v": 2}]});
        let mut h = History::read(Some(&stored), t(8, 0).version(), ATTR);
        assert_eq!(h.entries().len(), 2);
        assert_eq!(h.apply(t(9, 1), &update(json!({"updatedFields": {"a": 3}}))), Ok(Applied::Version(3)));
        assert!(h.apply(t(9, 2), &PatchChange::Update { description: Bytes::from_static(b"not json"), lookup: None }).is_err());
        assert_eq!(h.entries().len(), 3, "a refused change leaves the history as it was");
    }

    #[test]
    fn writes_are_versioned_by_their_newest_change() {
        let d = DocWrites { index: Arc::from("shop.orders"), id_json: "\"a\"".into(), routing: Some("r".into()), writes: Vec::new() };
        let mut body = Vec::new();
        encode(&d, &Action::Index(b"{}".to_vec(), 42), &mut body);
        encode(&d, &Action::Delete(43), &mut body);
        encode(&d, &Action::Nothing, &mut body);
        let lines: Vec<Value> = String::from_utf8(body).expect("utf8").lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        assert_eq!(lines[0], json!({"index": {"_index": "shop.orders", "_id": "a", "routing": "r", "version": 42, "version_type": "external_gte"}}));
        assert_eq!(lines[1], json!({}));
        assert_eq!(lines[2], json!({"delete": {"_index": "shop.orders", "_id": "a", "routing": "r", "version": 43, "version_type": "external_gte"}}));
        assert_eq!(lines.len(), 3);
    }
}
