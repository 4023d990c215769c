//! The sink side of the engine: ordered lanes, batching, bulk delivery, acknowledgement.
//!
//! Flow: the source hands each [`Write`] to the [`Sink`], which numbers it (the tracker's
//! sequence) and routes it to a lane by a hash of its index and `_id`. A lane gathers a batch
//! (count, bytes, time), keeps only the last write of each document in it, sends one bulk
//! request, retries only the items that failed retriably, dead-letters what Elasticsearch
//! refuses, and then acknowledges every write of the batch.
//!
//! # Invariants
//! - A document always goes through the same lane, and a lane has one bulk in flight, so a
//!   document never has two writes in flight (Elasticsearch may keep no delete tombstones).
//! - A write is acknowledged only once it has a final outcome: indexed, deleted, stale (409),
//!   already gone (404 on delete) or dead-lettered.
//! - Memory is bounded: each write holds permits of a byte budget until it is acknowledged,
//!   and the lane queues are bounded, so a dead sink stops the source.

pub mod elasticsearch;

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, warn, Instrument};

use self::elasticsearch::request::{body_for, encoded_len};
use self::elasticsearch::response::{classify_response, classify_status, ItemOutcome, RequestOutcome};
use self::elasticsearch::Elastic;
use crate::checkpoint::tracker::{Seq, Tracker};
use crate::checkpoint::Position;
use crate::config::BatchConfig;
use crate::metrics::{Health, Metrics};
use crate::retry::Backoff;

/// What a write does to its document.
#[derive(Debug, Clone)]
pub enum Op {
    /// Index this `_source` (JSON object, `_id` left out).
    Index(Bytes),
    /// Delete the document.
    Delete,
    /// The source could not turn the change into a write (an `_id` over Elasticsearch's 512
    /// bytes, malformed BSON): dead-letter it with this reason, in order with the rest.
    Reject {
        /// Short machine-readable type, e.g. `invalid_id`.
        error_type: &'static str,
        /// What is wrong.
        reason: String,
        /// The document as JSON, when it could be converted.
        document: Option<Bytes>,
    },
}

/// One document write on its way to Elasticsearch.
#[derive(Debug)]
pub struct Write {
    /// Sequence number from the tracker (set by [`Sink::send`]).
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
    /// Read by a snapshot: a snapshot reads each document once, so a batch of only such
    /// writes has nothing to coalesce.
    pub from_snapshot: bool,
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
            from_snapshot: false,
        }
    }

    fn lane(&self, lanes: usize) -> usize {
        let mut h = Fnv::default();
        self.index.hash(&mut h);
        self.id_json.hash(&mut h);
        (h.finish() % lanes as u64) as usize
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

/// Memory budget of writes in flight: 1 permit = 1 KiB. At least 64 MiB, and room for
/// two full batches per lane, so batching is never starved by the budget.
fn budget_kib(batch: &BatchConfig) -> usize {
    let bytes = (batch.max_bytes * batch.concurrency * 2).max(64 << 20);
    bytes / 1024
}

/// State shared by the sink's lanes and the checkpointer.
pub struct Shared {
    tracker: Mutex<Tracker<Position>>,
    acked: Notify,
    /// Metrics of the pipeline.
    pub metrics: Metrics,
    /// Health of the pipeline.
    pub health: Arc<Health>,
}

impl Shared {
    /// Shared state for a new pipeline run.
    pub fn new(metrics: Metrics, health: Arc<Health>) -> Arc<Self> {
        Arc::new(Self {
            tracker: Mutex::new(Tracker::new()),
            acked: Notify::new(),
            metrics,
            health,
        })
    }

    fn tracker(&self) -> MutexGuard<'_, Tracker<Position>> {
        // A panic while holding the lock cannot leave the tracker half-updated in a way
        // that loses data (each method is a few integer updates), so poisoning is ignored.
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Positions now safe to checkpoint, oldest first.
    pub fn take_committable(&self) -> Vec<Position> {
        self.tracker().take_committable()
    }

    /// Record a position after every write sent so far.
    pub fn record(&self, position: Position) {
        self.tracker().record(position);
    }

    fn ack(&self, seqs: &[Seq]) {
        let in_flight = {
            let mut t = self.tracker();
            for s in seqs {
                t.ack(*s);
            }
            t.in_flight()
        };
        self.metrics.in_flight.set(in_flight as i64);
        self.health.progressed();
        self.acked.notify_waiters();
    }

    fn is_drained(&self) -> bool {
        self.tracker().is_drained()
    }
}

enum LaneMsg {
    /// Writes for this lane, in order.
    Writes(Vec<Write>),
    /// Send the partial batch now (a barrier is waiting).
    Flush,
}

/// How many flush intervals a batch of snapshot writes may wait to fill.
const SNAPSHOT_FLUSH_FACTOR: u32 = 10;

/// Writes staged per lane before they are handed over in one message: one channel send and
/// one wake-up of the lane per chunk instead of per document.
const STAGE_CHUNK: usize = 64;

/// The sink: lanes that deliver writes to Elasticsearch.
pub struct Sink {
    es: Elastic,
    lanes: Vec<mpsc::Sender<LaneMsg>>,
    /// Registered writes not yet handed to their lane, per lane.
    staged: Mutex<Vec<Vec<Write>>>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
    budget: Arc<Semaphore>,
    budget_total: u32,
}

/// The sink's lanes have stopped (shutdown was forced).
#[derive(Debug, thiserror::Error)]
#[error("sink lanes stopped")]
pub struct Closed;

/// Settings of the lanes.
#[derive(Clone)]
pub struct SinkSettings {
    /// Batch limits and lane count.
    pub batch: BatchConfig,
    /// Index of dead-letter records.
    pub dead_letter_index: Arc<str>,
    /// Pipeline name, written into dead-letter records.
    pub pipeline: Arc<str>,
}

/// A full chunk of staged writes for one lane, to be handed over with [`Sink::send_chunk`].
pub struct Chunk {
    lane: usize,
    writes: Vec<Write>,
}

impl Sink {
    /// Start `settings.batch.concurrency` lanes. `abort` makes lanes give up retrying (forced
    /// shutdown); unacknowledged writes are then simply not checkpointed.
    pub fn start(
        es: Elastic,
        settings: SinkSettings,
        shared: Arc<Shared>,
        abort: CancellationToken,
    ) -> Self {
        let lanes_n = settings.batch.concurrency.max(1);
        let mut lanes = Vec::with_capacity(lanes_n);
        let mut tasks = JoinSet::new();
        for lane in 0..lanes_n {
            // Room for one full batch of chunks while another batch is in flight; more would
            // only hold memory.
            let (tx, rx) = mpsc::channel(settings.batch.max_docs.div_ceil(STAGE_CHUNK).max(2));
            lanes.push(tx);
            let worker = Lane {
                es: es.clone(),
                settings: settings.clone(),
                shared: shared.clone(),
                abort: abort.clone(),
            };
            tasks.spawn(
                worker
                    .run(rx)
                    .instrument(tracing::info_span!("lane", pipeline = %settings.pipeline, lane)),
            );
        }
        let total = budget_kib(&settings.batch);
        Self {
            es,
            lanes,
            staged: Mutex::new((0..lanes_n).map(|_| Vec::new()).collect()),
            tasks,
            shared,
            budget: Arc::new(Semaphore::new(total)),
            budget_total: u32::try_from(total).unwrap_or(u32::MAX),
        }
    }

    /// The Elasticsearch connection the lanes use.
    pub fn elastic(&self) -> &Elastic {
        &self.es
    }

    /// Shared state (tracker, metrics, health).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Number a write (its place in the checkpoint order) and stage it for its lane. Returns
    /// a chunk when the lane's stage is full; the caller must hand it over with
    /// [`Sink::send_chunk`] before staging more.
    pub fn stage(&self, mut write: Write) -> Option<Chunk> {
        write.seq = self.shared.tracker().register();
        let lane = write.lane(self.lanes.len());
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        staged[lane].push(write);
        (staged[lane].len() >= STAGE_CHUNK).then(|| Chunk {
            lane,
            writes: std::mem::take(&mut staged[lane]),
        })
    }

    /// Hand a chunk to its lane. Waits while the memory budget or the lane queue is full:
    /// this is the back-pressure that stops the source when the sink is slow.
    ///
    /// # Cancel safety
    /// Dropping the future drops the chunk's writes unacknowledged: the checkpoint then stays
    /// before them, so they are read again on the next start.
    ///
    /// # Errors
    /// [`Closed`] when the lanes have stopped.
    pub async fn send_chunk(&self, chunk: Chunk) -> Result<(), Closed> {
        let Chunk { lane, mut writes } = chunk;
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
        self.lanes[lane]
            .send(LaneMsg::Writes(writes))
            .await
            .map_err(|_| Closed)
    }

    /// Hand every staged write to its lane (the source is about to wait on MongoDB, or a
    /// barrier needs them).
    ///
    /// # Errors
    /// [`Closed`] when the lanes have stopped.
    pub async fn flush_staged(&self) -> Result<(), Closed> {
        let chunks: Vec<Chunk> = {
            let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
            staged
                .iter_mut()
                .enumerate()
                .filter(|(_, s)| !s.is_empty())
                .map(|(lane, s)| Chunk {
                    lane,
                    writes: std::mem::take(s),
                })
                .collect()
        };
        for chunk in chunks {
            self.send_chunk(chunk).await?;
        }
        Ok(())
    }

    /// Hand every staged write to its lane, and have every lane send its partial batch now
    /// instead of waiting for its flush interval (the end of a snapshot's collection).
    ///
    /// # Errors
    /// [`Closed`] when the lanes have stopped.
    pub async fn flush_lanes(&self) -> Result<(), Closed> {
        self.flush_staged().await?;
        for lane in &self.lanes {
            lane.send(LaneMsg::Flush).await.map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// Whether writes are staged and not yet handed to their lanes.
    pub fn has_staged(&self) -> bool {
        let staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        staged.iter().any(|s| !s.is_empty())
    }

    /// Record a position covering every write sent so far.
    pub fn record(&self, position: Position) {
        self.shared.record(position);
    }

    /// Wait until every write sent so far is acknowledged (lanes flush partial batches).
    ///
    /// # Errors
    /// [`Closed`] when the lanes stopped before draining.
    pub async fn barrier(&self) -> Result<(), Closed> {
        self.flush_lanes().await?;
        loop {
            let notified = self.shared.acked.notified();
            if self.shared.is_drained() {
                return Ok(());
            }
            if self.lanes.iter().all(|l| l.is_closed()) {
                return Err(Closed);
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Stop accepting writes, let the lanes deliver what they hold, and wait for them.
    /// Writes still staged are dropped unacknowledged (the source stopped mid-chunk; they are
    /// read again on the next start).
    pub async fn close(mut self) {
        self.lanes.clear();
        while let Some(res) = self.tasks.join_next().await {
            if let Err(e) = res {
                error!(error = %e, "sink lane panicked");
            }
        }
    }
}

/// One ordered lane: batch, deliver, acknowledge, repeat.
struct Lane {
    es: Elastic,
    settings: SinkSettings,
    shared: Arc<Shared>,
    abort: CancellationToken,
}

impl Lane {
    async fn run(self, mut rx: mpsc::Receiver<LaneMsg>) {
        let batch_cfg = &self.settings.batch;
        // Writes received but not yet in a batch (a chunk can overshoot a batch's limits).
        let mut pending: VecDeque<Write> = VecDeque::new();
        let mut closed = false;
        loop {
            self.shared.health.sink_beat(true);
            if pending.is_empty() {
                if closed {
                    return;
                }
                let first = tokio::select! {
                    msg = rx.recv() => msg,
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                };
                match first {
                    None => return,
                    Some(LaneMsg::Flush) => continue,
                    Some(LaneMsg::Writes(ws)) => pending.extend(ws),
                }
            }
            let mut batch = Vec::with_capacity(batch_cfg.max_docs.min(pending.len().max(STAGE_CHUNK)));
            let mut bytes = 0;
            let mut full = fill(&mut batch, &mut bytes, &mut pending, batch_cfg);
            // One timer per batch, not per message. A snapshot batch waits longer: its reader
            // feeds every lane from one cursor, so while it waits on one full lane the others
            // would otherwise time out and send small batches (and a snapshot has no change
            // to show quickly). The end of each collection flushes the lanes (`flush_lanes`).
            // A change streamed meanwhile (a namespace added to a running pipeline is
            // snapshotted beside the stream) brings the normal interval back.
            let started = tokio::time::Instant::now();
            let mut snapshot_only = !batch.is_empty() && batch.iter().all(|w| w.from_snapshot);
            let wait = if snapshot_only {
                batch_cfg.flush_interval * SNAPSHOT_FLUSH_FACTOR
            } else {
                batch_cfg.flush_interval
            };
            let deadline = tokio::time::sleep(wait);
            tokio::pin!(deadline);
            while !closed && !full {
                tokio::select! {
                    biased;
                    msg = rx.recv() => match msg {
                        Some(LaneMsg::Writes(ws)) => {
                            if snapshot_only && ws.iter().any(|w| !w.from_snapshot) {
                                snapshot_only = false;
                                deadline.as_mut().reset(started + batch_cfg.flush_interval);
                            }
                            pending.extend(ws);
                            full = fill(&mut batch, &mut bytes, &mut pending, batch_cfg);
                        }
                        Some(LaneMsg::Flush) => break,
                        None => closed = true,
                    },
                    () = &mut deadline => break,
                }
            }
            let (writes, superseded) = coalesce(batch);
            let mut seqs: Vec<Seq> = writes.iter().map(|w| w.seq).collect();
            seqs.extend(superseded);
            let newest = writes.iter().map(|w| w.version).max().unwrap_or(0);
            if self.deliver(writes).await.is_err() {
                // Forced shutdown: these writes stay unacknowledged, so the checkpoint stays
                // before them and they are replayed on the next start.
                return;
            }
            self.shared.ack(&seqs);
            if newest > 0 {
                let lag = crate::time::unix_seconds() - crate::checkpoint::ClusterTime::from_version(newest).t as i64;
                self.shared.metrics.lag_seconds.set(lag.max(0));
            }
        }
    }

    /// Deliver `writes` until each has a final outcome.
    async fn deliver(&self, writes: Vec<Write>) -> Result<(), crate::retry::Cancelled> {
        let m = &self.shared.metrics;
        let mut backoff = Backoff::default();
        let mut queue: VecDeque<Vec<Write>> = VecDeque::from([writes]);
        let mut rejected: Vec<(Write, u16, String, String)> = Vec::new();
        if let Some(first) = queue.pop_front() {
            let (refused, sendable): (Vec<Write>, Vec<Write>) =
                first.into_iter().partition(|w| matches!(w.op, Op::Reject { .. }));
            for w in refused {
                if let Op::Reject { error_type, reason, .. } = &w.op {
                    let (t, r) = (error_type.to_string(), reason.clone());
                    rejected.push((w, 0, t, r));
                }
            }
            queue.push_back(sendable);
        }
        while let Some(chunk) = queue.pop_front() {
            if chunk.is_empty() {
                continue;
            }
            let size: usize = chunk.iter().map(encoded_len).sum();
            let body = body_for(&chunk, size);
            let started = Instant::now();
            let result = self.es.bulk(body).await;
            m.bulk_seconds.observe(started.elapsed().as_secs_f64());
            let (status, response) = match result {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), items = chunk.len(), attempt = backoff.attempts(), "bulk request failed; retrying");
                    m.bulk_requests.with_label_values(&["retry"]).inc();
                    m.retried_items.inc_by(chunk.len() as u64);
                    self.shared.health.sink_beat(false);
                    queue.push_front(chunk);
                    backoff.wait(&self.abort).await?;
                    continue;
                }
            };
            match classify_status(status) {
                RequestOutcome::Retry => {
                    warn!(status, items = chunk.len(), body = %String::from_utf8_lossy(&response[..response.len().min(300)]), "bulk request refused; retrying");
                    m.bulk_requests.with_label_values(&["retry"]).inc();
                    m.retried_items.inc_by(chunk.len() as u64);
                    self.shared.health.sink_beat(false);
                    queue.push_front(chunk);
                    backoff.wait(&self.abort).await?;
                }
                RequestOutcome::Split => {
                    m.bulk_requests.with_label_values(&["split"]).inc();
                    if chunk.len() == 1 {
                        let reason = String::from_utf8_lossy(&response[..response.len().min(1000)]).into_owned();
                        for w in chunk {
                            rejected.push((w, status, format!("http_{status}"), reason.clone()));
                        }
                    } else {
                        let mut left = chunk;
                        let right = left.split_off(left.len() / 2);
                        queue.push_front(right);
                        queue.push_front(left);
                    }
                }
                RequestOutcome::ReadItems => {
                    let is_delete: Vec<bool> = chunk.iter().map(|w| matches!(w.op, Op::Delete)).collect();
                    let outcomes = match classify_response(&response, &is_delete) {
                        Ok(o) => o,
                        Err(e) => {
                            warn!(error = %crate::error_chain(&e), "unreadable bulk response; retrying the request");
                            m.bulk_requests.with_label_values(&["retry"]).inc();
                            queue.push_front(chunk);
                            backoff.wait(&self.abort).await?;
                            continue;
                        }
                    };
                    let mut retry = Vec::new();
                    let mut retry_reason = String::new();
                    // [indexed, deleted, stale, already gone], added to the metrics once.
                    let mut counts = [0u64; 4];
                    for (w, outcome) in chunk.into_iter().zip(outcomes) {
                        match outcome {
                            ItemOutcome::Done => counts[usize::from(matches!(w.op, Op::Delete))] += 1,
                            ItemOutcome::Stale => counts[2] += 1,
                            ItemOutcome::AlreadyGone => counts[3] += 1,
                            ItemOutcome::Retry { reason, .. } => {
                                retry_reason = reason;
                                retry.push(w);
                            }
                            ItemOutcome::Reject { status, error_type, reason } => {
                                rejected.push((w, status, error_type, reason));
                            }
                        }
                    }
                    m.hot.indexed.inc_by(counts[0]);
                    m.hot.deleted.inc_by(counts[1]);
                    m.hot.stale.inc_by(counts[2]);
                    m.hot.already_gone.inc_by(counts[3]);
                    if retry.is_empty() {
                        m.bulk_requests.with_label_values(&["ok"]).inc();
                        self.shared.health.sink_beat(true);
                        backoff.reset();
                    } else {
                        warn!(items = retry.len(), reason = %retry_reason, "bulk items failed retriably; retrying them");
                        m.bulk_requests.with_label_values(&["partial"]).inc();
                        m.retried_items.inc_by(retry.len() as u64);
                        self.shared.health.sink_beat(false);
                        queue.push_front(retry);
                        backoff.wait(&self.abort).await?;
                    }
                }
            }
        }
        if !rejected.is_empty() {
            self.dead_letter(rejected).await?;
        }
        Ok(())
    }

    /// Record refused documents in the dead-letter index, retrying until Elasticsearch has
    /// them (or refuses the record itself, which is logged at ERROR with the document id).
    async fn dead_letter(
        &self,
        rejected: Vec<(Write, u16, String, String)>,
    ) -> Result<(), crate::retry::Cancelled> {
        let m = &self.shared.metrics;
        let now = crate::time::now_rfc3339();
        let mut records: Vec<(usize, Vec<u8>)> = Vec::with_capacity(rejected.len());
        for (i, (w, status, error_type, reason)) in rejected.iter().enumerate() {
            error!(namespace = %w.ns, index = %w.index, id = %w.id_json, status, error_type = %error_type, reason = %reason, "document refused by Elasticsearch; dead-lettered");
            m.dead_letters.with_label_values(&[error_type.as_str()]).inc();
            let document = match &w.op {
                Op::Index(src) | Op::Reject { document: Some(src), .. } => {
                    serde_json::Value::String(String::from_utf8_lossy(src).into_owned())
                }
                Op::Delete | Op::Reject { document: None, .. } => serde_json::Value::Null,
            };
            let id: serde_json::Value = serde_json::from_str(&w.id_json).unwrap_or_default();
            let record = serde_json::json!({
                "pipeline": &*self.settings.pipeline,
                "namespace": &*w.ns,
                "index": &*w.index,
                "id": id,
                "version": w.version,
                "op": match w.op { Op::Delete => "delete", Op::Index(_) => "index", Op::Reject { .. } => "unconvertible" },
                "status": status,
                "errorType": error_type,
                "reason": reason,
                "failedAt": now,
                "document": document,
            });
            let mut line = Vec::new();
            line.extend_from_slice(b"{\"index\":{\"_index\":");
            elasticsearch::request::write_json_str(&self.settings.dead_letter_index, &mut line);
            line.extend_from_slice(b"}}\n");
            if serde_json::to_writer(&mut line, &record).is_ok() {
                line.push(b'\n');
                records.push((i, line));
            }
        }
        let mut backoff = Backoff::default();
        while !records.is_empty() {
            let body: Vec<u8> = records.iter().flat_map(|(_, l)| l.iter().copied()).collect();
            let retry = match self.es.bulk(body).await {
                Ok((status, response)) if classify_status(status) == RequestOutcome::ReadItems => {
                    match classify_response(&response, &vec![false; records.len()]) {
                        Ok(outcomes) => {
                            let mut retry = Vec::new();
                            for ((i, line), outcome) in records.into_iter().zip(outcomes) {
                                match outcome {
                                    ItemOutcome::Retry { .. } => retry.push((i, line)),
                                    ItemOutcome::Reject { reason, .. } => {
                                        let (w, ..) = &rejected[i];
                                        error!(namespace = %w.ns, id = %w.id_json, reason = %reason, "dead-letter index refused the record; the document is only in this log");
                                        m.dead_letter_failures.inc();
                                    }
                                    _ => m.hot.dead_lettered.inc(),
                                }
                            }
                            retry
                        }
                        Err(_) => records,
                    }
                }
                Ok(_) | Err(_) => records,
            };
            records = retry;
            if !records.is_empty() {
                self.shared.health.sink_beat(false);
                backoff.wait(&self.abort).await?;
            }
        }
        Ok(())
    }
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

/// Keep only the last write of each document in a batch (the later write has the newer
/// state and a version at least as high). Returns the writes to send, in arrival order of
/// their last occurrence, and the sequence numbers of the superseded writes.
pub fn coalesce(batch: Vec<Write>) -> (Vec<Write>, Vec<Seq>) {
    if batch.iter().all(|w| w.from_snapshot) {
        return (batch, Vec::new());
    }
    // Borrowed keys: no allocation per document on this per-batch path.
    let is_last: Vec<bool> = {
        let mut last: HashMap<(&str, &str), usize, BuildHasherDefault<Fnv>> =
            HashMap::with_capacity_and_hasher(batch.len(), BuildHasherDefault::default());
        for (i, w) in batch.iter().enumerate() {
            last.insert((&w.index, &w.id_json), i);
        }
        if last.len() == batch.len() {
            return (batch, Vec::new());
        }
        let mut is_last = vec![false; batch.len()];
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

    #[test]
    fn a_document_always_maps_to_the_same_lane() {
        let a1 = w(0, "a", 1, Op::Delete);
        let a2 = w(9, "a", 7, Op::Index(Bytes::new()));
        for lanes in 1..9 {
            assert_eq!(a1.lane(lanes), a2.lane(lanes));
            assert!(a1.lane(lanes) < lanes);
        }
    }

    #[test]
    fn budget_covers_two_full_batches_per_lane() {
        let cfg = BatchConfig {
            max_bytes: 50 << 20,
            concurrency: 4,
            ..BatchConfig::default()
        };
        assert_eq!(budget_kib(&cfg), 400 * 1024);
        assert_eq!(budget_kib(&BatchConfig::default()), 64 * 1024);
    }
}
