//! One change stream per collection (`spec.mongodb.streamScope: Collection`, for servers such
//! as Amazon DocumentDB that stream only collections), against the stand-ins: each collection
//! resumes from its own token after SIGKILL, a collection created later gets its stream from
//! before it existed, and a dropped one ends its stream, deletes its index and is followed
//! again when it comes back.

use std::path::Path;
use std::time::Duration;

use mongodb::bson::{doc, Document};
use monsoon_testkit::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(120);

fn checkpoint(state: &TempDir) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(state.path().join("docdb.checkpoint.json"))?)?)
}

async fn converged(client: &mongodb::Client, esc: &elasticsearch::Elasticsearch, coll: &str, monsoon: &Monsoon) -> anyhow::Result<()> {
    let r = wait_converged(client, esc, "docdb", coll, &format!("docdb.{coll}"), CONVERGE).await?;
    anyhow::ensure!(r.converged(), "docdb.{coll}: {r:?}\n{}", tail(&monsoon.log(), 40));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_collection_follows_its_own_stream_across_kills_drops_and_new_collections() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let db = client.database("docdb");
    let (a, b) = (db.collection::<Document>("a"), db.collection::<Document>("b"));
    insert_all(&a, sample_docs(0, 200)).await?;
    insert_all(&b, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("docdb", &mongo.uri(), &es.url(), &["docdb.*"], "  snapshot: true\n").replace("  mongodb:\n", "  mongodb:\n    streamScope: Collection\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    converged(&client, &esc, "a", &monsoon).await?;
    converged(&client, &esc, "b", &monsoon).await?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;

    // Changes in both, and a collection created after the streams opened.
    a.update_many(doc! {"_id": {"$lt": 50}}, doc! {"$set": {"status": "streamed"}}).await?;
    b.delete_many(doc! {"_id": {"$gte": 150}}).await?;
    let c = db.collection::<Document>("c");
    insert_all(&c, sample_docs(0, 100)).await?;
    for coll in ["a", "b", "c"] {
        converged(&client, &esc, coll, &monsoon).await?;
    }
    // Each collection's stream keeps its own place in the checkpoint; there is no
    // pipeline-wide token.
    let deadline = std::time::Instant::now() + CONVERGE;
    let cp = loop {
        let cp = checkpoint(&state)?;
        if ["docdb.a", "docdb.b", "docdb.c"].iter().all(|ns| cp["collectionStreams"][ns]["token"].is_object()) || std::time::Instant::now() > deadline {
            break cp;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    for ns in ["docdb.a", "docdb.b", "docdb.c"] {
        assert!(cp["collectionStreams"][ns]["token"].is_object(), "no token for {ns}: {cp}");
    }
    assert!(cp.get("resumeToken").is_none(), "{cp}");

    // SIGKILL while every collection changes; the restart resumes each from its own token.
    let writer = {
        let (a, c) = (a.clone(), c.clone());
        tokio::spawn(async move {
            for i in 0..300 {
                let _ = a.update_one(doc! {"_id": i % 200}, doc! {"$inc": {"quantity": 1}}).await;
                let _ = c.insert_one(doc! {"_id": 1000 + i, "n": i}).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    monsoon.kill();
    writer.await?;
    b.insert_one(doc! {"_id": "while-down", "n": 1}).await?;
    // Created while the pipeline was down: its stream starts from the last listing before.
    insert_all(&db.collection("d"), sample_docs(0, 30)).await?;
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    for coll in ["a", "b", "c", "d"] {
        converged(&client, &esc, coll, &monsoon).await?;
    }

    // A dropped collection: its index goes, its stream ends; created again, it is followed
    // again from after the drop.
    b.drop().await?;
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let gone = esc.indices().exists(elasticsearch::indices::IndicesExistsParts::Index(&["docdb.b"])).send().await?;
        if gone.status_code().as_u16() == 404 {
            break;
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "index of the dropped collection is still there\n{}", tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Long enough for a listing that no longer shows it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    insert_all(&b, sample_docs(500, 40)).await?;
    b.update_one(doc! {"_id": 500}, doc! {"$set": {"back": true}}).await?;
    converged(&client, &esc, "b", &monsoon).await?;
    assert_eq!(count(&esc, "docdb.b").await?, 40);
    Ok(())
}
