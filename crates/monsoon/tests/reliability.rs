//! The reliability round: stalls and gaps found by running monsoon and by reading it, each
//! reproduced against the stand-ins with the real binary, then closed.

use std::path::Path;
use std::time::{Duration, Instant};

use elasticsearch::indices::IndicesExistsParts;
use elasticsearch::{Elasticsearch, SearchParts};
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

/// Wait until `log` contains `text`.
fn wait_log(monsoon: &Monsoon, text: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !monsoon.log().contains(text) {
        anyhow::ensure!(Instant::now() < deadline, "no `{text}` in the log within {timeout:?}:\n{}", tail(&monsoon.log(), 30));
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The dead-letter records of `pipeline`'s default dead-letter index.
async fn dead_letters(es: &Elasticsearch) -> anyhow::Result<Vec<Value>> {
    let _ = es.indices().refresh(elasticsearch::indices::IndicesRefreshParts::Index(&["monsoon-deadletter"])).send().await;
    let r = es
        .search(SearchParts::Index(&["monsoon-deadletter"]))
        .body(json!({"size": 100, "query": {"match_all": {}}}))
        .send()
        .await?;
    let body: Value = r.json().await?;
    Ok(body["hits"]["hits"].as_array().cloned().unwrap_or_default().into_iter().map(|h| h["_source"].clone()).collect())
}

/// Issue 10, item 1. Seen on the old code: behind a proxy that refuses bodies over 1 MiB with
/// 413, a 3 MiB document's dead-letter record (embedding the whole document) was refused too
/// and retried forever: none of the 300 later documents arrived.
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

/// Issue 10, item 3. Seen on the old code: with Elasticsearch down, a dropped collection's
/// index delete was backing off when SIGTERM came; the token after the drop was checkpointed
/// and the index stayed for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_cut_short_by_sigterm_is_applied_after_restart() -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let mut es = Elastic::start()?;
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
    wait_log(&monsoon, "failed to delete index of dropped collection", CONVERGE)?;
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0), "{}", tail(&monsoon.log(), 20));
    es.restart()?;
    let esc = es.client()?;
    assert!(index_exists(&esc, "shop.orders").await?, "the index must still exist before the restart");
    monsoon.restart()?;
    let deadline = Instant::now() + CONVERGE;
    while index_exists(&esc, "shop.orders").await? {
        anyhow::ensure!(Instant::now() < deadline, "the dropped collection's index is still there:\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Issue 10, item 6: SIGTERM while the collection renamed into the pipeline is being read;
/// the restart must read the rest of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_during_a_renamed_in_snapshot_reads_the_rest_after_restart() -> anyhow::Result<()> {
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
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0), "{}", tail(&monsoon.log(), 20));
    let indexed = count(&esc, "shop.orders").await.unwrap_or(0);
    assert!(indexed < 60_000, "the snapshot finished before SIGTERM ({indexed} indexed): the test proves nothing");
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    Ok(())
}

/// Issue 10, item 2. Seen on the old code: `monsoon run` failed with "mongodb+srv connection
/// strings cannot be used when the 'dns-resolver' feature is disabled". Here the SRV and TXT
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

/// Issue 10, item 4. Seen on the old code: with `shop.*` and `onHistoryLost: Resnapshot`, a
/// collection dropped while monsoon was stopped (its drop event lost with the history) kept
/// all its documents searchable: only exactly named namespaces were swept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collection_dropped_during_lost_history_under_a_pattern_is_dropped_too() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&["--oplog-max-entries", "1000"]).await?;
    let db = client.database("shop");
    let a = db.collection::<Document>("a");
    let b = db.collection::<Document>("b");
    insert_all(&a, sample_docs(0, 100)).await?;
    insert_all(&b, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.*"], "  onHistoryLost: Resnapshot\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    for coll in ["a", "b"] {
        let r = wait_converged(&client, &esc, "shop", coll, &format!("shop.{coll}"), CONVERGE).await?;
        assert!(r.converged(), "{r:?}");
    }
    // Both namespaces are on record before the stop.
    let deadline = Instant::now() + Duration::from_secs(15);
    while monsoon.checkpoint("shop").and_then(|c| c.get("written").and_then(|w| w.get("shop.b")).cloned()).is_none() {
        anyhow::ensure!(Instant::now() < deadline, "shop.b never recorded as written: {:?}", monsoon.checkpoint("shop"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0));
    b.drop().await?;
    a.delete_many(doc! {"_id": {"$lt": 10}}).await?;
    insert_all(&a, sample_docs(1000, 3000)).await?;
    client.database("admin").run_command(doc! {"secantusAdmin.pruneOplog": 1}).await?;
    monsoon.restart()?;
    let r = wait_converged(&client, &esc, "shop", "a", "shop.a", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    let deadline = Instant::now() + CONVERGE;
    while index_exists(&esc, "shop.b").await? {
        anyhow::ensure!(
            Instant::now() < deadline,
            "shop.b was dropped during the lost history but its index is still there ({} documents):\n{}",
            count(&esc, "shop.b").await.unwrap_or(0),
            tail(&monsoon.log(), 30)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(monsoon.log().contains("history lost"));
    Ok(())
}
