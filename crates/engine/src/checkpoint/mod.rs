//! Checkpoints: how far the pipeline has durably got, and where it is stored.
//!
//! A [`Checkpoint`] holds the stream's start time (also the version of snapshot documents),
//! the resume token of the last acknowledged change, and per-collection snapshot progress.
//! It is written only from positions the [`tracker::Tracker`] says are fully acknowledged.
//! Stores sit behind [`CheckpointStore`]: a local file for `monsoon run`, a ConfigMap lease
//! for workers in a cluster.

pub mod acks;
pub mod committer;
pub mod configmap;
pub mod file;
pub mod tracker;
pub mod written;

use std::collections::BTreeMap;
use std::future::Future;

use mongodb::bson::{Bson, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use serde::{Deserialize, Serialize};

use crate::config::Coverage;

/// Format version written into every checkpoint; bump on incompatible changes.
pub const FORMAT: u32 = 1;

/// Durable progress of one pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// Pipeline name, checked on load so a checkpoint is never applied to another pipeline.
    pub pipeline: String,
    /// Cluster time recorded before the snapshot began: the stream starts here when there is
    /// no resume token yet, and snapshot documents carry it as their version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_start: Option<ClusterTime>,
    /// Resume token (canonical extended JSON) after the last acknowledged change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_token: Option<serde_json::Value>,
    /// `resumeToken` is an invalidate event's (after a `dropDatabase`): the stream re-opens
    /// with `startAfter`, since MongoDB refuses `resumeAfter` an invalidate.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume_after_invalidate: bool,
    /// Cluster time of the last change read before `resumeToken` (at or before the token's
    /// own position). Resume tokens cannot be compared, cluster times can: re-sharding
    /// starts the new shards at the earliest of the old shards' times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_time: Option<ClusterTime>,
    /// The shard this checkpoint belongs to, when the pipeline is split over several workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<crate::config::Shard>,
    /// Snapshot progress.
    #[serde(default)]
    pub snapshot: SnapshotProgress,
    /// Every namespace this pipeline has written, with its index (until the namespace is
    /// dropped and its index dealt with). After lost history this is how the sweep finds the
    /// collections dropped during the gap: they are no longer listed by MongoDB.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub written: BTreeMap<String, String>,
    /// After a re-snapshot (history lost): once the snapshot is acknowledged, documents with
    /// a version below this are ones the new snapshot did not see, deleted during the gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep_below: Option<u64>,
    /// The token of the last re-snapshot requested by hand (`EngineConfig::resnapshot`), so
    /// each request runs once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resnapshot_token: Option<String>,
    /// With one change stream per collection (`streamScope: Collection`): where each
    /// collection's stream is, by namespace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub collection_streams: BTreeMap<String, CollectionStream>,
    /// With one change stream per collection: the cluster time taken before the last listing
    /// of collections whose streams were all opened. A collection not in `collectionStreams`
    /// was created after it, so its stream starts there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections_listed_at: Option<ClusterTime>,
}

/// Where one collection's change stream is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectionStream {
    /// Where the stream was opened, before it recorded a token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<ClusterTime>,
    /// Resume token (canonical extended JSON) after the last acknowledged change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<serde_json::Value>,
    /// `token` is an invalidate event's (the collection was dropped or renamed): re-open with
    /// `startAfter`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_invalidate: bool,
    /// Cluster time of the last change read before `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<ClusterTime>,
}

/// Why a checkpoint is fenced, for [`Error::Fenced`]'s message.
fn fenced_by(holder: &str) -> String {
    if holder.is_empty() {
        "can no longer be written by this worker: its lease ran out on its own clock before a renewal succeeded".to_string()
    } else {
        format!("is now leased by {holder:?}")
    }
}

/// 2020-01-01T00:00:00Z: versions count seconds from here.
const VERSION_EPOCH: u32 = 1_577_836_800;

/// A MongoDB cluster time, stored readably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClusterTime {
    /// Seconds since the Unix epoch.
    pub t: u32,
    /// Ordinal within the second.
    pub i: u32,
}

impl From<Timestamp> for ClusterTime {
    fn from(ts: Timestamp) -> Self {
        Self {
            t: ts.time,
            i: ts.increment,
        }
    }
}

impl From<ClusterTime> for Timestamp {
    fn from(ct: ClusterTime) -> Self {
        Timestamp {
            time: ct.t,
            increment: ct.i,
        }
    }
}

impl ClusterTime {
    /// The Elasticsearch external version for a change at this cluster time. Cluster times
    /// grow monotonically across the deployment, so later changes get larger versions.
    /// Elasticsearch versions are non-negative `long`s: seconds go in the high bits relative
    /// to 2020-01-01, which keeps the value below 2^63 until the year 2088.
    pub fn version(self) -> u64 {
        (u64::from(self.t.saturating_sub(VERSION_EPOCH)) << 32) | u64::from(self.i)
    }

    /// The cluster time a version was made from (inverse of [`ClusterTime::version`]).
    pub fn from_version(version: u64) -> Self {
        Self {
            t: (version >> 32) as u32 + VERSION_EPOCH,
            i: version as u32,
        }
    }
}

/// Snapshot progress of the whole pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotProgress {
    /// Every collection is done: the pipeline only streams.
    #[serde(default)]
    pub done: bool,
    /// Progress by namespace (`db.collection`).
    #[serde(default)]
    pub collections: BTreeMap<String, CollectionProgress>,
    /// The namespace patterns this checkpoint covers: their collections were snapshotted (or
    /// created later and streamed). A pattern added to the pipeline later is snapshotted on
    /// the next start; one removed and added back again is snapshotted again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coverage: Option<Coverage>,
}

/// Snapshot progress of one collection, read in `_id` order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CollectionProgress {
    /// Every document is acknowledged.
    #[serde(default)]
    pub done: bool,
    /// Every document with an `_id` up to this one (canonical extended JSON) is acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_id: Option<serde_json::Value>,
    /// A snapshot split into `_id` ranges read at once (`snapshotSplit`): each range's progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ranges: Vec<RangeProgress>,
}

/// Snapshot progress of one `_id` range of a split collection: the documents after `after`
/// (from the first, when `None`) up to and including `upTo` (to the last, when `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeProgress {
    /// Lower bound, exclusive (canonical extended JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<serde_json::Value>,
    /// Upper bound, inclusive (canonical extended JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_to: Option<serde_json::Value>,
    /// Every document of the range up to this `_id` is acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_id: Option<serde_json::Value>,
    /// Every document of the range is acknowledged.
    #[serde(default)]
    pub done: bool,
}

/// A point in the source that the pipeline may resume from once acknowledged.
#[derive(Debug, Clone, PartialEq)]
pub enum Position {
    /// Snapshot of `ns` is acknowledged up to and including `last_id`.
    SnapshotRange {
        /// Namespace.
        ns: String,
        /// Last `_id` read.
        last_id: Bson,
    },
    /// The snapshot of `ns` is split into ranges at these `_id`s (each the inclusive end of a
    /// range; the last range runs to the end).
    SnapshotSplit {
        /// Namespace.
        ns: String,
        /// Range ends, ascending.
        bounds: Vec<Bson>,
    },
    /// Range `range` of the split snapshot of `ns` is acknowledged up to and including
    /// `last_id` (`None`: the whole range).
    SnapshotRangeRead {
        /// Namespace.
        ns: String,
        /// Which range.
        range: usize,
        /// Last `_id` read; `None` when the range is done.
        last_id: Option<Bson>,
    },
    /// Snapshot of `ns` is complete.
    SnapshotCollectionDone {
        /// Namespace.
        ns: String,
    },
    /// All collections are snapshotted.
    SnapshotDone,
    /// The checkpoint covers exactly these namespace patterns from here on.
    Coverage(Coverage),
    /// The change stream is acknowledged up to this token.
    Stream {
        /// Resume token.
        token: ResumeToken,
        /// Cluster time of the last change read before the token, if any was.
        time: Option<ClusterTime>,
        /// The token is an invalidate event's: MongoDB refuses `resumeAfter` it, so the stream
        /// must re-open with `startAfter`.
        after_invalidate: bool,
    },
    /// History was lost: start over from a new stream start with a new snapshot, and sweep
    /// what it does not see.
    Reset {
        /// The new stream start (also the new snapshot's version).
        stream_start: ClusterTime,
    },
    /// The sweep after a re-snapshot is done.
    SweepDone,
    /// Namespace `ns` is written into `index` (recorded before its first write).
    Written {
        /// Namespace.
        ns: String,
        /// Its index.
        index: String,
    },
    /// Namespace `ns` was dropped (or renamed away) and its index dealt with per `onDrop`.
    Forgotten {
        /// Namespace.
        ns: String,
    },
    /// The change stream of collection `ns` was opened at `at` (one stream per collection).
    CollectionOpened {
        /// Namespace.
        ns: String,
        /// Where it starts.
        at: ClusterTime,
    },
    /// The change stream of collection `ns` is acknowledged up to this token.
    CollectionStream {
        /// Namespace.
        ns: String,
        /// Resume token.
        token: ResumeToken,
        /// Cluster time of the last change read before the token, if any was.
        time: Option<ClusterTime>,
        /// The token is an invalidate event's.
        after_invalidate: bool,
    },
    /// Every collection listed after cluster time `at` has its stream opened (and recorded).
    CollectionsListed {
        /// Taken before the listing.
        at: ClusterTime,
    },
}

/// Why a checkpoint could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the store failed.
    #[error("failed to {op} checkpoint at {location}")]
    Io {
        /// `read` or `write`.
        op: &'static str,
        /// File path or ConfigMap name.
        location: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The stored checkpoint is not valid.
    #[error("checkpoint at {location} is corrupt: {reason}; move it away to start over (this re-snapshots)")]
    Corrupt {
        /// File path or ConfigMap name.
        location: String,
        /// What is wrong.
        reason: String,
    },
    /// Another worker holds the lease now, or this worker's lease ran out on its own clock: it
    /// must stop syncing.
    #[error("checkpoint at {location} {}; stopping so two workers never sync one shard", fenced_by(holder))]
    Fenced {
        /// ConfigMap name.
        location: String,
        /// The new holder; empty when the lease ran out on this worker's clock (no successful
        /// renewal within the lease duration), whoever takes it next.
        holder: String,
    },
    /// The stored checkpoint belongs to a newer format or another pipeline.
    #[error("checkpoint at {location} cannot be used: {reason}")]
    Incompatible {
        /// File path or ConfigMap name.
        location: String,
        /// What is wrong.
        reason: String,
    },
}

impl Checkpoint {
    /// An empty checkpoint for `pipeline`.
    pub fn new(pipeline: &str) -> Self {
        Self {
            format: FORMAT,
            pipeline: pipeline.to_string(),
            ..Self::default()
        }
    }

    /// Fold an acknowledged position into the checkpoint.
    pub fn apply(&mut self, position: &Position) {
        match position {
            Position::SnapshotRange { ns, last_id } => {
                let entry = self.snapshot.collections.entry(ns.clone()).or_default();
                entry.last_id = Some(last_id.clone().into_canonical_extjson());
            }
            Position::SnapshotSplit { ns, bounds } => {
                let json = |b: &Bson| b.clone().into_canonical_extjson();
                let entry = self.snapshot.collections.entry(ns.clone()).or_default();
                entry.ranges = (0..=bounds.len())
                    .map(|i| RangeProgress {
                        after: i.checked_sub(1).map(|j| json(&bounds[j])),
                        up_to: bounds.get(i).map(json),
                        ..RangeProgress::default()
                    })
                    .collect();
            }
            Position::SnapshotRangeRead { ns, range, last_id } => {
                let entry = self.snapshot.collections.entry(ns.clone()).or_default();
                if let Some(r) = entry.ranges.get_mut(*range) {
                    match last_id {
                        Some(id) => r.last_id = Some(id.clone().into_canonical_extjson()),
                        None => r.done = true,
                    }
                }
            }
            Position::SnapshotCollectionDone { ns } => {
                self.snapshot.collections.entry(ns.clone()).or_default().done = true;
            }
            Position::SnapshotDone => self.snapshot.done = true,
            Position::Coverage(c) => self.snapshot.coverage = Some(c.clone()),
            Position::Reset { stream_start } => {
                self.stream_start = Some(*stream_start);
                self.resume_token = None;
                self.resume_after_invalidate = false;
                self.stream_time = None;
                self.snapshot = SnapshotProgress::default();
                self.sweep_below = Some(stream_start.version());
                self.collection_streams.clear();
                self.collections_listed_at = None;
            }
            Position::CollectionOpened { ns, at } => {
                self.collection_streams.entry(ns.clone()).or_insert_with(|| CollectionStream { start: Some(*at), ..CollectionStream::default() });
                self.note_collection_times();
            }
            Position::CollectionStream { ns, token, time, after_invalidate } => {
                let mark = self.collection_streams.entry(ns.clone()).or_default();
                if let Ok(bson) = mongodb::bson::to_bson(token) {
                    mark.token = Some(bson.into_canonical_extjson());
                    mark.after_invalidate = *after_invalidate;
                }
                if time.is_some() {
                    mark.time = *time;
                }
                self.note_collection_times();
            }
            Position::CollectionsListed { at } => self.collections_listed_at = Some(*at),
            Position::SweepDone => self.sweep_below = None,
            Position::Written { ns, index } => {
                self.written.insert(ns.clone(), index.clone());
            }
            Position::Forgotten { ns } => {
                self.written.remove(ns);
            }
            Position::Stream { token, time, after_invalidate } => {
                if let Ok(bson) = mongodb::bson::to_bson(token) {
                    self.resume_token = Some(bson.into_canonical_extjson());
                    self.resume_after_invalidate = *after_invalidate;
                }
                if time.is_some() {
                    self.stream_time = *time;
                }
            }
        }
    }

    /// With one stream per collection, `stream_time` is the earliest any collection's stream
    /// reached: where a re-shard restarts every stream.
    fn note_collection_times(&mut self) {
        self.stream_time = self.collection_streams.values().filter_map(|m| m.time.or(m.start)).min();
    }

    /// Where each collection's stream resumes (one stream per collection): its token, and
    /// whether it is an invalidate's; or, before it recorded one, where it was opened.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a stored value is not a token.
    pub fn collection_starts(&self, location: &str) -> Result<BTreeMap<String, CollectionStart>, Error> {
        let mut out = BTreeMap::new();
        for (ns, mark) in &self.collection_streams {
            let start = match (&mark.token, mark.start) {
                (Some(json), _) => {
                    let corrupt = |e: String| Error::Corrupt { location: location.to_string(), reason: format!("resume token of {ns}: {e}") };
                    let bson = Bson::try_from(json.clone()).map_err(|e| corrupt(e.to_string()))?;
                    let token: ResumeToken = mongodb::bson::from_bson(bson).map_err(|e| corrupt(e.to_string()))?;
                    CollectionStart::Token { token, after_invalidate: mark.after_invalidate }
                }
                (None, Some(at)) => CollectionStart::At(at),
                (None, None) => continue,
            };
            out.insert(ns.clone(), start);
        }
        Ok(out)
    }

    /// The stored resume token, decoded.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when the stored value is not a token.
    pub fn resume_token(&self, location: &str) -> Result<Option<ResumeToken>, Error> {
        let Some(json) = &self.resume_token else {
            return Ok(None);
        };
        let corrupt = |reason: String| Error::Corrupt {
            location: location.to_string(),
            reason,
        };
        let bson = Bson::try_from(json.clone()).map_err(|e| corrupt(format!("resume token: {e}")))?;
        mongodb::bson::from_bson(bson)
            .map(Some)
            .map_err(|e| corrupt(format!("resume token: {e}")))
    }

    /// Check a loaded checkpoint belongs to `pipeline` and is a format this build reads.
    ///
    /// # Errors
    /// [`Error::Incompatible`] naming the mismatch.
    pub fn check(&self, pipeline: &str, shard: crate::config::Shard, location: &str) -> Result<(), Error> {
        if self.format != FORMAT {
            return Err(Error::Incompatible {
                location: location.into(),
                reason: format!("format {} (this build reads {FORMAT})", self.format),
            });
        }
        if self.pipeline != pipeline {
            return Err(Error::Incompatible {
                location: location.into(),
                reason: format!("it belongs to pipeline `{}`, not `{pipeline}`", self.pipeline),
            });
        }
        let stored = self.shard.unwrap_or_default();
        if stored != shard {
            return Err(Error::Incompatible {
                location: location.into(),
                reason: format!("it belongs to shard {stored}, not {shard}"),
            });
        }
        Ok(())
    }
}

impl Checkpoint {
    /// The checkpoint a new shard starts from when a pipeline is re-sharded (its worker count
    /// changed), given the checkpoints of every old shard, all stopped.
    ///
    /// Old and new shards own different documents, so no old position can be taken over as
    /// it is. The merged checkpoint is at or before every old one: the stream restarts at the
    /// earliest cluster time any old shard had reached (replayed changes are harmless: their
    /// versions make them no-ops), a collection counts as snapshotted only when every old
    /// shard finished it, and a pending sweep keeps the lowest bound (it never deletes more
    /// than any old shard would have). When an old shard had not started at all, the new
    /// shards start afresh, snapshot included.
    pub fn merge_for_reshard(pipeline: &str, old: &[Checkpoint], shard: crate::config::Shard) -> Checkpoint {
        let mut merged = Checkpoint {
            shard: shard.is_split().then_some(shard),
            resnapshot_token: old.iter().find_map(|cp| cp.resnapshot_token.clone()),
            // Any old shard's record of a namespace may be the only one (it wrote it first),
            // and shards of a namespace whose documents choose their index list different ones.
            written: old.iter().flat_map(|cp| cp.written.iter()).fold(BTreeMap::new(), |mut all: BTreeMap<String, String>, (ns, list)| {
                let entry = all.entry(ns.clone()).or_default();
                for index in list.split(',') {
                    if !entry.split(',').any(|i| i == index) {
                        if !entry.is_empty() {
                            entry.push(',');
                        }
                        entry.push_str(index);
                    }
                }
                all
            }),
            ..Checkpoint::new(pipeline)
        };
        let positions: Option<Vec<ClusterTime>> = old
            .iter()
            .map(|cp| cp.stream_start.map(|start| cp.stream_time.unwrap_or(start).max(start)))
            .collect();
        let Some(start) = positions.and_then(|p| p.into_iter().min()) else {
            return merged;
        };
        merged.stream_start = Some(start);
        merged.sweep_below = old.iter().filter_map(|cp| cp.sweep_below).min();
        let coverage = old.first().and_then(|cp| cp.snapshot.coverage.clone());
        if old.iter().any(|cp| cp.snapshot.coverage != coverage) {
            // The old shards disagree on what they cover: snapshot everything again.
            return merged;
        }
        merged.snapshot.coverage = coverage;
        merged.snapshot.done = old.iter().all(|cp| cp.snapshot.done);
        if !merged.snapshot.done {
            if let Some(first) = old.first() {
                for ns in first.snapshot.collections.keys() {
                    if old.iter().all(|cp| cp.snapshot.done || cp.snapshot.collections.get(ns).is_some_and(|c| c.done)) {
                        merged.snapshot.collections.insert(
                            ns.clone(),
                            CollectionProgress {
                                done: true,
                                ..CollectionProgress::default()
                            },
                        );
                    }
                }
            }
        }
        merged
    }
}

/// Where a collection's stream resumes.
#[derive(Debug, Clone)]
pub enum CollectionStart {
    /// After this token (with `startAfter` when it is an invalidate's).
    Token {
        /// The token.
        token: ResumeToken,
        /// It is an invalidate event's.
        after_invalidate: bool,
    },
    /// At this cluster time.
    At(ClusterTime),
}

/// Where checkpoints live. Implementations must make `save` atomic: a crash leaves either
/// the old or the new checkpoint, never a torn one.
pub trait CheckpointStore: Send + Sync + 'static {
    /// Human-readable location, for logs and errors.
    fn location(&self) -> String;
    /// Load the stored checkpoint, if any.
    fn load(&self) -> impl Future<Output = Result<Option<Checkpoint>, Error>> + Send;
    /// Store `checkpoint`, replacing the previous one.
    fn save(&self, checkpoint: &Checkpoint) -> impl Future<Output = Result<(), Error>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::{doc, oid::ObjectId};

    fn at(t: u32) -> ClusterTime {
        ClusterTime { t, i: 1 }
    }

    fn token(data: &str) -> ResumeToken {
        mongodb::bson::from_bson(Bson::Document(doc! {"_data": data})).expect("token")
    }

    /// A split snapshot records its ranges, then each range's progress on its own; a collection
    /// is done only once `SnapshotCollectionDone` comes.
    #[test]
    fn a_split_snapshot_keeps_each_ranges_progress() {
        let mut cp = Checkpoint::new("p");
        cp.apply(&Position::SnapshotSplit { ns: "d.c".into(), bounds: vec![Bson::Int32(100), Bson::String("m".into())] });
        cp.apply(&Position::SnapshotRangeRead { ns: "d.c".into(), range: 1, last_id: Some(Bson::Int32(150)) });
        cp.apply(&Position::SnapshotRangeRead { ns: "d.c".into(), range: 0, last_id: None });
        let c = &cp.snapshot.collections["d.c"];
        assert_eq!(c.ranges.len(), 3);
        assert_eq!((c.ranges[0].after.is_none(), c.ranges[0].up_to.is_some(), c.ranges[0].done), (true, true, true));
        assert_eq!(c.ranges[1].last_id, Some(Bson::Int32(150).into_canonical_extjson()));
        assert_eq!((c.ranges[2].after.clone(), c.ranges[2].up_to.is_none()), (Some(serde_json::json!("m")), true));
        assert!(!c.done);
        let text = serde_json::to_string(&cp).expect("json");
        assert_eq!(serde_json::from_str::<Checkpoint>(&text).expect("read back"), cp);
    }

    /// One stream per collection: each collection resumes from its own token, or from where
    /// it was opened before it had one; an invalidate's token resumes with `startAfter`; a
    /// re-shard restarts every stream at the earliest any reached; lost history forgets them.
    #[test]
    fn collection_streams_resume_each_from_its_own_place() {
        let mut cp = Checkpoint::new("p");
        cp.apply(&Position::CollectionOpened { ns: "d.a".into(), at: at(100) });
        cp.apply(&Position::CollectionOpened { ns: "d.b".into(), at: at(100) });
        cp.apply(&Position::CollectionsListed { at: at(105) });
        cp.apply(&Position::CollectionStream { ns: "d.a".into(), token: token("a1"), time: Some(at(110)), after_invalidate: false });
        cp.apply(&Position::CollectionStream { ns: "d.c".into(), token: token("c1"), time: Some(at(120)), after_invalidate: true });
        // A second open of a collection with a token keeps the token.
        cp.apply(&Position::CollectionOpened { ns: "d.a".into(), at: at(130) });
        let starts = cp.collection_starts("here").expect("starts");
        assert!(matches!(&starts["d.a"], CollectionStart::Token { token: t, after_invalidate: false } if *t == token("a1")), "{starts:?}");
        assert!(matches!(starts["d.b"], CollectionStart::At(t) if t == at(100)), "{starts:?}");
        assert!(matches!(&starts["d.c"], CollectionStart::Token { after_invalidate: true, .. }), "{starts:?}");
        assert_eq!(cp.collections_listed_at, Some(at(105)));
        assert_eq!(cp.stream_time, Some(at(100)), "the earliest place any stream reached");
        let text = serde_json::to_string(&cp).expect("json");
        assert_eq!(serde_json::from_str::<Checkpoint>(&text).expect("read back"), cp);
        cp.apply(&Position::Reset { stream_start: at(200) });
        assert!(cp.collection_streams.is_empty() && cp.collections_listed_at.is_none());
    }

    #[test]
    fn a_lease_that_ran_out_names_no_holder() {
        let ran_out = Error::Fenced { location: "ConfigMap c".into(), holder: String::new() };
        assert!(ran_out.to_string().contains("its lease ran out on its own clock"), "{ran_out}");
        let taken = Error::Fenced { location: "ConfigMap c".into(), holder: "w-1/abc".into() };
        assert!(taken.to_string().contains("is now leased by \"w-1/abc\""), "{taken}");
    }

    #[test]
    fn resharding_starts_at_the_earliest_old_position_and_keeps_only_common_snapshot_progress() {
        let two = crate::config::Shard { index: 0, count: 3 };
        let mut a = Checkpoint::new("p");
        a.stream_start = Some(at(100));
        a.stream_time = Some(at(180));
        a.snapshot.done = true;
        let mut b = Checkpoint::new("p");
        b.stream_start = Some(at(100));
        b.stream_time = Some(at(150));
        b.snapshot.done = true;
        let merged = Checkpoint::merge_for_reshard("p", &[a.clone(), b.clone()], two);
        assert_eq!(merged.stream_start, Some(at(150)), "the earliest position reached");
        assert_eq!(merged.resume_token, None);
        assert!(merged.snapshot.done);
        assert_eq!(merged.shard, Some(two));

        // A shard with a token but no event time yet is at least at its stream start.
        b.stream_time = None;
        b.snapshot.done = false;
        b.snapshot.collections.insert("d.x".into(), CollectionProgress { done: true, ..CollectionProgress::default() });
        b.snapshot.collections.insert(
            "d.y".into(),
            CollectionProgress { done: false, last_id: Some(serde_json::json!(5)), ..CollectionProgress::default() },
        );
        let merged = Checkpoint::merge_for_reshard("p", &[b.clone(), a.clone()], two);
        assert_eq!(merged.stream_start, Some(at(100)));
        assert!(!merged.snapshot.done);
        assert!(merged.snapshot.collections["d.x"].done);
        assert!(!merged.snapshot.collections.contains_key("d.y"), "a half-read collection is read again from its start");

        // An old shard that never started: everything starts afresh.
        let merged = Checkpoint::merge_for_reshard("p", &[a.clone(), Checkpoint::new("p")], two);
        assert_eq!(merged.stream_start, None);
        assert!(!merged.snapshot.done);

        // A pending sweep keeps its lowest bound.
        let mut c = a.clone();
        c.sweep_below = Some(90);
        a.sweep_below = Some(70);
        assert_eq!(Checkpoint::merge_for_reshard("p", &[c, a], two).sweep_below, Some(70));
    }

    #[test]
    fn versions_grow_with_cluster_time() {
        let a = ClusterTime { t: 1_700_000_000, i: 7 };
        let b = ClusterTime { t: 1_700_000_000, i: 8 };
        let c = ClusterTime { t: 1_700_000_001, i: 1 };
        assert!(a.version() < b.version() && b.version() < c.version());
        assert_eq!(ClusterTime::from_version(c.version()), c);
        let year_2088 = 1_577_836_800 + (1u32 << 31) - 1;
        assert!(ClusterTime { t: year_2088, i: u32::MAX }.version() <= i64::MAX as u64);
    }

    #[test]
    fn an_invalidate_token_is_stored_as_one_to_start_after() {
        let token = |d: &str| -> ResumeToken { mongodb::bson::from_bson(Bson::Document(doc! {"_data": d})).expect("token") };
        let mut cp = Checkpoint::new("shop");
        cp.apply(&Position::Stream { token: token("01"), time: None, after_invalidate: true });
        let back: Checkpoint = serde_json::from_str(&serde_json::to_string(&cp).expect("json")).expect("parse");
        assert!(back.resume_after_invalidate, "{}", serde_json::to_string(&cp).expect("json"));
        // The next acknowledged event's token is an ordinary one again.
        cp.apply(&Position::Stream { token: token("02"), time: None, after_invalidate: false });
        assert!(!cp.resume_after_invalidate);
        assert!(!serde_json::to_string(&cp).expect("json").contains("resumeAfterInvalidate"));
    }

    #[test]
    fn positions_fold_into_a_checkpoint_that_round_trips_through_json() {
        let mut cp = Checkpoint::new("shop");
        let oid = ObjectId::new();
        cp.apply(&Position::SnapshotRange {
            ns: "shop.orders".into(),
            last_id: Bson::ObjectId(oid),
        });
        cp.apply(&Position::SnapshotCollectionDone {
            ns: "shop.users".into(),
        });
        let token: ResumeToken =
            mongodb::bson::from_bson(Bson::Document(doc! {"_data": "8263AB"})).expect("token");
        cp.apply(&Position::Stream { token: token.clone(), time: None, after_invalidate: false });
        let text = serde_json::to_string(&cp).expect("json");
        let back: Checkpoint = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, cp);
        assert_eq!(back.resume_token("t").expect("token"), Some(token));
        let id = back.snapshot.collections["shop.orders"].last_id.clone().expect("id");
        assert_eq!(Bson::try_from(id).expect("bson"), Bson::ObjectId(oid));
        assert!(back.snapshot.collections["shop.users"].done);
    }

    #[test]
    fn reset_starts_over_and_sweep_done_clears_the_sweep() {
        let mut cp = Checkpoint::new("shop");
        cp.snapshot.done = true;
        cp.resume_token = Some(serde_json::json!({"_data": "00"}));
        let t1 = ClusterTime { t: 1_800_000_000, i: 1 };
        cp.apply(&Position::Reset { stream_start: t1 });
        assert_eq!(cp.stream_start, Some(t1));
        assert_eq!(cp.resume_token, None);
        assert!(!cp.snapshot.done);
        assert_eq!(cp.sweep_below, Some(t1.version()));
        cp.apply(&Position::SweepDone);
        assert_eq!(cp.sweep_below, None);
    }

    #[test]
    fn checkpoint_of_another_pipeline_is_refused() {
        let cp = Checkpoint::new("a");
        assert!(cp.check("a", crate::config::Shard::default(), "x").is_ok());
        let two = crate::config::Shard { index: 1, count: 2 };
        assert!(matches!(cp.check("a", two, "x"), Err(Error::Incompatible { .. })));
        assert!(matches!(cp.check("b", crate::config::Shard::default(), "x"), Err(Error::Incompatible { .. })));
    }
}
