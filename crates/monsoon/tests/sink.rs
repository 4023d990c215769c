//! The engine's sink against noida-db, driven directly: what a forced stop does while
//! Elasticsearch is healthy.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use monsoon_engine::config::{BatchConfig, ElasticAuth, ElasticConfig};
use monsoon_engine::metrics::{Health, Metrics};
use monsoon_engine::sink::elasticsearch::Elastic as Client;
use monsoon_engine::sink::{Chunk, Shared, Sink, SinkSettings, Write, CHUNK};
use monsoon_engine::sink::Op;
use monsoon_testkit::{count, init_crypto, Elastic};
use tokio_util::sync::CancellationToken;

const TOTAL: usize = 5120;
const ABORT_AT: usize = 500;

/// A worker that lost its lease (or whose shutdown grace ran out) cancels the sink's abort
/// token. Elasticsearch still accepts everything here, so no delivery ever backs off: the sink
/// must notice the token itself, abandon what it holds and send nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_stop_abandons_the_backlog_while_elasticsearch_is_healthy() -> anyhow::Result<()> {
    init_crypto();
    let es = Elastic::start()?;
    let esc = es.client()?;
    let client = Client::new(&ElasticConfig {
        urls: vec![es.url()],
        auth: ElasticAuth::None,
        ca_pem: None,
        client_identity: None,
        gzip: false,
        request_timeout: Duration::from_secs(30),
    })?;
    let shared = Shared::new(Default::default(), Metrics::new("forced"), Arc::new(Health::new(Duration::from_secs(120))));
    let abort = CancellationToken::new();
    let settings = SinkSettings {
        batch: BatchConfig { max_docs: 50, concurrency: 1, ..BatchConfig::default() },
        dead_letter_index: Arc::from("monsoon-deadletter"),
        pipeline: Arc::from("forced"),
        locations: None,
        shard: Default::default(),
    };
    let sink = Sink::start(client, settings, shared.clone(), abort.clone());
    let (ns, index): (Arc<str>, Arc<str>) = (Arc::from("db.c"), Arc::from("forced"));
    let mut handed_over = 0;
    let mut chunk = Chunk::default();
    for i in 0..TOTAL {
        if i == ABORT_AT {
            abort.cancel();
        }
        let op = Op::Index(Bytes::from(format!("{{\"n\":{i}}}")));
        let write = Write::new(ns.clone(), index.clone(), format!("\"{i}\"").into(), 1, op);
        chunk.push(write);
        if chunk.len() >= CHUNK {
            if tokio::time::timeout(Duration::from_secs(10), sink.send_chunk(std::mem::take(&mut chunk))).await?.is_err() {
                break;
            }
            handed_over = i + 1;
        }
    }
    // The sink may already have stopped taking writes (`Closed`); either way nothing more goes.
    let _ = tokio::time::timeout(Duration::from_secs(10), sink.send_chunk(chunk)).await?;
    tokio::time::timeout(Duration::from_secs(5), sink.close()).await?;
    // A request already sent when the sink stopped may still be applied by the server (it
    // cannot be called back); give it a second, then nothing more may arrive.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled = count(&esc, "forced").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = count(&esc, "forced").await?;
    assert_eq!(settled, later, "nothing may be written after the sink closed");
    // Only writes handed over before the abort can have been sent.
    assert!(
        later <= ABORT_AT,
        "the backlog must be abandoned, not delivered: {later} of {TOTAL} indexed ({handed_over} handed over)"
    );
    Ok(())
}
