//! The sink: the only stage that talks to Elasticsearch. Batching, bulk delivery, location
//! records, dead letters, index operations (drops, sweeps), acknowledgement.
//!
//! Flow: the transform stage hands chunks of decided [`Write`]s to the [`Sink`], with the
//! checkpoint positions and index operations ([`Control`]) among them; the sink numbers each
//! write (the tracker's sequence), records each position after the writes before it, and
//! queues both for one batcher. The batcher takes a batch (count, bytes, time),
//! keeps only the last write of each document in it, and hands it to a delivery task: up to
//! `concurrency` bulk requests are in flight at once. A delivery retries only the items that
//! failed retriably, dead-letters what Elasticsearch refuses, and then acknowledges every
//! write of its batch. A forced stop abandons the deliveries in flight unacknowledged.
//!
//! # Invariants
//! - A document never has two writes in flight (Elasticsearch may keep no delete tombstones):
//!   a write whose document is in a bulk request in flight waits, ahead of that document's
//!   later writes, until the request is done ([`Batcher`]).
//! - A write is acknowledged only once it has a final outcome: indexed, deleted, stale (409),
//!   already gone (404 on delete) or dead-lettered; or once a later write of its document in
//!   the same batch supersedes it.
//! - Memory is bounded: each write holds permits of a byte budget until it is acknowledged,
//!   and the batcher's queue is bounded, so a dead sink stops the source.
//! - An index operation is carried out once every write queued before it is done, and before
//!   any write queued after it is sent; it is acknowledged (and the checkpoint may pass it) only
//!   once done.

pub mod dead_letter;
pub mod elasticsearch;
pub mod locations;
pub mod patches;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn, Instrument};

use self::elasticsearch::request::{body_for, encoded_len};
use self::elasticsearch::response::{Answer, ItemOutcome};
use self::dead_letter::{Embed, Refusal};
use self::elasticsearch::Elastic;
use crate::checkpoint::acks::Acks;
use crate::checkpoint::tracker::{Seq, Tracker};
use crate::checkpoint::Position;
use crate::config::BatchConfig;
use crate::metrics::{Health, Metrics};

/// What a write does to its document.
#[derive(Debug, Clone)]
pub enum Op {
    /// Index this `_source` (JSON object, `_id` left out).
    Index(Bytes),
    /// Merge this JSON object into the indexed document, creating it when missing (partial
    /// update with `doc_as_upsert`; unversioned).
    Update(Bytes),
    /// Create the document with this `_source`, unversioned; one already there stays as it is
    /// (409, success): a time machine's log entry, written once.
    Create(Bytes),
    /// Delete the document.
    Delete,
    /// A change of a document that keeps its patch history (`spec.mergePatches`): carried out
    /// as a read-modify-write of that document ([`patches`]), never coalesced.
    Patch(Box<patches::Patch>),
    /// The source could not turn the change into a write (an `_id` over Elasticsearch's 512
    /// bytes, malformed BSON): dead-letter it with this reason, in order with the rest.
    /// Boxed: rare, and a plain write is moved several times on its way.
    Reject(Box<Rejection>),
}

/// Why the source's change became a dead letter rather than a write ([`Op::Reject`]).
#[derive(Debug, Clone)]
pub struct Rejection {
    /// Short machine-readable type, e.g. `invalid_id`.
    pub error_type: &'static str,
    /// What is wrong.
    pub reason: String,
    /// The document as JSON, when it could be converted.
    pub document: Option<Bytes>,
}

impl Op {
    /// A change that cannot be written: dead-lettered with `error_type` and `reason`, and the
    /// document when it could be converted.
    pub fn reject(error_type: &'static str, reason: String, document: Option<Bytes>) -> Self {
        Self::Reject(Box::new(Rejection { error_type, reason, document }))
    }
}

/// An operation on whole indexes, carried out in order with the writes: once every write
/// handed over before it has its final outcome, and before any write handed over after it is
/// sent. The transform stage decides them; only the sink talks to Elasticsearch.
#[derive(Debug)]
pub enum Control {
    /// Collection `ns` was dropped at `time`: delete its `indexes` (in a sharded pipeline, this
    /// shard's documents of them older than the drop).
    Drop {
        /// The dropped namespace.
        ns: String,
        /// The indexes to delete whole: those it wrote alone that `written` lists.
        indexes: Vec<String>,
        /// Also delete its documents found through their location records, one by one: in
        /// indexes it shares with other namespaces, or beyond those `written` lists.
        by_records: bool,
        /// Cluster time of the drop.
        time: Option<mongodb::bson::Timestamp>,
    },
    /// After a re-snapshot: delete from `indexes`, and through the location records when
    /// `located`, this shard's documents versioned below `below` (deleted during lost history).
    Sweep {
        /// Indexes swept document by document.
        indexes: Vec<String>,
        /// Also sweep the documents that have location records.
        located: bool,
        /// The new snapshot's version.
        below: u64,
    },
    /// Answer once every write handed over before it is acknowledged.
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// Send partial batches now instead of waiting for the flush interval.
    Flush,
}

/// One document write on its way to Elasticsearch.
#[derive(Debug)]
pub struct Write {
    /// Sequence number from the tracker (set by [`Sink::send_chunk`]).
    pub seq: Seq,
    /// MongoDB namespace it came from (for dead-letter records).
    pub ns: Arc<str>,
    /// Target index.
    pub index: Arc<str>,
    /// Elasticsearch `_id` as a JSON string literal, quotes included.
    pub id_json: Box<str>,
    /// External version: the change's cluster time.
    pub version: u64,
    /// Index or delete.
    pub op: Op,
    /// Share of the memory budget, released when the write is dropped.
    permit: Option<OwnedSemaphorePermit>,
    /// Hash of index and `_id` (set when the sink numbers it): which document this is.
    key: u64,
    /// Read by a snapshot: a snapshot reads each document once, so a batch of only such
    /// writes has nothing to coalesce.
    pub from_snapshot: bool,
    /// Routing value.
    pub routing: Option<Box<str>>,
    /// Ingest pipeline.
    pub pipeline: Option<Arc<str>>,
    /// The id of this document's location record, when where it goes depends on its content
    /// ([`locations`]): the sink then reads where it went before, deletes a copy left
    /// elsewhere, and aims deletes at it. It is also the document's identity for ordering.
    pub origin: Option<Arc<str>>,
    /// Written on behalf of another write of the batch (a moved document's old copy, a
    /// location record): not counted, acknowledged with that write.
    pub aux: bool,
}

impl Write {
    /// A write not yet numbered.
    pub fn new(ns: Arc<str>, index: Arc<str>, id_json: Box<str>, version: u64, op: Op) -> Self {
        Self {
            seq: 0,
            ns,
            index,
            id_json,
            version,
            op,
            permit: None,
            key: 0,
            from_snapshot: false,
            routing: None,
            pipeline: None,
            origin: None,
            aux: false,
        }
    }

    /// Which document this is, for ordering and coalescing: its index and `_id`, or, when
    /// its location depends on its content, its namespace and MongoDB `_id` (the location
    /// record's id), since its index and `_id` may change from one write to the next.
    pub fn identity(&self) -> (&str, &str) {
        match &self.origin {
            Some(origin) => ("", origin),
            None => (&self.index, &self.id_json),
        }
    }

    fn document_key(&self) -> u64 {
        let mut h = Fnv::default();
        self.identity().hash(&mut h);
        h.finish()
    }
}

/// FNV-1a: stable and far cheaper than SipHash for the short keys hashed per document
/// (index, `_id`). Keys come from the database, not from an attacker choosing collisions.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Memory budget of writes in flight: 1 permit = 1 KiB. At least 64 MiB, and room for two
/// batches of `max_bytes` per request slot. A write under 1 KiB still takes a whole permit,
/// so with a very large `max_docs` of small documents the budget, not the batch limits, caps
/// what is in flight (slower, never stuck).
fn budget_kib(batch: &BatchConfig) -> usize {
    let bytes = (batch.max_bytes * batch.concurrency * 2).max(64 << 20);
    bytes / 1024
}

/// State shared by the sink's delivery tasks, and the checkpoint's tracker.
pub struct Shared {
    /// The checkpoint's tracker: writes are numbered and acknowledged here.
    pub acks: Arc<Acks>,
    stale: Mutex<StaleWindow>,
    /// Metrics of the pipeline.
    pub metrics: Metrics,
    /// Health of the pipeline.
    pub health: Arc<Health>,
}

/// Writes answered since the last look, to tell when most come back stale.
#[derive(Default)]
struct StaleWindow {
    applied: u64,
    stale: u64,
    warned: Option<Instant>,
}

/// Writes per look at the stale share: large enough that a few replayed changes never warn.
const STALE_WINDOW: u64 = 1000;
/// Share of stale writes in a window that warns.
const STALE_WARN_SHARE: f64 = 0.5;
/// At most one warning per this long.
const STALE_WARN_EVERY: Duration = Duration::from_secs(300);

impl Shared {
    /// Count answered writes; once per [`STALE_WINDOW`] of them, publish the stale share and warn
    /// when most were stale. Briefly that is a replay after a restart; lasting, it means another
    /// writer versions these documents higher (an index Monstache built), and they freeze.
    fn note_outcomes(&self, applied: u64, stale: u64) {
        let mut w = self.stale.lock().unwrap_or_else(|p| p.into_inner());
        w.applied += applied;
        w.stale += stale;
        let total = w.applied + w.stale;
        if total < STALE_WINDOW {
            return;
        }
        let share = w.stale as f64 / total as f64;
        self.metrics.stale_share.set(share);
        if share > STALE_WARN_SHARE && w.warned.is_none_or(|t| t.elapsed() >= STALE_WARN_EVERY) {
            w.warned = Some(Instant::now());
            warn!(share = format!("{:.0}%", share * 100.0), writes = total, "most writes came back stale (409: the index holds a newer version); expected for a while after a restart (changes are replayed), but if it lasts another writer versions these documents higher (an index built by Monstache?) and they no longer change");
        }
        w.applied = 0;
        w.stale = 0;
    }

    /// Shared state for a new pipeline run.
    pub fn new(acks: Arc<Acks>, metrics: Metrics, health: Arc<Health>) -> Arc<Self> {
        Arc::new(Self {
            acks,
            stale: Mutex::new(StaleWindow::default()),
            metrics,
            health,
        })
    }

    fn tracker(&self) -> MutexGuard<'_, Tracker<Position>> {
        self.acks.tracker()
    }

    fn ack(&self, seqs: &[Seq]) {
        let in_flight = self.acks.ack(seqs);
        self.metrics.in_flight.set(in_flight as i64);
        self.health.progressed();
    }
}

enum Msg {
    /// Writes, in order.
    Writes(Vec<Write>),
    /// An operation in order with the writes, and its place in the checkpoint order.
    Control(Control, Option<Seq>),
}

/// How many flush intervals a batch of snapshot writes may wait to fill.
const SNAPSHOT_FLUSH_FACTOR: u32 = 10;

/// Items per chunk handed from one stage to the next: changes from the source to the
/// transform (`transform::change`), writes from the transform to the sink. One channel send
/// and one wake-up per chunk instead of per document.
pub const CHUNK: usize = 64;

/// The sink: one batcher that delivers bulk requests to Elasticsearch.
pub struct Sink {
    tx: Option<mpsc::Sender<Msg>>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    budget: Arc<Semaphore>,
    budget_total: u32,
}

/// The sink has stopped (shutdown was forced, or a delivery task failed).
#[derive(Debug, thiserror::Error)]
#[error("sink stopped")]
pub struct Closed;

/// Settings of the sink.
#[derive(Clone)]
pub struct SinkSettings {
    /// Batch limits and bulk requests in flight.
    pub batch: BatchConfig,
    /// Index of dead-letter records.
    pub dead_letter_index: Arc<str>,
    /// Pipeline name, written into dead-letter records.
    pub pipeline: Arc<str>,
    /// Index of location records, when some namespace's documents need them
    /// ([`locations`]).
    pub locations: Option<Arc<str>>,
    /// The documents this worker owns (a sharded pipeline's drops and sweeps delete only
    /// these).
    pub shard: crate::config::Shard,
}

/// Writes in order, with the checkpoint positions and index operations among them, to be
/// handed over with [`Sink::send_chunk`].
#[derive(Default)]
pub struct Chunk {
    writes: Vec<Write>,
    /// Each mark comes after the writes before its index.
    marks: Vec<(usize, Mark)>,
}

enum Mark {
    Position(Position),
    Control(Control),
}

impl Chunk {
    /// Add a write.
    pub fn push(&mut self, write: Write) {
        self.writes.push(write);
    }

    /// An empty chunk with room for `writes` (a growing one would move its writes again).
    pub fn with_capacity(writes: usize) -> Self {
        Self { writes: Vec::with_capacity(writes), marks: Vec::new() }
    }

    /// Add a position: it covers every write before it.
    pub fn record(&mut self, position: Position) {
        self.marks.push((self.writes.len(), Mark::Position(position)));
    }

    /// Add an index operation, carried out after the writes before it.
    pub fn control(&mut self, control: Control) {
        self.marks.push((self.writes.len(), Mark::Control(control)));
    }

    /// Number of writes.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether the chunk holds nothing.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.marks.is_empty()
    }

    /// The writes, in order.
    #[cfg(test)]
    pub(crate) fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// The index operations among the writes, in order.
    #[cfg(test)]
    pub(crate) fn controls(&self) -> impl Iterator<Item = &Control> {
        self.marks.iter().filter_map(|(_, m)| match m {
            Mark::Control(c) => Some(c),
            Mark::Position(_) => None,
        })
    }
}

impl Sink {
    /// Start the batcher. `abort` makes deliveries give up retrying (forced shutdown);
    /// unacknowledged writes are then simply not checkpointed.
    pub fn start(
        es: Elastic,
        settings: SinkSettings,
        shared: Arc<Shared>,
        abort: CancellationToken,
    ) -> Self {
        // Room for one full batch of chunks while the batcher waits for a free request slot;
        // more would only hold memory.
        let (tx, rx) = mpsc::channel(settings.batch.max_docs.div_ceil(CHUNK).max(2));
        let total = budget_kib(&settings.batch);
        let deliverer = Arc::new(Deliverer {
            es,
            settings: settings.clone(),
            shared: shared.clone(),
            abort,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(
            deliverer
                .run(rx)
                .instrument(tracing::info_span!("sink", pipeline = %settings.pipeline)),
        );
        Self {
            tx: Some(tx),
            tasks,
            shared,
            budget: Arc::new(Semaphore::new(total)),
            budget_total: u32::try_from(total).unwrap_or(u32::MAX),
        }
    }

    /// Shared state (tracker, metrics, health).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    fn sender(&self) -> Result<&mpsc::Sender<Msg>, Closed> {
        self.tx.as_ref().ok_or(Closed)
    }

    /// Hand a chunk over: number its writes and record its positions in order, and queue its
    /// writes and index operations for the batcher. Waits while the memory budget or the queue
    /// is full: this is the back-pressure that stops the pipeline when the sink is slow.
    ///
    /// # Cancel safety
    /// Dropping the future drops the writes not yet queued unacknowledged: the checkpoint then
    /// stays before them, so they are read again on the next start.
    ///
    /// # Errors
    /// [`Closed`] when the sink has stopped.
    pub async fn send_chunk(&self, chunk: Chunk) -> Result<(), Closed> {
        let Chunk { mut writes, marks } = chunk;
        let mut positions = Vec::new();
        // Writes before this index of the chunk are queued.
        let mut queued = 0;
        for (at, mark) in marks {
            match mark {
                Mark::Position(p) => positions.push((at - queued, p)),
                Mark::Control(c) => {
                    let rest = writes.split_off(at - queued);
                    let before = std::mem::replace(&mut writes, rest);
                    self.queue_writes(before, std::mem::take(&mut positions)).await?;
                    queued = at;
                    self.queue_control(c).await?;
                }
            }
        }
        self.queue_writes(writes, positions).await
    }

    async fn queue_writes(&self, mut writes: Vec<Write>, positions: Vec<(usize, Position)>) -> Result<(), Closed> {
        self.number(&mut writes, positions);
        if writes.is_empty() {
            return Ok(());
        }
        let kibs: Vec<u32> = writes
            .iter()
            .map(|w| (encoded_len(w) / 1024 + 1).min(self.budget_total as usize) as u32)
            .collect();
        let total: u32 = kibs.iter().sum::<u32>().min(self.budget_total);
        let mut permit = self
            .budget
            .clone()
            .acquire_many_owned(total)
            .await
            .map_err(|_| Closed)?;
        // Each write carries its own share, released when it is acknowledged and dropped.
        for (w, kib) in writes.iter_mut().zip(kibs) {
            w.permit = permit.split(kib as usize);
        }
        let in_flight = self.shared.tracker().in_flight();
        self.shared.metrics.in_flight.set(in_flight as i64);
        self.sender()?
            .send(Msg::Writes(writes))
            .await
            .map_err(|_| Closed)
    }

    /// Queue an index operation. Those that must finish before the checkpoint passes them
    /// take a place in its order.
    async fn queue_control(&self, control: Control) -> Result<(), Closed> {
        let seq = (!matches!(control, Control::Flush)).then(|| self.shared.tracker().register());
        self.sender()?.send(Msg::Control(control, seq)).await.map_err(|_| Closed)
    }

    /// Number the writes and record the positions among them, in their order.
    fn number(&self, writes: &mut [Write], positions: Vec<(usize, Position)>) {
        let mut tracker = self.shared.tracker();
        let mut positions = positions.into_iter().peekable();
        for (i, w) in writes.iter_mut().enumerate() {
            while let Some((_, p)) = positions.next_if(|(at, _)| *at <= i) {
                tracker.record(p);
            }
            w.seq = tracker.register();
            w.key = w.document_key();
        }
        for (_, p) in positions {
            tracker.record(p);
        }
    }

    /// Stop accepting writes, let the batcher deliver what it holds, and wait for it.
    pub async fn close(mut self) {
        self.tx = None;
        while let Some(res) = self.tasks.join_next().await {
            if let Err(e) = res {
                error!(error = %e, "sink batcher panicked");
            }
        }
    }
}

/// The pure part of batching: pending writes in arrival order, and the documents in bulk
/// requests in flight.
///
/// A batch is taken from the front of the queue within the count and byte limits and keeps
/// only the last write of each document; a write whose document is in a bulk request still
/// in flight goes back to the front of the queue (ahead of that document's later writes), so
/// a document never has two writes in flight and its writes reach Elasticsearch in order.
pub struct Batcher {
    limits: BatchConfig,
    pending: VecDeque<Write>,
    pending_bytes: usize,
    /// Keys of documents in flight (hash of index and `_id`) and how many in-flight writes
    /// share each. A hash collision only holds a write back until the other one is done.
    in_flight: HashMap<u64, u32, BuildHasherDefault<Fnv>>,
    snapshot_only: bool,
}

/// A batch taken by [`Batcher::take`].
pub struct Taken {
    /// Writes to send, one per document.
    pub send: Vec<Write>,
    /// Writes superseded by a later write of their document in the same batch: done.
    pub superseded: Vec<Seq>,
    /// Writes held back because their document is in flight.
    pub deferred: usize,
}

impl Batcher {
    /// An empty batcher.
    pub fn new(limits: BatchConfig) -> Self {
        Self {
            limits,
            pending: VecDeque::new(),
            pending_bytes: 0,
            in_flight: HashMap::default(),
            snapshot_only: true,
        }
    }

    /// Queue writes (in order).
    pub fn push(&mut self, writes: Vec<Write>) {
        if self.pending.is_empty() {
            self.snapshot_only = true;
        }
        for w in writes {
            self.snapshot_only &= w.from_snapshot;
            self.pending_bytes += encoded_len(&w);
            self.pending.push_back(w);
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the queue holds at least a full batch.
    pub fn is_full(&self) -> bool {
        self.pending.len() >= self.limits.max_docs || self.pending_bytes >= self.limits.max_bytes
    }

    /// Whether everything queued was read by a snapshot.
    pub fn snapshot_only(&self) -> bool {
        !self.pending.is_empty() && self.snapshot_only
    }

    /// Take the next batch (see the type's documentation) and mark its documents in flight.
    pub fn take(&mut self) -> Taken {
        let mut batch = Vec::with_capacity(self.limits.max_docs.min(self.pending.len()));
        let mut bytes = 0;
        fill(&mut batch, &mut bytes, &mut self.pending, &self.limits);
        self.pending_bytes -= bytes;
        let (writes, superseded) = coalesce(batch);
        let mut send = writes;
        let mut deferred = Vec::new();
        if !self.in_flight.is_empty() && send.iter().any(|w| self.in_flight.contains_key(&w.key)) {
            let (held, free): (Vec<Write>, Vec<Write>) =
                send.into_iter().partition(|w| self.in_flight.contains_key(&w.key));
            send = free;
            deferred = held;
        }
        let n_deferred = deferred.len();
        for w in deferred.into_iter().rev() {
            self.pending_bytes += encoded_len(&w);
            self.pending.push_front(w);
        }
        if !self.pending.is_empty() {
            self.snapshot_only = self.pending.iter().all(|w| w.from_snapshot);
        }
        for w in &send {
            *self.in_flight.entry(w.key).or_default() += 1;
        }
        Taken {
            send,
            superseded,
            deferred: n_deferred,
        }
    }

    /// The writes with these keys are acknowledged: their documents are free again.
    pub fn done(&mut self, keys: &[u64]) {
        for k in keys {
            if let std::collections::hash_map::Entry::Occupied(mut e) = self.in_flight.entry(*k) {
                *e.get_mut() -= 1;
                if *e.get() == 0 {
                    e.remove();
                }
            }
        }
    }
}

/// What a finished delivery hands back to the batcher.
struct Delivered {
    seqs: Vec<Seq>,
    keys: Vec<u64>,
    newest: u64,
    partial: bool,
    /// False when a forced shutdown cut the delivery short.
    complete: bool,
}

/// The batcher loop's state.
struct Loop {
    /// Bulk requests in flight at most.
    slots: usize,
    batcher: Batcher,
    tasks: JoinSet<Delivered>,
    /// The queue closed: deliver what is left, then stop.
    closed: bool,
    /// Send partial batches now.
    flush: bool,
    /// An index operation waiting for the writes before it to be done.
    waiting: Option<(Control, Option<Seq>)>,
    /// Every queued write is in flight or held back for one: wait for a delivery.
    blocked: bool,
    /// Partial batches in flight.
    partials: usize,
    /// When the last batch was taken (or the queue last went from empty to not).
    since: tokio::time::Instant,
}

impl Loop {
    fn receive(&mut self, msg: Option<Msg>) {
        match msg {
            Some(Msg::Writes(ws)) => {
                if self.batcher.is_empty() {
                    self.since = tokio::time::Instant::now();
                }
                self.batcher.push(ws);
                self.blocked = false;
            }
            Some(Msg::Control(Control::Flush, _)) => self.flush = true,
            Some(Msg::Control(control, seq)) => self.waiting = Some((control, seq)),
            None => self.closed = true,
        }
    }
}

/// Sends bulk requests: the batcher loop and the delivery of one batch.
struct Deliverer {
    es: Elastic,
    settings: SinkSettings,
    shared: Arc<Shared>,
    abort: CancellationToken,
}

impl Deliverer {
    /// The batcher: gather writes, send a full batch whenever a request slot is free, and a
    /// partial one after the flush interval. Partial batches go one at a time: while one is in
    /// flight the next keeps filling, so under load the batch size follows Elasticsearch's
    /// latency (fewer, fuller requests) and at a low rate a change waits one interval.
    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<Msg>) {
        let limits = self.settings.batch.clone();
        let mut l = Loop {
            slots: limits.concurrency.max(1),
            batcher: Batcher::new(limits),
            tasks: JoinSet::new(),
            closed: false,
            flush: false,
            waiting: None,
            blocked: false,
            partials: 0,
            since: tokio::time::Instant::now(),
        };
        // The pipeline starts only once Elasticsearch answered; deliveries report from here on.
        self.shared.health.sink_beat(true);
        loop {
            // Deliveries in flight beat for themselves, on every response and every retry
            // (requests time out, so none is silent for long); a beat here would hide a sink
            // that makes no progress at all.
            if l.tasks.is_empty() {
                self.shared.health.sink_alive();
            }
            if self.abort.is_cancelled() {
                // Forced stop (grace period over, or the worker's lease is lost): abandon the
                // requests in flight (dropping the set aborts them) and send nothing more. What
                // they held stays unacknowledged and is replayed on the next start.
                return;
            }
            if l.batcher.is_empty() && l.tasks.is_empty() {
                if let Some((control, seq)) = l.waiting.take() {
                    if self.apply(control).await.is_err() {
                        return;
                    }
                    if let Some(seq) = seq {
                        self.shared.ack(&[seq]);
                    }
                    continue;
                }
            }
            let now = tokio::time::Instant::now();
            let due = l.since + self.flush_wait(&l.batcher);
            self.dispatch(&mut l, now, due);
            if l.tasks.is_empty() && l.closed && l.batcher.is_empty() {
                return;
            }
            let receive = !l.closed && l.waiting.is_none() && !(l.batcher.is_full() && (l.tasks.len() >= l.slots || l.blocked));
            let timer = !l.batcher.is_empty() && now < due;
            tokio::select! {
                biased;
                res = l.tasks.join_next(), if !l.tasks.is_empty() => match res {
                    Some(Ok(d)) => self.delivered(&mut l, d),
                    Some(Err(e)) => {
                        // A bug, not an outage: stop the sink rather than hold this batch's
                        // documents back forever. The next hand-over fails (and with no
                        // hand-over the sink's heartbeat stops, failing `/healthz`), so the
                        // pipeline stops and a restart resumes from its checkpoint.
                        error!(error = %e, "bulk delivery task failed; stopping the sink");
                        return;
                    }
                    None => {}
                },
                msg = rx.recv(), if receive => l.receive(msg),
                () = tokio::time::sleep_until(due), if timer => {}
                () = self.abort.cancelled() => {}
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// How long a partial batch may wait to fill.
    fn flush_wait(&self, batcher: &Batcher) -> Duration {
        let interval = self.settings.batch.flush_interval;
        if batcher.snapshot_only() {
            interval * SNAPSHOT_FLUSH_FACTOR
        } else {
            interval
        }
    }

    /// Start deliveries while request slots are free: full batches at once, a partial one when
    /// due (one at a time), flushed, or when an index operation waits for everything before it.
    fn dispatch(self: &Arc<Self>, l: &mut Loop, now: tokio::time::Instant, due: tokio::time::Instant) {
        while !l.blocked && !l.batcher.is_empty() && l.tasks.len() < l.slots {
            let full = l.batcher.is_full();
            if !(full || l.flush || l.closed || l.waiting.is_some() || (now >= due && l.partials == 0)) {
                break;
            }
            let taken = l.batcher.take();
            if taken.deferred > 0 {
                self.shared.metrics.held_writes.inc_by(taken.deferred as u64);
            }
            if !taken.superseded.is_empty() {
                // Safe before the superseding write is acknowledged: a checkpoint between
                // them replays that later write, which carries the newer state.
                self.shared.ack(&taken.superseded);
            }
            if taken.send.is_empty() {
                l.blocked = true;
                break;
            }
            l.since = now;
            let partial = !full;
            l.partials += usize::from(partial);
            let this = self.clone();
            // In the batcher's span: delivery logs carry the pipeline.
            l.tasks.spawn(async move { this.deliver_batch(taken.send, partial).await }.in_current_span());
        }
        if l.batcher.is_empty() {
            l.flush = false;
        }
    }

    /// A delivery finished: its documents are free again, and its writes acknowledged unless a
    /// forced stop cut it short (the loop's next turn carries that stop out).
    fn delivered(&self, l: &mut Loop, d: Delivered) {
        l.batcher.done(&d.keys);
        l.blocked = false;
        l.partials -= usize::from(d.partial);
        if d.complete {
            self.shared.ack(&d.seqs);
            if d.newest > 0 {
                let lag = crate::time::unix_seconds() - crate::checkpoint::ClusterTime::from_version(d.newest).t as i64;
                self.shared.metrics.lag_seconds.set(lag.max(0));
            }
        }
    }

    /// Carry out an index operation (every write before it is done), retrying until it is done.
    ///
    /// # Errors
    /// [`crate::retry::Cancelled`] when the sink is stopped first: not done, so never
    /// acknowledged, and the change that asked for it is read again on the next start.
    async fn apply(&self, control: Control) -> Result<(), crate::retry::Cancelled> {
        match control {
            Control::Drop { ns, indexes, by_records, time } => {
                for index in &indexes {
                    self.drop_index(&ns, index, time).await?;
                }
                if by_records {
                    self.drop_located(&ns, time).await?;
                }
            }
            Control::Sweep { indexes, located, below } => self.sweep(&indexes, located, below).await?,
            Control::Barrier(reply) => {
                // The asker may have stopped waiting (shutdown): nothing to tell then.
                let _ = reply.send(());
            }
            Control::Flush => {}
        }
        Ok(())
    }

    /// Delete `index` of dropped namespace `ns`, or, sharded, this shard's documents of it
    /// older than the drop.
    async fn drop_index(&self, ns: &str, index: &str, time: Option<mongodb::bson::Timestamp>) -> Result<(), crate::retry::Cancelled> {
        let shard = self.settings.shard;
        if shard.is_split() {
            // Other shards may still be writing this index's older changes, or already its
            // newer ones: deleting the index would race them. Each shard instead deletes its
            // own documents older than the drop, with versioned deletes that lose against
            // anything written after it.
            let Some(time) = time else {
                warn!(namespace = %ns, "drop event without a cluster time; index kept");
                return Ok(());
            };
            let below = crate::checkpoint::ClusterTime::from(time).version().saturating_add(1);
            let deleted = crate::retry::until_ok(&self.abort, || self.es.sweep(index, below, |id| shard.owns(id)), |e| {
                warn!(index = %index, error = %crate::error_chain(e), "failed to delete documents of dropped collection; retrying");
                self.shared.health.sink_beat(false);
            })
            .await?;
            tracing::info!(namespace = %ns, index = %index, shard = %shard, deleted, "collection dropped; this shard's documents deleted (index kept: the pipeline is sharded)");
            return Ok(());
        }
        crate::retry::until_ok(&self.abort, || self.es.delete_index(index), |e| {
            warn!(index = %index, error = %crate::error_chain(e), "failed to delete index of dropped collection; retrying");
            self.shared.health.sink_beat(false);
        })
        .await?;
        tracing::info!(namespace = %ns, index = %index, "collection dropped; index deleted");
        self.shared.metrics.indexes_dropped.inc();
        Ok(())
    }

    /// Delete the documents of dropped namespace `ns` (older than the drop, this shard's)
    /// wherever their location records say they are: a namespace writing a shared index, or
    /// whose documents chose more indexes than `written` lists.
    async fn drop_located(&self, ns: &str, time: Option<mongodb::bson::Timestamp>) -> Result<(), crate::retry::Cancelled> {
        let (Some(records), Some(time)) = (&self.settings.locations, time) else {
            warn!(namespace = %ns, "drop of a namespace writing shared or unlisted indexes, without location records or cluster time; its documents there are kept");
            return Ok(());
        };
        let below = crate::checkpoint::ClusterTime::from(time).version().saturating_add(1);
        let shard = self.settings.shard;
        let owns = |mongo_id: &str| shard.owns(mongo_id);
        let scope = locations::Scope { ns: Some(ns), sharded: shard.is_split(), owns: &owns };
        let n = crate::retry::until_ok(&self.abort, || self.es.sweep_located(records, &self.settings.pipeline, below, &scope), |e| {
            warn!(namespace = %ns, error = %crate::error_chain(e), "failed to delete the documents of a dropped collection from their recorded places; retrying");
            self.shared.health.sink_beat(false);
        })
        .await?;
        tracing::info!(namespace = %ns, deleted = n, "collection dropped; its documents in shared or unlisted indexes deleted through their location records");
        Ok(())
    }

    /// The re-snapshot sweep: from each of `indexes`, and through the location records when
    /// `located`, delete this shard's documents versioned below `below`. Retried whole until it
    /// succeeds (versioned deletes: a retry deletes nothing written since).
    async fn sweep(&self, indexes: &[String], located: bool, below: u64) -> Result<(), crate::retry::Cancelled> {
        let shard = self.settings.shard;
        for index in indexes {
            let n = crate::retry::until_ok(&self.abort, || self.es.sweep(index, below, |id| shard.owns(id)), |e| {
                warn!(index = %index, error = %crate::error_chain(e), "sweep failed; retrying");
                self.shared.health.sink_beat(false);
            })
            .await?;
            tracing::info!(index = %index, deleted = n, "swept documents deleted during the lost history");
        }
        if let (true, Some(records)) = (located, &self.settings.locations) {
            let owns = |mongo_id: &str| shard.owns(mongo_id);
            let scope = locations::Scope { ns: None, sharded: shard.is_split(), owns: &owns };
            let n = crate::retry::until_ok(&self.abort, || self.es.sweep_located(records, &self.settings.pipeline, below, &scope), |e| {
                warn!(error = %crate::error_chain(e), "sweep of located documents failed; retrying");
                self.shared.health.sink_beat(false);
            })
            .await?;
            tracing::info!(deleted = n, "swept documents deleted during the lost history (by their location records)");
        }
        Ok(())
    }

    /// Deliver one batch and report what to acknowledge.
    async fn deliver_batch(&self, writes: Vec<Write>, partial: bool) -> Delivered {
        let seqs: Vec<Seq> = writes.iter().map(|w| w.seq).collect();
        let keys: Vec<u64> = writes.iter().map(|w| w.key).collect();
        let newest = writes.iter().map(|w| w.version).max().unwrap_or(0);
        let complete = self.deliver(writes).await.is_ok();
        Delivered {
            seqs,
            keys,
            newest,
            partial,
            complete,
        }
    }

    /// Deliver `writes` until each has a final outcome: writes the transform could not make
    /// go to the dead-letter index; tracked writes are first aimed with their location
    /// records ([`locations`]): new places are recorded before the documents land there, and
    /// the final records follow once the documents' writes are final.
    async fn deliver(&self, writes: Vec<Write>) -> Result<(), crate::retry::Cancelled> {
        let Sorted { refused, patched, sendable } = Sorted::of(writes);
        let mut rejected: Vec<(Write, Refusal)> = Vec::new();
        if !patched.is_empty() {
            self.deliver_patches(patched, &mut rejected).await?;
        }
        for w in refused {
            if let Op::Reject(r) = &w.op {
                let (error_type, reason) = (&r.error_type, &r.reason);
                let why = Refusal { status: 0, error_type: error_type.to_string(), reason: reason.clone() };
                rejected.push((w, why));
            }
        }
        let (intents, sendable, records) = match &self.settings.locations {
            Some(index) if sendable.iter().any(|w| w.origin.is_some()) => {
                let plan = self.locate(sendable, index).await?;
                self.shared.metrics.hot.stale.inc_by(plan.stale);
                (plan.intents, plan.writes, plan.records)
            }
            _ => (Vec::new(), sendable, Vec::new()),
        };
        let before = rejected.len();
        self.send_until_final(intents, &mut rejected).await?;
        let sendable = without_refused_intents(sendable, &mut rejected, before);
        let before = rejected.len();
        self.send_until_final(sendable, &mut rejected).await?;
        // A document none of whose writes was refused gets its final record; otherwise its
        // record keeps naming every place a copy may still be, for its next write to clean.
        let records = final_records(records, &rejected[before..]);
        self.send_until_final(records, &mut rejected).await?;
        if !rejected.is_empty() {
            self.dead_letter(rejected).await?;
        }
        Ok(())
    }

    /// Read the location records of the batch's tracked writes (one multi-get, retried until
    /// it answers) and plan the batch with them.
    async fn locate(&self, writes: Vec<Write>, index: &Arc<str>) -> Result<locations::Plan, crate::retry::Cancelled> {
        let ids: Vec<&str> = writes.iter().filter_map(|w| w.origin.as_deref()).collect();
        let found = crate::retry::until_ok(&self.abort, || self.es.location_records(index, &ids), |e| {
            warn!(error = %crate::error_chain(e), records = ids.len(), "reading location records failed; retrying");
            self.shared.health.sink_beat(false);
        })
        .await?;
        Ok(locations::plan(writes, &found, index))
    }

    /// Send `writes` in bulk requests until each is done or refused (refusals are added to
    /// `rejected`): retriable failures are retried (the engine's one retry loop), oversize
    /// requests split.
    async fn send_until_final(&self, writes: Vec<Write>, rejected: &mut Vec<(Write, Refusal)>) -> Result<(), crate::retry::Cancelled> {
        let mut queue: VecDeque<Vec<Write>> = VecDeque::from([writes]);
        while let Some(chunk) = queue.pop_front() {
            let mut at = (chunk, &mut *rejected, &mut queue);
            self.until_done(&mut at, |(chunk, rejected, queue)| Box::pin(self.send_once(chunk, rejected, queue))).await?;
        }
        Ok(())
    }

    /// The sink's retries: run `op` on `state` until it succeeds, backing off after each
    /// failure (which marks the sink unhealthy until a success), until the sink is stopped.
    async fn until_done<S>(&self, state: &mut S, op: impl for<'s> FnMut(&'s mut S) -> futures_util::future::BoxFuture<'s, Result<(), ()>>) -> Result<(), crate::retry::Cancelled> {
        let pace = crate::retry::Pace::until_cancelled(&self.abort);
        crate::retry::retry_with(pace, state, op, |()| {
            self.shared.health.sink_beat(false);
            true
        })
        .await
        .map_err(|_| crate::retry::Cancelled)
    }

    /// One bulk request of `chunk`. `Err`: what is left in `chunk` is to be sent again after a
    /// back-off (the request failed, or some items failed retriably); done and refused items
    /// leave it. A request refused whole is split into two put first in `queue`.
    async fn send_once(&self, chunk: &mut Vec<Write>, rejected: &mut Vec<(Write, Refusal)>, queue: &mut VecDeque<Vec<Write>>) -> Result<(), ()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let m = &self.shared.metrics;
        let size: usize = chunk.iter().map(encoded_len).sum();
        let is_delete: Vec<bool> = chunk.iter().map(|w| matches!(w.op, Op::Delete)).collect();
        let started = Instant::now();
        let answer = self.es.bulk_answer(body_for(&*chunk, size), &is_delete).await;
        m.bulk_seconds.observe(started.elapsed().as_secs_f64());
        let (again, reason) = match answer {
            Answer::Items(outcomes) => self.sort_items(std::mem::take(chunk), outcomes, rejected),
            Answer::Again(why) => {
                warn!(reason = %why, items = chunk.len(), "bulk request failed; retrying");
                m.bulk_requests.with_label_values(&["retry"]).inc();
                m.retried_items.inc_by(chunk.len() as u64);
                return Err(());
            }
            Answer::Refused { status, reason } => {
                m.bulk_requests.with_label_values(&["split"]).inc();
                let left = std::mem::take(chunk);
                if left.len() == 1 {
                    rejected.extend(left.into_iter().map(|w| (w, Refusal { status, error_type: format!("http_{status}"), reason: reason.clone() })));
                } else {
                    halve(left, queue);
                }
                return Ok(());
            }
        };
        if again.is_empty() {
            m.bulk_requests.with_label_values(&["ok"]).inc();
            self.shared.health.sink_beat(true);
            return Ok(());
        }
        warn!(items = again.len(), reason = %reason, "bulk items failed retriably; retrying them");
        m.bulk_requests.with_label_values(&["partial"]).inc();
        m.retried_items.inc_by(again.len() as u64);
        *chunk = again;
        Err(())
    }

    /// Sort a bulk response's items: those done are counted, those refused added to `rejected`.
    /// Returns those to retry, and why the last of them failed.
    fn sort_items(&self, chunk: Vec<Write>, outcomes: Vec<ItemOutcome>, rejected: &mut Vec<(Write, Refusal)>) -> (Vec<Write>, String) {
        let m = &self.shared.metrics;
        let mut retry = Vec::new();
        let mut retry_reason = String::new();
        // [indexed, deleted, stale, already gone], added to the metrics once.
        let mut counts = [0u64; 4];
        // The done writes' shares of the memory budget, given back at once (one lock, not one
        // per write).
        let mut released: Option<OwnedSemaphorePermit> = None;
        for (mut w, outcome) in chunk.into_iter().zip(outcomes) {
            if matches!(outcome, ItemOutcome::Done | ItemOutcome::Stale | ItemOutcome::AlreadyGone) {
                match (&mut released, w.permit.take()) {
                    (Some(all), Some(p)) => all.merge(p),
                    (all @ None, p) => *all = p,
                    (Some(_), None) => {}
                }
            }
            match outcome {
                // Writes on another's behalf count as that one's.
                ItemOutcome::Done | ItemOutcome::Stale | ItemOutcome::AlreadyGone if w.aux => {}
                ItemOutcome::Done => counts[usize::from(matches!(w.op, Op::Delete))] += 1,
                ItemOutcome::Stale => counts[2] += 1,
                ItemOutcome::AlreadyGone => counts[3] += 1,
                ItemOutcome::Retry { reason, .. } => {
                    retry_reason = reason;
                    retry.push(w);
                }
                ItemOutcome::Reject { status, error_type, reason } => rejected.push((w, Refusal { status, error_type, reason })),
            }
        }
        m.hot.indexed.inc_by(counts[0]);
        m.hot.deleted.inc_by(counts[1]);
        m.hot.stale.inc_by(counts[2]);
        m.hot.already_gone.inc_by(counts[3]);
        self.shared.note_outcomes(counts[0] + counts[1] + counts[3], counts[2]);
        (retry, retry_reason)
    }

    /// Record refused documents in the dead-letter index (see [`dead_letter`] for what a record
    /// holds and when one is given up on).
    async fn dead_letter(&self, rejected: Vec<(Write, Refusal)>) -> Result<(), crate::retry::Cancelled> {
        let m = &self.shared.metrics;
        for (w, why) in &rejected {
            error!(namespace = %w.ns, index = %w.index, id = %w.id_json, status = why.status, error_type = %why.error_type, reason = %dead_letter::truncated(&why.reason, 300), "document refused; dead-lettered");
            m.dead_letters.with_label_values(&[why.error_type.as_str()]).inc();
        }
        let records = Letters { rejected: &rejected, now: crate::time::now_rfc3339(), settings: &self.settings };
        let mut queue = records.requests(self.settings.batch.max_bytes);
        while let Some(group) = queue.pop_front() {
            let mut at = (group, &mut queue);
            self.until_done(&mut at, |(group, queue)| Box::pin(self.send_letters_once(&records, group, queue))).await?;
        }
        self.shared.health.sink_beat(true);
        Ok(())
    }

    /// One bulk request of dead-letter records. `Err`: what is left in `group` is to be sent
    /// again after a back-off; a request refused whole is split into two put first in `queue`,
    /// and a record refused for good goes back to `queue` without its document, or is given up.
    async fn send_letters_once(&self, records: &Letters<'_>, group: &mut Vec<Letter>, queue: &mut VecDeque<Vec<Letter>>) -> Result<(), ()> {
        if group.is_empty() {
            return Ok(());
        }
        let body: Vec<u8> = group.iter().flat_map(|(_, _, l)| l.iter().copied()).collect();
        let outcomes = match self.es.bulk_answer(body, &vec![false; group.len()]).await {
            Answer::Items(outcomes) => outcomes,
            Answer::Again(why) => {
                warn!(reason = %why, records = group.len(), "dead-letter request failed; retrying");
                return Err(());
            }
            Answer::Refused { .. } if group.len() > 1 => {
                halve(std::mem::take(group), queue);
                return Ok(());
            }
            Answer::Refused { status, reason } => {
                let reason = format!("status {status}: {}", dead_letter::truncated(&reason, 300));
                for (i, embed, _) in std::mem::take(group) {
                    records.refused(queue, i, embed, &reason, &self.shared.metrics);
                }
                return Ok(());
            }
        };
        let mut retry = Vec::new();
        for ((i, embed, l), outcome) in std::mem::take(group).into_iter().zip(outcomes) {
            match outcome {
                ItemOutcome::Retry { .. } => retry.push((i, embed, l)),
                ItemOutcome::Reject { reason, .. } => records.refused(queue, i, embed, &reason, &self.shared.metrics),
                ItemOutcome::Done | ItemOutcome::Stale | ItemOutcome::AlreadyGone => self.shared.metrics.hot.dead_lettered.inc(),
            }
        }
        if retry.is_empty() {
            return Ok(());
        }
        warn!(records = retry.len(), "dead-letter records failed retriably; retrying");
        *group = retry;
        Err(())
    }
}

/// Split a request refused whole into two, put first in `queue` in their order.
fn halve<T>(mut items: Vec<T>, queue: &mut VecDeque<Vec<T>>) {
    let right = items.split_off(items.len() / 2);
    queue.push_front(right);
    queue.push_front(items);
}

/// A dead-letter record: which refused write, with or without its document, and its bulk lines.
type Letter = (usize, Embed, Vec<u8>);

/// The dead-letter records of one batch's refused writes.
struct Letters<'a> {
    rejected: &'a [(Write, Refusal)],
    now: String,
    settings: &'a SinkSettings,
}

impl Letters<'_> {
    fn line(&self, i: usize, embed: Embed) -> Vec<u8> {
        let (w, why) = &self.rejected[i];
        dead_letter::record_lines(&self.settings.dead_letter_index, &self.settings.pipeline, w, why, &self.now, embed)
    }

    /// Requests of every record (with its document), each within `max_bytes`.
    fn requests(&self, max_bytes: usize) -> VecDeque<Vec<Letter>> {
        let mut queue = VecDeque::new();
        let mut group = Vec::new();
        let mut bytes = 0;
        for i in 0..self.rejected.len() {
            let l = self.line(i, Embed::Prefix);
            if !group.is_empty() && bytes + l.len() > max_bytes {
                queue.push_back(std::mem::take(&mut group));
                bytes = 0;
            }
            bytes += l.len();
            group.push((i, Embed::Prefix, l));
        }
        queue.push_back(group);
        queue
    }

    /// A record refused for good: sent again without its document, or given up on.
    fn refused(&self, queue: &mut VecDeque<Vec<Letter>>, i: usize, embed: Embed, reason: &str, m: &Metrics) {
        let (w, _) = &self.rejected[i];
        if embed == Embed::Prefix {
            warn!(namespace = %w.ns, id = %w.id_json, reason = %dead_letter::truncated(reason, 300), "dead-letter record refused; sending it again without the document");
            queue.push_back(vec![(i, Embed::Nothing, self.line(i, Embed::Nothing))]);
        } else {
            error!(namespace = %w.ns, index = %w.index, id = %w.id_json, reason = %dead_letter::truncated(reason, 300), "dead-letter index refused the record; the document is only in this log");
            m.dead_letter_failures.inc();
        }
    }
}

/// A batch's writes by how they are carried out.
struct Sorted {
    /// Refused before they were sent (dead-lettered).
    refused: Vec<Write>,
    /// Read-modify-writes of patch histories.
    patched: Vec<Write>,
    /// Sent in bulk requests.
    sendable: Vec<Write>,
}

impl Sorted {
    /// Sorted in their order. A batch of bulk writes only, the common case, is not moved.
    fn of(writes: Vec<Write>) -> Self {
        let special = |w: &Write| matches!(w.op, Op::Reject(_) | Op::Patch(_));
        if !writes.iter().any(special) {
            return Self { refused: Vec::new(), patched: Vec::new(), sendable: writes };
        }
        let mut sorted = Self { refused: Vec::new(), patched: Vec::new(), sendable: Vec::with_capacity(writes.len()) };
        for w in writes {
            match w.op {
                Op::Reject(_) => sorted.refused.push(w),
                Op::Patch(_) => sorted.patched.push(w),
                _ => sorted.sendable.push(w),
            }
        }
        sorted
    }
}

/// The writes whose location intent (refused entries from `from` on in `rejected`) was
/// refused for good are not sent: a copy must never land where no record names it. Each such
/// document's own write is dead-lettered instead, saying why; the copies its write would have
/// deleted stay recorded where they are.
fn without_refused_intents(writes: Vec<Write>, rejected: &mut Vec<(Write, Refusal)>, from: usize) -> Vec<Write> {
    // The refused records themselves are not dead-lettered: their documents are, below.
    let refused: Vec<(Seq, String)> = rejected.drain(from..).map(|(w, why)| (w.seq, why.reason)).collect();
    if refused.is_empty() {
        return writes;
    }
    let mut keep = Vec::with_capacity(writes.len());
    for w in writes {
        match refused.iter().find(|(seq, _)| *seq == w.seq) {
            None => keep.push(w),
            Some(_) if w.aux => {}
            Some((_, reason)) => {
                let why = Refusal { status: 0, error_type: "location_record_refused".into(), reason: format!("the location record of this document was refused, so its write was not sent: {reason}") };
                rejected.push((w, why));
            }
        }
    }
    keep
}

/// The final location records of the documents none of whose writes was refused (`refused`):
/// a refused delete of an old copy keeps that place in the record, so the document's next write
/// deletes it; a refused write keeps the record naming where a copy may still be.
fn final_records(records: Vec<Write>, refused: &[(Write, Refusal)]) -> Vec<Write> {
    if refused.is_empty() {
        return records;
    }
    records.into_iter().filter(|r| !refused.iter().any(|(w, _)| w.seq == r.seq)).collect()
}

/// Move writes from `pending` into `batch` (in order) while the batch stays within
/// `max_docs` and `max_bytes`; a single write over `max_bytes` still goes, alone. Returns
/// whether the batch is full (the next write would break a limit).
pub fn fill(batch: &mut Vec<Write>, bytes: &mut usize, pending: &mut VecDeque<Write>, limits: &BatchConfig) -> bool {
    while batch.len() < limits.max_docs {
        let Some(next) = pending.front() else {
            return false;
        };
        let len = encoded_len(next);
        if !batch.is_empty() && *bytes + len > limits.max_bytes {
            return true;
        }
        *bytes += len;
        if let Some(w) = pending.pop_front() {
            batch.push(w);
        }
    }
    true
}

/// Keep only the last write of each document in a batch (the later write carries the newer
/// state). Returns the writes to send, in arrival order of their last occurrence, and the
/// sequence numbers of the superseded writes.
///
/// A [`Op::Reject`] takes no part: it writes nothing to its document, so it must not make an
/// earlier write of it vanish, and its own dead-letter record is never dropped (unreadable
/// changes without a readable `_id` all share one key).
pub fn coalesce(batch: Vec<Write>) -> (Vec<Write>, Vec<Seq>) {
    if batch.iter().all(|w| w.from_snapshot) {
        return (batch, Vec::new());
    }
    // Patches take no part either: each is a version of its document, applied in order.
    let is_reject = |w: &Write| matches!(w.op, Op::Reject(_) | Op::Patch(_));
    // Borrowed keys: no allocation per document on this per-batch path.
    let is_last: Vec<bool> = {
        let mut last: HashMap<(&str, &str), usize, BuildHasherDefault<Fnv>> =
            HashMap::with_capacity_and_hasher(batch.len(), BuildHasherDefault::default());
        let mut rejects = 0;
        for (i, w) in batch.iter().enumerate() {
            if is_reject(w) {
                rejects += 1;
            } else {
                last.insert(w.identity(), i);
            }
        }
        if last.len() + rejects == batch.len() {
            return (batch, Vec::new());
        }
        let mut is_last: Vec<bool> = batch.iter().map(is_reject).collect();
        for i in last.into_values() {
            is_last[i] = true;
        }
        is_last
    };
    let mut keep = Vec::with_capacity(batch.len());
    let mut superseded = Vec::new();
    for (w, last) in batch.into_iter().zip(is_last) {
        if last {
            keep.push(w);
        } else {
            superseded.push(w.seq);
        }
    }
    (keep, superseded)
}

/// A sink whose Elasticsearch is never reached and which never flushes on its own (tests
/// acknowledge by hand).
#[cfg(test)]
pub(crate) fn idle(shared: Arc<Shared>) -> Sink {
    let config = crate::config::ElasticConfig {
        urls: vec!["http://127.0.0.1:9".into()],
        auth: crate::config::ElasticAuth::None,
        ca_pem: None,
        client_identity: None,
        gzip: false,
        request_timeout: Duration::from_secs(1),
    };
    let es = Elastic::new(&config).expect("client");
    let settings = SinkSettings {
        batch: BatchConfig { flush_interval: Duration::from_secs(3600), ..BatchConfig::default() },
        dead_letter_index: Arc::from("dl"),
        pipeline: Arc::from("p"),
        locations: None,
        shard: crate::config::Shard::default(),
    };
    Sink::start(es, settings, shared, CancellationToken::new())
}

impl Shared {
    /// Acknowledge writes by hand (tests).
    #[cfg(test)]
    pub(crate) fn ack_for_test(&self, seqs: &[Seq]) {
        self.ack(seqs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: Seq, id: &str, version: u64, op: Op) -> Write {
        let mut w = Write::new(
            Arc::from("db.c"),
            Arc::from("db.c"),
            format!("\"{id}\"").into(),
            version,
            op,
        );
        w.seq = seq;
        w
    }

    #[test]
    fn coalescing_keeps_the_last_write_per_document() {
        let batch = vec![
            w(0, "a", 1, Op::Index(Bytes::from_static(b"{\"v\":1}"))),
            w(1, "b", 1, Op::Index(Bytes::from_static(b"{}"))),
            w(2, "a", 2, Op::Delete),
            w(3, "a", 3, Op::Index(Bytes::from_static(b"{\"v\":3}"))),
        ];
        let (keep, superseded) = coalesce(batch);
        let kept: Vec<(Seq, u64)> = keep.iter().map(|w| (w.seq, w.version)).collect();
        assert_eq!(kept, vec![(1, 1), (3, 3)]);
        assert_eq!(superseded, vec![0, 2]);
    }

    #[test]
    fn a_rejected_change_neither_supersedes_nor_is_superseded() {
        let reject = |seq| w(seq, "a", 1, Op::reject("malformed_event", String::new(), None));
        let seqs = |(keep, superseded): (Vec<Write>, Vec<Seq>)| (keep.iter().map(|w| w.seq).collect::<Vec<_>>(), superseded);
        // The earlier real write of the document still goes; the refused one is dead-lettered.
        let batch = vec![w(0, "a", 1, Op::Index(Bytes::from_static(b"{}"))), reject(1)];
        assert_eq!(seqs(coalesce(batch)), (vec![0, 1], vec![]));
        // Unreadable changes sharing a key are each dead-lettered.
        assert_eq!(seqs(coalesce(vec![reject(0), reject(1)])), (vec![0, 1], vec![]));
        // Real writes still coalesce around it.
        let batch = vec![w(0, "a", 1, Op::Index(Bytes::from_static(b"{}"))), reject(1), w(2, "a", 2, Op::Delete)];
        assert_eq!(seqs(coalesce(batch)), (vec![1, 2], vec![0]));
    }

    proptest::proptest! {
        /// Batches never break their limits (but for one oversize write alone), keep order,
        /// and lose nothing: everything pending ends up in some batch.
        #[test]
        fn batches_respect_count_and_byte_limits(
            sizes in proptest::collection::vec(0usize..3000, 0..300),
            max_docs in 1usize..50,
            max_bytes in 100usize..5000,
        ) {
            let limits = BatchConfig { max_docs, max_bytes, ..BatchConfig::default() };
            let mut pending: VecDeque<Write> = sizes
                .iter()
                .enumerate()
                .map(|(i, n)| w(i as Seq, &i.to_string(), 1, Op::Index(Bytes::from(vec![b' '; *n]))))
                .collect();
            let mut seen = Vec::new();
            while !pending.is_empty() {
                let mut batch = Vec::new();
                let mut bytes = 0;
                fill(&mut batch, &mut bytes, &mut pending, &limits);
                proptest::prop_assert!(!batch.is_empty());
                proptest::prop_assert!(batch.len() <= max_docs);
                proptest::prop_assert_eq!(bytes, batch.iter().map(encoded_len).sum::<usize>());
                proptest::prop_assert!(bytes <= max_bytes || batch.len() == 1, "{} bytes in {} writes", bytes, batch.len());
                seen.extend(batch.iter().map(|w| w.seq));
            }
            proptest::prop_assert_eq!(seen, (0..sizes.len() as Seq).collect::<Vec<_>>());
        }
    }

    fn keyed(seq: Seq, id: &str) -> Write {
        let mut w = w(seq, id, seq + 1, Op::Index(Bytes::from_static(b"{}")));
        w.key = w.document_key();
        w
    }

    #[test]
    fn a_document_in_flight_waits_ahead_of_its_later_writes() {
        let mut b = Batcher::new(BatchConfig { max_docs: 2, ..BatchConfig::default() });
        b.push(vec![keyed(0, "a"), keyed(1, "b"), keyed(2, "a"), keyed(3, "c")]);
        let first = b.take();
        assert_eq!(first.send.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![0, 1]);
        // "a" is in flight: its next write is held back, "c" goes.
        let second = b.take();
        assert_eq!(second.send.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![3]);
        assert_eq!(second.deferred, 1);
        // Still in flight: nothing to send.
        let third = b.take();
        assert!(third.send.is_empty());
        b.done(&first.send.iter().map(|w| w.key).collect::<Vec<_>>());
        let fourth = b.take();
        assert_eq!(fourth.send.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![2]);
        assert!(b.is_empty());
    }

    proptest::proptest! {
        /// Whatever the arrivals, batch limits and completion order: no document is in two
        /// bulk requests in flight, each document's writes are sent in arrival order, every
        /// write is sent or superseded exactly once, and each document's last write is the
        /// last one sent for it.
        #[test]
        fn batcher_keeps_documents_out_of_two_requests_and_in_order(
            steps in proptest::collection::vec((0u8..3, 0usize..6, 0usize..8), 1..200),
            max_docs in 1usize..6,
        ) {
            let mut b = Batcher::new(BatchConfig { max_docs, ..BatchConfig::default() });
            let mut next: Seq = 0;
            let mut ids: Vec<String> = Vec::new();
            let mut outstanding: Vec<Vec<Write>> = Vec::new();
            let mut fate: Vec<u8> = Vec::new(); // 0 queued, 1 sent, 2 superseded
            let mut last_sent: HashMap<String, Seq> = HashMap::new();
            let mut check_take = |b: &mut Batcher, outstanding: &mut Vec<Vec<Write>>, fate: &mut Vec<u8>, ids: &Vec<String>| -> Result<(), proptest::test_runner::TestCaseError> {
                let t = b.take();
                for s in &t.superseded {
                    proptest::prop_assert_eq!(fate[*s as usize], 0);
                    fate[*s as usize] = 2;
                }
                for w in &t.send {
                    let id = &ids[w.seq as usize];
                    for other in outstanding.iter().flatten() {
                        proptest::prop_assert_ne!(&ids[other.seq as usize], id, "document in two requests");
                    }
                    if let Some(prev) = last_sent.get(id) {
                        proptest::prop_assert!(*prev < w.seq, "document sent out of order");
                    }
                    last_sent.insert(id.clone(), w.seq);
                    proptest::prop_assert_eq!(fate[w.seq as usize], 0);
                    fate[w.seq as usize] = 1;
                }
                if !t.send.is_empty() {
                    outstanding.push(t.send);
                }
                Ok(())
            };
            for (op, a, c) in steps {
                match op {
                    0 => {
                        let mut ws = Vec::new();
                        for j in 0..=c {
                            let id = ((a + j * 7) % 5).to_string();
                            ws.push(keyed(next, &id));
                            ids.push(id);
                            fate.push(0);
                            next += 1;
                        }
                        b.push(ws);
                    }
                    1 => check_take(&mut b, &mut outstanding, &mut fate, &ids)?,
                    _ => {
                        if !outstanding.is_empty() {
                            let done = outstanding.remove(a % outstanding.len());
                            b.done(&done.iter().map(|w| w.key).collect::<Vec<_>>());
                        }
                    }
                }
            }
            // Drain: complete everything, take until empty.
            while !b.is_empty() || !outstanding.is_empty() {
                for done in outstanding.drain(..) {
                    b.done(&done.iter().map(|w| w.key).collect::<Vec<_>>());
                }
                check_take(&mut b, &mut outstanding, &mut fate, &ids)?;
            }
            proptest::prop_assert!(fate.iter().all(|f| *f != 0), "a write was neither sent nor superseded");
            for (id, sent) in &last_sent {
                let last = ids.iter().rposition(|i| i == id).map(|p| p as Seq);
                proptest::prop_assert_eq!(Some(*sent), last, "document {} ends on a stale write", id);
            }
        }
    }

    fn refusal() -> Refusal {
        Refusal { status: 400, error_type: "mapper_parsing_exception".into(), reason: "refused".into() }
    }

    #[test]
    fn a_refused_intent_stops_its_documents_write_and_dead_letters_it_instead() {
        let mut intent = w(7, "rec", 1, Op::Index(Bytes::from_static(b"{}")));
        intent.aux = true;
        let mut rejected = vec![(intent, refusal())];
        let mut old_copy = w(7, "old", 1, Op::Delete);
        old_copy.aux = true;
        let writes = vec![old_copy, w(7, "a", 1, Op::Index(Bytes::from_static(b"{}"))), w(8, "b", 1, Op::Delete)];
        let kept = without_refused_intents(writes, &mut rejected, 0);
        assert_eq!(kept.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![8], "nothing of document 7 is sent");
        assert_eq!(rejected.len(), 1, "the record itself is not dead-lettered, its document is");
        assert_eq!((rejected[0].0.seq, rejected[0].1.error_type.as_str()), (7, "location_record_refused"));
        assert!(rejected[0].1.reason.contains("refused"), "{}", rejected[0].1.reason);
    }

    #[test]
    fn a_refused_delete_of_an_old_copy_keeps_it_in_the_record() {
        let record = |seq| {
            let mut r = w(seq, "rec", 1, Op::Index(Bytes::from_static(b"{}")));
            r.aux = true;
            r
        };
        let mut left = w(3, "old", 1, Op::Delete);
        left.aux = true;
        let kept = final_records(vec![record(3), record(4)], &[(left, refusal())]);
        assert_eq!(kept.iter().map(|w| w.seq).collect::<Vec<_>>(), vec![4], "document 3's record still names the copy its delete could not remove");
    }

    #[test]
    fn the_stale_share_is_published_per_window_of_answered_writes() {
        let shared = Shared::new(Default::default(), Metrics::new("p"), Arc::new(Health::new(Duration::from_secs(60))));
        shared.note_outcomes(300, 200);
        assert_eq!(shared.metrics.stale_share.get(), 0.0, "published only once a window is full");
        shared.note_outcomes(100, 400);
        assert!((shared.metrics.stale_share.get() - 0.6).abs() < 1e-9, "{}", shared.metrics.stale_share.get());
        shared.note_outcomes(990, 10);
        assert!((shared.metrics.stale_share.get() - 0.01).abs() < 1e-9, "a new window starts empty");
    }

    #[test]
    fn budget_covers_two_full_batches_per_request_slot() {
        let cfg = BatchConfig {
            max_bytes: 50 << 20,
            concurrency: 4,
            ..BatchConfig::default()
        };
        assert_eq!(budget_kib(&cfg), 400 * 1024);
        assert_eq!(budget_kib(&BatchConfig::default()), 64 * 1024);
    }
}
