//! MongoDB source: connection, the snapshot of existing documents, and the change stream.
//!
//! The only stage that talks to MongoDB (besides the scripts' declared lookups). It reads and
//! hands each change on, in order, to the transform stage ([`Input`]); what a change becomes is
//! not its business. Documents travel as raw BSON.
//!
//! # Invariants
//! - The stream's start time is recorded before the first snapshot read, and the stream
//!   resumes from it (or from the last acknowledged token): nothing between snapshot and
//!   stream is missed.
//! - Snapshot documents carry the start time as their version; every change after it carries
//!   a larger one, so the stream's replay of changes made during the snapshot always wins.
//! - A lost resume point (ChangeStreamHistoryLost) is never skipped over.

mod connection_string;
pub mod event;
pub mod filter;

pub use connection_string::check_connection_string;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mongodb::bson::{doc, Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::ErrorKind;
use mongodb::options::{
    ChangeStreamOptions, ClientOptions, FullDocumentBeforeChangeType, FullDocumentType, Tls, TlsOptions,
};
use mongodb::raw_batch_cursor::{RawBatch, RawBatchCursor};
use mongodb::Client;
use tokio_util::sync::CancellationToken;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use self::event::Action;
use crate::checkpoint::{ClusterTime, CollectionProgress, Position, RangeProgress};
use crate::config::{MongoConfig, PreImages, Routing, Shard};
use crate::convert;
use crate::metrics::{Health, Metrics, Phase};
use crate::retry::Backoff;
use crate::transform::change::{self, Body, Change, Closed, Doc, Extra, FileBody, Input, Unreadable};
use crate::transform::Shapes;

/// MongoDB error code: the resume point is no longer in the oplog.
const CHANGE_STREAM_HISTORY_LOST: i32 = 286;
/// MongoDB error code: fatal change stream error (older servers report lost history so).
const CHANGE_STREAM_FATAL: i32 = 280;
/// MongoDB error code: capped collection position lost (4.0 oplog rollover).
const CAPPED_POSITION_LOST: i32 = 136;
/// MongoDB error code: a result over 16 MB, here a change event with its looked-up document.
const BSON_OBJECT_TOO_LARGE: i32 = 10334;
/// After an oversize event, how many events to read without `updateLookup` (looking each
/// document up separately) before returning to the normal stream.
const LEAN_EVENTS: u64 = 1000;

/// How often (in events) the stream records its position while busy. Positions are cheap,
/// but one per event would clone a token per event for nothing.
const POSITION_EVERY: u64 = 500;

/// Longest wait for one change stream `getMore` (each asks the server to answer within
/// 500 ms, so this only fires on a silently dead connection).
const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for one batch of a snapshot query (the first batch of a sorted query on a
/// huge collection can take a while on some servers).
const SNAPSHOT_READ_TIMEOUT: Duration = Duration::from_secs(300);

/// How often a pipeline with one change stream per collection lists the collections, to open
/// streams for new ones.
pub const COLLECTION_POLL: Duration = Duration::from_secs(5);

/// How often (in documents or events) a busy source beats its heartbeat: reading the clock
/// per document shows up in profiles.
const BEAT_EVERY: u64 = 128;

/// Failures of the source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection string does not parse (the string itself is never shown: it may hold
    /// credentials).
    #[error("failed to parse the MongoDB connection string: {0}")]
    Uri(String),
    /// The server refused the credentials.
    #[error("MongoDB refused the credentials")]
    Auth(#[source] mongodb::error::Error),
    /// No server answered in time, or a command monsoon needs failed.
    #[error("failed to reach MongoDB: could not {op}")]
    Unreachable {
        /// What was attempted.
        op: &'static str,
        /// The driver's error (it names hosts, never credentials).
        #[source]
        source: mongodb::error::Error,
    },
    /// The server answers but keeps no cluster time: it is a standalone server.
    #[error("the server reports no cluster time: monsoon needs a replica set or sharded cluster (change streams)")]
    NoClusterTime,
    /// The resume point fell off the oplog.
    #[error("the change stream's resume point is no longer in the MongoDB oplog (ChangeStreamHistoryLost, code {code}): changes were lost from the source's history; with onHistoryLost=Fail the pipeline stops. Remove the checkpoint to re-snapshot")]
    HistoryLost {
        /// Server error code.
        code: i32,
    },
    /// The stages after the source stopped (forced shutdown, or a failure there).
    #[error("the transform stage stopped")]
    Closed(#[from] Closed),
    /// Shutdown was requested while waiting.
    #[error("cancelled")]
    Cancelled,
}

/// Open a client and check the server answers and accepts the credentials.
///
/// # Errors
/// [`Error::Uri`], [`Error::Auth`] or [`Error::Unreachable`], each one clear line.
pub async fn connect(config: &MongoConfig) -> Result<Client, Error> {
    let mut options = ClientOptions::parse(&config.uri.0)
        .await
        .map_err(|e| Error::Uri(redact(&e.to_string(), &config.uri.0)))?;
    options.app_name = Some("monsoon".into());
    options.server_selection_timeout = Some(config.connect_timeout);
    add_tls_files(&mut options, config)?;
    let client = Client::with_options(options)
        .map_err(|e| Error::Uri(redact(&e.to_string(), &config.uri.0)))?;
    client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .await
        .map_err(classify_connect_error)?;
    Ok(client)
}

/// Add the pipeline's CA bundle and client certificate to the connection string's TLS options
/// (relaxed host checks, a `tlsCertificateKeyFile` of its own), never replacing them; either
/// turns TLS on when the string leaves it unset.
///
/// # Errors
/// [`Error::Uri`] when the string turns TLS off (`tls=false`) yet a CA or certificate is set.
fn add_tls_files(options: &mut ClientOptions, config: &MongoConfig) -> Result<(), Error> {
    if config.ca_file.is_none() && config.client_cert_key_file.is_none() {
        return Ok(());
    }
    let tls = match options.tls.get_or_insert_with(|| Tls::Enabled(TlsOptions::default())) {
        Tls::Enabled(tls) => tls,
        Tls::Disabled => {
            return Err(Error::Uri(
                "`caFrom` or `clientCertFrom` is set but the connection string turns TLS off (`tls=false`); remove one of them".into(),
            ))
        }
    };
    if let Some(ca) = &config.ca_file {
        tls.ca_file_path = Some(ca.into());
    }
    if let Some(pem) = &config.client_cert_key_file {
        tls.cert_key_file_path = Some(pem.into());
    }
    Ok(())
}

fn classify_connect_error(e: mongodb::error::Error) -> Error {
    match &*e.kind {
        ErrorKind::Authentication { .. } => Error::Auth(e),
        ErrorKind::Command(c) if c.code == 18 || c.code == 13 => Error::Auth(e),
        _ => Error::Unreachable { op: "ping the server", source: e },
    }
}

/// Whether a failure to connect is worth waiting out: no server answered in time. A server
/// whose TLS certificate is refused will not be trusted by waiting, so that fails at once.
pub fn is_unreachable(e: &Error) -> bool {
    let Error::Unreachable { source, .. } = e else { return false };
    let text = format!("{source:?}").to_ascii_lowercase();
    !["certificate", "unknownissuer", "handshake"].iter().any(|m| text.contains(m))
}

/// Remove the connection string (and so any credentials) from a message.
fn redact(message: &str, uri: &str) -> String {
    message.replace(uri, "<connection string>")
}

/// Current cluster time: a point every later change is after. Taken from the reply of a
/// command in a session, never from the local clock.
///
/// # Errors
/// [`Error::Unreachable`] when MongoDB does not answer.
pub async fn cluster_time(client: &Client) -> Result<ClusterTime, Error> {
    let mut session = client
        .start_session()
        .await
        .map_err(|source| Error::Unreachable { op: "start a session", source })?;
    let reply = client
        .database("admin")
        .run_command(doc! {"ping": 1})
        .session(&mut session)
        .await
        .map_err(|source| Error::Unreachable { op: "read the cluster time", source })?;
    let from_session = session.operation_time().or_else(|| {
        session
            .cluster_time()
            .and_then(|ct| mongodb::bson::to_document(ct).ok())
            .and_then(|d| d.get_timestamp("clusterTime").ok())
    });
    let ts = from_session
        .or_else(|| reply.get_timestamp("operationTime").ok())
        .ok_or(Error::NoClusterTime)?;
    Ok(ts.into())
}

/// Which namespaces' changes keep their pre-images: those `wanted` asks for on MongoDB 6.0+
/// (wire version 17), none before (a stream there refuses `fullDocumentBeforeChange`).
/// Collections named exactly that keep no pre-images (`changeStreamPreAndPostImages`) are
/// named in a warning: their deletes cannot be followed through relations from a field
/// other than `_id` (those re-syncs are dead-lettered), and time machine entries of their
/// updates hold the document as looked up.
///
/// # Errors
/// [`Error::Unreachable`] when MongoDB does not answer.
pub async fn pre_image_namespaces(client: &Client, wanted: PreImages) -> Result<PreImages, Error> {
    if wanted.is_empty() {
        return Ok(wanted);
    }
    let hello = client
        .database("admin")
        .run_command(doc! {"hello": 1})
        .await
        .map_err(|source| Error::Unreachable { op: "ask the server's version (hello)", source })?;
    let wire = hello.get("maxWireVersion").and_then(Bson::as_i64).or_else(|| hello.get_i32("maxWireVersion").ok().map(i64::from)).unwrap_or(0);
    if wire < PRE_IMAGES_WIRE_VERSION {
        warn!("MongoDB is older than 6.0 and keeps no pre-images: deletes cannot be followed through relations from a field other than `_id` (those re-syncs are dead-lettered), and time machine entries of updates hold the document as looked up");
        return Ok(PreImages::default());
    }
    for p in wanted.patterns() {
        let Some(coll) = &p.collection else { continue };
        if !keeps_pre_images(client, &p.database, coll).await {
            let db = &p.database;
            warn!(namespace = %p, fix = %format!("db.getSiblingDB(\"{db}\").runCommand({{collMod: \"{coll}\", changeStreamPreAndPostImages: {{enabled: true}}}})"), "collection keeps no pre-images: its deletes cannot be followed through relations from a field other than `_id` (dead-lettered), and time machine entries of its updates hold the document as looked up");
        }
    }
    Ok(wanted)
}

/// Whether collection `db.coll` has `changeStreamPreAndPostImages` on.
async fn keeps_pre_images(client: &Client, db: &str, coll: &str) -> bool {
    use futures_util::TryStreamExt;
    match client.database(db).list_collections().filter(doc! {"name": coll}).await {
        Ok(mut cursor) => matches!(cursor.try_next().await, Ok(Some(c)) if c.options.change_stream_pre_and_post_images.as_ref().is_some_and(|p| p.enabled)),
        Err(_) => false,
    }
}

/// MongoDB 6.0's wire version: change streams give pre-images (`fullDocumentBeforeChange`).
const PRE_IMAGES_WIRE_VERSION: i64 = 17;

/// Time of the oldest entry the oplog still holds (`spec.streamStart.oldest`): read from
/// `local.oplog.rs` in natural (insertion) order, which a replica set member serves and a
/// sharded cluster's router does not.
///
/// # Errors
/// [`Error::Unreachable`] when the oplog cannot be read; [`Error::NoClusterTime`] when it holds
/// nothing (not a replica set).
pub async fn oldest_oplog_time(client: &Client) -> Result<ClusterTime, Error> {
    let first = client
        .database("local")
        .collection::<mongodb::bson::Document>("oplog.rs")
        .find_one(doc! {})
        .sort(doc! {"$natural": 1})
        .projection(doc! {"ts": 1})
        .await
        .map_err(|source| Error::Unreachable { op: "read the oldest oplog entry (local.oplog.rs; streamStart.oldest needs a replica set, not a mongos)", source })?;
    first.and_then(|d| d.get_timestamp("ts").ok()).map(ClusterTime::from).ok_or(Error::NoClusterTime)
}

/// Estimated number of documents in the given collections (from collection metadata, not a
/// scan); collections that cannot be counted count as empty.
pub async fn estimate_documents(client: &Client, collections: &[(String, String)]) -> u64 {
    let mut total = 0;
    for (db, coll) in collections {
        let c = client.database(db).collection::<RawDocumentBuf>(coll);
        total += c.estimated_document_count().await.unwrap_or(0);
    }
    total
}

impl Source<'_> {
    /// [`list_collections`], retried with back-off until MongoDB answers (a transient failure
    /// must not end the pipeline).
    ///
    /// # Errors
    /// [`Error::Cancelled`] when shutdown came first.
    pub async fn collections(&self) -> Result<Vec<(String, String)>, Error> {
        let listed = crate::retry::until_ok(&self.cancel, || list_collections(&self.client, self.routing), |e| {
            warn!(error = %crate::error_chain(e), "failed to list collections; retrying");
            self.health.source_beat(false);
        })
        .await
        .map_err(|_| Error::Cancelled)?;
        let mut views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        views.extend(listed.views);
        Ok(listed.synced)
    }

    /// Whether `db.coll` was listed as a view: read by the snapshot, never streamed.
    fn is_view(&self, db: &str, coll: &str) -> bool {
        let views = self.views.lock().unwrap_or_else(|p| p.into_inner());
        !views.is_empty() && views.contains(&format!("{db}.{coll}"))
    }
}

/// What [`list_collections`] finds.
#[derive(Debug, Default)]
pub struct Listed {
    /// The synced collections, and the views named exactly by the pipeline, sorted.
    pub synced: Vec<(String, String)>,
    /// The views among them (`db.view`).
    pub views: Vec<String>,
}

/// The synced collections of the routed databases, and the views the pipeline names exactly
/// (`db.view` in `namespaces`): a view has no change stream, but the snapshot reads it (as
/// Monstache's view replication does). A `db.*` pattern or a regular expression selects
/// collections only.
///
/// # Errors
/// The driver's error when a listing fails.
pub async fn list_collections(client: &Client, routing: &Routing) -> Result<Listed, mongodb::error::Error> {
    use futures_util::TryStreamExt;
    let mut out = Listed::default();
    let dbs = match routing.databases() {
        Some(dbs) => dbs,
        None => client
            .list_database_names()
            .await?
            .into_iter()
            .filter(|d| !crate::config::SYSTEM_DATABASES.contains(&d.as_str()))
            .collect(),
    };
    for db in dbs {
        let specs: Vec<mongodb::results::CollectionSpecification> = client
            .database(&db)
            .list_collections()
            .filter(doc! {"type": {"$in": ["collection", "view"]}})
            .await?
            .try_collect()
            .await?;
        for spec in specs {
            let coll = spec.name;
            let view = spec.collection_type == mongodb::results::CollectionType::View;
            if view && !routing.names(&db, &coll) {
                continue;
            }
            if routing.includes(&db, &coll) {
                if view {
                    out.views.push(format!("{db}.{coll}"));
                }
                out.synced.push((db.clone(), coll));
            }
        }
    }
    out.synced.sort();
    Ok(out)
}

/// Everything the source needs while it runs.
pub struct Source<'a> {
    /// MongoDB client.
    pub client: Client,
    /// What is synced.
    pub routing: &'a Routing,
    /// Where changes go: the transform stage.
    pub out: &'a Input,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// Health.
    pub health: &'a Health,
    /// Stops reading.
    pub cancel: CancellationToken,
    /// The documents this worker owns.
    pub shard: Shard,
    /// The mappings' aggregation stages (what to read, not what it becomes).
    pub shapes: &'a Shapes,
    /// Keep change events' update descriptions (the scripts read them).
    pub keep_update: bool,
    /// `snapshotSplit`: `_id` ranges read at once, and the fewest documents a collection split
    /// has.
    pub snapshot_split: Option<(u32, u64)>,
    /// GridFS files collections whose files are read with their content (`spec.files`).
    pub files: Option<&'a crate::config::FilesConfig>,
    /// Namespaces with relations (`spec.relate`): their changes are handed on even when
    /// another shard owns the document.
    pub relating: &'a std::collections::BTreeSet<String>,
    /// Namespaces whose changes carry the document before the change (see
    /// [`crate::config::EngineConfig::pre_images`]): empty unless MongoDB keeps pre-images
    /// (6.0+).
    pub pre_images: &'a PreImages,
    /// The views listed (`db.view`): read without an index hint, never streamed.
    pub views: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The collection changed last, as [`Source::seen`] decided it.
    pub last_seen: std::sync::Mutex<Option<Seen>>,
}

/// A collection events come from: its names, shared by its changes, and whether its changes
/// are handed on (decided once for a run of events from it).
#[derive(Clone)]
pub struct Seen {
    names: (Arc<str>, Arc<str>),
    /// The pipeline syncs it.
    included: bool,
    /// It has relations (`spec.relate`): every shard hands its changes on.
    related: bool,
}

/// One document as a change event or a read found it. The document itself is handed on by
/// the caller ([`Source::stage_doc`]), owned, so it is never copied to be handed on.
struct Found<'a> {
    id: RawBsonRef<'a>,
    /// `None` for a delete.
    doc: Option<&'a RawDocument>,
    update: Option<&'a RawDocument>,
    before: Option<&'a RawDocument>,
}

/// Documents of a snapshot read ahead are handed over in runs of at most this many, or of
/// [`RUN_BYTES`] (a larger document goes alone).
const RUN_DOCS: usize = 128;
/// Bytes of a run of documents read ahead.
const RUN_BYTES: usize = 256 << 10;
/// Runs read ahead at most: with [`RUN_BYTES`], 1 MiB of documents.
const RUNS_AHEAD: usize = 4;

/// A snapshot cursor read on its own task, up to [`RUNS_AHEAD`] runs of documents ahead of
/// the ones handed on: the round trip for the next batch overlaps handing on this one, and a
/// sink that holds the source back (every request slot busy) does not stop the read
/// (measured: the OpenSearch snapshot's request slots stood idle a third of the time while
/// each `getMore` waited for the documents before it to be handed on). Documents cross in
/// runs, and a run is handed over early whenever the cursor must wait on MongoDB, so the
/// reader never waits on a run that is not full while documents are ready (measured: one
/// message and one byte-budget permit per document cost more CPU than the read). Dropping it
/// stops the read.
struct ReadAhead {
    runs: mpsc::Receiver<Read>,
    run: std::vec::IntoIter<RawDocumentBuf>,
    _task: crate::AbortOnDrop,
}

/// One step of a [`ReadAhead`].
enum Read {
    /// Documents, in order.
    Run(Vec<RawDocumentBuf>),
    Failed(mongodb::error::Error),
    End,
}

impl ReadAhead {
    fn start(cursor: RawBatchCursor) -> Self {
        let (tx, runs) = mpsc::channel(RUNS_AHEAD);
        let task = crate::AbortOnDrop::spawn(read_runs(cursor, tx));
        Self { runs, run: Vec::new().into_iter(), _task: task }
    }

    /// The next document at once, if one is here.
    fn ready(&mut self) -> Option<RawDocumentBuf> {
        self.run.next()
    }

    /// The next document, `None` at the end. A read that stopped without saying so (its task
    /// is gone) is a failed read, never the end.
    async fn next(&mut self) -> Result<Option<RawDocumentBuf>, mongodb::error::Error> {
        loop {
            if let Some(d) = self.run.next() {
                return Ok(Some(d));
            }
            match self.runs.recv().await {
                Some(Read::Run(run)) => self.run = run.into_iter(),
                Some(Read::End) => return Ok(None),
                Some(Read::Failed(e)) => return Err(e),
                None => return Err(mongodb::error::Error::custom("the snapshot read stopped")),
            }
        }
    }
}

/// Read `cursor` to its end into `tx` in runs: a run goes when full, and before the cursor
/// waits on MongoDB for its next batch.
async fn read_runs(mut cursor: RawBatchCursor, tx: mpsc::Sender<Read>) {
    let mut run: Vec<RawDocumentBuf> = Vec::with_capacity(RUN_DOCS);
    let mut bytes = 0;
    loop {
        let next = {
            let mut next = futures_util::StreamExt::next(&mut cursor);
            match futures_util::FutureExt::now_or_never(&mut next) {
                Some(r) => r,
                None => {
                    // The cursor waits on MongoDB: hand on what is here first.
                    if !hand_over(&tx, &mut run, &mut bytes).await {
                        return;
                    }
                    next.await
                }
            }
        };
        let last = match next {
            Some(Ok(batch)) => match take_batch(&batch, &tx, &mut run, &mut bytes).await {
                Ok(true) => continue,
                Ok(false) => return,
                Err(e) => Read::Failed(e),
            },
            Some(Err(e)) => Read::Failed(e),
            None => Read::End,
        };
        if hand_over(&tx, &mut run, &mut bytes).await {
            let _ = tx.send(last).await;
        }
        return;
    }
}

/// Copy the documents of `batch` into runs (the one copy a document gets: the driver's
/// cursor would copy each out of its batch, and the read-ahead again), handing full runs over.
/// `Ok(false)` when the reader is gone.
async fn take_batch(batch: &RawBatch, tx: &mpsc::Sender<Read>, run: &mut Vec<RawDocumentBuf>, bytes: &mut usize) -> Result<bool, mongodb::error::Error> {
    for item in batch.doc_slices()? {
        let doc = item?.as_document().ok_or_else(|| mongodb::error::Error::custom("a snapshot batch holds something other than a document"))?.to_owned();
        *bytes += doc.as_bytes().len();
        run.push(doc);
        if (run.len() >= RUN_DOCS || *bytes >= RUN_BYTES) && !hand_over(tx, run, bytes).await {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Hand the documents of `run` over (if any), starting a new run; `false` when the reader is
/// gone.
async fn hand_over(tx: &mpsc::Sender<Read>, run: &mut Vec<RawDocumentBuf>, bytes: &mut usize) -> bool {
    if run.is_empty() {
        return true;
    }
    *bytes = 0;
    tx.send(Read::Run(std::mem::replace(run, Vec::with_capacity(RUN_DOCS)))).await.is_ok()
}

/// How a source phase ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Finished its work (snapshot complete).
    Complete,
    /// Cancelled by shutdown.
    Cancelled,
}

impl Source<'_> {
    /// Hand a change on (staged, and sent with its chunk). While the stages after the source
    /// apply back-pressure this waits, beating the source's heartbeat (waiting on a slow sink
    /// is not being stuck) and giving way to shutdown. Changes abandoned at shutdown are never
    /// acknowledged, so the checkpoint stays before them and they are read again on the next
    /// start.
    async fn send(&self, change: Change) -> Result<(), Error> {
        match self.out.stage(change) {
            None => Ok(()),
            Some(chunk) => self.hand_over(chunk).await,
        }
    }

    /// Hand a full chunk on (see [`Source::send`]).
    async fn hand_over(&self, chunk: Vec<Change>) -> Result<(), Error> {
        self.wait_on_stages(self.out.send(chunk)).await
    }

    /// Record a position: it covers every change handed on before it.
    pub fn record(&self, position: Position) {
        self.out.record(position);
    }

    /// Hand staged changes on before the source waits on MongoDB, so a pause in the source
    /// never holds them back.
    pub async fn flush(&self) -> Result<(), Error> {
        if self.out.has_staged() {
            self.wait_on_stages(self.out.send(self.out.take_staged())).await?;
        }
        Ok(())
    }

    /// Wait until every change handed on so far has its final outcome (written, refused into
    /// the dead-letter index, or superseded).
    ///
    /// # Errors
    /// [`Error::Cancelled`] on shutdown, [`Error::Closed`].
    pub async fn barrier(&self) -> Result<(), Error> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.send(Change::Barrier(reply)).await?;
        self.flush().await?;
        tokio::select! {
            r = done => r.map_err(|_| Error::Closed(Closed)),
            () = self.cancel.cancelled() => Err(Error::Cancelled),
        }
    }

    async fn wait_on_stages(&self, fut: impl std::future::Future<Output = Result<(), Closed>>) -> Result<(), Error> {
        tokio::pin!(fut);
        // Fast path: most hand-overs complete at once; only a wait needs the timer below.
        if let Some(r) = futures_util::FutureExt::now_or_never(&mut fut) {
            return r.map_err(Error::from);
        }
        loop {
            tokio::select! {
                biased;
                r = &mut fut => return r.map_err(Error::from),
                () = self.cancel.cancelled() => return Err(Error::Cancelled),
                () = tokio::time::sleep(Input::PATIENCE) => self.health.source_beat(true),
            }
        }
    }

    /// Await a MongoDB read; if it cannot complete at once, first hand staged changes on. A
    /// read with no reply within `limit` (a silently dropped connection: the driver sets no
    /// socket timeout) fails like any other read, so the caller re-opens.
    async fn read<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, mongodb::error::Error>>,
        limit: Duration,
    ) -> Result<Result<T, ReadError>, Error> {
        tokio::pin!(fut);
        if let Some(v) = futures_util::FutureExt::now_or_never(&mut fut) {
            return Ok(v.map_err(ReadError::Mongo));
        }
        self.flush().await?;
        match tokio::time::timeout(limit, fut).await {
            Ok(v) => Ok(v.map_err(ReadError::Mongo)),
            Err(_) => Ok(Err(ReadError::Timeout(limit))),
        }
    }

    /// The names of `db.coll` when a change of document `id` there is handed on: the namespace
    /// is synced, and this worker owns the document, or the namespace has relations
    /// (`spec.relate`, which every shard follows for the related documents it owns).
    fn follows(&self, db: &str, coll: &str, id: RawBsonRef<'_>) -> Option<(Arc<str>, Arc<str>)> {
        let seen = self.seen(db, coll);
        (seen.included && (seen.related || self.owns(id))).then_some(seen.names)
    }

    /// What the source knows of `db.coll`; the last collection's is reused (consecutive events
    /// mostly share one).
    fn seen(&self, db: &str, coll: &str) -> Seen {
        let mut last = self.last_seen.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(seen) = last.as_ref().filter(|s| &*s.names.0 == db && &*s.names.1 == coll) {
            return seen.clone();
        }
        let seen = Seen {
            names: (Arc::from(db), Arc::from(coll)),
            included: self.routing.includes(db, coll),
            related: !self.relating.is_empty() && self.relating.contains(&format!("{db}.{coll}")),
        };
        *last = Some(seen.clone());
        seen
    }

    /// Whether this worker's shard owns the document with MongoDB `_id` `id`. An `_id` with
    /// no Elasticsearch form (too long) belongs to shard 0, which dead-letters it.
    fn owns(&self, id: RawBsonRef<'_>) -> bool {
        if !self.shard.is_split() {
            return true;
        }
        match convert::es_id_string(id) {
            Ok(es_id) => self.shard.owns(&es_id),
            Err(_) => self.shard.index == 0,
        }
    }

    /// Stage a change of a document: `doc` from [`Source::doc_of`], with the document's bytes.
    /// Returns a full chunk for [`Source::hand_over`]. Not async: most documents need no
    /// await, and a future per document would cost every one of them.
    fn stage_doc(&self, doc: Doc, body: Option<Body>) -> Option<Vec<Change>> {
        self.out.stage(Change::Doc(Doc { doc: body, ..doc }))
    }

    /// Whether `found` is indexed with its GridFS file's content (`spec.files`): then
    /// [`Source::file_of`] reads it before [`Source::doc_of`].
    #[inline]
    fn wants_file(&self, ns: &(Arc<str>, Arc<str>), found: &Found<'_>) -> bool {
        found.doc.is_some() && self.files.is_some_and(|f| f.indexes_content(&ns.0, &ns.1)) && self.owns(found.id)
    }

    /// The content of `found`'s GridFS file (see [`Source::wants_file`]). Callers box its
    /// future: held inline, its size would be moved with every document's.
    async fn file_of(&self, ns: &(Arc<str>, Arc<str>), found: &Found<'_>) -> Result<Option<FileBody>, Error> {
        let (Some(files), Some(doc)) = (self.files, found.doc) else { return Ok(None) };
        Ok(Some(self.file_body(&ns.0, &ns.1, found.id, doc, files.max_file_size).await?))
    }

    /// The change of a document `found`, all but the document's bytes, which the caller owns
    /// and stages with it ([`Source::stage_doc`]), and its GridFS file's content, `file`.
    /// Not async: a future here would hold the change across an await, and every document
    /// would pay for moving it.
    fn doc_of(&self, ns: &(Arc<str>, Arc<str>), found: Found<'_>, file: Option<FileBody>, version: u64, from_snapshot: bool) -> Doc {
        let Found { id, doc: _, update, before } = found;
        // Pre-images are read only by relations from a field other than `_id` and time machines.
        let before = before.filter(|_| self.pre_images.includes(&ns.0, &ns.1));
        Doc {
            // Not owned: handed on only for its relations (`spec.relate`), which every shard follows.
            owned: self.owns(id),
            db: ns.0.clone(),
            coll: ns.1.clone(),
            id: id.to_raw_bson(),
            doc: None,
            version,
            from_snapshot,
            extra: Extra::boxed(update.map(ToOwned::to_owned), before.map(ToOwned::to_owned), file),
        }
    }

    /// Read `db.coll`: the whole collection, or what `progress` (from the checkpoint) says is
    /// left; in `_id` ranges at once when `snapshotSplit` says so and it is big enough.
    ///
    /// # Errors
    /// Only when the stages after the source stopped; MongoDB errors are retried.
    pub async fn snapshot(&self, db: &str, coll: &str, progress: Option<&CollectionProgress>, version: u64) -> Result<Ended, Error> {
        if let Some(p) = progress.filter(|p| !p.ranges.is_empty()) {
            let ranges = p.ranges.iter().enumerate().filter(|(_, r)| !r.done).map(|(i, r)| Range::from_progress(i, r)).collect();
            return self.snapshot_ranges(db, coll, ranges, version).await;
        }
        let resume = progress.and_then(|p| p.last_id.as_ref()).and_then(id_from_json);
        if resume.is_none() {
            if let Some(bounds) = self.split_bounds(db, coll).await {
                self.record(Position::SnapshotSplit { ns: format!("{db}.{coll}"), bounds: bounds.clone() });
                return self.snapshot_ranges(db, coll, Range::all(&bounds), version).await;
            }
        }
        self.snapshot_collection(db, coll, resume, version).await
    }

    /// Where to split `db.coll` (`snapshotSplit`): range ends taken from a `$sample` of its
    /// `_id`s, or `None` to read it in one pass (not configured, too small, or the sample
    /// failed: a split is only ever a speed-up).
    async fn split_bounds(&self, db: &str, coll: &str) -> Option<Vec<Bson>> {
        use futures_util::TryStreamExt;
        let (ranges, min_documents) = self.snapshot_split?;
        let collection = self.client.database(db).collection::<Document>(coll);
        let estimate = collection.estimated_document_count().await.ok()?;
        if estimate < min_documents {
            return None;
        }
        let sample = vec![doc! {"$sample": {"size": i64::from(ranges) * 32}}, doc! {"$project": {"_id": 1}}, doc! {"$sort": {"_id": 1}}];
        let ids: Vec<Bson> = match collection.aggregate(sample).await {
            Ok(cursor) => match cursor.try_collect::<Vec<Document>>().await {
                Ok(docs) => docs.into_iter().filter_map(|mut d| d.remove("_id")).collect(),
                Err(e) => {
                    warn!(namespace = %format!("{db}.{coll}"), error = %e, "sampling _ids to split the snapshot failed; reading it in one pass");
                    return None;
                }
            },
            Err(e) => {
                warn!(namespace = %format!("{db}.{coll}"), error = %e, "sampling _ids to split the snapshot failed; reading it in one pass");
                return None;
            }
        };
        let mut bounds: Vec<Bson> = (1..ranges as usize).filter_map(|k| ids.get(k * ids.len() / ranges as usize).cloned()).collect();
        bounds.dedup();
        (!bounds.is_empty()).then_some(bounds)
    }

    /// Read the `ranges` of `db.coll` at once, each recording its own progress.
    async fn snapshot_ranges(&self, db: &str, coll: &str, ranges: Vec<Range>, version: u64) -> Result<Ended, Error> {
        use futures_util::StreamExt;
        let ns = format!("{db}.{coll}");
        info!(namespace = %ns, ranges = ranges.len(), "snapshot of collection started, in _id ranges read at once");
        let mut running: futures_util::stream::FuturesUnordered<_> = ranges.into_iter().map(|r| self.read_range(db, coll, r, version)).collect();
        let mut cancelled = false;
        while let Some(ended) = running.next().await {
            cancelled |= ended? == Ended::Cancelled;
        }
        if cancelled {
            return Ok(Ended::Cancelled);
        }
        self.finish_collection(ns).await
    }

    /// Read one range of a split snapshot.
    async fn read_range(&self, db: &str, coll: &str, range: Range, version: u64) -> Result<Ended, Error> {
        let mut at = Reading::new(db, coll, range.last.or(range.after), version);
        at.range = Some((range.index, range.up_to));
        if self.read_all(db, coll, &mut at).await? == Ended::Cancelled {
            return Ok(Ended::Cancelled);
        }
        self.record(Position::SnapshotRangeRead { ns: at.ns, range: range.index, last_id: None });
        Ok(Ended::Complete)
    }

    /// Read every document of `db.coll` in `_id` order, after `resume_after` if given, as
    /// writes with version `version`. Records snapshot positions as it goes.
    ///
    /// # Errors
    /// Only when the sink closed; MongoDB errors are retried from the last `_id` read.
    pub async fn snapshot_collection(&self, db: &str, coll: &str, resume_after: Option<Bson>, version: u64) -> Result<Ended, Error> {
        let mut at = Reading::new(db, coll, resume_after, version);
        info!(namespace = %at.ns, resume = at.resume_after.is_some(), "snapshot of collection started");
        if self.read_all(db, coll, &mut at).await? == Ended::Cancelled {
            return Ok(Ended::Cancelled);
        }
        if let Some(id) = at.resume_after.take() {
            self.record(at.position(id));
        }
        self.finish_collection(at.ns).await
    }

    /// The collection's snapshot is read: record it and send partial batches now (snapshot
    /// batches wait longer than stream batches to fill).
    async fn finish_collection(&self, ns: String) -> Result<Ended, Error> {
        self.record(Position::SnapshotCollectionDone { ns: ns.clone() });
        match self.send(Change::Flush).await {
            Err(Error::Cancelled) => return Ok(Ended::Cancelled),
            other => other?,
        }
        info!(namespace = %ns, "snapshot of collection read; waiting for acknowledgement");
        Ok(Ended::Complete)
    }

    /// Query and read until every document of `at` is handed on, querying again after the last
    /// `_id` read when a read fails.
    async fn read_all(&self, db: &str, coll: &str, at: &mut Reading) -> Result<Ended, Error> {
        loop {
            let up_to = at.range.as_ref().and_then(|(_, up_to)| up_to.as_ref());
            let cursor = match self.snapshot_cursor(db, coll, at.resume_after.as_ref(), up_to).await {
                Ok(c) => c,
                Err(e) => {
                    warn!(namespace = %at.ns, error = %e, "snapshot query failed; retrying");
                    self.health.source_beat(false);
                    if at.backoff.wait(&self.cancel).await.is_err() {
                        return Ok(Ended::Cancelled);
                    }
                    continue;
                }
            };
            // `None`: the read failed; query again after the last `_id` read.
            if let Some(ended) = self.read_cursor(cursor, at).await? {
                return Ok(ended);
            }
        }
    }

    /// The snapshot query of `db.coll` after `resume_after` (up to `up_to`), in `_id` order.
    async fn snapshot_cursor(&self, db: &str, coll: &str, resume_after: Option<&Bson>, up_to: Option<&Bson>) -> Result<RawBatchCursor, mongodb::error::Error> {
        let collection = self.client.database(db).collection::<RawDocumentBuf>(coll);
        let shape = self.shapes.for_ns(db, coll);
        let filter = filter::between(resume_after, up_to);
        if shape.snapshot_stages.is_empty() {
            let find = collection.find(filter).sort(doc! {"_id": 1}).batch_size(1000);
            // A view takes no hint (MongoDB refuses one); its pipeline decides.
            return if self.is_view(db, coll) { find.batch().await } else { find.hint(mongodb::options::Hint::Keys(doc! {"_id": 1})).batch().await };
        }
        // The mapping's stages after monsoon's own: resume after the last `_id`, in `_id` order
        // (the stages must keep both).
        let mut pipeline = vec![doc! {"$match": filter}, doc! {"$sort": {"_id": 1}}];
        pipeline.extend(shape.snapshot_stages.iter().cloned());
        collection.aggregate(pipeline).batch_size(1000).batch().await
    }

    /// Hand on every document of `cursor`, recording positions as it goes. `None`: the read
    /// failed (backed off; query again after `at.resume_after`).
    async fn read_cursor(&self, cursor: RawBatchCursor, at: &mut Reading) -> Result<Option<Ended>, Error> {
        let mut cursor = ReadAhead::start(cursor);
        let mut since_position = 0u64;
        loop {
            let ready = if self.cancel.is_cancelled() { None } else { cursor.ready() };
            let next = match ready {
                // The common case: a document read ahead, and no shutdown.
                Some(raw) => Ok(Some(raw)),
                None => tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => {
                        if let Some(id) = at.resume_after.take() {
                            self.record(at.position(id));
                        }
                        return Ok(Some(Ended::Cancelled));
                    }
                    next = self.read(cursor.next(), SNAPSHOT_READ_TIMEOUT) => match next {
                        Ok(n) => n,
                        Err(Error::Cancelled) => return Ok(Some(Ended::Cancelled)),
                        Err(e) => return Err(e),
                    },
                },
            };
            let raw = match next {
                Ok(Some(raw)) => raw,
                Ok(None) => return Ok(Some(Ended::Complete)),
                Err(e) => {
                    warn!(namespace = %at.ns, error = %e, "snapshot read failed; resuming after the last _id read");
                    self.health.source_beat(false);
                    if let Some(id) = &at.resume_after {
                        self.record(at.position(id.clone()));
                    }
                    return Ok(at.backoff.wait(&self.cancel).await.is_err().then_some(Ended::Cancelled));
                }
            };
            at.backoff.reset();
            if since_position.is_multiple_of(BEAT_EVERY) {
                self.health.source_beat(true);
            }
            let file = match self.files {
                Some(_) => Box::pin(self.snapshot_file(&raw, at)).await,
                None => Ok(None),
            };
            let handed = match file.map(|file| self.snapshot_doc(raw, file, at)) {
                Ok(Some(chunk)) => self.hand_over(chunk).await,
                other => other.map(drop),
            };
            match handed {
                Err(Error::Cancelled) => return Ok(Some(Ended::Cancelled)),
                other => other?,
            }
            since_position += 1;
            if since_position >= POSITION_EVERY {
                since_position = 0;
                if let Some(id) = &at.resume_after {
                    self.record(at.position(id.clone()));
                }
            }
        }
    }

    /// Stage one snapshot document (if this shard owns it) with its GridFS file's content
    /// (`file`, from [`Source::snapshot_file`]), and move the resume point past it. Returns a
    /// full chunk for [`Source::hand_over`]; not async, as [`Source::stage_doc`].
    fn snapshot_doc(&self, raw: RawDocumentBuf, file: Option<FileBody>, at: &mut Reading) -> Option<Vec<Change>> {
        let Ok(Some(id)) = raw.get("_id").map(|id| id.map(|id| id.to_raw_bson())) else {
            // Only a mapping's snapshot stage can take `_id` away.
            error!(namespace = %at.ns, "document without _id skipped by the snapshot: a stage of `aggregation.snapshot` removed it; keep `_id`");
            self.metrics.events.with_label_values(&["no_id"]).inc();
            return None;
        };
        let id_ref = id.as_raw_bson_ref();
        let mut full = None;
        if self.owns(id_ref) {
            let found = Found { id: id_ref, doc: Some(&raw), update: None, before: None };
            let doc = self.doc_of(&at.names, found, file, at.version, true);
            full = self.stage_doc(doc, Some(Body::Own(raw)));
            self.metrics.snapshot_docs.inc();
        }
        at.resume_after = Some(id.try_into().unwrap_or(Bson::Null));
        full
    }

    /// The content of a snapshot document's GridFS file, when its namespace indexes files'
    /// content and this shard owns it ([`Source::wants_file`]).
    async fn snapshot_file(&self, raw: &RawDocument, at: &Reading) -> Result<Option<FileBody>, Error> {
        let Ok(Some(id)) = raw.get("_id") else { return Ok(None) };
        let found = Found { id, doc: Some(raw), update: None, before: None };
        if !self.wants_file(&at.names, &found) {
            return Ok(None);
        }
        self.file_of(&at.names, &found).await
    }

    async fn open_stream(&self, start: &StreamStart, lean: bool, scope: Option<&(String, String)>) -> Result<ChangeStream<RawDocumentBuf>, mongodb::error::Error> {
        let dbs = match scope {
            Some((db, _)) => Some(vec![db.clone()]),
            None => self.routing.databases(),
        };
        let mut pipeline = stream_pipeline(dbs.as_deref(), lean, self.keep_update);
        if !lean {
            // The mappings' own `$match` stages, before `updateDescription` is projected away
            // (they may watch changed fields). A lean stream (after an event over 16 MB) has no
            // `fullDocument` for them to read: it skips them and passes more events, which only
            // index documents' current state.
            let at = pipeline.len() - 1;
            pipeline.splice(at..at, self.shapes.stream_stages());
        }
        // Pre-images only where relations read them, and not in lean mode (after an event
        // over 16 MB, the smallest events).
        let mut options = stream_options(lean, !lean && !self.pre_images.is_empty());
        match start {
            StreamStart::At(t) => options.start_at_operation_time = Some(Timestamp::from(*t)),
            StreamStart::ResumeAfter(token) => options.resume_after = Some(token.clone()),
            StreamStart::StartAfter(token) => options.start_after = Some(token.clone()),
        }
        // One stream per pipeline: database-level when every namespace is in one database,
        // deployment-level otherwise (filtered to the routed databases above); or one per
        // collection.
        let stream = if let Some((db, coll)) = scope {
            self.client.database(db).collection::<Document>(coll).watch().pipeline(pipeline).with_options(options).await?
        } else if let Some([db]) = dbs.as_deref() {
            self.client
                .database(db)
                .watch()
                .pipeline(pipeline)
                .with_options(options)
                .await?
        } else {
            self.client
                .watch()
                .pipeline(pipeline)
                .with_options(options)
                .await?
        };
        Ok(stream.with_type::<RawDocumentBuf>())
    }

    /// Follow the change stream from `start` until cancelled.
    ///
    /// # Errors
    /// [`Error::HistoryLost`] when the resume point is gone; [`Error::Closed`].
    pub async fn stream(&self, start: StreamStart) -> Result<Ended, Error> {
        self.health.set_phase(Phase::Streaming);
        let mut at = Following::new(start, None);
        loop {
            let Some(stream) = self.open_or_wait(&mut at).await? else {
                if self.cancel.is_cancelled() {
                    return Ok(Ended::Cancelled);
                }
                continue;
            };
            if self.follow_open(stream, &mut at).await? == Ended::Cancelled {
                return Ok(Ended::Cancelled);
            }
        }
    }

    /// Open the stream where `at` says; `None` after a failure to retry (backed off) or when
    /// re-opening differently.
    async fn open_or_wait(&self, at: &mut Following) -> Result<Option<ChangeStream<RawDocumentBuf>>, Error> {
        let lean = at.lean_left > 0;
        let e = match self.open_stream(&at.start, lean, at.scope.as_ref()).await {
            Ok(s) => {
                info!(lean, "change stream open");
                return Ok(Some(s));
            }
            Err(e) => e,
        };
        if let Some(code) = history_lost_code(&e) {
            self.metrics.history_lost.inc();
            return Err(Error::HistoryLost { code });
        }
        if let (StreamStart::ResumeAfter(token), true) = (&at.start, refuses_resume_after_invalidate(&e)) {
            // A checkpoint written before invalidate tokens were marked: MongoDB accepts this
            // token only with `startAfter`.
            warn!("the stored resume token is an invalidate's; re-opening with startAfter");
            at.start = StreamStart::StartAfter(token.clone());
            return Ok(None);
        }
        warn!(error = %e, "failed to open the change stream; retrying");
        self.health.source_beat(false);
        let _ = at.backoff.wait(&self.cancel).await;
        Ok(None)
    }

    /// Read an open stream until it must be re-opened (`Complete`) or shutdown (`Cancelled`),
    /// recording positions as it goes.
    async fn follow_open(&self, mut stream: ChangeStream<RawDocumentBuf>, at: &mut Following) -> Result<Ended, Error> {
        let lean = at.lean_left > 0;
        let mut since_position = 0u64;
        let mut last_recorded: Option<ResumeToken> = None;
        loop {
            let next = {
                // Pinned where it is made: the driver's future is large (its every state), and
                // moving it into the read would copy all of it for each event.
                let next = std::pin::pin!(stream.next_if_any());
                tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => None,
                    next = self.read(next, STREAM_READ_TIMEOUT) => Some(next?),
                }
            };
            let Some(next) = next else {
                if let Some(token) = stream.resume_token() {
                    self.record_token(at, token, false);
                }
                return Ok(Ended::Cancelled);
            };
            match next {
                Ok(Some(raw)) => {
                    at.backoff.reset();
                    if since_position == 0 {
                        self.health.set_caught_up(false);
                    }
                    since_position += 1;
                    if since_position.is_multiple_of(BEAT_EVERY) {
                        self.health.source_beat(true);
                    }
                    // Past the oversize event: handle this one, then re-open with updateLookup.
                    let back_to_lookup = lean && at.lean_left == 1;
                    at.lean_left = at.lean_left.saturating_sub(1);
                    if self.handle_event(raw, &mut at.last_time).await? == Next::Reopen {
                        // After an invalidate: continue after it.
                        if let Some(token) = stream.resume_token() {
                            self.record_token(at, token.clone(), true);
                            at.start = StreamStart::StartAfter(token);
                        }
                        at.invalidated = true;
                        return Ok(Ended::Complete);
                    }
                    // The token is cloned only when recorded, not per event.
                    if since_position >= POSITION_EVERY {
                        since_position = 0;
                        if let Some(token) = stream.resume_token() {
                            last_recorded = Some(token.clone());
                            self.record_token(at, token, false);
                        }
                    }
                    if back_to_lookup {
                        info!("past the oversize event; returning to updateLookup");
                        at.continue_after(stream.resume_token());
                        return Ok(Ended::Complete);
                    }
                }
                Ok(None) => {
                    // Batch exhausted: the post-batch resume token moves on even when no event
                    // matched, so a quiet stream keeps its checkpoint fresh.
                    self.health.source_beat(true);
                    self.health.set_caught_up(true);
                    if let Some(token) = stream.resume_token().filter(|t| last_recorded.as_ref() != Some(t)) {
                        since_position = 0;
                        last_recorded = Some(token.clone());
                        self.record_token(at, token.clone(), false);
                        at.continue_after(Some(token));
                    }
                }
                Err(e) => {
                    // Re-open after the last event read: the events before it are already in
                    // the pipeline.
                    at.continue_after(stream.resume_token());
                    return self.read_failed(e, at).await;
                }
            }
        }
    }

    /// A stream read failed: lost history ends the stream; anything else re-opens it (backed
    /// off, or without `updateLookup` for a while after an event too large for MongoDB).
    async fn read_failed(&self, e: ReadError, at: &mut Following) -> Result<Ended, Error> {
        if let Some(code) = e.history_lost_code() {
            self.metrics.history_lost.inc();
            return Err(Error::HistoryLost { code });
        }
        self.metrics.stream_reopens.inc();
        if let ReadError::Timeout(_) = &e {
            warn!(error = %e, "change stream read timed out; re-opening from the last token read");
            return Ok(Ended::Complete);
        }
        if is_too_large(&e) {
            // The next event plus its looked-up document exceeds 16 MB: read on without
            // updateLookup and fetch documents by `_id` for a while.
            warn!(error = %e, "change event too large for MongoDB; continuing without updateLookup for {LEAN_EVENTS} events");
            at.lean_left = LEAN_EVENTS;
            return Ok(Ended::Complete);
        }
        // Re-open from the last token read, whatever the error's labels say: some servers omit
        // ResumableChangeStreamError on errors the driver could resume.
        warn!(error = %e, "change stream failed; re-opening from the last token read");
        self.health.source_beat(false);
        if at.backoff.wait(&self.cancel).await.is_err() {
            return Ok(Ended::Cancelled);
        }
        Ok(Ended::Complete)
    }

    /// Record the stream's position at `token`.
    fn record_token(&self, at: &Following, token: ResumeToken, after_invalidate: bool) {
        let after_invalidate = after_invalidate || at.start.is_start_after(&token);
        let time = at.last_time.map(ClusterTime::from);
        match &at.scope {
            None => self.record(Position::Stream { token, time, after_invalidate }),
            Some((db, coll)) => self.record(Position::CollectionStream { ns: format!("{db}.{coll}"), token, time, after_invalidate }),
        }
    }

    /// Follow one change stream per synced collection (`streamScope: Collection`) until
    /// cancelled: those in `marks` from where they were, and every other one listed from
    /// `listed_at` (a collection not listed before was created after it). Collections are
    /// listed again every [`COLLECTION_POLL`]; a collection's stream ends when it is dropped or
    /// renamed away, and starts again after that if the collection comes back.
    ///
    /// # Errors
    /// [`Error::HistoryLost`] when a stream's resume point is gone; [`Error::Closed`].
    pub async fn stream_collections(&self, mut marks: BTreeMap<String, StreamStart>, mut listed_at: ClusterTime) -> Result<Ended, Error> {
        use futures_util::StreamExt;
        self.health.set_phase(Phase::Streaming);
        let mut running = futures_util::stream::FuturesUnordered::new();
        let mut active = std::collections::BTreeSet::new();
        loop {
            match (cluster_time(&self.client).await, self.collections().await) {
                (Ok(now), Ok(collections)) => {
                    for (db, coll) in collections.into_iter().filter(|(db, coll)| !self.is_view(db, coll)) {
                        let ns = format!("{db}.{coll}");
                        if !active.insert(ns.clone()) {
                            continue;
                        }
                        let start = marks.remove(&ns).unwrap_or_else(|| {
                            self.record(Position::CollectionOpened { ns: ns.clone(), at: listed_at });
                            StreamStart::At(listed_at)
                        });
                        info!(namespace = %ns, "change stream of collection opening");
                        running.push(self.stream_one(db, coll, start));
                    }
                    self.record(Position::CollectionsListed { at: now });
                    listed_at = now;
                }
                _ if self.cancel.is_cancelled() => break,
                (Err(e), _) | (_, Err(e)) => warn!(error = %e, "failed to list collections for their change streams; retrying"),
            }
            let poll = tokio::time::sleep(COLLECTION_POLL);
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    Some((ns, ended, start)) = running.next(), if !running.is_empty() => match ended? {
                        Ended::Cancelled => {}
                        Ended::Complete => {
                            // Dropped or renamed away: from after its invalidate if it comes back.
                            info!(namespace = %ns, "collection gone; its change stream ends");
                            active.remove(&ns);
                            marks.insert(ns, start);
                        }
                    },
                    () = &mut poll => break,
                    () = self.cancel.cancelled() => break,
                }
            }
            if self.cancel.is_cancelled() {
                break;
            }
        }
        // Each stream records where it stopped.
        while let Some((_, ended, _)) = running.next().await {
            ended?;
        }
        Ok(Ended::Cancelled)
    }

    /// Follow the change stream of `db.coll` from `start` until cancelled (`Cancelled`) or the
    /// collection is gone (`Complete`, with where to start if it comes back).
    async fn stream_one(&self, db: String, coll: String, start: StreamStart) -> (String, Result<Ended, Error>, StreamStart) {
        let ns = format!("{db}.{coll}");
        let mut at = Following::new(start, Some((db, coll)));
        let ended = loop {
            let stream = match self.open_or_wait(&mut at).await {
                Ok(Some(s)) => s,
                Ok(None) if self.cancel.is_cancelled() => break Ok(Ended::Cancelled),
                Ok(None) => continue,
                Err(e) => break Err(e),
            };
            match self.follow_open(stream, &mut at).await {
                Ok(Ended::Complete) if at.invalidated => break Ok(Ended::Complete),
                Ok(Ended::Complete) => {}
                other => break other,
            }
        };
        (ns, ended, at.start)
    }

    async fn handle_event(&self, raw: RawDocumentBuf, last_time: &mut Option<Timestamp>) -> Result<Next, Error> {
        let action = match event::parse(&raw) {
            Ok(a) => a,
            Err(e) => {
                // Never skipped: the whole event is dead-lettered, in order with the rest, so
                // the change it carries can be applied by hand.
                self.metrics.events.with_label_values(&["malformed"]).inc();
                let seen = event::salvage(&raw);
                if seen.id.is_some_and(|id| !self.owns(id)) {
                    return Ok(Next::Continue);
                }
                self.send(Change::Unreadable(Unreadable {
                    raw: raw.to_owned(),
                    ns: seen.db.zip(seen.coll).map(|(d, c)| (d.to_owned(), c.to_owned())),
                    id: seen.id.map(|id| id.to_raw_bson()),
                    time: seen.time,
                    why: e.to_string(),
                }))
                .await?;
                return Ok(Next::Continue);
            }
        };
        if let Some(time) = action.time() {
            *last_time = Some(time);
        }
        match action {
            Action::Upsert { db, coll, id, doc, time, update, before } => {
                self.metrics.hot.upserts.inc();
                if let Some(ns) = self.follows(db, coll, id) {
                    let found = Found { id, doc: Some(doc), update, before };
                    let file = if self.wants_file(&ns, &found) { Box::pin(self.file_of(&ns, &found)).await? } else { None };
                    let change = self.doc_of(&ns, found, file, ClusterTime::from(time).version(), false);
                    // The document goes on inside its event: no copy.
                    let body = match change::span(&raw, doc) {
                        Some(span) => Body::within(raw, span),
                        None => Body::Own(doc.to_owned()),
                    };
                    if let Some(chunk) = self.stage_doc(change, Some(body)) {
                        self.hand_over(chunk).await?;
                    }
                }
            }
            Action::Delete { db, coll, id, time, before } => {
                self.metrics.hot.deletes.inc();
                if let Some(ns) = self.follows(db, coll, id) {
                    let found = Found { id, doc: None, update: None, before };
                    let change = self.doc_of(&ns, found, None, ClusterTime::from(time).version(), false);
                    if let Some(chunk) = self.stage_doc(change, None) {
                        self.hand_over(chunk).await?;
                    }
                }
            }
            Action::Lookup { db, coll, id, time } => {
                self.metrics.events.with_label_values(&["lookup"]).inc();
                if let Some(ns) = self.follows(db, coll, id) {
                    let doc = self.lookup(db, coll, id).await?;
                    let found = Found { id, doc: doc.as_deref(), update: None, before: None };
                    let file = if self.wants_file(&ns, &found) { Box::pin(self.file_of(&ns, &found)).await? } else { None };
                    let change = self.doc_of(&ns, found, file, ClusterTime::from(time).version(), false);
                    if let Some(chunk) = self.stage_doc(change, doc.map(Body::Own)) {
                        self.hand_over(chunk).await?;
                    }
                }
            }
            Action::Drop { db, coll, time } => {
                self.metrics.events.with_label_values(&["drop"]).inc();
                if self.routing.includes(db, coll) {
                    self.dropped(db, coll, time).await?;
                }
            }
            Action::Rename { db, coll, to_db, to_coll, time } => {
                self.metrics.events.with_label_values(&["rename"]).inc();
                if self.routing.includes(db, coll) {
                    self.dropped(db, coll, Some(time)).await?;
                }
                if self.routing.includes(to_db, to_coll) {
                    // The renamed collection's documents never appear as inserts: read them
                    // as a snapshot, versioned at the rename, before later events.
                    info!(from = %format!("{db}.{coll}"), to = %format!("{to_db}.{to_coll}"), "collection renamed into the pipeline; snapshotting it");
                    if self.snapshot_collection(to_db, to_coll, None, ClusterTime::from(time).version()).await? == Ended::Cancelled {
                        // Part of the collection was never read: no position past the rename
                        // may be recorded, so the next start reads the rename (and all of it)
                        // again.
                        return Err(Error::Cancelled);
                    }
                }
            }
            Action::DropDatabase { .. } => {
                self.metrics.events.with_label_values(&["dropDatabase"]).inc();
            }
            Action::Invalidate => {
                self.metrics.events.with_label_values(&["invalidate"]).inc();
                info!("change stream invalidated; re-opening after the invalidate event");
                return Ok(Next::Reopen);
            }
            Action::Ignore { .. } => {}
        }
        Ok(Next::Continue)
    }

    /// The content of the GridFS file whose document of files collection `db.coll` is `doc`:
    /// its chunks in order, read until the file is known to exceed `max` bytes. Retried until
    /// MongoDB answers.
    async fn file_body(&self, db: &str, coll: &str, id: RawBsonRef<'_>, doc: &RawDocument, max: u64) -> Result<FileBody, Error> {
        let length = match doc.get("length") {
            Ok(Some(RawBsonRef::Int64(n))) => u64::try_from(n).unwrap_or(0),
            Ok(Some(RawBsonRef::Int32(n))) => u64::try_from(n).unwrap_or(0),
            Ok(Some(RawBsonRef::Double(n))) if n >= 0.0 => n as u64,
            _ => 0,
        };
        if length > max {
            return Ok(FileBody::TooLarge(length));
        }
        let bucket = coll.strip_suffix(".files").unwrap_or(coll);
        let chunks = self.client.database(db).collection::<RawDocumentBuf>(&format!("{bucket}.chunks"));
        let id: Bson = id.to_raw_bson().try_into().unwrap_or(Bson::Null);
        crate::retry::until_ok(&self.cancel, || read_chunks(&chunks, &id, max), |e| {
            warn!(namespace = %format!("{db}.{coll}"), error = %e, "reading a GridFS file's chunks failed; retrying");
            self.health.source_beat(false);
        })
        .await
        .map_err(|_| Error::Cancelled)
    }

    /// Read one document by `_id` (lean mode), retrying until MongoDB answers. `None`: it
    /// was deleted since the change, whose delete event follows.
    async fn lookup(&self, db: &str, coll: &str, id: RawBsonRef<'_>) -> Result<Option<RawDocumentBuf>, Error> {
        let collection = self.client.database(db).collection::<RawDocumentBuf>(coll);
        let id: Bson = id.to_raw_bson().try_into().unwrap_or(Bson::Null);
        crate::retry::until_ok(&self.cancel, || std::future::IntoFuture::into_future(collection.find_one(doc! {"_id": id.clone()})), |e| {
            warn!(error = %e, "document lookup failed; retrying");
            self.health.source_beat(false);
        })
        .await
        .map_err(|_| Error::Cancelled)
    }

    /// Hand on the drop of `db.coll` (at cluster time `time`): the transform stage decides
    /// what it deletes, and the sink deletes it once every change before it is written.
    ///
    /// # Errors
    /// [`Error::Cancelled`] when shutdown came first.
    pub async fn dropped(&self, db: &str, coll: &str, time: Option<Timestamp>) -> Result<(), Error> {
        self.send(Change::Dropped { db: db.to_owned(), coll: coll.to_owned(), time }).await
    }

    /// Hand on the sweep after a re-snapshot versioned `below`, with the collections that
    /// exist now (those written before and gone now were dropped during the lost history).
    ///
    /// # Errors
    /// [`Error::Cancelled`] when shutdown came first.
    pub async fn send_sweep(&self, existing: Vec<(String, String)>, below: u64) -> Result<(), Error> {
        self.send(Change::Sweep { existing, below }).await
    }
}

/// One `_id` range of a split snapshot.
struct Range {
    index: usize,
    /// Exclusive lower bound.
    after: Option<Bson>,
    /// Inclusive upper bound.
    up_to: Option<Bson>,
    /// The last `_id` acknowledged.
    last: Option<Bson>,
}

impl Range {
    /// The ranges `bounds` (each an inclusive end) make.
    fn all(bounds: &[Bson]) -> Vec<Range> {
        (0..=bounds.len())
            .map(|index| Range { index, after: index.checked_sub(1).map(|j| bounds[j].clone()), up_to: bounds.get(index).cloned(), last: None })
            .collect()
    }

    fn from_progress(index: usize, p: &RangeProgress) -> Range {
        let id = |v: &Option<serde_json::Value>| v.as_ref().and_then(id_from_json);
        Range { index, after: id(&p.after), up_to: id(&p.up_to), last: id(&p.last_id) }
    }
}

/// Where the snapshot of one collection (or one range of it) is.
struct Reading {
    /// `db.collection`.
    ns: String,
    /// Database and collection, shared by every document handed on.
    names: (Arc<str>, Arc<str>),
    /// The last `_id` read.
    resume_after: Option<Bson>,
    /// The version of every document read.
    version: u64,
    backoff: Backoff,
    /// For one range of a split snapshot: which, and its inclusive end.
    range: Option<(usize, Option<Bson>)>,
}

impl Reading {
    fn new(db: &str, coll: &str, resume_after: Option<Bson>, version: u64) -> Self {
        Self { ns: format!("{db}.{coll}"), names: (Arc::from(db), Arc::from(coll)), resume_after, version, backoff: Backoff::default(), range: None }
    }

    /// The position "read up to and including `last_id`".
    fn position(&self, last_id: Bson) -> Position {
        match &self.range {
            None => Position::SnapshotRange { ns: self.ns.clone(), last_id },
            Some((range, _)) => Position::SnapshotRangeRead { ns: self.ns.clone(), range: *range, last_id: Some(last_id) },
        }
    }
}

/// Where a followed stream is.
struct Following {
    /// Where to (re-)open.
    start: StreamStart,
    /// Events left to read without `updateLookup` after an oversize event.
    lean_left: u64,
    /// Cluster time of the last event read (stored beside the token, for re-sharding).
    last_time: Option<Timestamp>,
    backoff: Backoff,
    /// The collection, for a stream of one collection.
    scope: Option<(String, String)>,
    /// The stream read an invalidate (its collection was dropped or renamed away).
    invalidated: bool,
}

impl Following {
    fn new(start: StreamStart, scope: Option<(String, String)>) -> Self {
        Self { start, lean_left: 0, last_time: None, backoff: Backoff::default(), scope, invalidated: false }
    }

    /// Re-open after `token`, the last one read, if any.
    fn continue_after(&mut self, token: Option<ResumeToken>) {
        if let Some(token) = token {
            self.start = self.start.continue_after(token);
        }
    }
}

#[derive(PartialEq, Eq)]
enum Next {
    Continue,
    Reopen,
}

/// Where the change stream starts.
#[derive(Debug, Clone)]
pub enum StreamStart {
    /// At a cluster time (inclusive): the recorded start before the snapshot.
    At(ClusterTime),
    /// After an acknowledged event.
    ResumeAfter(ResumeToken),
    /// After an invalidate event.
    StartAfter(ResumeToken),
}

impl StreamStart {
    /// Where to re-open after reading up to `token` on a stream opened at `self`. A stream that
    /// read nothing since it started after an invalidate reports that invalidate's token, which
    /// only `startAfter` accepts.
    fn continue_after(&self, token: ResumeToken) -> StreamStart {
        if self.is_start_after(&token) {
            StreamStart::StartAfter(token)
        } else {
            StreamStart::ResumeAfter(token)
        }
    }

    /// Whether `token` is the invalidate this stream was opened after.
    fn is_start_after(&self, token: &ResumeToken) -> bool {
        matches!(self, StreamStart::StartAfter(t) if t == token)
    }
}

/// A GridFS file's chunks in order, their `data` joined; `TooLarge` once past `max` bytes.
async fn read_chunks(chunks: &mongodb::Collection<RawDocumentBuf>, id: &Bson, max: u64) -> Result<FileBody, mongodb::error::Error> {
    let mut cursor = chunks.find(doc! {"files_id": id.clone()}).sort(doc! {"n": 1}).await?;
    let mut content = Vec::new();
    while cursor.advance().await? {
        if let Ok(Some(RawBsonRef::Binary(b))) = cursor.current().get("data") {
            content.extend_from_slice(b.bytes);
        }
        if content.len() as u64 > max {
            return Ok(FileBody::TooLarge(content.len() as u64));
        }
    }
    Ok(FileBody::Content(content))
}

/// MongoDB error code: the resume token cannot be used (here: `resumeAfter` an invalidate).
const INVALID_RESUME_TOKEN: i32 = 260;

/// Whether MongoDB refused `resumeAfter` because the token is an invalidate event's.
fn refuses_resume_after_invalidate(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Command(c) if c.code == INVALID_RESUME_TOKEN && c.message.contains("invalidate"))
}

fn is_too_large(e: &ReadError) -> bool {
    matches!(e, ReadError::Mongo(e) if matches!(&*e.kind, ErrorKind::Command(c) if c.code == BSON_OBJECT_TOO_LARGE))
}

/// Why a read from MongoDB failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The server or driver reported an error.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// No reply in time.
    #[error("no reply from MongoDB within {0:?}")]
    Timeout(Duration),
}

impl ReadError {
    fn history_lost_code(&self) -> Option<i32> {
        match self {
            Self::Mongo(e) => history_lost_code(e),
            Self::Timeout(_) => None,
        }
    }
}

fn history_lost_code(e: &mongodb::error::Error) -> Option<i32> {
    match &*e.kind {
        ErrorKind::Command(c) => match c.code {
            CHANGE_STREAM_HISTORY_LOST | CAPPED_POSITION_LOST => Some(c.code),
            CHANGE_STREAM_FATAL if c.message.contains("resume") => Some(c.code),
            _ => None,
        },
        _ => None,
    }
}

/// Decode a stored `_id` back to BSON (for resuming a snapshot).
pub fn id_from_json(json: &serde_json::Value) -> Option<Bson> {
    Bson::try_from(json.clone()).ok()
}

/// The change stream's pipeline for a pipeline reading databases `dbs`: their events, renames
/// into them, and invalidations. `updateDescription` is never used (the full document is
/// indexed): dropping it server-side halves big update events and keeps them under 16 MB. In
/// lean mode the document itself is dropped too and looked up by `_id` instead.
/// With `dbs` `None` (a namespace regular expression may select any database) every database
/// but the system ones is read, and each event is matched against the routing as it arrives.
pub fn stream_pipeline(dbs: Option<&[String]>, lean: bool, keep_update: bool) -> Vec<Document> {
    let project = match (lean, keep_update) {
        (true, _) => doc! {"$project": {"updateDescription": 0, "fullDocument": 0}},
        // Scripts get the update description (their third argument); merge patches apply it,
        // truncations included.
        (false, true) => doc! {"$project": {"updateDescription.disambiguatedPaths": 0}},
        (false, false) => doc! {"$project": {"updateDescription": 0}},
    };
    let select = match dbs {
        Some(dbs) => doc! {"$in": dbs},
        None => doc! {"$nin": crate::config::SYSTEM_DATABASES.to_vec()},
    };
    vec![
        doc! {"$match": {"$or": [
            {"ns.db": select.clone()},
            {"to.db": select},
            {"operationType": "invalidate"},
        ]}},
        project,
    ]
}

/// The change stream's options, without its start point.
pub fn stream_options(lean: bool, pre_images: bool) -> ChangeStreamOptions {
    ChangeStreamOptions::builder()
        .full_document((!lean).then_some(FullDocumentType::UpdateLookup))
        // `whenAvailable`: a collection without `changeStreamPreAndPostImages` gives `null`.
        .full_document_before_change(pre_images.then_some(FullDocumentBeforeChangeType::WhenAvailable))
        .max_await_time(Some(Duration::from_millis(500)))
        .batch_size(Some(1000))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_error(code: i32, message: &str) -> mongodb::error::Error {
        let e: mongodb::error::CommandError =
            mongodb::bson::from_document(doc! {"code": code, "codeName": "X", "errmsg": message}).expect("command error");
        mongodb::error::Error::from(ErrorKind::Command(e))
    }

    #[test]
    fn a_refused_resume_after_an_invalidate_is_recognised() {
        let refused = command_error(260, "Attempting to resume a change stream using 'resumeAfter' is not allowed from an invalidate notification.");
        assert!(refuses_resume_after_invalidate(&refused));
        assert!(!refuses_resume_after_invalidate(&command_error(260, "cannot resume: token is malformed")));
        assert!(!refuses_resume_after_invalidate(&command_error(286, "history lost after invalidate")));
    }

    #[test]
    fn a_stream_opened_after_an_invalidate_continues_after_it_until_it_reads_more() {
        let token = |d: &str| -> ResumeToken { mongodb::bson::from_bson(Bson::Document(doc! {"_data": d})).expect("token") };
        let start = StreamStart::StartAfter(token("inv"));
        assert!(start.is_start_after(&token("inv")));
        assert!(matches!(start.continue_after(token("inv")), StreamStart::StartAfter(_)));
        assert!(!start.is_start_after(&token("next")));
        assert!(matches!(start.continue_after(token("next")), StreamStart::ResumeAfter(_)));
        assert!(!StreamStart::ResumeAfter(token("inv")).is_start_after(&token("inv")));
    }

    #[test]
    fn credentials_are_redacted_from_messages() {
        let uri = "mongodb://u:hunter2@h:1/";
        let msg = format!("bad thing in {uri}");
        assert!(!redact(&msg, uri).contains("hunter2"));
    }
}
