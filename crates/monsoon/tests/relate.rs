//! Relations (`spec.relate`, Monstache's `[[relate]]`) and view replication end to end, through
//! the real `monsoon` binary against the stand-ins.
//!
//! The main case is Monstache's own documented example, its configuration unchanged (the
//! connection lines put before it): a view `thingview` of `thing` with its `state` looked up,
//! snapshotted into `things`, then kept in sync by relations from `thing` and `state`. The
//! index must equal the view after every kind of change, including a delete of a state (the
//! things still exist: monsoon re-syncs them where Monstache deletes them).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use monsoon_testkit::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(120);

/// Monstache's view replication example, as its documentation prints it.
const THINGS: &str = include_str!("../../../examples/monstache-view-replication.toml");

/// The example converted by `monsoon convert`, connected to the stand-ins.
fn converted(dir: &TempDir, mongo: &str, es: &str) -> anyhow::Result<String> {
    let toml = dir.path().join("monstache.toml");
    std::fs::write(&toml, format!("mongo-url = \"{mongo}\"\nelasticsearch-urls = [\"{es}\"]\n{THINGS}"))?;
    let out = Command::new(bin()).arg("convert").arg(&toml).output()?;
    anyhow::ensure!(out.status.success(), "convert: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8(out.stdout)?)
}

/// `thing` (with `s` pointing at a state), `state`, and the view of the example.
async fn seed(client: &mongodb::Client, things: i32) -> anyhow::Result<()> {
    let db = client.database("thingdb");
    db.collection::<Document>("state").insert_many(vec![doc! {"_id": 1, "name": "new"}, doc! {"_id": 2, "name": "done"}]).await?;
    let docs: Vec<Document> = (0..things).map(|i| doc! {"_id": i, "title": format!("thing {i}"), "s": 1 + i % 2}).collect();
    db.collection::<Document>("thing").insert_many(docs).await?;
    db.create_collection("thingview")
        .view_on("thing".to_string())
        .pipeline(vec![doc! {"$lookup": {"from": "state", "localField": "s", "foreignField": "_id", "as": "s"}}])
        .await?;
    Ok(())
}

async fn converged(client: &mongodb::Client, esc: &elasticsearch::Elasticsearch, monsoon: &Monsoon, what: &str) -> anyhow::Result<()> {
    let report = wait_converged(client, esc, "thingdb", "thingview", "things", CONVERGE).await?;
    anyhow::ensure!(report.converged(), "{what}: {report:?}\n{}", tail(&monsoon.log(), 40));
    Ok(())
}

/// The example's 40 things, synced by the converted example until it streams: the snapshot
/// reads the view (and only it) and must equal it.
async fn example_streaming(dir: &TempDir) -> anyhow::Result<(Stack, Monsoon)> {
    let stack = Stack::start(&[]).await?;
    seed(&stack.client, 40).await?;
    let yaml = converted(dir, &stack.mongo.uri(), &stack.es.url())?;
    let monsoon = Monsoon::start(bin(), &yaml, dir.path())?;
    converged(&stack.client, &stack.esc, &monsoon, "after the snapshot of the view").await?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    Ok((stack, monsoon))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monstaches_view_replication_example_keeps_the_index_equal_to_the_view() -> anyhow::Result<()> {
    let dir = TempDir::new("relate");
    let (stack, monsoon) = example_streaming(&dir).await?;
    // Moved out alone: the stand-ins stay in `stack` until the test ends.
    let Stack { client, esc, .. } = stack;
    let db = client.database("thingdb");
    let (thing, state) = (db.collection::<Document>("thing"), db.collection::<Document>("state"));

    // A thing moves to the other state; a state is renamed (20 things re-synced); a thing is
    // inserted; a thing is deleted; a thing is replaced.
    thing.update_one(doc! {"_id": 3}, doc! {"$set": {"s": 1}}).await?;
    state.update_one(doc! {"_id": 1}, doc! {"$set": {"name": "open"}}).await?;
    thing.insert_one(doc! {"_id": 100, "title": "thing 100", "s": 2}).await?;
    thing.delete_one(doc! {"_id": 4}).await?;
    thing.replace_one(doc! {"_id": 5}, doc! {"title": "five", "s": 2}).await?;
    converged(&client, &esc, &monsoon, "after thing and state changes").await?;

    // A state is deleted: its things still exist, their view shows no state, and so must the
    // index (Monstache deletes them from the index).
    state.delete_one(doc! {"_id": 2}).await?;
    converged(&client, &esc, &monsoon, "after a state was deleted").await?;
    let five = hits(&esc, "things").await?.into_iter().find(|h| h["_id"] == "5").expect("thing 5 indexed");
    assert_eq!(five["_source"]["s"], serde_json::json!([]), "{five}");

    // `thing` itself is never written (`keep-src = false`): every document is the view's.
    assert_eq!(count(&esc, "things").await?, 40, "{}", tail(&monsoon.log(), 20));
    let metrics = monsoon.get("/metrics").map(|(_, m)| m).unwrap_or_default();
    assert!(metrics.lines().any(|l| l.starts_with("monsoon_change_events_total") && l.contains("op=\"related\"")), "{metrics}");
    assert!(dead_letters(&esc).await.unwrap_or_default().is_empty());
    Ok(())
}

/// A change relating to many documents is checkpointed only once every related write is
/// acknowledged: killed (SIGKILL) while its re-sync runs, the pipeline re-syncs all of them on
/// the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_is_checkpointed_only_after_its_related_writes() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    seed(&client, 1200).await?;
    let dir = TempDir::new("relate-kill");
    let yaml = converted(&dir, &mongo.uri(), &es.url())?;
    let mut monsoon = Monsoon::start(bin(), &yaml, dir.path())?;
    converged(&client, &esc, &monsoon, "after the snapshot").await?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    let deadline = Instant::now() + CONVERGE;
    while monsoon.checkpoint(&pipeline_name(&yaml)).is_none_or(|c| c["snapshot"]["done"] != true) {
        anyhow::ensure!(Instant::now() < deadline, "no checkpoint after the snapshot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 600 things re-synced by one change; then a marker change after it.
    let db = client.database("thingdb");
    db.collection::<Document>("state").update_one(doc! {"_id": 1}, doc! {"$set": {"name": "renamed"}}).await?;
    db.collection::<Document>("thing").update_one(doc! {"_id": 0}, doc! {"$set": {"title": "marker"}}).await?;
    // Kill while the re-sync is under way (some, not all, of the 600 written).
    let deadline = Instant::now() + CONVERGE;
    loop {
        let renamed = renamed_count(&esc).await?;
        if renamed > 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    monsoon.kill();
    let at_kill = renamed_count(&esc).await?;
    eprintln!("killed with {at_kill} of 600 related documents re-synced");
    monsoon.restart()?;
    converged(&client, &esc, &monsoon, "after SIGKILL and restart").await?;
    assert_eq!(renamed_count(&esc).await?, 600);
    Ok(())
}

async fn renamed_count(esc: &elasticsearch::Elasticsearch) -> anyhow::Result<usize> {
    Ok(hits(esc, "things").await?.iter().filter(|h| h["_source"]["s"][0]["name"] == "renamed").count())
}

fn pipeline_name(yaml: &str) -> String {
    yaml.lines().find_map(|l| l.trim().strip_prefix("name: ")).unwrap_or("pipeline").trim().to_string()
}

/// A relation from a field other than `_id` (`orders.customer` to a view of customers with
/// their orders) follows deletes and moves through MongoDB's pre-images: a deleted order's
/// customer, and the customer an order moved away from, are re-synced too. Without a pre-image
/// (the collection stops keeping them) the delete's re-sync is dead-lettered, never skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relations_from_a_field_follow_deletes_and_moves_through_pre_images() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let db = client.database("sales");
    let (orders, customers) = (with_pre_images(&db, "orders").await?, db.collection::<Document>("customers"));
    customers.insert_many((0..6).map(|i| doc! {"_id": i, "name": format!("customer {i}")})).await?;
    orders.insert_many((0..30).map(|i| doc! {"_id": i, "customer": i % 6, "total": i * 10})).await?;
    db.create_collection("customerview")
        .view_on("customers".to_string())
        .pipeline(vec![doc! {"$lookup": {"from": "orders", "localField": "_id", "foreignField": "customer", "as": "orders"}}])
        .await?;
    let dir = TempDir::new("relate-pre-images");
    let yaml = format!(
        "apiVersion: monsoon.dev/v1alpha1
kind: SyncPipeline
metadata:
  name: totals
spec:
  mongodb:
    uri: {}
  elasticsearch:
    urls: [{}]
  namespaces: [sales.orders, sales.customerview]
  indexes:
    sales.customerview: customers
  snapshot: true
  snapshotNamespaces: [sales.customerview]
  relate:
  - namespace: sales.orders
    withNamespace: sales.customerview
    srcField: customer
    matchField: _id
",
        mongo.uri(),
        es.url()
    );
    let monsoon = Monsoon::start(bin(), &yaml, dir.path())?;
    let converged = |what: &'static str| {
        let (client, esc, monsoon) = (&client, &esc, &monsoon);
        async move {
            let report = wait_converged(client, esc, "sales", "customerview", "customers", CONVERGE).await?;
            anyhow::ensure!(report.converged(), "{what}: {report:?}\n{}", tail(&monsoon.log(), 40));
            anyhow::Ok(())
        }
    };
    converged("after the snapshot").await?;
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;

    // An order moves from customer 0 to customer 1 (customer 0's orders changed too); an
    // order of customer 2 is deleted; an order is replaced with another customer's.
    orders.update_one(doc! {"_id": 0}, doc! {"$set": {"customer": 1}}).await?;
    orders.delete_one(doc! {"_id": 2}).await?;
    orders.replace_one(doc! {"_id": 3}, doc! {"customer": 4, "total": 1}).await?;
    converged("after a move, a delete and a replace").await?;
    assert!(dead_letters(&esc).await.unwrap_or_default().is_empty(), "{}", tail(&monsoon.log(), 20));

    // Without pre-images, a delete cannot say whose order it was: dead-lettered with the fix.
    db.run_command(doc! {"collMod": "orders", "changeStreamPreAndPostImages": {"enabled": false}}).await?;
    orders.delete_one(doc! {"_id": 5}).await?;
    let deadline = Instant::now() + CONVERGE;
    let letters = loop {
        let letters = dead_letters(&esc).await.unwrap_or_default();
        if !letters.is_empty() || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(letters.len(), 1, "{letters:?}\n{}", tail(&monsoon.log(), 20));
    let reason = letters[0].to_string();
    assert!(reason.contains("changeStreamPreAndPostImages") && reason.contains("customer"), "{reason}");
    Ok(())
}

/// A relation's lookup waits out a MongoDB outage (every `find` failing as an unreachable host
/// would, code 6) and re-syncs once it ends: nothing dead-lettered, nothing skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relation_lookup_waits_out_an_outage() -> anyhow::Result<()> {
    let dir = TempDir::new("relate-outage");
    let (stack, monsoon) = example_streaming(&dir).await?;
    // Moved out alone: the stand-ins stay in `stack` until the test ends.
    let Stack { client, esc, .. } = stack;
    let admin = client.database("admin");
    admin
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": {"failCommands": ["find"], "errorCode": 6}})
        .await?;
    client.database("thingdb").collection::<Document>("state").update_one(doc! {"_id": 1}, doc! {"$set": {"name": "open"}}).await?;
    monsoon.wait_log("relation lookup failed; retrying", CONVERGE)?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = hits(&esc, "things").await?.iter().filter(|h| h["_source"]["s"][0]["name"] == "open").count();
    admin.run_command(doc! {"configureFailPoint": "failCommand", "mode": "off"}).await?;
    assert_eq!(during, 0, "re-synced while every lookup failed");
    converged(&client, &esc, &monsoon, "after the outage").await?;
    assert!(dead_letters(&esc).await.unwrap_or_default().is_empty(), "an outage dead-lettered a re-sync");
    Ok(())
}
