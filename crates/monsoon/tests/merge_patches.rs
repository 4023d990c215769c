//! Merge patches (`spec.mergePatches`, Monstache's `enable-patches`) end to end: every
//! document of a patched namespace carries its history (`json-merge-patches`), and applying
//! its patches in order to `{}` rebuilds each version MongoDB had, each exactly once, across
//! quick updates, replays and SIGKILL.
//!
//! Each change is made with `findOneAndUpdate`/`findOneAndReplace` returning the document
//! after it, so the test knows every version exactly (MongoDB's `updateLookup` would not: with
//! three quick updates it returns the last version for all three, which is how Monstache's
//! histories miss versions).
//!
//! The main case runs against noida-db and a real OpenSearch node (`SearchServer`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elasticsearch::Elasticsearch;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ReturnDocument;
use monsoon_testkit::*;
use serde_json::{json, Map, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const WAIT: Duration = Duration::from_secs(90);
const ATTR: &str = "json-merge-patches";
const INDEX: &str = "shop.orders";
const LOG: &str = "log.shop.orders.*";

/// RFC 7396, written again here independently of the engine's copy.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(members) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(t) = target {
                for (k, v) in members {
                    if v.is_null() {
                        t.remove(k);
                    } else {
                        merge(t.entry(k.clone()).or_insert(Value::Null), v);
                    }
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Every version a document's history rebuilds from `{}`, and its entries' `(v, ts)`.
fn rebuilt(source: &Value) -> (Vec<Value>, Vec<(u64, u64)>) {
    let mut doc = json!({});
    let mut versions = Vec::new();
    let mut numbers = Vec::new();
    for e in source[ATTR].as_array().cloned().unwrap_or_default() {
        let patch: Value = serde_json::from_str(e["p"].as_str().unwrap_or("null")).unwrap_or(Value::Null);
        merge(&mut doc, &patch);
        versions.push(doc.clone());
        numbers.push((e["v"].as_u64().unwrap_or(0), e["ts"].as_u64().unwrap_or(0)));
    }
    (versions, numbers)
}

/// The versions each document of the current history had, as the test made them.
#[derive(Default, Clone)]
struct Expected(BTreeMap<String, Vec<Value>>);

impl Expected {
    fn version(&mut self, id: &str, doc: &Document) {
        self.0.entry(id.to_string()).or_default().push(expected_source(doc));
    }

    fn deleted(&mut self, id: &str) {
        self.0.insert(id.to_string(), Vec::new());
    }

    fn total(&self) -> usize {
        self.0.values().map(Vec::len).sum()
    }
}

/// The indexed documents (refreshed first), by `_id`.
async fn indexed(es: &Elasticsearch) -> anyhow::Result<BTreeMap<String, Value>> {
    Ok(hits(es, INDEX).await?.into_iter().map(|h| (h["_id"].as_str().unwrap_or("").to_string(), h["_source"].clone())).collect())
}

/// What differs between the histories in the index and `expected`; empty when they agree:
/// every version once, in order, numbered from 1, and the document itself the last version.
fn differences(got: &BTreeMap<String, Value>, expected: &Expected) -> Vec<String> {
    let mut out = Vec::new();
    for (id, want) in &expected.0 {
        match (got.get(id), want.last()) {
            (None, None) => {}
            (None, Some(_)) => out.push(format!("{id}: not indexed, want {} versions", want.len())),
            (Some(_), None) => out.push(format!("{id}: indexed, but deleted in MongoDB")),
            (Some(source), Some(last)) => {
                let (versions, numbers) = rebuilt(source);
                if &versions != want {
                    out.push(format!("{id}: history rebuilds {versions:?}, want {want:?}"));
                }
                let vs: Vec<u64> = numbers.iter().map(|(v, _)| *v).collect();
                if vs != (1..=want.len() as u64).collect::<Vec<_>>() {
                    out.push(format!("{id}: versions numbered {vs:?}"));
                }
                let mut fields = source.clone();
                fields.as_object_mut().map(|m| m.remove(ATTR));
                if &fields != last {
                    out.push(format!("{id}: document {fields} is not its last version {last}"));
                }
            }
        }
    }
    for id in got.keys().filter(|id| !expected.0.contains_key(*id)) {
        out.push(format!("{id}: indexed, never written"));
    }
    out
}

/// The time machine's entries (refreshed first), by `_id`.
async fn entries(es: &Elasticsearch) -> anyhow::Result<BTreeMap<String, Value>> {
    Ok(hits(es, LOG).await?.into_iter().map(|h| (h["_id"].as_str().unwrap_or("").to_string(), h["_source"].clone())).collect())
}

/// Each version of the histories in `got` made by a change the time machine logs (all but the
/// first `unlogged` of `ids`, read by the snapshot) has its entry, `<id>@<ts>.<i>`, holding
/// that version; what differs.
fn entries_differ(got: &BTreeMap<String, Value>, log: &BTreeMap<String, Value>, unlogged: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (id, source) in got {
        let (versions, _) = rebuilt(source);
        for (k, (e, version)) in source[ATTR].as_array().cloned().unwrap_or_default().iter().zip(versions).enumerate() {
            if k == 0 && unlogged.contains(&id.as_str()) {
                continue;
            }
            let entry_id = format!("{id}@{}.{}", e["ts"], e["i"]);
            match log.get(&entry_id) {
                None => out.push(format!("{entry_id}: no entry")),
                Some(entry) => {
                    let mut held = entry.clone();
                    for f in ["_source_id", "oplog_ts", "oplog_date"] {
                        held.as_object_mut().map(|m| m.remove(f));
                    }
                    if held != version {
                        out.push(format!("{entry_id}: entry holds {held}, the change made {version}"));
                    }
                }
            }
        }
    }
    out
}

/// Wait until every history is as expected; fail with what differs.
async fn wait_histories(es: &Elasticsearch, expected: &Expected, log: impl Fn() -> String) -> anyhow::Result<BTreeMap<String, Value>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = indexed(es).await?;
        let diff = differences(&got, expected);
        if diff.is_empty() {
            return Ok(got);
        }
        anyhow::ensure!(Instant::now() < deadline, "histories differ:\n{}\n{}", diff.join("\n"), tail(&log(), 40));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn update(orders: &mongodb::Collection<Document>, id: &Bson, change: Document) -> anyhow::Result<Document> {
    orders
        .find_one_and_update(doc! {"_id": id.clone()}, change)
        .return_document(ReturnDocument::After)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{id} is gone"))
}

/// The updates each document goes through, quickly one after the other: fields set, nested
/// and array-index paths, increments, unsets, pushes and pops.
fn updates(n: i32) -> Vec<Document> {
    vec![
        doc! {"$set": {"name": format!("doc {n}"), "a.b": n, "tags.1": "second"}, "$inc": {"count": 1}},
        doc! {"$push": {"tags": "more"}, "$unset": {"gone": ""}, "$set": {"nested.deep.x": n * 2}},
        doc! {"$pop": {"tags": 1}, "$inc": {"count": 5}, "$set": {"items.3": n}},
    ]
}

async fn histories_hold_every_version_once(kind: SearchKind) -> anyhow::Result<()> {
    let search = SearchServer::start(kind)?;
    let mongo = Mongo::start(&[])?;
    let client = mongo.client().await?;
    let esc = search.client()?;
    let orders = client.database("shop").collection::<Document>("orders");
    let users = client.database("shop").collection::<Document>("users");
    let mut expected = Expected::default();
    // Read by the snapshot: version 1 is the document read.
    for n in 0..3 {
        let d = doc! {"_id": format!("seed-{n}"), "n": n, "tags": ["a", "b"], "gone": 1};
        orders.insert_one(d.clone()).await?;
        expected.version(&format!("seed-{n}"), &d);
    }
    users.insert_one(doc! {"_id": 1, "n": 0}).await?;

    let state = TempDir::new("state");
    // The time machine logs the same namespace: each entry must hold its change's version.
    let spec = "  snapshot: true\n  mergePatches:\n    namespaces: [shop.orders]\n  timeMachine:\n    namespaces: [shop.orders]\n  batch:\n    flushIntervalMs: 20\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &search.url(), &["shop.orders", "shop.users"], spec);
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    wait_histories(&esc, &expected, || monsoon.log()).await?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    // A checkpoint before every change below: restored later, it replays them all.
    let checkpoint = state.path().join("shop.checkpoint.json");
    let deadline = Instant::now() + WAIT;
    while monsoon.checkpoint("shop").is_none_or(|c| c["snapshot"]["done"] != true) {
        anyhow::ensure!(Instant::now() < deadline, "no checkpoint after the snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before_changes = std::fs::read(&checkpoint)?;

    // Twelve documents: inserted, then three quick updates each, nothing waited for.
    for n in 0..12 {
        let id = Bson::String(format!("doc-{n}"));
        let d = doc! {"_id": id.clone(), "n": n, "tags": ["x", "y", "z"], "gone": 1, "items": [0]};
        orders.insert_one(d.clone()).await?;
        expected.version(&format!("doc-{n}"), &d);
        for u in updates(n) {
            let after = update(&orders, &id, u).await?;
            expected.version(&format!("doc-{n}"), &after);
        }
    }
    // The seeded ones: updated, replaced, one deleted and inserted again (a new history).
    for n in 0..3 {
        let id = Bson::String(format!("seed-{n}"));
        let after = update(&orders, &id, doc! {"$set": {"n": 10 + n}, "$unset": {"gone": ""}}).await?;
        expected.version(&format!("seed-{n}"), &after);
        let after = orders
            .find_one_and_replace(doc! {"_id": id.clone()}, doc! {"replaced": true, "n": n})
            .return_document(ReturnDocument::After)
            .await?
            .expect("replaced");
        expected.version(&format!("seed-{n}"), &after);
    }
    orders.delete_one(doc! {"_id": "seed-0"}).await?;
    expected.deleted("seed-0");
    orders.insert_one(doc! {"_id": "seed-0", "again": true}).await?;
    expected.version("seed-0", &doc! {"again": true});
    users.update_one(doc! {"_id": 1}, doc! {"$set": {"n": 1}}).await?;

    let got = wait_histories(&esc, &expected, || monsoon.log()).await?;
    // seed-1 and seed-2: read, updated, replaced; seed-0 inserted again; 12 × insert and 3 updates.
    assert_eq!(expected.total(), 2 * 3 + 1 + 12 * 4);
    // Entries carry the change's time: in order, and `ts` within the test's run.
    for (id, source) in &got {
        let (_, numbers) = rebuilt(source);
        assert!(numbers.windows(2).all(|w| w[0].1 <= w[1].1), "{id}: {numbers:?}");
        let i = source[ATTR][0]["i"].as_u64();
        assert!(i.is_some(), "{id}: entries carry the cluster time's increment: {source}");
    }
    // Every change but the delete has its entry in the time machine's log, with its version.
    // seed-0's first history was deleted: its entries stay in the log (4 of the 56).
    let deadline = Instant::now() + WAIT;
    loop {
        let log = entries(&esc).await?;
        let diff = entries_differ(&got, &log, &["seed-1", "seed-2"]);
        if diff.is_empty() && log.len() == 12 * 4 + 3 * 2 + 1 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the log holds {} entries:\n{}\n{}", log.len(), diff.join("\n"), tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Namespaces without patches are indexed as they are.
    let report = wait_converged(&client, &esc, "shop", "users", "shop.users", WAIT).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));

    // Replay every change: SIGKILL, then the checkpoint from before them. Each is found in its
    // history and adds nothing; a change after the replay adds its version.
    monsoon.kill();
    std::fs::write(&checkpoint, &before_changes)?;
    monsoon.restart()?;
    let after = update(&orders, &Bson::String("doc-0".into()), doc! {"$set": {"after": "replay"}}).await?;
    expected.version("doc-0", &after);
    wait_histories(&esc, &expected, || monsoon.log()).await?;
    // Writes of the replay may still be in flight: look again later.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got = indexed(&esc).await?;
    let diff = differences(&got, &expected);
    assert!(diff.is_empty(), "the replay changed histories:\n{}", diff.join("\n"));
    let log = entries(&esc).await?;
    let diff = entries_differ(&got, &log, &["seed-1", "seed-2"]);
    assert!(diff.is_empty() && log.len() == 12 * 4 + 3 * 2 + 2, "the replay changed the log ({} entries):\n{}", log.len(), diff.join("\n"));
    let stats = monsoon.stats().expect("stats");
    assert!(stats["stale"].as_u64() >= Some(50), "nothing was replayed: {stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_history_rebuilds_every_version_once() -> anyhow::Result<()> {
    histories_hold_every_version_once(SearchKind::Noida).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_history_rebuilds_every_version_once_on_opensearch() -> anyhow::Result<()> {
    histories_hold_every_version_once(SearchKind::OpenSearch).await
}

/// SIGKILL twice while an application updates twelve documents as fast as it can: each
/// history holds every version once, none lost, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_updating_keeps_every_version_once() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let orders = client.database("shop").collection::<Document>("orders");
    let state = TempDir::new("state");
    let spec = "  snapshot: false\n  mergePatches:\n    namespaces: [shop.*]\n  batch:\n    maxDocs: 50\n    flushIntervalMs: 20\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], spec);
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;

    let stop = Arc::new(AtomicBool::new(false));
    let expected = Arc::new(Mutex::new(Expected::default()));
    let writer = {
        let (orders, stop, expected) = (orders.clone(), stop.clone(), expected.clone());
        tokio::spawn(async move {
            for n in 0..12 {
                let d = doc! {"_id": n, "n": 0, "tags": ["x", "y", "z"], "gone": 1, "items": [0]};
                orders.insert_one(d.clone()).await?;
                expected.lock().expect("lock").version(&n.to_string(), &d);
            }
            let mut round = 0;
            while !stop.load(Ordering::Relaxed) {
                for n in 0..12 {
                    let u = &updates(n)[round % 3];
                    let after = update(&orders, &Bson::Int32(n), u.clone()).await?;
                    expected.lock().expect("lock").version(&n.to_string(), &after);
                }
                round += 1;
                // Paced so the writer runs through both kills (about 250 changes/s).
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            anyhow::Ok(round)
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
    let rounds = writer.await??;
    assert!(rounds >= 20, "the writer made only {rounds} rounds");
    let expected = expected.lock().expect("lock").clone();
    wait_histories(&esc, &expected, || monsoon.log()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let diff = differences(&indexed(&esc).await?, &expected);
    assert!(diff.is_empty(), "histories changed after they were complete:\n{}", diff.join("\n"));
    let stats = monsoon.stats().expect("stats");
    assert!(stats["stale"].as_u64() > Some(0), "the restarts replayed nothing, so the test proves nothing: {stats}");
    eprintln!("{} versions in 12 histories over {rounds} rounds; {stats}", expected.total());
    Ok(())
}

/// A measurement, not a check: 1,000 documents inserted and updated three times (4,000
/// changes), from the first write until the index holds the last version of each, with and
/// without merge patches. `cargo test --test merge_patches -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn patched_changes_per_second() -> anyhow::Result<()> {
    for patched in [false, true] {
        let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
        let orders = client.database("shop").collection::<Document>("orders");
        let state = TempDir::new("state");
        let patches = if patched { "  mergePatches:\n    namespaces: [shop.orders]\n" } else { "" };
        let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], &format!("  snapshot: false\n{patches}"));
        let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
        monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
        let started = Instant::now();
        insert_all(&orders, (0..1000).map(|n| doc! {"_id": n, "n": 0, "text": "x".repeat(200)}).collect()).await?;
        for _ in 0..3 {
            orders.update_many(doc! {}, doc! {"$inc": {"n": 1}}).await?;
        }
        let written = started.elapsed();
        let deadline = Instant::now() + WAIT;
        loop {
            let got = indexed(&esc).await?;
            let done = got.len() == 1000 && got.values().all(|s| s["n"] == 3 && (!patched || s[ATTR].as_array().map(Vec::len) == Some(4)));
            if done {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "not done\n{}", tail(&monsoon.log(), 20));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = started.elapsed();
        eprintln!("patched={patched}: 4000 changes written in {:.2}s, indexed after {:.2}s: {:.0} changes/s", written.as_secs_f64(), took.as_secs_f64(), 4000.0 / took.as_secs_f64());
    }
    Ok(())
}
