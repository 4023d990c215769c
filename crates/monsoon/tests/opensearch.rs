//! The real `monsoon` binary against a real OpenSearch 2.19 node (tools/opensearch, built by
//! `make opensearch`), with SecantusDB as the source: the scenarios `sync.rs`, `failures.rs`
//! and `reliability.rs` run against noida-db, on the server users run.
//!
//! Where OpenSearch and noida-db differ, OpenSearch is the truth; what was seen (same bulk
//! bodies sent to both):
//! - Deletes leave tombstones (for `index.gc_deletes`, 60 s): an older external version
//!   written after a delete answers 409 `version_conflict_engine_exception` ("current version
//!   [6] is higher than the one provided [5]"); noida-db answers 201 and resurrects the
//!   document. monsoon counts 409 as stale-and-done on both.
//! - 409 reasons: OpenSearch says "higher than" for `external_gte` (noida-db: "higher or equal
//!   to") and adds `index`, `shard` and `index_uuid` to the error.
//! - A mapping conflict is `mapper_parsing_exception` (noida-db, like Elasticsearch 8:
//!   `document_parsing_exception`, with a `[1:6]` position in the reason).
//! - A versioned delete in a bulk to a missing index auto-creates the index (empty, one
//!   tombstone) and answers 404 without an error; noida-db answers 404
//!   `index_not_found_exception` and creates nothing. monsoon counts both as already gone.
//! - A request over `http.max_content_length` (100mb by default) is refused by the HTTP layer
//!   before any bulk parsing: 413 with an empty body, for the whole request.
//! - OpenSearch refuses Elasticsearch's `compatible-with` media types with 406 (noida-db takes
//!   them); the `elasticsearch` crate and monsoon send plain `application/json`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use elasticsearch::Elasticsearch;
use mongodb::bson::{doc, Document};
use monsoon_testkit::opensearch::OpenSearch;
use monsoon_testkit::*;
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(120);

/// SecantusDB and a real OpenSearch node, and a client of each.
struct Servers {
    mongo: Mongo,
    os: OpenSearch,
    client: mongodb::Client,
    osc: Elasticsearch,
}

impl Servers {
    async fn start(settings: &[&str]) -> anyhow::Result<Self> {
        let os = OpenSearch::start_with(settings)?;
        let mongo = Mongo::start(&[])?;
        let client = mongo.client().await?;
        let osc = os.client()?;
        Ok(Self { mongo, os, client, osc })
    }

    fn pipeline(&self, name: &str, namespaces: &[&str], extra_spec: &str) -> String {
        pipeline_yaml(name, &self.mongo.uri(), &self.os.url(), namespaces, extra_spec)
    }

    async fn converged(&self, db: &str, coll: &str, index: &str) -> anyhow::Result<Report> {
        wait_converged(&self.client, &self.osc, db, coll, index, CONVERGE).await
    }
}


/// A `/metrics` sample's value (0 when absent).
fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_and_stream_converge_on_opensearch() -> anyhow::Result<()> {
    let s = Servers::start(&[]).await?;
    let coll = s.client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 2000)).await?;
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &s.pipeline("shop", &["shop.orders"], ""), state.path())?;
    monsoon.wait_stats(CONVERGE, |st| st["phase"] == "Streaming")?;
    let r = s.converged("shop", "orders", "shop.orders").await?;
    assert!(r.converged(), "snapshot: {r:?}\n{}", tail(&monsoon.log(), 30));
    let log = monsoon.log();
    assert!(log.contains("distribution=opensearch"), "monsoon did not see OpenSearch:\n{}", tail(&log, 30));

    // The stream: inserts, updates, replaces, deletes, and a document deleted and inserted
    // again (its delete leaves a tombstone on OpenSearch).
    insert_all(&coll, sample_docs(5000, 500)).await?;
    coll.update_many(doc! {"_id": {"$gte": 100, "$lt": 300}}, doc! {"$set": {"status": "streamed"}, "$inc": {"quantity": 1}})
        .await?;
    coll.update_one(doc! {"_id": 7}, doc! {"$unset": {"address": ""}}).await?;
    coll.replace_one(doc! {"_id": 8}, doc! {"_id": 8, "replaced": true, "tags": ["x"]}).await?;
    coll.delete_many(doc! {"_id": {"$gte": 1000, "$lt": 1400}}).await?;
    coll.delete_one(doc! {"_id": 9}).await?;
    coll.insert_one(doc! {"_id": 9, "back": "again"}).await?;
    let r = s.converged("shop", "orders", "shop.orders").await?;
    assert!(r.converged(), "stream: {r:?}\n{}", tail(&monsoon.log(), 30));
    assert_eq!(r.mongo, 2000 + 500 - 400, "{r:?}");
    let stats = monsoon.stats().expect("stats");
    assert_eq!(stats["deadLettered"], 0, "{stats}");
    Ok(())
}

/// Crash and replay: after a SIGKILL, the events since the last checkpoint are written again.
/// On OpenSearch a replayed write older than a delete meets the delete's tombstone (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_converges_on_opensearch() -> anyhow::Result<()> {
    let s = Servers::start(&[]).await?;
    let coll = s.client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 1000)).await?;
    let state = TempDir::new("state");
    let mut monsoon = Monsoon::start(bin(), &s.pipeline("shop", &["shop.orders"], ""), state.path())?;
    monsoon.wait_stats(CONVERGE, |st| st["phase"] == "Streaming")?;
    // The kills below test the stream's replay: wait until the snapshot's end is checkpointed
    // (acknowledged, then stored at the next tick; a loaded machine takes a while).
    let deadline = std::time::Instant::now() + CONVERGE;
    while monsoon.checkpoint("shop").is_none_or(|c| c["snapshot"]["done"] != true) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the snapshot was never checkpointed\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let coll = coll.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i: i64 = 100_000;
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) {
                coll.insert_many(sample_docs(i, 20)).await?;
                coll.update_one(doc! {"_id": i - 7}, doc! {"$set": {"status": format!("u{i}")}}).await?;
                coll.delete_one(doc! {"_id": i - 13}).await?;
                coll.update_one(doc! {"_id": i % 500}, doc! {"$inc": {"quantity": 1}}).await?;
                i += 20;
                ops += 23;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(ops)
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        monsoon.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        monsoon.restart()?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let ops = writer.await??;
    assert!(ops > 100, "writer made only {ops} changes");
    let r = s.converged("shop", "orders", "shop.orders").await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 40));
    let stats = monsoon.stats().expect("stats");
    assert_eq!(stats["snapshotDocuments"], 0, "restart must not re-snapshot: {stats}");
    assert_eq!(stats["deadLettered"], 0, "{stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mapping_conflicts_are_dead_lettered_while_the_rest_lands_on_opensearch() -> anyhow::Result<()> {
    let s = Servers::start(&[]).await?;
    // The index says `quantity` is a number; some documents say otherwise.
    let created = s
        .osc
        .indices()
        .create(elasticsearch::indices::IndicesCreateParts::Index("shop.orders"))
        .body(json!({"settings": {"number_of_replicas": 0},
            "mappings": {"properties": {"quantity": {"type": "long"}}}}))
        .send()
        .await?;
    assert!(created.status_code().is_success(), "{:?}", created.text().await);
    let coll = s.client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 100)).await?;
    coll.update_many(doc! {"_id": {"$in": [7, 42]}}, doc! {"$set": {"quantity": "lots"}}).await?;
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &s.pipeline("shop", &["shop.orders"], ""), state.path())?;
    monsoon.wait_stats(CONVERGE, |st| st["phase"] == "Streaming")?;
    // Streamed poison too, and a good document after it.
    coll.insert_one(doc! {"_id": 500, "quantity": "many"}).await?;
    coll.insert_one(doc! {"_id": 501, "quantity": 3}).await?;
    monsoon.wait_stats(CONVERGE, |st| st["deadLettered"] == 3 && st["indexed"].as_u64() >= Some(99))?;
    let report = compare(&s.client, &s.osc, "shop", "orders", "shop.orders").await?;
    let mut lost = report.lost.clone();
    lost.sort();
    assert_eq!(lost, vec!["42", "500", "7"], "{report:?}");
    assert!(report.stale.is_empty() && report.extra == 0, "{report:?}");

    let records = dead_letters(&s.osc).await?;
    assert_eq!(records.len(), 3, "{records:?}");
    let record = records.iter().find(|r| r["id"] == "500").expect("record of 500");
    assert_eq!(record["namespace"], "shop.orders", "{record}");
    assert_eq!(record["status"], 400);
    // OpenSearch's error: mapper_parsing_exception, "failed to parse field [quantity] of type
    // [long] in document with id '500'. Preview of field's value: 'many'".
    assert_eq!(record["errorType"], "mapper_parsing_exception", "{record}");
    assert!(record["reason"].as_str().unwrap_or("").contains("quantity"), "{record}");
    assert!(record["document"].as_str().unwrap_or("").contains("many"), "{record}");
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_dead_letter_total{"), "{metrics}");

    // Fixing the document in MongoDB lands it.
    coll.update_one(doc! {"_id": 500}, doc! {"$set": {"quantity": 5}}).await?;
    let deadline = Instant::now() + CONVERGE;
    loop {
        let r = compare(&s.client, &s.osc, "shop", "orders", "shop.orders").await?;
        if !r.lost.contains(&"500".to_string()) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the fixed document never landed: {r:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opensearch_outage_and_crash_back_off_then_converge() -> anyhow::Result<()> {
    let mut s = Servers::start(&[]).await?;
    let coll = s.client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &s.pipeline("shop", &["shop.orders"], ""), state.path())?;
    monsoon.wait_stats(CONVERGE, |st| st["phase"] == "Streaming" && st["indexed"].as_u64() >= Some(200))?;

    s.os.stop();
    insert_all(&coll, sample_docs(1000, 500)).await?;
    coll.delete_many(doc! {"_id": {"$lt": 50}}).await?;
    coll.update_many(doc! {"_id": {"$gte": 100, "$lt": 150}}, doc! {"$set": {"status": "during outage"}}).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while monsoon.get("/readyz").map(|r| r.0) != Some(503) {
        assert!(Instant::now() < deadline, "readyz stayed ready while OpenSearch was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(monsoon.get("/healthz").map(|r| r.0), Some(200), "an outage is not a reason to restart");
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.os.restart()?;
    let r = s.converged("shop", "orders", "shop.orders").await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    let stats = monsoon.stats().expect("stats");
    assert!(stats["retriedItems"].as_u64() > Some(0), "{stats}");
    monsoon.wait_stats(Duration::from_secs(30), |st| st["ready"] == true)?;

    // A crash this time (SIGKILL, nothing flushed or closed) while writes stream in: what
    // OpenSearch acknowledged is in its translog, the rest is retried.
    insert_all(&coll, sample_docs(2000, 300)).await?;
    s.os.kill();
    coll.delete_many(doc! {"_id": {"$gte": 2000, "$lt": 2100}}).await?;
    insert_all(&coll, sample_docs(3000, 200)).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.os.restart()?;
    let r = s.converged("shop", "orders", "shop.orders").await?;
    assert!(r.converged(), "after the crash: {r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

/// OpenSearch's own request limit (`http.max_content_length`, 100 MB by default; 10 MB on small
/// Amazon OpenSearch instances), here 1 MB: a bigger document is refused with 413 for the
/// whole request; monsoon splits the bulk down to the one document, dead-letters it with a
/// truncated copy, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_over_http_max_content_length_is_dead_lettered_on_opensearch() -> anyhow::Result<()> {
    let s = Servers::start(&["http.max_content_length=1mb"]).await?;
    let coll = s.client.database("shop").collection::<Document>("orders");
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &s.pipeline("shop", &["shop.orders"], ""), state.path())?;
    monsoon.wait_stats(CONVERGE, |st| st["phase"] == "Streaming")?;
    coll.insert_one(doc! {"_id": "big", "blob": "x".repeat(3 * 1024 * 1024)}).await?;
    insert_all(&coll, sample_docs(0, 300)).await?;
    let deadline = Instant::now() + CONVERGE;
    while count(&s.osc, "shop.orders").await.unwrap_or(0) != 300 {
        anyhow::ensure!(Instant::now() < deadline, "the documents after the oversize one did not arrive:\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let records = loop {
        let records = dead_letters(&s.osc).await?;
        if !records.is_empty() || Instant::now() > deadline {
            break records;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let big: Vec<&Value> = records.iter().filter(|r| r["id"] == "big").collect();
    assert_eq!(big.len(), 1, "{records:?}\n{}", tail(&monsoon.log(), 30));
    assert_eq!(big[0]["status"], 413, "{}", big[0]);
    assert_eq!(big[0]["documentTruncated"], true);
    assert!(big[0]["documentBytes"].as_u64() > Some(3 * 1024 * 1024), "{}", big[0]["documentBytes"]);
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert_eq!(metric(&metrics, "monsoon_dead_letter_total{error_type=\"http_413\",pipeline=\"shop\"}"), 1.0, "{metrics}");
    Ok(())
}

/// Several writes in one transaction share one cluster time, so one external version: with
/// `external_gte` OpenSearch takes each of them, and only their order decides the last state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_writes_to_one_document_end_in_the_last_state_on_opensearch() -> anyhow::Result<()> {
    let s = Servers::start(&[]).await?;
    let coll = s.client.database("bank").collection::<Document>("accounts");
    coll.insert_one(doc! {"_id": "a", "balance": 0}).await?;
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &s.pipeline("bank", &["bank.*"], ""), state.path())?;
    monsoon.wait_stats(CONVERGE, |st| st["phase"] == "Streaming")?;
    let mut session = s.client.start_session().await?;
    session.start_transaction().await?;
    for i in 1..=5 {
        coll.update_one(doc! {"_id": "a"}, doc! {"$set": {"balance": i * 10}}).session(&mut session).await?;
    }
    coll.insert_one(doc! {"_id": "b", "balance": 7}).session(&mut session).await?;
    coll.replace_one(doc! {"_id": "b"}, doc! {"balance": 8, "final": true}).session(&mut session).await?;
    coll.insert_one(doc! {"_id": "c", "balance": 1}).session(&mut session).await?;
    coll.delete_one(doc! {"_id": "c"}).session(&mut session).await?;
    session.commit_transaction().await?;
    let r = s.converged("bank", "accounts", "bank.accounts").await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 40));
    Ok(())
}

/// Tiny batches, four bulks in flight, documents inserted, updated and deleted again and again
/// (part of it in transactions): every document ends in its last state. On OpenSearch each
/// delete leaves a tombstone that the next round's insert (a newer cluster time) overwrites.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_documents_under_many_concurrent_bulks_end_in_their_last_state_on_opensearch() -> anyhow::Result<()> {
    let s = Servers::start(&[]).await?;
    let coll = s.client.database("hot").collection::<Document>("docs");
    let state = TempDir::new("state");
    let batch = "  batch:\n    maxDocs: 3\n    flushIntervalMs: 1\n    concurrency: 4\n";
    let monsoon = Monsoon::start(bin(), &s.pipeline("hot", &["hot.docs"], batch), state.path())?;
    monsoon.wait_stats(CONVERGE, |st| st["phase"] == "Streaming")?;
    let mut session = s.client.start_session().await?;
    for round in 0..40 {
        if round % 8 == 4 {
            session.start_transaction().await?;
        }
        for id in 0..6 {
            let filter = doc! {"_id": id};
            match round % 4 {
                0 => {
                    coll.insert_one(doc! {"_id": id, "round": round}).session(&mut session).await?;
                }
                1 | 2 => {
                    coll.update_one(filter, doc! {"$set": {"round": round}}).session(&mut session).await?;
                }
                _ => {
                    coll.delete_one(filter).session(&mut session).await?;
                }
            }
        }
        if round % 8 == 7 {
            session.commit_transaction().await?;
        }
    }
    coll.insert_one(doc! {"_id": 99, "last": true}).await?;
    let r = s.converged("hot", "docs", "hot.docs").await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 40));
    let stats = monsoon.stats().expect("stats");
    assert!(stats["heldWrites"].as_u64() > Some(0), "no write waited for its document: {stats}");
    assert_eq!(stats["deadLettered"], 0, "{stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_collection_deletes_its_index_on_opensearch() -> anyhow::Result<()> {
    let s = Servers::start(&[]).await?;
    let db = s.client.database("app");
    insert_all(&db.collection("keep"), sample_docs(0, 50)).await?;
    insert_all(&db.collection("gone"), sample_docs(0, 50)).await?;
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &s.pipeline("app", &["app.*"], ""), state.path())?;
    let r = s.converged("app", "gone", "app.gone").await?;
    assert!(r.converged(), "{r:?}");
    db.collection::<Document>("gone").drop().await?;
    insert_all(&db.collection("later"), sample_docs(0, 20)).await?;
    let r = s.converged("app", "later", "app.later").await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    let deadline = Instant::now() + CONVERGE;
    loop {
        let exists = s.osc.indices().exists(elasticsearch::indices::IndicesExistsParts::Index(&["app.gone"])).send().await?;
        if exists.status_code().as_u16() == 404 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "index of the dropped collection still exists\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = compare(&s.client, &s.osc, "app", "keep", "app.keep").await?;
    assert!(r.converged(), "{r:?}");
    Ok(())
}

/// History lost while monsoon was stopped, policy Resnapshot: the snapshot rewrites every
/// document with a newer external version, then the sweep (a scroll with versions, and deletes
/// carrying `external_gte` versions) removes what was deleted during the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_resnapshot_sweeps_gap_deletes_on_opensearch() -> anyhow::Result<()> {
    let os = OpenSearch::start()?;
    let mongo = Mongo::start(&["--oplog-max-entries", "1000"])?;
    let client = mongo.client().await?;
    let osc = os.client()?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &os.url(), &["shop.orders"], "  onHistoryLost: Resnapshot\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &osc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0));
    coll.delete_many(doc! {"_id": {"$lt": 50}}).await?;
    coll.update_many(doc! {"_id": {"$gte": 50, "$lt": 60}}, doc! {"$set": {"status": "changed in the gap"}}).await?;
    insert_all(&coll, sample_docs(1000, 3000)).await?;
    client.database("admin").run_command(doc! {"secantusAdmin.pruneOplog": 1}).await?;
    monsoon.restart()?;
    let r = wait_converged(&client, &osc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "gap deletes must be swept: {r:?}\n{}", tail(&monsoon.log(), 30));
    assert!(monsoon.log().contains("history lost"), "{}", tail(&monsoon.log(), 20));
    // It keeps streaming afterwards.
    coll.delete_one(doc! {"_id": 60}).await?;
    coll.insert_one(doc! {"_id": "after", "ok": true}).await?;
    let r = wait_converged(&client, &osc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}
