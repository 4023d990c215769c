//! `spec.mappings` end to end, SecantusDB into a real OpenSearch node: routing by a field
//! (Monstache's comments example, the question/answer join), index and `_id` from fields,
//! documents that move, deletes that reach them, keep-filters and soft deletes, field
//! shaping, partial updates, and a crash among moves.
//!
//! OpenSearch, not noida-db: noida-db keeps no shards, so it ignores routing (a delete
//! without the routing a document was indexed with still deletes it) and returns no
//! `_routing` in hits; a routing mistake would pass there unseen. Routed indexes are created
//! with several shards first, so a write or delete aimed without the right routing lands on
//! another shard, as it would in production.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use elasticsearch::Elasticsearch;
use monsoon_testkit::opensearch::OpenSearch;
use monsoon_testkit::*;
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

/// SecantusDB, a real OpenSearch node, and a client of each.
struct Stack {
    mongo: Mongo,
    _os: OpenSearch,
    os_url: String,
    client: mongodb::Client,
    esc: Elasticsearch,
}

impl Stack {
    async fn start(_mongo_args: &[&str]) -> anyhow::Result<Self> {
        let os = OpenSearch::start()?;
        let mongo = Mongo::start(&[])?;
        let client = mongo.client().await?;
        let esc = os.client()?;
        Ok(Self { os_url: os.url(), mongo, _os: os, client, esc })
    }

    fn pipeline(&self, name: &str, namespaces: &[&str], extra_spec: &str) -> String {
        pipeline_yaml(name, &self.mongo.uri(), &self.os_url, namespaces, extra_spec)
    }

    /// Create `index` with four primary shards, so routing decides where documents live.
    async fn sharded_index(&self, index: &str) -> anyhow::Result<()> {
        let r = self
            .esc
            .indices()
            .create(elasticsearch::indices::IndicesCreateParts::Index(index))
            .body(json!({"settings": {"number_of_shards": 4, "number_of_replicas": 0}}))
            .send()
            .await?;
        anyhow::ensure!(r.status_code().is_success(), "creating {index}: {}", r.text().await?);
        Ok(())
    }
}

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const WAIT: Duration = Duration::from_secs(60);

/// One indexed copy: index, `_id`, routing and source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Copy {
    index: String,
    id: String,
    routing: Option<String>,
    source: String,
}

fn copy(index: &str, id: &str, routing: Option<&str>, source: Value) -> Copy {
    Copy { index: index.into(), id: id.into(), routing: routing.map(Into::into), source: canonical(&source) }
}

/// JSON text with object keys sorted (field order is not significant to Elasticsearch, and
/// scripts may reorder fields).
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let members: Vec<String> = keys.iter().map(|k| format!("{}:{}", Value::String((*k).clone()), canonical(&m[*k]))).collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(a) => format!("[{}]", a.iter().map(canonical).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

/// Every document of the indexes `pattern` matches (the locations and dead-letter indexes
/// left out), after a refresh.
async fn copies(es: &Elasticsearch, pattern: &str) -> anyhow::Result<BTreeSet<Copy>> {
    Ok(hits(es, pattern)
        .await?
        .iter()
        .filter(|h| !h["_index"].as_str().unwrap_or("").starts_with("monsoon-"))
        .map(|h| Copy {
            index: h["_index"].as_str().unwrap_or("").into(),
            id: h["_id"].as_str().unwrap_or("").into(),
            routing: h["_routing"].as_str().map(Into::into),
            source: canonical(&h["_source"]),
        })
        .collect())
}

/// Wait until the indexes `pattern` matches hold exactly `want`.
async fn wait_copies(es: &Elasticsearch, pattern: &str, want: &BTreeSet<Copy>, log: impl Fn() -> String) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = copies(es, pattern).await?;
        if got == *want {
            return Ok(());
        }
        if Instant::now() > deadline {
            let all = copies(es, "*").await.unwrap_or_default();
            anyhow::bail!("indexes {pattern} never held what was expected\nwant: {want:#?}\ngot:  {got:#?}\nevery index: {all:#?}\n{}", tail(&log(), 40));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn set(items: impl IntoIterator<Item = Copy>) -> BTreeSet<Copy> {
    items.into_iter().collect()
}

/// Monstache's "Routing" example: comments routed by `post_id`. A comment moved to another
/// post leaves no copy under the old routing, and deletes (which carry only the `_id`) reach
/// routed documents, including right after they were written (before any refresh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comments_routed_by_post_id_move_and_delete_without_leftovers() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    stack.sharded_index("blog.comments").await?;
    let comments = stack.client.database("blog").collection::<Document>("comments");
    comments.insert_many([doc! {"_id": 1, "title": "Did you read this?", "post_id": "123"}, doc! {"_id": 2, "title": "Yeah, it's good", "post_id": "123"}]).await?;
    let state = TempDir::new("state");
    let yaml = stack.pipeline("blog", &["blog.comments"], "  mappings:\n    - namespace: blog.comments\n      routing: post_id\n");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let log = || monsoon.log();
    wait_copies(
        &stack.esc,
        "blog.comments",
        &set([
            copy("blog.comments", "1", Some("123"), json!({"title": "Did you read this?", "post_id": "123"})),
            copy("blog.comments", "2", Some("123"), json!({"title": "Yeah, it's good", "post_id": "123"})),
        ]),
        log,
    )
    .await?;

    // Moved to another post, a new comment deleted straight after its insert, and a delete.
    comments.update_one(doc! {"_id": 1}, doc! {"$set": {"post_id": "456"}}).await?;
    comments.insert_one(doc! {"_id": 3, "title": "brief", "post_id": "789"}).await?;
    comments.delete_one(doc! {"_id": 3}).await?;
    comments.delete_one(doc! {"_id": 2}).await?;
    wait_copies(&stack.esc, "blog.comments", &set([copy("blog.comments", "1", Some("456"), json!({"title": "Did you read this?", "post_id": "456"}))]), log).await?;
    Ok(())
}

/// Monstache's "Joins" example, declaratively: answers are routed by their question's `_id`
/// (a question has no `question` field, so it keeps the default routing, which is its own
/// `_id`), so both live on one shard, as a join field requires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_routed_to_their_questions() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    stack.sharded_index("test.test").await?;
    let test = stack.client.database("test").collection::<Document>("test");
    let state = TempDir::new("state");
    let mapping = "  mappings:\n    - namespace: test.test\n      routing: question\n      exclude: [type]\n";
    let monsoon = Monsoon::start(bin(), &stack.pipeline("join", &["test.test"], mapping), state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    test.insert_one(doc! {"_id": "q1", "type": "question", "text": "This is a question", "my_join_field": {"name": "question"}}).await?;
    test.insert_one(doc! {"_id": "a1", "type": "answer", "text": "This is an answer", "question": "q1", "my_join_field": {"name": "answer", "parent": "q1"}}).await?;
    wait_copies(
        &stack.esc,
        "test.test",
        &set([
            copy("test.test", "q1", None, json!({"text": "This is a question", "my_join_field": {"name": "question"}})),
            copy("test.test", "a1", Some("q1"), json!({"text": "This is an answer", "question": "q1", "my_join_field": {"name": "answer", "parent": "q1"}})),
        ]),
        || monsoon.log(),
    )
    .await?;
    Ok(())
}

/// Index and `_id` from document fields: a document whose region changes moves to the other
/// index (its old copy deleted), deletes find it, a document missing the field is
/// dead-lettered with the reason, and dropping the collection deletes every index it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_and_id_from_fields_follow_the_document_and_drops_clean_every_index() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let events = stack.client.database("shop").collection::<Document>("events");
    events.insert_many([doc! {"_id": 1, "ref": "e-1", "region": "EU", "n": 1}, doc! {"_id": 2, "ref": "e-2", "region": "us", "n": 2}]).await?;
    let state = TempDir::new("state");
    let mapping = "  mappings:\n    - namespace: shop.events\n      index: \"events-{region}\"\n      id: ref\n";
    let monsoon = Monsoon::start(bin(), &stack.pipeline("ev", &["shop.events"], mapping), state.path())?;
    let log = || monsoon.log();
    wait_copies(
        &stack.esc,
        "events-*",
        &set([
            copy("events-eu", "e-1", None, json!({"ref": "e-1", "region": "EU", "n": 1})),
            copy("events-us", "e-2", None, json!({"ref": "e-2", "region": "us", "n": 2})),
        ]),
        log,
    )
    .await?;

    events.update_one(doc! {"_id": 1}, doc! {"$set": {"region": "us", "ref": "e-1b"}}).await?;
    events.delete_one(doc! {"_id": 2}).await?;
    events.insert_one(doc! {"_id": 3, "ref": "e-3"}).await?;
    wait_copies(&stack.esc, "events-*", &set([copy("events-us", "e-1b", None, json!({"ref": "e-1b", "region": "us", "n": 1}))]), log).await?;
    let deadline = Instant::now() + WAIT;
    let letter = loop {
        let letters = dead_letters(&stack.esc).await?;
        if let Some(l) = letters.into_iter().find(|l| l["namespace"] == "shop.events") {
            break l;
        }
        anyhow::ensure!(Instant::now() < deadline, "no dead letter for the document without a region\n{}", tail(&log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(letter["errorType"], "mapping_failed", "{letter}");
    assert!(letter["reason"].as_str().unwrap_or("").contains("field `region`"), "{letter}");

    events.drop().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let eu = stack.esc.indices().exists(elasticsearch::indices::IndicesExistsParts::Index(&["events-eu"])).send().await?;
        let us = stack.esc.indices().exists(elasticsearch::indices::IndicesExistsParts::Index(&["events-us"])).send().await?;
        if eu.status_code().as_u16() == 404 && us.status_code().as_u16() == 404 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the drop left an index behind\n{}", tail(&log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// A namespace whose documents choose many indexes (here 40 tenants through an index template)
/// lists only the first 32 in the checkpoint's `written` (a worker's ConfigMap holds 1 MiB) and
/// marks that it wrote more; dropping the collection still removes every document: the listed
/// indexes whole, the others' documents through their location records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_writing_many_indexes_keeps_its_checkpoint_small_and_its_drop_complete() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let orders = stack.client.database("saas").collection::<Document>("orders");
    let docs: Vec<Document> = (0..400).map(|i| doc! {"_id": i, "tenant": format!("t{:02}", i % 40), "n": i}).collect();
    orders.insert_many(docs).await?;
    let state = TempDir::new("state");
    let mapping = "  mappings:\n    - namespace: saas.orders\n      index: \"orders-{tenant}\"\n";
    let monsoon = Monsoon::start(bin(), &stack.pipeline("saas", &["saas.orders"], mapping), state.path())?;
    let deadline = Instant::now() + WAIT;
    while count(&stack.esc, "orders-*").await? < 400 {
        anyhow::ensure!(Instant::now() < deadline, "not all indexed\n{}", tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The checkpoint lists 32 indexes and the mark, not 40 (nor 4,000 with 4,000 tenants).
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let cp: Value = serde_json::from_slice(&std::fs::read(state.path().join("saas.checkpoint.json"))?)?;
        let listed = cp["written"]["saas.orders"].as_str().unwrap_or("").to_string();
        if listed.ends_with(",*") || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(listed.ends_with(",*"), "{listed}");
    assert_eq!(listed.split(',').count(), 33, "{listed}");

    orders.drop().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = count(&stack.esc, "orders-*").await?;
        if left == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{left} documents of the dropped collection left\n{}", tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// A keep-filter ignores what it refuses (no delete: Monstache's `[[filter]]`), and soft
/// deletes remove a document while it matches `deleteWhen` and bring it back after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_filter_ignores_and_soft_deletes_come_and_go() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let posts = stack.client.database("db").collection::<Document>("posts");
    posts.insert_many([doc! {"_id": 1, "interesting": true}, doc! {"_id": 2, "interesting": false}]).await?;
    let state = TempDir::new("state");
    let mapping = "  mappings:\n    - namespace: db.posts\n      keep: {interesting: true}\n      deleteWhen: {deletedAt: {$exists: true}}\n";
    let monsoon = Monsoon::start(bin(), &stack.pipeline("soft", &["db.posts"], mapping), state.path())?;
    let log = || monsoon.log();
    wait_copies(&stack.esc, "db.posts", &set([copy("db.posts", "1", None, json!({"interesting": true}))]), log).await?;

    posts.update_one(doc! {"_id": 1}, doc! {"$set": {"deletedAt": 1}}).await?;
    posts.insert_one(doc! {"_id": 3, "interesting": true}).await?;
    wait_copies(&stack.esc, "db.posts", &set([copy("db.posts", "3", None, json!({"interesting": true}))]), log).await?;
    posts.update_one(doc! {"_id": 1}, doc! {"$unset": {"deletedAt": ""}}).await?;
    // No longer kept: ignored, so its indexed copy stays as it was (a filter never deletes).
    posts.update_one(doc! {"_id": 3}, doc! {"$set": {"interesting": false}}).await?;
    wait_copies(
        &stack.esc,
        "db.posts",
        &set([copy("db.posts", "1", None, json!({"interesting": true})), copy("db.posts", "3", None, json!({"interesting": true}))]),
        log,
    )
    .await?;
    Ok(())
}

/// Fields included, excluded and renamed while converting, the change's time added as
/// Monstache's `index-oplog-time` adds it, and partial updates that keep what another writer
/// added to the indexed document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_are_shaped_and_partial_updates_keep_other_writers_fields() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let users = stack.client.database("app").collection::<Document>("users");
    users.insert_one(doc! {"_id": 1, "name": "ann", "password": "x", "profile": {"mail": "a@x", "secret": "s"}}).await?;
    let state = TempDir::new("state");
    let mapping = "  mappings:\n    - namespace: app.users\n      exclude: [password, profile.secret]\n      rename: {profile.mail: email}\n      writeMode: Update\n      oplogTime: {}\n";
    let monsoon = Monsoon::start(bin(), &stack.pipeline("users", &["app.users"], mapping), state.path())?;
    let log = || monsoon.log();
    let deadline = Instant::now() + WAIT;
    let source = loop {
        let got = copies(&stack.esc, "app.users").await?;
        if let Some(c) = got.into_iter().next() {
            break serde_json::from_str::<Value>(&c.source)?;
        }
        anyhow::ensure!(Instant::now() < deadline, "not indexed\n{}", tail(&log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(source["name"], "ann");
    assert_eq!(source["email"], "a@x");
    assert_eq!(source["profile"], json!({}));
    assert!(source.get("password").is_none(), "{source}");
    assert!(source["oplog_ts"]["T"].as_u64().is_some_and(|t| t > 1_700_000_000), "{source}");
    assert!(source["oplog_date"].as_str().is_some_and(|d| d.len() == 19 && &d[4..5] == "/"), "{source}");

    // Another writer adds a field; a partial update keeps it.
    stack.esc.update(elasticsearch::UpdateParts::IndexId("app.users", "1")).body(json!({"doc": {"score": 7}})).send().await?;
    users.update_one(doc! {"_id": 1}, doc! {"$set": {"name": "anna"}}).await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let got = copies(&stack.esc, "app.users").await?;
        let source: Value = serde_json::from_str(&got.iter().next().map(|c| c.source.clone()).unwrap_or_default()).unwrap_or_default();
        if source["name"] == "anna" {
            assert_eq!(source["score"], 7, "{source}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "update not applied: {source}\n{}", tail(&log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Killed (SIGKILL) while documents move between routings and get deleted, then restarted:
/// the replay leaves exactly one copy of each live document, where its routing says. Before
/// location records were written ahead of new places, this failed (in CI once, then 3 runs in
/// 4 with three kills): a copy that landed just before a crash, its record not yet written,
/// outlived the replay, whose update lookups sent the document elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_among_moves_leaves_one_copy_per_document() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    stack.sharded_index("crash.items").await?;
    let items = stack.client.database("crash").collection::<Document>("items");
    let state = TempDir::new("state");
    let mapping = "  mappings:\n    - namespace: crash.items\n      routing: group\n  batch:\n    maxDocs: 20\n    flushIntervalMs: 5\n";
    let mut monsoon = Monsoon::start(bin(), &stack.pipeline("crash", &["crash.items"], mapping), state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    insert_all(&items, (0..300).map(|i| doc! {"_id": i, "group": format!("g{}", i % 7)}).collect()).await?;
    // Killed mid-stream three times, each time while documents move; the replays after each
    // restart re-read writes that may have landed without their location records.
    for round in 0..6 {
        for i in (0..300).step_by(3) {
            items.update_one(doc! {"_id": i}, doc! {"$set": {"group": format!("g{}", (i + round + 1) % 7)}}).await?;
        }
        if round % 2 == 1 {
            monsoon.kill();
            monsoon.restart()?;
        }
    }
    items.delete_many(doc! {"_id": {"$gte": 250}}).await?;
    let want = {
        use monsoon_testkit::futures_util_shim::TryStreamExt;
        let docs: Vec<Document> = items.find(doc! {}).await?.try_collect().await?;
        set(docs.iter().map(|d| {
            let id = d.get_i32("_id").map(i64::from).or_else(|_| d.get_i64("_id")).unwrap_or(-1).to_string();
            let group = d.get_str("group").unwrap_or("");
            copy("crash.items", &id, Some(group), json!({"group": group}))
        }))
    };
    assert_eq!(want.len(), 250);
    wait_copies(&stack.esc, "crash.items", &want, || monsoon.log()).await?;
    Ok(())
}

/// Monstache's "watching changes on specific fields only": a change-stream `$match` on
/// `updateDescription.updatedFields`, run by MongoDB. A change of another field is not
/// synced; a change of a watched field syncs the whole current document; deletes always pass.
/// The snapshot runs its own stages: a `$lookup` embeds each post's author.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregation_stages_watch_some_fields_and_shape_the_snapshot() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let db = stack.client.database("test");
    let test = db.collection::<Document>("test");
    let posts = db.collection::<Document>("posts");
    db.collection::<Document>("users").insert_one(doc! {"_id": "u1", "name": "Ann"}).await?;
    posts.insert_one(doc! {"_id": 1, "author": "u1", "title": "t"}).await?;
    test.insert_one(doc! {"_id": 1, "foo": 1, "count": 1}).await?;
    let state = TempDir::new("state");
    let mappings = r#"  mappings:
    - namespace: test.test
      aggregation:
        changeStream:
          - $match:
              $or:
                - updateDescription: {$exists: false}
                - updateDescription.updatedFields.foo: {$exists: true}
                - updateDescription.updatedFields.bar: {$exists: true}
    - namespace: test.posts
      aggregation:
        snapshot:
          - $lookup: {from: users, localField: author, foreignField: _id, as: author}
"#;
    let monsoon = Monsoon::start(bin(), &stack.pipeline("watch", &["test.test", "test.posts"], mappings), state.path())?;
    let log = || monsoon.log();
    wait_copies(&stack.esc, "test.posts", &set([copy("test.posts", "1", None, json!({"author": [{"_id": "u1", "name": "Ann"}], "title": "t"}))]), log).await?;
    wait_copies(&stack.esc, "test.test", &set([copy("test.test", "1", None, json!({"foo": 1, "count": 1}))]), log).await?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;

    test.update_one(doc! {"_id": 1}, doc! {"$set": {"count": 2}}).await?;
    test.insert_one(doc! {"_id": 2, "foo": 2}).await?;
    wait_copies(
        &stack.esc,
        "test.test",
        &set([copy("test.test", "1", None, json!({"foo": 1, "count": 1})), copy("test.test", "2", None, json!({"foo": 2}))]),
        log,
    )
    .await?;
    test.update_one(doc! {"_id": 1}, doc! {"$set": {"foo": 5}}).await?;
    test.delete_one(doc! {"_id": 2}).await?;
    wait_copies(&stack.esc, "test.test", &set([copy("test.test", "1", None, json!({"foo": 5, "count": 2}))]), log).await?;
    Ok(())
}

/// Monstache's JavaScript examples, run unchanged: a global `_.omit` script, routing comments
/// by `post_id` through `_meta_monstache`, the soft-delete "dropping" script, `findId`
/// embedding a post's author, and a `[[filter]]`; a document dropped by a script leaves the
/// index, a routed one moves without leftovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monstache_scripts_run_unchanged() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    stack.sharded_index("blog.comments").await?;
    let db = stack.client.database("blog");
    db.collection::<Document>("users").insert_one(doc! {"_id": mongodb::bson::oid::ObjectId::parse_str("5a84a8b826993bde57c12893")?, "name": "Ann"}).await?;
    let posts = db.collection::<Document>("posts");
    let comments = db.collection::<Document>("comments");
    posts.insert_one(doc! {"_id": 1, "title": "t", "author": mongodb::bson::oid::ObjectId::parse_str("5a84a8b826993bde57c12893")?, "password": "x"}).await?;
    comments.insert_many([doc! {"_id": 1, "text": "a", "post_id": "p1", "interesting": true}, doc! {"_id": 2, "text": "b", "post_id": "p1", "interesting": false}]).await?;
    let state = TempDir::new("state");
    let scripts = r#"  scripts:
    - script: |
        module.exports = function(doc, ns, updateDesc) {
          return _.omit(doc, "password", "secret");
        }
    - namespace: blog.comments
      script: |
        module.exports = function(doc) {
          if (!!doc.deletedAt) {
            return false;
          }
          doc._meta_monstache = { routing: doc.post_id };
          return doc;
        }
    - namespace: blog.posts
      script: |
        module.exports = function(post, ns, updateDesc) {
          if (post.author) {
            post.author = findId(post.author, { database: "blog", collection: "users" });
          }
          post.changed = _.keys(updateDesc.updatedFields || {});
          return post;
        }
  filters:
    - namespace: blog.comments
      script: |
        module.exports = function(doc, ns, updateDesc) {
          return !!doc.interesting;
        }
"#;
    let monsoon = Monsoon::start(bin(), &stack.pipeline("js", &["blog.posts", "blog.comments"], scripts), state.path())?;
    let log = || monsoon.log();
    wait_copies(
        &stack.esc,
        "blog.posts",
        &set([copy("blog.posts", "1", None, json!({"title": "t", "author": {"_id": "5a84a8b826993bde57c12893", "name": "Ann"}, "changed": []}))]),
        log,
    )
    .await?;
    wait_copies(&stack.esc, "blog.comments", &set([copy("blog.comments", "1", Some("p1"), json!({"text": "a", "post_id": "p1", "interesting": true}))]), log).await?;

    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    comments.update_one(doc! {"_id": 1}, doc! {"$set": {"post_id": "p2"}}).await?;
    posts.update_one(doc! {"_id": 1}, doc! {"$set": {"title": "t2"}}).await?;
    comments.insert_one(doc! {"_id": 3, "text": "c", "post_id": "p3", "interesting": true}).await?;
    comments.update_one(doc! {"_id": 3}, doc! {"$set": {"deletedAt": 1}}).await?;
    wait_copies(&stack.esc, "blog.comments", &set([copy("blog.comments", "1", Some("p2"), json!({"text": "a", "post_id": "p2", "interesting": true}))]), log).await?;
    // The update description reaches the script (its third argument).
    wait_copies(
        &stack.esc,
        "blog.posts",
        &set([copy("blog.posts", "1", None, json!({"title": "t2", "author": {"_id": "5a84a8b826993bde57c12893", "name": "Ann"}, "changed": ["title"]}))]),
        log,
    )
    .await?;
    Ok(())
}

/// A script that throws, one that never returns and one that returns garbage dead-letter
/// their documents with the script's error, counted by type; the others are indexed and the
/// stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_scripts_dead_letter_their_documents_and_the_stream_goes_on() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let items = stack.client.database("js").collection::<Document>("items");
    let state = TempDir::new("state");
    let scripts = r#"  scriptLimits: {timeoutMs: 200}
  scripts:
    - namespace: js.items
      script: |
        module.exports = function(doc) {
          if (doc.kind === "throw") throw new Error("bad item " + doc._id);
          if (doc.kind === "loop") { while (true) {} }
          if (doc.kind === "garbage") return 42;
          doc.seen = true;
          return doc;
        }
"#;
    let monsoon = Monsoon::start(bin(), &stack.pipeline("jsfail", &["js.items"], scripts), state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    items.insert_many([doc! {"_id": 1, "kind": "ok"}, doc! {"_id": 2, "kind": "throw"}, doc! {"_id": 3, "kind": "loop"}, doc! {"_id": 4, "kind": "garbage"}, doc! {"_id": 5, "kind": "ok"}]).await?;
    let log = || format!("{}\n{}", monsoon.get("/metrics").map(|m| m.1).unwrap_or_default().lines().filter(|l| l.contains("events") || l.contains("bulk")).collect::<Vec<_>>().join("\n"), monsoon.log());
    wait_copies(
        &stack.esc,
        "js.items",
        &set([copy("js.items", "1", None, json!({"kind": "ok", "seen": true})), copy("js.items", "5", None, json!({"kind": "ok", "seen": true}))]),
        log,
    )
    .await?;
    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let letters: Vec<Value> = dead_letters(&stack.esc).await?.into_iter().filter(|l| l["namespace"] == "js.items").collect();
        if letters.len() >= 3 || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let by_id = |id: &str| letters.iter().find(|l| l["id"] == id).cloned().unwrap_or_default();
    assert_eq!(by_id("2")["errorType"], "script_threw", "{letters:#?}");
    assert!(by_id("2")["reason"].as_str().unwrap_or("").contains("bad item 2"), "{letters:#?}");
    assert_eq!(by_id("3")["errorType"], "script_timeout", "{letters:#?}");
    assert_eq!(by_id("4")["errorType"], "script_bad_return", "{letters:#?}");
    let metrics = monsoon.get("/metrics").expect("metrics").1;
    assert!(metrics.contains("error_type=\"script_timeout\""), "{metrics}");
    // The stream goes on after them.
    items.insert_one(doc! {"_id": 6, "kind": "ok"}).await?;
    wait_copies(
        &stack.esc,
        "js.items",
        &set([
            copy("js.items", "1", None, json!({"kind": "ok", "seen": true})),
            copy("js.items", "5", None, json!({"kind": "ok", "seen": true})),
            copy("js.items", "6", None, json!({"kind": "ok", "seen": true})),
        ]),
        log,
    )
    .await?;
    // The script never names `_meta_monstache`: it cannot move documents, so none of them
    // carries the cost of a location record (issue 16's script figures: 2.2x plain).
    assert_eq!(count(&stack.esc, "monsoon-locations").await?, 0, "location records for a script that cannot move documents");
    Ok(())
}

/// A Monstache configuration holding its documentation's examples, through `monsoon convert`
/// and then `monsoon run`: a global `_.omit` script, comments routed by `post_id`
/// (`routing = true`), the question/answer join, the soft-delete "dropping" script, `findId`
/// embedding, a `[[filter]]`, the field-watch `[[pipeline]]`, `index-as-update` and a
/// `[[mapping]]` index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monstache_config_converts_and_runs() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    stack.sharded_index("comments").await?;
    let db = stack.client.database("blog");
    stack.sharded_index("blog.qa").await?;
    let comments = db.collection::<Document>("comments");
    let watched = db.collection::<Document>("watched");
    let qa = db.collection::<Document>("qa");
    let soft = db.collection::<Document>("notes");
    let posts = db.collection::<Document>("posts");
    comments.insert_one(doc! {"_id": 1, "text": "a", "post_id": "p1", "password": "x"}).await?;
    watched.insert_one(doc! {"_id": 1, "foo": 1, "count": 1, "interesting": true}).await?;
    let ann = mongodb::bson::oid::ObjectId::parse_str("5a84a8b826993bde57c12893")?;
    db.collection::<Document>("users").insert_one(doc! {"_id": ann, "name": "Ann"}).await?;
    posts.insert_one(doc! {"_id": 1, "title": "t", "author": ann}).await?;
    qa.insert_many([doc! {"_id": "q1", "type": "question", "text": "Q"}, doc! {"_id": "a1", "type": "answer", "text": "A", "question": "q1"}]).await?;
    soft.insert_many([doc! {"_id": 1, "text": "kept"}, doc! {"_id": 2, "text": "gone", "deletedAt": 1}]).await?;
    let toml = format!(
        r#"
mongo-url = "{mongo}"
elasticsearch-urls = ["{es}"]
direct-read-namespaces = ["blog.comments", "blog.watched", "blog.qa", "blog.notes", "blog.posts"]
change-stream-namespaces = ["blog.comments", "blog.watched", "blog.qa", "blog.notes", "blog.posts"]
index-as-update = true

[[mapping]]
namespace = "blog.comments"
index = "comments"

[[script]]
script = """
module.exports = function(doc, ns, updateDesc) {{
  return _.omit(doc, "password", "secret");
}}
"""

[[script]]
namespace = "blog.comments"
routing = true
script = """
module.exports = function(doc) {{
  doc._meta_monstache = {{ routing: doc.post_id }};
  return doc;
}}
"""

[[script]]
namespace = "blog.qa"
routing = true
script = """
module.exports = function(doc) {{
        var routing;
        if (doc.type === "question") {{
                routing = doc._id;
                doc.my_join_field = {{
                   name: "question"
                }}
        }} else if (doc.type === "answer") {{
                routing = doc.question;
                doc.my_join_field = {{
                  name: "answer",
                  parent: routing
                }};
        }}
        if (routing) {{
                doc._meta_monstache = {{ routing: routing }};
        }}
        return _.omit(doc, "type", "question");
}}
"""

[[script]]
namespace = "blog.notes"
script = """
module.exports = function(doc) {{
	if (!!doc.deletedAt) {{
		return false;
	}}
	return true;
}}
"""

[[script]]
namespace = "blog.posts"
script = """
module.exports = function(post) {{
    if (post.author) {{ // author is a an object id reference
        post.author = findId(post.author, {{
          database: "blog",
          collection: "users"
        }});
    }}
    return post;
}}
"""

[[filter]]
namespace = "blog.watched"
script = """
module.exports = function(doc, ns, updateDesc) {{
  return !!doc.interesting;
}}
"""

[[pipeline]]
namespace = "blog.watched"
script = """
module.exports = function(ns, changeStream) {{
  if (changeStream) {{
    return [{{ $match: {{ $or: [{{ "updateDescription": {{ $exists: false }} }}, {{ "updateDescription.updatedFields.foo": {{ $exists: true }} }}] }} }}];
  }}
  return [];
}}
"""
"#,
        mongo = stack.mongo.uri(),
        es = stack.os_url
    );
    let state = TempDir::new("state");
    let config = state.path().join("monstache.toml");
    std::fs::write(&config, toml)?;
    let out = std::process::Command::new(bin()).arg("convert").arg(&config).arg("--name").arg("blog").output()?;
    anyhow::ensure!(out.status.success(), "convert failed: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout)?;
    let notes = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(notes.contains("[[script]].routing"), "{notes}");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;
    let log = || format!("{yaml}\n{notes}\n{}", monsoon.log());
    wait_copies(&stack.esc, "comments", &set([copy("comments", "1", Some("p1"), json!({"text": "a", "post_id": "p1"}))]), log).await?;
    wait_copies(&stack.esc, "blog.watched", &set([copy("blog.watched", "1", None, json!({"foo": 1, "count": 1, "interesting": true}))]), log).await?;
    wait_copies(
        &stack.esc,
        "blog.qa",
        &set([
            copy("blog.qa", "q1", Some("q1"), json!({"text": "Q", "my_join_field": {"name": "question"}})),
            copy("blog.qa", "a1", Some("q1"), json!({"text": "A", "my_join_field": {"name": "answer", "parent": "q1"}})),
        ]),
        log,
    )
    .await?;
    wait_copies(&stack.esc, "blog.notes", &set([copy("blog.notes", "1", None, json!({"text": "kept"}))]), log).await?;
    wait_copies(&stack.esc, "blog.posts", &set([copy("blog.posts", "1", None, json!({"title": "t", "author": {"_id": "5a84a8b826993bde57c12893", "name": "Ann"}}))]), log).await?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    // Soft-deleted by an update: the dropping script removes it from the index.
    soft.update_one(doc! {"_id": 1}, doc! {"$set": {"deletedAt": 2}}).await?;
    wait_copies(&stack.esc, "blog.notes", &set([]), log).await?;

    // Not a watched field: not synced. A watched one: synced. Filtered out: ignored.
    watched.update_one(doc! {"_id": 1}, doc! {"$set": {"count": 2}}).await?;
    watched.insert_one(doc! {"_id": 2, "foo": 1, "interesting": false}).await?;
    comments.update_one(doc! {"_id": 1}, doc! {"$set": {"post_id": "p2"}}).await?;
    wait_copies(&stack.esc, "comments", &set([copy("comments", "1", Some("p2"), json!({"text": "a", "post_id": "p2"}))]), log).await?;
    wait_copies(&stack.esc, "blog.watched", &set([copy("blog.watched", "1", None, json!({"foo": 1, "count": 1, "interesting": true}))]), log).await?;
    watched.update_one(doc! {"_id": 1}, doc! {"$set": {"foo": 2}}).await?;
    wait_copies(&stack.esc, "blog.watched", &set([copy("blog.watched", "1", None, json!({"foo": 2, "count": 2, "interesting": true}))]), log).await?;
    Ok(())
}

/// Monstache's high-score example: a script sends some documents to another index through
/// `_meta_monstache.index`. A document crossing the threshold moves (no copy left), and
/// dropping the collection deletes both indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_a_script_chooses_moves_documents_and_goes_with_the_collection() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let comments = stack.client.database("blog").collection::<Document>("comments");
    comments.insert_many([doc! {"_id": 1, "score": 150, "post_id": "p"}, doc! {"_id": 2, "score": 5, "post_id": "p"}]).await?;
    let state = TempDir::new("state");
    let scripts = r#"  scripts:
    - namespace: blog.comments
      script: |
        module.exports = function(doc) {
          if (doc.score >= 100) {
            doc._meta_monstache = { index: "blog.comments.highscore", routing: doc.post_id };
          } else {
            doc._meta_monstache = { routing: doc.post_id };
          }
          return doc;
        }
"#;
    let monsoon = Monsoon::start(bin(), &stack.pipeline("hs", &["blog.comments"], scripts), state.path())?;
    let log = || monsoon.log();
    wait_copies(
        &stack.esc,
        "blog.comments*",
        &set([
            copy("blog.comments.highscore", "1", Some("p"), json!({"score": 150, "post_id": "p"})),
            copy("blog.comments", "2", Some("p"), json!({"score": 5, "post_id": "p"})),
        ]),
        log,
    )
    .await?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    comments.update_one(doc! {"_id": 2}, doc! {"$set": {"score": 500}}).await?;
    wait_copies(
        &stack.esc,
        "blog.comments*",
        &set([
            copy("blog.comments.highscore", "1", Some("p"), json!({"score": 150, "post_id": "p"})),
            copy("blog.comments.highscore", "2", Some("p"), json!({"score": 500, "post_id": "p"})),
        ]),
        log,
    )
    .await?;
    comments.drop().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        let exists = |index: &'static str| {
            let esc = stack.esc.clone();
            async move { esc.indices().exists(elasticsearch::indices::IndicesExistsParts::Index(&[index])).send().await.map(|r| r.status_code().as_u16() != 404) }
        };
        if !exists("blog.comments").await? && !exists("blog.comments.highscore").await? {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the drop left an index behind\n{}", tail(&log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// `ingestPipeline`: every document of the namespace goes through the named Elasticsearch
/// ingest pipeline (on noida-db, whose ingest module has the `set` processor; the OpenSearch
/// node here is built without ingest-common).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_go_through_the_ingest_pipeline() -> anyhow::Result<()> {
    let stack = monsoon_testkit::Stack::start(&[]).await?;
    let r = stack
        .esc
        .ingest()
        .put_pipeline(elasticsearch::ingest::IngestPutPipelineParts::Id("tag"))
        .body(json!({"processors": [{"set": {"field": "tagged", "value": true}}]}))
        .send()
        .await?;
    anyhow::ensure!(r.status_code().is_success(), "pipeline: {}", r.text().await?);
    let coll = stack.client.database("shop").collection::<Document>("orders");
    coll.insert_one(doc! {"_id": 1, "a": 1}).await?;
    let state = TempDir::new("state");
    let mapping = "  mappings:\n    - namespace: shop.orders\n      ingestPipeline: tag\n";
    let monsoon = Monsoon::start(bin(), &stack.pipeline("ingest", &["shop.orders"], mapping), state.path())?;
    let deadline = Instant::now() + WAIT;
    loop {
        let r = stack.esc.get(elasticsearch::GetParts::IndexId("shop.orders", "1")).send().await?;
        let body: Value = r.json().await.unwrap_or_default();
        if body["found"] == true {
            assert_eq!(body["_source"], json!({"a": 1, "tagged": true}));
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "not indexed\n{}", tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}
