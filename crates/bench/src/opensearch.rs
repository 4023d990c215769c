//! `--only opensearch`: monsoon into a real OpenSearch node (tools/opensearch, `make
//! opensearch`), SecantusDB as the source, against the node's own bulk ceiling measured in the
//! same run with the same documents, batch size and requests in flight.
//!
//! - Snapshot of N documents: monsoon's wall time (start to every document acknowledged)
//!   against the bench bulk-loading the same bulk bodies directly, alone before and after
//!   monsoon's run (the target's baseline), and beside SecantusDB's sorted read of the same
//!   documents (the pipeline's real bound: the source is part of every snapshot). SecantusDB
//!   answers a query only after scanning the whole collection (its first batch of 200k
//!   documents takes seconds, whatever the sort, hint or limit; MongoDB's walk of the `_id`
//!   index answers in milliseconds), and no pipeline can index a document before reading it:
//!   the section also times monsoon's wall from its first document read, and SecantusDB's
//!   first batch alone.
//! - Where the CPU went in each of those runs (the node, SecantusDB, monsoon, the bench, and
//!   the whole machine's busy share), and from it the floor no pipeline beats on this machine:
//!   the node's CPU of its ceiling run plus SecantusDB's CPU of the sorted read, shared out
//!   over the cores (and the same with the first batch served first, when nothing can be
//!   indexed yet).
//! - Streaming of M inserts: from the first insert to the last document acknowledged, and from
//!   the last insert to acknowledged (monsoon's `indexed`) and to visible (the node's `_count`,
//!   no refresh forced), against the bench's own pipeline under the same inserts: the same
//!   change stream, each batch bulk-loaded directly (same batch limits, same requests in
//!   flight).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use elasticsearch::Elasticsearch;
use futures_util::StreamExt;
use mongodb::bson::{doc, Document, RawDocumentBuf};
use monsoon_engine::config::BatchConfig;
use monsoon_engine::convert::{self, ConvertStats};
use monsoon_engine::sink::elasticsearch::request;
use monsoon_engine::sink::{Op, Write};
use monsoon_engine::source::mongodb::event::{self, Action};
use monsoon_testkit::opensearch::OpenSearch;
use monsoon_testkit::*;

use super::cpu::{Meter, Reading, Watched};
use super::{delete_index, es_ceiling, monsoon_pid, proc_usage, request_counts, rss_split, together_ceiling, wait_indexed};

/// How often the bench asks the node whether the last documents are visible.
const POLL: Duration = Duration::from_millis(50);

/// Documents of the warm-up load: the node runs the C1 compiler only (quick start, small heap),
/// and its first bulk requests run interpreted code; a cold ceiling would flatter monsoon.
const WARM_UP_DOCS: usize = 20_000;

pub async fn run(bin: &Path, n: i64, m: i64) -> anyhow::Result<()> {
    let batch = BatchConfig::default();
    // The oplog holds every insert of the section (SecantusDB prunes an open stream silently).
    let cap = (n + 2 * m + 10_000).to_string();
    let mongo = Mongo::start(&["--oplog-max-entries", &cap])?;
    let os = OpenSearch::start()?;
    let client = mongo.client().await?;
    let osc = os.client()?;
    let coll = client.database("bench").collection::<Document>("items");
    insert_all(&coll, sample_docs(0, n)).await?;
    let raw = client.database("bench").collection::<RawDocumentBuf>("items");
    let read = super::read_sorted(&raw).await?;
    let bodies = super::bulk_bodies(&read, "ceiling")?;
    drop(read);

    let warm = bodies.len().min(WARM_UP_DOCS / batch.max_docs);
    es_ceiling(&osc, bodies[..warm].to_vec()).await?;
    delete_index(&osc, "ceiling").await?;
    let (node, source, bench) = (Watched::Tree(os.pid().context("node pid")?), Watched::Tree(mongo.pid().context("SecantusDB pid")?), Watched::Alone(std::process::id()));
    let meter = Meter::start(&[node, bench]);
    let alone_before = es_ceiling(&osc, bodies.clone()).await?;
    let cpu_alone = meter.read();
    delete_index(&osc, "ceiling").await?;
    let meter = Meter::start(&[source, node]);
    let together = together_ceiling(&raw, &osc, bodies.clone(), n).await?;
    let cpu_together = meter.read();
    let meter = Meter::start(&[source]);
    let source_first = super::first_batch(&raw).await?;
    let cpu_first = meter.read();

    let state = TempDir::new("bench-os");
    // MONSOON_BENCH_SPEC: more of the pipeline's spec (indented YAML), to try other settings.
    let extra = std::env::var("MONSOON_BENCH_SPEC").unwrap_or_default();
    let yaml = pipeline_yaml("bench", &mongo.uri(), &os.url(), &["bench.items"], &extra);
    let meter = Meter::start(&[node, source, bench]);
    let super::SnapshotRun { wall, cpu, rss, rss_now, requests, busy, first_read } = super::snapshot_run(bin, &yaml, state.path(), n).await?;
    let cpu_run = meter.read();
    wait_visible(&osc, "bench.items", n as u64).await?;
    delete_index(&osc, "bench.items").await?;
    let alone_after = es_ceiling(&osc, bodies).await?;
    delete_index(&osc, "ceiling").await?;

    let secs = |rate: f64| n as f64 / rate;
    let (before, after, both) = (secs(alone_before), secs(alone_after), secs(together));
    let mean = (before + after) / 2.0;
    println!("\n## OpenSearch {}: snapshot of {n} documents ({} per bulk, {} in flight)", opensearch::version()?, batch.max_docs, batch.concurrency);
    println!("| figure | value |");
    println!("|---|---|");
    println!("| monsoon wall (start → every document acknowledged) | {wall:.1} s ({:.0} docs/s) |", n as f64 / wall);
    println!("| the node's bulk ceiling: the same bodies loaded by the bench, before and after monsoon's run | {before:.1} s, {after:.1} s ({:.0}, {:.0} docs/s) |", alone_before, alone_after);
    println!("| **monsoon wall / the node's bulk ceiling** (target ≤ 1.10) | {:.2} against their mean (/ before = {:.2}, / after = {:.2}) |", wall / mean, wall / before, wall / after);
    println!("| the pipeline's bound: SecantusDB's sorted read beside the same bulk load | {both:.1} s ({together:.0} docs/s); monsoon wall / it = {:.2} |", wall / both);
    println!("| SecantusDB's first batch of the snapshot's query (the bench's own, alone, just before monsoon's run) | {source_first:.1} s |");
    println!("| monsoon: start → first document read | {first_read:.1} s |");
    println!("| **monsoon wall from its first document read / the node's bulk ceiling** | {:.2} against their mean ({:.1} s) |", (wall - first_read) / mean, wall - first_read);
    println!("| monsoon CPU | {cpu:.2} s total, {:.2} s per 100k docs |", cpu * 100_000.0 / n as f64);
    println!("| monsoon peak RSS | {:.1} MiB ({rss_now}) |", rss as f64 / 1024.0);
    println!("| bulk requests, checkpoint writes | {requests} |");
    println!("| request slots busy (bulk request time / (wall × {})) | {:.0} % ({:.0} % from the first document read) |", batch.concurrency, busy * 100.0, busy * wall / (wall - first_read) * 100.0);
    print_cpu(&CpuRuns { alone: cpu_alone, together: cpu_together, first: cpu_first, run: cpu_run, monsoon: cpu }, source_first, mean);

    if m == 0 {
        return Ok(());
    }
    // The ceiling first, on a collection of its own: the bench's pipeline under the inserts.
    let ceiling = stream_ceiling(&client, &osc, m).await?;

    let events = client.database("bench").collection::<Document>("events");
    events.insert_one(doc! {"_id": -1}).await?;
    let stream_state = TempDir::new("bench-os-stream");
    let yaml = pipeline_yaml("stream", &mongo.uri(), &os.url(), &["bench.events"], "  snapshot: false\n");
    let mut monsoon = Monsoon::start(bin, &yaml, stream_state.path())?;
    let pid = monsoon_pid(&monsoon)?;
    monsoon.wait_stats(Duration::from_secs(60), |s| s["phase"] == "Streaming")?;
    let (cpu0, _) = proc_usage(pid).context("proc usage")?;
    let t = Instant::now();
    insert_all(&events, sample_docs(10_000_000, m)).await?;
    let last_insert = Instant::now();
    let insert_wall = last_insert.duration_since(t).as_secs_f64();
    let acked = wait_indexed(&monsoon, m as u64, Duration::from_secs(1800)).await?;
    let (cpu1, rss1) = proc_usage(pid).context("proc usage")?;
    let seen = wait_visible(&osc, "bench.events", m as u64).await?;
    let ours = Streamed {
        wall: acked.duration_since(t).as_secs_f64(),
        acked: acked.duration_since(last_insert).as_secs_f64(),
        visible: seen.duration_since(last_insert).as_secs_f64(),
    };
    let requests = request_counts(&monsoon);
    let rss_now = rss_split(pid);
    let (code, _) = monsoon.terminate()?;
    anyhow::ensure!(code == Some(0), "monsoon did not stop cleanly");

    println!("\n## OpenSearch: streaming {m} inserts (1000-doc insert_many batches, fresh pipeline and index)");
    println!("| figure | monsoon | the bench's own pipeline (same stream, direct bulk loads) | monsoon / it |");
    println!("|---|---|---|---|");
    println!("| first insert → last document acknowledged | {:.1} s ({:.0} docs/s) | {:.1} s | {:.2} |", ours.wall, m as f64 / ours.wall, ceiling.wall, ours.wall / ceiling.wall);
    // SecantusDB takes the inserts slower than either pipeline indexes them, and its pace
    // differs between the two runs (the machine's other work): each wall over its own run's
    // inserting time takes that pace out.
    let (ours_paced, ceiling_paced) = (ours.wall / insert_wall, ceiling.wall / ceiling.insert_wall);
    println!("| the same over that run's own inserting time (the inserts set the pace) | {ours_paced:.3} | {ceiling_paced:.3} | **{:.3}** (target ≤ 1.10) |", ours_paced / ceiling_paced);
    println!("| **last insert → acknowledged** (target ≤ 0.5 s) | {:.2} s | {:.2} s | |", ours.acked, ceiling.acked);
    println!("| last insert → visible in a search (the node refreshes every 1 s) | {:.2} s | {:.2} s | |", ours.visible, ceiling.visible);
    println!("| inserts took (MongoDB with an open stream) | {insert_wall:.1} s ({:.0} docs/s) | {:.1} s | |", m as f64 / insert_wall, ceiling.insert_wall);
    println!("| monsoon CPU | {:.2} s per 100k events | | |", (cpu1 - cpu0) * 100_000.0 / m as f64);
    println!("| monsoon peak RSS | {:.1} MiB ({rss_now}) | | |", rss1 as f64 / 1024.0);
    println!("| bulk requests, checkpoint writes | {requests} | | |");
    println!("(acknowledged: monsoon's `indexed` counter, polled every 50 ms near the end; visible: `_count` without a forced refresh, polled every 50 ms)");
    Ok(())
}

/// Where the CPU went in the snapshot's runs ([`Meter`] readings).
struct CpuRuns {
    /// The node's ceiling alone: the node, the bench.
    alone: Reading,
    /// SecantusDB's sorted read beside the same bulk load: SecantusDB, the node.
    together: Reading,
    /// SecantusDB's first batch of the snapshot's query, alone: SecantusDB.
    first: Reading,
    /// Monsoon's run: the node, SecantusDB, the bench.
    run: Reading,
    /// Monsoon's own CPU seconds in its run.
    monsoon: f64,
}

/// The CPU rows of the snapshot table, and the floor no pipeline beats on this machine: the
/// node must do at least its work of the ceiling run, SecantusDB at least its work of the
/// sorted read, and the cores are shared. With the first batch first: until it comes nothing
/// can be indexed, so only the rest of that work is shared out after it.
fn print_cpu(c: &CpuRuns, first_batch: f64, ceiling: f64) {
    let cores = super::cpu::cores();
    let (node, source, first) = (c.alone.seconds[0], c.together.seconds[0], c.first.seconds[0]);
    println!("| CPU: the node's ceiling run alone (before) | the node {node:.1} s, the bench {:.1} s; the machine busy {:.0} % of its {cores} cores |", c.alone.seconds[1], c.alone.busy * 100.0);
    println!("| CPU: SecantusDB's sorted read beside the same load | SecantusDB {source:.1} s, the node {:.1} s; the machine busy {:.0} % |", c.together.seconds[1], c.together.busy * 100.0);
    println!("| CPU: SecantusDB's first batch alone | {first:.1} s |");
    println!("| CPU: monsoon's run | the node {:.1} s, SecantusDB {:.1} s, monsoon {:.1} s, the bench {:.1} s; the machine busy {:.0} % |", c.run.seconds[0], c.run.seconds[1], c.monsoon, c.run.seconds[2], c.run.busy * 100.0);
    let floor = (node + source) / cores;
    let floor_serial = first_batch + (node + source - first).max(0.0) / cores;
    println!("| **the floor of any pipeline on these cores** ((the node's CPU alone + SecantusDB's CPU of the sorted read) / {cores}; the same with SecantusDB's first batch served first) | {floor:.1} s = {:.2} × the node's ceiling; {floor_serial:.1} s = **{:.2}** × |", floor / ceiling, floor_serial / ceiling);
}

/// When a streaming run's end came, in seconds.
struct Streamed {
    /// First insert → last document acknowledged.
    wall: f64,
    /// Last insert → last document acknowledged.
    acked: f64,
    /// Last insert → every document counted by a search.
    visible: f64,
}

struct StreamCeiling {
    wall: f64,
    acked: f64,
    visible: f64,
    insert_wall: f64,
}

/// The bench's own pipeline, for the node's ceiling under streaming: the change stream monsoon
/// opens (database level, same pipeline and options), each insert's document converted as
/// monsoon converts it, batched by monsoon's default limits (documents, bytes, flush interval)
/// and bulk-loaded with as many requests in flight. No checkpoint, no ordering per document,
/// no retries: what is left is the servers' own pace.
async fn stream_ceiling(client: &mongodb::Client, osc: &Elasticsearch, m: i64) -> anyhow::Result<StreamCeiling> {
    let batch = BatchConfig::default();
    let coll = client.database("bench").collection::<Document>("watched");
    let mut stream = super::bench_stream(client).await?;
    // Bodies from the reader to the loader; a few batches are enough to keep every slot busy.
    let (tx, rx) = tokio::sync::mpsc::channel::<(Vec<u8>, usize)>(batch.concurrency * 2);
    let index: Arc<str> = Arc::from("watched");
    let reader = tokio::spawn(async move {
        let mut stats = ConvertStats::default();
        let mut seen = 0;
        while seen < m {
            let mut body = Vec::with_capacity(batch.max_bytes.min(1 << 20));
            let mut docs = 0;
            // A batch starts with its first event and ends full or after the flush interval.
            let first = stream.next().await.context("change stream ended")??;
            let deadline = tokio::time::Instant::now() + batch.flush_interval;
            let mut next = Some(first);
            while let Some(e) = next.take() {
                let Action::Upsert { id, doc, time, .. } = event::parse(&e)? else { anyhow::bail!("not an insert") };
                let mut id_buf = Vec::with_capacity(16);
                convert::write_es_id(id, &mut id_buf)?;
                let mut source = Vec::with_capacity(doc.as_bytes().len() + 64);
                convert::write_document(doc, true, &mut source, &mut stats)?;
                let w = Write::new(index.clone(), index.clone(), String::from_utf8_lossy(&id_buf).into(), monsoon_engine::checkpoint::ClusterTime::from(time).version(), Op::Index(Bytes::from(source)));
                request::encode(&w, &mut body);
                docs += 1;
                seen += 1;
                if seen == m || docs == batch.max_docs || body.len() >= batch.max_bytes {
                    break;
                }
                next = match tokio::time::timeout_at(deadline, stream.next()).await {
                    Ok(e) => Some(e.context("change stream ended")??),
                    Err(_) => None,
                };
            }
            tx.send((body, docs)).await.context("loader stopped")?;
        }
        Ok::<_, anyhow::Error>(())
    });
    let loader = {
        let osc = osc.clone();
        tokio::spawn(async move {
            let bodies = futures_util::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|b| (b, rx)) });
            let mut acked = 0usize;
            let mut sending = std::pin::pin!(bodies
                .map(|(body, docs)| {
                    let osc = osc.clone();
                    async move {
                        super::es_ceiling(&osc, vec![body]).await?;
                        Ok::<_, anyhow::Error>(docs)
                    }
                })
                .buffer_unordered(batch.concurrency));
            while let Some(docs) = sending.next().await {
                acked += docs?;
                if acked as i64 == m {
                    return Ok(Instant::now());
                }
            }
            anyhow::bail!("only {acked} of {m} acknowledged")
        })
    };
    let t = Instant::now();
    insert_all(&coll, sample_docs(30_000_000, m)).await?;
    let last_insert = Instant::now();
    let done = tokio::time::timeout(Duration::from_secs(1800), loader).await???;
    reader.await??;
    let seen = wait_visible(osc, "watched", m as u64).await?;
    coll.drop().await?;
    delete_index(osc, "watched").await?;
    Ok(StreamCeiling {
        wall: done.duration_since(t).as_secs_f64(),
        acked: done.duration_since(last_insert).as_secs_f64(),
        visible: seen.duration_since(last_insert).as_secs_f64(),
        insert_wall: last_insert.duration_since(t).as_secs_f64(),
    })
}

/// Documents a search counts in `index` now: `_count` without a refresh (what a user sees).
async fn visible_count(osc: &Elasticsearch, index: &str) -> anyhow::Result<u64> {
    let r = osc.count(elasticsearch::CountParts::Index(&[index])).send().await?;
    if r.status_code().as_u16() == 404 {
        return Ok(0);
    }
    let body: serde_json::Value = r.json().await?;
    body["count"].as_u64().with_context(|| format!("no count in {body}"))
}

/// When a search first counts `target` documents in `index`.
async fn wait_visible(osc: &Elasticsearch, index: &str, target: u64) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = visible_count(osc, index).await?;
        if now >= target {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "only {now} of {target} visible in {index} after 120 s");
        tokio::time::sleep(POLL).await;
    }
}
