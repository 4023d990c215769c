//! Workers against the real stand-ins (SecantusDB, noida-db) with their checkpoint leases in
//! kube-fake-client: sharding, re-sharding from merged checkpoints, and fencing (a zombie of the
//! same pod name, a hung API server, a holder whose clock is behind).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, PostParams};
use kube_fake_client::ClientBuilder;
use mongodb::bson::{doc, Document};
use monsoon_engine::checkpoint::configmap::{holder_pod, KEY_CHECKPOINT, KEY_HOLDER, KEY_RENEW_TIME};
use monsoon_engine::checkpoint::Checkpoint;
use monsoon_engine::config::{
    BatchConfig, ElasticAuth, ElasticConfig, EngineConfig, HistoryLost, MongoConfig, NamespacePattern, Routing, Secret,
    Shard,
};
use monsoon_engine::metrics::{Health, Metrics};
use monsoon_operator::worker::{self, Error};
use monsoon_testkit::{insert_all, sample_docs, Stack};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NAME: &str = "orders";

fn engine(stack: &Stack, shard: Shard) -> EngineConfig {
    EngineConfig {
        name: NAME.into(),
        mongodb: MongoConfig {
            uri: Secret(stack.mongo.uri()),
            ca_file: None,
            client_cert_key_file: None,
            connect_timeout: Duration::from_secs(10),
        },
        elasticsearch: ElasticConfig {
            urls: vec![stack.es.url()],
            auth: ElasticAuth::None,
            ca_pem: None,
            client_identity: None,
            gzip: false,
            request_timeout: Duration::from_secs(30),
        },
        routing: Routing {
            include: vec![NamespacePattern {
                database: "shop".into(),
                collection: Some("orders".into()),
            }],
            exclude: Vec::new(),
            indexes: BTreeMap::new(),
            ..Routing::default()
        },
        snapshot: true,
        collection_streams: false,
        snapshot_split: None,
        files: None,
        shared_indexes: Default::default(),
        stream_from: None,
        resnapshot: None,
        batch: BatchConfig::default(),
        on_history_lost: HistoryLost::Fail,
        delete_index_on_drop: true,
        dead_letter_index: "monsoon-deadletter".into(),
        checkpoint_interval: Duration::from_millis(300),
        shard,
        mappings: Vec::new(),
        locations_index: monsoon_engine::sink::locations::DEFAULT_INDEX.into(),
        time_machine: None,
        merge_patches: None,
        relate: Vec::new(),
        scripts: Default::default(),
    }
}

struct Running {
    metrics: Metrics,
    stop: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

fn start(stack: &Stack, api: &Api<ConfigMap>, shard: Shard, pod: &str, lease: Duration) -> Running {
    start_with(api, engine(stack, shard), pod, lease)
}

fn start_with(api: &Api<ConfigMap>, engine: EngineConfig, pod: &str, lease: Duration) -> Running {
    let shard = engine.shard;
    let metrics = Metrics::new(NAME);
    let health = Arc::new(Health::new(Duration::from_secs(120)));
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker::run(
        api.clone(),
        worker::Shard {
            engine,
            configmap: monsoon_operator::workload::checkpoint_name(NAME, shard.index, shard.count),
            pod: pod.into(),
            lease,
            grace: Duration::from_secs(5),
        },
        metrics.clone(),
        health,
        stop.clone(),
    ));
    Running { metrics, stop, task }
}

impl Running {
    async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task")
    }

    fn indexed(&self) -> u64 {
        self.metrics.hot.indexed.get()
    }
}

async fn kube_api() -> Api<ConfigMap> {
    monsoon_testkit::init_crypto();
    let client = ClientBuilder::new().build().await.expect("fake client");
    Api::namespaced(client, "shop")
}

async fn checkpoint_of(api: &Api<ConfigMap>, name: &str) -> (BTreeMap<String, String>, Checkpoint) {
    let data = api.get(name).await.expect("configmap").data.unwrap_or_default();
    let cp = serde_json::from_str(data.get(KEY_CHECKPOINT).expect("checkpoint written")).expect("checkpoint json");
    (data, cp)
}

async fn converge(stack: &Stack) {
    let report = stack.converged("shop", "orders", "shop.orders").await.expect("compare");
    assert!(report.converged(), "not converged: {report:?}");
}

#[tokio::test]
async fn shards_split_the_documents_converge_and_reshard_from_merged_checkpoints() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 1500)).await.expect("seed");
    let api = kube_api().await;
    let lease = Duration::from_secs(3);

    // Two shards: every document lands exactly once, split between them.
    let two: Vec<Running> = (0..2)
        .map(|index| start(&stack, &api, Shard { index, count: 2 }, &format!("w2-{index}"), lease))
        .collect();
    insert_all(&orders, sample_docs(1500, 500)).await.expect("insert while running");
    orders.update_many(doc! {"_id": {"$lt": 300}}, doc! {"$set": {"status": "refunded"}}).await.expect("update");
    orders.delete_many(doc! {"_id": {"$gte": 1900}}).await.expect("delete");
    converge(&stack).await;
    let shares: Vec<u64> = two.iter().map(Running::indexed).collect();
    assert!(shares.iter().all(|&n| n > 400), "each shard indexes its share: {shares:?}");
    let total: u64 = shares.iter().sum();
    // 2000 inserts and 300 updates. A document inserted or updated while the snapshot runs
    // can be written twice by its own shard (snapshot, then the newer stream version), so at
    // most 1500 + 2 × 500 + 2 × 300 = 3100; both shards writing every document would give at
    // least 2 × 2300 = 4600.
    assert!((1900..=3100).contains(&total), "each document written by one shard only: {shares:?}");
    for w in two {
        w.stop().await.expect("clean stop");
    }
    let mut old = Vec::new();
    for index in 0..2 {
        let (data, cp) = checkpoint_of(&api, &format!("{NAME}-checkpoint-{index}-of-2")).await;
        assert_eq!(data.get(KEY_HOLDER).map(String::as_str), Some(""), "released on stop");
        assert_eq!(cp.shard, Some(Shard { index, count: 2 }));
        assert!(cp.snapshot.done);
        old.push(cp);
    }

    // Changes while no worker runs, then three shards from the merged checkpoints.
    insert_all(&orders, sample_docs(5000, 300)).await.expect("insert while stopped");
    orders.delete_many(doc! {"_id": {"$lt": 100}}).await.expect("delete while stopped");
    for index in 0..3 {
        let merged = Checkpoint::merge_for_reshard(NAME, &old, Shard { index, count: 3 });
        assert!(merged.snapshot.done, "no re-snapshot after a clean stop");
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("{NAME}-checkpoint-{index}-of-3")),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(KEY_CHECKPOINT.to_string(), serde_json::to_string(&merged).expect("json"))])),
            ..ConfigMap::default()
        };
        api.create(&PostParams::default(), &cm).await.expect("seed new layout");
    }
    let three: Vec<Running> = (0..3)
        .map(|index| start(&stack, &api, Shard { index, count: 3 }, &format!("w3-{index}"), lease))
        .collect();
    orders.update_many(doc! {"_id": {"$gte": 5000}}, doc! {"$set": {"status": "late"}}).await.expect("update");
    converge(&stack).await;
    for w in three {
        let indexed = w.indexed();
        w.stop().await.expect("clean stop");
        assert!(indexed < 1000, "a new shard replays only the changes since the old positions, not a snapshot: {indexed}");
    }
}

#[tokio::test]
async fn a_worker_waits_for_a_held_lease_and_stops_at_once_when_it_is_taken_over() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 300)).await.expect("seed");
    let api = kube_api().await;
    let cm_name = format!("{NAME}-checkpoint-0-of-1");
    let now_ms = || now_millis().to_string();
    // A previous pod still holds the lease for another ~2 s.
    let held = lease_held_by_old_pod(&cm_name, now_ms());
    api.create(&PostParams::default(), &held).await.expect("held lease");
    let started = Instant::now();
    let w = start(&stack, &api, Shard::default(), "new-pod", Duration::from_secs(3));
    converge(&stack).await;
    assert!(started.elapsed() >= Duration::from_secs(1), "must wait for the old holder's lease to run out");
    let (data, _) = checkpoint_of(&api, &cm_name).await;
    assert_eq!(holder_pod(&data[KEY_HOLDER]), "new-pod");

    // Another worker takes the lease over (this one was partitioned, say).
    let mut cm = api.get(&cm_name).await.expect("cm");
    let data = cm.data.get_or_insert_with(BTreeMap::new);
    data.insert(KEY_HOLDER.into(), "intruder".into());
    data.insert(KEY_RENEW_TIME.into(), now_ms());
    data.insert("leaseDurationSeconds".into(), "60".into());
    let taken = api.replace(&cm_name, &PostParams::default(), &cm).await.expect("takeover");
    let fenced_at = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(10), w.task).await.expect("stops within 10 s").expect("task");
    assert!(matches!(result, Err(Error::LeaseLost(_))), "{result:?}");
    assert!(fenced_at.elapsed() < Duration::from_secs(3), "stops within one renewal period");
    let after = api.get(&cm_name).await.expect("cm");
    assert_eq!(
        after.metadata.resource_version, taken.metadata.resource_version,
        "the fenced worker must not write anything after losing the lease"
    );
}

#[tokio::test]
async fn with_shards_a_drop_removes_each_shards_documents_but_not_newer_ones() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 400)).await.expect("seed");
    let api = kube_api().await;
    let two: Vec<Running> = (0..2)
        .map(|index| start(&stack, &api, Shard { index, count: 2 }, &format!("w-{index}"), Duration::from_secs(3)))
        .collect();
    converge(&stack).await;
    // Drop, then re-create the collection with new documents at once: one shard may still
    // be before the drop while the other already writes the new documents.
    orders.drop().await.expect("drop");
    insert_all(&orders, sample_docs(10_000, 50)).await.expect("re-create");
    converge(&stack).await;
    assert_eq!(monsoon_testkit::count(&stack.esc, "shop.orders").await.expect("count"), 50);
    for w in two {
        w.stop().await.expect("clean stop");
    }
}

/// Issue 16, fault 3, end to end: shards own documents by their MongoDB `_id`, but with
/// `mappings[].id` the Elasticsearch `_id` is another field. A re-snapshot's sweep that owned
/// documents by the Elasticsearch `_id` would have each shard delete live documents the other
/// wrote. Here both shards re-snapshot (asked for by hand) after deletes made while they were
/// stopped: the deleted documents go, every other one stays.
#[tokio::test]
async fn sharded_resnapshots_with_ids_from_a_field_sweep_only_what_is_gone() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    let docs: Vec<Document> = (0..400).map(|i| doc! {"_id": i, "sku": format!("sku-{i:04}"), "n": i}).collect();
    orders.insert_many(docs).await.expect("seed");
    let api = kube_api().await;
    let mapping: monsoon_api::Mapping = serde_json::from_value(serde_json::json!({"namespace": "shop.orders", "id": "sku"})).expect("mapping");
    let config = |index: u32, resnapshot: Option<&str>| EngineConfig {
        mappings: vec![mapping.clone()],
        resnapshot: resnapshot.map(Into::into),
        ..engine(&stack, Shard { index, count: 2 })
    };
    let count = || async { monsoon_testkit::count(&stack.esc, "shop.orders").await.expect("count") };
    let lease = Duration::from_secs(3);
    let two: Vec<Running> = (0..2).map(|i| start_with(&api, config(i, None), &format!("w-{i}"), lease)).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while count().await < 400 {
        assert!(Instant::now() < deadline, "not all indexed: {}", count().await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for w in two {
        w.stop().await.expect("clean stop");
    }
    // Deleted while both shards are stopped; the re-snapshot does not stream these deletes (it
    // starts after them), so only its sweep can remove them.
    orders.delete_many(doc! {"_id": {"$lt": 20}}).await.expect("delete");
    let two: Vec<Running> = (0..2).map(|i| start_with(&api, config(i, Some("again")), &format!("w-{i}"), lease)).collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut done = true;
        for i in 0..2 {
            let (_, cp) = checkpoint_of(&api, &monsoon_operator::workload::checkpoint_name(NAME, i, 2)).await;
            done &= cp.resnapshot_token.as_deref() == Some("again") && cp.snapshot.done && cp.sweep_below.is_none();
        }
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "the re-snapshots did not finish");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while count().await != 380 {
        if Instant::now() >= deadline {
            let records = monsoon_testkit::hits(&stack.esc, "monsoon-locations").await.expect("records");
            eprintln!("{} location records left; the first: {:?}", records.len(), records.iter().take(3).collect::<Vec<_>>());
        }
        assert!(Instant::now() < deadline, "expected the 380 live documents, found {}", count().await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let ids: std::collections::BTreeSet<String> = monsoon_testkit::hits(&stack.esc, "shop.orders")
        .await
        .expect("hits")
        .iter()
        .filter_map(|h| h["_id"].as_str().map(str::to_owned))
        .collect();
    let want: std::collections::BTreeSet<String> = (20..400).map(|i| format!("sku-{i:04}")).collect();
    assert_eq!(ids, want);
    for w in two {
        w.stop().await.expect("clean stop");
    }
}

/// A client over the fake API server whose calls hang (no answer, no error) once `hang` is set,
/// as when the API server or the network path to it stalls. `raw` still answers, for the test.
fn stalling_api(raw: &kube::Client, hang: &Arc<AtomicBool>) -> Api<ConfigMap> {
    let (raw, hang) = (raw.clone(), hang.clone());
    let service = tower::service_fn(move |request| {
        let (raw, hang) = (raw.clone(), hang.clone());
        async move {
            if hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            raw.send(request).await
        }
    });
    Api::namespaced(kube::Client::new(service, "shop"), "shop")
}

/// Checkpoint ConfigMap `name` leased for 2 s by `old-pod`, last renewed at `renew_millis`.
fn lease_held_by_old_pod(name: &str, renew_millis: String) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (KEY_HOLDER.to_string(), "old-pod".to_string()),
            (KEY_RENEW_TIME.to_string(), renew_millis),
            ("leaseDurationSeconds".to_string(), "2".to_string()),
        ])),
        ..ConfigMap::default()
    }
}

fn now_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A StatefulSet pod replaced while the old process still runs (its node partitioned, the pod
/// force-deleted) has the same name. The replacement must wait for the old process's lease
/// instead of taking it as its own, so the two never sync the shard side by side.
#[tokio::test]
async fn a_replacement_pod_with_the_same_name_waits_for_the_old_processs_lease() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 200)).await.expect("seed");
    let api = kube_api().await;
    let lease = Duration::from_secs(2);
    let old = start(&stack, &api, Shard::default(), "orders-worker-0", lease);
    converge(&stack).await;

    let replacement = start(&stack, &api, Shard::default(), "orders-worker-0", lease);
    insert_all(&orders, sample_docs(1000, 100)).await.expect("insert while both run");
    converge(&stack).await;
    // Several of the old process's renewals, and longer than its lease.
    tokio::time::sleep(2 * lease).await;
    assert_eq!(
        replacement.indexed(),
        0,
        "the replacement synced while the old process of the same pod name held the lease"
    );
    assert!(!replacement.task.is_finished(), "the replacement keeps waiting");

    // The old process stops (releasing its lease): the replacement takes over and syncs.
    old.stop().await.expect("clean stop");
    insert_all(&orders, sample_docs(2000, 100)).await.expect("insert after the handover");
    converge(&stack).await;
    assert!(replacement.indexed() >= 100, "the replacement syncs once the lease is free");
    replacement.stop().await.expect("clean stop");
}

/// The API server stops answering while a worker holds its lease: the renewal hangs instead
/// of failing. The worker must stop on its own clock before the lease could run out for a
/// standby, not wait for an answer that never comes while it keeps writing.
#[tokio::test]
async fn a_worker_whose_api_calls_hang_stops_within_its_lease() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 200)).await.expect("seed");
    monsoon_testkit::init_crypto();
    let raw = ClientBuilder::new().build().await.expect("fake client");
    let hang = Arc::new(AtomicBool::new(false));
    let api = stalling_api(&raw, &hang);
    let lease = Duration::from_secs(3);
    let w = start(&stack, &api, Shard::default(), "orders-worker-0", lease);
    converge(&stack).await;

    hang.store(true, Ordering::SeqCst);
    let hung_at = Instant::now();
    let result = tokio::time::timeout(lease + Duration::from_secs(5), w.task)
        .await
        .expect("the worker kept running with its API calls hung, past its lease")
        .expect("task");
    assert!(matches!(result, Err(Error::LeaseLost(_))), "{result:?}");
    assert!(
        hung_at.elapsed() < lease,
        "stopped {:?} after the API hung; a standby may take the lease {lease:?} after the last renewal",
        hung_at.elapsed()
    );
}

/// The holder's clock is a minute behind this worker's: by the wall clock its `renewTime` is
/// always long past, yet it renews. The lease is live as long as its record keeps changing;
/// only when it stops changing for a full lease duration may the worker take it over.
#[tokio::test]
async fn a_renewed_lease_is_not_taken_over_whatever_the_holders_clock_says() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 100)).await.expect("seed");
    let api = kube_api().await;
    let cm_name = format!("{NAME}-checkpoint-0-of-1");
    let behind = || (now_millis() - 60_000).to_string();
    let held = lease_held_by_old_pod(&cm_name, behind());
    api.create(&PostParams::default(), &held).await.expect("held lease");
    let renewing = CancellationToken::new();
    let holder = {
        let (api, cm_name, renewing) = (api.clone(), cm_name.clone(), renewing.clone());
        tokio::spawn(async move {
            while !renewing.is_cancelled() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if let Ok(mut cm) = api.get(&cm_name).await {
                    if cm.data.as_ref().and_then(|d| d.get(KEY_HOLDER)).map(String::as_str) != Some("old-pod") {
                        return;
                    }
                    cm.data.get_or_insert_with(BTreeMap::new).insert(KEY_RENEW_TIME.into(), behind());
                    let _ = api.replace(&cm_name, &PostParams::default(), &cm).await;
                }
            }
        })
    };
    let w = start(&stack, &api, Shard::default(), "new-pod", Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(w.indexed(), 0, "a live lease was taken over because its holder's clock is behind");
    let data = api.get(&cm_name).await.expect("cm").data.unwrap_or_default();
    assert_eq!(data[KEY_HOLDER], "old-pod");

    // The holder dies: its record stops changing, and a lease duration later the worker takes over.
    renewing.cancel();
    holder.await.expect("holder task");
    // The last renewal was at most 500 ms before this.
    let silent = Instant::now();
    converge(&stack).await;
    assert!(
        silent.elapsed() >= Duration::from_millis(1500),
        "took over {:?} after the holder stopped renewing a 2 s lease",
        silent.elapsed()
    );
    let (data, _) = checkpoint_of(&api, &cm_name).await;
    assert_eq!(holder_pod(&data[KEY_HOLDER]), "new-pod");
    w.stop().await.expect("clean stop");
}

/// Relations in a sharded pipeline (`spec.relate`): every shard reads the changes of a
/// namespace with relations, and each writes only the related documents it owns, so a
/// customer's rename re-syncs each of its orders (read through a view) exactly once, split
/// between the shards, and the index equals the view.
#[tokio::test]
async fn sharded_relations_resync_each_related_document_once() {
    let stack = Stack::start(&[]).await.expect("stand-ins");
    let db = stack.client.database("shop");
    let customers = db.collection::<Document>("customers");
    customers.insert_many((0..4).map(|c| doc! {"_id": c, "name": format!("customer {c}")})).await.expect("customers");
    let orders: Vec<Document> = (0..400).map(|i| doc! {"_id": i, "customer": i % 4, "total": i}).collect();
    db.collection::<Document>("orders").insert_many(orders).await.expect("orders");
    db.create_collection("orderview")
        .view_on("orders".to_string())
        .pipeline(vec![doc! {"$lookup": {"from": "customers", "localField": "customer", "foreignField": "_id", "as": "customer"}}])
        .await
        .expect("view");
    let api = kube_api().await;
    let relate: Vec<monsoon_api::Relate> = serde_json::from_value(serde_json::json!([
        {"namespace": "shop.orders", "withNamespace": "shop.orderview"},
        {"namespace": "shop.customers", "withNamespace": "shop.orders", "matchField": "customer"},
    ]))
    .expect("relations");
    let config = |index: u32| {
        let mut e = engine(&stack, Shard { index, count: 2 });
        let ns = |c: &str| NamespacePattern { database: "shop".into(), collection: Some(c.into()) };
        e.routing.include = vec![ns("orders"), ns("customers"), ns("orderview")];
        e.routing.snapshot_only = vec![ns("orderview")];
        e.routing.indexes = BTreeMap::from([("shop.orders".to_string(), "orders".to_string()), ("shop.orderview".to_string(), "orders".to_string())]);
        e.shared_indexes = ["orders".to_string()].into();
        e.relate = relate.clone();
        e
    };
    let two: Vec<Running> = (0..2).map(|index| start_with(&api, config(index), &format!("r-{index}"), Duration::from_secs(3))).collect();
    let view_converged = || async {
        let report = stack.converged("shop", "orderview", "orders").await.expect("compare");
        assert!(report.converged(), "not converged: {report:?}");
    };
    view_converged().await;
    let related = |w: &Running| w.metrics.events.with_label_values(&["related"]).get();
    assert_eq!(two.iter().map(related).sum::<u64>(), 0, "the snapshot relates nothing");

    // One rename re-syncs 100 orders; one order moves to another customer.
    customers.update_one(doc! {"_id": 1}, doc! {"$set": {"name": "renamed"}}).await.expect("rename");
    db.collection::<Document>("orders").update_one(doc! {"_id": 2}, doc! {"$set": {"customer": 1}}).await.expect("move");
    let deadline = Instant::now() + Duration::from_secs(90);
    while two.iter().map(related).sum::<u64>() < 101 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    view_converged().await;
    let shares: Vec<u64> = two.iter().map(related).collect();
    // The 100 orders of customer 1 (order 2 among them or not, depending on which change was
    // read first), plus order 2 through its own relation: 100 or 101, never twice each.
    assert!((100..=102).contains(&shares.iter().sum::<u64>()), "each related document written by its owner only: {shares:?}");
    assert!(shares.iter().all(|&n| n > 20), "both shards write their share: {shares:?}");
    for w in two {
        w.stop().await.expect("clean stop");
    }
}
