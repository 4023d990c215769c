//! MongoDB source: connection, the snapshot of existing documents, and the change stream.
//!
//! The only place that talks to MongoDB. Documents are read as raw BSON and converted to
//! JSON once, straight into the bytes of the bulk body's `_source`.
//!
//! # Invariants
//! - The stream's start time is recorded before the first snapshot read, and the stream
//!   resumes from it (or from the last acknowledged token): nothing between snapshot and
//!   stream is missed.
//! - Snapshot documents carry the start time as their version; every change after it carries
//!   a larger one, so the stream's replay of changes made during the snapshot always wins.
//! - A lost resume point (ChangeStreamHistoryLost) is never skipped over.

pub mod event;
pub mod filter;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mongodb::bson::{doc, Bson, Document, RawBsonRef, RawDocument, RawDocumentBuf, Timestamp};
use mongodb::change_stream::event::ResumeToken;
use mongodb::change_stream::ChangeStream;
use mongodb::error::ErrorKind;
use mongodb::options::{
    ChangeStreamOptions, ClientOptions, FullDocumentType, Tls, TlsOptions,
};
use mongodb::Client;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::event::Action;
use crate::checkpoint::written::IndexBook;
use crate::checkpoint::{ClusterTime, Position};
use crate::config::{MongoConfig, Routing, Shard};
use crate::convert::{self, ConvertStats};
use crate::metrics::{Health, Metrics, Phase};
use crate::retry::Backoff;
use crate::sink::{locations, Closed, Op, Sink, Write};
use crate::transform::{script, Outcome, Shape, Shapes};

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
    /// The sink stopped (forced shutdown).
    #[error("the sink stopped")]
    SinkClosed(#[from] Closed),
    /// Shutdown was requested while waiting on the sink.
    #[error("cancelled")]
    Cancelled,
    /// Two live namespaces would write one index: dropping either would delete the other's
    /// documents with it.
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
        crate::retry::until_ok(&self.cancel, || list_collections(&self.client, self.routing), |e| {
            warn!(error = %crate::error_chain(e), "failed to list collections; retrying");
            self.health.source_beat(false);
        })
        .await
        .map_err(|_| Error::Cancelled)
    }
}

/// The synced collections of the routed databases, sorted.
///
/// # Errors
/// The driver's error when a listing fails.
pub async fn list_collections(client: &Client, routing: &Routing) -> Result<Vec<(String, String)>, mongodb::error::Error> {
    let mut out = Vec::new();
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
        let names = client
            .database(&db)
            .list_collection_names()
            .filter(doc! {"type": "collection"})
            .await?;
        for coll in names {
            if routing.includes(&db, &coll) {
                out.push((db.clone(), coll));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Everything the source needs while it runs.
pub struct Source<'a> {
    /// MongoDB client.
    pub client: Client,
    /// What is synced where.
    pub routing: &'a Routing,
    /// The sink receiving writes.
    pub sink: &'a Sink,
    /// Metrics.
    pub metrics: &'a Metrics,
    /// Health.
    pub health: &'a Health,
    /// Stops reading.
    pub cancel: CancellationToken,
    /// Delete indexes of dropped collections.
    pub delete_index_on_drop: bool,
    /// Last (db, collection, namespace, index) routed.
    pub route_cache: std::sync::Mutex<Option<Route>>,
    /// Reused buffer for Elasticsearch ids (each is then copied once into an exact-size box).
    pub id_scratch: std::sync::Mutex<Vec<u8>>,
    /// The documents this worker owns.
    pub shard: Shard,
    /// Namespaces written so far and their indexes (the checkpoint's `written`, kept current;
    /// a namespace whose index comes from its documents lists each, comma-separated).
    pub written: Arc<IndexBook>,
    /// How each namespace's documents are shaped.
    pub shapes: &'a Shapes,
    /// Pipeline name (location record ids).
    pub pipeline: &'a str,
    /// JavaScript middleware, when the pipeline has scripts or filters.
    pub scripts: Option<Arc<monsoon_script::Scripts>>,
}

/// A routed collection: database and collection names, and where its writes go.
pub type Route = (String, String, Target);

/// Where a namespace's writes go by default, and how its documents are shaped.
#[derive(Clone)]
pub struct Target {
    /// `db.collection`.
    pub ns: Arc<str>,
    /// Its default index.
    pub index: Arc<str>,
    /// Its mapping.
    pub shape: Arc<Shape>,
}

/// One change of a document, as the source read it.
#[derive(Clone, Copy)]
struct Change<'a> {
    /// The document's `_id`.
    id: RawBsonRef<'a>,
    /// The document; `None` for a delete.
    doc: Option<&'a RawDocument>,
    /// The update's description, for scripts.
    update: Option<&'a RawDocument>,
    /// External version: the change's cluster time.
    version: u64,
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
    /// Hand a write to the sink (staged, and sent with its chunk). While the sink
    /// applies back-pressure this waits, beating the source's heartbeat (waiting on a slow
    /// sink is not being stuck) and giving way to shutdown. Writes abandoned at shutdown are
    /// never acknowledged, so the checkpoint stays before them and they are read again on the
    /// next start.
    async fn send(&self, write: Write) -> Result<(), Error> {
        match self.sink.stage(write) {
            None => Ok(()),
            Some(chunk) => self.wait_on_sink(self.sink.send_chunk(chunk)).await,
        }
    }

    /// Hand staged writes over before the source waits on MongoDB, so a pause in the source
    /// never holds writes back.
    async fn flush(&self) -> Result<(), Error> {
        if self.sink.has_staged() {
            self.wait_on_sink(self.sink.flush_staged()).await?;
        }
        Ok(())
    }

    async fn wait_on_sink(&self, fut: impl std::future::Future<Output = Result<(), Closed>>) -> Result<(), Error> {
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
                () = tokio::time::sleep(Duration::from_secs(5)) => self.health.source_beat(true),
            }
        }
    }

    /// Await a MongoDB read; if it cannot complete at once, first hand staged writes over. A
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

    /// Index and namespace names of `db.coll`, cached for the common case of consecutive
    /// changes to one collection. A namespace's first route records it as written (before its
    /// first write, so a checkpoint past that write always knows the index).
    ///
    /// # Errors
    /// [`Error::SharedIndex`] when another live namespace already writes the same index.
    fn route(&self, db: &str, coll: &str) -> Result<Target, Error> {
        let mut cache = self.route_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((d, c, target)) = cache.as_ref() {
            if d == db && c == coll {
                return Ok(target.clone());
            }
        }
        let ns = format!("{db}.{coll}");
        let index = self.routing.index_for(db, coll);
        if let Some(first) = self.note_index(&ns, &index) {
            return Err(Error::SharedIndex { index, first, second: ns });
        }
        let target = Target { ns: Arc::from(ns), index: Arc::from(index), shape: self.shapes.for_ns(db, coll) };
        *cache = Some((db.to_string(), coll.to_string(), target.clone()));
        Ok(target)
    }

    fn note_index(&self, ns: &str, index: &str) -> Option<String> {
        self.written.note(ns, index)
    }

    /// Every index `db.coll` writes or has written: its default and those its documents chose.
    pub fn indexes_of(&self, db: &str, coll: &str) -> Vec<String> {
        self.written.indexes_of(db, coll)
    }

    /// Forget `db.coll` after its drop was applied: its index is no longer this pipeline's to
    /// sweep, and a new collection of that name starts afresh.
    fn forget(&self, db: &str, coll: &str) {
        let ns = format!("{db}.{coll}");
        *self.route_cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.written.forget(&ns);
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

    /// The write a change of `db.coll` becomes (`doc` is `None` for a delete), or `None` when
    /// the namespace's keep-filter ignores it.
    fn write_for(&self, db: &str, coll: &str, change: Change<'_>, stats: &mut ConvertStats) -> Result<Option<Write>, Error> {
        let target = self.route(db, coll)?;
        let scripts = self.scripts.as_ref().filter(|s| s.has_map(&target.ns) || s.has_filter(&target.ns));
        if target.shape.is_plain() && scripts.is_none() {
            return Ok(Some(self.plain_write(target.ns, target.index, change, stats)));
        }
        let shape = target.shape.clone();
        let mut write = self.shaped_write(target, scripts.is_some(), change, stats);
        if let (Some(scripts), Some(w)) = (scripts, write.as_mut()) {
            self.defer_to_scripts(scripts, &shape, change, w, stats);
        }
        Ok(write)
    }

    /// Hand a shaped write's document to the namespace's scripts: its operation is decided
    /// on the script threads and awaited by the sink, in order.
    fn defer_to_scripts(&self, scripts: &Arc<monsoon_script::Scripts>, shape: &Shape, change: Change<'_>, w: &mut Write, stats: &mut ConvertStats) {
        let Change { id, update, .. } = change;
        let source = match &w.op {
            // Shared, not copied: the scripts read it, and keep it as it is for `true`.
            Op::Index(s) | Op::Update(s) => s.clone(),
            // Deletes and refusals are not the scripts' to decide.
            Op::Delete | Op::Reject { .. } => return,
        };
        let mut id_value = Vec::new();
        if convert::write_value(id, &mut id_value, stats).is_err() {
            id_value = b"null".to_vec();
        }
        let update_desc = update.and_then(|u| {
            let mut out = Vec::new();
            convert::write_document(u, false, &mut out, stats).ok().map(|()| String::from_utf8_lossy(&out).into_owned())
        });
        let plan = script::Planned {
            update_desc,
            ns: w.ns.to_string(),
            source,
            id_value,
            index: w.index.clone(),
            id_json: w.id_json.clone(),
            routing: w.routing.clone(),
            pipeline: w.pipeline.clone(),
            update: shape.update,
            book: self.written.clone(),
        };
        w.deferred = Some(script::defer(scripts, plan));
    }

    /// A change through its namespace's mapping ([`crate::transform`]).
    fn shaped_write(&self, target: Target, scripted: bool, change: Change<'_>, stats: &mut ConvertStats) -> Option<Write> {
        let Target { ns, index, shape } = target;
        let Change { id, doc, version, .. } = change;
        let outcome = match doc {
            None => Ok(Outcome::Delete),
            Some(d) => shape.shape(d, Timestamp::from(ClusterTime::from_version(version)), stats),
        };
        // The MongoDB `_id` in Elasticsearch form: the default `_id`, and the document's
        // identity in its location record.
        let mongo_id = match convert::es_id_string(id) {
            Ok(text) => text,
            Err(_) => return Some(self.plain_write(ns, index, change, stats)),
        };
        let mut default_id = Vec::with_capacity(mongo_id.len() + 2);
        crate::convert::write_json_str(&mongo_id, &mut default_id);
        let default_id: Box<str> = String::from_utf8_lossy(&default_id).into();
        // Scripts may choose the index, `_id` or routing: their documents are tracked too.
        let origin = (shape.tracks_location() || scripted).then(|| Arc::from(locations::record_id(self.pipeline, &ns, &mongo_id)));
        let refuse = |ns: Arc<str>, index: Arc<str>, error_type: &'static str, reason: String, stats: &mut ConvertStats| {
            let mut document = Vec::new();
            let document = doc.and_then(|d| convert::write_document(d, false, &mut document, stats).ok()).map(|()| Bytes::from(document));
            Write::new(ns, index, default_id.clone(), version, Op::Reject { error_type, reason, document })
        };
        let mut write = match outcome {
            Ok(Outcome::Ignore) => {
                self.metrics.events.with_label_values(&["ignored"]).inc();
                return None;
            }
            Ok(Outcome::Delete) => Write::new(ns, index, default_id.clone(), version, Op::Delete),
            Ok(Outcome::Write(shaped)) => {
                let index = match shaped.index {
                    None => index,
                    Some(chosen) => match self.note_index(&ns, &chosen) {
                        None => Arc::from(chosen),
                        Some(other) => {
                            let reason = format!("the document chose index `{chosen}`, which namespace `{other}` writes too: a drop of either would delete the other's documents");
                            return Some(refuse(ns, Arc::from(chosen), "shared_index", reason, stats));
                        }
                    },
                };
                let source = Bytes::from(shaped.source);
                let op = if shape.update { Op::Update(source) } else { Op::Index(source) };
                let mut w = Write::new(ns, index, shaped.id_json.unwrap_or_else(|| default_id.clone()), version, op);
                w.routing = shaped.routing;
                w.pipeline = shape.ingest_pipeline.clone();
                w
            }
            Err(e) => return Some(refuse(ns, index, e.error_type(), e.to_string(), stats)),
        };
        write.origin = origin;
        Some(write)
    }

    /// A change of a namespace without a mapping: the document as it is, at its `_id`.
    fn plain_write(&self, ns: Arc<str>, index: Arc<str>, change: Change<'_>, stats: &mut ConvertStats) -> Write {
        let Change { id, doc, version, .. } = change;
        let mut scratch = self.id_scratch.lock().unwrap_or_else(|p| p.into_inner());
        scratch.clear();
        let id_buf = &mut *scratch;
        let mut source = Vec::new();
        let converted = doc.map(|doc| {
            source.reserve(doc.as_bytes().len() + 64);
            convert::write_document(doc, true, &mut source, stats)
        });
        if let Err(e) = convert::write_es_id(id, id_buf) {
            // An _id Elasticsearch cannot take (over 512 bytes): dead-letter it, in order.
            let shown = format!("{:?}", id.to_raw_bson());
            let shown: String = shown.chars().take(200).collect();
            return Write::new(ns, index, format!("\"{}\"", shown.replace(['"', '\\'], "'")).into(), version, Op::Reject {
                error_type: "invalid_id",
                reason: e.to_string(),
                document: matches!(converted, Some(Ok(()))).then(|| Bytes::from(source)),
            });
        }
        // The converter writes valid UTF-8; `from_utf8_lossy` only guards the type.
        let id_json: Box<str> = String::from_utf8_lossy(id_buf).into();
        let op = match converted {
            Some(Ok(())) => Op::Index(Bytes::from(source)),
            Some(Err(e)) => Op::Reject {
                error_type: "malformed_bson",
                reason: e.to_string(),
                document: None,
            },
            None => Op::Delete,
        };
        Write::new(ns, index, id_json, version, op)
    }

    /// A dead-letter write for a change event that [`event::parse`] refused, carrying the
    /// whole event as JSON and, where readable, its namespace, document and cluster time.
    fn unreadable_event(
        &self,
        raw: &RawDocument,
        seen: &event::Salvaged<'_>,
        why: &event::Malformed,
        stats: &mut ConvertStats,
    ) -> Write {
        let (ns, index) = match (seen.db, seen.coll) {
            // Not routed: the record names the index for reading only, and an unreadable event
            // must not register a namespace as written.
            (Some(db), Some(coll)) => (Arc::from(format!("{db}.{coll}")), Arc::from(self.routing.index_for(db, coll))),
            _ => (Arc::from("unknown"), Arc::from("")),
        };
        let mut id_json = Vec::new();
        let id_json: Box<str> = match seen.id.map(|id| convert::write_es_id(id, &mut id_json)) {
            Some(Ok(())) => String::from_utf8_lossy(&id_json).into(),
            _ => "null".into(),
        };
        let mut document = Vec::new();
        let document = convert::write_document(raw, false, &mut document, stats)
            .is_ok()
            .then(|| Bytes::from(document));
        let version = seen.time.map_or(0, |t| ClusterTime::from(t).version());
        Write::new(ns, index, id_json, version, Op::Reject {
            error_type: "malformed_event",
            reason: why.to_string(),
            document,
        })
    }

    /// Read every document of `db.coll` in `_id` order, after `resume_after` if given, as
    /// writes with version `version`. Records snapshot positions as it goes.
    ///
    /// # Errors
    /// Only when the sink closed; MongoDB errors are retried from the last `_id` read.
    pub async fn snapshot_collection(
        &self,
        db: &str,
        coll: &str,
        mut resume_after: Option<Bson>,
        version: u64,
    ) -> Result<Ended, Error> {
        let ns = format!("{db}.{coll}");
        let collection = self.client.database(db).collection::<RawDocumentBuf>(coll);
        let shape = self.shapes.for_ns(db, coll);
        let mut backoff = Backoff::default();
        let mut stats = ConvertStats::default();
        info!(namespace = %ns, resume = resume_after.is_some(), "snapshot of collection started");
        'read: loop {
            let filter = resume_after.as_ref().map(filter::after_id).unwrap_or_default();
            let cursor = if shape.snapshot_stages.is_empty() {
                collection
                    .find(filter)
                    .sort(doc! {"_id": 1})
                    .hint(mongodb::options::Hint::Keys(doc! {"_id": 1}))
                    .batch_size(1000)
                    .await
            } else {
                // The mapping's stages after monsoon's own: resume after the last `_id`, in
                // `_id` order (the stages must keep both).
                let mut pipeline = vec![doc! {"$match": filter}, doc! {"$sort": {"_id": 1}}];
                pipeline.extend(shape.snapshot_stages.iter().cloned());
                collection.aggregate(pipeline).batch_size(1000).await.map(|c| c.with_type::<RawDocumentBuf>())
            };
            let mut cursor = match cursor {
                Ok(c) => c,
                Err(e) => {
                    warn!(namespace = %ns, error = %e, "snapshot query failed; retrying");
                    self.health.source_beat(false);
                    if backoff.wait(&self.cancel).await.is_err() {
                        return Ok(Ended::Cancelled);
                    }
                    continue;
                }
            };
            let mut since_position = 0u64;
            loop {
                let next = tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => {
                        if let Some(id) = resume_after.take() {
                            self.sink.record(Position::SnapshotRange { ns: ns.clone(), last_id: id });
                        }
                        return Ok(Ended::Cancelled);
                    }
                    // `advance` + `current` read each document in place in the server's
                    // batch: no owned copy (and allocation) per document.
                    next = self.read(cursor.advance(), SNAPSHOT_READ_TIMEOUT) => match next {
                        Ok(n) => n,
                        Err(Error::Cancelled) => return Ok(Ended::Cancelled),
                        Err(e) => return Err(e),
                    },
                };
                let raw = match next {
                    Ok(true) => cursor.current(),
                    Ok(false) => break 'read,
                    Err(e) => {
                        warn!(namespace = %ns, error = %e, "snapshot read failed; resuming after the last _id read");
                        self.health.source_beat(false);
                        if let Some(id) = &resume_after {
                            self.sink.record(Position::SnapshotRange { ns: ns.clone(), last_id: id.clone() });
                        }
                        if backoff.wait(&self.cancel).await.is_err() {
                            return Ok(Ended::Cancelled);
                        }
                        continue 'read;
                    }
                };
                backoff.reset();
                if since_position.is_multiple_of(BEAT_EVERY) {
                    self.health.source_beat(true);
                }
                let Ok(Some(id)) = raw.get("_id") else {
                    // Only a mapping's snapshot stage can take `_id` away.
                    error!(namespace = %ns, "document without _id skipped by the snapshot: a stage of `aggregation.snapshot` removed it; keep `_id`");
                    self.metrics.events.with_label_values(&["no_id"]).inc();
                    continue;
                };
                let owned_id = id.to_raw_bson().try_into().unwrap_or(Bson::Null);
                if self.owns(id) {
                    if let Some(mut write) = self.write_for(db, coll, Change { id, doc: Some(raw), update: None, version }, &mut stats)? {
                        write.from_snapshot = true;
                        match self.send(write).await {
                            Err(Error::Cancelled) => return Ok(Ended::Cancelled),
                            other => other?,
                        }
                    }
                    self.metrics.snapshot_docs.inc();
                }
                resume_after = Some(owned_id);
                since_position += 1;
                if since_position >= POSITION_EVERY {
                    since_position = 0;
                    if let Some(id) = &resume_after {
                        self.sink.record(Position::SnapshotRange { ns: ns.clone(), last_id: id.clone() });
                    }
                }
                if stats.non_finite_nulled > 0 {
                    self.metrics.non_finite_nulled.inc_by(stats.non_finite_nulled);
                    stats = ConvertStats::default();
                }
            }
        }
        if let Some(id) = resume_after {
            self.sink.record(Position::SnapshotRange { ns: ns.clone(), last_id: id });
        }
        self.sink.record(Position::SnapshotCollectionDone { ns: ns.clone() });
        // Partial snapshot batches wait longer than stream batches to fill: send them now.
        match self.wait_on_sink(self.sink.flush_batches()).await {
            Err(Error::Cancelled) => return Ok(Ended::Cancelled),
            other => other?,
        }
        info!(namespace = %ns, "snapshot of collection read; waiting for acknowledgement");
        Ok(Ended::Complete)
    }

    async fn open_stream(
        &self,
        start: &StreamStart,
        lean: bool,
    ) -> Result<ChangeStream<RawDocumentBuf>, mongodb::error::Error> {
        let dbs = self.routing.databases();
        let mut pipeline = stream_pipeline(dbs.as_deref(), lean, self.scripts.is_some());
        if !lean {
            // The mappings' own `$match` stages, before `updateDescription` is projected away
            // (they may watch changed fields). A lean stream (after an event over 16 MB) has no
            // `fullDocument` for them to read: it skips them and passes more events, which only
            // index documents' current state.
            let at = pipeline.len() - 1;
            pipeline.splice(at..at, self.shapes.stream_stages());
        }
        let mut options = stream_options(lean);
        match start {
            StreamStart::At(t) => options.start_at_operation_time = Some(Timestamp::from(*t)),
            StreamStart::ResumeAfter(token) => options.resume_after = Some(token.clone()),
            StreamStart::StartAfter(token) => options.start_after = Some(token.clone()),
        }
        // One stream per pipeline: database-level when every namespace is in one database,
        // deployment-level otherwise (filtered to the routed databases above).
        let stream = if let Some([db]) = dbs.as_deref() {
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
    /// [`Error::HistoryLost`] when the resume point is gone; [`Error::SinkClosed`].
    pub async fn stream(&self, mut start: StreamStart) -> Result<Ended, Error> {
        let mut backoff = Backoff::default();
        let mut stats = ConvertStats::default();
        self.health.set_phase(Phase::Streaming);
        // Events left to read without updateLookup after an oversize event.
        let mut lean_left = 0u64;
        // Cluster time of the last event read (stored beside the token, for re-sharding).
        let mut last_time: Option<Timestamp> = None;
        loop {
            let lean = lean_left > 0;
            let mut stream = match self.open_stream(&start, lean).await {
                Ok(s) => s,
                Err(e) => {
                    if let Some(code) = history_lost_code(&e) {
                        self.metrics.history_lost.inc();
                        return Err(Error::HistoryLost { code });
                    }
                    if let (StreamStart::ResumeAfter(token), true) = (&start, refuses_resume_after_invalidate(&e)) {
                        // A checkpoint written before invalidate tokens were marked: MongoDB
                        // accepts this token only with `startAfter`.
                        warn!("the stored resume token is an invalidate's; re-opening with startAfter");
                        start = StreamStart::StartAfter(token.clone());
                        continue;
                    }
                    warn!(error = %e, "failed to open the change stream; retrying");
                    self.health.source_beat(false);
                    if backoff.wait(&self.cancel).await.is_err() {
                        return Ok(Ended::Cancelled);
                    }
                    continue;
                }
            };
            info!(lean, "change stream open");
            let mut since_position = 0u64;
            let mut last_recorded: Option<ResumeToken> = None;
            loop {
                let next = tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => {
                        if let Some(token) = stream.resume_token() {
                            self.sink.record(Position::Stream { after_invalidate: start.is_start_after(&token), token, time: last_time.map(ClusterTime::from) });
                        }
                        return Ok(Ended::Cancelled);
                    }
                    next = self.read(stream.next_if_any(), STREAM_READ_TIMEOUT) => next?,
                };
                match next {
                    Ok(Some(raw)) => {
                        backoff.reset();
                        if since_position == 0 {
                            self.health.set_caught_up(false);
                        }
                        since_position += 1;
                        if since_position.is_multiple_of(BEAT_EVERY) {
                            self.health.source_beat(true);
                        }
                        // Past the oversize event: handle this one, then re-open with updateLookup.
                        let back_to_lookup = lean && lean_left == 1;
                        lean_left = lean_left.saturating_sub(1);
                        if self.handle_event(&raw, &mut stats, &mut last_time).await? == Next::Reopen {
                            // After an invalidate: continue after it.
                            if let Some(token) = stream.resume_token() {
                                self.sink.record(Position::Stream { token: token.clone(), time: last_time.map(ClusterTime::from), after_invalidate: true });
                                start = StreamStart::StartAfter(token);
                            }
                            break;
                        }
                        // The token is cloned only when recorded, not per event.
                        if since_position >= POSITION_EVERY {
                            since_position = 0;
                            if let Some(token) = stream.resume_token() {
                                last_recorded = Some(token.clone());
                                self.sink.record(Position::Stream { after_invalidate: start.is_start_after(&token), token, time: last_time.map(ClusterTime::from) });
                            }
                        }
                        if back_to_lookup {
                            info!("past the oversize event; returning to updateLookup");
                            if let Some(token) = stream.resume_token() {
                                start = start.continue_after(token);
                            }
                            break;
                        }
                    }
                    Ok(None) => {
                        // Batch exhausted: the post-batch resume token moves on even when no
                        // event matched, so a quiet stream keeps its checkpoint fresh.
                        self.health.source_beat(true);
                        self.health.set_caught_up(true);
                        if let Some(token) = stream.resume_token() {
                            if last_recorded.as_ref() != Some(&token) {
                                since_position = 0;
                                last_recorded = Some(token.clone());
                                self.sink.record(Position::Stream { token: token.clone(), time: last_time.map(ClusterTime::from), after_invalidate: start.is_start_after(&token) });
                                start = start.continue_after(token);
                            }
                        }
                    }
                    Err(e) => {
                        if let Some(code) = e.history_lost_code() {
                            self.metrics.history_lost.inc();
                            return Err(Error::HistoryLost { code });
                        }
                        let ReadError::Mongo(_) = &e else {
                            warn!(error = %e, "change stream read timed out; re-opening from the last token read");
                            self.metrics.stream_reopens.inc();
                            if let Some(token) = stream.resume_token() {
                                start = start.continue_after(token);
                            }
                            break;
                        };
                        // Re-open after the last event read: the events before it are already
                        // in the pipeline.
                        if let Some(token) = stream.resume_token() {
                            start = start.continue_after(token);
                        }
                        if is_too_large(&e) {
                            // The next event plus its looked-up document exceeds 16 MB: read on
                            // without updateLookup and fetch documents by `_id` for a while.
                            warn!(error = %e, "change event too large for MongoDB; continuing without updateLookup for {LEAN_EVENTS} events");
                            self.metrics.stream_reopens.inc();
                            lean_left = LEAN_EVENTS;
                            break;
                        }
                        // Re-open from the last token read (events before it are already in
                        // the pipeline), whatever the error's labels say: some servers omit
                        // ResumableChangeStreamError on errors the driver could resume.
                        warn!(error = %e, "change stream failed; re-opening from the last token read");
                        self.metrics.stream_reopens.inc();
                        self.health.source_beat(false);
                        if backoff.wait(&self.cancel).await.is_err() {
                            return Ok(Ended::Cancelled);
                        }
                        break;
                    }
                }
                if stats.non_finite_nulled > 0 {
                    self.metrics.non_finite_nulled.inc_by(stats.non_finite_nulled);
                    stats = ConvertStats::default();
                }
            }
        }
    }

    async fn handle_event(
        &self,
        raw: &RawDocument,
        stats: &mut ConvertStats,
        last_time: &mut Option<Timestamp>,
    ) -> Result<Next, Error> {
        let action = match event::parse(raw) {
            Ok(a) => a,
            Err(e) => {
                // Never skipped: the whole event is dead-lettered, in order with the rest, so
                // the change it carries can be applied by hand.
                self.metrics.events.with_label_values(&["malformed"]).inc();
                let seen = event::salvage(raw);
                if seen.id.is_some_and(|id| !self.owns(id)) {
                    return Ok(Next::Continue);
                }
                let w = self.unreadable_event(raw, &seen, &e, stats);
                error!(namespace = %w.ns, id = %w.id_json, error = %e, "unreadable change event; dead-lettered");
                self.send(w).await?;
                return Ok(Next::Continue);
            }
        };
        if let Some(time) = action.time() {
            *last_time = Some(time);
        }
        match action {
            Action::Upsert { db, coll, id, doc, time, update } => {
                self.metrics.hot.upserts.inc();
                if self.routing.includes(db, coll) && self.owns(id) {
                    if let Some(w) = self.write_for(db, coll, Change { id, doc: Some(doc), update, version: ClusterTime::from(time).version() }, stats)? {
                        self.send(w).await?;
                    }
                }
            }
            Action::Delete { db, coll, id, time } => {
                self.metrics.hot.deletes.inc();
                if self.routing.includes(db, coll) && self.owns(id) {
                    if let Some(w) = self.write_for(db, coll, Change { id, doc: None, update: None, version: ClusterTime::from(time).version() }, stats)? {
                        self.send(w).await?;
                    }
                }
            }
            Action::Lookup { db, coll, id, time } => {
                self.metrics.events.with_label_values(&["lookup"]).inc();
                if self.routing.includes(db, coll) && self.owns(id) {
                    let doc = self.lookup(db, coll, id).await?;
                    if let Some(w) = self.write_for(db, coll, Change { id, doc: doc.as_deref(), update: None, version: ClusterTime::from(time).version() }, stats)? {
                        self.send(w).await?;
                    }
                }
            }
            Action::Drop { db, coll, time } => {
                self.metrics.events.with_label_values(&["drop"]).inc();
                if self.routing.includes(db, coll) {
                    self.drop_index(db, coll, time).await?;
                }
            }
            Action::Rename { db, coll, to_db, to_coll, time } => {
                self.metrics.events.with_label_values(&["rename"]).inc();
                if self.routing.includes(db, coll) {
                    self.drop_index(db, coll, Some(time)).await?;
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

    /// Apply the drop of `db.coll` (at cluster time `time`) per `onDrop`, then forget the
    /// namespace.
    ///
    /// # Errors
    /// [`Error::Cancelled`] when shutdown came first: the drop is not done, and no position
    /// past it may be recorded (the next start reads the drop again).
    pub async fn drop_index(&self, db: &str, coll: &str, time: Option<Timestamp>) -> Result<(), Error> {
        self.apply_drop(db, coll, time).await?;
        self.forget(db, coll);
        Ok(())
    }

    async fn apply_drop(&self, db: &str, coll: &str, time: Option<Timestamp>) -> Result<(), Error> {
        // Every earlier write to the index must land before it is deleted, or a late write
        // would re-create it. (Waiting gives way to shutdown: nothing is lost by stopping.)
        tokio::select! {
            r = self.sink.barrier() => r?,
            () = self.cancel.cancelled() => return Err(Error::Cancelled),
        }
        if !self.delete_index_on_drop {
            info!(namespace = %format!("{db}.{coll}"), "collection dropped; index kept (onDrop: Keep)");
            return Ok(());
        }
        for index in self.indexes_of(db, coll) {
            self.drop_one_index(db, coll, &index, time).await?;
        }
        Ok(())
    }

    /// Delete `index` (or, sharded, this shard's documents of it older than the drop), retried
    /// until done.
    ///
    /// # Errors
    /// [`Error::Cancelled`]: not done, so the drop event must be read again after a restart.
    async fn drop_one_index(&self, db: &str, coll: &str, index: &str, time: Option<Timestamp>) -> Result<(), Error> {
        let ns = format!("{db}.{coll}");
        if self.shard.is_split() {
            // Other shards may still be writing this index's older changes, or already its
            // newer ones: deleting the index would race them. Each shard instead deletes its
            // own documents older than the drop, with versioned deletes that lose against
            // anything written after it.
            let Some(time) = time else {
                warn!(namespace = %ns, "drop event without a cluster time; index kept");
                return Ok(());
            };
            let below = ClusterTime::from(time).version().saturating_add(1);
            let shard = self.shard;
            let deleted = crate::retry::until_ok(&self.cancel, || self.sink.delete_older(index, below, move |id| shard.owns(id)), |e| {
                warn!(index = %index, error = %crate::error_chain(e), "failed to delete documents of dropped collection; retrying");
            })
            .await
            .map_err(|_| Error::Cancelled)?;
            info!(namespace = %ns, index = %index, shard = %shard, deleted, "collection dropped; this shard's documents deleted (index kept: the pipeline is sharded)");
            return Ok(());
        }
        crate::retry::until_ok(&self.cancel, || self.sink.delete_index(index), |e| {
            warn!(index = %index, error = %crate::error_chain(e), "failed to delete index of dropped collection; retrying");
        })
        .await
        .map_err(|_| Error::Cancelled)?;
        info!(namespace = %ns, index = %index, "collection dropped; index deleted");
        self.metrics.indexes_dropped.inc();
        Ok(())
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
        // Scripts get the update description (their third argument).
        (false, true) => doc! {"$project": {"updateDescription.truncatedArrays": 0}},
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
pub fn stream_options(lean: bool) -> ChangeStreamOptions {
    ChangeStreamOptions::builder()
        .full_document((!lean).then_some(FullDocumentType::UpdateLookup))
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
