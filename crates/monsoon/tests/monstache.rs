//! Monstache's run modes, through the real `monsoon` binary against the stand-ins: one-shot
//! runs (`--once`, Monstache's `exit-after-direct-reads`), per-namespace snapshots
//! (`snapshotNamespaces`, its `direct-read-namespaces`), start points (`streamStart`, its
//! `resume-from-timestamp` and `replay`), systemd notification, and `monsoon convert` on
//! configurations as users write them.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use monsoon_testkit::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_snapshots_waits_for_every_acknowledgement_and_exits_zero() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let orders = client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 1500)).await?;
    let state = TempDir::new("once");
    let yaml = pipeline_yaml("once", &mongo.uri(), &es.url(), &["shop.orders"], "  snapshot: true\n");

    let started = Instant::now();
    let mut monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &["--once"], &[])?;
    let code = monsoon.wait_exit(Duration::from_secs(120))?;
    assert_eq!(code, Some(0), "{}", tail(&monsoon.log(), 30));
    // Acknowledged before the exit: the count is complete at once (a refresh, no polling).
    assert_eq!(count(&esc, "shop.orders").await?, 1500, "{}", tail(&monsoon.log(), 30));
    let cp = monsoon.checkpoint("once").expect("checkpoint stored");
    assert_eq!(cp["snapshot"]["done"], true, "{cp}");
    assert!(cp["streamStart"]["t"].as_u64().is_some(), "the stream's start is kept: {cp}");
    eprintln!("--once over 1500 documents took {:?}", started.elapsed());

    // Changes made after the one-shot run are followed by the next plain run: no gap.
    orders.update_one(doc! {"_id": 7}, doc! {"$set": {"status": "after-once"}}).await?;
    orders.delete_one(doc! {"_id": 8}).await?;
    let _follow = Monsoon::start(bin(), &yaml, state.path())?;
    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}");

    // `--once` with nothing to snapshot is refused before connecting anywhere.
    let no_snapshot = TempDir::new("once-no-snapshot");
    let file = no_snapshot.path().join("p.yaml");
    std::fs::write(&file, pipeline_yaml("nosnap", &mongo.uri(), &es.url(), &["shop.orders"], "  snapshot: false\n"))?;
    let out = Command::new(bin()).args(["run", "--once", "-f"]).arg(&file).arg("--state-dir").arg(no_snapshot.path()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.lines().any(|l| l.starts_with("error: --once") && l.contains("snapshot: true")), "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_snapshot_namespaces_are_snapshotted_and_the_others_streamed() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let shop = client.database("shop");
    insert_all(&shop.collection::<Document>("orders"), sample_docs(0, 300)).await?;
    insert_all(&shop.collection::<Document>("users"), sample_docs(0, 200)).await?;
    let state = TempDir::new("snapshot-ns");
    let yaml = pipeline_yaml("partial", &mongo.uri(), &es.url(), &["shop.*"], "  snapshot: true\n  snapshotNamespaces: [shop.orders]\n");
    let monsoon = Monsoon::start(bin(), &yaml, state.path())?;

    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "{report:?}\n{}", tail(&monsoon.log(), 30));
    monsoon.wait_stats(CONVERGE, |s| s["phase"] == "Streaming")?;
    // shop.users is followed, not read: only what changes after the start reaches its index.
    shop.collection::<Document>("users").insert_one(doc! {"_id": 1000, "name": "new"}).await?;
    shop.collection::<Document>("users").update_one(doc! {"_id": 5}, doc! {"$set": {"name": "changed"}}).await?;
    let deadline = Instant::now() + CONVERGE;
    while count(&esc, "shop.users").await? < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count(&esc, "shop.users").await?, 2, "the 200 existing users were not snapshotted\n{}", tail(&monsoon.log(), 30));
    let stats = monsoon.stats().expect("stats");
    assert_eq!(stats["snapshotDocuments"].as_u64(), Some(300), "{stats}");
    Ok(())
}

/// SecantusDB, unlike mongod, starts a stream opened before its oldest oplog entry at that
/// entry instead of failing with ChangeStreamHistoryLost: the start points below lie inside
/// the oplog, where both behave the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_start_replays_changes_made_before_the_pipeline_existed() -> anyhow::Result<()> {
    let Stack { mongo, es, client, esc } = Stack::start(&[]).await?;
    let shop = client.database("shop");
    let before = u32::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())? - 1;
    insert_all(&shop.collection::<Document>("orders"), sample_docs(0, 200)).await?;
    insert_all(&shop.collection::<Document>("users"), sample_docs(0, 100)).await?;
    shop.collection::<Document>("orders").delete_one(doc! {"_id": 3}).await?;

    // No snapshot: everything indexed comes from replaying the oplog.
    let at_state = TempDir::new("start-at");
    let at = pipeline_yaml("at", &mongo.uri(), &es.url(), &["shop.orders"], &format!("  snapshot: false\n  streamStart: {{timestamp: {before}}}\n"));
    let at_run = Monsoon::start(bin(), &at, at_state.path())?;
    let oldest_state = TempDir::new("start-oldest");
    let oldest = pipeline_yaml("oldest", &mongo.uri(), &es.url(), &["shop.users"], "  snapshot: false\n  streamStart: {oldest: true}\n");
    let oldest_run = Monsoon::start(bin(), &oldest, oldest_state.path())?;

    let report = wait_converged(&client, &esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged() && report.mongo == 199, "{report:?}\n{}", tail(&at_run.log(), 30));
    let report = wait_converged(&client, &esc, "shop", "users", "shop.users", CONVERGE).await?;
    assert!(report.converged() && report.mongo == 100, "{report:?}\n{}", tail(&oldest_run.log(), 30));
    // The start point is the checkpoint's stream start (used only while none is stored).
    let cp = at_run.checkpoint("at").expect("checkpoint");
    assert_eq!(cp["streamStart"]["t"].as_u64(), Some(u64::from(before)), "{cp}");
    let cp = oldest_run.checkpoint("oldest").expect("checkpoint");
    assert!(cp["streamStart"]["t"].as_u64().is_some_and(|t| t <= u64::from(before) + 1), "{cp}");
    Ok(())
}

/// Datagrams received on `socket` until `done` holds for them or `timeout`.
fn receive_until(socket: &UnixDatagram, timeout: Duration, done: impl Fn(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && !done(&got) {
        if let Ok(n) = socket.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_then_watchdog_pings_while_healthy() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    insert_all(&stack.client.database("shop").collection::<Document>("orders"), sample_docs(0, 50)).await?;
    let state = TempDir::new("systemd");
    let path = state.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path)?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let env = [("NOTIFY_SOCKET", path.to_str().expect("utf-8 path")), ("WATCHDOG_USEC", "1000000")];
    let mut monsoon = Monsoon::start_with(bin(), &stack.pipeline("notify", &["shop.orders"], "  snapshot: true\n"), state.path(), &[], &env)?;

    let got = receive_until(&socket, Duration::from_secs(60), |m| m.iter().any(|m| m == "READY=1") && m.iter().filter(|m| *m == "WATCHDOG=1").count() >= 3);
    let ready = got.iter().position(|m| m == "READY=1").unwrap_or_else(|| panic!("no READY=1: {got:?}\n{}", tail(&monsoon.log(), 30)));
    assert!(monsoon.get("/readyz").is_some_and(|(status, _)| status == 200), "READY=1 means ready");
    assert!(got[ready..].iter().filter(|m| *m == "WATCHDOG=1").count() >= 2, "pings every half WATCHDOG_USEC: {got:?}");
    assert_eq!(got.iter().filter(|m| *m == "READY=1").count(), 1, "{got:?}");
    let (code, _) = monsoon.terminate()?;
    assert_eq!(code, Some(0));
    let rest = receive_until(&socket, Duration::from_secs(2), |m| m.iter().any(|m| m == "STOPPING=1"));
    assert!(rest.iter().any(|m| m == "STOPPING=1"), "{rest:?}");

    // A pipeline that cannot start (Elasticsearch refuses connections) never says READY=1.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let yaml = pipeline_yaml("notready", &stack.mongo.uri(), &dead, &["shop.orders"], "");
    let state2 = TempDir::new("systemd-fail");
    let mut failing = Monsoon::start_with(bin(), &yaml, state2.path(), &[], &env)?;
    let got = receive_until(&socket, Duration::from_secs(5), |m| m.iter().any(|m| m == "READY=1"));
    assert!(!got.iter().any(|m| m == "READY=1"), "{got:?}");
    let _ = failing.terminate();
    Ok(())
}

#[test]
fn convert_turns_published_configs_into_pipelines_validate_accepts_or_one_line_refusals() -> anyhow::Result<()> {
    let dir = TempDir::new("convert");
    let good = dir.path().join("monstache.toml");
    std::fs::write(
        &good,
        "mongo-url = \"mongodb://admin:$MONGOPASSWORD@db-0:27017/?replicaSet=rs0\"\nelasticsearch-urls = [\"https://elastic:changeme@es:9200\"]\ndirect-read-namespaces = [\"shop.orders\"]\nexit-after-direct-reads = true\n[[mapping]]\nnamespace = \"shop.orders\"\nindex = \"Orders\"\n",
    )?;
    let out = Command::new(bin()).arg("convert").arg(&good).output()?;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout)?;
    assert!(!yaml.contains("changeme") && yaml.contains("--once"), "{yaml}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MONSOON_ES_PASSWORD") && stderr.contains("MONSOON_MONGODB_URI") && stderr.contains("lower-cased"), "{stderr}");
    let converted = dir.path().join("pipeline.yaml");
    std::fs::write(&converted, &yaml)?;
    let out = Command::new(bin()).arg("validate").arg("-f").arg(&converted).output()?;
    assert_eq!(out.status.code(), Some(0), "{}\n{yaml}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "direct-read-namespaces = [\"test.users\"]\n[[script]]\nnamespace = \"test.users\"\npath = \"scripts/missing.js\"\n")?;
    let out = Command::new(bin()).arg("convert").arg(&bad).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: ") && stderr.contains("`[[script]].path`") && stderr.contains("scripts/missing.js"), "{stderr}");
    Ok(())
}
