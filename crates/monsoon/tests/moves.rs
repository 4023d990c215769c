//! Documents whose Elasticsearch `_id` comes from one of their fields (`mappings[].id`) move
//! when that field changes, and another document may take the place one just left: an
//! application swapping keys. Nothing live may be removed and no copy may be left that no
//! location record names, whatever the interleaving of moves, concurrent bulk requests and
//! replays after SIGKILL. Each case runs against noida-db and a real OpenSearch node through
//! one test stack (`SearchServer`).
//!
//! Before location deletes were versioned with the version of the copy they remove, the
//! swaps below lost 100+ of 400 documents on both servers: a document leaving key `k` deleted
//! `k` unversioned, after (in a later bulk request, or later in the same one once its moves
//! were coalesced) the write of the document that had just taken `k`.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use elasticsearch::Elasticsearch;
use mongodb::bson::{doc, Document};
use monsoon_testkit::futures_util_shim::TryStreamExt;
use monsoon_testkit::*;



fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const WAIT: Duration = Duration::from_secs(90);
const DOCS: i32 = 400;

/// One indexed copy: `_id`, and the source's `sku` and `n`.
type Copy = (String, String, i64);

/// Every copy in `index` (refreshed first).
async fn copies(es: &Elasticsearch, index: &str) -> anyhow::Result<BTreeSet<Copy>> {
    Ok(hits(es, index)
        .await?
        .iter()
        .map(|h| {
            let source = &h["_source"];
            let fields = source.as_object().map_or(0, |o| o.len());
            // Anything but exactly {sku, n} shows as a copy no document matches.
            let sku = if fields == 2 { source["sku"].as_str().unwrap_or("?").to_string() } else { source.to_string() };
            (h["_id"].as_str().unwrap_or("").to_string(), sku, source["n"].as_i64().unwrap_or(-1))
        })
        .collect())
}

/// What the index must hold: each document at its current `sku`, without `_id`.
async fn wanted(items: &mongodb::Collection<Document>) -> anyhow::Result<BTreeSet<Copy>> {
    let docs: Vec<Document> = items.find(doc! {}).await?.try_collect().await?;
    Ok(docs
        .iter()
        .map(|d| {
            let sku = d.get_str("sku").unwrap_or("").to_string();
            let n = d.get_i32("n").map_or(-1, i64::from);
            (sku.clone(), sku, n)
        })
        .collect())
}

/// Wait until `index` holds exactly what `items` says; on failure, name what is missing and
/// what is extra.
async fn wait_exact(es: &Elasticsearch, index: &str, items: &mongodb::Collection<Document>, log: impl Fn() -> String) -> anyhow::Result<()> {
    let want = wanted(items).await?;
    anyhow::ensure!(want.len() == DOCS as usize, "MongoDB holds {} documents", want.len());
    let deadline = Instant::now() + WAIT;
    loop {
        let got = copies(es, index).await?;
        if got == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = want.difference(&got).take(10).collect();
            let extra: Vec<_> = got.difference(&want).take(10).collect();
            anyhow::bail!(
                "{index} never matched MongoDB: {} missing, {} extra\nmissing (first 10): {missing:?}\nextra (first 10): {extra:?}\n{}",
                want.difference(&got).count(),
                got.difference(&want).count(),
                tail(&log(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Swap the `sku`s of neighbours (through a temporary key, so no two documents ever share
/// one), pairing `(2k + shift, 2k + 1 + shift)`.
async fn swap_pairs(items: &mongodb::Collection<Document>, shift: i32) -> anyhow::Result<()> {
    let mut a = shift;
    while a + 1 < DOCS {
        let b = a + 1;
        let sku = |i: i32| async move {
            let d = items.find_one(doc! {"_id": i}).await?.ok_or_else(|| anyhow::anyhow!("no document {i}"))?;
            anyhow::Ok(d.get_str("sku")?.to_string())
        };
        let (sa, sb) = (sku(a).await?, sku(b).await?);
        items.update_one(doc! {"_id": a}, doc! {"$set": {"sku": format!("tmp-{a}")}}).await?;
        items.update_one(doc! {"_id": b}, doc! {"$set": {"sku": &sa}}).await?;
        items.update_one(doc! {"_id": a}, doc! {"$set": {"sku": &sb}}).await?;
        a += 2;
    }
    Ok(())
}

fn pipeline(mongo: &Mongo, search: &SearchServer, name: &str) -> String {
    let extra = "  mappings:\n    - namespace: shop.items\n      id: sku\n  batch:\n    maxDocs: 50\n    flushIntervalMs: 5\n";
    pipeline_yaml(name, &mongo.uri(), &search.url(), &["shop.items"], extra)
}

async fn applications_swapping_keys_lose_no_document(kind: SearchKind, kills: bool) -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let search = SearchServer::start(kind)?;
    let client = mongo.client().await?;
    let es = search.client()?;
    let items = client.database("shop").collection::<Document>("items");
    insert_all(&items, (0..DOCS).map(|i| doc! {"_id": i, "sku": format!("s{i:03}"), "n": i}).collect()).await?;
    let state = TempDir::new("state");
    let mut monsoon = Monsoon::start(bin(), &pipeline(&mongo, &search, "swaps"), state.path())?;
    wait_exact(&es, "shop.items", &items, || monsoon.log()).await?;
    for round in 0..4 {
        swap_pairs(&items, round % 2).await?;
        if kills && round % 2 == 0 {
            monsoon.kill();
            monsoon.restart()?;
        }
    }
    wait_exact(&es, "shop.items", &items, || monsoon.log()).await?;
    let letters = dead_letters(&es).await.unwrap_or_default();
    anyhow::ensure!(letters.is_empty(), "nothing should be dead-lettered: {letters:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_keys_lose_no_document_on_noida() -> anyhow::Result<()> {
    applications_swapping_keys_lose_no_document(SearchKind::Noida, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_keys_lose_no_document_on_opensearch() -> anyhow::Result<()> {
    applications_swapping_keys_lose_no_document(SearchKind::OpenSearch, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_keys_survive_sigkill_on_noida() -> anyhow::Result<()> {
    applications_swapping_keys_lose_no_document(SearchKind::Noida, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_keys_survive_sigkill_on_opensearch() -> anyhow::Result<()> {
    applications_swapping_keys_lose_no_document(SearchKind::OpenSearch, true).await
}

/// Heavy insert/delete traffic leaves the locations index holding live documents only: a
/// deleted document's record goes with it (before, each stayed as a tombstone forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_documents_leave_no_location_records() -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let search = SearchServer::start(SearchKind::Noida)?;
    let client = mongo.client().await?;
    let es = search.client()?;
    let items = client.database("shop").collection::<Document>("items");
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &pipeline(&mongo, &search, "churn"), state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    for round in 0..3 {
        insert_all(&items, (0..DOCS).map(|i| doc! {"_id": round * 1000 + i, "sku": format!("r{round}-{i}"), "n": i}).collect()).await?;
        items.delete_many(doc! {"_id": {"$gte": round * 1000 + 10, "$lt": round * 1000 + DOCS}}).await?;
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let live = count(&es, "shop.items").await.unwrap_or(0);
        let records = count(&es, "monsoon-locations").await.unwrap_or(0);
        if live == 30 && records == 30 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{live} documents and {records} location records, want 30 of each\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// History lost while stopped, policy Resnapshot, on a namespace with `_id`s from a field: the
/// documents deleted during the gap are swept, and so are their location records (the sweep by
/// records is what a sharded worker relies on, since shards own documents by MongoDB `_id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resnapshot_sweeps_located_documents_deleted_during_lost_history() -> anyhow::Result<()> {
    let mongo = Mongo::start(&["--oplog-max-entries", "1000"])?;
    let search = SearchServer::start(SearchKind::Noida)?;
    let client = mongo.client().await?;
    let es = search.client()?;
    let items = client.database("shop").collection::<Document>("items");
    insert_all(&items, (0..DOCS).map(|i| doc! {"_id": i, "sku": format!("s{i:03}"), "n": i}).collect()).await?;
    let state = TempDir::new("state");
    let yaml = format!("{}  onHistoryLost: Resnapshot\n", pipeline(&mongo, &search, "gap"));
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    wait_exact(&es, "shop.items", &items, || monsoon.log()).await?;
    let (code, _) = monsoon.terminate()?;
    anyhow::ensure!(code == Some(0), "monsoon exited {code:?}");
    // While stopped: deletes whose events will be lost, then enough other writes to roll the
    // oplog past the resume point.
    items.delete_many(doc! {"_id": {"$lt": 50}}).await?;
    let other = client.database("shop").collection::<Document>("other");
    insert_all(&other, (0..3000).map(|i| doc! {"_id": i}).collect()).await?;
    client.database("admin").run_command(doc! {"secantusAdmin.pruneOplog": 1}).await?;
    monsoon.restart()?;
    let deadline = Instant::now() + WAIT;
    loop {
        let live = count(&es, "shop.items").await.unwrap_or(0);
        let records = count(&es, "monsoon-locations").await.unwrap_or(0);
        if live == 350 && records == 350 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{live} documents and {records} location records, want 350 of each\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let log = monsoon.log();
    anyhow::ensure!(log.contains("by their location records"), "the located sweep never ran\n{}", tail(&log, 30));
    Ok(())
}
