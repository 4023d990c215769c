//! GridFS files indexed with their content (`spec.files`, Monstache's `index-files`,
//! `file-namespaces`, `max-file-size`) against the stand-ins. noida-db has no `attachment`
//! processor (nor has this OpenSearch node the ingest-attachment plugin), as a cluster without
//! the plugin: the files' documents go through a pipeline of the test's own instead, which
//! shows the document reaches the pipeline with the raw content in `file`; and the default
//! (`createPipeline: true`) is refused at start with the fix.

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use mongodb::bson::{doc, spec::BinarySubtype, Binary, Bson, Document};
use monsoon_testkit::*;
use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const WAIT: Duration = Duration::from_secs(90);

/// Store `content` as GridFS does: chunks of 255 bytes first, then the file's document.
async fn put_file(db: &mongodb::Database, id: i32, name: &str, content: &[u8]) -> anyhow::Result<()> {
    let chunks: Vec<Document> = content
        .chunks(255)
        .enumerate()
        .map(|(n, data)| doc! {"files_id": id, "n": n as i32, "data": Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: data.to_vec() })})
        .collect();
    if !chunks.is_empty() {
        db.collection::<Document>("fs.chunks").insert_many(chunks).await?;
    }
    db.collection::<Document>("fs.files")
        .insert_one(doc! {"_id": id, "length": content.len() as i64, "chunkSize": 255, "filename": name, "uploadDate": mongodb::bson::DateTime::now()})
        .await?;
    Ok(())
}

async fn indexed(esc: &elasticsearch::Elasticsearch) -> anyhow::Result<Vec<Value>> {
    hits(esc, "docs.fs.files").await
}

fn content(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gridfs_files_are_indexed_with_their_content_and_big_ones_without() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    // The test's stand-in for the attachment pipeline: it marks what went through it.
    let r = esc
        .ingest()
        .put_pipeline(elasticsearch::ingest::IngestPutPipelineParts::Id("keep-file"))
        .body(json!({"processors": [{"set": {"field": "ingested", "value": true}}]}))
        .send()
        .await?;
    anyhow::ensure!(r.status_code().is_success(), "pipeline: {}", r.text().await?);
    let db = client.database("docs");
    let a = content(600, 1);
    put_file(&db, 1, "a.bin", &a).await?;
    let state = TempDir::new("state");
    let extra = "  files:\n    namespaces: [docs.fs.files]\n    maxFileSize: 1000\n    pipeline: keep-file\n    createPipeline: false\n";
    let yaml = pipeline_yaml("files", &mongo.uri(), &es.url(), &["docs.fs.files"], extra);
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    // While streaming: a small file, a file over the limit, and an empty one.
    let b = content(300, 7);
    put_file(&db, 2, "b.bin", &b).await?;
    put_file(&db, 3, "big.bin", &content(2000, 3)).await?;
    put_file(&db, 4, "empty.bin", &[]).await?;
    let deadline = Instant::now() + WAIT;
    let docs = loop {
        let docs = indexed(&esc).await?;
        if docs.len() == 4 {
            break docs;
        }
        anyhow::ensure!(Instant::now() < deadline, "{} of 4 files indexed\n{}", docs.len(), tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let by_id = |id: &str| docs.iter().find(|d| d["_id"] == id).map(|d| d["_source"].clone()).unwrap_or_default();
    let b64 = |c: &[u8]| base64::engine::general_purpose::STANDARD.encode(c);
    assert_eq!(by_id("1")["file"], b64(&a), "the snapshot's file");
    assert_eq!(by_id("1")["filename"], "a.bin");
    assert_eq!(by_id("1")["ingested"], true, "through the files' pipeline");
    assert_eq!(by_id("2")["file"], b64(&b), "the streamed file");
    assert_eq!(by_id("4")["file"], "", "an empty file");
    assert!(by_id("3").get("file").is_none(), "over maxFileSize: no content {}", by_id("3"));
    assert_eq!(by_id("3")["length"], 2000);
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_files_too_large_total{pipeline=\"files\"} 1"), "{metrics}");
    // The chunks are not synced; a deleted file's document goes.
    assert_eq!(count(&esc, "docs.fs.chunks").await?, 0);
    db.collection::<Document>("fs.files").delete_one(doc! {"_id": 1}).await?;
    let deadline = Instant::now() + WAIT;
    while indexed(&esc).await?.len() != 3 {
        anyhow::ensure!(Instant::now() < deadline, "the deleted file is still indexed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_attachment_processor_the_default_pipeline_is_refused_at_start_with_the_fix() -> anyhow::Result<()> {
    let Stack { mongo, es, .. } = Stack::start(&[]).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("files", &mongo.uri(), &es.url(), &["docs.fs.files"], "  files:\n    namespaces: [docs.fs.files]\n");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    assert_eq!(monsoon.wait_exit(WAIT)?, Some(1));
    let log = monsoon.log();
    assert!(log.contains("ingest-attachment") && log.contains("createPipeline: false") && log.contains("No processor type exists with name [attachment]"), "{log}");
    Ok(())
}
