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
    /// The checkpoint could not be read or written.
    #[error("checkpoint failed")]
    Checkpoint(#[from] checkpoint::Error),
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
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            shutdown_grace: Duration::from_secs(20),
            hard_stop: CancellationToken::new(),
        }
    }
}

/// Mapping of the dead-letter index: records are kept whole but only the routing fields are
/// indexed, so no refused document can make its own record fail on a mapping conflict.
fn dead_letter_index_body() -> serde_json::Value {
    serde_json::json!({
        "settings": {"index": {"number_of_shards": 1}},
        "mappings": {
            "dynamic": false,
            "properties": {
                "pipeline": {"type": "keyword"},
                "namespace": {"type": "keyword"},
                "index": {"type": "keyword"},
                "id": {"type": "keyword"},
                "op": {"type": "keyword"},
                "status": {"type": "integer"},
                "errorType": {"type": "keyword"},
                "reason": {"type": "text"},
                "failedAt": {"type": "date"},
                "document": {"type": "text", "index": false}
            }
        }
    })
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
    let stream_start = match cp.stream_start {
        Some(t) => t,
        None => {
            // Record where the stream starts before the first snapshot read (no gap).
            let t0 = mongo::cluster_time(&client).await?;
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
    let resume_token = cp.resume_token(&location)?;
    es.create_index_if_missing(&config.dead_letter_index, &dead_letter_index_body())
        .await?;

    let shared = Shared::new(metrics.clone(), health.clone());
    let abort = options.hard_stop.child_token();
    let sink = Sink::start(
        es,
        SinkSettings {
            batch: config.batch.clone(),
            dead_letter_index: Arc::from(config.dead_letter_index.as_str()),
            pipeline: Arc::from(name),
        },
        shared.clone(),
        abort.clone(),
    );

    let snapshot_progress = cp.snapshot.clone();
    let sweep_below = cp.sweep_below;
    let stop_checkpointer = CancellationToken::new();
    let checkpointer = {
        let shared = shared.clone();
        let stop = stop_checkpointer.clone();
        let interval = config.checkpoint_interval;
        let fence = shutdown.clone();
        let fence_abort = abort.clone();
        tokio::spawn(
            async move {
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(interval) => {}
                        () = stop.cancelled() => break,
                    }
                    if let Err(e) = commit(&shared, &mut cp, &store).await {
                        // Fenced: stop the whole pipeline at once (in-flight bulks abandoned);
                        // never write again.
                        error!(error = %error_chain(&e), "checkpoint lease lost; stopping at once");
                        fence_abort.cancel();
                        fence.cancel();
                        return Some(e);
                    }
                }
                // Final checkpoint: everything acknowledged before shutdown.
                commit(&shared, &mut cp, &store).await.err()
            }
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
    };
    let mut start = Start {
        stream_start,
        resume_token,
        snapshot: snapshot_progress,
        sweep_below,
    };
    let result = loop {
        match run_source(config, &source, &sink, &start).await {
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
                    resume_token: None,
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
        Err(e) => error!(pipeline = %name, error = %e, "checkpointer task failed"),
        Ok(Some(fenced)) => return Err(Error::Checkpoint(fenced)),
        Ok(None) => info!(pipeline = %name, "final checkpoint written"),
    }
    result.map_err(Error::from)
}

/// Where the source starts: from the checkpoint, or anew after lost history.
struct Start {
    stream_start: ClusterTime,
    resume_token: Option<mongodb::change_stream::event::ResumeToken>,
    snapshot: checkpoint::SnapshotProgress,
    sweep_below: Option<u64>,
}

/// Snapshot what needs it, sweep after a re-snapshot, then follow the stream until
/// cancelled or failed.
async fn run_source(
    config: &EngineConfig,
    source: &Source<'_>,
    sink: &Sink,
    start: &Start,
) -> Result<(), mongo::Error> {
    let name = config.name.as_str();
    let health = source.health;
    let current = config.routing.coverage();
    if !start.snapshot.done {
        health.set_phase(Phase::Snapshotting);
        let collections = mongo::list_collections(&source.client, &config.routing)
            .await
            .map_err(|e| mongo::Error::Unreachable(e.to_string()))?;
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
        let added: Vec<(String, String)> = mongo::list_collections(&source.client, &config.routing)
            .await
            .map_err(|e| mongo::Error::Unreachable(e.to_string()))?
            .into_iter()
            .filter(|(db, coll)| !covered.includes(db, coll))
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
        if sweep(config, source, sink, below).await == Ended::Cancelled {
            return Ok(());
        }
    }
    let stream_start = match &start.resume_token {
        Some(token) => StreamStart::ResumeAfter(token.clone()),
        None => StreamStart::At(start.stream_start),
    };
    source.stream(stream_start).await.map(|_| ())
}

/// After a re-snapshot: once every snapshot write is acknowledged, delete from each index the
/// documents older than the new snapshot (they were deleted during the lost history).
async fn sweep(config: &EngineConfig, source: &Source<'_>, sink: &Sink, below: u64) -> Ended {
    let drained = tokio::select! {
        r = sink.barrier() => r.is_ok(),
        () = source.cancel.cancelled() => false,
    };
    if !drained {
        return Ended::Cancelled;
    }
    let mut backoff = retry::Backoff::default();
    loop {
        let mut indexes: Vec<String> = match mongo::list_collections(&source.client, &config.routing).await {
            Ok(c) => c.iter().map(|(db, coll)| config.routing.index_for(db, coll)).collect(),
            Err(e) => {
                warn!(error = %e, "failed to list collections for the sweep; retrying");
                if backoff.wait(&source.cancel).await.is_err() {
                    return Ended::Cancelled;
                }
                continue;
            }
        };
        // Collections dropped during the gap have no collection left, only their index.
        indexes.extend(config.routing.include.iter().filter_map(|p| {
            p.collection.as_ref().map(|c| config.routing.index_for(&p.database, c))
        }));
        indexes.sort();
        indexes.dedup();
        let mut failed = false;
        for index in &indexes {
            let shard = config.shard;
            match sink.elastic().sweep(index, below, |id| shard.owns(id)).await {
                Ok(n) => info!(pipeline = %config.name, index = %index, deleted = n, "swept documents deleted during the lost history"),
                Err(e) => {
                    warn!(index = %index, error = %error_chain(&e), "sweep failed; retrying");
                    failed = true;
                    break;
                }
            }
        }
        if !failed {
            sink.record(Position::SweepDone);
            return Ended::Complete;
        }
        if backoff.wait(&source.cancel).await.is_err() {
            return Ended::Cancelled;
        }
    }
}

/// Fold committable positions into `cp` and store it. A failed write is logged and retried
/// on the next tick (the positions stay applied in memory).
///
/// # Errors
/// Only [`checkpoint::Error::Fenced`]: another worker holds the lease, so this one must stop.
async fn commit<S: CheckpointStore>(shared: &Shared, cp: &mut Checkpoint, store: &S) -> Result<(), checkpoint::Error> {
    let positions = shared.take_committable();
    if positions.is_empty() {
        return Ok(());
    }
    for p in &positions {
        cp.apply(p);
    }
    match store.save(cp).await {
        Ok(()) => {
            shared.metrics.checkpoints.inc();
            shared.metrics.checkpoint_time.set(time::unix_seconds());
            if let Some(t) = cp.stream_time {
                shared.metrics.checkpoint_event_time.set(i64::from(t.t));
            }
            Ok(())
        }
        Err(e @ checkpoint::Error::Fenced { .. }) => Err(e),
        Err(e) => {
            error!(error = %error_chain(&e), "failed to store checkpoint; will retry");
            Ok(())
        }
    }
}
