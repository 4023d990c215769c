//! End-to-end sync against the stand-ins (SecantusDB, noida-db) through the real client
//! crates: snapshot + stream convergence, every change type, transactions, drops.

use std::path::Path;
use std::time::Duration;

use monsoon_testkit::*;
use mongodb::bson::{doc, Document};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

/// Generous: once, in a full-suite run, this first convergence took over 60 s (cause not
/// found; it did not reproduce in 5 further runs).
const CONVERGE: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_then_stream_converges_with_every_change_type() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let orders = client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 3000)).await?;

    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "  snapshot: true\n");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;

    // Changes while the snapshot runs: the stream must replay them after it.
    orders.update_one(doc! {"_id": 10}, doc! {"$set": {"status": "during-snapshot"}}).await?;
    orders.delete_one(doc! {"_id": 11}).await?;
    insert_all(&orders, sample_docs(5000, 200)).await?;

    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "after snapshot: {report:?}\n{}", tail(&monsoon.log(), 40));
    assert_eq!(report.mongo, 3199);

    // Every change type once the stream runs.
    orders.insert_one(doc! {"_id": "string-id", "name": "new"}).await?;
    orders.update_one(doc! {"_id": 1}, doc! {"$set": {"status": "updated"}, "$inc": {"quantity": 5}}).await?;
    orders.replace_one(doc! {"_id": 2}, doc! {"replaced": true}).await?;
    orders.delete_one(doc! {"_id": 3}).await?;
    // Updated then deleted before the stream reads it: updateLookup returns null.
    orders.update_one(doc! {"_id": 4}, doc! {"$set": {"status": "soon gone"}}).await?;
    orders.delete_one(doc! {"_id": 4}).await?;
    // Deleted and re-inserted.
    orders.delete_one(doc! {"_id": 5}).await?;
    orders.insert_one(doc! {"_id": 5, "reborn": 1}).await?;
    orders.update_many(doc! {"_id": {"$lt": 100}}, doc! {"$set": {"bulk": true}}).await?;

    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "after changes: {report:?}\n{}", tail(&monsoon.log(), 40));
    let stats = monsoon.stats().expect("stats");
    assert_eq!(stats["phase"], "Streaming");
    // The snapshot races the writes made during it: it reads the 3000 seeded documents,
    // less the one deleted meanwhile, plus whichever of the 200 new ones it got to.
    let read = stats["snapshotDocuments"].as_u64().expect("count");
    assert!((2999..=3200).contains(&read), "{stats}");
    assert_eq!(monsoon.get("/readyz").map(|r| r.0), Some(200));
    assert_eq!(monsoon.get("/healthz").map(|r| r.0), Some(200));
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("monsoon_bulk_items_total{outcome=\"indexed\",pipeline=\"shop\"}"), "{metrics}");
    // The engine re-executed itself once with its malloc tunables: the process the test
    // started (same pid) now has them in its environment.
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        let environ = std::fs::read(format!("/proc/{}/environ", monsoon.pid().expect("pid")))?;
        assert!(
            environ.split(|b| *b == 0).any(|v| v.starts_with(b"GLIBC_TUNABLES=glibc.malloc.mmap_threshold=")),
            "no malloc tunables in the engine's environment"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_writes_to_one_document_end_in_the_last_state() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("bank").collection::<Document>("accounts");
    coll.insert_one(doc! {"_id": "a", "balance": 0}).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("bank", &mongo.uri(), &es.url(), &["bank.*"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;

    // Several writes to one document in one transaction share one cluster time.
    let mut session = client.start_session().await?;
    session.start_transaction().await?;
    for i in 1..=5 {
        coll.update_one(doc! {"_id": "a"}, doc! {"$set": {"balance": i * 10}}).session(&mut session).await?;
    }
    coll.insert_one(doc! {"_id": "b", "balance": 7}).session(&mut session).await?;
    coll.replace_one(doc! {"_id": "b"}, doc! {"balance": 8, "final": true}).session(&mut session).await?;
    session.commit_transaction().await?;

    let report = wait_converged(&client, &esc, "bank", "accounts", "bank.accounts", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_documents_under_many_concurrent_bulks_end_in_their_last_state() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = client.database("hot").collection::<Document>("docs");
    let state = TempDir::new("state");
    // Tiny batches and four requests in flight: a document changed again while its previous
    // write is in flight must wait for it (held), and the last write must win.
    let batch = "  batch:\n    maxDocs: 3\n    flushIntervalMs: 1\n    concurrency: 4\n";
    let yaml = pipeline_yaml("hot", &mongo.uri(), &es.url(), &["hot.docs"], batch);
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    // Six documents, each inserted, updated twice and deleted, interleaved. Every other four
    // rounds run in one transaction, whose events arrive together: several writes of each
    // document in one reply.
    let mut session = client.start_session().await?;
    for round in 0..40 {
        if round % 8 == 4 {
            session.start_transaction().await?;
        }
        for id in 0..6 {
            let filter = doc! {"_id": id};
            match round % 4 {
                0 => {
                    coll.insert_one(doc! {"_id": id, "round": round}).session(&mut session).await?;
                }
                1 | 2 => {
                    coll.update_one(filter, doc! {"$set": {"round": round}}).session(&mut session).await?;
                }
                _ => {
                    coll.delete_one(filter).session(&mut session).await?;
                }
            }
        }
        if round % 8 == 7 {
            session.commit_transaction().await?;
        }
    }
    coll.insert_one(doc! {"_id": 99, "last": true}).await?;
    let report = wait_converged(&client, &esc, "hot", "docs", "hot.docs", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 40));
    let stats = monsoon.stats().expect("stats");
    assert!(stats["heldWrites"].as_u64() > Some(0), "no write waited for its document: {stats}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_collection_deletes_its_index_and_new_collections_follow() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let db = client.database("app");
    insert_all(&db.collection("keep"), sample_docs(0, 50)).await?;
    insert_all(&db.collection("gone"), sample_docs(0, 50)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("app", &mongo.uri(), &es.url(), &["app.*"], "  excludeNamespaces: [app.secret]\n");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "app", "gone", "app.gone", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");

    db.collection::<Document>("gone").drop().await?;
    // A collection created after the start, and an excluded one.
    insert_all(&db.collection("later"), sample_docs(0, 20)).await?;
    insert_all(&db.collection("secret"), sample_docs(0, 20)).await?;
    let r = wait_converged(&client, &esc, "app", "later", "app.later", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    let deadline = std::time::Instant::now() + CONVERGE;
    while count(&esc, "app.gone").await? > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let gone = esc.indices().exists(elasticsearch::indices::IndicesExistsParts::Index(&["app.gone"])).send().await?;
    assert_eq!(gone.status_code().as_u16(), 404, "index of dropped collection still exists\n{}", tail(&monsoon.log(), 30));
    assert_eq!(count(&esc, "app.secret").await?, 0, "excluded namespace was synced");
    let r = compare(&client, &esc, "app", "keep", "app.keep").await?;
    assert!(r.converged(), "{r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_collection_moves_to_its_new_index() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let db = client.database("app");
    insert_all(&db.collection("old"), sample_docs(0, 100)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("app", &mongo.uri(), &es.url(), &["app.*"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "app", "old", "app.old", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");

    client
        .database("admin")
        .run_command(doc! {"renameCollection": "app.old", "to": "app.new"})
        .await?;
    db.collection::<Document>("new").update_one(doc! {"_id": 1}, doc! {"$set": {"after": "rename"}}).await?;
    let r = wait_converged(&client, &esc, "app", "new", "app.new", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    let deadline = std::time::Instant::now() + CONVERGE;
    while count(&esc, "app.old").await? > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(count(&esc, "app.old").await?, 0, "old index still has documents");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_added_to_a_running_pipeline_is_snapshotted() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let db = client.database("shop");
    insert_all(&db.collection("orders"), sample_docs(0, 300)).await?;
    insert_all(&db.collection("users"), sample_docs(0, 120)).await?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders"], "");
    let mut monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}");
    assert_eq!(count(&esc, "shop.users").await?, 0);
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0));

    // The users existed all along; the pipeline now includes them.
    db.collection::<Document>("users").update_one(doc! {"_id": 3}, doc! {"$set": {"status": "x"}}).await?;
    let yaml = pipeline_yaml("shop", &mongo.uri(), &es.url(), &["shop.orders", "shop.users"], "");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let r = wait_converged(&client, &esc, "shop", "users", "shop.users", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 30));
    let stats = monsoon.stats().expect("stats");
    assert_eq!(stats["snapshotDocuments"], 120, "only the added namespace is read: {stats}");
    let want = serde_json::json!(["shop.orders", "shop.users"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let cp = monsoon.checkpoint("shop").expect("checkpoint");
        if cp["snapshot"]["coverage"]["include"] == want {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "coverage not checkpointed: {cp}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `monsoon convert` on a Monstache configuration: the YAML it prints passes `monsoon
/// validate`, every option left out is on standard error with its reason, and the pipeline,
/// given the password it asked for, syncs. An unreadable file is one clear line and exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_converted_monstache_config_validates_and_syncs() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let orders = client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 200)).await?;
    let state = TempDir::new("state");
    std::fs::create_dir_all(state.path())?;
    let toml = state.path().join("monstache.toml");
    std::fs::write(
        &toml,
        format!(
            "mongo-url = \"{}\"\nelasticsearch-urls = [\"{}\"]\ndirect-read-namespaces = [\"shop.orders\"]\nchange-stream-namespaces = [\"shop.orders\"]\nresume = true\n\n[[mapping]]\nnamespace = \"shop.orders\"\nindex = \"orders\"\ntype = \"order\"\n",
            mongo.uri(),
            es.url()
        ),
    )?;
    let out = std::process::Command::new(bin()).arg("convert").arg(&toml).output()?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let notes = String::from_utf8_lossy(&out.stderr);
    assert!(notes.contains("note: resume: not needed"), "{notes}");
    assert!(notes.contains("note: [[mapping]].type"), "{notes}");
    let yaml = String::from_utf8(out.stdout)?;
    let file = state.path().join("pipeline.yaml");
    std::fs::write(&file, &yaml)?;
    let validate = std::process::Command::new(bin()).args(["validate", "-f"]).arg(&file).output()?;
    assert!(validate.status.success(), "{}\n{yaml}", String::from_utf8_lossy(&validate.stderr));
    let monsoon = Monsoon::start(bin(), &yaml, &state.path().join("run"))?;
    let r = wait_converged(&client, &esc, "shop", "orders", "orders", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 20));

    let missing = std::process::Command::new(bin()).args(["convert", "/nonexistent/monstache.toml"]).output()?;
    assert_eq!(missing.status.code(), Some(1));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: failed to read /nonexistent/monstache.toml"), "{err}");
    Ok(())
}

/// `namespaceRegex` (Monstache's `namespace-regex`) selects collections in any database,
/// snapshot and stream alike, a collection created later included; `excludeNamespaceRegex`
/// leaves some out, and GridFS chunks and other databases stay out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_regex_selects_collections_across_databases() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let coll = |db: &str, c: &str| client.database(db).collection::<Document>(c);
    insert_all(&coll("shop", "orders"), sample_docs(0, 50)).await?;
    insert_all(&coll("logs", "app"), sample_docs(0, 30)).await?;
    insert_all(&coll("logs", "tmp_x"), sample_docs(0, 5)).await?;
    insert_all(&coll("media", "fs.chunks"), sample_docs(0, 5)).await?;
    insert_all(&coll("other", "stuff"), sample_docs(0, 5)).await?;
    let yaml = pipeline_yaml("wide", &mongo.uri(), &es.url(), &[], "")
        .replace("  namespaces:\n\n", "  namespaceRegex: '^(shop|logs|media)\\.'\n  excludeNamespaceRegex: '\\.tmp_'\n");
    let state = TempDir::new("state");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    for (db, c) in [("shop", "orders"), ("logs", "app")] {
        let r = wait_converged(&client, &esc, db, c, &format!("{db}.{c}"), CONVERGE).await?;
        assert!(r.converged(), "{db}.{c}: {r:?}\n{}", tail(&monsoon.log(), 20));
    }
    // Created after the snapshot: the stream picks it up.
    insert_all(&coll("logs", "audit"), sample_docs(0, 10)).await?;
    let r = wait_converged(&client, &esc, "logs", "audit", "logs.audit", CONVERGE).await?;
    assert!(r.converged(), "{r:?}\n{}", tail(&monsoon.log(), 20));
    for index in ["logs.tmp_x", "media.fs.chunks", "other.stuff"] {
        assert_eq!(count(&esc, index).await?, 0, "{index} must not be synced");
    }
    Ok(())
}

/// Two collections written into one index the user declared shared (`sharedIndexes`, as
/// Monstache's view replication maps a collection and its view to one index): dropping one
/// collection deletes only its own documents, found through their location records; the index
/// and the other collection's documents stay. A collection created again under the name is
/// followed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_one_of_two_collections_sharing_an_index_deletes_only_its_documents() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let db = client.database("app");
    let (a, b) = (db.collection::<Document>("a"), db.collection::<Document>("b"));
    insert_all(&a, sample_docs(0, 100)).await?;
    insert_all(&b, sample_docs(1000, 150)).await?;
    let state = TempDir::new("state");
    let extra = "  indexes:\n    app.a: both\n    app.b: both\n  sharedIndexes: [both]\n";
    let yaml = pipeline_yaml("app", &mongo.uri(), &es.url(), &["app.a", "app.b"], extra);
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let deadline = std::time::Instant::now() + CONVERGE;
    while count(&esc, "both").await? < 250 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "not all indexed\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.update_one(doc! {"_id": 5}, doc! {"$set": {"status": "moved on"}}).await?;
    a.drop().await?;
    let deadline = std::time::Instant::now() + CONVERGE;
    while count(&esc, "both").await? != 150 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "{} documents in the shared index after the drop\n{}", count(&esc, "both").await?, tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The other collection's documents are all there, as in MongoDB.
    let ids: std::collections::BTreeSet<i64> = hits(&esc, "both").await?.iter().filter_map(|h| h["_id"].as_str()?.parse().ok()).collect();
    assert_eq!(ids, (1000..1150).collect(), "{}", tail(&monsoon.log(), 30));
    insert_all(&a, sample_docs(0, 10)).await?;
    let deadline = std::time::Instant::now() + CONVERGE;
    while count(&esc, "both").await? != 160 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "the re-created collection is not followed\n{}", tail(&monsoon.log(), 30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
