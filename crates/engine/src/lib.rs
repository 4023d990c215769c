//! monsoon's sync engine: MongoDB snapshot + change streams into Elasticsearch bulk indexing.
//!
//! Stages, each its own task joined to the next by a bounded channel: source
//! ([`source::mongodb`]: reads MongoDB) → transform ([`transform`]: decides what each change
//! becomes) → sink ([`sink`]: every Elasticsearch call) → checkpoint ([`checkpoint`]: what is
//! acknowledged, stored). Data flows one way; each stage imports only the one after it.
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

/// A spawned task that ends when its handle is dropped (the work it does is only wanted while
/// its owner is there).
pub(crate) struct AbortOnDrop(tokio::task::AbortHandle);

impl AbortOnDrop {
    pub(crate) fn spawn(work: impl std::future::Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(work).abort_handle())
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

use std::sync::Arc;
use std::time::Duration;

/// The MongoDB driver's reading of a connection string, for [`monsoon_api::validate`] and the
/// other entry points of validation (the types crate carries no driver).
pub use crate::source::mongodb::check_connection_string;

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
    /// The ingest pipeline of GridFS files could not be created.
    #[error("Elasticsearch refused ingest pipeline `{name}` (an `attachment` processor on `file`, for `spec.files`): it needs Elasticsearch 8.4+ or the ingest-attachment plugin (OpenSearch: `bin/opensearch-plugin install ingest-attachment`); or set `files.createPipeline: false` and name a pipeline of yours in `files.pipeline`")]
    FilePipeline {
        /// The pipeline.
        name: String,
        /// What Elasticsearch said.
        #[source]
        source: sink::elasticsearch::Error,
    },
    /// The transform stage stopped the pipeline.
    #[error("transform stage failed")]
    Transform(#[from] transform::stage::Error),
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
/// Start-up failures (an unreachable MongoDB, refused credentials, an unusable checkpoint) and
/// fatal stream errors (history lost under policy `Fail`). Transient failures are retried, and
/// an Elasticsearch unreachable at start-up is waited for.
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
    let reach = Reach { name, health, shutdown: &shutdown };
    let Some(server) = reach.call("GET /", || es.info()).await? else {
        return Ok(());
    };
    info!(pipeline = %name, distribution = %server.distribution, version = %server.version, "Elasticsearch reachable");
    let Some(client) = reach.mongodb(&config.mongodb).await? else {
        return Ok(());
    };
    info!(pipeline = %name, "MongoDB reachable");
    let mut cp = load_checkpoint(config, &store, &client).await?;
    let stream_start = stream_start(config, &store, &client, &mut cp).await?;
    if check_target_versions(&es, &reach, config, mongo::cluster_time(&client).await?).await?.is_none() {
        return Ok(());
    }
    let resume = cp.resume_token(&store.location())?.map(|token| {
        if cp.resume_after_invalidate {
            StreamStart::StartAfter(token)
        } else {
            StreamStart::ResumeAfter(token)
        }
    });
    let pre_images = mongo::pre_image_namespaces(&client, config.pre_images()).await?;
    let shapes = Arc::new(transform::Shapes::new(&config.mappings).map_err(Error::Mapping)?);
    let scripts = compile_scripts(config, &client)?;
    let locations = (shapes.tracks_any() || scripts.is_some() || !config.shared_indexes.is_empty()).then(|| Arc::from(config.locations_index.as_str()));
    let dead_letter_body = sink::dead_letter::index_body();
    if reach.call("create the dead-letter index", || es.create_index_if_missing(&config.dead_letter_index, &dead_letter_body)).await?.is_none() {
        return Ok(());
    }
    if locations.is_some() {
        let body = sink::locations::index_body();
        if reach.call("create the locations index", || es.create_index_if_missing(&config.locations_index, &body)).await?.is_none() {
            return Ok(());
        }
    }
    if let Some(files) = config.files.as_ref().filter(|f| f.create_pipeline) {
        let body = config::FilesConfig::pipeline_body();
        let created = reach.call("create the files' ingest pipeline", || es.put_pipeline(&files.pipeline, &body)).await.map_err(|e| match e {
            Error::Elastic(source) => Error::FilePipeline { name: files.pipeline.clone(), source },
            other => other,
        })?;
        if created.is_none() {
            return Ok(());
        }
    }
    let collections = cp
        .collection_starts(&store.location())?
        .into_iter()
        .map(|(ns, start)| {
            let start = match start {
                checkpoint::CollectionStart::Token { token, after_invalidate: true } => StreamStart::StartAfter(token),
                checkpoint::CollectionStart::Token { token, .. } => StreamStart::ResumeAfter(token),
                checkpoint::CollectionStart::At(t) => StreamStart::At(t),
            };
            (ns, start)
        })
        .collect();
    let start = Start { stream_start, resume, snapshot: cp.snapshot.clone(), sweep_below: cp.sweep_below, collections, listed_at: cp.collections_listed_at };

    // The stages, each a task joined to the next by a bounded channel.
    let acks = Arc::new(checkpoint::acks::Acks::default());
    let shared = Shared::new(acks.clone(), metrics.clone(), health.clone());
    let abort = options.hard_stop.child_token();
    let settings = SinkSettings {
        batch: config.batch.clone(),
        dead_letter_index: Arc::from(config.dead_letter_index.as_str()),
        pipeline: Arc::from(name),
        locations,
        shard: config.shard,
    };
    let sink = Sink::start(es, settings, shared.clone(), abort.clone());
    let stop_checkpointer = CancellationToken::new();
    let committer = checkpoint::committer::Committer::new(cp.clone(), store, acks, metrics.clone());
    let checkpointer = spawn_checkpointer(config, committer, &stop_checkpointer, &shutdown, &abort, options.shutdown_grace);
    let mut placer = transform::place::Placer::new(config.routing.clone(), shapes.clone(), scripts.clone(), Arc::from(name), metrics.clone());
    placer.file_pipeline = config.files.as_ref().map(|f| Arc::from(f.pipeline.as_str()));
    placer.shared = Arc::new(config.shared_indexes.clone());
    placer.time_machine = config.time_machine.as_ref().map(transform::time_machine::TimeMachine::new).transpose().map_err(Error::Mapping)?;
    placer.patches = config.merge_patches.as_ref().map(transform::patch::Patches::new).transpose().map_err(Error::Mapping)?;
    let transform = transform::stage::Transform {
        placer,
        book: checkpoint::written::IndexBook::new(cp.written.clone(), config.routing.clone()).with_shared(config.shared_indexes.clone()),
        shard: config.shard,
        delete_index_on_drop: config.delete_index_on_drop,
        metrics: metrics.clone(),
        health: health.clone(),
        abort: abort.clone(),
        relations: (!config.relate.is_empty())
            .then(|| Arc::new(transform::relate::Relations::new(&config.relate, client.clone(), config.shard, abort.clone(), metrics.clone()))),
    };
    let relating = config.relating();
    let (input, changes) = transform::change::Input::channel();
    let transform = tokio::spawn(transform.run(changes, sink).instrument(tracing::info_span!("transform", pipeline = %name)));
    let source = Source {
        client,
        routing: &config.routing,
        out: &input,
        metrics,
        health,
        cancel: shutdown.clone(),
        shard: config.shard,
        shapes: &shapes,
        // Scripts get the update description; merge patches apply it, and time machines to
        // pre-images (each update's own version).
        keep_update: scripts.is_some() || config.merge_patches.is_some() || config.time_machine.is_some(),
        snapshot_split: config.snapshot_split,
        files: config.files.as_ref(),
        relating: &relating,
        pre_images: &pre_images,
        views: std::sync::Mutex::default(),
        last_seen: std::sync::Mutex::new(None),
    };
    let result = follow(config, &source, start, options.exit_after_snapshot).instrument(tracing::info_span!("source", pipeline = %name)).await;
    drop(source);
    let result = stop_stages(name, input, transform, &abort, options.shutdown_grace, result).await;
    stop_checkpointer.cancel();
    match checkpointer.await {
        Err(e) => error!(pipeline = %name, error = %e, "checkpointer task failed; the next start resumes from the last checkpoint stored"),
        Ok(Err(e)) => return Err(Error::Checkpoint(e)),
        Ok(Ok(())) => info!(pipeline = %name, "final checkpoint written"),
    }
    result
}

/// Start-up's calls to Elasticsearch and its connection to MongoDB. While one is out of reach (not yet started, restarting, a
/// name that does not resolve yet) each is retried with back-off, the pipeline not ready and
/// saying so, instead of exiting (which crash-loops a worker's pod and shows the pipeline as
/// Failed); a refusal (credentials, a bad index or pipeline, a failed TLS handshake) fails at
/// once with its error.
struct Reach<'a> {
    name: &'a str,
    health: &'a Health,
    shutdown: &'a CancellationToken,
}

impl Reach<'_> {
    /// `op` once it succeeds; `None` when shutdown came while waiting (a clean stop).
    ///
    /// # Errors
    /// [`Error::Elastic`] when Elasticsearch refused.
    async fn call<T, F: std::future::Future<Output = Result<T, sink::elasticsearch::Error>>>(&self, what: &str, op: impl FnMut() -> F) -> Result<Option<T>, Error> {
        self.wait(Server::Elasticsearch, what, op, sink::elasticsearch::Error::is_unreachable).await.map_err(Error::Elastic)
    }

    /// A client of MongoDB once it answers (each attempt waits `connectTimeout` for a
    /// server); `None` when shutdown came while waiting. Wrong credentials, a connection
    /// string that does not parse and a refused TLS certificate fail at once.
    ///
    /// # Errors
    /// [`Error::Source`] when MongoDB refused.
    async fn mongodb(&self, config: &config::MongoConfig) -> Result<Option<mongodb::Client>, Error> {
        self.wait(Server::MongoDB, "connect", || mongo::connect(config), mongo::is_unreachable).await.map_err(Error::Source)
    }

    /// `op` on `server` until it succeeds, waiting out failures `unreachable` says are the
    /// server being out of reach (the stage that talks to it marked not ready meanwhile);
    /// `None` when shutdown came while waiting.
    ///
    /// # Errors
    /// The first failure that is not `unreachable`.
    async fn wait<T, E: std::error::Error, F: std::future::Future<Output = Result<T, E>>>(&self, server: Server, what: &str, op: impl FnMut() -> F, unreachable: impl Fn(&E) -> bool) -> Result<Option<T>, E> {
        let name = self.name;
        let mut attempts = 0u32;
        let result = retry::retry(retry::Pace::until_cancelled(self.shutdown), op, |e| {
            if !unreachable(e) {
                return false;
            }
            attempts += 1;
            server.beat(self.health, false);
            warn!(pipeline = %name, operation = what, attempts, error = %error_chain(e), "{server} is unreachable; waiting for it (not ready meanwhile)");
            true
        })
        .await;
        match result {
            Ok(v) => {
                if attempts > 0 {
                    info!(pipeline = %name, operation = what, attempts, "{server} answered after waiting");
                }
                server.beat(self.health, true);
                Ok(Some(v))
            }
            Err(retry::Stopped::Cancelled(_)) => {
                info!(pipeline = %name, "shutdown while waiting for {server} at start-up");
                Ok(None)
            }
            Err(retry::Stopped::Refused(e) | retry::Stopped::Deadline(e)) => Err(e),
        }
    }
}

/// A server start-up waits for.
#[derive(Clone, Copy, Debug)]
enum Server {
    MongoDB,
    Elasticsearch,
}

impl Server {
    /// Beat the heartbeat of the stage that talks to this server.
    fn beat(self, health: &Health, ok: bool) {
        match self {
            Server::MongoDB => health.source_beat(ok),
            Server::Elasticsearch => health.sink_beat(ok),
        }
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Server::MongoDB => "MongoDB",
            Server::Elasticsearch => "Elasticsearch",
        })
    }
}

/// The checkpoint, or a new one; with a re-snapshot asked for (`MONSOON_RESNAPSHOT`, once per
/// token), reset to snapshot every collection again.
async fn load_checkpoint<S: CheckpointStore>(config: &EngineConfig, store: &S, client: &mongodb::Client) -> Result<Checkpoint, Error> {
    let name = config.name.as_str();
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
            let t1 = mongo::cluster_time(client).await?;
            cp.apply(&Position::Reset { stream_start: t1 });
            warn!(pipeline = %name, token = %token, "re-snapshot requested: snapshotting every collection again, then deleting what the new snapshot does not see");
        }
        cp.resnapshot_token = Some(token.clone());
        store.save(&cp).await?;
    }
    Ok(cp)
}

/// Where the stream starts: the checkpoint's, or, for a new pipeline, recorded now, before the
/// first snapshot read (no gap).
async fn stream_start<S: CheckpointStore>(config: &EngineConfig, store: &S, client: &mongodb::Client, cp: &mut Checkpoint) -> Result<ClusterTime, Error> {
    if let Some(t) = cp.stream_start {
        return Ok(t);
    }
    let t0 = match config.stream_from {
        None => mongo::cluster_time(client).await?,
        Some(config::StreamFrom::Seconds(t)) => ClusterTime { t, i: 0 },
        Some(config::StreamFrom::Oldest) => mongo::oldest_oplog_time(client).await?,
    };
    cp.stream_start = Some(t0);
    if !config.snapshot {
        cp.snapshot.done = true;
    }
    // A pipeline that does not snapshot covers its namespaces from the stream start.
    cp.snapshot.coverage = (!config.snapshot).then(|| config.routing.coverage());
    store.save(cp).await?;
    info!(pipeline = %config.name, t = t0.t, i = t0.i, "new pipeline: stream start recorded");
    Ok(t0)
}

/// The pipeline's scripts, compiled, with lookups over its MongoDB client.
fn compile_scripts(config: &EngineConfig, client: &mongodb::Client) -> Result<Option<Arc<monsoon_script::Scripts>>, Error> {
    if config.scripts.is_empty() {
        return Ok(None);
    }
    let lookup = transform::script::MongoLookup {
        client: client.clone(),
        handle: tokio::runtime::Handle::current(),
        max_bytes: config.scripts.limits.memory_limit,
    };
    let scripts = monsoon_script::Scripts::with_lookup(config.scripts.clone(), Arc::new(lookup)).map_err(|e| Error::Mapping(e.to_string()))?;
    info!(pipeline = %config.name, workers = scripts.workers(), "scripts compiled");
    Ok(Some(Arc::new(scripts)))
}

/// Start the checkpointer: it commits what is acknowledged every interval, and a fenced store
/// stops the pipeline at once.
fn spawn_checkpointer<S: CheckpointStore>(
    config: &EngineConfig,
    committer: checkpoint::committer::Committer<S>,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
    abort: &CancellationToken,
    grace: Duration,
) -> tokio::task::JoinHandle<Result<(), checkpoint::Error>> {
    let (stop, fence, fence_abort) = (stop.clone(), shutdown.clone(), abort.clone());
    let fenced = move || {
        fence_abort.cancel();
        fence.cancel();
    };
    tokio::spawn(
        committer
            .run(config.checkpoint_interval, stop, grace, fenced)
            .instrument(tracing::info_span!("checkpointer", pipeline = %config.name)),
    )
}

/// Run the source until it ends, re-snapshotting after lost history when the policy says so.
async fn follow(config: &EngineConfig, source: &Source<'_>, start: Start, once: bool) -> Result<(), mongo::Error> {
    match follow_until_error(config, source, start, once).await {
        // Shutdown while waiting is a clean stop, not a failure.
        Err(mongo::Error::Cancelled) => Ok(()),
        other => other,
    }
}

async fn follow_until_error(config: &EngineConfig, source: &Source<'_>, mut start: Start, once: bool) -> Result<(), mongo::Error> {
    loop {
        match run_source(config, source, &start, once).await {
            Err(mongo::Error::HistoryLost { code }) if config.on_history_lost == HistoryLost::Resnapshot => {
                // Nothing is skipped silently: say so loudly, then rebuild.
                error!(code, "change stream history lost; onHistoryLost=Resnapshot: snapshotting every collection again, then deleting what the new snapshot does not see");
                source.barrier().await?;
                let t1 = mongo::cluster_time(&source.client).await?;
                source.record(Position::Reset { stream_start: t1 });
                start = Start { stream_start: t1, resume: None, snapshot: checkpoint::SnapshotProgress::default(), sweep_below: Some(t1.version()), collections: Default::default(), listed_at: None };
            }
            other => return other,
        }
    }
}

/// Shutdown: the source has stopped reading. Hand on what it staged, let the transform stage
/// and the sink deliver what they hold within the grace period, then abandon the rest (it is
/// replayed on the next start). A failure of a later stage is the pipeline's error.
async fn stop_stages(
    name: &str,
    input: transform::change::Input,
    transform: tokio::task::JoinHandle<Result<(), transform::stage::Error>>,
    abort: &CancellationToken,
    grace: Duration,
    result: Result<(), mongo::Error>,
) -> Result<(), Error> {
    if input.abandoned() {
        info!(pipeline = %name, "changes the stages had not taken when shutdown came are replayed on the next start");
    }
    let staged = input.take_staged();
    if tokio::time::timeout(grace, input.send(staged)).await.is_err() {
        warn!(pipeline = %name, "staged changes could not be handed on within the grace period; they are replayed on the next start");
    }
    drop(input);
    tokio::pin!(transform);
    let stages = tokio::select! {
        r = &mut transform => r,
        () = tokio::time::sleep(grace) => {
            warn!(pipeline = %name, "in-flight bulk requests did not finish within the shutdown grace period; abandoning them (they are replayed on the next start)");
            abort.cancel();
            transform.await
        }
    };
    match (result, stages) {
        (Err(mongo::Error::Closed(_)), Ok(Err(e))) | (Ok(()), Ok(Err(e @ transform::stage::Error::SharedIndex { .. }))) => Err(Error::Transform(e)),
        (Err(e), _) => Err(Error::Source(e)),
        (Ok(()), Err(e)) => {
            error!(pipeline = %name, error = %e, "transform task failed");
            Ok(())
        }
        (Ok(()), _) => Ok(()),
    }
}

/// Versions more than this far ahead of the current cluster time cannot be monsoon's (its
/// versions are cluster times; a day covers any clock skew between MongoDB members).
const FOREIGN_VERSION_MARGIN: u64 = 86_400 << 32;

/// Refuse to start on target indexes another tool versioned beyond monsoon's scale (see
/// [`Error::ForeignVersions`]); a sample of their documents is enough, since such a tool
/// versions every document it writes that way. `None` when shutdown came while waiting for
/// Elasticsearch.
async fn check_target_versions(es: &Elastic, reach: &Reach<'_>, config: &EngineConfig, now: ClusterTime) -> Result<Option<()>, Error> {
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
        return Ok(Some(()));
    }
    let ours = now.version();
    let expression = targets.join(",");
    let Some(largest) = reach.call("sample the target indexes' versions", || es.largest_version(&expression, 20)).await? else {
        return Ok(None);
    };
    if let Some((index, found)) = largest {
        if found > ours.saturating_add(FOREIGN_VERSION_MARGIN) {
            return Err(Error::ForeignVersions { index, found, ours });
        }
    }
    Ok(Some(()))
}

/// Where the source starts: from the checkpoint, or anew after lost history.
struct Start {
    stream_start: ClusterTime,
    /// After the last acknowledged change, when the checkpoint has one.
    resume: Option<StreamStart>,
    snapshot: checkpoint::SnapshotProgress,
    sweep_below: Option<u64>,
    /// With one stream per collection: where each collection's stream resumes.
    collections: std::collections::BTreeMap<String, StreamStart>,
    /// With one stream per collection: where the streams of collections not in `collections`
    /// start.
    listed_at: Option<ClusterTime>,
}

/// Snapshot what needs it, sweep after a re-snapshot, then follow the stream until
/// cancelled or failed (or, with `once`, return when every snapshot write is acknowledged).
async fn run_source(config: &EngineConfig, source: &Source<'_>, start: &Start, once: bool) -> Result<(), mongo::Error> {
    let name = config.name.as_str();
    let health = source.health;
    let current = config.routing.coverage();
    if !start.snapshot.done {
        health.set_phase(Phase::Snapshotting);
        // A re-snapshot after lost history reads everything (see `EngineConfig::snapshots`).
        let resnapshot = start.sweep_below.is_some();
        let collections: Vec<(String, String)> = source.collections().await?.into_iter().filter(|(db, coll)| resnapshot || config.snapshots(db, coll)).collect();
        info!(pipeline = %name, collections = collections.len(), "snapshot started");
        // The estimate only feeds a gauge: it runs beside the snapshot, never ahead of it, and
        // only once the snapshot's first documents came. A server that counts by scanning
        // (SecantusDB here: 2.5 s for 200k documents; a view runs its pipeline) would otherwise
        // hold up the snapshot query's first batch, which nothing else can overlap.
        let _estimating = AbortOnDrop::spawn({
            let (client, collections, gauge) = (source.client.clone(), collections.clone(), source.metrics.snapshot_estimate.clone());
            let (read, before) = (source.metrics.snapshot_docs.clone(), source.metrics.snapshot_docs.get());
            let shards = u64::from(config.shard.count.max(1));
            async move {
                while read.get() == before {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let estimate = mongo::estimate_documents(&client, &collections).await / shards;
                gauge.set(i64::try_from(estimate).unwrap_or(i64::MAX));
            }
        });
        for (db, coll) in collections {
            let ns = format!("{db}.{coll}");
            let progress = start.snapshot.collections.get(&ns);
            if progress.is_some_and(|p| p.done) {
                continue;
            }
            if source.snapshot(&db, &coll, progress, start.stream_start.version()).await? == Ended::Cancelled {
                return Ok(());
            }
        }
        source.record(Position::SnapshotDone);
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
                if source.snapshot(&db, &coll, None, version).await? == Ended::Cancelled {
                    return Ok(());
                }
            }
        }
    }
    source.record(Position::Coverage(current));
    if let Some(below) = start.sweep_below {
        // After every snapshot write: the drops of collections gone during the lost history,
        // then the documents older than the new snapshot.
        let existing = source.collections().await?;
        source.send_sweep(existing, below).await?;
        source.record(Position::SweepDone);
    }
    if once {
        info!(pipeline = %name, "--once: waiting until Elasticsearch acknowledged every write");
        return source.barrier().await;
    }
    if config.collection_streams {
        let from = start.listed_at.unwrap_or(start.stream_start);
        return source.stream_collections(start.collections.clone(), from).await.map(|_| ());
    }
    let stream_start = start.resume.clone().unwrap_or(StreamStart::At(start.stream_start));
    source.stream(stream_start).await.map(|_| ())
}

