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
    put_file_with(db, id, name, content, None).await
}

/// [`put_file`], the file's document with `metadata` when given.
async fn put_file_with(db: &mongodb::Database, id: i32, name: &str, content: &[u8], metadata: Option<Document>) -> anyhow::Result<()> {
    let chunks: Vec<Document> = content
        .chunks(255)
        .enumerate()
        .map(|(n, data)| doc! {"files_id": id, "n": n as i32, "data": Bson::Binary(Binary { subtype: BinarySubtype::Generic, bytes: data.to_vec() })})
        .collect();
    if !chunks.is_empty() {
        db.collection::<Document>("fs.chunks").insert_many(chunks).await?;
    }
    let mut file = doc! {"_id": id, "length": content.len() as i64, "chunkSize": 255, "filename": name, "uploadDate": mongodb::bson::DateTime::now()};
    if let Some(metadata) = metadata {
        file.insert("metadata", metadata);
    }
    db.collection::<Document>("fs.files").insert_one(file).await?;
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

/// The files collection's script (Monstache's `[[script]]` on a files namespace): a field
/// computed from the file's metadata and a lookup, some files removed, one file sent to a
/// pipeline of the script's choosing under an `_id` of its own. The filter drops drafts.
const FILE_SCRIPTS: &str = r#"  scripts:
    - namespace: docs.fs.files
      script: |
        module.exports = function(doc) {
          if (doc.metadata.hidden) return false;
          doc.owner = doc.metadata.owner.toUpperCase();
          doc.team = findId(doc.metadata.owner, { database: "docs", collection: "owners" }).team;
          doc.sawFile = ("file" in doc);
          if (doc.metadata.own) doc._meta_monstache = { pipeline: "own", id: "own-" + doc._id };
          return doc;
        }
  filters:
    - namespace: docs.fs.files
      script: |
        module.exports = function(doc) { return !doc.metadata.draft; }
"#;

/// Put an ingest pipeline that sets `field: true` (the tests' stand-in for `attachment`).
async fn marking_pipeline(esc: &elasticsearch::Elasticsearch, name: &str, field: &str) -> anyhow::Result<()> {
    let r = esc
        .ingest()
        .put_pipeline(elasticsearch::ingest::IngestPutPipelineParts::Id(name))
        .body(json!({"processors": [{"set": {"field": field, "value": true}}]}))
        .send()
        .await?;
    anyhow::ensure!(r.status_code().is_success(), "pipeline {name}: {}", r.text().await?);
    Ok(())
}

/// Wait until `n` files are indexed; `None` once `WAIT` is over.
async fn indexed_n(esc: &elasticsearch::Elasticsearch, n: usize) -> anyhow::Result<Option<Vec<Value>>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let docs = indexed(esc).await?;
        if docs.len() == n {
            return Ok(Some(docs));
        }
        if Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_files_collections_script_shapes_and_drops_files_whose_content_is_added_after_it() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    marking_pipeline(&esc, "keep-file", "ingested").await?;
    marking_pipeline(&esc, "own", "by_script").await?;
    let db = client.database("docs");
    db.collection::<Document>("owners").insert_many([doc! {"_id": "ann", "team": "red"}, doc! {"_id": "bob", "team": "blue"}, doc! {"_id": "cy", "team": "red"}, doc! {"_id": "dan", "team": "blue"}]).await?;
    // Read by the snapshot: kept, removed by the script, over the size limit.
    let a = content(600, 1);
    put_file_with(&db, 1, "a.bin", &a, Some(doc! {"owner": "ann"})).await?;
    put_file_with(&db, 2, "hidden.bin", &content(100, 2), Some(doc! {"owner": "ann", "hidden": true})).await?;
    put_file_with(&db, 3, "big.bin", &content(2000, 3), Some(doc! {"owner": "cy"})).await?;
    let state = TempDir::new("state");
    let files = "  files:\n    namespaces: [docs.fs.files]\n    maxFileSize: 1000\n    pipeline: keep-file\n    createPipeline: false\n";
    let yaml = pipeline_yaml("files", &mongo.uri(), &es.url(), &["docs.fs.files"], &format!("{files}{FILE_SCRIPTS}"));
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    // Streamed: kept, removed, the script's own pipeline and `_id`, a draft, over the limit (last:
    // once it is indexed, every earlier change was decided).
    let b = content(300, 4);
    put_file_with(&db, 4, "b.bin", &b, Some(doc! {"owner": "bob"})).await?;
    put_file_with(&db, 5, "hidden2.bin", &content(100, 5), Some(doc! {"owner": "bob", "hidden": true})).await?;
    let o = content(200, 6);
    put_file_with(&db, 6, "own.bin", &o, Some(doc! {"owner": "dan", "own": true})).await?;
    put_file_with(&db, 7, "draft.bin", &content(100, 7), Some(doc! {"owner": "dan", "draft": true})).await?;
    put_file_with(&db, 8, "big2.bin", &content(3000, 8), Some(doc! {"owner": "dan"})).await?;
    let Some(docs) = indexed_n(&esc, 5).await? else {
        anyhow::bail!("not 5 files indexed: {:?}\n{}", indexed(&esc).await?.iter().map(|d| d["_id"].clone()).collect::<Vec<_>>(), tail(&monsoon.log(), 40));
    };
    let by_id = |id: &str| docs.iter().find(|d| d["_id"] == id).map(|d| d["_source"].clone()).unwrap_or_default();
    let b64 = |c: &[u8]| base64::engine::general_purpose::STANDARD.encode(c);
    for (id, owner, team, bytes) in [("1", "ANN", "red", &a), ("4", "BOB", "blue", &b)] {
        let d = by_id(id);
        assert_eq!((d["owner"].as_str(), d["team"].as_str()), (Some(owner), Some(team)), "the script's fields: {d}");
        assert_eq!(d["file"], b64(bytes), "the content, added after the script: {id}");
        assert_eq!(d["sawFile"], false, "the script sees the files document without the content");
        assert_eq!(d["ingested"], true, "through the files' pipeline: {d}");
    }
    let own = by_id("own-6");
    assert_eq!((own["file"].clone(), own["by_script"].clone(), own.get("ingested")), (json!(b64(&o)), json!(true), None), "the script's pipeline and `_id`: {own}");
    for (id, owner, length) in [("3", "CY", 2000), ("8", "DAN", 3000)] {
        let d = by_id(id);
        assert_eq!((d["owner"].as_str(), d["length"].as_i64()), (Some(owner), Some(length)), "{d}");
        assert!(d.get("file").is_none() && d.get("ingested").is_none(), "over maxFileSize: no content: {d}");
    }
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_files_too_large_total{pipeline=\"files\"} 2"), "{metrics}");
    // A file the script removes once its metadata says so goes from the index.
    db.collection::<Document>("fs.files").update_one(doc! {"_id": 4}, doc! {"$set": {"metadata.hidden": true}}).await?;
    anyhow::ensure!(indexed_n(&esc, 4).await?.is_some(), "the file the script now removes is still indexed");
    assert_eq!(count(&esc, "docs.fs.chunks").await?, 0);
    Ok(())
}
