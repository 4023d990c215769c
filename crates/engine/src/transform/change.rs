//! What the source hands the transform stage: changes, in the order it read them, through a
//! bounded channel ([`Input`]).
//!
//! The source owns nothing downstream: it says what happened in MongoDB (a document changed, a
//! collection was dropped, the stream reached a position) and the transform decides what that
//! becomes. Control changes ([`Change::Flush`], [`Change::Barrier`]) travel in the same order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::{RawBson, RawDocument, RawDocumentBuf, Timestamp};
use tokio::sync::{mpsc, oneshot};

use crate::checkpoint::Position;
// Changes staged before they go through the channel in one message: the same chunk size as
// the transform's hand-over to the sink.
use crate::sink::CHUNK;

/// One document's change, owned (it crosses a task boundary).
#[derive(Debug)]
pub struct Doc {
    /// Database.
    pub db: Arc<str>,
    /// Collection.
    pub coll: Arc<str>,
    /// The document's `_id`.
    pub id: RawBson,
    /// The document; `None` for a delete.
    pub doc: Option<Body>,
    /// External version: the change's cluster time (a snapshot's start time for a read).
    pub version: u64,
    /// Read by a snapshot rather than the change stream.
    pub from_snapshot: bool,
    /// This worker owns the document. A change of a document another shard owns is handed on
    /// only for its relations (`spec.relate`), never written itself.
    pub owned: bool,
    /// What only some pipelines carry, boxed: a plain change is 144 bytes (200 with these parts
    /// inline), and each change is moved several times on its way.
    pub extra: Option<Box<Extra>>,
}

/// A document's BSON, owned: its own buffer, or the part of the change event that carried it
/// (a change stream's `fullDocument`, handed on inside its event rather than copied out).
#[derive(Debug, Clone)]
pub enum Body {
    /// A document of its own (a snapshot's read, a lookup).
    Own(RawDocumentBuf),
    /// The bytes `start..end` of a change event.
    Within {
        /// The whole event.
        event: Vec<u8>,
        /// Where the document starts.
        start: u32,
        /// Where it ends.
        end: u32,
    },
}

impl Body {
    /// The document of `event` at `span` (from [`span`]), keeping `event` whole.
    pub fn within(event: RawDocumentBuf, (start, end): (u32, u32)) -> Self {
        Self::Within { event: event.into_bytes(), start, end }
    }

    /// The document.
    pub fn doc(&self) -> &RawDocument {
        match self {
            Self::Own(doc) => doc,
            Self::Within { event, start, end } => RawDocument::from_bytes(&event[*start as usize..*end as usize]).expect("a body is the document it was built from"),
        }
    }

    /// Bytes held (the whole event, for one inside its event).
    pub fn held(&self) -> usize {
        match self {
            Self::Own(doc) => doc.as_bytes().len(),
            Self::Within { event, .. } => event.len(),
        }
    }
}

/// Where `part` lies within `whole`, when it does (an event is at most 16 MiB, so its offsets
/// fit in 32 bits; past that, `None` too, and the caller copies `part`).
pub fn span(whole: &RawDocument, part: &RawDocument) -> Option<(u32, u32)> {
    let start = (part.as_bytes().as_ptr() as usize).checked_sub(whole.as_bytes().as_ptr() as usize)?;
    let end = start + part.as_bytes().len();
    if end > whole.as_bytes().len() {
        return None;
    }
    Some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
}

/// The parts of a [`Doc`] only some pipelines read.
#[derive(Debug, Default)]
pub struct Extra {
    /// The update's description (for scripts and time machines), for an update.
    pub update: Option<RawDocumentBuf>,
    /// The document before the change (MongoDB 6+ pre-image), kept only for namespaces whose
    /// relations match on a field other than `_id`, and for time machines.
    pub before: Option<RawDocumentBuf>,
    /// For a document of a GridFS files collection indexed with content (`spec.files`): the
    /// file's content, read from its chunks.
    pub file: Option<FileBody>,
}

impl Extra {
    /// Boxed, or `None` when there is nothing.
    pub fn boxed(update: Option<RawDocumentBuf>, before: Option<RawDocumentBuf>, file: Option<FileBody>) -> Option<Box<Self>> {
        (update.is_some() || before.is_some() || file.is_some()).then(|| Box::new(Self { update, before, file }))
    }
}

impl Doc {
    /// The update's description, for an update whose pipeline keeps it.
    pub fn update(&self) -> Option<&RawDocumentBuf> {
        self.extra.as_ref()?.update.as_ref()
    }

    /// The document before the change, where kept.
    pub fn before(&self) -> Option<&RawDocumentBuf> {
        self.extra.as_ref()?.before.as_ref()
    }

    /// The GridFS file's content, where read.
    pub fn file(&self) -> Option<&FileBody> {
        self.extra.as_ref()?.file.as_ref()
    }

    /// Take the GridFS file's content out.
    pub fn take_file(&mut self) -> Option<FileBody> {
        self.extra.as_mut()?.file.take()
    }
}

/// A GridFS file's content, as the source read it.
#[derive(Debug)]
pub enum FileBody {
    /// The bytes.
    Content(Vec<u8>),
    /// Larger than `files.maxFileSize` (this many bytes, or more): indexed without content.
    TooLarge(u64),
}

/// A change event the source could not read: dead-lettered whole, never skipped.
#[derive(Debug)]
pub struct Unreadable {
    /// The event as read.
    pub raw: RawDocumentBuf,
    /// `ns.db` and `ns.coll`, when readable.
    pub ns: Option<(String, String)>,
    /// `documentKey._id`, when readable.
    pub id: Option<RawBson>,
    /// `clusterTime`, when readable.
    pub time: Option<Timestamp>,
    /// What is wrong with it.
    pub why: String,
}

/// What the source hands on.
#[derive(Debug)]
pub enum Change {
    /// A document was read or changed.
    Doc(Doc),
    /// An unreadable change event.
    Unreadable(Unreadable),
    /// Collection `db.coll` was dropped (or renamed away) at `time`.
    Dropped {
        /// Database.
        db: String,
        /// Collection.
        coll: String,
        /// Cluster time of the drop.
        time: Option<Timestamp>,
    },
    /// The source reached a position: it covers every change handed on before it.
    Position(Position),
    /// After a re-snapshot: `existing` are the collections there are now; what the pipeline
    /// wrote before and the new snapshot did not see (version below `below`) is deleted.
    Sweep {
        /// The synced collections existing now.
        existing: Vec<(String, String)>,
        /// The new snapshot's version.
        below: u64,
    },
    /// Send partial batches now (the end of a snapshot's collection).
    Flush,
    /// Answer once every change handed on before this one has its final outcome.
    Barrier(oneshot::Sender<()>),
}

/// Bytes of documents a chunk holds at most before it is handed on.
const CHUNK_BYTES: usize = 1 << 20;
/// Chunks in the channel between source and transform.
pub const QUEUED_CHUNKS: usize = 4;

/// The transform stage is gone (shutdown was forced, or it failed).
#[derive(Debug, thiserror::Error)]
#[error("the transform stage stopped")]
pub struct Closed;

/// The source's end of the channel into the transform stage.
pub struct Input {
    tx: mpsc::Sender<Vec<Change>>,
    staged: Mutex<Staged>,
}

/// What the source staged and not yet handed on.
struct Staged {
    changes: Vec<Change>,
    /// Bytes of the staged documents.
    bytes: usize,
    /// A hand-over was abandoned (its future dropped at shutdown): its changes are gone, so
    /// nothing staged after them may go on. A position recorded later would cover them, and
    /// the checkpoint would skip them for good.
    abandoned: bool,
}

impl Staged {
    fn take(&mut self) -> Vec<Change> {
        self.bytes = 0;
        std::mem::replace(&mut self.changes, Vec::with_capacity(CHUNK))
    }
}

/// Marks the [`Input`] abandoned when a hand-over's future is dropped before it completes.
struct Handing<'a> {
    input: &'a Input,
    done: bool,
}

impl Drop for Handing<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut staged = self.input.lock();
            staged.abandoned = true;
            staged.changes.clear();
        }
    }
}

impl Input {
    /// A channel into the transform stage and its receiving end.
    pub fn channel() -> (Self, mpsc::Receiver<Vec<Change>>) {
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        let staged = Staged { changes: Vec::with_capacity(CHUNK), bytes: 0, abandoned: false };
        (Self { tx, staged: Mutex::new(staged) }, rx)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Staged> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stage `change`; returns a full chunk to hand on with [`Input::send`] before staging more.
    /// After an abandoned hand-over nothing is staged (see [`Input::send`]).
    pub fn stage(&self, change: Change) -> Option<Vec<Change>> {
        let mut staged = self.lock();
        if staged.abandoned {
            return None;
        }
        if let Change::Doc(d) = &change {
            staged.bytes += d.doc.as_ref().map_or(0, Body::held);
            if let Some(FileBody::Content(c)) = d.file() {
                staged.bytes += c.len();
            }
        }
        let control = !matches!(change, Change::Doc(_) | Change::Position(_) | Change::Unreadable(_));
        staged.changes.push(change);
        (control || staged.changes.len() >= CHUNK || staged.bytes >= CHUNK_BYTES).then(|| staged.take())
    }

    /// Stage a position: it covers every change staged before it (the next chunk carries it).
    /// After an abandoned hand-over it is dropped: it would cover the abandoned changes.
    pub fn record(&self, position: Position) {
        let mut staged = self.lock();
        if !staged.abandoned {
            staged.changes.push(Change::Position(position));
        }
    }

    /// Take what is staged (nothing after an abandoned hand-over).
    pub fn take_staged(&self) -> Vec<Change> {
        self.lock().take()
    }

    /// Whether changes are staged.
    pub fn has_staged(&self) -> bool {
        !self.lock().changes.is_empty()
    }

    /// Whether a hand-over was abandoned: everything after it is dropped too, and replayed
    /// from the checkpoint on the next start.
    pub fn abandoned(&self) -> bool {
        self.lock().abandoned
    }

    /// Hand a chunk on; waits while the channel is full (back-pressure from everything
    /// downstream).
    ///
    /// # Cancel safety
    /// Dropping the future drops the chunk: its changes are never acknowledged, so the
    /// checkpoint stays before them and they are read again on the next start. From then on
    /// the input takes nothing more (no later position may cover the dropped changes), so the
    /// caller stops.
    ///
    /// # Errors
    /// [`Closed`] when the transform stage has stopped.
    pub async fn send(&self, chunk: Vec<Change>) -> Result<(), Closed> {
        if chunk.is_empty() {
            return Ok(());
        }
        let mut handing = Handing { input: self, done: false };
        let sent = self.tx.send(chunk).await.map_err(|_| Closed);
        handing.done = true;
        sent
    }

    /// How long a hand-over may wait before the source reports it is waiting on the stages
    /// after it (its heartbeat stays good: waiting on a slow sink is not being stuck).
    pub const PATIENCE: Duration = Duration::from_secs(5);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position() -> Position {
        Position::SnapshotDone
    }

    #[test]
    fn a_document_handed_on_inside_its_event_is_that_document_alone() {
        use mongodb::bson::{doc, RawDocumentBuf};
        let event = RawDocumentBuf::from_document(&doc! {"_id": {"_data": "82"}, "operationType": "insert", "fullDocument": {"_id": 7, "name": "a"}, "ns": {"db": "d", "coll": "c"}}).expect("event");
        let full = event.get_document("fullDocument").expect("fullDocument");
        let span = span(&event, full).expect("inside the event");
        let event_len = event.as_bytes().len();
        let body = Body::within(event, span);
        assert_eq!(body.doc().as_bytes(), RawDocumentBuf::from_document(&doc! {"_id": 7, "name": "a"}).expect("doc").as_bytes());
        // The whole event is held, and counted so.
        assert_eq!(body.held(), event_len);
        // A document elsewhere is not inside the event: it is copied instead.
        let other = RawDocumentBuf::from_document(&doc! {"_id": 7, "name": "a"}).expect("doc");
        let event = RawDocumentBuf::from_document(&doc! {"fullDocument": {"_id": 7, "name": "a"}}).expect("event");
        assert_eq!(super::span(&event, &other), None);
    }

    /// Seen on the old code (a snapshot stopped by SIGTERM while the stages held it back): the
    /// source abandoned a hand-over at shutdown, then recorded its position, which shutdown
    /// handed on alone; the checkpoint covered documents no stage ever received, and one live
    /// document never reached the index (`reliability::fault_matrix_resnapshot_and_sweep_phase_on_opensearch`).
    #[tokio::test]
    async fn a_position_recorded_after_an_abandoned_hand_over_is_never_handed_on() {
        let (input, mut rx) = Input::channel();
        for _ in 0..QUEUED_CHUNKS {
            input.send(vec![Change::Flush]).await.expect("the channel has room");
        }
        input.record(position());
        let chunk = input.take_staged();
        // The channel is full: the hand-over waits, and shutdown drops it.
        assert!(futures_util::FutureExt::now_or_never(input.send(chunk)).is_none());
        assert!(input.abandoned());
        input.record(position());
        assert!(input.take_staged().is_empty(), "a position after the abandoned chunk would cover it");
        assert!(input.stage(Change::Flush).is_none());
        for _ in 0..QUEUED_CHUNKS {
            assert!(matches!(rx.recv().await.as_deref(), Some([Change::Flush])));
        }
        assert!(rx.try_recv().is_err(), "the abandoned chunk must not arrive");
    }

    #[tokio::test]
    async fn a_completed_hand_over_leaves_the_input_open() {
        let (input, mut rx) = Input::channel();
        input.send(vec![Change::Flush]).await.expect("the channel has room");
        input.record(position());
        assert!(!input.abandoned());
        assert_eq!(input.take_staged().len(), 1);
        assert!(rx.recv().await.is_some());
    }
}
