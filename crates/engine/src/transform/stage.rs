//! The transform stage as a task: changes in from the source, decided writes out to the sink,
//! in the order the source read them.
//!
//! With scripts or relations, two loops joined by a bounded queue of chunks (the window):
//! - **placing** takes each chunk of changes, places every document change ([`Placer`]) and
//!   hands the documents of scripted namespaces to the script pool, which decides them in
//!   parallel while placing goes on;
//! - **handing on** awaits the decisions in order (while it waits, `/stats` says so, and
//!   `/healthz` fails once the wait outlasts a loop's allowed silence), keeps `written` (the indexes each namespace writes, [`IndexBook`]) in that same order,
//!   turns drops and sweeps into the sink's index operations, and hands chunks to the sink.
//!
//! Without them every change is decided as it is placed: one loop places and hands on each
//! change at once ([`Transform::place_and_hand_on`]), the same steps without the window.
//!
//! # Invariants
//! - Writes, positions and index operations leave in the order their changes arrived.
//! - An index a write goes to is in `written` before that write: the position recording it is
//!   handed on ahead of the write, so a checkpoint past the write knows the index.
//! - A namespace is forgotten only after its drop, in order: a checkpoint that forgot it has
//!   its drop done.
//! - A time machine entry follows its write, before the change's position, and its log index
//!   is never in `written`: no drop, sweep or `onDrop` deletes a log.
//! - The window holds at most [`WINDOW`] chunks: back-pressure reaches the source.

use std::sync::Arc;

use monsoon_script::{Decision, Item, PendingBatch, ScriptError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use super::change::{Change, Doc};
use super::place::{Placed, Placer};
use super::relate::{Related, Relations};
use super::script::Call;
use super::time_machine::Logged;
use crate::checkpoint::written::IndexBook;
use crate::checkpoint::ClusterTime;
use crate::config::Shard;
use crate::convert::ConvertStats;
use crate::metrics::{Health, Metrics};
use crate::sink::{Chunk, Closed, Control, Op, Sink, Write, CHUNK};

/// Chunks placed ahead of the one being handed on: the documents whose scripts run at once,
/// and the changes placed while a relation's re-sync reads. Without scripts or relations there
/// is no window: each change is handed on as it is placed.
pub const WINDOW: usize = 8;

/// Why the transform stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The sink stopped (forced shutdown, or a failure there).
    #[error("the sink stopped")]
    SinkClosed(#[from] Closed),
    /// Two live namespaces would write one index: dropping either would delete the other's
    /// documents.
    #[error("namespaces `{first}` and `{second}` both write to index `{index}`: dropping one would delete the other's documents; give one of them its own index with `spec.indexes`")]
    SharedIndex {
        /// The index.
        index: String,
        /// The namespace already writing it.
        first: String,
        /// The namespace that would write it too.
        second: String,
    },
}

/// A change placed, waiting its turn to be handed on.
enum Step {
    /// A write decided now; what its time machine entry needs, when the change is logged.
    Write(Write, Option<Logged>),
    /// A write the scripts decide: the call, its place in its chunk's batch of decisions; as
    /// for [`Step::Write`].
    Deferred(Box<Call>, usize, Option<Logged>),
    /// A change of a namespace with relations: its own step, if it writes one, then the
    /// related documents as the re-sync reads them; the change's namespace and `_id` (where a
    /// relation that cannot be followed is dead-lettered).
    Related(Option<Box<Step>>, mpsc::Receiver<Related>, Arc<str>, mongodb::bson::RawBson, u64),
    /// Anything else, handed on as it came.
    Other(Change),
}

/// A chunk of changes placed: its steps, and the decisions of its scripted documents (one
/// batch, submitted when the chunk was placed; [`Step::Deferred`] holds its place in it).
struct PlacedChunk {
    steps: Vec<Step>,
    decisions: Option<PendingBatch<Decision>>,
}

/// The transform stage.
pub struct Transform {
    /// Places document changes.
    pub placer: Placer,
    /// `written`, kept in the order writes are handed on.
    pub book: IndexBook,
    /// The documents this worker owns.
    pub shard: Shard,
    /// Delete the indexes of dropped collections (`onDrop: Delete`).
    pub delete_index_on_drop: bool,
    /// Metrics.
    pub metrics: Metrics,
    /// Health.
    pub health: Arc<Health>,
    /// Forced stop: give up waiting on decisions.
    pub abort: CancellationToken,
    /// Relations (`spec.relate`), when the pipeline has any.
    pub relations: Option<Arc<Relations>>,
}

impl Transform {
    /// Run until the source's channel closes (then hand on what is left and close the sink),
    /// the sink stops, or a fatal error.
    ///
    /// # Errors
    /// [`Error::SinkClosed`], [`Error::SharedIndex`].
    pub async fn run(self, input: mpsc::Receiver<Vec<Change>>, sink: Sink) -> Result<(), Error> {
        if self.placer.scripts.is_none() && self.relations.is_none() {
            let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
            let result = self.place_and_hand_on(input, &mut out).await;
            sink.close().await;
            return result;
        }
        let (window_tx, window_rx) = mpsc::channel(WINDOW);
        let result = {
            let placing = place_all(&self.placer, self.relations.as_ref(), &self.metrics, input, window_tx);
            let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
            let handing_on = self.hand_on_all(window_rx, &mut out);
            tokio::pin!(placing, handing_on);
            // Handing on ends last, once placing has ended and the window is empty, unless it
            // fails: then placing stops too, and the source's next hand-over finds the stage gone.
            tokio::select! {
                r = &mut handing_on => r,
                () = &mut placing => handing_on.await,
            }
        };
        sink.close().await;
        result
    }

    /// Without scripts or relations every change is decided as it is placed, and nothing could
    /// run beside placing: each change is placed and handed on at once, in one pass, with no
    /// window between (no chunk of steps to build, queue and take apart again).
    async fn place_and_hand_on(&self, mut input: mpsc::Receiver<Vec<Change>>, out: &mut Out<'_>) -> Result<(), Error> {
        let mut stats = ConvertStats::default();
        while let Some(mut changes) = out.next_from(&mut input).await? {
            // Documents are placed where they lie (a change moved out of the vector is a copy
            // of it), and freed with the vector.
            for change in &mut changes {
                let full = match change {
                    Change::Doc(doc) => self.place_doc(doc, &mut stats, out)?,
                    other => {
                        // Taken out; the flush left in its place is never read.
                        let taken = std::mem::replace(other, Change::Flush);
                        if let Some(step) = place(&self.placer, taken, &mut stats, &mut Vec::new()) {
                            self.hand_on(step, &mut [], out).await?;
                        }
                        false
                    }
                };
                if full {
                    out.send().await?;
                }
            }
            note_nulled(&self.metrics, &mut stats);
        }
        Ok(())
    }

    /// Place a document change of a pipeline without scripts and stage its write. Returns
    /// whether the chunk is full: the caller hands it on.
    #[inline]
    fn place_doc(&self, doc: &mut Doc, stats: &mut ConvertStats, out: &mut Out<'_>) -> Result<bool, Error> {
        if !doc.owned {
            // Another shard's document, handed on for its relations only.
            return Ok(false);
        }
        let logged = self.placer.for_time_machine(doc);
        match self.placer.place(doc, stats) {
            Placed::Write(write) => self.stage_write(write, logged.as_ref(), out),
            Placed::Nothing => Ok(false),
            Placed::Deferred(_) => unreachable!("only scripts defer a document, and this pipeline has none"),
        }
    }

    async fn hand_on_all(&self, mut window: mpsc::Receiver<PlacedChunk>, out: &mut Out<'_>) -> Result<(), Error> {
        while let Some(placed) = out.next_from(&mut window).await? {
            let mut decisions = match placed.decisions {
                Some(batch) => self.decisions(batch).await?,
                None => Vec::new(),
            };
            for step in placed.steps {
                match step {
                    // Most steps: staged without a future of their own (an async call would
                    // move the write into its state first).
                    Step::Write(write, logged) => {
                        if self.stage_write(write, logged.as_ref(), out)? {
                            out.send().await?;
                        }
                    }
                    step => self.hand_on(step, &mut decisions, out).await?,
                }
            }
        }
        Ok(())
    }

    /// Await a chunk's script decisions. While they run, `/stats` says the stage waits, and
    /// the wait counts from the last decision that came in: `/healthz` fails once no decision
    /// has come for longer than a loop may be silent (script workers stopped).
    async fn decisions(&self, mut batch: PendingBatch<Decision>) -> Result<Vec<Result<Decision, ScriptError>>, Error> {
        if let Some(done) = futures_util::FutureExt::now_or_never(&mut batch) {
            return Ok(done);
        }
        let mut remaining = batch.remaining();
        self.health.transform_waiting(true);
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        let done = loop {
            tokio::select! {
                done = &mut batch => break Some(done),
                () = self.abort.cancelled() => break None,
                _ = tick.tick() => {
                    let now = batch.remaining();
                    if now < remaining {
                        remaining = now;
                        self.health.transform_waiting(true);
                    }
                }
            }
        };
        self.health.transform_waiting(false);
        done.ok_or(Error::SinkClosed(Closed))
    }

    async fn hand_on(&self, step: Step, decisions: &mut [Result<Decision, ScriptError>], out: &mut Out<'_>) -> Result<(), Error> {
        match step {
            Step::Write(write, logged) => self.hand_on_write(write, logged.as_ref(), out).await,
            Step::Deferred(call, at, logged) => {
                let decision = decisions.get_mut(at).map_or(Err(ScriptError::Stopped), |d| std::mem::replace(d, Err(ScriptError::Stopped)));
                match self.finished(*call, decision).await? {
                    Some(write) => self.hand_on_write(write, logged.as_ref(), out).await,
                    None => {
                        self.metrics.events.with_label_values(&["ignored"]).inc();
                        Ok(())
                    }
                }
            }
            Step::Related(own, related, ns, id, version) => {
                if let Some(own) = own {
                    Box::pin(self.hand_on(*own, decisions, out)).await?;
                }
                self.hand_on_related(related, &ns, &id, version, out).await
            }
            Step::Other(change) => self.hand_on_change(change, out).await,
        }
    }

    /// Hand on the related documents of a change, as its re-sync reads them, until it is done
    /// (while it reads, `/stats` says the stage is waiting, and `/healthz` fails once the wait
    /// outlasts a loop's allowed silence).
    async fn hand_on_related(&self, mut related: mpsc::Receiver<Related>, ns: &Arc<str>, id: &mongodb::bson::RawBson, version: u64, out: &mut Out<'_>) -> Result<(), Error> {
        let mut stats = ConvertStats::default();
        loop {
            let next = match related.try_recv() {
                Ok(r) => Some(r),
                Err(_) => {
                    // Hand on what is ready rather than hold it while the lookups run.
                    out.send().await?;
                    self.health.transform_waiting(true);
                    let r = tokio::select! {
                        r = related.recv() => r,
                        () = self.abort.cancelled() => None,
                    };
                    self.health.transform_waiting(false);
                    r
                }
            };
            match next {
                Some(Related::Doc(doc)) => {
                    let mut items = Vec::new();
                    if let Some(step) = place(&self.placer, Change::Doc(doc), &mut stats, &mut items) {
                        let mut decisions = match submit(&self.placer, items) {
                            Some(batch) => self.decisions(batch).await?,
                            None => Vec::new(),
                        };
                        Box::pin(self.hand_on(step, &mut decisions, out)).await?;
                    }
                }
                Some(Related::Failed { reason }) => {
                    error!(namespace = %ns, reason = %reason, "relation not followed; dead-lettered");
                    self.hand_on_write(self.placer.relation_failed(ns, id, version, reason), None, out).await?;
                }
                Some(Related::Done) => return Ok(()),
                // Stopped before it was done: nothing after this change may be acknowledged.
                None => return Err(Error::SinkClosed(Closed)),
            }
        }
    }

    /// The write a script call's decision makes. A call that failed retriably is submitted
    /// again until it answers (`/stats` and `/healthz` see the wait; a forced stop ends it).
    async fn finished(&self, call: Call, decision: Result<Decision, ScriptError>) -> Result<Option<Write>, Error> {
        let retrying = matches!(&decision, Err(e) if e.is_retriable());
        if !retrying {
            return Ok(call.finish(decision).await);
        }
        self.health.transform_waiting(true);
        let finished = tokio::select! {
            w = call.finish(decision) => Some(w),
            () = self.abort.cancelled() => None,
        };
        self.health.transform_waiting(false);
        finished.ok_or(Error::SinkClosed(Closed))
    }

    /// [`Transform::stage_write`], handing the chunk on once full.
    async fn hand_on_write(&self, write: Write, logged: Option<&Logged>, out: &mut Out<'_>) -> Result<(), Error> {
        if self.stage_write(write, logged, out)? {
            out.send().await?;
        }
        Ok(())
    }

    /// Note the write's index in `written` (handing the note on before it), then stage the
    /// write, then its time machine entry (never noted: no drop or sweep deletes a log index).
    /// Returns whether the chunk is full: the caller hands it on.
    #[inline(always)]
    fn stage_write(&self, mut write: Write, logged: Option<&Logged>, out: &mut Out<'_>) -> Result<bool, Error> {
        if !matches!(write.op, Op::Reject(_)) && !out.noted(&write) {
            match self.book.note(&write.ns, &write.index) {
                Ok(Some(position)) => out.chunk.record(position),
                Ok(None) => {}
                Err(other) if *write.index == self.placer.default_index(&write.ns) => {
                    return Err(Error::SharedIndex { index: write.index.to_string(), first: other, second: write.ns.to_string() });
                }
                Err(other) => {
                    let reason = format!("the document chose index `{}`, which namespace `{other}` writes too: a drop of either would delete the other's documents", write.index);
                    write.op = Op::reject("shared_index", reason, None);
                }
            }
            if !matches!(write.op, Op::Reject(_)) {
                out.last_noted = Some((write.ns.clone(), write.index.clone()));
            }
        }
        let entry = match (&self.placer.time_machine, logged) {
            (Some(tm), Some(logged)) if !matches!(write.op, Op::Reject(_)) => tm.entry(&write, logged),
            _ => None,
        };
        out.chunk.push(write);
        if let Some(entry) = entry {
            // After its write and before the change's position: the checkpoint passes the
            // change only once both are acknowledged.
            out.chunk.push(entry);
        }
        Ok(out.chunk.len() >= CHUNK)
    }

    async fn hand_on_change(&self, change: Change, out: &mut Out<'_>) -> Result<(), Error> {
        match change {
            // Placed before they were queued.
            Change::Doc(_) | Change::Unreadable(_) => {}
            Change::Position(p) => out.chunk.record(p),
            Change::Dropped { db, coll, time } => self.dropped(&db, &coll, time, out),
            Change::Sweep { existing, below } => self.sweep(&existing, below, out),
            Change::Flush => {
                out.chunk.control(Control::Flush);
                out.send().await?;
            }
            Change::Barrier(reply) => {
                out.chunk.control(Control::Barrier(reply));
                out.send().await?;
            }
        }
        Ok(())
    }

    /// Collection `db.coll` was dropped: delete its indexes (`onDrop`), after every write
    /// before, then forget it.
    fn dropped(&self, db: &str, coll: &str, time: Option<mongodb::bson::Timestamp>, out: &mut Out<'_>) {
        let ns = format!("{db}.{coll}");
        if self.delete_index_on_drop {
            let (shared, alone): (Vec<String>, Vec<String>) = self.book.indexes_of(db, coll).into_iter().partition(|i| self.placer.shared.contains(i));
            let by_records = !shared.is_empty() || self.book.is_spread(&ns);
            out.chunk.control(Control::Drop { ns: ns.clone(), indexes: alone, by_records, time });
        } else {
            info!(namespace = %ns, "collection dropped; index kept (onDrop: Keep)");
        }
        if let Some(p) = self.book.forget(&ns) {
            out.chunk.record(p);
        }
        out.last_noted = None;
    }

    /// After a re-snapshot: apply the drops of the collections that disappeared during the
    /// lost history, then sweep what the new snapshot did not see.
    fn sweep(&self, existing: &[(String, String)], below: u64, out: &mut Out<'_>) {
        let at = mongodb::bson::Timestamp::from(ClusterTime::from_version(below));
        for (db, coll) in self.gone(existing) {
            info!(namespace = %format!("{db}.{coll}"), "collection dropped during the lost history; applying its drop");
            self.dropped(&db, &coll, Some(at), out);
        }
        let located = self.placer.tracks_locations();
        out.chunk.control(Control::Sweep { indexes: self.sweepable_indexes(existing), located, below });
    }

    /// Namespaces written before (or named exactly by the pipeline) that exist no more: their
    /// drop events were lost with the history.
    fn gone(&self, existing: &[(String, String)]) -> Vec<(String, String)> {
        let named = self.placer.routing.include.iter().filter_map(|p| p.collection.as_ref().map(|c| format!("{}.{c}", p.database)));
        let mut gone: Vec<(String, String)> = self
            .book
            .namespaces()
            .into_iter()
            .chain(named)
            .filter_map(|ns| ns.split_once('.').map(|(d, c)| (d.to_string(), c.to_string())))
            .filter(|(db, coll)| self.placer.routing.includes(db, coll) && !existing.contains(&(db.clone(), coll.clone())))
            .collect();
        gone.sort();
        gone.dedup();
        gone
    }

    /// The indexes the re-snapshot sweep reads document by document, owning each by its
    /// Elasticsearch `_id`. In a sharded pipeline that is only right where the `_id` is the
    /// MongoDB `_id` (shards own documents by the MongoDB `_id`): the indexes of namespaces whose
    /// `_id` comes from a field (`mappings[].id`) or a script are swept by their location records
    /// instead, or one shard would delete live documents another shard wrote.
    fn sweepable_indexes(&self, existing: &[(String, String)]) -> Vec<String> {
        let sharded = self.shard.is_split();
        let own_ids = |db: &str, coll: &str| {
            let ns = format!("{db}.{coll}");
            !self.placer.shapes.for_ns(db, coll).custom_id() && !self.placer.scripts.as_ref().is_some_and(|s| s.may_place(&ns))
        };
        let mut indexes: Vec<String> = existing
            .iter()
            .filter(|(db, coll)| !sharded || own_ids(db, coll))
            .flat_map(|(db, coll)| self.book.indexes_of(db, coll))
            .collect();
        indexes.sort();
        indexes.dedup();
        indexes
    }
}

/// The chunk being filled for the sink.
struct Out<'a> {
    sink: &'a Sink,
    chunk: Chunk,
    /// The namespace and index noted last (most writes repeat them: no look-up then).
    last_noted: Option<(Arc<str>, Arc<str>)>,
}

impl Out<'_> {
    fn noted(&self, w: &Write) -> bool {
        self.last_noted.as_ref().is_some_and(|(ns, index)| Arc::ptr_eq(ns, &w.ns) && Arc::ptr_eq(index, &w.index))
    }

    /// The next item of `rx`. When none is waiting, the partial chunk is handed on first rather
    /// than held while the wait lasts; at the end (`None`), what is left is handed on.
    async fn next_from<T>(&mut self, rx: &mut mpsc::Receiver<T>) -> Result<Option<T>, Error> {
        if let Ok(next) = rx.try_recv() {
            return Ok(Some(next));
        }
        self.send().await?;
        let next = rx.recv().await;
        if next.is_none() {
            self.send().await?;
        }
        Ok(next)
    }

    async fn send(&mut self) -> Result<(), Error> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.chunk, Chunk::with_capacity(CHUNK));
        self.sink.send_chunk(chunk).await.map_err(Error::from)
    }
}

/// Place every chunk the source hands on, in order, into the window.
/// The documents of scripted namespaces go to the script pool as one batch per chunk.
async fn place_all(placer: &Placer, relations: Option<&Arc<Relations>>, metrics: &Metrics, mut input: mpsc::Receiver<Vec<Change>>, window: mpsc::Sender<PlacedChunk>) {
    let mut stats = ConvertStats::default();
    while let Some(changes) = input.recv().await {
        let mut items = Vec::new();
        // Sized up front: a growing vector would move every placed step again.
        let mut steps = Vec::with_capacity(changes.len());
        steps.extend(changes.into_iter().filter_map(|c| place_related(placer, relations, c, &mut stats, &mut items)));
        note_nulled(metrics, &mut stats);
        let decisions = submit(placer, items);
        if window.send(PlacedChunk { steps, decisions }).await.is_err() {
            // Handing on stopped (the sink is gone): what is left is never acknowledged.
            return;
        }
    }
}

/// Count the non-finite numbers the conversions since the last call wrote as `null`.
fn note_nulled(metrics: &Metrics, stats: &mut ConvertStats) {
    if stats.non_finite_nulled > 0 {
        metrics.non_finite_nulled.inc_by(stats.non_finite_nulled);
        *stats = ConvertStats::default();
    }
}

/// Hand the documents of a chunk its scripts decide to the script pool, as one batch.
fn submit(placer: &Placer, items: Vec<Item>) -> Option<PendingBatch<Decision>> {
    placer.scripts.as_ref().filter(|_| !items.is_empty()).map(|s| s.submit_decide_batch(items))
}

/// Place a change, starting the re-sync of what it relates to (`spec.relate`) for a
/// change-stream change of a namespace with relations. A document its scripts decide joins the
/// chunk's batch, `items`.
fn place_related(placer: &Placer, relations: Option<&Arc<Relations>>, change: Change, stats: &mut ConvertStats, items: &mut Vec<Item>) -> Option<Step> {
    let Some(relations) = relations else { return place(placer, change, stats, items) };
    let Change::Doc(doc) = &change else { return place(placer, change, stats, items) };
    let ns = format!("{}.{}", doc.db, doc.coll);
    if doc.from_snapshot || !relations.triggers(&ns) {
        return place(placer, change, stats, items);
    }
    let related = relations.resync(doc);
    let (id, version) = (doc.id.clone(), doc.version);
    let own = if doc.owned && relations.writes_own(&ns) { place(placer, change, stats, items).map(Box::new) } else { None };
    Some(Step::Related(own, related, Arc::from(ns), id, version))
}

fn place(placer: &Placer, change: Change, stats: &mut ConvertStats, items: &mut Vec<Item>) -> Option<Step> {
    match change {
        // Another shard's document, handed on for its relations only.
        Change::Doc(doc) if !doc.owned => None,
        Change::Doc(mut doc) => {
            let logged = placer.for_time_machine(&mut doc);
            match placer.place(&mut doc, stats) {
                Placed::Nothing => None,
                Placed::Write(w) => Some(Step::Write(w, logged)),
                Placed::Deferred(call) => {
                    items.push(call.item());
                    Some(Step::Deferred(call, items.len() - 1, logged))
                }
            }
        }
        Change::Unreadable(event) => {
            let w = placer.unreadable(&event, stats);
            error!(namespace = %w.ns, id = %w.id_json, error = %event.why, "unreadable change event; dead-lettered");
            Some(Step::Write(w, None))
        }
        other => Some(Step::Other(other)),
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Position;
    use crate::sink::Shared;
    use bytes::Bytes;

    fn write(index: &str, id: &str) -> Write {
        Write::new(Arc::from("db.c"), Arc::from(index), format!("\"{id}\"").into(), 1, Op::Index(Bytes::from_static(b"{}")))
    }

    fn stage(health: Arc<Health>) -> Transform {
        let metrics = Metrics::new("p");
        let routing = crate::config::Routing {
            include: vec![crate::config::NamespacePattern::parse("db.c").expect("pattern")],
            ..crate::config::Routing::default()
        };
        Transform {
            placer: Placer::new(routing.clone(), Arc::new(crate::transform::Shapes::default()), None, Arc::from("p"), metrics.clone()),
            book: IndexBook::new(Default::default(), routing),
            shard: Shard::default(),
            delete_index_on_drop: true,
            metrics,
            health,
            abort: CancellationToken::new(),
            relations: None,
        }
    }

    /// An index a script chooses is in `written` before its write is numbered: a checkpoint
    /// that covers the write (committable once it is acknowledged) also carries the index, so
    /// a drop after a crash still finds it. (Before, the decision recorded it when the sink
    /// awaited it, after later writes were numbered; this test then saw the position after the
    /// write committable without it.)
    #[tokio::test]
    async fn an_index_a_script_chooses_is_noted_before_its_write() {
        let (shared, sink, t) = fixture();
        let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
        let scripts = Arc::new(
            monsoon_script::Scripts::new(monsoon_script::Config {
                scripts: vec![monsoon_script::ScriptSource::for_namespace("db.c", "module.exports = function(doc) { doc._meta_monstache = {index: 'chosen'}; return doc; }")],
                workers: 1,
                ..monsoon_script::Config::default()
            })
            .expect("compiles"),
        );
        let plan = super::super::script::Planned { ns: "db.c".into(), source: Bytes::from_static(b"{}"), id_value: b"\"a\"".to_vec(), update: false, update_desc: None };
        let mut placed = write("db.c", "a");
        placed.origin = Some(Arc::from("record")); // a placing script's documents keep records
        let call = Call::new(scripts.clone(), plan, placed, None);
        let mut decisions = t.decisions(scripts.submit_decide_batch(vec![call.item()])).await.expect("decided");
        t.hand_on(Step::Deferred(Box::new(call), 0, None), &mut decisions, &mut out).await.expect("handed on");
        t.hand_on(Step::Other(Change::Position(Position::SnapshotDone)), &mut [], &mut out).await.expect("handed on");
        t.hand_on(Step::Write(write("db.c", "b"), None), &mut [], &mut out).await.expect("handed on");
        out.send().await.expect("sent");
        // The scripted write is the first numbered; acknowledge it alone.
        shared.ack_for_test(&[0]);
        let committable = shared.acks.take_committable();
        assert!(
            matches!(committable.as_slice(), [Position::Written { index, .. }, Position::SnapshotDone, ..] if index == "chosen"),
            "{committable:?}"
        );
    }

    /// The stage over an idle sink (nothing is delivered), and the sink's shared state.
    fn fixture() -> (Arc<Shared>, Sink, Transform) {
        let health = Arc::new(Health::new(std::time::Duration::from_secs(60)));
        let shared = Shared::new(Default::default(), Metrics::new("p"), health.clone());
        let sink = crate::sink::idle(shared.clone());
        (shared, sink, stage(health))
    }

    /// Give the stage a time machine logging the changes of `db.c`.
    fn log_changes_of_db_c(t: &mut Transform) {
        let spec: monsoon_api::TimeMachine = serde_json::from_value(serde_json::json!({"namespaces": ["db.c"]})).expect("spec");
        t.placer.time_machine = Some(crate::transform::time_machine::TimeMachine::new(&spec).expect("compiles"));
    }

    fn doc(id: &str) -> Change {
        Change::Doc(super::super::change::Doc {
            db: Arc::from("db"),
            coll: Arc::from("c"),
            id: mongodb::bson::RawBson::String(id.into()),
            doc: Some(super::super::change::Body::Own(mongodb::bson::rawdoc! {"_id": id, "n": 1})),
            version: 1,
            from_snapshot: true,
            owned: true,
            extra: None,
        })
    }

    /// Without scripts or relations each change is placed and handed on at once, in the order
    /// it came: the writes numbered in that order, the position after the write before it, the
    /// drop after the writes before it and before the write after it.
    #[tokio::test]
    async fn a_plain_pipeline_hands_on_each_change_in_order_in_one_pass() {
        let (shared, sink, t) = fixture();
        let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
        let (tx, rx) = mpsc::channel(4);
        tx.send(vec![doc("a"), Change::Position(Position::SnapshotDone)]).await.expect("queued");
        tx.send(vec![Change::Dropped { db: "db".into(), coll: "c".into(), time: None }, doc("b")]).await.expect("queued");
        drop(tx);
        t.place_and_hand_on(rx, &mut out).await.expect("handed on");
        assert!(out.chunk.is_empty(), "everything handed on once the input ended");
        // Write a (0), the drop (1), write b (2). Acknowledge the writes, not the drop.
        shared.ack_for_test(&[0, 2]);
        let committable = shared.acks.take_committable();
        assert!(matches!(committable.as_slice(), [Position::Written { .. }, Position::SnapshotDone]), "{committable:?}");
        shared.ack_for_test(&[1]);
        let committable = shared.acks.take_committable();
        assert!(
            matches!(committable.as_slice(), [Position::Forgotten { .. }, Position::Written { index, .. }] if index == "db.c"),
            "{committable:?}"
        );
    }

    /// A drop deletes every index the namespace wrote, after the writes before it, and the
    /// namespace is forgotten only after the drop: a checkpoint that forgot it has its drop
    /// done, and a collection created again under the name is noted afresh.
    #[tokio::test]
    async fn a_namespace_is_forgotten_after_its_drop_and_noted_again_after() {
        let (shared, sink, t) = fixture();
        let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
        t.hand_on(Step::Write(write("db.c", "a"), None), &mut [], &mut out).await.expect("handed on");
        t.hand_on(Step::Other(Change::Dropped { db: "db".into(), coll: "c".into(), time: None }), &mut [], &mut out).await.expect("handed on");
        t.hand_on(Step::Write(write("db.c", "b"), None), &mut [], &mut out).await.expect("handed on");
        out.send().await.expect("sent");
        // Write 0, the drop (1), write 2. Acknowledge the writes, not the drop.
        shared.ack_for_test(&[0, 2]);
        let committable = shared.acks.take_committable();
        assert!(matches!(committable.as_slice(), [Position::Written { .. }]), "nothing past the drop before it is done: {committable:?}");
        shared.ack_for_test(&[1]);
        let committable = shared.acks.take_committable();
        assert!(
            matches!(committable.as_slice(), [Position::Forgotten { .. }, Position::Written { index, .. }] if index == "db.c"),
            "{committable:?}"
        );
    }

    /// A logged change becomes its write and then its entry, both before the change's
    /// position; the log index is never noted in `written`, so the re-snapshot sweep and the
    /// collection's drop delete only its own index and the log stays.
    #[tokio::test]
    async fn a_drop_never_deletes_the_time_machine_log() {
        let (shared, sink, mut t) = fixture();
        log_changes_of_db_c(&mut t);
        let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
        let logged = Logged { source_id: "a".into(), has_time: false };
        t.hand_on(Step::Write(write("db.c", "a"), Some(logged.clone())), &mut [], &mut out).await.expect("handed on");
        t.hand_on(Step::Other(Change::Position(Position::SnapshotDone)), &mut [], &mut out).await.expect("handed on");
        assert_eq!(out.chunk.len(), 2, "the write and its entry");
        let mut delete = write("db.c", "a");
        delete.op = Op::Delete;
        t.hand_on(Step::Write(delete, Some(logged)), &mut [], &mut out).await.expect("handed on");
        assert_eq!(out.chunk.len(), 3, "a delete is not logged");
        assert_eq!(t.book.indexes_of("db", "c"), ["db.c"]);
        // The re-snapshot sweep, then the drop: each names the collection's index only.
        t.sweep(&[("db".to_string(), "c".to_string())], 1, &mut out);
        t.dropped("db", "c", None, &mut out);
        let deleting: Vec<&Vec<String>> = out
            .chunk
            .controls()
            .filter_map(|c| match c {
                Control::Drop { indexes, .. } | Control::Sweep { indexes, .. } => Some(indexes),
                _ => None,
            })
            .collect();
        assert_eq!(deleting, [&vec!["db.c".to_string()], &vec!["db.c".to_string()]]);
        // The entry (second write) is acknowledged with its write before the position passes.
        out.send().await.expect("sent");
        shared.ack_for_test(&[0]);
        let committable = shared.acks.take_committable();
        assert!(!committable.iter().any(|p| matches!(p, Position::SnapshotDone)), "passed an unacknowledged entry: {committable:?}");
        shared.ack_for_test(&[1]);
        let committable = shared.acks.take_committable();
        assert!(committable.iter().any(|p| matches!(p, Position::SnapshotDone)), "{committable:?}");
    }

    /// The one-pass loop of a plain pipeline still logs the changes a time machine names (the
    /// write, then its entry) and writes nothing for a document another shard owns.
    #[tokio::test]
    async fn a_plain_pipeline_logs_its_changes_and_skips_other_shards_documents() {
        let (_shared, sink, mut t) = fixture();
        log_changes_of_db_c(&mut t);
        let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
        let mut stats = ConvertStats::default();
        let streamed = |id: &str, owned: bool| match doc(id) {
            Change::Doc(d) => Doc { from_snapshot: false, owned, ..d },
            _ => unreachable!("doc() makes a document change"),
        };
        assert!(!t.place_doc(&mut streamed("a", true), &mut stats, &mut out).expect("placed"));
        assert_eq!(out.chunk.len(), 2, "the write and its time machine entry");
        assert!(!t.place_doc(&mut streamed("b", false), &mut stats, &mut out).expect("placed"));
        assert_eq!(out.chunk.len(), 2, "nothing for another shard's document");
    }

    /// Another namespace already writes the index: a write at its namespace's own index stops
    /// the stage (the pipeline's indexes overlap; no drop could tell their documents apart),
    /// while a write at an index its document chose is dead-lettered and the stage goes on.
    #[tokio::test]
    async fn an_index_another_namespace_writes_stops_the_stage_or_refuses_the_chosen_write() {
        let (_shared, sink, mut t) = fixture();
        let routing = crate::config::Routing {
            include: vec![crate::config::NamespacePattern::parse("db.*").expect("pattern")],
            ..crate::config::Routing::default()
        };
        t.book = IndexBook::new(Default::default(), routing.clone());
        t.placer.routing = routing;
        let mut out = Out { sink: &sink, chunk: Chunk::default(), last_noted: None };
        let at = |ns: &str, index: &str| Write::new(Arc::from(ns), Arc::from(index), "\"a\"".into(), 1, Op::Index(Bytes::from_static(b"{}")));
        // db.d's documents chose indexes `x` and `db.e`.
        t.stage_write(at("db.d", "x"), None, &mut out).expect("staged");
        t.stage_write(at("db.d", "db.e"), None, &mut out).expect("staged");
        // A db.c document chooses `x`: refused alone.
        t.stage_write(at("db.c", "x"), None, &mut out).expect("staged");
        assert!(matches!(&out.chunk.writes()[2].op, Op::Reject(r) if r.error_type == "shared_index"), "{:?}", out.chunk.writes()[2].op);
        // db.e writes its own index, `db.e`: the stage stops.
        let stopped = t.stage_write(at("db.e", "db.e"), None, &mut out);
        assert!(matches!(&stopped, Err(Error::SharedIndex { index, first, second }) if index == "db.e" && first == "db.d" && second == "db.e"), "{stopped:?}");
    }
}
