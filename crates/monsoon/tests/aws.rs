//! AWS request signing (SigV4) end to end: the `monsoon` binary syncs through a proxy that
//! verifies every signature with botocore as Amazon OpenSearch Service would
//! (`crates/testkit/py/sigv4_proxy.py`) and forwards to noida-db (or, once, to the real
//! OpenSearch node). Real AWS endpoints, web
//! identity (IRSA) and instance metadata are not reached here: the chain is aws-config's, and
//! its ECS container endpoint is the one served locally.

use std::path::Path;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use monsoon_testkit::sigv4::{SigV4Options, SigV4Proxy};
use monsoon_testkit::*;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_monsoon"))
}

const CONVERGE: Duration = Duration::from_secs(120);
const ACCESS_KEY: &str = "AKIDMONSOONTEST";
const SECRET_KEY: &str = "monsoon/test+secret/KEY0123456789abcdefgh";

fn options(service: &str, session_token: Option<&str>) -> SigV4Options {
    SigV4Options {
        region: "eu-west-1".into(),
        service: service.into(),
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        session_token: session_token.map(str::to_owned),
        ecs_credentials_seconds: None,
    }
}

/// The environment of a worker whose default AWS chain must find nothing but what the test
/// gives it: no shared files, no instance metadata (its 1 s probes would only slow a failure).
fn isolated_chain(dir: &Path) -> Vec<(String, String)> {
    vec![
        ("AWS_SHARED_CREDENTIALS_FILE".into(), dir.join("no-credentials").display().to_string()),
        ("AWS_CONFIG_FILE".into(), dir.join("no-config").display().to_string()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]
}

/// Snapshot of 1500 documents, then every change type from the stream; both must converge.
async fn sync_through(stack: &Stack, monsoon: &Monsoon, proxy: &SigV4Proxy) -> anyhow::Result<()> {
    sync_into(&stack.client, &stack.esc, monsoon, proxy).await
}

async fn sync_into(client: &mongodb::Client, esc: &elasticsearch::Elasticsearch, monsoon: &Monsoon, proxy: &SigV4Proxy) -> anyhow::Result<()> {
    let orders = client.database("shop").collection::<Document>("orders");
    let report = wait_converged(client, esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "after snapshot: {report:?}\n{}\n{}", tail(&monsoon.log(), 30), tail(&proxy.log(), 10));
    assert_eq!(report.mongo, 1500);
    orders.insert_one(doc! {"_id": "new", "name": "streamed"}).await?;
    orders.update_one(doc! {"_id": 1}, doc! {"$set": {"status": "updated"}}).await?;
    orders.replace_one(doc! {"_id": 2}, doc! {"replaced": true}).await?;
    orders.delete_one(doc! {"_id": 3}).await?;
    insert_all(&orders, sample_docs(10_000, 300)).await?;
    let report = wait_converged(client, esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "after changes: {report:?}\n{}\n{}", tail(&monsoon.log(), 30), tail(&proxy.log(), 10));
    Ok(())
}

fn assert_all_verified(proxy: &SigV4Proxy, expect: &str) {
    let log = proxy.log();
    assert!(!log.contains("rejected"), "every request must carry a valid signature:\n{}", tail(&log, 20));
    assert!(log.lines().any(|l| l.starts_with("verified POST /_bulk") && l.contains(expect)), "no verified bulk with `{expect}`:\n{}", tail(&log, 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_keys_from_env_sign_gzip_bulks_for_opensearch_service() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    insert_all(&stack.client.database("shop").collection("orders"), sample_docs(0, 1500)).await?;
    let proxy = SigV4Proxy::start(&stack.es.url(), &options("es", None))?;
    let state = TempDir::new("state");
    let aws = "    gzip: true\n    aws:\n      region: eu-west-1\n      accessKeyIdFrom: {env: TEST_AWS_KEY_ID}\n      secretAccessKeyFrom: {env: TEST_AWS_SECRET}\n";
    let yaml = pipeline_yaml("shop", &stack.mongo.uri(), &proxy.url(), &["shop.orders"], "  snapshot: true\n").replacen("\n  namespaces:", &format!("\n{aws}  namespaces:"), 1);
    let mut env = isolated_chain(state.path());
    env.extend([("TEST_AWS_KEY_ID".into(), ACCESS_KEY.into()), ("TEST_AWS_SECRET".into(), SECRET_KEY.into())]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    sync_through(&stack, &monsoon, &proxy).await?;
    assert_all_verified(&proxy, "encoding=gzip");
    assert!(!monsoon.log().contains(SECRET_KEY), "the secret key must never be logged");
    Ok(())
}

/// The same signed requests, gzip bodies and the `x-amz-*` headers included, reach a real
/// OpenSearch 2.19 node (`make opensearch`) behind the verifying proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_sync_into_a_real_opensearch_node() -> anyhow::Result<()> {
    let mongo = Mongo::start(&[])?;
    let client = mongo.client().await?;
    let opensearch = monsoon_testkit::opensearch::OpenSearch::start()?;
    let esc = opensearch.client()?;
    insert_all(&client.database("shop").collection("orders"), sample_docs(0, 1500)).await?;
    let proxy = SigV4Proxy::start(&opensearch.url(), &options("es", None))?;
    let state = TempDir::new("state");
    let aws = "    gzip: true\n    aws:\n      region: eu-west-1\n      accessKeyIdFrom: {env: TEST_AWS_KEY_ID}\n      secretAccessKeyFrom: {env: TEST_AWS_SECRET}\n";
    let yaml = pipeline_yaml("shop", &mongo.uri(), &proxy.url(), &["shop.orders"], "  snapshot: true\n").replacen("\n  namespaces:", &format!("\n{aws}  namespaces:"), 1);
    let mut env = isolated_chain(state.path());
    env.extend([("TEST_AWS_KEY_ID".into(), ACCESS_KEY.into()), ("TEST_AWS_SECRET".into(), SECRET_KEY.into())]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    sync_into(&client, &esc, &monsoon, &proxy).await?;
    assert_all_verified(&proxy, "encoding=gzip");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_token_signs_for_serverless_with_the_payload_hash() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    insert_all(&stack.client.database("shop").collection("orders"), sample_docs(0, 1500)).await?;
    let token = "FwoGZXIvYXdzEXAMPLE//session+token=";
    let proxy = SigV4Proxy::start(&stack.es.url(), &options("aoss", Some(token)))?;
    let state = TempDir::new("state");
    std::fs::write(state.path().join("secret"), format!("{SECRET_KEY}\n"))?;
    let aws = format!(
        "    aws:\n      region: eu-west-1\n      service: aoss\n      accessKeyIdFrom: {{env: TEST_AWS_KEY_ID}}\n      secretAccessKeyFrom: {{file: {}}}\n      sessionTokenFrom: {{env: TEST_AWS_TOKEN}}\n",
        state.path().join("secret").display()
    );
    let yaml = pipeline_yaml("shop", &stack.mongo.uri(), &proxy.url(), &["shop.orders"], "  snapshot: true\n").replacen("\n  namespaces:", &format!("\n{aws}  namespaces:"), 1);
    let mut env = isolated_chain(state.path());
    env.extend([("TEST_AWS_KEY_ID".into(), ACCESS_KEY.into()), ("TEST_AWS_TOKEN".into(), token.into())]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    sync_through(&stack, &monsoon, &proxy).await?;
    assert_all_verified(&proxy, "token=static");
    let log = monsoon.log();
    assert!(!log.contains(SECRET_KEY) && !log.contains(token), "credentials must never be logged");
    Ok(())
}

/// Monstache's `strategy = 1` with `profile` and `credentials-file`, as `monsoon convert`
/// advises it: no keys in the pipeline, `AWS_SHARED_CREDENTIALS_FILE` and `AWS_PROFILE` for
/// the default chain's profile provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_of_a_shared_credentials_file_signs_through_the_default_chain() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    insert_all(&stack.client.database("shop").collection("orders"), sample_docs(0, 1500)).await?;
    let proxy = SigV4Proxy::start(&stack.es.url(), &options("es", None))?;
    let state = TempDir::new("state");
    let file = state.path().join("aws-credentials");
    std::fs::write(&file, format!("[default]\naws_access_key_id = AKIDOTHER\naws_secret_access_key = other\n\n[sync]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"))?;
    let yaml = pipeline_yaml("shop", &stack.mongo.uri(), &proxy.url(), &["shop.orders"], "  snapshot: true\n").replacen("\n  namespaces:", "\n    aws:\n      region: eu-west-1\n  namespaces:", 1);
    let mut env = isolated_chain(state.path());
    env.retain(|(k, _)| k != "AWS_SHARED_CREDENTIALS_FILE");
    env.extend([("AWS_SHARED_CREDENTIALS_FILE".into(), file.display().to_string()), ("AWS_PROFILE".into(), "sync".into())]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    sync_through(&stack, &monsoon, &proxy).await?;
    assert_all_verified(&proxy, "token=none");
    Ok(())
}

/// No keys in the pipeline: aws-config's default chain finds the ECS container endpoint,
/// whose credentials live 40 s (short enough that monsoon keeps each set for half of that);
/// monsoon must fetch new ones before they lapse, and the proxy accepts only tokens it issued
/// that have not expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_chain_refreshes_expiring_credentials_before_they_lapse() -> anyhow::Result<()> {
    let stack = Stack::start(&[]).await?;
    let orders = stack.client.database("shop").collection::<Document>("orders");
    insert_all(&orders, sample_docs(0, 1500)).await?;
    // A refresh about every 20 s, each set still valid for 20 s more.
    let proxy = SigV4Proxy::start(&stack.es.url(), &SigV4Options { ecs_credentials_seconds: Some(40), ..options("es", None) })?;
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", &stack.mongo.uri(), &proxy.url(), &["shop.orders"], "  snapshot: true\n").replacen("\n  namespaces:", "\n    aws:\n      region: eu-west-1\n  namespaces:", 1);
    let mut env = isolated_chain(state.path());
    env.push(("AWS_CONTAINER_CREDENTIALS_FULL_URI".into(), proxy.ecs_credentials_url()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let monsoon = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    sync_through(&stack, &monsoon, &proxy).await?;
    // Keep streaming across at least one refresh.
    let started = Instant::now();
    let mut n = 20_000;
    while proxy.log().lines().filter(|l| l.starts_with("issued")).count() < 2 || started.elapsed() < Duration::from_secs(5) {
        assert!(started.elapsed() < Duration::from_secs(90), "no refresh within 90 s:\n{}", tail(&proxy.log(), 20));
        orders.insert_one(doc! {"_id": n, "tick": n}).await?;
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    orders.update_one(doc! {"_id": 4}, doc! {"$set": {"after": "refresh"}}).await?;
    let report = wait_converged(&stack.client, &stack.esc, "shop", "orders", "shop.orders", CONVERGE).await?;
    assert!(report.converged(), "after the refresh: {report:?}\n{}", tail(&proxy.log(), 20));
    // The second set signed requests, and nothing was refused: fetched ahead of expiry, not
    // after a refusal.
    assert_all_verified(&proxy, "token=ecs-token-2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_or_no_credentials_stop_with_one_clear_error() -> anyhow::Result<()> {
    let es = Elastic::start()?;
    let proxy = SigV4Proxy::start(&es.url(), &options("es", None))?;
    let wrong = "not-the-secret-key";
    // MongoDB is never reached: Elasticsearch is checked first.
    let aws = "    aws:\n      region: eu-west-1\n      accessKeyIdFrom: {env: TEST_AWS_KEY_ID}\n      secretAccessKeyFrom: {env: TEST_AWS_SECRET}\n";
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", "mongodb://127.0.0.1:1/", &proxy.url(), &["shop.orders"], "").replacen("\n  namespaces:", &format!("\n{aws}  namespaces:"), 1);
    let mut env = isolated_chain(state.path());
    env.extend([("TEST_AWS_KEY_ID".into(), ACCESS_KEY.into()), ("TEST_AWS_SECRET".into(), wrong.into())]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut m = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    assert_eq!(m.wait_exit(Duration::from_secs(30))?, Some(1));
    let log = m.log();
    let error_line = log.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
    assert!(error_line.contains("HTTP 403") && error_line.contains("spec.elasticsearch.aws"), "{log}");
    assert!(error_line.contains("signature we calculated does not match"), "{log}");
    assert!(!log.contains(wrong), "the secret must never be logged:\n{log}");
    assert!(proxy.log().contains("rejected GET /: signature mismatch"), "{}", proxy.log());
    drop(m);

    // No keys and an empty default chain: a clear error naming the field, not a hang.
    let state = TempDir::new("state");
    let yaml = pipeline_yaml("shop", "mongodb://127.0.0.1:1/", &proxy.url(), &["shop.orders"], "").replacen("\n  namespaces:", "\n    aws:\n      region: eu-west-1\n  namespaces:", 1);
    let env = isolated_chain(state.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut m = Monsoon::start_with(bin(), &yaml, state.path(), &[], &env)?;
    assert_eq!(m.wait_exit(Duration::from_secs(60))?, Some(1));
    let log = m.log();
    let error_line = log.lines().find(|l| l.starts_with("error: ")).unwrap_or("");
    assert!(error_line.contains("failed to load AWS credentials") && error_line.contains("spec.elasticsearch.aws"), "{log}");
    Ok(())
}
