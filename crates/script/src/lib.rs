//! JavaScript middleware compatible with Monstache's: `[[script]]` (map), `[[filter]]` and
//! `[[pipeline]]`, `_meta_monstache`, Underscore's `_`, and the lookups `findId`, `findOne`,
//! `find`, `pipe`. Pure of the engine: the engine hands in a document as JSON text and gets an
//! outcome back; lookups go through the [`Lookup`] trait it implements.
//!
//! # Where it sits
//! In the engine's transform stage, per insert/update/replace: [`Scripts::filter`] first (falsy
//! ignores the change, no delete), then [`Scripts::map`] (drop → delete from the index; replace →
//! index the new document with its [`Meta`]). [`Scripts::pipeline`] is called when a snapshot
//! read or a change stream is opened.
//!
//! # Engine: QuickJS (quickjs-ng through `rquickjs`), chosen by measurement
//! A throwaway benchmark (outside the repository) ran the issue's typical script — `_.omit` two
//! fields, add one computed field, set `_meta_monstache.routing` — on a 1,012-byte document, JSON
//! text in and out (`JSON.parse`, the script, `JSON.stringify`, into a Rust `String`), release
//! build, CPU time of the running thread, on this 2-core machine while other builds ran:
//!
//! | engine | events per CPU-second | 2 threads, events/s | compile `_` + script | time bound | memory limit | release build, crates |
//! |---|---|---|---|---|---|---|
//! | QuickJS, `rquickjs` 0.14 | ~51,000 | ~99,000 | ~0.45 ms | interrupt handler | per runtime | ~27 s, 10 |
//! | Boa, `boa_engine` 0.22 | ~7,500 | ~14,800 | ~1.3 ms | loop-iteration and recursion counts only | none | ~167 s, 159 |
//!
//! QuickJS wins on speed (~7×), on both bounds the issue requires (a deadline through the
//! interrupt handler, a heap limit per runtime) and on build weight. `rquickjs` is used with
//! `default-features = false, features = ["std"]` and only through its safe API.
//!
//! This crate end to end (`examples/throughput.rs`: pool dispatch, the driver, `_meta_monstache`
//! parsed, the same document): **~58,000 events per worker CPU-second** for the typical script,
//! ~100,000 events/s on 2 workers (1.7–1.8×; the machine was shared), ~85,000/s for `return doc`
//! and ~160,000/s for `return true` (JSON in only). A pool with its scripts starts in ~2–3 ms.
//! Half of a call used to be `JSON.stringify`; the returned document is now written from Rust
//! (`json_out.rs`, same output byte for byte), which took the typical script from ~46k to ~58k.
//!
//! # Parallel, bounded
//! A pool of worker threads (one per core by default), each with its own QuickJS runtime holding
//! every compiled script; no lock is held while a script runs. **Closures keep state per
//! worker**: Monstache's `counter` example counts per thread, and which worker runs a document is
//! not fixed. Each call runs under [`Limits`]: a deadline (default 1 s, lookups included) after
//! which QuickJS interrupts the script, a heap limit per worker (default 64 MiB) and a stack
//! limit. A script that throws, loops, exhausts memory or returns garbage gives a
//! [`ScriptError`] saying so (with the JavaScript stack where there is one), and the worker goes
//! on with the next document. After running out of memory the worker's runtime is rebuilt from
//! the sources (its closures start afresh), because what filled the heap may still be reachable.
//!
//! # Calling it
//! ```
//! use monsoon_script::{Config, Item, MapOutcome, ScriptSource, Scripts};
//!
//! let scripts = Scripts::new(Config {
//!     scripts: vec![ScriptSource::for_namespace(
//!         "blog.comments",
//!         "module.exports = function(doc) { doc._meta_monstache = { routing: doc.post_id }; return doc; }",
//!     )],
//!     ..Config::default()
//! })?;
//! match scripts.map("blog.comments", r#"{"_id":"c1","post_id":"123"}"#, None)? {
//!     MapOutcome::Replace { doc, meta } => {
//!         assert_eq!(doc, r#"{"_id":"c1","post_id":"123"}"#);
//!         assert_eq!(meta.routing.as_deref(), Some("123"));
//!     }
//!     other => panic!("{other:?}"),
//! }
//! // From async code, one wake-up per batch and no `spawn_blocking`:
//! // let results = scripts.submit_map_batch(items).await;
//! let results = scripts.submit_map_batch(vec![Item {
//!     namespace: "blog.comments".into(),
//!     doc: r#"{"_id":"c2","post_id":"7"}"#.into(),
//!     update_desc: None,
//! }])
//! .wait();
//! assert_eq!(results.len(), 1);
//! # Ok::<(), monsoon_script::ScriptError>(())
//! ```
//! The blocking methods (`map`, `map_batch`, `filter`, `pipeline`) suit synchronous callers; on
//! an async runtime's thread use the `submit_*` forms and await their [`Pending`] /
//! [`PendingBatch`]: the worker that finishes wakes the task (this crate needs no async runtime).
//! The queue holds what callers submitted and have not collected; the caller bounds it by how
//! much it keeps pending (the engine: one batch per in-flight bulk).
//!
//! # How values cross into JavaScript
//! The engine hands each document in as the JSON text it would index (relaxed, as in the
//! engine's BSON table): ObjectId → 24-hex string, date → ISO-8601 UTC string, Int64/Int32/
//! Double → number, Decimal128 → as the engine writes it, binary/UUID → their string form. In
//! JavaScript it is `JSON.parse`d, so:
//! - numbers are doubles: an Int64 beyond 2^53 loses precision **if the script returns a new
//!   document**; `return true` ([`MapOutcome::Keep`]) keeps the engine's original bytes exactly;
//! - a date stays a string (`new Date(doc.created)` parses it); a `Date` a script stores is
//!   written back as its ISO-8601 string (`toJSON`);
//! - on the way out, `JSON.stringify` rules apply: `undefined` and functions are left out, NaN
//!   and ±Infinity become `null`, a BigInt fails the document;
//! - `updateDesc` (3rd argument) is the change event's `updateDescription` as JSON, or `{}` when
//!   the change has none (Monstache passes an empty object too, so `updateDesc.updatedFields`
//!   never throws);
//! - lookup queries go out as JSON and results come back as JSON (see [`LookupRequest`] about
//!   ObjectId strings).
//!
//! # What a mapping script may return
//! An object (Monstache's definition: not an Array, Function, Date, Error, RegExp or boxed
//! primitive) is indexed in place of the document; `true` indexes the original; `false`, `null`,
//! `undefined` (and other falsy values) drop it. Anything else — a non-empty string, a non-zero
//! number, an array, a function, a Date — is [`ScriptError::BadReturn`]: Monstache would coerce
//! it to a boolean, which hides bugs such as returning `doc.name` instead of `doc`. Global scripts
//! run before the namespace's own; each receives the previous one's document. Returning `true`
//! after an earlier script replaced the document keeps the replaced one.
//!
//! # Differences from Monstache, on purpose
//! - `_meta_monstache.type`/`parent` are refused (see [`Meta`]); unknown keys are errors.
//! - A global `[[pipeline]]` and the namespace's are both applied (global stages first), and both
//!   receive the real namespace; Monstache calls only the first it finds, and passes the global
//!   one an empty namespace.
//! - `sort` in lookup options is accepted as an object (`{name: 1}`) and as an array
//!   (`["name", "-age"]`).
//! - `find` and `pipe` return `[]` when nothing matches; a failed lookup throws (Monstache logs
//!   and returns `null`), so a document is never indexed silently without the data it embeds.
//! - Two scripts of the same kind for the same namespace are a configuration error (Monstache
//!   keeps the last).
//! - `_` is monsoon's own implementation of the commonly used Underscore functions (see
//!   `src/js/underscore.js`), not Underscore itself.

#![forbid(unsafe_code)]

mod config;
mod error;
mod json_out;
mod lookup;
mod meta;
mod pool;
mod runtime;

use std::collections::HashSet;
use std::sync::Arc;

pub use config::{Config, Limits, ScriptSource};
pub use error::ScriptError;
pub use lookup::{Lookup, LookupKind, LookupRequest, NoLookup, QueryError};
pub use meta::Meta;
pub use pool::{Pending, PendingBatch};

use pool::{oneshot, BatchSlot, Job, Pool};

/// What the mapping scripts decided for one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOutcome {
    /// Delete the document from the index (it may have been indexed before): a script returned
    /// a falsy value.
    Drop,
    /// Index the document exactly as it was handed in (every script returned `true`, or no
    /// script applies to the namespace). Carries nothing: the caller still has the original
    /// bytes, which stay exact (no round trip through JavaScript numbers).
    Keep,
    /// Index `doc` (JSON text of an object, `_meta_monstache` removed; `_id` is left as the
    /// script returned it) with `meta`.
    Replace { doc: String, meta: Meta },
}

/// What a namespace's filters and map scripts decided for one document
/// ([`Scripts::submit_decide_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A filter dropped the change: ignore it (the map scripts did not run).
    Ignored,
    /// The map scripts' outcome ([`MapOutcome::Keep`] when the namespace has none).
    Mapped(MapOutcome),
}

/// One document to run through the scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// `db.collection`.
    pub namespace: String,
    /// The document as JSON text.
    pub doc: String,
    /// The change event's `updateDescription` as JSON text, if any.
    pub update_desc: Option<String>,
}

/// Which namespaces have scripts, so calls with nothing to run skip the pool.
#[derive(Debug, Default)]
struct Coverage {
    global: bool,
    namespaces: HashSet<String>,
}

impl Coverage {
    fn of(list: &[ScriptSource]) -> Coverage {
        let mut c = Coverage::default();
        for s in list {
            match &s.namespace {
                Some(ns) => {
                    c.namespaces.insert(ns.clone());
                }
                None => c.global = true,
            }
        }
        c
    }

    fn applies(&self, ns: &str) -> bool {
        self.global || self.namespaces.contains(ns)
    }
}

/// The field of a script's output through which it chooses where a document goes.
pub const META_KEY: &str = "_meta_monstache";

/// The compiled scripts and the workers that run them. Cheap to share (`Arc<Scripts>`); every
/// method takes `&self` and may be called from many threads at once.
pub struct Scripts {
    pool: Pool,
    maps: Coverage,
    /// The map scripts whose source names `_meta_monstache`: only they can choose where a
    /// document goes.
    placing: Coverage,
    filters: Coverage,
    pipelines: Coverage,
}

impl std::fmt::Debug for Scripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scripts").field("workers", &self.pool.workers()).finish_non_exhaustive()
    }
}

impl Scripts {
    /// Compiles `config` on every worker, without lookups (scripts calling `findId` & co. get
    /// an error they may catch).
    ///
    /// # Errors
    /// [`ScriptError::Config`] for an invalid configuration, [`ScriptError::Compile`] for a
    /// script that does not compile, throws while loading, or exports no function.
    pub fn new(config: Config) -> Result<Scripts, ScriptError> {
        Scripts::with_lookup(config, Arc::new(NoLookup))
    }

    /// Compiles `config` on every worker; lookups from scripts go to `lookup`.
    ///
    /// # Errors
    /// As [`Scripts::new`].
    pub fn with_lookup(config: Config, lookup: Arc<dyn Lookup>) -> Result<Scripts, ScriptError> {
        config.validate()?;
        let workers = if config.is_empty() {
            0
        } else if config.workers == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            config.workers
        };
        let maps = Coverage::of(&config.scripts);
        let placing: Vec<ScriptSource> = config.scripts.iter().filter(|s| s.source.contains(META_KEY)).cloned().collect();
        let placing = Coverage::of(&placing);
        let filters = Coverage::of(&config.filters);
        let pipelines = Coverage::of(&config.pipelines);
        let pool = Pool::start(Arc::new(config), lookup, workers)?;
        Ok(Scripts { pool, maps, placing, filters, pipelines })
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.pool.workers()
    }

    /// True when a `[[script]]` applies to `ns` (otherwise [`Scripts::map`] returns
    /// [`MapOutcome::Keep`] at once).
    pub fn has_map(&self, ns: &str) -> bool {
        self.maps.applies(ns)
    }

    /// True when a `[[script]]` applying to `ns` may choose where a document goes: its source
    /// names `_meta_monstache` (whose `index`, `id` and `routing` place it). A script that never
    /// names it keeps every document at its namespace's place.
    pub fn may_place(&self, ns: &str) -> bool {
        self.placing.applies(ns)
    }

    /// True when a `[[filter]]` applies to `ns`.
    pub fn has_filter(&self, ns: &str) -> bool {
        self.filters.applies(ns)
    }

    /// True when a `[[pipeline]]` applies to `ns`.
    pub fn has_pipeline(&self, ns: &str) -> bool {
        self.pipelines.applies(ns)
    }

    /// Runs the mapping scripts for `ns` (global first) on `doc`, blocking until done.
    ///
    /// # Errors
    /// The script's failure; see [`ScriptError`]. Dead-letter the document unless
    /// [`ScriptError::is_retriable`].
    pub fn map(&self, ns: &str, doc: &str, update_desc: Option<&str>) -> Result<MapOutcome, ScriptError> {
        if !self.has_map(ns) {
            return Ok(MapOutcome::Keep);
        }
        self.submit_map(Item { namespace: ns.to_owned(), doc: doc.to_owned(), update_desc: update_desc.map(str::to_owned) })
            .wait()
    }

    /// Queues one document for the mapping scripts; await the result or [`Pending::wait`].
    pub fn submit_map(&self, item: Item) -> Pending<MapOutcome> {
        if !self.has_map(&item.namespace) {
            return Pending::ready(Ok(MapOutcome::Keep));
        }
        let (reply, pending) = oneshot();
        self.pool.submit(Job::Map { ns: item.namespace, doc: item.doc, update_desc: item.update_desc, reply });
        pending
    }

    /// Runs the mapping scripts on every item across the pool and blocks until all are done;
    /// results in the items' order.
    pub fn map_batch(&self, items: Vec<Item>) -> Vec<Result<MapOutcome, ScriptError>> {
        self.submit_map_batch(items).wait()
    }

    /// Queues every item for the mapping scripts; the workers share them out. Await the result
    /// (one wake-up for the whole batch, no `spawn_blocking`) or [`PendingBatch::wait`].
    pub fn submit_map_batch(&self, items: Vec<Item>) -> PendingBatch<MapOutcome> {
        let batch = BatchSlot::new(items.len());
        let mut jobs = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            if self.has_map(&item.namespace) {
                let reply = batch.completer(index);
                jobs.push(Job::Map { ns: item.namespace, doc: item.doc, update_desc: item.update_desc, reply });
            } else {
                batch.set(index, Ok(MapOutcome::Keep));
            }
        }
        self.pool.submit_all(jobs);
        PendingBatch::new(batch)
    }

    /// Runs the filters on every item across the pool, as [`Scripts::map_batch`].
    pub fn filter_batch(&self, items: Vec<Item>) -> Vec<Result<bool, ScriptError>> {
        self.submit_filter_batch(items).wait()
    }

    /// Queues every item for the filters, as [`Scripts::submit_map_batch`].
    pub fn submit_filter_batch(&self, items: Vec<Item>) -> PendingBatch<bool> {
        let batch = BatchSlot::new(items.len());
        let mut jobs = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            if self.has_filter(&item.namespace) {
                let reply = batch.completer(index);
                jobs.push(Job::Filter { ns: item.namespace, doc: item.doc, update_desc: item.update_desc, reply });
            } else {
                batch.set(index, Ok(true));
            }
        }
        self.pool.submit_all(jobs);
        PendingBatch::new(batch)
    }

    /// Queues every item for its namespace's filters and then, if they keep it, its map
    /// scripts, both on the worker that takes the item (one call to collect per document, and
    /// the map scripts and their lookups never run for a document a filter drops). Await the
    /// result (one wake-up for the whole batch) or [`PendingBatch::wait`].
    pub fn submit_decide_batch(&self, items: Vec<Item>) -> PendingBatch<Decision> {
        let batch = BatchSlot::new(items.len());
        let mut jobs = Vec::with_capacity(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let (filter, map) = (self.has_filter(&item.namespace), self.has_map(&item.namespace));
            if filter || map {
                let reply = batch.completer(index);
                jobs.push(Job::Decide { ns: item.namespace, doc: item.doc, update_desc: item.update_desc, filter, map, reply });
            } else {
                batch.set(index, Ok(Decision::Mapped(MapOutcome::Keep)));
            }
        }
        self.pool.submit_all(jobs);
        PendingBatch::new(batch)
    }

    /// Queues one item as [`Scripts::submit_decide_batch`] does.
    pub fn submit_decide(&self, item: Item) -> Pending<Decision> {
        let (filter, map) = (self.has_filter(&item.namespace), self.has_map(&item.namespace));
        if !filter && !map {
            return Pending::ready(Ok(Decision::Mapped(MapOutcome::Keep)));
        }
        let (reply, pending) = oneshot();
        self.pool.submit(Job::Decide { ns: item.namespace, doc: item.doc, update_desc: item.update_desc, filter, map, reply });
        pending
    }

    /// Runs the filters for `ns` (global first) on `doc`: `true` keeps the change.
    ///
    /// # Errors
    /// As [`Scripts::map`].
    pub fn filter(&self, ns: &str, doc: &str, update_desc: Option<&str>) -> Result<bool, ScriptError> {
        if !self.has_filter(ns) {
            return Ok(true);
        }
        self.submit_filter(Item { namespace: ns.to_owned(), doc: doc.to_owned(), update_desc: update_desc.map(str::to_owned) })
            .wait()
    }

    /// Queues one document for the filters.
    pub fn submit_filter(&self, item: Item) -> Pending<bool> {
        if !self.has_filter(&item.namespace) {
            return Pending::ready(Ok(true));
        }
        let (reply, pending) = oneshot();
        self.pool.submit(Job::Filter { ns: item.namespace, doc: item.doc, update_desc: item.update_desc, reply });
        pending
    }

    /// The aggregation stages for `ns`: the global pipeline's, then the namespace's own; empty
    /// when none applies. `change_stream` tells the scripts whether the stages will run on
    /// change events (document under `fullDocument`) or on the collection (snapshot reads).
    ///
    /// # Errors
    /// As [`Scripts::map`]; [`ScriptError::BadReturn`] when a script returns something other
    /// than an array of objects.
    pub fn pipeline(&self, ns: &str, change_stream: bool) -> Result<Vec<serde_json::Value>, ScriptError> {
        if !self.has_pipeline(ns) {
            return Ok(Vec::new());
        }
        let (reply, pending) = oneshot();
        self.pool.submit(Job::Pipeline { ns: ns.to_owned(), change_stream, reply });
        pending.wait()
    }
}

#[cfg(test)]
mod tests;
