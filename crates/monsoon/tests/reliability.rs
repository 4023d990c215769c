//! The reliability round: stalls and gaps found by running monsoon and by reading it, each
//! reproduced against the stand-ins with the real binary, then closed.

use std::path::Path;
use std::time::{Duration, Instant};

use elasticsearch::indices::IndicesExistsParts;
use elasticsearch::Elasticsearch;
use mongodb::bson::{doc, Document};
use monsoon_testkit::proxy::LimitProxy;
use monsoon_testkit::*;
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(120);

async fn index_exists(es: &Elasticsearch, index: &str) -> anyhow::Result<bool> {
    let r = es.indices().exists(IndicesExistsParts::Index(&[index])).send().await?;
    Ok(r.status_code().is_success())
}

/// Wait until `index` is gone (a drop applied); on timeout, fail with `what` and the log.
async fn wait_index_gone(es: &Elasticsearch, index: &str, monsoon: &Monsoon, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    while index_exists(es, index).await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: index {index} is still there ({} documents):\n{}",
            count(es, index).await.unwrap_or(0),
            tail(&monsoon.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// How the fault matrix stops monsoon.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// SIGTERM: the graceful path (final checkpoint).
    Term,
    /// SIGKILL: no chance to write anything more.
    Kill,
}

impl Stop {
    fn apply(self, monsoon: &mut Monsoon) -> anyhow::Result<()> {
        match self {
            Stop::Term => {
                let (code, _) = monsoon.terminate()?;
                anyhow::ensure!(code == Some(0), "exit {code:?} after SIGTERM:\n{}", tail(&monsoon.log(), 20));
            }
            Stop::Kill => monsoon.kill(),
        }
        Ok(())
    }
}


/// Issue 10, item 1: behind a proxy that refuses bodies over 1 MiB with 413 (as
/// `http.max_content_length` does), a 3 MiB document's dead-letter record embedded the whole
/// document, was refused too and retried forever, holding its batch and the checkpoint. Seen on
/// the old code here: the 300 later documents arrived (other request slots), but no dead-letter
/// record was ever stored; the run also saw 290 of them never arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_document_is_dead_lettered_and_the_stream_goes_on() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let proxy = LimitProxy::start(&es.url(), 1024 * 1024)?;
    let coll = client.database("shop").collection::<Document>("orders");
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &proxy.url(), &["shop.orders"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    coll.insert_one(doc! {"_id": "big", "blob": "x".repeat(3 * 1024 * 1024)}).await?;
    insert_all(&coll, sample_docs(0, 300)).await?;
    let deadline = Instant::now() + CONVERGE;
    loop {
        if count(&esc, "shop.orders").await.unwrap_or(0) == 300 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the documents after the oversize one did not arrive:\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(proxy.refused() > 0, "the proxy never refused a body: the test proves nothing");
    let records = dead_letters(&esc).await?;
    let big: Vec<&Value> = records.iter().filter(|r| r["id"] == "big").collect();
    assert_eq!(big.len(), 1, "{records:?}");
    assert_eq!(big[0]["status"], 413);
    assert_eq!(big[0]["documentTruncated"], true);
    assert!(big[0]["documentBytes"].as_u64() > Some(3 * 1024 * 1024), "{}", big[0]["documentBytes"]);
    assert_eq!(big[0]["documentSha256"].as_str().map(str::len), Some(64));
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_dead_letter_total{error_type=\"http_413\",pipeline=\"shop\"} 1"), "{metrics}");
    // The checkpoint moves past the oversize document.
    let token_before = monsoon.checkpoint("shop").and_then(|c| c.get("resumeToken").cloned());
    coll.insert_one(doc! {"_id": "after"}).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while monsoon.checkpoint("shop").and_then(|c| c.get("resumeToken").cloned()) == token_before {
        anyhow::ensure!(Instant::now() < deadline, "the checkpoint froze");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Fault matrix, drop phase (issue 10, item 3). Seen on the old code with SIGTERM: with
/// Elasticsearch down, a dropped collection's index delete was backing off when the signal
/// came; the token after the drop was checkpointed and the index stayed for good.
async fn stop_during_a_drop(kind: SearchKind, stop: Stop) -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let mut es = SearchServer::start(kind)?;
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 100)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let esc = es.client()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    es.stop();
    coll.drop().await?;
    monsoon.wait_log("failed to delete index of dropped collection", CONVERGE)?;
    stop.apply(&mut monsoon)?;
    es.restart()?;
    let esc = es.client()?;
    assert!(index_exists(&esc, "shop.orders").await?, "the index must still exist before the restart");
    monsoon.restart()?;
    wait_index_gone(&esc, "shop.orders", &monsoon, &format!("{kind:?}, {stop:?}: the collection was dropped")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_drop_phase() -> anyhow::Result<()> {
    stop_during_a_drop(SearchKind::Noida, Stop::Term).await?;
    stop_during_a_drop(SearchKind::Noida, Stop::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_drop_phase_on_opensearch() -> anyhow::Result<()> {
    stop_during_a_drop(SearchKind::OpenSearch, Stop::Term).await?;
    stop_during_a_drop(SearchKind::OpenSearch, Stop::Kill).await
}

/// Fault matrix, renamed-in snapshot phase (issue 10, item 6): stopped while the collection
/// renamed into the pipeline is being read, the restart must read the rest of it.
async fn stop_during_a_renamed_in_snapshot(stop: Stop) -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&["--oplog-max-entries", "200000"]).await?;
    let db = client.database("shop");
    let staging = db.collection::<Document>("staging");
    for start in (0..60_000).step_by(10_000) {
        insert_all(&staging, sample_docs(start, 10_000)).await?;
    }
    let state = TempDir::new("state");
    // Small batches, one at a time: the renamed-in snapshot takes long enough to cut short.
    let extra = "  batch:\n    maxDocs: 200\n    concurrency: 1\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], extra);
    let mut monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &["--shutdown-grace-seconds", "5"], &[])?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    client
        .database("admin")
        .run_command(doc! {"renameCollection": "shop.staging", "to": "shop.orders"})
        .await?;
    monsoon.wait_stats(CONVERGE, |s| s["snapshotDocuments"].as_u64() >= Some(5_000))?;
    stop.apply(&mut monsoon)?;
    let indexed = count(&esc, "shop.orders").await.unwrap_or(0);
    assert!(indexed < 60_000, "the snapshot finished before the stop ({indexed} indexed): the test proves nothing");
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{stop:?}: {r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_renamed_in_snapshot_phase() -> anyhow::Result<()> {
    stop_during_a_renamed_in_snapshot(Stop::Term).await?;
    stop_during_a_renamed_in_snapshot(Stop::Kill).await
}

/// Fault matrix, snapshot phase: stopped half-way through the initial snapshot.
async fn stop_during_the_snapshot(kind: SearchKind, stop: Stop) -> anyhow::Result<()> {
    let mongo = Mongo::start(&["--oplog-max-entries", "200000"])?;
    let es = SearchServer::start(kind)?;
    let (client, esc) = (mongo.client().await?, es.client()?);
    let coll = client.database("shop").collection::<Document>("orders");
    for start in (0..30_000).step_by(10_000) {
        insert_all(&coll, sample_docs(start, 10_000)).await?;
    }
    let state = TempDir::new("state");
    let extra = "  batch:\n    maxDocs: 200\n    concurrency: 1\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], extra);
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["snapshotDocuments"].as_u64() >= Some(3_000))?;
    // Changes made during the snapshot must arrive too.
    coll.delete_many(doc! {"_id": {"$lt": 100}}).await?;
    coll.update_many(doc! {"_id": {"$gte": 29_000}}, doc! {"$set": {"status": "changed during the snapshot"}}).await?;
    stop.apply(&mut monsoon)?;
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{kind:?}, {stop:?}: {r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_snapshot_phase() -> anyhow::Result<()> {
    stop_during_the_snapshot(SearchKind::Noida, Stop::Term).await?;
    stop_during_the_snapshot(SearchKind::Noida, Stop::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_snapshot_phase_on_opensearch() -> anyhow::Result<()> {
    stop_during_the_snapshot(SearchKind::OpenSearch, Stop::Term).await?;
    stop_during_the_snapshot(SearchKind::OpenSearch, Stop::Kill).await
}

/// Fault matrix, Elasticsearch outage: stopped while writes wait for Elasticsearch.
async fn stop_during_an_outage(kind: SearchKind, stop: Stop) -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let mut es = SearchServer::start(kind)?;
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &["--shutdown-grace-seconds", "2"], &[])?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming" && s["indexed"].as_u64() >= Some(200))?;
    es.stop();
    insert_all(&coll, sample_docs(1000, 500)).await?;
    coll.delete_many(doc! {"_id": {"$lt": 50}}).await?;
    coll.update_many(doc! {"_id": {"$gte": 100, "$lt": 150}}, doc! {"$set": {"status": "during outage"}}).await?;
    monsoon.wait_stats(CONVERGE, |s| s["changesRead"].as_u64() >= Some(500))?;
    stop.apply(&mut monsoon)?;
    es.restart()?;
    let esc = es.client()?;
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{kind:?}, {stop:?}: {r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_elasticsearch_outage_phase() -> anyhow::Result<()> {
    stop_during_an_outage(SearchKind::Noida, Stop::Term).await?;
    stop_during_an_outage(SearchKind::Noida, Stop::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_elasticsearch_outage_phase_on_opensearch() -> anyhow::Result<()> {
    stop_during_an_outage(SearchKind::OpenSearch, Stop::Term).await?;
    stop_during_an_outage(SearchKind::OpenSearch, Stop::Kill).await
}

/// Fault matrix, re-snapshot and sweep after lost history (issue 10, item 4): stopped once the
/// re-snapshot is under way; the restart must finish it, sweep the gap's deletes and apply the
/// gap's drop. Seen on the old code (without the stop): with `shop.*`, the collection dropped
/// while monsoon was stopped kept all 200 of its documents searchable, since only exactly named
/// namespaces were swept.
async fn stop_during_a_resnapshot(kind: SearchKind, stop: Stop) -> anyhow::Result<()> {
    let mongo = Mongo::start(&["--oplog-max-entries", "1000"])?;
    let es = SearchServer::start(kind)?;
    let (client, esc) = (mongo.client().await?, es.client()?);
    let db = client.database("shop");
    let a = db.collection::<Document>("a");
    let b = db.collection::<Document>("b");
    insert_all(&a, sample_docs(0, 100)).await?;
    insert_all(&b, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.*"], "  onHistoryLost: Resnapshot\n  batch:\n    maxDocs: 100\n    concurrency: 1\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    for coll in ["a", "b"] {
        let r = wait_converged(&client, &esc, "shop", coll, &format!("shop.{coll}"), CONVERGE).await?;
        assert!(r.converged(), "{r:?}");
    }
    Stop::Term.apply(&mut monsoon)?;
    // While monsoon is stopped: a drop, deletes and updates whose events will be lost, then
    // enough writes to roll the oplog past the resume point.
    b.drop().await?;
    a.delete_many(doc! {"_id": {"$lt": 10}}).await?;
    a.update_many(doc! {"_id": {"$gte": 10, "$lt": 20}}, doc! {"$set": {"status": "changed in the gap"}}).await?;
    for start in (1000..13_000).step_by(3000) {
        insert_all(&a, sample_docs(start, 3000)).await?;
    }
    client.database("admin").run_command(doc! {"secantusAdmin.pruneOplog": 1}).await?;
    monsoon.restart()?;
    monsoon.wait_log("history lost", CONVERGE)?;
    monsoon.wait_stats(CONVERGE, |s| s["snapshotDocuments"].as_u64() >= Some(1_000))?;
    stop.apply(&mut monsoon)?;
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "a", "shop.a", CONVERGE).await?;
    assert!(r.converged(), "{kind:?}, {stop:?}: gap deletes must be swept: {r:?}\n{}", tail(&monsoon.log(), 30));
    wait_index_gone(&esc, "shop.b", &monsoon, &format!("{kind:?}, {stop:?}: shop.b was dropped during the lost history")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_resnapshot_and_sweep_phase() -> anyhow::Result<()> {
    stop_during_a_resnapshot(SearchKind::Noida, Stop::Term).await?;
    stop_during_a_resnapshot(SearchKind::Noida, Stop::Kill).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_matrix_resnapshot_and_sweep_phase_on_opensearch() -> anyhow::Result<()> {
    stop_during_a_resnapshot(SearchKind::OpenSearch, Stop::Term).await?;
    stop_during_a_resnapshot(SearchKind::OpenSearch, Stop::Kill).await
}

/// Issue 10, item 2. Seen on the old code (driver built without the feature): "mongodb+srv
/// connection strings cannot be used when the 'dns-resolver' feature is disabled". Here the SRV and TXT
/// records come from a DNS server of the test's own, which only the monsoon process sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mongodb_srv_connection_string_is_resolved_and_synced() -> anyhow::Result<()> {
    use monsoon_testkit::dns::SrvDns;
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let dns = SrvDns::start(&json!({
        "srv": {"_mongodb._tcp.cluster0.monsoon.test": [[0, 0, mongo.port, "db0.monsoon.test"]]},
        // As Atlas publishes: the replica set and auth source come from TXT.
        "txt": {"cluster0.monsoon.test": ["replicaSet=secantus&authSource=admin"]},
        "a": {"db0.monsoon.test": "127.0.0.1"},
    }))?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 100)).await?;
    let state = TempDir::new("state");
    let launcher = dns.launcher(state.path(), bin())?;
    // +srv turns TLS on by default; the stand-in here speaks plain TCP.
    let yaml = pipeline_yaml("shop", "mongodb+srv://cluster0.monsoon.test/?tls=false", &es.url(), &["shop.orders"], "");
    let monsoon = Monsoon::start(&launcher, &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    coll.insert_one(doc! {"_id": "streamed"}).await?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    Ok(())
}

/// Issue 10, item 2: `authMechanism=MONGODB-AWS` was refused by the driver before any
/// connection ("a disabled driver feature"). It now reaches the server, which (a stand-in
/// without AWS IAM) refuses the credentials: the refusal, not the parse, stops monsoon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_aws_authentication_reaches_the_server() -> anyhow::Result<()> {
    let Stack { mongo, es, .. } = Stack::start(&[]).await?;
    let state = TempDir::new("state");
    let uri = format!("mongodb://127.0.0.1:{}/?directConnection=true&authMechanism=MONGODB-AWS&authSource=%24external", mongo.port);
    let yaml = pipeline_yaml("shop", &uri, &es.url(), &["shop.orders"], "");
    let env = [
        ("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE"),
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        ("AWS_REGION", "us-east-1"),
    ];
    let validate = std::process::Command::new(bin()).args(["validate", "-f"]).arg({
        std::fs::create_dir_all(state.path())?;
        let f = state.path().join("aws.yaml");
        std::fs::write(&f, &yaml)?;
        f
    }).output()?;
    assert!(validate.status.success(), "{}", String::from_utf8_lossy(&validate.stderr));
    let mut monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    let code = monsoon.wait_exit(Duration::from_secs(60))?;
    let log = monsoon.log();
    assert_eq!(code, Some(1), "{}", tail(&log, 20));
    assert!(!log.contains("feature"), "{}", tail(&log, 20));
    assert!(log.contains("error: "), "{}", tail(&log, 20));
    assert!(!log.contains("wJalrXUtnFEMI"), "the secret key must never be logged");
    Ok(())
}

/// Resident memory of a process, from `/proc/<pid>/status` (KiB).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Issue 10, item 9: a backlog far beyond the sink's in-flight bounds (the 64 MiB byte budget
/// and the batcher's bounded queue) while Elasticsearch is down. The change stream must pause
/// (back-pressure) and resident memory stay bounded; then everything arrives once
/// Elasticsearch is back. Measured here: the stream paused after 5,864 of the 40,000 changes
/// with 60 MiB peak RSS; with both bounds widened (budget ×64, queue ×1000) it read all 40,000
/// and this test failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_beyond_the_memory_budget_pauses_the_stream_and_memory_stays_bounded() -> anyhow::Result<()> {
    const DOCS: i64 = 40_000;
    let mongo = Mongo::start(&["--oplog-max-entries", "200000"])?;
    let mut es = Elastic::start()?;
    let client = mongo.client().await?;
    let coll = client.database("shop").collection::<Document>("orders");
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    let pid = monsoon.pid().expect("running");
    es.stop();
    // 4 KiB documents: 160 MiB of changes, two and a half times the budget.
    let filler = "m".repeat(4000);
    for start in (0..DOCS).step_by(1000) {
        let docs: Vec<Document> = (start..start + 1000).map(|i| doc! {"_id": i, "filler": &filler}).collect();
        coll.insert_many(docs).await?;
    }
    // The stream pauses: what was read stops growing well short of what was written.
    let mut peak_kib = 0;
    let mut last_read = 0;
    let mut steady_since = Instant::now();
    let deadline = Instant::now() + CONVERGE;
    loop {
        peak_kib = peak_kib.max(rss_kib(pid).unwrap_or(0));
        let read = monsoon.stats().and_then(|s| s["changesRead"].as_u64()).unwrap_or(0);
        if read != last_read {
            last_read = read;
            steady_since = Instant::now();
        } else if read > 0 && steady_since.elapsed() > Duration::from_secs(5) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the stream never paused: {read} changes read");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(last_read < DOCS as u64 / 2, "the stream read {last_read} of {DOCS} changes with Elasticsearch down");
    assert!(peak_kib < 160 * 1024, "peak resident memory {} MiB with a 64 MiB budget", peak_kib / 1024);
    eprintln!("paused after {last_read} of {DOCS} changes; peak RSS {} MiB", peak_kib / 1024);
    es.restart()?;
    let esc = es.client()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", Duration::from_secs(300)).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

/// Issue 10, item 5, at run time: `shop.Orders` and `shop.orders` both get index `shop.orders`
/// under `shop.*`; a drop of one would delete the other's documents. monsoon stops with an
/// error naming both instead of mixing them (the spec-level case is refused by validation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_collections_whose_index_names_collide_stop_the_pipeline_naming_both() -> anyhow::Result<()> {
    let Stack { mongo, es, client, .. } = Stack::start(&[]).await?;
    let db = client.database("shop");
    db.collection::<Document>("Orders").insert_one(doc! {"_id": 1}).await?;
    db.collection::<Document>("orders").insert_one(doc! {"_id": 2}).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.*"], "");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let code = monsoon.wait_exit(CONVERGE)?;
    let log = monsoon.log();
    assert_eq!(code, Some(1), "{}", tail(&log, 20));
    assert!(log.contains("`shop.Orders` and `shop.orders` both write to index `shop.orders`"), "{}", tail(&log, 20));
    Ok(())
}

/// Issue 10, connectivity: X.509 client certificates for MongoDB against a server that
/// requires them (mutual TLS), first from the connection string (`tlsCertificateKeyFile`) with
/// the CA from `caFrom`, then from `clientCertFrom`/`clientKeyFrom`. The old code's `caFrom`
/// replaced the connection string's TLS options, dropping the client certificate (found by
/// reading; this test was not run against it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_client_certificates_from_the_uri_or_the_spec_work_beside_ca_from() -> anyhow::Result<()> {
    use monsoon_testkit::tls::Certs;
    let dir = TempDir::new("certs");
    let certs = Certs::generate(dir.path())?;
    let (cert, key, ca) = (certs.server_cert.display().to_string(), certs.server_key.display().to_string(), certs.ca.display().to_string());
    let mongo = Mongo::start(&["--tls-cert-file", &cert, "--tls-key-file", &key, "--tls-ca-file", &ca, "--tls-require-client-cert"])?;
    let es = Elastic::start()?;
    init_crypto();
    let base = format!("mongodb://127.0.0.1:{}/?directConnection=true&tls=true", mongo.port);
    let with_cert = format!("{base}&tlsCertificateKeyFile={}", certs.client_pem.display());
    let client = mongodb::Client::with_uri_str(format!("{with_cert}&tlsCAFile={ca}")).await?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 50)).await?;
    let esc = es.client()?;
    let ca_from = format!("    caFrom: {{file: \"{ca}\"}}\n");
    let spec_cert = format!(
        "{ca_from}    clientCertFrom: {{file: \"{}\"}}\n    clientKeyFrom: {{file: \"{}\"}}\n",
        certs.client_cert.display(),
        certs.client_key.display()
    );
    for (label, uri, mongo_extra) in [("uri", &with_cert, &ca_from), ("spec", &base, &spec_cert)] {
        let state = TempDir::new(label);
        let yaml = pipeline_yaml("shop", uri, &es.url(), &["shop.orders"], "").replace("  elasticsearch:", &format!("{mongo_extra}  elasticsearch:"));
        let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
        coll.insert_one(doc! {"_id": label}).await?;
        let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
        assert!(r.converged(), "{label}: {r:?}\n{}", tail(&monsoon.log(), 30));
        let (code, _) = monsoon.terminate()?;
        assert_eq!(code, Some(0));
    }
    Ok(())
}

/// Issue 10, connectivity: an Elasticsearch client certificate (PKI) through a gateway that
/// requires one, together with basic authentication, and gzip request bodies. Without the
/// certificate the handshake fails and monsoon cannot start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elasticsearch_client_certificates_and_gzip_bodies_work() -> anyhow::Result<()> {
    use monsoon_testkit::proxy::MutualTls;
    use monsoon_testkit::tls::Certs;
    let dir = TempDir::new("certs");
    let certs = Certs::generate(dir.path())?;
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let gateway = LimitProxy::start_with(
        &es.url(),
        100 * 1024 * 1024,
        Some(MutualTls { cert: &certs.server_cert, key: &certs.server_key, client_ca: &certs.ca }),
    )?;
    let coll = client.database("shop").collection::<Document>("orders");
    insert_all(&coll, sample_docs(0, 300)).await?;
    let es_tls = format!(
        "    caFrom: {{file: \"{}\"}}\n    clientCertFrom: {{file: \"{}\"}}\n    clientKeyFrom: {{file: \"{}\"}}\n    username: elastic\n    passwordFrom: {{env: ES_PASSWORD}}\n    gzip: true\n",
        certs.ca.display(),
        certs.client_cert.display(),
        certs.client_key.display()
    );
    let yaml = pipeline_yaml("shop", &mongo.uri(), &gateway.url(), &["shop.orders"], "").replace("  namespaces:", &format!("{es_tls}  namespaces:"));
    let state = TempDir::new("state");
    let monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &[("ES_PASSWORD", "changeme")])?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    assert!(gateway.gzipped() > 0, "no request came gzip-compressed");
    assert!(!monsoon.log().contains("changeme"));
    // Without the client certificate the gateway refuses the handshake.
    let without = yaml.replace("    clientCertFrom", "    #clientCertFrom").replace("    clientKeyFrom", "    #clientKeyFrom");
    let state = TempDir::new("state-nocert");
    let mut refused = Monsoon::start_with(bin(), &without, state.path(), &[], &[("ES_PASSWORD", "changeme")])?;
    let code = refused.wait_exit(CONVERGE)?;
    assert_eq!(code, Some(1), "{}", tail(&refused.log(), 20));
    Ok(())
}

/// Issue 12, taking over from Monstache: an index whose documents carry external versions far
/// beyond monsoon's (Monstache writes `oplog seconds << 32 | increment`) would make every
/// monsoon write to them lose as stale, freezing them silently. monsoon refuses to start on it,
/// naming the index and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_versioned_by_another_tool_is_refused_at_start() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    client.database("shop").collection::<Document>("orders").insert_one(doc! {"_id": 1, "n": 1}).await?;
    // As Monstache would have written it in late 2026.
    let monstache_version = (1_796_000_000u64 << 32) | 7;
    let r = esc
        .index(elasticsearch::IndexParts::IndexId("shop.orders", "1"))
        .version(monstache_version as i64)
        .version_type(elasticsearch::params::VersionType::External)
        .refresh(elasticsearch::params::Refresh::True)
        .body(json!({"n": 1}))
        .send()
        .await?;
    assert!(r.status_code().is_success(), "{:?}", r.text().await);
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    assert_eq!(monsoon.wait_exit(CONVERGE)?, Some(1), "{}", tail(&monsoon.log(), 20));
    let log = monsoon.log();
    let error = log.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(error.contains("index `shop.orders` holds documents versioned") && error.contains("spec.indexes"), "{log}");
    // Its own documents do not trip it: a pipeline into a fresh index syncs, restarts, syncs.
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "  indexes:\n    shop.orders: orders-v2\n");
    let state = TempDir::new("state2");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "shop", "orders", "orders-v2", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    monsoon.terminate()?;
    monsoon.restart()?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    Ok(())
}
