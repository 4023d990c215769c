//! Split snapshots (`spec.snapshotSplit`, Monstache's `direct-read-split-max`) against the
//! stand-ins: a collection whose `_id`s mix numbers, strings and ObjectIds is read in `_id`
//! ranges at once, each range checkpointed on its own; SIGKILL midway resumes every range where
//! it was, and nothing is lost across the type brackets between the ranges.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use mongodb::bson::{doc, oid::ObjectId, Document};
use monsoon_testkit::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_snapshot_killed_midway_resumes_every_range() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&["--oplog-max-entries", "200000"]).await?;
    let coll = client.database("big").collection::<Document>("mixed");
    insert_all(&coll, sample_docs(0, 12_000)).await?;
    let strings: Vec<Document> = (0..4_000).map(|i| doc! {"_id": format!("s-{i:05}"), "n": i}).collect();
    insert_all(&coll, strings).await?;
    let oids: Vec<Document> = (0..4_000).map(|i| doc! {"_id": ObjectId::new(), "n": i}).collect();
    insert_all(&coll, oids).await?;
    let state = TempDir::new("state");
    let extra = "  snapshotSplit:\n    ranges: 4\n    minDocuments: 1000\n  batch:\n    maxDocs: 200\n    concurrency: 1\n";
    let yaml = pipeline_yaml("big", &mongo.uri(), &es.url(), &["big.mixed"], extra);
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    // Wait until the checkpoint holds the split and some range's progress, then kill.
    let deadline = std::time::Instant::now() + CONVERGE;
    let ranges = loop {
        let entry = monsoon.checkpoint("big").map(|c| c["snapshot"]["collections"]["big.mixed"].clone());
        if let Some(e) = entry {
            assert!(e["done"] != true, "the snapshot finished before it could be killed; make it bigger");
            let ranges = e["ranges"].as_array().cloned().unwrap_or_default();
            if ranges.iter().any(|r| r["lastId"].is_object() || r["lastId"].is_string() || r["lastId"].is_number()) {
                break ranges;
            }
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no split progress checkpointed\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(ranges.len() >= 2, "{ranges:?}");
    monsoon.kill();
    coll.update_one(doc! {"_id": 0}, doc! {"$set": {"status": "changed while down"}}).await?;
    coll.delete_one(doc! {"_id": "s-00007"}).await?;
    monsoon.restart()?;
    let report = wait_converged(&client, &esc, "big", "mixed", "big.mixed", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    let stats = monsoon.stats().expect("stats");
    let reread = stats["snapshotDocuments"].as_u64().expect("count");
    assert!(reread < 20_000, "the restart read everything again ({reread}): the ranges did not resume");
    assert!(monsoon.log().contains("in _id ranges read at once"), "{}", tail(&monsoon.log(), 30));
    // The documents can all be indexed a moment before the checkpoint saying so is stored.
    monsoon.wait_checkpoint("big", CONVERGE, |cp| cp["snapshot"]["done"] == true).context("the snapshot was never checkpointed as done")?;
    Ok(())
}
