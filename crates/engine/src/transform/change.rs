//! What the source hands the transform stage: changes, in the order it read them, through a
//! bounded channel ([`Input`]).
//!
//! The source owns nothing downstream: it says what happened in MongoDB (a document changed, a
//! collection was dropped, the stream reached a position) and the transform decides what that
//! becomes. Control changes ([`Change::Flush`], [`Change::Barrier`]) travel in the same order.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mongodb::bson::{RawBson, RawDocumentBuf, Timestamp};
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
    pub doc: Option<RawDocumentBuf>,
    /// The update's description (for scripts), for an update.
    pub update: Option<RawDocumentBuf>,
    /// The document before the change (MongoDB 6+ pre-image), kept only for namespaces whose
    /// relations match on a field other than `_id` (a delete carries only the `_id`).
    pub before: Option<RawDocumentBuf>,
    /// External version: the change's cluster time (a snapshot's start time for a read).
    pub version: u64,
    /// Read by a snapshot rather than the change stream.
    pub from_snapshot: bool,
    /// For a document of a GridFS files collection indexed with content (`spec.files`): the
    /// file's content, read from its chunks.
    pub file: Option<FileBody>,
    /// This worker owns the document. A change of a document another shard owns is handed on
    /// only for its relations (`spec.relate`), never written itself.
    pub owned: bool,
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
    staged: Mutex<(Vec<Change>, usize)>,
}

impl Input {
    /// A channel into the transform stage and its receiving end.
    pub fn channel() -> (Self, mpsc::Receiver<Vec<Change>>) {
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        (Self { tx, staged: Mutex::new((Vec::with_capacity(CHUNK), 0)) }, rx)
    }

    /// Stage `change`; returns a full chunk to hand on with [`Input::send`] before staging more.
    pub fn stage(&self, change: Change) -> Option<Vec<Change>> {
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        if let Change::Doc(d) = &change {
            staged.1 += d.doc.as_ref().map_or(0, |d| d.as_bytes().len());
            if let Some(FileBody::Content(c)) = &d.file {
                staged.1 += c.len();
            }
        }
        let control = !matches!(change, Change::Doc(_) | Change::Position(_) | Change::Unreadable(_));
        staged.0.push(change);
        (control || staged.0.len() >= CHUNK || staged.1 >= CHUNK_BYTES).then(|| {
            staged.1 = 0;
            std::mem::replace(&mut staged.0, Vec::with_capacity(CHUNK))
        })
    }

    /// Stage a position: it covers every change staged before it (the next chunk carries it).
    pub fn record(&self, position: Position) {
        self.staged.lock().unwrap_or_else(|p| p.into_inner()).0.push(Change::Position(position));
    }

    /// Take what is staged.
    pub fn take_staged(&self) -> Vec<Change> {
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        staged.1 = 0;
        std::mem::take(&mut staged.0)
    }

    /// Whether changes are staged.
    pub fn has_staged(&self) -> bool {
        !self.staged.lock().unwrap_or_else(|p| p.into_inner()).0.is_empty()
    }

    /// Hand a chunk on; waits while the channel is full (back-pressure from everything
    /// downstream).
    ///
    /// # Cancel safety
    /// Dropping the future drops the chunk: its changes are never acknowledged, so the
    /// checkpoint stays before them and they are read again on the next start.
    ///
    /// # Errors
    /// [`Closed`] when the transform stage has stopped.
    pub async fn send(&self, chunk: Vec<Change>) -> Result<(), Closed> {
        if chunk.is_empty() {
            return Ok(());
        }
        self.tx.send(chunk).await.map_err(|_| Closed)
    }

    /// How long a hand-over may wait before the source reports it is waiting on the stages
    /// after it (its heartbeat stays good: waiting on a slow sink is not being stuck).
    pub const PATIENCE: Duration = Duration::from_secs(5);
}
