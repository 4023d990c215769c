//! Time machines (`spec.timeMachine`, Monstache's `time-machine-namespaces`) end to end:
//! every insert, update and replace of a logged namespace is also an entry in a dated log
//! index, exactly once, across replays and SIGKILL, and no drop deletes the log.
//!
//! The main case runs against noida-db and a real OpenSearch node (`SearchServer`): noida-db
//! ignores routing and returns no `_routing`, so routing by the MongoDB `_id` is checked on
//! OpenSearch, where a log index is created with four shards first.
//!
//! Updates log the document MongoDB's `updateLookup` returns, as Monstache does: each step
//! below waits for the previous entry, so every entry holds its own version. A replay looks the
//! document up again and may see a later version; an entry is created once (`create`, 409 on a
//! replay), so the first, right one stays. That is what `replayed_entries_keep_their_first_version`
//! checks: with `index` and external versions instead, the replay overwrote update 1's entry
//! with update 2's document.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use elasticsearch::Elasticsearch;
use mongodb::bson::{doc, oid::ObjectId, Document};
use monsoon_testkit::*;
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const WAIT: Duration = Duration::from_secs(90);
const LOG: &str = "log.shop.orders.*";

/// `yyyy-MM-dd` of a Unix time (UTC), as the default `indexSuffix` writes it.
fn day_of(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    // Howard Hinnant's civil_from_days, independently of the engine's copy.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The log's entries (refreshed first), keyed by `_id`.
async fn entries(es: &Elasticsearch, pattern: &str) -> anyhow::Result<BTreeMap<String, Value>> {
    Ok(hits(es, pattern).await?.into_iter().map(|h| (h["_id"].as_str().unwrap_or("").to_string(), h)).collect())
}

/// Wait until the log holds `n` entries; fail naming what it holds.
async fn wait_entries(es: &Elasticsearch, n: usize, log: impl Fn() -> String) -> anyhow::Result<BTreeMap<String, Value>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = entries(es, LOG).await?;
        if got.len() == n {
            return Ok(got);
        }
        anyhow::ensure!(got.len() < n && Instant::now() < deadline, "log holds {} entries, want {n}: {got:#?}\n{}", got.len(), tail(&log(), 40));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `n` of the entries of one MongoDB document, in change order.
fn versions_of(entries: &BTreeMap<String, Value>, source_id: &str) -> Vec<i64> {
    let mut of: Vec<&Value> = entries.values().filter(|h| h["_source"]["_source_id"] == source_id).collect();
    of.sort_by_key(|h| (h["_source"]["oplog_ts"]["T"].as_u64(), h["_source"]["oplog_ts"]["I"].as_u64()));
    of.iter().map(|h| h["_source"]["n"].as_i64().unwrap_or(-1)).collect()
}

async fn index_exists(es: &Elasticsearch, index: &str) -> anyhow::Result<bool> {
    let r = es.indices().exists(elasticsearch::indices::IndicesExistsParts::Index(&[index])).send().await?;
    Ok(r.status_code().as_u16() != 404)
}

async fn replayed_entries_keep_their_first_version(kind: SearchKind) -> anyhow::Result<()> {
    let search = SearchServer::start(kind)?;
    let mongo = Mongo::start(&[])?;
    let client = mongo.client().await?;
    let esc = search.client()?;
    let orders = client.database("shop").collection::<Document>("orders");
    let users = client.database("shop").collection::<Document>("users");
    orders.insert_one(doc! {"_id": 1, "n": 0}).await?;
    users.insert_one(doc! {"_id": 1, "n": 0}).await?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    if kind == SearchKind::OpenSearch {
        // Today's log index with several shards, so routing decides where an entry lives.
        let index = format!("log.shop.orders.{}", day_of(now));
        let r = esc
            .indices()
            .create(elasticsearch::indices::IndicesCreateParts::Index(&index))
            .body(json!({"settings": {"number_of_shards": 4, "number_of_replicas": 0}}))
            .send()
            .await?;
        anyhow::ensure!(r.status_code().is_success(), "creating {index}: {}", r.text().await?);
    }

    let state = TempDir::new("state");
    let spec = "  snapshot: true\n  timeMachine:\n    namespaces: [shop.orders]\n    snapshot: true\n  batch:\n    flushIntervalMs: 20\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &search.url(), &["shop.orders", "shop.users"], spec);
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let log = |m: &Monsoon| m.log();

    // The snapshot is logged (`snapshot: true`) for the logged namespace only.
    let first = wait_entries(&esc, 1, || log(&monsoon)).await?;
    assert_eq!(versions_of(&first, "1"), [0], "{first:#?}");
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    // A checkpoint before every change below: restored later, it replays them all.
    let checkpoint = state.path().join("shop.checkpoint.json");
    let deadline = Instant::now() + WAIT;
    while monsoon.checkpoint("shop").is_none_or(|c| c["snapshot"]["done"] != true) {
        anyhow::ensure!(Instant::now() < deadline, "no checkpoint after the snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_changes = std::fs::read(&checkpoint)?;

    // Two documents: inserted, updated twice (`$set`, then a replace), one of them deleted.
    // Each step waits for the previous one's entry, so its lookup saw its own version.
    let (a, b) = (ObjectId::new(), ObjectId::new());
    let mut expected = 1;
    for (id, deleted) in [(a, true), (b, false)] {
        orders.insert_one(doc! {"_id": id, "n": 1}).await?;
        expected += 1;
        wait_entries(&esc, expected, || log(&monsoon)).await?;
        orders.update_one(doc! {"_id": id}, doc! {"$set": {"n": 2}}).await?;
        expected += 1;
        wait_entries(&esc, expected, || log(&monsoon)).await?;
        orders.replace_one(doc! {"_id": id}, doc! {"n": 3, "replaced": true}).await?;
        expected += 1;
        wait_entries(&esc, expected, || log(&monsoon)).await?;
        if deleted {
            orders.delete_one(doc! {"_id": id}).await?;
        }
    }
    users.update_one(doc! {"_id": 1}, doc! {"$set": {"n": 1}}).await?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", WAIT).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    let report = wait_converged(&client, &esc, "shop", "users", "shop.users", WAIT).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));

    // Each version exactly once, nothing for the delete, nothing for the other namespace.
    let logged = wait_entries(&esc, 7, || log(&monsoon)).await?;
    for id in [a, b] {
        assert_eq!(versions_of(&logged, &id.to_hex()), [1, 2, 3], "{logged:#?}");
    }
    assert!(entries(&esc, "log.shop.users.*").await?.is_empty(), "an unlogged namespace was logged");
    for (id, hit) in &logged {
        let source = &hit["_source"];
        let source_id = source["_source_id"].as_str().expect("_source_id");
        let (t, i) = (source["oplog_ts"]["T"].as_i64().expect("T"), source["oplog_ts"]["I"].as_i64().expect("I"));
        assert_eq!(id, &format!("{source_id}@{t}.{i}"), "{hit}");
        assert_eq!(hit["_index"], format!("log.shop.orders.{}", day_of(t)), "{hit}");
        let date = source["oplog_date"].as_str().expect("oplog_date");
        assert_eq!(date.replace('/', "-")[..10], day_of(t), "{hit}");
        assert!(source.get("_id").is_none(), "{hit}");
        if kind == SearchKind::OpenSearch {
            assert_eq!(hit["_routing"], source_id, "routed by the MongoDB _id: {hit}");
        }
    }
    let replaced = logged.values().find(|h| h["_source"]["_source_id"] == b.to_hex() && h["_source"]["n"] == 3).expect("b's replace");
    assert_eq!(replaced["_source"]["replaced"], true, "{replaced}");

    // Replay every change: SIGKILL, then the checkpoint from before them. `b`'s two updates are
    // looked up again and both find its last version; their entries must keep their own.
    monsoon.kill();
    std::fs::write(&checkpoint, &before_changes)?;
    monsoon.restart()?;
    orders.insert_one(doc! {"_id": "after-replay", "n": 9}).await?;
    wait_entries(&esc, 8, || log(&monsoon)).await?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", WAIT).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    // Writes of the replay may still be in flight in another bulk request: look again later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replayed = entries(&esc, LOG).await?;
    assert_eq!(replayed.len(), 8, "the replay duplicated entries: {replayed:#?}");
    for id in [a, b] {
        assert_eq!(versions_of(&replayed, &id.to_hex()), [1, 2, 3], "an entry changed in the replay: {replayed:#?}");
    }
    let stats = monsoon.stats().expect("stats");
    assert!(stats["stale"].as_u64() >= Some(3), "nothing was replayed: {stats}");

    // A drop deletes the collection's index, never its log.
    orders.drop().await?;
    let deadline = Instant::now() + WAIT;
    while index_exists(&esc, "shop.orders").await? {
        anyhow::ensure!(Instant::now() < deadline, "the drop left the index\n{}", tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(entries(&esc, LOG).await?.len(), 8, "the drop deleted log entries");
    assert!(index_exists(&esc, "shop.users").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_is_logged_once_and_drops_keep_the_log() -> anyhow::Result<()> {
    replayed_entries_keep_their_first_version(SearchKind::Noida).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_version_is_logged_once_and_drops_keep_the_log_on_opensearch() -> anyhow::Result<()> {
    replayed_entries_keep_their_first_version(SearchKind::OpenSearch).await
}

/// SIGKILL twice while an application inserts and updates: each change is one entry, none
/// lost, none twice (Monstache's entries take random ids, so its replays add entries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_changing_logs_each_change_exactly_once() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let orders = client.database("shop").collection::<Document>("orders");
    let state = TempDir::new("state");
    let spec = "  snapshot: false\n  timeMachine:\n    namespaces: [shop.*]\n  batch:\n    maxDocs: 50\n    flushIntervalMs: 20\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], spec);
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer_done_early = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (orders, stop, changes, done_early) = (orders.clone(), stop.clone(), changes.clone(), writer_done_early.clone());
        tokio::spawn(async move {
            let mut i: i64 = 0;
            // At most 1399 changes: `hits` reads up to 2000.
            while !stop.load(Ordering::Relaxed) && i < 700 {
                orders.insert_one(doc! {"_id": i, "n": 0}).await?;
                changes.fetch_add(1, Ordering::Relaxed);
                if i > 0 {
                    orders.update_one(doc! {"_id": i - 1}, doc! {"$inc": {"n": 1}}).await?;
                    changes.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                // Paced so that the writer runs through both kills (about 100 changes/s).
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
            done_early.store(!stop.load(Ordering::Relaxed), Ordering::Relaxed);
            anyhow::Ok(())
        })
    };
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        monsoon.kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        monsoon.restart()?;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await??;
    let changes = changes.load(Ordering::Relaxed) as usize;
    assert!(changes > 100, "the writer made only {changes} changes");
    assert!(!writer_done_early.load(Ordering::Relaxed), "the writer stopped before the kills");
    assert!(changes < 2000);
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", WAIT).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    let logged = wait_entries(&esc, changes, || monsoon.log()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(entries(&esc, LOG).await?.len(), logged.len(), "entries added after the log was complete");
    // Every document has its insert and, but for the last, its update.
    let mut per_doc: BTreeMap<String, usize> = BTreeMap::new();
    for hit in logged.values() {
        *per_doc.entry(hit["_source"]["_source_id"].as_str().unwrap_or("?").to_string()).or_default() += 1;
    }
    let inserted = per_doc.len();
    assert_eq!(per_doc.values().filter(|n| **n == 2).count(), inserted - 1, "{per_doc:?}");
    let stats = monsoon.stats().expect("stats");
    assert!(stats["stale"].as_u64() > Some(0), "the restarts replayed nothing, so the test proves nothing: {stats}");
    Ok(())
}

/// With pre-images on the collection (MongoDB 6.0+), every update logs its own version, even
/// when the stream reads it after later changes: five quick `$inc`s made while monsoon is
/// down are read on restart, when a lookup would find the last version for all five.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_pre_images_each_update_logs_its_own_version() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let db = client.database("shop");
    let orders = with_pre_images(&db, "orders").await?;
    orders.insert_one(doc! {"_id": 1, "n": 0, "tags": ["a", "b", "c"], "gone": true}).await?;
    let state = TempDir::new("state");
    let spec = "  snapshot: true\n  timeMachine:\n    namespaces: [shop.orders]\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], spec);
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    let deadline = Instant::now() + WAIT;
    while monsoon.checkpoint("shop").is_none_or(|c| c["snapshot"]["done"] != true) {
        anyhow::ensure!(Instant::now() < deadline, "no checkpoint after the snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    monsoon.kill();
    for _ in 0..4 {
        orders.update_one(doc! {"_id": 1}, doc! {"$inc": {"n": 1}}).await?;
    }
    // Removed fields and a truncated array too.
    orders.update_one(doc! {"_id": 1}, vec![doc! {"$set": {"n": 5, "tags": {"$slice": ["$tags", 1]}}}, doc! {"$unset": "gone"}]).await?;
    monsoon.restart()?;
    let logged = wait_entries(&esc, 5, || monsoon.log()).await?;
    assert_eq!(versions_of(&logged, "1"), [1, 2, 3, 4, 5], "{logged:#?}\n{}", tail(&monsoon.log(), 20));
    let last = logged.values().find(|h| h["_source"]["n"] == 5).expect("the last version");
    assert_eq!(last["_source"]["tags"], json!(["a"]), "{last}");
    assert!(last["_source"].get("gone").is_none(), "{last}");
    let first = logged.values().find(|h| h["_source"]["n"] == 1).expect("the first update");
    assert_eq!((&first["_source"]["tags"], &first["_source"]["gone"]), (&json!(["a", "b", "c"]), &json!(true)), "{first}");
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", WAIT).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    Ok(())
}
