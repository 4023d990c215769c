//! Crashes, outages and bad input: nothing lost, nothing stale, nothing silent.
//! Every test runs the real `monsoon` binary against the stand-ins over real sockets.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mongodb::bson::{doc, Document};
use monsoon_testkit::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(120);

/// A `shop` pipeline on `shop.orders` (spec lines `extra` added), started and streaming.
fn streaming_shop(mongo: &Mongo, es: &Elastic, extra: &str) -> anyhow::Result<(TempDir, Monsoon)> {
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], extra);
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    // Tests killing it from here on test the stream: wait until the snapshot's end is
    // checkpointed too (acknowledged, then stored at the next tick; slower on a loaded machine).
    let deadline = std::time::Instant::now() + CONVERGE;
    while monsoon.checkpoint("shop").is_none_or(|c| c["snapshot"]["done"] != true) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the snapshot was never checkpointed\n{}", tail(&monsoon.log(), 30));
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((state, monsoon))
}

/// Keep inserting, updating and deleting until `stop`; returns the number of operations.
fn spawn_writer(coll: mongodb::Collection<Document>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
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
        Ok(ops)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_converges() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 1000)).await?;
    let (_state, mut monsoon) = streaming_shop(&mongo, &es, "")?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(coll.clone(), stop.clone());
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
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    let stats = monsoon.stats().expect("stats");
    assert_eq!(stats["snapshotDocuments"], 0, "restart must not re-snapshot: {stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_killed_midway_resumes_from_its_last_id() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("big").collection::<Document>("items");
    insert_all(&coll, sample_docs(0, 20_000)).await?;
    let state = TempDir::new("state");
    // Small batches and one request in flight slow the snapshot down enough to kill it midway.
    let yaml = pipeline_yaml("big", &mongo.uri(), &es.url(), &["big.items"], "  batch:\n    maxDocs: 200\n    concurrency: 1\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let deadline = std::time::Instant::now() + CONVERGE;
    let last_id = loop {
        let cp = monsoon.checkpoint("big");
        let entry = cp.as_ref().map(|c| c["snapshot"]["collections"]["big.items"].clone());
        if let Some(e) = entry {
            if e["lastId"].is_object() && e["done"] != true {
                break e["lastId"].clone();
            }
            assert!(e["done"] != true, "snapshot finished before it could be killed; make it bigger");
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot progress checkpointed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    monsoon.kill();
    // A change made while monsoon is down, to a document the snapshot already passed.
    coll.update_one(doc! {"_id": 0}, doc! {"$set": {"status": "changed while down"}}).await?;
    monsoon.restart()?;
    let report = wait_converged(&client, &esc, "big", "items", "big.items", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    let stats = monsoon.stats().expect("stats");
    let reread = stats["snapshotDocuments"].as_u64().expect("count");
    assert!(reread < 20_000, "snapshot restarted from zero (read {reread}; checkpoint was at {last_id})");
    // The checkpoint is committed every interval: the index can converge before it says so.
    monsoon.wait_checkpoint("big", CONVERGE, |cp| cp["snapshot"]["done"] == true).context("the snapshot never checkpointed as done")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_and_stores_the_final_checkpoint() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("shop").collection::<Document>("orders");
    let (_state, mut monsoon) = streaming_shop(&mongo, &es, "  batch:\n    flushIntervalMs: 2000\n")?;
    insert_all(&coll, sample_docs(0, 300)).await?;
    // Wait until every change is read but (with a 2 s flush interval) likely not yet
    // indexed, then stop: whatever was read must be delivered before exit.
    monsoon.wait_stats(CONVERGE, |s| s["changesRead"].as_u64().unwrap_or(0) >= 300)?;
    let (code, took) = monsoon.terminate()?;
    assert_eq!(code, Some(0), "{}", tail(&monsoon.log(), 30));
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    assert_eq!(count(&esc, "shop.orders").await?, 300, "in-flight writes must be flushed on SIGTERM");
    let cp = monsoon.checkpoint("shop").expect("checkpoint");
    assert!(cp["resumeToken"].is_object(), "final checkpoint has no resume token: {cp}");
    assert!(monsoon.log().contains("final checkpoint written"));

    // Changes while stopped arrive after the restart, without a new snapshot.
    coll.delete_one(doc! {"_id": 1}).await?;
    insert_all(&coll, sample_docs(1000, 10)).await?;
    monsoon.restart()?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_outage_backs_off_then_converges() -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let mut es = Elastic::start()?;
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming" && s["indexed"].as_u64() >= Some(200))?;

    es.stop();
    insert_all(&coll, sample_docs(1000, 500)).await?;
    coll.delete_many(doc! {"_id": {"$lt": 50}}).await?;
    coll.update_many(doc! {"_id": {"$gte": 100, "$lt": 150}}, doc! {"$set": {"status": "during outage"}}).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while monsoon.get("/readyz").map(|r| r.0) != Some(503) {
        assert!(std::time::Instant::now() < deadline, "readyz stayed ready while Elasticsearch was down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(monsoon.get("/healthz").map(|r| r.0), Some(200), "an outage is not a reason to restart");
    tokio::time::sleep(Duration::from_secs(3)).await;
    es.restart()?;
    let esc = es.client()?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    let stats = monsoon.stats().expect("stats");
    assert!(stats["retriedItems"].as_u64() > Some(0), "{stats}");
    monsoon.wait_stats(Duration::from_secs(30), |s| s["ready"] == true)?;
    Ok(())
}

/// A pipeline started while Elasticsearch is unreachable (a cluster restarting, pods starting in
/// any order) waits for it: live but not ready, saying so in its log, then syncs everything. It
/// does not exit (a crash-looping pod, a pipeline shown as Failed). Refusals still stop it at
/// once: `aws.rs` (HTTP 403) and `reliability.rs` (a refused TLS handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_before_elasticsearch_it_waits_not_ready_then_syncs() -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let mut es = Elastic::start()?;
    // Its port is known, and nothing listens there until the restart below.
    es.stop();
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 300)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    waits_live_not_ready(&mut monsoon, "Elasticsearch is unreachable; waiting for it").await?;
    insert_all(&coll, sample_docs(300, 200)).await?;
    es.restart()?;
    let esc = es.client()?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    monsoon.wait_stats(CONVERGE, |s| s["ready"] == true && s["phase"] == "Streaming")?;
    assert!(monsoon.log().contains("Elasticsearch reachable"), "{}", tail(&monsoon.log(), 20));
    Ok(())
}

/// Wait until the log says `waiting`; several retries later it must still run, live and not
/// ready.
async fn waits_live_not_ready(monsoon: &mut Monsoon, waiting: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !monsoon.log().contains(waiting) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "no word of the wait in the log\n{}", tail(&monsoon.log(), 20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(monsoon.wait_exit(Duration::from_secs(4)).is_err(), "it exited instead of waiting:\n{}", tail(&monsoon.log(), 20));
    anyhow::ensure!(monsoon.get("/healthz").map(|r| r.0) == Some(200), "waiting is not a reason to restart");
    anyhow::ensure!(monsoon.get("/readyz").map(|r| r.0) == Some(503), "not ready before the server answers");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn started_before_mongodb_it_waits_not_ready_then_syncs() -> anyhow::Result<()> {
    let mut mongo = Mongo::start(&[])?;
    let es = Elastic::start()?;
    insert_all(&mongo.client().await?.database("shop").collection::<Document>("orders"), sample_docs(0, 300)).await?;
    // Its port is known, and nothing listens there until the restart below.
    mongo.stop(false);
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    waits_live_not_ready(&mut monsoon, "MongoDB is unreachable; waiting for it").await?;
    mongo.restart()?;
    let client = mongo.client().await?;
    insert_all(&client.database("shop").collection::<Document>("orders"), sample_docs(300, 200)).await?;
    let report = wait_converged(&client, &es.client()?, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    monsoon.wait_stats(CONVERGE, |s| s["ready"] == true && s["phase"] == "Streaming")?;
    assert!(monsoon.log().contains("MongoDB answered after waiting"), "{}", tail(&monsoon.log(), 20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_restart_on_same_storage_converges() -> anyhow::Result<()> {
    let mut mongo = Mongo::start(&[])?;
    let es = Elastic::start()?;
    let esc = es.client()?;
    {
        let client = mongo.client().await?;
        insert_all(&client.database("shop").collection("orders"), sample_docs(0, 300)).await?;
    }
    let (_state, monsoon) = streaming_shop(&mongo, &es, "")?;
    mongo.restart()?;
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(1000, 100)).await?;
    coll.delete_many(doc! {"_id": {"$lt": 10}}).await?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_getmore_reopens_the_stream_without_losing_events() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("shop").collection::<Document>("orders");
    let (_state, monsoon) = streaming_shop(&mongo, &es, "")?;
    // HostUnreachable without the ResumableChangeStreamError label: the driver does not
    // resume by itself, so the engine must re-open from its last token.
    client
        .database("admin")
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": {"times": 3},
            "data": {"failCommands": ["getMore"], "errorCode": 6}})
        .await?;
    for i in 0..10 {
        insert_all(&coll, sample_docs(i * 50, 50)).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    let stats = monsoon.stats().expect("stats");
    assert!(stats["streamReopens"].as_u64() >= Some(1), "the failpoint never hit: {stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_with_policy_fail_stops_with_a_clear_error() -> anyhow::Result<()> {
    let mongo = Mongo::start(&["--oplog-max-entries", "1000"])?;
    let es = Elastic::start()?;
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    coll.insert_one(doc! {"_id": 0}).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "  onHistoryLost: Fail\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming" && s["indexed"] == 1)?;
    coll.insert_one(doc! {"_id": 1}).await?;
    monsoon.wait_stats(CONVERGE, |s| s["indexed"] == 2)?;
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0));
    // While monsoon is stopped, the oplog rolls past its resume point.
    insert_all(&coll, sample_docs(10, 3000)).await?;
    client.database("admin").run_command(doc! {"secantusAdmin.pruneOplog": 1}).await?;
    monsoon.restart()?;
    let code = monsoon.wait_exit(Duration::from_secs(60))?;
    assert_eq!(code, Some(1), "{}", tail(&monsoon.log(), 20));
    let log = monsoon.log();
    assert!(log.contains("ChangeStreamHistoryLost"), "{}", tail(&log, 20));
    assert!(log.contains("error: "), "one clear error line expected:\n{}", tail(&log, 20));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_documents_are_dead_lettered_while_the_rest_lands() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    // The index says `quantity` is a number; some documents say otherwise.
    esc.indices()
        .create(elasticsearch::indices::IndicesCreateParts::Index("shop.orders"))
        .body(serde_json::json!({"settings": {"number_of_replicas": 0},
            "mappings": {"properties": {"quantity": {"type": "long"}}}}))
        .send()
        .await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 100)).await?;
    coll.update_many(doc! {"_id": {"$in": [7, 42]}}, doc! {"$set": {"quantity": "lots"}}).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    // Streamed poison too.
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    coll.insert_one(doc! {"_id": 500, "quantity": "many"}).await?;
    coll.insert_one(doc! {"_id": 501, "quantity": 3}).await?;
    monsoon.wait_stats(CONVERGE, |s| s["deadLettered"] == 3 && s["indexed"].as_u64() >= Some(99))?;
    let report = compare(&client, &esc, "shop", "orders", "shop.orders").await?;
    let mut lost = report.lost.clone();
    lost.sort();
    assert_eq!(lost, vec!["42", "500", "7"], "{report:?}");
    assert!(report.stale.is_empty() && report.extra == 0, "{report:?}");
    assert_eq!(count(&esc, "monsoon-deadletter").await?, 3);
    let found = esc
        .search(elasticsearch::SearchParts::Index(&["monsoon-deadletter"]))
        .body(serde_json::json!({"query": {"term": {"id": "500"}}}))
        .send()
        .await?
        .json::<serde_json::Value>()
        .await?;
    let record = &found["hits"]["hits"][0]["_source"];
    assert_eq!(record["namespace"], "shop.orders", "{found}");
    assert_eq!(record["status"], 400);
    assert!(record["reason"].as_str().unwrap_or("").contains("quantity"), "{record}");
    assert!(record["document"].as_str().unwrap_or("").contains("many"), "{record}");
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_dead_letter_total{"), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_one_clear_line() -> anyhow::Result<()> {
    let state = TempDir::new("state");
    // Invalid pipeline: the error names the field.
    let yaml = pipeline_yaml("shop", "mongodb://127.0.0.1:1/", "http://127.0.0.1:1", &["shoporders"], "");
    let mut m = Monsoon::start(bin(), &yaml, state.path())?;
    assert_eq!(m.wait_exit(Duration::from_secs(10))?, Some(1));
    let log = m.log();
    assert!(log.contains("spec.namespaces[0]"), "{log}");
    assert_eq!(log.lines().count(), 2, "expected a short, clear error:\n{log}");
    // An unreachable MongoDB is waited for, not refused
    // (`started_before_mongodb_it_waits_not_ready_then_syncs`); refused credentials exit 1
    // (`credentials_come_from_the_environment_and_never_reach_the_log`).
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_change_event_is_read_without_update_lookup() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("shop").collection::<Document>("orders");
    let (_state, monsoon) = streaming_shop(&mongo, &es, "")?;
    // A real document near 12 MB goes through the whole path.
    let big = "x".repeat(12 << 20);
    coll.insert_one(doc! {"_id": "big", "blob": &big}).await?;
    coll.update_one(doc! {"_id": "big"}, doc! {"$set": {"blob": format!("y{big}")}}).await?;
    // SecantusDB does not enforce MongoDB's 16 MB limit on change events, so the server's
    // BSONObjectTooLarge (10334) on getMore is injected with a failpoint.
    client
        .database("admin")
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": {"times": 1},
            "data": {"failCommands": ["getMore"], "errorCode": 10334}})
        .await?;
    insert_all(&coll, sample_docs(0, 100)).await?;
    coll.update_one(doc! {"_id": 5}, doc! {"$set": {"status": "after oversize"}}).await?;
    coll.delete_one(doc! {"_id": 6}).await?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    let log = monsoon.log();
    assert!(log.contains("too large for MongoDB"), "the failpoint never hit:\n{}", tail(&log, 30));
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_change_events_total{op=\"lookup\""), "no document was looked up:\n{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_lost_with_policy_resnapshot_rebuilds_and_removes_gap_deletes() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&["--oplog-max-entries", "1000"]).await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "  onHistoryLost: Resnapshot\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0));
    // While monsoon is stopped: deletes and updates whose events will be lost, then enough
    // writes to roll the oplog past the resume point.
    coll.delete_many(doc! {"_id": {"$lt": 50}}).await?;
    coll.update_many(doc! {"_id": {"$gte": 50, "$lt": 60}}, doc! {"$set": {"status": "changed in the gap"}}).await?;
    insert_all(&coll, sample_docs(1000, 3000)).await?;
    client.database("admin").run_command(doc! {"secantusAdmin.pruneOplog": 1}).await?;
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "gap deletes must be swept: {r:?}\n{}", tail(&monsoon.log(), 30));
    let log = monsoon.log();
    assert!(log.contains("history lost"), "{}", tail(&log, 20));
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_history_lost_total{pipeline=\"shop\"} 1"), "{metrics}");
    // And it keeps streaming afterwards.
    coll.delete_one(doc! {"_id": 60}).await?;
    coll.insert_one(doc! {"_id": "after", "ok": true}).await?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    // The checkpoint is written once per checkpoint interval (1 s): the sweep's end reaches
    // the file within a few of them.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let cp = monsoon.checkpoint("shop").expect("checkpoint");
        if cp.get("sweepBelow").is_none() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "sweep must be marked done: {cp}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_elasticsearch_is_down_exits_in_grace_and_loses_nothing() -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let mut es = Elastic::start()?;
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &["--shutdown-grace-seconds", "2"], &[])?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    es.stop();
    insert_all(&coll, sample_docs(0, 500)).await?;
    monsoon.wait_stats(CONVERGE, |s| s["inFlight"].as_i64() > Some(0) || s["ready"] == false)?;
    let (code, took) = monsoon.terminate()?;
    assert_eq!(code, Some(0), "{}", tail(&monsoon.log(), 20));
    assert!(took < Duration::from_secs(10), "shutdown took {took:?} with a 2 s grace period");
    assert!(monsoon.log().contains("did not finish within the shutdown grace period"), "{}", tail(&monsoon.log(), 20));
    // The unacknowledged changes were not checkpointed: they arrive after a restart.
    es.restart()?;
    let esc = es.client()?;
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_come_from_the_environment_and_never_reach_the_log() -> anyhow::Result<()> {
    let Stack { mut mongo, es, client, esc } = Stack::start(&[]).await?;
    client
        .database("admin")
        .run_command(doc! {"createUser": "syncer", "pwd": "s3cret-Pa55", "roles": ["root"]})
        .await?;
    insert_all(&client.database("shop").collection("orders"), sample_docs(0, 50)).await?;
    drop(client);
    mongo.restart_with(&["--auth"])?;
    let uri = format!("mongodb://syncer:s3cret-Pa55@127.0.0.1:{}/?directConnection=true", mongo.port);
    let spec = "  mongodb:\n    uriFrom: {env: TEST_MONGO_URI}\n";
    let yaml = format!(
        "apiVersion: monsoon.dev/v1alpha1\nkind: SyncPipeline\nmetadata: {{name: shop}}\nspec:\n{spec}  elasticsearch:\n    urls: [\"{}\"]\n  namespaces: [shop.orders]\n",
        es.url()
    );
    let state = TempDir::new("state");
    let monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &[("TEST_MONGO_URI", &uri)])?;
    let authed = mongodb::Client::with_uri_str(&uri).await?;
    let r = wait_converged(&authed, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 20));
    assert!(!monsoon.log().contains("s3cret-Pa55"), "password leaked into the log");
    drop(monsoon);

    // A wrong password: one clear line, no retry storm, no password in it.
    let wrong = uri.replace("s3cret-Pa55", "wrong-Pa55");
    let state = TempDir::new("state");
    let mut m = Monsoon::start_with(bin(), &yaml, state.path(), &[], &[("TEST_MONGO_URI", &wrong)])?;
    assert_eq!(m.wait_exit(Duration::from_secs(60))?, Some(1));
    let log = m.log();
    let error_line = log.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
    assert!(error_line.contains("refused the credentials"), "{log}");
    assert!(!log.contains("wrong-Pa55"), "password leaked into the log:\n{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_stream_keeps_its_checkpoint_fresh() -> anyhow::Result<()> {
    let Stack { mongo, es, client, .. } = Stack::start(&[]).await?;
    let db = client.database("shop");
    db.collection::<Document>("orders").insert_one(doc! {"_id": 1}).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming" && s["indexed"] == 1)?;
    // Activity elsewhere in the deployment, none in the synced collection.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while monsoon.checkpoint("shop").map(|c| c["resumeToken"].is_object()) != Some(true) {
        assert!(std::time::Instant::now() < deadline, "no resume token checkpointed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = monsoon.checkpoint("shop").expect("checkpoint")["resumeToken"].clone();
    client.database("other").collection::<Document>("noise").insert_one(doc! {"x": 1}).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = monsoon.checkpoint("shop").expect("checkpoint")["resumeToken"].clone();
        if now != first {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the checkpoint of an idle stream never moved");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A re-snapshot asked for by hand (`MONSOON_RESNAPSHOT`, which the operator sets from the
/// `monsoon.dev/resnapshot` annotation): every collection is read again and what the new
/// snapshot does not see is swept (here a document written into the index behind monsoon's
/// back, standing in for one whose delete was lost); the same token again does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resnapshot_on_request_rebuilds_and_sweeps_once_per_token() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    assert_eq!(monsoon.terminate()?.0, Some(0));
    let stray = esc
        .index(elasticsearch::IndexParts::IndexId("shop.orders", "stray"))
        .version(1)
        .version_type(elasticsearch::params::VersionType::External)
        .body(serde_json::json!({"deleted": "while history was lost"}))
        .send()
        .await?;
    assert!(stray.status_code().is_success(), "{}", stray.text().await?);
    let mut monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &[("MONSOON_RESNAPSHOT", "incident-1")])?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "the stray document must be swept: {r:?}\n{}", tail(&monsoon.log(), 30));
    assert_eq!(monsoon.terminate()?.0, Some(0));
    monsoon.restart()?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    let log = monsoon.log();
    assert_eq!(log.matches("re-snapshot requested").count(), 1, "once per token:\n{}", tail(&log, 30));
    Ok(())
}
