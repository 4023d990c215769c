//! monsoon's sync engine: MongoDB snapshot + change streams into Elasticsearch bulk indexing.
//!
//! Stages: source ([`source::mongodb`]) → convert ([`convert`]) → batch and bulk
//! ([`sink`]) → acknowledge ([`checkpoint::tracker`]) → checkpoint ([`checkpoint`]).
//! Only the two ends touch the network; everything between is plain functions.
//!
//! [`run`] drives one pipeline from start-up to graceful shutdown.

pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod http;
pub mod metrics;
pub mod retry;
pub mod sink;
pub mod source;
pub mod time;
pub mod transform;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument};

use crate::checkpoint::{Checkpoint, CheckpointStore, ClusterTime, Position};
use crate::config::{EngineConfig, HistoryLost};
use crate::metrics::{Health, Metrics, Phase};
use crate::sink::elasticsearch::Elastic;
use crate::sink::{Shared, Sink, SinkSettings};
use crate::source::mongodb::{self as mongo, Ended, Source, StreamStart};

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Elasticsearch could not be used at start-up.
    #[error("failed to start the Elasticsearch sink")]
    Elastic(#[from] sink::elasticsearch::Error),
    /// MongoDB could not be used, or the stream cannot continue.
    #[error("MongoDB source failed")]
    Source(#[from] mongo::Error),
    /// A mapping does not compile (validation refuses these first).
    #[error("invalid mapping: {0}")]
    Mapping(String),
    /// The checkpoint could not be read or written.
    #[error("checkpoint failed")]
    Checkpoint(#[from] checkpoint::Error),
    /// A target index holds documents with external versions far beyond monsoon's for the
    /// current time: another tool (Monstache versions `oplog seconds << 32 | increment`) built it,
    /// and every monsoon write to those documents would lose as stale.
    #[error("index `{index}` holds documents versioned {found}, far beyond what monsoon writes now ({ours}): another tool (Monstache?) built it with larger external versions, so monsoon's writes to those documents would be refused as stale and they would freeze. Sync into a new index (`spec.indexes`) and move readers with an alias, or delete the index to rebuild it")]
    ForeignVersions {
        /// The index.
        index: String,
        /// The largest version seen there.
        found: u64,
        /// monsoon's version for the current cluster time.
        ours: u64,
    },
}

/// A whole error chain on one line: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Options of one run that are not part of the pipeline's definition.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// After shutdown is requested, how long in-flight bulks may take before they are
    /// abandoned (they are then replayed on the next start).
    pub shutdown_grace: Duration,
    /// Abandons in-flight bulk requests at once when cancelled (a worker that lost its lease
    /// must not write anything more); cancel `shutdown` too.
    pub hard_stop: CancellationToken,
    /// Stop once the snapshot is read and every write of it acknowledged, instead of following
    /// the stream (`monsoon run --once`); the checkpoint keeps the stream's start, so a later
    /// run follows the changes made since.
    pub exit_after_snapshot: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(20),
            hard_stop: CancellationToken::new(),
            exit_after_snapshot: false,
        }
    }
}

/// Run one pipeline until `shutdown` fires or it fails.
///
/// # Errors
/// Start-up failures (unreachable servers, refused credentials, unusable checkpoint) and
/// fatal stream errors (history lost under policy `Fail`). Transient failures are retried.
pub async fn run<S: CheckpointStore>(
    config: EngineConfig,
    store: S,
    metrics: Metrics,
    health: Arc<Health>,
    shutdown: CancellationToken,
    options: RunOptions,
) -> Result<(), Error> {
    let result = run_inner(&config, store, &metrics, &health, shutdown, options).await;
    match &result {
        Ok(()) => health.set_phase(Phase::Stopped),
        Err(e) => health.fail(error_chain(e)),
    }
    result
}

async fn run_inner<S: CheckpointStore>(
    config: &EngineConfig,
    store: S,
    metrics: &Metrics,
    health: &Arc<Health>,
    shutdown: CancellationToken,
    options: RunOptions,
) -> Result<(), Error> {
    let name = config.name.as_str();
    let es = Elastic::new(&config.elasticsearch)?;
    let server = es.info().await?;
    info!(pipeline = %name, distribution = %server.distribution, version = %server.version, "Elasticsearch reachable");
    let client = mongo::connect(&config.mongodb).await?;
    info!(pipeline = %name, "MongoDB reachable");

    let location = store.location();
    let mut cp = match store.load().await? {
        Some(cp) => {
            cp.check(name, config.shard, &location)?;
            info!(pipeline = %name, checkpoint = %location, snapshot_done = cp.snapshot.done, has_token = cp.resume_token.is_some(), "checkpoint loaded");
            cp
        }
        None => Checkpoint {
            shard: config.shard.is_split().then_some(config.shard),
            ..Checkpoint::new(name)
        },
    };
    if let Some(token) = config.resnapshot.as_ref().filter(|t| cp.resnapshot_token.as_ref() != Some(*t)) {
        if cp.stream_start.is_some() {
            // Asked for by hand (after an incident, a restore): as after lost history, snapshot
            // every collection again at a new stream start, then sweep what it did not see.
            let t1 = mongo::cluster_time(&client).await?;
            cp.apply(&Position::Reset { stream_start: t1 });
            warn!(pipeline = %name, token = %token, "re-snapshot requested: snapshotting every collection again, then deleting what the new snapshot does not see");
        }
        cp.resnapshot_token = Some(token.clone());
        store.save(&cp).await?;
    }
    let stream_start = match cp.stream_start {
        Some(t) => t,
        None => {
            // Record where the stream starts before the first snapshot read (no gap).
            let t0 = match config.stream_from {
                None => mongo::cluster_time(&client).await?,
                Some(config::StreamFrom::Seconds(t)) => ClusterTime { t, i: 0 },
                Some(config::StreamFrom::Oldest) => mongo::oldest_oplog_time(&client).await?,
            };
            cp.stream_start = Some(t0);
            if !config.snapshot {
                cp.snapshot.done = true;
            }
            // A pipeline that does not snapshot covers its namespaces from the stream start.
            cp.snapshot.coverage = (!config.snapshot).then(|| config.routing.coverage());
            store.save(&cp).await?;
            info!(pipeline = %name, t = t0.t, i = t0.i, "new pipeline: stream start recorded");
            t0
        }
    };
    check_target_versions(&es, config, mongo::cluster_time(&client).await?).await?;
    let resume_token = cp.resume_token(&location)?;
    es.create_index_if_missing(&config.dead_letter_index, &sink::dead_letter::index_body())
        .await?;
    let shapes = transform::Shapes::new(&config.mappings).map_err(Error::Mapping)?;
    let scripts = if config.scripts.is_empty() {
        None
    } else {
        let lookup = transform::script::MongoLookup {
            client: client.clone(),
            handle: tokio::runtime::Handle::current(),
            max_bytes: config.scripts.limits.memory_limit,
        };
        let scripts = monsoon_script::Scripts::with_lookup(config.scripts.clone(), Arc::new(lookup)).map_err(|e| Error::Mapping(e.to_string()))?;
        info!(pipeline = %name, workers = scripts.workers(), "scripts compiled");
        Some(Arc::new(scripts))
    };
    if shapes.tracks_any() || scripts.is_some() {
        es.create_index_if_missing(&config.locations_index, &sink::locations::index_body()).await?;
    }

    let shared = Shared::new(metrics.clone(), health.clone());
    let abort = options.hard_stop.child_token();
    let sink = Sink::start(
        es,
        SinkSettings {
            batch: config.batch.clone(),
            dead_letter_index: Arc::from(config.dead_letter_index.as_str()),
            pipeline: Arc::from(name),
            locations: (shapes.tracks_any() || scripts.is_some()).then(|| Arc::from(config.locations_index.as_str())),
        },
        shared.clone(),
        abort.clone(),
    );

    let snapshot_progress = cp.snapshot.clone();
    let sweep_below = cp.sweep_below;
    let written = cp.written.clone();
    let resume = resume_token.map(|token| {
        if cp.resume_after_invalidate {
            StreamStart::StartAfter(token)
        } else {
            StreamStart::ResumeAfter(token)
        }
    });
    let stop_checkpointer = CancellationToken::new();
    let checkpointer = {
        let committer = Committer::new(cp, store, shared.clone());
        let stop = stop_checkpointer.clone();
        let interval = config.checkpoint_interval;
        let final_deadline = options.shutdown_grace;
        let fence = shutdown.clone();
        let fence_abort = abort.clone();
        tokio::spawn(
            committer
                .run(interval, stop, final_deadline, move || {
                    fence_abort.cancel();
                    fence.cancel();
                })
                .instrument(tracing::info_span!("checkpointer", pipeline = %name.to_string())),
        )
    };

    let source = Source {
        client,
        routing: &config.routing,
        sink: &sink,
        metrics,
        health,
        cancel: shutdown.clone(),
        delete_index_on_drop: config.delete_index_on_drop,
        route_cache: std::sync::Mutex::new(None),
        id_scratch: std::sync::Mutex::new(Vec::with_capacity(64)),
        shard: config.shard,
        written: Arc::new(checkpoint::written::IndexBook::new(written, shared.clone(), config.routing.clone())),
        shapes: &shapes,
        pipeline: name,
        scripts: scripts.clone(),
    };
    let mut start = Start {
        stream_start,
        resume,
        snapshot: snapshot_progress,
        sweep_below,
    };
    let result = loop {
        // Every log line of the source carries the pipeline's name.
        let span = tracing::info_span!("source", pipeline = %name);
        match run_source(config, &source, &sink, &start, options.exit_after_snapshot).instrument(span).await {
            Err(mongo::Error::HistoryLost { code }) if config.on_history_lost == HistoryLost::Resnapshot => {
                // Nothing is skipped silently: say so loudly, then rebuild.
                error!(pipeline = %name, code, "change stream history lost; onHistoryLost=Resnapshot: snapshotting every collection again, then deleting what the new snapshot does not see");
                let drained = tokio::select! {
                    r = sink.barrier() => r.is_ok(),
                    () = shutdown.cancelled() => false,
                };
                if !drained {
                    break Ok(());
                }
                let t1 = match mongo::cluster_time(&source.client).await {
                    Ok(t) => t,
                    Err(e) => break Err(e),
                };
                sink.record(Position::Reset { stream_start: t1 });
                start = Start {
                    stream_start: t1,
                    resume: None,
                    snapshot: checkpoint::SnapshotProgress::default(),
                    sweep_below: Some(t1.version()),
                };
            }
            other => break other,
        }
    };
    // Shutdown while waiting on the sink is a clean stop, not a failure.
    let result = match result {
        Err(mongo::Error::Cancelled) => Ok(()),
        other => other,
    };
    drop(source);

    // Shutdown: the source has stopped reading. Hand over what it staged, then let the sink
    // deliver what it holds.
    if tokio::time::timeout(options.shutdown_grace, sink.flush_staged()).await.is_err() {
        warn!(pipeline = %name, "staged writes could not be handed over within the grace period; they are replayed on the next start");
    }
    let closing = sink.close();
    tokio::pin!(closing);
    tokio::select! {
        () = &mut closing => {}
        () = tokio::time::sleep(options.shutdown_grace) => {
            warn!(pipeline = %name, "in-flight bulk requests did not finish within the shutdown grace period; abandoning them (they are replayed on the next start)");
            abort.cancel();
            closing.await;
        }
    }
    stop_checkpointer.cancel();
    match checkpointer.await {
        Err(e) => error!(pipeline = %name, error = %e, "checkpointer task failed; the next start resumes from the last checkpoint stored"),
        Ok(Err(e)) => return Err(Error::Checkpoint(e)),
        Ok(Ok(())) => info!(pipeline = %name, "final checkpoint written"),
    }
    result.map_err(Error::from)
}

/// Versions more than this far ahead of the current cluster time cannot be monsoon's (its
/// versions are cluster times; a day covers any clock skew between MongoDB members).
const FOREIGN_VERSION_MARGIN: u64 = 86_400 << 32;

/// Refuse to start on target indexes another tool versioned beyond monsoon's scale (see
/// [`Error::ForeignVersions`]); a sample of their documents is enough, since such a tool
/// versions every document it writes that way.
async fn check_target_versions(es: &Elastic, config: &EngineConfig, now: ClusterTime) -> Result<(), Error> {
    let mut targets: Vec<String> = config
        .routing
        .include
        .iter()
        .map(|p| match &p.collection {
            Some(c) => config.routing.index_for(&p.database, c),
            None => format!("{}.*", p.database.to_lowercase()),
        })
        .chain(config.routing.indexes.values().cloned())
        .collect();
    targets.sort();
    targets.dedup();
    // Indexes a regular expression selects are not known before the collections are listed;
    // they are not sampled (an empty list would search every index).
    if targets.is_empty() {
        return Ok(());
    }
    let ours = now.version();
    if let Some((index, found)) = es.largest_version(&targets.join(","), 20).await? {
        if found > ours.saturating_add(FOREIGN_VERSION_MARGIN) {
            return Err(Error::ForeignVersions { index, found, ours });
        }
    }
    Ok(())
}

/// Where the source starts: from the checkpoint, or anew after lost history.
struct Start {
    stream_start: ClusterTime,
    /// After the last acknowledged change, when the checkpoint has one.
    resume: Option<StreamStart>,
    snapshot: checkpoint::SnapshotProgress,
    sweep_below: Option<u64>,
}

/// Snapshot what needs it, sweep after a re-snapshot, then follow the stream until
/// cancelled or failed (or, with `once`, return when every snapshot write is acknowledged).
async fn run_source(
    config: &EngineConfig,
    source: &Source<'_>,
    sink: &Sink,
    start: &Start,
    once: bool,
) -> Result<(), mongo::Error> {
    let name = config.name.as_str();
    let health = source.health;
    let current = config.routing.coverage();
    if !start.snapshot.done {
        health.set_phase(Phase::Snapshotting);
        // A re-snapshot after lost history reads everything (see `EngineConfig::snapshots`).
        let resnapshot = start.sweep_below.is_some();
        let collections: Vec<(String, String)> = source.collections().await?.into_iter().filter(|(db, coll)| resnapshot || config.snapshots(db, coll)).collect();
        info!(pipeline = %name, collections = collections.len(), "snapshot started");
        let estimate = mongo::estimate_documents(&source.client, &collections).await / u64::from(config.shard.count.max(1));
        source.metrics.snapshot_estimate.set(i64::try_from(estimate).unwrap_or(i64::MAX));
        for (db, coll) in collections {
            let ns = format!("{db}.{coll}");
            let progress = start.snapshot.collections.get(&ns);
            if progress.is_some_and(|p| p.done) {
                continue;
            }
            let resume = progress
                .and_then(|p| p.last_id.as_ref())
                .and_then(mongo::id_from_json);
            if source.snapshot_collection(&db, &coll, resume, start.stream_start.version()).await? == Ended::Cancelled {
                return Ok(());
            }
        }
        sink.record(Position::SnapshotDone);
        info!(pipeline = %name, "snapshot read complete; following the change stream");
    } else if config.snapshot {
        // Namespaces added to the pipeline since the checkpoint's coverage was recorded
        // were never snapshotted: read them now, versioned at the current cluster time,
        // before the stream resumes (its older events for them then lose as stale).
        let covered = start
            .snapshot
            .coverage
            .as_ref()
            .map(config::Routing::from_coverage)
            .unwrap_or_else(|| config.routing.clone());
        let added: Vec<(String, String)> = source
            .collections()
            .await?
            .into_iter()
            .filter(|(db, coll)| !covered.includes(db, coll) && config.snapshots(db, coll))
            .collect();
        if !added.is_empty() {
            health.set_phase(Phase::Snapshotting);
            let version = mongo::cluster_time(&source.client).await?.version();
            info!(pipeline = %name, collections = added.len(), "namespaces added to the pipeline; snapshotting them");
            for (db, coll) in added {
                if source.snapshot_collection(&db, &coll, None, version).await? == Ended::Cancelled {
                    return Ok(());
                }
            }
        }
    }
    sink.record(Position::Coverage(current));
    if let Some(below) = start.sweep_below {
        if sweep(config, source, sink, below).await? == Ended::Cancelled {
            return Ok(());
        }
    }
    if once {
        info!(pipeline = %name, "--once: waiting until Elasticsearch acknowledged every write");
        tokio::select! {
            r = sink.barrier() => r?,
            () = source.cancel.cancelled() => {}
        }
        return Ok(());
    }
    let stream_start = start.resume.clone().unwrap_or(StreamStart::At(start.stream_start));
    source.stream(stream_start).await.map(|_| ())
}

/// After a re-snapshot: once every snapshot write is acknowledged, apply the drops of the
/// collections that disappeared during the lost history, then delete from each remaining
/// index the documents older than the new snapshot (they were deleted during the gap).
///
/// # Errors
/// Only when the sink closed.
async fn sweep(config: &EngineConfig, source: &Source<'_>, sink: &Sink, below: u64) -> Result<Ended, mongo::Error> {
    let drained = tokio::select! {
        r = sink.barrier() => r.is_ok(),
        () = source.cancel.cancelled() => false,
    };
    if !drained {
        return Ok(Ended::Cancelled);
    }
    let mut backoff = retry::Backoff::default();
    loop {
        let existing = match source.collections().await {
            Ok(c) => c,
            Err(mongo::Error::Cancelled) => return Ok(Ended::Cancelled),
            Err(e) => return Err(e),
        };
        // Dropped during the gap: written before (or named exactly by the pipeline), gone now.
        // Their drop events were lost with the history: apply them as the events would have.
        let known: Vec<String> = source.written.namespaces();
        let named = config.routing.include.iter().filter_map(|p| p.collection.as_ref().map(|c| format!("{}.{c}", p.database)));
        let mut gone: Vec<(String, String)> = known
            .into_iter()
            .chain(named)
            .filter_map(|ns| ns.split_once('.').map(|(d, c)| (d.to_string(), c.to_string())))
            .filter(|(db, coll)| config.routing.includes(db, coll) && !existing.contains(&(db.clone(), coll.clone())))
            .collect();
        gone.sort();
        gone.dedup();
        let at = mongodb::bson::Timestamp::from(ClusterTime::from_version(below));
        for (db, coll) in &gone {
            info!(pipeline = %config.name, namespace = %format!("{db}.{coll}"), "collection dropped during the lost history; applying its drop");
            match source.drop_index(db, coll, Some(at)).await {
                Ok(()) => {}
                Err(mongo::Error::Cancelled) => return Ok(Ended::Cancelled),
                Err(e) => return Err(e),
            }
        }
        let indexes = sweepable_indexes(config, source, &existing);
        let mut failed = false;
        for index in &indexes {
            let shard = config.shard;
            match sink.delete_older(index, below, |id| shard.owns(id)).await {
                Ok(n) => info!(pipeline = %config.name, index = %index, deleted = n, "swept documents deleted during the lost history"),
                Err(e) => {
                    warn!(pipeline = %config.name, index = %index, error = %error_chain(&e), "sweep failed; retrying");
                    failed = true;
                    break;
                }
            }
        }
        if !failed && sink.tracks_locations() {
            let shard = config.shard;
            match sink.sweep_located(below, |mongo_id| shard.owns(mongo_id)).await {
                Ok(n) => info!(pipeline = %config.name, deleted = n, "swept documents deleted during the lost history (by their location records)"),
                Err(e) => {
                    warn!(pipeline = %config.name, error = %error_chain(&e), "sweep of located documents failed; retrying");
                    failed = true;
                }
            }
        }
        if !failed {
            sink.record(Position::SweepDone);
            return Ok(Ended::Complete);
        }
        if backoff.wait(&source.cancel).await.is_err() {
            return Ok(Ended::Cancelled);
        }
    }
}

/// The indexes the re-snapshot sweep reads document by document, owning each by its
/// Elasticsearch `_id`. In a sharded pipeline that is only right where the `_id` is the MongoDB
/// `_id` (shards own documents by the MongoDB `_id`): the indexes of namespaces whose `_id`
/// comes from a field (`mappings[].id`) or a script are swept by their location records instead
/// ([`Sink::sweep_located`]), or one shard would delete live documents another shard wrote.
fn sweepable_indexes(config: &EngineConfig, source: &Source<'_>, existing: &[(String, String)]) -> Vec<String> {
    let own_ids = |db: &str, coll: &str| {
        let ns = format!("{db}.{coll}");
        !source.shapes.for_ns(db, coll).custom_id() && !source.scripts.as_ref().is_some_and(|s| s.has_map(&ns))
    };
    let mut indexes: Vec<String> = existing
        .iter()
        .filter(|(db, coll)| !config.shard.is_split() || own_ids(db, coll))
        .flat_map(|(db, coll)| source.indexes_of(db, coll))
        .collect();
    indexes.sort();
    indexes.dedup();
    indexes
}

/// The checkpointer's side of the checkpoint: the latest state with every committable
/// position folded in, and whether the store is behind it.
///
/// # Invariants
/// A failed write leaves `unsaved` set, so the next tick writes again even when no new
/// position arrived; "final checkpoint written" is reported only after a write succeeded.
struct Committer<S> {
    cp: Checkpoint,
    store: S,
    shared: Arc<Shared>,
    unsaved: bool,
}

impl<S: CheckpointStore> Committer<S> {
    fn new(cp: Checkpoint, store: S, shared: Arc<Shared>) -> Self {
        Self { cp, store, shared, unsaved: false }
    }

    /// Fold committable positions in and, when the stored copy is behind, store it.
    ///
    /// # Errors
    /// The store's error; `unsaved` stays set so the next call writes again.
    async fn commit(&mut self) -> Result<(), checkpoint::Error> {
        let positions = self.shared.take_committable();
        for p in &positions {
            self.cp.apply(p);
        }
        self.unsaved |= !positions.is_empty();
        if !self.unsaved {
            return Ok(());
        }
        self.store.save(&self.cp).await?;
        self.unsaved = false;
        let m = &self.shared.metrics;
        m.checkpoints.inc();
        m.checkpoint_time.set(time::unix_seconds());
        if let Some(t) = self.cp.stream_time {
            m.checkpoint_event_time.set(i64::from(t.t));
        }
        Ok(())
    }

    /// Commit every `interval` until `stop`, then write the final checkpoint, retrying a failed
    /// write for up to `final_limit`. A fenced store (another worker holds the lease) calls
    /// `fence` at once and never writes again.
    ///
    /// # Errors
    /// Fenced, or the final checkpoint could not be stored within `final_limit` (the next
    /// start then resumes from the last one stored, replaying what came after it).
    async fn run(
        mut self,
        interval: Duration,
        stop: CancellationToken,
        final_limit: Duration,
        fence: impl FnOnce(),
    ) -> Result<(), checkpoint::Error> {
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = stop.cancelled() => break,
            }
            match self.commit().await {
                Ok(()) => {}
                Err(e @ checkpoint::Error::Fenced { .. }) => {
                    error!(error = %error_chain(&e), "checkpoint lease lost; stopping at once");
                    fence();
                    return Err(e);
                }
                Err(e) => error!(error = %error_chain(&e), "failed to store checkpoint; retrying at the next tick"),
            }
        }
        // Final checkpoint: everything acknowledged before shutdown.
        let deadline = tokio::time::Instant::now() + final_limit;
        let mut backoff = retry::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            match self.commit().await {
                Ok(()) => return Ok(()),
                Err(e @ checkpoint::Error::Fenced { .. }) => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if tokio::time::Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    warn!(error = %error_chain(&e), "failed to store the final checkpoint; retrying");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A store whose first `fail` writes fail, then succeed; counts successful writes.
    #[derive(Default)]
    struct Flaky {
        fail: AtomicUsize,
        saved: std::sync::Mutex<Vec<Checkpoint>>,
    }

    impl CheckpointStore for Arc<Flaky> {
        fn location(&self) -> String {
            "flaky".into()
        }
        async fn load(&self) -> Result<Option<Checkpoint>, checkpoint::Error> {
            Ok(None)
        }
        async fn save(&self, cp: &Checkpoint) -> Result<(), checkpoint::Error> {
            if self.fail.load(Ordering::SeqCst) > 0 {
                self.fail.fetch_sub(1, Ordering::SeqCst);
                return Err(checkpoint::Error::Io {
                    op: "write",
                    location: "flaky".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            self.saved.lock().unwrap_or_else(|p| p.into_inner()).push(cp.clone());
            Ok(())
        }
    }

    fn shared() -> Arc<Shared> {
        Shared::new(Metrics::new("p"), Arc::new(Health::new(Duration::from_secs(60))))
    }

    #[tokio::test]
    async fn a_failed_checkpoint_write_is_retried_without_new_positions() {
        let store = Arc::new(Flaky { fail: AtomicUsize::new(1), ..Flaky::default() });
        let shared = shared();
        let mut committer = Committer::new(Checkpoint::new("p"), store.clone(), shared.clone());
        shared.record(Position::SnapshotDone);
        assert!(committer.commit().await.is_err(), "the first write fails");
        // No new position arrives; the next tick must still store the snapshot's end.
        committer.commit().await.expect("second write");
        let saved = store.saved.lock().expect("lock").clone();
        assert_eq!(saved.len(), 1, "the failed write is retried");
        assert!(saved[0].snapshot.done);
        // Nothing new and nothing unsaved: no needless write.
        committer.commit().await.expect("idle");
        assert_eq!(store.saved.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn the_final_checkpoint_is_reported_failed_when_it_cannot_be_stored() {
        let store = Arc::new(Flaky { fail: AtomicUsize::new(usize::MAX), ..Flaky::default() });
        let shared = shared();
        shared.record(Position::SnapshotDone);
        let committer = Committer::new(Checkpoint::new("p"), store.clone(), shared);
        let stop = CancellationToken::new();
        stop.cancel();
        let result = committer.run(Duration::from_secs(60), stop, Duration::from_millis(500), || {}).await;
        assert!(matches!(result, Err(checkpoint::Error::Io { .. })), "{result:?}");
        assert!(store.saved.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn the_final_checkpoint_write_is_retried_within_the_grace_period() {
        let store = Arc::new(Flaky { fail: AtomicUsize::new(2), ..Flaky::default() });
        let shared = shared();
        shared.record(Position::SnapshotDone);
        let committer = Committer::new(Checkpoint::new("p"), store.clone(), shared);
        let stop = CancellationToken::new();
        stop.cancel();
        committer.run(Duration::from_secs(60), stop, Duration::from_secs(10), || {}).await.expect("stored after retries");
        assert!(store.saved.lock().expect("lock")[0].snapshot.done);
    }
}
