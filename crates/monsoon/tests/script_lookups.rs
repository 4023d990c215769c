//! Script lookups whose MongoDB fails, against the stand-ins: an outage is waited out (the
//! documents wait, holding their place, and are indexed once lookups answer: nothing is
//! dead-lettered), while a query MongoDB refuses is the document's own error and is
//! dead-lettered at once. Before, every lookup failure was retried five times (about 6 s) and
//! then dead-lettered, so an outage longer than that lost documents to the dead-letter index.

use std::path::Path;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use monsoon_testkit::*;
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const WAIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_outage_waits_and_a_refused_query_dead_letters() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let db = stack.client.database("shop");
    db.collection::<Document>("users").insert_many((0..20).map(|i| doc! {"_id": i, "name": format!("u{i}")})).await?;
    let orders = db.collection::<Document>("orders");
    let state = TempDir::new("state");
    let scripts = r#"  scripts:
    - namespace: shop.orders
      script: |
        module.exports = function(order) {
          if (order.broken) {
            order.user = findOne({ "$bogus": 1 }, { database: "shop", collection: "users" });
          } else {
            order.user = findId(order.user_id, { database: "shop", collection: "users" });
          }
          return order;
        }
"#;
    let monsoon = Monsoon::start(bin(), &stack.pipeline("lookups", &["shop.orders"], scripts), state.path())?;
    monsoon.wait_stats(WAIT, |s| s["phase"] == "Streaming")?;
    // Every `find` fails as an unreachable host would (code 6) for 12 s: longer than the old
    // five attempts took (~6 s) before dead-lettering.
    let admin = stack.client.database("admin");
    admin
        .run_command(doc! {"configureFailPoint": "failCommand", "mode": "alwaysOn", "data": {"failCommands": ["find"], "errorCode": 6}})
        .await?;
    let started = Instant::now();
    orders.insert_many((0..5).map(|i| doc! {"_id": i, "user_id": i})).await?;
    orders.insert_one(doc! {"_id": 100, "user_id": 1, "broken": true}).await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let early = dead_letters(&stack.esc).await.unwrap_or_default();
    admin.run_command(doc! {"configureFailPoint": "failCommand", "mode": "off"}).await?;
    assert!(early.is_empty(), "an outage dead-lettered documents: {early:#?}");
    assert_eq!(count(&stack.esc, "shop.orders").await.unwrap_or(0), 0, "written without their lookups");
    let deadline = Instant::now() + WAIT;
    loop {
        let indexed = count(&stack.esc, "shop.orders").await.unwrap_or(0);
        if indexed == 5 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{indexed} of 5 orders indexed\n{}", tail(&monsoon.log(), 40));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let waited = started.elapsed();
    let deadline = Instant::now() + WAIT;
    let letters = loop {
        let letters = dead_letters(&stack.esc).await?;
        if !letters.is_empty() || Instant::now() > deadline {
            break letters;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let ids: Vec<&Value> = letters.iter().map(|l| &l["id"]).collect();
    assert_eq!(letters.len(), 1, "only the refused query is dead-lettered: {letters:#?}");
    assert_eq!(letters[0]["errorType"], "script_threw", "{}", letters[0]);
    assert!(letters[0]["reason"].as_str().unwrap_or("").contains("MongoDB refused the query"), "{}", letters[0]);
    assert_eq!(ids, vec![&Value::String("100".into())]);
    let log = monsoon.log();
    assert!(log.contains("script call failed retriably"), "the failpoint never hit\n{}", tail(&log, 30));
    eprintln!("the outage held the orders {waited:?}");
    Ok(())
}
