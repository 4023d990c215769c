//! `make demo`: start the stand-ins, seed a shop database, run `monsoon run` on
//! `examples/shop.yaml`, and show the synced indexes, a search, and live changes arriving.
//!
//! Usage: `monsoon-demo <path of the monsoon binary>`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use elasticsearch::SearchParts;
use mongodb::bson::{doc, Document};
use monsoon_testkit::*;
use serde_json::{json, Value};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = PathBuf::from(std::env::args().nth(1).context("usage: monsoon-demo <monsoon binary>")?);
    println!("==> starting SecantusDB (MongoDB wire protocol) and noida-db (Elasticsearch API) on free ports");
    let mongo = Mongo::start(&[])?;
    let es = Elastic::start()?;
    println!("    MongoDB:       {}", mongo.uri());
    println!("    Elasticsearch: {}", es.url());
    let client = mongo.client().await?;
    let esc = es.client()?;

    println!("==> seeding shop.orders (5000 documents) and shop.customers (500)");
    let orders = client.database("shop").collection::<Document>("orders");
    let customers = client.database("shop").collection::<Document>("customers");
    insert_all(&orders, sample_docs(0, 5000)).await?;
    let people: Vec<Document> = (0..500)
        .map(|i| doc! {"_id": format!("c{i}"), "name": format!("Customer {i}"), "vip": i % 10 == 0})
        .collect();
    insert_all(&customers, people).await?;

    let template = std::fs::read_to_string(project_root().join("examples/shop.yaml"))?;
    let yaml = template
        .replace("mongodb://127.0.0.1:27017/?directConnection=true", &mongo.uri())
        .replace("http://127.0.0.1:9200", &es.url());
    let state = project_root().join(".demo");
    let _ = std::fs::remove_dir_all(&state);
    println!("==> monsoon run -f .demo/pipeline.yaml --state-dir .demo   (examples/shop.yaml with these ports)");
    let mut monsoon = Monsoon::start(&bin, &yaml, &state)?;
    println!("    endpoints: http://127.0.0.1:{}/{{healthz,readyz,metrics,stats}}", monsoon.http_port);

    for (coll, index) in [("orders", "shop.orders"), ("customers", "customers")] {
        let report = wait_converged(&client, &esc, "shop", coll, index, Duration::from_secs(120)).await?;
        println!(
            "    shop.{coll} -> {index}: {} documents in MongoDB, lost {}, stale {}, extra {}",
            report.mongo,
            report.lost.len(),
            report.stale.len(),
            report.extra
        );
        anyhow::ensure!(report.converged(), "demo did not converge:\n{}", tail(&monsoon.log(), 30));
    }

    println!("==> search: shipped orders of customer-42");
    let found: Value = esc
        .search(SearchParts::Index(&["shop.orders"]))
        .body(json!({"size": 3, "query": {"bool": {"must": [
            {"match": {"status": "shipped"}}, {"term": {"customer.keyword": "customer-42"}}]}}}))
        .send()
        .await?
        .json()
        .await?;
    println!("    {} hits; first ones:", found["hits"]["total"]["value"]);
    for hit in found["hits"]["hits"].as_array().cloned().unwrap_or_default() {
        println!("    _id={} {}", hit["_id"], hit["_source"]);
    }

    println!("==> live changes: insert, update, delete");
    orders.insert_one(doc! {"_id": 99_999, "sku": "LIVE-1", "status": "new"}).await?;
    orders.update_one(doc! {"_id": 1}, doc! {"$set": {"status": "refunded"}}).await?;
    orders.delete_one(doc! {"_id": 2}).await?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", Duration::from_secs(60)).await?;
    anyhow::ensure!(report.converged(), "live changes did not arrive: {report:?}");
    let one: Value = esc
        .get(elasticsearch::GetParts::IndexId("shop.orders", "1"))
        .send()
        .await?
        .json()
        .await?;
    println!("    order 1 is now: {}", one["_source"]["status"]);
    println!("    all changes arrived; stats: {}", monsoon.stats().unwrap_or_default());

    let (code, took) = monsoon.terminate()?;
    println!("==> SIGTERM: monsoon exited with {code:?} in {took:?}; checkpoint .demo/shop.checkpoint.json:");
    println!("{}", std::fs::read_to_string(state.join("shop.checkpoint.json")).unwrap_or_default());
    println!("==> demo done (servers stopped). Log: .demo/monsoon.log");
    Ok(())
}
